//! The collector Lambda: wiring only.

use aws_lambda_events::event::sqs::{BatchItemFailure, SqsBatchResponse, SqsEvent};
use lambda_runtime::{LambdaEvent, service_fn};
use nightshift_collector::{Config, Incoming, collect};
use nightshift_core::aws::dynamodb::DynamoStore;
use nightshift_core::aws::meter::Meter;
use nightshift_core::config::ProcessEnv;
use nightshift_core::ports::charge;

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    lambda_runtime::tracing::init_default_subscriber();
    let config = Config::from_env(&ProcessEnv)?;
    let aws = aws_config::load_from_env().await;
    let meter = Meter::new("collector");
    let store = DynamoStore::new(
        nightshift_core::aws::dynamodb::metered_client(&aws, &meter),
        config.table,
        config.pending_shards,
    );
    let (store, meter, memory_mb) = (&store, &meter, config.memory_mb);
    lambda_runtime::run(service_fn(move |event: LambdaEvent<SqsEvent>| async move {
        let started = std::time::Instant::now();
        let messages: Vec<Incoming> = event
            .payload
            .records
            .into_iter()
            .filter_map(|record| {
                Some(Incoming {
                    message_id: record.message_id?,
                    body: record.body.unwrap_or_default(),
                })
            })
            .collect();
        let collected = collect(store, &messages).await;
        let used = meter.take_invocation(started.elapsed(), memory_mb);
        charge(store, collected.runs.first().map(String::as_str), &used).await;
        let mut response = SqsBatchResponse::default();
        response.batch_item_failures = collected
            .retry
            .into_iter()
            .map(|id| {
                let mut failure = BatchItemFailure::default();
                failure.item_identifier = id;
                failure
            })
            .collect();
        Ok::<_, lambda_runtime::Error>(response)
    }))
    .await
}

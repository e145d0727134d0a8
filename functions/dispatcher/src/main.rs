//! The dispatcher Lambda: wiring only. Any event (the schedule, or the API
//! waking it for a new run) starts one reconciling pass.

use lambda_runtime::{LambdaEvent, service_fn};
use nightshift_core::aws::dynamodb::DynamoStore;
use nightshift_core::aws::ec2::SpotFleet;
use nightshift_core::aws::meter::Meter;
use nightshift_core::aws::s3::S3Blobs;
use nightshift_core::aws::sqs::SqsQueue;
use nightshift_core::config::ProcessEnv;
use nightshift_core::ports::{WallClock, charge};
use nightshift_dispatcher::{Config, Dispatcher, Pass};
use serde_json::Value;

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    lambda_runtime::tracing::init_default_subscriber();
    let config = Config::from_env(&ProcessEnv)?;
    let aws = aws_config::load_from_env().await;
    let meter = Meter::new("dispatcher");
    let store = DynamoStore::new(
        nightshift_core::aws::dynamodb::metered_client(&aws, &meter),
        config.table,
        config.settings.pending_shards,
    );
    let queue = SqsQueue::new(
        nightshift_core::aws::sqs::metered_client(&aws, &meter),
        config.task_queue_url,
    );
    let fleet = SpotFleet::new(
        nightshift_core::aws::ec2::metered_client(&aws, &meter),
        config.launch_template_id,
        config.instance_types,
        config.subnet_ids,
        config.settings.slots_per_instance,
    );
    let blobs = S3Blobs::new(
        nightshift_core::aws::s3::metered_client(&aws, &meter),
        config.bucket,
    );
    let memory_mb = config.memory_mb;
    let dispatcher = Dispatcher {
        runs: &store,
        pending: &store,
        tasks: &store,
        queue: &queue,
        fleet: &fleet,
        blobs: &blobs,
        clock: &WallClock,
        settings: &config.settings,
    };
    let (dispatcher, store, meter) = (&dispatcher, &store, &meter);
    lambda_runtime::run(service_fn(move |event: LambdaEvent<Value>| async move {
        let started = std::time::Instant::now();
        // Unique to this pass: Lambda may deliver an event twice under one
        // request id, and two passes must never share the lease.
        let owner = format!("{}-{}", event.context.request_id, uuid::Uuid::new_v4());
        let now = chrono::Utc::now();
        // The night's schedule opens a run; every other event reconciles.
        let pass: Pass = if nightshift_dispatcher::opens_the_night(&event.payload) {
            dispatcher.open_night(now, &owner).await?
        } else {
            dispatcher.pass(now, &owner).await?
        };
        tracing::info!(?pass, "dispatch pass");
        let used = meter.take_invocation(started.elapsed(), memory_mb);
        charge(store, pass.run_id.as_deref(), &used).await;
        Ok::<Pass, lambda_runtime::Error>(pass)
    }))
    .await
}

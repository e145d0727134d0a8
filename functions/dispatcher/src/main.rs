//! The dispatcher Lambda: wiring only. Any event (the schedule, or the API
//! waking it for a new run) starts one reconciling pass.

use std::time::Duration;

use lambda_runtime::{LambdaEvent, service_fn};
use nightshift_core::aws::dynamodb::DynamoStore;
use nightshift_core::aws::ec2::SpotFleet;
use nightshift_core::aws::s3::S3Blobs;
use nightshift_core::aws::sqs::SqsQueue;
use nightshift_core::config;
use nightshift_dispatcher::{Dispatcher, Pass, Settings};
use serde_json::Value;

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    lambda_runtime::tracing::init_default_subscriber();
    let settings = Settings {
        max_instances: config::parsed_or("NIGHTSHIFT_MAX_INSTANCES", 20)?,
        slots_per_instance: config::parsed_or("NIGHTSHIFT_SLOTS_PER_INSTANCE", 2)?,
        max_queued: config::parsed_or("NIGHTSHIFT_MAX_QUEUED", 2000)?,
        pending_shards: config::parsed_or("NIGHTSHIFT_PENDING_SHARDS", 8)?,
        lease_ttl: Duration::from_secs(config::parsed_or("NIGHTSHIFT_LEASE_SECONDS", 120)?),
        max_lifetime: Duration::from_secs(config::parsed_or(
            "NIGHTSHIFT_MAX_LIFETIME_SECONDS",
            43_200,
        )?),
        stray_grace: Duration::from_secs(config::parsed_or("NIGHTSHIFT_STRAY_GRACE_SECONDS", 900)?),
    };
    let instance_types: Vec<String> = config::required("NIGHTSHIFT_INSTANCE_TYPES")?
        .split(',')
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty())
        .collect();
    let aws = aws_config::load_from_env().await;
    let store = DynamoStore::new(
        nightshift_core::aws::dynamodb::Client::new(&aws),
        config::required("NIGHTSHIFT_TABLE")?,
        settings.pending_shards,
    );
    let queue = SqsQueue::new(
        nightshift_core::aws::sqs::Client::new(&aws),
        config::required("NIGHTSHIFT_TASK_QUEUE_URL")?,
    );
    let fleet = SpotFleet::new(
        nightshift_core::aws::ec2::Client::new(&aws),
        config::required("NIGHTSHIFT_LAUNCH_TEMPLATE_ID")?,
        instance_types,
    );
    let blobs = S3Blobs::new(
        nightshift_core::aws::s3::Client::new(&aws),
        config::required("NIGHTSHIFT_BUCKET")?,
    );
    let dispatcher = Dispatcher {
        runs: &store,
        pending: &store,
        tasks: &store,
        queue: &queue,
        fleet: &fleet,
        blobs: &blobs,
        settings: &settings,
    };
    let dispatcher = &dispatcher;
    lambda_runtime::run(service_fn(move |event: LambdaEvent<Value>| async move {
        let owner = event.context.request_id.clone();
        let pass: Pass = dispatcher.pass(chrono::Utc::now(), &owner).await?;
        tracing::info!(?pass, "dispatch pass");
        Ok::<Pass, lambda_runtime::Error>(pass)
    }))
    .await
}

//! The ingest Lambda: wiring only.

use std::sync::Arc;

use nightshift_core::aws::dynamodb::DynamoStore;
use nightshift_core::aws::s3::S3Blobs;
use nightshift_core::config::ProcessEnv;
use nightshift_ingest::{Api, Config, LambdaTrigger, router};

#[tokio::main]
async fn main() -> Result<(), lambda_http::Error> {
    lambda_http::tracing::init_default_subscriber();
    let config = Config::from_env(&ProcessEnv)?;
    let aws = aws_config::load_from_env().await;
    let store = Arc::new(DynamoStore::new(
        nightshift_core::aws::dynamodb::Client::new(&aws),
        config.table,
        config.pending_shards,
    ));
    let api = Api {
        writer: store.clone(),
        reader: store.clone(),
        runs: store,
        blobs: Arc::new(S3Blobs::new(
            nightshift_core::aws::s3::Client::new(&aws),
            config.bucket,
        )),
        trigger: Arc::new(LambdaTrigger::new(
            aws_sdk_lambda::Client::new(&aws),
            config.dispatcher_function,
        )),
        limits: config.limits,
        claim_check: config.claim_check,
        night: config.night,
    };
    lambda_http::run(router(api)).await
}

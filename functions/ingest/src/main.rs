//! The ingest Lambda: wiring only.

use std::sync::Arc;

use nightshift_core::aws::dynamodb::DynamoStore;
use nightshift_core::aws::s3::S3Blobs;
use nightshift_core::config;
use nightshift_core::limits::ClaimCheck;
use nightshift_ingest::{Api, LambdaTrigger, Limits, router};

#[tokio::main]
async fn main() -> Result<(), lambda_http::Error> {
    lambda_http::tracing::init_default_subscriber();
    let table = config::required("NIGHTSHIFT_TABLE")?;
    let bucket = config::required("NIGHTSHIFT_BUCKET")?;
    let dispatcher = config::required("NIGHTSHIFT_DISPATCHER_FUNCTION")?;
    let shards = config::parsed_or("NIGHTSHIFT_PENDING_SHARDS", 8)?;
    let inline_limit = config::parsed_or("NIGHTSHIFT_INLINE_LIMIT_BYTES", 200 * 1024)?;
    let max_payload_bytes = config::parsed_or("NIGHTSHIFT_MAX_PAYLOAD_BYTES", 6 * 1024 * 1024)?;

    let aws = aws_config::load_from_env().await;
    let store = Arc::new(DynamoStore::new(
        nightshift_core::aws::dynamodb::Client::new(&aws),
        table,
        shards,
    ));
    let api = Api {
        writer: store.clone(),
        reader: store.clone(),
        runs: store,
        blobs: Arc::new(S3Blobs::new(
            nightshift_core::aws::s3::Client::new(&aws),
            bucket,
        )),
        trigger: Arc::new(LambdaTrigger::new(
            aws_sdk_lambda::Client::new(&aws),
            dispatcher,
        )),
        limits: Limits::new(max_payload_bytes, &config::required("NIGHTSHIFT_KERNELS")?)
            .with_programs(&std::env::var("NIGHTSHIFT_PROGRAM_KERNELS").unwrap_or_default()),
        claim_check: ClaimCheck::new(inline_limit),
    };
    lambda_http::run(router(api)).await
}

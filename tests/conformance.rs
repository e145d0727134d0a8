//! The conformance suite of the storage ports, through the real DynamoDB
//! adapter, against the emulator and the table as template.yaml defines it
//! (its indexes and their projections included). The in-memory store runs
//! the same suite in `nightshift-core`'s own tests.

use nightshift_core::aws::dynamodb::DynamoStore;
use nightshift_e2e::Stack;

/// The template's default `PendingShards`.
const SHARDS: u32 = 8;

#[tokio::test(flavor = "multi_thread")]
async fn the_dynamodb_adapter_conforms_on_the_emulator() {
    let stack = Stack::resources().await;
    let store = DynamoStore::new(
        stack.dynamodb.clone(),
        &stack.env["NIGHTSHIFT_TABLE"],
        SHARDS,
    );
    nightshift_core::conformance::run_all(&store, SHARDS).await;
}

//! The adapter against the real SDK client with mocked responses: how it
//! reads refusals, conflicts and limits. The rules themselves are held to
//! account by the conformance suite, on the emulator.

use aws_sdk_dynamodb::operation::batch_write_item::BatchWriteItemOutput;
use aws_sdk_dynamodb::operation::get_item::GetItemOutput;
use aws_sdk_dynamodb::operation::transact_write_items::{
    TransactWriteItemsError, TransactWriteItemsOutput,
};
use aws_sdk_dynamodb::types::CancellationReason;
use aws_sdk_dynamodb::types::error::TransactionCanceledException;
use aws_smithy_mocks::{RuleMode, mock, mock_client};
use chrono::Utc;
use serde_json::json;

use super::codec::*;
use super::*;
use crate::message::{TaskOutcome, TaskResult};
use crate::model::{Blob, NewTask};
use crate::ports::{PendingTasks, RecordOutcome, ResultRecorder, Sent, TaskWriter};

fn cancelled(codes: &[&str]) -> TransactWriteItemsError {
    let reasons = codes
        .iter()
        .map(|code| CancellationReason::builder().code(*code).build())
        .collect();
    TransactWriteItemsError::TransactionCanceledException(
        TransactionCanceledException::builder()
            .message("Transaction cancelled")
            .set_cancellation_reasons(Some(reasons))
            .build(),
    )
}

fn committed() -> TransactWriteItemsOutput {
    TransactWriteItemsOutput::builder().build()
}

fn result(task_id: &str) -> TaskResult {
    TaskResult {
        task_id: task_id.into(),
        run_id: "r1".into(),
        kernel: "sleep".into(),
        instance_id: "i-1".into(),
        attempts: 1,
        started_at: Utc::now(),
        finished_at: Utc::now(),
        outcome: TaskOutcome::Done {
            result: Blob::json(&json!({"x": 1})),
            summary: "ok".into(),
        },
    }
}

#[tokio::test]
async fn a_conflicting_transaction_is_retried_not_taken_for_a_refusal() {
    // TransactionConflict on the hot run item twice, then it commits.
    let rule = mock!(Client::transact_write_items)
        .sequence()
        .error(|| cancelled(&["None", "TransactionConflict"]))
        .error(|| cancelled(&["None", "TransactionConflict"]))
        .output(committed)
        .build();
    let client = mock_client!(aws_sdk_dynamodb, RuleMode::Sequential, [&rule]);
    let store = DynamoStore::new(client, "t", 4);
    let outcomes = store.record_results(&[result("a")]).await.unwrap();
    assert_eq!(outcomes, vec![RecordOutcome::Recorded]);
    assert_eq!(rule.num_calls(), 3);
}

#[tokio::test]
async fn a_result_over_the_item_limit_fails_its_task_and_the_rest_is_recorded() {
    // [a, b, counter]: a is too large. b is retried alone and commits; a is
    // recorded FAILED with the reason.
    let rule = mock!(Client::transact_write_items)
        .sequence()
        .error(|| cancelled(&["ValidationError", "None", "None"]))
        .output(committed)
        .output(committed)
        .build();
    let client = mock_client!(aws_sdk_dynamodb, RuleMode::Sequential, [&rule]);
    let store = DynamoStore::new(client, "t", 4);
    let outcomes = store
        .record_results(&[result("a"), result("b")])
        .await
        .unwrap();
    assert!(
        matches!(&outcomes[0], RecordOutcome::FailedInstead(reason) if reason == crate::limits::RESULT_TOO_LARGE),
        "{outcomes:?}"
    );
    assert_eq!(outcomes[1], RecordOutcome::Recorded);
    assert_eq!(rule.num_calls(), 3);
}

#[tokio::test]
async fn a_refused_result_is_explained_by_the_rules() {
    // The task is already DONE: a redelivery, acknowledged as a duplicate.
    let refused = mock!(Client::transact_write_items)
        .then_error(|| cancelled(&["ConditionalCheckFailed", "None"]));
    let read = mock!(Client::get_item).then_output(|| {
        let mut item = task_key("a");
        item.insert(STATUS.into(), s("DONE"));
        item.insert(RUN_ID.into(), s("r1"));
        GetItemOutput::builder().set_item(Some(item)).build()
    });
    let client = mock_client!(aws_sdk_dynamodb, [&refused, &read]);
    let store = DynamoStore::new(client, "t", 4);
    let outcomes = store.record_results(&[result("a")]).await.unwrap();
    assert_eq!(outcomes, vec![RecordOutcome::Duplicate]);
}

#[tokio::test]
async fn tasks_no_longer_pending_are_dropped_and_the_rest_queued_with_one_counter() {
    let rule = mock!(Client::transact_write_items)
        .sequence()
        .error(|| cancelled(&["None", "ConditionalCheckFailed", "None", "None"]))
        .output(committed)
        .build();
    let client = mock_client!(aws_sdk_dynamodb, RuleMode::Sequential, [&rule]);
    let store = DynamoStore::new(client, "t", 4);
    let ids = ["a", "b", "c"].map(str::to_owned);
    let changed = store
        .mark_queued("r1", &Sent::all(&ids, "sleep"))
        .await
        .unwrap();
    assert_eq!(changed, vec!["a".to_owned(), "c".to_owned()]);
    assert_eq!(rule.num_calls(), 2);
}

#[tokio::test]
async fn one_transaction_queues_a_batch_with_its_run_counter() {
    let rule = mock!(Client::transact_write_items)
        .match_requests(|r| {
            let items = r.transact_items();
            // 10 task updates and the run's counters: its own and its kernel's.
            items.len() == 11
                && items.last().and_then(|i| i.update()).is_some_and(|u| {
                    u.update_expression() == "ADD #c0 :c0, #c1 :c1"
                        && u.expression_attribute_names().is_some_and(|n| {
                            n.get("#c0") == Some(&"kernel_queued:sleep".to_owned())
                                && n.get("#c1") == Some(&"queued".to_owned())
                        })
                })
        })
        .then_output(committed);
    let client = mock_client!(aws_sdk_dynamodb, [&rule]);
    let store = DynamoStore::new(client, "t", 4);
    let ids: Vec<String> = (0..10).map(|i| format!("t{i}")).collect();
    assert_eq!(
        store
            .mark_queued("r1", &Sent::all(&ids, "sleep"))
            .await
            .unwrap()
            .len(),
        10
    );
    assert_eq!(rule.num_calls(), 1);
}

fn new_task(id: &str) -> NewTask {
    NewTask {
        id: id.into(),
        account: "a".into(),
        kernel: "sleep".into(),
        payload: Blob::json(&json!({"seconds": 1})),
        created_at: Utc::now(),
        idempotency: None,
    }
}

#[tokio::test]
async fn unprocessed_batch_writes_are_retried() {
    let task = new_task("t1");
    let store_for_item = DynamoStore::new(mock_client!(aws_sdk_dynamodb, []), "t", 4);
    let unprocessed = DynamoStore::put_request(store_for_item.task_item(&task, "req")).unwrap();
    let rule = mock!(Client::batch_write_item)
        .sequence()
        .output(move || {
            BatchWriteItemOutput::builder()
                .unprocessed_items("t", vec![unprocessed.clone()])
                .build()
        })
        .output(|| BatchWriteItemOutput::builder().build())
        .build();
    let client = mock_client!(aws_sdk_dynamodb, RuleMode::Sequential, [&rule]);
    let store = DynamoStore::new(client, "t", 4);
    store
        .stage("req", std::slice::from_ref(&task))
        .await
        .unwrap();
    assert_eq!(rule.num_calls(), 2);
}

#[test]
fn transactions_are_split_by_count_and_by_bytes() {
    let many: Vec<(u32, usize)> = (0..150).map(|i| (i, 10)).collect();
    let groups = transaction_groups(many, 1);
    assert_eq!(
        groups.iter().map(Vec::len).collect::<Vec<_>>(),
        vec![99, 51]
    );
    let large: Vec<(u32, usize)> = (0..30).map(|i| (i, 300_000)).collect();
    let groups = transaction_groups(large, 0);
    assert!(groups.len() >= 3, "30 items of 300 KB exceed 4 MB");
    assert!(
        groups
            .iter()
            .all(|g| g.len() * 300_000 <= TRANSACTION_BYTES)
    );
}

#[tokio::test]
async fn the_meter_asks_for_the_capacity_of_each_request_and_adds_it_up() {
    use aws_sdk_dynamodb::operation::put_item::PutItemOutput;
    use aws_sdk_dynamodb::types::{ConsumedCapacity, ReturnConsumedCapacity};
    let put = mock!(Client::put_item)
        .match_requests(|request| {
            request.return_consumed_capacity() == Some(&ReturnConsumedCapacity::Total)
        })
        .then_output(|| {
            PutItemOutput::builder()
                .consumed_capacity(ConsumedCapacity::builder().capacity_units(3.0).build())
                .build()
        });
    let get = mock!(Client::get_item).then_output(|| {
        GetItemOutput::builder()
            .consumed_capacity(ConsumedCapacity::builder().capacity_units(0.5).build())
            .build()
    });
    let meter = crate::aws::meter::Meter::new("test");
    let client = mock_client!(
        aws_sdk_dynamodb,
        RuleMode::MatchAny,
        [&put, &get],
        |config| { config.interceptor(meter.clone()) }
    );
    client
        .put_item()
        .table_name("t")
        .item("pk", aws_sdk_dynamodb::types::AttributeValue::S("a".into()))
        .send()
        .await
        .unwrap();
    client
        .get_item()
        .table_name("t")
        .key("pk", aws_sdk_dynamodb::types::AttributeValue::S("a".into()))
        .send()
        .await
        .unwrap();
    use crate::ports::UsageSource;
    let used = meter.take();
    assert_eq!(put.num_calls(), 1, "the put asked for its capacity");
    assert_eq!(
        (used.dynamodb_write_units, used.dynamodb_read_units),
        (3.0, 0.5)
    );
    let calls: Vec<(&str, u64)> = used.calls.iter().map(|(c, n)| (c.as_str(), *n)).collect();
    assert_eq!(
        calls,
        [("test/DynamoDB.GetItem", 1), ("test/DynamoDB.PutItem", 1)],
        "each attempt, by component and operation"
    );
    assert!(meter.take().is_empty(), "a take starts the count again");
}

/// Whether every item of a transaction commits a STAGED task of `req`:
/// PENDING, on the condition that it is still that request's STAGED item,
/// and without the expiry that would have the table delete it a day later.
fn commits_of_req(
    request: &aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsInput,
) -> bool {
    request.transact_items().iter().all(|item| {
        item.update().is_some_and(|u| {
            u.update_expression().contains("REMOVE #expires_at")
                && u.condition_expression() == Some("#request_id = :request AND #status = :staged")
                && u.expression_attribute_names().is_some_and(|n| {
                    n.get("#expires_at") == Some(&EXPIRES_AT.to_owned())
                        && n.get("#status") == Some(&STATUS.to_owned())
                })
                && u.expression_attribute_values().is_some_and(|v| {
                    v.get(":request") == Some(&s("req")) && v.get(":pending") == Some(&s("PENDING"))
                })
        })
    })
}

#[tokio::test]
async fn a_commit_leaves_a_task_its_condition_refuses_and_commits_the_others() {
    // "a" was queued since (a repeated commit); "b" was cancelled with it.
    let rule = mock!(Client::transact_write_items)
        .match_requests(commits_of_req)
        .sequence()
        .error(|| cancelled(&["ConditionalCheckFailed", "None"]))
        .output(committed)
        .build();
    let client = mock_client!(aws_sdk_dynamodb, RuleMode::Sequential, [&rule]);
    let store = DynamoStore::new(client, "t", 4);
    store
        .commit("req", &[new_task("a"), new_task("b")])
        .await
        .unwrap();
    assert_eq!(rule.num_calls(), 2);
}

#[tokio::test]
async fn a_commit_refused_for_another_reason_fails() {
    let rule = mock!(Client::transact_write_items)
        .match_requests(commits_of_req)
        .then_error(|| cancelled(&["ValidationError", "None"]));
    let client = mock_client!(aws_sdk_dynamodb, [&rule]);
    let store = DynamoStore::new(client, "t", 4);
    let error = store
        .commit("req", &[new_task("a"), new_task("b")])
        .await
        .unwrap_err();
    assert!(!error.is_retryable(), "{error}");
    assert_eq!(rule.num_calls(), 1);
}

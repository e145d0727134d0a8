use async_trait::async_trait;
use chrono::{DateTime, Utc};
use nightshift_core::fakes::MemoryStore;
use nightshift_core::limits::RESULT_TOO_LARGE;
use nightshift_core::ports::{PendingTasks, RunReader, RunStore, Sent, TaskReader, TaskWriter};
use nightshift_core::{
    AttemptEvent, Blob, NewTask, TaskMessage, TaskOutcome, TaskResult, TaskStatus,
};
use serde_json::json;

use super::*;

fn new_task(id: &str, payload: serde_json::Value) -> NewTask {
    NewTask {
        id: id.into(),
        account: format!("acct-{id}"),
        kernel: "sleep".into(),
        payload: Blob::json(&payload),
        created_at: Utc::now(),
        idempotency: None,
    }
}

async fn add(store: &MemoryStore, tasks: &[NewTask]) {
    store.stage("req", tasks).await.unwrap();
    store.commit("req", tasks).await.unwrap();
}

async fn store_with_queued(tasks: &[&str]) -> MemoryStore {
    let store = MemoryStore::default();
    let new: Vec<NewTask> = tasks
        .iter()
        .map(|id| new_task(id, json!({"seconds": 0})))
        .collect();
    add(&store, &new).await;
    store
        .open_run("r1", Utc::now(), Utc::now() + chrono::Duration::hours(8))
        .await
        .unwrap();
    let ids: Vec<String> = tasks.iter().map(|t| (*t).to_owned()).collect();
    store
        .mark_queued("r1", &Sent::all(&ids, "sleep"))
        .await
        .unwrap();
    store
}

fn result(task: &str) -> Envelope {
    Envelope::Result(TaskResult {
        task_id: task.into(),
        run_id: "r1".into(),
        kernel: "sleep".into(),
        instance_id: "i-0abc".into(),
        attempts: 1,
        started_at: Utc::now(),
        finished_at: Utc::now(),
        outcome: TaskOutcome::Done {
            result: Blob::json(&json!({"v": 1})),
            summary: "v=1".into(),
        },
    })
}

fn message(id: &str, envelope: &Envelope) -> Incoming {
    Incoming {
        message_id: id.into(),
        body: envelope.to_json(),
    }
}

#[tokio::test]
async fn a_result_delivered_twice_is_recorded_once() {
    let store = store_with_queued(&["t1", "t2"]).await;
    let batch = [message("m1", &result("t1")), message("m2", &result("t2"))];
    assert!(collect(&store, &batch).await.retry.is_empty());
    // The same result again, alone and inside a batch with itself.
    let again = [message("m3", &result("t1")), message("m4", &result("t1"))];
    assert!(collect(&store, &again).await.retry.is_empty());
    let run = store.run("r1").await.unwrap().unwrap();
    assert_eq!((run.queued, run.done, run.failed), (2, 2, 0));
    let task = store.task("t1").await.unwrap().unwrap();
    assert_eq!(
        (task.status, task.instance_id.as_deref()),
        (TaskStatus::Done, Some("i-0abc"))
    );
}

#[tokio::test]
async fn the_sample_event_parses_and_records() {
    let event: serde_json::Value =
        serde_json::from_str(include_str!("../../../events/sqs-results.json")).unwrap();
    let messages: Vec<Incoming> = event["Records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| Incoming {
            message_id: r["messageId"].as_str().unwrap().into(),
            body: r["body"].as_str().unwrap().into(),
        })
        .collect();
    let store = MemoryStore::default();
    // Unknown tasks are acknowledged, not retried forever.
    assert!(collect(&store, &messages).await.retry.is_empty());
}

#[tokio::test]
async fn only_failed_messages_are_reported() {
    let store = store_with_queued(&["t1"]).await;
    add(&store, &[new_task("early", json!(1))]).await;
    let batch = [
        message("ok", &result("t1")),
        message("early", &result("early")),
        Incoming {
            message_id: "garbage".into(),
            body: "{not json".into(),
        },
    ];
    // The early result waits for its task to be QUEUED; an unreadable
    // message never becomes readable and is dropped (with an error logged).
    assert_eq!(
        collect(&store, &batch).await.retry,
        vec!["early".to_owned()]
    );
}

#[tokio::test]
async fn attempts_count_once_and_dead_letters_fail_the_task_with_its_last_error() {
    let store = store_with_queued(&["t1"]).await;
    let failed = Envelope::AttemptFailed(AttemptEvent {
        event_id: "m9:1".into(),
        task_id: "t1".into(),
        run_id: "r1".into(),
        instance_id: "i-1".into(),
        started_at: None,
        at: Utc::now(),
        error: Some("program exited with 3".into()),
    });
    assert!(
        collect(&store, &[message("a", &failed), message("b", &failed)])
            .await
            .retry
            .is_empty()
    );
    let dead = Envelope::Task(TaskMessage {
        task_id: "t1".into(),
        run_id: "r1".into(),
        account: "acct-t1".into(),
        kernel: "sleep".into(),
        payload: Blob::json(&json!(1)),
        checkpoint_key: None,
        prior_attempts: 0,
    });
    assert!(
        collect(&store, &[message("c", &dead), message("d", &dead)])
            .await
            .retry
            .is_empty()
    );
    let task = store.task("t1").await.unwrap().unwrap();
    assert_eq!(task.status, TaskStatus::Failed);
    assert_eq!(task.failed_attempts, 1);
    assert_eq!(task.last_error.as_deref(), Some("program exited with 3"));
    let run = store.run("r1").await.unwrap().unwrap();
    assert_eq!((run.done, run.failed), (0, 1));
}

#[tokio::test]
async fn a_transient_failure_retries_the_results_and_loses_none() {
    let store = store_with_queued(&["t1", "t2"]).await;
    store.inject_fault("record_results", 1);
    let batch = [message("m1", &result("t1")), message("m2", &result("t2"))];
    let mut retry = collect(&store, &batch).await.retry;
    retry.sort();
    assert_eq!(retry, vec!["m1".to_owned(), "m2".to_owned()]);
    assert!(
        collect(&store, &batch).await.retry.is_empty(),
        "the redelivery records them"
    );
    let run = store.run("r1").await.unwrap().unwrap();
    assert_eq!(run.done, 2);
}

#[tokio::test]
async fn a_result_too_large_for_its_item_fails_its_task_and_the_run_can_end() {
    let store = MemoryStore::default();
    add(
        &store,
        &[
            new_task("big", json!({"data": "p".repeat(150_000)})),
            new_task("small", json!(1)),
        ],
    )
    .await;
    store
        .open_run("r1", Utc::now(), Utc::now() + chrono::Duration::hours(8))
        .await
        .unwrap();
    store
        .mark_queued(
            "r1",
            &Sent::all(&["big".to_owned(), "small".to_owned()], "sleep"),
        )
        .await
        .unwrap();
    let Envelope::Result(mut big) = result("big") else {
        unreachable!()
    };
    big.outcome = TaskOutcome::Done {
        result: Blob::json(&json!({"data": "r".repeat(300_000)})),
        summary: "big".into(),
    };
    let batch = [
        message("m1", &Envelope::Result(big)),
        message("m2", &result("small")),
    ];
    assert!(
        collect(&store, &batch).await.retry.is_empty(),
        "nothing is retried forever"
    );
    let task = store.task("big").await.unwrap().unwrap();
    assert_eq!(
        (task.status, task.last_error.as_deref()),
        (TaskStatus::Failed, Some(RESULT_TOO_LARGE))
    );
    let run = store.run("r1").await.unwrap().unwrap();
    assert_eq!((run.queued, run.done, run.failed), (2, 1, 1));
}

/// A recorder that refuses, for good, any batch holding task `poison`.
struct RefusesPoison(MemoryStore);

#[async_trait]
impl ResultRecorder for RefusesPoison {
    async fn record_results(&self, results: &[TaskResult]) -> Result<Vec<RecordOutcome>, Error> {
        if results.iter().any(|r| r.task_id == "poison") {
            return Err(Error::permanent(
                "TransactWriteItems",
                "ValidationException: refused",
            ));
        }
        self.0.record_results(results).await
    }
    async fn record_attempt(
        &self,
        event: &AttemptEvent,
        kind: AttemptKind,
    ) -> Result<RecordOutcome, Error> {
        self.0.record_attempt(event, kind).await
    }
    async fn fail_task(
        &self,
        task_id: &str,
        run_id: &str,
        at: DateTime<Utc>,
        reason: Option<&str>,
    ) -> Result<RecordOutcome, Error> {
        self.0.fail_task(task_id, run_id, at, reason).await
    }
    async fn add_usage(&self, run_id: &str, usage: &nightshift_core::Usage) -> Result<(), Error> {
        self.0.add_usage(run_id, usage).await
    }
}

#[tokio::test]
async fn a_result_refused_for_good_fails_only_its_own_task() {
    let recorder = RefusesPoison(store_with_queued(&["poison", "t1"]).await);
    let batch = [
        message("m1", &result("poison")),
        message("m2", &result("t1")),
    ];
    assert!(collect(&recorder, &batch).await.retry.is_empty());
    let poison = recorder.0.task("poison").await.unwrap().unwrap();
    assert_eq!(poison.status, TaskStatus::Failed);
    assert!(poison.last_error.unwrap().contains("could not be recorded"));
    assert_eq!(
        recorder.0.task("t1").await.unwrap().unwrap().status,
        TaskStatus::Done
    );
    let run = recorder.0.run("r1").await.unwrap().unwrap();
    assert_eq!((run.done, run.failed), (1, 1));
}

#[tokio::test]
async fn a_workers_usage_is_added_to_its_run_and_the_runs_of_a_batch_are_named() {
    let store = store_with_queued(&["t1"]).await;
    let usage = nightshift_core::Usage {
        sqs_requests: 40,
        s3_reads: 2,
        ..nightshift_core::Usage::default()
    };
    let report = Envelope::Usage(nightshift_core::UsageReport {
        run_id: "r1".into(),
        instance_id: "i-1".into(),
        usage: usage.clone(),
    });
    let collected = collect(
        &store,
        &[message("u", &report), message("m", &result("t1"))],
    )
    .await;
    assert!(collected.retry.is_empty());
    assert_eq!(collected.runs, ["r1"]);
    assert_eq!(store.run("r1").await.unwrap().unwrap().usage, usage);
}

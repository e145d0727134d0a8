use chrono::Utc;
use nightshift_core::fakes::MemoryStore;
use nightshift_core::ports::{PendingTasks, RunStore, TaskReader, TaskWriter};
use nightshift_core::{
    AttemptEvent, Blob, NewTask, TaskMessage, TaskOutcome, TaskResult, TaskStatus,
};
use serde_json::json;

use super::*;

async fn store_with_queued(tasks: &[&str]) -> MemoryStore {
    let store = MemoryStore::default();
    let new: Vec<NewTask> = tasks
        .iter()
        .map(|id| NewTask {
            id: (*id).into(),
            account: format!("acct-{id}"),
            kernel: "sleep".into(),
            payload: Blob::Inline(json!({"seconds": 0})),
            created_at: Utc::now(),
            idempotency: None,
        })
        .collect();
    store.insert_tasks(&new).await.unwrap();
    store.open_run("r1", Utc::now()).await.unwrap();
    let ids: Vec<String> = tasks.iter().map(|t| (*t).to_owned()).collect();
    store.mark_queued("r1", &ids).await.unwrap();
    store
}

fn result(task: &str) -> Envelope {
    Envelope::Result(TaskResult {
        task_id: task.into(),
        run_id: "r1".into(),
        instance_id: "i-0abc".into(),
        attempts: 1,
        started_at: Utc::now(),
        finished_at: Utc::now(),
        outcome: TaskOutcome::Done {
            result: Blob::Inline(json!({"v": 1})),
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
    assert!(collect(&store, &batch).await.is_empty());
    // The same result again, alone and inside a batch with itself.
    let again = [message("m3", &result("t1")), message("m4", &result("t1"))];
    assert!(collect(&store, &again).await.is_empty());
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
    assert!(collect(&store, &messages).await.is_empty());
}

#[tokio::test]
async fn only_failed_messages_are_reported() {
    let store = store_with_queued(&["t1"]).await;
    store
        .insert_tasks(&[NewTask {
            id: "early".into(),
            account: "a".into(),
            kernel: "sleep".into(),
            payload: Blob::Inline(json!(1)),
            created_at: Utc::now(),
            idempotency: None,
        }])
        .await
        .unwrap();
    let batch = [
        message("ok", &result("t1")),
        message("early", &result("early")),
        Incoming {
            message_id: "garbage".into(),
            body: "{not json".into(),
        },
    ];
    let mut retry = collect(&store, &batch).await;
    retry.sort();
    assert_eq!(retry, vec!["early".to_owned(), "garbage".to_owned()]);
}

#[tokio::test]
async fn attempts_count_once_and_dead_letters_fail_the_task_with_its_last_error() {
    let store = store_with_queued(&["t1"]).await;
    let failed = Envelope::AttemptFailed(AttemptEvent {
        event_id: "m9:1".into(),
        task_id: "t1".into(),
        run_id: "r1".into(),
        instance_id: "i-1".into(),
        at: Utc::now(),
        error: Some("program exited with 3".into()),
    });
    assert!(
        collect(&store, &[message("a", &failed), message("b", &failed)])
            .await
            .is_empty()
    );
    let dead = Envelope::Task(TaskMessage {
        task_id: "t1".into(),
        run_id: "r1".into(),
        account: "acct-t1".into(),
        kernel: "sleep".into(),
        payload: Blob::Inline(json!(1)),
        checkpoint_key: None,
        prior_attempts: 0,
    });
    assert!(
        collect(&store, &[message("c", &dead), message("d", &dead)])
            .await
            .is_empty()
    );
    let task = store.task("t1").await.unwrap().unwrap();
    assert_eq!(task.status, TaskStatus::Failed);
    assert_eq!(task.failed_attempts, 1);
    assert_eq!(task.last_error.as_deref(), Some("program exited with 3"));
    let run = store.run("r1").await.unwrap().unwrap();
    assert_eq!((run.done, run.failed), (0, 1));
}

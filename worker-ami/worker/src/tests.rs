//! The worker against in-memory queues, bucket and metadata.

use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use nightshift_core::fakes::{FakeInstances, MemoryBlobs, MemoryQueue};
use nightshift_core::{Blob, Envelope, TaskMessage, TaskOutcome};
use serde_json::{Value, json};

use super::*;

#[derive(Default)]
struct FakeMetadata {
    notice: AtomicBool,
}

#[async_trait]
impl InstanceMetadata for FakeMetadata {
    async fn instance_id(&self) -> Result<String, nightshift_core::Error> {
        Ok("i-test".into())
    }

    async fn spot_action(&self) -> Result<Option<String>, nightshift_core::Error> {
        Ok(self
            .notice
            .load(Ordering::SeqCst)
            .then(|| "terminate".to_owned()))
    }
}

struct Rig {
    tasks: Arc<MemoryQueue>,
    results: Arc<MemoryQueue>,
    blobs: Arc<MemoryBlobs>,
    instances: Arc<FakeInstances>,
    metadata: Arc<FakeMetadata>,
}

impl Rig {
    fn new() -> Self {
        Self {
            tasks: Arc::default(),
            results: Arc::default(),
            blobs: Arc::default(),
            instances: Arc::default(),
            metadata: Arc::default(),
        }
    }

    fn add(&self, id: &str, payload: Value) {
        let task = Envelope::Task(TaskMessage {
            task_id: id.into(),
            run_id: "r1".into(),
            account: format!("acct-{id}"),
            kernel: "sleep".into(),
            payload: Blob::Inline(payload),
            checkpoint_key: None,
            prior_attempts: 0,
        });
        self.tasks.push(&task.to_json());
    }

    fn worker(&self, inline_limit: usize) -> Worker {
        let ports = Ports {
            tasks: self.tasks.clone(),
            results: self.results.clone(),
            blobs: self.blobs.clone(),
            instances: self.instances.clone(),
            metadata: self.metadata.clone(),
        };
        let settings = Settings {
            slots: 2,
            idle: Duration::from_millis(200),
            wait: Duration::from_millis(20),
            inline_limit,
            spot_poll: Duration::from_millis(20),
        };
        Worker::new(ports, Registry::builtin(), settings)
    }

    fn reported(&self) -> Vec<Envelope> {
        self.results
            .sent()
            .iter()
            .map(|b| Envelope::from_json(b).unwrap())
            .collect()
    }
}

fn never() -> watch::Receiver<bool> {
    let (sender, receiver) = watch::channel(false);
    std::mem::forget(sender);
    receiver
}

#[tokio::test]
async fn every_task_is_reported_and_deleted_then_the_idle_worker_terminates_itself() {
    let rig = Rig::new();
    for i in 0..5 {
        rig.add(&format!("t{i}"), json!({"seconds": 0.01}));
    }
    let exit = rig.worker(100_000).run(never()).await.unwrap();
    assert_eq!(exit, Exit::Idle);
    let results = rig.reported();
    assert_eq!(results.len(), 5);
    assert!(results.iter().all(|e| matches!(e, Envelope::Result(r)
        if r.instance_id == "i-test" && r.attempts == 1 && matches!(r.outcome, TaskOutcome::Done { .. }))));
    assert_eq!((rig.tasks.visible(), rig.tasks.in_flight()), (0, 0));
    assert_eq!(rig.instances.terminated(), vec!["i-test".to_owned()]);
}

#[tokio::test]
async fn a_large_result_travels_through_the_bucket() {
    let rig = Rig::new();
    rig.add("t1", json!({"seconds": 0}));
    rig.worker(5).run(never()).await.unwrap();
    let Envelope::Result(result) = &rig.reported()[0] else {
        panic!("a result")
    };
    let TaskOutcome::Done {
        result: Blob::Stored { key },
        ..
    } = &result.outcome
    else {
        panic!("a stored result, got {:?}", result.outcome)
    };
    assert_eq!(rig.blobs.keys(), vec![key.clone()]);
}

#[tokio::test]
async fn a_permanent_failure_is_reported_once_and_not_retried() {
    let rig = Rig::new();
    rig.add("bad", json!({"seconds": "soon"}));
    rig.worker(100_000).run(never()).await.unwrap();
    let reported = rig.reported();
    assert_eq!(reported.len(), 1);
    assert!(
        matches!(&reported[0], Envelope::Result(r) if matches!(r.outcome, TaskOutcome::Failed { .. }))
    );
    assert_eq!((rig.tasks.visible(), rig.tasks.in_flight()), (0, 0));
}

#[tokio::test]
async fn a_spot_notice_hands_running_work_back_with_its_checkpoint() {
    let rig = Rig::new();
    rig.add("long", json!({"seconds": 30}));
    let metadata = rig.metadata.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        metadata.notice.store(true, Ordering::SeqCst);
    });
    let started = std::time::Instant::now();
    let exit = rig.worker(100_000).run(never()).await.unwrap();
    assert_eq!(exit, Exit::Interrupted);
    assert!(started.elapsed() < Duration::from_secs(5), "stops promptly");
    assert!(
        rig.instances.terminated().is_empty(),
        "EC2 reclaims the instance itself"
    );
    // The held message is gone; a continuation with the checkpoint replaces it.
    assert_eq!(rig.tasks.in_flight(), 0);
    let continuation = rig.tasks.sent().last().cloned().unwrap();
    let Envelope::Task(task) = Envelope::from_json(&continuation).unwrap() else {
        panic!("a task")
    };
    assert_eq!((task.task_id.as_str(), task.prior_attempts), ("long", 1));
    let key = task.checkpoint_key.expect("a checkpoint");
    assert!(rig.blobs.keys().contains(&key));
    assert!(matches!(&rig.reported()[..], [Envelope::Interrupted(e)] if e.task_id == "long"));
}

#[tokio::test]
async fn a_shutdown_signal_stops_taking_work() {
    let rig = Rig::new();
    rig.add("long", json!({"seconds": 30}));
    let (stop, stopped) = watch::channel(false);
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let _ = stop.send(true);
    });
    let exit = rig.worker(100_000).run(stopped).await.unwrap();
    assert_eq!(exit, Exit::Shutdown);
    assert_eq!(rig.tasks.in_flight(), 0);
    assert_eq!(
        rig.tasks.visible(),
        1,
        "the continuation waits for another worker"
    );
}

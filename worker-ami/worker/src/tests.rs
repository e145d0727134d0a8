//! The worker against in-memory queues, bucket, table and metadata.

use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use chrono::Utc;
use nightshift_core::fakes::{MemoryBlobs, MemoryQueue, MemoryStore};
use nightshift_core::ports::RunStore;
use nightshift_core::{Blob, Envelope, TaskMessage, TaskOutcome};
use nightshift_kernels::{Kernel, KernelError, Outcome};
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

    async fn run_id(&self) -> Result<Option<String>, nightshift_core::Error> {
        Ok(Some("r1".into()))
    }

    async fn spot_action(&self) -> Result<Option<String>, nightshift_core::Error> {
        Ok(self
            .notice
            .load(Ordering::SeqCst)
            .then(|| "terminate".to_owned()))
    }
}

/// A kernel that never reaches a safe point: it ignores stop requests.
struct Stubborn;

impl Kernel for Stubborn {
    fn run(&self, _: &Value, _: Option<&[u8]>, _: &Control) -> Result<Outcome, KernelError> {
        std::thread::sleep(Duration::from_secs(3));
        Ok(Outcome::Done {
            result: json!(null),
            summary: "late".into(),
        })
    }
}

struct Rig {
    tasks: Arc<MemoryQueue>,
    results: Arc<MemoryQueue>,
    blobs: Arc<MemoryBlobs>,
    runs: Arc<MemoryStore>,
    metadata: Arc<FakeMetadata>,
    usage: Arc<nightshift_core::fakes::GivenUsage>,
    settings: Settings,
}

impl Rig {
    fn new() -> Self {
        Self {
            tasks: Arc::default(),
            results: Arc::default(),
            blobs: Arc::default(),
            runs: Arc::default(),
            metadata: Arc::default(),
            usage: Arc::default(),
            settings: Settings {
                slots: 2,
                idle: Duration::from_millis(200),
                wait: Duration::from_millis(20),
                claim_check: ClaimCheck::new(100_000),
                spot_poll: Duration::from_millis(20),
                stop_grace: Duration::from_secs(5),
                max_lifetime: Duration::from_secs(60),
                give_up_after: Duration::from_secs(60),
            },
        }
    }

    fn add_to(&self, id: &str, run: &str, kernel: &str, payload: Value) {
        let task = Envelope::Task(TaskMessage {
            task_id: id.into(),
            run_id: run.into(),
            account: format!("acct-{id}"),
            kernel: kernel.into(),
            payload: Blob::json(&payload),
            checkpoint_key: None,
            prior_attempts: 0,
        });
        self.tasks.push(&task.to_json());
    }

    fn add(&self, id: &str, payload: Value) {
        self.add_to(id, "r1", "sleep", payload);
    }

    fn worker(&self) -> Worker {
        let ports = Ports {
            tasks: self.tasks.clone(),
            results: self.results.clone(),
            blobs: self.blobs.clone(),
            runs: self.runs.clone(),
            metadata: self.metadata.clone(),
            usage: self.usage.clone(),
        };
        let mut registry = Registry::builtin();
        registry.insert("stubborn", Stubborn);
        Worker::new(ports, registry, self.settings.clone())
    }

    /// What the worker reported of its tasks.
    fn reported(&self) -> Vec<Envelope> {
        self.results
            .sent()
            .iter()
            .map(|b| Envelope::from_json(b).unwrap())
            .filter(|envelope| !matches!(envelope, Envelope::Usage(_)))
            .collect()
    }

    fn continuations(&self) -> Vec<TaskMessage> {
        self.tasks
            .sent()
            .iter()
            .skip(1)
            .filter_map(|b| match Envelope::from_json(b).unwrap() {
                Envelope::Task(task) => Some(task),
                _ => None,
            })
            .collect()
    }
}

fn never() -> watch::Receiver<bool> {
    let (sender, receiver) = watch::channel(false);
    std::mem::forget(sender);
    receiver
}

#[tokio::test]
async fn every_task_is_reported_and_deleted_then_the_idle_worker_stops() {
    let rig = Rig::new();
    for i in 0..5 {
        rig.add(&format!("t{i}"), json!({"seconds": 0.01}));
    }
    let exit = rig.worker().run(never()).await.unwrap();
    assert_eq!(exit, Exit::Idle);
    assert!(exit.is_success(), "the unit powers the instance off");
    let results = rig.reported();
    assert_eq!(results.len(), 5);
    assert!(results.iter().all(|e| matches!(e, Envelope::Result(r)
        if r.instance_id == "i-test" && r.attempts == 1 && matches!(r.outcome, TaskOutcome::Done { .. }))));
    assert_eq!((rig.tasks.visible(), rig.tasks.in_flight()), (0, 0));
}

/// Short tasks one after another on two slots: their results and deletes
/// wait a little to share batches while the slots take the next tasks, and
/// each receive asks for a slot's worth ahead.
#[tokio::test]
async fn short_tasks_share_their_result_and_delete_batches() {
    let rig = Rig::new();
    for i in 0..20 {
        rig.add(&format!("t{i:02}"), json!({"seconds": 0.01}));
    }
    let started = std::time::Instant::now();
    rig.worker().run(never()).await.unwrap();
    assert_eq!(rig.reported().len(), 20);
    assert_eq!((rig.tasks.visible(), rig.tasks.in_flight()), (0, 0));
    let (sends, deletes) = (rig.results.send_calls(), rig.tasks.delete_calls());
    assert!(
        sends <= 4 && deletes <= 4,
        "{sends} result batches, {deletes} delete batches for 20 tasks"
    );
    // The kernels did not wait for the batches: 10 rounds of 10 ms, not
    // 10 windows of a second.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_large_result_travels_through_the_bucket_under_its_run() {
    let mut rig = Rig::new();
    rig.settings.claim_check = ClaimCheck::new(5);
    rig.add("t1", json!({"seconds": 0}));
    rig.worker().run(never()).await.unwrap();
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
    assert!(key.starts_with("runs/r1/results/t1/"), "{key}");
    assert_eq!(rig.blobs.keys(), vec![key.clone()]);
}

#[tokio::test]
async fn a_result_that_would_not_fit_beside_its_payload_goes_to_the_bucket() {
    // 150 KB of payload inline and 240 KB of result: together over the item.
    let mut rig = Rig::new();
    rig.settings.claim_check = ClaimCheck::new(300 * 1024);
    rig.add(
        "t1",
        json!({"seconds": 0, "data": "p".repeat(150_000), "result_bytes": 240_000}),
    );
    rig.worker().run(never()).await.unwrap();
    let Envelope::Result(result) = &rig.reported()[0] else {
        panic!("a result")
    };
    assert!(matches!(
        &result.outcome,
        TaskOutcome::Done {
            result: Blob::Stored { .. },
            ..
        }
    ));
}

#[tokio::test]
async fn results_finishing_together_are_sent_in_batches_under_a_mebibyte() {
    // Six results of about 180 KB each (the queue refuses a batch over 1 MiB).
    let mut rig = Rig::new();
    rig.settings.slots = 6;
    for i in 0..6 {
        rig.add(
            &format!("t{i}"),
            json!({"seconds": 0.05, "result_bytes": 180_000}),
        );
    }
    rig.worker().run(never()).await.unwrap();
    assert_eq!(rig.reported().len(), 6, "every result was sent");
}

#[tokio::test]
async fn a_permanent_failure_is_reported_once_and_not_retried() {
    let rig = Rig::new();
    rig.add("bad", json!({"seconds": "soon"}));
    rig.worker().run(never()).await.unwrap();
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
    let exit = rig.worker().run(never()).await.unwrap();
    assert_eq!(exit, Exit::Interrupted);
    assert!(started.elapsed() < Duration::from_secs(5), "stops promptly");
    // The held message is gone; a continuation with the checkpoint replaces it.
    assert_eq!(rig.tasks.in_flight(), 0);
    let [task] = &rig.continuations()[..] else {
        panic!("one continuation")
    };
    assert_eq!((task.task_id.as_str(), task.prior_attempts), ("long", 1));
    let key = task.checkpoint_key.clone().expect("a checkpoint");
    assert_eq!(key, "runs/r1/checkpoints/long.bin");
    assert!(rig.blobs.keys().contains(&key));
    assert!(matches!(&rig.reported()[..], [Envelope::Interrupted(e)] if e.task_id == "long"));
}

#[tokio::test]
async fn a_kernel_that_misses_the_grace_is_handed_back_without_a_checkpoint() {
    let mut rig = Rig::new();
    rig.settings.stop_grace = Duration::from_millis(300);
    rig.add_to("stuck", "r1", "stubborn", json!(null));
    let (stop, stopped) = watch::channel(false);
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let _ = stop.send(true);
    });
    let started = std::time::Instant::now();
    let exit = rig.worker().run(stopped).await.unwrap();
    assert_eq!(exit, Exit::Shutdown);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "bounded by the grace: {:?}",
        started.elapsed()
    );
    let [task] = &rig.continuations()[..] else {
        panic!("one continuation")
    };
    assert_eq!(
        (task.task_id.as_str(), task.checkpoint_key.as_deref()),
        ("stuck", None)
    );
    assert_eq!(rig.tasks.in_flight(), 0, "the held message was deleted");
}

#[tokio::test]
async fn a_worker_stops_at_its_lifetime_and_hands_its_work_back() {
    let mut rig = Rig::new();
    rig.settings.max_lifetime = Duration::from_millis(300);
    rig.add("long", json!({"seconds": 30}));
    let exit = rig.worker().run(never()).await.unwrap();
    assert_eq!(exit, Exit::Lifetime);
    assert!(exit.is_success());
    assert_eq!(rig.continuations().len(), 1);
}

/// A queue that cannot be reached.
struct Unreachable;

#[async_trait]
impl Queue for Unreachable {
    async fn send_batch(&self, _: &[Outgoing]) -> Result<Vec<String>, nightshift_core::Error> {
        Err(nightshift_core::Error::transient(
            "SendMessageBatch",
            "down",
        ))
    }
    async fn receive(&self, _: u32, _: Duration) -> Result<Vec<Received>, nightshift_core::Error> {
        Err(nightshift_core::Error::transient("ReceiveMessage", "down"))
    }
    async fn delete_batch(&self, _: &[String]) -> Result<Vec<String>, nightshift_core::Error> {
        Err(nightshift_core::Error::transient(
            "DeleteMessageBatch",
            "down",
        ))
    }
    async fn change_visibility_batch(
        &self,
        _: &[String],
        _: Duration,
    ) -> Result<Vec<String>, nightshift_core::Error> {
        Err(nightshift_core::Error::transient(
            "ChangeMessageVisibilityBatch",
            "down",
        ))
    }
    async fn visibility_timeout(&self) -> Result<Duration, nightshift_core::Error> {
        Ok(Duration::from_secs(30))
    }
}

#[tokio::test]
async fn a_worker_that_cannot_work_exits_with_failure() {
    let mut rig = Rig::new();
    rig.settings.give_up_after = Duration::from_millis(500);
    let mut worker = rig.worker();
    worker.ports.tasks = Arc::new(Unreachable);
    let exit = worker.run(never()).await.unwrap();
    assert_eq!(exit, Exit::Failing);
    assert!(!exit.is_success(), "the unit restarts it, then powers off");
}

#[tokio::test]
async fn an_idle_worker_waits_while_its_run_has_work_for_the_next_pass() {
    let rig = Rig::new();
    let (run, _) = rig
        .runs
        .open_run("r1", Utc::now(), Utc::now() + chrono::Duration::hours(8))
        .await
        .unwrap();
    assert!(
        rig.runs
            .acquire_lease(&run.id, "d", Utc::now(), Duration::from_secs(60))
            .await
            .unwrap()
    );
    rig.runs
        .release_lease(&run.id, "d", true, None)
        .await
        .unwrap();
    let runs = rig.runs.clone();
    let worker = tokio::spawn(rig.worker().run(never()));
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(!worker.is_finished(), "four idle periods passed; it waits");
    // The next pass queued the rest and left nothing waiting.
    assert!(
        runs.acquire_lease("r1", "d", Utc::now(), Duration::from_secs(60))
            .await
            .unwrap()
    );
    runs.release_lease("r1", "d", false, None).await.unwrap();
    let exit = tokio::time::timeout(Duration::from_secs(30), worker)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(exit, Exit::Idle);
}

#[tokio::test]
async fn messages_of_a_run_that_is_over_are_dropped_unrun() {
    let rig = Rig::new();
    rig.runs
        .open_run("old", Utc::now(), Utc::now() + chrono::Duration::hours(8))
        .await
        .unwrap();
    rig.runs.close_run("old", Utc::now()).await.unwrap();
    rig.add_to("stale", "old", "sleep", json!({"seconds": 0}));
    rig.worker().run(never()).await.unwrap();
    assert!(rig.reported().is_empty(), "not run");
    assert_eq!(
        (rig.tasks.visible(), rig.tasks.in_flight()),
        (0, 0),
        "deleted"
    );
}

#[tokio::test]
async fn heartbeats_never_ask_past_the_longest_hiding_and_near_it_the_task_is_handed_back() {
    // SQS's 12 hours and a 1 h timeout, scaled down: 4 s and 300 ms.
    let (max_hidden, visibility) = (Duration::from_secs(4), Duration::from_millis(300));
    let queue = Arc::new(MemoryQueue::default());
    let held = Arc::new(Held::default());
    let control = Control::new();
    let message = Received {
        message_id: "m".into(),
        receipt: "r".into(),
        receive_count: 1,
        body: String::new(),
    };
    let task = TaskMessage {
        task_id: "t".into(),
        run_id: "r1".into(),
        account: "a".into(),
        kernel: "sleep".into(),
        payload: Blob::json(&json!(1)),
        checkpoint_key: None,
        prior_attempts: 0,
    };
    let received_at = Instant::now();
    held.lock().insert(
        "r".into(),
        HeldTask {
            message,
            task,
            received_at,
            control: control.clone(),
        },
    );
    let beating = tokio::spawn(heartbeat(queue.clone(), held, visibility, max_hidden));
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(
        !control.should_stop(),
        "well before the limit, the task runs on"
    );
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert!(
        control.should_stop(),
        "near the limit it is asked to stop and be handed back"
    );
    beating.abort();
    let changes = queue.visibility_changes();
    assert!(
        changes.len() >= 30,
        "a heartbeat every 100 ms: {}",
        changes.len()
    );
    // Replayed in order: no heartbeat asked to stay hidden past the limit.
    let every = visibility / 3;
    for (i, (_, asked)) in changes.iter().enumerate() {
        let at = every * (i as u32 + 1);
        assert!(
            at + *asked <= max_hidden + every,
            "asked {asked:?} at about {at:?}"
        );
    }
    assert!(
        changes.last().is_some_and(|(_, asked)| *asked < visibility),
        "the last ones are cut short"
    );
}

#[tokio::test]
async fn a_stopping_worker_reports_its_usage_to_the_run_it_was_launched_for() {
    let rig = Rig::new();
    rig.add("t1", json!({"seconds": 0}));
    let used = nightshift_core::Usage {
        sqs_requests: 7,
        s3_reads: 1,
        ..nightshift_core::Usage::default()
    };
    rig.usage.give(&used);
    let exit = rig.worker().run(never()).await.unwrap();
    assert_eq!(exit, Exit::Idle);
    let reports: Vec<nightshift_core::UsageReport> = rig
        .results
        .sent()
        .iter()
        .filter_map(|b| match Envelope::from_json(b).unwrap() {
            Envelope::Usage(report) => Some(report),
            _ => None,
        })
        .collect();
    assert_eq!(reports.len(), 1, "one report, as it stops");
    assert_eq!(
        (reports[0].run_id.as_str(), reports[0].instance_id.as_str()),
        ("r1", "i-test")
    );
    assert_eq!(reports[0].usage, used);
}

//! The worker against in-memory queues, bucket, table and metadata.

use std::sync::Mutex;
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

/// Short tasks one after another on two slots: once the worker knows their
/// pace it holds a receive's worth ahead and receives again only when its
/// slots took it all, so receives carry full batches; results wait, while
/// kernels run, to fill their batches, and so do the deletes after them.
#[tokio::test]
async fn short_tasks_share_their_receives_results_and_deletes() {
    let rig = Rig::new();
    for i in 0..40 {
        rig.add(&format!("t{i:02}"), json!({"seconds": 0.01}));
    }
    let started = std::time::Instant::now();
    rig.worker().run(never()).await.unwrap();
    assert_eq!(rig.reported().len(), 40);
    assert_eq!((rig.tasks.visible(), rig.tasks.in_flight()), (0, 0));
    let receipts = rig.tasks.receipts();
    // The first receive knows no pace: one message per slot.
    assert_eq!(receipts.first(), Some(&2), "{receipts:?}");
    assert!(
        receipts[1..receipts.len() - 1].iter().all(|n| *n >= 8),
        "{receipts:?}"
    );
    let (sends, deletes) = (rig.results.send_calls(), rig.tasks.delete_calls());
    assert!(
        sends <= 6 && deletes <= 6,
        "{sends} result batches, {deletes} delete batches for 40 tasks"
    );
    // The kernels did not wait for the batches: 20 rounds of 10 ms, not
    // windows of a minute.
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

/// A spot notice while work waits ahead of the slots: the running tasks
/// stop at a safe point and go back with their checkpoints; the waiting
/// ones go back unstarted, as they came, without running their kernel.
#[tokio::test]
async fn a_spot_notice_hands_work_held_ahead_back_unstarted() {
    let rig = Rig::new();
    // Two quick tasks set the pace; then ten long ones: two run, eight wait.
    for i in 0..2 {
        rig.add(&format!("quick{i}"), json!({"seconds": 0.01}));
    }
    for i in 0..10 {
        rig.add(&format!("long{i}"), json!({"seconds": 30}));
    }
    let metadata = rig.metadata.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        metadata.notice.store(true, Ordering::SeqCst);
    });
    let exit = rig.worker().run(never()).await.unwrap();
    assert_eq!(exit, Exit::Interrupted);
    // What was sent after the twelve tasks: the continuations.
    let continuations: Vec<TaskMessage> = rig.tasks.sent()[12..]
        .iter()
        .filter_map(|body| match Envelope::from_json(body) {
            Ok(Envelope::Task(task)) => Some(task),
            _ => None,
        })
        .collect();
    assert_eq!(continuations.len(), 10, "every long task handed back");
    let checkpointed: Vec<&str> = continuations
        .iter()
        .filter(|task| task.checkpoint_key.is_some())
        .map(|task| task.task_id.as_str())
        .collect();
    assert_eq!(
        checkpointed.len(),
        2,
        "only the running ones: {checkpointed:?}"
    );
    assert_eq!((rig.tasks.visible(), rig.tasks.in_flight()), (10, 0));
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

/// A queue that notes when each visibility change was asked, from its start.
struct Stopwatch {
    queue: MemoryQueue,
    started: Instant,
    asked: Mutex<Vec<(Duration, Vec<String>, Duration)>>,
}

impl Stopwatch {
    fn new() -> Self {
        Self {
            queue: MemoryQueue::default(),
            started: Instant::now(),
            asked: Mutex::new(Vec::new()),
        }
    }

    /// Each call: when, for which receipts, for how long.
    fn asked(&self) -> Vec<(Duration, Vec<String>, Duration)> {
        self.asked.lock().unwrap().clone()
    }
}

#[async_trait]
impl Queue for Stopwatch {
    async fn send_batch(
        &self,
        messages: &[Outgoing],
    ) -> Result<Vec<String>, nightshift_core::Error> {
        self.queue.send_batch(messages).await
    }
    async fn receive(
        &self,
        max: u32,
        wait: Duration,
    ) -> Result<Vec<Received>, nightshift_core::Error> {
        self.queue.receive(max, wait).await
    }
    async fn delete_batch(
        &self,
        receipts: &[String],
    ) -> Result<Vec<String>, nightshift_core::Error> {
        self.queue.delete_batch(receipts).await
    }
    async fn change_visibility_batch(
        &self,
        receipts: &[String],
        timeout: Duration,
    ) -> Result<Vec<String>, nightshift_core::Error> {
        let at = self.started.elapsed();
        self.asked
            .lock()
            .unwrap()
            .push((at, receipts.to_vec(), timeout));
        Ok(Vec::new())
    }
    async fn visibility_timeout(&self) -> Result<Duration, nightshift_core::Error> {
        self.queue.visibility_timeout().await
    }
}

/// Holds a message as the receive loop does, received now.
fn hold(held: &Held, receipt: &str, visibility: Duration) -> Control {
    let control = Control::new();
    let received_at = Instant::now();
    held.lock().insert(
        receipt.into(),
        HeldTask {
            message: Received {
                message_id: format!("m-{receipt}"),
                receipt: receipt.into(),
                receive_count: 1,
                body: String::new(),
            },
            task: TaskMessage {
                task_id: format!("t-{receipt}"),
                run_id: "r1".into(),
                account: "a".into(),
                kernel: "sleep".into(),
                payload: Blob::json(&json!(1)),
                checkpoint_key: None,
                prior_attempts: 0,
            },
            received_at,
            hidden_until: received_at + visibility,
            control: control.clone(),
        },
    );
    control
}

#[tokio::test]
async fn heartbeats_keep_a_message_hidden_never_past_the_longest_hiding_and_near_it_the_task_is_handed_back()
 {
    // SQS's 12 hours and a timeout of 1.2 h, scaled down: 6 s and 1.2 s.
    let (max_hidden, visibility) = (Duration::from_secs(6), Duration::from_millis(1200));
    let queue = Arc::new(Stopwatch::new());
    let held = Arc::new(Held::default());
    let control = hold(&held, "r", visibility);
    let beating = tokio::spawn(heartbeat(queue.clone(), held, visibility, max_hidden));
    tokio::time::sleep(Duration::from_millis(3000)).await;
    assert!(
        !control.should_stop(),
        "well before the limit, the task runs on"
    );
    // Until just before the limit: the last extensions are cut short.
    tokio::time::sleep(Duration::from_millis(2900)).await;
    assert!(
        control.should_stop(),
        "near the limit it is asked to stop and be handed back"
    );
    beating.abort();
    let asked = queue.asked();
    // A look every 100 ms; a message extended to 1.2 s is due again 0.8 s
    // later: an extension every ninth look or so, more as the limit nears.
    assert!(
        (5..=15).contains(&asked.len()),
        "{} extensions in 5.9 s",
        asked.len()
    );
    // Each extension came before the message would surface, and none asked
    // to stay hidden past the limit.
    let mut hidden_until = visibility;
    for (at, _, timeout) in &asked {
        assert!(
            *at < hidden_until,
            "surfaced at {hidden_until:?}, extended at {at:?}"
        );
        assert!(
            *at + *timeout <= max_hidden + visibility / 12,
            "asked {timeout:?} at {at:?}"
        );
        hidden_until = *at + *timeout;
    }
    assert!(
        asked
            .last()
            .is_some_and(|(_, _, timeout)| *timeout < visibility),
        "the last ones are cut short"
    );
}

#[tokio::test]
async fn a_message_held_briefly_is_never_extended_and_one_due_extends_all_held_at_once() {
    // A look every 100 ms; a message is due once held over 800 ms.
    let visibility = Duration::from_millis(1200);
    let queue = Arc::new(Stopwatch::new());
    let held = Arc::new(Held::default());
    hold(&held, "early", visibility);
    let beating = tokio::spawn(heartbeat(
        queue.clone(),
        held.clone(),
        visibility,
        Duration::from_secs(3600),
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    hold(&held, "late", visibility);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    beating.abort();
    let asked = queue.asked();
    let (at, receipts, _) = asked.first().expect("the early message was extended");
    assert!(
        *at >= Duration::from_millis(800),
        "extended at {at:?}, before it was due"
    );
    let mut receipts = receipts.clone();
    receipts.sort();
    assert_eq!(
        receipts,
        ["early", "late"],
        "one call for every held message"
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

//! The dispatcher against in-memory ports that yield at every call, so that
//! passes started together interleave as they would against AWS.

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use nightshift_core::fakes::{FakeFleet, MemoryBlobs, MemoryQueue, MemoryStore};
use nightshift_core::night::NightWindow;
use nightshift_core::ports::{
    BlobStore, Cursor, Page, PendingTasks, RecordOutcome, ResultRecorder, RunReader, Sent,
    TaskWriter, WallClock,
};
use nightshift_core::{Blob, Envelope, NewTask, TaskOutcome, TaskResult, TaskStatus};
use serde_json::{Value, json};

use nightshift_core::limits::ClaimCheck;

use super::*;

struct World {
    store: Arc<MemoryStore>,
    queue: Arc<MemoryQueue>,
    fleet: Arc<FakeFleet>,
    blobs: Arc<MemoryBlobs>,
    settings: Settings,
}

impl World {
    fn new(max_queued: u64) -> Self {
        Self::with_shards(max_queued, 4)
    }

    fn with_shards(max_queued: u64, shards: u32) -> Self {
        Self {
            store: Arc::new(MemoryStore::new(shards)),
            queue: Arc::new(MemoryQueue::default()),
            fleet: Arc::new(FakeFleet::default()),
            blobs: Arc::new(MemoryBlobs::default()),
            settings: Settings {
                max_instances: 3,
                slots_per_instance: 2,
                max_queued,
                pending_shards: shards,
                lease_ttl: Duration::from_secs(120),
                max_lifetime: Duration::from_secs(3600),
                stray_grace: Duration::from_secs(600),
                night: NightWindow::parse("06:00", "Europe/London").unwrap(),
                // Tasks of unknown length, assumed far too long for any
                // night: every pass wants the most slots there is work for.
                plan: Policy {
                    prior_ms: 1_000 * 3_600_000,
                    lead: chrono::Duration::minutes(4),
                    margin: chrono::Duration::minutes(30),
                    on_demand_within: chrono::Duration::zero(),
                },
                pass_interval: Duration::from_secs(300),
                pass_budget: Duration::from_secs(40),
            },
        }
    }

    fn dispatcher(&self) -> Dispatcher<'_> {
        Dispatcher {
            runs: &*self.store,
            pending: &*self.store,
            tasks: &*self.store,
            queue: &*self.queue,
            fleet: &*self.fleet,
            blobs: &*self.blobs,
            clock: &WallClock,
            settings: &self.settings,
        }
    }

    async fn add(&self, n: usize, payload: Value) {
        let base = self.store.all_tasks().len();
        let tasks: Vec<NewTask> = (base..base + n)
            .map(|i| NewTask {
                id: format!("task-{i:03}"),
                account: format!("acct-{i:03}"),
                kernel: "sleep".into(),
                payload: Blob::json(&payload.clone()),
                created_at: Utc::now(),
                idempotency: None,
            })
            .collect();
        self.store.stage("r", &tasks).await.unwrap();
        self.store.commit("r", &tasks).await.unwrap();
    }

    /// A pass at the night's start, now (it opens a run if work is pending).
    async fn open_night(&self, owner: &str) -> Pass {
        self.dispatcher()
            .open_night(Utc::now(), owner)
            .await
            .unwrap()
    }

    async fn add_tasks(&self, n: usize) {
        self.add(n, json!({"seconds": 0})).await;
    }

    fn sent_task_ids(&self) -> Vec<String> {
        self.queue
            .sent()
            .iter()
            .map(|body| {
                Envelope::from_json(body)
                    .unwrap()
                    .task_id()
                    .unwrap()
                    .to_owned()
            })
            .collect()
    }

    async fn finish_all(&self, run_id: &str) {
        let results: Vec<TaskResult> = self
            .store
            .all_tasks()
            .iter()
            .filter(|t| t.status == TaskStatus::Queued)
            .map(|t| done(&t.id, run_id))
            .collect();
        let outcomes = self.store.record_results(&results).await.unwrap();
        assert!(outcomes.iter().all(|o| *o == RecordOutcome::Recorded));
    }
}

/// A task of `run_id` done, now, on `i-1`.
fn done(task_id: &str, run_id: &str) -> TaskResult {
    TaskResult {
        task_id: task_id.to_owned(),
        run_id: run_id.to_owned(),
        kernel: "sleep".into(),
        instance_id: "i-1".into(),
        attempts: 1,
        started_at: Utc::now(),
        finished_at: Utc::now(),
        outcome: TaskOutcome::Done {
            result: Blob::json(&json!(1)),
            summary: "ok".into(),
        },
    }
}

fn distinct(mut ids: Vec<String>) -> bool {
    let all = ids.len();
    ids.sort();
    ids.dedup();
    ids.len() == all
}

#[tokio::test]
async fn pending_tasks_are_queued_in_batches_of_ten_and_workers_launched() {
    let world = World::new(1000);
    world.add_tasks(25).await;
    let pass = world.open_night("d1").await;
    assert_eq!(pass.queued, 25);
    assert_eq!(world.sent_task_ids().len(), 25);
    assert!(
        world.queue.send_calls() <= 25_usize.div_ceil(10) + 4,
        "batched sends"
    );
    // 25 tasks, 2 slots each, capped at 3 instances.
    assert_eq!(pass.launched, 3);
    let run = world
        .store
        .run(pass.run_id.as_deref().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (run.queued, run.instances.len(), run.fleet_requests),
        (25, 3, 1)
    );
    assert!(
        world
            .store
            .all_tasks()
            .iter()
            .all(|t| t.status == TaskStatus::Queued)
    );
}

/// Several passes started at the same instant: the fakes yield at every
/// call, so they interleave; the lease lets one of them work.
async fn race(world: &World, passes: usize) -> Vec<Pass> {
    let dispatchers: Vec<Dispatcher<'_>> = (0..passes).map(|_| world.dispatcher()).collect();
    let owners: Vec<String> = (0..passes).map(|i| format!("d{i}")).collect();
    let now = Utc::now();
    futures::future::join_all(
        dispatchers
            .iter()
            .zip(&owners)
            .map(|(d, o)| d.open_night(now, o)),
    )
    .await
    .into_iter()
    .map(Result::unwrap)
    .collect()
}

#[tokio::test]
async fn passes_at_once_queue_each_task_once_and_launch_one_fleet() {
    let world = World::new(1000);
    world.add_tasks(40).await;
    let passes = race(&world, 3).await;
    assert_eq!(passes.iter().map(|p| p.queued).sum::<usize>(), 40);
    assert_eq!(
        passes.iter().filter(|p| p.skipped.is_none()).count(),
        1,
        "{passes:?}"
    );
    assert!(distinct(world.sent_task_ids()), "no task is sent twice");
    assert_eq!(world.fleet.launches(), 1);
    // A later pass finds the fleet big enough and launches nothing more.
    let again = world.open_night("d3").await;
    assert_eq!((again.queued, again.launched), (0, 0));
}

/// A store whose lease is always granted: what the race test above would
/// see if the lease were not exclusive.
struct NoLease(Arc<MemoryStore>);

#[async_trait]
impl RunReader for NoLease {
    async fn run(&self, run_id: &str) -> Result<Option<Run>, nightshift_core::Error> {
        self.0.run(run_id).await
    }
}

#[async_trait]
impl RunStore for NoLease {
    async fn current_run(&self) -> Result<Option<Run>, nightshift_core::Error> {
        self.0.current_run().await
    }
    async fn open_run(
        &self,
        id: &str,
        now: DateTime<Utc>,
        deadline: DateTime<Utc>,
    ) -> Result<(Run, bool), nightshift_core::Error> {
        self.0.open_run(id, now, deadline).await
    }
    async fn acquire_lease(
        &self,
        _: &str,
        _: &str,
        _: DateTime<Utc>,
        _: Duration,
    ) -> Result<bool, nightshift_core::Error> {
        tokio::task::yield_now().await;
        Ok(true)
    }
    async fn release_lease(
        &self,
        _: &str,
        _: &str,
        _: bool,
        _: Option<&FleetPlan>,
    ) -> Result<(), nightshift_core::Error> {
        Ok(())
    }
    async fn record_fleet(
        &self,
        run_id: &str,
        n: u32,
        launched: &[nightshift_core::Launched],
        prices: &[SpotPrice],
    ) -> Result<bool, nightshift_core::Error> {
        self.0.record_fleet(run_id, n, launched, prices).await
    }
    async fn record_instances(
        &self,
        run_id: &str,
        seen: &[InstanceSeen],
    ) -> Result<(), nightshift_core::Error> {
        self.0.record_instances(run_id, seen).await
    }
    async fn runs_page(
        &self,
        limit: usize,
        after: Option<&Cursor>,
    ) -> Result<Page<Run>, nightshift_core::Error> {
        self.0.runs_page(limit, after).await
    }
    async fn close_run(
        &self,
        run_id: &str,
        now: DateTime<Utc>,
    ) -> Result<bool, nightshift_core::Error> {
        self.0.close_run(run_id, now).await
    }
    async fn cancel_run(
        &self,
        run_id: &str,
        now: DateTime<Utc>,
    ) -> Result<bool, nightshift_core::Error> {
        self.0.cancel_run(run_id, now).await
    }
    async fn release_run(&self, run_id: &str) -> Result<(), nightshift_core::Error> {
        self.0.release_run(run_id).await
    }
}

#[tokio::test]
async fn without_an_exclusive_lease_the_race_test_would_fail() {
    // The race above can fail: with a lease that is always granted, the
    // same passes send tasks twice and launch more than one fleet.
    let world = World::new(1000);
    world.add_tasks(40).await;
    let no_lease = NoLease(world.store.clone());
    let dispatchers: Vec<Dispatcher<'_>> = (0..3)
        .map(|_| Dispatcher {
            runs: &no_lease,
            ..world.dispatcher()
        })
        .collect();
    let now = Utc::now();
    let owners = ["a", "b", "c"];
    for pass in futures::future::join_all(
        dispatchers
            .iter()
            .zip(owners)
            .map(|(d, o)| d.open_night(now, o)),
    )
    .await
    {
        pass.unwrap();
    }
    assert!(!distinct(world.sent_task_ids()) || world.fleet.launches() > 1);
}

#[tokio::test]
async fn a_held_lease_makes_a_pass_skip() {
    let world = World::new(1000);
    world.add_tasks(1).await;
    let (run, _) = world
        .store
        .open_run("r1", Utc::now(), Utc::now() + chrono::Duration::hours(8))
        .await
        .unwrap();
    assert!(
        world
            .store
            .acquire_lease(&run.id, "other", Utc::now(), Duration::from_secs(60))
            .await
            .unwrap()
    );
    let pass = world.open_night("me").await;
    assert_eq!(
        pass.skipped,
        Some("another dispatcher holds the run's lease")
    );
    assert!(world.queue.sent().is_empty());
    // Once the lease has expired, the next pass proceeds.
    let later = Utc::now() + chrono::Duration::seconds(61);
    assert_eq!(
        world
            .dispatcher()
            .open_night(later, "me")
            .await
            .unwrap()
            .queued,
        1
    );
}

#[tokio::test]
async fn the_backlog_is_capped_and_the_rest_waits_for_room() {
    let world = World::new(10);
    world.add_tasks(25).await;
    let first = world.open_night("d").await;
    assert_eq!((first.queued, first.waiting), (10, true));
    let run_id = first.run_id.unwrap();
    assert!(
        world.store.run(&run_id).await.unwrap().unwrap().waiting,
        "workers are told to wait"
    );
    let second = world.open_night("d").await;
    assert_eq!((second.queued, second.closed), (0, false), "no room yet");
}

impl World {
    /// Every queued task ends, each having taken `minutes`.
    async fn finish_all_taking(&self, run_id: &str, minutes: i64) {
        let results: Vec<TaskResult> = self
            .store
            .all_tasks()
            .iter()
            .filter(|t| t.status == TaskStatus::Queued)
            .map(|t| TaskResult {
                started_at: Utc::now() - chrono::Duration::minutes(minutes),
                ..done(&t.id, run_id)
            })
            .collect();
        self.store.record_results(&results).await.unwrap();
    }
}

/// What the pass after the first queues, once the first pass's tasks (of
/// a run capped at `cap`) ended, each having taken `minutes`.
async fn queued_once_tasks_took(cap: u64, minutes: i64) -> usize {
    let world = World::new(cap);
    world.add_tasks(200).await;
    let first = world.open_night("d").await;
    assert_eq!(first.queued as u64, cap, "the cap while no task has ended");
    world
        .finish_all_taking(&first.run_id.unwrap(), minutes)
        .await;
    world.open_night("d").await.queued
}

/// Six slots, passes five minutes apart: once tasks have ended, the
/// backlog is what the slots take until the pass after next (ten minutes)
/// at the pace measured, and one more each; never less than the cap.
#[tokio::test]
async fn once_the_pace_is_measured_the_backlog_follows_it() {
    assert_eq!(queued_once_tasks_took(10, 60).await, 6 * 2);
    assert_eq!(queued_once_tasks_took(10, 1).await, 6 * 11);
    assert_eq!(
        queued_once_tasks_took(20, 60).await,
        20,
        "never under the cap"
    );
}

#[tokio::test]
async fn a_backlog_of_large_payloads_is_queued_in_one_pass() {
    // 40 payloads of 130 KB in one shard: a 1 MB page of the index holds 7.
    let world = World::with_shards(1000, 1);
    world
        .add(40, json!({"seconds": 0, "data": "x".repeat(130_000)}))
        .await;
    let pass = world.open_night("d").await;
    assert_eq!(pass.queued, 40, "{pass:?}");
    // And no SQS batch was over 1 MiB (the queue refuses those).
    assert!(distinct(world.sent_task_ids()));
}

#[tokio::test]
async fn batches_are_split_by_bytes() {
    // Ten tasks of 105 KB are over SQS's 1 MiB for one batch.
    let world = World::new(1000);
    world.add(12, json!({"data": "y".repeat(105 * 1024)})).await;
    let pass = world.open_night("d").await;
    assert_eq!(pass.queued, 12);
}

/// Counts the index pages each pass reads, to show a failed marking does
/// not make the pass read and send its tasks again.
#[tokio::test]
async fn a_task_is_never_sent_twice_in_one_pass() {
    let world = World::with_shards(1000, 1);
    world.add_tasks(5).await;
    // Marking fails (a conflict that outlasted its retries): the pass stops
    // with the error; the tasks it sent were sent once.
    world.store.inject_fault("mark_queued", 1);
    assert!(
        world
            .dispatcher()
            .open_night(Utc::now(), "d")
            .await
            .is_err()
    );
    assert_eq!(world.sent_task_ids().len(), 5);
    assert!(distinct(world.sent_task_ids()));
    // The next pass sends them again (at least once), and queues them.
    let pass = world.open_night("d").await;
    assert_eq!(pass.queued, 5);
}

/// A store whose index lists tasks that are no longer pending, one per
/// page, as a stale index may.
struct StaleIndex(Arc<MemoryStore>);

#[async_trait]
impl PendingTasks for StaleIndex {
    async fn pending(
        &self,
        shard: u32,
        limit: usize,
        after: Option<&Cursor>,
    ) -> Result<Page<nightshift_core::PendingTask>, nightshift_core::Error> {
        // The first page holds only stale entries, but the shard goes on.
        if after.is_none() {
            return Ok(Page {
                items: Vec::new(),
                next: Some(Cursor("stale".into())),
            });
        }
        self.0.pending(shard, limit, None).await
    }
    async fn mark_queued(
        &self,
        run_id: &str,
        tasks: &[Sent],
    ) -> Result<Vec<String>, nightshift_core::Error> {
        self.0.mark_queued(run_id, tasks).await
    }
    async fn cancel_tasks(
        &self,
        run_id: &str,
        task_ids: &[String],
        now: DateTime<Utc>,
    ) -> Result<Vec<String>, nightshift_core::Error> {
        self.0.cancel_tasks(run_id, task_ids, now).await
    }
}

#[tokio::test]
async fn a_run_does_not_close_while_an_index_page_of_stale_entries_hides_pending_work() {
    let world = World::with_shards(1000, 1);
    world.add_tasks(1).await;
    let stale = StaleIndex(world.store.clone());
    let dispatcher = Dispatcher {
        pending: &stale,
        ..world.dispatcher()
    };
    let (run, _) = world
        .store
        .open_run("r1", Utc::now(), Utc::now() + chrono::Duration::hours(8))
        .await
        .unwrap();
    // Nothing queued yet, but a task is pending behind a page of stale entries.
    let pass = dispatcher.open_night(Utc::now(), "d").await.unwrap();
    assert_eq!(pass.queued, 1, "the task behind the stale page is found");
    assert!(!pass.closed);
    world.finish_all(&run.id).await;
    assert!(dispatcher.open_night(Utc::now(), "d").await.unwrap().closed);
}

#[tokio::test]
async fn lost_workers_are_replaced_while_work_remains() {
    let world = World::new(1000);
    world.add_tasks(6).await;
    world.open_night("d").await;
    let lost = world.fleet.active()[0].clone();
    world.fleet.lose(&lost);
    let pass = world.open_night("d").await;
    assert_eq!(pass.launched, 1);
    let run = world
        .store
        .run(pass.run_id.as_deref().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((run.fleet_requests, run.instances.len()), (2, 4));
}

#[tokio::test]
async fn a_launch_not_yet_shown_by_ec2_is_not_launched_again() {
    let world = World::new(1000);
    world.add_tasks(6).await;
    world.open_night("d").await;
    // DescribeInstances lags: it shows none of the three just launched.
    for id in world.fleet.active() {
        world.fleet.hide(&id);
    }
    let pass = world.open_night("d").await;
    assert_eq!(pass.launched, 0, "the recorded launches count");
    // Long after, an instance EC2 never showed no longer counts.
    let later = Utc::now() + chrono::Duration::minutes(10);
    assert_eq!(
        world
            .dispatcher()
            .open_night(later, "d")
            .await
            .unwrap()
            .launched,
        3
    );
}

#[tokio::test]
async fn a_lost_fleet_answer_does_not_block_later_passes() {
    let world = World::new(1000);
    world.add_tasks(6).await;
    // The fleet is made, but the answer is lost: nothing is recorded.
    world.fleet.lose_next_answer();
    assert!(
        world
            .dispatcher()
            .open_night(Utc::now(), "d")
            .await
            .is_err()
    );
    // The instances exist but are unknown to the run; one of them dies, so
    // the next pass asks for another count under the same request number.
    let first = world.fleet.active()[0].clone();
    world.fleet.lose(&first);
    let pass = world.open_night("d").await;
    assert_eq!(pass.launched, 1, "a new request, not a mismatch");
    let again = world.open_night("d").await;
    assert!(again.skipped.is_none());
}

#[tokio::test]
async fn workers_of_no_open_run_and_past_their_lifetime_are_terminated() {
    let world = World::new(1000);
    let long_ago = Utc::now() - chrono::Duration::hours(3);
    world
        .fleet
        .add_running("i-old-run", "finished-run", long_ago);
    world
        .fleet
        .add_running("i-fresh", "finished-run", Utc::now());
    let pass = world.open_night("d").await;
    assert_eq!(pass.terminated, 1);
    assert_eq!(world.fleet.terminated(), vec!["i-old-run".to_owned()]);
    // A worker of the open run is kept until it outlives its lifetime.
    world.add_tasks(2).await;
    let run_id = world.open_night("d").await.run_id.unwrap();
    world.fleet.add_running("i-ancient", &run_id, long_ago);
    world.fleet.add_running("i-young", &run_id, Utc::now());
    world.open_night("d").await;
    let terminated = world.fleet.terminated();
    assert!(
        terminated.contains(&"i-ancient".to_owned()) && !terminated.contains(&"i-young".to_owned())
    );
}

#[tokio::test]
async fn a_run_closes_when_every_task_ended_and_nothing_is_pending() {
    let world = World::new(1000);
    world.add_tasks(2).await;
    let pass = world.open_night("d").await;
    let run_id = pass.run_id.unwrap();
    assert!(!pass.closed);
    world.finish_all(&run_id).await;
    let pass = world.open_night("d").await;
    assert!(pass.closed);
    assert!(world.store.current_run().await.unwrap().is_none());
    let idle = world.open_night("d").await;
    assert_eq!(idle.skipped, Some("no open run"));
}

#[tokio::test]
async fn closing_a_run_removes_the_objects_no_task_holds() {
    let world = World::new(1000);
    world.add_tasks(1).await;
    let run_id = world.open_night("d").await.run_id.unwrap();
    let kept = ClaimCheck::result_key(&run_id, "task-000", "m1-2");
    let duplicate = ClaimCheck::result_key(&run_id, "task-000", "m1-1");
    let checkpoint = ClaimCheck::checkpoint_key(&run_id, "task-000");
    let elsewhere = ClaimCheck::payload_key("task-000");
    for key in [&kept, &duplicate, &checkpoint, &elsewhere] {
        world.blobs.put(key, b"{}".to_vec()).await.unwrap();
    }
    let result = TaskResult {
        task_id: "task-000".into(),
        run_id: run_id.clone(),
        kernel: "sleep".into(),
        instance_id: "i-1".into(),
        attempts: 2,
        started_at: Utc::now(),
        finished_at: Utc::now(),
        outcome: TaskOutcome::Done {
            result: Blob::Stored { key: kept.clone() },
            summary: "ok".into(),
        },
    };
    world.store.record_results(&[result]).await.unwrap();
    let pass = world.open_night("d").await;
    assert!(pass.closed);
    assert_eq!(pass.swept, 2);
    let mut left = world.blobs.keys();
    left.sort();
    assert_eq!(left, vec![elsewhere, kept]);
}

/// The night, on an injected clock (London, 22:00 to 06:00): work that
/// arrives by day waits PENDING through the ticks; the night's start opens a
/// run, due at 06:00 on the wall clock (here across the October change of
/// the clocks); work that arrives during the night joins it; and the next
/// day's ticks open nothing.
#[tokio::test(flavor = "multi_thread")]
async fn work_waits_for_the_night_and_the_night_ends_by_the_wall_clock() {
    let world = World::new(1000);
    let at = |text: &str| text.parse::<DateTime<Utc>>().unwrap();
    let dispatcher = world.dispatcher();

    // Saturday 24 October 2026, 14:00 BST: tasks arrive; the ticks wait.
    world.add_tasks(3).await;
    for tick in [
        "2026-10-24T13:00:00Z",
        "2026-10-24T17:00:00Z",
        "2026-10-24T20:55:00Z",
    ] {
        let pass = dispatcher.pass(at(tick), "tick").await.unwrap();
        assert_eq!((pass.run_id, pass.queued), (None, 0), "tick at {tick}");
    }
    assert!(world.store.current_run().await.unwrap().is_none());

    // 22:00 BST: the night opens, due at 06:00 GMT, after the clocks go back.
    let night = dispatcher
        .open_night(at("2026-10-24T21:00:00Z"), "schedule")
        .await
        .unwrap();
    assert_eq!(night.queued, 3);
    let run = world.store.current_run().await.unwrap().unwrap();
    assert_eq!(run.deadline, at("2026-10-25T06:00:00Z"));
    // The schedule delivered twice opens nothing more.
    let again = dispatcher
        .open_night(at("2026-10-24T21:00:05Z"), "schedule")
        .await
        .unwrap();
    assert_eq!(again.run_id.as_deref(), Some(run.id.as_str()));

    // 23:00: more work arrives and the next tick queues it in the open run.
    world.add_tasks(2).await;
    let tick = dispatcher
        .pass(at("2026-10-24T22:00:00Z"), "tick")
        .await
        .unwrap();
    assert_eq!(
        (tick.run_id.as_deref(), tick.queued),
        (Some(run.id.as_str()), 2)
    );
    assert!(!tick.past_deadline);

    // Still open at 06:30 GMT: past its deadline, which the pass says.
    let late = dispatcher
        .pass(at("2026-10-25T06:30:00Z"), "tick")
        .await
        .unwrap();
    assert!(late.past_deadline, "{late:?}");

    // The night's work ends; the run closes.
    world.finish_all(&run.id).await;
    let closing = dispatcher
        .pass(at("2026-10-25T07:00:00Z"), "tick")
        .await
        .unwrap();
    assert!(closing.closed, "{closing:?}");

    // Sunday 15:00 GMT: new work waits again; the tick opens nothing.
    world.add_tasks(1).await;
    let afternoon = dispatcher
        .pass(at("2026-10-25T15:00:00Z"), "tick")
        .await
        .unwrap();
    assert_eq!((afternoon.run_id, afternoon.queued), (None, 0));
    assert!(world.store.current_run().await.unwrap().is_none());
}

#[tokio::test]
async fn launches_record_their_spot_prices_and_each_end_is_recorded_once() {
    let world = World::new(100);
    world.add_tasks(4).await;
    let pass = world.open_night("d1").await;
    let run_id = pass.run_id.unwrap();
    let run = world.store.run(&run_id).await.unwrap().unwrap();
    assert_eq!(run.instances.len(), 2);
    assert_eq!(
        run.spot_prices
            .iter()
            .map(|p| (p.instance_type.as_str(), p.zone.as_str(), p.usd_per_hour))
            .collect::<Vec<_>>(),
        [(
            "c7g.large",
            nightshift_core::fakes::FAKE_ZONE,
            nightshift_core::fakes::FAKE_SPOT_PRICE
        )],
        "the price of the type launched, read at launch"
    );

    let lost = run.instances[0].id.clone();
    world.fleet.lose(&lost);
    world.dispatcher().pass(Utc::now(), "d2").await.unwrap();
    let first = world.store.run(&run_id).await.unwrap().unwrap();
    let ended: Vec<_> = first
        .instances
        .iter()
        .filter(|i| i.ended_at.is_some())
        .collect();
    assert_eq!(ended.len(), 1, "the lost instance's end is recorded");
    assert_eq!(ended[0].id, lost);
    let launched_first: Vec<&str> = run.instances.iter().map(|i| i.id.as_str()).collect();
    assert!(
        first
            .instances
            .iter()
            .filter(|i| launched_first.contains(&i.id.as_str()))
            .all(|i| i.zone.as_deref() == Some(nightshift_core::fakes::FAKE_ZONE)),
        "the zone of every instance EC2 showed is recorded"
    );

    world.dispatcher().pass(Utc::now(), "d3").await.unwrap();
    let again = world.store.run(&run_id).await.unwrap().unwrap();
    assert_eq!(
        again.instances.iter().find(|i| i.id == lost),
        first.instances.iter().find(|i| i.id == lost),
        "a later pass records the end only once"
    );
    let cost =
        nightshift_core::cost::run_cost(&again, 0, Utc::now(), &nightshift_core::cost::PRICES);
    assert!(
        cost.instances.iter().all(|i| i.usd.is_some()),
        "every instance has its price"
    );
}

/// A night on a compressed clock: a pass every five minutes from 22:00 to
/// 06:00 (London, January), workers whose slots each take a queued task and
/// end it after its kernel time, and an EC2 that denies spot for a while.
struct Night {
    world: World,
    now: DateTime<Utc>,
    /// Task id → (instance, when it ends), for the tasks running.
    running: std::collections::BTreeMap<String, (String, DateTime<Utc>)>,
    task_minutes: i64,
}

impl Night {
    fn new(fleet: FakeFleet, max_instances: u32, task_minutes: i64) -> Self {
        let mut world = World::new(5000);
        world.fleet = Arc::new(fleet);
        world.settings.max_instances = max_instances;
        world.settings.max_lifetime = Duration::from_secs(12 * 3600);
        world.settings.plan = Policy {
            // An hour assumed until a result says otherwise.
            prior_ms: 3_600_000,
            lead: chrono::Duration::minutes(4),
            margin: chrono::Duration::minutes(30),
            on_demand_within: chrono::Duration::minutes(60),
        };
        let now = at("2026-01-09T22:00:00Z");
        world.fleet.set_clock(now);
        Self {
            world,
            now,
            running: std::collections::BTreeMap::new(),
            task_minutes,
        }
    }

    /// One dispatcher pass, then five minutes of work.
    async fn step(&mut self) -> Pass {
        let pass = self
            .world
            .dispatcher()
            .open_night(self.now, "d")
            .await
            .unwrap();
        self.now += chrono::Duration::minutes(5);
        self.world.fleet.set_clock(self.now);
        self.work().await;
        pass
    }

    /// Each slot of a booted, running instance ends its task when due and
    /// takes the next queued one; a dead instance's tasks go back.
    async fn work(&mut self) {
        let run = self.world.store.current_run().await.unwrap();
        let Some(run) = run else { return };
        let alive: Vec<String> = self.world.fleet.active();
        self.running
            .retain(|_, (instance, _)| alive.contains(instance));
        let due: Vec<TaskResult> = self
            .running
            .iter()
            .filter(|(_, (_, ends))| *ends <= self.now)
            .map(|(task, (instance, ends))| TaskResult {
                instance_id: instance.clone(),
                started_at: *ends - chrono::Duration::minutes(self.task_minutes),
                finished_at: *ends,
                ..done(task, &run.id)
            })
            .collect();
        self.world.store.record_results(&due).await.unwrap();
        for result in &due {
            self.running.remove(&result.task_id);
        }
        let waiting: Vec<String> = self
            .world
            .store
            .all_tasks()
            .into_iter()
            .filter(|t| t.status == TaskStatus::Queued && !self.running.contains_key(&t.id))
            .map(|t| t.id)
            .collect();
        let mut waiting = waiting.into_iter();
        let lead = chrono::Duration::minutes(4);
        for launched in run.instances.iter().filter(|l| alive.contains(&l.id)) {
            if launched.launched_at + lead > self.now {
                continue;
            }
            let busy = self
                .running
                .values()
                .filter(|(i, _)| *i == launched.id)
                .count();
            for _ in busy..launched.slots as usize {
                let Some(task) = waiting.next() else { return };
                let ends = self.now + chrono::Duration::minutes(self.task_minutes);
                self.running.insert(task, (launched.id.clone(), ends));
            }
        }
    }

    async fn run(&self) -> Run {
        let runs = self.world.store.runs_page(1, None).await.unwrap();
        runs.items.into_iter().next().unwrap()
    }
}

fn at(text: &str) -> DateTime<Utc> {
    text.parse().unwrap()
}

/// 400 tasks of 30 minutes (200 slot-hours) on at most 40 slots, due at
/// 06:00 (aimed at 05:30). Spot is denied for every type until 22:30 and
/// for the preferred type all night; at 01:00 five workers are lost, which
/// leaves too few. The run ends by its deadline on a mix of on-demand and
/// spot, with fewer slots than allowed, and each launch says why.
#[tokio::test]
async fn a_night_with_spot_denied_meets_its_deadline_on_a_mix_and_says_why() {
    let fleet = FakeFleet::with_types(&[("c7g.large", 2), ("c7g.xlarge", 4)]);
    fleet.deny_spot("c7g.large", at("2026-01-10T12:00:00Z"));
    fleet.deny_spot("c7g.xlarge", at("2026-01-09T22:30:00Z"));
    let mut night = Night::new(fleet, 20, 30);
    // Known from earlier nights: half an hour.
    night.world.settings.plan.prior_ms = 30 * 60_000;
    night.world.add_tasks(400).await;
    let mut closed_at = None;
    while night.now < at("2026-01-10T09:00:00Z") {
        if night.now == at("2026-01-10T01:00:00Z") {
            for lost in night.world.fleet.active().into_iter().take(5) {
                night.world.fleet.lose(&lost);
            }
        }
        let now = night.now;
        let pass = night.step().await;
        if pass.closed {
            closed_at = Some(now);
            break;
        }
    }
    let run = night.run().await;
    let closed_at = closed_at.expect("the run closed");
    assert!(
        closed_at <= run.deadline,
        "closed at {closed_at}, due {}",
        run.deadline
    );
    assert_eq!(run.done, 400);

    let of = |lifecycle: &str| -> Vec<&Launched> {
        run.instances
            .iter()
            .filter(|l| l.lifecycle.as_deref() == Some(lifecycle))
            .collect()
    };
    let (on_demand, spot) = (of("on-demand"), of("spot"));
    assert!(
        !on_demand.is_empty() && !spot.is_empty(),
        "{:?}",
        run.instances
    );
    assert!(
        on_demand.iter().all(|l| l
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("spot gave 0"))),
        "{on_demand:?}"
    );
    assert!(
        spot.iter()
            .all(|l| l.instance_type.as_deref() == Some("c7g.xlarge") && l.slots == 4),
        "spot found only the type it was not denied: {spot:?}"
    );
    // Sized by the deadline, not the backlog: the first pass launched
    // fewer slots than the 40 allowed, and the night fewer than a fleet
    // kept at 40 with the lost ones replaced.
    let first: u32 = run
        .instances
        .iter()
        .filter(|l| l.launched_at == at("2026-01-09T22:00:00Z"))
        .map(|l| l.slots)
        .sum();
    assert!((20..40).contains(&first), "{first} slots at the first pass");
    let slots: u32 = run.instances.iter().map(|l| l.slots).sum();
    assert!(slots < 40 + 10, "{slots} slots launched");
    assert!(run.instances.iter().all(|l| l.reason.is_some()));
    let plan = run.plan.expect("the last pass recorded its plan");
    assert!(plan.on_time);
    // The tasks' measured length replaced the hour assumed.
    assert_eq!(run.kernels[0].mean_ms(), Some(30 * 60_000));
}

/// 400 tasks of 30 minutes on at most 10 slots cannot end in 8 hours: the
/// first pass says so, with the finish it projects.
#[tokio::test]
async fn a_night_that_cannot_meet_its_deadline_says_so_at_its_first_pass() {
    let mut night = Night::new(FakeFleet::default(), 5, 30);
    night.world.add_tasks(400).await;
    let pass = night.step().await;
    let plan = pass.plan.expect("a plan");
    assert!(!plan.on_time);
    assert!(plan.reason.contains("cannot end"), "{}", plan.reason);
    assert_eq!(plan.slots, 10, "it takes every slot it may");
    let run = night.run().await;
    assert_eq!(run.plan.as_ref(), Some(&plan), "recorded on the run");
    assert!(plan.projected_finish.is_some_and(|at| at > run.deadline));
}

/// Once the work left fits the slots running, no more are launched.
#[tokio::test]
async fn an_early_projection_launches_nothing_more() {
    let mut night = Night::new(FakeFleet::default(), 20, 10);
    night.world.add_tasks(40).await;
    let first = night.step().await;
    assert!(first.launched > 0);
    for _ in 0..12 {
        let pass = night.step().await;
        assert_eq!(pass.launched, 0, "{:?}", pass.plan);
    }
}

/// A cancelled run: its queued and pending tasks end CANCELLED, its workers
/// are terminated, a result that comes after is kept as late; the pass
/// after that finds nothing left releases it, and work that arrived after
/// the cancel opens the next run.
#[tokio::test]
async fn a_cancelled_run_ends_its_work_and_lets_the_next_night_open() {
    let world = World::new(4);
    world.add_tasks(6).await;
    let first = world.open_night("d").await;
    let run_id = first.run_id.clone().unwrap();
    assert_eq!((first.queued, first.waiting), (4, true));
    assert!(first.launched > 0);
    let queued: Vec<String> = world.sent_task_ids();
    let result = |task: &str| done(task, &run_id);
    world
        .store
        .record_results(&[result(&queued[0])])
        .await
        .unwrap();

    assert!(world.store.cancel_run(&run_id, Utc::now()).await.unwrap());
    world.add(1, json!({"seconds": 0})).await;
    let winding = world.open_night("d").await;
    assert_eq!(winding.run_id.as_deref(), Some(run_id.as_str()));
    assert_eq!(
        winding.cancelled, 5,
        "3 queued and 2 pending before the cancel"
    );
    assert_eq!(winding.terminated, first.launched);
    assert!(world.fleet.active().is_empty());
    let outcome = world
        .store
        .record_results(&[result(&queued[1])])
        .await
        .unwrap();
    assert_eq!(outcome, vec![RecordOutcome::Late]);

    let released = world.open_night("d").await;
    assert_eq!(
        (released.run_id.as_deref(), released.cancelled),
        (Some(run_id.as_str()), 0)
    );
    let run = world.store.run(&run_id).await.unwrap().unwrap();
    assert_eq!(
        (run.state, run.done, run.cancelled, run.late),
        (RunState::Cancelled, 1, 5, 1)
    );
    let next = world.open_night("d").await;
    assert_ne!(next.run_id.as_deref(), Some(run_id.as_str()));
    assert_eq!(next.queued, 1, "the task that came after the cancel");
}

/// A clock that moves a second each time it is read.
struct Ticking(std::sync::Mutex<DateTime<Utc>>);

impl Clock for Ticking {
    fn now(&self) -> DateTime<Utc> {
        let mut now = self.0.lock().unwrap();
        *now += chrono::Duration::seconds(1);
        *now
    }
}

#[tokio::test]
async fn a_pass_stops_queuing_when_its_budget_is_spent_and_the_next_goes_on() {
    let mut world = World::with_shards(10_000, 1);
    world.settings.pass_budget = Duration::from_secs(3);
    world.add_tasks(450).await;
    let now = Utc::now();
    let clock = Ticking(std::sync::Mutex::new(now));
    let dispatcher = Dispatcher {
        clock: &clock,
        ..world.dispatcher()
    };
    // The clock moves a second at each read: once as queuing starts, then
    // before each page of 100; the third page finds the budget of 3 s spent.
    let first = dispatcher.open_night(now, "d").await.unwrap();
    assert_eq!((first.queued, first.waiting), (200, true), "{first:?}");
    let later = *clock.0.lock().unwrap();
    let second = dispatcher.pass(later, "d").await.unwrap();
    assert_eq!((second.queued, second.waiting), (200, true), "{second:?}");
    assert!(distinct(world.sent_task_ids()));
}

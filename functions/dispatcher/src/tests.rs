use std::sync::Arc;

use chrono::Utc;
use nightshift_core::fakes::{FakeFleet, MemoryQueue, MemoryStore};
use nightshift_core::ports::{RunStore, TaskWriter};
use nightshift_core::{Blob, Envelope, NewTask, TaskStatus};
use serde_json::json;

use super::*;

struct World {
    store: Arc<MemoryStore>,
    queue: Arc<MemoryQueue>,
    fleet: Arc<FakeFleet>,
    settings: Settings,
}

impl World {
    fn new(max_queued: u64) -> Self {
        Self {
            store: Arc::new(MemoryStore::new(4)),
            queue: Arc::new(MemoryQueue::default()),
            fleet: Arc::new(FakeFleet::default()),
            settings: Settings {
                max_instances: 3,
                slots_per_instance: 2,
                max_queued,
                pending_shards: 4,
                lease_ttl: Duration::from_secs(120),
            },
        }
    }

    fn dispatcher(&self) -> Dispatcher<'_> {
        Dispatcher {
            runs: &*self.store,
            pending: &*self.store,
            queue: &*self.queue,
            fleet: &*self.fleet,
            settings: &self.settings,
        }
    }

    async fn add_tasks(&self, n: usize) {
        let tasks: Vec<NewTask> = (0..n)
            .map(|i| NewTask {
                id: format!("task-{i:03}"),
                account: format!("acct-{i:03}"),
                kernel: "sleep".into(),
                payload: Blob::Inline(json!({"seconds": 0})),
                created_at: Utc::now(),
                idempotency: None,
            })
            .collect();
        self.store.insert_tasks(&tasks).await.unwrap();
    }

    fn queued_task_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .queue
            .sent()
            .iter()
            .map(|body| Envelope::from_json(body).unwrap().task_id().to_owned())
            .collect();
        ids.sort();
        ids
    }
}

#[tokio::test]
async fn pending_tasks_are_queued_in_batches_of_ten_and_workers_launched() {
    let world = World::new(1000);
    world.add_tasks(25).await;
    let pass = world.dispatcher().pass(Utc::now(), "d1").await.unwrap();
    assert_eq!(pass.queued, 25);
    assert_eq!(world.queued_task_ids().len(), 25);
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

#[tokio::test]
async fn two_passes_at_once_queue_each_task_once_and_launch_one_fleet() {
    let world = World::new(1000);
    world.add_tasks(40).await;
    let (first, second) = (world.dispatcher(), world.dispatcher());
    let (one, two) = tokio::join!(first.pass(Utc::now(), "d1"), second.pass(Utc::now(), "d2"));
    let (one, two) = (one.unwrap(), two.unwrap());
    assert_eq!(one.queued + two.queued, 40);
    let ids = world.queued_task_ids();
    let mut distinct = ids.clone();
    distinct.dedup();
    assert_eq!(ids, distinct, "no task is sent twice");
    assert_eq!(world.fleet.launches(), 1);
    // A later pass finds the fleet big enough and launches nothing more.
    let again = world.dispatcher().pass(Utc::now(), "d3").await.unwrap();
    assert_eq!((again.queued, again.launched), (0, 0));
}

#[tokio::test]
async fn a_held_lease_makes_a_pass_skip() {
    let world = World::new(1000);
    world.add_tasks(1).await;
    let (run, _) = world.store.open_run("r1", Utc::now()).await.unwrap();
    assert!(
        world
            .store
            .acquire_lease(&run.id, "other", Utc::now(), Duration::from_secs(60))
            .await
            .unwrap()
    );
    let pass = world.dispatcher().pass(Utc::now(), "me").await.unwrap();
    assert_eq!(
        pass.skipped,
        Some("another dispatcher holds the run's lease")
    );
    assert!(world.queue.sent().is_empty());
    // Once the lease has expired, the next pass proceeds.
    let later = Utc::now() + chrono::Duration::seconds(61);
    assert_eq!(
        world.dispatcher().pass(later, "me").await.unwrap().queued,
        1
    );
}

#[tokio::test]
async fn the_backlog_is_capped_and_the_rest_waits_for_room() {
    let world = World::new(10);
    world.add_tasks(25).await;
    assert_eq!(
        world
            .dispatcher()
            .pass(Utc::now(), "d")
            .await
            .unwrap()
            .queued,
        10
    );
    assert_eq!(
        world
            .dispatcher()
            .pass(Utc::now(), "d")
            .await
            .unwrap()
            .queued,
        0,
        "no room yet"
    );
}

#[tokio::test]
async fn lost_workers_are_replaced_while_work_remains() {
    let world = World::new(1000);
    world.add_tasks(6).await;
    world.dispatcher().pass(Utc::now(), "d").await.unwrap();
    let lost = world.fleet.active()[0].clone();
    world.fleet.lose(&lost);
    let pass = world.dispatcher().pass(Utc::now(), "d").await.unwrap();
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
async fn a_run_closes_when_every_task_ended_and_nothing_is_pending() {
    use nightshift_core::ports::ResultRecorder;
    use nightshift_core::{TaskOutcome, TaskResult};
    let world = World::new(1000);
    world.add_tasks(2).await;
    let pass = world.dispatcher().pass(Utc::now(), "d").await.unwrap();
    let run_id = pass.run_id.unwrap();
    assert!(!pass.closed);
    let results: Vec<TaskResult> = world
        .store
        .all_tasks()
        .iter()
        .map(|t| TaskResult {
            task_id: t.id.clone(),
            run_id: run_id.clone(),
            instance_id: "i-1".into(),
            attempts: 1,
            started_at: Utc::now(),
            finished_at: Utc::now(),
            outcome: TaskOutcome::Done {
                result: Blob::Inline(json!(1)),
                summary: "ok".into(),
            },
        })
        .collect();
    world.store.record_results(&results).await.unwrap();
    let pass = world.dispatcher().pass(Utc::now(), "d").await.unwrap();
    assert!(pass.closed);
    assert!(world.store.current_run().await.unwrap().is_none());
    let idle = world.dispatcher().pass(Utc::now(), "d").await.unwrap();
    assert_eq!(idle.skipped, Some("no open run and nothing pending"));
}

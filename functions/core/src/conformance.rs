//! One conformance suite for every implementation of the storage ports:
//! the in-memory store runs it in this crate's tests, and the DynamoDB
//! adapter runs it against the emulator (`tests/conformance.rs`), so the
//! fake used by the other crates' tests cannot drift from the product.
//!
//! Each case uses ids of its own; cases that open a run close it, since
//! one run is open at a time.

// A failed expectation should stop the suite with its case's name.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::future::join_all;
use serde_json::json;

use crate::limits::RESULT_TOO_LARGE;
use crate::message::{AttemptEvent, TaskOutcome, TaskResult};
use crate::model::{
    AttemptRecord, Blob, Idempotency, InstanceSeen, Launched, NewTask, SpotPrice, TaskStatus, Usage,
};
use crate::ports::{
    AttemptKind, InsertOutcome, PendingTasks, RecordOutcome, ResultRecorder, RunStore, Sent,
    TaskReader, TaskWriter,
};

/// Everything the suite exercises.
pub trait Store: TaskWriter + TaskReader + PendingTasks + ResultRecorder + RunStore {}
impl<T: TaskWriter + TaskReader + PendingTasks + ResultRecorder + RunStore> Store for T {}

/// Runs every case against `store`, whose pending index has `shards` shards.
pub async fn run_all(store: &dyn Store, shards: u32) {
    let suite = Suite {
        store,
        shards,
        tag: uuid::Uuid::new_v4().simple().to_string(),
    };
    suite
        .staged_tasks_are_invisible_until_committed_and_abort_removes_them()
        .await;
    suite
        .an_idempotent_insert_reports_the_task_that_exists()
        .await;
    suite
        .pending_pages_follow_the_cursor_past_large_payloads()
        .await;
    suite
        .results_are_recorded_once_and_counters_move_once()
        .await;
    suite
        .a_result_that_cannot_fit_the_item_fails_its_task_with_the_reason()
        .await;
    suite
        .attempts_count_once_per_event_and_dead_letters_keep_the_last_error()
        .await;
    suite
        .one_run_opens_and_one_dispatcher_holds_its_lease_however_many_race()
        .await;
    suite.runs_and_their_tasks_are_read_page_by_page().await;
    suite
        .a_cancel_ends_pending_and_queued_tasks_once_and_keeps_late_results()
        .await;
}

struct Suite<'a> {
    store: &'a dyn Store,
    shards: u32,
    /// Keeps this run's ids apart from any other's in the same table.
    tag: String,
}

fn at(seconds: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(1_795_000_000 + seconds, 0).unwrap()
}

impl Suite<'_> {
    fn task(&self, name: &str, payload: serde_json::Value) -> NewTask {
        NewTask {
            id: format!("{}-{name}", self.tag),
            account: format!("acct-{name}"),
            kernel: "sleep".into(),
            payload: Blob::json(&payload),
            created_at: Utc::now(),
            idempotency: None,
        }
    }

    async fn add(&self, tasks: &[NewTask]) {
        let request = uuid::Uuid::new_v4().to_string();
        self.store.stage(&request, tasks).await.unwrap();
        self.store.commit(&request, tasks).await.unwrap();
    }

    /// Every pending task of this suite, read page by page.
    async fn all_pending(&self, page: usize) -> BTreeSet<String> {
        let mut found = BTreeSet::new();
        for shard in 0..self.shards {
            let mut after = None;
            loop {
                let read = self
                    .store
                    .pending(shard, page, after.as_ref())
                    .await
                    .unwrap();
                found.extend(
                    read.items
                        .into_iter()
                        .map(|t| t.id)
                        .filter(|id| id.starts_with(&self.tag)),
                );
                match read.next {
                    Some(next) => after = Some(next),
                    None => break,
                }
            }
        }
        found
    }

    async fn a_cancel_ends_pending_and_queued_tasks_once_and_keeps_late_results(&self) {
        let tasks: Vec<NewTask> = (0..4)
            .map(|i| self.task(&format!("cancel-{i}"), json!({"seconds": 0})))
            .collect();
        self.add(&tasks).await;
        let ids: Vec<String> = tasks.iter().map(|t| t.id.clone()).collect();
        let run = self.open().await;
        // 0 and 1 queued, 2 queued and done, 3 still pending.
        self.store
            .mark_queued(&run, &Sent::all(&ids[..3], "sleep"))
            .await
            .unwrap();
        let done = self.result(&tasks[2], &run, Self::done(json!(2)));
        self.store.record_results(&[done]).await.unwrap();
        // The kernel's counters, and a plan, as the dispatcher reads them.
        let counted = self.store.run(&run).await.unwrap().unwrap();
        assert_eq!(
            counted.kernels,
            vec![crate::model::KernelStats {
                kernel: "sleep".into(),
                queued: 3,
                ended: 1,
                busy_ms: 2000,
            }]
        );
        let plan = crate::plan::FleetPlan {
            at: at(5),
            tasks_left: 2,
            work_ms: 4000,
            slots: 2,
            projected_finish: Some(at(9)),
            on_time: true,
            more_pending: false,
            reason: "2 slots finish 2 tasks".into(),
        };
        let lease = std::time::Duration::from_secs(60);
        assert!(
            self.store
                .acquire_lease(&run, "plan", at(5), lease)
                .await
                .unwrap()
        );
        self.store
            .release_lease(&run, "plan", false, Some(&plan))
            .await
            .unwrap();
        let planned = self.store.run(&run).await.unwrap().unwrap();
        assert_eq!(planned.plan, Some(plan));

        assert!(self.store.cancel_run(&run, at(10)).await.unwrap());
        assert!(!self.store.cancel_run(&run, at(11)).await.unwrap(), "once");
        let mut changed = self.store.cancel_tasks(&run, &ids, at(12)).await.unwrap();
        changed.sort();
        assert_eq!(
            changed,
            vec![ids[0].clone(), ids[1].clone(), ids[3].clone()]
        );
        assert!(
            self.store
                .cancel_tasks(&run, &ids, at(13))
                .await
                .unwrap()
                .is_empty(),
            "a task cancelled or ended is left alone"
        );

        // A result that comes after the cancel is kept, once, as late.
        let late = self.result(&tasks[0], &run, Self::done(json!(7)));
        let outcomes = self
            .store
            .record_results(std::slice::from_ref(&late))
            .await
            .unwrap();
        assert_eq!(outcomes, vec![RecordOutcome::Late]);
        let again = self.store.record_results(&[late]).await.unwrap();
        assert_eq!(again, vec![RecordOutcome::Duplicate]);
        let kept = self.store.task(&ids[0]).await.unwrap().unwrap();
        assert_eq!(kept.status, TaskStatus::Cancelled);
        assert_eq!(kept.summary.as_deref(), Some("ok"));
        assert_eq!(kept.instance_id.as_deref(), Some("i-conformance"));
        let pending = self.store.task(&ids[3]).await.unwrap().unwrap();
        assert_eq!(
            (pending.status, pending.run_id.as_deref()),
            (TaskStatus::Cancelled, Some(run.as_str()))
        );
        let counted = self.store.run(&run).await.unwrap().unwrap();
        assert_eq!(counted.state, crate::model::RunState::Cancelled);
        assert_eq!((counted.done, counted.cancelled, counted.late), (1, 3, 1));
        // It stays current until released, so no run opens meanwhile.
        let current = self.store.current_run().await.unwrap();
        assert_eq!(current.map(|r| r.id), Some(run.clone()));
        self.store.release_run(&run).await.unwrap();
        let current = self.store.current_run().await.unwrap();
        assert_ne!(current.map(|r| r.id), Some(run));
    }

    fn result(&self, task: &NewTask, run_id: &str, outcome: TaskOutcome) -> TaskResult {
        TaskResult {
            task_id: task.id.clone(),
            run_id: run_id.to_owned(),
            kernel: task.kernel.clone(),
            instance_id: "i-conformance".into(),
            attempts: 1,
            started_at: at(0),
            finished_at: at(2),
            outcome,
        }
    }

    fn done(value: serde_json::Value) -> TaskOutcome {
        TaskOutcome::Done {
            result: Blob::json(&value),
            summary: "ok".into(),
        }
    }

    /// Opens a run (closing one left open by an earlier failure first).
    async fn open(&self) -> String {
        if let Some(run) = self.store.current_run().await.unwrap() {
            self.store.close_run(&run.id, Utc::now()).await.unwrap();
            self.store.release_run(&run.id).await.unwrap();
        }
        let id = format!("{}-run-{}", self.tag, uuid::Uuid::new_v4().simple());
        let (run, created) = self
            .store
            .open_run(&id, Utc::now(), Utc::now() + chrono::Duration::hours(8))
            .await
            .unwrap();
        assert!(created && run.id == id);
        id
    }

    async fn staged_tasks_are_invisible_until_committed_and_abort_removes_them(&self) {
        let kept = self.task("staged-kept", json!({"seconds": 0}));
        let dropped = self.task("staged-dropped", json!({"seconds": 0}));
        let tasks = [kept.clone(), dropped.clone()];
        let ids = [kept.id.clone(), dropped.id.clone()];
        let outcomes = self.store.stage("req-1", &tasks).await.unwrap();
        assert_eq!(outcomes, vec![InsertOutcome::Inserted; 2]);
        assert!(
            self.store.task(&kept.id).await.unwrap().is_none(),
            "a staged task is not there yet"
        );
        assert!(self.all_pending(100).await.is_empty(), "nor is it pending");
        self.store.abort("req-1", &ids[1..]).await.unwrap();
        self.store.commit("req-1", &tasks[..1]).await.unwrap();
        let read = self.store.task(&kept.id).await.unwrap().unwrap();
        assert_eq!(read.status, TaskStatus::Pending);
        assert!(
            self.store.tasks(&ids[1..]).await.unwrap().is_empty(),
            "the aborted task is gone"
        );
        assert_eq!(
            self.all_pending(100).await,
            BTreeSet::from([kept.id.clone()])
        );
        // Leave nothing pending for the cases after this one.
        let run = self.open().await;
        self.store
            .mark_queued(&run, &Sent::all(&ids[..1], "sleep"))
            .await
            .unwrap();
        // A commit repeated after its answer was lost, once a dispatcher
        // has queued the task, must not make it pending again.
        self.store.commit("req-1", &tasks[..1]).await.unwrap();
        let read = self.store.task(&kept.id).await.unwrap().unwrap();
        assert_eq!(read.status, TaskStatus::Queued, "a repeated commit");
        assert!(
            self.all_pending(100).await.is_empty(),
            "a repeated commit queues nothing twice"
        );
        self.store.close_run(&run, Utc::now()).await.unwrap();
    }

    async fn an_idempotent_insert_reports_the_task_that_exists(&self) {
        let mut task = self.task("keyed", json!({"seconds": 0}));
        task.idempotency = Some(Idempotency {
            key: "k".into(),
            request_digest: "d1".into(),
        });
        let first = self
            .store
            .stage("req-a", std::slice::from_ref(&task))
            .await
            .unwrap();
        assert_eq!(first, vec![InsertOutcome::Inserted]);
        let during = self
            .store
            .stage("req-b", std::slice::from_ref(&task))
            .await
            .unwrap();
        assert_eq!(
            during,
            vec![InsertOutcome::Exists {
                request_digest: Some("d1".into()),
                staged_by: Some("req-a".into())
            }],
            "another request sees whose it is while it is staged"
        );
        // A request that died leaves its task STAGED; a retry after a while
        // takes it over.
        let mut abandoned = self.task("keyed-abandoned", json!({"seconds": 0}));
        abandoned.idempotency = Some(Idempotency {
            key: "k2".into(),
            request_digest: "d2".into(),
        });
        abandoned.created_at =
            Utc::now() - crate::rules::STAGED_ABANDONED_AFTER - chrono::TimeDelta::seconds(5);
        self.store
            .stage("req-dead", std::slice::from_ref(&abandoned))
            .await
            .unwrap();
        let mut retry = abandoned.clone();
        retry.created_at = Utc::now();
        assert_eq!(
            self.store
                .stage("req-retry", std::slice::from_ref(&retry))
                .await
                .unwrap(),
            vec![InsertOutcome::Inserted]
        );
        self.store
            .commit("req-retry", std::slice::from_ref(&retry))
            .await
            .unwrap();
        assert_eq!(
            self.store.task(&retry.id).await.unwrap().unwrap().status,
            TaskStatus::Pending
        );
        self.store
            .commit("req-a", std::slice::from_ref(&task))
            .await
            .unwrap();
        let after = self
            .store
            .stage("req-c", std::slice::from_ref(&task))
            .await
            .unwrap();
        assert_eq!(
            after,
            vec![InsertOutcome::Exists {
                request_digest: Some("d1".into()),
                staged_by: None
            }]
        );
        let run = self.open().await;
        self.store
            .mark_queued(
                &run,
                &Sent::all(&[task.id.clone(), retry.id.clone()], "sleep"),
            )
            .await
            .unwrap();
        self.store.close_run(&run, Utc::now()).await.unwrap();
    }

    async fn pending_pages_follow_the_cursor_past_large_payloads(&self) {
        // 24 payloads of 100 KB: far more than one 1 MB page of the index.
        let tasks: Vec<NewTask> = (0..24)
            .map(|i| {
                self.task(
                    &format!("large-{i:02}"),
                    json!({"seconds": 0, "data": "x".repeat(100_000)}),
                )
            })
            .collect();
        self.add(&tasks).await;
        let expected: BTreeSet<String> = tasks.iter().map(|t| t.id.clone()).collect();
        assert_eq!(
            self.all_pending(100).await,
            expected,
            "every pending task, page after page"
        );
        let run = self.open().await;
        let ids: Vec<String> = expected.iter().cloned().collect();
        let changed = self
            .store
            .mark_queued(&run, &Sent::all(&ids, "sleep"))
            .await
            .unwrap();
        assert_eq!(changed.len(), 24);
        let again = self
            .store
            .mark_queued(&run, &Sent::all(&ids[..3], "sleep"))
            .await
            .unwrap();
        assert!(again.is_empty(), "a task no longer pending is left alone");
        let counted = self.store.run(&run).await.unwrap().unwrap();
        assert_eq!(counted.queued, 24, "the counter moved once per task");
        assert!(self.all_pending(100).await.is_empty());
        self.store.close_run(&run, Utc::now()).await.unwrap();
    }

    async fn results_are_recorded_once_and_counters_move_once(&self) {
        let tasks: Vec<NewTask> = (0..3)
            .map(|i| self.task(&format!("result-{i}"), json!({"seconds": 0})))
            .collect();
        let early = self.task("result-early", json!({"seconds": 0}));
        self.add(&tasks).await;
        self.add(std::slice::from_ref(&early)).await;
        let run = self.open().await;
        let ids: Vec<String> = tasks.iter().map(|t| t.id.clone()).collect();
        self.store
            .mark_queued(&run, &Sent::all(&ids, "sleep"))
            .await
            .unwrap();
        let workers = ["i-conformance", "i-other"].map(|id| Launched::new(id, at(0), None, None));
        assert!(
            self.store
                .record_fleet(&run, 0, &workers, &[])
                .await
                .unwrap()
        );

        let first = self.result(&tasks[0], &run, Self::done(json!({"v": 1})));
        let batch = vec![
            first.clone(),
            self.result(
                &tasks[1],
                &run,
                TaskOutcome::Failed {
                    error: "bad input".into(),
                },
            ),
            // The same task twice in one batch, the second claiming another worker.
            TaskResult {
                instance_id: "i-other".into(),
                ..first.clone()
            },
            self.result(&early, &run, Self::done(json!(1))),
            self.result(&tasks[2], "another-run", Self::done(json!(1))),
        ];
        let outcomes = self.store.record_results(&batch).await.unwrap();
        assert_eq!(
            outcomes,
            vec![
                RecordOutcome::Recorded,
                RecordOutcome::Recorded,
                RecordOutcome::Duplicate,
                RecordOutcome::NotYetQueued,
                RecordOutcome::Unknown,
            ]
        );
        let again = self.store.record_results(&batch[..2]).await.unwrap();
        assert_eq!(
            again,
            vec![RecordOutcome::Duplicate; 2],
            "a redelivery changes nothing"
        );
        let task = self.store.task(&tasks[0].id).await.unwrap().unwrap();
        assert_eq!(
            (task.status, task.instance_id.as_deref()),
            (TaskStatus::Done, Some("i-conformance"))
        );
        let failed = self.store.task(&tasks[1].id).await.unwrap().unwrap();
        assert_eq!(
            (failed.status, failed.last_error.as_deref()),
            (TaskStatus::Failed, Some("bad input"))
        );
        let counted = self.store.run(&run).await.unwrap().unwrap();
        assert_eq!((counted.queued, counted.done, counted.failed), (3, 1, 1));
        assert_eq!(
            counted
                .instances
                .iter()
                .map(|i| (i.id.as_str(), i.tasks, i.busy_ms))
                .collect::<Vec<_>>(),
            [
                ("i-conformance", 2, 2 * first.duration_ms()),
                ("i-other", 0, 0)
            ],
            "each instance counts the tasks it ended, once"
        );
        let reported = self.store.run_tasks(&run).await.unwrap();
        let reported_ids: BTreeSet<String> = reported.iter().map(|t| t.id.clone()).collect();
        assert_eq!(reported_ids, ids.iter().cloned().collect());
        // The run's index carries what a report shows.
        let line = reported.iter().find(|t| t.id == tasks[0].id).unwrap();
        assert_eq!(
            (
                line.status,
                line.instance_id.as_deref(),
                line.duration_ms,
                line.summary.as_deref(),
                line.attempts
            ),
            (
                TaskStatus::Done,
                Some("i-conformance"),
                Some(2000),
                Some("ok"),
                1
            )
        );
        assert_eq!(line.account, tasks[0].account);
        // The early task joins and ends; the run's last task too.
        self.store
            .mark_queued(&run, &Sent::all(std::slice::from_ref(&early.id), "sleep"))
            .await
            .unwrap();
        let late = [
            self.result(&early, &run, Self::done(json!(1))),
            self.result(&tasks[2], &run, Self::done(json!(1))),
        ];
        assert_eq!(
            self.store.record_results(&late).await.unwrap(),
            vec![RecordOutcome::Recorded; 2]
        );
        let counted = self.store.run(&run).await.unwrap().unwrap();
        assert_eq!((counted.queued, counted.done + counted.failed), (4, 4));
        self.store.close_run(&run, Utc::now()).await.unwrap();
    }

    async fn a_result_that_cannot_fit_the_item_fails_its_task_with_the_reason(&self) {
        // 150 KB of payload and 300 KB of result do not fit one 400 KB item.
        let big = self.task("too-large", json!({"data": "p".repeat(150_000)}));
        let fine = self.task("fits", json!({"seconds": 0}));
        self.add(&[big.clone(), fine.clone()]).await;
        let run = self.open().await;
        self.store
            .mark_queued(
                &run,
                &Sent::all(&[big.id.clone(), fine.id.clone()], "sleep"),
            )
            .await
            .unwrap();
        let outcomes = self
            .store
            .record_results(&[
                self.result(&big, &run, Self::done(json!({"data": "r".repeat(300_000)}))),
                self.result(&fine, &run, Self::done(json!({"v": 2}))),
            ])
            .await
            .unwrap();
        assert_eq!(
            outcomes,
            vec![
                RecordOutcome::FailedInstead(RESULT_TOO_LARGE.into()),
                RecordOutcome::Recorded
            ]
        );
        let task = self.store.task(&big.id).await.unwrap().unwrap();
        assert_eq!(
            (task.status, task.last_error.as_deref()),
            (TaskStatus::Failed, Some(RESULT_TOO_LARGE))
        );
        let counted = self.store.run(&run).await.unwrap().unwrap();
        assert_eq!(
            (counted.done, counted.failed),
            (1, 1),
            "the run can still end"
        );
        self.store.close_run(&run, Utc::now()).await.unwrap();
    }

    async fn attempts_count_once_per_event_and_dead_letters_keep_the_last_error(&self) {
        let task = self.task("attempts", json!({"seconds": 0}));
        self.add(std::slice::from_ref(&task)).await;
        let run = self.open().await;
        self.store
            .mark_queued(&run, &Sent::all(std::slice::from_ref(&task.id), "sleep"))
            .await
            .unwrap();
        let event = |id: &str, error: Option<&str>| AttemptEvent {
            event_id: id.into(),
            task_id: task.id.clone(),
            run_id: run.clone(),
            instance_id: "i-1".into(),
            started_at: Some(at(0)),
            at: at(1),
            error: error.map(str::to_owned),
        };
        let failed = event("m1:1", Some("worker ran out of memory"));
        assert_eq!(
            self.store
                .record_attempt(&failed, AttemptKind::Failed)
                .await
                .unwrap(),
            RecordOutcome::Recorded
        );
        assert_eq!(
            self.store
                .record_attempt(&failed, AttemptKind::Failed)
                .await
                .unwrap(),
            RecordOutcome::Duplicate
        );
        let interrupted = event("m1:2", None);
        assert_eq!(
            self.store
                .record_attempt(&interrupted, AttemptKind::Interrupted)
                .await
                .unwrap(),
            RecordOutcome::Recorded
        );
        assert_eq!(
            self.store
                .fail_task(&task.id, &run, at(5), None)
                .await
                .unwrap(),
            RecordOutcome::Recorded
        );
        assert_eq!(
            self.store
                .fail_task(&task.id, &run, at(6), Some("again"))
                .await
                .unwrap(),
            RecordOutcome::Duplicate
        );
        let read = self.store.task(&task.id).await.unwrap().unwrap();
        assert_eq!(
            (
                read.status,
                read.failed_attempts,
                read.interruptions,
                read.last_error.as_deref()
            ),
            (TaskStatus::Failed, 1, 1, Some("worker ran out of memory"))
        );
        assert_eq!(
            read.attempt_log,
            vec![
                AttemptRecord {
                    instance_id: "i-1".into(),
                    started_at: Some(at(0)),
                    ended_at: at(1),
                    outcome: AttemptKind::Failed,
                },
                AttemptRecord {
                    instance_id: "i-1".into(),
                    started_at: Some(at(0)),
                    ended_at: at(1),
                    outcome: AttemptKind::Interrupted,
                },
            ],
            "each attempt is logged once, in order"
        );
        let reported = self.store.run_tasks(&run).await.unwrap();
        assert_eq!(
            reported[0].attempt_log, read.attempt_log,
            "the run's index carries the attempts"
        );
        let late = event("m1:3", Some("late"));
        assert_eq!(
            self.store
                .record_attempt(&late, AttemptKind::Failed)
                .await
                .unwrap(),
            RecordOutcome::Duplicate
        );
        let counted = self.store.run(&run).await.unwrap().unwrap();
        assert_eq!(counted.failed, 1);
        self.store.close_run(&run, Utc::now()).await.unwrap();
    }

    async fn one_run_opens_and_one_dispatcher_holds_its_lease_however_many_race(&self) {
        if let Some(run) = self.store.current_run().await.unwrap() {
            self.store.close_run(&run.id, Utc::now()).await.unwrap();
        }
        let ids: Vec<String> = (0..4).map(|i| format!("{}-race-{i}", self.tag)).collect();
        let opened = join_all(ids.iter().map(|id| {
            self.store
                .open_run(id, Utc::now(), Utc::now() + chrono::Duration::hours(8))
        }))
        .await;
        let opened: Vec<_> = opened.into_iter().map(Result::unwrap).collect();
        assert_eq!(
            opened.iter().filter(|(_, created)| *created).count(),
            1,
            "one run is created"
        );
        let run = opened[0].0.id.clone();
        assert!(
            opened.iter().all(|(r, _)| r.id == run),
            "every caller gets that run"
        );

        let now = Utc::now();
        let ttl = Duration::from_secs(60);
        let owners: Vec<String> = (0..5).map(|i| format!("dispatcher-{i}")).collect();
        let leases = join_all(
            owners
                .iter()
                .map(|o| self.store.acquire_lease(&run, o, now, ttl)),
        )
        .await;
        let held = leases
            .into_iter()
            .map(Result::unwrap)
            .filter(|held| *held)
            .count();
        assert_eq!(
            held, 1,
            "exactly one of five racing dispatchers takes the lease"
        );
        let later = now + chrono::Duration::seconds(61);
        assert!(
            self.store
                .acquire_lease(&run, "late", later, ttl)
                .await
                .unwrap(),
            "an expired lease is taken over"
        );
        // A call repeated because its answer was lost finds its own write.
        assert!(
            self.store
                .acquire_lease(&run, "late", later, ttl)
                .await
                .unwrap(),
            "a dispatcher asking again keeps the lease it holds"
        );
        assert!(
            !self
                .store
                .acquire_lease(&run, "other", later, ttl)
                .await
                .unwrap(),
            "a held lease is refused to another dispatcher"
        );
        self.store
            .release_lease(&run, "late", true, None)
            .await
            .unwrap();
        assert!(
            self.store.run(&run).await.unwrap().unwrap().waiting,
            "the pass left work waiting"
        );
        assert!(
            self.store
                .acquire_lease(&run, "next", later, ttl)
                .await
                .unwrap(),
            "a released lease is free"
        );

        let launched = vec![
            Launched::new(
                "i-0aaa",
                at(3),
                Some("c7g.large".into()),
                Some("spot".into()),
            ),
            Launched::new(
                "i-0bbb",
                at(3),
                Some("c7g.large".into()),
                Some("spot".into()),
            ),
        ];
        let prices = vec![SpotPrice {
            instance_type: "c7g.large".into(),
            zone: "us-east-1a".into(),
            usd_per_hour: 0.0312,
            read_at: at(3),
        }];
        assert!(
            self.store
                .record_fleet(&run, 0, &launched, &prices)
                .await
                .unwrap()
        );
        assert!(
            self.store
                .record_fleet(&run, 0, &launched, &prices)
                .await
                .unwrap(),
            "a request repeated after its answer was lost finds its own instances"
        );
        let another = [Launched::new("i-0ccc", at(4), None, None)];
        assert!(
            !self
                .store
                .record_fleet(&run, 0, &another, &[])
                .await
                .unwrap(),
            "a request is recorded once"
        );
        let read = self.store.run(&run).await.unwrap().unwrap();
        assert_eq!(
            (
                read.fleet_requests,
                read.instances.clone(),
                read.spot_prices
            ),
            (1, launched, prices)
        );

        let seen = |id: &str, zone: &str, ended: Option<i64>| InstanceSeen {
            id: id.into(),
            zone: Some(zone.into()),
            ended_at: ended.map(at),
        };
        self.store
            .record_instances(&run, &[seen("i-0aaa", "us-east-1a", None)])
            .await
            .unwrap();
        self.store
            .record_instances(
                &run,
                &[
                    seen("i-0aaa", "us-east-1b", Some(9)),
                    seen("i-0bbb", "us-east-1c", Some(8)),
                ],
            )
            .await
            .unwrap();
        self.store
            .record_instances(&run, &[seen("i-0bbb", "us-east-1c", Some(10))])
            .await
            .unwrap();
        let read = self.store.run(&run).await.unwrap().unwrap();
        let recorded: Vec<_> = read
            .instances
            .iter()
            .map(|i| (i.id.as_str(), i.zone.as_deref(), i.ended_at))
            .collect();
        assert_eq!(
            recorded,
            [
                ("i-0aaa", Some("us-east-1a"), Some(at(9))),
                ("i-0bbb", Some("us-east-1c"), Some(at(8))),
            ],
            "each field is recorded once, at its first sighting"
        );

        assert!(self.store.close_run(&run, Utc::now()).await.unwrap());
        assert!(
            !self.store.close_run(&run, Utc::now()).await.unwrap(),
            "closed once"
        );
        assert!(self.store.current_run().await.unwrap().is_none());
    }

    async fn runs_and_their_tasks_are_read_page_by_page(&self) {
        let tasks: Vec<NewTask> = (0..5)
            .map(|i| self.task(&format!("paged-{i}"), json!({"seconds": 0})))
            .collect();
        self.add(&tasks).await;
        // Runs are listed by their start, to the millisecond.
        tokio::time::sleep(Duration::from_millis(5)).await;
        let run = self.open().await;
        let ids: Vec<String> = tasks.iter().map(|t| t.id.clone()).collect();
        self.store
            .mark_queued(&run, &Sent::all(&ids, "sleep"))
            .await
            .unwrap();
        let mut read = Vec::new();
        let mut after = None;
        let mut pages = 0;
        loop {
            let page = self
                .store
                .run_tasks_page(&run, 2, after.as_ref())
                .await
                .unwrap();
            assert!(page.items.len() <= 2, "a page holds at most its limit");
            read.extend(page.items.into_iter().map(|t| t.id));
            pages += 1;
            match page.next {
                Some(next) => after = Some(next),
                None => break,
            }
        }
        let mut expected = ids.clone();
        expected.sort();
        assert_eq!(read, expected, "every task once, by id");
        assert!(pages >= 3, "five tasks by two take three pages");

        let first = self.store.runs_page(1, None).await.unwrap();
        assert_eq!(
            first
                .items
                .iter()
                .map(|r| r.id.as_str())
                .collect::<Vec<_>>(),
            [run.as_str()],
            "the newest run comes first"
        );
        let next = self
            .store
            .runs_page(1000, first.next.as_ref())
            .await
            .unwrap();
        assert!(
            next.items
                .iter()
                .all(|r| r.started_at <= first.items[0].started_at),
            "older runs follow"
        );
        assert!(next.items.iter().all(|r| r.id != run));

        let calls = |n: u64| {
            [
                ("worker/SQS.ReceiveMessage".to_owned(), n),
                ("dispatcher/DynamoDB.TransactWriteItems".to_owned(), 2 * n),
            ]
            .into_iter()
            .collect()
        };
        let usage = Usage {
            sqs_requests: 3,
            dynamodb_write_units: 2.5,
            lambda_gb_seconds: 0.125,
            calls: calls(1),
            ..Usage::default()
        };
        self.store.add_usage(&run, &usage).await.unwrap();
        self.store.add_usage(&run, &usage).await.unwrap();
        assert_eq!(
            self.store.run(&run).await.unwrap().unwrap().usage,
            Usage {
                sqs_requests: 6,
                dynamodb_write_units: 5.0,
                lambda_gb_seconds: 0.25,
                calls: calls(2),
                ..Usage::default()
            },
            "usage adds up, call by call"
        );
        self.store.close_run(&run, Utc::now()).await.unwrap();
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn the_in_memory_store_conforms() {
        let store = crate::fakes::MemoryStore::new(4);
        super::run_all(&store, store.shards()).await;
    }
}

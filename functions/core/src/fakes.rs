//! In-memory implementations of every port, for the unit tests of the
//! crates that use them. They follow the rules of [`crate::rules`] (the
//! conformance suite holds them to the same cases as the DynamoDB adapter),
//! and they yield to the scheduler at every call, so that tasks racing
//! through them interleave as they would against a service.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::Error;
use crate::limits::{ITEM_LIMIT, RESULT_TOO_LARGE, SQS_BATCH_ENTRIES, SQS_MESSAGE_LIMIT};
use crate::message::{AttemptEvent, TaskOutcome, TaskResult};
use crate::model::{
    AttemptRecord, InstanceSeen, Launched, NewTask, PendingTask, Run, RunState, SpotPrice, Task,
    TaskStatus, Usage, timestamp,
};
use crate::plan::{FleetPlan, Lifecycle};
use crate::ports::{
    AttemptKind, BlobStore, Cursor, Fleet, InsertOutcome, Outgoing, Page, PendingTasks, Queue,
    Received, RecordOutcome, ResultRecorder, RunReader, RunStore, Sent, TaskReader, TaskWriter,
    WorkerInstance,
};
use crate::rules::{TaskChange, TaskFacts, staged_abandoned};

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Every call lets other tasks run first, as a network call would.
async fn network() {
    tokio::task::yield_now().await;
}

/// DynamoDB's page: a query reads at most 1 MB of items.
const QUERY_PAGE_BYTES: usize = 1_000_000;

/// Faults to inject: the next `n` calls of an operation fail transiently.
#[derive(Debug, Default)]
struct Faults(Mutex<HashMap<&'static str, u32>>);

impl Faults {
    fn inject(&self, operation: &'static str, times: u32) {
        *lock(&self.0).entry(operation).or_default() += times;
    }

    fn check(&self, operation: &'static str) -> Result<(), Error> {
        let mut faults = lock(&self.0);
        match faults.get_mut(operation) {
            Some(left) if *left > 0 => {
                *left -= 1;
                Err(Error::transient(operation, "injected fault"))
            }
            _ => Ok(()),
        }
    }
}

#[derive(Debug, Default)]
struct StoreState {
    tasks: BTreeMap<String, StoredTask>,
    runs: BTreeMap<String, Run>,
    current: Option<String>,
    leases: BTreeMap<String, (String, DateTime<Utc>)>,
    /// The sparse pending index: (shard, position) → task id. An entry
    /// whose task is no longer PENDING there is stale and skipped, as a
    /// query skips what the index no longer holds.
    pending_index: BTreeMap<(u32, String), String>,
}

/// A task's place in its pending shard: creation time, then id.
fn pending_position(task: &Task) -> String {
    format!("{}|{}", crate::model::timestamp(task.created_at), task.id)
}

#[derive(Debug, Clone)]
struct StoredTask {
    task: Task,
    shard: u32,
    seen_events: HashSet<String>,
    /// The request that wrote it.
    request_id: String,
    /// What the item weighs, for the query page limit.
    bytes: usize,
}

impl StoredTask {
    fn facts(&self, event_id: Option<&str>) -> TaskFacts<'_> {
        TaskFacts {
            status: self.task.status,
            run_id: self.task.run_id.as_deref(),
            event_seen: event_id.is_some_and(|id| self.seen_events.contains(id)),
        }
    }
}

/// The table, in memory.
#[derive(Debug)]
pub struct MemoryStore {
    state: Mutex<StoreState>,
    shards: u32,
    faults: Faults,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new(4)
    }
}

impl MemoryStore {
    pub fn new(shards: u32) -> Self {
        Self {
            state: Mutex::default(),
            shards,
            faults: Faults::default(),
        }
    }

    pub fn shards(&self) -> u32 {
        self.shards
    }

    /// The next `times` calls of `operation` (a method name) fail transiently.
    pub fn inject_fault(&self, operation: &'static str, times: u32) {
        self.faults.inject(operation, times);
    }

    pub fn all_tasks(&self) -> Vec<Task> {
        lock(&self.state)
            .tasks
            .values()
            .map(|t| t.task.clone())
            .collect()
    }

    fn stored(&self, task: &NewTask, request_id: &str) -> StoredTask {
        let bytes = 512 + task.payload.inline_bytes();
        StoredTask {
            task: Task {
                id: task.id.clone(),
                account: task.account.clone(),
                kernel: task.kernel.clone(),
                status: TaskStatus::Staged,
                created_at: task.created_at,
                run_id: None,
                payload: Some(task.payload.clone()),
                attempts: 0,
                failed_attempts: 0,
                interruptions: 0,
                instance_id: None,
                started_at: None,
                finished_at: None,
                duration_ms: None,
                result: None,
                summary: None,
                last_error: None,
                attempt_log: Vec::new(),
                request_digest: task.idempotency.as_ref().map(|i| i.request_digest.clone()),
            },
            shard: task.pending_shard(self.shards),
            seen_events: HashSet::new(),
            request_id: request_id.to_owned(),
            bytes,
        }
    }

    /// Applies `change` to a task if the rules allow it; else says why not.
    fn change(
        state: &mut StoreState,
        task_id: &str,
        change: &TaskChange<'_>,
        event_id: Option<&str>,
        apply: impl FnOnce(&mut StoredTask),
    ) -> Result<(), RecordOutcome> {
        let stored = state.tasks.get_mut(task_id);
        let facts = stored.as_ref().map(|s| s.facts(event_id));
        match stored {
            Some(stored) if facts.as_ref().is_some_and(|f| change.allowed(f)) => {
                apply(stored);
                Ok(())
            }
            _ => Err(change.refusal(facts.as_ref()).into()),
        }
    }
}

impl MemoryStore {
    /// A result for a task its run cancelled first, kept on it as late.
    fn record_late(state: &mut StoreState, result: &TaskResult) -> RecordOutcome {
        let late = TaskChange::RecordLate {
            run_id: &result.run_id,
        };
        let kept = Self::change(
            state,
            &result.task_id,
            &late,
            Some(crate::rules::LATE_RESULT),
            |stored| {
                stored
                    .seen_events
                    .insert(crate::rules::LATE_RESULT.to_owned());
                let task = &mut stored.task;
                task.instance_id = Some(result.instance_id.clone());
                task.attempts = result.attempts;
                task.started_at = Some(result.started_at);
                task.finished_at = Some(result.finished_at);
                task.duration_ms = Some(result.duration_ms());
                match &result.outcome {
                    TaskOutcome::Done { result, summary } => {
                        task.result = Some(result.clone());
                        task.summary = Some(summary.clone());
                    }
                    TaskOutcome::Failed { error } => task.last_error = Some(error.clone()),
                }
            },
        );
        match kept {
            Ok(()) => {
                bump(state, &result.run_id, |run| run.late += 1);
                RecordOutcome::Late
            }
            Err(outcome) => outcome,
        }
    }
}

fn bump(state: &mut StoreState, run_id: &str, counter: impl FnOnce(&mut Run)) {
    if let Some(run) = state.runs.get_mut(run_id) {
        counter(run);
    }
}

/// OPEN → `to`, at `now`; `false` for a run that is not open.
fn end_open_run(state: &mut StoreState, run_id: &str, to: RunState, now: DateTime<Utc>) -> bool {
    let Some(run) = state
        .runs
        .get_mut(run_id)
        .filter(|r| r.state == RunState::Open)
    else {
        return false;
    };
    run.state = to;
    run.finished_at = Some(now);
    true
}

/// A run's counters of one kernel, added when first moved.
fn kernel_stats<'a>(run: &'a mut Run, kernel: &str) -> &'a mut crate::model::KernelStats {
    let at = match run.kernels.iter().position(|k| k.kernel == kernel) {
        Some(at) => at,
        None => {
            run.kernels.push(crate::model::KernelStats {
                kernel: kernel.to_owned(),
                ..Default::default()
            });
            run.kernels.sort_by(|a, b| a.kernel.cmp(&b.kernel));
            run.kernels
                .iter()
                .position(|k| k.kernel == kernel)
                .unwrap_or(0)
        }
    };
    &mut run.kernels[at]
}

#[async_trait]
impl TaskWriter for MemoryStore {
    async fn stage(
        &self,
        request_id: &str,
        tasks: &[NewTask],
    ) -> Result<Vec<InsertOutcome>, Error> {
        network().await;
        self.faults.check("stage")?;
        let mut state = lock(&self.state);
        let now = Utc::now();
        Ok(tasks
            .iter()
            .map(|task| match state.tasks.get(&task.id) {
                Some(existing)
                    if task.idempotency.is_some()
                        && !(existing.task.status == TaskStatus::Staged
                            && staged_abandoned(existing.task.created_at, now)) =>
                {
                    InsertOutcome::Exists {
                        request_digest: existing.task.request_digest.clone(),
                        staged_by: (existing.task.status == TaskStatus::Staged)
                            .then(|| existing.request_id.clone()),
                    }
                }
                _ => {
                    state
                        .tasks
                        .insert(task.id.clone(), self.stored(task, request_id));
                    InsertOutcome::Inserted
                }
            })
            .collect())
    }

    async fn commit(&self, request_id: &str, tasks: &[NewTask]) -> Result<(), Error> {
        network().await;
        self.faults.check("commit")?;
        let mut state = lock(&self.state);
        for task in tasks {
            if let Some(stored) = state.tasks.get_mut(&task.id)
                && stored.request_id == request_id
                && stored.task.status == TaskStatus::Staged
            {
                stored.task.status = TaskStatus::Pending;
                let entry = (stored.shard, pending_position(&stored.task));
                state.pending_index.insert(entry, task.id.clone());
            }
        }
        Ok(())
    }

    async fn abort(&self, request_id: &str, task_ids: &[String]) -> Result<(), Error> {
        network().await;
        self.faults.check("abort")?;
        let mut state = lock(&self.state);
        for id in task_ids {
            // Only what this request wrote and no dispatcher has queued yet.
            if state.tasks.get(id).is_some_and(|t| {
                t.request_id == request_id
                    && matches!(t.task.status, TaskStatus::Staged | TaskStatus::Pending)
            }) {
                state.tasks.remove(id);
            }
        }
        Ok(())
    }
}

#[async_trait]
impl TaskReader for MemoryStore {
    async fn task(&self, task_id: &str) -> Result<Option<Task>, Error> {
        network().await;
        Ok(lock(&self.state)
            .tasks
            .get(task_id)
            .filter(|t| t.task.status != TaskStatus::Staged)
            .map(|t| t.task.clone()))
    }

    async fn tasks(&self, task_ids: &[String]) -> Result<Vec<Task>, Error> {
        network().await;
        let state = lock(&self.state);
        Ok(task_ids
            .iter()
            .filter_map(|id| state.tasks.get(id).map(|t| t.task.clone()))
            .collect())
    }

    async fn run_tasks_page(
        &self,
        run_id: &str,
        limit: usize,
        after: Option<&Cursor>,
    ) -> Result<Page<Task>, Error> {
        network().await;
        let after = cursor_field(after, "task_id")?;
        let state = lock(&self.state);
        let tasks: Vec<Task> = state
            .tasks
            .values()
            .filter(|t| t.task.run_id.as_deref() == Some(run_id))
            .filter(|t| after.as_ref().is_none_or(|after| t.task.id > *after))
            .map(|t| t.task.clone())
            .collect();
        Ok(page_of(tasks, limit, |task| {
            [
                ("pk", format!("TASK#{}", task.id)),
                ("sk", "TASK".to_owned()),
                ("run_id", run_id.to_owned()),
                ("task_id", task.id.clone()),
            ]
        }))
    }
}

#[async_trait]
impl PendingTasks for MemoryStore {
    async fn pending(
        &self,
        shard: u32,
        limit: usize,
        after: Option<&Cursor>,
    ) -> Result<Page<PendingTask>, Error> {
        network().await;
        self.faults.check("pending")?;
        let mut state = lock(&self.state);
        let from = after.map_or_else(String::new, |cursor| cursor.0.clone());
        let mut items: Vec<(String, PendingTask)> = Vec::new();
        let mut bytes = 0;
        let mut next = None;
        let mut stale = Vec::new();
        for ((_, position), id) in state
            .pending_index
            .range((shard, from.clone())..(shard + 1, String::new()))
        {
            if after.is_some() && *position <= from {
                continue;
            }
            let listed = state.tasks.get(id).filter(|t| {
                t.task.status == TaskStatus::Pending
                    && t.shard == shard
                    && pending_position(&t.task) == *position
            });
            let Some(stored) = listed else {
                stale.push((shard, position.clone()));
                continue;
            };
            if items.len() == limit || bytes + stored.bytes > QUERY_PAGE_BYTES {
                next = items.last().map(|last| Cursor(last.0.clone()));
                break;
            }
            bytes += stored.bytes;
            items.push((
                position.clone(),
                PendingTask {
                    id: stored.task.id.clone(),
                    account: stored.task.account.clone(),
                    kernel: stored.task.kernel.clone(),
                    created_at: stored.task.created_at,
                    payload: stored
                        .task
                        .payload
                        .clone()
                        .unwrap_or_else(|| crate::Blob::json(&serde_json::Value::Null)),
                },
            ));
        }
        for entry in stale {
            state.pending_index.remove(&entry);
        }
        Ok(Page {
            items: items.into_iter().map(|(_, task)| task).collect(),
            next,
        })
    }

    async fn mark_queued(&self, run_id: &str, tasks: &[Sent]) -> Result<Vec<String>, Error> {
        network().await;
        self.faults.check("mark_queued")?;
        let mut state = lock(&self.state);
        let changed: Vec<&Sent> = tasks
            .iter()
            .filter(|sent| {
                Self::change(
                    &mut state,
                    &sent.task_id,
                    &TaskChange::Queue,
                    None,
                    |stored| {
                        stored.task.status = TaskStatus::Queued;
                        stored.task.run_id = Some(run_id.to_owned());
                    },
                )
                .is_ok()
            })
            .collect();
        bump(&mut state, run_id, |run| {
            run.queued += changed.len() as u64;
            for sent in &changed {
                kernel_stats(run, &sent.kernel).queued += 1;
            }
        });
        Ok(changed.into_iter().map(|s| s.task_id.clone()).collect())
    }

    async fn cancel_tasks(
        &self,
        run_id: &str,
        task_ids: &[String],
        now: DateTime<Utc>,
    ) -> Result<Vec<String>, Error> {
        network().await;
        self.faults.check("cancel_tasks")?;
        let mut state = lock(&self.state);
        let cancel = TaskChange::Cancel { run_id };
        let changed: Vec<String> = task_ids
            .iter()
            .filter(|id| {
                Self::change(&mut state, id, &cancel, None, |stored| {
                    stored.task.status = TaskStatus::Cancelled;
                    stored.task.run_id = Some(run_id.to_owned());
                    stored.task.finished_at = Some(now);
                })
                .is_ok()
            })
            .cloned()
            .collect();
        bump(&mut state, run_id, |run| {
            run.cancelled += changed.len() as u64
        });
        Ok(changed)
    }
}

#[async_trait]
impl ResultRecorder for MemoryStore {
    async fn record_results(&self, results: &[TaskResult]) -> Result<Vec<RecordOutcome>, Error> {
        network().await;
        self.faults.check("record_results")?;
        let mut state = lock(&self.state);
        Ok(results
            .iter()
            .map(|result| {
                let finish = TaskChange::Finish {
                    run_id: &result.run_id,
                };
                let result_bytes = match &result.outcome {
                    TaskOutcome::Done { result, .. } => result.inline_bytes(),
                    TaskOutcome::Failed { .. } => 0,
                };
                let too_large = state
                    .tasks
                    .get(&result.task_id)
                    .is_some_and(|stored| stored.bytes + result_bytes > ITEM_LIMIT);
                let done = !too_large && matches!(result.outcome, TaskOutcome::Done { .. });
                let recorded = Self::change(&mut state, &result.task_id, &finish, None, |stored| {
                    let task = &mut stored.task;
                    task.instance_id = Some(result.instance_id.clone());
                    task.attempts = result.attempts;
                    task.started_at = Some(result.started_at);
                    task.finished_at = Some(result.finished_at);
                    task.duration_ms = Some(result.duration_ms());
                    match &result.outcome {
                        _ if too_large => {
                            task.status = TaskStatus::Failed;
                            task.last_error = Some(RESULT_TOO_LARGE.to_owned());
                        }
                        TaskOutcome::Done { result, summary } => {
                            task.status = TaskStatus::Done;
                            task.result = Some(result.clone());
                            task.summary = Some(summary.clone());
                        }
                        TaskOutcome::Failed { error } => {
                            task.status = TaskStatus::Failed;
                            task.last_error = Some(error.clone());
                        }
                    }
                });
                match recorded {
                    Ok(()) => {
                        bump(&mut state, &result.run_id, |run| {
                            if done {
                                run.done += 1
                            } else {
                                run.failed += 1
                            }
                            if let Some(instance) = run
                                .instances
                                .iter_mut()
                                .find(|i| i.id == result.instance_id)
                            {
                                instance.tasks += 1;
                                instance.busy_ms += result.duration_ms();
                            }
                            if !result.kernel.is_empty() {
                                let kernel = kernel_stats(run, &result.kernel);
                                kernel.ended += 1;
                                kernel.busy_ms += result.duration_ms();
                            }
                        });
                        if too_large {
                            RecordOutcome::FailedInstead(RESULT_TOO_LARGE.to_owned())
                        } else {
                            RecordOutcome::Recorded
                        }
                    }
                    Err(RecordOutcome::CancelledFirst) => Self::record_late(&mut state, result),
                    Err(outcome) => outcome,
                }
            })
            .collect())
    }

    async fn record_attempt(
        &self,
        event: &AttemptEvent,
        kind: AttemptKind,
    ) -> Result<RecordOutcome, Error> {
        network().await;
        self.faults.check("record_attempt")?;
        let mut state = lock(&self.state);
        let change = TaskChange::CountAttempt {
            run_id: &event.run_id,
        };
        let counted = Self::change(
            &mut state,
            &event.task_id,
            &change,
            Some(&event.event_id),
            |stored| {
                stored.seen_events.insert(event.event_id.clone());
                match kind {
                    AttemptKind::Failed => stored.task.failed_attempts += 1,
                    AttemptKind::Interrupted => stored.task.interruptions += 1,
                }
                if let Some(error) = &event.error {
                    stored.task.last_error = Some(error.clone());
                }
                stored.task.attempt_log.push(AttemptRecord {
                    instance_id: event.instance_id.clone(),
                    started_at: event.started_at,
                    ended_at: event.at,
                    outcome: kind,
                });
            },
        );
        Ok(counted.map_or_else(|outcome| outcome, |()| RecordOutcome::Recorded))
    }

    async fn add_usage(&self, run_id: &str, usage: &Usage) -> Result<(), Error> {
        network().await;
        self.faults.check("add_usage")?;
        bump(&mut lock(&self.state), run_id, |run| run.usage.add(usage));
        Ok(())
    }

    async fn fail_task(
        &self,
        task_id: &str,
        run_id: &str,
        at: DateTime<Utc>,
        reason: Option<&str>,
    ) -> Result<RecordOutcome, Error> {
        network().await;
        self.faults.check("fail_task")?;
        let mut state = lock(&self.state);
        let finish = TaskChange::Finish { run_id };
        let failed = Self::change(&mut state, task_id, &finish, None, |stored| {
            stored.task.status = TaskStatus::Failed;
            stored.task.finished_at = Some(at);
            match reason {
                Some(reason) => stored.task.last_error = Some(reason.to_owned()),
                None => {
                    stored.task.last_error.get_or_insert_with(|| {
                        "no attempt succeeded within the queue's delivery limit".to_owned()
                    });
                }
            }
        });
        match failed {
            Ok(()) => {
                bump(&mut state, run_id, |run| run.failed += 1);
                Ok(RecordOutcome::Recorded)
            }
            Err(outcome) => Ok(outcome),
        }
    }
}

#[async_trait]
impl RunReader for MemoryStore {
    async fn run(&self, run_id: &str) -> Result<Option<Run>, Error> {
        network().await;
        Ok(lock(&self.state).runs.get(run_id).cloned())
    }
}

#[async_trait]
impl RunStore for MemoryStore {
    async fn current_run(&self) -> Result<Option<Run>, Error> {
        network().await;
        let state = lock(&self.state);
        Ok(state
            .current
            .as_ref()
            .and_then(|id| state.runs.get(id))
            .cloned())
    }

    async fn runs_page(&self, limit: usize, after: Option<&Cursor>) -> Result<Page<Run>, Error> {
        network().await;
        let key = |run: &Run| format!("{} {}", timestamp(run.started_at), run.id);
        let after = match (
            cursor_field(after, "started_at")?,
            cursor_field(after, "pk")?,
        ) {
            (Some(started_at), Some(pk)) => {
                Some(format!("{started_at} {}", pk.trim_start_matches("RUN#")))
            }
            _ => None,
        };
        let mut runs: Vec<Run> = lock(&self.state)
            .runs
            .values()
            .filter(|run| after.as_ref().is_none_or(|after| key(run) < *after))
            .cloned()
            .collect();
        runs.sort_by_key(|run| std::cmp::Reverse(key(run)));
        Ok(page_of(runs, limit, |run| {
            [
                ("pk", format!("RUN#{}", run.id)),
                ("sk", "RUN".to_owned()),
                ("run_list", "RUN".to_owned()),
                ("started_at", timestamp(run.started_at)),
            ]
        }))
    }

    async fn open_run(
        &self,
        new_run_id: &str,
        now: DateTime<Utc>,
        deadline: DateTime<Utc>,
    ) -> Result<(Run, bool), Error> {
        network().await;
        let mut state = lock(&self.state);
        if let Some(run) = state.current.as_ref().and_then(|id| state.runs.get(id)) {
            return Ok((run.clone(), false));
        }
        let run = Run {
            id: new_run_id.to_owned(),
            state: RunState::Open,
            started_at: now,
            deadline,
            finished_at: None,
            queued: 0,
            done: 0,
            failed: 0,
            cancelled: 0,
            late: 0,
            instances: Vec::new(),
            fleet_requests: 0,
            waiting: false,
            spot_prices: Vec::new(),
            usage: Usage::default(),
            kernels: Vec::new(),
            plan: None,
        };
        state.runs.insert(run.id.clone(), run.clone());
        state.current = Some(run.id.clone());
        Ok((run, true))
    }

    async fn acquire_lease(
        &self,
        run_id: &str,
        owner: &str,
        now: DateTime<Utc>,
        ttl: Duration,
    ) -> Result<bool, Error> {
        network().await;
        let mut state = lock(&self.state);
        let open = state
            .runs
            .get(run_id)
            .is_some_and(|r| r.state == RunState::Open);
        let free = state
            .leases
            .get(run_id)
            .is_none_or(|(holder, until)| *until < now || holder == owner);
        if !(open && free) {
            return Ok(false);
        }
        let until = now + chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::MAX);
        state
            .leases
            .insert(run_id.to_owned(), (owner.to_owned(), until));
        Ok(true)
    }

    async fn release_lease(
        &self,
        run_id: &str,
        owner: &str,
        waiting: bool,
        plan: Option<&FleetPlan>,
    ) -> Result<(), Error> {
        network().await;
        let mut state = lock(&self.state);
        if state.leases.get(run_id).is_some_and(|(o, _)| o == owner) {
            state.leases.remove(run_id);
            bump(&mut state, run_id, |run| {
                run.waiting = waiting;
                if let Some(plan) = plan {
                    run.plan = Some(plan.clone());
                }
            });
        }
        Ok(())
    }

    async fn record_fleet(
        &self,
        run_id: &str,
        request_number: u32,
        launched: &[Launched],
        prices: &[SpotPrice],
    ) -> Result<bool, Error> {
        network().await;
        let mut state = lock(&self.state);
        let Some(run) = state.runs.get_mut(run_id) else {
            return Ok(false);
        };
        if run.fleet_requests != request_number {
            return Ok(run.records_fleet_request(request_number, launched));
        }
        run.fleet_requests += 1;
        run.instances.extend(launched.iter().cloned());
        for price in prices {
            run.spot_prices
                .retain(|p| (&p.instance_type, &p.zone) != (&price.instance_type, &price.zone));
            run.spot_prices.push(price.clone());
        }
        Ok(true)
    }

    async fn record_instances(&self, run_id: &str, seen: &[InstanceSeen]) -> Result<(), Error> {
        network().await;
        let mut state = lock(&self.state);
        let Some(run) = state.runs.get_mut(run_id) else {
            return Ok(());
        };
        for sighting in seen {
            if let Some(instance) = run.instances.iter_mut().find(|i| i.id == sighting.id) {
                instance.zone = instance.zone.take().or_else(|| sighting.zone.clone());
                instance.ended_at = instance.ended_at.or(sighting.ended_at);
            }
        }
        Ok(())
    }

    async fn cancel_run(&self, run_id: &str, now: DateTime<Utc>) -> Result<bool, Error> {
        network().await;
        Ok(end_open_run(
            &mut lock(&self.state),
            run_id,
            RunState::Cancelled,
            now,
        ))
    }

    async fn release_run(&self, run_id: &str) -> Result<(), Error> {
        network().await;
        let mut state = lock(&self.state);
        if state.current.as_deref() == Some(run_id) {
            state.current = None;
        }
        Ok(())
    }

    async fn close_run(&self, run_id: &str, now: DateTime<Utc>) -> Result<bool, Error> {
        network().await;
        let mut state = lock(&self.state);
        if state.current.as_deref() != Some(run_id)
            || !end_open_run(&mut state, run_id, RunState::Finished, now)
        {
            return Ok(false);
        }
        state.current = None;
        Ok(true)
    }
}

/// A queue in memory. Received messages stay in flight until deleted or
/// released; `redeliver_in_flight` plays the visibility timeout ending.
/// Batches over SQS's limits are refused as SQS refuses them.
#[derive(Debug, Default)]
pub struct MemoryQueue {
    state: Mutex<QueueState>,
}

#[derive(Debug, Default)]
struct QueueState {
    next_id: u64,
    visible: VecDeque<(String, String, u32)>,
    in_flight: BTreeMap<String, (String, String, u32)>,
    sent: Vec<String>,
    send_calls: usize,
    delete_calls: usize,
    /// How many messages each receive that found any took.
    receipts: Vec<usize>,
    visibility_changes: Vec<(String, Duration)>,
}

impl MemoryQueue {
    /// Bodies of every message ever sent, in order.
    pub fn sent(&self) -> Vec<String> {
        lock(&self.state).sent.clone()
    }

    pub fn send_calls(&self) -> usize {
        lock(&self.state).send_calls
    }

    pub fn delete_calls(&self) -> usize {
        lock(&self.state).delete_calls
    }

    /// How many messages each receive that found any took, in order.
    pub fn receipts(&self) -> Vec<usize> {
        lock(&self.state).receipts.clone()
    }

    pub fn visible(&self) -> usize {
        lock(&self.state).visible.len()
    }

    pub fn in_flight(&self) -> usize {
        lock(&self.state).in_flight.len()
    }

    pub fn visibility_changes(&self) -> Vec<(String, Duration)> {
        lock(&self.state).visibility_changes.clone()
    }

    pub fn redeliver_in_flight(&self) {
        let mut state = lock(&self.state);
        let in_flight = std::mem::take(&mut state.in_flight);
        state.visible.extend(in_flight.into_values());
    }

    pub fn push(&self, body: &str) {
        let mut state = lock(&self.state);
        state.next_id += 1;
        let id = format!("m{}", state.next_id);
        state.visible.push_back((id, body.to_owned(), 0));
        state.sent.push(body.to_owned());
    }
}

/// A batch over SQS's limits, refused as SQS refuses it (for queues that
/// stand in for SQS).
pub fn refuse_oversized_batch(messages: &[Outgoing]) -> Result<(), Error> {
    let bytes: usize = messages.iter().map(|m| m.body.len()).sum();
    if messages.len() > SQS_BATCH_ENTRIES || bytes > SQS_MESSAGE_LIMIT {
        return Err(Error::permanent(
            "SendMessageBatch",
            format!(
                "BatchRequestTooLong: {} entries, {bytes} bytes",
                messages.len()
            ),
        ));
    }
    Ok(())
}

#[async_trait]
impl Queue for MemoryQueue {
    async fn send_batch(&self, messages: &[Outgoing]) -> Result<Vec<String>, Error> {
        network().await;
        refuse_oversized_batch(messages)?;
        lock(&self.state).send_calls += 1;
        for message in messages {
            self.push(&message.body);
        }
        Ok(Vec::new())
    }

    async fn receive(&self, max: u32, wait: Duration) -> Result<Vec<Received>, Error> {
        network().await;
        if self.visible() == 0 {
            // A long poll on an empty queue waits (briefly, in tests).
            tokio::time::sleep(wait.min(Duration::from_millis(20))).await;
        }
        let mut state = lock(&self.state);
        let mut received = Vec::new();
        while received.len() < max as usize {
            let Some((id, body, count)) = state.visible.pop_front() else {
                break;
            };
            let receipt = format!("{id}#{}", count + 1);
            state
                .in_flight
                .insert(receipt.clone(), (id.clone(), body.clone(), count + 1));
            received.push(Received {
                message_id: id,
                receipt,
                receive_count: count + 1,
                body,
            });
        }
        if !received.is_empty() {
            state.receipts.push(received.len());
        }
        Ok(received)
    }

    async fn delete_batch(&self, receipts: &[String]) -> Result<Vec<String>, Error> {
        network().await;
        let mut state = lock(&self.state);
        state.delete_calls += 1;
        for receipt in receipts {
            state.in_flight.remove(receipt);
        }
        Ok(Vec::new())
    }

    async fn change_visibility_batch(
        &self,
        receipts: &[String],
        timeout: Duration,
    ) -> Result<Vec<String>, Error> {
        network().await;
        let mut state = lock(&self.state);
        for receipt in receipts {
            state.visibility_changes.push((receipt.clone(), timeout));
            if timeout.is_zero()
                && let Some(message) = state.in_flight.remove(receipt)
            {
                state.visible.push_back(message);
            }
        }
        Ok(Vec::new())
    }

    async fn visibility_timeout(&self) -> Result<Duration, Error> {
        network().await;
        Ok(Duration::from_secs(30))
    }
}

/// The payload bucket, in memory.
#[derive(Debug, Default)]
pub struct MemoryBlobs {
    objects: Mutex<BTreeMap<String, Vec<u8>>>,
    faults: Faults,
}

impl MemoryBlobs {
    pub fn keys(&self) -> Vec<String> {
        lock(&self.objects).keys().cloned().collect()
    }

    /// The next `times` calls of `operation` (a method name) fail transiently.
    pub fn inject_fault(&self, operation: &'static str, times: u32) {
        self.faults.inject(operation, times);
    }
}

#[async_trait]
impl BlobStore for MemoryBlobs {
    async fn put(&self, key: &str, bytes: Vec<u8>) -> Result<(), Error> {
        network().await;
        self.faults.check("put")?;
        lock(&self.objects).insert(key.to_owned(), bytes);
        Ok(())
    }

    async fn get(&self, key: &str) -> Result<Vec<u8>, Error> {
        network().await;
        lock(&self.objects)
            .get(key)
            .cloned()
            .ok_or_else(|| Error::permanent("GetObject", format!("NoSuchKey: {key}")))
    }

    async fn delete_many(&self, keys: &[String]) -> Result<(), Error> {
        network().await;
        self.faults.check("delete_many")?;
        let mut objects = lock(&self.objects);
        for key in keys {
            objects.remove(key);
        }
        Ok(())
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, Error> {
        network().await;
        Ok(lock(&self.objects)
            .keys()
            .filter(|key| key.starts_with(prefix))
            .cloned()
            .collect())
    }
}

/// EC2 capacity in memory: types with their slots, in order of
/// preference; every launch succeeds unless spot is denied for a type;
/// requests are kept. Its clock is the wall clock unless set.
#[derive(Debug)]
pub struct FakeFleet {
    state: Mutex<FleetState>,
}

impl Default for FakeFleet {
    fn default() -> Self {
        Self::with_types(&[("c7g.large", 2)])
    }
}

#[derive(Debug)]
struct FakeInstance {
    run_id: String,
    launched_at: DateTime<Utc>,
    /// `None` while it runs.
    ended_at: Option<DateTime<Utc>>,
}

impl FakeInstance {
    fn end(&mut self, now: DateTime<Utc>) {
        self.ended_at = self.ended_at.or(Some(now));
    }
}

/// The zone every fake instance runs in, and the spot price there.
pub const FAKE_ZONE: &str = "us-east-1a";
pub const FAKE_SPOT_PRICE: f64 = 0.03;

#[derive(Debug, Default)]
struct FleetState {
    types: Vec<(String, u32)>,
    /// Spot capacity of a type is denied until then.
    spot_denied_until: BTreeMap<String, DateTime<Utc>>,
    clock: Option<DateTime<Utc>>,
    /// The next launch is made but its answer lost.
    lose_next_answer: bool,
    next: u32,
    instances: BTreeMap<String, FakeInstance>,
    /// Each request's token: what it asked, what it launched.
    tokens: BTreeMap<String, ((u32, Lifecycle), Vec<Launched>)>,
    terminated: Vec<String>,
}

impl FakeFleet {
    /// A fleet of these types and their slots, the first preferred.
    pub fn with_types(types: &[(&str, u32)]) -> Self {
        Self {
            state: Mutex::new(FleetState {
                types: types.iter().map(|(t, s)| ((*t).to_owned(), *s)).collect(),
                ..FleetState::default()
            }),
        }
    }

    /// Spot capacity of `instance_type` is denied until `until`.
    pub fn deny_spot(&self, instance_type: &str, until: DateTime<Utc>) {
        lock(&self.state)
            .spot_denied_until
            .insert(instance_type.to_owned(), until);
    }

    /// The fleet's clock from now on (launch times, ends).
    pub fn set_clock(&self, now: DateTime<Utc>) {
        lock(&self.state).clock = Some(now);
    }

    pub fn launches(&self) -> usize {
        lock(&self.state).tokens.len()
    }

    /// An instance dies (spot reclaim, or its worker stopped it).
    pub fn lose(&self, instance_id: &str) {
        let mut state = lock(&self.state);
        let now = state.clock.unwrap_or_else(Utc::now);
        if let Some(instance) = state.instances.get_mut(instance_id) {
            instance.end(now);
        }
    }

    /// An instance EC2 does not show yet (`DescribeInstances` lags).
    pub fn hide(&self, instance_id: &str) {
        lock(&self.state).instances.remove(instance_id);
    }

    pub fn active(&self) -> Vec<String> {
        lock(&self.state)
            .instances
            .iter()
            .filter(|(_, instance)| instance.ended_at.is_none())
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// The next launch happens, but its caller sees an error.
    pub fn lose_next_answer(&self) {
        lock(&self.state).lose_next_answer = true;
    }

    /// Instances the dispatcher asked to terminate.
    pub fn terminated(&self) -> Vec<String> {
        lock(&self.state).terminated.clone()
    }

    /// An instance that a run launched at `at` (for tests of strays).
    pub fn add_running(&self, instance_id: &str, run_id: &str, at: DateTime<Utc>) {
        lock(&self.state).instances.insert(
            instance_id.to_owned(),
            FakeInstance {
                run_id: run_id.to_owned(),
                launched_at: at,
                ended_at: None,
            },
        );
    }
}

#[async_trait]
impl Fleet for FakeFleet {
    async fn launch(
        &self,
        run_id: &str,
        slots: u32,
        lifecycle: Lifecycle,
        token: &str,
    ) -> Result<Vec<Launched>, Error> {
        network().await;
        let mut state = lock(&self.state);
        if let Some((request, launched)) = state.tokens.get(token) {
            // EC2 replays a token only for the same request.
            if *request != (slots, lifecycle) {
                return Err(Error::permanent(
                    "CreateFleet",
                    "IdempotentParameterMismatch",
                ));
            }
            return Ok(launched.clone());
        }
        let now = state.clock.unwrap_or_else(Utc::now);
        let offered: Vec<(String, u32)> = state
            .types
            .iter()
            .filter(|(t, _)| {
                lifecycle == Lifecycle::OnDemand
                    || state
                        .spot_denied_until
                        .get(t)
                        .is_none_or(|until| *until <= now)
            })
            .cloned()
            .collect();
        let mut launched = Vec::new();
        let mut filled = 0;
        // Like EC2, fill the target with the preferred type offered, and
        // overshoot rather than fall short.
        if let Some((instance_type, weight)) = offered.first() {
            while filled < slots {
                state.next += 1;
                let id = format!("i-{:08x}", state.next);
                state.instances.insert(
                    id.clone(),
                    FakeInstance {
                        run_id: run_id.to_owned(),
                        launched_at: now,
                        ended_at: None,
                    },
                );
                launched.push(Launched {
                    slots: *weight,
                    ..Launched::new(
                        id,
                        now,
                        Some(instance_type.clone()),
                        Some(lifecycle.as_str().to_owned()),
                    )
                });
                filled += weight.max(&1);
            }
        }
        state
            .tokens
            .insert(token.to_owned(), ((slots, lifecycle), launched.clone()));
        if std::mem::take(&mut state.lose_next_answer) {
            return Err(Error::transient("CreateFleet", "the answer was lost"));
        }
        Ok(launched)
    }

    async fn instances(&self) -> Result<Vec<WorkerInstance>, Error> {
        network().await;
        Ok(lock(&self.state)
            .instances
            .iter()
            .map(|(id, instance)| WorkerInstance {
                id: id.clone(),
                run_id: Some(instance.run_id.clone()),
                launched_at: instance.launched_at,
                alive: instance.ended_at.is_none(),
                zone: Some(FAKE_ZONE.to_owned()),
                ended_at: instance.ended_at,
            })
            .collect())
    }

    async fn terminate(&self, instance_ids: &[String]) -> Result<(), Error> {
        network().await;
        let mut state = lock(&self.state);
        let now = state.clock.unwrap_or_else(Utc::now);
        for id in instance_ids {
            if let Some(instance) = state.instances.get_mut(id) {
                instance.end(now);
            }
            state.terminated.push(id.clone());
        }
        Ok(())
    }

    async fn spot_prices(
        &self,
        instance_types: &[String],
        now: DateTime<Utc>,
    ) -> Result<Vec<SpotPrice>, Error> {
        network().await;
        Ok(instance_types
            .iter()
            .map(|instance_type| SpotPrice {
                instance_type: instance_type.clone(),
                zone: FAKE_ZONE.to_owned(),
                usd_per_hour: FAKE_SPOT_PRICE,
                read_at: now,
            })
            .collect())
    }
}

/// A source of usage that hands out what it was given.
#[derive(Debug, Default)]
pub struct GivenUsage(Mutex<Usage>);

impl GivenUsage {
    pub fn give(&self, usage: &Usage) {
        lock(&self.0).add(usage);
    }
}

impl crate::ports::UsageSource for GivenUsage {
    fn take(&self) -> Usage {
        std::mem::take(&mut *lock(&self.0))
    }
}

/// The first `limit` of `items` (in order), and the cursor after the last
/// when more follow: a JSON map of strings, as the table's cursors are.
fn page_of<T, const N: usize>(
    mut items: Vec<T>,
    limit: usize,
    cursor: impl Fn(&T) -> [(&'static str, String); N],
) -> Page<T> {
    let limit = limit.max(1);
    let more = items.len() > limit;
    items.truncate(limit);
    let next = more
        .then(|| items.last())
        .flatten()
        .map(|item| Cursor(serde_json::json!(BTreeMap::from(cursor(item))).to_string()));
    Page { items, next }
}

/// A field of a cursor `page_of` made.
fn cursor_field(cursor: Option<&Cursor>, field: &str) -> Result<Option<String>, Error> {
    let Some(cursor) = cursor else {
        return Ok(None);
    };
    let fields: BTreeMap<String, String> =
        serde_json::from_str(&cursor.0).map_err(|e| Error::malformed("cursor", e))?;
    fields
        .get(field)
        .cloned()
        .map(Some)
        .ok_or_else(|| Error::malformed("cursor", format!("no {field}")))
}

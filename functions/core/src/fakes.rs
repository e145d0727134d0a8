//! In-memory implementations of every port, with the same conditional
//! semantics as the AWS adapters, for the unit tests of the crates that use
//! them.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::Error;
use crate::message::{AttemptEvent, TaskOutcome, TaskResult};
use crate::model::{NewTask, PendingTask, Run, RunState, Task, TaskStatus};
use crate::ports::{
    AttemptKind, BlobStore, Fleet, InsertOutcome, InstanceControl, Outgoing, PendingTasks, Queue,
    Received, RecordOutcome, ResultRecorder, RunStore, TaskReader, TaskWriter,
};

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[derive(Debug, Default)]
struct StoreState {
    tasks: BTreeMap<String, StoredTask>,
    runs: BTreeMap<String, Run>,
    current: Option<String>,
    leases: BTreeMap<String, (String, DateTime<Utc>)>,
}

#[derive(Debug, Clone)]
struct StoredTask {
    task: Task,
    shard: u32,
    seen_events: HashSet<String>,
}

/// The table, in memory.
#[derive(Debug)]
pub struct MemoryStore {
    state: Mutex<StoreState>,
    shards: u32,
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
        }
    }

    pub fn shards(&self) -> u32 {
        self.shards
    }

    pub fn all_tasks(&self) -> Vec<Task> {
        lock(&self.state)
            .tasks
            .values()
            .map(|t| t.task.clone())
            .collect()
    }

    fn stored(&self, task: &NewTask) -> StoredTask {
        StoredTask {
            task: Task {
                id: task.id.clone(),
                account: task.account.clone(),
                kernel: task.kernel.clone(),
                status: TaskStatus::Pending,
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
                request_digest: task.idempotency.as_ref().map(|i| i.request_digest.clone()),
            },
            shard: task.pending_shard(self.shards),
            seen_events: HashSet::new(),
        }
    }
}

fn classify(stored: Option<&StoredTask>, run_id: &str) -> RecordOutcome {
    match stored {
        None => RecordOutcome::Unknown,
        Some(s) if s.task.status == TaskStatus::Pending => RecordOutcome::NotYetQueued,
        Some(s) if s.task.run_id.as_deref() != Some(run_id) => RecordOutcome::Unknown,
        Some(_) => RecordOutcome::Duplicate,
    }
}

#[async_trait]
impl TaskWriter for MemoryStore {
    async fn insert_tasks(&self, tasks: &[NewTask]) -> Result<(), Error> {
        let mut state = lock(&self.state);
        for task in tasks {
            state.tasks.insert(task.id.clone(), self.stored(task));
        }
        Ok(())
    }

    async fn insert_tasks_once(&self, tasks: &[NewTask]) -> Result<Vec<InsertOutcome>, Error> {
        let mut state = lock(&self.state);
        Ok(tasks
            .iter()
            .map(|task| match state.tasks.get(&task.id) {
                Some(existing) => InsertOutcome::Exists {
                    request_digest: existing.task.request_digest.clone(),
                },
                None => {
                    state.tasks.insert(task.id.clone(), self.stored(task));
                    InsertOutcome::Inserted
                }
            })
            .collect())
    }
}

#[async_trait]
impl TaskReader for MemoryStore {
    async fn task(&self, task_id: &str) -> Result<Option<Task>, Error> {
        Ok(lock(&self.state).tasks.get(task_id).map(|t| t.task.clone()))
    }

    async fn tasks(&self, task_ids: &[String]) -> Result<Vec<Task>, Error> {
        let state = lock(&self.state);
        Ok(task_ids
            .iter()
            .filter_map(|id| state.tasks.get(id).map(|t| t.task.clone()))
            .collect())
    }

    async fn run_tasks(&self, run_id: &str) -> Result<Vec<Task>, Error> {
        Ok(lock(&self.state)
            .tasks
            .values()
            .filter(|t| t.task.run_id.as_deref() == Some(run_id))
            .map(|t| t.task.clone())
            .collect())
    }
}

#[async_trait]
impl PendingTasks for MemoryStore {
    async fn pending(&self, shard: u32, limit: usize) -> Result<Vec<PendingTask>, Error> {
        let state = lock(&self.state);
        let mut pending: Vec<&StoredTask> = state
            .tasks
            .values()
            .filter(|t| t.task.status == TaskStatus::Pending && t.shard == shard)
            .collect();
        pending.sort_by_key(|t| t.task.created_at);
        Ok(pending
            .into_iter()
            .take(limit)
            .map(|t| PendingTask {
                id: t.task.id.clone(),
                account: t.task.account.clone(),
                kernel: t.task.kernel.clone(),
                payload: t
                    .task
                    .payload
                    .clone()
                    .unwrap_or(crate::Blob::Inline(serde_json::Value::Null)),
            })
            .collect())
    }

    async fn mark_queued(&self, run_id: &str, task_ids: &[String]) -> Result<Vec<String>, Error> {
        let mut state = lock(&self.state);
        let mut changed = Vec::new();
        for id in task_ids {
            if let Some(stored) = state.tasks.get_mut(id)
                && stored.task.status == TaskStatus::Pending
            {
                stored.task.status = TaskStatus::Queued;
                stored.task.run_id = Some(run_id.to_owned());
                changed.push(id.clone());
            }
        }
        if let Some(run) = state.runs.get_mut(run_id) {
            run.queued += changed.len() as u64;
        }
        Ok(changed)
    }
}

#[async_trait]
impl ResultRecorder for MemoryStore {
    async fn record_results(&self, results: &[TaskResult]) -> Result<Vec<RecordOutcome>, Error> {
        let mut state = lock(&self.state);
        let mut outcomes = Vec::new();
        for result in results {
            let stored = state.tasks.get_mut(&result.task_id);
            let recordable = stored.as_ref().is_some_and(|s| {
                s.task.status == TaskStatus::Queued
                    && s.task.run_id.as_deref() == Some(&result.run_id)
            });
            if !recordable {
                outcomes.push(classify(stored.map(|s| &*s), &result.run_id));
                continue;
            }
            let Some(stored) = stored else { continue };
            let task = &mut stored.task;
            task.instance_id = Some(result.instance_id.clone());
            task.attempts = result.attempts;
            task.started_at = Some(result.started_at);
            task.finished_at = Some(result.finished_at);
            task.duration_ms = Some(result.duration_ms());
            let done = match &result.outcome {
                TaskOutcome::Done { result, summary } => {
                    task.status = TaskStatus::Done;
                    task.result = Some(result.clone());
                    task.summary = Some(summary.clone());
                    true
                }
                TaskOutcome::Failed { error } => {
                    task.status = TaskStatus::Failed;
                    task.last_error = Some(error.clone());
                    false
                }
            };
            if let Some(run) = state.runs.get_mut(&result.run_id) {
                if done { run.done += 1 } else { run.failed += 1 }
            }
            outcomes.push(RecordOutcome::Recorded);
        }
        Ok(outcomes)
    }

    async fn record_attempt(
        &self,
        event: &AttemptEvent,
        kind: AttemptKind,
    ) -> Result<RecordOutcome, Error> {
        let mut state = lock(&self.state);
        let stored = state.tasks.get_mut(&event.task_id);
        match stored {
            Some(s)
                if s.task.status == TaskStatus::Queued
                    && s.task.run_id.as_deref() == Some(&event.run_id)
                    && !s.seen_events.contains(&event.event_id) =>
            {
                s.seen_events.insert(event.event_id.clone());
                match kind {
                    AttemptKind::Failed => s.task.failed_attempts += 1,
                    AttemptKind::Interrupted => s.task.interruptions += 1,
                }
                if let Some(error) = &event.error {
                    s.task.last_error = Some(error.clone());
                }
                Ok(RecordOutcome::Recorded)
            }
            other => Ok(classify(other.map(|s| &*s), &event.run_id)),
        }
    }

    async fn record_dead_letter(
        &self,
        task_id: &str,
        run_id: &str,
        at: DateTime<Utc>,
    ) -> Result<RecordOutcome, Error> {
        let mut state = lock(&self.state);
        let stored = state.tasks.get_mut(task_id);
        match stored {
            Some(s)
                if s.task.status == TaskStatus::Queued
                    && s.task.run_id.as_deref() == Some(run_id) =>
            {
                s.task.status = TaskStatus::Failed;
                s.task.finished_at = Some(at);
                s.task
                    .last_error
                    .get_or_insert_with(|| "no attempt succeeded".to_owned());
                if let Some(run) = state.runs.get_mut(run_id) {
                    run.failed += 1;
                }
                Ok(RecordOutcome::Recorded)
            }
            other => Ok(classify(other.map(|s| &*s), run_id)),
        }
    }
}

#[async_trait]
impl RunStore for MemoryStore {
    async fn run(&self, run_id: &str) -> Result<Option<Run>, Error> {
        Ok(lock(&self.state).runs.get(run_id).cloned())
    }

    async fn current_run(&self) -> Result<Option<Run>, Error> {
        let state = lock(&self.state);
        Ok(state
            .current
            .as_ref()
            .and_then(|id| state.runs.get(id))
            .cloned())
    }

    async fn open_run(&self, new_run_id: &str, now: DateTime<Utc>) -> Result<(Run, bool), Error> {
        let mut state = lock(&self.state);
        if let Some(run) = state.current.as_ref().and_then(|id| state.runs.get(id)) {
            return Ok((run.clone(), false));
        }
        let run = Run {
            id: new_run_id.to_owned(),
            state: RunState::Open,
            started_at: now,
            finished_at: None,
            queued: 0,
            done: 0,
            failed: 0,
            instances: Vec::new(),
            fleet_requests: 0,
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
        let mut state = lock(&self.state);
        let open = state
            .runs
            .get(run_id)
            .is_some_and(|r| r.state == RunState::Open);
        let free = state
            .leases
            .get(run_id)
            .is_none_or(|(_, until)| *until < now);
        if !(open && free) {
            return Ok(false);
        }
        let until = now + chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::MAX);
        state
            .leases
            .insert(run_id.to_owned(), (owner.to_owned(), until));
        Ok(true)
    }

    async fn release_lease(&self, run_id: &str, owner: &str) -> Result<(), Error> {
        let mut state = lock(&self.state);
        if state.leases.get(run_id).is_some_and(|(o, _)| o == owner) {
            state.leases.remove(run_id);
        }
        Ok(())
    }

    async fn record_fleet(
        &self,
        run_id: &str,
        request_number: u32,
        instance_ids: &[String],
    ) -> Result<(), Error> {
        let mut state = lock(&self.state);
        let run = state
            .runs
            .get_mut(run_id)
            .filter(|r| r.fleet_requests == request_number)
            .ok_or_else(|| Error::malformed("run", "fleet request already recorded"))?;
        run.fleet_requests += 1;
        run.instances.extend(instance_ids.iter().cloned());
        run.instances.sort();
        Ok(())
    }

    async fn close_run(&self, run_id: &str, now: DateTime<Utc>) -> Result<bool, Error> {
        let mut state = lock(&self.state);
        if state.current.as_deref() != Some(run_id) {
            return Ok(false);
        }
        state.current = None;
        let Some(run) = state
            .runs
            .get_mut(run_id)
            .filter(|r| r.state == RunState::Open)
        else {
            return Ok(false);
        };
        run.state = RunState::Finished;
        run.finished_at = Some(now);
        Ok(true)
    }
}

/// A queue in memory. Received messages stay in flight until deleted or
/// released; `redeliver_in_flight` plays the visibility timeout ending.
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

#[async_trait]
impl Queue for MemoryQueue {
    async fn send_batch(&self, messages: &[Outgoing]) -> Result<Vec<String>, Error> {
        assert!(messages.len() <= 10, "SQS batches hold at most 10 entries");
        lock(&self.state).send_calls += 1;
        for message in messages {
            self.push(&message.body);
        }
        Ok(Vec::new())
    }

    async fn receive(&self, max: u32, wait: Duration) -> Result<Vec<Received>, Error> {
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
        Ok(received)
    }

    async fn delete_batch(&self, receipts: &[String]) -> Result<Vec<String>, Error> {
        let mut state = lock(&self.state);
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
        Ok(Duration::from_secs(30))
    }
}

/// The payload bucket, in memory.
#[derive(Debug, Default)]
pub struct MemoryBlobs {
    objects: Mutex<BTreeMap<String, Vec<u8>>>,
}

impl MemoryBlobs {
    pub fn keys(&self) -> Vec<String> {
        lock(&self.objects).keys().cloned().collect()
    }
}

#[async_trait]
impl BlobStore for MemoryBlobs {
    async fn put(&self, key: &str, bytes: Vec<u8>) -> Result<(), Error> {
        lock(&self.objects).insert(key.to_owned(), bytes);
        Ok(())
    }

    async fn get(&self, key: &str) -> Result<Vec<u8>, Error> {
        lock(&self.objects)
            .get(key)
            .cloned()
            .ok_or_else(|| Error::service("GetObject", format!("no object {key}")))
    }

    async fn delete(&self, key: &str) -> Result<(), Error> {
        lock(&self.objects).remove(key);
        Ok(())
    }
}

/// Spot capacity in memory: every launch succeeds; requests are kept.
#[derive(Debug, Default)]
pub struct FakeFleet {
    state: Mutex<FleetState>,
}

#[derive(Debug, Default)]
struct FleetState {
    next: u32,
    active: BTreeMap<String, String>,
    tokens: BTreeMap<String, Vec<String>>,
}

impl FakeFleet {
    pub fn launches(&self) -> usize {
        lock(&self.state).tokens.len()
    }

    /// An instance dies (spot reclaim, or its worker stopped it).
    pub fn lose(&self, instance_id: &str) {
        lock(&self.state).active.remove(instance_id);
    }

    pub fn active(&self) -> Vec<String> {
        lock(&self.state).active.keys().cloned().collect()
    }
}

#[async_trait]
impl Fleet for FakeFleet {
    async fn launch(&self, run_id: &str, count: u32, token: &str) -> Result<Vec<String>, Error> {
        let mut state = lock(&self.state);
        if let Some(ids) = state.tokens.get(token) {
            return Ok(ids.clone());
        }
        let mut ids = Vec::new();
        for _ in 0..count {
            state.next += 1;
            let id = format!("i-{:08x}", state.next);
            state.active.insert(id.clone(), run_id.to_owned());
            ids.push(id);
        }
        state.tokens.insert(token.to_owned(), ids.clone());
        Ok(ids)
    }

    async fn active_instances(&self, run_id: &str) -> Result<Vec<String>, Error> {
        Ok(lock(&self.state)
            .active
            .iter()
            .filter(|(_, run)| *run == run_id)
            .map(|(id, _)| id.clone())
            .collect())
    }
}

/// Records which instances asked to be terminated.
#[derive(Debug, Default)]
pub struct FakeInstances {
    terminated: Mutex<Vec<String>>,
}

impl FakeInstances {
    pub fn terminated(&self) -> Vec<String> {
        lock(&self.terminated).clone()
    }
}

#[async_trait]
impl InstanceControl for FakeInstances {
    async fn terminate(&self, instance_id: &str) -> Result<(), Error> {
        lock(&self.terminated).push(instance_id.to_owned());
        Ok(())
    }
}

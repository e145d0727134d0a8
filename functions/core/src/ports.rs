//! Ports: one narrow trait per capability. Each handler takes only the ports
//! it uses; AWS adapters and in-memory fakes implement them.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::Error;
use crate::message::{AttemptEvent, TaskResult};
use crate::model::{NewTask, PendingTask, Run, Task};

/// Writes new tasks (ingest).
#[async_trait]
pub trait TaskWriter: Send + Sync {
    /// Writes tasks that carry no idempotency key, in batches.
    async fn insert_tasks(&self, tasks: &[NewTask]) -> Result<(), Error>;
    /// Writes each task only if no task with its id exists yet (tasks with
    /// an idempotency key), all at once when none exists; returns one
    /// outcome per task, in order.
    async fn insert_tasks_once(&self, tasks: &[NewTask]) -> Result<Vec<InsertOutcome>, Error>;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InsertOutcome {
    Inserted,
    /// A task with this id exists; the digest of the request that made it.
    Exists {
        request_digest: Option<String>,
    },
}

/// Reads tasks (ingest, reports).
#[async_trait]
pub trait TaskReader: Send + Sync {
    async fn task(&self, task_id: &str) -> Result<Option<Task>, Error>;
    /// The tasks among `task_ids` that exist, in no particular order.
    async fn tasks(&self, task_ids: &[String]) -> Result<Vec<Task>, Error>;
    /// Every task queued in a run (a query on the run's index).
    async fn run_tasks(&self, run_id: &str) -> Result<Vec<Task>, Error>;
}

/// The sparse, sharded index of tasks waiting for a run (dispatcher).
#[async_trait]
pub trait PendingTasks: Send + Sync {
    /// Up to `limit` pending tasks of one shard, oldest first.
    async fn pending(&self, shard: u32, limit: usize) -> Result<Vec<PendingTask>, Error>;
    /// PENDING → QUEUED for tasks whose messages were sent, and the run's
    /// `queued` counter moved by the number that changed. Returns the ids
    /// that changed; a task no longer PENDING is left alone.
    async fn mark_queued(&self, run_id: &str, task_ids: &[String]) -> Result<Vec<String>, Error>;
}

/// Records what workers report (collector). Every method is idempotent: a
/// redelivered message changes nothing and moves no counter.
#[async_trait]
pub trait ResultRecorder: Send + Sync {
    /// QUEUED → DONE | FAILED for each result, with the run's counters.
    /// Returns one outcome per result, in order.
    async fn record_results(&self, results: &[TaskResult]) -> Result<Vec<RecordOutcome>, Error>;
    /// Counts a failed or interrupted attempt once per event id.
    async fn record_attempt(
        &self,
        event: &AttemptEvent,
        kind: AttemptKind,
    ) -> Result<RecordOutcome, Error>;
    /// QUEUED → FAILED for a task whose deliveries ran out, keeping the last
    /// error an attempt reported.
    async fn record_dead_letter(
        &self,
        task_id: &str,
        run_id: &str,
        at: DateTime<Utc>,
    ) -> Result<RecordOutcome, Error>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptKind {
    Failed,
    Interrupted,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordOutcome {
    Recorded,
    /// Already recorded (a redelivery): acknowledge and ignore.
    Duplicate,
    /// The task is not QUEUED yet (its dispatcher has sent the message but
    /// not yet marked it): try again later.
    NotYetQueued,
    /// No such task, or it belongs to another run: nothing to record.
    Unknown,
}

/// Runs and their bookkeeping (ingest, dispatcher).
#[async_trait]
pub trait RunStore: Send + Sync {
    async fn run(&self, run_id: &str) -> Result<Option<Run>, Error>;
    async fn current_run(&self) -> Result<Option<Run>, Error>;
    /// The open run, or a new one if none is open (at most one run is open:
    /// the new run is written only if no other is current). `true` if new.
    async fn open_run(&self, new_run_id: &str, now: DateTime<Utc>) -> Result<(Run, bool), Error>;
    /// Takes the run's dispatch lease if it is free or expired.
    async fn acquire_lease(
        &self,
        run_id: &str,
        owner: &str,
        now: DateTime<Utc>,
        ttl: Duration,
    ) -> Result<bool, Error>;
    async fn release_lease(&self, run_id: &str, owner: &str) -> Result<(), Error>;
    /// Records the instances a fleet request launched; `request_number`
    /// must be the run's current `fleet_requests`, so a request is counted once.
    async fn record_fleet(
        &self,
        run_id: &str,
        request_number: u32,
        instance_ids: &[String],
    ) -> Result<(), Error>;
    /// OPEN → FINISHED, and the run stops being current. `false` if it was
    /// no longer open.
    async fn close_run(&self, run_id: &str, now: DateTime<Utc>) -> Result<bool, Error>;
}

/// A message received from a queue.
#[derive(Debug, Clone, PartialEq)]
pub struct Received {
    pub message_id: String,
    pub receipt: String,
    pub receive_count: u32,
    pub body: String,
}

/// One message to send in a batch; `id` is unique within the batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    pub id: String,
    pub body: String,
}

/// An SQS queue (dispatcher, worker). Batch methods take at most 10 entries
/// and return the ids or receipts that failed.
#[async_trait]
pub trait Queue: Send + Sync {
    async fn send_batch(&self, messages: &[Outgoing]) -> Result<Vec<String>, Error>;
    async fn receive(&self, max: u32, wait: Duration) -> Result<Vec<Received>, Error>;
    async fn delete_batch(&self, receipts: &[String]) -> Result<Vec<String>, Error>;
    async fn change_visibility_batch(
        &self,
        receipts: &[String],
        timeout: Duration,
    ) -> Result<Vec<String>, Error>;
    async fn visibility_timeout(&self) -> Result<Duration, Error>;
}

/// The payload bucket (ingest, worker).
#[async_trait]
pub trait BlobStore: Send + Sync {
    async fn put(&self, key: &str, bytes: Vec<u8>) -> Result<(), Error>;
    async fn get(&self, key: &str) -> Result<Vec<u8>, Error>;
    async fn delete(&self, key: &str) -> Result<(), Error>;
}

/// Spot capacity (dispatcher).
#[async_trait]
pub trait Fleet: Send + Sync {
    /// Launches up to `count` spot workers tagged with the run; `token`
    /// makes a repeated request launch nothing new.
    async fn launch(&self, run_id: &str, count: u32, token: &str) -> Result<Vec<String>, Error>;
    /// Workers of the run that are pending or running.
    async fn active_instances(&self, run_id: &str) -> Result<Vec<String>, Error>;
}

/// A worker's own instance (worker).
#[async_trait]
pub trait InstanceControl: Send + Sync {
    async fn terminate(&self, instance_id: &str) -> Result<(), Error>;
}

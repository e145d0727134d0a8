//! Ports: one narrow trait per capability. Each handler takes only the ports
//! it uses; AWS adapters and in-memory fakes implement them, and the
//! conformance suite holds them to the same rules.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::Error;
use crate::message::{AttemptEvent, TaskResult};
pub use crate::model::AttemptKind;
use crate::model::{InstanceSeen, Launched, NewTask, PendingTask, Run, SpotPrice, Task, Usage};
use crate::plan::{FleetPlan, Lifecycle};

/// Writes new tasks (ingest) in two steps, so that a request is written
/// whole or not at all: [`TaskWriter::stage`] writes them STAGED (invisible
/// to the dispatcher and to readers), then [`TaskWriter::commit`] makes them
/// PENDING, or [`TaskWriter::abort`] removes them.
#[async_trait]
pub trait TaskWriter: Send + Sync {
    /// Writes each task STAGED under `request_id`. A task with an
    /// idempotency key is written only if no task has its id; one per
    /// task, in order.
    async fn stage(&self, request_id: &str, tasks: &[NewTask])
    -> Result<Vec<InsertOutcome>, Error>;
    /// STAGED → PENDING for tasks this request staged.
    async fn commit(&self, request_id: &str, tasks: &[NewTask]) -> Result<(), Error>;
    /// Removes the tasks this request staged (and only those).
    async fn abort(&self, request_id: &str, task_ids: &[String]) -> Result<(), Error>;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InsertOutcome {
    Inserted,
    /// A task with this id exists: the digest of the request that made it,
    /// and the request that is still writing it, if it is STAGED.
    Exists {
        request_digest: Option<String>,
        staged_by: Option<String>,
    },
}

/// Reads tasks (ingest, reports). STAGED tasks are not there yet.
#[async_trait]
pub trait TaskReader: Send + Sync {
    async fn task(&self, task_id: &str) -> Result<Option<Task>, Error>;
    /// The tasks among `task_ids` that exist, STAGED ones included, in no
    /// particular order.
    async fn tasks(&self, task_ids: &[String]) -> Result<Vec<Task>, Error>;
    /// One page of the tasks queued in a run, by task id: up to `limit`
    /// from `after` (a query on the run's index, whose items carry the
    /// report's attributes, not payloads or results).
    async fn run_tasks_page(
        &self,
        run_id: &str,
        limit: usize,
        after: Option<&Cursor>,
    ) -> Result<Page<Task>, Error>;

    /// Every task queued in a run, page after page.
    async fn run_tasks(&self, run_id: &str) -> Result<Vec<Task>, Error> {
        let mut tasks = Vec::new();
        let mut after = None;
        loop {
            let page = self.run_tasks_page(run_id, 1000, after.as_ref()).await?;
            tasks.extend(page.items);
            match page.next {
                Some(next) => after = Some(next),
                None => return Ok(tasks),
            }
        }
    }
}

/// Where a paged read goes on; opaque to its callers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor(pub String);

/// One page of a read, and where the next one starts (`None`: the end).
#[derive(Debug, Clone, PartialEq)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next: Option<Cursor>,
}

/// The sparse, sharded index of tasks waiting for a run (dispatcher).
#[async_trait]
pub trait PendingTasks: Send + Sync {
    /// One page of pending tasks of one shard, oldest first: up to `limit`
    /// index entries read from `after`, of which those still PENDING are
    /// returned. A page may hold fewer than `limit` (or none) and still
    /// have a next one: only `next == None` ends the shard.
    async fn pending(
        &self,
        shard: u32,
        limit: usize,
        after: Option<&Cursor>,
    ) -> Result<Page<PendingTask>, Error>;
    /// PENDING → QUEUED for tasks whose messages were sent, and the run's
    /// `queued` counters (the run's and its kernel's) moved by the number
    /// that changed. Returns the ids that changed; a task no longer PENDING
    /// is left alone.
    async fn mark_queued(&self, run_id: &str, tasks: &[Sent]) -> Result<Vec<String>, Error>;
    /// PENDING, or QUEUED in this run → CANCELLED in this run, with the
    /// run's `cancelled` counter. Returns the ids that changed; a task past
    /// both is left alone.
    async fn cancel_tasks(
        &self,
        run_id: &str,
        task_ids: &[String],
        now: DateTime<Utc>,
    ) -> Result<Vec<String>, Error>;
}

/// A task whose message was sent: its id and its kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    pub task_id: String,
    pub kernel: String,
}

impl Sent {
    /// These tasks, all of one kernel.
    pub fn all(task_ids: &[String], kernel: &str) -> Vec<Self> {
        task_ids
            .iter()
            .map(|id| Self {
                task_id: id.clone(),
                kernel: kernel.to_owned(),
            })
            .collect()
    }
}

/// Records what workers report (collector). Every method is idempotent: a
/// redelivered message changes nothing and moves no counter.
#[async_trait]
pub trait ResultRecorder: Send + Sync {
    /// QUEUED → DONE | FAILED for each result, with the run's counters.
    /// Returns one outcome per result, in order. A result that can never
    /// be stored (over the item limit) fails its task with the reason.
    async fn record_results(&self, results: &[TaskResult]) -> Result<Vec<RecordOutcome>, Error>;
    /// Counts a failed or interrupted attempt once per event id.
    async fn record_attempt(
        &self,
        event: &AttemptEvent,
        kind: AttemptKind,
    ) -> Result<RecordOutcome, Error>;
    /// Adds what a component's AWS requests used for a run to the run's
    /// usage (a counter: what was used, however often, is added).
    async fn add_usage(&self, run_id: &str, usage: &Usage) -> Result<(), Error>;
    /// QUEUED → FAILED: with `reason`, or, for a task whose deliveries ran
    /// out (`None`), keeping the last error an attempt reported.
    async fn fail_task(
        &self,
        task_id: &str,
        run_id: &str,
        at: DateTime<Utc>,
        reason: Option<&str>,
    ) -> Result<RecordOutcome, Error>;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordOutcome {
    Recorded,
    /// The result could never be stored as it is (a limit refused it): the
    /// task was recorded FAILED with this reason instead.
    FailedInstead(String),
    /// Already recorded (a redelivery): acknowledge and ignore.
    Duplicate,
    /// The task is not QUEUED yet (its dispatcher has sent the message but
    /// not yet marked it): try again later.
    NotYetQueued,
    /// No such task, or it belongs to another run: nothing to record.
    Unknown,
    /// Its run cancelled it first; the store keeps the result as late and
    /// answers [`RecordOutcome::Late`]. Never returned by a store.
    CancelledFirst,
    /// Its run cancelled it first: the result is kept on it, as late.
    Late,
}

impl From<crate::rules::Refusal> for RecordOutcome {
    fn from(refusal: crate::rules::Refusal) -> Self {
        use crate::rules::Refusal;
        match refusal {
            Refusal::AlreadyDone => Self::Duplicate,
            Refusal::NotYet | Refusal::Raced => Self::NotYetQueued,
            Refusal::NotApplicable => Self::Unknown,
            Refusal::CancelledFirst => Self::CancelledFirst,
        }
    }
}

/// What a component's AWS requests have used since it last asked.
pub trait UsageSource: Send + Sync {
    fn take(&self) -> Usage;
}

/// Adds what an invocation cost (its requests, and itself) to the run it
/// worked for; work for no run costs the night nothing. The usage is a
/// counter, so a failure is logged and the night's cost comes out short,
/// never the work.
pub async fn charge(recorder: &dyn ResultRecorder, run_id: Option<&str>, used: &Usage) {
    let Some(run_id) = run_id else {
        return;
    };
    if let Err(error) = recorder.add_usage(run_id, used).await {
        tracing::warn!(run_id, error = %error.chain(), "could not add the usage to its run");
    }
}

/// The time now: the wall clock where the functions run, a model's clock
/// in a simulation (dispatcher).
pub trait Clock: Send + Sync {
    fn now(&self) -> DateTime<Utc>;
}

/// The wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct WallClock;

impl Clock for WallClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// Reads a run (ingest, dispatcher, worker).
#[async_trait]
pub trait RunReader: Send + Sync {
    async fn run(&self, run_id: &str) -> Result<Option<Run>, Error>;
}

/// Runs and their bookkeeping (ingest, dispatcher).
#[async_trait]
pub trait RunStore: RunReader {
    async fn current_run(&self) -> Result<Option<Run>, Error>;
    /// One page of every run, newest first.
    async fn runs_page(&self, limit: usize, after: Option<&Cursor>) -> Result<Page<Run>, Error>;
    /// The open run, or a new one if none is open (at most one run is open:
    /// the new run is written only if no other is current). `true` if new.
    async fn open_run(
        &self,
        new_run_id: &str,
        now: DateTime<Utc>,
        deadline: DateTime<Utc>,
    ) -> Result<(Run, bool), Error>;
    /// Takes the run's dispatch lease if it is free, expired or already
    /// this owner's (a repeated call finds its own write).
    async fn acquire_lease(
        &self,
        run_id: &str,
        owner: &str,
        now: DateTime<Utc>,
        ttl: Duration,
    ) -> Result<bool, Error>;
    /// Gives the lease back, recording whether the pass left pending
    /// tasks behind for lack of room (so workers wait for them rather than
    /// stop) and the fleet plan it made.
    async fn release_lease(
        &self,
        run_id: &str,
        owner: &str,
        waiting: bool,
        plan: Option<&FleetPlan>,
    ) -> Result<(), Error>;
    /// Records the instances a fleet request launched; `request_number`
    /// must be the run's current `fleet_requests`, so a request is counted
    /// once. `false` if that request was already recorded, unless with
    /// these same instances as the last request (a call repeated after its
    /// answer was lost): then `true` again. A request that launched nothing
    /// is never `true` twice.
    /// The spot prices read for the request are recorded with it.
    async fn record_fleet(
        &self,
        run_id: &str,
        request_number: u32,
        launched: &[Launched],
        prices: &[SpotPrice],
    ) -> Result<bool, Error>;
    /// Records what EC2 showed of the run's instances (zone, end), each
    /// field once: a field already recorded is left as it is.
    async fn record_instances(&self, run_id: &str, seen: &[InstanceSeen]) -> Result<(), Error>;
    /// OPEN → FINISHED, and the run stops being current. `false` if it was
    /// no longer open.
    async fn close_run(&self, run_id: &str, now: DateTime<Utc>) -> Result<bool, Error>;
    /// OPEN → CANCELLED (it stays current until the dispatcher has wound it
    /// down, see [`RunStore::release_run`]). `false` if it was not open.
    async fn cancel_run(&self, run_id: &str, now: DateTime<Utc>) -> Result<bool, Error>;
    /// The run stops being current, if it is (a cancelled run, wound down).
    async fn release_run(&self, run_id: &str) -> Result<(), Error>;
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

impl Outgoing {
    /// One batch's entries, each named by its place in the batch: the id
    /// a failure is reported by.
    pub fn numbered(bodies: impl IntoIterator<Item = String>) -> Vec<Self> {
        bodies
            .into_iter()
            .enumerate()
            .map(|(i, body)| Self {
                id: i.to_string(),
                body,
            })
            .collect()
    }
}

/// An SQS queue (dispatcher, worker). Batch methods take one batch (see
/// [`crate::limits::sqs_batches`]) and return the ids or receipts that
/// failed.
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
    /// Deletes objects, up to 1,000 a call; a missing key is no error.
    async fn delete_many(&self, keys: &[String]) -> Result<(), Error>;
    /// Every key under `prefix`.
    async fn list(&self, prefix: &str) -> Result<Vec<String>, Error>;
}

/// A worker instance of this stack, as EC2 describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerInstance {
    pub id: String,
    /// The run it was launched for, from its tag.
    pub run_id: Option<String>,
    pub launched_at: DateTime<Utc>,
    /// Pending or running (not stopping, stopped or terminated).
    pub alive: bool,
    pub zone: Option<String>,
    /// When it stopped running, for one not alive, as EC2 recorded it.
    pub ended_at: Option<DateTime<Utc>>,
}

/// EC2 capacity, spot or on-demand (dispatcher).
#[async_trait]
pub trait Fleet: Send + Sync {
    /// Launches workers tagged with the run, up to `slots` in all (each
    /// type counting for its slots, see [`crate::plan::slots_of`]), spot
    /// or on-demand; `token` makes a repeated request launch nothing new.
    /// Each launched instance carries its slots.
    async fn launch(
        &self,
        run_id: &str,
        slots: u32,
        lifecycle: Lifecycle,
        token: &str,
    ) -> Result<Vec<Launched>, Error>;
    /// This stack's workers, of every run, in every state EC2 still shows.
    async fn instances(&self) -> Result<Vec<WorkerInstance>, Error>;
    async fn terminate(&self, instance_ids: &[String]) -> Result<(), Error>;
    /// The current spot price of each of these types in every zone.
    async fn spot_prices(
        &self,
        instance_types: &[String],
        now: DateTime<Utc>,
    ) -> Result<Vec<SpotPrice>, Error>;
}

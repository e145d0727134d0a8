//! Tasks and runs, and the transitions between their states.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;

/// A task's life (the transitions are in [`crate::rules`]): STAGED while
/// the request that brings it is being written, PENDING until a dispatcher
/// queues it into a run, QUEUED until a worker's result (or the dead-letter
/// queue) ends it DONE or FAILED; CANCELLED when its run is cancelled first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TaskStatus {
    Staged,
    Pending,
    Queued,
    Done,
    Failed,
    Cancelled,
}

impl TaskStatus {
    const ALL: [Self; 6] = [
        Self::Staged,
        Self::Pending,
        Self::Queued,
        Self::Done,
        Self::Failed,
        Self::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Staged => "STAGED",
            Self::Pending => "PENDING",
            Self::Queued => "QUEUED",
            Self::Done => "DONE",
            Self::Failed => "FAILED",
            Self::Cancelled => "CANCELLED",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|status| status.as_str() == s)
    }

    /// DONE, FAILED and CANCELLED end a task; nothing moves it again.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Done | Self::Failed | Self::Cancelled)
    }
}

/// A run's life: OPEN until every task it queued has ended and nothing is
/// pending (FINISHED), or until an operator cancels it (CANCELLED: its
/// pending and queued tasks end CANCELLED, its instances are terminated).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RunState {
    Open,
    Finished,
    Cancelled,
}

impl RunState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Open => "OPEN",
            Self::Finished => "FINISHED",
            Self::Cancelled => "CANCELLED",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Self::Open, Self::Finished, Self::Cancelled]
            .into_iter()
            .find(|state| state.as_str() == s)
    }
}

/// The stored form of an instant: RFC 3339, milliseconds, UTC, so that
/// text order is time order.
pub fn timestamp(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// A JSON document carried inline, or stored in the payload bucket under a
/// key when it is over the inline limit (the claim check). Inline, it is
/// kept as its text: checked once where it enters (the API, a kernel's
/// result) and then carried verbatim through the table and the queues,
/// never parsed and written again on the way.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Blob {
    Inline(Box<RawValue>),
    Stored { key: String },
}

impl Blob {
    /// A document inline, written once from its value.
    pub fn json(value: &Value) -> Self {
        // Writing a `Value` as JSON cannot fail.
        Self::Inline(serde_json::value::to_raw_value(value).unwrap_or_else(|_| null()))
    }

    /// A document inline from its text, which must be JSON.
    pub fn from_text(text: String) -> Result<Self, serde_json::Error> {
        RawValue::from_string(text).map(Self::Inline)
    }

    /// The bytes of the document when it is inline, else 0.
    pub fn inline_bytes(&self) -> usize {
        match self {
            Self::Inline(raw) => raw.get().len(),
            Self::Stored { .. } => 0,
        }
    }
}

fn null() -> Box<RawValue> {
    RawValue::from_string("null".to_owned()).unwrap_or_default()
}

impl PartialEq for Blob {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Inline(a), Self::Inline(b)) => a.get() == b.get(),
            (Self::Stored { key: a }, Self::Stored { key: b }) => a == b,
            _ => false,
        }
    }
}

/// A task as accepted by the API, before it is written.
#[derive(Debug, Clone, PartialEq)]
pub struct NewTask {
    pub id: String,
    pub account: String,
    pub kernel: String,
    pub payload: Blob,
    pub created_at: DateTime<Utc>,
    /// Set when the client gave an idempotency key: the task is then written
    /// only if no task with this id exists.
    pub idempotency: Option<Idempotency>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Idempotency {
    pub key: String,
    /// A digest of the request, to tell a retry from a conflicting reuse.
    pub request_digest: String,
}

impl NewTask {
    /// The shard of the sparse pending index this task is listed under.
    pub fn pending_shard(&self, shards: u32) -> u32 {
        pending_shard(&self.id, shards)
    }
}

/// Spreads pending tasks over `shards` index partitions (FNV-1a of the id),
/// so that a burst of ingest does not land on one hot partition.
pub fn pending_shard(task_id: &str, shards: u32) -> u32 {
    let hash = task_id.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    (hash % u64::from(shards.max(1))) as u32
}

/// What the dispatcher reads from the pending index to queue a task.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingTask {
    pub id: String,
    pub account: String,
    pub kernel: String,
    pub payload: Blob,
    pub created_at: DateTime<Utc>,
}

/// A task as stored.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Task {
    pub id: String,
    pub account: String,
    pub kernel: String,
    pub status: TaskStatus,
    pub created_at: DateTime<Utc>,
    pub run_id: Option<String>,
    pub payload: Option<Blob>,
    /// Deliveries that ran the kernel (failed attempts, interrupted ones and
    /// the one that finished).
    pub attempts: u32,
    pub failed_attempts: u32,
    pub interruptions: u32,
    pub instance_id: Option<String>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub duration_ms: Option<u64>,
    pub result: Option<Blob>,
    pub summary: Option<String>,
    pub last_error: Option<String>,
    /// The attempts that did not finish it (interrupted or failed), oldest
    /// first.
    pub attempt_log: Vec<AttemptRecord>,
    /// Digest of the request that created the task under an idempotency key.
    #[serde(skip)]
    pub request_digest: Option<String>,
}

/// Why an attempt did not finish its task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AttemptKind {
    Failed,
    Interrupted,
}

impl AttemptKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Failed => "failed",
            Self::Interrupted => "interrupted",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Self::Failed, Self::Interrupted]
            .into_iter()
            .find(|kind| kind.as_str() == s)
    }
}

/// An attempt that did not finish its task, where and when it ran.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AttemptRecord {
    pub instance_id: String,
    pub started_at: Option<DateTime<Utc>>,
    pub ended_at: DateTime<Utc>,
    pub outcome: AttemptKind,
}

/// A night's run: the tasks it queued, how many ended, the workers it used.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Run {
    pub id: String,
    pub state: RunState,
    pub started_at: DateTime<Utc>,
    /// When the night's work must be done by (see `night`).
    pub deadline: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub queued: u64,
    pub done: u64,
    pub failed: u64,
    /// Tasks its cancel ended (pending or queued).
    pub cancelled: u64,
    /// Results that arrived for its tasks after the cancel, kept on them.
    pub late: u64,
    /// Every instance launched for the run.
    pub instances: Vec<Launched>,
    /// How many fleet requests this run has made; the next request's
    /// number makes its idempotency token.
    pub fleet_requests: u32,
    /// The last dispatcher pass left pending tasks for its next pass (the
    /// run had no more room): workers wait for them instead of stopping.
    pub waiting: bool,
    /// The spot prices the dispatcher read when it launched, for the
    /// types it launched, in every zone; what the run's instances cost.
    pub spot_prices: Vec<SpotPrice>,
    /// The AWS requests made for the run, as its components counted them.
    pub usage: Usage,
    /// Per kernel: tasks queued, ended, and the kernel time they took.
    pub kernels: Vec<KernelStats>,
    /// What the dispatcher planned at its last pass.
    pub plan: Option<crate::plan::FleetPlan>,
}

/// A kernel's tasks in a run: counters moved in the same transactions as
/// the tasks, so the dispatcher plans from measured durations.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct KernelStats {
    pub kernel: String,
    pub queued: u64,
    pub ended: u64,
    /// Kernel time of the ended tasks.
    pub busy_ms: u64,
}

impl KernelStats {
    pub fn mean_ms(&self) -> Option<u64> {
        (self.ended > 0).then(|| self.busy_ms / self.ended)
    }
}

/// What AWS bills a run's requests by: counted inside the SDK by each
/// component (see `aws::meter`) and added to the run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    pub sqs_requests: u64,
    pub dynamodb_write_units: f64,
    pub dynamodb_read_units: f64,
    /// S3 PUT, COPY, POST and LIST requests.
    pub s3_writes: u64,
    /// S3 GET and other requests.
    pub s3_reads: u64,
    pub lambda_invocations: u64,
    pub lambda_gb_seconds: f64,
    /// Requests billed nothing (EC2's, S3 deletes).
    pub free_requests: u64,
    /// Attempts by component and operation (`worker/SQS.ReceiveMessage`).
    #[serde(default)]
    pub calls: std::collections::BTreeMap<String, u64>,
}

impl Usage {
    /// Its fields by their stored names.
    pub fn fields(&self) -> [(&'static str, f64); 8] {
        [
            ("sqs_requests", self.sqs_requests as f64),
            ("dynamodb_write_units", self.dynamodb_write_units),
            ("dynamodb_read_units", self.dynamodb_read_units),
            ("s3_writes", self.s3_writes as f64),
            ("s3_reads", self.s3_reads as f64),
            ("lambda_invocations", self.lambda_invocations as f64),
            ("lambda_gb_seconds", self.lambda_gb_seconds),
            ("free_requests", self.free_requests as f64),
        ]
    }

    /// The usage from stored fields; a missing one is 0.
    pub fn from_fields(field: impl Fn(&str) -> Option<f64>) -> Self {
        let count = |name: &str| field(name).unwrap_or(0.0).max(0.0).round() as u64;
        let amount = |name: &str| field(name).unwrap_or(0.0).max(0.0);
        Self {
            sqs_requests: count("sqs_requests"),
            dynamodb_write_units: amount("dynamodb_write_units"),
            dynamodb_read_units: amount("dynamodb_read_units"),
            s3_writes: count("s3_writes"),
            s3_reads: count("s3_reads"),
            lambda_invocations: count("lambda_invocations"),
            lambda_gb_seconds: amount("lambda_gb_seconds"),
            free_requests: count("free_requests"),
            calls: Default::default(),
        }
    }

    /// One Lambda invocation of `elapsed` with `memory_mb` of memory.
    pub fn invocation(elapsed: std::time::Duration, memory_mb: u32) -> Self {
        Self {
            lambda_invocations: 1,
            lambda_gb_seconds: elapsed.as_secs_f64() * f64::from(memory_mb) / 1024.0,
            ..Self::default()
        }
    }

    pub fn add(&mut self, other: &Usage) {
        self.sqs_requests += other.sqs_requests;
        self.dynamodb_write_units += other.dynamodb_write_units;
        self.dynamodb_read_units += other.dynamodb_read_units;
        self.s3_writes += other.s3_writes;
        self.s3_reads += other.s3_reads;
        self.lambda_invocations += other.lambda_invocations;
        self.lambda_gb_seconds += other.lambda_gb_seconds;
        self.free_requests += other.free_requests;
        for (call, n) in &other.calls {
            *self.calls.entry(call.clone()).or_default() += n;
        }
    }

    pub fn is_empty(&self) -> bool {
        self.fields().iter().all(|(_, value)| *value == 0.0) && self.calls.is_empty()
    }
}

/// An instance a fleet request launched, as recorded on its run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Launched {
    pub id: String,
    pub launched_at: DateTime<Utc>,
    pub instance_type: Option<String>,
    /// `spot` or `on-demand`.
    pub lifecycle: Option<String>,
    /// Its availability zone, once EC2 has shown it.
    pub zone: Option<String>,
    /// When EC2 says it stopped running (terminated, or shutting down).
    pub ended_at: Option<DateTime<Utc>>,
    /// The tasks it runs at once, as the dispatcher launched it.
    pub slots: u32,
    /// The run's tasks whose result it reported (done or failed).
    pub tasks: u64,
    /// The time its kernels took on them.
    pub busy_ms: u64,
    /// Why the dispatcher launched it.
    pub reason: Option<String>,
}

impl Launched {
    pub fn new(
        id: impl Into<String>,
        launched_at: DateTime<Utc>,
        instance_type: Option<String>,
        lifecycle: Option<String>,
    ) -> Self {
        Self {
            id: id.into(),
            launched_at,
            instance_type,
            lifecycle,
            zone: None,
            ended_at: None,
            slots: 1,
            tasks: 0,
            busy_ms: 0,
            reason: None,
        }
    }
}

/// What EC2 showed of a run's instance that its record does not hold yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceSeen {
    pub id: String,
    pub zone: Option<String>,
    pub ended_at: Option<DateTime<Utc>>,
}

/// A spot price as EC2 published it for a type in a zone.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SpotPrice {
    pub instance_type: String,
    pub zone: String,
    pub usd_per_hour: f64,
    /// When the dispatcher read it.
    pub read_at: DateTime<Utc>,
}

/// How far a run has come and when, at its pace, it will be done.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Progress {
    /// Tasks ended (done or failed).
    pub ended: u64,
    /// Tasks queued and not ended.
    pub remaining: u64,
    /// Tasks ended per minute since the run opened.
    pub tasks_per_minute: Option<f64>,
    /// When the last task will end at that pace (when it ended, for a run
    /// that is over).
    pub projected_finish: Option<DateTime<Utc>>,
    /// Whether that is by the deadline.
    pub on_time: Option<bool>,
}

impl Run {
    /// Whether fleet request `number` is recorded with these instances:
    /// the run has counted it and holds the first of them.
    pub fn records_fleet_request(&self, number: u32, launched: &[Launched]) -> bool {
        self.fleet_requests == number.saturating_add(1)
            && launched
                .first()
                .is_some_and(|first| self.instances.iter().any(|i| i.id == first.id))
    }

    /// The run's progress at `now`.
    pub fn progress(&self, now: DateTime<Utc>) -> Progress {
        let ended = self.done + self.failed;
        let remaining = self.in_flight();
        let until = self.finished_at.unwrap_or(now);
        let minutes = (until - self.started_at).num_milliseconds() as f64 / 60_000.0;
        let tasks_per_minute = (ended > 0 && minutes > 0.0).then(|| ended as f64 / minutes);
        let projected_finish = match (self.state, tasks_per_minute) {
            (RunState::Open, _) if remaining == 0 && ended > 0 => Some(now),
            (RunState::Open, Some(rate)) => {
                let minutes_left = remaining as f64 / rate;
                Some(now + chrono::Duration::milliseconds((minutes_left * 60_000.0) as i64))
            }
            (RunState::Open, None) => None,
            _ => self.finished_at,
        };
        Progress {
            ended,
            remaining,
            tasks_per_minute,
            projected_finish,
            on_time: projected_finish.map(|at| at <= self.deadline),
        }
    }

    /// Tasks queued in this run that have not ended yet.
    pub fn in_flight(&self) -> u64 {
        self.queued.saturating_sub(self.done + self.failed)
    }

    /// What is left of each kernel's tasks, with its measured mean.
    pub fn kernel_work(&self) -> Vec<crate::plan::KernelWork> {
        self.kernels
            .iter()
            .map(|k| crate::plan::KernelWork {
                kernel: k.kernel.clone(),
                tasks: k.queued.saturating_sub(k.ended),
                mean_ms: k.mean_ms(),
            })
            .collect()
    }

    pub fn instance_ids(&self) -> impl Iterator<Item = &str> {
        self.instances.iter().map(|i| i.id.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_are_stable_and_in_range() {
        let shard = pending_shard("task-1", 8);
        assert_eq!(shard, pending_shard("task-1", 8));
        assert!(shard < 8);
        let used: std::collections::BTreeSet<u32> = (0..200)
            .map(|i| pending_shard(&format!("task-{i}"), 8))
            .collect();
        assert_eq!(used.len(), 8, "200 ids should reach every shard");
    }

    #[test]
    fn progress_projects_the_finish_at_the_pace_so_far() {
        let start = DateTime::from_timestamp(1_800_000_000, 0).unwrap_or_default();
        let minutes = |m: i64| start + chrono::Duration::minutes(m);
        let mut run = Run {
            id: "r".into(),
            state: RunState::Open,
            started_at: start,
            deadline: minutes(60),
            finished_at: None,
            queued: 300,
            done: 90,
            failed: 10,
            cancelled: 0,
            late: 0,
            instances: Vec::new(),
            fleet_requests: 1,
            waiting: false,
            spot_prices: Vec::new(),
            usage: Usage::default(),
            kernels: Vec::new(),
            plan: None,
        };
        let progress = run.progress(minutes(10));
        assert_eq!((progress.ended, progress.remaining), (100, 200));
        assert_eq!(progress.tasks_per_minute, Some(10.0));
        assert_eq!(progress.projected_finish, Some(minutes(30)));
        assert_eq!(progress.on_time, Some(true));
        assert_eq!(
            run.progress(minutes(50)).on_time,
            Some(false),
            "200 left at 2 a minute is past the deadline"
        );
        run.state = RunState::Finished;
        run.finished_at = Some(minutes(70));
        run.done = 290;
        let over = run.progress(minutes(90));
        assert_eq!(over.projected_finish, Some(minutes(70)));
        assert_eq!(over.on_time, Some(false));
    }

    #[test]
    fn status_names_round_trip() {
        for status in TaskStatus::ALL {
            assert_eq!(TaskStatus::parse(status.as_str()), Some(status));
        }
        assert_eq!(TaskStatus::parse("RUNNING"), None);
    }
}

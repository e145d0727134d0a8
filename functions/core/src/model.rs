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
/// pending (FINISHED), or until an operator cancels it (CANCELLED).
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
    /// Digest of the request that created the task under an idempotency key.
    #[serde(skip)]
    pub request_digest: Option<String>,
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
    /// Every instance launched for the run.
    pub instances: Vec<Launched>,
    /// How many fleet requests this run has made; the next request's
    /// number makes its idempotency token.
    pub fleet_requests: u32,
    /// The last dispatcher pass left pending tasks for its next pass (the
    /// run had no more room): workers wait for them instead of stopping.
    pub waiting: bool,
}

/// An instance a fleet request launched, as recorded on its run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Launched {
    pub id: String,
    pub launched_at: DateTime<Utc>,
    pub instance_type: Option<String>,
    /// `spot` or `on-demand`.
    pub lifecycle: Option<String>,
}

impl Run {
    /// Tasks queued in this run that have not ended yet.
    pub fn in_flight(&self) -> u64 {
        self.queued.saturating_sub(self.done + self.failed)
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
    fn status_names_round_trip() {
        for status in TaskStatus::ALL {
            assert_eq!(TaskStatus::parse(status.as_str()), Some(status));
        }
        assert_eq!(TaskStatus::parse("RUNNING"), None);
    }
}

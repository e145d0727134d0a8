//! The bodies of queue messages. Every message carries a `type` tag, so the
//! collector can tell a worker's result from a task that reached the
//! dead-letter queue.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::model::{Blob, Usage};

/// Written with its `type` tag beside the fields of its variant. Read in
/// two steps (the tag, then the variant) rather than by serde's tagged
/// enums, which buffer the document and so cannot carry an inline payload
/// as its raw text.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Envelope {
    /// On the task queue: work for a worker. On the dead-letter queue: a
    /// task whose deliveries ran out.
    Task(TaskMessage),
    /// A task ended on a worker: done, or failed for good.
    Result(TaskResult),
    /// A delivery failed in a way another attempt may not; the message
    /// goes back to the queue.
    AttemptFailed(AttemptEvent),
    /// A worker handed the task back (spot interruption or shutdown) with a
    /// continuation message.
    Interrupted(AttemptEvent),
    /// What a worker's AWS requests used for a run, sent as it stops.
    Usage(UsageReport),
}

/// A component's usage of AWS for a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageReport {
    pub run_id: String,
    pub instance_id: String,
    pub usage: Usage,
}

impl Envelope {
    pub fn to_json(&self) -> String {
        // Serializing these plain structs cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn from_json(body: &str) -> Result<Self, serde_json::Error> {
        #[derive(Deserialize)]
        struct Tag {
            r#type: String,
        }
        let tag: Tag = serde_json::from_str(body)?;
        match tag.r#type.as_str() {
            "task" => serde_json::from_str(body).map(Self::Task),
            "result" => serde_json::from_str(body).map(Self::Result),
            "attempt_failed" => serde_json::from_str(body).map(Self::AttemptFailed),
            "interrupted" => serde_json::from_str(body).map(Self::Interrupted),
            "usage" => serde_json::from_str(body).map(Self::Usage),
            other => Err(serde::de::Error::unknown_variant(
                other,
                &["task", "result", "attempt_failed", "interrupted", "usage"],
            )),
        }
    }

    /// The task it is about; a usage report is about none.
    pub fn task_id(&self) -> Option<&str> {
        match self {
            Self::Task(task) => Some(&task.task_id),
            Self::Result(result) => Some(&result.task_id),
            Self::AttemptFailed(event) | Self::Interrupted(event) => Some(&event.task_id),
            Self::Usage(_) => None,
        }
    }

    /// The run it belongs to.
    pub fn run_id(&self) -> &str {
        match self {
            Self::Task(task) => &task.run_id,
            Self::Result(result) => &result.run_id,
            Self::AttemptFailed(event) | Self::Interrupted(event) => &event.run_id,
            Self::Usage(report) => &report.run_id,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskMessage {
    pub task_id: String,
    pub run_id: String,
    pub account: String,
    pub kernel: String,
    pub payload: Blob,
    /// Where an interrupted attempt left its checkpoint, if it made one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_key: Option<String>,
    /// Kernel runs made by earlier messages of this task (a continuation
    /// starts a fresh receive count, so the count is carried here).
    #[serde(default)]
    pub prior_attempts: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskResult {
    pub task_id: String,
    pub run_id: String,
    /// The kernel that ran it (its run's per-kernel durations).
    #[serde(default)]
    pub kernel: String,
    pub instance_id: String,
    pub attempts: u32,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub outcome: TaskOutcome,
}

impl TaskResult {
    pub fn duration_ms(&self) -> u64 {
        (self.finished_at - self.started_at)
            .num_milliseconds()
            .max(0)
            .unsigned_abs()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case", try_from = "OutcomeFields")]
pub enum TaskOutcome {
    Done { result: Blob, summary: String },
    Failed { error: String },
}

/// A [`TaskOutcome`] as read: its fields side by side, so that the result
/// keeps its raw text (see [`Envelope`]).
#[derive(Deserialize)]
struct OutcomeFields {
    status: String,
    result: Option<Blob>,
    summary: Option<String>,
    error: Option<String>,
}

impl TryFrom<OutcomeFields> for TaskOutcome {
    type Error = String;

    fn try_from(fields: OutcomeFields) -> Result<Self, Self::Error> {
        match (fields.status.as_str(), fields.result, fields.error) {
            ("done", Some(result), _) => Ok(Self::Done {
                result,
                summary: fields.summary.unwrap_or_default(),
            }),
            ("failed", _, Some(error)) => Ok(Self::Failed { error }),
            (status, _, _) => Err(format!("an outcome `{status}` without its fields")),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttemptEvent {
    /// Unique per delivery (message id and receive count), so a redelivered
    /// event is counted once.
    pub event_id: String,
    pub task_id: String,
    pub run_id: String,
    pub instance_id: String,
    /// When the attempt began (absent from workers that did not say).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
    /// When it ended.
    pub at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn task_messages_round_trip_with_their_tag() {
        let message = Envelope::Task(TaskMessage {
            task_id: "t1".into(),
            run_id: "r1".into(),
            account: "acct".into(),
            kernel: "sleep".into(),
            payload: Blob::Stored {
                key: "payloads/t1".into(),
            },
            checkpoint_key: None,
            prior_attempts: 0,
        });
        let body = message.to_json();
        let value: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(value["type"], "task");
        assert_eq!(value["payload"], json!({"stored": {"key": "payloads/t1"}}));
        assert_eq!(Envelope::from_json(&body).unwrap(), message);
    }

    #[test]
    fn an_inline_payload_travels_as_its_own_text() {
        let text = r#"{"b": 1.50, "a": [1,  2]}"#;
        let message = Envelope::Task(TaskMessage {
            task_id: "t1".into(),
            run_id: "r1".into(),
            account: "acct".into(),
            kernel: "sleep".into(),
            payload: Blob::from_text(text.to_owned()).unwrap(),
            checkpoint_key: None,
            prior_attempts: 0,
        });
        let body = message.to_json();
        assert!(body.contains(text), "verbatim, not rewritten: {body}");
        let Envelope::Task(read) = Envelope::from_json(&body).unwrap() else {
            panic!("a task");
        };
        assert!(matches!(&read.payload, Blob::Inline(raw) if raw.get() == text));
    }

    #[test]
    fn results_parse_from_the_documented_shape() {
        let body = json!({
            "type": "result", "task_id": "t", "run_id": "r", "instance_id": "i-1",
            "attempts": 1, "started_at": "2026-11-26T01:00:00Z",
            "finished_at": "2026-11-26T01:00:02.5Z",
            "outcome": {"status": "done", "result": {"inline": {"x": 1}}, "summary": "ok"}
        });
        let Envelope::Result(result) = Envelope::from_json(&body.to_string()).unwrap() else {
            panic!("a result");
        };
        assert_eq!(result.duration_ms(), 2500);
        assert_eq!(
            result.outcome,
            TaskOutcome::Done {
                result: Blob::json(&json!({"x": 1})),
                summary: "ok".into()
            }
        );
        assert!(Envelope::from_json(r#"{"type": "later"}"#).is_err());
    }
}

//! The rules of a task's life, stated once. The DynamoDB adapter turns each
//! [`TaskChange`] into the condition of its write, the in-memory store
//! evaluates [`TaskChange::allowed`] itself, and both explain a refused
//! change with [`TaskChange::refusal`], from the item as it is after the
//! refusal. The conformance suite (`crate::conformance`) runs the same
//! cases through both.
//!
//! ```text
//! STAGED ──commit──► PENDING ──queue──► QUEUED ──finish──► DONE | FAILED
//!    └──abort (deleted)   └──cancel──► CANCELLED ◄──cancel──┘
//!                                          └──a result after it: kept, late
//! ```

use crate::model::TaskStatus;

/// What the rules read of a task item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskFacts<'a> {
    pub status: TaskStatus,
    pub run_id: Option<&'a str>,
    /// Whether the attempt event of the change was already counted.
    pub event_seen: bool,
}

/// A conditional change to one task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskChange<'a> {
    /// PENDING → QUEUED in a run.
    Queue,
    /// QUEUED in this run → DONE or FAILED (a result, or a dead letter).
    Finish { run_id: &'a str },
    /// Counts a failed or interrupted attempt of a task QUEUED in this run,
    /// once per event.
    CountAttempt { run_id: &'a str },
    /// PENDING, or QUEUED in this run → CANCELLED.
    Cancel { run_id: &'a str },
    /// A result for a task CANCELLED in this run: kept on the task as late,
    /// once (the event is [`LATE_RESULT`]); the task stays CANCELLED.
    RecordLate { run_id: &'a str },
}

/// The event id a late result is counted under, so it is kept once.
pub const LATE_RESULT: &str = "late-result";

/// Why a change was refused, once the item has been read again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The change is already made (a redelivery): acknowledge, change nothing.
    AlreadyDone,
    /// The task is not QUEUED yet: its dispatcher sent the message before
    /// marking it. Try again later.
    NotYet,
    /// No such task, or it is in another run, or past this change for good.
    NotApplicable,
    /// The item as read now would allow the change: it moved between the
    /// write and the read. Try again.
    Raced,
    /// A result for a task its run cancelled first: to keep as late.
    CancelledFirst,
}

impl TaskChange<'_> {
    /// Whether the change applies to a task in this state.
    pub fn allowed(&self, facts: &TaskFacts<'_>) -> bool {
        match *self {
            Self::Queue => facts.status == TaskStatus::Pending,
            Self::Finish { run_id } => {
                facts.status == TaskStatus::Queued && facts.run_id == Some(run_id)
            }
            Self::CountAttempt { run_id } => {
                facts.status == TaskStatus::Queued
                    && facts.run_id == Some(run_id)
                    && !facts.event_seen
            }
            Self::Cancel { run_id } => {
                facts.status == TaskStatus::Pending
                    || (facts.status == TaskStatus::Queued && facts.run_id == Some(run_id))
            }
            Self::RecordLate { run_id } => {
                facts.status == TaskStatus::Cancelled
                    && facts.run_id == Some(run_id)
                    && !facts.event_seen
            }
        }
    }

    /// Why the change was refused, given the task as it is now (`None`: no
    /// such task).
    pub fn refusal(&self, facts: Option<&TaskFacts<'_>>) -> Refusal {
        let Some(facts) = facts else {
            return Refusal::NotApplicable;
        };
        if self.allowed(facts) {
            return Refusal::Raced;
        }
        match *self {
            Self::Queue => Refusal::NotApplicable,
            Self::Finish { run_id } | Self::CountAttempt { run_id } => {
                if matches!(facts.status, TaskStatus::Pending | TaskStatus::Staged) {
                    Refusal::NotYet
                } else if facts.run_id != Some(run_id) {
                    Refusal::NotApplicable
                } else if matches!(self, Self::Finish { .. })
                    && facts.status == TaskStatus::Cancelled
                {
                    Refusal::CancelledFirst
                } else {
                    // Ended, or this very event counted: a redelivery.
                    Refusal::AlreadyDone
                }
            }
            Self::Cancel { run_id } | Self::RecordLate { run_id } => {
                if facts.status == TaskStatus::Cancelled && facts.run_id == Some(run_id) {
                    Refusal::AlreadyDone
                } else {
                    Refusal::NotApplicable
                }
            }
        }
    }
}

/// How long a task may stay STAGED before its request counts as dead (no
/// request lives this long: API Gateway gives up after 30 s): a retry of it
/// may then take the task over instead of waiting for the TTL.
pub const STAGED_ABANDONED_AFTER: chrono::TimeDelta = chrono::TimeDelta::seconds(120);

/// Whether a STAGED task written at `staged_at` was abandoned by its request.
pub fn staged_abandoned(
    staged_at: chrono::DateTime<chrono::Utc>,
    now: chrono::DateTime<chrono::Utc>,
) -> bool {
    now - staged_at > STAGED_ABANDONED_AFTER
}

/// A run's counters may only move forward, and a run closes only when every
/// task it queued has ended.
pub fn run_may_close(queued: u64, ended: u64, anything_pending: bool) -> bool {
    ended >= queued && !anything_pending
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(status: TaskStatus, run: Option<&str>, seen: bool) -> TaskFacts<'_> {
        TaskFacts {
            status,
            run_id: run,
            event_seen: seen,
        }
    }

    #[test]
    fn a_result_is_accepted_only_from_queued_in_its_run() {
        let finish = TaskChange::Finish { run_id: "r1" };
        assert!(finish.allowed(&facts(TaskStatus::Queued, Some("r1"), false)));
        for (status, run, why) in [
            (TaskStatus::Done, Some("r1"), Refusal::AlreadyDone),
            (TaskStatus::Failed, Some("r1"), Refusal::AlreadyDone),
            (TaskStatus::Cancelled, Some("r1"), Refusal::CancelledFirst),
            (TaskStatus::Pending, None, Refusal::NotYet),
            (TaskStatus::Queued, Some("r2"), Refusal::NotApplicable),
        ] {
            let now = facts(status, run, false);
            assert!(!finish.allowed(&now), "{status:?}");
            assert_eq!(finish.refusal(Some(&now)), why, "{status:?}");
        }
        assert_eq!(finish.refusal(None), Refusal::NotApplicable);
        assert_eq!(
            finish.refusal(Some(&facts(TaskStatus::Queued, Some("r1"), false))),
            Refusal::Raced
        );
    }

    #[test]
    fn an_attempt_counts_once_per_event() {
        let count = TaskChange::CountAttempt { run_id: "r1" };
        assert!(count.allowed(&facts(TaskStatus::Queued, Some("r1"), false)));
        let seen = facts(TaskStatus::Queued, Some("r1"), true);
        assert_eq!(count.refusal(Some(&seen)), Refusal::AlreadyDone);
    }

    #[test]
    fn only_pending_tasks_are_queued_and_finished_ones_are_not_cancelled() {
        assert!(TaskChange::Queue.allowed(&facts(TaskStatus::Pending, None, false)));
        assert!(!TaskChange::Queue.allowed(&facts(TaskStatus::Staged, None, false)));
        let cancel = TaskChange::Cancel { run_id: "r1" };
        assert!(cancel.allowed(&facts(TaskStatus::Pending, None, false)));
        assert!(!cancel.allowed(&facts(TaskStatus::Done, Some("r1"), false)));
        assert_eq!(
            cancel.refusal(Some(&facts(TaskStatus::Cancelled, Some("r1"), false))),
            Refusal::AlreadyDone
        );
    }

    #[test]
    fn a_result_after_the_cancel_is_kept_once_as_late() {
        let late = TaskChange::RecordLate { run_id: "r1" };
        assert!(late.allowed(&facts(TaskStatus::Cancelled, Some("r1"), false)));
        let kept = facts(TaskStatus::Cancelled, Some("r1"), true);
        assert!(!late.allowed(&kept));
        assert_eq!(late.refusal(Some(&kept)), Refusal::AlreadyDone);
        assert!(!late.allowed(&facts(TaskStatus::Cancelled, Some("r2"), false)));
        assert!(!late.allowed(&facts(TaskStatus::Done, Some("r1"), false)));
    }

    #[test]
    fn a_run_closes_only_when_everything_it_queued_ended() {
        assert!(run_may_close(3, 3, false));
        assert!(!run_may_close(3, 2, false));
        assert!(!run_may_close(3, 3, true));
    }
}

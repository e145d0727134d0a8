//! How a worker paces its requests to SQS so that most of them carry a
//! full batch: how many messages it holds beyond its slots, when it
//! receives, how long a finished task's result waits for others, and when
//! its held messages need a heartbeat. Pure rules, shared by the worker
//! daemon and the scale model, which counts what they cost.

use std::time::Duration;

use crate::limits::SQS_BATCH_ENTRIES;

/// The most work a worker holds ahead of its slots, in kernel time per
/// slot: a message held ahead waits about this long at most for a slot,
/// so the night's last tasks end at most about this much later than if
/// every message went straight to a free slot.
pub const AHEAD: Duration = Duration::from_secs(30);

/// The longest a finished task's result waits for others to fill its batch
/// while the worker still has tasks unfinished; once none is, it goes at
/// once, since nothing else would join it. A result's latency hardly
/// matters at night, and its task's message stays hidden meanwhile.
pub const RESULT_WINDOW: Duration = Duration::from_secs(60);

/// How long a worker trusts what it read of a run (whether it is still
/// open) before it reads it again. A cancel reaches the run's own
/// instances by their termination; this only drops what is left of a run
/// in the queue, so a minute late costs little, and a read a minute per
/// worker costs a small fraction of a request per task.
pub const RUN_STATE_FRESH: Duration = Duration::from_secs(60);

/// The pace work is held ahead at, after a kernel ran to its end for
/// `ran`: the slowest recent kernel. A longer run counts at once; shorter
/// ones wear the pace down by a quarter per kernel, so one quick task
/// among long ones does not fill the slots' wait with hours of work. Only
/// a kernel that ran to its end counts (not a stop, nor an attempt that
/// failed before its kernel ran).
pub fn kernel_pace(previous: Option<Duration>, ran: Duration) -> Duration {
    previous.map_or(ran, |pace| ran.max(pace - pace / 4))
}

/// Messages to hold beyond the slots, given the kernels' pace (`None`: no
/// kernel has ended yet, see [`kernel_pace`]) and whether the queue is
/// short (the last receive got fewer messages than it asked for, as SQS
/// often answers a queue of fewer than a thousand): what the slots get
/// through in [`AHEAD`], at most a receive's worth. None while the queue
/// is short: work held ahead by one worker would wait while another's
/// slots idle.
pub fn held_ahead(slots: usize, pace: Option<Duration>, queue_short: bool) -> usize {
    let Some(kernel) = pace.filter(|_| !queue_short) else {
        return 0;
    };
    let per_slot = AHEAD.as_millis() / kernel.as_millis().max(1);
    usize::try_from(per_slot)
        .unwrap_or(usize::MAX)
        .saturating_mul(slots)
        .min(SQS_BATCH_ENTRIES)
}

/// How many messages to ask for while `unfinished` tasks are held (received,
/// their kernel not ended), or `None` to wait for a kernel to end first. A
/// worker that holds work ahead receives again only once its slots have
/// taken all of it, so that a receive asks for a batch's worth, not for
/// the one or two slots just freed.
pub fn to_receive(slots: usize, ahead: usize, unfinished: usize) -> Option<usize> {
    let free = (slots + ahead).saturating_sub(unfinished);
    (free > 0 && free >= ahead).then_some(free.min(SQS_BATCH_ENTRIES))
}

/// How often a worker looks for held messages to extend, for a queue's
/// visibility timeout: a twelfth of it (a look that finds nothing due asks
/// nothing), so that a failed extension is tried again three times before
/// the message would surface.
pub fn heartbeat_every(visibility: Duration) -> Duration {
    (visibility / 12).max(Duration::from_millis(10))
}

/// Whether a held message, still hidden for `hidden_for`, must have its
/// visibility extended: less than a third of the timeout is left. A
/// heartbeat that finds one such message extends every held message to the
/// timeout in the same calls, so a message held for less than two thirds
/// of the timeout is never extended, and most are extended together.
pub fn needs_extending(hidden_for: Duration, visibility: Duration) -> bool {
    hidden_for < visibility / 3
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn work_is_held_ahead_only_once_the_pace_is_known_for_short_kernels_from_a_full_queue() {
        assert_eq!(held_ahead(2, None, false), 0);
        assert_eq!(held_ahead(2, Some(10 * SECOND), false), 6);
        assert_eq!(
            held_ahead(2, Some(Duration::ZERO), false),
            SQS_BATCH_ENTRIES
        );
        assert_eq!(held_ahead(2, Some(20 * SECOND), false), 2);
        assert_eq!(held_ahead(2, Some(31 * SECOND), false), 0);
        assert_eq!(held_ahead(64, Some(29 * SECOND), false), SQS_BATCH_ENTRIES);
        assert_eq!(
            held_ahead(2, Some(10 * SECOND), true),
            0,
            "the queue is short"
        );
    }

    #[test]
    fn the_pace_follows_a_slower_kernel_at_once_and_a_quicker_one_slowly() {
        let hour = 3600 * SECOND;
        assert_eq!(kernel_pace(None, 10 * SECOND), 10 * SECOND);
        assert_eq!(kernel_pace(Some(10 * SECOND), hour), hour);
        // One quick task among hour-long ones holds nothing ahead.
        let after_one_quick = kernel_pace(Some(hour), Duration::ZERO);
        assert_eq!(held_ahead(2, Some(after_one_quick), false), 0);
        // A run of quick ones wears it down.
        let worn = (0..20).fold(hour, |pace, _| kernel_pace(Some(pace), SECOND));
        assert!(held_ahead(2, Some(worn), false) > 0, "{worn:?}");
    }

    #[test]
    fn a_worker_holding_work_ahead_receives_a_batch_once_its_slots_took_it() {
        // No pace yet: one message per free slot.
        assert_eq!(to_receive(2, 0, 0), Some(2));
        assert_eq!(to_receive(2, 0, 1), Some(1));
        assert_eq!(to_receive(2, 0, 2), None);
        // Six ahead: a receive of eight to start, none while any waits for
        // a slot, then six or more.
        assert_eq!(to_receive(2, 6, 0), Some(8));
        assert_eq!(to_receive(2, 6, 3), None);
        assert_eq!(to_receive(2, 6, 2), Some(6));
        assert_eq!(to_receive(2, 10, 1), Some(SQS_BATCH_ENTRIES));
    }

    #[test]
    fn only_a_message_that_would_surface_before_the_next_beat_needs_one() {
        let visibility = 120 * SECOND;
        assert!(!needs_extending(120 * SECOND, visibility));
        assert!(!needs_extending(41 * SECOND, visibility));
        assert!(needs_extending(39 * SECOND, visibility));
        assert!(needs_extending(Duration::ZERO, visibility));
        // Three more looks before it would surface.
        assert_eq!(heartbeat_every(visibility), 10 * SECOND);
    }
}

//! AWS's size limits, budgeted in one place: what may travel inline, where
//! the rest is stored (the claim check, for payloads, results and
//! checkpoints alike), and how messages are grouped into SQS batches.

/// DynamoDB's largest item, names and values of every attribute included.
pub const ITEM_LIMIT: usize = 400 * 1024;
/// What a task item holds besides its payload and result: keys, ids,
/// timestamps, counters, the bounded summary and error, seen event ids.
pub const ITEM_OVERHEAD: usize = 24 * 1024;
/// SQS's largest message, and largest `SendMessageBatch` request in all.
pub const SQS_MESSAGE_LIMIT: usize = 1024 * 1024;
/// What a message holds besides its inline payload or result.
pub const ENVELOPE_OVERHEAD: usize = 8 * 1024;
/// Entries in one SQS batch call.
pub const SQS_BATCH_ENTRIES: usize = 10;
/// A result's one-line summary, as stored.
pub const SUMMARY_LIMIT: usize = 1024;
/// An error, as stored and reported.
pub const ERROR_LIMIT: usize = 4 * 1024;

/// Why a task FAILED whose result the table refused for its size.
pub const RESULT_TOO_LARGE: &str =
    "the result could not be recorded: it does not fit the task item (DynamoDB's 400 KB)";

/// Decides what travels inline and names the objects that hold the rest.
/// Key layout: `payloads/<task>.json` (written by the API before the task
/// has a run), and under `runs/<run>/`: `results/<task>/<delivery>.json`
/// and `checkpoints/<task>.bin`, so a run's objects can be found by prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClaimCheck {
    inline_limit: usize,
}

impl ClaimCheck {
    /// `inline_limit` is the operator's setting (`InlineLimitBytes`); the
    /// budgets of the item and of a message cap it further.
    pub fn new(inline_limit: usize) -> Self {
        Self { inline_limit }
    }

    /// Whether a payload of `bytes` (its JSON text) stays in the task item
    /// and its message: half of the item's room, so a result fits beside it.
    pub fn payload_inline(&self, bytes: usize) -> bool {
        bytes
            <= self
                .inline_limit
                .min(Self::message_room())
                .min(Self::item_room() / 2)
    }

    /// Whether a result of `bytes` stays inline next to a payload of
    /// `payload_inline_bytes` (0 when the payload is stored): both must fit
    /// the item, and the result its message.
    pub fn result_inline(&self, bytes: usize, payload_inline_bytes: usize) -> bool {
        bytes <= self.inline_limit.min(Self::message_room())
            && bytes.saturating_add(payload_inline_bytes) <= Self::item_room()
    }

    fn item_room() -> usize {
        ITEM_LIMIT - ITEM_OVERHEAD
    }

    fn message_room() -> usize {
        SQS_MESSAGE_LIMIT - ENVELOPE_OVERHEAD
    }

    pub fn payload_key(task_id: &str) -> String {
        format!("payloads/{task_id}.json")
    }

    /// One object per delivery, so a duplicate run never overwrites the
    /// result that was recorded.
    pub fn result_key(run_id: &str, task_id: &str, delivery: &str) -> String {
        format!("runs/{run_id}/results/{task_id}/{delivery}.json")
    }

    pub fn checkpoint_key(run_id: &str, task_id: &str) -> String {
        format!("runs/{run_id}/checkpoints/{task_id}.bin")
    }

    /// Where every object of a run is.
    pub fn run_prefix(run_id: &str) -> String {
        format!("runs/{run_id}/")
    }

    /// The task an object of a run belongs to.
    pub fn task_of_run_object<'a>(run_id: &str, key: &'a str) -> Option<&'a str> {
        let rest = key
            .strip_prefix("runs/")?
            .strip_prefix(run_id)?
            .strip_prefix('/')?;
        let (_, rest) = rest.split_once('/')?;
        let task = rest.split('/').next()?;
        Some(task.strip_suffix(".bin").unwrap_or(task))
    }
}

/// Cuts `text` to at most `limit` bytes on a character boundary, marking
/// the cut.
pub fn bounded(text: &str, limit: usize) -> String {
    if text.len() <= limit {
        return text.to_owned();
    }
    let marker = "…";
    let mut end = limit.saturating_sub(marker.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{marker}", &text[..end])
}

/// Groups entries into SQS batches: at most 10 each, and at most 1 MiB of
/// bodies in all, in order. An entry over the limit alone still gets a batch
/// of its own (SQS then refuses that entry, not its neighbours).
pub fn sqs_batches<T>(entries: Vec<T>, bytes: impl Fn(&T) -> usize) -> Vec<Vec<T>> {
    batches(entries, SQS_BATCH_ENTRIES, SQS_MESSAGE_LIMIT, bytes)
}

/// Groups entries, in order, into batches of at most `most` entries and
/// `most_bytes` in all; an entry over `most_bytes` alone gets a batch of
/// its own.
pub fn batches<T>(
    entries: Vec<T>,
    most: usize,
    most_bytes: usize,
    bytes: impl Fn(&T) -> usize,
) -> Vec<Vec<T>> {
    let mut batches: Vec<Vec<T>> = Vec::new();
    let mut current: Vec<T> = Vec::new();
    let mut current_bytes = 0;
    for entry in entries {
        let size = bytes(&entry);
        if !current.is_empty() && (current.len() >= most || current_bytes + size > most_bytes) {
            batches.push(std::mem::take(&mut current));
            current_bytes = 0;
        }
        current_bytes += size;
        current.push(entry);
    }
    if !current.is_empty() {
        batches.push(current);
    }
    batches
}

#[cfg(test)]
mod tests {
    use super::*;

    const KIB: usize = 1024;

    #[test]
    fn payload_and_result_together_fit_the_item() {
        let check = ClaimCheck::new(200 * KIB);
        for (payload, result) in [
            (100 * KIB, 100 * KIB),
            (190 * KIB, 190 * KIB),
            (150 * KIB, 200 * KIB),
        ] {
            let payload_inline = check.payload_inline(payload);
            let carried = if payload_inline { payload } else { 0 };
            let result_inline = check.result_inline(result, carried);
            let in_item = carried + if result_inline { result } else { 0 };
            assert!(
                in_item + ITEM_OVERHEAD <= ITEM_LIMIT,
                "{payload} + {result}: {in_item} inline"
            );
        }
        assert!(!check.payload_inline(210 * KIB));
        assert!(check.result_inline(190 * KIB, 0));
    }

    #[test]
    fn an_operator_limit_over_the_budgets_is_capped() {
        let check = ClaimCheck::new(1024 * KIB);
        assert!(!check.payload_inline(300 * KIB), "half the item at most");
        assert!(!check.result_inline(SQS_MESSAGE_LIMIT, 0));
    }

    #[test]
    fn batches_are_split_by_count_and_by_bytes() {
        let sizes = vec![105 * KIB; 12];
        let batches = sqs_batches(sizes.clone(), |s| *s);
        assert_eq!(
            batches.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![9, 3],
            "ten of 105 KiB exceed 1 MiB"
        );
        let small = sqs_batches(vec![1; 25], |s| *s);
        assert_eq!(
            small.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![10, 10, 5]
        );
        let huge = sqs_batches(vec![2 * SQS_MESSAGE_LIMIT, 1], |s| *s);
        assert_eq!(huge.len(), 2);
        for batch in sqs_batches(vec![180 * KIB; 6], |s| *s) {
            assert!(batch.iter().sum::<usize>() <= SQS_MESSAGE_LIMIT);
        }
    }

    #[test]
    fn objects_of_a_run_name_their_task() {
        let result = ClaimCheck::result_key("r1", "t1", "m-1");
        let checkpoint = ClaimCheck::checkpoint_key("r1", "t2");
        assert!(result.starts_with(&ClaimCheck::run_prefix("r1")));
        assert_eq!(ClaimCheck::task_of_run_object("r1", &result), Some("t1"));
        assert_eq!(
            ClaimCheck::task_of_run_object("r1", &checkpoint),
            Some("t2")
        );
        assert_eq!(ClaimCheck::task_of_run_object("r2", &result), None);
    }

    #[test]
    fn bounded_text_keeps_whole_characters() {
        assert_eq!(bounded("short", 10), "short");
        let cut = bounded(&"é".repeat(100), 11);
        assert!(cut.len() <= 11 && cut.ends_with('…'), "{cut}");
    }
}

//! Backoff with full jitter, for the retries nightshift makes itself (the
//! SDK already retries throttling and 5xx a few times per call): conflicting
//! transactions and the unprocessed entries of batch calls.

use std::time::Duration;

/// How many times a transient failure is retried before it is returned.
pub const ATTEMPTS: u32 = 8;
const BASE: Duration = Duration::from_millis(25);
const CAP: Duration = Duration::from_secs(2);

/// Sleeps before retry number `attempt` (0 for the first retry): a random
/// time up to `BASE · 2^attempt`, capped.
pub async fn pause(attempt: u32) {
    let ceiling = BASE.saturating_mul(1 << attempt.min(16)).min(CAP);
    let millis = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
    tokio::time::sleep(Duration::from_millis(fastrand::u64(0..=millis))).await;
}

//! The scale model at CI's size: the properties the full night is run for
//! (`make bench-scale`), on a night that takes seconds to simulate.

use std::time::Duration;

use nightshift_scale::{Night, simulate};

/// 10,000 tasks of 10 s on 50 two-slot instances (1,000 s of work per
/// slot), with the template's defaults.
fn night() -> Night {
    Night {
        tasks: 10_000,
        instances: 50,
        ..Night::full()
    }
}

#[test]
fn every_slot_stays_busy_and_every_result_is_recorded_once() {
    let outcome = simulate(night()).expect("the model ran to the run's close");
    let table = outcome.table();
    assert_eq!(outcome.run.queued, 10_000, "{table}");
    assert_eq!(outcome.run.done, 10_000, "{table}");
    assert_eq!(
        outcome.lags.len(),
        10_000,
        "each result recorded once\n{table}"
    );
    assert!(outcome.closed.is_some(), "{table}");
    assert!(
        outcome.makespan_ratio() <= 1.05,
        "makespan {:.3} × Σ task ÷ slots\n{table}",
        outcome.makespan_ratio()
    );
    assert!(outcome.tally.failed.is_empty(), "{table}");
    // A result waits at most the worker's window to fill its batch, then
    // 5 s for the event source's, and is recorded in a batch.
    let most_lag = nightshift_core::pace::RESULT_WINDOW + Duration::from_secs(10);
    assert!(outcome.lag(0.99) < most_lag, "{table}");
    assert!(
        outcome.collector.messages >= 5 * outcome.collector.invocations,
        "{table}"
    );
    // The requests of the whole night, the event source's included: most
    // carry full batches.
    assert!(outcome.calls_per_task(None) <= 1.0, "{table}");
}

#[test]
fn under_throttling_every_result_is_still_recorded_once_however_often_it_ran() {
    let mut night = night();
    night.tasks = 3_000;
    // A tenth of DynamoDB's partition limit and no retry in the client:
    // the run item's partition throttles, requests fail, the collector
    // returns those messages and records them at their next delivery, and
    // a pass that could not mark what it sent sends it again.
    night.limits.partition_wcu = 100.0;
    night.limits.attempts = 1;
    let outcome = simulate(night).expect("the model ran to the run's close");
    let table = outcome.table();
    assert!(!outcome.tally.failed.is_empty(), "requests failed\n{table}");
    assert_eq!(outcome.run.done, 3_000, "{table}");
    assert_eq!(
        outcome.lags.len(),
        3_000,
        "each result recorded once\n{table}"
    );
    assert!(outcome.kernel_runs > 3_000, "tasks sent again\n{table}");
    assert!(outcome.peak_run_wcu() <= 100.0, "{table}");
}

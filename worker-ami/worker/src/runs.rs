//! What the worker knows of runs: whether a message's run is still open
//! (a message of a finished or cancelled run is dropped), and whether the
//! run it works for has tasks waiting for the next dispatcher pass (so an
//! idle worker waits for them rather than stop and be replaced).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use nightshift_core::pace::RUN_STATE_FRESH;
use nightshift_core::ports::RunReader;
use nightshift_core::{Run, RunState};

pub(crate) struct RunGate {
    runs: Arc<dyn RunReader>,
    seen: Mutex<Seen>,
}

#[derive(Default)]
struct Seen {
    /// The run last worked for (or the one the instance was launched for).
    current: Option<String>,
    states: HashMap<String, (Instant, Option<Run>)>,
}

impl RunGate {
    pub fn new(runs: Arc<dyn RunReader>, launched_for: Option<String>) -> Self {
        Self {
            runs,
            seen: Mutex::new(Seen {
                current: launched_for,
                states: HashMap::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The run, read at most every few seconds. A read that fails counts
    /// as "unknown" and admits the work: the collector still records each
    /// result once.
    async fn run(&self, run_id: &str) -> Option<Option<Run>> {
        if let Some((at, run)) = self.lock().states.get(run_id)
            && at.elapsed() < RUN_STATE_FRESH
        {
            return Some(run.clone());
        }
        match self.runs.run(run_id).await {
            Ok(run) => {
                self.lock()
                    .states
                    .insert(run_id.to_owned(), (Instant::now(), run.clone()));
                Some(run)
            }
            Err(error) => {
                tracing::warn!(run_id, error = %error.chain(), "could not read the run");
                None
            }
        }
    }

    /// Whether a message of `run_id` should run: unless its run is known to
    /// be over.
    pub async fn admits(&self, run_id: &str) -> bool {
        self.lock().current = Some(run_id.to_owned());
        match self.run(run_id).await {
            Some(Some(run)) => run.state == RunState::Open,
            Some(None) | None => true,
        }
    }

    /// Whether the run this worker works for is open with tasks waiting
    /// for the next dispatcher pass.
    pub async fn work_waiting(&self) -> bool {
        let Some(run_id) = self.lock().current.clone() else {
            return false;
        };
        // Read anew: the idle check is rare and must see the latest pass.
        self.lock().states.remove(&run_id);
        matches!(self.run(&run_id).await, Some(Some(run)) if run.state == RunState::Open && run.waiting)
    }
}

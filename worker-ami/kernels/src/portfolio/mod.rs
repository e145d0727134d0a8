//! `portfolio-risk`: Monte Carlo value at risk and expected shortfall of a
//! portfolio of shares and European options.
//!
//! Payload (see `input.rs` for every field and bound):
//! ```json
//! {"account": "acme", "seed": 7, "rate": 0.03, "horizon_days": 10,
//!  "paths": 20000, "confidence": [0.95, 0.99], "histogram_bins": 32,
//!  "assets": [{"name": "TECH00", "price": 101.5, "vol": 0.25, "drift": 0.05}],
//!  "correlation": [[1.0]],
//!  "positions": [{"asset": "TECH00", "quantity": 1000},
//!                {"asset": "TECH00", "quantity": -20, "kind": "call",
//!                 "strike": 105, "expiry_days": 60}]}
//! ```
//! Result: `value` today; `pnl` mean and standard deviation; per level `var`
//! and `es` (as positive losses) with `es_contributions` per position (in
//! payload order, summing to `es`); a P&L histogram; and the Monte Carlo
//! standard error of every figure (`*_se`).
//!
//! The same payload gives the same bits on any machine, with any number of
//! threads, and whether or not the run was interrupted and resumed.

mod checkpoint;
mod demo;
mod input;
mod isa;
mod job;
mod linalg;
mod math;
mod model;
mod report;
mod rng;
mod tally;
#[cfg(test)]
mod tests;

use serde_json::Value;

pub use demo::{bench_payload, demo_payload, sized_payload};

use crate::{Control, Kernel, KernelError, Outcome};
use isa::Isa;
use job::Job;
use tally::Tally;

/// The name tasks use for this kernel.
pub const NAME: &str = "portfolio-risk";

#[derive(Debug, Clone, Copy)]
pub struct PortfolioKernel {
    /// The most paths a task may ask for.
    pub max_paths: u64,
}

impl PortfolioKernel {
    pub const DEFAULT_MAX_PATHS: u64 = 10_000_000;

    /// Runs until done or until `stop` turns true (looked at between chunks).
    fn run_until(
        &self,
        payload: &Value,
        checkpoint: Option<&[u8]>,
        stop: &(dyn Fn() -> bool + Sync),
    ) -> Result<Outcome, KernelError> {
        let spec = input::parse(payload, self.max_paths)?;
        let job = Job::new(&spec, Isa::detect());
        // Only checkpoints need it, and a run without any should not wait for it.
        let fingerprint = || rng::hash(job.paths, payload.to_string().as_bytes());
        let mut tally = match checkpoint {
            Some(bytes) => checkpoint::decode(bytes, &job, fingerprint())?,
            None => Tally::new(job.bins.count),
        };
        if !job.advance(&mut tally, stop) {
            let checkpoint = checkpoint::encode(&tally, fingerprint());
            return Ok(Outcome::Stopped {
                checkpoint: Some(checkpoint),
            });
        }
        let (result, summary) = report::report(&job, &tally);
        Ok(Outcome::Done { result, summary })
    }
}

impl Default for PortfolioKernel {
    fn default() -> Self {
        Self {
            max_paths: Self::DEFAULT_MAX_PATHS,
        }
    }
}

impl Kernel for PortfolioKernel {
    fn run(
        &self,
        payload: &Value,
        checkpoint: Option<&[u8]>,
        control: &Control,
    ) -> Result<Outcome, KernelError> {
        self.run_until(payload, checkpoint, &|| control.should_stop())
    }
}

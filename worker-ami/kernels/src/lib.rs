//! The compute kernels a nightshift worker can run.
//!
//! A kernel is plain, synchronous, CPU-bound code: it takes the task's JSON
//! payload (and, when resuming, the checkpoint an earlier attempt saved) and
//! returns a JSON result. The worker runs it on a blocking thread and watches
//! [`Control`] on its behalf: when the instance is about to be reclaimed, the
//! kernel stops at its next safe point and hands back a checkpoint.

pub mod portfolio;
mod program;
mod sleep;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::Value;

pub use portfolio::PortfolioKernel;
pub use program::{ProgramConfigError, ProgramKernel, ProgramSpec};
pub use sleep::SleepKernel;

/// The kernel a task runs when it names none.
pub const DEFAULT_KERNEL: &str = "sleep";

/// Why a kernel did not produce a result.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// The input can never succeed (bad payload, invalid parameters): the
    /// task fails at once, without retries.
    #[error("invalid input: {0}")]
    Permanent(String),
    /// Something that may work on another attempt (a program crashed, ran
    /// out of time): the task's message goes back to the queue.
    #[error("{0}")]
    Retryable(String),
}

/// What a kernel run ended with.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The task is complete; `summary` is one short line for the report.
    Done { result: Value, summary: String },
    /// Stopped early because [`Control::should_stop`] turned true. The
    /// checkpoint, if any, lets the next attempt resume where this one ended.
    Stopped { checkpoint: Option<Vec<u8>> },
}

/// Shared between the worker and a running kernel: the worker asks the kernel
/// to stop (spot interruption, shutdown); the kernel polls at safe points.
#[derive(Debug, Clone, Default)]
pub struct Control {
    stop: Arc<AtomicBool>,
}

impl Control {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    pub fn should_stop(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
}

/// One named computation.
pub trait Kernel: Send + Sync {
    /// Runs the kernel on `payload`, resuming from `checkpoint` when given.
    fn run(
        &self,
        payload: &Value,
        checkpoint: Option<&[u8]>,
        control: &Control,
    ) -> Result<Outcome, KernelError>;
}

/// The kernels a worker offers, by name.
#[derive(Clone, Default)]
pub struct Registry {
    kernels: BTreeMap<String, Arc<dyn Kernel>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.kernels.keys()).finish()
    }
}

impl Registry {
    /// The kernels built into every worker.
    pub fn builtin() -> Self {
        let mut registry = Self::default();
        registry.insert("sleep", SleepKernel);
        registry.insert(portfolio::NAME, PortfolioKernel::default());
        registry
    }

    /// The built-in kernels and the programs of the worker's configuration,
    /// each under its name. A program may not take a built-in kernel's name.
    pub fn with_programs(
        programs: impl IntoIterator<Item = (String, ProgramSpec)>,
    ) -> Result<Self, ProgramConfigError> {
        let mut registry = Self::builtin();
        for (name, spec) in programs {
            if registry.kernels.contains_key(&name) {
                return Err(ProgramConfigError {
                    name,
                    reason: "a built-in kernel or another program has this name".into(),
                });
            }
            let kernel = ProgramKernel::new(&name, spec)?;
            registry.insert(&name, kernel);
        }
        Ok(registry)
    }

    pub fn insert(&mut self, name: &str, kernel: impl Kernel + 'static) {
        self.kernels.insert(name.to_owned(), Arc::new(kernel));
    }

    pub fn get(&self, name: &str) -> Option<Arc<dyn Kernel>> {
        self.kernels.get(name).cloned()
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.kernels.keys().map(String::as_str)
    }
}

/// Names of the kernels built into every worker; the API accepts these.
pub fn builtin_names() -> Vec<String> {
    Registry::builtin().names().map(str::to_owned).collect()
}

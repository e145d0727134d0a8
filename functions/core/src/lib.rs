//! nightshift's domain: tasks and runs, the messages that move them, and the
//! ports (narrow traits) through which the functions and the worker reach
//! storage, queues and compute. AWS adapters for each port live in [`aws`],
//! each behind the cargo feature of its SDK crate, so a crate compiles only
//! the clients it calls. Domain code never sees an AWS type.

pub mod config;
pub mod cost;
mod error;
pub mod limits;
pub mod message;
pub mod metrics;
pub mod model;
pub mod night;
pub mod pace;
pub mod plan;
pub mod ports;
pub mod retry;
pub mod rules;

#[cfg(feature = "aws")]
pub mod aws;
#[cfg(any(test, feature = "fakes"))]
pub mod conformance;
#[cfg(any(test, feature = "fakes"))]
pub mod fakes;

pub use error::Error;
pub use message::{AttemptEvent, Envelope, TaskMessage, TaskOutcome, TaskResult, UsageReport};
pub use model::{
    AttemptKind, AttemptRecord, Blob, InstanceSeen, KernelStats, Launched, NewTask, PendingTask,
    Progress, Run, RunState, SpotPrice, Task, TaskStatus, Usage,
};

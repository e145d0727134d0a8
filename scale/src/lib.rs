//! The scale model: a night of many tasks on many instances, run in
//! virtual time against a model of AWS (latencies, per-partition capacity,
//! SQS's and Lambda's limits), through the real dispatcher and collector.
//! Workers are modelled (receive, run for the task's time, batch results
//! and deletes); the dispatcher's passes and the collector's batches are
//! the functions' own code, on the in-memory store that keeps the table's
//! rules.

pub mod clock;
pub mod cloud;
mod event_source;
pub mod night;
pub mod report;
pub mod services;
mod worker;

pub use night::{Night, Outcome, simulate};

//! `nightshift-scale`: runs the scale model and prints its table.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use nightshift_scale::{Night, simulate};

/// A night of many tasks on many instances, in virtual time, through the
/// real dispatcher and collector against a model of AWS.
#[derive(Debug, Parser)]
struct Args {
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..))]
    tasks: u64,
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..))]
    instances: u32,
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    slots: u32,
    /// Each task's kernel time, in seconds.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    task_seconds: u64,
    /// The dispatcher's cap on a run's queued tasks (MaxQueuedPerRun).
    #[arg(long)]
    max_queued: Option<u64>,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let mut night = Night::full();
    night.tasks = usize::try_from(args.tasks).unwrap_or(usize::MAX);
    night.instances = args.instances;
    night.slots_per_instance = args.slots;
    night.task_time = Duration::from_secs(args.task_seconds);
    night.seed = args.seed;
    if let Some(max_queued) = args.max_queued {
        night.max_queued = max_queued;
    }
    match simulate(night) {
        Some(outcome) => {
            print!("{}", outcome.table());
            ExitCode::SUCCESS
        }
        None => {
            eprintln!(
                "nightshift-scale: the model stalled (every task waits and no timer is armed)"
            );
            ExitCode::FAILURE
        }
    }
}

//! The collector as Lambda runs it from the result queue: an SQS event
//! source that gathers batches of up to 100 (waiting up to 5 s to fill
//! one, as the template sets it), invokes the real collector on each, charges the invocation to the
//! run as the function does, and deletes what was recorded. It starts with
//! five pollers and adds more while messages wait, at Lambda's published
//! pace, up to its limit, the account's concurrency and the template's
//! `MaximumConcurrency`.

use std::rc::Rc;
use std::time::Duration;

use futures::task::LocalSpawnExt;
use nightshift_collector::{Incoming, collect};
use nightshift_core::Usage;
use nightshift_core::limits::SQS_BATCH_ENTRIES;
use nightshift_core::ports::{Queue, Received, charge};

use crate::night::World;

const FIRST_POLLERS: usize = 5;
/// The template's `BatchSize` and `MaximumBatchingWindowInSeconds`.
const BATCH: usize = 100;
const BATCH_WINDOW: Duration = Duration::from_secs(5);
const LONG_POLL: Duration = Duration::from_secs(20);
/// The collector's memory, as the template gives it (the default).
const MEMORY_MB: u32 = 128;

/// Runs the event source until the night is over.
pub async fn run(world: Rc<World>) {
    let limits = &world.cloud.limits;
    let limit = limits
        .sqs_max_pollers
        .min(limits.lambda_concurrency)
        .min(limits.collector_concurrency);
    for _ in 0..FIRST_POLLERS.min(limit) {
        add_poller(&world);
    }
    let step = Duration::from_secs(1);
    let per_step = (limits.sqs_scale_per_minute / 60).max(1);
    while !world.is_over() {
        world.cloud.clock.sleep(step).await;
        if world.results.visible() > SQS_BATCH_ENTRIES {
            let pollers = world.collector.borrow().pollers;
            for _ in 0..per_step.min(limit.saturating_sub(pollers)) {
                add_poller(&world);
            }
        }
    }
}

fn add_poller(world: &Rc<World>) {
    world.collector.borrow_mut().add_poller();
    let _ = world.spawner.spawn_local(poll(Rc::clone(world)));
}

async fn poll(world: Rc<World>) {
    while !world.is_over() {
        let mut batch = match world.results.receive(10, LONG_POLL).await {
            Ok(batch) => batch,
            Err(_) => continue,
        };
        if batch.is_empty() {
            // An idle poller goes, down to the first few.
            if world.collector.borrow().pollers > FIRST_POLLERS {
                break;
            }
            continue;
        }
        let until = world.cloud.clock.now() + BATCH_WINDOW;
        while batch.len() < BATCH && world.cloud.clock.now() < until {
            let left = until - world.cloud.clock.now();
            let room = (BATCH - batch.len()).min(SQS_BATCH_ENTRIES) as u32;
            match world.results.receive(room, left).await {
                Ok(more) => batch.extend(more),
                Err(_) => break,
            }
        }
        invoke(&world, batch).await;
    }
    world.collector.borrow_mut().pollers -= 1;
}

/// One invocation of the collector function on a batch.
async fn invoke(world: &World, batch: Vec<Received>) {
    let started = world.cloud.clock.now();
    world.collector.borrow_mut().begin(batch.len());
    let incoming: Vec<Incoming> = batch.iter().map(Incoming::from).collect();
    let collected = collect(&*world.store, &incoming).await;
    let used = Usage::invocation(world.cloud.clock.now() - started, MEMORY_MB);
    charge(
        &*world.store,
        collected.runs.first().map(String::as_str),
        &used,
    )
    .await;
    world.collector.borrow_mut().end(collected.retry.len());
    // What is to be retried shows again after its visibility timeout.
    let done: Vec<String> = batch
        .into_iter()
        .filter(|m| !collected.retry.contains(&m.message_id))
        .map(|m| m.receipt)
        .collect();
    for receipts in done.chunks(SQS_BATCH_ENTRIES) {
        let _ = world.results.delete_batch(receipts).await;
    }
}

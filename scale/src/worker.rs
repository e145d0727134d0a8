//! A worker instance as the model runs it: the daemon's loop reduced to
//! what moves requests and time. It receives as many messages as it has
//! free slots (long polls of 20 s), runs each kernel for the task's time,
//! gathers finished tasks for up to a second to send their results and
//! then delete their messages in batches, and stops when the queue has
//! been empty for its idle time.

use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;

use futures::StreamExt;
use futures::channel::mpsc;
use futures::future::{Either, select};
use futures::task::LocalSpawnExt;
use nightshift_core::limits::SQS_BATCH_ENTRIES;
use nightshift_core::ports::{Outgoing, Queue, Received, RunReader};
use nightshift_core::{Blob, Envelope, RunState, TaskOutcome, TaskResult};

use crate::night::World;

/// How long finished tasks wait to share a batch (the daemon's window).
const FINISH_WINDOW: Duration = Duration::from_secs(1);
/// The daemon's long poll.
const WAIT: Duration = Duration::from_secs(20);
/// How long the daemon trusts a run's state.
const RUN_FRESH: Duration = Duration::from_secs(15);

/// A task the worker ran: its message and its result.
struct Finished {
    receipt: String,
    result: TaskResult,
}

/// Runs one instance's worker from its boot to its stop.
pub async fn work(world: Rc<World>, instance_id: String, slots: usize) {
    let (finished, batches) = mpsc::unbounded::<Finished>();
    let reporter = world
        .spawner
        .spawn_local_with_handle(report(Rc::clone(&world), batches))
        .ok();
    let (freed_tx, mut freed) = mpsc::unbounded::<()>();
    let running = Rc::new(Cell::new(0_usize));
    let mut idle_since = world.cloud.clock.now();
    let mut run_read_at: Option<Duration> = None;
    loop {
        let free = slots - running.get();
        if free == 0 {
            freed.next().await;
            continue;
        }
        let received = match world.tasks.receive(free as u32, WAIT).await {
            Ok(received) => received,
            Err(_) => {
                world.cloud.clock.sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let now = world.cloud.clock.now();
        if received.is_empty() {
            if running.get() == 0 && now - idle_since >= world.settings.worker_idle {
                // Read anew: it stops unless the run has work waiting.
                let run = world.store.run(&world.run_id()).await;
                if matches!(run, Ok(Some(run)) if run.state == RunState::Open && run.waiting) {
                    idle_since = world.cloud.clock.now();
                    continue;
                }
                break;
            }
            continue;
        }
        idle_since = now;
        // The daemon trusts a run's state for 15 s, then reads it again, to
        // drop messages of a run no longer open.
        if run_read_at.is_none_or(|at| now - at >= RUN_FRESH) {
            let _ = world.store.run(&world.run_id()).await;
            run_read_at = Some(now);
        }
        for message in received {
            running.set(running.get() + 1);
            let kernel = run_kernel(
                Rc::clone(&world),
                message,
                instance_id.clone(),
                finished.clone(),
            );
            let (running, freed_tx) = (Rc::clone(&running), freed_tx.clone());
            let _ = world.spawner.spawn_local(async move {
                kernel.await;
                running.set(running.get() - 1);
                let _ = freed_tx.unbounded_send(());
            });
        }
    }
    drop(finished);
    if let Some(reporter) = reporter {
        reporter.await;
    }
    // The instance powers itself off.
    world.fleet.lose(&instance_id);
}

async fn run_kernel(
    world: Rc<World>,
    message: Received,
    instance_id: String,
    finished: mpsc::UnboundedSender<Finished>,
) {
    let Ok(Envelope::Task(task)) = Envelope::from_json(&message.body) else {
        return;
    };
    let started = world.now();
    world.cloud.clock.sleep(world.settings.task_time).await;
    let ended = world.now();
    world.note_kernel(started, ended);
    let result = TaskResult {
        task_id: task.task_id,
        run_id: task.run_id,
        kernel: task.kernel,
        instance_id,
        attempts: message.receive_count,
        started_at: started,
        finished_at: ended,
        outcome: TaskOutcome::Done {
            result: Blob::json(&serde_json::json!({"value": 1})),
            summary: "ok".to_owned(),
        },
    };
    let _ = finished.unbounded_send(Finished {
        receipt: message.receipt,
        result,
    });
}

/// Sends results and then deletes their tasks' messages, a window's
/// worth at a time.
async fn report(world: Rc<World>, mut finished: mpsc::UnboundedReceiver<Finished>) {
    while let Some(first) = finished.next().await {
        let mut batch = vec![first];
        let until = world.cloud.clock.now() + FINISH_WINDOW;
        while batch.len() < SQS_BATCH_ENTRIES {
            match select(finished.next(), world.cloud.clock.sleep_until(until)).await {
                Either::Left((Some(next), _)) => batch.push(next),
                Either::Left((None, _)) | Either::Right(_) => break,
            }
        }
        let outgoing: Vec<Outgoing> = batch
            .iter()
            .enumerate()
            .map(|(i, f)| Outgoing {
                id: i.to_string(),
                body: Envelope::Result(f.result.clone()).to_json(),
            })
            .collect();
        while world.results.send_batch(&outgoing).await.is_err() {
            world.cloud.clock.sleep(Duration::from_secs(1)).await;
        }
        let receipts: Vec<String> = batch.into_iter().map(|f| f.receipt).collect();
        let _ = world.tasks.delete_batch(&receipts).await;
    }
}

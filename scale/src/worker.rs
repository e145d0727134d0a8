//! A worker instance as the model runs it: the daemon's loop reduced to
//! what moves requests and time, paced by the daemon's own rules
//! (`nightshift_core::pace`). It holds work ahead of its slots once it knows
//! the kernels' pace and receives a batch's worth when its slots have taken
//! it; it runs each kernel for the task's time; a finished task's result
//! waits for others while the worker has tasks unfinished, then the batch
//! is sent and its messages deleted; a heartbeat extends the held messages
//! when one is about to surface; it reads its run once a while, and stops
//! when the queue has been empty for its idle time.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::time::Duration;

use futures::StreamExt;
use futures::channel::mpsc;
use futures::future::{Either, select};
use futures::task::LocalSpawnExt;
use nightshift_core::limits::SQS_BATCH_ENTRIES;
use nightshift_core::pace;
use nightshift_core::ports::{Outgoing, Queue, Received, RunReader};
use nightshift_core::{Blob, Envelope, RunState, TaskOutcome, TaskResult};

use crate::night::World;

/// The daemon's long poll.
const WAIT: Duration = Duration::from_secs(20);

/// A task the worker ran: its message and its result.
struct Finished {
    receipt: String,
    result: TaskResult,
}

/// What one instance's worker holds.
#[derive(Default)]
struct Holding {
    /// Received, waiting for a slot.
    ahead: VecDeque<Received>,
    running: usize,
    /// See `pace::kernel_pace`.
    kernel_pace: Option<Duration>,
    /// The last receive got fewer messages than it asked for.
    queue_short: bool,
    /// Every message held, by receipt: until when it stays hidden.
    hidden_until: HashMap<String, Duration>,
    stopped: bool,
}

impl Holding {
    fn unfinished(&self) -> usize {
        self.ahead.len() + self.running
    }
}

/// Runs one instance's worker from its boot to its stop.
pub async fn work(world: Rc<World>, instance_id: String, slots: usize) {
    let holding = Rc::new(RefCell::new(Holding::default()));
    let (finished, batches) = mpsc::unbounded::<Finished>();
    // Told when a kernel ends (a slot is free), and when the worker has
    // nothing unfinished left.
    let (ended_tx, mut ended) = mpsc::unbounded::<()>();
    let (idle_tx, idle) = mpsc::unbounded::<()>();
    let signals = Signals {
        ended: ended_tx,
        idle: idle_tx,
    };
    let reporter = world
        .spawner
        .spawn_local_with_handle(report(
            Rc::clone(&world),
            Rc::clone(&holding),
            batches,
            idle,
        ))
        .ok();
    let _ = world
        .spawner
        .spawn_local(heartbeat(Rc::clone(&world), Rc::clone(&holding)));
    let mut idle_since = world.cloud.clock.now();
    let mut run_read_at: Option<Duration> = None;
    loop {
        start_kernels(&world, &holding, slots, &instance_id, &finished, &signals);
        let wanted = {
            let holding = holding.borrow();
            let ahead = pace::held_ahead(slots, holding.kernel_pace, holding.queue_short);
            pace::to_receive(slots, ahead, holding.unfinished())
        };
        let Some(wanted) = wanted else {
            ended.next().await;
            continue;
        };
        let asked_at = world.cloud.clock.now();
        let received = match world.tasks.receive(wanted as u32, WAIT).await {
            Ok(received) => received,
            Err(_) => {
                world.cloud.clock.sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        holding.borrow_mut().queue_short = received.len() < wanted;
        let now = world.cloud.clock.now();
        if received.is_empty() {
            if holding.borrow().unfinished() == 0 && now - idle_since >= world.settings.worker_idle
            {
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
        // The daemon trusts a run's state for a while, then reads it again,
        // to drop messages of a run no longer open.
        if run_read_at.is_none_or(|at| now - at >= pace::RUN_STATE_FRESH) {
            let _ = world.store.run(&world.run_id()).await;
            run_read_at = Some(now);
        }
        let visibility = world.tasks.visibility();
        let mut holding = holding.borrow_mut();
        for message in received {
            holding
                .hidden_until
                .insert(message.receipt.clone(), asked_at + visibility);
            holding.ahead.push_back(message);
        }
    }
    holding.borrow_mut().stopped = true;
    drop(finished);
    if let Some(reporter) = reporter {
        reporter.await;
    }
    // The instance powers itself off.
    world.fleet.lose(&instance_id);
}

/// What a kernel tells as it ends.
struct Signals {
    /// A slot is free.
    ended: mpsc::UnboundedSender<()>,
    /// Nothing is left unfinished: a result batch need not wait.
    idle: mpsc::UnboundedSender<()>,
}

/// Gives every free slot a message held ahead.
fn start_kernels(
    world: &Rc<World>,
    holding: &Rc<RefCell<Holding>>,
    slots: usize,
    instance_id: &str,
    finished: &mpsc::UnboundedSender<Finished>,
    signals: &Signals,
) {
    let mut held = holding.borrow_mut();
    while held.running < slots {
        let Some(message) = held.ahead.pop_front() else {
            return;
        };
        held.running += 1;
        let kernel = run_kernel(
            Rc::clone(world),
            message,
            instance_id.to_owned(),
            finished.clone(),
        );
        let holding = Rc::clone(holding);
        let (ended, idle) = (signals.ended.clone(), signals.idle.clone());
        let _ = world.spawner.spawn_local(async move {
            let took = kernel.await;
            let mut holding = holding.borrow_mut();
            holding.running -= 1;
            if let Some(took) = took {
                holding.kernel_pace = Some(pace::kernel_pace(holding.kernel_pace, took));
            }
            let _ = ended.unbounded_send(());
            if holding.unfinished() == 0 {
                let _ = idle.unbounded_send(());
            }
        });
    }
}

/// Runs one kernel; returns how long it took, if it ran.
async fn run_kernel(
    world: Rc<World>,
    message: Received,
    instance_id: String,
    finished: mpsc::UnboundedSender<Finished>,
) -> Option<Duration> {
    let Ok(Envelope::Task(task)) = Envelope::from_json(&message.body) else {
        return None;
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
    Some(world.settings.task_time)
}

/// Sends results and then deletes their tasks' messages: a batch waits up
/// to the result window for others while the worker has tasks unfinished.
async fn report(
    world: Rc<World>,
    holding: Rc<RefCell<Holding>>,
    mut finished: mpsc::UnboundedReceiver<Finished>,
    mut idle: mpsc::UnboundedReceiver<()>,
) {
    while let Some(first) = finished.next().await {
        let mut batch = vec![first];
        let until = world.cloud.clock.now() + pace::RESULT_WINDOW;
        while batch.len() < SQS_BATCH_ENTRIES {
            if holding.borrow().unfinished() == 0 {
                // Nothing else is coming; what already came goes along.
                while batch.len() < SQS_BATCH_ENTRIES
                    && let Ok(next) = finished.try_recv()
                {
                    batch.push(next);
                }
                break;
            }
            let wake = select(idle.next(), world.cloud.clock.sleep_until(until));
            match select(finished.next(), wake).await {
                Either::Left((Some(next), _)) => batch.push(next),
                Either::Left((None, _)) => break,
                Either::Right((Either::Right(_), _)) => break,
                Either::Right((Either::Left(_), _)) => {}
            }
        }
        let outgoing = Outgoing::numbered(
            batch
                .iter()
                .map(|f| Envelope::Result(f.result.clone()).to_json()),
        );
        while world.results.send_batch(&outgoing).await.is_err() {
            world.cloud.clock.sleep(Duration::from_secs(1)).await;
        }
        let receipts: Vec<String> = batch.into_iter().map(|f| f.receipt).collect();
        let _ = world.tasks.delete_batch(&receipts).await;
        let mut holding = holding.borrow_mut();
        for receipt in &receipts {
            holding.hidden_until.remove(receipt);
        }
    }
}

/// The daemon's heartbeat: at each look, if a held message is about to
/// surface, every held one is extended.
async fn heartbeat(world: Rc<World>, holding: Rc<RefCell<Holding>>) {
    let visibility = world.tasks.visibility();
    let every = pace::heartbeat_every(visibility);
    let mut look = world.cloud.clock.now();
    loop {
        look += every;
        world.cloud.clock.sleep_until(look).await;
        let now = world.cloud.clock.now();
        let receipts: Vec<String> = {
            let holding = holding.borrow();
            if holding.stopped {
                return;
            }
            let due = holding
                .hidden_until
                .values()
                .any(|until| pace::needs_extending(until.saturating_sub(now), visibility));
            if !due {
                continue;
            }
            holding.hidden_until.keys().cloned().collect()
        };
        for chunk in receipts.chunks(SQS_BATCH_ENTRIES) {
            let Ok(failed) = world.tasks.change_visibility_batch(chunk, visibility).await else {
                continue;
            };
            let mut holding = holding.borrow_mut();
            for receipt in chunk.iter().filter(|r| !failed.contains(r)) {
                if let Some(until) = holding.hidden_until.get_mut(receipt) {
                    *until = now + visibility;
                }
            }
        }
    }
}

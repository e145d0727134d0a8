//! The worker daemon: one per spot instance.
//!
//! It long-polls the task queue, runs up to `slots` kernels at once, keeps
//! their messages invisible with heartbeats, sends each result (batched) and
//! only then deletes the task's message. Messages of a run that is no longer
//! open are dropped on receipt.
//!
//! It stops, and says why with its exit (see [`Exit`]): when the queue has
//! been empty for `idle` and its run has no work waiting for the next
//! dispatcher pass; at its maximum lifetime; on a spot interruption notice
//! or SIGTERM; or when it cannot work at all. Before stopping it takes no
//! new work, asks running kernels to checkpoint and hands each task back as
//! a continuation message, within a bounded grace: what has not reached a
//! safe point by then is handed back without a checkpoint. The instance's
//! systemd unit powers the instance off when the worker exits (and after
//! repeated failures), and the launch template makes a shutdown terminate
//! it: the worker needs no EC2 rights.

mod batcher;
pub mod metadata;
mod runs;
mod task;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use nightshift_core::limits::ClaimCheck;
use nightshift_core::metrics::Emf;
use nightshift_core::pace;
use nightshift_core::ports::{BlobStore, Outgoing, Queue, Received, RunReader, UsageSource};
use nightshift_core::{Envelope, TaskMessage, UsageReport};
use nightshift_kernels::{Control, Registry};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use tokio::sync::{Notify, Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::batcher::{Batcher, Window};
use crate::metadata::InstanceMetadata;
use crate::runs::RunGate;

/// SQS keeps a received message hidden for 12 hours at most, heartbeats
/// included.
const MAX_HIDDEN: Duration = Duration::from_secs(12 * 3600);

#[derive(Debug, Clone)]
pub struct Settings {
    /// Kernels run at once (one per vCPU by default).
    pub slots: usize,
    /// How long the queue must stay empty before the worker stops.
    pub idle: Duration,
    /// Long-poll wait of one receive.
    pub wait: Duration,
    /// Which results go to the bucket, and under which key.
    pub claim_check: ClaimCheck,
    /// How often the metadata service is asked about a spot interruption.
    pub spot_poll: Duration,
    /// How long running kernels get to reach a safe point when the worker
    /// must stop (a spot notice gives two minutes in all).
    pub stop_grace: Duration,
    /// The worker stops taking work after this long, hands back what it
    /// holds and exits.
    pub max_lifetime: Duration,
    /// Failing to receive for this long means the worker cannot work.
    pub give_up_after: Duration,
}

/// The ports the worker uses.
#[derive(Clone)]
pub struct Ports {
    pub tasks: Arc<dyn Queue>,
    pub results: Arc<dyn Queue>,
    pub blobs: Arc<dyn BlobStore>,
    pub runs: Arc<dyn RunReader>,
    pub metadata: Arc<dyn InstanceMetadata>,
    /// What the worker's AWS requests used, reported to its run as it stops.
    pub usage: Arc<dyn UsageSource>,
}

/// Why the worker stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// The queue stayed empty and the run has nothing waiting.
    Idle,
    /// A spot interruption notice; work was handed back.
    Interrupted,
    /// A shutdown signal; work was handed back.
    Shutdown,
    /// The worker reached its maximum lifetime; work was handed back.
    Lifetime,
    /// The queue could not be reached for `give_up_after`; work was
    /// handed back.
    Failing,
}

impl Exit {
    /// Whether the process should exit with success: every stop but
    /// `Failing`, which the unit restarts and, repeated, powers off.
    pub fn is_success(self) -> bool {
        self != Self::Failing
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("could not start: {0}")]
    Start(#[source] nightshift_core::Error),
}

/// A message this worker holds: its task, when it was received, until when
/// it stays hidden as far as the worker knows, and the control that stops
/// its kernel.
struct HeldTask {
    message: Received,
    task: TaskMessage,
    received_at: Instant,
    hidden_until: Instant,
    control: Control,
}

/// Messages held by this worker, by receipt.
#[derive(Default)]
struct Held {
    messages: Mutex<HashMap<String, HeldTask>>,
}

/// Removes a message from [`Held`] when its task ends, however it ends (a
/// panic included), so heartbeats never keep an abandoned message hidden.
struct HeldEntry {
    held: Arc<Held>,
    receipt: String,
}

impl Drop for HeldEntry {
    fn drop(&mut self) {
        self.held.lock().remove(&self.receipt);
    }
}

impl Held {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, HeldTask>> {
        self.messages
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// What a running task needs, shared by every task of the worker.
pub(crate) struct Context {
    pub ports: Ports,
    pub registry: Registry,
    pub settings: Settings,
    pub instance_id: String,
    /// How long a received task message stays hidden.
    pub visibility: Duration,
    pub send_result: Batcher<String>,
    pub send_task: Batcher<String>,
    pub delete_task: Batcher<String>,
    /// Deletes the messages of finished tasks, which may wait longer.
    pub delete_finished: Batcher<String>,
    /// One permit per slot, held while a kernel runs (not while its result
    /// waits for a batch).
    pub kernels: Arc<Semaphore>,
    /// The kernels' pace in milliseconds (`u64::MAX`: no kernel has ended
    /// yet; see [`pace::kernel_pace`]).
    pub kernel_pace_ms: AtomicU64,
    /// The last receive got fewer messages than it asked for.
    pub queue_short: AtomicBool,
    /// Tasks received whose kernel has not ended yet (running, or waiting
    /// for a slot); those whose results wait for a batch are not counted.
    pub unfinished: Arc<AtomicUsize>,
    /// The worker is stopping: nothing waits to fill a batch any more.
    pub stopping: Arc<AtomicBool>,
    /// Told each time a kernel ends.
    pub kernel_ended: Notify,
}

impl Context {
    /// How many messages to receive now, or `None` to wait for a kernel to
    /// end first (see [`pace::to_receive`]).
    fn to_receive(&self) -> Option<usize> {
        let slots = self.settings.slots;
        let queue_short = self.queue_short.load(Ordering::Relaxed);
        pace::to_receive(
            slots,
            pace::held_ahead(slots, self.kernel_pace(), queue_short),
            self.unfinished.load(Ordering::Acquire),
        )
    }

    fn kernel_pace(&self) -> Option<Duration> {
        match self.kernel_pace_ms.load(Ordering::Relaxed) {
            u64::MAX => None,
            ms => Some(Duration::from_millis(ms)),
        }
    }

    /// A kernel ran to its end in `ran`.
    pub(crate) fn note_kernel_pace(&self, ran: Duration) {
        let pace = pace::kernel_pace(self.kernel_pace(), ran);
        let ms = u64::try_from(pace.as_millis()).unwrap_or(u64::MAX - 1);
        self.kernel_pace_ms.store(ms, Ordering::Relaxed);
    }
}

pub struct Worker {
    ports: Ports,
    registry: Registry,
    settings: Settings,
}

impl Worker {
    pub fn new(ports: Ports, registry: Registry, settings: Settings) -> Self {
        Self {
            ports,
            registry,
            settings,
        }
    }

    /// Runs until it must stop (see [`Exit`]) or `shutdown` turns true.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) -> Result<Exit, WorkerError> {
        let instance_id = self
            .ports
            .metadata
            .instance_id()
            .await
            .map_err(WorkerError::Start)?;
        let launched_for = self.ports.metadata.run_id().await.unwrap_or_default();
        let visibility = self
            .ports
            .tasks
            .visibility_timeout()
            .await
            .map_err(WorkerError::Start)?;
        tracing::info!(
            instance_id,
            run_id = launched_for.as_deref().unwrap_or_default(),
            slots = self.settings.slots,
            visibility_s = visibility.as_secs(),
            "worker started"
        );
        let held = Arc::new(Held::default());
        let gate = RunGate::new(self.ports.runs.clone(), launched_for.clone());
        let unfinished = Arc::new(AtomicUsize::new(0));
        let stopping = Arc::new(AtomicBool::new(false));
        let more_may_finish = {
            let (unfinished, stopping) = (unfinished.clone(), stopping.clone());
            move || !stopping.load(Ordering::Acquire) && unfinished.load(Ordering::Acquire) > 0
        };
        let short = Window::fixed(SHORT_WINDOW);
        let context = Arc::new(Context {
            send_result: queue_sender(
                self.ports.results.clone(),
                Window::while_more_may_come(pace::RESULT_WINDOW, more_may_finish),
            ),
            send_task: queue_sender(self.ports.tasks.clone(), short.clone()),
            delete_task: queue_deleter(self.ports.tasks.clone(), short.clone()),
            // The receipts of one result batch come together.
            delete_finished: queue_deleter(self.ports.tasks.clone(), short),
            kernels: Arc::new(Semaphore::new(self.settings.slots)),
            kernel_pace_ms: AtomicU64::new(u64::MAX),
            queue_short: AtomicBool::new(false),
            unfinished,
            stopping,
            kernel_ended: Notify::new(),
            ports: self.ports,
            registry: self.registry,
            settings: self.settings,
            instance_id,
            visibility,
        });
        let heartbeat = tokio::spawn(heartbeat(
            context.ports.tasks.clone(),
            held.clone(),
            visibility,
            MAX_HIDDEN,
        ));
        let (interrupt_tx, mut interrupted) = watch::channel(false);
        let spot_watch = tokio::spawn(watch_spot(context.clone(), interrupt_tx));

        let exit = receive_loop(&context, &held, &gate, &mut shutdown, &mut interrupted).await;
        heartbeat.abort();
        spot_watch.abort();
        if let Some(run_id) = launched_for {
            report_usage(&context, run_id).await;
        }
        tracing::info!(instance_id = %context.instance_id, ?exit, "worker stopped");
        Ok(exit)
    }
}

/// Sends what the worker's requests used to the collector, which adds it
/// to the run the instance was launched for. A worker that dies first
/// leaves its run's cost short by that much.
async fn report_usage(context: &Context, run_id: String) {
    let usage = context.ports.usage.take();
    if usage.is_empty() {
        return;
    }
    let report = Envelope::Usage(UsageReport {
        run_id,
        instance_id: context.instance_id.clone(),
        usage,
    });
    if !context.send_result.submit(report.to_json()).await {
        tracing::warn!("could not report the worker's usage");
    }
}

async fn receive_loop(
    context: &Arc<Context>,
    held: &Arc<Held>,
    gate: &RunGate,
    shutdown: &mut watch::Receiver<bool>,
    interrupted: &mut watch::Receiver<bool>,
) -> Exit {
    let mut running = JoinSet::new();
    let started = Instant::now();
    let mut idle_since = Instant::now();
    let mut failing_since: Option<Instant> = None;
    loop {
        let stop = if *interrupted.borrow() {
            Some(Exit::Interrupted)
        } else if *shutdown.borrow() {
            Some(Exit::Shutdown)
        } else if started.elapsed() >= context.settings.max_lifetime {
            Some(Exit::Lifetime)
        } else if failing_since
            .is_some_and(|since| since.elapsed() >= context.settings.give_up_after)
        {
            Some(Exit::Failing)
        } else {
            None
        };
        if let Some(exit) = stop {
            return stop_running(context, running, held, exit).await;
        }
        while running.try_join_next().is_some() {
            idle_since = Instant::now();
        }
        let Some(wanted) = context.to_receive() else {
            tokio::select! {
                () = context.kernel_ended.notified() => idle_since = Instant::now(),
                _ = shutdown.changed() => {}
                _ = interrupted.changed() => {}
            }
            continue;
        };
        // SQS hides a message from the moment it hands it out: counted
        // from before the request, the worker's reckoning is never late.
        let asked_at = Instant::now();
        let received = tokio::select! {
            received = context.ports.tasks.receive(wanted as u32, context.settings.wait) => received,
            _ = shutdown.changed() => continue,
            _ = interrupted.changed() => continue,
        };
        let messages = match received {
            Ok(messages) => {
                failing_since = None;
                context
                    .queue_short
                    .store(messages.len() < wanted, Ordering::Relaxed);
                messages
            }
            Err(error) => {
                tracing::warn!(error = %error.chain(), "receive failed; retrying");
                failing_since.get_or_insert_with(Instant::now);
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if messages.is_empty() {
            if running.is_empty() && idle_since.elapsed() >= context.settings.idle {
                if gate.work_waiting().await {
                    tracing::info!("queue empty, but the run has work waiting for the next pass");
                    idle_since = Instant::now();
                    continue;
                }
                tracing::info!(instance_id = %context.instance_id, "queue drained; stopping");
                return Exit::Idle;
            }
            continue;
        }
        idle_since = Instant::now();
        for message in messages {
            let Some(task) = admit(context, gate, &message).await else {
                continue;
            };
            let control = Control::new();
            let busy = held.lock().len() + 1;
            Emf::of("worker", &task.run_id)
                .count("SlotsBusy", busy as u64)
                .count("Slots", context.settings.slots as u64)
                .emit();
            held.lock().insert(
                message.receipt.clone(),
                HeldTask {
                    message: message.clone(),
                    task: task.clone(),
                    received_at: asked_at,
                    hidden_until: asked_at + context.visibility,
                    control: control.clone(),
                },
            );
            let entry = HeldEntry {
                held: held.clone(),
                receipt: message.receipt.clone(),
            };
            let context = context.clone();
            context.unfinished.fetch_add(1, Ordering::AcqRel);
            running.spawn(async move {
                let _entry = entry;
                task::process(&context, message, task, control).await;
            });
        }
    }
}

/// The task a message carries, if it is one to run: an unreadable message
/// or one of a run that is no longer open is deleted.
async fn admit(context: &Context, gate: &RunGate, message: &Received) -> Option<TaskMessage> {
    let task = match Envelope::from_json(&message.body) {
        Ok(Envelope::Task(task)) => task,
        other => {
            // Not a task of ours: it can never succeed, so it is removed.
            tracing::error!(message_id = %message.message_id, parsed = ?other.err(), "unreadable task message; deleting it");
            context.delete_task.submit(message.receipt.clone()).await;
            return None;
        }
    };
    if !gate.admits(&task.run_id).await {
        tracing::info!(task_id = %task.task_id, run_id = %task.run_id, "the task's run is over; dropping its message");
        context.delete_task.submit(message.receipt.clone()).await;
        return None;
    }
    Some(task)
}

/// Asks every kernel to stop at its next safe point and waits, within the
/// grace, while each hands its task back; what is still running then is
/// handed back without a checkpoint.
async fn stop_running(
    context: &Context,
    mut running: JoinSet<()>,
    held: &Held,
    exit: Exit,
) -> Exit {
    tracing::info!(
        ?exit,
        held = held.lock().len(),
        "stopping: taking no new work"
    );
    context.stopping.store(true, Ordering::Release);
    for entry in held.lock().values() {
        entry.control.request_stop();
    }
    let drained = tokio::time::timeout(context.settings.stop_grace, async {
        while running.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        let late: Vec<(Received, TaskMessage)> = held
            .lock()
            .values()
            .map(|h| (h.message.clone(), h.task.clone()))
            .collect();
        tracing::warn!(
            tasks = late.len(),
            "kernels did not reach a safe point in time; handing back without checkpoints"
        );
        futures::future::join_all(
            late.iter()
                .map(|(message, task)| task::hand_back(context, message, task, None, None)),
        )
        .await;
        running.abort_all();
    }
    exit
}

/// Keeps every held message invisible: a heartbeat (every twelfth of the
/// queue's timeout) that finds a message about to surface (see
/// [`pace::needs_extending`]) extends every held one to that timeout, never
/// past `max_hidden` (SQS's 12 hours) from receipt; one that finds none
/// asks nothing. A task that nears `max_hidden` is asked to stop at a safe
/// point and is handed back as a continuation, which starts anew.
async fn heartbeat(
    queue: Arc<dyn Queue>,
    held: Arc<Held>,
    visibility: Duration,
    max_hidden: Duration,
) {
    let every = pace::heartbeat_every(visibility);
    // Two timeouts and a minute (at 12 hours) of room to hand it back.
    let renew_before = visibility * 2 + max_hidden / 720;
    let mut ticks = tokio::time::interval_at(Instant::now() + every, every);
    loop {
        ticks.tick().await;
        let now = Instant::now();
        let mut extend: Vec<(String, Duration)> = Vec::new();
        let mut due = false;
        for (receipt, entry) in held.lock().iter() {
            let left = max_hidden.saturating_sub(entry.received_at.elapsed());
            if left <= renew_before {
                entry.control.request_stop();
            }
            let hidden_for = entry.hidden_until.saturating_duration_since(now);
            due |= pace::needs_extending(hidden_for, visibility);
            extend.push((receipt.clone(), visibility.min(left)));
        }
        if !due {
            continue;
        }
        // One call per timeout value: held messages mostly share the queue's.
        let mut by_timeout: HashMap<Duration, Vec<String>> = HashMap::new();
        for (receipt, timeout) in extend {
            by_timeout.entry(timeout).or_default().push(receipt);
        }
        for (timeout, receipts) in by_timeout {
            for chunk in receipts.chunks(10) {
                let failed = match queue.change_visibility_batch(chunk, timeout).await {
                    Ok(failed) => failed,
                    Err(error) => {
                        tracing::warn!(error = %error.chain(), "heartbeat failed");
                        continue;
                    }
                };
                if !failed.is_empty() {
                    tracing::warn!(failed = failed.len(), "some heartbeats failed");
                }
                // Only what SQS extended counts as extended: the rest is
                // due again at the next beat.
                let mut held = held.lock();
                for receipt in chunk.iter().filter(|r| !failed.contains(r)) {
                    if let Some(entry) = held.get_mut(receipt) {
                        entry.hidden_until = now + timeout;
                    }
                }
            }
        }
    }
}

/// Polls the metadata service for a spot interruption notice.
async fn watch_spot(context: Arc<Context>, interrupt: watch::Sender<bool>) {
    let mut ticks = tokio::time::interval(context.settings.spot_poll);
    loop {
        ticks.tick().await;
        match context.ports.metadata.spot_action().await {
            Ok(Some(action)) => {
                tracing::warn!(instance_id = %context.instance_id, action, "spot interruption notice");
                let _ = interrupt.send(true);
                return;
            }
            Ok(None) => {}
            Err(error) => tracing::debug!(%error, "metadata poll failed"),
        }
    }
}

/// How long a continuation or a delete waits for others: a stopping worker
/// is short of time, and the deletes of one result batch come together.
const SHORT_WINDOW: Duration = Duration::from_millis(50);

fn queue_sender(queue: Arc<dyn Queue>, window: Window) -> Batcher<String> {
    Batcher::spawn(window, String::len, move |bodies: Vec<String>| {
        let queue = queue.clone();
        async move {
            let messages = Outgoing::numbered(bodies);
            match queue.send_batch(&messages).await {
                Ok(failed) => messages.iter().map(|m| !failed.contains(&m.id)).collect(),
                Err(error) => {
                    tracing::warn!(error = %error.chain(), "batch send failed");
                    vec![false; messages.len()]
                }
            }
        }
    })
}

fn queue_deleter(queue: Arc<dyn Queue>, window: Window) -> Batcher<String> {
    // Receipts are small: the count bounds a delete batch, not its bytes.
    Batcher::spawn(
        window,
        |_: &String| 0,
        move |receipts: Vec<String>| {
            let queue = queue.clone();
            async move {
                match queue.delete_batch(&receipts).await {
                    Ok(failed) => receipts.iter().map(|r| !failed.contains(r)).collect(),
                    Err(error) => {
                        tracing::warn!(error = %error.chain(), "batch delete failed");
                        vec![false; receipts.len()]
                    }
                }
            }
        },
    )
}

#[cfg(test)]
mod tests;

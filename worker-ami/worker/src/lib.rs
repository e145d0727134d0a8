//! The worker daemon: one per spot instance.
//!
//! It long-polls the task queue, runs up to `slots` kernels at once, keeps
//! their messages invisible with heartbeats, sends each result (batched) and
//! only then deletes the task's message. When it must stop (a spot
//! interruption notice, or SIGTERM) it takes no new work, asks running
//! kernels to checkpoint, hands each task back as a continuation message and
//! exits. When the queue has been empty for `idle` it terminates its own
//! instance.

mod batcher;
pub mod metadata;
mod task;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use nightshift_core::ports::{BlobStore, InstanceControl, Outgoing, Queue};
use nightshift_kernels::{Control, Registry};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::batcher::Batcher;
use crate::metadata::InstanceMetadata;

#[derive(Debug, Clone)]
pub struct Settings {
    /// Kernels run at once (one per vCPU by default).
    pub slots: usize,
    /// How long the queue must stay empty before the instance stops itself.
    pub idle: Duration,
    /// Long-poll wait of one receive.
    pub wait: Duration,
    /// Results whose JSON is longer go to the bucket (the claim check).
    pub inline_limit: usize,
    /// How often the metadata service is asked about a spot interruption.
    pub spot_poll: Duration,
}

/// The ports the worker uses.
#[derive(Clone)]
pub struct Ports {
    pub tasks: Arc<dyn Queue>,
    pub results: Arc<dyn Queue>,
    pub blobs: Arc<dyn BlobStore>,
    pub instances: Arc<dyn InstanceControl>,
    pub metadata: Arc<dyn InstanceMetadata>,
}

/// Why the worker stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// The queue stayed empty; the instance was asked to terminate.
    Idle,
    /// A spot interruption notice; work was handed back.
    Interrupted,
    /// A shutdown signal; work was handed back.
    Shutdown,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("could not start: {0}")]
    Start(#[source] nightshift_core::Error),
}

/// Messages held by this worker, by receipt, with the control that stops
/// their kernels.
#[derive(Default)]
struct Held {
    messages: Mutex<HashMap<String, Control>>,
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
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Control>> {
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
    pub send_result: Batcher<String>,
    pub send_task: Batcher<String>,
    pub delete_task: Batcher<String>,
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

    /// Runs until idle, interrupted, or `shutdown` turns true.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) -> Result<Exit, WorkerError> {
        let instance_id = self
            .ports
            .metadata
            .instance_id()
            .await
            .map_err(WorkerError::Start)?;
        let visibility = self
            .ports
            .tasks
            .visibility_timeout()
            .await
            .map_err(WorkerError::Start)?;
        tracing::info!(
            instance_id,
            slots = self.settings.slots,
            visibility_s = visibility.as_secs(),
            "worker started"
        );
        let held = Arc::new(Held::default());
        let context = Arc::new(Context {
            send_result: queue_sender(self.ports.results.clone()),
            send_task: queue_sender(self.ports.tasks.clone()),
            delete_task: queue_deleter(self.ports.tasks.clone()),
            ports: self.ports,
            registry: self.registry,
            settings: self.settings,
            instance_id,
        });
        let heartbeat = tokio::spawn(heartbeat(
            context.ports.tasks.clone(),
            held.clone(),
            visibility,
        ));
        let (interrupt_tx, mut interrupted) = watch::channel(false);
        let spot_watch = tokio::spawn(watch_spot(context.clone(), interrupt_tx));

        let exit = receive_loop(&context, &held, &mut shutdown, &mut interrupted).await;
        let exit = finish(exit, &context).await;
        heartbeat.abort();
        spot_watch.abort();
        Ok(exit)
    }
}

async fn receive_loop(
    context: &Arc<Context>,
    held: &Arc<Held>,
    shutdown: &mut watch::Receiver<bool>,
    interrupted: &mut watch::Receiver<bool>,
) -> Exit {
    let mut running = JoinSet::new();
    let mut idle_since = Instant::now();
    loop {
        if *interrupted.borrow() {
            return stop_running(running, held, Exit::Interrupted).await;
        }
        if *shutdown.borrow() {
            return stop_running(running, held, Exit::Shutdown).await;
        }
        while running.try_join_next().is_some() {
            idle_since = Instant::now();
        }
        let free = context.settings.slots.saturating_sub(running.len());
        if free == 0 {
            tokio::select! {
                _ = running.join_next() => idle_since = Instant::now(),
                _ = shutdown.changed() => {}
                _ = interrupted.changed() => {}
            }
            continue;
        }
        let received = tokio::select! {
            received = context.ports.tasks.receive(free.min(10) as u32, context.settings.wait) => received,
            _ = shutdown.changed() => continue,
            _ = interrupted.changed() => continue,
        };
        let messages = match received {
            Ok(messages) => messages,
            Err(error) => {
                tracing::warn!(%error, "receive failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if messages.is_empty() {
            if running.is_empty() && idle_since.elapsed() >= context.settings.idle {
                return Exit::Idle;
            }
            continue;
        }
        idle_since = Instant::now();
        for message in messages {
            let control = Control::new();
            held.lock().insert(message.receipt.clone(), control.clone());
            let entry = HeldEntry {
                held: held.clone(),
                receipt: message.receipt.clone(),
            };
            let context = context.clone();
            running.spawn(async move {
                let _entry = entry;
                task::process(&context, message, control).await;
            });
        }
    }
}

/// Asks every kernel to stop at its next safe point and waits while each
/// hands its task back.
async fn stop_running(mut running: JoinSet<()>, held: &Held, exit: Exit) -> Exit {
    for control in held.lock().values() {
        control.request_stop();
    }
    while running.join_next().await.is_some() {}
    exit
}

async fn finish(exit: Exit, context: &Context) -> Exit {
    if exit == Exit::Idle {
        tracing::info!(instance_id = %context.instance_id, "queue drained; terminating this instance");
        if let Err(error) = context
            .ports
            .instances
            .terminate(&context.instance_id)
            .await
        {
            tracing::error!(%error, "could not terminate this instance");
        }
    }
    tracing::info!(instance_id = %context.instance_id, ?exit, "worker stopped");
    exit
}

/// Keeps every held message invisible: extends its visibility to the
/// queue's timeout every third of that timeout.
async fn heartbeat(queue: Arc<dyn Queue>, held: Arc<Held>, visibility: Duration) {
    let every = (visibility / 3).max(Duration::from_secs(1));
    let mut ticks = tokio::time::interval_at(Instant::now() + every, every);
    loop {
        ticks.tick().await;
        let receipts: Vec<String> = held.lock().keys().cloned().collect();
        for chunk in receipts.chunks(10) {
            match queue.change_visibility_batch(chunk, visibility).await {
                Ok(failed) if failed.is_empty() => {}
                Ok(failed) => tracing::warn!(failed = failed.len(), "some heartbeats failed"),
                Err(error) => tracing::warn!(%error, "heartbeat failed"),
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

fn queue_sender(queue: Arc<dyn Queue>) -> Batcher<String> {
    Batcher::spawn(move |bodies: Vec<String>| {
        let queue = queue.clone();
        async move {
            let messages: Vec<Outgoing> = bodies
                .into_iter()
                .enumerate()
                .map(|(i, body)| Outgoing {
                    id: i.to_string(),
                    body,
                })
                .collect();
            match queue.send_batch(&messages).await {
                Ok(failed) => messages.iter().map(|m| !failed.contains(&m.id)).collect(),
                Err(error) => {
                    tracing::warn!(%error, "batch send failed");
                    vec![false; messages.len()]
                }
            }
        }
    })
}

fn queue_deleter(queue: Arc<dyn Queue>) -> Batcher<String> {
    Batcher::spawn(move |receipts: Vec<String>| {
        let queue = queue.clone();
        async move {
            match queue.delete_batch(&receipts).await {
                Ok(failed) => receipts.iter().map(|r| !failed.contains(r)).collect(),
                Err(error) => {
                    tracing::warn!(%error, "batch delete failed");
                    vec![false; receipts.len()]
                }
            }
        }
    })
}

#[cfg(test)]
mod tests;

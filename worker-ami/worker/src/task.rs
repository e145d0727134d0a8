//! One delivery of one task: load its payload, run its kernel, report.

use std::sync::atomic::Ordering;

use chrono::{DateTime, Utc};
use nightshift_core::limits::ClaimCheck;
use nightshift_core::metrics::Emf;
use nightshift_core::ports::Received;
use nightshift_core::{AttemptEvent, Blob, Envelope, TaskMessage, TaskOutcome, TaskResult};
use nightshift_kernels::{Control, KernelError, Outcome};
use serde_json::Value;
use tracing::Instrument;

use crate::Context;

pub(crate) async fn process(
    context: &Context,
    message: Received,
    task: TaskMessage,
    control: Control,
) {
    let span = tracing::info_span!("task", task_id = %task.task_id, run_id = %task.run_id,
        instance_id = %context.instance_id, receive_count = message.receive_count);
    run(context, message, task, control).instrument(span).await;
}

async fn run(context: &Context, message: Received, task: TaskMessage, control: Control) {
    let attempts = task.prior_attempts + message.receive_count;
    // A slot, for as long as the kernel runs (a message received ahead
    // waits here). The semaphore is never closed.
    let slot = context.kernels.acquire().await;
    if control.should_stop() {
        // The worker is stopping: a task held ahead goes back unstarted.
        drop(slot);
        kernel_ended(context);
        return hand_back(context, &message, &task, None, None).await;
    }
    let started_at = Utc::now();
    tracing::info!(kernel = %task.kernel, attempts, "task started");
    let outcome = {
        let _slot = slot;
        let ran = std::time::Instant::now();
        let outcome = match load_inputs(context, &task).await {
            Ok((payload, checkpoint)) => {
                run_kernel(context, &task.kernel, payload, checkpoint, control).await
            }
            Err(error) => Err(error),
        };
        if matches!(outcome, Ok(Outcome::Done { .. })) {
            context.note_kernel_pace(ran.elapsed());
        }
        outcome
    };
    kernel_ended(context);
    let report = |outcome| {
        Envelope::Result(TaskResult {
            task_id: task.task_id.clone(),
            run_id: task.run_id.clone(),
            kernel: task.kernel.clone(),
            instance_id: context.instance_id.clone(),
            attempts,
            started_at,
            finished_at: Utc::now(),
            outcome,
        })
    };
    match outcome {
        Ok(Outcome::Done { result, summary }) => {
            let result = match store_if_large(context, &message, &task, result).await {
                Ok(result) => result,
                Err(error) => {
                    return give_up_for_now(
                        context,
                        &message,
                        &task,
                        started_at,
                        &error.to_string(),
                    )
                    .await;
                }
            };
            tracing::info!(summary, "task done");
            measure(&task, started_at, "TasksDone");
            finish(
                context,
                &message,
                report(TaskOutcome::Done { result, summary }),
            )
            .await;
        }
        Ok(Outcome::Stopped { checkpoint }) => {
            hand_back(context, &message, &task, Some(started_at), checkpoint).await
        }
        Err(KernelError::Permanent(error)) => {
            tracing::warn!(error, "task failed for good");
            measure(&task, started_at, "TasksFailed");
            finish(context, &message, report(TaskOutcome::Failed { error })).await;
        }
        Err(KernelError::Retryable(error)) => {
            give_up_for_now(context, &message, &task, started_at, &error).await
        }
    }
}

/// One task fewer waits for or holds a slot: the receive loop may take more.
fn kernel_ended(context: &Context) {
    context.unfinished.fetch_sub(1, Ordering::AcqRel);
    context.kernel_ended.notify_one();
}

/// The kernel's time on a task that ended here, by kernel.
fn measure(task: &TaskMessage, started_at: DateTime<Utc>, ended: &'static str) {
    let took = (Utc::now() - started_at)
        .num_milliseconds()
        .max(0)
        .unsigned_abs();
    Emf::of("worker", &task.run_id)
        .by("Kernel", &task.kernel)
        .milliseconds("TaskDuration", took)
        .count(ended, 1)
        .emit();
}

/// Sends the final result and, only once it is on the result queue,
/// deletes the task's message. If the send fails the message stays and the
/// task runs again; the collector records whichever result comes first.
async fn finish(context: &Context, message: &Received, result: Envelope) {
    if context.send_result.submit(result.to_json()).await {
        if !context
            .delete_finished
            .submit(message.receipt.clone())
            .await
        {
            tracing::warn!(
                "could not delete a finished task's message; a duplicate result may follow"
            );
        }
    } else {
        tracing::warn!("could not send a result; the task will run again");
    }
}

/// A failure another attempt may not have: report it, and leave the message
/// to reappear when its visibility ends (the queue's receive count is the
/// retry budget; past it the task goes to the dead-letter queue).
async fn give_up_for_now(
    context: &Context,
    message: &Received,
    task: &TaskMessage,
    started_at: DateTime<Utc>,
    error: &str,
) {
    tracing::warn!(error, "attempt failed; the task will be retried");
    Emf::of("worker", &task.run_id)
        .count("AttemptsFailed", 1)
        .emit();
    let event = Envelope::AttemptFailed(attempt(
        context,
        message,
        task,
        Some(started_at),
        Some(error),
    ));
    context.send_result.submit(event.to_json()).await;
}

/// Interruption or shutdown: a continuation message (same task, its
/// checkpoint, its attempts so far) replaces the one held, so the receive
/// count, the budget for failures, starts again.
pub(crate) async fn hand_back(
    context: &Context,
    message: &Received,
    task: &TaskMessage,
    started_at: Option<DateTime<Utc>>,
    checkpoint: Option<Vec<u8>>,
) {
    Emf::of("worker", &task.run_id)
        .count("AttemptsInterrupted", 1)
        .emit();
    let mut continuation = task.clone();
    continuation.prior_attempts = task.prior_attempts + message.receive_count;
    if let Some(bytes) = checkpoint {
        let key = ClaimCheck::checkpoint_key(&task.run_id, &task.task_id);
        match context.ports.blobs.put(&key, bytes).await {
            Ok(()) => continuation.checkpoint_key = Some(key),
            Err(error) => {
                tracing::warn!(%error, "could not save the checkpoint; the task restarts from its last one")
            }
        }
    }
    let checkpointed = continuation.checkpoint_key.is_some();
    if !context
        .send_task
        .submit(Envelope::Task(continuation).to_json())
        .await
    {
        // Without a continuation the held message must stay: released, it
        // comes back at once (at the cost of one receive).
        tracing::warn!("could not send a continuation; releasing the message instead");
        if let Err(error) = context
            .ports
            .tasks
            .change_visibility_batch(
                std::slice::from_ref(&message.receipt),
                std::time::Duration::ZERO,
            )
            .await
        {
            tracing::warn!(%error, "could not release the message; it reappears after its timeout");
        }
        return;
    }
    context.delete_task.submit(message.receipt.clone()).await;
    let event = Envelope::Interrupted(attempt(context, message, task, started_at, None));
    context.send_result.submit(event.to_json()).await;
    tracing::info!(checkpointed, "task handed back");
}

/// An event about this delivery, identified by message id and receive count
/// so that the collector counts it once.
fn attempt(
    context: &Context,
    message: &Received,
    task: &TaskMessage,
    started_at: Option<DateTime<Utc>>,
    error: Option<&str>,
) -> AttemptEvent {
    AttemptEvent {
        event_id: format!("{}:{}", message.message_id, message.receive_count),
        task_id: task.task_id.clone(),
        run_id: task.run_id.clone(),
        instance_id: context.instance_id.clone(),
        started_at,
        at: Utc::now(),
        error: error.map(str::to_owned),
    }
}

async fn load_inputs(
    context: &Context,
    task: &TaskMessage,
) -> Result<(Value, Option<Vec<u8>>), KernelError> {
    let payload = match &task.payload {
        // The one place the payload is parsed: the kernel reads it.
        Blob::Inline(raw) => serde_json::from_str(raw.get())
            .map_err(|e| KernelError::Permanent(format!("payload is not JSON: {e}")))?,
        Blob::Stored { key } => {
            let bytes = context.ports.blobs.get(key).await.map_err(|e| {
                KernelError::Retryable(format!("could not read payload {key}: {e}"))
            })?;
            serde_json::from_slice(&bytes)
                .map_err(|e| KernelError::Permanent(format!("payload {key} is not JSON: {e}")))?
        }
    };
    let checkpoint = match &task.checkpoint_key {
        Some(key) => Some(context.ports.blobs.get(key).await.map_err(|e| {
            KernelError::Retryable(format!("could not read checkpoint {key}: {e}"))
        })?),
        None => None,
    };
    Ok((payload, checkpoint))
}

async fn run_kernel(
    context: &Context,
    name: &str,
    payload: Value,
    checkpoint: Option<Vec<u8>>,
    control: Control,
) -> Result<Outcome, KernelError> {
    let kernel = context
        .registry
        .get(name)
        .ok_or_else(|| KernelError::Permanent(format!("this worker has no kernel `{name}`")))?;
    tokio::task::spawn_blocking(move || kernel.run(&payload, checkpoint.as_deref(), &control))
        .await
        .unwrap_or_else(|panic| Err(KernelError::Retryable(format!("kernel panicked: {panic}"))))
}

/// The result inline, or in the bucket when it would not fit the task item
/// next to the payload, or its message (the claim check). Each delivery
/// writes its own object, so a duplicate never replaces a recorded result.
async fn store_if_large(
    context: &Context,
    message: &Received,
    task: &TaskMessage,
    value: Value,
) -> Result<Blob, nightshift_core::Error> {
    let text = value.to_string();
    if context
        .settings
        .claim_check
        .result_inline(text.len(), task.payload.inline_bytes())
    {
        return Blob::from_text(text).map_err(|e| nightshift_core::Error::malformed("result", e));
    }
    let delivery = format!("{}-{}", message.message_id, message.receive_count);
    let key = ClaimCheck::result_key(&task.run_id, &task.task_id, &delivery);
    context.ports.blobs.put(&key, text.into_bytes()).await?;
    Ok(Blob::Stored { key })
}

//! The collector: records what workers report, once, whatever SQS delivers.
//!
//! It is fed by the result queue (results, failed and interrupted attempts)
//! and by the task dead-letter queue (tasks whose deliveries ran out). It
//! answers with the ids of the messages to retry (`ReportBatchItemFailures`),
//! so one bad message never sends a whole batch back.

use std::panic::AssertUnwindSafe;

use chrono::Utc;
use futures::FutureExt;
use nightshift_core::Envelope;
use nightshift_core::ports::{AttemptKind, RecordOutcome, ResultRecorder};
use tracing::Instrument;

/// One message as the event source hands it over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incoming {
    pub message_id: String,
    pub body: String,
}

/// Records a batch; returns the message ids that must be delivered again.
pub async fn collect(recorder: &dyn ResultRecorder, messages: &[Incoming]) -> Vec<String> {
    let mut retry = Vec::new();
    let mut results = Vec::new();
    for message in messages {
        match Envelope::from_json(&message.body) {
            Ok(Envelope::Result(result)) => results.push((message.message_id.clone(), result)),
            Ok(other) => {
                let span = tracing::info_span!("message", message_id = %message.message_id, task_id = %other.task_id());
                if !record_one(recorder, other).instrument(span).await {
                    retry.push(message.message_id.clone());
                }
            }
            Err(error) => {
                // Retried until the result queue's redrive moves it aside.
                tracing::error!(message_id = %message.message_id, %error, "unreadable message");
                retry.push(message.message_id.clone());
            }
        }
    }
    if !results.is_empty() {
        let batch: Vec<_> = results.iter().map(|(_, r)| r.clone()).collect();
        let outcomes = AssertUnwindSafe(recorder.record_results(&batch))
            .catch_unwind()
            .await;
        match outcomes {
            Ok(Ok(outcomes)) => {
                for ((message_id, result), outcome) in results.iter().zip(outcomes) {
                    tracing::info!(%message_id, task_id = %result.task_id, run_id = %result.run_id,
                        instance_id = %result.instance_id, ?outcome, "result");
                    if !settled(outcome) {
                        retry.push(message_id.clone());
                    }
                }
            }
            Ok(Err(error)) => {
                tracing::error!(%error, results = results.len(), "could not record results");
                retry.extend(results.iter().map(|(id, _)| id.clone()));
            }
            Err(_) => {
                tracing::error!(results = results.len(), "recording results panicked");
                retry.extend(results.iter().map(|(id, _)| id.clone()));
            }
        }
    }
    retry
}

/// Records one non-result message; `false` if it must be delivered again.
async fn record_one(recorder: &dyn ResultRecorder, envelope: Envelope) -> bool {
    let recorded = AssertUnwindSafe(async {
        match &envelope {
            Envelope::AttemptFailed(event) => {
                recorder.record_attempt(event, AttemptKind::Failed).await
            }
            Envelope::Interrupted(event) => {
                recorder
                    .record_attempt(event, AttemptKind::Interrupted)
                    .await
            }
            Envelope::Task(task) => {
                recorder
                    .record_dead_letter(&task.task_id, &task.run_id, Utc::now())
                    .await
            }
            Envelope::Result(_) => Ok(RecordOutcome::Unknown),
        }
    })
    .catch_unwind()
    .await;
    match recorded {
        Ok(Ok(outcome)) => {
            tracing::info!(?outcome, "recorded");
            settled(outcome)
        }
        Ok(Err(error)) => {
            tracing::error!(%error, "could not record");
            false
        }
        Err(_) => {
            tracing::error!("recording panicked");
            false
        }
    }
}

/// Whether a message needs no further delivery.
fn settled(outcome: RecordOutcome) -> bool {
    match outcome {
        RecordOutcome::Recorded | RecordOutcome::Duplicate | RecordOutcome::Unknown => true,
        RecordOutcome::NotYetQueued => false,
    }
}

#[cfg(test)]
mod tests;

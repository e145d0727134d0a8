//! The collector: records what workers report, once, whatever SQS delivers.
//!
//! It is fed by the result queue (results, failed and interrupted attempts),
//! by the task dead-letter queue (tasks whose deliveries ran out) and by the
//! result dead-letter queue (messages it could not settle in time), the same
//! way. It answers with the ids of the messages to retry
//! (`ReportBatchItemFailures`), so one bad message never sends a whole batch
//! back: only a transient failure is retried. A permanent one (a result the
//! table can never hold) fails its task with the reason, so the run still
//! ends.

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;

use chrono::Utc;
use futures::FutureExt;
use nightshift_core::config;
use nightshift_core::metrics::Emf;
use nightshift_core::ports::{AttemptKind, Received, RecordOutcome, ResultRecorder};
use nightshift_core::{Envelope, Error, TaskOutcome, TaskResult};
use tracing::Instrument;

/// The collector's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub table: String,
    pub pending_shards: u32,
    /// The function's memory, as Lambda gives it (0: not on Lambda).
    pub memory_mb: u32,
}

impl Config {
    pub fn from_env(env: &dyn config::Env) -> Result<Self, config::ConfigError> {
        Ok(Self {
            table: config::required(env, "NIGHTSHIFT_TABLE")?,
            pending_shards: config::parsed_or(env, "NIGHTSHIFT_PENDING_SHARDS", 8)?,
            memory_mb: config::parsed_or(env, "AWS_LAMBDA_FUNCTION_MEMORY_SIZE", 0)?,
        })
    }
}

/// One message as the event source hands it over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incoming {
    pub message_id: String,
    pub body: String,
}

/// What the event source hands over of a message it received (the local
/// stack's and the scale model's event sources).
impl From<&Received> for Incoming {
    fn from(message: &Received) -> Self {
        Self {
            message_id: message.message_id.clone(),
            body: message.body.clone(),
        }
    }
}

/// What a batch came to.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Collected {
    /// The message ids that must be delivered again.
    pub retry: Vec<String>,
    /// The runs the batch was about, in order: what recording it cost is
    /// theirs.
    pub runs: Vec<String>,
}

/// Records a batch.
pub async fn collect(recorder: &dyn ResultRecorder, messages: &[Incoming]) -> Collected {
    let mut collected = Collected::default();
    let mut results = Vec::new();
    let mut tally: BTreeMap<String, Tally> = BTreeMap::new();
    for message in messages {
        let envelope = Envelope::from_json(&message.body);
        if let Ok(envelope) = &envelope
            && !collected.runs.iter().any(|run| run == envelope.run_id())
        {
            collected.runs.push(envelope.run_id().to_owned());
        }
        match envelope {
            Ok(Envelope::Result(result)) => results.push((message.message_id.clone(), result)),
            Ok(other) => {
                let span = tracing::info_span!("message", message_id = %message.message_id,
                    task_id = other.task_id().unwrap_or_default(), run_id = %other.run_id());
                match record_one(recorder, &other).instrument(span).await {
                    Some(RecordOutcome::Recorded) => tally
                        .entry(other.run_id().to_owned())
                        .or_default()
                        .note(&other),
                    Some(_) => {}
                    None => collected.retry.push(message.message_id.clone()),
                }
            }
            Err(error) => {
                // It can never be read: retrying only delays its alarm.
                tracing::error!(message_id = %message.message_id, %error, "unreadable message dropped");
            }
        }
    }
    collected
        .retry
        .extend(record_results(recorder, results, &mut tally).await);
    for (run_id, counts) in tally {
        Emf::of("collector", &run_id)
            .count("TasksDone", counts.done)
            .count("TasksFailed", counts.failed + counts.dead_letters)
            .count("AttemptsFailed", counts.failed_attempts)
            .count("AttemptsInterrupted", counts.interruptions)
            .emit();
    }
    collected
}

/// What a batch recorded of one run (duplicates not counted).
#[derive(Debug, Default)]
struct Tally {
    done: u64,
    failed: u64,
    dead_letters: u64,
    failed_attempts: u64,
    interruptions: u64,
}

impl Tally {
    /// An event other than a result, recorded.
    fn note(&mut self, envelope: &Envelope) {
        match envelope {
            Envelope::AttemptFailed(_) => self.failed_attempts += 1,
            Envelope::Interrupted(_) => self.interruptions += 1,
            Envelope::Task(_) => self.dead_letters += 1,
            Envelope::Result(_) | Envelope::Usage(_) => {}
        }
    }

    fn count(&mut self, result: &TaskResult, outcome: &RecordOutcome) {
        match (outcome, &result.outcome) {
            (RecordOutcome::Recorded, TaskOutcome::Done { .. }) => self.done += 1,
            (RecordOutcome::Recorded, TaskOutcome::Failed { .. })
            | (RecordOutcome::FailedInstead(_), _) => self.failed += 1,
            _ => {}
        }
    }
}

/// Records the results of a batch; returns the message ids that must be
/// delivered again.
async fn record_results(
    recorder: &dyn ResultRecorder,
    results: Vec<(String, TaskResult)>,
    tally: &mut BTreeMap<String, Tally>,
) -> Vec<String> {
    let mut retry = Vec::new();
    if results.is_empty() {
        return retry;
    }
    let batch: Vec<TaskResult> = results.iter().map(|(_, r)| r.clone()).collect();
    match guarded(recorder.record_results(&batch)).await {
        Ok(outcomes) => {
            for ((message_id, result), outcome) in results.iter().zip(outcomes) {
                log_result(message_id, result, &outcome);
                tally
                    .entry(result.run_id.clone())
                    .or_default()
                    .count(result, &outcome);
                if !settled(&outcome) {
                    retry.push(message_id.clone());
                }
            }
        }
        Err(error) if error.is_retryable() => {
            tracing::warn!(error = %error.chain(), results = results.len(), "could not record results; retried");
            retry.extend(results.iter().map(|(id, _)| id.clone()));
        }
        Err(error) => {
            // Something in the batch is refused for good: each result alone,
            // so that only its own task pays for it.
            tracing::error!(error = %error.chain(), "a batch of results was refused; recording them one by one");
            for (message_id, result) in &results {
                match record_alone(recorder, message_id, result).await {
                    Some(outcome) => tally
                        .entry(result.run_id.clone())
                        .or_default()
                        .count(result, &outcome),
                    None => retry.push(message_id.clone()),
                }
            }
        }
    }
    retry
}

/// A result on its own; if even that is refused for good, its task fails
/// with the reason. The outcome, or `None` if it must be delivered again.
async fn record_alone(
    recorder: &dyn ResultRecorder,
    message_id: &str,
    result: &TaskResult,
) -> Option<RecordOutcome> {
    let error = match guarded(recorder.record_results(std::slice::from_ref(result))).await {
        Ok(outcomes) => {
            let outcome = outcomes
                .into_iter()
                .next()
                .unwrap_or(RecordOutcome::Unknown);
            log_result(message_id, result, &outcome);
            return settled(&outcome).then_some(outcome);
        }
        Err(error) if error.is_retryable() => return None,
        Err(error) => error,
    };
    let reason = format!("the result could not be recorded: {}", error.chain());
    match guarded(recorder.fail_task(&result.task_id, &result.run_id, Utc::now(), Some(&reason)))
        .await
    {
        Ok(outcome) => {
            tracing::error!(%message_id, task_id = %result.task_id, %reason, ?outcome, "task failed: its result was refused");
            // Failed in its stead: counted as a failure.
            let settled = settled(&outcome);
            let outcome = match outcome {
                RecordOutcome::Recorded => RecordOutcome::FailedInstead(reason),
                other => other,
            };
            settled.then_some(outcome)
        }
        Err(error) => {
            tracing::error!(%message_id, task_id = %result.task_id, error = %error.chain(), "could not fail the task either");
            (!error.is_retryable()).then_some(RecordOutcome::Unknown)
        }
    }
}

fn log_result(message_id: &str, result: &TaskResult, outcome: &RecordOutcome) {
    tracing::info!(%message_id, task_id = %result.task_id, run_id = %result.run_id,
        instance_id = %result.instance_id, ?outcome, "result");
}

/// Runs a recording call, turning a panic into a transient error: the
/// message is retried, and the other messages of the batch are not lost.
async fn guarded<T>(call: impl Future<Output = Result<T, Error>>) -> Result<T, Error> {
    match AssertUnwindSafe(call).catch_unwind().await {
        Ok(result) => result,
        Err(_) => Err(Error::transient("record", "the recording call panicked")),
    }
}

/// Records one non-result message: its outcome, or `None` if it must be
/// delivered again.
async fn record_one(recorder: &dyn ResultRecorder, envelope: &Envelope) -> Option<RecordOutcome> {
    let recorded = guarded(async {
        match envelope {
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
                    .fail_task(&task.task_id, &task.run_id, Utc::now(), None)
                    .await
            }
            Envelope::Usage(report) => recorder
                .add_usage(&report.run_id, &report.usage)
                .await
                .map(|()| RecordOutcome::Recorded),
            Envelope::Result(_) => Ok(RecordOutcome::Unknown),
        }
    })
    .await;
    match recorded {
        Ok(outcome) => {
            tracing::info!(?outcome, "recorded");
            settled(&outcome).then_some(outcome)
        }
        Err(error) if error.is_retryable() => {
            tracing::warn!(error = %error.chain(), "could not record; retried");
            None
        }
        Err(error) => {
            tracing::error!(error = %error.chain(), "refused for good; dropped");
            Some(RecordOutcome::Unknown)
        }
    }
}

/// Whether a message needs no further delivery.
fn settled(outcome: &RecordOutcome) -> bool {
    match outcome {
        RecordOutcome::Recorded
        | RecordOutcome::FailedInstead(_)
        | RecordOutcome::Late
        | RecordOutcome::Duplicate
        | RecordOutcome::Unknown => true,
        // A store never answers CancelledFirst (it keeps the result as
        // late); were one to, the result is delivered again.
        RecordOutcome::NotYetQueued | RecordOutcome::CancelledFirst => false,
    }
}

#[cfg(test)]
mod tests;

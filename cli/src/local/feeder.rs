//! Feeds the collector the way an SQS event source mapping does: polls the
//! queue, hands over batches of the configured size, deletes what the
//! collector settled and leaves the reported failures to reappear.

use std::time::Duration;

use nightshift_collector::{Incoming, collect};
use nightshift_core::Error;
use nightshift_core::aws::dynamodb::DynamoStore;
use nightshift_core::aws::meter::Meter;
use nightshift_core::aws::sqs::SqsQueue;
use nightshift_core::ports::{Queue, Received, charge};

use super::template::SqsSource;

/// The function the feeder invokes: its store, and what counts its calls.
pub struct Collector {
    pub store: DynamoStore,
    pub meter: Meter,
    pub memory_mb: u32,
}

pub async fn run(
    queue: SqsQueue,
    source: SqsSource,
    collector: Collector,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let received = tokio::select! {
            received = gather(&queue, &source) => received,
            _ = stop.changed() => return,
        };
        let messages = match received {
            Ok(messages) => messages,
            Err(error) => {
                tracing::warn!(queue = %source.queue, %error, "poll failed");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if messages.is_empty() {
            continue;
        }
        let incoming: Vec<Incoming> = messages.iter().map(Incoming::from).collect();
        let started = std::time::Instant::now();
        let collected = collect(&collector.store, &incoming).await;
        let used = collector
            .meter
            .take_invocation(started.elapsed(), collector.memory_mb);
        charge(
            &collector.store,
            collected.runs.first().map(String::as_str),
            &used,
        )
        .await;
        let failed = collected.retry;
        // Without ReportBatchItemFailures a failure returns the whole batch.
        if !source.report_batch_item_failures && !failed.is_empty() {
            continue;
        }
        let settled: Vec<String> = messages
            .iter()
            .filter(|m| !failed.contains(&m.message_id))
            .map(|m| m.receipt.clone())
            .collect();
        for chunk in settled.chunks(10) {
            if let Err(error) = queue.delete_batch(chunk).await {
                tracing::warn!(queue = %source.queue, %error, "delete failed; the messages come back and are settled again");
            }
        }
    }
}

/// One batch as Lambda's event source makes it: up to `BatchSize`
/// messages (SQS gives at most 10 a receive), gathered for up to the
/// batching window from the first.
async fn gather(queue: &SqsQueue, source: &SqsSource) -> Result<Vec<Received>, Error> {
    let window = Duration::from_secs(source.batching_window_seconds.max(1));
    let wanted = source.batch_size.max(1) as usize;
    let mut batch = queue.receive(source.batch_size, window).await?;
    let until = tokio::time::Instant::now() + window;
    while !batch.is_empty() && batch.len() < wanted {
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            break;
        }
        let room = u32::try_from(wanted - batch.len()).unwrap_or(u32::MAX);
        match queue.receive(room, left).await {
            Ok(more) => batch.extend(more),
            // What was gathered is still a batch; the poll's failure shows
            // at the next one.
            Err(_) => break,
        }
    }
    Ok(batch)
}

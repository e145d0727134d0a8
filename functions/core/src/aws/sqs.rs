//! SQS adapter of [`Queue`]: every call that has a batch form uses it.

use std::time::Duration;

use async_trait::async_trait;
pub use aws_sdk_sqs::Client;

/// A client whose every call `meter` counts.
pub fn metered_client(config: &aws_types::SdkConfig, meter: &crate::aws::meter::Meter) -> Client {
    Client::from_conf(
        aws_sdk_sqs::config::Builder::from(config)
            .interceptor(meter.clone())
            .build(),
    )
}
use aws_sdk_sqs::types::{
    ChangeMessageVisibilityBatchRequestEntry, DeleteMessageBatchRequestEntry,
    MessageSystemAttributeName, QueueAttributeName, SendMessageBatchRequestEntry,
};

use super::{build_error, classify};
use crate::Error;
use crate::ports::{Outgoing, Queue, Received};

#[derive(Debug, Clone)]
pub struct SqsQueue {
    client: Client,
    url: String,
}

impl SqsQueue {
    pub fn new(client: Client, url: impl Into<String>) -> Self {
        Self {
            client,
            url: url.into(),
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }
}

fn seconds(duration: Duration) -> i32 {
    i32::try_from(duration.as_secs()).unwrap_or(i32::MAX)
}

#[async_trait]
impl Queue for SqsQueue {
    async fn send_batch(&self, messages: &[Outgoing]) -> Result<Vec<String>, Error> {
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        let entries = messages
            .iter()
            .map(|m| {
                SendMessageBatchRequestEntry::builder()
                    .id(&m.id)
                    .message_body(&m.body)
                    .build()
                    .map_err(|e| build_error("build SendMessageBatch entry", e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let output = self
            .client
            .send_message_batch()
            .queue_url(&self.url)
            .set_entries(Some(entries))
            .send()
            .await
            .map_err(|e| classify("SendMessageBatch", e))?;
        Ok(output.failed().iter().map(|f| f.id().to_owned()).collect())
    }

    async fn receive(&self, max: u32, wait: Duration) -> Result<Vec<Received>, Error> {
        let output = self
            .client
            .receive_message()
            .queue_url(&self.url)
            .max_number_of_messages(i32::try_from(max.clamp(1, 10)).unwrap_or(10))
            .wait_time_seconds(seconds(wait).min(20))
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
            .send()
            .await
            .map_err(|e| classify("ReceiveMessage", e))?;
        Ok(output
            .messages()
            .iter()
            .filter_map(|m| {
                let receive_count = m
                    .attributes()
                    .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(1);
                Some(Received {
                    message_id: m.message_id()?.to_owned(),
                    receipt: m.receipt_handle()?.to_owned(),
                    receive_count,
                    body: m.body().unwrap_or_default().to_owned(),
                })
            })
            .collect())
    }

    async fn delete_batch(&self, receipts: &[String]) -> Result<Vec<String>, Error> {
        if receipts.is_empty() {
            return Ok(Vec::new());
        }
        let entries = receipts
            .iter()
            .enumerate()
            .map(|(i, receipt)| {
                DeleteMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .receipt_handle(receipt)
                    .build()
                    .map_err(|e| build_error("build DeleteMessageBatch entry", e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let output = self
            .client
            .delete_message_batch()
            .queue_url(&self.url)
            .set_entries(Some(entries))
            .send()
            .await
            .map_err(|e| classify("DeleteMessageBatch", e))?;
        Ok(failed_receipts(
            receipts,
            output.failed().iter().map(|f| f.id()),
        ))
    }

    async fn change_visibility_batch(
        &self,
        receipts: &[String],
        timeout: Duration,
    ) -> Result<Vec<String>, Error> {
        if receipts.is_empty() {
            return Ok(Vec::new());
        }
        let entries = receipts
            .iter()
            .enumerate()
            .map(|(i, receipt)| {
                ChangeMessageVisibilityBatchRequestEntry::builder()
                    .id(i.to_string())
                    .receipt_handle(receipt)
                    .visibility_timeout(seconds(timeout))
                    .build()
                    .map_err(|e| build_error("build ChangeMessageVisibilityBatch entry", e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let output = self
            .client
            .change_message_visibility_batch()
            .queue_url(&self.url)
            .set_entries(Some(entries))
            .send()
            .await
            .map_err(|e| classify("ChangeMessageVisibilityBatch", e))?;
        Ok(failed_receipts(
            receipts,
            output.failed().iter().map(|f| f.id()),
        ))
    }

    async fn visibility_timeout(&self) -> Result<Duration, Error> {
        let output = self
            .client
            .get_queue_attributes()
            .queue_url(&self.url)
            .attribute_names(QueueAttributeName::VisibilityTimeout)
            .send()
            .await
            .map_err(|e| classify("GetQueueAttributes", e))?;
        output
            .attributes()
            .and_then(|a| a.get(&QueueAttributeName::VisibilityTimeout))
            .and_then(|v| v.parse().ok())
            .map(Duration::from_secs)
            .ok_or_else(|| Error::malformed("queue attributes", "no VisibilityTimeout"))
    }
}

/// Batch entries are named by their position; map failed names back.
fn failed_receipts<'a>(
    receipts: &[String],
    failed_ids: impl Iterator<Item = &'a str>,
) -> Vec<String> {
    failed_ids
        .filter_map(|id| id.parse::<usize>().ok())
        .filter_map(|i| receipts.get(i).cloned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_sqs::operation::delete_message_batch::DeleteMessageBatchOutput;
    use aws_sdk_sqs::operation::send_message_batch::SendMessageBatchOutput;
    use aws_sdk_sqs::types::{BatchResultErrorEntry, DeleteMessageBatchResultEntry};
    use aws_smithy_mocks::{RuleMode, mock, mock_client};

    fn entry_error(id: &str) -> BatchResultErrorEntry {
        BatchResultErrorEntry::builder()
            .id(id)
            .code("InternalError")
            .sender_fault(false)
            .build()
            .unwrap()
    }

    #[tokio::test]
    async fn a_batch_send_reports_the_entries_that_failed() {
        let rule = mock!(Client::send_message_batch)
            .match_requests(|r| r.entries().len() == 3 && r.queue_url() == Some("q"))
            .then_output(|| {
                SendMessageBatchOutput::builder()
                    .failed(entry_error("b"))
                    .set_successful(Some(vec![]))
                    .build()
                    .unwrap()
            });
        let client = mock_client!(aws_sdk_sqs, [&rule]);
        let queue = SqsQueue::new(client, "q");
        let messages: Vec<Outgoing> = ["a", "b", "c"]
            .iter()
            .map(|id| Outgoing {
                id: (*id).into(),
                body: "{}".into(),
            })
            .collect();
        assert_eq!(
            queue.send_batch(&messages).await.unwrap(),
            vec!["b".to_owned()]
        );
        assert_eq!(rule.num_calls(), 1);
    }

    #[tokio::test]
    async fn failed_deletes_map_back_to_their_receipts() {
        let rule = mock!(Client::delete_message_batch).then_output(|| {
            DeleteMessageBatchOutput::builder()
                .successful(
                    DeleteMessageBatchResultEntry::builder()
                        .id("0")
                        .build()
                        .unwrap(),
                )
                .failed(entry_error("1"))
                .build()
                .unwrap()
        });
        let client = mock_client!(aws_sdk_sqs, RuleMode::Sequential, [&rule]);
        let queue = SqsQueue::new(client, "q");
        let failed = queue
            .delete_batch(&["r0".to_owned(), "r1".to_owned()])
            .await
            .unwrap();
        assert_eq!(failed, vec!["r1".to_owned()]);
    }

    #[tokio::test]
    async fn an_empty_batch_makes_no_call() {
        let rule = mock!(Client::delete_message_batch)
            .then_output(|| DeleteMessageBatchOutput::builder().build().unwrap());
        let client = mock_client!(aws_sdk_sqs, [&rule]);
        let queue = SqsQueue::new(client, "q");
        assert!(queue.delete_batch(&[]).await.unwrap().is_empty());
        assert_eq!(rule.num_calls(), 0);
    }
}

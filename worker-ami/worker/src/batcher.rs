//! Gathers single requests from many tasks into batch calls: up to 10
//! entries, or whatever arrived within a short window.

use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

const MAX_BATCH: usize = 10;
const WINDOW: Duration = Duration::from_millis(50);

type Reply = oneshot::Sender<bool>;

/// A handle to a batching loop; `submit` resolves once the batch holding the
/// entry was sent, with `true` if the entry succeeded.
#[derive(Debug, Clone)]
pub struct Batcher<T> {
    sender: mpsc::Sender<(T, Reply)>,
}

impl<T: Send + 'static> Batcher<T> {
    /// Starts the loop; `flush` sends one batch and returns, for each entry
    /// in order, whether it succeeded.
    pub fn spawn<F, Fut>(flush: F) -> Self
    where
        F: Fn(Vec<T>) -> Fut + Send + 'static,
        Fut: Future<Output = Vec<bool>> + Send,
    {
        let (sender, mut receiver) = mpsc::channel::<(T, Reply)>(1024);
        tokio::spawn(async move {
            while let Some(first) = receiver.recv().await {
                let mut batch = vec![first];
                let deadline = tokio::time::Instant::now() + WINDOW;
                while batch.len() < MAX_BATCH {
                    match tokio::time::timeout_at(deadline, receiver.recv()).await {
                        Ok(Some(entry)) => batch.push(entry),
                        _ => break,
                    }
                }
                let (entries, replies): (Vec<T>, Vec<Reply>) = batch.into_iter().unzip();
                let outcomes = flush(entries).await;
                for (reply, ok) in replies.into_iter().zip(outcomes) {
                    let _ = reply.send(ok);
                }
            }
        });
        Self { sender }
    }

    pub async fn submit(&self, entry: T) -> bool {
        let (reply, answer) = oneshot::channel();
        if self.sender.send((entry, reply)).await.is_err() {
            return false;
        }
        answer.await.unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[tokio::test]
    async fn concurrent_submissions_share_batches_of_at_most_ten() {
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let recorded = sizes.clone();
        let batcher = Batcher::spawn(move |entries: Vec<u32>| {
            recorded.lock().unwrap().push(entries.len());
            async move { entries.iter().map(|n| n % 7 != 0).collect() }
        });
        let handles: Vec<_> = (1..=25u32)
            .map(|n| {
                let batcher = batcher.clone();
                tokio::spawn(async move { (n, batcher.submit(n).await) })
            })
            .collect();
        for handle in handles {
            let (n, ok) = handle.await.unwrap();
            assert_eq!(ok, n % 7 != 0, "entry {n}");
        }
        let sizes = sizes.lock().unwrap().clone();
        assert_eq!(sizes.iter().sum::<usize>(), 25);
        assert!(sizes.iter().all(|s| *s <= 10));
        assert!(sizes.len() <= 5, "{sizes:?}");
    }
}

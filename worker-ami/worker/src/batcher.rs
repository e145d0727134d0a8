//! Gathers single requests from many tasks into batch calls: up to 10
//! entries and 1 MiB of bodies (SQS's limits for one batch), or whatever
//! arrived within a window from the first.

use std::time::Duration;

use nightshift_core::limits::{SQS_BATCH_ENTRIES, SQS_MESSAGE_LIMIT};
use tokio::sync::{mpsc, oneshot};

type Reply = oneshot::Sender<bool>;

/// A handle to a batching loop; `submit` resolves once the batch holding the
/// entry was sent, with `true` if the entry succeeded.
#[derive(Debug, Clone)]
pub struct Batcher<T> {
    sender: mpsc::Sender<(T, Reply)>,
}

impl<T: Send + 'static> Batcher<T> {
    /// Starts the loop; a batch waits at most `window` for entries after
    /// its first; `bytes` weighs an entry, `flush` sends one batch and
    /// returns, for each entry in order, whether it succeeded.
    pub fn spawn<W, F, Fut>(window: Duration, bytes: W, flush: F) -> Self
    where
        W: Fn(&T) -> usize + Send + 'static,
        F: Fn(Vec<T>) -> Fut + Send + 'static,
        Fut: Future<Output = Vec<bool>> + Send,
    {
        let (sender, mut receiver) = mpsc::channel::<(T, Reply)>(1024);
        tokio::spawn(async move {
            let mut carried: Option<(T, Reply)> = None;
            loop {
                let first = match carried.take() {
                    Some(entry) => entry,
                    None => match receiver.recv().await {
                        Some(entry) => entry,
                        None => return,
                    },
                };
                let mut weight = bytes(&first.0);
                let mut batch = vec![first];
                let deadline = tokio::time::Instant::now() + window;
                while batch.len() < SQS_BATCH_ENTRIES {
                    match tokio::time::timeout_at(deadline, receiver.recv()).await {
                        Ok(Some(entry)) => {
                            let size = bytes(&entry.0);
                            if weight + size > SQS_MESSAGE_LIMIT {
                                // It opens the next batch.
                                carried = Some(entry);
                                break;
                            }
                            weight += size;
                            batch.push(entry);
                        }
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

    fn recording_batcher(sizes: Arc<Mutex<Vec<(usize, usize)>>>) -> Batcher<usize> {
        Batcher::spawn(
            Duration::from_millis(50),
            |n: &usize| *n,
            move |entries: Vec<usize>| {
                sizes
                    .lock()
                    .unwrap()
                    .push((entries.len(), entries.iter().sum()));
                async move { entries.iter().map(|n| n % 7 != 0).collect() }
            },
        )
    }

    #[tokio::test]
    async fn concurrent_submissions_share_batches_of_at_most_ten() {
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let batcher = recording_batcher(sizes.clone());
        let handles: Vec<_> = (1..=25usize)
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
        assert_eq!(sizes.iter().map(|s| s.0).sum::<usize>(), 25);
        assert!(sizes.iter().all(|s| s.0 <= 10));
        assert!(sizes.len() <= 5, "{sizes:?}");
    }

    #[tokio::test]
    async fn batches_stay_under_a_mebibyte() {
        // Six results of 180 KiB finishing together: 1080 KiB in all.
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let batcher = recording_batcher(sizes.clone());
        let handles: Vec<_> = (0..6)
            .map(|_| {
                let batcher = batcher.clone();
                tokio::spawn(async move { batcher.submit(180 * 1024).await })
            })
            .collect();
        for handle in handles {
            assert!(handle.await.unwrap());
        }
        let sizes = sizes.lock().unwrap().clone();
        assert_eq!(sizes.iter().map(|s| s.0).sum::<usize>(), 6);
        assert!(sizes.iter().all(|s| s.1 <= SQS_MESSAGE_LIMIT), "{sizes:?}");
    }
}

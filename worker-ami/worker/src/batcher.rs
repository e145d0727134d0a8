//! Gathers single requests from many tasks into batch calls: up to 10
//! entries and 1 MiB of bodies (SQS's limits for one batch), or whatever
//! arrived within a window from the first.

use std::sync::Arc;
use std::time::Duration;

use nightshift_core::limits::{SQS_BATCH_ENTRIES, SQS_MESSAGE_LIMIT};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

type Reply = oneshot::Sender<bool>;

/// How often an open batch asks whether more entries may still come.
const LOOK_EVERY: Duration = Duration::from_millis(100);

/// How long a batch waits for entries after its first.
#[derive(Clone)]
pub struct Window {
    /// The longest wait.
    most: Duration,
    /// Whether more entries may come soon; once not, the batch goes
    /// (within [`LOOK_EVERY`]) rather than wait out `most`.
    more_may_come: Option<Arc<dyn Fn() -> bool + Send + Sync>>,
}

impl Window {
    /// A fixed wait.
    pub fn fixed(most: Duration) -> Self {
        Self {
            most,
            more_may_come: None,
        }
    }

    /// At most `most`, and only while `more_may_come` says so.
    pub fn while_more_may_come(
        most: Duration,
        more_may_come: impl Fn() -> bool + Send + Sync + 'static,
    ) -> Self {
        Self {
            most,
            more_may_come: Some(Arc::new(more_may_come)),
        }
    }

    /// When a batch opened at `opened` stops waiting for the next entry,
    /// looked at `now`: its end, or a moment later if more may come.
    fn look_until(&self, opened: Instant, now: Instant) -> Instant {
        let end = opened + self.most;
        match &self.more_may_come {
            Some(_) => end.min(now + LOOK_EVERY),
            None => end,
        }
    }

    /// Whether a batch opened at `opened` should go now.
    fn is_over(&self, opened: Instant, now: Instant) -> bool {
        now >= opened + self.most || self.more_may_come.as_ref().is_some_and(|more| !more())
    }
}

/// A handle to a batching loop; `submit` resolves once the batch holding the
/// entry was sent, with `true` if the entry succeeded.
#[derive(Debug, Clone)]
pub struct Batcher<T> {
    sender: mpsc::Sender<(T, Reply)>,
}

impl<T: Send + 'static> Batcher<T> {
    /// Starts the loop; a batch waits for entries after its first as
    /// `window` says; `bytes` weighs an entry, `flush` sends one batch and
    /// returns, for each entry in order, whether it succeeded.
    pub fn spawn<W, F, Fut>(window: Window, bytes: W, flush: F) -> Self
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
                let opened = Instant::now();
                while batch.len() < SQS_BATCH_ENTRIES {
                    let until = window.look_until(opened, Instant::now());
                    match tokio::time::timeout_at(until, receiver.recv()).await {
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
                        Ok(None) => break,
                        Err(_) if window.is_over(opened, Instant::now()) => break,
                        Err(_) => {}
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
            Window::fixed(Duration::from_millis(50)),
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

    #[tokio::test]
    async fn a_batch_waits_while_more_may_come_and_goes_once_nothing_will() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let busy = Arc::new(AtomicBool::new(true));
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let recorded = sizes.clone();
        let probe = busy.clone();
        let batcher = Batcher::spawn(
            Window::while_more_may_come(Duration::from_secs(60), move || {
                probe.load(Ordering::SeqCst)
            }),
            |_: &usize| 0,
            move |entries: Vec<usize>| {
                recorded.lock().unwrap().push(entries.len());
                async move { vec![true; entries.len()] }
            },
        );
        let submit = |n| {
            let batcher = batcher.clone();
            tokio::spawn(async move { batcher.submit(n).await })
        };
        let first = submit(1);
        tokio::time::sleep(Duration::from_millis(400)).await;
        let second = submit(2);
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(sizes.lock().unwrap().is_empty(), "sent while more may come");
        busy.store(false, Ordering::SeqCst);
        let both = tokio::time::timeout(Duration::from_secs(2), async {
            (first.await.unwrap(), second.await.unwrap())
        })
        .await
        .expect("the batch went once nothing more may come");
        assert_eq!(both, (true, true));
        assert_eq!(*sizes.lock().unwrap(), vec![2]);
    }
}

//! The dispatcher: a reconciler, safe to run at any time and any number of
//! times at once. Each pass:
//!
//! 1. finds the open run, or opens one when tasks are pending;
//! 2. takes the run's dispatch lease (a conditional write with an expiry), so
//!    two passes at once never queue the same task or launch two fleets;
//! 3. moves pending tasks to the task queue, 10 per `SendMessageBatch`, each
//!    batch then marked QUEUED with the run's counter in one transaction,
//!    keeping at most `max_queued` tasks of the run in flight;
//! 4. sizes the spot fleet from the backlog and launches what is missing;
//! 5. closes the run when nothing is pending and every queued task ended.
//!
//! A message is sent before its task is marked, so a pass that dies between
//! the two leaves the task PENDING and a later pass sends it again: a task is
//! queued at least once, and its result is still recorded once.

use std::time::Duration;

use chrono::{DateTime, Utc};
use nightshift_core::ports::{Fleet, Outgoing, PendingTasks, Queue, RunStore};
use nightshift_core::{Envelope, PendingTask, Run, TaskMessage};
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    #[error(transparent)]
    Store(#[from] nightshift_core::Error),
}

impl DispatchError {
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Store(e) => e.is_retryable(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub max_instances: u32,
    pub slots_per_instance: u32,
    /// The most tasks of a run queued and not yet ended at once.
    pub max_queued: u64,
    pub pending_shards: u32,
    /// Longer than one pass can take (the function's timeout).
    pub lease_ttl: Duration,
}

/// The ports a pass uses.
pub struct Dispatcher<'a> {
    pub runs: &'a dyn RunStore,
    pub pending: &'a dyn PendingTasks,
    pub queue: &'a dyn Queue,
    pub fleet: &'a dyn Fleet,
    pub settings: &'a Settings,
}

/// What one pass did, returned by the function and logged.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct Pass {
    pub run_id: Option<String>,
    /// Why the pass did nothing, when it did nothing.
    pub skipped: Option<&'static str>,
    pub queued: usize,
    pub launched: usize,
    pub closed: bool,
}

/// Tasks read from the index per query.
const PAGE: usize = 100;
const SQS_BATCH: usize = 10;

impl Dispatcher<'_> {
    pub async fn pass(&self, now: DateTime<Utc>, owner: &str) -> Result<Pass, DispatchError> {
        let run = match self.runs.current_run().await? {
            Some(run) => run,
            None if self.any_pending().await? => {
                let new_id = uuid::Uuid::new_v4().to_string();
                self.runs.open_run(&new_id, now).await?.0
            }
            None => {
                return Ok(Pass {
                    skipped: Some("no open run and nothing pending"),
                    ..Pass::default()
                });
            }
        };
        let mut pass = Pass {
            run_id: Some(run.id.clone()),
            ..Pass::default()
        };
        if !self
            .runs
            .acquire_lease(&run.id, owner, now, self.settings.lease_ttl)
            .await?
        {
            pass.skipped = Some("another dispatcher holds the run's lease");
            return Ok(pass);
        }
        let worked = self.work(&run, now, &mut pass).await;
        if let Err(error) = self.runs.release_lease(&run.id, owner).await {
            tracing::warn!(run_id = %run.id, error = %error, "could not release the lease; it expires");
        }
        worked.map(|()| pass)
    }

    async fn work(
        &self,
        run: &Run,
        now: DateTime<Utc>,
        pass: &mut Pass,
    ) -> Result<(), DispatchError> {
        let room = self.settings.max_queued.saturating_sub(run.in_flight());
        pass.queued = self
            .queue_pending(&run.id, usize::try_from(room).unwrap_or(usize::MAX))
            .await?;
        let run = self.runs.run(&run.id).await?.unwrap_or_else(|| run.clone());
        pass.launched = self.size_fleet(&run).await?;
        if run.in_flight() == 0 && !self.any_pending().await? {
            pass.closed = self.runs.close_run(&run.id, now).await?;
            if pass.closed {
                tracing::info!(run_id = %run.id, done = run.done, failed = run.failed, "run finished");
            }
        }
        Ok(())
    }

    async fn any_pending(&self) -> Result<bool, DispatchError> {
        for shard in 0..self.settings.pending_shards {
            if !self.pending.pending(shard, 1).await?.is_empty() {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Sends up to `room` pending tasks, shard by shard; returns how many
    /// were queued.
    async fn queue_pending(&self, run_id: &str, room: usize) -> Result<usize, DispatchError> {
        let mut queued = 0;
        for shard in 0..self.settings.pending_shards {
            while queued < room {
                let want = PAGE.min(room - queued);
                let page = self.pending.pending(shard, want).await?;
                for chunk in page.chunks(SQS_BATCH) {
                    queued += self.queue_chunk(run_id, chunk).await?;
                }
                if page.len() < want {
                    break;
                }
            }
        }
        Ok(queued)
    }

    async fn queue_chunk(
        &self,
        run_id: &str,
        tasks: &[PendingTask],
    ) -> Result<usize, DispatchError> {
        let messages: Vec<Outgoing> = tasks
            .iter()
            .enumerate()
            .map(|(i, task)| Outgoing {
                id: i.to_string(),
                body: Envelope::Task(TaskMessage {
                    task_id: task.id.clone(),
                    run_id: run_id.to_owned(),
                    account: task.account.clone(),
                    kernel: task.kernel.clone(),
                    payload: task.payload.clone(),
                    checkpoint_key: None,
                    prior_attempts: 0,
                })
                .to_json(),
            })
            .collect();
        let failed = self.queue.send_batch(&messages).await?;
        let sent: Vec<String> = tasks
            .iter()
            .enumerate()
            .filter(|(i, _)| !failed.contains(&i.to_string()))
            .map(|(_, task)| task.id.clone())
            .collect();
        if !failed.is_empty() {
            tracing::warn!(
                run_id,
                failed = failed.len(),
                "some tasks were not sent; they stay pending"
            );
        }
        Ok(self.pending.mark_queued(run_id, &sent).await?.len())
    }

    /// Launches workers for the backlog that the active ones cannot take.
    async fn size_fleet(&self, run: &Run) -> Result<usize, DispatchError> {
        let slots = u64::from(self.settings.slots_per_instance.max(1));
        let wanted = run
            .in_flight()
            .div_ceil(slots)
            .min(u64::from(self.settings.max_instances));
        let active = self.fleet.active_instances(&run.id).await?.len() as u64;
        if wanted <= active {
            return Ok(0);
        }
        let count = u32::try_from(wanted - active).unwrap_or(u32::MAX);
        let token = format!("{}-{}", run.id, run.fleet_requests);
        let launched = self.fleet.launch(&run.id, count, &token).await?;
        self.runs
            .record_fleet(&run.id, run.fleet_requests, &launched)
            .await?;
        tracing::info!(run_id = %run.id, requested = count, launched = launched.len(), "spot workers launched");
        Ok(launched.len())
    }
}

#[cfg(test)]
mod tests;

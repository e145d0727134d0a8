//! The ports the dispatcher and the collector use, as the model's AWS: the
//! in-memory store and fleet hold the state and keep the rules; each call
//! first pays what the AWS adapter's requests would (see [`crate::cloud`]).
//!
//! What a port call costs mirrors what `nightshift_core::aws` sends for it:
//! the requests, their items, and the partitions those items and their
//! index entries live in. Item sizes are the stored JSON's.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use nightshift_core::fakes::{FakeFleet, MemoryStore, refuse_oversized_batch};
use nightshift_core::plan::{FleetPlan, Lifecycle};
use nightshift_core::ports::{
    AttemptKind, Cursor, Fleet, Outgoing, Page, PendingTasks, Queue, Received, RecordOutcome,
    ResultRecorder, RunReader, RunStore, Sent, TaskReader, WorkerInstance,
};
use nightshift_core::{
    AttemptEvent, Error, InstanceSeen, Launched, PendingTask, Run, SpotPrice, Task, TaskResult,
    Usage,
};

use crate::cloud::{Cloud, Service, Units};

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A transactional write takes twice the units of a plain one.
const TRANSACTIONAL: f64 = 2.0;
/// The most items of one transaction; results leave room for counters.
const TRANSACTION_ITEMS: usize = 100;
const RESULTS_PER_TRANSACTION: usize = 90;
/// An index entry of the `pending` (keys only) and `by_run`/`by_instance`
/// (a few attributes) indexes: under a kilobyte, one unit.
const INDEX_ENTRY_UNITS: f64 = 1.0;

/// Write units of an item of `bytes`: one per kilobyte, rounded up.
fn write_units(bytes: usize) -> f64 {
    (bytes as f64 / 1024.0).ceil().max(1.0)
}

/// Read units of a strongly consistent read of `bytes`: one per 4 KB.
fn read_units(bytes: usize) -> f64 {
    (bytes as f64 / 4096.0).ceil().max(1.0)
}

fn run_partition(run_id: &str) -> String {
    format!("run#{run_id}")
}

/// Task items are spread over the table's partitions by their ids: they
/// are limited by the table, not by one partition.
const TASKS: &str = "table#tasks";

/// The table and its indexes, at the model's cost.
pub struct Store {
    pub inner: Arc<MemoryStore>,
    pub cloud: Arc<Cloud>,
    /// The size of a task's item, payload and attributes.
    pub task_bytes: usize,
    /// Each result recorded: how long after its kernel ended.
    pub lags: Mutex<Vec<Duration>>,
    /// The largest the run item was, in bytes.
    pub largest_run: Mutex<usize>,
    /// The run item's size as last measured, and when (it changes slowly;
    /// measuring it is the model's own dearest step).
    pub run_size: Mutex<Option<(Duration, usize)>>,
    pub start: DateTime<Utc>,
}

impl Store {
    /// The run item's size (its JSON, measured at most once a second),
    /// which every read and write of it pays.
    async fn run_bytes(&self, run_id: &str) -> usize {
        let now = self.cloud.clock.now();
        if let Some((at, bytes)) = *lock(&self.run_size)
            && now.saturating_sub(at) < Duration::from_secs(1)
        {
            return bytes;
        }
        let bytes = match self.inner.run(run_id).await {
            Ok(Some(run)) => serde_json::to_vec(&run).map(|v| v.len()).unwrap_or(0),
            _ => 0,
        };
        let mut largest = lock(&self.largest_run);
        *largest = (*largest).max(bytes);
        *lock(&self.run_size) = Some((now, bytes));
        bytes
    }

    /// A write of the run item alone: an `UpdateItem`, or a transaction
    /// (twice the units).
    async fn run_write(&self, transactional: bool, run_id: &str) -> Result<(), Error> {
        let bytes = self.run_bytes(run_id).await;
        let partition = run_partition(run_id);
        if transactional {
            let units = [Units::write(
                partition.clone(),
                write_units(bytes) * TRANSACTIONAL,
            )];
            self.cloud.transaction(&[partition], &units).await
        } else {
            let units = [Units::write(partition, write_units(bytes))];
            self.cloud.dynamodb("UpdateItem", &units).await
        }
    }

    async fn run_read(&self, run_id: &str) -> Result<(), Error> {
        let units = read_units(self.run_bytes(run_id).await);
        self.cloud
            .dynamodb("GetItem", &[Units::read(run_partition(run_id), units)])
            .await
    }

    /// One transaction that writes `tasks` task items (each with its index
    /// entries) and the run's counters.
    async fn task_transaction(
        &self,
        run_id: &str,
        tasks: usize,
        indexes: &[String],
    ) -> Result<(), Error> {
        let run_units = write_units(self.run_bytes(run_id).await) * TRANSACTIONAL;
        let mut units = vec![
            Units::write(
                TASKS,
                write_units(self.task_bytes) * TRANSACTIONAL * tasks as f64,
            ),
            Units::write(run_partition(run_id), run_units),
        ];
        units.extend(
            indexes
                .iter()
                .map(|partition| Units::write(partition.clone(), INDEX_ENTRY_UNITS)),
        );
        self.cloud
            .transaction(&[run_partition(run_id)], &units)
            .await
    }
}

#[async_trait]
impl RunReader for Store {
    async fn run(&self, run_id: &str) -> Result<Option<Run>, Error> {
        self.run_read(run_id).await?;
        self.inner.run(run_id).await
    }
}

#[async_trait]
impl RunStore for Store {
    async fn current_run(&self) -> Result<Option<Run>, Error> {
        // The pointer item, then the run.
        self.cloud
            .dynamodb("GetItem", &[Units::read("pointer#current", 1.0)])
            .await?;
        let run = self.inner.current_run().await?;
        if let Some(run) = &run {
            self.run_read(&run.id).await?;
        }
        Ok(run)
    }

    async fn runs_page(&self, limit: usize, after: Option<&Cursor>) -> Result<Page<Run>, Error> {
        self.cloud
            .dynamodb("Query", &[Units::read("index#runs", 1.0)])
            .await?;
        self.inner.runs_page(limit, after).await
    }

    async fn open_run(
        &self,
        new_run_id: &str,
        now: DateTime<Utc>,
        deadline: DateTime<Utc>,
    ) -> Result<(Run, bool), Error> {
        let units = [
            Units::write(run_partition(new_run_id), 2.0 * TRANSACTIONAL),
            Units::write("pointer#current", TRANSACTIONAL),
        ];
        self.cloud
            .transaction(&[run_partition(new_run_id)], &units)
            .await?;
        self.inner.open_run(new_run_id, now, deadline).await
    }

    async fn acquire_lease(
        &self,
        run_id: &str,
        owner: &str,
        now: DateTime<Utc>,
        ttl: Duration,
    ) -> Result<bool, Error> {
        self.run_write(false, run_id).await?;
        self.inner.acquire_lease(run_id, owner, now, ttl).await
    }

    async fn release_lease(
        &self,
        run_id: &str,
        owner: &str,
        waiting: bool,
        plan: Option<&FleetPlan>,
    ) -> Result<(), Error> {
        self.run_write(false, run_id).await?;
        self.inner.release_lease(run_id, owner, waiting, plan).await
    }

    async fn record_fleet(
        &self,
        run_id: &str,
        request_number: u32,
        launched: &[Launched],
        prices: &[SpotPrice],
    ) -> Result<bool, Error> {
        self.run_write(false, run_id).await?;
        self.inner
            .record_fleet(run_id, request_number, launched, prices)
            .await
    }

    async fn record_instances(&self, run_id: &str, seen: &[InstanceSeen]) -> Result<(), Error> {
        if !seen.is_empty() {
            self.run_write(false, run_id).await?;
        }
        self.inner.record_instances(run_id, seen).await
    }

    async fn close_run(&self, run_id: &str, now: DateTime<Utc>) -> Result<bool, Error> {
        self.run_write(true, run_id).await?;
        self.inner.close_run(run_id, now).await
    }

    async fn cancel_run(&self, run_id: &str, now: DateTime<Utc>) -> Result<bool, Error> {
        self.run_write(false, run_id).await?;
        self.inner.cancel_run(run_id, now).await
    }

    async fn release_run(&self, run_id: &str) -> Result<(), Error> {
        self.run_write(true, run_id).await?;
        self.inner.release_run(run_id).await
    }
}

#[async_trait]
impl PendingTasks for Store {
    async fn pending(
        &self,
        shard: u32,
        limit: usize,
        after: Option<&Cursor>,
    ) -> Result<Page<PendingTask>, Error> {
        let page = self.inner.pending(shard, limit, after).await?;
        // The index (keys only), then the tasks' items in one batch.
        self.cloud
            .dynamodb("Query", &[Units::read(format!("pending#{shard}"), 1.0)])
            .await?;
        if !page.items.is_empty() {
            let units = read_units(self.task_bytes) / 2.0 * page.items.len() as f64;
            self.cloud
                .dynamodb("BatchGetItem", &[Units::read(TASKS, units)])
                .await?;
        }
        Ok(page)
    }

    async fn mark_queued(&self, run_id: &str, tasks: &[Sent]) -> Result<Vec<String>, Error> {
        let shards = self.inner.shards();
        for chunk in tasks.chunks(TRANSACTION_ITEMS - 1) {
            // Each task leaves its pending shard's index and joins the run's.
            let indexes: Vec<String> = chunk
                .iter()
                .flat_map(|sent| {
                    let shard = nightshift_core::model::pending_shard(&sent.task_id, shards);
                    [format!("pending#{shard}"), format!("by_run#{run_id}")]
                })
                .collect();
            self.task_transaction(run_id, chunk.len(), &indexes).await?;
        }
        self.inner.mark_queued(run_id, tasks).await
    }

    async fn cancel_tasks(
        &self,
        run_id: &str,
        task_ids: &[String],
        now: DateTime<Utc>,
    ) -> Result<Vec<String>, Error> {
        for chunk in task_ids.chunks(TRANSACTION_ITEMS - 1) {
            let indexes = vec![format!("by_run#{run_id}"); chunk.len()];
            self.task_transaction(run_id, chunk.len(), &indexes).await?;
        }
        self.inner.cancel_tasks(run_id, task_ids, now).await
    }
}

#[async_trait]
impl TaskReader for Store {
    async fn task(&self, task_id: &str) -> Result<Option<Task>, Error> {
        self.cloud
            .dynamodb(
                "GetItem",
                &[Units::read(TASKS, read_units(self.task_bytes))],
            )
            .await?;
        self.inner.task(task_id).await
    }

    async fn tasks(&self, task_ids: &[String]) -> Result<Vec<Task>, Error> {
        let units = read_units(self.task_bytes) * task_ids.len() as f64;
        self.cloud
            .dynamodb("BatchGetItem", &[Units::read(TASKS, units)])
            .await?;
        self.inner.tasks(task_ids).await
    }

    async fn run_tasks_page(
        &self,
        run_id: &str,
        limit: usize,
        after: Option<&Cursor>,
    ) -> Result<Page<Task>, Error> {
        let page = self.inner.run_tasks_page(run_id, limit, after).await?;
        let units = (page.items.len() as f64 * 512.0 / 4096.0).ceil().max(1.0) / 2.0;
        self.cloud
            .dynamodb("Query", &[Units::read(format!("by_run#{run_id}"), units)])
            .await?;
        Ok(page)
    }
}

#[async_trait]
impl ResultRecorder for Store {
    async fn record_results(&self, results: &[TaskResult]) -> Result<Vec<RecordOutcome>, Error> {
        for group in results.chunks(RESULTS_PER_TRANSACTION) {
            let Some(first) = group.first() else { continue };
            // Each result changes its task's entry of the run's index and
            // adds one to its instance's.
            let indexes: Vec<String> = group
                .iter()
                .flat_map(|r| {
                    [
                        format!("by_run#{}", r.run_id),
                        format!("by_instance#{}", r.instance_id),
                    ]
                })
                .collect();
            self.task_transaction(&first.run_id, group.len(), &indexes)
                .await?;
        }
        let outcomes = self.inner.record_results(results).await?;
        let now =
            self.start + chrono::Duration::from_std(self.cloud.clock.now()).unwrap_or_default();
        let mut lags = lock(&self.lags);
        for (result, outcome) in results.iter().zip(&outcomes) {
            if *outcome == RecordOutcome::Recorded {
                let lag = (now - result.finished_at).to_std().unwrap_or_default();
                lags.push(lag);
            }
        }
        Ok(outcomes)
    }

    async fn record_attempt(
        &self,
        event: &AttemptEvent,
        kind: AttemptKind,
    ) -> Result<RecordOutcome, Error> {
        self.cloud
            .dynamodb(
                "UpdateItem",
                &[Units::write(TASKS, write_units(self.task_bytes))],
            )
            .await?;
        self.inner.record_attempt(event, kind).await
    }

    async fn add_usage(&self, run_id: &str, usage: &Usage) -> Result<(), Error> {
        self.run_write(false, run_id).await?;
        self.inner.add_usage(run_id, usage).await
    }

    async fn fail_task(
        &self,
        task_id: &str,
        run_id: &str,
        at: DateTime<Utc>,
        reason: Option<&str>,
    ) -> Result<RecordOutcome, Error> {
        self.task_transaction(run_id, 1, &[format!("by_run#{run_id}")])
            .await?;
        self.inner.fail_task(task_id, run_id, at, reason).await
    }
}

/// EC2, at the model's latency.
pub struct Ec2 {
    pub inner: Arc<FakeFleet>,
    pub cloud: Arc<Cloud>,
    pub start: DateTime<Utc>,
}

impl Ec2 {
    async fn call(&self, operation: &'static str) {
        self.cloud.latency(Service::Ec2, operation).await;
        let now =
            self.start + chrono::Duration::from_std(self.cloud.clock.now()).unwrap_or_default();
        self.inner.set_clock(now);
    }
}

#[async_trait]
impl Fleet for Ec2 {
    async fn launch(
        &self,
        run_id: &str,
        slots: u32,
        lifecycle: Lifecycle,
        token: &str,
    ) -> Result<Vec<Launched>, Error> {
        self.call("CreateFleet").await;
        self.inner.launch(run_id, slots, lifecycle, token).await
    }

    async fn instances(&self) -> Result<Vec<WorkerInstance>, Error> {
        self.call("DescribeInstances").await;
        self.inner.instances().await
    }

    async fn terminate(&self, instance_ids: &[String]) -> Result<(), Error> {
        self.call("TerminateInstances").await;
        self.inner.terminate(instance_ids).await
    }

    async fn spot_prices(
        &self,
        instance_types: &[String],
        now: DateTime<Utc>,
    ) -> Result<Vec<SpotPrice>, Error> {
        self.call("DescribeSpotPriceHistory").await;
        self.inner.spot_prices(instance_types, now).await
    }
}

/// An SQS standard queue in virtual time: long polls, visibility
/// timeouts, and the limit on messages in flight.
pub struct SqsQueue {
    cloud: Arc<Cloud>,
    visibility: Duration,
    state: Mutex<QueueState>,
}

#[derive(Default)]
struct QueueState {
    next_id: u64,
    visible: VecDeque<Message>,
    /// By receipt: the message, and when it shows again.
    in_flight: HashMap<String, (Message, Duration)>,
    expiries: BinaryHeap<Reverse<(Duration, String)>>,
    /// Bumped at every send, so a long poll knows to look again.
    arrivals: u64,
    waiters: Vec<Waker>,
    peak_in_flight: usize,
}

#[derive(Clone)]
struct Message {
    id: String,
    body: String,
    receives: u32,
}

impl SqsQueue {
    pub fn new(cloud: Arc<Cloud>, visibility: Duration) -> Self {
        Self {
            cloud,
            visibility,
            state: Mutex::default(),
        }
    }

    /// How long a received message stays hidden.
    pub fn visibility(&self) -> Duration {
        self.visibility
    }

    /// Messages waiting to be received.
    pub fn visible(&self) -> usize {
        let mut state = lock(&self.state);
        self.show_expired(&mut state);
        state.visible.len()
    }

    pub fn in_flight(&self) -> usize {
        lock(&self.state).in_flight.len()
    }

    pub fn peak_in_flight(&self) -> usize {
        lock(&self.state).peak_in_flight
    }

    /// Messages whose visibility timeout ended show again.
    fn show_expired(&self, state: &mut QueueState) {
        let now = self.cloud.clock.now();
        while let Some(Reverse((at, _))) = state.expiries.peek() {
            if *at > now {
                break;
            }
            let Some(Reverse((at, receipt))) = state.expiries.pop() else {
                break;
            };
            if state
                .in_flight
                .get(&receipt)
                .is_some_and(|(_, due)| *due == at)
                && let Some((message, _)) = state.in_flight.remove(&receipt)
            {
                state.visible.push_back(message);
            }
        }
    }

    fn take(&self, max: u32) -> Result<Vec<Received>, Error> {
        let mut state = lock(&self.state);
        self.show_expired(&mut state);
        if state.in_flight.len() >= self.cloud.limits.sqs_in_flight && !state.visible.is_empty() {
            return Err(Error::transient(
                "ReceiveMessage",
                "OverLimit: too many messages in flight",
            ));
        }
        let due = self.cloud.clock.now() + self.visibility;
        let mut received = Vec::new();
        while received.len() < max as usize {
            let Some(mut message) = state.visible.pop_front() else {
                break;
            };
            message.receives += 1;
            let receipt = format!("{}#{}", message.id, message.receives);
            received.push(Received {
                message_id: message.id.clone(),
                receipt: receipt.clone(),
                receive_count: message.receives,
                body: message.body.clone(),
            });
            state.expiries.push(Reverse((due, receipt.clone())));
            state.in_flight.insert(receipt, (message, due));
        }
        state.peak_in_flight = state.peak_in_flight.max(state.in_flight.len());
        Ok(received)
    }

    fn arrivals(&self) -> u64 {
        lock(&self.state).arrivals
    }
}

/// Ready once a message was sent after `seen` arrivals.
struct Arrival<'a> {
    queue: &'a SqsQueue,
    seen: u64,
}

impl Future for Arrival<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut state = lock(&self.queue.state);
        if state.arrivals != self.seen {
            return Poll::Ready(());
        }
        state.waiters.push(cx.waker().clone());
        Poll::Pending
    }
}

#[async_trait]
impl Queue for SqsQueue {
    async fn send_batch(&self, messages: &[Outgoing]) -> Result<Vec<String>, Error> {
        self.cloud.latency(Service::Sqs, "SendMessageBatch").await;
        refuse_oversized_batch(messages)?;
        let waiters = {
            let mut state = lock(&self.state);
            for message in messages {
                state.next_id += 1;
                let id = format!("m{}", state.next_id);
                state.visible.push_back(Message {
                    id,
                    body: message.body.clone(),
                    receives: 0,
                });
            }
            state.arrivals += 1;
            std::mem::take(&mut state.waiters)
        };
        waiters.into_iter().for_each(Waker::wake);
        Ok(Vec::new())
    }

    async fn receive(&self, max: u32, wait: Duration) -> Result<Vec<Received>, Error> {
        self.cloud.latency(Service::Sqs, "ReceiveMessage").await;
        let until = self.cloud.clock.now() + wait;
        loop {
            let seen = self.arrivals();
            let received = self.take(max)?;
            if !received.is_empty() || self.cloud.clock.now() >= until {
                return Ok(received);
            }
            let arrival = Arrival { queue: self, seen };
            futures::future::select(Box::pin(arrival), self.cloud.clock.sleep_until(until)).await;
        }
    }

    async fn delete_batch(&self, receipts: &[String]) -> Result<Vec<String>, Error> {
        self.cloud.latency(Service::Sqs, "DeleteMessageBatch").await;
        let mut state = lock(&self.state);
        for receipt in receipts {
            state.in_flight.remove(receipt);
        }
        Ok(Vec::new())
    }

    async fn change_visibility_batch(
        &self,
        receipts: &[String],
        timeout: Duration,
    ) -> Result<Vec<String>, Error> {
        self.cloud
            .latency(Service::Sqs, "ChangeMessageVisibilityBatch")
            .await;
        let due = self.cloud.clock.now() + timeout;
        let mut state = lock(&self.state);
        for receipt in receipts {
            if let Some((_, at)) = state.in_flight.get_mut(receipt) {
                *at = due;
            } else {
                continue;
            }
            state.expiries.push(Reverse((due, receipt.clone())));
        }
        self.show_expired(&mut state);
        Ok(Vec::new())
    }

    async fn visibility_timeout(&self) -> Result<Duration, Error> {
        Ok(self.visibility)
    }
}

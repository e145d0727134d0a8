//! What the model charges each AWS request: a latency drawn from the
//! service's distribution, and, for DynamoDB, capacity taken from the
//! partitions it writes or reads, throttled at the published per-partition
//! limits and retried as the SDK's standard retry does.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use nightshift_core::Error;

use crate::clock::Clock;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A service's latency: log-normal through its median and 99th percentile.
#[derive(Debug, Clone, Copy)]
pub struct Latency {
    pub p50: Duration,
    pub p99: Duration,
}

impl Latency {
    pub const fn ms(p50: u64, p99: u64) -> Self {
        Self {
            p50: Duration::from_millis(p50),
            p99: Duration::from_millis(p99),
        }
    }

    fn sample(&self, rng: &mut fastrand::Rng) -> Duration {
        // z of the 99th percentile of the standard normal.
        const Z99: f64 = 2.326_348;
        let median = self.p50.as_secs_f64();
        let sigma = (self.p99.as_secs_f64() / median).ln() / Z99;
        // Box–Muller: one standard normal draw.
        let (u, v) = (1.0 - rng.f64(), rng.f64());
        let z = (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos();
        Duration::from_secs_f64(median * (sigma * z).exp())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Service {
    DynamoDb,
    Sqs,
    Ec2,
}

/// The published limits and the assumed latencies the model runs at.
#[derive(Debug, Clone)]
pub struct Limits {
    pub dynamodb: Latency,
    pub sqs: Latency,
    pub ec2: Latency,
    /// DynamoDB: write units per second one partition takes.
    pub partition_wcu: f64,
    /// DynamoDB: read units per second one partition serves.
    pub partition_rcu: f64,
    /// DynamoDB: an on-demand table's default limits, for items spread
    /// over its partitions (partitions named `table#…`).
    pub table_wcu: f64,
    pub table_rcu: f64,
    /// SQS: messages received and not deleted, per standard queue.
    pub sqs_in_flight: usize,
    /// Lambda: concurrent executions of the account.
    pub lambda_concurrency: usize,
    /// Lambda: how fast an SQS event source adds concurrent batches, per
    /// minute, and the most it runs.
    pub sqs_scale_per_minute: usize,
    pub sqs_max_pollers: usize,
    /// The result queue's event source: the template's
    /// `ScalingConfig.MaximumConcurrency`.
    pub collector_concurrency: usize,
    /// The DynamoDB client's retry (`aws::dynamodb::metered_client`):
    /// attempts, and the backoff's base and cap.
    pub attempts: u32,
    pub backoff: Duration,
    pub max_backoff: Duration,
    /// nightshift's own retry of a conflicting transaction
    /// (`nightshift_core::retry`): attempts, base and cap.
    pub conflict_attempts: u32,
    pub conflict_backoff: Duration,
    pub max_conflict_backoff: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            dynamodb: Latency::ms(8, 60),
            sqs: Latency::ms(20, 200),
            ec2: Latency::ms(150, 1500),
            partition_wcu: 1000.0,
            partition_rcu: 3000.0,
            table_wcu: 40_000.0,
            table_rcu: 40_000.0,
            sqs_in_flight: 120_000,
            lambda_concurrency: 1000,
            sqs_scale_per_minute: 300,
            sqs_max_pollers: 1250,
            collector_concurrency: 2,
            attempts: nightshift_core::aws::dynamodb::DYNAMODB_ATTEMPTS,
            backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(5),
            conflict_attempts: nightshift_core::retry::ATTEMPTS,
            conflict_backoff: Duration::from_millis(25),
            max_conflict_backoff: Duration::from_secs(2),
        }
    }
}

/// Capacity one request takes from one partition.
#[derive(Debug, Clone, PartialEq)]
pub struct Units {
    pub partition: String,
    pub write: f64,
    pub read: f64,
}

impl Units {
    pub fn write(partition: impl Into<String>, units: f64) -> Self {
        Self {
            partition: partition.into(),
            write: units,
            read: 0.0,
        }
    }

    pub fn read(partition: impl Into<String>, units: f64) -> Self {
        Self {
            partition: partition.into(),
            write: 0.0,
            read: units,
        }
    }
}

/// Why a request came to nothing.
enum Refused {
    /// Another transaction held this item.
    Conflict(String),
    /// Throttled at every attempt.
    Failed(Error),
}

/// Why one attempt came to nothing.
enum Attempt {
    Conflict(String),
    Throttled(String),
}

/// What a partition took in the last second: no second may hold more
/// than its limit.
#[derive(Debug, Default)]
struct Window {
    taken: VecDeque<(Duration, f64, f64)>,
    write: f64,
    read: f64,
    peak_write: f64,
}

impl Window {
    fn forget_before(&mut self, since: Duration) {
        while let Some((at, write, read)) = self.taken.front().copied() {
            if at > since {
                break;
            }
            self.taken.pop_front();
            self.write -= write;
            self.read -= read;
        }
    }
}

/// What the night's requests came to.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    /// Requests by service and operation (each retry counts).
    pub calls: BTreeMap<(Service, &'static str), u64>,
    /// Throttled attempts, and requests that failed after every retry, by
    /// partition class (the partition's name up to its `#`).
    pub throttled: BTreeMap<String, u64>,
    pub failed: BTreeMap<String, u64>,
    /// Write units taken, by partition class.
    pub write_units: BTreeMap<String, f64>,
    /// The most write units one partition of each class took in a second.
    pub peak_wcu: BTreeMap<String, f64>,
    /// Transactions cancelled because another held one of their items, and
    /// those still conflicting after every retry, by item class.
    pub conflicts: BTreeMap<String, u64>,
    pub conflicts_failed: BTreeMap<String, u64>,
}

/// The model's AWS: latencies, capacities and the night's tally.
#[derive(Debug)]
pub struct Cloud {
    pub clock: Arc<Clock>,
    pub limits: Limits,
    rng: Mutex<fastrand::Rng>,
    windows: Mutex<HashMap<String, Window>>,
    /// Items a transaction in flight holds.
    held: Mutex<HashMap<String, usize>>,
    tally: Mutex<Tally>,
}

/// Items held by a transaction in flight, let go when it ends (or is
/// dropped with its caller).
struct Held<'a> {
    cloud: &'a Cloud,
    items: Vec<String>,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        let mut held = lock(&self.cloud.held);
        for item in &self.items {
            if let Some(n) = held.get_mut(item) {
                *n -= 1;
                if *n == 0 {
                    held.remove(item);
                }
            }
        }
    }
}

fn class(partition: &str) -> String {
    partition.split('#').next().unwrap_or(partition).to_owned()
}

impl Cloud {
    pub fn new(clock: Arc<Clock>, limits: Limits, seed: u64) -> Self {
        Self {
            clock,
            limits,
            rng: Mutex::new(fastrand::Rng::with_seed(seed)),
            windows: Mutex::default(),
            held: Mutex::default(),
            tally: Mutex::default(),
        }
    }

    pub fn tally(&self) -> Tally {
        let mut tally = lock(&self.tally).clone();
        for (partition, window) in lock(&self.windows).iter() {
            let entry = tally.peak_wcu.entry(class(partition)).or_default();
            *entry = entry.max(window.peak_write);
        }
        tally
    }

    /// A uniform draw in `0..1`, from the model's one seeded source.
    pub fn random(&self) -> f64 {
        lock(&self.rng).f64()
    }

    /// Waits out one request's latency.
    pub async fn latency(&self, service: Service, operation: &'static str) {
        let latency = match service {
            Service::DynamoDb => self.limits.dynamodb,
            Service::Sqs => self.limits.sqs,
            Service::Ec2 => self.limits.ec2,
        };
        let wait = latency.sample(&mut lock(&self.rng));
        *lock(&self.tally)
            .calls
            .entry((service, operation))
            .or_default() += 1;
        self.clock.sleep(wait).await;
    }

    /// A DynamoDB request that takes `units`: all of them or, if a
    /// partition has not the capacity, none (the request is throttled and
    /// the SDK retries it with backoff, then it fails as a transient error).
    pub async fn dynamodb(&self, operation: &'static str, units: &[Units]) -> Result<(), Error> {
        match self.request(operation, units, &[]).await {
            Ok(()) => Ok(()),
            Err(Refused::Failed(error)) => Err(error),
            // Only a transaction meets a conflict.
            Err(Refused::Conflict(item)) => Err(Error::transient(operation, item)),
        }
    }

    /// A `TransactWriteItems` on `items` (the contended ones: the run
    /// item). DynamoDB cancels a transaction that touches an item another
    /// one in flight holds (`TransactionConflict`); nightshift retries it
    /// with its own backoff, then returns a transient error.
    pub async fn transaction(&self, items: &[String], units: &[Units]) -> Result<(), Error> {
        let limits = &self.limits;
        for attempt in 0..limits.conflict_attempts {
            let item = match self.request("TransactWriteItems", units, items).await {
                Ok(()) => return Ok(()),
                Err(Refused::Failed(error)) => return Err(error),
                Err(Refused::Conflict(item)) => item,
            };
            *lock(&self.tally).conflicts.entry(class(&item)).or_default() += 1;
            if attempt + 1 == limits.conflict_attempts {
                *lock(&self.tally)
                    .conflicts_failed
                    .entry(class(&item))
                    .or_default() += 1;
                break;
            }
            let cap = limits
                .max_conflict_backoff
                .min(limits.conflict_backoff * 2_u32.pow(attempt.min(16)));
            self.clock.sleep(cap.mul_f64(self.random())).await;
        }
        Err(Error::transient(
            "TransactWriteItems",
            "TransactionConflict",
        ))
    }

    /// One request as the SDK sends it: attempts until one is neither
    /// throttled nor refused, backing off between them (holding nothing).
    async fn request(
        &self,
        operation: &'static str,
        units: &[Units],
        holds: &[String],
    ) -> Result<(), Refused> {
        for attempt in 0..self.limits.attempts {
            let partition = match self.attempt(operation, units, holds).await {
                Ok(()) => return Ok(()),
                Err(Attempt::Conflict(item)) => return Err(Refused::Conflict(item)),
                Err(Attempt::Throttled(partition)) => partition,
            };
            *lock(&self.tally)
                .throttled
                .entry(class(&partition))
                .or_default() += 1;
            if attempt + 1 == self.limits.attempts {
                *lock(&self.tally)
                    .failed
                    .entry(class(&partition))
                    .or_default() += 1;
                return Err(Refused::Failed(Error::transient(
                    operation,
                    format!("throttled on {partition}"),
                )));
            }
            let cap = self
                .limits
                .max_backoff
                .min(self.limits.backoff * 2_u32.pow(attempt.min(16)));
            self.clock.sleep(cap.mul_f64(self.random())).await;
        }
        Ok(())
    }

    /// One attempt: refused at once if an item it holds is held by a
    /// transaction in flight; else it holds them for its latency, then
    /// takes its capacity or is throttled.
    async fn attempt(
        &self,
        operation: &'static str,
        units: &[Units],
        holds: &[String],
    ) -> Result<(), Attempt> {
        let busy = {
            let mut held = lock(&self.held);
            let busy = holds.iter().find(|item| held.contains_key(*item)).cloned();
            if busy.is_none() {
                for item in holds {
                    *held.entry(item.clone()).or_default() += 1;
                }
            }
            busy
        };
        if let Some(item) = busy {
            self.latency(Service::DynamoDb, operation).await;
            return Err(Attempt::Conflict(item));
        }
        let _held = Held {
            cloud: self,
            items: holds.to_vec(),
        };
        self.latency(Service::DynamoDb, operation).await;
        self.take(units).map_err(Attempt::Throttled)
    }

    /// Takes the units from their partitions, or names the first
    /// partition that has not them left in the last second.
    fn take(&self, units: &[Units]) -> Result<(), String> {
        let now = self.clock.now();
        let since = now.saturating_sub(Duration::from_secs(1));
        let mut windows = lock(&self.windows);
        let mut wanted: BTreeMap<&str, (f64, f64)> = BTreeMap::new();
        for unit in units {
            let entry = wanted.entry(&unit.partition).or_default();
            entry.0 += unit.write;
            entry.1 += unit.read;
        }
        for (partition, (write, read)) in &wanted {
            let (wcu, rcu) = if class(partition) == "table" {
                (self.limits.table_wcu, self.limits.table_rcu)
            } else {
                (self.limits.partition_wcu, self.limits.partition_rcu)
            };
            let window = windows.entry((*partition).to_owned()).or_default();
            window.forget_before(since);
            if window.write + write > wcu || window.read + read > rcu {
                return Err((*partition).to_owned());
            }
        }
        let mut tally = lock(&self.tally);
        for (partition, (write, read)) in wanted {
            if let Some(window) = windows.get_mut(partition) {
                window.taken.push_back((now, write, read));
                window.write += write;
                window.read += read;
                window.peak_write = window.peak_write.max(window.write);
            }
            *tally.write_units.entry(class(partition)).or_default() += write;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latencies_have_the_median_and_tail_they_were_given() {
        let mut rng = fastrand::Rng::with_seed(7);
        let latency = Latency::ms(20, 200);
        let mut draws: Vec<Duration> = (0..20_000).map(|_| latency.sample(&mut rng)).collect();
        draws.sort();
        let p50 = draws[10_000].as_secs_f64() * 1000.0;
        let p99 = draws[19_800].as_secs_f64() * 1000.0;
        assert!((18.0..22.0).contains(&p50), "p50 {p50} ms");
        assert!((170.0..235.0).contains(&p99), "p99 {p99} ms");
    }

    #[test]
    fn a_partition_past_its_write_units_throttles_and_then_fails() {
        let clock = Arc::new(Clock::default());
        let cloud = Arc::new(Cloud::new(Arc::clone(&clock), Limits::default(), 1));
        let inner = Arc::clone(&cloud);
        let results = crate::clock::run(&clock, move |_| {
            Box::pin(async move {
                let hot = [Units::write("run#r1", 400.0)];
                let mut results = Vec::new();
                // 1,000 units a second: the third request in a row finds
                // the bucket short and is retried after a backoff.
                for _ in 0..12 {
                    results.push(inner.dynamodb("UpdateItem", &hot).await.is_ok());
                }
                results
            })
        })
        .unwrap_or_default();
        let tally = cloud.tally();
        assert!(results.iter().filter(|ok| **ok).count() >= 2);
        assert!(tally.throttled["run"] > 0, "{tally:?}");
        assert!(tally.peak_wcu["run"] <= 1000.0, "{tally:?}");
    }
}

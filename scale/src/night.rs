//! One night of the model: its parameters, the world it runs in, the
//! dispatcher's schedule, and what it came to.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashSet};
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::executor::LocalSpawner;
use futures::future::{Either, select};
use futures::task::LocalSpawnExt;
use nightshift_core::fakes::{FakeFleet, MemoryBlobs, MemoryStore};
use nightshift_core::night::NightWindow;
use nightshift_core::plan::Policy;
use nightshift_core::ports::{RunReader, TaskWriter};
use nightshift_core::{Blob, NewTask, Run};
use nightshift_dispatcher::{Dispatcher, Settings};

use crate::clock::{self, Clock};
use crate::cloud::{Cloud, Limits, Tally};
use crate::services::{Ec2, SqsQueue, Store};
use crate::{event_source, worker};

/// What the night is made of.
#[derive(Debug, Clone)]
pub struct Night {
    pub tasks: usize,
    pub instances: u32,
    pub slots_per_instance: u32,
    pub task_time: Duration,
    pub payload_bytes: usize,
    /// The dispatcher's schedule and its function's timeout.
    pub tick: Duration,
    pub pass_timeout: Duration,
    /// How long a pass may queue (`NIGHTSHIFT_PASS_BUDGET_SECONDS`).
    pub pass_budget: Duration,
    /// Launch to the worker's first poll.
    pub boot: Duration,
    pub worker_idle: Duration,
    /// The dispatcher's cap on a run's queued tasks.
    pub max_queued: u64,
    pub limits: Limits,
    pub seed: u64,
}

impl Night {
    /// The night the issue asks about: 100,000 tasks of 10 s on 200
    /// two-slot instances, with the template's defaults.
    pub fn full() -> Self {
        Self {
            tasks: 100_000,
            instances: 200,
            slots_per_instance: 2,
            task_time: Duration::from_secs(10),
            payload_bytes: 1024,
            tick: Duration::from_secs(300),
            pass_timeout: Duration::from_secs(120),
            pass_budget: Duration::from_secs(90),
            boot: Duration::from_secs(90),
            worker_idle: Duration::from_secs(120),
            max_queued: 20_000,
            limits: Limits::default(),
            seed: 1,
        }
    }

    /// The least work done by the slots: Σ task time ÷ slots.
    pub fn ideal(&self) -> Duration {
        let slots = f64::from(self.instances * self.slots_per_instance);
        self.task_time.mul_f64(self.tasks as f64 / slots)
    }

    /// The night's end: one that every slot is needed for (the work on
    /// every slot, then the plan's margin and launch lead, to the minute
    /// below), so that the plan launches the whole fleet.
    fn end(&self, start: DateTime<Utc>) -> String {
        let needed = self.ideal() + MARGIN + LEAD;
        let end = start + chrono::Duration::minutes((needed.as_secs() / 60) as i64);
        end.format("%H:%M").to_string()
    }
}

/// The model's time as the dispatcher reads it.
struct NightClock {
    clock: Arc<Clock>,
    start: DateTime<Utc>,
}

impl nightshift_core::ports::Clock for NightClock {
    fn now(&self) -> DateTime<Utc> {
        self.start + chrono::Duration::from_std(self.clock.now()).unwrap_or_default()
    }
}

/// A pass of the dispatcher as the schedule ran it.
#[derive(Debug, Clone)]
pub struct PassRun {
    pub at: Duration,
    pub took: Duration,
    pub queued: usize,
    /// The function's timeout ended it.
    pub timed_out: bool,
}

/// The collector's invocations.
#[derive(Debug, Default, Clone)]
pub struct CollectorRuns {
    pub pollers: usize,
    pub peak_pollers: usize,
    pub running: usize,
    pub peak_running: usize,
    pub invocations: u64,
    pub messages: u64,
    pub retried: u64,
}

impl CollectorRuns {
    pub fn add_poller(&mut self) {
        self.pollers += 1;
        self.peak_pollers = self.peak_pollers.max(self.pollers);
    }

    pub fn begin(&mut self, messages: usize) {
        self.running += 1;
        self.peak_running = self.peak_running.max(self.running);
        self.invocations += 1;
        self.messages += messages as u64;
    }

    pub fn end(&mut self, retried: usize) {
        self.running -= 1;
        self.retried += retried as u64;
    }
}

/// The first kernel's start and the last one's end.
type KernelSpan = (Option<DateTime<Utc>>, Option<DateTime<Utc>>);

/// Everything the night's tasks share.
pub struct World {
    pub cloud: Arc<Cloud>,
    pub store: Arc<Store>,
    pub tasks: Arc<SqsQueue>,
    pub results: Arc<SqsQueue>,
    pub fleet: Arc<FakeFleet>,
    pub spawner: LocalSpawner,
    pub settings: Night,
    start: DateTime<Utc>,
    run_id: RefCell<String>,
    over: Cell<bool>,
    kernels: Cell<KernelSpan>,
    kernel_runs: Cell<u64>,
    pub collector: RefCell<CollectorRuns>,
}

impl World {
    pub fn now(&self) -> DateTime<Utc> {
        self.start + chrono::Duration::from_std(self.cloud.clock.now()).unwrap_or_default()
    }

    pub fn run_id(&self) -> String {
        self.run_id.borrow().clone()
    }

    pub fn is_over(&self) -> bool {
        self.over.get()
    }

    pub fn note_kernel(&self, started: DateTime<Utc>, ended: DateTime<Utc>) {
        self.kernel_runs.set(self.kernel_runs.get() + 1);
        let (first, last) = self.kernels.get();
        self.kernels.set((
            Some(first.map_or(started, |f| f.min(started))),
            Some(last.map_or(ended, |l| l.max(ended))),
        ));
    }
}

/// What a night came to.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub night: Night,
    pub run: Run,
    pub passes: Vec<PassRun>,
    /// When every task had been queued.
    pub all_queued: Option<Duration>,
    pub closed: Option<Duration>,
    pub makespan: Duration,
    pub collector: CollectorRuns,
    /// Result lag (kernel end to recorded), sorted.
    pub lags: Vec<Duration>,
    pub largest_run_item: usize,
    pub peak_task_in_flight: usize,
    /// Kernels run: more than the tasks when a message was sent again.
    pub kernel_runs: u64,
    pub tally: Tally,
}

impl Outcome {
    pub fn efficiency(&self) -> f64 {
        self.night.ideal().as_secs_f64() / self.makespan.as_secs_f64().max(f64::MIN_POSITIVE)
    }

    pub fn lag(&self, quantile: f64) -> Duration {
        let index = ((self.lags.len() as f64 - 1.0) * quantile).round() as usize;
        self.lags.get(index).copied().unwrap_or_default()
    }
}

/// Runs the night to its close; `None` if the model stalls or no run
/// opened (a night of no task).
pub fn simulate(night: Night) -> Option<Outcome> {
    let clock = Arc::new(Clock::default());
    let cloud = Arc::new(Cloud::new(
        Arc::clone(&clock),
        night.limits.clone(),
        night.seed,
    ));
    clock::run(&clock, move |spawner| {
        Box::pin(the_night(night, cloud, spawner))
    })
    .flatten()
}

const START: &str = "2026-01-09T22:00:00Z";
/// The plan's margin before the deadline and its launch lead.
const MARGIN: Duration = Duration::from_secs(30 * 60);
const LEAD: Duration = Duration::from_secs(4 * 60);

async fn the_night(night: Night, cloud: Arc<Cloud>, spawner: LocalSpawner) -> Option<Outcome> {
    let start: DateTime<Utc> = START.parse().unwrap_or_default();
    let shards = 8;
    let memory = Arc::new(MemoryStore::new(shards));
    seed_tasks(&memory, &night, start).await;
    let store = Arc::new(Store {
        inner: Arc::clone(&memory),
        cloud: Arc::clone(&cloud),
        // The payload, and the task's own attributes.
        task_bytes: night.payload_bytes + 600,
        lags: Mutex::default(),
        largest_run: Mutex::default(),
        run_size: Mutex::default(),
        start,
    });
    let fleet = Arc::new(FakeFleet::with_types(&[(
        "c7g.large",
        night.slots_per_instance,
    )]));
    let visibility = Duration::from_secs(120);
    let world = Rc::new(World {
        tasks: Arc::new(SqsQueue::new(Arc::clone(&cloud), visibility)),
        results: Arc::new(SqsQueue::new(Arc::clone(&cloud), Duration::from_secs(60))),
        cloud: Arc::clone(&cloud),
        store,
        fleet,
        spawner,
        settings: night.clone(),
        start,
        run_id: RefCell::default(),
        over: Cell::new(false),
        kernels: Cell::new((None, None)),
        kernel_runs: Cell::new(0),
        collector: RefCell::default(),
    });
    let _ = world
        .spawner
        .spawn_local(event_source::run(Rc::clone(&world)));
    let (passes, all_queued, closed) = dispatch(&world).await;
    world.over.set(true);
    let run = memory.run(&world.run_id()).await.ok().flatten()?;
    let (first, last) = world.kernels.get();
    let mut lags: Vec<Duration> = world
        .store
        .lags
        .lock()
        .map(|lags| lags.clone())
        .unwrap_or_default();
    lags.sort();
    Some(Outcome {
        makespan: match (first, last) {
            (Some(first), Some(last)) => (last - first).to_std().unwrap_or_default(),
            _ => Duration::ZERO,
        },
        largest_run_item: world.store.largest_run.lock().map(|l| *l).unwrap_or(0),
        peak_task_in_flight: world.tasks.peak_in_flight(),
        kernel_runs: world.kernel_runs.get(),
        collector: world.collector.borrow().clone(),
        tally: cloud.tally(),
        night,
        run,
        passes,
        all_queued,
        closed,
        lags,
    })
}

/// The tasks the day brought, pending at the night's start.
async fn seed_tasks(memory: &MemoryStore, night: &Night, start: DateTime<Utc>) {
    let payload = serde_json::json!({ "pad": "x".repeat(night.payload_bytes.saturating_sub(12)) });
    let tasks: Vec<NewTask> = (0..night.tasks)
        .map(|i| NewTask {
            id: format!("task-{i:06}"),
            account: format!("acct-{:03}", i % 500),
            kernel: "portfolio-risk".into(),
            payload: Blob::json(&payload),
            created_at: start - chrono::Duration::hours(8)
                + chrono::Duration::milliseconds(i as i64),
            idempotency: None,
        })
        .collect();
    for chunk in tasks.chunks(1000) {
        let _ = memory.stage("day", chunk).await;
        let _ = memory.commit("day", chunk).await;
    }
}

/// The dispatcher's schedule: the night's start, then a pass every tick,
/// each cut at the function's timeout, until a pass closes the run. Each
/// instance a pass launched boots and runs a worker.
async fn dispatch(world: &Rc<World>) -> (Vec<PassRun>, Option<Duration>, Option<Duration>) {
    let night = &world.settings;
    let settings = Settings {
        max_instances: night.instances,
        slots_per_instance: night.slots_per_instance,
        max_queued: night.max_queued,
        pending_shards: world.store.inner.shards(),
        lease_ttl: Duration::from_secs(180),
        max_lifetime: Duration::from_secs(12 * 3600),
        stray_grace: Duration::from_secs(900),
        night: NightWindow::parse(&night.end(world.start), "UTC")
            .unwrap_or_else(|_| unreachable!("an HH:MM end")),
        plan: Policy {
            prior_ms: 3_600_000,
            lead: chrono::Duration::from_std(LEAD).unwrap_or_default(),
            margin: chrono::Duration::from_std(MARGIN).unwrap_or_default(),
            on_demand_within: chrono::Duration::minutes(60),
        },
        pass_interval: night.tick,
        pass_budget: night.pass_budget,
    };
    let blobs = MemoryBlobs::default();
    let ec2 = Ec2 {
        inner: Arc::clone(&world.fleet),
        cloud: Arc::clone(&world.cloud),
        start: world.start,
    };
    let dispatcher = Dispatcher {
        runs: &*world.store,
        pending: &*world.store,
        tasks: &*world.store,
        queue: &*world.tasks,
        fleet: &ec2,
        blobs: &blobs,
        clock: &NightClock {
            clock: Arc::clone(&world.cloud.clock),
            start: world.start,
        },
        settings: &settings,
    };
    let mut passes = Vec::new();
    let mut booted: HashSet<String> = HashSet::new();
    let (mut all_queued, mut closed) = (None, None);
    let mut tick = 0_u32;
    while closed.is_none() && tick < 1000 {
        world.cloud.clock.sleep_until(night.tick * tick).await;
        let now = world.now();
        let owner = format!("pass-{tick}");
        let pass = if tick == 0 {
            Box::pin(dispatcher.open_night(now, &owner))
                as std::pin::Pin<Box<dyn std::future::Future<Output = _>>>
        } else {
            Box::pin(dispatcher.pass(now, &owner))
        };
        tick += 1;
        let timeout = world.cloud.clock.sleep(night.pass_timeout);
        let (queued, timed_out) = match select(pass, timeout).await {
            Either::Left((Ok(pass), _)) => {
                if let Some(run_id) = &pass.run_id {
                    *world.run_id.borrow_mut() = run_id.clone();
                }
                if pass.closed {
                    closed = Some(world.cloud.clock.now());
                }
                (pass.queued, false)
            }
            Either::Left((Err(_), _)) => (0, false),
            Either::Right(_) => (0, true),
        };
        passes.push(PassRun {
            at: night.tick * (tick - 1),
            took: world.cloud.clock.now() - night.tick * (tick - 1),
            queued,
            timed_out,
        });
        if let Ok(Some(run)) = world.store.inner.run(&world.run_id()).await
            && all_queued.is_none()
            && run.queued >= night.tasks as u64
        {
            all_queued = Some(world.cloud.clock.now());
        }
        boot_new_workers(world, &mut booted).await;
    }
    (passes, all_queued, closed)
}

/// Starts a worker on every instance launched since the last look, once
/// it has booted.
async fn boot_new_workers(world: &Rc<World>, booted: &mut HashSet<String>) {
    let Ok(Some(run)) = world.store.inner.run(&world.run_id()).await else {
        return;
    };
    let slots: BTreeMap<String, u32> = run
        .instances
        .iter()
        .map(|launched| (launched.id.clone(), launched.slots))
        .collect();
    for id in world.fleet.active() {
        if !booted.insert(id.clone()) {
            continue;
        }
        let slots = slots.get(&id).copied().unwrap_or(1) as usize;
        let world = Rc::clone(world);
        let boot = world.settings.boot;
        let _ = world.spawner.clone().spawn_local(async move {
            world.cloud.clock.sleep(boot).await;
            worker::work(world, id, slots).await;
        });
    }
}

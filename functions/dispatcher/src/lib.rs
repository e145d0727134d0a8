//! The dispatcher: a reconciler, safe to run at any time and any number of
//! times at once. Each pass:
//!
//! 1. terminates this stack's workers that no open run claims any more, or
//!    that outlived their lifetime (workers stop themselves; this is the
//!    backstop for those that could not);
//! 2. finds the open run, or opens one when tasks are pending;
//! 3. takes the run's dispatch lease (a conditional write with an expiry), so
//!    two passes at once never queue the same task or launch two fleets;
//! 4. moves pending tasks to the task queue, page after page of the index
//!    (by cursor, never by a page's length), in SQS batches bounded by count
//!    and bytes, each batch then marked QUEUED with the run's counter,
//!    keeping at most `max_queued` tasks of the run in flight;
//! 5. plans the fleet against the run's deadline (see `plan`) and launches
//!    what is missing, spot first, on-demand when spot falls short in time;
//! 6. closes the run when nothing is pending and every queued task ended,
//!    and removes the run's objects that no task holds.
//!
//! A message is sent before its task is marked, so a pass that dies between
//! the two leaves the task PENDING and a later pass sends it again: a task is
//! queued at least once, and its result is still recorded once. Within one
//! pass a task is never sent twice.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use nightshift_core::config;
use nightshift_core::limits::ClaimCheck;
use nightshift_core::limits::sqs_batches;
use nightshift_core::metrics::Emf;
use nightshift_core::plan::{self, FleetPlan, Lifecycle, Policy, Workload};
use nightshift_core::ports::{
    BlobStore, Clock, Fleet, Outgoing, PendingTasks, Queue, RunStore, Sent, TaskReader,
    WorkerInstance,
};
use nightshift_core::{
    Blob, Envelope, InstanceSeen, Launched, PendingTask, Run, RunState, SpotPrice, TaskMessage,
    TaskStatus,
};
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
    /// The tasks of a run kept queued (and not yet ended) while none has
    /// ended; once the pace is measured, more if the fleet needs more (see
    /// `Dispatcher::backlog`).
    pub max_queued: u64,
    pub pending_shards: u32,
    /// Longer than one pass can take (the function's timeout).
    pub lease_ttl: Duration,
    /// A worker's longest life; one older than this and `stray_grace` is
    /// terminated.
    pub max_lifetime: Duration,
    /// How long a worker whose run is no longer open may live on (to drain
    /// what it holds) before it is terminated.
    pub stray_grace: Duration,
    /// The deadline of the runs the night's start opens.
    pub night: nightshift_core::night::NightWindow,
    /// How the fleet is planned against the deadline.
    pub plan: Policy,
    /// How far apart the schedule's passes are.
    pub pass_interval: Duration,
    /// How long a pass may go on queuing before it leaves the rest to the
    /// next (well under the function's timeout).
    pub pass_budget: Duration,
}

/// The event the night's schedule sends (`{"action": "open-night"}`):
/// the one event that opens a run.
pub fn opens_the_night(event: &serde_json::Value) -> bool {
    event["action"] == "open-night"
}

/// The dispatcher's configuration: its settings and what it reaches.
#[derive(Debug, Clone)]
pub struct Config {
    pub table: String,
    pub bucket: String,
    pub task_queue_url: String,
    pub launch_template_id: String,
    pub instance_types: Vec<String>,
    /// Subnets the fleet may launch in (none: the default VPC's).
    pub subnet_ids: Vec<String>,
    pub settings: Settings,
    /// The function's memory, as Lambda gives it (0: not on Lambda).
    pub memory_mb: u32,
}

impl Config {
    pub fn from_env(env: &dyn config::Env) -> Result<Self, config::ConfigError> {
        let seconds =
            |name, default| config::parsed_or(env, name, default).map(Duration::from_secs);
        let span = |name, default| seconds(name, default).map(span_of);
        let max_instances = config::parsed_or(env, "NIGHTSHIFT_MAX_INSTANCES", 20)?;
        let slots_per_instance = config::parsed_or(env, "NIGHTSHIFT_SLOTS_PER_INSTANCE", 2)?;
        Ok(Self {
            table: config::required(env, "NIGHTSHIFT_TABLE")?,
            bucket: config::required(env, "NIGHTSHIFT_BUCKET")?,
            task_queue_url: config::required(env, "NIGHTSHIFT_TASK_QUEUE_URL")?,
            launch_template_id: config::required(env, "NIGHTSHIFT_LAUNCH_TEMPLATE_ID")?,
            instance_types: config::required_list(env, "NIGHTSHIFT_INSTANCE_TYPES")?,
            subnet_ids: config::list(env, "NIGHTSHIFT_SUBNET_IDS"),
            memory_mb: config::parsed_or(env, "AWS_LAMBDA_FUNCTION_MEMORY_SIZE", 0)?,
            settings: Settings {
                max_instances,
                slots_per_instance,
                max_queued: config::parsed_or(env, "NIGHTSHIFT_MAX_QUEUED", 20_000)?,
                pending_shards: config::parsed_or(env, "NIGHTSHIFT_PENDING_SHARDS", 8)?,
                lease_ttl: seconds("NIGHTSHIFT_LEASE_SECONDS", 180)?,
                max_lifetime: seconds("NIGHTSHIFT_MAX_LIFETIME_SECONDS", 43_200)?,
                stray_grace: seconds("NIGHTSHIFT_STRAY_GRACE_SECONDS", 900)?,
                night: config::night_window(env)?,
                plan: Policy {
                    prior_ms: config::parsed_or(env, "NIGHTSHIFT_PRIOR_TASK_SECONDS", 3600_u64)?
                        .saturating_mul(1000),
                    lead: span("NIGHTSHIFT_LAUNCH_LEAD_SECONDS", 240)?,
                    margin: span("NIGHTSHIFT_DEADLINE_MARGIN_SECONDS", 1800)?,
                    on_demand_within: span("NIGHTSHIFT_ON_DEMAND_WITHIN_SECONDS", 3600)?,
                },
                pass_interval: pass_interval(env)?,
                pass_budget: seconds("NIGHTSHIFT_PASS_BUDGET_SECONDS", 90)?,
            },
        })
    }
}

/// The interval of the dispatcher's schedule (`NIGHTSHIFT_DISPATCH_SCHEDULE`,
/// five minutes unless set). A `cron(...)` schedule counts as an hour: its
/// ticks may be far apart, and a longer interval only queues more.
fn pass_interval(env: &dyn config::Env) -> Result<Duration, config::ConfigError> {
    let schedule = config::optional(env, "NIGHTSHIFT_DISPATCH_SCHEDULE");
    if schedule.trim().is_empty() {
        return Ok(Duration::from_secs(300));
    }
    if schedule.trim_start().starts_with("cron(") {
        return Ok(Duration::from_secs(3600));
    }
    config::rate_interval(&schedule).ok_or(config::ConfigError::Invalid {
        name: "NIGHTSHIFT_DISPATCH_SCHEDULE",
        value: schedule,
    })
}

fn span_of(duration: Duration) -> chrono::Duration {
    chrono::Duration::from_std(duration).unwrap_or(chrono::Duration::MAX)
}

/// The ports a pass uses.
pub struct Dispatcher<'a> {
    pub runs: &'a dyn RunStore,
    pub pending: &'a dyn PendingTasks,
    /// The run's tasks, to tell which of its objects a task still holds.
    pub tasks: &'a dyn TaskReader,
    pub queue: &'a dyn Queue,
    pub fleet: &'a dyn Fleet,
    pub blobs: &'a dyn BlobStore,
    /// What a pass checks its budget against.
    pub clock: &'a dyn Clock,
    pub settings: &'a Settings,
}

/// What one pass did, returned by the function and logged.
#[derive(Debug, Default, Clone, PartialEq, Serialize)]
pub struct Pass {
    pub run_id: Option<String>,
    /// Why the pass did nothing, when it did nothing.
    pub skipped: Option<&'static str>,
    pub queued: usize,
    pub launched: usize,
    pub terminated: usize,
    /// Pending tasks were left for the next pass: the run had no more room.
    pub waiting: bool,
    /// The run is still open after its deadline.
    pub past_deadline: bool,
    pub closed: bool,
    /// Objects of the closed run that no task holds, removed.
    pub swept: usize,
    /// The fleet the run needs, as this pass planned it.
    pub plan: Option<FleetPlan>,
    /// Tasks a cancelled run's wind-down ended CANCELLED.
    pub cancelled: usize,
}

/// Index entries read per query.
const PAGE: usize = 100;
/// SQS batches a pass has in flight at once.
const SENDS_AT_ONCE: usize = 10;
/// How long a launched instance may be missing from `DescribeInstances`
/// (which is eventually consistent) and still count as running.
const LAUNCH_VISIBILITY: Duration = Duration::from_secs(300);

impl Dispatcher<'_> {
    /// The reconciling pass of every tick: works for the open run, if one
    /// is; never opens one (work that arrives by day waits for the night).
    pub async fn pass(&self, now: DateTime<Utc>, owner: &str) -> Result<Pass, DispatchError> {
        self.pass_opening(now, owner, false).await
    }

    /// The night's start: opens a run if work is pending (with the night's
    /// deadline), then works for it as a pass does. Idempotent: a second
    /// delivery finds the run open.
    pub async fn open_night(&self, now: DateTime<Utc>, owner: &str) -> Result<Pass, DispatchError> {
        self.pass_opening(now, owner, true).await
    }

    async fn pass_opening(
        &self,
        now: DateTime<Utc>,
        owner: &str,
        may_open: bool,
    ) -> Result<Pass, DispatchError> {
        let current = self.runs.current_run().await?;
        let instances = self.fleet.instances().await?;
        let terminated = self
            .terminate_strays(current.as_ref(), &instances, now)
            .await?;
        // The cost of a run rests on these records; a failure here is
        // made good by a later pass.
        if let Err(error) = self
            .record_sightings(current.as_ref(), &instances, now)
            .await
        {
            tracing::warn!(error = %error.chain(), "could not record what EC2 shows of the instances");
        }
        let run = match current {
            Some(run) if run.state == RunState::Cancelled => {
                let mut pass = Pass {
                    run_id: Some(run.id.clone()),
                    terminated,
                    ..Pass::default()
                };
                self.wind_down(&run, &instances, now, &mut pass).await?;
                return Ok(pass);
            }
            Some(run) => run,
            None if may_open && self.any_pending().await? => {
                let new_id = uuid::Uuid::new_v4().to_string();
                let deadline = self.settings.night.deadline(now);
                self.runs.open_run(&new_id, now, deadline).await?.0
            }
            None => {
                return Ok(Pass {
                    skipped: Some("no open run"),
                    terminated,
                    ..Pass::default()
                });
            }
        };
        let mut pass = Pass {
            run_id: Some(run.id.clone()),
            terminated,
            past_deadline: now > run.deadline,
            ..Pass::default()
        };
        if pass.past_deadline {
            // The phrase the template's metric filter counts (RunPastDeadlineAlarm).
            tracing::warn!(run_id = %run.id, deadline = %run.deadline, "run open past its deadline");
        }
        if !self
            .runs
            .acquire_lease(&run.id, owner, now, self.settings.lease_ttl)
            .await?
        {
            pass.skipped = Some("another dispatcher holds the run's lease");
            return Ok(pass);
        }
        let worked = self.work(&run, &instances, now, &mut pass).await;
        // A pass that failed may have left work behind: workers wait for
        // the next one rather than stop.
        let waiting = pass.waiting || worked.is_err();
        if let Err(error) = self
            .runs
            .release_lease(&run.id, owner, waiting, pass.plan.as_ref())
            .await
        {
            tracing::warn!(run_id = %run.id, error = %error, "could not release the lease; it expires");
        }
        worked.map(|()| pass)
    }

    async fn work(
        &self,
        run: &Run,
        instances: &[WorkerInstance],
        now: DateTime<Utc>,
        pass: &mut Pass,
    ) -> Result<(), DispatchError> {
        let room = self.backlog(run).saturating_sub(run.in_flight());
        let room = usize::try_from(room).unwrap_or(usize::MAX);
        // By the clock, not by `now`: a pass may be told another time than
        // the one it runs in.
        let stop_at = self
            .clock
            .now()
            .checked_add_signed(span_of(self.settings.pass_budget))
            .unwrap_or(DateTime::<Utc>::MAX_UTC);
        // A failure to queue still lets the fleet be sized (pending work
        // is then assumed): the pass fails after that.
        let queuing = self.queue_pending(&run.id, room, stop_at).await;
        let seen;
        (pass.queued, pass.waiting, seen) = match &queuing {
            Ok(outcome) => *outcome,
            Err(_) => (0, true, 0),
        };
        let run = self.runs.run(&run.id).await?.unwrap_or_else(|| run.clone());
        let (launched, plan) = self.size_fleet(&run, instances, now, pass.waiting).await?;
        pass.launched = launched;
        pass.plan = Some(plan);
        let running = instances
            .iter()
            .filter(|i| i.alive && i.run_id.as_deref() == Some(run.id.as_str()))
            .count();
        Emf::of("dispatcher", &run.id)
            .count("TasksQueued", pass.queued as u64)
            .count("Backlog", run.in_flight())
            .count("InstancesRunning", running as u64)
            .count("InstancesLaunched", pass.launched as u64)
            .emit();
        // The scan that queued found nothing pending: none is (one that
        // comes now is the next night's).
        if !pass.waiting
            && nightshift_core::rules::run_may_close(run.queued, run.done + run.failed, seen > 0)
        {
            pass.closed = self.runs.close_run(&run.id, now).await?;
            if pass.closed {
                tracing::info!(run_id = %run.id, done = run.done, failed = run.failed, "run finished");
                match self.sweep(&run.id).await {
                    Ok(removed) => pass.swept = removed,
                    // The bucket's lifecycle rule removes what this misses.
                    Err(error) => {
                        tracing::warn!(run_id = %run.id, error = %error.chain(), "could not sweep the run's objects")
                    }
                }
            }
        }
        queuing.map(|_| ())
    }

    /// Winds a cancelled run down: terminates its instances (a worker
    /// stops its kernels at a safe point on the shutdown), cancels its
    /// queued tasks and the tasks pending since before the cancel; a pass
    /// that finds none left releases the run, so that a next night may
    /// open. Safe to repeat: every change is conditional.
    async fn wind_down(
        &self,
        run: &Run,
        instances: &[WorkerInstance],
        now: DateTime<Utc>,
        pass: &mut Pass,
    ) -> Result<(), DispatchError> {
        let alive: Vec<String> = instances
            .iter()
            .filter(|i| i.alive && i.run_id.as_deref() == Some(run.id.as_str()))
            .map(|i| i.id.clone())
            .collect();
        if !alive.is_empty() {
            self.fleet.terminate(&alive).await?;
            pass.terminated += alive.len();
        }
        let mut after = None;
        loop {
            let page = self
                .tasks
                .run_tasks_page(&run.id, 1000, after.as_ref())
                .await?;
            let queued: Vec<String> = page
                .items
                .into_iter()
                .filter(|task| task.status == TaskStatus::Queued)
                .map(|task| task.id)
                .collect();
            if !queued.is_empty() {
                pass.cancelled += self
                    .pending
                    .cancel_tasks(&run.id, &queued, now)
                    .await?
                    .len();
            }
            match page.next {
                Some(next) => after = Some(next),
                None => break,
            }
        }
        // Work that arrives after the cancel waits for the next night.
        let cancelled_at = run.finished_at.unwrap_or(now);
        for shard in 0..self.settings.pending_shards {
            let mut after = None;
            loop {
                let page = self.pending.pending(shard, PAGE, after.as_ref()).await?;
                let before: Vec<String> = page
                    .items
                    .into_iter()
                    .filter(|task| task.created_at <= cancelled_at)
                    .map(|task| task.id)
                    .collect();
                if !before.is_empty() {
                    pass.cancelled += self
                        .pending
                        .cancel_tasks(&run.id, &before, now)
                        .await?
                        .len();
                }
                match page.next {
                    Some(next) => after = Some(next),
                    None => break,
                }
            }
        }
        if pass.cancelled > 0 {
            // Released by a later pass that finds nothing left: the index
            // may not show yet a task queued as the cancel came.
            tracing::info!(run_id = %run.id, cancelled = pass.cancelled, terminated = pass.terminated, "cancelling the run's work");
            return Ok(());
        }
        self.runs.release_run(&run.id).await?;
        tracing::info!(run_id = %run.id, terminated = pass.terminated, "cancelled run wound down");
        match self.sweep(&run.id).await {
            Ok(removed) => pass.swept = removed,
            Err(error) => {
                tracing::warn!(run_id = %run.id, error = %error.chain(), "could not sweep the run's objects")
            }
        }
        Ok(())
    }

    /// Whether any shard lists a task still PENDING, reading past index
    /// entries that are stale.
    async fn any_pending(&self) -> Result<bool, DispatchError> {
        for shard in 0..self.settings.pending_shards {
            let mut after = None;
            loop {
                let page = self.pending.pending(shard, PAGE, after.as_ref()).await?;
                if !page.items.is_empty() {
                    return Ok(true);
                }
                match page.next {
                    Some(next) => after = Some(next),
                    None => break,
                }
            }
        }
        Ok(false)
    }

    /// The most slots a run may have: every instance allowed, of the
    /// preferred type.
    fn max_slots(&self) -> u64 {
        u64::from(self.settings.max_instances) * u64::from(self.settings.slots_per_instance.max(1))
    }

    /// How many of the run's tasks to keep queued: what every slot the run
    /// may have takes, at its fastest kernel's measured pace, until the
    /// pass after next (one may be skipped), so that no slot waits for a
    /// pass; `max_queued` while no task has ended, and never less.
    fn backlog(&self, run: &Run) -> u64 {
        let fastest = run.kernels.iter().filter_map(|k| k.mean_ms()).min();
        let Some(mean_ms) = fastest else {
            return self.settings.max_queued;
        };
        let slots = self.max_slots();
        let horizon_ms =
            u64::try_from(2 * self.settings.pass_interval.as_millis()).unwrap_or(u64::MAX);
        let per_slot = horizon_ms.div_ceil(mean_ms.max(1)).saturating_add(1);
        self.settings.max_queued.max(slots.saturating_mul(per_slot))
    }

    /// Sends up to `room` pending tasks, shard by shard, page by page,
    /// until `stop_at` (the pass's budget); returns how many were queued,
    /// whether pending tasks were left behind (for lack of room or of
    /// time), and how many pending tasks it found.
    async fn queue_pending(
        &self,
        run_id: &str,
        room: usize,
        stop_at: DateTime<Utc>,
    ) -> Result<(usize, bool, usize), DispatchError> {
        let mut sent: HashSet<String> = HashSet::new();
        let mut queued = 0;
        for shard in 0..self.settings.pending_shards {
            let mut after = None;
            loop {
                if self.clock.now() >= stop_at {
                    tracing::info!(
                        run_id,
                        queued,
                        "the pass's budget is spent; the next pass goes on"
                    );
                    return Ok((queued, true, sent.len()));
                }
                let page = self.pending.pending(shard, PAGE, after.as_ref()).await?;
                let fresh: Vec<PendingTask> = page
                    .items
                    .into_iter()
                    .filter(|task| !sent.contains(&task.id))
                    .collect();
                let left = room.saturating_sub(sent.len());
                if fresh.len() > left {
                    let take: Vec<PendingTask> = fresh.into_iter().take(left).collect();
                    queued += self.queue_tasks(run_id, take, &mut sent).await?;
                    return Ok((queued, true, sent.len()));
                }
                queued += self.queue_tasks(run_id, fresh, &mut sent).await?;
                match page.next {
                    Some(next) => after = Some(next),
                    None => break,
                }
            }
        }
        Ok((queued, false, sent.len()))
    }

    /// Sends tasks in SQS batches, several at once, then marks the ones
    /// sent, all at once (transactions of up to 99 tasks, not one per
    /// batch); every task sent joins `sent`, whatever its marking did, so
    /// it is not sent again.
    async fn queue_tasks(
        &self,
        run_id: &str,
        tasks: Vec<PendingTask>,
        sent: &mut HashSet<String>,
    ) -> Result<usize, DispatchError> {
        let messages: Vec<(Sent, String)> = tasks
            .into_iter()
            .map(|task| {
                let sent = Sent {
                    task_id: task.id.clone(),
                    kernel: task.kernel.clone(),
                };
                let body = Envelope::Task(TaskMessage {
                    task_id: task.id.clone(),
                    run_id: run_id.to_owned(),
                    account: task.account,
                    kernel: task.kernel,
                    payload: task.payload,
                    checkpoint_key: None,
                    prior_attempts: 0,
                })
                .to_json();
                (sent, body)
            })
            .collect();
        let answers: Vec<_> = futures::stream::iter(sqs_batches(messages, |(_, body)| body.len()))
            .map(|batch| async move {
                let outgoing = Outgoing::numbered(batch.iter().map(|(_, body)| body.clone()));
                let answer = self.queue.send_batch(&outgoing).await;
                (batch, answer)
            })
            .buffered(SENDS_AT_ONCE)
            .collect()
            .await;
        let mut delivered: Vec<Sent> = Vec::new();
        let mut retry_later = None;
        for (batch, answer) in answers {
            let failed = match answer {
                Ok(failed) => failed,
                Err(error) if !error.is_retryable() => {
                    // This batch can never be sent as it is; its tasks stay
                    // pending and the others go on.
                    tracing::error!(run_id, %error, tasks = batch.len(), "a batch was refused");
                    sent.extend(batch.into_iter().map(|(task, _)| task.task_id));
                    continue;
                }
                Err(error) => {
                    // Its tasks stay pending; what the other batches sent
                    // is marked below, so a later pass sends it not again.
                    retry_later.get_or_insert(error);
                    continue;
                }
            };
            let sent_now = batch
                .into_iter()
                .enumerate()
                .filter(|(i, _)| !failed.contains(&i.to_string()))
                .map(|(_, (task, _))| task);
            let before = delivered.len();
            delivered.extend(sent_now);
            sent.extend(delivered[before..].iter().map(|task| task.task_id.clone()));
            if !failed.is_empty() {
                tracing::warn!(
                    run_id,
                    failed = failed.len(),
                    "some tasks were not sent; they stay pending"
                );
            }
        }
        let marked = self.pending.mark_queued(run_id, &delivered).await?.len();
        match retry_later {
            Some(error) => Err(error.into()),
            None => Ok(marked),
        }
    }

    /// Launches what the run's deadline needs (see [`plan`]): the least
    /// slots that finish it in time, spot first, or on-demand when little
    /// time is left; when spot gives less than asked and the run would be
    /// late without the rest, the rest on-demand. Returns how many
    /// instances it launched, and the plan to record.
    async fn size_fleet(
        &self,
        run: &Run,
        instances: &[WorkerInstance],
        now: DateTime<Utc>,
        more_pending: bool,
    ) -> Result<(usize, FleetPlan), DispatchError> {
        let policy = &self.settings.plan;
        let max_slots = self.max_slots();
        let running = slots_running(run, instances, now, self.settings.slots_per_instance);
        let load = Workload::of(&run.kernel_work(), policy.prior_ms);
        let mut decision = plan::decide(&load, running, max_slots, now, run.deadline, policy);
        if more_pending {
            // More work waits than the run holds, and the plan sees only
            // what it holds: every slot allowed.
            decision.slots = max_slots.saturating_sub(running);
            decision.reason = format!(
                "more tasks pending than the run holds ({} queued): all {max_slots} slots allowed",
                load.tasks
            );
        }
        let mut reason = decision.reason.clone();
        let mut added = 0;
        let mut launched = 0;
        if decision.slots > 0 {
            // A refusal of spot for good (a quota, a type not offered) is
            // a spot that gave nothing (and recorded no request): on-demand
            // may still. `None`: another pass recorded this request first;
            // it goes on from there.
            let (first, next_request) = match self
                .launch(
                    run,
                    0,
                    decision.slots,
                    decision.lifecycle,
                    &decision.reason,
                    now,
                )
                .await
            {
                Ok(first) => (first, 1),
                Err(DispatchError::Store(error))
                    if decision.lifecycle == Lifecycle::Spot && !error.is_retryable() =>
                {
                    tracing::warn!(run_id = %run.id, error = %error.chain(), "spot refused");
                    (Some(Vec::new()), 0)
                }
                Err(error) => return Err(error),
            };
            if let Some(first) = first {
                added += first.iter().map(|l| u64::from(l.slots)).sum::<u64>();
                launched += first.len();
                let short = decision.slots.saturating_sub(added);
                let target = policy.target(run.deadline);
                let late = load
                    .finish(now, running, added, policy.lead)
                    .is_none_or(|at| at > target);
                if short > 0 && decision.lifecycle == Lifecycle::Spot && late {
                    reason = format!(
                        "spot gave {added} of {} slots; on-demand for the {short} more the deadline needs",
                        decision.slots
                    );
                    let rest = self
                        .launch(run, next_request, short, Lifecycle::OnDemand, &reason, now)
                        .await?
                        .unwrap_or_default();
                    added += rest.iter().map(|l| u64::from(l.slots)).sum::<u64>();
                    launched += rest.len();
                }
            }
        }
        let projected_finish = load.finish(now, running, added, policy.lead);
        let on_time = projected_finish.is_some_and(|at| at <= run.deadline);
        if !on_time {
            // The phrase the template's metric filter counts (RunLateAlarm).
            tracing::warn!(run_id = %run.id, deadline = %run.deadline, ?projected_finish, "run cannot meet its deadline");
        }
        let plan = FleetPlan {
            at: now,
            tasks_left: load.tasks,
            work_ms: load.work_ms,
            slots: running + added,
            projected_finish,
            on_time,
            more_pending,
            reason,
        };
        Ok((launched, plan))
    }

    /// One fleet request, the `nth` of this pass, recorded on the run with
    /// why it was made. `None` when another pass recorded that request
    /// first (its instances are then the other pass's to record).
    async fn launch(
        &self,
        run: &Run,
        nth: u32,
        slots: u64,
        lifecycle: Lifecycle,
        reason: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<Vec<Launched>>, DispatchError> {
        let request = run.fleet_requests + nth;
        let slots = u32::try_from(slots).unwrap_or(u32::MAX);
        // The request's number and size are part of the token: a request
        // whose answer was lost and that is made again with another size
        // is a new request, not a mismatch that would fail every later pass.
        let token = format!("{}-{request}-{slots}-{}", run.id, lifecycle.as_str());
        let mut launched = self.fleet.launch(&run.id, slots, lifecycle, &token).await?;
        for instance in &mut launched {
            instance.reason = Some(reason.to_owned());
        }
        let prices = self.prices_to_record(run, &launched, now).await;
        if !self
            .runs
            .record_fleet(&run.id, request, &launched, &prices)
            .await?
        {
            tracing::warn!(run_id = %run.id, request, "fleet request already recorded");
            return Ok(None);
        }
        tracing::info!(run_id = %run.id, slots, lifecycle = lifecycle.as_str(), launched = launched.len(), reason, "workers launched");
        Ok(Some(launched))
    }

    /// The spot prices, in every zone, of the types just launched on spot
    /// that the run has no price for yet. Without them the launch stands
    /// and the report names the instances it could not price.
    async fn prices_to_record(
        &self,
        run: &Run,
        launched: &[Launched],
        now: DateTime<Utc>,
    ) -> Vec<SpotPrice> {
        let mut types: Vec<String> = launched
            .iter()
            .filter(|l| l.lifecycle.as_deref() != Some("on-demand"))
            .filter_map(|l| l.instance_type.clone())
            .filter(|t| !run.spot_prices.iter().any(|p| &p.instance_type == t))
            .collect();
        types.sort();
        types.dedup();
        match self.fleet.spot_prices(&types, now).await {
            Ok(prices) => prices,
            Err(error) => {
                tracing::warn!(run_id = %run.id, %error, "could not read spot prices");
                Vec::new()
            }
        }
    }

    /// Records, on each run, the zone of its instances and the end of
    /// those that stopped, as EC2 shows them, once.
    async fn record_sightings(
        &self,
        current: Option<&Run>,
        instances: &[WorkerInstance],
        now: DateTime<Utc>,
    ) -> Result<(), nightshift_core::Error> {
        let mut by_run: BTreeMap<&str, Vec<&WorkerInstance>> = BTreeMap::new();
        for instance in instances {
            if let Some(run_id) = &instance.run_id {
                by_run.entry(run_id).or_default().push(instance);
            }
        }
        for (run_id, shown) in by_run {
            let run = match current.filter(|run| run.id == run_id) {
                Some(run) => run.clone(),
                None => match self.runs.run(run_id).await? {
                    Some(run) => run,
                    None => continue,
                },
            };
            let news = sightings(&run.instances, &shown, now);
            if !news.is_empty() {
                self.runs.record_instances(run_id, &news).await?;
            }
        }
        Ok(())
    }

    /// Removes the objects of a finished run that no task holds: its
    /// checkpoints, and results of deliveries that were not recorded (a
    /// duplicate, a worker that died before sending, a result the table
    /// refused).
    async fn sweep(&self, run_id: &str) -> Result<usize, nightshift_core::Error> {
        let keys = self.blobs.list(&ClaimCheck::run_prefix(run_id)).await?;
        if keys.is_empty() {
            return Ok(0);
        }
        let mut task_ids: Vec<String> = keys
            .iter()
            .filter_map(|key| ClaimCheck::task_of_run_object(run_id, key))
            .map(str::to_owned)
            .collect();
        task_ids.sort();
        task_ids.dedup();
        let held: HashSet<String> = self
            .tasks
            .tasks(&task_ids)
            .await?
            .into_iter()
            .filter_map(|task| match task.result {
                Some(Blob::Stored { key }) => Some(key),
                _ => None,
            })
            .collect();
        let orphans: Vec<String> = keys.into_iter().filter(|key| !held.contains(key)).collect();
        self.blobs.delete_many(&orphans).await?;
        tracing::info!(run_id, removed = orphans.len(), "swept the run's objects");
        Ok(orphans.len())
    }

    /// Terminates workers that no open run claims any more, past a grace
    /// that lets them drain, and workers past their lifetime.
    async fn terminate_strays(
        &self,
        current: Option<&Run>,
        instances: &[WorkerInstance],
        now: DateTime<Utc>,
    ) -> Result<usize, DispatchError> {
        let grace = chrono::Duration::from_std(self.settings.stray_grace).unwrap_or_default();
        let lifetime = chrono::Duration::from_std(self.settings.max_lifetime).unwrap_or_default();
        let open = current.map(|run| run.id.as_str());
        let strays: Vec<String> = instances
            .iter()
            .filter(|i| i.alive)
            .filter(|i| {
                let age = now - i.launched_at;
                let orphaned = i.run_id.as_deref() != open && age > grace;
                orphaned || age > lifetime + grace
            })
            .map(|i| i.id.clone())
            .collect();
        if strays.is_empty() {
            return Ok(0);
        }
        tracing::warn!(instances = ?strays, "terminating workers that outlived their run or lifetime");
        self.fleet.terminate(&strays).await?;
        Ok(strays.len())
    }
}

/// The slots of the run's instances that EC2 shows running (one whose
/// launch went unrecorded, its answer lost, has the first type's slots),
/// and of those launched recently that it does not show yet.
fn slots_running(
    run: &Run,
    instances: &[WorkerInstance],
    now: DateTime<Utc>,
    unrecorded_slots: u32,
) -> u64 {
    let visible = chrono::Duration::from_std(LAUNCH_VISIBILITY).unwrap_or_default();
    let recorded = |id: &str| run.instances.iter().find(|l| l.id == id);
    let shown: u64 = instances
        .iter()
        .filter(|i| i.alive && i.run_id.as_deref() == Some(run.id.as_str()))
        .map(|i| u64::from(recorded(&i.id).map_or(unrecorded_slots, |l| l.slots)))
        .sum();
    let not_shown_yet: u64 = run
        .instances
        .iter()
        .filter(|l| now - l.launched_at < visible && !instances.iter().any(|i| i.id == l.id))
        .map(|l| u64::from(l.slots))
        .sum();
    shown + not_shown_yet
}

/// What EC2 shows of a run's recorded instances that the record lacks: a
/// zone, and an end for one no longer running (the time EC2 gives, or now
/// when it gives none).
fn sightings(
    recorded: &[Launched],
    shown: &[&WorkerInstance],
    now: DateTime<Utc>,
) -> Vec<InstanceSeen> {
    recorded
        .iter()
        .filter_map(|record| {
            let instance = shown.iter().find(|i| i.id == record.id)?;
            let zone = instance.zone.clone().filter(|_| record.zone.is_none());
            let ended_at = (!instance.alive && record.ended_at.is_none())
                .then(|| instance.ended_at.unwrap_or(now));
            (zone.is_some() || ended_at.is_some()).then(|| InstanceSeen {
                id: record.id.clone(),
                zone,
                ended_at,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests;

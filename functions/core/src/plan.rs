//! The fleet a run needs to be done by its deadline, and no more.
//!
//! At each pass the dispatcher states what is left (per kernel: the tasks
//! not ended and their mean duration measured from recorded results, or a
//! prior for a kernel with none yet) and the slots it has (running or
//! launching). The plan answers how many slots to add, spot or on-demand,
//! and when the run will finish with them.
//!
//! The finish is the bound of list scheduling, rounded up so that adding
//! slots never moves it later: `W` kernel-milliseconds on `S` slots end
//! within `W / S + p` of the start, `p` being the longest task; slots
//! launched now start `lead` late.

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};

/// What is left of one kernel's tasks in a run.
#[derive(Debug, Clone, PartialEq)]
pub struct KernelWork {
    pub kernel: String,
    /// Tasks queued and not ended.
    pub tasks: u64,
    /// Mean kernel time of its ended tasks (`None`: none ended yet).
    pub mean_ms: Option<u64>,
}

/// How the dispatcher plans; the stack's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// The duration assumed for a kernel with no result yet.
    pub prior_ms: u64,
    /// From a launch to its first task (boot, worker start).
    pub lead: Duration,
    /// How long before the deadline the plan aims to finish.
    pub margin: Duration,
    /// With less time than this left, new capacity is on-demand: a spot
    /// reclaim then would cost more time than there is.
    pub on_demand_within: Duration,
}

impl Policy {
    /// When the plan aims to be done: `margin` before `deadline` (the
    /// earliest instant there is, for a margin past it).
    pub fn target(&self, deadline: DateTime<Utc>) -> DateTime<Utc> {
        deadline
            .checked_sub_signed(self.margin)
            .unwrap_or(DateTime::<Utc>::MIN_UTC)
    }
}

/// Spot, or on-demand when spot is denied or time is short.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Lifecycle {
    Spot,
    OnDemand,
}

impl Lifecycle {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Spot => "spot",
            Self::OnDemand => "on-demand",
        }
    }
}

/// The run's work, summed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Workload {
    pub tasks: u64,
    /// Kernel time left, in milliseconds.
    pub work_ms: u64,
    /// The longest mean among the kernels with tasks left.
    pub longest_ms: u64,
}

impl Workload {
    pub fn of(kernels: &[KernelWork], prior_ms: u64) -> Self {
        kernels
            .iter()
            .filter(|k| k.tasks > 0)
            .fold(Self::default(), |sum, k| {
                let mean = k.mean_ms.unwrap_or(prior_ms);
                Self {
                    tasks: sum.tasks + k.tasks,
                    work_ms: sum.work_ms.saturating_add(k.tasks.saturating_mul(mean)),
                    longest_ms: sum.longest_ms.max(mean),
                }
            })
    }

    /// When it ends on `running` slots and `added` slots that start after
    /// `lead` (`None`: no slots at all, or beyond any date). Never later
    /// for more slots.
    pub fn finish(
        &self,
        now: DateTime<Utc>,
        running: u64,
        added: u64,
        lead: Duration,
    ) -> Option<DateTime<Utc>> {
        if self.tasks == 0 {
            return Some(now);
        }
        let slots = running + added;
        if slots == 0 {
            return None;
        }
        let lead_ms = lead.num_milliseconds().max(0) as f64;
        let work = self.work_ms as f64;
        // Until the added slots start, only the running ones work.
        let body_ms = if added == 0 || running as f64 * lead_ms >= work {
            work / running.max(1) as f64
        } else {
            (work + added as f64 * lead_ms) / slots as f64
        };
        let ms = (body_ms + self.longest_ms as f64).ceil();
        // Past any date a run could have (an absurd prior): never.
        now.checked_add_signed(Duration::try_milliseconds(ms.min(1e15) as i64)?)
    }
}

/// What to launch now.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// Slots to add (0: the running ones will do, or nothing is left).
    pub slots: u64,
    pub lifecycle: Lifecycle,
    /// Whether the run finishes by its deadline with them.
    pub on_time: bool,
    /// Why, in a line the report shows.
    pub reason: String,
}

/// The slots to add so that `load` ends `policy.margin` before `deadline`,
/// having `running` slots and at most `max_slots`; as many as help when
/// even that is too late.
pub fn decide(
    load: &Workload,
    running: u64,
    max_slots: u64,
    now: DateTime<Utc>,
    deadline: DateTime<Utc>,
    policy: &Policy,
) -> Decision {
    let target = policy.target(deadline);
    let lifecycle = if deadline - now < policy.on_demand_within {
        Lifecycle::OnDemand
    } else {
        Lifecycle::Spot
    };
    // No more slots than tasks, nor than the stack allows.
    let most = max_slots.min(load.tasks).saturating_sub(running);
    let finishes_by = |added| load.finish(now, running, added, policy.lead);
    let on_time = |added| finishes_by(added).is_some_and(|at| at <= target);
    let minutes = |at: Option<DateTime<Utc>>| {
        at.map_or("never".to_owned(), |at| at.format("%H:%M").to_string())
    };
    if load.tasks == 0 {
        return Decision {
            slots: 0,
            lifecycle,
            on_time: true,
            reason: "nothing left to run".to_owned(),
        };
    }
    if on_time(0) {
        return Decision {
            slots: 0,
            lifecycle,
            on_time: true,
            reason: format!(
                "{running} slots finish {} tasks by {}, before {}",
                load.tasks,
                minutes(finishes_by(0)),
                minutes(Some(target))
            ),
        };
    }
    // The least that is on time: the finish only moves earlier as slots
    // are added, so the first that fits is found by halving.
    let (mut low, mut high) = (0, most);
    if !on_time(most) {
        // Slots that would start after the work is done are not launched.
        let helps = finishes_by(most) < finishes_by(0) || running == 0;
        let slots = if helps { most } else { 0 };
        let finish = finishes_by(slots);
        let by_deadline = finish.is_some_and(|at| at <= deadline);
        return Decision {
            slots,
            lifecycle,
            on_time: by_deadline,
            reason: format!(
                "{} tasks ({} of kernel time) cannot end by {}: with {} more slots they end by {}{}",
                load.tasks,
                hours(load.work_ms),
                minutes(Some(target)),
                slots,
                minutes(finish),
                if by_deadline {
                    ", inside the deadline"
                } else {
                    ", after the deadline"
                }
            ),
        };
    }
    while high - low > 1 {
        let middle = low + (high - low) / 2;
        if on_time(middle) {
            high = middle;
        } else {
            low = middle;
        }
    }
    Decision {
        slots: high,
        lifecycle,
        on_time: true,
        reason: format!(
            "{} tasks ({} of kernel time) need {} more slots beside {running} to end by {} (at {})",
            load.tasks,
            hours(load.work_ms),
            high,
            minutes(Some(target)),
            minutes(finishes_by(high))
        ),
    }
}

fn hours(ms: u64) -> String {
    format!("{:.1} h", ms as f64 / 3_600_000.0)
}

/// What the dispatcher planned at its last pass, kept on the run for the
/// report and the dashboard.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetPlan {
    pub at: DateTime<Utc>,
    /// Tasks queued and not ended.
    pub tasks_left: u64,
    /// Their estimated kernel time.
    pub work_ms: u64,
    /// Slots running or launching after the pass.
    pub slots: u64,
    /// When the run will finish with them (`None`: no slots).
    pub projected_finish: Option<DateTime<Utc>>,
    pub on_time: bool,
    /// More tasks are pending than the run has room to queue: the
    /// projection covers only the queued ones.
    pub more_pending: bool,
    pub reason: String,
}

/// vCPUs of an instance type by its size (`large` 2, `xlarge` 4,
/// `4xlarge` 16, …), as EC2 names its general, compute and memory families.
pub fn vcpus(instance_type: &str) -> Option<u32> {
    let size = instance_type.rsplit_once('.')?.1;
    match size {
        "medium" => Some(1),
        "large" => Some(2),
        "xlarge" => Some(4),
        _ => {
            let times: u32 = size.strip_suffix("xlarge")?.parse().ok()?;
            times.checked_mul(4)
        }
    }
}

/// The slots of an instance of `instance_type`, `reference_slots` being
/// those of `reference_type`: by vCPUs, at least one.
pub fn slots_of(instance_type: &str, reference_type: &str, reference_slots: u32) -> u32 {
    match (vcpus(instance_type), vcpus(reference_type)) {
        (Some(own), Some(reference)) if reference > 0 => {
            (reference_slots.saturating_mul(own) / reference).max(1)
        }
        _ => reference_slots.max(1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(minutes: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000, 0).unwrap_or_default() + Duration::minutes(minutes)
    }

    fn policy() -> Policy {
        Policy {
            prior_ms: 60_000,
            lead: Duration::minutes(3),
            margin: Duration::minutes(10),
            on_demand_within: Duration::minutes(60),
        }
    }

    fn work(tasks: u64, mean_minutes: Option<u64>) -> Vec<KernelWork> {
        vec![KernelWork {
            kernel: "portfolio-risk".into(),
            tasks,
            mean_ms: mean_minutes.map(|m| m * 60_000),
        }]
    }

    #[test]
    fn work_is_summed_per_kernel_with_the_prior_for_one_never_seen() {
        let mut kernels = work(10, Some(2));
        kernels.push(KernelWork {
            kernel: "sleep".into(),
            tasks: 5,
            mean_ms: None,
        });
        let load = Workload::of(&kernels, 30_000);
        assert_eq!(load.tasks, 15);
        assert_eq!(load.work_ms, 10 * 120_000 + 5 * 30_000);
        assert_eq!(load.longest_ms, 120_000);
    }

    #[test]
    fn the_least_slots_that_end_before_the_margin_are_launched() {
        // 600 tasks of 10 minutes: 6,000 slot-minutes; 8 h to the deadline.
        let load = Workload::of(&work(600, Some(10)), 0);
        let decision = decide(&load, 0, 400, at(0), at(8 * 60), &policy());
        assert!(decision.on_time, "{decision:?}");
        assert_eq!(decision.lifecycle, Lifecycle::Spot);
        let slots = decision.slots;
        let target = at(8 * 60) - policy().margin;
        let finish = |s| load.finish(at(0), 0, s, policy().lead);
        assert!(finish(slots).is_some_and(|f| f <= target));
        assert!(
            finish(slots - 1).is_some_and(|f| f > target),
            "one fewer is late"
        );
        // Roughly 6,000 / (470 - 3) slot-minutes.
        assert!((12..=15).contains(&slots), "{slots}");
    }

    #[test]
    fn an_early_projection_launches_nothing() {
        let load = Workload::of(&work(20, Some(10)), 0);
        let decision = decide(&load, 40, 400, at(0), at(8 * 60), &policy());
        assert_eq!(decision.slots, 0);
        assert!(decision.on_time);
    }

    #[test]
    fn a_night_that_cannot_end_in_time_says_so_and_takes_all_it_may() {
        // 10 tasks of 2 hours each, one hour left: no fleet is enough.
        let load = Workload::of(&work(10, Some(120)), 0);
        let decision = decide(&load, 0, 400, at(0), at(60), &policy());
        assert!(!decision.on_time);
        assert_eq!(decision.slots, 10, "no more slots than tasks");
        assert!(
            decision.reason.contains("cannot end"),
            "{}",
            decision.reason
        );
    }

    #[test]
    fn little_time_left_launches_on_demand() {
        let load = Workload::of(&work(100, Some(1)), 0);
        let decision = decide(&load, 0, 400, at(0), at(45), &policy());
        assert_eq!(decision.lifecycle, Lifecycle::OnDemand);
        assert!(decision.slots > 0);
    }

    #[test]
    fn slots_launched_now_start_after_the_lead() {
        let load = Workload::of(&work(10, Some(1)), 0);
        // 10 slot-minutes on 10 new slots: the lead, one minute of work and
        // one of tail.
        let finish = load.finish(at(0), 0, 10, Duration::minutes(3));
        assert_eq!(finish, Some(at(5)));
        assert_eq!(load.finish(at(0), 0, 0, Duration::minutes(3)), None);
    }

    #[test]
    fn more_slots_never_finish_later() {
        for (tasks, minutes) in [(30, 2), (1, 60), (400, 30), (7, 1)] {
            let load = Workload::of(&work(tasks, Some(minutes)), 0);
            for running in [0, 1, 20] {
                let finish = |added| load.finish(at(0), running, added, Duration::minutes(4));
                for added in 0..50 {
                    let (now, more) = (finish(added), finish(added + 1));
                    assert!(
                        now.is_none() || more <= now,
                        "{tasks} tasks of {minutes} min on {running}+{added}"
                    );
                }
            }
        }
    }

    #[test]
    fn past_the_target_slots_that_cannot_help_are_not_launched() {
        // 30 two-minute tasks, 20 slots running, the deadline passed: new
        // slots would start after the running ones are done.
        let load = Workload::of(&work(30, Some(2)), 0);
        let decision = decide(&load, 20, 400, at(0), at(-10), &policy());
        assert_eq!(decision.slots, 0, "{decision:?}");
        assert!(!decision.on_time);
    }

    #[test]
    fn an_absurd_prior_is_late_rather_than_a_panic() {
        let load = Workload::of(&work(1_000_000, None), u64::MAX / 4);
        let finish = load.finish(at(0), 10, 0, Duration::minutes(4));
        assert!(
            finish.is_none_or(|f| f > at(60 * 24 * 365 * 100)),
            "{finish:?}"
        );
        let decision = decide(&load, 0, 40, at(0), at(60), &policy());
        assert_eq!(decision.slots, 40);
    }

    #[test]
    fn bigger_types_count_for_their_vcpus() {
        assert_eq!(vcpus("c7g.large"), Some(2));
        assert_eq!(vcpus("c7g.xlarge"), Some(4));
        assert_eq!(vcpus("m7g.4xlarge"), Some(16));
        assert_eq!(vcpus("c7g.metal"), None);
        assert_eq!(slots_of("c7g.xlarge", "c7g.large", 2), 4);
        assert_eq!(slots_of("c7g.medium", "c7g.large", 1), 1);
        assert_eq!(slots_of("c7g.metal", "c7g.large", 2), 2);
    }
}

//! What a run cost: each instance's recorded seconds at the spot price the
//! dispatcher read when it launched, beside what the same seconds cost on
//! demand, and the requests its components counted, from the one price
//! table below.

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::model::{Launched, Run, Usage};

/// Published prices, in one place, with the day they were read.
#[derive(Debug, Clone, Copy)]
pub struct PriceTable {
    pub region: &'static str,
    /// The day these prices were read from AWS's public price list.
    pub as_of: &'static str,
    /// On-demand Linux prices, USD per hour, by instance type.
    pub on_demand_per_hour: &'static [(&'static str, f64)],
    /// SQS standard queue, per million requests.
    pub sqs_per_million: f64,
    /// DynamoDB on demand, per million write and read request units.
    pub dynamodb_write_units_per_million: f64,
    pub dynamodb_read_units_per_million: f64,
    /// S3 Standard, per thousand PUT/COPY/POST/LIST and GET requests.
    pub s3_writes_per_thousand: f64,
    pub s3_reads_per_thousand: f64,
    /// Lambda on arm64, per million requests and per GB-second.
    pub lambda_per_million: f64,
    pub lambda_per_gb_second: f64,
}

/// The public price pages (aws.amazon.com/ec2/pricing/on-demand, /sqs,
/// /dynamodb, /s3, /lambda), Linux, US East (N. Virginia), past free tiers.
pub const PRICES: PriceTable = PriceTable {
    region: "us-east-1",
    as_of: "2025-06-01",
    on_demand_per_hour: &[
        ("c6g.large", 0.068),
        ("c6g.xlarge", 0.136),
        ("c7g.medium", 0.0363),
        ("c7g.large", 0.0725),
        ("c7g.xlarge", 0.145),
        ("c7g.2xlarge", 0.29),
        ("m6g.large", 0.077),
        ("m7g.large", 0.0816),
        ("m7g.xlarge", 0.1632),
    ],
    sqs_per_million: 0.40,
    dynamodb_write_units_per_million: 0.625,
    dynamodb_read_units_per_million: 0.125,
    s3_writes_per_thousand: 0.005,
    s3_reads_per_thousand: 0.0004,
    lambda_per_million: 0.20,
    lambda_per_gb_second: 0.000_013_333_4,
};

/// EC2 bills Linux instances per second, with a minimum of one minute.
const MINIMUM_BILLED_SECONDS: f64 = 60.0;

impl PriceTable {
    pub fn on_demand(&self, instance_type: &str) -> Option<f64> {
        self.on_demand_per_hour
            .iter()
            .find(|(name, _)| *name == instance_type)
            .map(|(_, price)| *price)
    }
}

/// One instance's time and what it cost.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InstanceCost {
    pub id: String,
    pub instance_type: Option<String>,
    pub zone: Option<String>,
    pub lifecycle: Option<String>,
    pub launched_at: DateTime<Utc>,
    pub ended_at: Option<DateTime<Utc>>,
    /// From launch to its recorded end (to now while it runs).
    pub seconds: f64,
    /// What EC2 bills of them: per second, a minute at least.
    pub billed_seconds: f64,
    /// The price it ran at: the recorded spot price for its type and zone,
    /// or the on-demand price.
    pub usd_per_hour: Option<f64>,
    pub usd: Option<f64>,
    /// The same seconds on demand.
    pub on_demand_usd: Option<f64>,
}

/// A line of the bill.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CostLine {
    pub item: String,
    pub quantity: f64,
    pub unit: &'static str,
    pub usd: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunCost {
    pub region: &'static str,
    pub prices_as_of: &'static str,
    /// Every instance has ended and has a price: the figures are final.
    pub complete: bool,
    pub instances: Vec<InstanceCost>,
    pub lines: Vec<CostLine>,
    pub total_usd: f64,
    /// The same instance-seconds at on-demand prices.
    pub on_demand_usd: f64,
    pub per_thousand_tasks_usd: Option<f64>,
    pub note: String,
}

/// The cost of `run` as recorded by `now`, for its `tasks` ended tasks.
pub fn run_cost(run: &Run, tasks: u64, now: DateTime<Utc>, prices: &PriceTable) -> RunCost {
    let instances: Vec<InstanceCost> = run
        .instances
        .iter()
        .map(|instance| instance_cost(run, instance, now, prices))
        .collect();
    let complete = instances
        .iter()
        .all(|i| i.ended_at.is_some() && i.usd.is_some());
    let mut lines = Vec::new();
    for lifecycle in ["spot", "on-demand"] {
        let of_kind: Vec<&InstanceCost> = instances
            .iter()
            .filter(|i| i.lifecycle.as_deref().unwrap_or("spot") == lifecycle)
            .collect();
        if of_kind.is_empty() {
            continue;
        }
        lines.push(CostLine {
            item: format!("{lifecycle} instances"),
            quantity: of_kind.iter().map(|i| i.billed_seconds).sum(),
            unit: "billed instance-second",
            usd: of_kind.iter().filter_map(|i| i.usd).sum(),
        });
    }
    lines.extend(request_lines(&run.usage, prices));
    let total_usd: f64 = lines.iter().map(|l| l.usd).sum();
    let on_demand_usd = instances.iter().filter_map(|i| i.on_demand_usd).sum();
    let unpriced = instances.iter().filter(|i| i.usd.is_none()).count();
    let mut note = format!(
        "instance-seconds from launch to the end EC2 recorded (one-minute minimum), at the spot \
         price read at launch for the instance's type and zone; requests as the dispatcher, the \
         collector and the workers counted them (not the API's, which come by day, nor the \
         event source's polls); on-demand and request prices are {}'s list prices as of {}",
        prices.region, prices.as_of
    );
    if unpriced > 0 {
        note.push_str(&format!(
            "; {unpriced} instance(s) without a recorded zone or price are not counted"
        ));
    }
    if !complete {
        note.push_str("; instances still running are counted up to now");
    }
    RunCost {
        region: prices.region,
        prices_as_of: prices.as_of,
        complete,
        instances,
        lines,
        total_usd,
        on_demand_usd,
        per_thousand_tasks_usd: (tasks > 0).then(|| total_usd * 1000.0 / tasks as f64),
        note,
    }
}

/// The requests the run's components counted, at published prices.
fn request_lines(usage: &Usage, prices: &PriceTable) -> Vec<CostLine> {
    let line = |item: &str, quantity: f64, unit: &'static str, per_unit: f64| CostLine {
        item: item.to_owned(),
        quantity,
        unit,
        usd: quantity * per_unit,
    };
    [
        line(
            "SQS",
            usage.sqs_requests as f64,
            "request",
            prices.sqs_per_million / 1e6,
        ),
        line(
            "DynamoDB writes",
            usage.dynamodb_write_units,
            "write unit",
            prices.dynamodb_write_units_per_million / 1e6,
        ),
        line(
            "DynamoDB reads",
            usage.dynamodb_read_units,
            "read unit",
            prices.dynamodb_read_units_per_million / 1e6,
        ),
        line(
            "S3 writes and lists",
            usage.s3_writes as f64,
            "request",
            prices.s3_writes_per_thousand / 1e3,
        ),
        line(
            "S3 reads",
            usage.s3_reads as f64,
            "request",
            prices.s3_reads_per_thousand / 1e3,
        ),
        line(
            "Lambda invocations",
            usage.lambda_invocations as f64,
            "request",
            prices.lambda_per_million / 1e6,
        ),
        line(
            "Lambda compute",
            usage.lambda_gb_seconds,
            "GB-second",
            prices.lambda_per_gb_second,
        ),
    ]
    .into_iter()
    .filter(|line| line.quantity > 0.0)
    .collect()
}

fn instance_cost(
    run: &Run,
    instance: &Launched,
    now: DateTime<Utc>,
    prices: &PriceTable,
) -> InstanceCost {
    let end = instance.ended_at.unwrap_or(now);
    let seconds = (end - instance.launched_at).num_milliseconds().max(0) as f64 / 1000.0;
    let billed_seconds = seconds.max(MINIMUM_BILLED_SECONDS);
    let on_demand_rate = instance
        .instance_type
        .as_deref()
        .and_then(|t| prices.on_demand(t));
    let rate = if instance.lifecycle.as_deref() == Some("on-demand") {
        on_demand_rate
    } else {
        run.spot_prices
            .iter()
            .find(|p| {
                Some(p.instance_type.as_str()) == instance.instance_type.as_deref()
                    && Some(p.zone.as_str()) == instance.zone.as_deref()
            })
            .map(|p| p.usd_per_hour)
    };
    let cost_at = |per_hour: f64| billed_seconds / 3600.0 * per_hour;
    InstanceCost {
        id: instance.id.clone(),
        instance_type: instance.instance_type.clone(),
        zone: instance.zone.clone(),
        lifecycle: instance.lifecycle.clone(),
        launched_at: instance.launched_at,
        ended_at: instance.ended_at,
        seconds,
        billed_seconds,
        usd_per_hour: rate,
        usd: rate.map(cost_at),
        on_demand_usd: on_demand_rate.map(cost_at),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{RunState, SpotPrice};

    fn at(seconds: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + seconds, 0).unwrap_or_default()
    }

    fn instance(id: &str, lifecycle: &str, zone: &str, end: Option<i64>) -> Launched {
        let mut launched =
            Launched::new(id, at(0), Some("c7g.large".into()), Some(lifecycle.into()));
        launched.zone = Some(zone.into());
        launched.ended_at = end.map(at);
        launched
    }

    fn run(instances: Vec<Launched>) -> Run {
        Run {
            id: "r".into(),
            state: RunState::Finished,
            started_at: at(0),
            deadline: at(3600),
            finished_at: Some(at(3600)),
            queued: 0,
            done: 0,
            failed: 0,
            cancelled: 0,
            late: 0,
            instances,
            fleet_requests: 1,
            waiting: false,
            spot_prices: vec![
                SpotPrice {
                    instance_type: "c7g.large".into(),
                    zone: "us-east-1a".into(),
                    usd_per_hour: 0.03,
                    read_at: at(0),
                },
                SpotPrice {
                    instance_type: "c7g.large".into(),
                    zone: "us-east-1b".into(),
                    usd_per_hour: 0.06,
                    read_at: at(0),
                },
            ],
            usage: Usage::default(),
            kernels: Vec::new(),
            plan: None,
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn each_instance_costs_its_recorded_seconds_at_the_price_of_its_zone() {
        let run = run(vec![
            instance("i-a", "spot", "us-east-1a", Some(3600)),
            instance("i-b", "spot", "us-east-1b", Some(1800)),
            instance("i-c", "on-demand", "us-east-1a", Some(7200)),
        ]);
        let cost = run_cost(&run, 500, at(9000), &PRICES);
        assert!(cost.complete);
        let usd: Vec<f64> = cost.instances.iter().filter_map(|i| i.usd).collect();
        assert_eq!(usd.len(), 3);
        assert!(close(usd[0], 0.03), "an hour in zone a: {}", usd[0]);
        assert!(
            close(usd[1], 0.03),
            "half an hour at zone b's price: {}",
            usd[1]
        );
        assert!(
            close(usd[2], 2.0 * 0.0725),
            "two hours on demand: {}",
            usd[2]
        );
        assert!(close(cost.total_usd, 0.06 + 0.145));
        assert!(close(cost.on_demand_usd, 3.5 * 0.0725));
        assert!(close(
            cost.per_thousand_tasks_usd.unwrap_or_default(),
            cost.total_usd * 2.0
        ));
        assert_eq!(
            cost.lines
                .iter()
                .map(|l| (l.item.as_str(), l.quantity))
                .collect::<Vec<_>>(),
            [("spot instances", 5400.0), ("on-demand instances", 7200.0)]
        );
    }

    #[test]
    fn requests_are_priced_by_what_each_service_bills() {
        let mut run = run(Vec::new());
        run.usage = Usage {
            sqs_requests: 2_000_000,
            dynamodb_write_units: 1_000_000.0,
            dynamodb_read_units: 2_000_000.0,
            s3_writes: 1000,
            s3_reads: 10_000,
            lambda_invocations: 1_000_000,
            lambda_gb_seconds: 10_000.0,
            free_requests: 50,
            calls: Default::default(),
        };
        let cost = run_cost(&run, 1000, at(0), &PRICES);
        let usd: Vec<(&str, f64)> = cost
            .lines
            .iter()
            .map(|l| (l.item.as_str(), l.usd))
            .collect();
        let expected = [
            ("SQS", 0.80),
            ("DynamoDB writes", 0.625),
            ("DynamoDB reads", 0.25),
            ("S3 writes and lists", 0.005),
            ("S3 reads", 0.004),
            ("Lambda invocations", 0.20),
            ("Lambda compute", 0.133_334),
        ];
        assert_eq!(usd.len(), expected.len());
        for ((item, got), (name, want)) in usd.iter().zip(expected) {
            assert_eq!(*item, name);
            assert!(close(*got, want), "{item}: {got} != {want}");
        }
        assert!(close(
            cost.total_usd,
            expected.iter().map(|(_, usd)| usd).sum()
        ));
    }

    #[test]
    fn a_running_instance_counts_to_now_and_the_cost_is_not_final() {
        let run = run(vec![instance("i-a", "spot", "us-east-1a", None)]);
        let cost = run_cost(&run, 0, at(1800), &PRICES);
        assert!(!cost.complete);
        assert!(close(cost.instances[0].seconds, 1800.0));
        assert_eq!(cost.per_thousand_tasks_usd, None);
        assert!(cost.note.contains("still running"));
    }

    #[test]
    fn an_instance_without_a_recorded_price_is_named_not_guessed() {
        let run = run(vec![
            instance("i-a", "spot", "us-west-2a", Some(600)),
            instance("i-b", "spot", "us-east-1a", Some(10)),
        ]);
        let cost = run_cost(&run, 10, at(900), &PRICES);
        assert!(!cost.complete);
        assert_eq!(cost.instances[0].usd, None);
        assert!(cost.note.contains("1 instance(s)"));
        assert!(close(cost.instances[1].seconds, 10.0));
        assert!(
            close(cost.instances[1].billed_seconds, 60.0),
            "a minute is billed at least"
        );
    }
}

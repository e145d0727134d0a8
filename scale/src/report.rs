//! The night's figures as a table, and one line for scripts.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use crate::cloud::Service;
use crate::night::Outcome;

fn seconds(span: Duration) -> String {
    let s = span.as_secs_f64();
    if s >= 120.0 {
        format!("{} min {:02} s", (s / 60.0).floor(), (s % 60.0).round())
    } else if s >= 1.0 {
        format!("{s:.1} s")
    } else {
        format!("{:.0} ms", s * 1000.0)
    }
}

/// Counts by item class, each with how many still failed after retries.
fn by_class(counts: &BTreeMap<String, u64>, failed: &BTreeMap<String, u64>) -> String {
    if counts.is_empty() {
        return "none".to_owned();
    }
    counts
        .iter()
        .map(|(class, n)| {
            let failed = failed.get(class).copied().unwrap_or(0);
            format!("{class} {n} ({failed} failed after retries)")
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

impl Outcome {
    /// The ratio the issue sets a goal for: makespan ÷ (Σ task ÷ slots).
    pub fn makespan_ratio(&self) -> f64 {
        1.0 / self.efficiency()
    }

    /// AWS requests per task, of one service (all with `None`).
    pub fn calls_per_task(&self, service: Option<Service>) -> f64 {
        let calls: u64 = self
            .tally
            .calls
            .iter()
            .filter(|((s, _), _)| service.is_none_or(|wanted| *s == wanted))
            .map(|(_, n)| n)
            .sum();
        calls as f64 / self.night.tasks as f64
    }

    pub fn peak_run_wcu(&self) -> f64 {
        self.tally.peak_wcu.get("run").copied().unwrap_or(0.0)
    }

    pub fn throttled(&self) -> u64 {
        self.tally.throttled.values().sum()
    }

    pub fn table(&self) -> String {
        let night = &self.night;
        let limits = &night.limits;
        let mut out = String::new();
        let slots = night.instances * night.slots_per_instance;
        let _ = writeln!(
            out,
            "{} tasks of {} on {} instances of {} slots ({slots} slots), seed {}",
            thousands(night.tasks as u64),
            seconds(night.task_time),
            night.instances,
            night.slots_per_instance,
            night.seed
        );
        let _ = writeln!(
            out,
            "latency p50/p99: DynamoDB {}/{}, SQS {}/{}, EC2 {}/{}; dispatcher every {}, timeout {}; boot {}",
            seconds(limits.dynamodb.p50),
            seconds(limits.dynamodb.p99),
            seconds(limits.sqs.p50),
            seconds(limits.sqs.p99),
            seconds(limits.ec2.p50),
            seconds(limits.ec2.p99),
            seconds(night.tick),
            seconds(night.pass_timeout),
            seconds(night.boot),
        );
        let _ = writeln!(out);
        let _ = writeln!(out, "| measure | value |");
        let _ = writeln!(out, "|---|---|");
        let mut row = |name: &str, value: String| {
            let _ = writeln!(out, "| {name} | {value} |");
        };
        let working: Vec<_> = self.passes.iter().filter(|p| p.queued > 0).collect();
        let longest = self.passes.iter().map(|p| p.took).max().unwrap_or_default();
        let queue_time: Duration = working.iter().map(|p| p.took).sum();
        let queued: usize = working.iter().map(|p| p.queued).sum();
        row(
            "all tasks queued",
            match self.all_queued {
                Some(at) => format!(
                    "{} after the night's start, by {} passes",
                    seconds(at),
                    working.len()
                ),
                None => "never".to_owned(),
            },
        );
        row(
            "queuing rate within a pass",
            format!(
                "{:.0} tasks/s; longest pass {}, timeouts {} (limit {}; Lambda's most is 15 min)",
                queued as f64 / queue_time.as_secs_f64().max(f64::MIN_POSITIVE),
                seconds(longest),
                self.passes.iter().filter(|p| p.timed_out).count(),
                seconds(night.pass_timeout),
            ),
        );
        row(
            "makespan (first kernel start → last kernel end)",
            format!(
                "{} vs Σ task ÷ slots {}: ratio {:.3} (goal ≤ 1.05)",
                seconds(self.makespan),
                seconds(night.ideal()),
                self.makespan_ratio()
            ),
        );
        row(
            "night (open → run closed)",
            self.closed.map_or("not closed".to_owned(), seconds),
        );
        row(
            "tasks done / failed",
            format!(
                "{} / {}; kernels run {} (a task sent again by a pass that could not mark it runs twice, its result recorded once)",
                thousands(self.run.done),
                thousands(self.run.failed),
                thousands(self.kernel_runs)
            ),
        );
        let collector = &self.collector;
        row(
            "collector",
            format!(
                "peak {} invocations at once ({} pollers; account limit {}), {} invocations, {:.1} messages each, {} retried",
                collector.peak_running,
                collector.peak_pollers,
                limits.lambda_concurrency,
                thousands(collector.invocations),
                collector.messages as f64 / collector.invocations.max(1) as f64,
                collector.retried,
            ),
        );
        row(
            "result recorded after its kernel ended",
            format!(
                "p50 {}, p99 {}, max {}",
                seconds(self.lag(0.5)),
                seconds(self.lag(0.99)),
                seconds(self.lag(1.0))
            ),
        );
        row(
            "RUN item (hot key)",
            format!(
                "{:.1} KB at most; peak {:.0} WCU/s on its partition (limit {:.0})",
                self.largest_run_item as f64 / 1024.0,
                self.peak_run_wcu(),
                limits.partition_wcu
            ),
        );
        let peaks: Vec<String> = self
            .tally
            .peak_wcu
            .iter()
            .filter(|(class, _)| class.as_str() != "run")
            .map(|(class, wcu)| format!("{class} {wcu:.0}"))
            .collect();
        row("peak WCU/s of other partitions", peaks.join(", "));
        row(
            "throttled requests",
            by_class(&self.tally.throttled, &self.tally.failed),
        );
        row(
            "transaction conflicts",
            by_class(&self.tally.conflicts, &self.tally.conflicts_failed),
        );
        row(
            "task queue in flight",
            format!(
                "peak {} (limit {})",
                thousands(self.peak_task_in_flight as u64),
                thousands(limits.sqs_in_flight as u64)
            ),
        );
        let wcu: f64 = self.tally.write_units.values().sum();
        row(
            "DynamoDB write units per task",
            format!("{:.2}", wcu / night.tasks as f64),
        );
        row(
            "AWS requests per task",
            format!(
                "{:.3} (DynamoDB {:.3}, SQS {:.3}, EC2 {:.4})",
                self.calls_per_task(None),
                self.calls_per_task(Some(Service::DynamoDb)),
                self.calls_per_task(Some(Service::Sqs)),
                self.calls_per_task(Some(Service::Ec2)),
            ),
        );
        let _ = writeln!(out);
        let _ = writeln!(out, "| requests | per task |");
        let _ = writeln!(out, "|---|---|");
        for ((service, operation), n) in &self.tally.calls {
            let _ = writeln!(
                out,
                "| {service:?} {operation} | {:.4} |",
                *n as f64 / night.tasks as f64
            );
        }
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "makespan_ratio={:.3} queued_in_s={:.0} collector_peak={} peak_run_wcu={:.0} throttled={} calls_per_task={:.3}",
            self.makespan_ratio(),
            self.all_queued.unwrap_or_default().as_secs_f64(),
            collector.peak_running,
            self.peak_run_wcu(),
            self.throttled(),
            self.calls_per_task(None),
        );
        out
    }
}

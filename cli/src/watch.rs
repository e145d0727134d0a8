//! `nightshift run watch`: a night from a terminal, until its run ends.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::time::Duration;

use chrono::{DateTime, Utc};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;

use crate::CliError;
use crate::api::Api;

/// How often the run is read.
const EVERY: Duration = Duration::from_secs(2);
/// Without a terminal, a line this often (and when the run ends).
const LINE_EVERY: u32 = 15;

/// The run given, else the newest.
pub async fn run_id_or_newest(api: &Api, run_id: Option<String>) -> Result<String, CliError> {
    if let Some(run_id) = run_id {
        return Ok(run_id);
    }
    let (_, page) = api
        .call(reqwest::Method::GET, "/runs?limit=1", None)
        .await?;
    page["runs"][0]["id"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| CliError::Usage("there is no run to watch yet".into()))
}

pub async fn watch(api: &Api, run_id: &str, json_output: bool) -> Result<(), CliError> {
    let terminal = std::io::stderr().is_terminal() && !json_output;
    let bar = if terminal {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template("{bar:40} {pos}/{len} ended\n{msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar
    } else {
        ProgressBar::hidden()
    };
    let mut polls = 0_u32;
    loop {
        let (_, run) = api
            .call(reqwest::Method::GET, &format!("/runs/{run_id}"), None)
            .await?;
        let over = run["state"] != "OPEN";
        if json_output {
            println!("{}", serde_json::to_string(&run).unwrap_or_default());
        } else if terminal {
            bar.set_length(run["queued"].as_u64().unwrap_or(0));
            bar.set_position(run["progress"]["ended"].as_u64().unwrap_or(0));
            bar.set_message(describe(&run, Utc::now()));
        } else if over || polls.is_multiple_of(LINE_EVERY) {
            println!("{}", describe(&run, Utc::now()).replace('\n', "; "));
        }
        if over {
            if terminal {
                bar.finish();
            }
            return Ok(());
        }
        polls += 1;
        tokio::time::sleep(EVERY).await;
    }
}

fn time(value: &Value) -> Option<DateTime<Utc>> {
    value
        .as_str()
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.with_timezone(&Utc))
}

fn clock(at: Option<DateTime<Utc>>) -> String {
    at.map_or("-".to_owned(), |t| t.format("%H:%M:%S UTC").to_string())
}

/// The run in three lines: state and counts, pace against the deadline,
/// the fleet.
pub fn describe(run: &Value, now: DateTime<Utc>) -> String {
    let count = |field: &str| run[field].as_u64().unwrap_or(0);
    let (queued, done, failed) = (count("queued"), count("done"), count("failed"));
    let progress = &run["progress"];
    let deadline = time(&run["deadline"]);
    let projected = time(&progress["projected_finish"]);
    let eta = match (projected, run["state"].as_str()) {
        (Some(at), Some("OPEN")) => {
            let left = (at - now).num_seconds().max(0);
            format!(
                "ETA {} (in {}m{:02}s)",
                clock(Some(at)),
                left / 60,
                left % 60
            )
        }
        (Some(at), _) => format!("finished {}", clock(Some(at))),
        (None, _) => "ETA -".to_owned(),
    };
    let verdict = match progress["on_time"].as_bool() {
        Some(true) => "on time",
        Some(false) => "LATE",
        None => "-",
    };
    let mut fleet: BTreeMap<String, (u32, u32)> = BTreeMap::new();
    for instance in run["instances"].as_array().into_iter().flatten() {
        let kind = format!(
            "{} {}",
            instance["instance_type"].as_str().unwrap_or("?"),
            instance["lifecycle"].as_str().unwrap_or("spot")
        );
        let entry = fleet.entry(kind).or_default();
        if instance["ended_at"].is_null() {
            entry.0 += 1;
        } else {
            entry.1 += 1;
        }
    }
    let fleet = if fleet.is_empty() {
        "no instance yet".to_owned()
    } else {
        fleet
            .iter()
            .map(|(kind, (up, ended))| format!("{kind}: {up} up, {ended} ended"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "run {} {}: {} queued, {} running or waiting, {} done, {} failed\n{:.1} tasks/min, {eta}, deadline {} ({verdict})\ninstances: {fleet}",
        run["id"].as_str().unwrap_or("?"),
        run["state"].as_str().unwrap_or("?"),
        queued,
        queued.saturating_sub(done + failed),
        done,
        failed,
        progress["tasks_per_minute"].as_f64().unwrap_or(0.0),
        clock(deadline),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_run_is_described_by_its_counts_pace_deadline_and_fleet() {
        let now = DateTime::parse_from_rfc3339("2026-11-27T23:00:00Z")
            .map(|t| t.with_timezone(&Utc))
            .unwrap_or_default();
        let run = json!({
            "id": "r1", "state": "OPEN", "queued": 100, "done": 40, "failed": 2,
            "deadline": "2026-11-28T06:00:00Z",
            "progress": {"ended": 42, "tasks_per_minute": 21.0,
                         "projected_finish": "2026-11-27T23:02:46Z", "on_time": true},
            "instances": [
                {"instance_type": "c7g.large", "lifecycle": "spot", "ended_at": null},
                {"instance_type": "c7g.large", "lifecycle": "spot", "ended_at": "2026-11-27T22:59:00Z"},
            ],
        });
        let text = describe(&run, now);
        assert!(
            text.contains("100 queued, 58 running or waiting, 40 done, 2 failed"),
            "{text}"
        );
        assert!(
            text.contains("21.0 tasks/min, ETA 23:02:46 UTC (in 2m46s)"),
            "{text}"
        );
        assert!(text.contains("deadline 06:00:00 UTC (on time)"), "{text}");
        assert!(text.contains("c7g.large spot: 1 up, 1 ended"), "{text}");
    }
}

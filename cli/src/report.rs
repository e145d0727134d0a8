//! The morning report in a terminal: every page of it, as a table, CSV or
//! JSON, with what each instance did and what the run cost.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::CliError;
use crate::api::Api;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Csv,
    Json,
}

/// The report's first page (run, instances, cost) with the tasks of every
/// page.
pub async fn fetch(api: &Api, run_id: &str) -> Result<Value, CliError> {
    let path = format!("/runs/{run_id}/report");
    let (_, mut report) = api.call(reqwest::Method::GET, &path, None).await?;
    let mut next = report["next_cursor"].as_str().map(str::to_owned);
    while let Some(cursor) = next {
        let (_, page) = api
            .call(
                reqwest::Method::GET,
                &format!("{path}?cursor={cursor}"),
                None,
            )
            .await?;
        if let (Some(all), Some(more)) = (report["tasks"].as_array_mut(), page["tasks"].as_array())
        {
            all.extend(more.iter().cloned());
        }
        next = page["next_cursor"].as_str().map(str::to_owned);
    }
    report["next_cursor"] = Value::Null;
    Ok(report)
}

/// Waits until every instance of the run has ended and is priced, so that
/// the cost is final; says so and goes on when it takes longer.
pub async fn await_final_cost(api: &Api, run_id: &str, within: Duration) -> Result<(), CliError> {
    let started = Instant::now();
    let path = format!("/runs/{run_id}/report?limit=1");
    loop {
        let (_, page) = api.call(reqwest::Method::GET, &path, None).await?;
        if page["cost"]["complete"] == true {
            return Ok(());
        }
        if started.elapsed() > within {
            eprintln!("some instances are still running: the cost below counts them up to now");
            return Ok(());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

pub async fn print(api: &Api, run_id: &str, format: Format) -> Result<(), CliError> {
    match format {
        Format::Csv => print_csv(api, run_id).await,
        Format::Json => {
            let report = fetch(api, run_id).await?;
            println!(
                "{}",
                serde_json::to_string_pretty(&report).unwrap_or_default()
            );
            Ok(())
        }
        Format::Table => {
            print_table(&fetch(api, run_id).await?);
            Ok(())
        }
    }
}

/// Every CSV page as the API gives it; one header.
async fn print_csv(api: &Api, run_id: &str) -> Result<(), CliError> {
    let mut path = format!("/runs/{run_id}/report?format=csv");
    loop {
        let answer = api
            .send(reqwest::Method::GET, &path, String::new(), "text/csv")
            .await?;
        print!("{}", answer.text);
        match answer
            .headers
            .get("nightshift-next-cursor")
            .and_then(|v| v.to_str().ok())
        {
            Some(cursor) => path = format!("/runs/{run_id}/report?format=csv&cursor={cursor}"),
            None => return Ok(()),
        }
    }
}

fn text<'a>(value: &'a Value, or: &'a str) -> &'a str {
    value.as_str().unwrap_or(or)
}

fn seconds(ms: &Value) -> String {
    ms.as_f64()
        .map_or("-".to_owned(), |ms| format!("{:.2}s", ms / 1000.0))
}

/// Dollars to the cent, or to three significant digits below a cent (the
/// price of a few instance-minutes).
fn usd(value: &Value) -> String {
    match value.as_f64() {
        None => "-".to_owned(),
        Some(usd) if usd == 0.0 || usd.abs() >= 0.01 => format!("${usd:.2}"),
        Some(usd) if usd.abs() >= 0.0001 => format!("${usd:.6}"),
        Some(usd) => format!("${usd:.2e}"),
    }
}

fn print_table(report: &Value) {
    let empty = Vec::new();
    let tasks = report["tasks"].as_array().unwrap_or(&empty);
    println!();
    println!(
        "{:<10} {:<8} {:<21} {:>8} {:>10}  result",
        "account", "status", "worker", "attempts", "duration"
    );
    for task in tasks {
        println!(
            "{:<10} {:<8} {:<21} {:>8} {:>10}  {}",
            text(&task["account"], "?"),
            text(&task["status"], "?"),
            text(&task["instance_id"], "-"),
            task["attempts"].as_u64().unwrap_or(0),
            seconds(&task["duration_ms"]),
            task["summary"]
                .as_str()
                .or(task["error"].as_str())
                .unwrap_or("-"),
        );
    }
    println!();
    println!(
        "{:<21} {:<10} {:<11} {:<9} {:>5} {:>9} {:>9} {:>12}",
        "instance", "type", "zone", "lifecycle", "tasks", "busy", "up", "cost"
    );
    for instance in report["instances"].as_array().unwrap_or(&empty) {
        println!(
            "{:<21} {:<10} {:<11} {:<9} {:>5} {:>9} {:>9} {:>12}",
            text(&instance["id"], "?"),
            text(&instance["instance_type"], "-"),
            text(&instance["zone"], "-"),
            text(&instance["lifecycle"], "-"),
            instance["tasks"].as_u64().unwrap_or(0),
            seconds(&instance["busy_ms"]),
            instance["seconds"]
                .as_f64()
                .map_or("-".to_owned(), |s| format!("{s:.1}s")),
            usd(&instance["usd"]),
        );
    }
    let run = &report["run"];
    let cost = &report["cost"];
    println!();
    for line in cost["lines"].as_array().unwrap_or(&empty) {
        println!(
            "cost: {:<20} {:>10.1} {}s  {}",
            text(&line["item"], "?"),
            line["quantity"].as_f64().unwrap_or(0.0),
            text(&line["unit"], "unit"),
            usd(&line["usd"]),
        );
    }
    println!(
        "cost: total {} ({} per 1,000 tasks); on demand the same instance-seconds: {}",
        usd(&cost["total_usd"]),
        usd(&cost["per_thousand_tasks_usd"]),
        usd(&cost["on_demand_usd"]),
    );
    println!(
        "cost: prices of {} as of {}{}",
        text(&cost["region"], "?"),
        text(&cost["prices_as_of"], "?"),
        if cost["complete"] == true {
            ""
        } else {
            " (not final: instances still running)"
        }
    );
    let wall = match (run["started_at"].as_str(), run["finished_at"].as_str()) {
        (Some(start), Some(end)) => chrono::DateTime::parse_from_rfc3339(end)
            .ok()
            .zip(chrono::DateTime::parse_from_rfc3339(start).ok())
            .map_or("-".to_owned(), |(end, start)| {
                format!("{:.1}s", (end - start).num_milliseconds() as f64 / 1000.0)
            }),
        _ => "-".to_owned(),
    };
    let workers = report["instances"]
        .as_array()
        .unwrap_or(&empty)
        .iter()
        .filter(|i| i["tasks"].as_u64().unwrap_or(0) > 0)
        .count();
    println!(
        "run {}: {}, {} done, {} failed of {} queued; {} workers processed tasks, {} launched; deadline {}; wall time {}",
        text(&run["id"], "?"),
        text(&run["state"], "?"),
        run["done"],
        run["failed"],
        run["queued"],
        workers,
        run["instances"].as_array().map_or(0, Vec::len),
        text(&run["deadline"], "-"),
        wall,
    );
}

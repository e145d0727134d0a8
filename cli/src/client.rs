//! Commands that talk to the API: the demo, runs and their reports.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};

use crate::CliError;
use crate::api::Api;
use crate::local;

/// One client for the local stack's control calls.
static HTTP: LazyLock<reqwest::Client> = LazyLock::new(reqwest::Client::new);

/// A call to the local stack's control endpoint (not the API).
async fn call(
    method: reqwest::Method,
    url: &str,
    body: Option<&Value>,
) -> Result<(u16, Value), CliError> {
    let mut request = HTTP.request(method, url);
    if let Some(body) = body {
        request = request.json(body);
    }
    let response = request.send().await.map_err(|source| CliError::Http {
        url: url.to_owned(),
        source,
    })?;
    let status = response.status().as_u16();
    let text = response.text().await.map_err(|source| CliError::Http {
        url: url.to_owned(),
        source,
    })?;
    let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    if status >= 400 {
        return Err(CliError::Api {
            status,
            body: value.to_string(),
        });
    }
    Ok((status, value))
}

pub async fn demo(
    api: &Api,
    accounts: usize,
    kernel: Option<&str>,
    timeout: Duration,
) -> Result<(), CliError> {
    if accounts == 0 {
        return Err(CliError::Usage("--accounts must be at least 1".into()));
    }
    let kernel = kernel.unwrap_or(nightshift_kernels::portfolio::NAME);
    let started = Instant::now();
    let tasks: Vec<Value> = (0..accounts)
        .map(|i| {
            let account = format!("acct-{i:03}");
            let payload = if kernel == nightshift_kernels::portfolio::NAME {
                nightshift_kernels::portfolio::demo_payload(&account, i as u64)
            } else {
                json!({ "seconds": 1.0 })
            };
            json!({ "account": account, "kernel": kernel, "payload": payload })
        })
        .collect();
    let mut ids = 0;
    for chunk in tasks.chunks(1000) {
        let (_, answer) = api
            .call(
                reqwest::Method::POST,
                "/tasks",
                Some(&json!({ "tasks": chunk })),
            )
            .await?;
        ids += answer["task_ids"].as_array().map_or(0, Vec::len);
    }
    println!("submitted {ids} accounts ({kernel})");
    let (_, started_run) = api.call(reqwest::Method::POST, "/runs", None).await?;
    let run_id = started_run["run"]["id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    println!("run {run_id} started");
    follow(api, &run_id, ids as u64, timeout).await?;
    print_report(api, &run_id).await?;
    println!("demo took {:.1}s", started.elapsed().as_secs_f64());
    Ok(())
}

/// Shows progress until the run is FINISHED.
async fn follow(api: &Api, run_id: &str, expected: u64, timeout: Duration) -> Result<(), CliError> {
    let bar = ProgressBar::new(expected);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:40}] {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let started = Instant::now();
    loop {
        let (_, run) = api
            .call(reqwest::Method::GET, &format!("/runs/{run_id}"), None)
            .await?;
        let done = run["done"].as_u64().unwrap_or(0);
        let failed = run["failed"].as_u64().unwrap_or(0);
        let queued = run["queued"].as_u64().unwrap_or(0);
        let workers = run["instances"].as_array().map_or(0, Vec::len);
        bar.set_length(queued.max(expected));
        bar.set_position(done + failed);
        bar.set_message(format!(
            "queued {queued}, failed {failed}, workers launched {workers}"
        ));
        if run["state"] == "FINISHED" {
            bar.finish();
            return Ok(());
        }
        if started.elapsed() > timeout {
            bar.abandon();
            return Err(CliError::Local(format!(
                "run {run_id} did not finish within {timeout:?}"
            )));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

pub async fn start_run(api: &Api) -> Result<(), CliError> {
    let (status, answer) = api.call(reqwest::Method::POST, "/runs", None).await?;
    let verb = if status == 201 {
        "started"
    } else {
        "already open"
    };
    println!(
        "run {} {verb}",
        answer["run"]["id"].as_str().unwrap_or_default()
    );
    Ok(())
}

pub async fn show_run(api: &Api, run_id: &str) -> Result<(), CliError> {
    let (_, run) = api
        .call(reqwest::Method::GET, &format!("/runs/{run_id}"), None)
        .await?;
    println!("{}", serde_json::to_string_pretty(&run).unwrap_or_default());
    Ok(())
}

pub async fn print_report(api: &Api, run_id: &str) -> Result<(), CliError> {
    let (_, report) = api
        .call(
            reqwest::Method::GET,
            &format!("/runs/{run_id}/report"),
            None,
        )
        .await?;
    let empty = Vec::new();
    let tasks = report["tasks"].as_array().unwrap_or(&empty);
    println!();
    println!(
        "{:<10} {:<8} {:<21} {:>8} {:>10}  result",
        "account", "status", "worker", "attempts", "duration"
    );
    for task in tasks {
        let duration = task["duration_ms"]
            .as_u64()
            .map_or("-".to_owned(), |ms| format!("{:.2}s", ms as f64 / 1000.0));
        let outcome = task["summary"]
            .as_str()
            .or(task["error"].as_str())
            .unwrap_or("-");
        println!(
            "{:<10} {:<8} {:<21} {:>8} {:>10}  {}",
            task["account"].as_str().unwrap_or("?"),
            task["status"].as_str().unwrap_or("?"),
            task["instance_id"].as_str().unwrap_or("-"),
            task["attempts"].as_u64().unwrap_or(0),
            duration,
            outcome,
        );
    }
    let workers: BTreeSet<&str> = tasks
        .iter()
        .filter_map(|t| t["instance_id"].as_str())
        .collect();
    let run = &report["run"];
    println!();
    println!("workers:");
    if let Some(lines) = report["workers"].as_object() {
        for (instance, line) in lines {
            println!(
                "  {instance:<21} {:>4} tasks  {:>8.1}s busy",
                line["tasks"],
                line["busy_ms"].as_f64().unwrap_or(0.0) / 1000.0
            );
        }
    }
    println!(
        "run {}: {}, {} done, {} failed of {} queued; {} distinct workers processed tasks, {} launched; wall time {}",
        run["id"].as_str().unwrap_or("?"),
        run["state"].as_str().unwrap_or("?"),
        run["done"],
        run["failed"],
        run["queued"],
        workers.len(),
        run["instances"].as_array().map_or(0, Vec::len),
        report["wall_ms"]
            .as_f64()
            .map_or("-".to_owned(), |ms| format!("{:.1}s", ms / 1000.0)),
    );
    Ok(())
}

pub async fn local_status(state_dir: &Path) -> Result<(), CliError> {
    let Some(pid) = local::running_pid(state_dir) else {
        println!("no local stack is running");
        return Ok(());
    };
    let env = local::read_env_file(&state_dir.join(local::ENV_FILE)).unwrap_or_default();
    println!("local stack running (pid {pid})");
    for (key, value) in &env {
        println!("  {key}={value}");
    }
    if let Some(control) = env.get("NIGHTSHIFT_CONTROL_URL") {
        let (_, workers) =
            call(reqwest::Method::GET, &format!("{control}/instances"), None).await?;
        println!("worker processes: {workers}");
    }
    Ok(())
}

/// The local stack's control endpoint.
fn control_url(state_dir: &Path) -> Result<String, CliError> {
    let env = local::read_env_file(&state_dir.join(local::ENV_FILE))
        .map_err(|_| CliError::Usage("no local stack is up".into()))?;
    env.get("NIGHTSHIFT_CONTROL_URL")
        .cloned()
        .ok_or_else(|| CliError::Usage("the local stack has no control URL".into()))
}

pub async fn night_start(state_dir: &Path) -> Result<(), CliError> {
    let control = control_url(state_dir)?;
    call(
        reqwest::Method::POST,
        &format!("{control}/night/start"),
        None,
    )
    .await?;
    println!("night started: the dispatcher opens a run if work is pending");
    Ok(())
}

pub async fn interrupt(state_dir: &Path, instance_id: &str) -> Result<(), CliError> {
    let control = control_url(state_dir)?;
    call(
        reqwest::Method::POST,
        &format!("{control}/instances/{instance_id}/interrupt"),
        None,
    )
    .await?;
    println!("spot interruption announced to {instance_id}");
    Ok(())
}

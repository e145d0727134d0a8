//! Commands that talk to the API: the demo, runs and their reports.

use std::path::Path;
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};

use crate::CliError;
use crate::api::Api;
use crate::local;

/// How long the demo waits, after its run, for every worker to end, so
/// that the cost it prints is final.
const INSTANCES_END_WITHIN: Duration = Duration::from_secs(90);

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
    crate::report::await_final_cost(api, &run_id, INSTANCES_END_WITHIN).await?;
    crate::report::print(api, &run_id, crate::report::Format::Table).await?;
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

pub async fn cancel_run(api: &Api, run_id: &str, json_output: bool) -> Result<(), CliError> {
    let path = format!("/runs/{run_id}/cancel");
    let (status, answer) = api.call(reqwest::Method::POST, &path, None).await?;
    if json_output {
        println!("{answer}");
        return Ok(());
    }
    let verb = if status == 202 {
        "cancelled: its tasks end CANCELLED and its instances stop"
    } else {
        "was already cancelled"
    };
    println!("run {run_id} {verb}");
    Ok(())
}

pub async fn start_run(api: &Api, json_output: bool) -> Result<(), CliError> {
    let (status, answer) = api.call(reqwest::Method::POST, "/runs", None).await?;
    if json_output {
        println!("{answer}");
        return Ok(());
    }
    let verb = if status == 201 {
        "started"
    } else {
        "already open"
    };
    println!(
        "run {} {verb}, due {}",
        answer["run"]["id"].as_str().unwrap_or_default(),
        answer["run"]["deadline"].as_str().unwrap_or("-")
    );
    Ok(())
}

pub async fn show_run(api: &Api, run_id: &str, json_output: bool) -> Result<(), CliError> {
    let (_, run) = api
        .call(reqwest::Method::GET, &format!("/runs/{run_id}"), None)
        .await?;
    if json_output {
        println!("{run}");
    } else {
        println!("{}", crate::watch::describe(&run, chrono::Utc::now()));
    }
    Ok(())
}

/// The newest runs, up to `limit`, page after page.
pub async fn list_runs(api: &Api, limit: usize, json_output: bool) -> Result<(), CliError> {
    let mut runs: Vec<Value> = Vec::new();
    let mut cursor: Option<String> = None;
    while runs.len() < limit {
        let page_size = (limit - runs.len()).min(100);
        let path = match &cursor {
            Some(cursor) => format!("/runs?limit={page_size}&cursor={cursor}"),
            None => format!("/runs?limit={page_size}"),
        };
        let (_, page) = api.call(reqwest::Method::GET, &path, None).await?;
        runs.extend(page["runs"].as_array().into_iter().flatten().cloned());
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    if json_output {
        for run in &runs {
            println!("{run}");
        }
        return Ok(());
    }
    println!(
        "{:<36} {:<9} {:<24} {:<24} {:>6} {:>6} {:>6}",
        "run", "state", "started", "deadline", "done", "failed", "queued"
    );
    for run in &runs {
        println!(
            "{:<36} {:<9} {:<24} {:<24} {:>6} {:>6} {:>6}",
            run["id"].as_str().unwrap_or("?"),
            run["state"].as_str().unwrap_or("?"),
            run["started_at"].as_str().unwrap_or("-"),
            run["deadline"].as_str().unwrap_or("-"),
            run["done"],
            run["failed"],
            run["queued"],
        );
    }
    Ok(())
}

pub async fn show_task(api: &Api, task_id: &str, json_output: bool) -> Result<(), CliError> {
    let (_, task) = api
        .call(reqwest::Method::GET, &format!("/tasks/{task_id}"), None)
        .await?;
    if json_output {
        println!("{task}");
        return Ok(());
    }
    for (name, value) in task.as_object().into_iter().flatten() {
        let shown = match value {
            Value::String(text) => text.clone(),
            Value::Null => "-".to_owned(),
            other => other.to_string(),
        };
        println!("{name:<16} {shown}");
    }
    Ok(())
}

/// A run's tasks, of one status if given, from its report.
pub async fn list_tasks(
    api: &Api,
    run_id: &str,
    status: Option<&str>,
    json_output: bool,
) -> Result<(), CliError> {
    let report = crate::report::fetch(api, run_id).await?;
    let tasks = report["tasks"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|task| status.is_none_or(|s| task["status"] == s));
    if json_output {
        for task in tasks {
            println!("{task}");
        }
        return Ok(());
    }
    println!(
        "{:<36} {:<16} {:<9} {:<21} {:>8}  result",
        "task", "account", "status", "instance", "attempts"
    );
    for task in tasks {
        println!(
            "{:<36} {:<16} {:<9} {:<21} {:>8}  {}",
            task["task_id"].as_str().unwrap_or("?"),
            task["account"].as_str().unwrap_or("?"),
            task["status"].as_str().unwrap_or("?"),
            task["instance_id"].as_str().unwrap_or("-"),
            task["attempts"],
            task["summary"]
                .as_str()
                .or(task["error"].as_str())
                .unwrap_or("-"),
        );
    }
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

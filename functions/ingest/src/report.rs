//! Runs: start one, read its counters, and the morning report.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use chrono::Utc;
use nightshift_core::{Run, Task, TaskStatus};
use serde::Serialize;
use serde_json::{Value, json};

use crate::Api;
use crate::error::ApiError;

/// The button: opens a run (or returns the open one) and wakes the
/// dispatcher. 201 for a new run, 200 for the one already open.
pub async fn start_run(State(api): State<Arc<Api>>) -> Result<(StatusCode, Json<Value>), ApiError> {
    let new_id = uuid::Uuid::new_v4().to_string();
    let now = Utc::now();
    let (run, created) = api
        .runs
        .open_run(&new_id, now, api.night.deadline(now))
        .await
        .map_err(ApiError::from_store)?;
    // The schedule would reach the run anyway; waking the dispatcher only
    // makes it sooner, so a failure here is logged, not returned.
    let dispatch = match api.trigger.dispatch_soon(&run.id).await {
        Ok(()) => "requested",
        Err(error) => {
            tracing::warn!(run_id = %run.id, error = %error, "could not wake the dispatcher; the schedule will");
            "scheduled"
        }
    };
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        Json(json!({ "run": run, "created": created, "dispatch": dispatch })),
    ))
}

pub async fn show_run(
    State(api): State<Arc<Api>>,
    Path(id): Path<String>,
) -> Result<Json<Run>, ApiError> {
    api.runs
        .run(&id)
        .await
        .map_err(ApiError::from_store)?
        .map(Json)
        .ok_or_else(|| ApiError::not_found("run", &id))
}

#[derive(Debug, Serialize)]
struct ReportLine {
    task_id: String,
    account: String,
    status: TaskStatus,
    instance_id: Option<String>,
    attempts: u32,
    failed_attempts: u32,
    interruptions: u32,
    duration_ms: Option<u64>,
    summary: Option<String>,
    error: Option<String>,
}

#[derive(Debug, Default, Serialize)]
struct WorkerLine {
    tasks: u64,
    busy_ms: u64,
}

pub async fn run_report(
    State(api): State<Arc<Api>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let run = api
        .runs
        .run(&id)
        .await
        .map_err(ApiError::from_store)?
        .ok_or_else(|| ApiError::not_found("run", &id))?;
    let mut tasks = api
        .reader
        .run_tasks(&id)
        .await
        .map_err(ApiError::from_store)?;
    tasks.sort_by(|a, b| (&a.account, &a.id).cmp(&(&b.account, &b.id)));
    let mut workers: BTreeMap<String, WorkerLine> = BTreeMap::new();
    for task in &tasks {
        if let Some(instance) = &task.instance_id {
            let line = workers.entry(instance.clone()).or_default();
            line.tasks += 1;
            line.busy_ms += task.duration_ms.unwrap_or(0);
        }
    }
    let lines: Vec<ReportLine> = tasks.into_iter().map(report_line).collect();
    let wall_ms = run
        .finished_at
        .map(|end| (end - run.started_at).num_milliseconds().max(0));
    Ok(Json(json!({
        "run": run,
        "wall_ms": wall_ms,
        "workers": workers,
        "tasks": lines,
    })))
}

fn report_line(task: Task) -> ReportLine {
    ReportLine {
        task_id: task.id,
        account: task.account,
        status: task.status,
        instance_id: task.instance_id,
        attempts: task.attempts,
        failed_attempts: task.failed_attempts,
        interruptions: task.interruptions,
        duration_ms: task.duration_ms,
        summary: task.summary,
        error: task.last_error,
    }
}

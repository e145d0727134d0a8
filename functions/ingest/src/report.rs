//! Runs: start one, list them, read one with its progress, and the morning
//! report, page by page, as JSON or CSV.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use nightshift_core::cost::{InstanceCost, PRICES, RunCost, run_cost};
use nightshift_core::ports::Cursor;
use nightshift_core::{AttemptRecord, Progress, Run, RunState, Task, TaskStatus};
use serde::Serialize;
use serde_json::{Value, json};

use crate::Api;
use crate::error::ApiError;

/// Runs a page of `GET /runs` lists, by default and at most.
const RUNS_PAGE: (usize, usize) = (20, 100);
/// Tasks a page of the report holds, by default and at most: a full page
/// of long summaries and errors stays well under API Gateway's and
/// Lambda's 6 MB.
const REPORT_PAGE: (usize, usize) = (1000, 1000);

/// A run as the API shows it: its record and its progress now.
#[derive(Debug, Serialize)]
pub struct RunView {
    #[serde(flatten)]
    run: Run,
    progress: Progress,
}

impl RunView {
    fn of(run: Run, now: DateTime<Utc>) -> Self {
        let progress = run.progress(now);
        Self { run, progress }
    }
}

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
    if run.state == RunState::Cancelled {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "run_winding_down",
            format!(
                "run {} was cancelled and is winding down; a new one may start in a minute",
                run.id
            ),
        ));
    }
    let dispatch = wake_dispatcher(&api, &run.id).await;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        Json(json!({ "run": RunView::of(run, now), "created": created, "dispatch": dispatch })),
    ))
}

/// Wakes the dispatcher for `run_id`. Its schedule would reach the run
/// anyway; waking it only makes it sooner, so a failure is logged and
/// said (`scheduled`), not returned.
async fn wake_dispatcher(api: &Api, run_id: &str) -> &'static str {
    match api.trigger.dispatch_soon(run_id).await {
        Ok(()) => "requested",
        Err(error) => {
            tracing::warn!(run_id, error = %error, "could not wake the dispatcher; the schedule will");
            "scheduled"
        }
    }
}

/// `POST /runs/{id}/cancel`: the run ends CANCELLED; the dispatcher then
/// ends its pending and queued tasks CANCELLED and terminates its
/// instances. Idempotent: **202** when this request cancelled it, **200**
/// when it already was; **409** for a run that finished.
pub async fn cancel_run(
    State(api): State<Arc<Api>>,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let now = Utc::now();
    let cancelled = api
        .runs
        .cancel_run(&id, now)
        .await
        .map_err(ApiError::from_store)?;
    let run = find_run(&api, &id).await?;
    if run.state == RunState::Finished {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "run_finished",
            format!("run {id} finished; there is nothing to cancel"),
        ));
    }
    let dispatch = wake_dispatcher(&api, &run.id).await;
    let status = if cancelled {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        Json(json!({ "run": RunView::of(run, now), "cancelled": cancelled, "dispatch": dispatch })),
    ))
}

/// `GET /runs`: every run, newest first, a page at a time.
pub async fn list_runs(
    State(api): State<Arc<Api>>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let limit = limit(&query, RUNS_PAGE)?;
    let after = cursor(&query, RUNS_CURSOR, None)?;
    let page = api
        .runs
        .runs_page(limit, after.as_ref())
        .await
        .map_err(ApiError::from_store)?;
    let now = Utc::now();
    let runs: Vec<RunView> = page
        .items
        .into_iter()
        .map(|run| RunView::of(run, now))
        .collect();
    Ok(Json(
        json!({ "runs": runs, "next_cursor": page.next.map(|c| encode(&c)) }),
    ))
}

pub async fn show_run(
    State(api): State<Arc<Api>>,
    Path(id): Path<String>,
) -> Result<Json<RunView>, ApiError> {
    let run = find_run(&api, &id).await?;
    Ok(Json(RunView::of(run, Utc::now())))
}

async fn find_run(api: &Api, id: &str) -> Result<Run, ApiError> {
    api.runs
        .run(id)
        .await
        .map_err(ApiError::from_store)?
        .ok_or_else(|| ApiError::not_found("run", id))
}

/// A line of the report: one task.
#[derive(Debug, Serialize)]
struct ReportLine {
    task_id: String,
    account: String,
    kernel: String,
    status: TaskStatus,
    instance_id: Option<String>,
    attempts: u32,
    failed_attempts: u32,
    interruptions: u32,
    started_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
    duration_ms: Option<u64>,
    summary: Option<String>,
    error: Option<String>,
    attempt_log: Vec<AttemptRecord>,
}

impl From<Task> for ReportLine {
    fn from(task: Task) -> Self {
        Self {
            task_id: task.id,
            account: task.account,
            kernel: task.kernel,
            status: task.status,
            instance_id: task.instance_id,
            attempts: task.attempts,
            failed_attempts: task.failed_attempts,
            interruptions: task.interruptions,
            started_at: task.started_at,
            finished_at: task.finished_at,
            duration_ms: task.duration_ms,
            summary: task.summary,
            error: task.last_error,
            attempt_log: task.attempt_log,
        }
    }
}

/// A line of the report's CSV: the task columns, flat.
#[derive(Debug, Serialize)]
struct CsvLine<'a> {
    task_id: &'a str,
    account: std::borrow::Cow<'a, str>,
    kernel: &'a str,
    status: &'a str,
    instance_id: &'a str,
    attempts: u32,
    failed_attempts: u32,
    interruptions: u32,
    started_at: String,
    finished_at: String,
    duration_ms: Option<u64>,
    summary: std::borrow::Cow<'a, str>,
    error: std::borrow::Cow<'a, str>,
}

/// A cell a spreadsheet would take for a formula (`=`, `+`, `-`, `@`, or a
/// tab or return first) starts with `'`, so an account named
/// `=HYPERLINK(...)` stays text.
fn cell(text: &str) -> std::borrow::Cow<'_, str> {
    if text.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        std::borrow::Cow::Owned(format!("'{text}"))
    } else {
        std::borrow::Cow::Borrowed(text)
    }
}

impl<'a> From<&'a ReportLine> for CsvLine<'a> {
    fn from(line: &'a ReportLine) -> Self {
        let time = |at: Option<DateTime<Utc>>| at.map(nightshift_core::model::timestamp);
        Self {
            task_id: &line.task_id,
            account: cell(&line.account),
            kernel: &line.kernel,
            status: line.status.as_str(),
            instance_id: line.instance_id.as_deref().unwrap_or_default(),
            attempts: line.attempts,
            failed_attempts: line.failed_attempts,
            interruptions: line.interruptions,
            started_at: time(line.started_at).unwrap_or_default(),
            finished_at: time(line.finished_at).unwrap_or_default(),
            duration_ms: line.duration_ms,
            summary: cell(line.summary.as_deref().unwrap_or_default()),
            error: cell(line.error.as_deref().unwrap_or_default()),
        }
    }
}

/// What each instance did and cost.
#[derive(Debug, Serialize)]
struct InstanceLine {
    #[serde(flatten)]
    cost: InstanceCost,
    /// Tasks it ended (done or failed) and the time its kernels took.
    tasks: u64,
    busy_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Json,
    Csv,
}

/// `GET /runs/{id}/report`: a page of the run's tasks, by task id, as JSON
/// (the first page also carries the instances and the cost) or as CSV
/// (`?format=csv` or `Accept: text/csv`; the next page's cursor in the
/// `Nightshift-Next-Cursor` header and a `Link` to it).
pub async fn run_report(
    State(api): State<Arc<Api>>,
    Path(id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let format = format(&query, &headers)?;
    let limit = limit(&query, REPORT_PAGE)?;
    let after = cursor(&query, REPORT_CURSOR, Some(&id))?;
    let run = find_run(&api, &id).await?;
    let page = api
        .reader
        .run_tasks_page(&id, limit, after.as_ref())
        .await
        .map_err(ApiError::from_store)?;
    let lines: Vec<ReportLine> = page.items.into_iter().map(ReportLine::from).collect();
    let next = page.next.map(|c| encode(&c));
    if format == Format::Csv {
        return csv_page(&id, &lines, next.as_deref(), after.is_none());
    }
    let now = Utc::now();
    let mut body = json!({
        "run": RunView::of(run.clone(), now),
        "tasks": lines,
        "next_cursor": next,
    });
    if after.is_none() {
        let (instances, cost) = instances_and_cost(&run, now);
        body["instances"] = json!(instances);
        body["cost"] = json!(cost);
    }
    Ok(Json(body).into_response())
}

/// Each instance's work and cost, and the run's cost without the
/// instances (they are the lines beside it).
fn instances_and_cost(run: &Run, now: DateTime<Utc>) -> (Vec<InstanceLine>, RunCost) {
    let mut cost = run_cost(run, run.done + run.failed, now, &PRICES);
    let instances = std::mem::take(&mut cost.instances)
        .into_iter()
        .zip(&run.instances)
        .map(|(cost, launched)| InstanceLine {
            cost,
            tasks: launched.tasks,
            busy_ms: launched.busy_ms,
        })
        .collect();
    (instances, cost)
}

fn csv_page(
    run_id: &str,
    lines: &[ReportLine],
    next: Option<&str>,
    first: bool,
) -> Result<Response, ApiError> {
    let mut writer = csv::WriterBuilder::new()
        .has_headers(first)
        .from_writer(Vec::new());
    let internal = |e: &dyn std::fmt::Display| {
        tracing::error!(error = %e, "could not write the CSV report");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error",
        )
    };
    if lines.is_empty() && first {
        writer.write_record(CSV_COLUMNS).map_err(|e| internal(&e))?;
    }
    for line in lines {
        writer
            .serialize(CsvLine::from(line))
            .map_err(|e| internal(&e))?;
    }
    let body = writer.into_inner().map_err(|e| internal(&e))?;
    let mut response = ([(header::CONTENT_TYPE, "text/csv; charset=utf-8")], body).into_response();
    if let Some(next) = next {
        let headers = response.headers_mut();
        if let Ok(value) = HeaderValue::from_str(next) {
            headers.insert("nightshift-next-cursor", value);
        }
        let link = format!("</runs/{run_id}/report?format=csv&cursor={next}>; rel=\"next\"");
        if let Ok(value) = HeaderValue::from_str(&link) {
            headers.insert(header::LINK, value);
        }
    }
    Ok(response)
}

/// The CSV's header, for a report with no task.
const CSV_COLUMNS: [&str; 13] = [
    "task_id",
    "account",
    "kernel",
    "status",
    "instance_id",
    "attempts",
    "failed_attempts",
    "interruptions",
    "started_at",
    "finished_at",
    "duration_ms",
    "summary",
    "error",
];

fn format(query: &HashMap<String, String>, headers: &HeaderMap) -> Result<Format, ApiError> {
    match query.get("format").map(String::as_str) {
        Some("json") => return Ok(Format::Json),
        Some("csv") => return Ok(Format::Csv),
        Some(other) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_query",
                format!("format must be json or csv, not {other:?}"),
            )
            .at("format"));
        }
        None => {}
    }
    let accepts_csv = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|accept| {
            accept
                .split(',')
                .any(|kind| kind.trim().starts_with("text/csv"))
        });
    Ok(if accepts_csv {
        Format::Csv
    } else {
        Format::Json
    })
}

/// `?limit=`: a whole number from 1 to the most a page holds.
fn limit(
    query: &HashMap<String, String>,
    (default, most): (usize, usize),
) -> Result<usize, ApiError> {
    let Some(text) = query.get("limit") else {
        return Ok(default);
    };
    text.parse::<usize>()
        .ok()
        .filter(|n| (1..=most).contains(n))
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_query",
                format!("limit must be a whole number from 1 to {most}"),
            )
            .at("limit")
        })
}

/// The keys of a cursor of the runs listing, and of a run's report: what
/// the table's index hands back as its last key.
const RUNS_CURSOR: [&str; 4] = ["pk", "run_list", "sk", "started_at"];
const REPORT_CURSOR: [&str; 4] = ["pk", "run_id", "sk", "task_id"];

/// `?cursor=`: a `next_cursor` this API gave for this listing (its keys,
/// and the run's id for a report), so that the table never sees a start
/// key it would refuse.
fn cursor(
    query: &HashMap<String, String>,
    listing: [&str; 4],
    run_id: Option<&str>,
) -> Result<Option<Cursor>, ApiError> {
    let Some(text) = query.get("cursor") else {
        return Ok(None);
    };
    let invalid = || {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            "cursor is not one this API gave for this listing",
        )
        .at("cursor")
    };
    let bytes = URL_SAFE_NO_PAD.decode(text).map_err(|_| invalid())?;
    let keys: std::collections::BTreeMap<String, String> =
        serde_json::from_slice(&bytes).map_err(|_| invalid())?;
    let names: Vec<&str> = keys.keys().map(String::as_str).collect();
    if names != listing
        || keys.values().any(|v| v.is_empty() || v.len() > 1024)
        || run_id.is_some_and(|id| keys.get("run_id").map(String::as_str) != Some(id))
    {
        return Err(invalid());
    }
    let decoded = String::from_utf8(bytes).map_err(|_| invalid())?;
    Ok(Some(Cursor(decoded)))
}

/// A cursor as the API hands it out: opaque and safe in a URL.
fn encode(cursor: &Cursor) -> String {
    URL_SAFE_NO_PAD.encode(cursor.0.as_bytes())
}

//! `POST /tasks` and `GET /tasks/{id}`.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use chrono::Utc;
use std::collections::HashSet;

use nightshift_core::limits::ClaimCheck;
use nightshift_core::model::Idempotency;
use nightshift_core::ports::InsertOutcome;
use nightshift_core::rules::staged_abandoned;
use nightshift_core::{Blob, NewTask, Task, TaskStatus};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::Api;
use crate::error::ApiError;
use crate::validate::{TaskRequest, parse_tasks};

/// Namespace of the ids derived from (account, idempotency key).
const TASK_ID_NAMESPACE: Uuid = Uuid::from_u128(0x6e69_6768_7473_6869_6674_2d74_6173_6b73);

pub async fn create(
    State(api): State<Arc<Api>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let body = body.map_err(|rejection| {
        ApiError::new(rejection.status(), "body_rejected", rejection.body_text()).at("")
    })?;
    let requests = parse_tasks(&body, &api.limits)?;
    let now = Utc::now();
    let tasks: Vec<NewTask> = requests.iter().map(|r| new_task(r, now)).collect();
    let ids: Vec<String> = tasks.iter().map(|t| t.id.clone()).collect();
    // Tasks already written by an earlier try of this request are kept as
    // they are; a key reused for other work refuses the whole request.
    let retried = earlier_tries(&api, &tasks).await?;
    let fresh: Vec<(NewTask, &TaskRequest)> = tasks
        .into_iter()
        .zip(&requests)
        .filter(|(task, _)| !retried.contains(&task.id))
        .collect();
    let created = write_whole(&api, fresh).await?;
    tracing::info!(tasks = ids.len(), created, "tasks accepted");
    // A request whose every task already existed is a retry: 200, not 201.
    let status = if created == 0 {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((status, Json(json!({ "task_ids": ids, "created": created }))))
}

fn new_task(request: &TaskRequest, now: chrono::DateTime<Utc>) -> NewTask {
    let idempotency = request.idempotency_key.as_ref().map(|key| Idempotency {
        key: key.clone(),
        request_digest: digest(request),
    });
    let id = match &request.idempotency_key {
        Some(key) => Uuid::new_v5(
            &TASK_ID_NAMESPACE,
            format!("{}\0{key}", request.account).as_bytes(),
        ),
        None => Uuid::new_v4(),
    };
    NewTask {
        id: id.to_string(),
        account: request.account.clone(),
        kernel: request.kernel.clone(),
        payload: Blob::Inline(request.payload.clone()),
        created_at: now,
        idempotency,
    }
}

/// A digest of what the task asks for, to tell a retry from a key reused
/// for different work.
fn digest(request: &TaskRequest) -> String {
    let text = format!(
        "{}\0{}",
        json!([request.account, request.kernel]),
        request.payload
    );
    Uuid::new_v5(&TASK_ID_NAMESPACE, text.as_bytes()).to_string()
}

/// The ids of keyed tasks that exist from an earlier try of the same
/// request. Refuses the whole request, before writing anything, if a key
/// was used for different work (409) or is being written by another
/// request right now (503: retry).
async fn earlier_tries(api: &Api, tasks: &[NewTask]) -> Result<HashSet<String>, ApiError> {
    let keyed: Vec<String> = tasks
        .iter()
        .filter(|t| t.idempotency.is_some())
        .map(|t| t.id.clone())
        .collect();
    if keyed.is_empty() {
        return Ok(HashSet::new());
    }
    let existing = api
        .reader
        .tasks(&keyed)
        .await
        .map_err(ApiError::from_store)?;
    let mut retried = HashSet::new();
    for found in existing {
        let Some(i) = tasks.iter().position(|t| t.id == found.id) else {
            continue;
        };
        if !same_request(&tasks[i], found.request_digest.as_deref()) {
            return Err(conflict(i, tasks.len()));
        }
        if found.status == TaskStatus::Staged {
            if staged_abandoned(found.created_at, Utc::now()) {
                // Its request died: this one takes the task over.
                continue;
            }
            return Err(in_progress(i, tasks.len()));
        }
        retried.insert(found.id);
    }
    Ok(retried)
}

fn same_request(task: &NewTask, existing_digest: Option<&str>) -> bool {
    task.idempotency.as_ref().map(|i| i.request_digest.as_str()) == existing_digest
}

fn key_field(index: usize, batch: usize) -> String {
    if batch == 1 && index == 0 {
        "idempotency_key".to_owned()
    } else {
        format!("tasks[{index}].idempotency_key")
    }
}

fn conflict(index: usize, batch: usize) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "idempotency_conflict",
        "this idempotency key was already used for a different task",
    )
    .at(key_field(index, batch))
}

fn in_progress(index: usize, batch: usize) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        "another request with this idempotency key is being written; retry",
    )
    .at(key_field(index, batch))
}

/// Writes the tasks as one: payloads over the inline limit to the bucket,
/// the tasks STAGED, then committed. If anything fails or a concurrent
/// request claims a key first, everything this request wrote is removed
/// and the error returned. Returns how many tasks were created.
async fn write_whole(api: &Api, fresh: Vec<(NewTask, &TaskRequest)>) -> Result<usize, ApiError> {
    if fresh.is_empty() {
        return Ok(0);
    }
    let request_id = Uuid::new_v4().to_string();
    let mut written = Written::default();
    let outcome = stage_and_commit(api, &request_id, fresh, &mut written).await;
    if outcome.is_err() {
        written.undo(api, &request_id).await;
    }
    outcome
}

/// What a request has written so far, to undo it.
#[derive(Default)]
struct Written {
    payload_keys: Vec<String>,
    task_ids: Vec<String>,
}

impl Written {
    async fn undo(&self, api: &Api, request_id: &str) {
        if let Err(e) = api.writer.abort(request_id, &self.task_ids).await {
            tracing::error!(request_id, error = %e.chain(), "could not remove the tasks of a refused request");
        }
        if let Err(e) = api.blobs.delete_many(&self.payload_keys).await {
            tracing::error!(request_id, error = %e.chain(), "could not remove the payloads of a refused request");
        }
    }
}

async fn stage_and_commit(
    api: &Api,
    request_id: &str,
    fresh: Vec<(NewTask, &TaskRequest)>,
    written: &mut Written,
) -> Result<usize, ApiError> {
    let batch = fresh.len();
    let mut tasks = Vec::with_capacity(batch);
    for (mut task, request) in fresh {
        if !api.claim_check.payload_inline(request.payload.get().len()) {
            let key = ClaimCheck::payload_key(&task.id);
            written.payload_keys.push(key.clone());
            api.blobs
                .put(&key, request.payload.get().as_bytes().to_vec())
                .await
                .map_err(ApiError::from_store)?;
            task.payload = Blob::Stored { key };
        }
        tasks.push(task);
    }
    written.task_ids = tasks.iter().map(|t| t.id.clone()).collect();
    let outcomes = api
        .writer
        .stage(request_id, &tasks)
        .await
        .map_err(ApiError::from_store)?;
    let mut inserted = Vec::with_capacity(tasks.len());
    for (index, (task, outcome)) in tasks.into_iter().zip(outcomes).enumerate() {
        match outcome {
            InsertOutcome::Inserted => inserted.push(task),
            // Another request wrote this key between the check and now.
            InsertOutcome::Exists { request_digest, .. }
                if !same_request(&task, request_digest.as_deref()) =>
            {
                return Err(conflict(index, batch));
            }
            InsertOutcome::Exists {
                staged_by: Some(_), ..
            } => {
                return Err(in_progress(index, batch));
            }
            InsertOutcome::Exists { .. } => {
                // The same work, written meanwhile by a retry: not ours to undo.
                written.task_ids.retain(|id| *id != task.id);
            }
        }
    }
    api.writer
        .commit(request_id, &inserted)
        .await
        .map_err(ApiError::from_store)?;
    Ok(inserted.len())
}

pub async fn show(
    State(api): State<Arc<Api>>,
    Path(id): Path<String>,
) -> Result<Json<Task>, ApiError> {
    api.reader
        .task(&id)
        .await
        .map_err(ApiError::from_store)?
        .map(Json)
        .ok_or_else(|| ApiError::not_found("task", &id))
}

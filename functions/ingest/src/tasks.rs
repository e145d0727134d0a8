//! `POST /tasks` and `GET /tasks/{id}`.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use chrono::Utc;
use nightshift_core::model::Idempotency;
use nightshift_core::ports::InsertOutcome;
use nightshift_core::{Blob, NewTask, Task};
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
    let mut tasks: Vec<NewTask> = requests.iter().map(|r| new_task(r, now)).collect();
    reject_conflicting_keys(&api, &tasks).await?;

    let stored_keys = store_large_payloads(&api, &requests, &mut tasks).await?;
    let written = write_tasks(&api, &tasks).await;
    let created = match written {
        Ok(created) => created,
        Err(error) => {
            remove_payloads(&api, &stored_keys).await;
            return Err(error);
        }
    };
    let ids: Vec<&str> = tasks.iter().map(|t| t.id.as_str()).collect();
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
    let text = json!([request.account, request.kernel, request.payload]).to_string();
    Uuid::new_v5(&TASK_ID_NAMESPACE, text.as_bytes()).to_string()
}

/// Refuses the whole request before writing anything if a key was already
/// used for different work.
async fn reject_conflicting_keys(api: &Api, tasks: &[NewTask]) -> Result<(), ApiError> {
    let keyed: Vec<String> = tasks
        .iter()
        .filter(|t| t.idempotency.is_some())
        .map(|t| t.id.clone())
        .collect();
    if keyed.is_empty() {
        return Ok(());
    }
    let existing = api
        .reader
        .tasks(&keyed)
        .await
        .map_err(ApiError::from_store)?;
    for found in existing {
        if let Some(i) = tasks.iter().position(|t| t.id == found.id)
            && !same_request(&tasks[i], found.request_digest.as_deref())
        {
            return Err(conflict(i, tasks.len()));
        }
    }
    Ok(())
}

fn same_request(task: &NewTask, existing_digest: Option<&str>) -> bool {
    task.idempotency.as_ref().map(|i| i.request_digest.as_str()) == existing_digest
}

fn conflict(index: usize, batch: usize) -> ApiError {
    let field = if batch == 1 && index == 0 {
        "idempotency_key".to_owned()
    } else {
        format!("tasks[{index}].idempotency_key")
    };
    ApiError::new(
        StatusCode::CONFLICT,
        "idempotency_conflict",
        "this idempotency key was already used for a different task",
    )
    .at(field)
}

/// Moves payloads over the inline limit to the bucket; returns their keys.
async fn store_large_payloads(
    api: &Api,
    requests: &[TaskRequest],
    tasks: &mut [NewTask],
) -> Result<Vec<String>, ApiError> {
    let mut keys: Vec<String> = Vec::new();
    for (request, task) in requests.iter().zip(tasks.iter_mut()) {
        if request.payload_bytes <= api.inline_limit {
            continue;
        }
        let key = format!("payloads/{}.json", task.id);
        let bytes = request.payload.to_string().into_bytes();
        if let Err(e) = api.blobs.put(&key, bytes).await {
            remove_payloads(api, &keys).await;
            return Err(ApiError::from_store(e));
        }
        task.payload = Blob::Stored { key: key.clone() };
        keys.push(key);
    }
    Ok(keys)
}

/// Removes the payloads of tasks that were not written (the bucket's
/// lifecycle rule removes any this misses).
async fn remove_payloads(api: &Api, keys: &[String]) {
    for key in keys {
        if let Err(e) = api.blobs.delete(key).await {
            tracing::warn!(key, error = %e, "could not remove the payload of an unwritten task");
        }
    }
}

/// Writes the tasks; returns how many are new. Tasks with a key go first,
/// in one transaction when none exists yet, so a conflict found only now
/// (a concurrent request) still leaves nothing of this one written.
async fn write_tasks(api: &Api, tasks: &[NewTask]) -> Result<usize, ApiError> {
    type Indexed<'a> = Vec<(usize, &'a NewTask)>;
    let (keyed, plain): (Indexed, Indexed) = tasks
        .iter()
        .enumerate()
        .partition(|(_, t)| t.idempotency.is_some());
    let keyed_tasks: Vec<NewTask> = keyed.iter().map(|(_, t)| (*t).clone()).collect();
    let outcomes = api
        .writer
        .insert_tasks_once(&keyed_tasks)
        .await
        .map_err(ApiError::from_store)?;
    let mut created = 0;
    for ((index, task), outcome) in keyed.iter().zip(outcomes) {
        match outcome {
            InsertOutcome::Inserted => created += 1,
            InsertOutcome::Exists { request_digest }
                if !same_request(task, request_digest.as_deref()) =>
            {
                return Err(conflict(*index, tasks.len()));
            }
            InsertOutcome::Exists { .. } => {}
        }
    }
    let plain: Vec<NewTask> = plain.into_iter().map(|(_, t)| t.clone()).collect();
    api.writer
        .insert_tasks(&plain)
        .await
        .map_err(ApiError::from_store)?;
    Ok(created + plain.len())
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

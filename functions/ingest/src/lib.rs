//! The HTTP API, as one `axum::Router`: served by `lambda_http` behind API
//! Gateway, and by `axum::serve` on the local stack.
//!
//! | route | does |
//! |---|---|
//! | `POST /tasks` | accepts one task or a batch of up to 1,000; 201 with their ids |
//! | `GET /tasks/{id}` | a task's status, attempts, worker and result |
//! | `POST /runs` | starts a run now (or returns the open one) and wakes the dispatcher |
//! | `GET /runs` | every run, newest first, a page at a time |
//! | `GET /runs/{id}` | a run's state, counters, instances and progress |
//! | `GET /runs/{id}/report` | the run's tasks a page at a time (account, worker, attempts, duration, result), as JSON or CSV; the first JSON page adds each instance and the cost |

mod error;
mod report;
mod tasks;
mod trigger;
mod validate;

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::Method;
use axum::routing::{MethodRouter, get, post};
use nightshift_core::config;
use nightshift_core::limits::ClaimCheck;
use nightshift_core::night::NightWindow;
use nightshift_core::ports::{BlobStore, RunStore, TaskReader, TaskWriter};

pub use error::ApiError;
pub use trigger::{DispatchTrigger, LambdaTrigger};
pub use validate::Limits;

/// Everything the handlers use; each port is shared, never rebuilt.
#[derive(Clone)]
pub struct Api {
    pub writer: Arc<dyn TaskWriter>,
    pub reader: Arc<dyn TaskReader>,
    pub runs: Arc<dyn RunStore>,
    pub blobs: Arc<dyn BlobStore>,
    pub trigger: Arc<dyn DispatchTrigger>,
    pub limits: Limits,
    /// Which payloads go to the bucket, and under which key.
    pub claim_check: ClaimCheck,
    /// When a run opened now must be done by.
    pub night: NightWindow,
}

/// The API's configuration: what it reaches and what it accepts.
#[derive(Debug, Clone)]
pub struct Config {
    pub table: String,
    pub bucket: String,
    pub pending_shards: u32,
    /// The function woken when a run starts.
    pub dispatcher_function: String,
    pub limits: Limits,
    pub claim_check: ClaimCheck,
    pub night: NightWindow,
}

impl Config {
    pub fn from_env(env: &dyn config::Env) -> Result<Self, config::ConfigError> {
        let max_payload_bytes =
            config::parsed_or(env, "NIGHTSHIFT_MAX_PAYLOAD_BYTES", 6 * 1024 * 1024)?;
        Ok(Self {
            table: config::required(env, "NIGHTSHIFT_TABLE")?,
            bucket: config::required(env, "NIGHTSHIFT_BUCKET")?,
            pending_shards: config::parsed_or(env, "NIGHTSHIFT_PENDING_SHARDS", 8)?,
            dispatcher_function: config::required(env, "NIGHTSHIFT_DISPATCHER_FUNCTION")?,
            night: config::night_window(env)?,
            limits: Limits::new(
                max_payload_bytes,
                &config::required(env, "NIGHTSHIFT_KERNELS")?,
            )
            .with_programs(&config::optional(env, "NIGHTSHIFT_PROGRAM_KERNELS")),
            claim_check: ClaimCheck::new(config::parsed_or(
                env,
                "NIGHTSHIFT_INLINE_LIMIT_BYTES",
                200 * 1024,
            )?),
        })
    }
}

/// The request body limit: a full batch of the largest payloads, with room
/// for the envelope; anything larger is refused before it is read.
fn body_limit(limits: &Limits) -> usize {
    limits
        .max_payload_bytes
        .saturating_add(1 << 20)
        .max(8 << 20)
}

/// Every route the API serves: a method, a path and its handler. The
/// router is built from this list, and a test holds `openapi.yaml` to it.
pub fn endpoints() -> Vec<(Method, &'static str, MethodRouter<Arc<Api>>)> {
    vec![
        (Method::POST, "/tasks", post(tasks::create)),
        (Method::GET, "/tasks/{id}", get(tasks::show)),
        (Method::POST, "/runs", post(report::start_run)),
        (Method::GET, "/runs", get(report::list_runs)),
        (Method::GET, "/runs/{id}", get(report::show_run)),
        (Method::GET, "/runs/{id}/report", get(report::run_report)),
        (Method::POST, "/runs/{id}/cancel", post(report::cancel_run)),
    ]
}

pub fn router(api: Api) -> Router {
    let limit = body_limit(&api.limits);
    endpoints()
        .into_iter()
        .fold(Router::new(), |router, (_, path, handler)| {
            router.route(path, handler)
        })
        .fallback(|| async {
            ApiError::new(
                axum::http::StatusCode::NOT_FOUND,
                "no_route",
                "no such route",
            )
        })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                axum::http::StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this route does not take this method",
            )
        })
        .layer(DefaultBodyLimit::max(limit))
        .with_state(Arc::new(api))
}

#[cfg(test)]
mod tests;

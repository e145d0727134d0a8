//! `nightshift dashboard`: the operator's web page, served on this machine.
//! The page is in the binary (no CDN: it works offline); its calls under
//! `/api/` go to the nightshift API signed with the operator's credentials,
//! so the API itself never needs to be public.
//!
//! Only this machine's pages may call it: requests must name a loopback
//! host (no DNS rebinding) and, under `/api/`, carry the header
//! [`CALLER_HEADER`], which a page of another origin cannot set without a
//! CORS preflight this server never grants.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::CliError;
use crate::api::Api;

const INDEX_HTML: &str = include_str!("index.html");
const APP_JS: &str = include_str!("app.js");
const APP_CSS: &str = include_str!("app.css");

/// The header the page sends with every API call.
pub const CALLER_HEADER: &str = "x-nightshift-dashboard";
/// The most accounts one request creates.
const MAX_ACCOUNTS: u64 = 10_000;
/// The largest test payload: the kernel's most positions come to about
/// 500 KB.
const MAX_PAYLOAD_BYTES: u64 = 512 * 1024;
/// A request of tasks stays under API Gateway's 10 MB and Lambda's 6 MB.
const REQUEST_BYTES: usize = 4 * 1024 * 1024;
/// The API's most tasks a request.
const REQUEST_TASKS: usize = 1000;

struct Dashboard {
    api: Api,
}

/// Serves the page on `listener` until the process ends.
pub async fn serve(api: Api, listener: tokio::net::TcpListener) -> Result<(), CliError> {
    let address = listener
        .local_addr()
        .map_err(|e| CliError::Local(format!("cannot read the dashboard's address: {e}")))?;
    println!("dashboard at http://{address}/ (API {})", api.base());
    axum::serve(listener, router(api))
        .await
        .map_err(|e| CliError::Local(format!("the dashboard stopped: {e}")))
}

fn router(api: Api) -> Router {
    Router::new()
        .route("/", get(|| asset("text/html; charset=utf-8", INDEX_HTML)))
        .route(
            "/app.js",
            get(|| asset("text/javascript; charset=utf-8", APP_JS)),
        )
        .route(
            "/app.css",
            get(|| asset("text/css; charset=utf-8", APP_CSS)),
        )
        .route("/api/info", get(info))
        .route("/api/accounts", post(create_accounts))
        .route("/api/{*path}", any(forward))
        .layer(middleware::from_fn(only_this_machine))
        .with_state(Arc::new(Dashboard { api }))
}

async fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response()
}

fn error(status: StatusCode, code: &str, message: &str, field: Option<&str>) -> Response {
    (
        status,
        axum::Json(json!({ "error": { "code": code, "message": message, "field": field } })),
    )
        .into_response()
}

async fn only_this_machine(request: Request, next: Next) -> Response {
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default();
    let name = host.rsplit_once(':').map_or(host, |(name, _)| name);
    if !matches!(name, "127.0.0.1" | "localhost" | "[::1]") {
        return error(
            StatusCode::FORBIDDEN,
            "forbidden",
            "the dashboard answers only at a loopback address",
            None,
        );
    }
    if request.uri().path().starts_with("/api/") && !request.headers().contains_key(CALLER_HEADER) {
        return error(
            StatusCode::FORBIDDEN,
            "forbidden",
            "API calls come from the dashboard's own page",
            None,
        );
    }
    next.run(request).await
}

async fn info(State(dashboard): State<Arc<Dashboard>>) -> Response {
    axum::Json(json!({
        "api": dashboard.api.base(),
        "signed": dashboard.api.is_signed(),
        "kernels": nightshift_kernels::builtin_names(),
    }))
    .into_response()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewAccounts {
    count: u64,
    kernel: String,
    #[serde(default)]
    payload_bytes: u64,
}

/// Test accounts: `count` tasks of `kernel`, each its own account. A
/// portfolio holds positions enough for `payload_bytes`; a `sleep` task
/// sleeps a second.
async fn create_accounts(State(dashboard): State<Arc<Dashboard>>, body: Bytes) -> Response {
    let request: NewAccounts = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_body",
                &format!("expected {{count, kernel, payload_bytes}}: {e}"),
                None,
            );
        }
    };
    if !(1..=MAX_ACCOUNTS).contains(&request.count) {
        let message = format!("count must be from 1 to {MAX_ACCOUNTS}");
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_count",
            &message,
            Some("count"),
        );
    }
    if !nightshift_kernels::builtin_names().contains(&request.kernel) {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "unknown_kernel",
            &format!("no kernel named {:?}", request.kernel),
            Some("kernel"),
        );
    }
    if request.payload_bytes > MAX_PAYLOAD_BYTES {
        let message = format!("payload_bytes must be at most {MAX_PAYLOAD_BYTES}");
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_payload_bytes",
            &message,
            Some("payload_bytes"),
        );
    }
    let batch = chrono::Utc::now().format("%H%M%S").to_string();
    let tasks: Vec<Value> = (0..request.count)
        .map(|i| test_account(&request, &format!("test-{batch}-{i:04}"), i))
        .collect();
    let mut task_ids = Vec::new();
    for chunk in requests_of(tasks) {
        match dashboard
            .api
            .call(Method::POST, "/tasks", Some(&json!({ "tasks": chunk })))
            .await
        {
            Ok((_, created)) => task_ids.extend(
                created["task_ids"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .cloned(),
            ),
            Err(e) => return api_error(e),
        }
    }
    (
        StatusCode::CREATED,
        axum::Json(json!({ "submitted": task_ids.len(), "task_ids": task_ids })),
    )
        .into_response()
}

fn test_account(request: &NewAccounts, account: &str, seed: u64) -> Value {
    let payload = if request.kernel == nightshift_kernels::portfolio::NAME {
        let bytes = usize::try_from(request.payload_bytes).unwrap_or(usize::MAX);
        nightshift_kernels::portfolio::sized_payload(account, seed, bytes)
    } else {
        json!({ "seconds": 1.0 })
    };
    json!({ "account": account, "kernel": request.kernel, "payload": payload })
}

/// Tasks in requests the API takes: by count and by bytes.
fn requests_of(tasks: Vec<Value>) -> Vec<Vec<Value>> {
    nightshift_core::limits::batches(tasks, REQUEST_TASKS, REQUEST_BYTES, |task| {
        task.to_string().len()
    })
}

/// Any other `/api/...` call goes to the API as it is, signed.
async fn forward(
    State(dashboard): State<Arc<Dashboard>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .trim_start_matches("/api");
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|a| a.to_str().ok())
        .unwrap_or("application/json");
    let body = String::from_utf8_lossy(&body).into_owned();
    match dashboard.api.send(method, path, body, accept).await {
        Ok(answer) => {
            let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::OK);
            let content_type = answer
                .headers
                .get(header::CONTENT_TYPE)
                .and_then(|c| c.to_str().ok())
                .unwrap_or("application/json")
                .to_owned();
            let mut response =
                (status, [(header::CONTENT_TYPE, content_type)], answer.text).into_response();
            if let Some(cursor) = answer.headers.get("nightshift-next-cursor") {
                response
                    .headers_mut()
                    .insert("nightshift-next-cursor", cursor.clone());
            }
            response
        }
        Err(e) => api_error(e),
    }
}

/// The API's own error answer, passed on; or a 502 when it gave none.
fn api_error(e: CliError) -> Response {
    match e {
        CliError::Api { status, body } => (
            StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
            [(header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response(),
        other => error(
            StatusCode::BAD_GATEWAY,
            "api_unreachable",
            &other.to_string(),
            None,
        ),
    }
}

/// Where the dashboard listens: `--port` on the loopback address.
pub fn address(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_are_sent_in_requests_bounded_by_count_and_bytes() {
        let small: Vec<Value> = (0..2500).map(|i| json!({ "n": i })).collect();
        let sizes: Vec<usize> = requests_of(small).iter().map(Vec::len).collect();
        assert_eq!(sizes, [1000, 1000, 500]);
        let big: Vec<Value> = (0..20)
            .map(|_| json!({ "pad": "x".repeat(1024 * 1024) }))
            .collect();
        let requests = requests_of(big);
        assert_eq!(
            requests.len(),
            7,
            "four 1 MiB tasks fit under 4 MiB, not five"
        );
        assert!(
            requests
                .iter()
                .all(|r| r.iter().map(|t| t.to_string().len()).sum::<usize>() <= REQUEST_BYTES)
        );
    }

    #[test]
    fn a_test_portfolio_has_the_size_asked_for() {
        let request = NewAccounts {
            count: 1,
            kernel: nightshift_kernels::portfolio::NAME.into(),
            payload_bytes: 100_000,
        };
        let task = test_account(&request, "test-1", 1);
        assert!(task["payload"].to_string().len() >= 100_000);
        assert_eq!(task["account"], "test-1");
    }
}

//! The router with in-memory ports: GIVEN a store, WHEN a request comes in,
//! THEN the answer and what was written.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use nightshift_core::Blob;
use nightshift_core::fakes::{MemoryBlobs, MemoryStore};
use serde_json::{Value, json};
use tower::ServiceExt;

use super::*;

/// The kernels the workers have, as the template configures them.
const KERNELS: &str = "sleep,portfolio-risk";

#[derive(Default)]
struct RecordingTrigger {
    runs: Mutex<Vec<String>>,
}

#[async_trait]
impl DispatchTrigger for RecordingTrigger {
    async fn dispatch_soon(&self, run_id: &str) -> Result<(), nightshift_core::Error> {
        self.runs.lock().unwrap().push(run_id.to_owned());
        Ok(())
    }
}

struct Fixture {
    store: Arc<MemoryStore>,
    blobs: Arc<MemoryBlobs>,
    trigger: Arc<RecordingTrigger>,
    router: Router,
}

fn fixture() -> Fixture {
    let store = Arc::new(MemoryStore::default());
    let blobs = Arc::new(MemoryBlobs::default());
    let trigger = Arc::new(RecordingTrigger::default());
    let mut limits = Limits::new(4096, KERNELS);
    limits.max_batch = 5;
    let router = router(Api {
        writer: store.clone(),
        reader: store.clone(),
        runs: store.clone(),
        blobs: blobs.clone(),
        trigger: trigger.clone(),
        limits,
        claim_check: nightshift_core::limits::ClaimCheck::new(100),
        night: nightshift_core::night::NightWindow::parse("06:00", "Europe/London").unwrap(),
    });
    Fixture {
        store,
        blobs,
        trigger,
        router,
    }
}

async fn call(router: &Router, method: &str, uri: &str, body: &str) -> (StatusCode, Value) {
    let request = Request::builder()
        .method(method)
        .uri(uri)
        .header("content-type", "application/json")
        .body(Body::from(body.to_owned()))
        .unwrap();
    let response = router.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

#[tokio::test]
async fn a_batch_is_written_and_each_task_can_be_read_back() {
    let f = fixture();
    let body = json!({"tasks": [
        {"account": "a1", "payload": {"seconds": 0.1}},
        {"account": "a2", "payload": {"seconds": 0.2}, "kernel": "sleep"}
    ]});
    let (status, answer) = call(&f.router, "POST", "/tasks", &body.to_string()).await;
    assert_eq!(status, StatusCode::CREATED);
    let ids = answer["task_ids"].as_array().unwrap();
    assert_eq!(ids.len(), 2);
    let (status, task) = call(
        &f.router,
        "GET",
        &format!("/tasks/{}", ids[1].as_str().unwrap()),
        "",
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (task["account"].as_str(), task["status"].as_str()),
        (Some("a2"), Some("PENDING"))
    );
    assert_eq!(f.store.all_tasks().len(), 2);
}

#[tokio::test]
async fn a_payload_over_the_inline_limit_goes_to_the_bucket() {
    let f = fixture();
    let payload = json!({"seconds": 0.1, "padding": "x".repeat(500)});
    let body = json!({"account": "big", "payload": payload});
    let (status, _) = call(&f.router, "POST", "/tasks", &body.to_string()).await;
    assert_eq!(status, StatusCode::CREATED);
    let task = &f.store.all_tasks()[0];
    let Some(Blob::Stored { key }) = &task.payload else {
        panic!("expected a claim check, got {:?}", task.payload)
    };
    assert_eq!(f.blobs.keys(), vec![key.clone()]);
}

#[tokio::test]
async fn an_idempotency_key_makes_a_retry_return_the_same_task() {
    let f = fixture();
    let body = json!({"account": "a", "payload": 1, "idempotency_key": "night-1"}).to_string();
    let (first, one) = call(&f.router, "POST", "/tasks", &body).await;
    let (second, two) = call(&f.router, "POST", "/tasks", &body).await;
    assert_eq!((first, second), (StatusCode::CREATED, StatusCode::OK));
    assert_eq!(one["task_ids"], two["task_ids"]);
    assert_eq!(f.store.all_tasks().len(), 1);

    let reuse = json!({"tasks": [
        {"account": "b", "payload": 1},
        {"account": "a", "payload": 2, "idempotency_key": "night-1"}
    ]});
    let (status, error) = call(&f.router, "POST", "/tasks", &reuse.to_string()).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(error["error"]["field"], "tasks[1].idempotency_key");
    assert_eq!(
        f.store.all_tasks().len(),
        1,
        "nothing of the refused request is written"
    );
}

#[tokio::test]
async fn bad_input_is_refused_with_a_json_error_and_nothing_written() {
    let f = fixture();
    let too_many = json!({"tasks": vec![json!({"account": "a", "payload": 1}); 6]}).to_string();
    let huge = json!({"account": "a", "payload": "x".repeat(5000)}).to_string();
    let cases = [
        (
            "POST",
            "/tasks",
            "not json",
            StatusCode::BAD_REQUEST,
            "malformed_json",
        ),
        (
            "POST",
            "/tasks",
            r#"{"account":"a"}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "missing_field",
        ),
        (
            "POST",
            "/tasks",
            r#"{"account":"a","payload":1,"kernel":"nope"}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "unknown_kernel",
        ),
        (
            "POST",
            "/tasks",
            r#"{"tasks":[]}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "empty_batch",
        ),
        (
            "POST",
            "/tasks",
            too_many.as_str(),
            StatusCode::PAYLOAD_TOO_LARGE,
            "batch_too_large",
        ),
        (
            "POST",
            "/tasks",
            huge.as_str(),
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
        ),
        (
            "GET",
            "/tasks/missing",
            "",
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            "GET",
            "/runs/missing",
            "",
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            "GET",
            "/runs/missing/report",
            "",
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        ("DELETE", "/tasks", "", StatusCode::METHOD_NOT_ALLOWED, ""),
    ];
    for (method, uri, body, status, code) in cases {
        let (got, answer) = call(&f.router, method, uri, body).await;
        assert_eq!(got, status, "{method} {uri} {body:.60}");
        if !code.is_empty() {
            assert_eq!(answer["error"]["code"], code, "{method} {uri}");
            assert!(answer["error"]["message"].is_string());
        }
    }
    assert!(f.store.all_tasks().is_empty());
    assert!(f.blobs.keys().is_empty());
}

#[tokio::test]
async fn starting_a_run_twice_returns_the_open_run_and_wakes_the_dispatcher() {
    let f = fixture();
    let (first, one) = call(&f.router, "POST", "/runs", "").await;
    let (second, two) = call(&f.router, "POST", "/runs", "").await;
    assert_eq!((first, second), (StatusCode::CREATED, StatusCode::OK));
    assert_eq!(one["run"]["id"], two["run"]["id"]);
    let run_id = one["run"]["id"].as_str().unwrap().to_owned();
    assert_eq!(
        f.trigger.runs.lock().unwrap().clone(),
        vec![run_id.clone(), run_id.clone()]
    );

    let (status, run) = call(&f.router, "GET", &format!("/runs/{run_id}"), "").await;
    assert_eq!(
        (status, run["state"].as_str()),
        (StatusCode::OK, Some("OPEN"))
    );
    let (status, report) = call(&f.router, "GET", &format!("/runs/{run_id}/report"), "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(report["tasks"], json!([]));
}

/// The sample API Gateway events convert into requests the router serves.
#[tokio::test]
async fn sample_api_gateway_events_reach_the_router() {
    let f = fixture();
    for (event, expected) in [
        (
            include_str!("../../../events/post-tasks.json"),
            StatusCode::CREATED,
        ),
        (
            include_str!("../../../events/post-runs.json"),
            StatusCode::CREATED,
        ),
        (
            include_str!("../../../events/get-task.json"),
            StatusCode::NOT_FOUND,
        ),
        (
            include_str!("../../../events/get-run.json"),
            StatusCode::NOT_FOUND,
        ),
        (
            include_str!("../../../events/get-run-report.json"),
            StatusCode::NOT_FOUND,
        ),
    ] {
        let request: lambda_http::request::LambdaRequest = serde_json::from_str(event).unwrap();
        let request: lambda_http::Request = request.into();
        let (parts, body) = request.into_parts();
        let request = Request::from_parts(parts, Body::from(body.to_vec()));
        let response = f.router.clone().oneshot(request).await.unwrap();
        assert_eq!(response.status(), expected, "{event:.120}");
    }
}

/// A batch with a large payload (to the bucket), a keyed task and a plain one.
fn mixed_batch() -> String {
    json!({"tasks": [
        {"account": "big", "payload": {"padding": "x".repeat(500)}},
        {"account": "k", "payload": 1, "idempotency_key": "key-1"},
        {"account": "plain", "payload": 2}
    ]})
    .to_string()
}

#[tokio::test]
async fn a_write_that_fails_halfway_leaves_no_task_and_no_payload_behind() {
    for failing in ["stage", "commit"] {
        let f = fixture();
        f.store.inject_fault(failing, 1);
        let (status, error) = call(&f.router, "POST", "/tasks", &mixed_batch()).await;
        assert_eq!(
            status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{failing}: {error}"
        );
        assert!(f.store.all_tasks().is_empty(), "{failing}: no task is left");
        assert!(f.blobs.keys().is_empty(), "{failing}: no payload is left");
        // The retry writes the whole request.
        let (status, _) = call(&f.router, "POST", "/tasks", &mixed_batch()).await;
        assert_eq!(status, StatusCode::CREATED);
        assert_eq!(f.store.all_tasks().len(), 3);
        assert_eq!(f.blobs.keys().len(), 1);
    }
}

#[tokio::test]
async fn a_payload_that_cannot_be_stored_writes_nothing() {
    let f = fixture();
    f.blobs.inject_fault("put", 1);
    let (status, _) = call(&f.router, "POST", "/tasks", &mixed_batch()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(f.store.all_tasks().is_empty() && f.blobs.keys().is_empty());
}

/// A reader that does not see tasks written a moment ago: the conflict is
/// found only when the request writes.
struct StaleReader(Arc<MemoryStore>);

#[async_trait]
impl nightshift_core::ports::TaskReader for StaleReader {
    async fn task(
        &self,
        id: &str,
    ) -> Result<Option<nightshift_core::Task>, nightshift_core::Error> {
        self.0.task(id).await
    }
    async fn tasks(
        &self,
        _: &[String],
    ) -> Result<Vec<nightshift_core::Task>, nightshift_core::Error> {
        Ok(Vec::new())
    }
    async fn run_tasks(
        &self,
        run: &str,
    ) -> Result<Vec<nightshift_core::Task>, nightshift_core::Error> {
        self.0.run_tasks(run).await
    }
}

#[tokio::test]
async fn a_key_claimed_by_a_concurrent_request_refuses_all_of_this_one() {
    let f = fixture();
    // The other request wins the key with different work.
    let other = json!({"account": "k", "payload": "other work", "idempotency_key": "key-1"});
    let (status, _) = call(&f.router, "POST", "/tasks", &other.to_string()).await;
    assert_eq!(status, StatusCode::CREATED);
    let mut limits = Limits::new(4096, KERNELS);
    limits.max_batch = 5;
    let racing = router(Api {
        writer: f.store.clone(),
        reader: Arc::new(StaleReader(f.store.clone())),
        runs: f.store.clone(),
        blobs: f.blobs.clone(),
        trigger: f.trigger.clone(),
        limits,
        claim_check: nightshift_core::limits::ClaimCheck::new(100),
        night: nightshift_core::night::NightWindow::parse("06:00", "Europe/London").unwrap(),
    });
    let (status, error) = call(&racing, "POST", "/tasks", &mixed_batch()).await;
    assert_eq!(status, StatusCode::CONFLICT, "{error}");
    assert_eq!(error["error"]["field"], "tasks[1].idempotency_key");
    assert_eq!(
        f.store.all_tasks().len(),
        1,
        "only the other request's task is there"
    );
    assert!(f.blobs.keys().is_empty(), "this request's payload is gone");
}

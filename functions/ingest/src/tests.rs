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
        (
            include_str!("../../../events/get-runs.json"),
            StatusCode::OK,
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
    async fn run_tasks_page(
        &self,
        run: &str,
        limit: usize,
        after: Option<&nightshift_core::ports::Cursor>,
    ) -> Result<nightshift_core::ports::Page<nightshift_core::Task>, nightshift_core::Error> {
        self.0.run_tasks_page(run, limit, after).await
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

/// A request's status, headers and body text.
async fn call_raw(
    router: &Router,
    uri: &str,
    accept: Option<&str>,
) -> (StatusCode, axum::http::HeaderMap, String) {
    let mut request = Request::builder().method("GET").uri(uri);
    if let Some(accept) = accept {
        request = request.header("accept", accept);
    }
    let response = router
        .clone()
        .oneshot(request.body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, headers, String::from_utf8(bytes.to_vec()).unwrap())
}

/// Seven tasks queued in a run, five of them ended by two instances.
async fn run_with_results(f: &Fixture) -> String {
    use nightshift_core::ports::{PendingTasks, ResultRecorder, RunStore};
    let tasks: Vec<Value> = (0..7)
        .map(|i| json!({"account": format!("acct-{i}"), "payload": i}))
        .collect();
    let (status, created) = call(
        &f.router,
        "POST",
        "/tasks",
        &json!({"tasks": &tasks[..5]}).to_string(),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let (_, more) = call(
        &f.router,
        "POST",
        "/tasks",
        &json!({"tasks": &tasks[5..]}).to_string(),
    )
    .await;
    let ids: Vec<String> = created["task_ids"]
        .as_array()
        .unwrap()
        .iter()
        .chain(more["task_ids"].as_array().unwrap())
        .map(|id| id.as_str().unwrap().to_owned())
        .collect();
    let (_, started) = call(&f.router, "POST", "/runs", "").await;
    let run_id = started["run"]["id"].as_str().unwrap().to_owned();
    f.store
        .mark_queued(&run_id, &nightshift_core::ports::Sent::all(&ids, "sleep"))
        .await
        .unwrap();
    let now = chrono::Utc::now();
    let launched: Vec<nightshift_core::Launched> = ["i-a", "i-b"]
        .iter()
        .map(|id| {
            nightshift_core::Launched::new(*id, now, Some("c7g.large".into()), Some("spot".into()))
        })
        .collect();
    f.store
        .record_fleet(&run_id, 0, &launched, &[])
        .await
        .unwrap();
    let results: Vec<nightshift_core::TaskResult> = ids[..5]
        .iter()
        .enumerate()
        .map(|(i, id)| nightshift_core::TaskResult {
            task_id: id.clone(),
            run_id: run_id.clone(),
            kernel: "sleep".into(),
            instance_id: if i % 2 == 0 { "i-a" } else { "i-b" }.into(),
            attempts: 1,
            started_at: now,
            finished_at: now + chrono::Duration::seconds(2),
            outcome: nightshift_core::TaskOutcome::Done {
                result: Blob::json(&json!(i)),
                summary: format!("value, with a comma {i}"),
            },
        })
        .collect();
    f.store.record_results(&results).await.unwrap();
    run_id
}

#[tokio::test]
async fn the_report_pages_through_every_task_as_json_and_as_csv() {
    let f = fixture();
    let run_id = run_with_results(&f).await;

    let mut seen = Vec::new();
    let mut uri = format!("/runs/{run_id}/report?limit=3");
    let mut pages = 0;
    loop {
        let (status, page) = call(&f.router, "GET", &uri, "").await;
        assert_eq!(status, StatusCode::OK, "{page}");
        assert!(page["tasks"].as_array().unwrap().len() <= 3);
        if pages == 0 {
            let instances = page["instances"].as_array().unwrap();
            let per_instance: Vec<(String, u64)> = instances
                .iter()
                .map(|i| {
                    (
                        i["id"].as_str().unwrap().to_owned(),
                        i["tasks"].as_u64().unwrap(),
                    )
                })
                .collect();
            assert_eq!(per_instance, [("i-a".to_owned(), 3), ("i-b".to_owned(), 2)]);
            assert_eq!(instances[0]["busy_ms"], 6000);
            assert!(page["cost"]["prices_as_of"].is_string());
            assert!(page["cost"]["lines"].is_array());
            assert_eq!(page["run"]["progress"]["ended"], 5);
        } else {
            assert!(
                page.get("cost").is_none(),
                "the cost comes with the first page only"
            );
        }
        pages += 1;
        seen.extend(
            page["tasks"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["task_id"].as_str().unwrap().to_owned()),
        );
        match page["next_cursor"].as_str() {
            Some(next) => uri = format!("/runs/{run_id}/report?limit=3&cursor={next}"),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    let mut distinct = seen.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!((seen.len(), distinct.len()), (7, 7), "every task once");

    // CSV: a header on the first page only, and a link to the next.
    let mut rows = Vec::new();
    let mut uri = format!("/runs/{run_id}/report?limit=4");
    let mut accept = Some("text/csv");
    loop {
        let (status, headers, text) = call_raw(&f.router, &uri, accept).await;
        assert_eq!(status, StatusCode::OK, "{text}");
        assert!(
            headers["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/csv")
        );
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(rows.is_empty())
            .from_reader(text.as_bytes());
        if rows.is_empty() {
            let header: Vec<String> = reader
                .headers()
                .unwrap()
                .iter()
                .map(str::to_owned)
                .collect();
            assert_eq!(header[..4], ["task_id", "account", "kernel", "status"]);
        }
        for record in reader.records() {
            rows.push(record.unwrap());
        }
        match headers.get("nightshift-next-cursor") {
            Some(next) => {
                let next = next.to_str().unwrap();
                assert!(headers["link"].to_str().unwrap().contains(next));
                uri = format!("/runs/{run_id}/report?format=csv&limit=4&cursor={next}");
                accept = None;
            }
            None => break,
        }
    }
    assert_eq!(rows.len(), 7);
    let done: Vec<_> = rows.iter().filter(|r| &r[3] == "DONE").collect();
    assert_eq!(done.len(), 5);
    assert!(
        done.iter()
            .all(|r| r[11].starts_with("value, with a comma")),
        "a summary with a comma stays one field"
    );
    assert!(done.iter().all(|r| &r[4] == "i-a" || &r[4] == "i-b"));
}

#[tokio::test]
async fn runs_are_listed_newest_first_a_page_at_a_time() {
    use nightshift_core::ports::RunStore;
    let f = fixture();
    let start = chrono::Utc::now() - chrono::Duration::days(3);
    let mut opened = Vec::new();
    for night in 0..3 {
        let at = start + chrono::Duration::days(night);
        let id = format!("run-{night}");
        f.store
            .open_run(&id, at, at + chrono::Duration::hours(8))
            .await
            .unwrap();
        f.store
            .close_run(&id, at + chrono::Duration::hours(1))
            .await
            .unwrap();
        opened.push(id);
    }
    let (status, first) = call(&f.router, "GET", "/runs?limit=2", "").await;
    assert_eq!(status, StatusCode::OK, "{first}");
    let ids = |page: &Value| -> Vec<String> {
        page["runs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["id"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(ids(&first), ["run-2", "run-1"]);
    let next = first["next_cursor"].as_str().unwrap();
    let (_, second) = call(
        &f.router,
        "GET",
        &format!("/runs?limit=2&cursor={next}"),
        "",
    )
    .await;
    assert_eq!(ids(&second), ["run-0"]);
    assert!(second["next_cursor"].is_null());
    assert_eq!(first["runs"][0]["progress"]["on_time"], true);
}

#[tokio::test]
async fn a_bad_page_request_is_refused_naming_the_parameter() {
    let f = fixture();
    let (_, started) = call(&f.router, "POST", "/runs", "").await;
    let run_id = started["run"]["id"].as_str().unwrap().to_owned();
    let encode = |keys: Value| {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(keys.to_string())
    };
    let other_run_cursor =
        encode(json!({"pk": "TASK#t", "sk": "TASK", "run_id": "another", "task_id": "t"}));
    let runs_cursor =
        encode(json!({"pk": "RUN#r", "sk": "RUN", "run_list": "RUN", "started_at": "x"}));
    let report_cursor =
        encode(json!({"pk": "TASK#t", "sk": "TASK", "run_id": run_id, "task_id": "t"}));
    for (uri, field) in [
        ("/runs?limit=0".to_owned(), "limit"),
        ("/runs?limit=101".to_owned(), "limit"),
        ("/runs?limit=-1".to_owned(), "limit"),
        ("/runs?cursor=%%%".to_owned(), "cursor"),
        (format!("/runs/{run_id}/report?format=xml"), "format"),
        (format!("/runs/{run_id}/report?limit=1001"), "limit"),
        (
            format!("/runs/{run_id}/report?cursor=bm90IGpzb24"),
            "cursor",
        ),
        (
            format!("/runs/{run_id}/report?cursor={other_run_cursor}"),
            "cursor",
        ),
        (
            format!("/runs/{run_id}/report?cursor={runs_cursor}"),
            "cursor",
        ),
        (format!("/runs?cursor={report_cursor}"), "cursor"),
        ("/runs?cursor=e30".to_owned(), "cursor"),
    ] {
        let (status, error) = call(&f.router, "GET", &uri, "").await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{uri}: {error}");
        assert_eq!(error["error"]["field"], field, "{uri}");
    }
    let (status, _) = call(
        &f.router,
        "GET",
        &format!("/runs/{run_id}/report?cursor={report_cursor}"),
        "",
    )
    .await;
    assert_eq!(
        status,
        StatusCode::OK,
        "a cursor of this run's report is taken"
    );
    let (status, error) = call(&f.router, "PUT", "/tasks", "").await;
    assert_eq!(
        (status, error["error"]["code"].as_str()),
        (StatusCode::METHOD_NOT_ALLOWED, Some("method_not_allowed")),
        "a wrong method answers JSON too"
    );
}

#[tokio::test]
async fn a_report_cell_that_a_spreadsheet_would_run_stays_text() {
    let f = fixture();
    let body = json!({"account": "=HYPERLINK(\"http://x\")", "payload": 1}).to_string();
    let (_, created) = call(&f.router, "POST", "/tasks", &body).await;
    let id = created["task_ids"][0].as_str().unwrap().to_owned();
    let (_, started) = call(&f.router, "POST", "/runs", "").await;
    let run_id = started["run"]["id"].as_str().unwrap().to_owned();
    nightshift_core::ports::PendingTasks::mark_queued(
        &*f.store,
        &run_id,
        &nightshift_core::ports::Sent::all(&[id], "sleep"),
    )
    .await
    .unwrap();
    let (_, _, text) = call_raw(
        &f.router,
        &format!("/runs/{run_id}/report?format=csv"),
        None,
    )
    .await;
    let mut reader = csv::Reader::from_reader(text.as_bytes());
    let row = reader.records().next().unwrap().unwrap();
    assert_eq!(&row[1], "'=HYPERLINK(\"http://x\")");
}

/// `openapi.yaml` describes exactly the routes the router serves.
#[test]
fn the_api_description_names_every_route_and_no_other() {
    let spec: serde_json::Value =
        serde_norway::from_str(include_str!("../../../openapi.yaml")).unwrap();
    let mut described: Vec<(String, String)> = spec["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, operations)| {
            operations
                .as_object()
                .unwrap()
                .keys()
                .filter(|key| {
                    ["get", "put", "post", "delete", "patch", "head", "options"]
                        .contains(&key.as_str())
                })
                .map(move |method| (method.to_uppercase(), path.clone()))
        })
        .collect();
    let mut served: Vec<(String, String)> = endpoints()
        .into_iter()
        .map(|(method, path, _)| (method.to_string(), path.to_owned()))
        .collect();
    described.sort();
    served.sort();
    assert_eq!(described, served);
}

//! Each function binary, run as Lambda runs it: through the Lambda runtime
//! API (served here), with the environment the template declares for it,
//! invoked with each of its sample events from `events/`. What is checked
//! is the whole binary (runtime client, event decoding, configuration,
//! handler, response encoding), not the handler alone.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use nightshift_e2e::{Stack, program, repository};
use serde_json::Value;

/// One invocation through a minimal Lambda runtime API: hands out the
/// event once, then keeps the runtime waiting; keeps what came back.
#[derive(Clone, Default)]
struct Runtime {
    event: Arc<Mutex<Option<String>>>,
    answer: Arc<Mutex<Option<Result<Value, String>>>>,
}

const REQUEST_ID: &str = "8f3c2a1e-0000-4000-8000-000000000001";

async fn next(State(runtime): State<Runtime>) -> (StatusCode, HeaderMap, String) {
    let event = runtime.event.lock().unwrap().take();
    let Some(event) = event else {
        // The runtime waits for the next invocation; this test has none.
        tokio::time::sleep(Duration::from_secs(3600)).await;
        return (StatusCode::NO_CONTENT, HeaderMap::new(), String::new());
    };
    let mut headers = HeaderMap::new();
    let deadline = chrono::Utc::now().timestamp_millis() + 60_000;
    headers.insert("lambda-runtime-aws-request-id", REQUEST_ID.parse().unwrap());
    headers.insert(
        "lambda-runtime-deadline-ms",
        deadline.to_string().parse().unwrap(),
    );
    headers.insert(
        "lambda-runtime-invoked-function-arn",
        "arn:aws:lambda:us-east-1:123456789012:function:local"
            .parse()
            .unwrap(),
    );
    headers.insert(
        "lambda-runtime-trace-id",
        "Root=1-00000000-000000000000000000000000".parse().unwrap(),
    );
    (StatusCode::OK, headers, event)
}

async fn respond(
    State(runtime): State<Runtime>,
    Path(_id): Path<String>,
    body: String,
) -> StatusCode {
    let value = serde_json::from_str(&body).unwrap_or(Value::String(body));
    *runtime.answer.lock().unwrap() = Some(Ok(value));
    StatusCode::ACCEPTED
}

async fn fail(State(runtime): State<Runtime>, body: String) -> StatusCode {
    *runtime.answer.lock().unwrap() = Some(Err(body));
    StatusCode::ACCEPTED
}

/// Runs `binary` with `function`'s environment and one event; its answer.
async fn invoke(stack: &Stack, binary: &str, function: &str, event_file: &str) -> Value {
    let event = std::fs::read_to_string(repository().join("events").join(event_file)).unwrap();
    let runtime = Runtime::default();
    *runtime.event.lock().unwrap() = Some(event);
    let router = Router::new()
        .route("/2018-06-01/runtime/invocation/next", get(next))
        .route(
            "/2018-06-01/runtime/invocation/{id}/response",
            post(respond),
        )
        .route("/2018-06-01/runtime/invocation/{id}/error", post(fail))
        .route("/2018-06-01/runtime/init/error", post(fail))
        .with_state(runtime.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, router).await });

    let environment = stack.function_environment(function);
    let mut child = tokio::process::Command::new(program(binary))
        .env_clear()
        .envs(&environment)
        .envs(stack.aws_env())
        .env("AWS_LAMBDA_RUNTIME_API", address.to_string())
        .env("AWS_LAMBDA_FUNCTION_NAME", function)
        .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "256")
        .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut answer = None;
    for _ in 0..300 {
        answer = runtime.answer.lock().unwrap().take();
        if answer.is_some() || child.try_wait().unwrap().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = child.kill().await;
    server.abort();
    match answer {
        Some(Ok(value)) => value,
        Some(Err(error)) => panic!("{binary} answered {event_file} with an error: {error}"),
        None => {
            let output = child.wait_with_output().await.unwrap();
            panic!(
                "{binary} gave no answer to {event_file}:\n{}",
                String::from_utf8_lossy(&output.stderr)
            )
        }
    }
}

#[tokio::test]
async fn every_function_binary_answers_its_sample_events_through_the_runtime_api() {
    let stack = Stack::resources().await;

    let posted = invoke(&stack, "ingest", "IngestFunction", "post-tasks.json").await;
    assert_eq!(posted["statusCode"], 201, "{posted}");
    let body: Value = serde_json::from_str(posted["body"].as_str().unwrap()).unwrap();
    assert!(!body["task_ids"].as_array().unwrap().is_empty(), "{body}");
    let mut statuses = BTreeMap::new();
    for event in [
        "get-task.json",
        "post-runs.json",
        "get-run.json",
        "get-runs.json",
        "get-run-report.json",
    ] {
        let answer = invoke(&stack, "ingest", "IngestFunction", event).await;
        let status = answer["statusCode"].as_u64().unwrap();
        assert!(status < 500, "{event}: {answer}");
        let body: Value = serde_json::from_str(answer["body"].as_str().unwrap()).unwrap();
        assert!(body.is_object(), "{event} answers a JSON object: {body}");
        statuses.insert(event, status);
    }
    assert!(
        [200, 201].contains(&statuses["post-runs.json"]),
        "{statuses:?}"
    );

    for event in ["scheduled.json", "dispatcher-wake.json", "night-start.json"] {
        let pass = invoke(&stack, "dispatcher", "DispatcherFunction", event).await;
        assert!(
            pass.get("queued").is_some(),
            "{event}: a pass summary: {pass}"
        );
    }

    for event in ["sqs-results.json", "sqs-dead-tasks.json"] {
        let answer = invoke(&stack, "collector", "CollectorFunction", event).await;
        assert!(
            answer["batchItemFailures"].is_array(),
            "{event}: a partial batch response: {answer}"
        );
    }
}

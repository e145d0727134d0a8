//! A fault-injecting proxy in front of the emulator, for chaos tests: a
//! share of the calls that nightshift's own components make is answered as
//! AWS answers under stress (throttling, a 5xx, a conflicting transaction),
//! or reaches the emulator and loses its response, so the client's retry
//! repeats a call that was made. Decisions come from a seed and the call's
//! number, so a seed replays the same sequence of decisions (which call
//! gets which depends on how the processes interleave).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// How calls are answered, and what was injected.
pub struct Faults {
    target: String,
    rate: f64,
    seed: u64,
    calls: AtomicU64,
    injected: AtomicU64,
    http: reqwest::Client,
}

/// What a faulty answer looks like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// Refused before it reaches the service: throttling, or for a
    /// transaction, a conflict with another one.
    Throttled,
    /// Refused before it reaches the service with a 5xx.
    Unavailable,
    /// Made, but its answer is lost: the client sees a 5xx and retries.
    AnswerLost,
}

impl Faults {
    pub fn new(target: String, rate: f64, seed: u64) -> Self {
        Self {
            target,
            rate,
            seed,
            calls: AtomicU64::new(0),
            injected: AtomicU64::new(0),
            http: reqwest::Client::new(),
        }
    }

    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::SeqCst)
    }

    /// The decision for call number `n`.
    fn decide(&self, n: u64, operation: &str) -> Option<Fault> {
        let draw = splitmix(self.seed ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        if (draw >> 11) as f64 / (1u64 << 53) as f64 >= self.rate {
            return None;
        }
        // A lost receive would hide messages for a whole visibility timeout
        // and count a delivery nobody made: not one of the faults under test.
        let kinds: &[Fault] = if operation == "ReceiveMessage" {
            &[Fault::Throttled, Fault::Unavailable]
        } else {
            &[Fault::Throttled, Fault::Unavailable, Fault::AnswerLost]
        };
        Some(kinds[(draw % kinds.len() as u64) as usize])
    }
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The service and operation of a call, from the way the SDK sends it.
fn operation(headers: &HeaderMap, body: &[u8]) -> (&'static str, String) {
    if let Some(target) = headers.get("x-amz-target").and_then(|v| v.to_str().ok()) {
        let (prefix, op) = target.split_once('.').unwrap_or(("", target));
        let service = if prefix.starts_with("DynamoDB") {
            "dynamodb"
        } else {
            "sqs"
        };
        return (service, op.to_owned());
    }
    let text = String::from_utf8_lossy(&body[..body.len().min(200)]);
    if let Some(action) = text.split('&').find_map(|p| p.strip_prefix("Action=")) {
        return ("ec2", action.to_owned());
    }
    ("s3", String::new())
}

pub fn router(faults: Arc<Faults>) -> Router {
    Router::new().fallback(proxy).with_state(faults)
}

async fn proxy(
    State(faults): State<Arc<Faults>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (service, op) = operation(&headers, &body);
    let n = faults.calls.fetch_add(1, Ordering::SeqCst);
    let fault = faults.decide(n, &op);
    if let Some(fault) = fault {
        faults.injected.fetch_add(1, Ordering::SeqCst);
        tracing::info!(service, operation = %op, ?fault, call = n, "fault injected");
        if fault != Fault::AnswerLost {
            return refusal(service, &op, fault, &body);
        }
    }
    let answer = forward(&faults, method, &uri, &headers, body).await;
    if fault == Some(Fault::AnswerLost) {
        return refusal(service, &op, Fault::Unavailable, &[]);
    }
    answer
}

async fn forward(
    faults: &Faults,
    method: Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let mut request = faults
        .http
        .request(method, format!("{}{path}", faults.target));
    for (name, value) in headers {
        if name != "host" && name != "content-length" {
            request = request.header(name, value);
        }
    }
    let answer = match request.body(body).send().await {
        Ok(answer) => answer,
        Err(error) => {
            return (
                StatusCode::BAD_GATEWAY,
                format!("emulator unreachable: {error}"),
            )
                .into_response();
        }
    };
    let status = answer.status();
    let mut out_headers = HeaderMap::new();
    for (name, value) in answer.headers() {
        if name != "content-length" && name != "transfer-encoding" && name != "connection" {
            out_headers.append(name, value.clone());
        }
    }
    let bytes = answer.bytes().await.unwrap_or_default();
    let mut response = Response::new(Body::from(bytes));
    *response.status_mut() = status;
    *response.headers_mut() = out_headers;
    response
}

/// The answer AWS gives for `fault`, in the service's own protocol.
fn refusal(service: &str, operation: &str, fault: Fault, body: &[u8]) -> Response {
    match service {
        "dynamodb" => {
            let (status, kind, extra) = match fault {
                Fault::Throttled if operation == "TransactWriteItems" => {
                    // One reason per item: the first conflicted.
                    let items = serde_json::from_slice::<Value>(body)
                        .ok()
                        .and_then(|v| v["TransactItems"].as_array().map(Vec::len))
                        .unwrap_or(1);
                    let reasons: Vec<Value> = (0..items)
                        .map(|i| {
                            if i == 0 {
                                json!({"Code": "TransactionConflict", "Message": "Transaction is ongoing for the item"})
                            } else {
                                json!({"Code": "None"})
                            }
                        })
                        .collect();
                    (
                        StatusCode::BAD_REQUEST,
                        "TransactionCanceledException",
                        Some(reasons),
                    )
                }
                Fault::Throttled => (StatusCode::BAD_REQUEST, "ThrottlingException", None),
                _ => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "InternalServerError",
                    None,
                ),
            };
            let mut answer = json!({
                "__type": format!("com.amazonaws.dynamodb.v20120810#{kind}"),
                "message": "injected fault",
            });
            if let Some(reasons) = extra {
                answer["CancellationReasons"] = Value::Array(reasons);
            }
            json_answer(status, "application/x-amz-json-1.0", &answer)
        }
        "sqs" => {
            let (status, kind) = match fault {
                Fault::Throttled => (StatusCode::BAD_REQUEST, "RequestThrottled"),
                _ => (StatusCode::INTERNAL_SERVER_ERROR, "InternalError"),
            };
            let answer =
                json!({"__type": format!("com.amazonaws.sqs#{kind}"), "message": "injected fault"});
            json_answer(status, "application/x-amz-json-1.0", &answer)
        }
        "ec2" => xml_answer(
            StatusCode::SERVICE_UNAVAILABLE,
            "<Response><Errors><Error><Code>RequestLimitExceeded</Code><Message>injected fault</Message></Error></Errors><RequestID>fault</RequestID></Response>",
        ),
        _ => {
            let code = if fault == Fault::Throttled {
                "SlowDown"
            } else {
                "InternalError"
            };
            xml_answer(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("<Error><Code>{code}</Code><Message>injected fault</Message></Error>"),
            )
        }
    }
}

fn json_answer(status: StatusCode, content_type: &'static str, body: &Value) -> Response {
    let mut response = (status, body.to_string()).into_response();
    response
        .headers_mut()
        .insert("content-type", HeaderValue::from_static(content_type));
    response
}

fn xml_answer(status: StatusCode, body: &str) -> Response {
    let mut response = (status, body.to_owned()).into_response();
    response
        .headers_mut()
        .insert("content-type", HeaderValue::from_static("text/xml"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_replays_its_decisions_at_about_its_rate() {
        let faults = Faults::new(String::new(), 0.1, 42);
        let decisions: Vec<Option<Fault>> =
            (0..2000).map(|n| faults.decide(n, "PutItem")).collect();
        let again: Vec<Option<Fault>> = (0..2000).map(|n| faults.decide(n, "PutItem")).collect();
        assert_eq!(decisions, again);
        let injected = decisions.iter().flatten().count();
        assert!((120..=280).contains(&injected), "{injected} of 2000 at 10%");
        assert!(
            (0..2000)
                .filter_map(|n| faults.decide(n, "ReceiveMessage"))
                .all(|f| f != Fault::AnswerLost),
            "a receive never loses its answer"
        );
    }

    #[test]
    fn calls_are_named_by_service_and_operation() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-amz-target",
            HeaderValue::from_static("DynamoDB_20120810.TransactWriteItems"),
        );
        assert_eq!(
            operation(&headers, b"{}"),
            ("dynamodb", "TransactWriteItems".into())
        );
        headers.insert(
            "x-amz-target",
            HeaderValue::from_static("AmazonSQS.SendMessageBatch"),
        );
        assert_eq!(operation(&headers, b"{}").0, "sqs");
        assert_eq!(
            operation(&HeaderMap::new(), b"Action=CreateFleet&Version=2016-11-15").0,
            "ec2"
        );
        assert_eq!(operation(&HeaderMap::new(), b"").0, "s3");
    }
}

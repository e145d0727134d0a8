//! Faults for chaos tests, injected by the proxy in front of the emulator:
//! a share of the calls that nightshift's own components make is answered
//! as AWS answers under stress (throttling, a 5xx, a conflicting
//! transaction), or reaches the emulator and loses its response, so the
//! client's retry repeats a call that was made. Decisions come from a seed
//! and the call's number, so a seed replays the same sequence of decisions
//! (which call gets which depends on how the processes interleave).

use std::sync::atomic::{AtomicU64, Ordering};

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// How calls are answered, and what was injected.
pub struct Faults {
    rate: f64,
    seed: u64,
    calls: AtomicU64,
    injected: AtomicU64,
}

/// What a faulty answer looks like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Refused before it reaches the service: throttling, or for a
    /// transaction, a conflict with another one.
    Throttled,
    /// Refused before it reaches the service with a 5xx.
    Unavailable,
    /// Made, but its answer is lost: the client sees a 5xx and retries.
    AnswerLost,
}

impl Faults {
    pub fn new(rate: f64, seed: u64) -> Self {
        Self {
            rate,
            seed,
            calls: AtomicU64::new(0),
            injected: AtomicU64::new(0),
        }
    }

    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::SeqCst)
    }

    /// The decision for the next call, counted as injected when it is one.
    pub fn next(&self, operation: &str) -> Option<Fault> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        let fault = self.decide(n, operation);
        if fault.is_some() {
            self.injected.fetch_add(1, Ordering::SeqCst);
        }
        fault
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

/// The answer AWS gives for `fault`, in the service's own protocol.
pub fn refusal(service: &str, operation: &str, fault: Fault, body: &[u8]) -> Response {
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

pub fn json_answer(status: StatusCode, content_type: &'static str, body: &Value) -> Response {
    let mut response = (status, body.to_string()).into_response();
    response
        .headers_mut()
        .insert("content-type", HeaderValue::from_static(content_type));
    response
}

pub fn xml_answer(status: StatusCode, body: &str) -> Response {
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
        let faults = Faults::new(0.1, 42);
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
}

//! The proxy between nightshift's components and the emulator. The emulator
//! does not enforce IAM as AWS does, so the proxy does: each call is
//! attributed to the role whose key signed it, authorized as AWS would
//! authorize it (actions and resources, see `actions`), refused with
//! AccessDenied when the role's policies in template.yaml do not allow it,
//! and recorded, one line per IAM action asked, in `calls.jsonl`; `nightshift
//! local iam-report` reads those lines. For chaos tests it also injects
//! faults into nightshift's own calls (not into what stands in for AWS).

use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::actions::Call;
use super::faults::{Fault, Faults, json_answer, refusal, xml_answer};
use super::policy::{Ask, Policies};
use crate::CliError;

/// The session name of the calls AWS makes for a function (the SQS event
/// source mapping): recorded and authorized, never given faults.
pub const SERVICE_SESSION: &str = "event-source-mapping";

pub struct Proxy {
    target: String,
    http: reqwest::Client,
    policies: Policies,
    account: String,
    pub faults: Option<Faults>,
    record: Mutex<std::fs::File>,
}

/// One IAM action a call asked for, as recorded.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Recorded {
    pub role: String,
    pub session: String,
    pub service: String,
    pub operation: String,
    #[serde(flatten)]
    pub ask: Ask,
    /// The statement that allowed it; none when refused.
    pub sid: Option<String>,
}

impl Proxy {
    pub fn new(
        target: String,
        policies: Policies,
        account: String,
        faults: Option<Faults>,
        record: &Path,
    ) -> Result<Self, CliError> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(record)
            .map_err(|e| CliError::io(record, e))?;
        Ok(Self {
            target,
            http: reqwest::Client::new(),
            policies,
            account,
            faults,
            record: Mutex::new(file),
        })
    }

    fn write(&self, lines: &[Recorded]) {
        let text: String = lines
            .iter()
            .filter_map(|line| serde_json::to_string(line).ok())
            .map(|line| line + "\n")
            .collect();
        if let Ok(mut file) = self.record.lock()
            && let Err(error) = file.write_all(text.as_bytes())
        {
            tracing::error!(%error, "cannot record calls");
        }
    }
}

pub fn router(proxy: Arc<Proxy>) -> Router {
    // S3 takes objects far beyond axum's default body limit.
    Router::new()
        .fallback(handle)
        .layer(DefaultBodyLimit::disable())
        .with_state(proxy)
}

async fn handle(
    State(proxy): State<Arc<Proxy>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let call = Call {
        method: &method,
        uri: &uri,
        headers: &headers,
        body: &body,
    };
    let (service, operation) = call.operation();
    let signer = call.signer();
    let recorded: Vec<Recorded> = call
        .asks(service, &operation, &signer.region, &proxy.account)
        .into_iter()
        .map(|ask| Recorded {
            sid: proxy
                .policies
                .allowing(&signer.key, &ask)
                .map(|grant| grant.sid.clone()),
            role: signer.key.clone(),
            session: signer.session.clone(),
            service: service.to_owned(),
            operation: operation.clone(),
            ask,
        })
        .collect();
    proxy.write(&recorded);
    if let Some(refused) = recorded.iter().find(|r| r.sid.is_none()) {
        tracing::error!(role = %refused.role, action = %refused.ask.action, resource = ?refused.ask.resource, "access denied: the role's policies do not allow this call");
        return access_denied(service, refused);
    }

    let fault = match &proxy.faults {
        Some(faults) if signer.session != SERVICE_SESSION => faults.next(&operation),
        _ => None,
    };
    if let Some(fault) = fault {
        tracing::info!(service, %operation, ?fault, "fault injected");
        if fault != Fault::AnswerLost {
            return refusal(service, &operation, fault, &body);
        }
    }
    let answer = forward(&proxy, method, &uri, &headers, body).await;
    if fault == Some(Fault::AnswerLost) {
        return refusal(service, &operation, Fault::Unavailable, &[]);
    }
    answer
}

/// AWS's refusal of a call the caller's policies do not allow.
fn access_denied(service: &str, refused: &Recorded) -> Response {
    let message = format!(
        "User: {} is not authorized to perform: {} on resource: {}",
        refused.role,
        refused.ask.action,
        refused.ask.resource.as_deref().unwrap_or("*")
    );
    match service {
        "dynamodb" => json_answer(
            StatusCode::BAD_REQUEST,
            "application/x-amz-json-1.0",
            &json!({"__type": "com.amazonaws.dynamodb.v20120810#AccessDeniedException", "message": message}),
        ),
        "sqs" => json_answer(
            StatusCode::FORBIDDEN,
            "application/x-amz-json-1.0",
            &json!({"__type": "com.amazonaws.sqs#AccessDenied", "message": message}),
        ),
        "ec2" => xml_answer(
            StatusCode::FORBIDDEN,
            &format!(
                "<Response><Errors><Error><Code>UnauthorizedOperation</Code><Message>{message}</Message></Error></Errors><RequestID>denied</RequestID></Response>"
            ),
        ),
        _ => xml_answer(
            StatusCode::FORBIDDEN,
            &format!("<Error><Code>AccessDenied</Code><Message>{message}</Message></Error>"),
        ),
    }
}

async fn forward(
    proxy: &Proxy,
    method: Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let mut request = proxy
        .http
        .request(method, format!("{}{path}", proxy.target));
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

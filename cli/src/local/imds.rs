//! A local instance-metadata endpoint per emulated instance: IMDSv2's token
//! handshake, the instance id and type, its profile role's credentials (the access
//! key named after the role, as the local stack's proxy expects), and a
//! spot interruption notice on request.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, put};
use chrono::Utc;

const TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";

#[derive(Clone)]
struct Instance {
    id: String,
    instance_type: String,
    /// Its `nightshift:run-id` tag (the launch template makes tags readable).
    run_id: Option<String>,
    /// The role of its instance profile.
    role: String,
    interrupted: Arc<AtomicBool>,
}

/// A running endpoint; dropping it does not stop it, `abort` does.
pub struct MetadataEndpoint {
    pub url: String,
    pub interrupted: Arc<AtomicBool>,
    server: tokio::task::JoinHandle<()>,
}

impl MetadataEndpoint {
    pub async fn start(
        instance_id: &str,
        instance_type: &str,
        run_id: Option<&str>,
        role: &str,
    ) -> std::io::Result<Self> {
        let interrupted = Arc::new(AtomicBool::new(false));
        let instance = Instance {
            id: instance_id.to_owned(),
            instance_type: instance_type.to_owned(),
            run_id: run_id.map(str::to_owned),
            role: role.to_owned(),
            interrupted: interrupted.clone(),
        };
        let router = Router::new()
            .route("/latest/api/token", put(token))
            .route(
                "/latest/meta-data/instance-id",
                get(|State(i): State<Instance>| async move { i.id }),
            )
            .route(
                "/latest/meta-data/instance-type",
                get(|State(i): State<Instance>| async move { i.instance_type }),
            )
            .route("/latest/meta-data/spot/instance-action", get(spot_action))
            .route(
                "/latest/meta-data/iam/security-credentials/",
                get(|State(i): State<Instance>| async move { i.role }),
            )
            .route(
                "/latest/meta-data/iam/security-credentials/{role}",
                get(credentials),
            )
            .route(
                "/latest/meta-data/tags/instance/nightshift:run-id",
                get(|State(i): State<Instance>| async move {
                    match i.run_id {
                        Some(run_id) => (StatusCode::OK, run_id),
                        None => (StatusCode::NOT_FOUND, String::new()),
                    }
                }),
            )
            .with_state(instance);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Ok(Self {
            url,
            interrupted,
            server,
        })
    }

    pub fn abort(&self) {
        self.server.abort();
    }
}

async fn token(headers: HeaderMap) -> impl IntoResponse {
    let ttl = headers
        .get(TTL_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("21600")
        .to_owned();
    (
        StatusCode::OK,
        [(TTL_HEADER, ttl)],
        uuid::Uuid::new_v4().to_string(),
    )
}

async fn credentials(
    State(instance): State<Instance>,
    axum::extract::Path(role): axum::extract::Path<String>,
) -> impl IntoResponse {
    if role != instance.role {
        return (StatusCode::NOT_FOUND, String::new());
    }
    let now = Utc::now();
    let at = |t: chrono::DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let body = serde_json::json!({
        "Code": "Success",
        "LastUpdated": at(now),
        "Type": "AWS-HMAC",
        "AccessKeyId": instance.role,
        "SecretAccessKey": "local",
        "Token": "instance",
        "Expiration": at(now + chrono::Duration::hours(6)),
    });
    (StatusCode::OK, body.to_string())
}

async fn spot_action(State(instance): State<Instance>) -> impl IntoResponse {
    if !instance.interrupted.load(Ordering::SeqCst) {
        return (StatusCode::NOT_FOUND, String::new());
    }
    let at = (Utc::now() + chrono::Duration::minutes(2))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    (
        StatusCode::OK,
        serde_json::json!({ "action": "terminate", "time": at }).to_string(),
    )
}

//! The worker daemon: wiring only. Configuration comes from the environment
//! (on EC2, `/etc/nightshift/worker.env`, written from the user data).

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use nightshift_core::aws::dynamodb::DynamoStore;
use nightshift_core::aws::meter::Meter;
use nightshift_core::aws::s3::S3Blobs;
use nightshift_core::aws::sqs::SqsQueue;
use nightshift_core::config::{self, ProcessEnv};
use nightshift_core::limits::ClaimCheck;
use nightshift_kernels::Registry;
use nightshift_worker::metadata::Imds;
use nightshift_worker::{Ports, Settings, Worker};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

/// Where the image keeps the programs tasks may run, unless
/// `NIGHTSHIFT_PROGRAMS_FILE` says otherwise.
const PROGRAMS_FILE: &str = "/etc/nightshift/programs.json";

/// The built-in kernels and the configured programs
/// (`{"name": {"path": ..., "args": [...], "timeout_secs": ...}}`).
fn registry() -> Result<Registry, Box<dyn std::error::Error + Send + Sync>> {
    let path = match std::env::var("NIGHTSHIFT_PROGRAMS_FILE") {
        Ok(path) if !path.is_empty() => std::path::PathBuf::from(path),
        _ if std::path::Path::new(PROGRAMS_FILE).exists() => PROGRAMS_FILE.into(),
        _ => return Ok(Registry::builtin()),
    };
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let programs: std::collections::BTreeMap<String, nightshift_kernels::ProgramSpec> =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(Registry::with_programs(programs)?)
}

#[tokio::main]
async fn main() -> Result<ExitCode, Box<dyn std::error::Error + Send + Sync>> {
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_current_span(false)
        .with_span_list(true)
        .init();
    let metadata = Imds::new();
    let settings = Settings {
        slots: slots(&metadata).await?,
        idle: Duration::from_secs(config::parsed_or(
            &ProcessEnv,
            "NIGHTSHIFT_IDLE_SECONDS",
            120,
        )?),
        wait: Duration::from_secs(config::parsed_or(
            &ProcessEnv,
            "NIGHTSHIFT_WAIT_SECONDS",
            20,
        )?),
        claim_check: ClaimCheck::new(config::parsed_or(
            &ProcessEnv,
            "NIGHTSHIFT_INLINE_LIMIT_BYTES",
            200 * 1024,
        )?),
        spot_poll: Duration::from_millis(config::parsed_or(
            &ProcessEnv,
            "NIGHTSHIFT_SPOT_POLL_MS",
            5000,
        )?),
        stop_grace: Duration::from_secs(config::parsed_or(
            &ProcessEnv,
            "NIGHTSHIFT_STOP_GRACE_SECONDS",
            90,
        )?),
        max_lifetime: Duration::from_secs(config::parsed_or(
            &ProcessEnv,
            "NIGHTSHIFT_MAX_LIFETIME_SECONDS",
            43_200,
        )?),
        give_up_after: Duration::from_secs(config::parsed_or(
            &ProcessEnv,
            "NIGHTSHIFT_GIVE_UP_SECONDS",
            300,
        )?),
    };
    let aws = aws_config::load_from_env().await;
    let meter = Meter::new("worker");
    let sqs = nightshift_core::aws::sqs::metered_client(&aws, &meter);
    let ports = Ports {
        tasks: Arc::new(SqsQueue::new(
            sqs.clone(),
            config::required(&ProcessEnv, "NIGHTSHIFT_TASK_QUEUE_URL")?,
        )),
        results: Arc::new(SqsQueue::new(
            sqs,
            config::required(&ProcessEnv, "NIGHTSHIFT_RESULT_QUEUE_URL")?,
        )),
        blobs: Arc::new(S3Blobs::new(
            nightshift_core::aws::s3::metered_client(&aws, &meter),
            config::required(&ProcessEnv, "NIGHTSHIFT_BUCKET")?,
        )),
        runs: Arc::new(DynamoStore::new(
            nightshift_core::aws::dynamodb::metered_client(&aws, &meter),
            config::required(&ProcessEnv, "NIGHTSHIFT_TABLE")?,
            1,
        )),
        metadata: Arc::new(metadata),
        usage: Arc::new(meter),
    };

    let (stop, stopped) = watch::channel(false);
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
        tracing::info!("shutdown signal: taking no new work");
        let _ = stop.send(true);
    });
    let exit = Worker::new(ports, registry()?, settings)
        .run(stopped)
        .await?;
    tracing::info!(?exit, success = exit.is_success(), "exit");
    // The unit powers the instance off after a successful exit, and
    // restarts a failed one (then powers off after repeated failures).
    Ok(if exit.is_success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The kernels this worker runs at once: `NIGHTSHIFT_SLOTS` on an instance
/// of `NIGHTSHIFT_SLOTS_TYPE` (the fleet's first type), and on another type
/// by its vCPUs, as the dispatcher counts it (`plan::slots_of`). Without
/// `NIGHTSHIFT_SLOTS`, one per CPU.
async fn slots(metadata: &Imds) -> Result<usize, Box<dyn std::error::Error + Send + Sync>> {
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let given = config::optional(&ProcessEnv, "NIGHTSHIFT_SLOTS");
    if given.is_empty() {
        return Ok(cpus);
    }
    let slots: usize = config::parsed_or(&ProcessEnv, "NIGHTSHIFT_SLOTS", cpus)?.max(1);
    let reference = config::optional(&ProcessEnv, "NIGHTSHIFT_SLOTS_TYPE");
    if reference.is_empty() {
        return Ok(slots);
    }
    match metadata.instance_type().await {
        Ok(own) => {
            let reference_slots = u32::try_from(slots).unwrap_or(u32::MAX);
            Ok(nightshift_core::plan::slots_of(&own, &reference, reference_slots) as usize)
        }
        Err(error) => {
            tracing::warn!(%error, slots, "could not read the instance type; running the first type's slots");
            Ok(slots)
        }
    }
}

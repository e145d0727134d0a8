//! The local stack in the foreground: emulator, stack, API, dispatcher,
//! collector feeders and workers, until a shutdown signal.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use axum::Router;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use nightshift_core::aws::dynamodb::DynamoStore;
use nightshift_core::aws::ec2::SpotFleet;
use nightshift_core::aws::s3::S3Blobs;
use nightshift_core::aws::sqs::SqsQueue;
use nightshift_dispatcher::{Dispatcher, Settings as DispatchSettings};
use nightshift_ingest::{Api, DispatchTrigger};
use tokio::process::Command;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{Notify, watch};

use super::faults::Faults;
use super::template::Template;
use super::unit::Unit;
use super::workers::{Registry, Supervisor};
use super::{ENV_FILE, stack};
use crate::CliError;

/// Parameters the local stack sets unless told otherwise: short timeouts,
/// so that a night fits in a minute.
const LOCAL_PARAMETERS: [(&str, &str); 6] = [
    ("TaskVisibilityTimeout", "20"),
    ("WorkerIdleSeconds", "4"),
    ("MaxInstances", "5"),
    ("SlotsPerInstance", "2"),
    ("MaxQueuedPerRun", "500"),
    ("StrayGraceSeconds", "300"),
];

#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub state_dir: PathBuf,
    pub template: PathBuf,
    pub stack_name: String,
    /// Start the emulator on this port (else one is already running).
    pub emulator_port: Option<u16>,
    pub emulator_bin: PathBuf,
    pub api_port: u16,
    pub parameters: BTreeMap<String, String>,
    pub dispatch_every: Duration,
    pub worker_bin: PathBuf,
    /// Create the resources and nothing else (no API, functions or workers).
    pub resources_only: bool,
    /// Dispatcher loops running at once.
    pub dispatchers: usize,
    /// The share of nightshift's own AWS calls that get a fault injected.
    pub faults: Option<f64>,
    pub fault_seed: u64,
}

/// Wakes the local dispatcher loops, as the Lambda invoke does on AWS.
struct NotifyTrigger(Arc<Notify>);

#[async_trait]
impl DispatchTrigger for NotifyTrigger {
    async fn dispatch_soon(&self, _run_id: &str) -> Result<(), nightshift_core::Error> {
        // A loop busy with a pass misses it, and ticks again soon.
        self.0.notify_waiters();
        Ok(())
    }
}

pub async fn serve(options: ServeOptions) -> Result<(), CliError> {
    std::fs::create_dir_all(&options.state_dir).map_err(|e| CliError::io(&options.state_dir, e))?;
    let env_file = options.state_dir.join(ENV_FILE);
    let _ = std::fs::remove_file(&env_file);
    let mut emulator = match options.emulator_port {
        Some(port) => Some(start_emulator(&options, port).await?),
        None => None,
    };
    let result = run_stack(&options, &env_file).await;
    let _ = std::fs::remove_file(&env_file);
    if let Some(child) = emulator.as_mut() {
        let _ = child.kill().await;
    }
    result
}

async fn run_stack(options: &ServeOptions, env_file: &Path) -> Result<(), CliError> {
    let aws = aws_config::load_from_env().await;
    let template = Template::load(&options.template)?;
    let mut parameters = template.parameter_defaults();
    for (key, value) in LOCAL_PARAMETERS {
        parameters.insert(key.to_owned(), value.to_owned());
    }
    parameters.extend(options.parameters.clone());
    let outputs = stack::create(
        &aws_sdk_cloudformation::Client::new(&aws),
        &options.stack_name,
        &template,
        &parameters,
    )
    .await?;
    if options.resources_only {
        // Only the resources, for tests that drive the adapters themselves.
        stack::write_env_file(env_file, &stack_env(&outputs, &options.stack_name)?)?;
        tracing::info!(env = %env_file.display(), "local stack resources ready");
        return wait_for_signal().await;
    }
    let output = |name: &str| {
        outputs
            .get(name)
            .cloned()
            .ok_or_else(|| CliError::Local(format!("the stack has no output {name}")))
    };
    let number = |name: &str| -> Result<u64, CliError> {
        parameters
            .get(name)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| CliError::Local(format!("parameter {name} is not a number")))
    };
    let (stop_tx, stop) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();

    // nightshift's own calls (functions and workers) go through the fault
    // proxy when asked; what stands in for AWS itself (the event source
    // mapping, EC2's side of instances) goes straight to the emulator.
    let (product, faults) = match options.faults {
        Some(rate) => {
            let target = aws_endpoint()?;
            let faults = Arc::new(Faults::new(target, rate, options.fault_seed));
            let listener = bind(0).await?;
            let url = format!(
                "http://{}",
                listener
                    .local_addr()
                    .map_err(|e| CliError::io(Path::new("faults"), e))?
            );
            tasks.spawn(serve_router(
                listener,
                super::faults::router(faults.clone()),
                stop.clone(),
            ));
            tracing::info!(%url, rate, seed = options.fault_seed, "fault proxy in front of the emulator");
            (
                aws.to_builder().endpoint_url(&url).build(),
                Some((faults, url)),
            )
        }
        None => (aws.clone(), None),
    };
    // Each function's configuration, read as on AWS from the environment
    // the template declares for it.
    let environment =
        |function: &str| template.function_environment(function, &parameters, &outputs);
    let ingest = nightshift_ingest::Config::from_env(&environment("IngestFunction")?)?;
    let dispatcher = nightshift_dispatcher::Config::from_env(&environment("DispatcherFunction")?)?;
    let collector = nightshift_collector::Config::from_env(&environment("CollectorFunction")?)?;
    let store = DynamoStore::new(
        nightshift_core::aws::dynamodb::Client::new(&product),
        collector.table,
        collector.pending_shards,
    );
    let sqs = nightshift_core::aws::sqs::Client::new(&product);
    let direct_sqs = nightshift_core::aws::sqs::Client::new(&aws);

    // The API, served as API Gateway would serve the ingest function.
    let wake = Arc::new(Notify::new());
    let api = Api {
        writer: Arc::new(store.clone()),
        reader: Arc::new(store.clone()),
        runs: Arc::new(store.clone()),
        blobs: Arc::new(S3Blobs::new(
            nightshift_core::aws::s3::Client::new(&product),
            ingest.bucket,
        )),
        trigger: Arc::new(NotifyTrigger(wake.clone())),
        limits: ingest.limits,
        claim_check: ingest.claim_check,
    };
    let api_listener = bind(options.api_port).await?;
    let api_url = format!(
        "http://{}",
        api_listener
            .local_addr()
            .map_err(|e| CliError::io(Path::new("api"), e))?
    );
    tasks.spawn(serve_router(
        api_listener,
        nightshift_ingest::router(api),
        stop.clone(),
    ));

    // The dispatcher, on its schedule and when the API wakes it.
    let fleet = SpotFleet::new(
        nightshift_core::aws::ec2::Client::new(&product),
        dispatcher.launch_template_id,
        dispatcher.instance_types,
    );
    let dispatch = Arc::new(DispatchPorts {
        store: store.clone(),
        queue: SqsQueue::new(sqs.clone(), dispatcher.task_queue_url),
        fleet,
        blobs: S3Blobs::new(
            nightshift_core::aws::s3::Client::new(&product),
            dispatcher.bucket,
        ),
        settings: dispatcher.settings,
    });
    // As EventBridge may deliver a tick twice, several loops may run at once.
    for _ in 0..options.dispatchers.max(1) {
        tasks.spawn(dispatch_loop(
            dispatch.clone(),
            options.dispatch_every,
            wake.clone(),
            stop.clone(),
        ));
    }

    // The collector, fed from each SQS event source the template declares.
    for source in template.sqs_sources("CollectorFunction")? {
        let queue = SqsQueue::new(direct_sqs.clone(), output(&format!("{}Url", source.queue))?);
        tasks.spawn(super::feeder::run(
            queue,
            source,
            store.clone(),
            stop.clone(),
        ));
    }

    // Workers: the boot configuration the launch template's user data
    // writes on EC2, with the emulator's endpoint.
    let mut worker_env: BTreeMap<String, String> = std::env::vars()
        .filter(|(k, _)| k.starts_with("AWS_") && k != "AWS_EC2_METADATA_SERVICE_ENDPOINT")
        .collect();
    if let Some((_, url)) = &faults {
        worker_env.insert("AWS_ENDPOINT_URL".to_owned(), url.clone());
    }
    worker_env.extend([
        (
            "NIGHTSHIFT_TASK_QUEUE_URL".to_owned(),
            output("TaskQueueUrl")?,
        ),
        (
            "NIGHTSHIFT_RESULT_QUEUE_URL".to_owned(),
            output("ResultQueueUrl")?,
        ),
        ("NIGHTSHIFT_BUCKET".to_owned(), output("PayloadBucketName")?),
        (
            "NIGHTSHIFT_INLINE_LIMIT_BYTES".to_owned(),
            number("InlineLimitBytes")?.to_string(),
        ),
        (
            "NIGHTSHIFT_IDLE_SECONDS".to_owned(),
            number("WorkerIdleSeconds")?.to_string(),
        ),
        (
            "NIGHTSHIFT_SLOTS".to_owned(),
            number("SlotsPerInstance")?.to_string(),
        ),
        ("NIGHTSHIFT_TABLE".to_owned(), output("TableName")?),
        (
            "NIGHTSHIFT_MAX_LIFETIME_SECONDS".to_owned(),
            number("WorkerMaxLifetimeSeconds")?.to_string(),
        ),
        // Short polls and metadata checks keep an emulated night brisk.
        ("NIGHTSHIFT_WAIT_SECONDS".to_owned(), "2".to_owned()),
        ("NIGHTSHIFT_SPOT_POLL_MS".to_owned(), "500".to_owned()),
    ]);
    let registry = Arc::new(Registry::default());
    let unit_path = options
        .template
        .parent()
        .unwrap_or(Path::new("."))
        .join("worker-ami/nightshift-worker.service");
    let unit_text = std::fs::read_to_string(&unit_path).map_err(|e| CliError::io(&unit_path, e))?;
    let supervisor = Supervisor {
        ec2: nightshift_core::aws::ec2::Client::new(&aws),
        worker_bin: options.worker_bin.clone(),
        env: worker_env,
        dir: options.state_dir.join("workers"),
        registry: registry.clone(),
        unit: Unit::parse(&unit_text),
        shutdown_behavior: template
            .launch_template_data("WorkerLaunchTemplate", "InstanceInitiatedShutdownBehavior")
            .unwrap_or_else(|| "stop".to_owned()),
    };
    tasks.spawn(supervisor.run(stop.clone()));

    // Control: announce a spot interruption to one instance.
    let control_listener = bind(0).await?;
    let control_url = format!(
        "http://{}",
        control_listener
            .local_addr()
            .map_err(|e| CliError::io(Path::new("control"), e))?
    );
    tasks.spawn(serve_router(
        control_listener,
        control_router(registry, faults.map(|(faults, _)| faults)),
        stop.clone(),
    ));

    let mut env = stack_env(&outputs, &options.stack_name)?;
    env.extend([
        ("NIGHTSHIFT_API_URL".to_owned(), api_url.clone()),
        ("NIGHTSHIFT_CONTROL_URL".to_owned(), control_url),
    ]);
    stack::write_env_file(env_file, &env)?;
    tracing::info!(api = %api_url, env = %env_file.display(), "local stack ready");

    wait_for_signal().await?;
    tracing::info!("stopping the local stack");
    let _ = stop_tx.send(true);
    while tasks.join_next().await.is_some() {}
    Ok(())
}

/// What points any AWS client at the stack's resources.
fn stack_env(
    outputs: &BTreeMap<String, String>,
    stack_name: &str,
) -> Result<BTreeMap<String, String>, CliError> {
    let mut env: BTreeMap<String, String> = std::env::vars()
        .filter(|(k, _)| {
            [
                "AWS_ENDPOINT_URL",
                "AWS_REGION",
                "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY",
            ]
            .contains(&k.as_str())
        })
        .collect();
    if let Some(region) = env.get("AWS_REGION").cloned() {
        // Older clients (boto3) read the region from this name.
        env.insert("AWS_DEFAULT_REGION".to_owned(), region);
    }
    env.insert("NIGHTSHIFT_STACK".to_owned(), stack_name.to_owned());
    for (name, output) in [
        ("NIGHTSHIFT_TABLE", "TableName"),
        ("NIGHTSHIFT_TASK_QUEUE_URL", "TaskQueueUrl"),
        ("NIGHTSHIFT_RESULT_QUEUE_URL", "ResultQueueUrl"),
        ("NIGHTSHIFT_TASK_DLQ_URL", "TaskDeadLetterQueueUrl"),
        ("NIGHTSHIFT_RESULT_DLQ_URL", "ResultDeadLetterQueueUrl"),
        ("NIGHTSHIFT_BUCKET", "PayloadBucketName"),
        ("NIGHTSHIFT_LAUNCH_TEMPLATE_ID", "LaunchTemplateId"),
    ] {
        let value = outputs
            .get(output)
            .cloned()
            .ok_or_else(|| CliError::Local(format!("the stack has no output {output}")))?;
        env.insert(name.to_owned(), value);
    }
    Ok(env)
}

async fn start_emulator(
    options: &ServeOptions,
    port: u16,
) -> Result<tokio::process::Child, CliError> {
    let log_path = options.state_dir.join("emulator.log");
    let log = std::fs::File::create(&log_path).map_err(|e| CliError::io(&log_path, e))?;
    let stderr = log.try_clone().map_err(|e| CliError::io(&log_path, e))?;
    let child = Command::new(&options.emulator_bin)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(log)
        .stderr(stderr)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| {
            CliError::Local(format!(
                "cannot start the emulator {}: {e}",
                options.emulator_bin.display()
            ))
        })?;
    for _ in 0..300 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok(child);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(CliError::Local(format!(
        "the emulator did not open port {port}; see {}",
        log_path.display()
    )))
}

/// What a dispatcher pass needs, shared by the loops.
struct DispatchPorts {
    store: DynamoStore,
    queue: SqsQueue,
    fleet: SpotFleet,
    blobs: S3Blobs,
    settings: DispatchSettings,
}

async fn dispatch_loop(
    ports: Arc<DispatchPorts>,
    every: Duration,
    wake: Arc<Notify>,
    mut stop: watch::Receiver<bool>,
) {
    let dispatcher = Dispatcher {
        runs: &ports.store,
        pending: &ports.store,
        tasks: &ports.store,
        queue: &ports.queue,
        fleet: &ports.fleet,
        blobs: &ports.blobs,
        settings: &ports.settings,
    };
    loop {
        let owner = uuid::Uuid::new_v4().to_string();
        match dispatcher.pass(chrono::Utc::now(), &owner).await {
            Ok(pass) if pass.skipped.is_none() => tracing::info!(?pass, "dispatch pass"),
            Ok(_) => {}
            Err(error) => tracing::warn!(error = %error, "dispatch pass failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = wake.notified() => {}
            _ = stop.changed() => return,
        }
    }
}

fn control_router(registry: Arc<Registry>, faults: Option<Arc<Faults>>) -> Router {
    Router::new()
        .route(
            "/instances/{id}/interrupt",
            post(|State(registry): State<Arc<Registry>>, UrlPath(id): UrlPath<String>| async move {
                if registry.interrupt(&id) { StatusCode::NO_CONTENT } else { StatusCode::NOT_FOUND }
            }),
        )
        .route(
            "/instances",
            get(|State(registry): State<Arc<Registry>>| async move { axum::Json(registry.running()) }),
        )
        .route(
            "/faults",
            get(move || async move {
                axum::Json(serde_json::json!({ "injected": faults.as_ref().map_or(0, |f| f.injected()) }))
            }),
        )
        .with_state(registry)
}

/// The emulator's address, as this process was given it.
fn aws_endpoint() -> Result<String, CliError> {
    std::env::var("AWS_ENDPOINT_URL").map_err(|_| {
        CliError::Local("AWS_ENDPOINT_URL is not set: no emulator to put faults in front of".into())
    })
}

async fn bind(port: u16) -> Result<tokio::net::TcpListener, CliError> {
    tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .map_err(|e| CliError::Local(format!("cannot listen on 127.0.0.1:{port}: {e}")))
}

async fn serve_router(
    listener: tokio::net::TcpListener,
    router: Router,
    mut stop: watch::Receiver<bool>,
) {
    let shutdown = async move {
        let _ = stop.changed().await;
    };
    if let Err(error) = axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
    {
        tracing::error!(%error, "server stopped");
    }
}

async fn wait_for_signal() -> Result<(), CliError> {
    let mut terminate =
        signal(SignalKind::terminate()).map_err(|e| CliError::io(Path::new("signal"), e))?;
    let mut interrupt =
        signal(SignalKind::interrupt()).map_err(|e| CliError::io(Path::new("signal"), e))?;
    tokio::select! {
        _ = terminate.recv() => {}
        _ = interrupt.recv() => {}
    }
    Ok(())
}

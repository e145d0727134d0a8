//! The local stack in the foreground: emulator, stack, API, dispatcher,
//! collector feeders and workers, until a shutdown signal.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_sqs::config::Credentials;
use axum::Router;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use nightshift_core::aws::dynamodb::DynamoStore;
use nightshift_core::aws::ec2::SpotFleet;
use nightshift_core::aws::meter::Meter;
use nightshift_core::aws::s3::S3Blobs;
use nightshift_core::aws::sqs::SqsQueue;
use nightshift_core::ports::{WallClock, charge};
use nightshift_dispatcher::{Dispatcher, Settings as DispatchSettings};
use nightshift_ingest::{Api, DispatchTrigger};
use tokio::process::Command;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{Notify, watch};

use super::faults::Faults;
use super::policy::Policies;
use super::proxy::{Proxy, SERVICE_SESSION};
use super::resolve::Resolved;
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

/// Where the proxy records each call's IAM actions, in the state directory.
pub const CALLS_FILE: &str = "calls.jsonl";

/// The worker's boot configuration, written by the launch template's user data.
const WORKER_BOOT_CONFIG: &str = "/etc/nightshift/worker.env";

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
    let cloudformation = aws_sdk_cloudformation::Client::new(&aws);
    let outputs =
        stack::create(&cloudformation, &options.stack_name, &template, &parameters).await?;
    let (resources, account) = stack::physical(&cloudformation, &options.stack_name).await?;
    let resolved = Resolved {
        parameters,
        resources,
        region: aws.region().map(ToString::to_string).unwrap_or_default(),
        account,
        stack: options.stack_name.clone(),
    };
    // Each function's environment as the template declares it, resolved:
    // what `cargo lambda watch` or a runtime emulator needs to run it here.
    let functions_dir = options.state_dir.join("functions");
    std::fs::create_dir_all(&functions_dir).map_err(|e| CliError::io(&functions_dir, e))?;
    for function in template.functions()? {
        let environment = template.function_environment(&function, &resolved)?;
        stack::write_env_file(&functions_dir.join(format!("{function}.env")), &environment)?;
    }
    if options.resources_only {
        // Only the resources, for tests that drive the adapters themselves.
        stack::write_env_file(env_file, &stack_env(&outputs, &options.stack_name)?)?;
        tracing::info!(env = %env_file.display(), "local stack resources ready");
        return wait_for_signal().await;
    }
    let (stop_tx, stop) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();

    // Every call of nightshift's components goes through the proxy, signed
    // with a key named after the caller's role, and is authorized by that
    // role's policies as AWS would; chaos tests add faults there. What
    // stands in for AWS itself (EC2's side of instances) goes straight to
    // the emulator.
    let proxy = Arc::new(Proxy::new(
        aws_endpoint()?,
        Policies::new(template.grants(Some(&resolved))?),
        resolved.account.clone(),
        options
            .faults
            .map(|rate| Faults::new(rate, options.fault_seed)),
        &options.state_dir.join(CALLS_FILE),
    )?);
    let listener = bind(0).await?;
    let proxy_url = format!(
        "http://{}",
        listener
            .local_addr()
            .map_err(|e| CliError::io(Path::new("proxy"), e))?
    );
    tasks.spawn(serve_router(
        listener,
        super::proxy::router(proxy.clone()),
        stop.clone(),
    ));
    if let Some(rate) = options.faults {
        tracing::info!(
            rate,
            seed = options.fault_seed,
            "faults injected into nightshift's calls"
        );
    }
    // What a function's code is given on AWS: its role's credentials. The
    // endpoint is set as client configuration, which AWS_ENDPOINT_URL in
    // this process's environment does not override.
    let signed_as = |role: String, session: &'static str| {
        aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws.region().cloned())
            .endpoint_url(&proxy_url)
            .credentials_provider(Credentials::new(
                role,
                "local",
                Some(session.to_owned()),
                None,
                "nightshift-local",
            ))
            .load()
    };
    let role_of = |function: &str| {
        template
            .function_role(function)
            .ok_or_else(|| CliError::Local(format!("{function} has no Role in the template")))
    };
    let ingest_aws = signed_as(role_of("IngestFunction")?, "function").await;
    let dispatcher_aws = signed_as(role_of("DispatcherFunction")?, "function").await;
    let collector_role = role_of("CollectorFunction")?;
    let collector_aws = signed_as(collector_role.clone(), "function").await;
    let event_source_aws = signed_as(collector_role, SERVICE_SESSION).await;

    // Each function's configuration, read as on AWS from the environment
    // the template declares for it.
    let environment = |function: &str| template.function_environment(function, &resolved);
    let ingest = nightshift_ingest::Config::from_env(&environment("IngestFunction")?)?;
    let dispatcher = nightshift_dispatcher::Config::from_env(&environment("DispatcherFunction")?)?;
    let collector = nightshift_collector::Config::from_env(&environment("CollectorFunction")?)?;
    let store_for = |aws: &aws_config::SdkConfig, meter: &Meter| {
        DynamoStore::new(
            nightshift_core::aws::dynamodb::metered_client(aws, meter),
            collector.table.clone(),
            collector.pending_shards,
        )
    };

    // The API, served as API Gateway would serve the ingest function.
    let wake = Arc::new(Notify::new());
    // The API's calls are made by day, for no run: counted for nothing.
    let ingest_store = store_for(&ingest_aws, &Meter::new("ingest"));
    let api = Api {
        writer: Arc::new(ingest_store.clone()),
        reader: Arc::new(ingest_store.clone()),
        runs: Arc::new(ingest_store),
        blobs: Arc::new(S3Blobs::new(
            nightshift_core::aws::s3::Client::new(&ingest_aws),
            ingest.bucket,
        )),
        trigger: Arc::new(NotifyTrigger(wake.clone())),
        limits: ingest.limits,
        claim_check: ingest.claim_check,
        night: ingest.night,
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
    let meter = Meter::new("dispatcher");
    let fleet = SpotFleet::new(
        nightshift_core::aws::ec2::metered_client(&dispatcher_aws, &meter),
        dispatcher.launch_template_id,
        dispatcher.instance_types,
        dispatcher.subnet_ids,
        dispatcher.settings.slots_per_instance,
    );
    let dispatch = Arc::new(DispatchPorts {
        store: store_for(&dispatcher_aws, &meter),
        queue: SqsQueue::new(
            nightshift_core::aws::sqs::metered_client(&dispatcher_aws, &meter),
            dispatcher.task_queue_url,
        ),
        fleet,
        blobs: S3Blobs::new(
            nightshift_core::aws::s3::metered_client(&dispatcher_aws, &meter),
            dispatcher.bucket,
        ),
        settings: dispatcher.settings,
        meter,
        memory_mb: dispatcher.memory_mb,
    });
    // As EventBridge may deliver a tick twice, several loops may run at once.
    // The night's start, which EventBridge Scheduler sends on AWS, comes
    // from the control endpoint (`nightshift local night-start`).
    let night = Arc::new(Notify::new());
    for _ in 0..options.dispatchers.max(1) {
        tasks.spawn(dispatch_loop(
            dispatch.clone(),
            options.dispatch_every,
            Wakes {
                api: wake.clone(),
                night: night.clone(),
            },
            stop.clone(),
        ));
    }

    // The collector, fed from each SQS event source the template declares,
    // polled as Lambda's event source mapping polls, with the function's role.
    let collector_meter = Meter::new("collector");
    let collector_store = store_for(&collector_aws, &collector_meter);
    let event_source_sqs = nightshift_core::aws::sqs::Client::new(&event_source_aws);
    for source in template.sqs_sources("CollectorFunction")? {
        let url = resolved
            .resources
            .get(&source.queue)
            .map(|(_, url)| url.clone())
            .ok_or_else(|| CliError::Local(format!("the stack has no {}", source.queue)))?;
        tasks.spawn(super::feeder::run(
            SqsQueue::new(event_source_sqs.clone(), url),
            source,
            super::feeder::Collector {
                store: collector_store.clone(),
                meter: collector_meter.clone(),
                memory_mb: collector.memory_mb,
            },
            stop.clone(),
        ));
    }

    // Workers: as on EC2, the unit's environment and the boot configuration
    // the launch template's user data writes, and the instance profile's
    // credentials from instance metadata; the proxy is their AWS endpoint.
    let unit_path = options
        .template
        .parent()
        .unwrap_or(Path::new("."))
        .join("worker-ami/nightshift-worker.service");
    let unit_text = std::fs::read_to_string(&unit_path).map_err(|e| CliError::io(&unit_path, e))?;
    let unit = Unit::parse(&unit_text);
    let mut worker_env: BTreeMap<String, String> = unit.environment.iter().cloned().collect();
    worker_env.extend(template.boot_environment(
        "WorkerLaunchTemplate",
        WORKER_BOOT_CONFIG,
        &resolved,
    )?);
    worker_env.extend(
        [
            ("AWS_ENDPOINT_URL", proxy_url.as_str()),
            // Short polls and metadata checks keep an emulated night brisk.
            ("NIGHTSHIFT_WAIT_SECONDS", "2"),
            ("NIGHTSHIFT_SPOT_POLL_MS", "500"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned())),
    );
    let registry = Arc::new(Registry::default());
    let supervisor = Supervisor {
        ec2: nightshift_core::aws::ec2::Client::new(&aws),
        worker_bin: options.worker_bin.clone(),
        env: worker_env,
        role: template
            .instance_role("WorkerLaunchTemplate")
            .ok_or_else(|| CliError::Local("the worker launch template has no role".into()))?,
        dir: options.state_dir.join("workers"),
        registry: registry.clone(),
        unit,
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
        control_router(registry, proxy, night),
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
    /// Counts the calls of every loop; each pass charges what it took.
    meter: Meter,
    memory_mb: u32,
}

/// What wakes a dispatcher loop besides its tick: the API (a run started)
/// and the night's start.
struct Wakes {
    api: Arc<Notify>,
    night: Arc<Notify>,
}

async fn dispatch_loop(
    ports: Arc<DispatchPorts>,
    every: Duration,
    wakes: Wakes,
    mut stop: watch::Receiver<bool>,
) {
    let dispatcher = Dispatcher {
        runs: &ports.store,
        pending: &ports.store,
        tasks: &ports.store,
        queue: &ports.queue,
        fleet: &ports.fleet,
        blobs: &ports.blobs,
        clock: &WallClock,
        settings: &ports.settings,
    };
    let mut night_starts = false;
    loop {
        let owner = uuid::Uuid::new_v4().to_string();
        let now = chrono::Utc::now();
        let started = std::time::Instant::now();
        let pass = if night_starts {
            dispatcher.open_night(now, &owner).await
        } else {
            dispatcher.pass(now, &owner).await
        };
        let used = ports
            .meter
            .take_invocation(started.elapsed(), ports.memory_mb);
        let run_id = pass.as_ref().ok().and_then(|p| p.run_id.as_deref());
        charge(&ports.store, run_id, &used).await;
        match pass {
            Ok(pass) if pass.skipped.is_none() => {
                tracing::info!(?pass, night_starts, "dispatch pass")
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(error = %error, "dispatch pass failed"),
        }
        night_starts = tokio::select! {
            _ = tokio::time::sleep(every) => false,
            _ = wakes.api.notified() => false,
            _ = wakes.night.notified() => true,
            _ = stop.changed() => return,
        };
    }
}

fn control_router(registry: Arc<Registry>, proxy: Arc<Proxy>, night: Arc<Notify>) -> Router {
    Router::new()
        .route(
            "/night/start",
            post(move || async move {
                // One loop takes it, as one scheduler invocation would.
                night.notify_one();
                StatusCode::ACCEPTED
            }),
        )
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
                axum::Json(serde_json::json!({ "injected": proxy.faults.as_ref().map_or(0, Faults::injected) }))
            }),
        )
        .with_state(registry)
}

/// The emulator's address, as this process was given it.
fn aws_endpoint() -> Result<String, CliError> {
    std::env::var("AWS_ENDPOINT_URL").map_err(|_| {
        CliError::Local("AWS_ENDPOINT_URL is not set: no emulator to stand in for AWS".into())
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

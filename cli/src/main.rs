//! `nightshift`: operator commands, and `nightshift local`, the whole system
//! on one machine.

mod api;
mod client;
mod dashboard;
mod local;
mod report;
mod submit;
mod watch;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Local(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{operation} failed: {detail}")]
    Aws {
        operation: &'static str,
        detail: String,
    },
    #[error(transparent)]
    Template(#[from] local::template::TemplateError),
    #[error("configuration: {0}")]
    Config(#[from] nightshift_core::config::ConfigError),
    #[error("the API answered {status}: {}", api_message(body))]
    Api { status: u16, body: String },
    #[error("cannot reach the API at {url}: {source}")]
    Http {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("invalid argument: {0}")]
    Usage(String),
    #[error("{0} line(s) rejected")]
    Rejected(usize),
}

/// The API's error body as a line: `code: message (field)`.
fn api_message(body: &str) -> String {
    let Ok(value) = serde_json::from_str::<serde_json::Value>(body) else {
        return body.to_owned();
    };
    let error = &value["error"];
    match (error["code"].as_str(), error["message"].as_str()) {
        (Some(code), Some(message)) => match error["field"].as_str().filter(|f| !f.is_empty()) {
            Some(field) => format!("{code}: {message} (field {field})"),
            None => format!("{code}: {message}"),
        },
        _ => body.to_owned(),
    }
}

impl CliError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.display().to_string(),
            source,
        }
    }

    pub fn aws(operation: &'static str, error: impl std::error::Error) -> Self {
        let mut detail = error.to_string();
        let mut source = error.source();
        while let Some(inner) = source {
            detail = format!("{detail}: {inner}");
            source = inner.source();
        }
        Self::Aws { operation, detail }
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "nightshift",
    version,
    about = "Overnight batch computing on spot instances"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The whole system on this machine, against an AWS emulator.
    Local {
        #[command(subcommand)]
        command: LocalCommand,
    },
    /// Submits test accounts, starts a run, follows it and prints its report.
    Demo {
        #[arg(long, default_value_t = 50)]
        accounts: usize,
        /// Kernel for every account (default: the portfolio-risk kernel).
        #[arg(long)]
        kernel: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
        /// Give up following the run after this many seconds.
        #[arg(long, default_value_t = 900)]
        timeout: u64,
    },
    /// The operator's web page on this machine: test accounts, the start
    /// button, the run live, reports and past runs. Its calls to the API are
    /// signed with your AWS credentials (or the local stack's).
    ///
    /// Example: nightshift dashboard --api https://abc123.execute-api.eu-west-2.amazonaws.com
    Dashboard {
        /// Port on 127.0.0.1 (0: any free port).
        #[arg(long, default_value_t = 8642)]
        port: u16,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Submits tasks from JSON lines, one task a line (`-`: standard
    /// input), in batches of up to 1,000. Each line is keyed by the file's
    /// content and its number: running the same command again after a
    /// failure creates nothing twice. Exits non-zero when a line was
    /// rejected, after naming each with the API's reason.
    ///
    /// Example: nightshift submit accounts.jsonl
    ///          (a line: {"account": "acct-001", "kernel": "sleep", "payload": {"seconds": 1}})
    Submit {
        file: PathBuf,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Runs: start one now, watch one, read one.
    Run {
        #[command(subcommand)]
        command: RunCommand,
    },
    /// Every run, newest first.
    Runs {
        #[command(subcommand)]
        command: RunsCommand,
    },
    /// One task.
    Task {
        #[command(subcommand)]
        command: TaskCommand,
    },
    /// The tasks of a run.
    Tasks {
        #[command(subcommand)]
        command: TasksCommand,
    },
}

#[derive(Debug, Subcommand)]
enum RunsCommand {
    /// The newest runs.
    ///
    /// Example: nightshift runs list --limit 5
    List {
        #[arg(long, default_value_t = 20)]
        limit: usize,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
}

#[derive(Debug, Subcommand)]
enum TaskCommand {
    /// A task's status, run, attempts, worker, times and result.
    ///
    /// Example: nightshift task get 5f3e1a90-2c4b-4e7d-8f61-9b0a7c2d4e13 --json
    Get {
        task_id: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
}

#[derive(Debug, Subcommand)]
enum TasksCommand {
    /// A run's tasks, of one status if given.
    ///
    /// Example: nightshift tasks list --run 3f2c… --status FAILED
    List {
        #[arg(long)]
        run: String,
        #[arg(long, value_parser = ["PENDING", "QUEUED", "DONE", "FAILED", "CANCELLED"])]
        status: Option<String>,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
}

#[derive(Debug, Subcommand)]
enum RunCommand {
    /// Starts a run now (or shows the open one).
    ///
    /// Example: nightshift run start
    Start {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Cancels a run: its pending and queued tasks end CANCELLED and its
    /// instances are terminated; results that still come are kept as late.
    ///
    /// Example: nightshift run cancel 3f2c…
    Cancel {
        run_id: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// A run's state, counters, pace and fleet.
    ///
    /// Example: nightshift run status 3f2c… --json
    Status {
        run_id: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Follows a run (default: the newest) until it ends: counts by status,
    /// tasks per minute, the finish expected against the deadline, the
    /// instances. `--json` prints the run at each reading, a line each.
    ///
    /// Example: nightshift run watch
    Watch {
        run_id: Option<String>,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// The morning report of a run: every task, each instance, the cost.
    ///
    /// Example: nightshift run report 3f2c… --format csv > night.csv
    Report {
        run_id: String,
        #[arg(long, value_enum, default_value = "table")]
        format: report::Format,
        #[command(flatten)]
        api: ApiArgs,
    },
}

#[derive(Debug, clap::Args)]
struct ApiArgs {
    /// The API's base URL (default: NIGHTSHIFT_API_URL, else the local stack's).
    #[arg(long, env = "NIGHTSHIFT_API_URL")]
    api: Option<String>,
    #[arg(long, default_value = ".nightshift", env = "NIGHTSHIFT_STATE_DIR")]
    state_dir: PathBuf,
}

impl ApiArgs {
    /// The API given, signed with the standard AWS credential chain; else
    /// the local stack's, signed with the credentials of its env file.
    async fn connect(&self) -> Result<api::Api, CliError> {
        if let Some(url) = &self.api {
            return api::Api::with_default_credentials(url).await;
        }
        let env = local::read_env_file(&self.state_dir.join(local::ENV_FILE)).map_err(|_| {
            CliError::Usage(
                "no --api given and no local stack is up (`nightshift local up`)".into(),
            )
        })?;
        let get = |name: &str| {
            env.get(name)
                .cloned()
                .ok_or_else(|| CliError::Usage(format!("the local stack's env file has no {name}")))
        };
        Ok(api::Api::with_static_credentials(
            &get("NIGHTSHIFT_API_URL")?,
            &get("AWS_ACCESS_KEY_ID")?,
            &get("AWS_SECRET_ACCESS_KEY")?,
            &get("AWS_REGION")?,
        ))
    }
}

#[derive(Debug, Subcommand)]
enum LocalCommand {
    /// Starts the local stack in the background and waits until it is ready.
    Up {
        #[command(flatten)]
        stack: StackArgs,
        /// Use an emulator that is already running at this URL.
        #[arg(long)]
        aws_endpoint: Option<String>,
        #[arg(long, default_value_t = 180)]
        timeout: u64,
    },
    /// Stops the local stack.
    Down {
        #[arg(long, default_value = ".nightshift")]
        state_dir: PathBuf,
    },
    /// Whether the local stack is up, and where.
    Status {
        #[arg(long, default_value = ".nightshift")]
        state_dir: PathBuf,
    },
    /// The night's start, as EventBridge Scheduler sends it on AWS: opens a
    /// run if work is pending.
    NightStart {
        #[arg(long, default_value = ".nightshift")]
        state_dir: PathBuf,
    },
    /// Announces a spot interruption to one emulated instance.
    Interrupt {
        instance_id: String,
        #[arg(long, default_value = ".nightshift")]
        state_dir: PathBuf,
    },
    /// What the recorded calls of local stacks used of each role's grants:
    /// calls refused, and grants no call used. Exits non-zero when a call
    /// was refused.
    ///
    /// Example: nightshift local iam-report .nightshift/calls.jsonl
    IamReport {
        /// calls.jsonl files, or directories holding them.
        #[arg(required = true)]
        calls: Vec<PathBuf>,
        #[arg(long, default_value = "template.yaml")]
        template: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Runs the local stack in the foreground (what `up` starts).
    #[command(hide = true)]
    Serve {
        #[command(flatten)]
        stack: StackArgs,
        #[arg(long)]
        emulator_port: Option<u16>,
        /// Create the resources only: no API, functions or workers.
        #[arg(long)]
        resources_only: bool,
    },
}

#[derive(Debug, Clone, clap::Args)]
struct StackArgs {
    #[arg(long, default_value = ".nightshift")]
    state_dir: PathBuf,
    #[arg(long, default_value = "template.yaml")]
    template: PathBuf,
    #[arg(long, default_value = "nightshift-local")]
    stack_name: String,
    /// The emulator's server program (moto's, as `make venv` installs it).
    #[arg(
        long,
        default_value = ".venv/bin/nightshift-emulator",
        env = "NIGHTSHIFT_EMULATOR"
    )]
    emulator_bin: PathBuf,
    /// Port of the API (0: any free port).
    #[arg(long, default_value_t = 0)]
    api_port: u16,
    /// Template parameter overrides, KEY=VALUE.
    #[arg(long = "param", value_name = "KEY=VALUE")]
    params: Vec<String>,
    /// Seconds between scheduled dispatcher passes.
    #[arg(long, default_value_t = 3.0)]
    dispatch_every: f64,
    /// The worker program (default: next to this one).
    #[arg(long)]
    worker_bin: Option<PathBuf>,
    /// Dispatcher loops running at once (EventBridge may deliver a tick twice).
    #[arg(long, default_value_t = 1)]
    dispatchers: usize,
    /// Answer this share (0 to 1) of nightshift's own AWS calls with a
    /// fault: throttling, a 5xx, a conflicting transaction, a lost answer.
    #[arg(long)]
    faults: Option<f64>,
    /// The seed of the fault decisions.
    #[arg(long, default_value_t = 1)]
    fault_seed: u64,
}

impl StackArgs {
    /// The same arguments, for the background `serve` that `up` starts.
    fn to_args(&self) -> Vec<String> {
        let mut args = vec![
            "--template".to_owned(),
            absolute(&self.template).display().to_string(),
            "--stack-name".to_owned(),
            self.stack_name.clone(),
            "--emulator-bin".to_owned(),
            absolute(&self.emulator_bin).display().to_string(),
            "--api-port".to_owned(),
            self.api_port.to_string(),
            "--dispatch-every".to_owned(),
            self.dispatch_every.to_string(),
            "--dispatchers".to_owned(),
            self.dispatchers.to_string(),
            "--fault-seed".to_owned(),
            self.fault_seed.to_string(),
        ];
        if let Some(rate) = self.faults {
            args.extend(["--faults".to_owned(), rate.to_string()]);
        }
        for param in &self.params {
            args.extend(["--param".to_owned(), param.clone()]);
        }
        if let Some(worker) = &self.worker_bin {
            args.extend([
                "--worker-bin".to_owned(),
                absolute(worker).display().to_string(),
            ]);
        }
        args
    }

    fn serve_options(
        &self,
        emulator_port: Option<u16>,
        resources_only: bool,
    ) -> Result<local::serve::ServeOptions, CliError> {
        let parameters = self
            .params
            .iter()
            .map(|p| {
                p.split_once('=')
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .ok_or_else(|| CliError::Usage(format!("--param {p}: expected KEY=VALUE")))
            })
            .collect::<Result<BTreeMap<_, _>, _>>()?;
        if self.faults.is_some_and(|rate| !(0.0..=1.0).contains(&rate)) {
            return Err(CliError::Usage("--faults must be between 0 and 1".into()));
        }
        if !(self.dispatch_every.is_finite() && self.dispatch_every > 0.0) {
            return Err(CliError::Usage(
                "--dispatch-every must be a positive number of seconds".into(),
            ));
        }
        let worker_bin = match &self.worker_bin {
            Some(path) => path.clone(),
            None => std::env::current_exe()
                .map_err(|e| CliError::io(Path::new("current_exe"), e))?
                .with_file_name("nightshift-worker"),
        };
        Ok(local::serve::ServeOptions {
            state_dir: self.state_dir.clone(),
            template: self.template.clone(),
            stack_name: self.stack_name.clone(),
            emulator_port,
            emulator_bin: self.emulator_bin.clone(),
            api_port: self.api_port,
            parameters,
            dispatch_every: Duration::from_secs_f64(self.dispatch_every),
            worker_bin,
            resources_only,
            dispatchers: self.dispatchers,
            faults: self.faults,
            fault_seed: self.fault_seed,
        })
    }
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_owned())
}

fn main() -> ExitCode {
    // Output piped into `head` ends quietly, as other commands do, instead
    // of a failed write.
    sigpipe::reset();
    let cli = Cli::parse();
    let quiet = matches!(
        cli.command,
        Command::Local {
            command: LocalCommand::Serve { .. }
        }
    );
    init_logging(quiet);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(execute(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

/// JSON lines for the background stack; plain warnings for commands.
fn init_logging(serving: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        if serving {
            "info".into()
        } else {
            "warn".into()
        }
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if serving {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn execute(command: Command) -> Result<(), CliError> {
    match command {
        Command::Local { command } => execute_local(command).await,
        Command::Demo {
            accounts,
            kernel,
            api,
            timeout,
        } => {
            client::demo(
                &api.connect().await?,
                accounts,
                kernel.as_deref(),
                Duration::from_secs(timeout),
            )
            .await
        }
        Command::Dashboard { port, api } => {
            let api = api.connect().await?;
            let address = dashboard::address(port);
            let listener = tokio::net::TcpListener::bind(address)
                .await
                .map_err(|e| CliError::Local(format!("cannot listen on {address}: {e}")))?;
            dashboard::serve(api, listener).await
        }
        Command::Run { command } => match command {
            RunCommand::Start { json, api } => client::start_run(&api.connect().await?, json).await,
            RunCommand::Cancel { run_id, json, api } => {
                client::cancel_run(&api.connect().await?, &run_id, json).await
            }
            RunCommand::Status { run_id, json, api } => {
                client::show_run(&api.connect().await?, &run_id, json).await
            }
            RunCommand::Watch { run_id, json, api } => {
                let api = api.connect().await?;
                let run_id = watch::run_id_or_newest(&api, run_id).await?;
                watch::watch(&api, &run_id, json).await
            }
            RunCommand::Report {
                run_id,
                format,
                api,
            } => report::print(&api.connect().await?, &run_id, format).await,
        },
        Command::Submit { file, json, api } => {
            submit::submit(&api.connect().await?, &file, json).await
        }
        Command::Runs {
            command: RunsCommand::List { limit, json, api },
        } => client::list_runs(&api.connect().await?, limit, json).await,
        Command::Task {
            command: TaskCommand::Get { task_id, json, api },
        } => client::show_task(&api.connect().await?, &task_id, json).await,
        Command::Tasks {
            command:
                TasksCommand::List {
                    run,
                    status,
                    json,
                    api,
                },
        } => client::list_tasks(&api.connect().await?, &run, status.as_deref(), json).await,
    }
}

async fn execute_local(command: LocalCommand) -> Result<(), CliError> {
    match command {
        LocalCommand::Up {
            stack,
            aws_endpoint,
            timeout,
        } => {
            stack.serve_options(None, false)?;
            let options = local::UpOptions {
                state_dir: stack.state_dir.clone(),
                aws_endpoint,
                serve_args: stack.to_args(),
                timeout: Duration::from_secs(timeout),
            };
            let env = tokio::task::spawn_blocking(move || local::up(&options))
                .await
                .map_err(|e| CliError::Local(e.to_string()))??;
            println!(
                "local stack up: {}",
                stack.state_dir.join(local::ENV_FILE).display()
            );
            for (key, value) in env {
                println!("  {key}={value}");
            }
            Ok(())
        }
        LocalCommand::Down { state_dir } => {
            if local::down(&state_dir)? {
                println!("local stack stopped");
            } else {
                println!("no local stack was running");
            }
            Ok(())
        }
        LocalCommand::Status { state_dir } => client::local_status(&state_dir).await,
        LocalCommand::NightStart { state_dir } => client::night_start(&state_dir).await,
        LocalCommand::Interrupt {
            instance_id,
            state_dir,
        } => client::interrupt(&state_dir, &instance_id).await,
        LocalCommand::Serve {
            stack,
            emulator_port,
            resources_only,
        } => local::serve::serve(stack.serve_options(emulator_port, resources_only)?).await,
        LocalCommand::IamReport {
            calls,
            template,
            json,
        } => {
            let template = local::template::Template::load(&template)?;
            let usage = local::usage::Usage::of(&template, &local::usage::read_recorded(&calls)?)?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&usage)
                        .map_err(|e| CliError::Local(e.to_string()))?
                );
            } else {
                print!("{}", usage.table());
            }
            if usage.refused.is_empty() {
                Ok(())
            } else {
                Err(CliError::Local(format!(
                    "{} call(s) refused by their role's policies",
                    usage.refused.len()
                )))
            }
        }
    }
}

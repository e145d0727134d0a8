//! `nightshift local`: the whole system on one machine (see DESIGN.md).
//! `up` starts `serve` in the background and returns once the stack is
//! ready; `down` stops it; `status` tells what is there.

mod actions;
mod faults;
mod feeder;
mod imds;
mod policy;
mod proxy;
mod resolve;
pub mod serve;
mod stack;
pub mod template;
mod unit;
pub mod usage;
mod workers;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

pub use stack::read_env_file;

use crate::CliError;

/// Written last when the stack is ready; removed when it stops.
pub const ENV_FILE: &str = "local.env";
const PID_FILE: &str = "serve.pid";

#[derive(Debug, Clone)]
pub struct UpOptions {
    pub state_dir: PathBuf,
    pub aws_endpoint: Option<String>,
    /// Arguments passed through to `serve`.
    pub serve_args: Vec<String>,
    pub timeout: Duration,
}

pub fn up(options: &UpOptions) -> Result<BTreeMap<String, String>, CliError> {
    std::fs::create_dir_all(&options.state_dir).map_err(|e| CliError::io(&options.state_dir, e))?;
    if let Some(pid) = running_pid(&options.state_dir) {
        return Err(CliError::Local(format!(
            "a local stack is already running (pid {pid}); `nightshift local down` stops it"
        )));
    }
    let mut command = std::process::Command::new(
        std::env::current_exe().map_err(|e| CliError::io(Path::new("current_exe"), e))?,
    );
    command
        .args(["local", "serve", "--state-dir"])
        .arg(&options.state_dir)
        .args(&options.serve_args);
    let endpoint = match &options.aws_endpoint {
        Some(endpoint) => endpoint.clone(),
        None => {
            let port = free_port()?;
            command.args(["--emulator-port", &port.to_string()]);
            format!("http://127.0.0.1:{port}")
        }
    };
    command.env("AWS_ENDPOINT_URL", &endpoint);
    for (key, default) in [
        ("AWS_REGION", "us-east-1"),
        ("AWS_ACCESS_KEY_ID", "local"),
        ("AWS_SECRET_ACCESS_KEY", "local"),
    ] {
        if std::env::var_os(key).is_none() {
            command.env(key, default);
        }
    }
    let log_path = options.state_dir.join("serve.log");
    let log = std::fs::File::create(&log_path).map_err(|e| CliError::io(&log_path, e))?;
    let stderr = log.try_clone().map_err(|e| CliError::io(&log_path, e))?;
    // Its own process group: the stack outlives this command.
    use std::os::unix::process::CommandExt;
    let mut child = command
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(stderr)
        .process_group(0)
        .spawn()
        .map_err(|e| CliError::Local(format!("cannot start the local stack: {e}")))?;
    let pid_path = options.state_dir.join(PID_FILE);
    std::fs::write(&pid_path, child.id().to_string()).map_err(|e| CliError::io(&pid_path, e))?;
    let env_path = options.state_dir.join(ENV_FILE);
    let started = Instant::now();
    while started.elapsed() < options.timeout {
        if env_path.exists() {
            return read_env_file(&env_path);
        }
        if let Ok(Some(status)) = child.try_wait() {
            let _ = std::fs::remove_file(&pid_path);
            return Err(CliError::Local(format!(
                "the local stack exited ({status}) while starting:\n{}",
                tail(&log_path, 20)
            )));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = kill(pid_of(child.id()), Signal::SIGTERM);
    Err(CliError::Local(format!(
        "the local stack was not ready in {:?}; see {}",
        options.timeout,
        log_path.display()
    )))
}

pub fn down(state_dir: &Path) -> Result<bool, CliError> {
    let Some(pid) = running_pid(state_dir) else {
        let _ = std::fs::remove_file(state_dir.join(PID_FILE));
        return Ok(false);
    };
    let _ = kill(pid, Signal::SIGTERM);
    let started = Instant::now();
    while kill(pid, None).is_ok() && started.elapsed() < Duration::from_secs(40) {
        std::thread::sleep(Duration::from_millis(200));
    }
    if kill(pid, None).is_ok() {
        let _ = kill(pid, Signal::SIGKILL);
    }
    let _ = std::fs::remove_file(state_dir.join(PID_FILE));
    Ok(true)
}

/// The pid of a running `serve`, if its pid file names a live process.
pub fn running_pid(state_dir: &Path) -> Option<Pid> {
    let text = std::fs::read_to_string(state_dir.join(PID_FILE)).ok()?;
    let pid = Pid::from_raw(text.trim().parse().ok()?);
    kill(pid, None).is_ok().then_some(pid)
}

fn pid_of(id: u32) -> Pid {
    Pid::from_raw(i32::try_from(id).unwrap_or(i32::MAX))
}

fn free_port() -> Result<u16, CliError> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| CliError::io(Path::new("127.0.0.1:0"), e))?;
    Ok(listener
        .local_addr()
        .map_err(|e| CliError::io(Path::new("127.0.0.1:0"), e))?
        .port())
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

//! Bring your own program: kernels that run executables named in the
//! worker's configuration. A task names the program, never a path; the
//! worker runs it with no shell, in a process group of its own, with a clean
//! environment (only `PATH`), the payload on stdin, and takes the result from
//! stdout as JSON.
//!
//! A program that exits non-zero or runs out of time fails with its stderr
//! (retryable); one whose output is too large or not JSON fails permanently.
//! When the worker must stop (a spot interruption), the program's process
//! group gets SIGTERM, then SIGKILL after the grace period.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde::Deserialize;
use serde_json::Value;

use crate::{Control, Kernel, KernelError, Outcome};

const POLL: Duration = Duration::from_millis(10);
/// How much of the end of stderr an error keeps.
const STDERR_KEPT: usize = 4 * 1024;
/// How long the output readers may take to finish once the program is gone.
const DRAIN: Duration = Duration::from_secs(2);
const PATH: &str = "/usr/local/bin:/usr/bin:/bin";
const SUMMARY_CHARS: usize = 120;
/// A task message stays hidden for 12 hours at most, heartbeats included:
/// a program that does not checkpoint must end well within that.
const MAX_TIMEOUT_SECS: f64 = 11.0 * 3_600.0;

/// One program a worker offers, as its configuration describes it, e.g.
/// `{"path": "/opt/risk/bin/price", "args": ["--fast"], "timeout_secs": 600}`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProgramSpec {
    /// Absolute path of the executable.
    pub path: PathBuf,
    /// Its arguments, passed as they are.
    #[serde(default)]
    pub args: Vec<String>,
    /// How long it may run before it is killed.
    #[serde(default = "default_timeout")]
    pub timeout_secs: f64,
    /// The most bytes of stdout it may write.
    #[serde(default = "default_max_output")]
    pub max_output_bytes: usize,
    /// Between SIGTERM and SIGKILL when the worker must stop.
    #[serde(default = "default_grace")]
    pub grace_secs: f64,
}

fn default_timeout() -> f64 {
    3_600.0
}

fn default_max_output() -> usize {
    16 * 1024 * 1024
}

fn default_grace() -> f64 {
    10.0
}

/// A program the worker's configuration gets wrong.
#[derive(Debug, thiserror::Error)]
#[error("program {name:?}: {reason}")]
pub struct ProgramConfigError {
    pub name: String,
    pub reason: String,
}

impl ProgramSpec {
    fn check(&self, name: &str) -> Result<(), ProgramConfigError> {
        let reason = if name.is_empty() {
            "the name is empty"
        } else if !self.path.is_absolute() {
            "path must be absolute"
        } else if !(self.timeout_secs > 0.0 && self.timeout_secs <= MAX_TIMEOUT_SECS) {
            "timeout_secs must be above 0 and at most 11 hours (a task message stays hidden for 12 at most)"
        } else if self.max_output_bytes == 0 {
            "max_output_bytes must be above 0"
        } else if !(self.grace_secs.is_finite() && (0.0..=60.0).contains(&self.grace_secs)) {
            "grace_secs must be between 0 and 60"
        } else {
            return Ok(());
        };
        Err(ProgramConfigError {
            name: name.to_owned(),
            reason: reason.to_owned(),
        })
    }
}

#[derive(Debug, Clone)]
pub struct ProgramKernel {
    name: String,
    spec: ProgramSpec,
}

impl ProgramKernel {
    pub fn new(name: &str, spec: ProgramSpec) -> Result<Self, ProgramConfigError> {
        spec.check(name)?;
        Ok(Self {
            name: name.to_owned(),
            spec,
        })
    }

    fn fail(&self, message: impl std::fmt::Display) -> String {
        format!("program {}: {message}", self.name)
    }
}

/// Why the program stopped running.
enum End {
    Exited(ExitStatus),
    TimedOut,
    OutputTooLarge,
    Stopped,
    /// The child could not be waited for.
    Lost(std::io::Error),
}

impl Kernel for ProgramKernel {
    fn run(
        &self,
        payload: &Value,
        _checkpoint: Option<&[u8]>,
        control: &Control,
    ) -> Result<Outcome, KernelError> {
        if control.should_stop() {
            return Ok(Outcome::Stopped { checkpoint: None });
        }
        let mut child = self.spawn()?;
        // Its own process group, whose id is its pid (which fits: pid_max < 2^22).
        let group = Pid::from_raw(child.id() as i32);
        let (stdin, stdout, stderr) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take());
        let input = payload.to_string().into_bytes();
        std::thread::spawn(move || {
            // A program that does not read its input closes the pipe: not an error.
            if let Some(mut stdin) = stdin {
                let _ = stdin.write_all(&input);
            }
        });
        let too_large = Arc::new(AtomicBool::new(false));
        let output = read_output(stdout, self.spec.max_output_bytes, Arc::clone(&too_large));
        let errors = std::thread::spawn(move || stderr.map(read_tail).unwrap_or_default());

        let end = self.wait(&mut child, group, control, &too_large);
        // Whatever the program left running in its group goes with it.
        let _ = killpg(group, Signal::SIGKILL);
        let output = finish(output);
        let stderr = finish(errors).unwrap_or_default();
        self.outcome(end, output, String::from_utf8_lossy(&stderr).trim())
    }
}

impl ProgramKernel {
    fn spawn(&self) -> Result<Child, KernelError> {
        Command::new(&self.spec.path)
            .args(&self.spec.args)
            .env_clear()
            .env("PATH", PATH)
            .process_group(0)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| {
                let path = self.spec.path.display();
                KernelError::Permanent(self.fail(format!("cannot start {path}: {e}")))
            })
    }

    fn outcome(
        &self,
        end: End,
        output: Option<Vec<u8>>,
        stderr: &str,
    ) -> Result<Outcome, KernelError> {
        let with_stderr = |message: String| {
            if stderr.is_empty() {
                message
            } else {
                format!("{message}: {stderr}")
            }
        };
        match end {
            End::Stopped => Ok(Outcome::Stopped { checkpoint: None }),
            End::TimedOut => Err(KernelError::Retryable(with_stderr(
                self.fail(format!("timed out after {}s", self.spec.timeout_secs)),
            ))),
            End::OutputTooLarge => Err(KernelError::Permanent(self.fail(format!(
                "wrote more than max_output_bytes ({})",
                self.spec.max_output_bytes
            )))),
            End::Lost(e) => Err(KernelError::Retryable(
                self.fail(format!("lost track of it: {e}")),
            )),
            End::Exited(status) if !status.success() => {
                Err(KernelError::Retryable(with_stderr(self.fail(status))))
            }
            End::Exited(_) => {
                let output = output.ok_or_else(|| {
                    KernelError::Retryable(self.fail("left its output open after it exited"))
                })?;
                let result: Value = serde_json::from_slice(&output).map_err(|e| {
                    KernelError::Permanent(self.fail(format!("output is not JSON: {e}")))
                })?;
                let summary = self.summary(&result, output.len());
                Ok(Outcome::Done { result, summary })
            }
        }
    }

    fn wait(
        &self,
        child: &mut Child,
        group: Pid,
        control: &Control,
        too_large: &AtomicBool,
    ) -> End {
        let started = Instant::now();
        let timeout = Duration::from_secs_f64(self.spec.timeout_secs);
        let grace = Duration::from_secs_f64(self.spec.grace_secs);
        let mut terminated: Option<Instant> = None;
        let mut killed: Option<End> = None;
        loop {
            match child.try_wait() {
                Ok(None) => {}
                Ok(Some(status)) => {
                    return match (killed, terminated) {
                        (Some(reason), _) => reason,
                        (None, _) if too_large.load(Ordering::SeqCst) => End::OutputTooLarge,
                        (None, Some(_)) => End::Stopped,
                        (None, None) => End::Exited(status),
                    };
                }
                Err(e) => return End::Lost(e),
            }
            if killed.is_none() {
                let reason = if too_large.load(Ordering::SeqCst) {
                    Some(End::OutputTooLarge)
                } else if started.elapsed() >= timeout {
                    Some(End::TimedOut)
                } else if terminated.is_some_and(|at| at.elapsed() >= grace) {
                    Some(End::Stopped)
                } else {
                    None
                };
                if let Some(reason) = reason {
                    let _ = killpg(group, Signal::SIGKILL);
                    killed = Some(reason);
                } else if terminated.is_none() && control.should_stop() {
                    let _ = killpg(group, Signal::SIGTERM);
                    terminated = Some(Instant::now());
                }
            }
            std::thread::sleep(POLL);
        }
    }

    /// The result's own `summary` if it has one, else a note of its size.
    fn summary(&self, result: &Value, bytes: usize) -> String {
        match result.get("summary").and_then(Value::as_str) {
            Some(line) => line
                .lines()
                .next()
                .unwrap_or_default()
                .chars()
                .take(SUMMARY_CHARS)
                .collect(),
            None => format!("{}: {bytes} bytes of JSON", self.name),
        }
    }
}

/// Reads stdout up to `limit` bytes; past it, raises `too_large` and stops.
fn read_output(
    stdout: Option<impl Read + Send + 'static>,
    limit: usize,
    too_large: Arc<AtomicBool>,
) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut output = Vec::new();
        if let Some(stdout) = stdout {
            let mut stdout = stdout.take(limit as u64 + 1);
            let _ = stdout.read_to_end(&mut output);
            // Raised before the pipe closes, which may kill the program (SIGPIPE).
            if output.len() > limit {
                too_large.store(true, Ordering::SeqCst);
            }
        }
        output
    })
}

/// Reads a stream to its end and keeps the last `STDERR_KEPT` bytes.
fn read_tail(mut stream: impl Read) -> Vec<u8> {
    let mut tail = Vec::new();
    let mut buffer = [0; 8192];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => tail.extend_from_slice(&buffer[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
        if tail.len() > 2 * STDERR_KEPT {
            tail.drain(..tail.len() - STDERR_KEPT);
        }
    }
    if tail.len() > STDERR_KEPT {
        tail.drain(..tail.len() - STDERR_KEPT);
    }
    tail
}

/// The thread's result, unless it is still blocked after `DRAIN` (a process
/// that left the group still holds the pipe).
fn finish<T>(handle: JoinHandle<T>) -> Option<T> {
    let deadline = Instant::now() + DRAIN;
    while !handle.is_finished() && Instant::now() < deadline {
        std::thread::sleep(POLL);
    }
    if handle.is_finished() {
        handle.join().ok()
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use serde_json::json;

    use super::*;
    use crate::Registry;

    /// A kernel running `script` with /bin/sh (the kernel itself uses no shell).
    fn kernel(dir: &Path, script: &str, tweak: impl FnOnce(&mut ProgramSpec)) -> ProgramKernel {
        let file = dir.join(format!("script-{}.sh", rng_name()));
        std::fs::write(&file, script).expect("script written");
        let mut spec = ProgramSpec {
            path: "/bin/sh".into(),
            args: vec![file.display().to_string()],
            timeout_secs: 10.0,
            max_output_bytes: 1024,
            grace_secs: 5.0,
        };
        tweak(&mut spec);
        ProgramKernel::new("test", spec).expect("valid spec")
    }

    fn rng_name() -> u64 {
        use std::sync::atomic::AtomicU64;
        static NEXT: AtomicU64 = AtomicU64::new(0);
        NEXT.fetch_add(1, Ordering::SeqCst)
    }

    fn run(kernel: &ProgramKernel, payload: &Value) -> Result<Outcome, KernelError> {
        kernel.run(payload, None, &Control::new())
    }

    #[test]
    fn payload_in_result_out() {
        let dir = tempfile::tempdir().expect("tempdir");
        let echo = kernel(dir.path(), "cat", |_| {});
        let payload = json!({"x": [1, 2, 3], "summary": "three numbers\nand more"});
        let Ok(Outcome::Done { result, summary }) = run(&echo, &payload) else {
            panic!("expected a result")
        };
        assert_eq!(result, payload);
        assert_eq!(summary, "three numbers");
    }

    #[test]
    fn arguments_reach_the_program_untouched() {
        let dir = tempfile::tempdir().expect("tempdir");
        let script = r#"printf '{"first": "%s", "second": "%s", "path": "%s"}' "$1" "$2" "$PATH""#;
        let program = kernel(dir.path(), script, |spec| {
            spec.args
                .extend(["a b; echo no".to_owned(), "$HOME".to_owned()]);
        });
        let Ok(Outcome::Done { result, summary }) = run(&program, &json!(null)) else {
            panic!("expected a result")
        };
        assert_eq!(
            result,
            json!({"first": "a b; echo no", "second": "$HOME", "path": PATH})
        );
        assert!(summary.starts_with("test: "), "{summary}");
    }

    #[test]
    fn a_failure_keeps_stderr_and_is_retryable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let program = kernel(dir.path(), "echo 'bad day' >&2; exit 3", |_| {});
        match run(&program, &json!({})) {
            Err(KernelError::Retryable(message)) => {
                assert!(
                    message.contains("exit status: 3") && message.ends_with("bad day"),
                    "{message}"
                );
            }
            other => panic!("expected a retryable error, got {other:?}"),
        }
    }

    #[test]
    fn output_that_is_not_json_or_too_large_is_permanent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let not_json = kernel(dir.path(), "echo hello", |_| {});
        assert!(
            matches!(run(&not_json, &json!({})), Err(KernelError::Permanent(m)) if m.contains("not JSON"))
        );
        let flood = kernel(dir.path(), "while :; do echo 0123456789; done", |_| {});
        let started = Instant::now();
        assert!(
            matches!(run(&flood, &json!({})), Err(KernelError::Permanent(m)) if m.contains("max_output_bytes"))
        );
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn a_large_payload_the_program_ignores_is_fine() {
        let dir = tempfile::tempdir().expect("tempdir");
        let program = kernel(dir.path(), "echo '{}'", |_| {});
        let payload = json!({"blob": "x".repeat(1 << 20)});
        assert!(matches!(run(&program, &payload), Ok(Outcome::Done { .. })));
    }

    #[test]
    fn killed_at_the_timeout_with_its_children() {
        let dir = tempfile::tempdir().expect("tempdir");
        let program = kernel(dir.path(), "echo started >&2; sleep 30", |spec| {
            spec.timeout_secs = 1.0
        });
        let started = Instant::now();
        match run(&program, &json!({})) {
            Err(KernelError::Retryable(message)) => {
                assert!(
                    message.contains("timed out") && message.ends_with("started"),
                    "{message}"
                );
            }
            other => panic!("expected a timeout, got {other:?}"),
        }
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
    }

    /// Asks `control` to stop once the script has created `ready`, and
    /// returns when it did.
    fn stop_when_ready(control: &Control, ready: &Path) -> std::thread::JoinHandle<Instant> {
        let (control, ready) = (control.clone(), ready.to_owned());
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !ready.exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            control.request_stop();
            Instant::now()
        })
    }

    #[test]
    fn a_stop_sends_sigterm_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (ready, marker) = (dir.path().join("ready"), dir.path().join("got-term"));
        let script = format!(
            "trap 'touch {}; exit 0' TERM; touch {}; while :; do sleep 0.05; done",
            marker.display(),
            ready.display()
        );
        let program = kernel(dir.path(), &script, |_| {});
        let control = Control::new();
        let stopper = stop_when_ready(&control, &ready);
        let outcome = program.run(&json!({}), None, &control).expect("stops");
        let asked = stopper.join().expect("stopper");
        assert_eq!(outcome, Outcome::Stopped { checkpoint: None });
        assert!(marker.exists(), "the program saw no SIGTERM");
        assert!(
            asked.elapsed() < Duration::from_secs(3),
            "{:?}",
            asked.elapsed()
        );
    }

    #[test]
    fn a_program_ignoring_sigterm_is_killed_after_the_grace_period() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ready = dir.path().join("ready");
        let script = format!("trap '' TERM; touch {}; sleep 30", ready.display());
        let program = kernel(dir.path(), &script, |spec| spec.grace_secs = 0.3);
        let control = Control::new();
        let stopper = stop_when_ready(&control, &ready);
        let outcome = program.run(&json!({}), None, &control).expect("stops");
        let waited = stopper.join().expect("stopper").elapsed();
        assert_eq!(outcome, Outcome::Stopped { checkpoint: None });
        assert!(
            waited >= Duration::from_millis(300) && waited < Duration::from_secs(3),
            "{waited:?}"
        );
    }

    #[test]
    fn a_missing_executable_is_permanent() {
        let spec = ProgramSpec {
            path: "/nonexistent/program".into(),
            args: Vec::new(),
            timeout_secs: 1.0,
            max_output_bytes: 10,
            grace_secs: 1.0,
        };
        let program = ProgramKernel::new("gone", spec).expect("valid spec");
        assert!(
            matches!(run(&program, &json!({})), Err(KernelError::Permanent(m)) if m.contains("cannot start"))
        );
    }

    #[test]
    fn the_registry_offers_configured_programs_by_name_only() {
        let spec: ProgramSpec = serde_json::from_value(json!({"path": "/bin/true"})).expect("spec");
        assert_eq!(
            (spec.timeout_secs, spec.max_output_bytes, spec.grace_secs),
            (3_600.0, 16 << 20, 10.0)
        );
        let registry =
            Registry::with_programs([("true".to_owned(), spec.clone())]).expect("registry");
        let names: Vec<&str> = registry.names().collect();
        assert_eq!(names, ["portfolio-risk", "sleep", "true"]);

        let taken = Registry::with_programs([("sleep".to_owned(), spec.clone())]).unwrap_err();
        assert!(taken.to_string().contains("sleep"), "{taken}");
        let relative = ProgramSpec {
            path: "bin/true".into(),
            ..spec.clone()
        };
        assert!(Registry::with_programs([("rel".to_owned(), relative)]).is_err());
        let no_time = ProgramSpec {
            timeout_secs: 0.0,
            ..spec
        };
        assert!(Registry::with_programs([("t".to_owned(), no_time)]).is_err());
        let unknown =
            serde_json::from_value::<ProgramSpec>(json!({"path": "/bin/true", "shell": true}));
        assert!(unknown.is_err());
    }

    #[test]
    fn stderr_keeps_its_end() {
        let long: Vec<u8> = (0..20_000_u32)
            .flat_map(|i| i.to_string().into_bytes())
            .collect();
        let tail = read_tail(&long[..]);
        assert_eq!(tail.len(), STDERR_KEPT);
        assert!(long.ends_with(&tail));
    }
}

//! The worker's systemd unit, read for the local stack: what systemd does
//! when the worker process ends (restart it, or power the instance off), so
//! the local supervisor does what the unit says and nothing of its own. A
//! unit that would leave a stopped worker's instance running leaves it
//! running here too, where the tests see it.

use std::time::{Duration, Instant};

/// The settings of `nightshift-worker.service` that decide what follows an
/// exit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unit {
    /// `Restart=`: `no`, `on-failure`, `always`, ...
    pub restart: String,
    pub restart_sec: Duration,
    pub start_limit_interval: Duration,
    pub start_limit_burst: usize,
    /// `StartLimitAction=`, taken when the start limit is hit.
    pub start_limit_action: String,
    /// `SuccessAction=`, taken when the service exits with success.
    pub success_action: String,
    /// `Environment=` assignments (the `EnvironmentFile=` comes on top).
    pub environment: Vec<(String, String)>,
}

/// What follows a worker's exit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AfterExit {
    Restart {
        after: Duration,
    },
    /// The instance powers off; the unit setting that said so.
    PowerOff {
        because: &'static str,
    },
    /// Nothing: the instance stays up without a worker.
    Nothing,
}

impl Unit {
    /// Reads the unit's text; systemd's defaults fill what it does not say.
    pub fn parse(text: &str) -> Self {
        let mut unit = Self {
            restart: "no".into(),
            restart_sec: Duration::from_millis(100),
            start_limit_interval: Duration::from_secs(10),
            start_limit_burst: 5,
            start_limit_action: "none".into(),
            success_action: "none".into(),
            environment: Vec::new(),
        };
        for line in text.lines().map(str::trim) {
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            let value = value.trim().to_owned();
            match key.trim() {
                "Environment" => {
                    if let Some((name, value)) = value.trim_matches('"').split_once('=') {
                        unit.environment.push((name.to_owned(), value.to_owned()));
                    }
                }
                "Restart" => unit.restart = value,
                "RestartSec" => unit.restart_sec = seconds(&value).unwrap_or(unit.restart_sec),
                "StartLimitIntervalSec" => {
                    unit.start_limit_interval = seconds(&value).unwrap_or(unit.start_limit_interval)
                }
                "StartLimitBurst" => {
                    unit.start_limit_burst = value.parse().unwrap_or(unit.start_limit_burst)
                }
                "StartLimitAction" => unit.start_limit_action = value,
                "SuccessAction" => unit.success_action = value,
                _ => {}
            }
        }
        unit
    }

    /// What systemd does when the worker exits, given when it was started
    /// before (the latest start included).
    pub fn after_exit(&self, success: bool, starts: &[Instant], now: Instant) -> AfterExit {
        let restarts = match self.restart.as_str() {
            "always" => true,
            "on-failure" | "on-abnormal" => !success,
            _ => false,
        };
        if !restarts {
            return if success && powers_off(&self.success_action) {
                AfterExit::PowerOff {
                    because: "SuccessAction",
                }
            } else {
                AfterExit::Nothing
            };
        }
        let recent = starts
            .iter()
            .filter(|at| now.duration_since(**at) < self.start_limit_interval)
            .count();
        if recent >= self.start_limit_burst {
            return if powers_off(&self.start_limit_action) {
                AfterExit::PowerOff {
                    because: "StartLimitAction",
                }
            } else {
                AfterExit::Nothing
            };
        }
        AfterExit::Restart {
            after: self.restart_sec,
        }
    }
}

fn powers_off(action: &str) -> bool {
    matches!(
        action,
        "poweroff" | "poweroff-force" | "poweroff-immediate" | "halt" | "halt-force"
    )
}

/// A systemd time span in plain seconds, or with an `s`/`min` suffix.
fn seconds(value: &str) -> Option<Duration> {
    if let Some(minutes) = value.strip_suffix("min") {
        return minutes
            .trim()
            .parse()
            .ok()
            .map(|m: u64| Duration::from_secs(m * 60));
    }
    value
        .trim_end_matches('s')
        .trim()
        .parse()
        .ok()
        .map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn real_unit() -> Unit {
        let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR").expect("run through cargo test");
        let path =
            std::path::Path::new(&manifest_dir).join("../worker-ami/nightshift-worker.service");
        Unit::parse(&std::fs::read_to_string(path).unwrap())
    }

    #[test]
    fn a_worker_that_stops_powers_its_instance_off() {
        let now = Instant::now();
        assert_eq!(
            real_unit().after_exit(true, &[now], now),
            AfterExit::PowerOff {
                because: "SuccessAction"
            }
        );
    }

    #[test]
    fn a_failing_worker_is_restarted_then_its_instance_powered_off() {
        let unit = real_unit();
        let now = Instant::now();
        assert!(matches!(
            unit.after_exit(false, &[now], now),
            AfterExit::Restart { .. }
        ));
        let starts = vec![now; unit.start_limit_burst];
        assert_eq!(
            unit.after_exit(false, &starts, now),
            AfterExit::PowerOff {
                because: "StartLimitAction"
            }
        );
    }

    #[test]
    fn a_unit_without_actions_leaves_the_instance_up() {
        let unit = Unit::parse("[Service]\nRestart=on-failure\n");
        let now = Instant::now();
        assert_eq!(unit.after_exit(true, &[now], now), AfterExit::Nothing);
        assert_eq!(unit.after_exit(false, &[now; 5], now), AfterExit::Nothing);
    }
}

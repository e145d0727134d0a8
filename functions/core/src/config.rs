//! Configuration comes from an environment, read once at start-up: the
//! process's on AWS, and on the local stack the one the template declares
//! for the function, so what the tests run is what is deployed.

use std::collections::BTreeMap;
use std::str::FromStr;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("environment variable {0} is not set")]
    Missing(&'static str),
    #[error("environment variable {name} has an invalid value {value:?}")]
    Invalid { name: &'static str, value: String },
}

/// Where configuration is read from.
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;
}

/// The process's environment.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl Env for BTreeMap<String, String> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).cloned()
    }
}

/// A variable that must be set.
pub fn required(env: &dyn Env, name: &'static str) -> Result<String, ConfigError> {
    env.var(name)
        .filter(|v| !v.is_empty())
        .ok_or(ConfigError::Missing(name))
}

/// A variable that may be unset or empty.
pub fn optional(env: &dyn Env, name: &'static str) -> String {
    env.var(name).unwrap_or_default()
}

/// A variable with a default, parsed into `T`.
/// The night's end and time zone (`NIGHTSHIFT_NIGHT_END`, `HH:MM`, and
/// `NIGHTSHIFT_TIMEZONE`, an IANA name), 06:00 in London unless set.
pub fn night_window(env: &dyn Env) -> Result<crate::night::NightWindow, ConfigError> {
    let end = env
        .var("NIGHTSHIFT_NIGHT_END")
        .unwrap_or_else(|| "06:00".into());
    let timezone = env
        .var("NIGHTSHIFT_TIMEZONE")
        .unwrap_or_else(|| "Europe/London".into());
    crate::night::NightWindow::parse(&end, &timezone).map_err(|_| ConfigError::Invalid {
        name: "NIGHTSHIFT_NIGHT_END or NIGHTSHIFT_TIMEZONE",
        value: format!("{end} {timezone}"),
    })
}

/// The interval of an EventBridge `rate(N unit)` expression; `None` for
/// any other (a `cron(...)`, or a typo).
pub fn rate_interval(expression: &str) -> Option<std::time::Duration> {
    let inner = expression.trim().strip_prefix("rate(")?.strip_suffix(')')?;
    let (value, unit) = inner.trim().split_once(' ')?;
    let value: u64 = value.parse().ok()?;
    let unit_seconds = match unit.trim() {
        "minute" | "minutes" => 60,
        "hour" | "hours" => 3600,
        "day" | "days" => 86_400,
        _ => return None,
    };
    (value > 0).then(|| std::time::Duration::from_secs(value * unit_seconds))
}

/// A comma-separated list that must name at least one item.
pub fn required_list(env: &dyn Env, name: &'static str) -> Result<Vec<String>, ConfigError> {
    let items = list(env, name);
    if items.is_empty() {
        return Err(ConfigError::Missing(name));
    }
    Ok(items)
}

/// A comma-separated list; empty when not set.
pub fn list(env: &dyn Env, name: &'static str) -> Vec<String> {
    optional(env, name)
        .split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(str::to_owned)
        .collect()
}

pub fn parsed_or<T: FromStr>(
    env: &dyn Env,
    name: &'static str,
    default: T,
) -> Result<T, ConfigError> {
    match env.var(name) {
        Some(value) if !value.is_empty() => value
            .parse()
            .map_err(|_| ConfigError::Invalid { name, value }),
        _ => Ok(default),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_rate_expression_gives_its_interval_and_anything_else_none() {
        assert_eq!(
            rate_interval("rate(5 minutes)"),
            Some(Duration::from_secs(300))
        );
        assert_eq!(
            rate_interval("rate(1 minute)"),
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            rate_interval(" rate(2 hours) "),
            Some(Duration::from_secs(7200))
        );
        for other in [
            "cron(0 22 * * ? *)",
            "rate(0 minutes)",
            "rate(5 fortnights)",
            "rate(five minutes)",
            "",
        ] {
            assert_eq!(rate_interval(other), None, "{other}");
        }
    }
}

//! Configuration comes from the environment, read once at start-up.

use std::str::FromStr;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("environment variable {0} is not set")]
    Missing(&'static str),
    #[error("environment variable {name} has an invalid value {value:?}")]
    Invalid { name: &'static str, value: String },
}

/// A variable that must be set.
pub fn required(name: &'static str) -> Result<String, ConfigError> {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .ok_or(ConfigError::Missing(name))
}

/// A variable with a default, parsed into `T`.
pub fn parsed_or<T: FromStr>(name: &'static str, default: T) -> Result<T, ConfigError> {
    match std::env::var(name) {
        Ok(value) if !value.is_empty() => value
            .parse()
            .map_err(|_| ConfigError::Invalid { name, value }),
        _ => Ok(default),
    }
}

/// A required variable parsed into `T`.
pub fn required_parsed<T: FromStr>(name: &'static str) -> Result<T, ConfigError> {
    let value = required(name)?;
    value
        .parse()
        .map_err(|_| ConfigError::Invalid { name, value })
}

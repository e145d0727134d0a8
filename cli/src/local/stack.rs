//! The template's data resources as a CloudFormation stack in the emulator,
//! and the environment file that points every client at them.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use aws_sdk_cloudformation::Client;
use aws_sdk_cloudformation::types::{Parameter, StackStatus};

use super::template::Template;
use crate::CliError;

/// Creates the stack and waits for it; returns its outputs by name.
pub async fn create(
    client: &Client,
    name: &str,
    template: &Template,
    parameters: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, CliError> {
    let body = template.without_functions()?;
    let declared = body["Parameters"].as_object().cloned().unwrap_or_default();
    let parameters: Vec<Parameter> = parameters
        .iter()
        .filter(|(key, _)| declared.contains_key(*key))
        .map(|(key, value)| {
            Parameter::builder()
                .parameter_key(key)
                .parameter_value(value)
                .build()
        })
        .collect();
    client
        .create_stack()
        .stack_name(name)
        .template_body(body.to_string())
        .set_parameters(Some(parameters))
        .send()
        .await
        .map_err(|e| CliError::aws("CreateStack", e))?;
    for _ in 0..600 {
        let output = client
            .describe_stacks()
            .stack_name(name)
            .send()
            .await
            .map_err(|e| CliError::aws("DescribeStacks", e))?;
        let Some(stack) = output.stacks().first() else {
            return Err(CliError::Local(format!("stack {name} vanished")));
        };
        match stack.stack_status() {
            Some(StackStatus::CreateComplete) => {
                return Ok(stack
                    .outputs()
                    .iter()
                    .filter_map(|o| {
                        Some((o.output_key()?.to_owned(), o.output_value()?.to_owned()))
                    })
                    .collect());
            }
            Some(StackStatus::CreateInProgress) | None => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Some(other) => {
                return Err(CliError::Local(format!(
                    "stack {name} ended {other:?}: {}",
                    stack.stack_status_reason().unwrap_or("no reason given")
                )));
            }
        }
    }
    Err(CliError::Local(format!(
        "stack {name} was not created in time"
    )))
}

/// Each resource's type and physical id by logical id, and the account the
/// stack lives in (from the stack's id, an ARN, which each resource names).
pub async fn physical(
    client: &Client,
    name: &str,
) -> Result<(BTreeMap<String, (String, String)>, String), CliError> {
    let resources = client
        .describe_stack_resources()
        .stack_name(name)
        .send()
        .await
        .map_err(|e| CliError::aws("DescribeStackResources", e))?;
    let account = resources
        .stack_resources()
        .iter()
        .find_map(|r| r.stack_id()?.split(':').nth(4))
        .ok_or_else(|| CliError::Local(format!("stack {name} has no id")))?
        .to_owned();
    let physical = resources
        .stack_resources()
        .iter()
        .filter_map(|r| {
            Some((
                r.logical_resource_id()?.to_owned(),
                (
                    r.resource_type()?.to_owned(),
                    r.physical_resource_id()?.to_owned(),
                ),
            ))
        })
        .collect();
    Ok((physical, account))
}

/// Writes `KEY=value` lines atomically: the file appears whole or not at all.
pub fn write_env_file(path: &Path, values: &BTreeMap<String, String>) -> Result<(), CliError> {
    let text: String = values.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
    let partial = path.with_extension("env.partial");
    std::fs::write(&partial, text).map_err(|e| CliError::io(&partial, e))?;
    std::fs::rename(&partial, path).map_err(|e| CliError::io(path, e))
}

pub fn read_env_file(path: &Path) -> Result<BTreeMap<String, String>, CliError> {
    let text = std::fs::read_to_string(path).map_err(|e| CliError::io(path, e))?;
    Ok(text
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect())
}

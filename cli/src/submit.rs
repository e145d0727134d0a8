//! `nightshift submit FILE`: tasks from JSON lines, in batches, each line
//! keyed by the file's content and its number, so that running the same
//! command again after a failure creates nothing twice.

use std::io::{IsTerminal, Read};
use std::path::Path;

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use serde_json::{Map, Value, json};

use crate::CliError;
use crate::api::Api;

/// The API's most tasks a request.
const BATCH_TASKS: usize = 1000;
/// A request's body stays under API Gateway's and Lambda's limits.
const BATCH_BYTES: usize = 5 * 1024 * 1024;

/// The ids the keys of one file are derived in.
const FILE_NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x6e69_6768_7473_6869_6674_2d66_696c_6573);

/// A line the API did not take, and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Rejected {
    pub line: usize,
    pub code: String,
    pub field: Option<String>,
    pub message: String,
}

#[derive(Debug, Default, Serialize)]
pub struct Summary {
    pub lines: usize,
    pub accepted: usize,
    /// Of the accepted, those written by this run (the rest were there).
    pub created: u64,
    pub rejected: Vec<Rejected>,
    pub task_ids: Vec<String>,
}

/// One line to send: its number and its task, keyed.
struct Line {
    number: usize,
    task: Value,
    bytes: usize,
}

/// Reads the file (`-`: standard input) and submits every line.
pub async fn submit(api: &Api, file: &Path, json_output: bool) -> Result<(), CliError> {
    let text = read(file)?;
    let (lines, mut rejected) = parse(&text);
    let total = lines.len() + rejected.len();
    let bar = progress(total as u64);
    bar.inc(rejected.len() as u64);
    let mut summary = Summary {
        lines: total,
        ..Summary::default()
    };
    for batch in batches(lines) {
        let sent = batch.len();
        let outcome = send_batch(api, batch, &mut rejected).await?;
        summary.accepted += outcome.0.len();
        summary.task_ids.extend(outcome.0);
        summary.created += outcome.1;
        bar.inc(sent as u64);
        if bar.is_hidden() && !json_output {
            eprintln!("submitted {} of {total} lines", bar.position());
        }
    }
    bar.finish_and_clear();
    rejected.sort_by_key(|r| r.line);
    summary.rejected = rejected;
    print_summary(&summary, json_output);
    if summary.rejected.is_empty() {
        Ok(())
    } else {
        Err(CliError::Rejected(summary.rejected.len()))
    }
}

fn read(file: &Path) -> Result<String, CliError> {
    if file == Path::new("-") {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|e| CliError::io(file, e))?;
        return Ok(text);
    }
    std::fs::read_to_string(file).map_err(|e| CliError::io(file, e))
}

fn progress(total: u64) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:40}] {pos}/{len} lines")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

/// The lines as tasks, each with its key (a line's own key is kept), and
/// the lines that are not a task object.
fn parse(text: &str) -> (Vec<Line>, Vec<Rejected>) {
    let file = uuid::Uuid::new_v5(&FILE_NAMESPACE, text.as_bytes());
    let mut lines = Vec::new();
    let mut rejected = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let number = index + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let mut task: Map<String, Value> = match serde_json::from_str(raw) {
            Ok(Value::Object(task)) => task,
            Ok(_) => {
                rejected.push(local_rejection(number, "not a JSON object"));
                continue;
            }
            Err(e) => {
                rejected.push(local_rejection(number, &format!("not JSON: {e}")));
                continue;
            }
        };
        task.entry("idempotency_key")
            .or_insert_with(|| json!(format!("{file}:{number}")));
        let task = Value::Object(task);
        lines.push(Line {
            number,
            bytes: task.to_string().len() + 1,
            task,
        });
    }
    (lines, rejected)
}

fn local_rejection(line: usize, message: &str) -> Rejected {
    Rejected {
        line,
        code: "malformed_line".into(),
        field: None,
        message: message.into(),
    }
}

/// Lines in requests the API takes: by count and by bytes.
fn batches(lines: Vec<Line>) -> Vec<Vec<Line>> {
    nightshift_core::limits::batches(lines, BATCH_TASKS, BATCH_BYTES, |line| line.bytes)
}

/// Sends a batch. The API takes a request whole or not at all and names
/// the task it refused: that line is set aside with the reason and the
/// rest sent again. Returns the ids taken and how many were created.
async fn send_batch(
    api: &Api,
    mut batch: Vec<Line>,
    rejected: &mut Vec<Rejected>,
) -> Result<(Vec<String>, u64), CliError> {
    while !batch.is_empty() {
        let tasks: Vec<&Value> = batch.iter().map(|l| &l.task).collect();
        let body = json!({ "tasks": tasks });
        match send_with_retries(api, &body).await {
            Ok(answer) => {
                let ids = answer["task_ids"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|id| id.as_str().map(str::to_owned))
                    .collect();
                return Ok((ids, answer["created"].as_u64().unwrap_or(0)));
            }
            Err(CliError::Api { status, body }) if (400..500).contains(&status) => {
                let error: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
                let field = error["error"]["field"].as_str().map(str::to_owned);
                let Some(index) = field.as_deref().and_then(task_index) else {
                    // Not about one task: every line of the batch shares it.
                    rejected.extend(
                        batch
                            .iter()
                            .map(|line| refusal(line.number, &error, status)),
                    );
                    return Ok((Vec::new(), 0));
                };
                if index >= batch.len() {
                    return Err(CliError::Api { status, body });
                }
                let line = batch.remove(index);
                let mut refused = refusal(line.number, &error, status);
                // The field as the line knows it: `payload`, not `tasks[7].payload`.
                refused.field = field.map(|f| {
                    f.split_once("].")
                        .map_or(String::new(), |(_, rest)| rest.to_owned())
                });
                rejected.push(refused);
            }
            Err(other) => return Err(other),
        }
    }
    Ok((Vec::new(), 0))
}

fn refusal(line: usize, error: &Value, status: u16) -> Rejected {
    Rejected {
        line,
        code: error["error"]["code"]
            .as_str()
            .unwrap_or("refused")
            .to_owned(),
        field: error["error"]["field"].as_str().map(str::to_owned),
        message: error["error"]["message"]
            .as_str()
            .map_or_else(|| format!("HTTP {status}"), str::to_owned),
    }
}

/// The task a field names: `tasks[7].payload` → 7.
fn task_index(field: &str) -> Option<usize> {
    field
        .strip_prefix("tasks[")?
        .split(']')
        .next()?
        .parse()
        .ok()
}

/// A request the API could not take for now is tried again, with
/// exponential backoff and jitter; one it refused is not.
async fn send_with_retries(api: &Api, body: &Value) -> Result<Value, CliError> {
    let mut attempt = 0;
    loop {
        let error = match api.call(reqwest::Method::POST, "/tasks", Some(body)).await {
            Ok((_, answer)) => return Ok(answer),
            Err(error) => error,
        };
        let retryable = match &error {
            CliError::Api { status, .. } => *status >= 500 || *status == 429,
            CliError::Http { .. } => true,
            _ => false,
        };
        if !retryable || attempt + 1 >= nightshift_core::retry::ATTEMPTS {
            return Err(error);
        }
        tracing::warn!(%error, attempt, "the API could not take a batch; trying again");
        nightshift_core::retry::pause(attempt).await;
        attempt += 1;
    }
}

fn print_summary(summary: &Summary, json_output: bool) {
    if json_output {
        println!("{}", serde_json::to_string(summary).unwrap_or_default());
        return;
    }
    for rejected in &summary.rejected {
        let field = rejected
            .field
            .as_deref()
            .filter(|f| !f.is_empty())
            .map_or(String::new(), |f| format!(" ({f})"));
        println!(
            "line {}: rejected, {}{field}: {}",
            rejected.line, rejected.code, rejected.message
        );
    }
    println!(
        "{} lines: {} accepted ({} new, {} already there), {} rejected",
        summary.lines,
        summary.accepted,
        summary.created,
        summary.accepted as u64 - summary.created.min(summary.accepted as u64),
        summary.rejected.len()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_line_is_keyed_by_the_file_and_its_number_and_bad_lines_are_named() {
        let text = "{\"account\": \"a\", \"payload\": 1}\n\nnot json\n[1]\n{\"account\": \"b\", \"payload\": 2, \"idempotency_key\": \"mine\"}\n";
        let (lines, rejected) = parse(text);
        assert_eq!(lines.iter().map(|l| l.number).collect::<Vec<_>>(), [1, 5]);
        assert_eq!(rejected.iter().map(|r| r.line).collect::<Vec<_>>(), [3, 4]);
        let key = lines[0].task["idempotency_key"]
            .as_str()
            .unwrap_or_default();
        assert!(key.ends_with(":1"), "{key}");
        assert_eq!(
            lines[1].task["idempotency_key"], "mine",
            "a line's own key is kept"
        );
        let (again, _) = parse(text);
        assert_eq!(again[0].task, lines[0].task, "the same file, the same keys");
        let (other, _) = parse(&format!("{text}\n{{\"account\": \"c\", \"payload\": 3}}"));
        assert_ne!(other[0].task, lines[0].task, "another file, other keys");
    }

    #[test]
    fn batches_hold_at_most_a_thousand_lines_and_five_mebibytes() {
        let lines = |n: usize, bytes: usize| -> Vec<Line> {
            (0..n)
                .map(|number| Line {
                    number,
                    task: Value::Null,
                    bytes,
                })
                .collect()
        };
        let sizes = |b: Vec<Vec<Line>>| b.iter().map(Vec::len).collect::<Vec<_>>();
        assert_eq!(sizes(batches(lines(2500, 100))), [1000, 1000, 500]);
        assert_eq!(sizes(batches(lines(12, 1024 * 1024))), [5, 5, 2]);
    }

    #[test]
    fn the_task_a_field_names_is_read_from_it() {
        assert_eq!(task_index("tasks[7].payload"), Some(7));
        assert_eq!(task_index("tasks[12]"), Some(12));
        assert_eq!(task_index("tasks"), None);
        assert_eq!(task_index(""), None);
    }
}

//! The `nightshift` command as its users script it, against a local stack:
//! a file of good and bad lines submitted twice, a run watched to its end,
//! its report in each format, and the listings.

// A failed step should fail the test at once, with its name.
#![allow(clippy::unwrap_used)]

use std::process::{Command, Output};

use nightshift_e2e::{Stack, program};
use serde_json::Value;

/// Runs `nightshift ARGS` against the stack.
fn nightshift(stack: &Stack, args: &[&str]) -> Output {
    Command::new(program("nightshift"))
        .args(args)
        .arg("--state-dir")
        .arg(stack.dir.path())
        .env_remove("NIGHTSHIFT_API_URL")
        .output()
        .unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn json_lines(output: &Output) -> Vec<Value> {
    stdout(output)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{line:?}: {e}")))
        .collect()
}

const FILE: &str = r#"{"account": "cli-1", "kernel": "sleep", "payload": {"seconds": 0.2}}
{"account": "cli-2", "kernel": "sleep", "payload": {"seconds": 0.2}}
this is not JSON

{"account": "", "kernel": "sleep", "payload": {"seconds": 0.2}}
{"account": "cli-5", "kernel": "no-such-kernel", "payload": {}}
{"account": "cli-6", "kernel": "sleep", "payload": {"seconds": 0.2}}
"#;

#[tokio::test]
async fn a_user_submits_a_file_twice_watches_the_run_and_reads_its_report() {
    let stack = Stack::start(&[]).await;
    let file = stack.dir.path().join("tasks.jsonl");
    std::fs::write(&file, FILE).unwrap();
    let file = file.to_str().unwrap();

    let first = nightshift(&stack, &["submit", file]);
    assert_eq!(
        first.status.code(),
        Some(1),
        "a rejected line fails the command"
    );
    let text = stdout(&first);
    for expected in [
        "line 3: rejected, malformed_line",
        "line 5: rejected, invalid_value (account)",
        "line 6: rejected, unknown_kernel (kernel)",
        "6 lines: 3 accepted (3 new, 0 already there), 3 rejected",
    ] {
        assert!(text.contains(expected), "{expected:?} in:\n{text}");
    }
    assert!(
        String::from_utf8_lossy(&first.stderr).contains("3 line(s) rejected"),
        "one clear line on stderr"
    );

    let again = nightshift(&stack, &["submit", file, "--json"]);
    assert_eq!(again.status.code(), Some(1));
    let summary = &json_lines(&again)[0];
    assert_eq!(
        (&summary["accepted"], &summary["created"]),
        (&Value::from(3), &Value::from(0)),
        "the same file again creates nothing: {summary}"
    );
    let ids: Vec<&str> = summary["task_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|id| id.as_str().unwrap())
        .collect();

    let started = nightshift(&stack, &["run", "start", "--json"]);
    assert!(started.status.success());
    let run_id = json_lines(&started)[0]["run"]["id"]
        .as_str()
        .unwrap()
        .to_owned();

    let watched = nightshift(&stack, &["run", "watch", "--json"]);
    assert!(watched.status.success(), "{watched:?}");
    let readings = json_lines(&watched);
    let last = readings.last().unwrap();
    assert_eq!(
        (last["id"].as_str(), last["state"].as_str()),
        (Some(run_id.as_str()), Some("FINISHED")),
        "watch ends with the run"
    );
    assert_eq!(last["progress"]["ended"], 3);

    let csv = nightshift(&stack, &["run", "report", &run_id, "--format", "csv"]);
    assert!(csv.status.success());
    let csv = stdout(&csv);
    let mut rows = csv.lines();
    assert!(
        rows.next()
            .unwrap()
            .starts_with("task_id,account,kernel,status")
    );
    assert_eq!(
        rows.filter(|row| row.contains(",DONE,")).count(),
        3,
        "{csv}"
    );

    let json = nightshift(&stack, &["run", "report", &run_id, "--format", "json"]);
    let report: Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(report["tasks"].as_array().unwrap().len(), 3);
    assert!(report["cost"]["lines"].is_array());

    let table = stdout(&nightshift(&stack, &["run", "report", &run_id]));
    for account in ["cli-1", "cli-2", "cli-6", "cost: total"] {
        assert!(table.contains(account), "{account} in:\n{table}");
    }

    let runs = json_lines(&nightshift(&stack, &["runs", "list", "--json"]));
    assert_eq!(runs[0]["id"], run_id.as_str(), "the newest run first");

    let done = json_lines(&nightshift(
        &stack,
        &[
            "tasks", "list", "--run", &run_id, "--status", "DONE", "--json",
        ],
    ));
    let mut listed: Vec<&str> = done
        .iter()
        .map(|t| t["task_id"].as_str().unwrap())
        .collect();
    listed.sort_unstable();
    let mut expected = ids.clone();
    expected.sort_unstable();
    assert_eq!(listed, expected);

    let task = &json_lines(&nightshift(&stack, &["task", "get", ids[0], "--json"]))[0];
    assert_eq!(task["status"], "DONE");

    let missing = nightshift(&stack, &["task", "get", "no-such-task"]);
    assert_eq!(missing.status.code(), Some(1));
    let error = String::from_utf8_lossy(&missing.stderr).into_owned();
    assert_eq!(error.lines().count(), 1, "one line: {error}");
    assert!(error.contains("not_found"), "{error}");
}

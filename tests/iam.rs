//! IAM, both ways, from the calls the end-to-end tests made (run it after
//! them: `make e2e` does). Every local stack signs each component's calls
//! with a key named after its role and authorizes them against template.yaml
//! as AWS would (see cli/src/local/proxy.rs); a refused call already fails
//! the test that made it. This test reads all the recorded calls together
//! and fails when a role grants an action no recorded call used, unless the
//! grant is listed below with the reason the local stack cannot show its use.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::process::Command;

use nightshift_e2e::{calls_dir, program, repository};
use serde_json::Value;

/// Grants the local stack cannot exercise, and who uses them on AWS.
const USED_OUTSIDE_THE_LOCAL_STACK: &[(&str, &str, &str)] = &[
    (
        "NightScheduleRole",
        "lambda:InvokeFunction",
        "EventBridge Scheduler invokes the dispatcher at the night's start; the local stack wakes it in-process",
    ),
    (
        "*",
        "logs:CreateLogStream",
        "Lambda's runtime and the CloudWatch agent write the logs",
    ),
    (
        "*",
        "logs:PutLogEvents",
        "Lambda's runtime and the CloudWatch agent write the logs",
    ),
    (
        "*",
        "xray:PutTraceSegments",
        "Lambda's runtime sends the traces (Tracing: Active)",
    ),
    (
        "*",
        "xray:PutTelemetryRecords",
        "Lambda's runtime sends the traces (Tracing: Active)",
    ),
    (
        "IngestRole",
        "lambda:InvokeFunction",
        "the local stack wakes its dispatcher in-process",
    ),
    (
        "CollectorRole",
        "sqs:GetQueueAttributes",
        "Lambda's event source mapping reads its queues' attributes",
    ),
    (
        "DispatcherRole",
        "iam:CreateServiceLinkedRole",
        "only an account's first spot request makes EC2's spot role",
    ),
];

fn justified(role: &str, sid: &str, action: &str) -> bool {
    USED_OUTSIDE_THE_LOCAL_STACK.iter().any(|(r, a, _)| {
        (*r == "*" || *r == role)
            && match a.split_once('@') {
                Some((a, s)) => a == action && s == sid,
                None => *a == action,
            }
    })
}

#[test]
fn every_grant_is_used_and_every_call_is_granted() {
    let dir = calls_dir();
    let files = std::fs::read_dir(&dir).map(Iterator::count).unwrap_or(0);
    assert!(
        files >= 5,
        "{files} recorded stacks in {}: run the end-to-end tests first (make e2e)",
        dir.display()
    );
    let output = Command::new(program("nightshift"))
        .args(["local", "iam-report", "--json", "--template"])
        .arg(repository().join("template.yaml"))
        .arg(&dir)
        .output()
        .unwrap();
    let report: Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&output.stderr)));
    let table = Command::new(program("nightshift"))
        .args(["local", "iam-report", "--template"])
        .arg(repository().join("template.yaml"))
        .arg(&dir)
        .output()
        .unwrap();
    println!("{}", String::from_utf8_lossy(&table.stdout));

    assert_eq!(report["refused"], Value::Array(vec![]), "calls refused");
    assert!(output.status.success());
    let unused: BTreeSet<String> = report["grants"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|g| g["used_by"].as_array().unwrap().is_empty())
        .filter(|g| {
            let text = |k: &str| g[k].as_str().unwrap().to_owned();
            !justified(&text("role"), &text("sid"), &text("action"))
        })
        .map(|g| format!("{} {} {}", g["role"], g["sid"], g["action"]))
        .collect();
    assert!(
        unused.is_empty(),
        "granted, and no recorded call uses it (remove it, or say here who uses it):\n{}",
        unused.into_iter().collect::<Vec<_>>().join("\n")
    );
}

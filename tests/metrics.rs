//! The metrics a night emits (CloudWatch Embedded Metric Format lines from
//! the dispatcher, the collector and the workers), read from a local run
//! and held to the table.

// A failed step should fail the test at once, with its name.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use nightshift_e2e::Stack;
use serde_json::{Value, json};

/// The sum of `metric` over the lines of `component` for `run_id`.
fn sum(lines: &[Value], component: &str, run_id: &str, metric: &str) -> f64 {
    lines
        .iter()
        .filter(|l| l["Component"] == component && l["run_id"] == run_id)
        .filter_map(|l| l[metric].as_f64())
        .sum()
}

#[tokio::test]
async fn the_metrics_of_a_night_add_up_to_what_the_table_says() {
    let stack = Stack::start(&[]).await;
    let mut tasks: Vec<Value> = (0..5)
        .map(|i| json!({"account": format!("m-{i}"), "kernel": "sleep", "payload": {"seconds": 0.3}}))
        .collect();
    tasks.push(json!({"account": "m-poison", "kernel": "sleep",
                      "payload": {"seconds": 0, "fail": "bad input"}}));
    stack.submit(&tasks).await;
    let run_id = stack.start_run().await;
    let report = stack.finish(&run_id, Duration::from_secs(120)).await;
    let run = &report["run"];
    let (queued, done, failed) = (
        run["queued"].as_f64().unwrap(),
        run["done"].as_f64().unwrap(),
        run["failed"].as_f64().unwrap(),
    );
    assert_eq!((queued, done, failed), (6.0, 5.0, 1.0));

    let lines = stack.metric_lines();
    for line in &lines {
        let declared = &line["_aws"]["CloudWatchMetrics"][0];
        assert_eq!(declared["Namespace"], "nightshift");
        for metric in declared["Metrics"].as_array().unwrap() {
            let name = metric["Name"].as_str().unwrap();
            assert!(line[name].is_number(), "{name} has no value in {line}");
        }
        for dimension in declared["Dimensions"][0].as_array().unwrap() {
            assert!(line[dimension.as_str().unwrap()].is_string(), "{line}");
        }
    }
    assert_eq!(sum(&lines, "dispatcher", &run_id, "TasksQueued"), queued);
    assert_eq!(sum(&lines, "collector", &run_id, "TasksDone"), done);
    assert_eq!(sum(&lines, "collector", &run_id, "TasksFailed"), failed);
    assert_eq!(sum(&lines, "worker", &run_id, "TasksDone"), done);
    assert_eq!(sum(&lines, "worker", &run_id, "TasksFailed"), failed);
    let durations: Vec<&Value> = lines
        .iter()
        .filter(|l| l["run_id"] == run_id.as_str() && l["TaskDuration"].is_number())
        .collect();
    assert_eq!(durations.len(), 6, "one duration per task");
    assert!(durations.iter().all(|l| l["Kernel"] == "sleep"));
    let slow = durations
        .iter()
        .filter(|l| l["TaskDuration"].as_f64().unwrap() >= 300.0)
        .count();
    assert_eq!(slow, 5, "the five 0.3 s tasks took at least 300 ms");
    assert!(
        lines
            .iter()
            .any(|l| l["Component"] == "dispatcher" && l["Backlog"].is_number()),
        "the backlog is measured"
    );
    assert!(
        lines
            .iter()
            .any(|l| l["Component"] == "worker" && l["SlotsBusy"].as_f64() >= Some(1.0)),
        "busy slots are measured"
    );
}

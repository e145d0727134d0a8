//! The orchestration benchmark (`make bench-orchestration`): N no-op tasks
//! of about 1 KB through the local stack. Every AWS call the dispatcher,
//! the collector and the workers make is counted inside the SDK, by
//! component and operation (the run's `usage.calls`), the same count that
//! works against AWS; what only the local stack does (its event-source
//! polling, its supervision of instances) is not. The pipeline's throughput
//! is divided by the emulator's raw SQS throughput, measured in the same
//! run on a queue of its own.
//!   BENCH_TASKS (default 2000)

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use aws_sdk_sqs::types::{DeleteMessageBatchRequestEntry, SendMessageBatchRequestEntry};
use nightshift_e2e::Stack;
use serde_json::{Value, json};

const BODY_BYTES: usize = 1024;

#[tokio::test(flavor = "multi_thread")]
#[ignore = "a benchmark, not a test: make bench-orchestration"]
async fn orchestration() {
    let tasks: usize = std::env::var("BENCH_TASKS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(2000);
    let stack = Stack::start(&[
        ("MaxInstances", "4"),
        ("SlotsPerInstance", "2"),
        ("WorkerIdleSeconds", "5"),
    ])
    .await;

    let raw = raw_sqs_messages_per_second(&stack, tasks).await;

    // About 1 KB each, as a task's item and message.
    let data = "x".repeat(BODY_BYTES - 100);
    let all: Vec<Value> = (0..tasks)
        .map(|i| {
            json!({
                "account": format!("acct-{i:05}"),
                "kernel": "sleep",
                "payload": {"seconds": 0, "data": data},
            })
        })
        .collect();
    for chunk in all.chunks(1000) {
        stack.submit(chunk).await;
    }
    let run_id = stack.start_run().await;
    let report = stack.finish(&run_id, Duration::from_secs(3600)).await;
    let elapsed = seconds_between(&report["run"]["started_at"], &report["run"]["finished_at"]);
    let pipeline = tasks as f64 / elapsed;

    // Workers report their calls as they stop, once the queue is empty.
    stack
        .eventually(
            "every worker stopped and reported",
            Duration::from_secs(180),
            || async {
                let path = format!("/runs/{run_id}/report?limit=1");
                stack.request("GET", &path, None).await.1["cost"]["complete"] == true
            },
        )
        .await;
    // The last usage report may follow its instance's end by a moment.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (_, first_page) = stack
        .request("GET", &format!("/runs/{run_id}/report?limit=1"), None)
        .await;
    let run = &first_page["run"];
    let usage = &run["usage"];
    assert_eq!(run["done"].as_u64(), Some(tasks as u64), "{run}");

    let per_task = |n: f64| n / tasks as f64;
    let calls: BTreeMap<String, u64> = usage["calls"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(call, n)| (call.clone(), n.as_u64().unwrap_or(0)))
        .collect();
    println!(
        "tasks: {tasks}, instances: {}",
        first_page["instances"].as_array().map_or(0, Vec::len)
    );
    println!(
        "{:<52} {:>10} {:>10}",
        "component/operation", "calls", "per task"
    );
    let mut by_component: BTreeMap<&str, u64> = BTreeMap::new();
    for (call, n) in &calls {
        println!("{call:<52} {n:>10} {:>10.3}", per_task(*n as f64));
        let component = call.split('/').next().unwrap_or_default();
        *by_component.entry(component).or_default() += n;
    }
    for (component, n) in &by_component {
        println!(
            "{:<52} {n:>10} {:>10.3}",
            format!("{component} (all)"),
            per_task(*n as f64)
        );
    }
    let total: u64 = calls.values().sum();
    // What the requests cost: every line of the run's cost but its instances.
    let requests_usd: f64 = first_page["cost"]["lines"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|line| {
            !line["item"]
                .as_str()
                .unwrap_or_default()
                .ends_with("instances")
        })
        .map(|line| line["usd"].as_f64().unwrap_or(0.0))
        .sum();
    let wru = per_task(usage["dynamodb_write_units"].as_f64().unwrap_or(0.0));
    let rru = per_task(usage["dynamodb_read_units"].as_f64().unwrap_or(0.0));
    println!(
        "prices: {} as of {}",
        first_page["cost"]["region"], first_page["cost"]["prices_as_of"]
    );
    println!("dynamodb read units per task: {rru:.3}");
    println!(
        "pipeline: {pipeline:.1} tasks/s over {elapsed:.1} s; raw SQS send+receive+delete: {raw:.1} messages/s"
    );
    println!(
        "calls_per_task={:.3} wru_per_task={wru:.3} usd_per_million_tasks={:.2} throughput_ratio={:.2}",
        per_task(total as f64),
        requests_usd / tasks as f64 * 1e6,
        pipeline / raw
    );
}

/// The emulator's own pace for what the pipeline asks of SQS per task: a
/// message sent, received and deleted, in batches of ten, on a queue of its
/// own.
async fn raw_sqs_messages_per_second(stack: &Stack, messages: usize) -> f64 {
    let sqs = &stack.sqs;
    let queue = sqs
        .create_queue()
        .queue_name("nightshift-bench-raw")
        .send()
        .await
        .unwrap()
        .queue_url()
        .unwrap()
        .to_owned();
    let body = "x".repeat(BODY_BYTES);
    let started = Instant::now();
    for first in (0..messages).step_by(10) {
        let entries: Vec<SendMessageBatchRequestEntry> = (first..(first + 10).min(messages))
            .map(|i| {
                SendMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .message_body(&body)
                    .build()
                    .unwrap()
            })
            .collect();
        sqs.send_message_batch()
            .queue_url(&queue)
            .set_entries(Some(entries))
            .send()
            .await
            .unwrap();
    }
    let mut received = 0;
    while received < messages {
        let answer = sqs
            .receive_message()
            .queue_url(&queue)
            .max_number_of_messages(10)
            .wait_time_seconds(1)
            .send()
            .await
            .unwrap();
        let entries: Vec<DeleteMessageBatchRequestEntry> = answer
            .messages()
            .iter()
            .enumerate()
            .map(|(i, m)| {
                DeleteMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .receipt_handle(m.receipt_handle().unwrap())
                    .build()
                    .unwrap()
            })
            .collect();
        received += entries.len();
        if !entries.is_empty() {
            sqs.delete_message_batch()
                .queue_url(&queue)
                .set_entries(Some(entries))
                .send()
                .await
                .unwrap();
        }
    }
    messages as f64 / started.elapsed().as_secs_f64()
}

fn seconds_between(from: &Value, to: &Value) -> f64 {
    let at = |v: &Value| {
        v.as_str()
            .unwrap()
            .parse::<chrono::DateTime<chrono::Utc>>()
            .unwrap()
    };
    (at(to) - at(from)).num_milliseconds() as f64 / 1000.0
}

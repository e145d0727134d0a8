//! Chaos: a night under faults, checked from the table, the queues, the
//! instances and the bucket, never from nightshift's own counters alone.
//!
//! Tasks of mixed sizes around the limits, a few poison tasks; while the run
//! goes, workers are killed with their instances, spot interruptions are
//! announced, duplicate results are injected, two dispatchers tick at once,
//! and a share of every AWS call nightshift makes is answered with
//! throttling, a 5xx, a conflicting transaction or a lost answer.
//!
//! `CHAOS_TASKS` sets the size (CI runs the default), `CHAOS_SEED` replays a
//! seed (printed first). The last line is the verdict.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use chrono::Utc;
use nightshift_core::TaskOutcome;
use nightshift_e2e::Stack;
use serde_json::{Value, json};

const DEFAULT_TASKS: usize = 60;
const FAULT_RATE: &str = "0.04";

/// A small deterministic generator, so a seed replays the same night.
struct Dice(u64);

impl Dice {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut x = self.0;
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        x ^ (x >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// What a task must end as.
#[derive(Debug, Clone, PartialEq)]
enum Expect {
    Done,
    FailedWith(String),
}

fn env_number(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_night_under_chaos_loses_nothing_and_leaves_nothing_behind() {
    let size = env_number("CHAOS_TASKS").map_or(DEFAULT_TASKS, |n| n as usize);
    let seed =
        env_number("CHAOS_SEED").unwrap_or_else(|| Utc::now().timestamp_subsec_nanos().into());
    println!("chaos seed={seed} tasks={size} (replay: CHAOS_SEED={seed} CHAOS_TASKS={size})");
    let mut dice = Dice(seed);
    let stack = Stack::start_with(
        &[
            ("TaskVisibilityTimeout", "6"),
            ("SlotsPerInstance", "2"),
            ("MaxInstances", "4"),
            ("MaxReceiveCount", "5"),
        ],
        &[
            "--faults",
            FAULT_RATE,
            "--fault-seed",
            &seed.to_string(),
            "--dispatchers",
            "2",
        ],
    )
    .await;

    // The night's work: sizes around every limit, and poison.
    const KIB: usize = 1024;
    let mut tasks = Vec::new();
    let mut expected: BTreeMap<String, Expect> = BTreeMap::new();
    for i in 0..size {
        let account = format!("acct-{i:04}");
        let roll = dice.below(100);
        let (payload, expect) = if roll < 5 {
            let reason = format!("poison {i}");
            (
                json!({"seconds": 0.1, "fail": reason}),
                Expect::FailedWith(reason),
            )
        } else if roll < 8 {
            let reason = format!("flaky {i}");
            (
                json!({"seconds": 0.1, "fail_retryable": reason}),
                Expect::FailedWith(reason),
            )
        } else {
            let data = match dice.below(10) {
                0 => 100 * KIB,
                1 => 190 * KIB,
                2 => 210 * KIB,
                _ => 10,
            };
            let result = if dice.below(8) == 0 { 190 * KIB } else { 10 };
            let seconds = 0.3 + dice.below(15) as f64 / 10.0;
            (
                json!({"seconds": seconds, "data": "d".repeat(data), "result_bytes": result}),
                Expect::Done,
            )
        };
        tasks.push((json!({"account": account, "kernel": "sleep", "payload": payload, "idempotency_key": format!("k{i}")}), expect));
    }
    for chunk in tasks.chunks(20) {
        let bodies: Vec<Value> = chunk.iter().map(|(t, _)| t.clone()).collect();
        let ids = submit_until_accepted(&stack, &bodies).await;
        for (id, (_, expect)) in ids.into_iter().zip(chunk) {
            expected.insert(id, expect.clone());
        }
    }
    let run_id = stack.start_run().await;

    // The night, with chaos.
    let control = stack.env["NIGHTSHIFT_CONTROL_URL"].clone();
    let http = reqwest::Client::new();
    let (mut kills, mut interruptions, mut duplicates) = (0u32, 0u32, 0u32);
    let max_kills = (size / 20).max(1) as u32;
    let started = Instant::now();
    let deadline = Duration::from_secs(120 + size as u64 * 3);
    loop {
        let (_, run) = stack.request("GET", &format!("/runs/{run_id}"), None).await;
        if run["state"] == "FINISHED" {
            break;
        }
        assert!(
            started.elapsed() < deadline,
            "the run did not finish in {deadline:?}: {run}\n{}",
            stack.serve_log()
        );
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let running: Vec<String> = match http.get(format!("{control}/instances")).send().await {
            Ok(answer) => answer.json().await.unwrap_or_default(),
            Err(_) => Vec::new(),
        };
        // Each kind of chaos happens at least once, the rest by the dice.
        let action = match (kills, interruptions, duplicates) {
            (0, _, _) if !running.is_empty() => 0,
            (_, 0, _) if !running.is_empty() => 1,
            (_, _, 0) => 2,
            _ => dice.below(6),
        };
        match action {
            0 if !running.is_empty() && kills < max_kills => {
                let instance = &running[dice.below(running.len() as u64) as usize];
                if kill(&stack, instance).await {
                    kills += 1;
                }
            }
            1 if !running.is_empty() => {
                let instance = &running[dice.below(running.len() as u64) as usize];
                let answer = http
                    .post(format!("{control}/instances/{instance}/interrupt"))
                    .send()
                    .await;
                if answer.is_ok_and(|a| a.status().as_u16() == 204) {
                    interruptions += 1;
                }
            }
            2 | 3 => duplicates += u32::from(send_duplicate(&stack, &run_id, &mut dice).await),
            _ => {}
        }
    }

    // Everything settles: instances end, queues drain.
    stack
        .eventually(
            "every instance terminated",
            Duration::from_secs(120),
            || async {
                stack
                    .instances()
                    .await
                    .values()
                    .all(|state| state == "terminated")
            },
        )
        .await;
    // The result and dead-letter queues drain. The task queue may keep
    // stale copies of tasks that ended (a send whose answer was lost and was
    // repeated; a copy a killed worker held, visible again after the last
    // worker left): they are checked below against the table, and the next
    // worker drops them on receipt.
    let drained = [
        "NIGHTSHIFT_RESULT_QUEUE_URL",
        "NIGHTSHIFT_TASK_DLQ_URL",
        "NIGHTSHIFT_RESULT_DLQ_URL",
    ];
    let started = std::time::Instant::now();
    loop {
        let mut depths = Vec::new();
        for queue in drained {
            depths.push((queue, stack.queue_depth(queue).await));
        }
        let held = stack.queue_in_flight("NIGHTSHIFT_TASK_QUEUE_URL").await;
        depths.push(("NIGHTSHIFT_TASK_QUEUE_URL in flight", held));
        if depths.iter().all(|(_, depth)| *depth == 0) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "queues drained: not within 90 s: {depths:?}\n{}",
            stack.serve_log()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let stale = stack.take_messages("NIGHTSHIFT_TASK_QUEUE_URL").await;

    // The verdict, from the table and the bucket.
    let items = stack.scan_table().await;
    let task_items: Vec<&BTreeMap<String, String>> = items
        .iter()
        .filter(|i| i["pk"].starts_with("TASK#"))
        .collect();
    let run_item = items
        .iter()
        .find(|i| i["pk"] == format!("RUN#{run_id}"))
        .expect("the run's item");
    let mut lost = 0;
    let mut stuck = 0;
    let mut wrong = Vec::new();
    for item in &task_items {
        let id = &item["task_id"];
        let status = item.get("status").map_or("", String::as_str);
        match (expected.get(id), status) {
            (Some(Expect::Done), "DONE") => {}
            (Some(Expect::FailedWith(reason)), "FAILED")
                if item
                    .get("last_error")
                    .is_some_and(|e| e.contains(reason.as_str())) => {}
            (_, "PENDING" | "QUEUED" | "STAGED") => stuck += 1,
            (Some(Expect::Done), _) => {
                lost += 1;
                wrong.push(format!("{id}: {status} {:?}", item.get("last_error")));
            }
            (expect, _) => wrong.push(format!(
                "{id}: expected {expect:?}, got {status} {:?}",
                item.get("last_error")
            )),
        }
    }
    lost += expected.len().saturating_sub(task_items.len());
    let count = |status: &str| {
        task_items
            .iter()
            .filter(|i| i.get("status").map(String::as_str) == Some(status))
            .count() as i64
    };
    let counter = |name: &str| {
        run_item
            .get(name)
            .and_then(|v| v.parse::<i64>().ok())
            .unwrap_or(0)
    };
    let double_recorded =
        (counter("done") - count("DONE")).max(0) + (counter("failed") - count("FAILED")).max(0);
    let referenced: BTreeSet<&String> = task_items
        .iter()
        .flat_map(|i| [i.get("payload_key"), i.get("result_key")])
        .flatten()
        .collect();
    let objects = stack.bucket_keys().await;
    let orphans: Vec<&String> = objects.iter().filter(|k| !referenced.contains(k)).collect();
    let ended = |id: &str| {
        task_items.iter().any(|i| {
            i["task_id"] == id
                && matches!(i.get("status").map(String::as_str), Some("DONE" | "FAILED"))
        })
    };
    let live_in_queue: Vec<&String> = stale.iter().filter(|id| !ended(id)).collect();
    let injected = http
        .get(format!("{control}/faults"))
        .send()
        .await
        .expect("control endpoint")
        .json::<Value>()
        .await
        .expect("fault count")["injected"]
        .as_u64()
        .unwrap_or(0);

    assert!(
        wrong.is_empty(),
        "tasks that did not end as they should: {wrong:#?}"
    );
    assert_eq!(
        counter("queued"),
        task_items.len() as i64,
        "every task was queued once"
    );
    assert!(orphans.is_empty(), "objects no task holds: {orphans:?}");
    assert!(
        live_in_queue.is_empty(),
        "the task queue holds tasks that did not end: {live_in_queue:?}"
    );
    assert!(injected > 0, "faults were injected");
    assert!(
        kills > 0 && interruptions > 0 && duplicates > 0,
        "every kind of chaos happened: kills={kills} interruptions={interruptions} duplicates={duplicates}"
    );
    println!(
        "tasks={} kills={kills} interruptions={interruptions} duplicates={duplicates} injected_faults={injected} lost={lost} double_recorded={double_recorded} stuck={stuck} orphans={} stale_messages={}",
        task_items.len(),
        orphans.len(),
        stale.len()
    );
    assert_eq!((lost, double_recorded, stuck), (0, 0, 0));
}

/// Submits a batch, retrying while the API answers 503 (a fault reached a
/// call it could not retry); the idempotency keys make each retry safe.
async fn submit_until_accepted(stack: &Stack, tasks: &[Value]) -> Vec<String> {
    let body = json!({ "tasks": tasks }).to_string();
    for _ in 0..20 {
        let (status, answer) = stack.request("POST", "/tasks", Some(&body)).await;
        if status == 201 || status == 200 {
            return answer["task_ids"]
                .as_array()
                .expect("ids")
                .iter()
                .map(|v| v.as_str().expect("id").to_owned())
                .collect();
        }
        assert_eq!(status, 503, "{answer}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    panic!("the API kept refusing a valid batch");
}

/// Kills a worker and its instance, as a reclaim without notice does.
async fn kill(stack: &Stack, instance: &str) -> bool {
    let Ok(text) = std::fs::read_to_string(stack.workers_dir().join(format!("{instance}.pid")))
    else {
        return false;
    };
    let Ok(pid) = text.trim().parse::<i32>() else {
        return false;
    };
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
    stack
        .ec2
        .terminate_instances()
        .instance_ids(instance)
        .send()
        .await
        .is_ok()
}

/// Sends a second result for a task already recorded, claiming another
/// worker and another outcome.
async fn send_duplicate(stack: &Stack, run_id: &str, dice: &mut Dice) -> bool {
    let (_, report) = stack
        .request("GET", &format!("/runs/{run_id}/report"), None)
        .await;
    let done: Vec<&Value> = report["tasks"]
        .as_array()
        .map(|lines| lines.iter().filter(|l| l["status"] == "DONE").collect())
        .unwrap_or_default();
    if done.is_empty() {
        return false;
    }
    let line = done[dice.below(done.len() as u64) as usize];
    let outcome = TaskOutcome::Failed {
        error: "a duplicate must change nothing".into(),
    };
    stack
        .send_duplicate_result(
            line["task_id"].as_str().unwrap_or_default(),
            run_id,
            outcome,
        )
        .await
}

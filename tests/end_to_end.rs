//! End-to-end: the real binaries against the emulator, one local stack per
//! test. Run with `--test-threads=1` (each stack runs its own workers).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use nightshift_core::{Blob, TaskOutcome};
use nightshift_e2e::Stack;
use serde_json::{Value, json};

const RUN_TIMEOUT: Duration = Duration::from_secs(240);

/// Waits for `queue` to empty: a finished task's message is deleted up to
/// a second after its result is sent (the delete waits to share a batch).
async fn drained(stack: &Stack, queue: &str) {
    stack
        .eventually(
            &format!("{queue} is empty"),
            Duration::from_secs(15),
            || async { stack.queue_depth(queue).await == 0 },
        )
        .await;
}

fn sleep_task(account: &str, seconds: f64) -> Value {
    json!({ "account": account, "kernel": "sleep", "payload": { "seconds": seconds } })
}

/// The demo path: accounts in, a run, every task DONE exactly once on the
/// spot workers, both queues empty and every instance terminated. Two of
/// the tasks carry a payload and a result over the inline limit.
#[tokio::test(flavor = "multi_thread")]
async fn the_night_runs_every_task_once_and_leaves_nothing_behind() {
    let stack = Stack::start(&[]).await;
    let mut tasks: Vec<Value> = (0..16)
        .map(|i| {
            let account = format!("acct-{i:02}");
            json!({
                "account": account,
                "kernel": "portfolio-risk",
                "payload": nightshift_kernels_demo(&account, i),
            })
        })
        .collect();
    let big_data = "x".repeat(3 << 20);
    tasks.push(json!({ "account": "big-in", "kernel": "sleep",
        "payload": { "seconds": 0.1, "data": big_data, "result_bytes": 1 << 20 } }));
    let ids = stack.submit(&tasks).await;
    let run_id = stack.start_run().await;
    let report = stack.finish(&run_id, RUN_TIMEOUT).await;

    let lines = report["tasks"].as_array().unwrap();
    assert_eq!(lines.len(), ids.len(), "the report lists every task");
    for line in lines {
        assert_eq!(line["status"], "DONE", "{line}");
        assert!(
            line["instance_id"].as_str().unwrap().starts_with("i-"),
            "{line}"
        );
        assert_eq!(line["attempts"], 1, "{line}");
        assert!(line["duration_ms"].as_u64().is_some(), "{line}");
    }
    let run = &report["run"];
    assert_eq!(
        (
            run["queued"].as_u64(),
            run["done"].as_u64(),
            run["failed"].as_u64()
        ),
        (Some(17), Some(17), Some(0))
    );
    let workers: BTreeSet<&str> = lines
        .iter()
        .filter_map(|l| l["instance_id"].as_str())
        .collect();
    assert!(
        workers.len() > 1,
        "several workers shared the night: {workers:?}"
    );

    // The large payload and result travelled through the bucket.
    let big_id = &ids[16];
    let (_, task) = stack
        .request("GET", &format!("/tasks/{big_id}"), None)
        .await;
    assert!(
        task["payload"]["stored"]["key"].is_string(),
        "{}",
        task["payload"]
    );
    assert!(
        task["result"]["stored"]["key"].is_string(),
        "{}",
        task["result"]
    );

    for queue in [
        "NIGHTSHIFT_TASK_QUEUE_URL",
        "NIGHTSHIFT_RESULT_QUEUE_URL",
        "NIGHTSHIFT_TASK_DLQ_URL",
    ] {
        drained(&stack, queue).await;
    }
    stack
        .eventually(
            "every instance terminated",
            Duration::from_secs(60),
            || async {
                let instances = stack.instances().await;
                !instances.is_empty() && instances.values().all(|state| state == "terminated")
            },
        )
        .await;
    // Each worker asked for it: it exited with success and its unit powered
    // the instance off. Nothing else terminated an instance.
    let instances = stack.instances().await;
    let powered_off = stack.powered_off();
    for id in instances.keys() {
        assert_eq!(
            powered_off.get(id).map(String::as_str),
            Some("SuccessAction"),
            "{id}: {powered_off:?}"
        );
        let log = std::fs::read_to_string(stack.workers_dir().join(format!("{id}.log"))).unwrap();
        assert!(
            log.contains("queue drained; stopping"),
            "{id} stopped because it was idle"
        );
    }
    assert!(
        !stack
            .serve_log_all()
            .contains("terminating workers that outlived"),
        "the dispatcher's backstop was not needed"
    );
}

fn nightshift_kernels_demo(account: &str, seed: u64) -> Value {
    // The demo's own portfolio generator, through the CLI's dependency.
    nightshift_kernels::portfolio::demo_payload(account, seed)
}

/// A worker killed with SIGKILL mid-task: its task comes back after the
/// visibility timeout, another worker runs it, and it is recorded once.
#[tokio::test(flavor = "multi_thread")]
async fn a_killed_worker_loses_no_task() {
    let stack = Stack::start(&[
        ("TaskVisibilityTimeout", "6"),
        ("SlotsPerInstance", "1"),
        ("MaxInstances", "3"),
    ])
    .await;
    let tasks: Vec<Value> = (0..4)
        .map(|i| sleep_task(&format!("acct-{i}"), 3.0))
        .collect();
    let ids = stack.submit(&tasks).await;
    let run_id = stack.start_run().await;

    // Find a worker that has started a task, and kill it.
    let (instance_id, task_id) = first_started_task(&stack).await;
    let pid: i32 = std::fs::read_to_string(stack.workers_dir().join(format!("{instance_id}.pid")))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // The instance dies with its worker, as a reclaimed instance does
    // without notice.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    stack
        .ec2
        .terminate_instances()
        .instance_ids(&instance_id)
        .send()
        .await
        .unwrap();

    let report = stack.finish(&run_id, RUN_TIMEOUT).await;
    let run = &report["run"];
    assert_eq!(
        (run["done"].as_u64(), run["failed"].as_u64()),
        (Some(ids.len() as u64), Some(0))
    );
    let line = report_line(&report, &task_id);
    assert_eq!(line["status"], "DONE");
    assert_ne!(
        line["instance_id"].as_str(),
        Some(instance_id.as_str()),
        "another worker finished it"
    );
    assert_eq!(line["attempts"], 2, "the second delivery ran it: {line}");
}

/// The report's line for one task.
fn report_line<'a>(report: &'a Value, task_id: &str) -> &'a Value {
    report["tasks"]
        .as_array()
        .and_then(|lines| lines.iter().find(|l| l["task_id"] == task_id))
        .expect("the task is in the report")
}

/// Waits until a worker has started a task: (instance id, task id).
async fn first_started_task(stack: &Stack) -> (String, String) {
    let dir = stack.workers_dir();
    stack
        .eventually("a worker starts a task", Duration::from_secs(60), || {
            let found = started_task(&dir).is_some();
            async move { found }
        })
        .await;
    started_task(&dir).expect("a started task")
}

/// (instance id, task id) of the first task a worker logged as started.
fn started_task(dir: &std::path::Path) -> Option<(String, String)> {
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "log") {
            continue;
        }
        let text = std::fs::read_to_string(&path).ok()?;
        for line in text.lines() {
            let Ok(record) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            if record["fields"]["message"] == "task started" {
                let task_id = record["spans"]
                    .as_array()?
                    .iter()
                    .find_map(|s| s["task_id"].as_str())?;
                let instance = path.file_stem()?.to_str()?.to_owned();
                return Some((instance, task_id.to_owned()));
            }
        }
    }
    None
}

/// A result delivered again, even claiming another worker, changes nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_result_delivered_twice_is_recorded_once() {
    let stack = Stack::start(&[]).await;
    let ids = stack
        .submit(&[
            sleep_task("a", 0.1),
            sleep_task("b", 0.1),
            sleep_task("c", 0.1),
        ])
        .await;
    let run_id = stack.start_run().await;
    let before = stack.finish(&run_id, RUN_TIMEOUT).await;
    let (_, task) = stack
        .request("GET", &format!("/tasks/{}", ids[0]), None)
        .await;

    let duplicate = TaskOutcome::Done {
        result: Blob::json(&json!({"other": true})),
        summary: "duplicate".into(),
    };
    for _ in 0..2 {
        assert!(
            stack
                .send_duplicate_result(&ids[0], &run_id, duplicate.clone())
                .await
        );
    }
    stack
        .eventually(
            "the collector consumed the duplicates",
            Duration::from_secs(60),
            || async { stack.queue_depth("NIGHTSHIFT_RESULT_QUEUE_URL").await == 0 },
        )
        .await;
    let (_, after_task) = stack
        .request("GET", &format!("/tasks/{}", ids[0]), None)
        .await;
    assert_eq!(after_task, task, "the task is as first recorded");
    let (_, run) = stack.request("GET", &format!("/runs/{run_id}"), None).await;
    assert_eq!(run["done"], before["run"]["done"]);
    assert_eq!(run["done"], 3);
    assert_eq!(stack.queue_depth("NIGHTSHIFT_RESULT_DLQ_URL").await, 0);
}

/// Bad input to each endpoint: the documented 4xx with a JSON error naming
/// the field, and nothing in the table.
#[tokio::test(flavor = "multi_thread")]
async fn bad_input_is_refused_and_nothing_is_written() {
    let stack = Stack::start(&[("MaxPayloadBytes", "1048576")]).await;
    let too_many = json!({ "tasks": vec![sleep_task("a", 0.0); 1001] }).to_string();
    let too_big = json!({ "account": "a", "kernel": "sleep", "payload": { "seconds": 0, "data": "x".repeat(1_100_000) } }).to_string();
    // (method, path, body, status, error code, field)
    type Case<'a> = (
        &'a str,
        &'a str,
        Option<&'a str>,
        u16,
        &'a str,
        Option<&'a str>,
    );
    let cases: Vec<Case> = vec![
        (
            "POST",
            "/tasks",
            Some("{\"account\": "),
            400,
            "malformed_json",
            None,
        ),
        (
            "POST",
            "/tasks",
            Some("[1, 2]"),
            422,
            "invalid_type",
            Some(""),
        ),
        (
            "POST",
            "/tasks",
            Some(r#"{"payload": {}}"#),
            422,
            "missing_field",
            Some("account"),
        ),
        (
            "POST",
            "/tasks",
            Some(r#"{"account": 5, "payload": {}}"#),
            422,
            "invalid_type",
            Some("account"),
        ),
        (
            "POST",
            "/tasks",
            Some(r#"{"account": "a", "payload": {}, "kernel": "bash"}"#),
            422,
            "unknown_kernel",
            Some("kernel"),
        ),
        (
            "POST",
            "/tasks",
            Some(r#"{"tasks": []}"#),
            422,
            "empty_batch",
            Some("tasks"),
        ),
        (
            "POST",
            "/tasks",
            Some(r#"{"tasks": [{"account": "a", "payload": 1}, {"account": "b"}]}"#),
            422,
            "missing_field",
            Some("tasks[1].payload"),
        ),
        (
            "POST",
            "/tasks",
            Some(too_many.as_str()),
            413,
            "batch_too_large",
            Some("tasks"),
        ),
        (
            "POST",
            "/tasks",
            Some(too_big.as_str()),
            413,
            "payload_too_large",
            Some("payload"),
        ),
        (
            "GET",
            "/tasks/no-such-task",
            None,
            404,
            "not_found",
            Some("id"),
        ),
        (
            "GET",
            "/runs/no-such-run",
            None,
            404,
            "not_found",
            Some("id"),
        ),
        (
            "GET",
            "/runs/no-such-run/report",
            None,
            404,
            "not_found",
            Some("id"),
        ),
    ];
    for (method, path, body, status, code, field) in cases {
        let (got, answer) = stack.request(method, path, body).await;
        let shown = body.map(|b| &b[..b.len().min(60)]);
        assert_eq!(got, status, "{method} {path} {shown:?}: {answer}");
        assert_eq!(answer["error"]["code"], code, "{method} {path} {shown:?}");
        assert!(
            answer["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
        if let Some(field) = field {
            assert_eq!(answer["error"]["field"], field, "{method} {path} {shown:?}");
        }
    }
    let scan = stack
        .dynamodb
        .scan()
        .table_name(&stack.env["NIGHTSHIFT_TABLE"])
        .send()
        .await
        .unwrap();
    assert_eq!(
        scan.count(),
        0,
        "the table holds nothing: {:?}",
        scan.items()
    );
}

/// A spot interruption notice: the worker hands its task back with a
/// checkpoint and leaves; the task finishes elsewhere, counted as an
/// interruption, not a failure.
#[tokio::test(flavor = "multi_thread")]
async fn a_spot_interruption_hands_the_task_back_without_using_its_retries() {
    let stack = Stack::start(&[("SlotsPerInstance", "1"), ("MaxInstances", "2")]).await;
    let ids = stack
        .submit(&[sleep_task("a", 4.0), sleep_task("b", 4.0)])
        .await;
    let run_id = stack.start_run().await;
    let (instance_id, task_id) = first_started_task(&stack).await;
    let dir = stack.workers_dir();
    let control = &stack.env["NIGHTSHIFT_CONTROL_URL"];
    let answer = reqwest::Client::new()
        .post(format!("{control}/instances/{instance_id}/interrupt"))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status().as_u16(), 204);

    let report = stack.finish(&run_id, RUN_TIMEOUT).await;
    assert_eq!(report["run"]["done"].as_u64(), Some(ids.len() as u64));
    let line = report_line(&report, &task_id);
    assert_eq!(line["status"], "DONE");
    assert_ne!(line["instance_id"].as_str(), Some(instance_id.as_str()));
    assert_eq!(
        (
            line["interruptions"].as_u64(),
            line["failed_attempts"].as_u64()
        ),
        (Some(1), Some(0)),
        "{line}"
    );
    let log = std::fs::read_to_string(dir.join(format!("{instance_id}.log"))).unwrap();
    assert!(
        log.contains("task handed back"),
        "the worker handed its task back"
    );
    assert!(log.contains("\"checkpointed\":true"), "with its checkpoint");
}

/// Heartbeats keep a healthy task that outlives its visibility timeout
/// invisible: it runs once.
#[tokio::test(flavor = "multi_thread")]
async fn a_task_longer_than_its_visibility_timeout_runs_once() {
    let stack = Stack::start(&[("TaskVisibilityTimeout", "3"), ("SlotsPerInstance", "1")]).await;
    let ids = stack.submit(&[sleep_task("slow", 8.0)]).await;
    let run_id = stack.start_run().await;
    let report = stack.finish(&run_id, RUN_TIMEOUT).await;
    let line = &report["tasks"][0];
    assert_eq!(
        (line["task_id"].as_str(), line["attempts"].as_u64()),
        (Some(ids[0].as_str()), Some(1)),
        "{line}"
    );
    let starts: usize = std::fs::read_dir(stack.workers_dir())
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
        .map(|e| {
            std::fs::read_to_string(e.path())
                .unwrap()
                .matches("\"task started\"")
                .count()
        })
        .sum();
    assert_eq!(starts, 1, "the kernel ran once");
}

/// Payloads and results around every size limit, in batches: 100 KiB,
/// 190 KiB and 210 KiB (about the inline limit, and together over a 400 KB
/// item) and 3 MiB, each with results of the first three sizes; several
/// finish at once on a worker of six slots, so batches of results and of
/// task messages pass SQS's 1 MiB for a batch unless split by bytes.
#[tokio::test(flavor = "multi_thread")]
async fn payloads_and_results_around_every_limit_are_all_recorded() {
    const KIB: usize = 1024;
    let stack = Stack::start(&[("SlotsPerInstance", "6"), ("MaxInstances", "2")]).await;
    let mut ids = Vec::new();
    let mut expected = Vec::new();
    for payload in [100 * KIB, 190 * KIB, 210 * KIB, 3 * KIB * KIB] {
        let tasks: Vec<Value> = [100 * KIB, 190 * KIB, 210 * KIB]
            .iter()
            .map(|result| {
                expected.push(payload);
                json!({
                    "account": format!("p{}-r{}", payload / KIB, result / KIB),
                    "kernel": "sleep",
                    "payload": { "seconds": 0.2, "data": "d".repeat(payload), "result_bytes": result },
                })
            })
            .collect();
        // A request body holds at most 8 MiB: the largest go one by one.
        for batch in tasks.chunks(if payload > KIB * KIB { 1 } else { 3 }) {
            ids.extend(stack.submit(batch).await);
        }
    }
    let run_id = stack.start_run().await;
    let report = stack.finish(&run_id, RUN_TIMEOUT).await;
    let run = &report["run"];
    assert_eq!(
        (run["done"].as_u64(), run["failed"].as_u64()),
        (Some(ids.len() as u64), Some(0)),
        "{}",
        report["tasks"]
    );
    for (id, payload) in ids.iter().zip(expected) {
        let (_, task) = stack.request("GET", &format!("/tasks/{id}"), None).await;
        assert_eq!(task["status"], "DONE", "{}", task["account"]);
        assert_eq!(task["attempts"], 1, "{}", task["account"]);
        let stored = task["payload"]["stored"].is_object();
        assert_eq!(
            stored,
            payload > 188 * KIB,
            "{}: payload {}",
            task["account"],
            task["payload"].to_string().len().min(200)
        );
    }
    for queue in [
        "NIGHTSHIFT_TASK_QUEUE_URL",
        "NIGHTSHIFT_RESULT_QUEUE_URL",
        "NIGHTSHIFT_TASK_DLQ_URL",
        "NIGHTSHIFT_RESULT_DLQ_URL",
    ] {
        drained(&stack, queue).await;
    }
}

/// Whether this stack's API removed what a request had written (the undo
/// of a request refused midway), from the calls the stack recorded.
fn ingest_undid_a_request(stack: &Stack) -> bool {
    stack
        .recorded_calls()
        .iter()
        .any(|call| call["role"] == "IngestRole" && call["action"] == "s3:DeleteObject")
}

/// Two requests race for one idempotency key. The slow one carries twenty
/// payloads over the inline limit, uploaded one by one after it checked the
/// key and before it stages its tasks; the fast one, sent meanwhile, writes
/// the key first. The slow one then loses at staging time and is refused
/// whole: its other tasks and its payloads are removed, and the key holds
/// the winner's task. (The delay that lands the fast request inside that
/// window depends on the machine: a few are tried.)
#[tokio::test(flavor = "multi_thread")]
async fn a_request_that_loses_a_key_race_midway_leaves_nothing_behind() {
    let stack = Stack::start(&[]).await;
    let delays = [100, 250, 500, 900, 1500, 2500];
    let mut attempts = 0;
    while !ingest_undid_a_request(&stack) {
        assert!(
            attempts < delays.len(),
            "the slow request never lost the race midway"
        );
        let delay = Duration::from_millis(delays[attempts]);
        attempts += 1;
        let key = format!("race-{attempts}");
        let mut tasks: Vec<Value> = (0..20)
            .map(|i| {
                json!({ "account": format!("big-{attempts}"), "kernel": "sleep",
                    "payload": { "seconds": 0, "data": format!("{i}").repeat(250_000) } })
            })
            .collect();
        tasks.push(json!({ "account": "racer", "kernel": "sleep",
            "payload": { "seconds": 0 }, "idempotency_key": key }));
        let slow = json!({ "tasks": tasks }).to_string();
        let fast = json!({ "account": "racer", "kernel": "sleep",
            "payload": { "seconds": 1 }, "idempotency_key": key })
        .to_string();
        let ((slow_status, slow_answer), (fast_status, _)) =
            tokio::join!(stack.request("POST", "/tasks", Some(&slow)), async {
                tokio::time::sleep(delay).await;
                stack.request("POST", "/tasks", Some(&fast)).await
            });
        // Exactly one request owns the key; the other is refused whole.
        let statuses = [slow_status, fast_status];
        println!("delay {delay:?}: slow {slow_status}, fast {fast_status}");
        assert_eq!(
            statuses.iter().filter(|s| **s == 201).count(),
            1,
            "{statuses:?} {slow_answer}"
        );
        assert!(
            statuses.iter().all(|s| [201, 409, 503].contains(s)),
            "{statuses:?}"
        );
    }
    let items = stack.scan_table().await;
    let tasks: Vec<&BTreeMap<String, String>> = items
        .iter()
        .filter(|item| item.get("pk").is_some_and(|pk| pk.starts_with("TASK#")))
        .collect();
    for task in &tasks {
        assert_ne!(task["status"], "STAGED", "nothing left STAGED: {task:?}");
    }
    let refused_whole = |n: usize| {
        let account = format!("big-{n}");
        let racer_won = tasks.iter().any(|t| t["account"] == "racer");
        racer_won && !tasks.iter().any(|t| t["account"] == account)
    };
    assert!(refused_whole(attempts), "the loser's other task is gone");
    let task_ids: BTreeSet<&str> = tasks.iter().map(|t| t["task_id"].as_str()).collect();
    for key in stack.bucket_keys().await {
        let id = key
            .strip_prefix("payloads/")
            .and_then(|k| k.strip_suffix(".json"))
            .unwrap_or_default();
        assert!(task_ids.contains(id), "{key} belongs to no task");
    }
}

/// Cancel, from outside: a night of long tasks is cancelled while one runs.
/// The run ends CANCELLED at once; the dispatcher then ends every task
/// CANCELLED and terminates the instances; the cancel is idempotent, the
/// report lists the cancelled tasks, and a next run may open.
#[tokio::test(flavor = "multi_thread")]
async fn a_cancelled_night_ends_its_tasks_and_its_instances() {
    let stack = Stack::start(&[("SlotsPerInstance", "1"), ("MaxInstances", "1")]).await;
    let ids = stack
        .submit(&[
            sleep_task("a", 60.0),
            sleep_task("b", 60.0),
            sleep_task("c", 60.0),
        ])
        .await;
    let run_id = stack.start_run().await;
    first_started_task(&stack).await;

    let path = format!("/runs/{run_id}/cancel");
    let (status, answer) = stack.request("POST", &path, None).await;
    assert_eq!(
        (status, answer["cancelled"].as_bool()),
        (202, Some(true)),
        "{answer}"
    );
    assert_eq!(answer["run"]["state"], "CANCELLED");
    let (again, answer) = stack.request("POST", &path, None).await;
    assert_eq!((again, answer["cancelled"].as_bool()), (200, Some(false)));

    stack
        .eventually("every task cancelled", Duration::from_secs(90), || async {
            let (_, run) = stack.request("GET", &format!("/runs/{run_id}"), None).await;
            run["cancelled"].as_u64() == Some(ids.len() as u64)
        })
        .await;
    stack
        .eventually(
            "every instance terminated",
            Duration::from_secs(90),
            || async { stack.instances().await.values().all(|s| s == "terminated") },
        )
        .await;
    let (_, report) = stack
        .request("GET", &format!("/runs/{run_id}/report"), None)
        .await;
    for id in &ids {
        assert_eq!(report_line(&report, id)["status"], "CANCELLED", "{report}");
    }
    let (_, run) = stack.request("GET", &format!("/runs/{run_id}"), None).await;
    assert_eq!(
        (run["done"].as_u64(), run["failed"].as_u64()),
        (Some(0), Some(0))
    );
    let (finished, _) = stack
        .request("POST", "/runs/does-not-exist/cancel", None)
        .await;
    assert_eq!(finished, 404);
    stack
        .eventually("a next run may open", Duration::from_secs(60), || async {
            stack.request("POST", "/runs", None).await.0 == 201
        })
        .await;
}

/// A worker whose run has ended but which does not stop (here: it would
/// wait ten minutes for work) is terminated by the dispatcher once the
/// stray grace has passed since its launch.
#[tokio::test(flavor = "multi_thread")]
async fn workers_that_outlive_their_run_are_terminated_by_the_dispatcher() {
    let stack = Stack::start(&[
        ("WorkerIdleSeconds", "600"),
        ("StrayGraceSeconds", "30"),
        ("MaxInstances", "1"),
    ])
    .await;
    stack
        .submit(&[sleep_task("a", 0.1), sleep_task("b", 0.1)])
        .await;
    let run_id = stack.start_run().await;
    stack.finish(&run_id, RUN_TIMEOUT).await;
    assert!(
        stack.instances().await.values().any(|s| s == "running"),
        "the idle worker is still up when its run ends"
    );
    stack
        .eventually(
            "every instance terminated",
            Duration::from_secs(120),
            || async { stack.instances().await.values().all(|s| s == "terminated") },
        )
        .await;
    assert!(
        stack.powered_off().is_empty(),
        "terminated by the dispatcher, not powered off by its unit: {:?}",
        stack.powered_off()
    );
}

/// Work that arrives by day waits: the ticks open no run. The night's start
/// opens one with its deadline, and the night's work is done.
#[tokio::test(flavor = "multi_thread")]
async fn work_waits_for_the_night_and_the_night_start_opens_a_run() {
    let stack = Stack::start(&[]).await;
    stack
        .submit(&[sleep_task("a", 0.1), sleep_task("b", 0.1)])
        .await;
    // A few ticks of the dispatcher (every second here) pass.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let items = stack.scan_table().await;
    assert!(
        !items.iter().any(|i| i["pk"].starts_with("RUN#")),
        "no tick opened a run"
    );
    assert!(
        items
            .iter()
            .filter(|i| i["pk"].starts_with("TASK#"))
            .all(|i| i["status"] == "PENDING"),
        "the day's work waits"
    );

    stack.start_night().await;
    let run_item = || async {
        stack
            .scan_table()
            .await
            .into_iter()
            .find(|i| i["pk"].starts_with("RUN#"))
    };
    stack
        .eventually("the night opens a run", Duration::from_secs(30), || async {
            run_item().await.is_some()
        })
        .await;
    let run = run_item().await.unwrap();
    let opened: chrono::DateTime<chrono::Utc> = run["started_at"].parse().unwrap();
    let deadline: chrono::DateTime<chrono::Utc> = run["deadline"].parse().unwrap();
    assert!(
        deadline > opened && deadline - opened <= chrono::Duration::hours(24),
        "due within a day: {opened} to {deadline}"
    );
    let report = stack.finish(&run["id"], RUN_TIMEOUT).await;
    assert_eq!(report["run"]["done"], 2, "{report}");
    let reported: chrono::DateTime<chrono::Utc> =
        report["run"]["deadline"].as_str().unwrap().parse().unwrap();
    assert_eq!(reported, deadline, "the report shows the deadline");
}

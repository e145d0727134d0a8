//! A local stack per test: `nightshift local serve` on its own emulator,
//! state directory and ports, stopped when the test ends.

// Test support: a setup step that fails should fail the test at once.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aws_sdk_sqs::types::QueueAttributeName;
use chrono::Utc;
use nightshift_core::{Envelope, TaskOutcome, TaskResult};
use serde_json::Value;

pub struct Stack {
    pub env: BTreeMap<String, String>,
    pub dir: tempfile::TempDir,
    serve: Child,
    pub sqs: aws_sdk_sqs::Client,
    pub ec2: aws_sdk_ec2::Client,
    pub dynamodb: aws_sdk_dynamodb::Client,
    pub s3: aws_sdk_s3::Client,
    http: reqwest::Client,
}

/// The workspace's built programs sit next to the test's own directory.
pub fn program(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent()
        .and_then(Path::parent)
        .expect("target directory")
        .join(name)
}

/// Read when the test runs (cargo sets it), not when it is compiled: a
/// build cache shared by two checkouts must not send one to the other.
pub fn repository() -> PathBuf {
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR").expect("run through cargo test");
    Path::new(&manifest_dir).join("..")
}

impl Stack {
    /// Starts a stack with these template parameter overrides.
    pub async fn start(parameters: &[(&str, &str)]) -> Self {
        Self::launch(parameters, &[]).await
    }

    /// A stack with these parameter overrides and further `serve` options.
    pub async fn start_with(parameters: &[(&str, &str)], options: &[&str]) -> Self {
        Self::launch(parameters, options).await
    }

    /// Only the stack's resources in the emulator: no API, functions or
    /// workers, for tests that drive the adapters themselves.
    pub async fn resources() -> Self {
        Self::launch(&[], &["--resources-only"]).await
    }

    async fn launch(parameters: &[(&str, &str)], options: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("state directory");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let endpoint = format!("http://127.0.0.1:{port}");
        let nightshift = program("nightshift");
        assert!(
            nightshift.exists(),
            "build the programs first: cargo build --workspace --bins ({nightshift:?})"
        );
        let mut command = Command::new(nightshift);
        command
            .args([
                "local",
                "serve",
                "--dispatch-every",
                "1",
                "--emulator-port",
                &port.to_string(),
            ])
            .arg("--state-dir")
            .arg(dir.path())
            .arg("--template")
            .arg(repository().join("template.yaml"))
            .arg("--emulator-bin")
            .arg(repository().join(".venv/bin/nightshift-emulator"))
            .env("AWS_ENDPOINT_URL", &endpoint)
            .env("AWS_REGION", "us-east-1")
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .stdin(Stdio::null())
            // What the in-process functions print (their metrics), as
            // Lambda's log capture would take it.
            .stdout(std::fs::File::create(dir.path().join("serve.stdout")).unwrap())
            .stderr(std::fs::File::create(dir.path().join("serve.log")).unwrap());
        // A night that ends three hours from now unless the test says
        // otherwise: the fleet a stack launches must not depend on the hour
        // the tests run at. Three hours is more than the hour within which
        // the dispatcher turns to on-demand, and short enough that tasks of
        // a kernel never measured (an hour each, until one is) call for
        // several workers.
        let night_end = (chrono::Utc::now() + chrono::Duration::hours(3))
            .format("%H:%M")
            .to_string();
        let night = [("NightEnd", night_end.as_str()), ("Timezone", "UTC")];
        let unset = night
            .iter()
            .filter(|(key, _)| parameters.iter().all(|(given, _)| given != key));
        for (key, value) in unset.chain(parameters) {
            command.arg("--param").arg(format!("{key}={value}"));
        }
        command.args(options);
        let serve = command.spawn().expect("start the local stack");
        let env_file = dir.path().join("local.env");
        let started = Instant::now();
        while !env_file.exists() {
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "stack not ready:\n{}",
                log_tail(&dir.path().join("serve.log"))
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let env = read_env(&env_file);
        let aws = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .endpoint_url(&endpoint)
            .region(aws_config::Region::new("us-east-1"))
            .credentials_provider(aws_sdk_sqs::config::Credentials::new(
                "test", "test", None, None, "e2e",
            ))
            .load()
            .await;
        Self {
            env,
            serve,
            sqs: aws_sdk_sqs::Client::new(&aws),
            ec2: aws_sdk_ec2::Client::new(&aws),
            dynamodb: aws_sdk_dynamodb::Client::new(&aws),
            s3: aws_sdk_s3::Client::from_conf(
                aws_sdk_s3::config::Builder::from(&aws)
                    .force_path_style(true)
                    .build(),
            ),
            http: reqwest::Client::new(),
            dir,
        }
    }

    /// The environment the template declares for a function, resolved
    /// against this stack.
    pub fn function_environment(&self, function: &str) -> BTreeMap<String, String> {
        read_env(
            &self
                .dir
                .path()
                .join("functions")
                .join(format!("{function}.env")),
        )
    }

    /// The standard AWS variables that point a process at this stack.
    pub fn aws_env(&self) -> BTreeMap<String, String> {
        self.env
            .iter()
            .filter(|(k, _)| k.starts_with("AWS_"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    pub fn api(&self, path: &str) -> String {
        format!("{}{path}", self.env["NIGHTSHIFT_API_URL"])
    }

    /// Sends a request; returns the status and the JSON body.
    pub async fn request(&self, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut request = self.http.request(method, self.api(path));
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body.to_owned());
        }
        let response = request.send().await.expect("API reachable");
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    pub async fn submit(&self, tasks: &[Value]) -> Vec<String> {
        let body = serde_json::json!({ "tasks": tasks }).to_string();
        let (status, answer) = self.request("POST", "/tasks", Some(&body)).await;
        assert_eq!(status, 201, "{answer}");
        answer["task_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_owned())
            .collect()
    }

    pub async fn start_run(&self) -> String {
        let (status, answer) = self.request("POST", "/runs", None).await;
        assert!(status == 201 || status == 200, "{answer}");
        answer["run"]["id"].as_str().unwrap().to_owned()
    }

    /// The night's start, as EventBridge Scheduler sends it on AWS.
    pub async fn start_night(&self) {
        let url = format!("{}/night/start", self.env["NIGHTSHIFT_CONTROL_URL"]);
        let answer = self.http.post(url).send().await.unwrap();
        assert_eq!(answer.status().as_u16(), 202);
    }

    /// Waits until the run is FINISHED; returns its report.
    pub async fn finish(&self, run_id: &str, timeout: Duration) -> Value {
        let started = Instant::now();
        loop {
            let (_, run) = self.request("GET", &format!("/runs/{run_id}"), None).await;
            if run["state"] == "FINISHED" {
                return self
                    .request("GET", &format!("/runs/{run_id}/report"), None)
                    .await
                    .1;
            }
            assert!(
                started.elapsed() < timeout,
                "run not finished in {timeout:?}: {run}\n{}",
                self.serve_log()
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Visible plus in-flight messages.
    /// Messages received and not yet deleted or visible again.
    pub async fn queue_in_flight(&self, url_key: &str) -> u64 {
        self.queue_counts(
            url_key,
            &[QueueAttributeName::ApproximateNumberOfMessagesNotVisible],
        )
        .await
    }

    /// Receives and deletes every visible message of a queue; the task id
    /// each carried.
    pub async fn take_messages(&self, url_key: &str) -> Vec<String> {
        let mut ids = Vec::new();
        loop {
            let received = self
                .sqs
                .receive_message()
                .queue_url(&self.env[url_key])
                .max_number_of_messages(10)
                .wait_time_seconds(1)
                .send()
                .await
                .unwrap();
            let messages = received.messages();
            if messages.is_empty() {
                return ids;
            }
            for message in messages {
                let body: Value = serde_json::from_str(message.body().unwrap_or("{}")).unwrap();
                ids.push(body["task_id"].as_str().unwrap_or_default().to_owned());
                self.sqs
                    .delete_message()
                    .queue_url(&self.env[url_key])
                    .receipt_handle(message.receipt_handle().unwrap_or_default())
                    .send()
                    .await
                    .unwrap();
            }
        }
    }

    pub async fn queue_depth(&self, url_key: &str) -> u64 {
        self.queue_counts(
            url_key,
            &[
                QueueAttributeName::ApproximateNumberOfMessages,
                QueueAttributeName::ApproximateNumberOfMessagesNotVisible,
            ],
        )
        .await
    }

    /// The sum of these count attributes of a queue.
    async fn queue_counts(&self, url_key: &str, names: &[QueueAttributeName]) -> u64 {
        let attributes = self
            .sqs
            .get_queue_attributes()
            .queue_url(&self.env[url_key])
            .set_attribute_names(Some(names.to_vec()))
            .send()
            .await
            .unwrap();
        let attributes = attributes.attributes().unwrap();
        names
            .iter()
            .map(|name| {
                attributes
                    .get(name)
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0)
            })
            .sum()
    }

    /// Sends a result for a task as a worker `i-0duplicate` would: the
    /// collector must take it for the duplicate it is.
    pub async fn send_duplicate_result(
        &self,
        task_id: &str,
        run_id: &str,
        outcome: TaskOutcome,
    ) -> bool {
        let duplicate = Envelope::Result(TaskResult {
            task_id: task_id.to_owned(),
            run_id: run_id.to_owned(),
            kernel: "sleep".into(),
            instance_id: "i-0duplicate".into(),
            attempts: 9,
            started_at: Utc::now(),
            finished_at: Utc::now(),
            outcome,
        });
        self.sqs
            .send_message()
            .queue_url(&self.env["NIGHTSHIFT_RESULT_QUEUE_URL"])
            .message_body(duplicate.to_json())
            .send()
            .await
            .is_ok()
    }

    /// Every item of the table, string and number attributes as text.
    pub async fn scan_table(&self) -> Vec<BTreeMap<String, String>> {
        let mut items = Vec::new();
        let mut start = None;
        loop {
            let page = self
                .dynamodb
                .scan()
                .table_name(&self.env["NIGHTSHIFT_TABLE"])
                .set_exclusive_start_key(start)
                .send()
                .await
                .unwrap();
            for item in page.items() {
                items.push(
                    item.iter()
                        .filter_map(|(name, value)| {
                            let text = value.as_s().or_else(|_| value.as_n()).ok()?;
                            Some((name.clone(), text.clone()))
                        })
                        .collect(),
                );
            }
            start = page.last_evaluated_key;
            if start.is_none() {
                return items;
            }
        }
    }

    /// Every key in the payload bucket.
    pub async fn bucket_keys(&self) -> Vec<String> {
        let mut keys = Vec::new();
        let mut pages = self
            .s3
            .list_objects_v2()
            .bucket(&self.env["NIGHTSHIFT_BUCKET"])
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            keys.extend(
                page.unwrap()
                    .contents()
                    .iter()
                    .filter_map(|o| o.key().map(str::to_owned)),
            );
        }
        keys
    }

    /// Instances in each state, by id.
    pub async fn instances(&self) -> BTreeMap<String, String> {
        let output = self.ec2.describe_instances().send().await.unwrap();
        output
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .map(|i| {
                let state = i
                    .state()
                    .and_then(|s| s.name())
                    .map(|n| n.as_str().to_owned())
                    .unwrap_or_default();
                (i.instance_id().unwrap_or_default().to_owned(), state)
            })
            .collect()
    }

    /// Polls `check` until it holds.
    pub async fn eventually<F, Fut>(&self, what: &str, timeout: Duration, mut check: F)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        let started = Instant::now();
        while !check().await {
            assert!(
                started.elapsed() < timeout,
                "{what}: not within {timeout:?}\n{}",
                self.serve_log()
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    pub fn workers_dir(&self) -> PathBuf {
        self.dir.path().join("workers")
    }

    /// Every metric line (CloudWatch Embedded Metric Format) the functions
    /// and the workers printed.
    pub fn metric_lines(&self) -> Vec<Value> {
        let mut files = vec![self.dir.path().join("serve.stdout")];
        if let Ok(entries) = std::fs::read_dir(self.workers_dir()) {
            files.extend(entries.filter_map(|e| e.ok().map(|e| e.path())));
        }
        files
            .iter()
            .filter_map(|file| std::fs::read_to_string(file).ok())
            .flat_map(|text| {
                text.lines()
                    .filter_map(|line| serde_json::from_str::<Value>(line).ok())
                    .filter(|line| line.get("_aws").is_some())
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    pub fn serve_log(&self) -> String {
        log_tail(&self.dir.path().join("serve.log"))
    }

    pub fn serve_log_all(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("serve.log")).unwrap_or_default()
    }

    /// Instances the local supervisor powered off, as the worker's unit
    /// said, and the unit setting that said so.
    pub fn powered_off(&self) -> BTreeMap<String, String> {
        self.serve_log_all()
            .lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .filter(|record| record["fields"]["message"] == "instance powered off")
            .filter_map(|record| {
                let fields = &record["fields"];
                Some((
                    fields["instance_id"].as_str()?.to_owned(),
                    fields["cause"].as_str()?.to_owned(),
                ))
            })
            .collect()
    }
}

fn read_env(path: &Path) -> BTreeMap<String, String> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// Where each stack leaves the calls its proxy recorded, for the IAM test.
pub fn calls_dir() -> PathBuf {
    program("nightshift-calls")
}

impl Stack {
    fn calls_file(&self) -> PathBuf {
        self.dir.path().join("calls.jsonl")
    }

    /// Each IAM action the stack's proxy authorized or refused so far, as
    /// recorded (role, operation, action, resource, and the statement).
    pub fn recorded_calls(&self) -> Vec<Value> {
        std::fs::read_to_string(self.calls_file())
            .unwrap_or_default()
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()
    }

    /// Keeps the calls this stack recorded, and fails the test when a role's
    /// policies refused one of them.
    fn keep_calls(&self) {
        let dir = calls_dir();
        let _ = std::fs::create_dir_all(&dir);
        let name = self.dir.path().file_name().unwrap().to_string_lossy();
        if std::fs::copy(self.calls_file(), dir.join(format!("{name}.jsonl"))).is_err() {
            return;
        }
        let refused: Vec<String> = self
            .recorded_calls()
            .into_iter()
            .filter(|call| call["sid"].is_null())
            .map(|call| call.to_string())
            .collect();
        assert!(
            refused.is_empty() || std::thread::panicking(),
            "calls refused by their role's policies in template.yaml:\n{}",
            refused.join("\n")
        );
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.serve.id()).unwrap_or(0));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(30) {
            if let Ok(Some(_)) = self.serve.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.serve.kill();
        if !std::thread::panicking() {
            self.keep_calls();
        }
    }
}

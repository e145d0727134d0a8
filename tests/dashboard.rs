//! The dashboard in a real browser: headless Chromium (Debian's package),
//! driven over WebDriver by chromedriver, on a local stack. An operator
//! creates 30 accounts, presses the button, waits for the night to finish
//! and reads the report. A screenshot is left in the target directory.

// A failed step should fail the test at once, with its name.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use nightshift_e2e::{Stack, program};
use serde_json::{Value, json};

const ACCOUNTS: usize = 30;
const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// A child process killed when the test ends, however it ends.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `nightshift dashboard` for this stack, and the URL it says it serves.
fn start_dashboard(stack: &Stack) -> (Running, String) {
    let mut child = Command::new(program("nightshift"))
        .args(["dashboard", "--port", "0", "--state-dir"])
        .arg(stack.dir.path())
        .env_remove("NIGHTSHIFT_API_URL")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .split_whitespace()
        .find(|word| word.starts_with("http://127.0.0.1:"))
        .unwrap_or_else(|| panic!("the dashboard said {line:?}"))
        .to_owned();
    (Running(child), url)
}

async fn start_browser() -> (Running, Client, u16) {
    let port = free_port();
    let driver = Running(
        Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{CHROMEDRIVER} (make browser installs it): {e}")),
    );
    let capabilities = json!({
        "browserName": "chrome",
        "goog:chromeOptions": {
            "binary": CHROMIUM,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", "--window-size=1366,900"],
        },
        "goog:loggingPrefs": { "browser": "ALL" },
    });
    let started = Instant::now();
    let client = loop {
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let attempt = ClientBuilder::new(connector)
            .capabilities(capabilities.as_object().unwrap().clone())
            .connect(&format!("http://127.0.0.1:{port}"))
            .await;
        match attempt {
            Ok(client) => break client,
            Err(e) if started.elapsed() < Duration::from_secs(30) => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("chromedriver did not start a session: {e}"),
        }
    };
    (driver, client, port)
}

async fn text_of(client: &Client, css: &str) -> String {
    match client.find(Locator::Css(css)).await {
        Ok(element) => element.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// Polls until `check` holds, or fails naming `what` and the page's state.
async fn wait_for<F, Fut>(client: &Client, what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while !check().await {
        if started.elapsed() > timeout {
            let state = text_of(client, "#run-state").await;
            let status = text_of(client, "#accounts-status").await;
            panic!("{what}: not within {timeout:?} (run state {state:?}, accounts {status:?})");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Where screenshots go: the build's target directory.
fn screenshot_path() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| nightshift_e2e::repository().join("target"));
    target.join("dashboard").join("after-run.png")
}

/// The console lines the browser logged at SEVERE (errors), through
/// chromedriver's log endpoint.
async fn console_errors(client: &Client, driver_port: u16) -> Vec<Value> {
    let session = client.session_id().await.unwrap().unwrap();
    let logs: Value = reqwest::Client::new()
        .post(format!(
            "http://127.0.0.1:{driver_port}/session/{session}/se/log"
        ))
        .json(&json!({ "type": "browser" }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    logs["value"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|entry| entry["level"] == "SEVERE")
        .collect()
}

#[tokio::test]
async fn an_operator_creates_accounts_starts_the_night_and_reads_the_report() {
    let stack = Stack::start(&[]).await;
    let (_dashboard, url) = start_dashboard(&stack);
    let (_driver, client, driver_port) = start_browser().await;
    client.goto(&url).await.unwrap();

    // Test accounts, from the form.
    wait_for(
        &client,
        "the kernels are listed",
        Duration::from_secs(20),
        || async {
            client
                .find_all(Locator::Css("#account-kernel option"))
                .await
                .is_ok_and(|options| !options.is_empty())
        },
    )
    .await;
    let count = client.find(Locator::Css("#account-count")).await.unwrap();
    count.clear().await.unwrap();
    count.send_keys(&ACCOUNTS.to_string()).await.unwrap();
    client
        .find(Locator::Css("#account-kernel"))
        .await
        .unwrap()
        .select_by_value("portfolio-risk")
        .await
        .unwrap();
    client
        .find(Locator::Css("#create-accounts"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let submitted = format!("submitted {ACCOUNTS}");
    wait_for(
        &client,
        "the accounts are submitted",
        Duration::from_secs(60),
        || async {
            text_of(&client, "#accounts-status")
                .await
                .contains(&submitted)
        },
    )
    .await;

    // The button, then the night until it is over.
    client
        .find(Locator::Css("#start-night"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_for(
        &client,
        "the run finishes",
        Duration::from_secs(300),
        || async { text_of(&client, "#run-state").await.trim() == "FINISHED" },
    )
    .await;
    let run_id = client
        .find(Locator::Css("#run-state"))
        .await
        .unwrap()
        .attr("data-run-id")
        .await
        .unwrap()
        .unwrap();
    wait_for(
        &client,
        "the report loads",
        Duration::from_secs(60),
        || async {
            client
                .execute("return document.body.dataset.reportLoaded || null", vec![])
                .await
                .is_ok_and(|loaded| loaded == json!(run_id))
        },
    )
    .await;

    // The report: every account, each with the instance that processed it.
    let rows = client
        .find_all(Locator::Css("table#report-tasks tbody tr[data-task-id]"))
        .await
        .unwrap();
    let mut accounts = BTreeSet::new();
    let mut instances = BTreeSet::new();
    for row in &rows {
        let account = row
            .find(Locator::Css("td.account"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let instance = row
            .find(Locator::Css("td.instance"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(
            instance.starts_with("i-"),
            "{account} has no worker instance: {instance:?}"
        );
        accounts.insert(account);
        instances.insert(instance);
    }
    assert_eq!(
        (rows.len(), accounts.len()),
        (ACCOUNTS, ACCOUNTS),
        "one row per account"
    );

    // The timeline: one lane per instance, one bar per task.
    let lanes = client
        .find_all(Locator::Css("svg#timeline g.lane"))
        .await
        .unwrap();
    let mut lane_ids = BTreeSet::new();
    for lane in &lanes {
        lane_ids.insert(lane.attr("data-instance-id").await.unwrap().unwrap());
    }
    assert_eq!(lane_ids, instances, "one lane per instance that worked");
    assert_eq!(lanes.len(), instances.len());
    let bars = client
        .find_all(Locator::Css("svg#timeline rect.bar"))
        .await
        .unwrap();
    assert_eq!(bars.len(), ACCOUNTS, "one bar per task");
    assert!(
        !text_of(&client, "#cost").await.is_empty(),
        "the cost is shown"
    );

    // The cost is final once every instance has ended; the page reads the
    // report again until then.
    wait_for(
        &client,
        "the cost is final",
        Duration::from_secs(120),
        || async {
            client
                .execute("return document.body.dataset.costFinal || null", vec![])
                .await
                .is_ok_and(|final_for| final_for == json!(run_id))
        },
    )
    .await;

    // The whole page in one picture.
    let height = client
        .execute("return document.documentElement.scrollHeight", vec![])
        .await
        .unwrap()
        .as_u64()
        .unwrap_or(900);
    client
        .set_window_size(1366, u32::try_from(height).unwrap_or(900).clamp(900, 6000))
        .await
        .unwrap();
    let screenshot = client.screenshot().await.unwrap();
    let path = screenshot_path();
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, screenshot).unwrap();
    println!("screenshot: {}", path.display());

    let errors = console_errors(&client, driver_port).await;
    assert!(errors.is_empty(), "console errors: {errors:#?}");
    client.close().await.unwrap();
}

//! The morning report of a big night through the local stack's API: 20,000
//! tasks written to the emulator's table by the product's own adapter, read
//! back a page at a time as JSON and as CSV, every page within the limits
//! of API Gateway and Lambda.

// A failed step should fail the test at once, with its name.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeSet, HashMap};
use std::time::Instant;

use aws_sdk_dynamodb::types::{AttributeValue, PutRequest, WriteRequest};
use chrono::{Duration, Utc};
use nightshift_core::aws::dynamodb::DynamoStore;
use nightshift_core::ports::{PendingTasks, ResultRecorder, RunStore, Sent, TaskWriter};
use nightshift_core::{Blob, Launched, NewTask, TaskOutcome, TaskResult};
use nightshift_e2e::Stack;
use serde_json::{Value, json};

const TASKS: usize = 20_000;
/// Of them, ended by the one instance the run records.
const ENDED: usize = 50;
/// Lambda's response limit; API Gateway's is larger.
const RESPONSE_LIMIT: usize = 6 * 1024 * 1024;
const SHARDS: u32 = 8;

fn new_task(i: usize, now: chrono::DateTime<Utc>) -> NewTask {
    NewTask {
        id: format!("big-{i:05}"),
        account: format!("account-{i:05}"),
        kernel: "sleep".into(),
        payload: Blob::json(&json!({ "seconds": 0 })),
        created_at: now,
        idempotency: None,
    }
}

/// A task item as the adapter leaves one it queued (see its codec).
fn queued_task_item(task: &NewTask, run_id: &str) -> WriteRequest {
    let s = |v: &str| AttributeValue::S(v.to_owned());
    let created = nightshift_core::model::timestamp(task.created_at);
    let item = HashMap::from([
        ("pk".to_owned(), s(&format!("TASK#{}", task.id))),
        ("sk".to_owned(), s("TASK")),
        ("task_id".to_owned(), s(&task.id)),
        ("account".to_owned(), s(&task.account)),
        ("kernel".to_owned(), s(&task.kernel)),
        ("status".to_owned(), s("QUEUED")),
        ("created_at".to_owned(), s(&created)),
        ("queued_at".to_owned(), s(&created)),
        ("run_id".to_owned(), s(run_id)),
        ("payload".to_owned(), s(r#"{"seconds":0}"#)),
        ("attempts".to_owned(), AttributeValue::N("0".into())),
    ]);
    WriteRequest::builder()
        .put_request(PutRequest::builder().set_item(Some(item)).build().unwrap())
        .build()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_report_of_twenty_thousand_tasks_is_served_page_by_page() {
    let stack = Stack::start(&[]).await;
    let table = stack.env["NIGHTSHIFT_TABLE"].clone();
    let store = DynamoStore::new(stack.dynamodb.clone(), &table, SHARDS);
    // A run with a few tasks ended through the product's own writes (the
    // run's counters move with them), closed so that the stack's
    // dispatcher leaves it alone.
    let run_id = "big-night";
    let now = Utc::now();
    store
        .open_run(run_id, now, now + Duration::hours(8))
        .await
        .unwrap();
    store
        .record_fleet(
            run_id,
            0,
            &[Launched::new(
                "i-big",
                now,
                Some("c7g.large".into()),
                Some("spot".into()),
            )],
            &[],
        )
        .await
        .unwrap();
    let ended: Vec<NewTask> = (0..ENDED).map(|i| new_task(i, now)).collect();
    let ids: Vec<String> = ended.iter().map(|t| t.id.clone()).collect();
    store.stage("big", &ended).await.unwrap();
    store.commit("big", &ended).await.unwrap();
    store
        .mark_queued(run_id, &Sent::all(&ids, "sleep"))
        .await
        .unwrap();
    let results: Vec<TaskResult> = ids
        .iter()
        .map(|id| TaskResult {
            task_id: id.clone(),
            run_id: run_id.to_owned(),
            kernel: "sleep".into(),
            instance_id: "i-big".into(),
            attempts: 1,
            started_at: now,
            finished_at: now + Duration::seconds(3),
            outcome: TaskOutcome::Done {
                result: Blob::json(&json!(1)),
                summary: "a summary, with a comma".into(),
            },
        })
        .collect();
    store.record_results(&results).await.unwrap();
    store.close_run(run_id, now).await.unwrap();

    // The rest straight into the table, QUEUED in the run: the emulator
    // copies the whole table for each transaction, which would make
    // 20,000 tasks through the product's transactions take an hour.
    let written = Instant::now();
    let items: Vec<WriteRequest> = (ENDED..TASKS)
        .map(|i| queued_task_item(&new_task(i, now), run_id))
        .collect();
    for batch in items.chunks(25) {
        let mut pending = Some(HashMap::from([(table.clone(), batch.to_vec())]));
        while let Some(requests) = pending.filter(|r| !r.is_empty()) {
            let output = stack
                .dynamodb
                .batch_write_item()
                .set_request_items(Some(requests))
                .send()
                .await
                .unwrap();
            pending = output.unprocessed_items;
        }
    }
    println!(
        "{} task items written in {:?}",
        TASKS - ENDED,
        written.elapsed()
    );

    // JSON, page by page.
    let read = Instant::now();
    let http = reqwest::Client::new();
    let get = |url: String, accept: &'static str| {
        let http = http.clone();
        async move {
            let response = http.get(url).header("accept", accept).send().await.unwrap();
            let status = response.status().as_u16();
            let headers = response.headers().clone();
            let body = response.text().await.unwrap();
            assert_eq!(status, 200, "{body:.300}");
            assert!(
                body.len() < RESPONSE_LIMIT,
                "a page of {} bytes",
                body.len()
            );
            (headers, body)
        }
    };
    let base = stack.api(&format!("/runs/{run_id}/report"));
    let mut seen = BTreeSet::new();
    let mut pages = 0;
    let mut largest = 0;
    let mut url = base.clone();
    loop {
        let (_, body) = get(url, "application/json").await;
        largest = largest.max(body.len());
        let page: Value = serde_json::from_str(&body).unwrap();
        if pages == 0 {
            assert_eq!(page["run"]["done"], ENDED);
            assert_eq!(page["instances"][0]["tasks"], ENDED);
            assert_eq!(page["instances"][0]["busy_ms"], ENDED * 3000);
        }
        for task in page["tasks"].as_array().unwrap() {
            assert!(
                seen.insert(task["task_id"].as_str().unwrap().to_owned()),
                "a task twice"
            );
        }
        pages += 1;
        match page["next_cursor"].as_str() {
            Some(next) => url = format!("{base}?cursor={next}"),
            None => break,
        }
    }
    assert_eq!(seen.len(), TASKS, "every task, once");
    assert!(pages >= TASKS / 1000, "{pages} pages");
    println!(
        "JSON: {pages} pages in {:?}, the largest {largest} bytes",
        read.elapsed()
    );

    // CSV, page by page, one header.
    let read = Instant::now();
    let mut rows = 0;
    let mut done = 0;
    let mut url = format!("{base}?format=csv");
    let mut first = true;
    loop {
        let (headers, body) = get(url, "text/csv").await;
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(first)
            .from_reader(body.as_bytes());
        for record in reader.records() {
            let record = record.unwrap();
            assert_eq!(record.len(), 13, "{record:?}");
            rows += 1;
            if &record[3] == "DONE" {
                assert_eq!(&record[11], "a summary, with a comma");
                done += 1;
            }
        }
        first = false;
        match headers.get("nightshift-next-cursor") {
            Some(next) => url = format!("{base}?format=csv&cursor={}", next.to_str().unwrap()),
            None => break,
        }
    }
    assert_eq!((rows, done), (TASKS, ENDED));
    println!("CSV: {rows} rows in {:?}", read.elapsed());
}

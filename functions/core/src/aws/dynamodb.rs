//! The one-table DynamoDB adapter: tasks, runs and the current-run pointer.
//!
//! | item            | pk                | sk             |
//! |-----------------|-------------------|----------------|
//! | task            | `TASK#<id>`       | `TASK`         |
//! | run             | `RUN#<id>`        | `RUN`          |
//! | current run     | `CURRENT_RUN`     | `CURRENT_RUN`  |
//!
//! Indexes: `pending` (`pending_shard`, `created_at`; only PENDING tasks
//! carry `pending_shard`), `by_run` (`run_id`, `task_id`), `by_instance`
//! (`instance_id`, `finished_at`). Every state change is a conditional write;
//! changes that move a run counter go in one transaction with it.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
pub use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::SdkError;
use aws_sdk_dynamodb::types::{
    AttributeValue, Delete, KeysAndAttributes, Put, PutRequest, TransactWriteItem, Update,
    WriteRequest,
};
use chrono::{DateTime, Utc};

use crate::Error;
use crate::message::{AttemptEvent, TaskOutcome, TaskResult};
use crate::model::{Blob, NewTask, PendingTask, Run, RunState, Task, TaskStatus};
use crate::ports::{
    AttemptKind, InsertOutcome, PendingTasks, RecordOutcome, ResultRecorder, RunStore, TaskReader,
    TaskWriter,
};

type Item = HashMap<String, AttributeValue>;

const BATCH_WRITE_LIMIT: usize = 25;
const BATCH_GET_LIMIT: usize = 100;
const TRANSACTION_ITEMS: usize = 100;
/// Tasks per transaction, leaving one item for the run counter.
const TRANSACTION_TASKS: usize = TRANSACTION_ITEMS - 1;
const CURRENT_RUN_KEY: &str = "CURRENT_RUN";
const DEFAULT_DEAD_LETTER_ERROR: &str = "no attempt succeeded within the queue's delivery limit";

#[derive(Debug, Clone)]
pub struct DynamoStore {
    client: Client,
    table: String,
    pending_shards: u32,
}

impl DynamoStore {
    pub fn new(client: Client, table: impl Into<String>, pending_shards: u32) -> Self {
        Self {
            client,
            table: table.into(),
            pending_shards: pending_shards.max(1),
        }
    }

    fn task_key(task_id: &str) -> Item {
        key(&format!("TASK#{task_id}"), "TASK")
    }

    fn run_key(run_id: &str) -> Item {
        key(&format!("RUN#{run_id}"), "RUN")
    }

    fn update(
        &self,
        key: Item,
        expression: &str,
        condition: Option<&str>,
        names: &[&str],
        values: Item,
    ) -> Result<Update, Error> {
        Update::builder()
            .table_name(&self.table)
            .set_key(Some(key))
            .update_expression(expression)
            .set_condition_expression(condition.map(str::to_owned))
            .set_expression_attribute_names(Some(name_map(names)))
            .set_expression_attribute_values((!values.is_empty()).then_some(values))
            .build()
            .map_err(|e| Error::service("build Update", e))
    }

    async fn transact(&self, items: Vec<TransactWriteItem>) -> Result<bool, Error> {
        match self
            .client
            .transact_write_items()
            .set_transact_items(Some(items))
            .send()
            .await
        {
            Ok(_) => Ok(true),
            Err(SdkError::ServiceError(e)) if e.err().is_transaction_canceled_exception() => {
                Ok(false)
            }
            Err(e) => Err(Error::service("TransactWriteItems", e)),
        }
    }

    /// Sends one conditional UpdateItem; `false` if its condition failed.
    async fn conditional_update(&self, update: Update) -> Result<bool, Error> {
        let result = self
            .client
            .update_item()
            .table_name(update.table_name)
            .set_key(Some(update.key))
            .update_expression(update.update_expression)
            .set_condition_expression(update.condition_expression)
            .set_expression_attribute_names(update.expression_attribute_names)
            .set_expression_attribute_values(update.expression_attribute_values)
            .send()
            .await;
        match result {
            Ok(_) => Ok(true),
            Err(SdkError::ServiceError(e)) if e.err().is_conditional_check_failed_exception() => {
                Ok(false)
            }
            Err(e) => Err(Error::service("UpdateItem", e)),
        }
    }

    fn run_counter(
        &self,
        run_id: &str,
        counters: &[(&str, u64)],
    ) -> Result<TransactWriteItem, Error> {
        let adds: Vec<String> = counters
            .iter()
            .map(|(name, _)| format!("#{name} :{name}"))
            .collect();
        let values = counters
            .iter()
            .map(|(name, n)| (format!(":{name}"), num(*n)))
            .collect();
        let names: Vec<&str> = counters.iter().map(|(name, _)| *name).collect();
        let update = self.update(
            Self::run_key(run_id),
            &format!("ADD {}", adds.join(", ")),
            Some("attribute_exists(pk)"),
            &names,
            values,
        )?;
        Ok(TransactWriteItem::builder().update(update).build())
    }

    async fn get(&self, key: Item) -> Result<Option<Item>, Error> {
        let output = self
            .client
            .get_item()
            .table_name(&self.table)
            .set_key(Some(key))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| Error::service("GetItem", e))?;
        Ok(output.item)
    }

    /// Why a conditional change to a task did not apply.
    async fn classify(
        &self,
        task_id: &str,
        run_id: &str,
        event_id: Option<&str>,
    ) -> Result<RecordOutcome, Error> {
        let Some(item) = self.get(Self::task_key(task_id)).await? else {
            return Ok(RecordOutcome::Unknown);
        };
        let task = task_from_item(&item)?;
        if task.status == TaskStatus::Pending {
            return Ok(RecordOutcome::NotYetQueued);
        }
        if task.run_id.as_deref() != Some(run_id) {
            return Ok(RecordOutcome::Unknown);
        }
        let seen =
            event_id.is_some_and(|id| string_set(&item, "seen_events").iter().any(|s| s == id));
        if task.status.is_final() || seen {
            return Ok(RecordOutcome::Duplicate);
        }
        Err(Error::malformed(
            "task",
            format!("{task_id} refused a change it should accept"),
        ))
    }

    fn result_update(&self, result: &TaskResult) -> Result<Update, Error> {
        let mut values: Item = HashMap::from([
            (":queued".into(), s(TaskStatus::Queued.as_str())),
            (":run".into(), s(&result.run_id)),
            (":instance".into(), s(&result.instance_id)),
            (":attempts".into(), num(u64::from(result.attempts))),
            (":started".into(), s(&timestamp(result.started_at))),
            (":finished".into(), s(&timestamp(result.finished_at))),
            (":duration".into(), num(result.duration_ms())),
        ]);
        let mut names = vec![
            "status",
            "run_id",
            "instance_id",
            "attempts",
            "started_at",
            "finished_at",
            "duration_ms",
        ];
        let mut sets = vec![
            "#status = :status",
            "#instance_id = :instance",
            "#attempts = :attempts",
            "#started_at = :started",
            "#finished_at = :finished",
            "#duration_ms = :duration",
        ];
        match &result.outcome {
            TaskOutcome::Done { result, summary } => {
                values.insert(":status".into(), s(TaskStatus::Done.as_str()));
                values.insert(":summary".into(), s(summary));
                names.push("summary");
                sets.push("#summary = :summary");
                let (name, value) = blob_attribute("result", result);
                values.insert(":result".into(), value);
                names.push(name);
                sets.push(if name == "result" {
                    "#result = :result"
                } else {
                    "#result_key = :result"
                });
            }
            TaskOutcome::Failed { error } => {
                values.insert(":status".into(), s(TaskStatus::Failed.as_str()));
                values.insert(":error".into(), s(error));
                names.push("last_error");
                sets.push("#last_error = :error");
            }
        }
        self.update(
            Self::task_key(&result.task_id),
            &format!("SET {}", sets.join(", ")),
            Some("#status = :queued AND #run_id = :run"),
            &names,
            values,
        )
    }

    async fn record_one_result(&self, result: &TaskResult) -> Result<RecordOutcome, Error> {
        let counter = match result.outcome {
            TaskOutcome::Done { .. } => "done",
            TaskOutcome::Failed { .. } => "failed",
        };
        let update = self.result_update(result)?;
        self.record_with_counter(update, &result.task_id, &result.run_id, counter)
            .await
    }

    /// Applies a conditional change to a task together with one step of a
    /// run counter; when the condition refuses, says why.
    async fn record_with_counter(
        &self,
        update: Update,
        task_id: &str,
        run_id: &str,
        counter: &str,
    ) -> Result<RecordOutcome, Error> {
        let items = vec![
            TransactWriteItem::builder().update(update).build(),
            self.run_counter(run_id, &[(counter, 1)])?,
        ];
        if self.transact(items).await? {
            Ok(RecordOutcome::Recorded)
        } else {
            self.classify(task_id, run_id, None).await
        }
    }

    /// Ids among `tasks` whose item says PENDING, by consistent BatchGetItem.
    async fn still_pending(
        &self,
        tasks: &[PendingTask],
    ) -> Result<std::collections::HashSet<String>, Error> {
        let ids: Vec<String> = tasks.iter().map(|t| t.id.clone()).collect();
        Ok(self
            .batch_get_tasks(&ids, Some("task_id, #status"))
            .await?
            .iter()
            .filter(|item| opt_s(item, "status").as_deref() == Some(TaskStatus::Pending.as_str()))
            .filter_map(|item| opt_s(item, "task_id"))
            .collect())
    }

    async fn mark_queued_one(&self, run_id: &str, task_id: &str, now: &str) -> Result<bool, Error> {
        let items = vec![
            TransactWriteItem::builder()
                .update(self.queue_update(run_id, task_id, now)?)
                .build(),
            self.run_counter(run_id, &[("queued", 1)])?,
        ];
        self.transact(items).await
    }

    fn queue_update(&self, run_id: &str, task_id: &str, now: &str) -> Result<Update, Error> {
        self.update(
            Self::task_key(task_id),
            "SET #status = :queued, #run_id = :run, #queued_at = :now REMOVE #pending_shard",
            Some("#status = :pending"),
            &["status", "run_id", "queued_at", "pending_shard"],
            HashMap::from([
                (":queued".into(), s(TaskStatus::Queued.as_str())),
                (":pending".into(), s(TaskStatus::Pending.as_str())),
                (":run".into(), s(run_id)),
                (":now".into(), s(now)),
            ]),
        )
    }

    fn put_if_absent(&self, item: Item) -> Result<TransactWriteItem, Error> {
        Put::builder()
            .table_name(&self.table)
            .set_item(Some(item))
            .condition_expression("attribute_not_exists(pk)")
            .build()
            .map(|put| TransactWriteItem::builder().put(put).build())
            .map_err(|e| Error::service("build Put", e))
    }

    async fn insert_one(&self, task: &NewTask) -> Result<InsertOutcome, Error> {
        let result = self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(self.new_task_item(task)))
            .condition_expression("attribute_not_exists(pk)")
            .send()
            .await;
        match result {
            Ok(_) => Ok(InsertOutcome::Inserted),
            Err(SdkError::ServiceError(e)) if e.err().is_conditional_check_failed_exception() => {
                let existing = self.get(Self::task_key(&task.id)).await?;
                Ok(InsertOutcome::Exists {
                    request_digest: existing
                        .as_ref()
                        .and_then(|item| opt_s(item, "request_digest")),
                })
            }
            Err(e) => Err(Error::service("PutItem", e)),
        }
    }

    /// Consistent `BatchGetItem` of task items, 100 keys a call, retrying
    /// unprocessed keys; `projection` limits the attributes read.
    async fn batch_get_tasks(
        &self,
        task_ids: &[String],
        projection: Option<&str>,
    ) -> Result<Vec<Item>, Error> {
        let mut items = Vec::with_capacity(task_ids.len());
        for chunk in task_ids.chunks(BATCH_GET_LIMIT) {
            let mut keys: Vec<Item> = chunk.iter().map(|id| Self::task_key(id)).collect();
            for attempt in 0u32.. {
                let mut request = KeysAndAttributes::builder()
                    .set_keys(Some(keys))
                    .consistent_read(true);
                if let Some(projection) = projection {
                    request = request
                        .projection_expression(projection)
                        .expression_attribute_names("#status", "status");
                }
                let request = request
                    .build()
                    .map_err(|e| Error::service("build BatchGetItem", e))?;
                let output = self
                    .client
                    .batch_get_item()
                    .request_items(&self.table, request)
                    .send()
                    .await
                    .map_err(|e| Error::service("BatchGetItem", e))?;
                items.extend(
                    output
                        .responses
                        .and_then(|mut r| r.remove(&self.table))
                        .unwrap_or_default(),
                );
                keys = output
                    .unprocessed_keys
                    .and_then(|mut u| u.remove(&self.table))
                    .map(|k| k.keys)
                    .unwrap_or_default();
                if keys.is_empty() {
                    break;
                }
                pause_before_retry("BatchGetItem", attempt, keys.len()).await?;
            }
        }
        Ok(items)
    }

    fn new_task_item(&self, task: &NewTask) -> Item {
        let mut item = Self::task_key(&task.id);
        item.insert("task_id".into(), s(&task.id));
        item.insert("account".into(), s(&task.account));
        item.insert("kernel".into(), s(&task.kernel));
        item.insert("status".into(), s(TaskStatus::Pending.as_str()));
        item.insert("created_at".into(), s(&timestamp(task.created_at)));
        item.insert(
            "pending_shard".into(),
            s(&task.pending_shard(self.pending_shards).to_string()),
        );
        let (name, value) = blob_attribute("payload", &task.payload);
        item.insert(name.into(), value);
        if let Some(idempotency) = &task.idempotency {
            item.insert("idempotency_key".into(), s(&idempotency.key));
            item.insert("request_digest".into(), s(&idempotency.request_digest));
        }
        item
    }
}

#[async_trait]
impl TaskWriter for DynamoStore {
    async fn insert_tasks(&self, tasks: &[NewTask]) -> Result<(), Error> {
        for chunk in tasks.chunks(BATCH_WRITE_LIMIT) {
            let mut requests = chunk
                .iter()
                .map(|task| {
                    let put = PutRequest::builder()
                        .set_item(Some(self.new_task_item(task)))
                        .build()
                        .map_err(|e| Error::service("build PutRequest", e))?;
                    Ok(WriteRequest::builder().put_request(put).build())
                })
                .collect::<Result<Vec<_>, Error>>()?;
            // Unprocessed items are retried with backoff, as DynamoDB asks.
            for attempt in 0u32.. {
                let output = self
                    .client
                    .batch_write_item()
                    .request_items(&self.table, requests)
                    .send()
                    .await
                    .map_err(|e| Error::service("BatchWriteItem", e))?;
                requests = output
                    .unprocessed_items
                    .and_then(|mut unprocessed| unprocessed.remove(&self.table))
                    .unwrap_or_default();
                if requests.is_empty() {
                    break;
                }
                pause_before_retry("BatchWriteItem", attempt, requests.len()).await?;
            }
        }
        Ok(())
    }

    async fn insert_tasks_once(&self, tasks: &[NewTask]) -> Result<Vec<InsertOutcome>, Error> {
        let mut outcomes = Vec::with_capacity(tasks.len());
        for chunk in tasks.chunks(TRANSACTION_TASKS) {
            let puts = chunk
                .iter()
                .map(|task| self.put_if_absent(self.new_task_item(task)))
                .collect::<Result<Vec<_>, Error>>()?;
            if self.transact(puts).await? {
                outcomes.extend(chunk.iter().map(|_| InsertOutcome::Inserted));
                continue;
            }
            // Some task exists (a retry, or a reused key): one by one.
            for task in chunk {
                outcomes.push(self.insert_one(task).await?);
            }
        }
        Ok(outcomes)
    }
}

#[async_trait]
impl TaskReader for DynamoStore {
    async fn task(&self, task_id: &str) -> Result<Option<Task>, Error> {
        self.get(Self::task_key(task_id))
            .await?
            .map(|item| task_from_item(&item))
            .transpose()
    }

    async fn tasks(&self, task_ids: &[String]) -> Result<Vec<Task>, Error> {
        self.batch_get_tasks(task_ids, None)
            .await?
            .iter()
            .map(task_from_item)
            .collect()
    }

    async fn run_tasks(&self, run_id: &str) -> Result<Vec<Task>, Error> {
        let mut tasks = Vec::new();
        let mut start_key = None;
        loop {
            let output = self
                .client
                .query()
                .table_name(&self.table)
                .index_name("by_run")
                .key_condition_expression("run_id = :run")
                .expression_attribute_values(":run", s(run_id))
                .set_exclusive_start_key(start_key)
                .send()
                .await
                .map_err(|e| Error::service("Query by_run", e))?;
            for item in output.items() {
                tasks.push(task_from_item(item)?);
            }
            start_key = output.last_evaluated_key;
            if start_key.is_none() {
                return Ok(tasks);
            }
        }
    }
}

#[async_trait]
impl PendingTasks for DynamoStore {
    async fn pending(&self, shard: u32, limit: usize) -> Result<Vec<PendingTask>, Error> {
        let output = self
            .client
            .query()
            .table_name(&self.table)
            .index_name("pending")
            .key_condition_expression("pending_shard = :shard")
            .expression_attribute_values(":shard", s(&shard.to_string()))
            .limit(i32::try_from(limit.max(1)).unwrap_or(i32::MAX))
            .send()
            .await
            .map_err(|e| Error::service("Query pending", e))?;
        let candidates = output
            .items()
            .iter()
            .map(|item| {
                Ok(PendingTask {
                    id: req_s(item, "task_id")?,
                    account: req_s(item, "account")?,
                    kernel: req_s(item, "kernel")?,
                    payload: blob_from_item(item, "payload")?
                        .ok_or_else(|| Error::malformed("pending task", "no payload"))?,
                })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        // The index is eventually consistent: a task queued a moment ago may
        // still be listed. A consistent read keeps only those still PENDING.
        let still_pending = self.still_pending(&candidates).await?;
        Ok(candidates
            .into_iter()
            .filter(|t| still_pending.contains(&t.id))
            .collect())
    }

    async fn mark_queued(&self, run_id: &str, task_ids: &[String]) -> Result<Vec<String>, Error> {
        let now = timestamp(Utc::now());
        let mut changed = Vec::with_capacity(task_ids.len());
        for chunk in task_ids.chunks(TRANSACTION_TASKS) {
            let mut items = chunk
                .iter()
                .map(|id| {
                    Ok(TransactWriteItem::builder()
                        .update(self.queue_update(run_id, id, &now)?)
                        .build())
                })
                .collect::<Result<Vec<_>, Error>>()?;
            items.push(self.run_counter(run_id, &[("queued", chunk.len() as u64)])?);
            if self.transact(items).await? {
                changed.extend(chunk.iter().cloned());
                continue;
            }
            // Some task was no longer PENDING: settle them one by one.
            for id in chunk {
                if self.mark_queued_one(run_id, id, &now).await? {
                    changed.push(id.clone());
                }
            }
        }
        Ok(changed)
    }
}

#[async_trait]
impl ResultRecorder for DynamoStore {
    async fn record_results(&self, results: &[TaskResult]) -> Result<Vec<RecordOutcome>, Error> {
        let mut distinct = std::collections::HashSet::new();
        let all_distinct = results.iter().all(|r| distinct.insert(r.task_id.as_str()));
        let mut counters: HashMap<&str, (u64, u64)> = HashMap::new();
        for result in results {
            let entry = counters.entry(result.run_id.as_str()).or_default();
            match result.outcome {
                TaskOutcome::Done { .. } => entry.0 += 1,
                TaskOutcome::Failed { .. } => entry.1 += 1,
            }
        }
        // One transaction holds at most 100 items: the tasks and a counter per run.
        if all_distinct
            && !results.is_empty()
            && results.len() + counters.len() <= TRANSACTION_ITEMS
        {
            let mut items = results
                .iter()
                .map(|r| {
                    Ok(TransactWriteItem::builder()
                        .update(self.result_update(r)?)
                        .build())
                })
                .collect::<Result<Vec<_>, Error>>()?;
            for (run_id, (done, failed)) in counters {
                items.push(self.run_counter(run_id, &[("done", done), ("failed", failed)])?);
            }
            if self.transact(items).await? {
                return Ok(vec![RecordOutcome::Recorded; results.len()]);
            }
        }
        // A duplicate or an early result in the batch: settle one by one.
        let mut outcomes = Vec::with_capacity(results.len());
        for result in results {
            outcomes.push(self.record_one_result(result).await?);
        }
        Ok(outcomes)
    }

    async fn record_attempt(
        &self,
        event: &AttemptEvent,
        kind: AttemptKind,
    ) -> Result<RecordOutcome, Error> {
        let counter = match kind {
            AttemptKind::Failed => "failed_attempts",
            AttemptKind::Interrupted => "interruptions",
        };
        let mut values: Item = HashMap::from([
            (":one".into(), num(1)),
            (
                ":event".into(),
                AttributeValue::Ss(vec![event.event_id.clone()]),
            ),
            (":event_id".into(), s(&event.event_id)),
            (":queued".into(), s(TaskStatus::Queued.as_str())),
            (":run".into(), s(&event.run_id)),
        ]);
        let mut names = vec![counter, "seen_events", "status", "run_id"];
        let mut expression = format!("ADD #{counter} :one, #seen_events :event");
        if let Some(error) = &event.error {
            values.insert(":error".into(), s(error));
            names.push("last_error");
            expression.push_str(" SET #last_error = :error");
        }
        let applied = self
            .conditional_update(self.update(
                Self::task_key(&event.task_id),
                &expression,
                Some("#status = :queued AND #run_id = :run AND NOT contains(#seen_events, :event_id)"),
                &names,
                values,
            )?)
            .await?;
        if applied {
            Ok(RecordOutcome::Recorded)
        } else {
            self.classify(&event.task_id, &event.run_id, Some(&event.event_id))
                .await
        }
    }

    async fn record_dead_letter(
        &self,
        task_id: &str,
        run_id: &str,
        at: DateTime<Utc>,
    ) -> Result<RecordOutcome, Error> {
        let update = self.update(
            Self::task_key(task_id),
            "SET #status = :failed, #finished_at = :at, #last_error = if_not_exists(#last_error, :error)",
            Some("#status = :queued AND #run_id = :run"),
            &["status", "finished_at", "last_error", "run_id"],
            HashMap::from([
                (":failed".into(), s(TaskStatus::Failed.as_str())),
                (":queued".into(), s(TaskStatus::Queued.as_str())),
                (":run".into(), s(run_id)),
                (":at".into(), s(&timestamp(at))),
                (":error".into(), s(DEFAULT_DEAD_LETTER_ERROR)),
            ]),
        )?;
        self.record_with_counter(update, task_id, run_id, "failed")
            .await
    }
}

#[async_trait]
impl RunStore for DynamoStore {
    async fn run(&self, run_id: &str) -> Result<Option<Run>, Error> {
        self.get(Self::run_key(run_id))
            .await?
            .map(|item| run_from_item(&item))
            .transpose()
    }

    async fn current_run(&self) -> Result<Option<Run>, Error> {
        let Some(pointer) = self.get(key(CURRENT_RUN_KEY, CURRENT_RUN_KEY)).await? else {
            return Ok(None);
        };
        self.run(&req_s(&pointer, "current_run_id")?).await
    }

    async fn open_run(&self, new_run_id: &str, now: DateTime<Utc>) -> Result<(Run, bool), Error> {
        if let Some(run) = self.current_run().await? {
            return Ok((run, false));
        }
        let mut pointer = key(CURRENT_RUN_KEY, CURRENT_RUN_KEY);
        pointer.insert("current_run_id".into(), s(new_run_id));
        let mut run_item = Self::run_key(new_run_id);
        run_item.extend([
            ("id".to_owned(), s(new_run_id)),
            ("state".to_owned(), s(RunState::Open.as_str())),
            ("started_at".to_owned(), s(&timestamp(now))),
            ("queued".to_owned(), num(0)),
            ("done".to_owned(), num(0)),
            ("failed".to_owned(), num(0)),
            ("fleet_requests".to_owned(), num(0)),
        ]);
        let run = run_from_item(&run_item)?;
        if self
            .transact(vec![
                self.put_if_absent(pointer)?,
                self.put_if_absent(run_item)?,
            ])
            .await?
        {
            return Ok((run, true));
        }
        // Another caller opened a run first: that one is the run.
        let run = self
            .current_run()
            .await?
            .ok_or_else(|| Error::malformed("run", "current run vanished while opening one"))?;
        Ok((run, false))
    }

    async fn acquire_lease(
        &self,
        run_id: &str,
        owner: &str,
        now: DateTime<Utc>,
        ttl: Duration,
    ) -> Result<bool, Error> {
        let now_ms = now.timestamp_millis().unsigned_abs();
        let until = now_ms + u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX / 2);
        self.conditional_update(self.update(
            Self::run_key(run_id),
            "SET #lease_owner = :owner, #lease_until = :until",
            Some("#state = :open AND (attribute_not_exists(#lease_until) OR #lease_until < :now)"),
            &["lease_owner", "lease_until", "state"],
            HashMap::from([
                (":owner".into(), s(owner)),
                (":until".into(), num(until)),
                (":now".into(), num(now_ms)),
                (":open".into(), s(RunState::Open.as_str())),
            ]),
        )?)
        .await
    }

    async fn release_lease(&self, run_id: &str, owner: &str) -> Result<(), Error> {
        // A refusal means the lease expired and was taken over: nothing of
        // ours is left to release.
        self.conditional_update(self.update(
            Self::run_key(run_id),
            "REMOVE #lease_owner, #lease_until",
            Some("#lease_owner = :owner"),
            &["lease_owner", "lease_until"],
            HashMap::from([(":owner".into(), s(owner))]),
        )?)
        .await?;
        Ok(())
    }

    async fn record_fleet(
        &self,
        run_id: &str,
        request_number: u32,
        instance_ids: &[String],
    ) -> Result<(), Error> {
        let mut values: Item = HashMap::from([
            (":n".into(), num(u64::from(request_number))),
            (":next".into(), num(u64::from(request_number) + 1)),
        ]);
        let mut names = vec!["fleet_requests"];
        let mut expression = "SET #fleet_requests = :next".to_owned();
        if !instance_ids.is_empty() {
            values.insert(":ids".into(), AttributeValue::Ss(instance_ids.to_vec()));
            names.push("instances");
            expression.push_str(" ADD #instances :ids");
        }
        let update = self.update(
            Self::run_key(run_id),
            &expression,
            Some("#fleet_requests = :n"),
            &names,
            values,
        )?;
        if self.conditional_update(update).await? {
            Ok(())
        } else {
            Err(Error::malformed(
                "run",
                format!("fleet request {request_number} of {run_id} was already recorded"),
            ))
        }
    }

    async fn close_run(&self, run_id: &str, now: DateTime<Utc>) -> Result<bool, Error> {
        let close = self.update(
            Self::run_key(run_id),
            "SET #state = :finished, #finished_at = :now",
            Some("#state = :open"),
            &["state", "finished_at"],
            HashMap::from([
                (":finished".into(), s(RunState::Finished.as_str())),
                (":open".into(), s(RunState::Open.as_str())),
                (":now".into(), s(&timestamp(now))),
            ]),
        )?;
        let release_pointer = Delete::builder()
            .table_name(&self.table)
            .set_key(Some(key(CURRENT_RUN_KEY, CURRENT_RUN_KEY)))
            .condition_expression("current_run_id = :run")
            .expression_attribute_values(":run", s(run_id))
            .build()
            .map_err(|e| Error::service("build Delete", e))?;
        self.transact(vec![
            TransactWriteItem::builder().update(close).build(),
            TransactWriteItem::builder().delete(release_pointer).build(),
        ])
        .await
    }
}

/// Backs off before retrying the `unprocessed` entries DynamoDB left of a
/// batch call, as it asks; gives up after 8 retries.
async fn pause_before_retry(
    operation: &'static str,
    attempt: u32,
    unprocessed: usize,
) -> Result<(), Error> {
    if attempt >= 8 {
        return Err(Error::service(
            operation,
            format!("{unprocessed} entries still unprocessed after retries"),
        ));
    }
    tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
    Ok(())
}

fn key(pk: &str, sk: &str) -> Item {
    HashMap::from([("pk".to_owned(), s(pk)), ("sk".to_owned(), s(sk))])
}

fn name_map(names: &[&str]) -> HashMap<String, String> {
    names
        .iter()
        .map(|name| (format!("#{name}"), (*name).to_owned()))
        .collect()
}

fn s(value: &str) -> AttributeValue {
    AttributeValue::S(value.to_owned())
}

fn num(value: u64) -> AttributeValue {
    AttributeValue::N(value.to_string())
}

pub(crate) fn timestamp(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn opt_s(item: &Item, name: &str) -> Option<String> {
    item.get(name).and_then(|v| v.as_s().ok()).cloned()
}

fn req_s(item: &Item, name: &'static str) -> Result<String, Error> {
    opt_s(item, name).ok_or_else(|| Error::malformed("item", format!("missing {name}")))
}

fn opt_n(item: &Item, name: &str) -> Result<Option<u64>, Error> {
    item.get(name)
        .and_then(|v| v.as_n().ok())
        .map(|n| {
            n.parse()
                .map_err(|_| Error::malformed("item", format!("{name} is not a count")))
        })
        .transpose()
}

fn opt_time(item: &Item, name: &str) -> Result<Option<DateTime<Utc>>, Error> {
    opt_s(item, name)
        .map(|text| {
            DateTime::parse_from_rfc3339(&text)
                .map(|t| t.with_timezone(&Utc))
                .map_err(|e| Error::malformed("timestamp", e))
        })
        .transpose()
}

fn string_set(item: &Item, name: &str) -> Vec<String> {
    item.get(name)
        .and_then(|v| v.as_ss().ok())
        .cloned()
        .unwrap_or_default()
}

/// A blob is stored as `<name>` (JSON text) or `<name>_key` (an S3 key).
fn blob_attribute(name: &'static str, blob: &Blob) -> (&'static str, AttributeValue) {
    match (name, blob) {
        (_, Blob::Inline(value)) => (name, s(&value.to_string())),
        ("payload", Blob::Stored { key }) => ("payload_key", s(key)),
        (_, Blob::Stored { key }) => ("result_key", s(key)),
    }
}

fn blob_from_item(item: &Item, name: &str) -> Result<Option<Blob>, Error> {
    if let Some(text) = opt_s(item, name) {
        let value = serde_json::from_str(&text).map_err(|e| Error::malformed("stored JSON", e))?;
        return Ok(Some(Blob::Inline(value)));
    }
    Ok(opt_s(item, &format!("{name}_key")).map(|key| Blob::Stored { key }))
}

fn count(item: &Item, name: &str) -> Result<u32, Error> {
    Ok(u32::try_from(opt_n(item, name)?.unwrap_or(0)).unwrap_or(u32::MAX))
}

fn task_from_item(item: &Item) -> Result<Task, Error> {
    let status = req_s(item, "status")?;
    Ok(Task {
        id: req_s(item, "task_id")?,
        account: req_s(item, "account")?,
        kernel: req_s(item, "kernel")?,
        status: TaskStatus::parse(&status)
            .ok_or_else(|| Error::malformed("task status", status))?,
        created_at: opt_time(item, "created_at")?
            .ok_or_else(|| Error::malformed("task", "no created_at"))?,
        run_id: opt_s(item, "run_id"),
        payload: blob_from_item(item, "payload")?,
        attempts: count(item, "attempts")?,
        failed_attempts: count(item, "failed_attempts")?,
        interruptions: count(item, "interruptions")?,
        instance_id: opt_s(item, "instance_id"),
        started_at: opt_time(item, "started_at")?,
        finished_at: opt_time(item, "finished_at")?,
        duration_ms: opt_n(item, "duration_ms")?,
        result: blob_from_item(item, "result")?,
        summary: opt_s(item, "summary"),
        last_error: opt_s(item, "last_error"),
        request_digest: opt_s(item, "request_digest"),
    })
}

fn run_from_item(item: &Item) -> Result<Run, Error> {
    let state = req_s(item, "state")?;
    let mut instances = string_set(item, "instances");
    instances.sort();
    Ok(Run {
        id: req_s(item, "id")?,
        state: RunState::parse(&state).ok_or_else(|| Error::malformed("run state", state))?,
        started_at: opt_time(item, "started_at")?
            .ok_or_else(|| Error::malformed("run", "no started_at"))?,
        finished_at: opt_time(item, "finished_at")?,
        queued: opt_n(item, "queued")?.unwrap_or(0),
        done: opt_n(item, "done")?.unwrap_or(0),
        failed: opt_n(item, "failed")?.unwrap_or(0),
        instances,
        fleet_requests: count(item, "fleet_requests")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_dynamodb::operation::batch_write_item::BatchWriteItemOutput;
    use aws_sdk_dynamodb::operation::transact_write_items::{
        TransactWriteItemsError, TransactWriteItemsOutput,
    };
    use aws_sdk_dynamodb::types::error::TransactionCanceledException;
    use aws_smithy_mocks::{RuleMode, mock, mock_client};

    fn cancelled() -> TransactWriteItemsError {
        TransactWriteItemsError::TransactionCanceledException(
            TransactionCanceledException::builder()
                .message("ConditionalCheckFailed")
                .build(),
        )
    }

    #[tokio::test]
    async fn a_refused_batch_is_settled_task_by_task() {
        // The batch of two is refused (one task is no longer PENDING); then
        // task a goes through alone and task b is refused alone.
        let rule = mock!(Client::transact_write_items)
            .sequence()
            .error(cancelled)
            .output(|| TransactWriteItemsOutput::builder().build())
            .error(cancelled)
            .build();
        let client = mock_client!(aws_sdk_dynamodb, RuleMode::Sequential, [&rule]);
        let store = DynamoStore::new(client, "t", 4);
        let changed = store
            .mark_queued("r1", &["a".to_owned(), "b".to_owned()])
            .await
            .unwrap();
        assert_eq!(changed, vec!["a".to_owned()]);
        assert_eq!(rule.num_calls(), 3);
    }

    #[tokio::test]
    async fn one_transaction_queues_a_batch_with_its_run_counter() {
        let rule = mock!(Client::transact_write_items)
            .match_requests(|r| {
                let items = r.transact_items();
                // 10 task updates and the run's counter.
                items.len() == 11
                    && items
                        .last()
                        .and_then(|i| i.update())
                        .is_some_and(|u| u.update_expression() == "ADD #queued :queued")
            })
            .then_output(|| TransactWriteItemsOutput::builder().build());
        let client = mock_client!(aws_sdk_dynamodb, [&rule]);
        let store = DynamoStore::new(client, "t", 4);
        let ids: Vec<String> = (0..10).map(|i| format!("t{i}")).collect();
        assert_eq!(store.mark_queued("r1", &ids).await.unwrap().len(), 10);
        assert_eq!(rule.num_calls(), 1);
    }

    #[tokio::test]
    async fn unprocessed_batch_writes_are_retried() {
        let task = NewTask {
            id: "t1".into(),
            account: "a".into(),
            kernel: "sleep".into(),
            payload: Blob::Inline(serde_json::json!({"seconds": 1})),
            created_at: Utc::now(),
            idempotency: None,
        };
        let store_for_item = DynamoStore::new(mock_client!(aws_sdk_dynamodb, []), "t", 4);
        let put = PutRequest::builder()
            .set_item(Some(store_for_item.new_task_item(&task)))
            .build()
            .unwrap();
        let unprocessed = WriteRequest::builder().put_request(put).build();
        let rule = mock!(Client::batch_write_item)
            .sequence()
            .output(move || {
                BatchWriteItemOutput::builder()
                    .unprocessed_items("t", vec![unprocessed.clone()])
                    .build()
            })
            .output(|| BatchWriteItemOutput::builder().build())
            .build();
        let client = mock_client!(aws_sdk_dynamodb, RuleMode::Sequential, [&rule]);
        let store = DynamoStore::new(client, "t", 4);
        store
            .insert_tasks(std::slice::from_ref(&task))
            .await
            .unwrap();
        assert_eq!(rule.num_calls(), 2);
    }
}

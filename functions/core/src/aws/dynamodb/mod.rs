//! The one-table DynamoDB adapter: tasks, runs and the current-run pointer.
//!
//! | item            | pk                | sk             |
//! |-----------------|-------------------|----------------|
//! | task            | `TASK#<id>`       | `TASK`         |
//! | run             | `RUN#<id>`        | `RUN`          |
//! | current run     | `CURRENT_RUN`     | `CURRENT_RUN`  |
//!
//! Indexes: `pending` (`pending_shard`, `created_at`; keys only, and only
//! PENDING tasks carry `pending_shard`), `by_run` (`run_id`, `task_id`) and
//! `by_instance` (`instance_id`, `finished_at`), which project what a report
//! shows, never payloads or results. Every state change is a conditional
//! write stating a rule of [`crate::rules`]; changes that move a run counter
//! go in one transaction with it.
//!
//! One module per port, and [`codec`] for every attribute name and item.

mod codec;
mod pending;
mod results;
mod runs;
mod tasks;

pub use aws_sdk_dynamodb::Client;

/// A client whose every call `meter` counts.
pub fn metered_client(config: &aws_types::SdkConfig, meter: &crate::aws::meter::Meter) -> Client {
    Client::from_conf(
        aws_sdk_dynamodb::config::Builder::from(config)
            .interceptor(meter.clone())
            .retry_config(throttling_retries())
            .build(),
    )
}

/// Every transaction moves the run item's counters, so under a large
/// fleet that one item is throttled at its partition's limit now and then:
/// more attempts than the SDK's three, from a shorter first backoff, ride
/// it out (50 ms doubling to 5 s: 8 attempts wait about 10 s at most).
fn throttling_retries() -> aws_sdk_dynamodb::config::retry::RetryConfig {
    aws_sdk_dynamodb::config::retry::RetryConfig::standard()
        .with_max_attempts(DYNAMODB_ATTEMPTS)
        .with_initial_backoff(std::time::Duration::from_millis(50))
        .with_max_backoff(std::time::Duration::from_secs(5))
}

/// Attempts of each DynamoDB request (see [`throttling_retries`]).
pub const DYNAMODB_ATTEMPTS: u32 = 8;
use aws_sdk_dynamodb::error::SdkError;
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{KeysAndAttributes, TransactWriteItem, Update, WriteRequest};

use std::collections::BTreeMap;

use self::codec::{
    INSTANCE_BUSY_MS, INSTANCE_TASKS, Item, KERNEL_BUSY_MS, KERNEL_ENDED, KERNEL_QUEUED,
    kernel_counter, task_key,
};
use super::{build_error, classify};
use crate::Error;
use crate::retry;

const BATCH_WRITE_LIMIT: usize = 25;
const BATCH_GET_LIMIT: usize = 100;
const TRANSACTION_ITEMS: usize = 100;
/// TransactWriteItems' 4 MB, with room for the request around the items.
const TRANSACTION_BYTES: usize = 4_000_000 - 64 * 1024;

#[derive(Debug, Clone)]
pub struct DynamoStore {
    client: Client,
    table: String,
    pending_shards: u32,
}

/// How a transaction ended when it did not fail outright.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Transaction {
    Committed,
    /// Refused: one reason code per item, in order (`None` where the item
    /// was fine); empty when the service gave no reasons.
    Cancelled(Vec<Option<String>>),
}

/// What one write moves on a run: its top-level counters (the run's, and
/// each kernel's, which are top-level so that any run item takes them),
/// and entries of its per-instance maps; summed by name.
#[derive(Debug, Default)]
struct RunMove<'a> {
    counters: BTreeMap<String, u64>,
    entries: BTreeMap<(&'static str, &'a str), u64>,
}

impl<'a> RunMove<'a> {
    fn count(mut self, counter: &str, n: u64) -> Self {
        *self.counters.entry(counter.to_owned()).or_default() += n;
        self
    }

    /// Tasks of `kernel` queued.
    fn queued(self, kernel: &str, n: u64) -> Self {
        self.count(&kernel_counter(KERNEL_QUEUED, kernel), n)
    }

    /// A result: its counter, and what its instance and its kernel ended.
    fn ended(mut self, result: &'a crate::message::TaskResult, counter: &'static str) -> Self {
        let busy_ms = result.duration_ms();
        self = self.count(counter, 1);
        // A result from before kernels were reported names none.
        if !result.kernel.is_empty() {
            self = self
                .count(&kernel_counter(KERNEL_ENDED, &result.kernel), 1)
                .count(&kernel_counter(KERNEL_BUSY_MS, &result.kernel), busy_ms);
        }
        let mut add = |map, key, n| *self.entries.entry((map, key)).or_default() += n;
        add(INSTANCE_TASKS, result.instance_id.as_str(), 1);
        add(INSTANCE_BUSY_MS, result.instance_id.as_str(), busy_ms);
        self
    }
}

/// Cancellation reason codes.
const CONDITION_FAILED: &str = "ConditionalCheckFailed";
const VALIDATION_ERROR: &str = "ValidationError";

impl DynamoStore {
    pub fn new(client: Client, table: impl Into<String>, pending_shards: u32) -> Self {
        Self {
            client,
            table: table.into(),
            pending_shards: pending_shards.max(1),
        }
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
            .set_expression_attribute_names(Some(
                names
                    .iter()
                    .map(|name| (format!("#{name}"), (*name).to_owned()))
                    .collect(),
            ))
            .set_expression_attribute_values((!values.is_empty()).then_some(values))
            .build()
            .map_err(|e| build_error("Update", e))
    }

    /// Runs a transaction. A conflict with another transaction, or
    /// throttling, is retried with backoff; a refusal (a condition, an item
    /// over a limit) is returned with its reasons for the caller to settle.
    async fn transact(&self, items: Vec<TransactWriteItem>) -> Result<Transaction, Error> {
        let mut attempt = 0;
        loop {
            let result = self
                .client
                .transact_write_items()
                .set_transact_items(Some(items.clone()))
                .send()
                .await;
            let error = match result {
                Ok(_) => return Ok(Transaction::Committed),
                Err(error) => error,
            };
            // Anything but a cancellation was classified (and retried, if
            // transient) by the SDK already.
            let Some(codes) = cancellation_reasons(&error) else {
                return Err(classify("TransactWriteItems", error));
            };
            if !codes.iter().flatten().any(|code| is_transient_reason(code)) {
                return Ok(Transaction::Cancelled(codes));
            }
            if attempt + 1 >= retry::ATTEMPTS {
                return Err(Error::transient(
                    "TransactWriteItems",
                    format!(
                        "still conflicting after {} attempts: {codes:?}",
                        retry::ATTEMPTS
                    ),
                ));
            }
            retry::pause(attempt).await;
            attempt += 1;
        }
    }

    /// Writes each item on its own condition, in transactions under the
    /// limits. An item its condition refuses is not this caller's to write
    /// and is left out; the others of its transaction were cancelled with
    /// it and go again. Any other refusal fails the whole write.
    async fn transact_each(&self, mut items: Vec<(TransactWriteItem, usize)>) -> Result<(), Error> {
        for attempt in 0u32.. {
            let mut again = Vec::new();
            let sized = items.into_iter().map(|(item, size)| ((item, size), size));
            for group in transaction_groups(sized.collect(), 0) {
                let writes = group.iter().map(|(item, _)| item.clone()).collect();
                let Transaction::Cancelled(codes) = self.transact(writes).await? else {
                    continue;
                };
                if codes.len() != group.len() {
                    return Err(Error::transient(
                        "TransactWriteItems",
                        "refused without reasons",
                    ));
                }
                for (entry, code) in group.into_iter().zip(codes) {
                    match code.as_deref() {
                        None => again.push(entry),
                        Some(CONDITION_FAILED) => {}
                        Some(other) => {
                            return Err(Error::permanent(
                                "TransactWriteItems",
                                format!("an item was refused: {other}"),
                            ));
                        }
                    }
                }
            }
            if again.is_empty() {
                return Ok(());
            }
            pause_before_retry("TransactWriteItems", attempt, again.len()).await?;
            items = again;
        }
        Ok(())
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
            Err(e) => Err(classify("UpdateItem", e)),
        }
    }

    /// One page of `index`: up to `limit` items whose `key` is `value`,
    /// from `after`, forwards or backwards by the index's sort key; and
    /// where the next page starts.
    async fn index_page(
        &self,
        index: &'static str,
        (key, value): (&str, &str),
        forwards: bool,
        limit: usize,
        after: Option<&crate::ports::Cursor>,
    ) -> Result<(Vec<Item>, Option<crate::ports::Cursor>), Error> {
        let output = self
            .client
            .query()
            .table_name(&self.table)
            .index_name(index)
            .key_condition_expression("#key = :value")
            .expression_attribute_names("#key", key)
            .expression_attribute_values(":value", codec::s(value))
            .scan_index_forward(forwards)
            .limit(i32::try_from(limit.max(1)).unwrap_or(i32::MAX))
            .set_exclusive_start_key(codec::start_key(after)?)
            .send()
            .await
            .map_err(|e| classify("Query", e))?;
        Ok((
            output.items.unwrap_or_default(),
            codec::cursor_of(output.last_evaluated_key),
        ))
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
            .map_err(|e| classify("GetItem", e))?;
        Ok(output.item)
    }

    /// Consistent `BatchGetItem` of task items, 100 keys a call, retrying
    /// unprocessed keys; `projection` limits the attributes read.
    async fn batch_get_tasks(
        &self,
        task_ids: &[String],
        projection: Option<(&str, &[&str])>,
    ) -> Result<Vec<Item>, Error> {
        let mut items = Vec::with_capacity(task_ids.len());
        for chunk in task_ids.chunks(BATCH_GET_LIMIT) {
            let mut keys: Vec<Item> = chunk.iter().map(|id| task_key(id)).collect();
            for attempt in 0u32.. {
                let mut request = KeysAndAttributes::builder()
                    .set_keys(Some(keys))
                    .consistent_read(true);
                if let Some((expression, names)) = projection {
                    request = request.projection_expression(expression);
                    for name in names {
                        request = request.expression_attribute_names(format!("#{name}"), *name);
                    }
                }
                let request = request
                    .build()
                    .map_err(|e| build_error("BatchGetItem", e))?;
                let output = self
                    .client
                    .batch_get_item()
                    .request_items(&self.table, request)
                    .send()
                    .await
                    .map_err(|e| classify("BatchGetItem", e))?;
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

    /// `BatchWriteItem`, 25 requests a call, retrying unprocessed ones.
    async fn batch_write(&self, requests: Vec<WriteRequest>) -> Result<(), Error> {
        for chunk in requests.chunks(BATCH_WRITE_LIMIT) {
            let mut pending = chunk.to_vec();
            for attempt in 0u32.. {
                let output = self
                    .client
                    .batch_write_item()
                    .request_items(&self.table, pending)
                    .send()
                    .await
                    .map_err(|e| classify("BatchWriteItem", e))?;
                pending = output
                    .unprocessed_items
                    .and_then(|mut unprocessed| unprocessed.remove(&self.table))
                    .unwrap_or_default();
                if pending.is_empty() {
                    break;
                }
                pause_before_retry("BatchWriteItem", attempt, pending.len()).await?;
            }
        }
        Ok(())
    }
}

/// The reason codes of a cancelled transaction, one per item (`None` for
/// "None"); `None` if the error is not a cancellation.
fn cancellation_reasons(
    error: &SdkError<TransactWriteItemsError, aws_sdk_dynamodb::config::http::HttpResponse>,
) -> Option<Vec<Option<String>>> {
    let SdkError::ServiceError(context) = error else {
        return None;
    };
    let TransactWriteItemsError::TransactionCanceledException(cancelled) = context.err() else {
        return None;
    };
    Some(
        cancelled
            .cancellation_reasons()
            .iter()
            .map(|reason| {
                reason
                    .code()
                    .filter(|code| *code != "None")
                    .map(str::to_owned)
            })
            .collect(),
    )
}

/// Reasons that mean "not now": another transaction held an item, or the
/// table was throttled.
fn is_transient_reason(code: &str) -> bool {
    matches!(
        code,
        "TransactionConflict" | "ThrottlingError" | "ProvisionedThroughputExceeded"
    )
}

/// Backs off before retrying the `unprocessed` entries DynamoDB left of a
/// batch call, as it asks; gives up after a few retries.
async fn pause_before_retry(
    operation: &'static str,
    attempt: u32,
    unprocessed: usize,
) -> Result<(), Error> {
    if attempt + 1 >= retry::ATTEMPTS {
        return Err(Error::transient(
            operation,
            format!("{unprocessed} entries still unprocessed after retries"),
        ));
    }
    retry::pause(attempt).await;
    Ok(())
}

/// Splits transaction items into groups under the count and size limits,
/// keeping `reserved` items of room in each (the run counters).
fn transaction_groups<T>(entries: Vec<(T, usize)>, reserved: usize) -> Vec<Vec<T>> {
    let mut groups: Vec<Vec<T>> = Vec::new();
    let mut current = Vec::new();
    let mut bytes = 0;
    for (entry, size) in entries {
        if !current.is_empty()
            && (current.len() + reserved >= TRANSACTION_ITEMS || bytes + size > TRANSACTION_BYTES)
        {
            groups.push(std::mem::take(&mut current));
            bytes = 0;
        }
        bytes += size;
        current.push(entry);
    }
    if !current.is_empty() {
        groups.push(current);
    }
    groups
}

#[cfg(test)]
mod tests;

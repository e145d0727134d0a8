//! [`TaskWriter`] and [`TaskReader`]: tasks staged, committed or aborted as
//! one request, and read back.

use std::collections::HashMap;

use async_trait::async_trait;
use aws_sdk_dynamodb::error::SdkError;
use aws_sdk_dynamodb::types::{Delete, Put, PutRequest, TransactWriteItem, WriteRequest};
use chrono::Utc;

use super::codec::{self, *};
use super::{CONDITION_FAILED, DynamoStore, Transaction, transaction_groups};
use crate::Error;
use crate::aws::{build_error, classify};
use crate::model::{NewTask, Task, TaskStatus};
use crate::ports::{Cursor, InsertOutcome, Page, TaskReader, TaskWriter};
use crate::rules::STAGED_ABANDONED_AFTER;

/// How long a STAGED task outlives a request that died before it ended.
const STAGED_TTL_SECONDS: i64 = 24 * 3600;
const NEW_TASK_CONDITION: &str =
    "attribute_not_exists(pk) OR (#status = :staged AND #created_at < :cutoff)";

impl DynamoStore {
    /// The STAGED item of a task written by `request_id`.
    pub(super) fn task_item(&self, task: &NewTask, request_id: &str) -> Item {
        let mut item = task_key(&task.id);
        item.insert(REQUEST_ID.into(), s(request_id));
        item.insert(TASK_ID.into(), s(&task.id));
        item.insert(ACCOUNT.into(), s(&task.account));
        item.insert(KERNEL.into(), s(&task.kernel));
        item.insert(CREATED_AT.into(), s(&timestamp(task.created_at)));
        let (name, value) = blob_attribute(PAYLOAD, PAYLOAD_KEY, &task.payload);
        item.insert(name.into(), value);
        if let Some(idempotency) = &task.idempotency {
            item.insert(IDEMPOTENCY_KEY.into(), s(&idempotency.key));
            item.insert(REQUEST_DIGEST.into(), s(&idempotency.request_digest));
        }
        item.insert(STATUS.into(), s(TaskStatus::Staged.as_str()));
        let expires = Utc::now().timestamp() + STAGED_TTL_SECONDS;
        item.insert(EXPIRES_AT.into(), num(expires.unsigned_abs()));
        item
    }

    pub(super) fn put_request(item: Item) -> Result<WriteRequest, Error> {
        let put = PutRequest::builder()
            .set_item(Some(item))
            .build()
            .map_err(|e| build_error("PutRequest", e))?;
        Ok(WriteRequest::builder().put_request(put).build())
    }

    pub(super) fn put_if_absent(&self, item: Item) -> Result<TransactWriteItem, Error> {
        Put::builder()
            .table_name(&self.table)
            .set_item(Some(item))
            .condition_expression("attribute_not_exists(pk)")
            .build()
            .map(|put| TransactWriteItem::builder().put(put).build())
            .map_err(|e| build_error("Put", e))
    }

    /// A keyed task's put: only if no task has its id, or the one that has
    /// it was abandoned STAGED by a request that died.
    fn put_new_task(&self, item: Item) -> Result<TransactWriteItem, Error> {
        let cutoff = timestamp(Utc::now() - STAGED_ABANDONED_AFTER);
        Put::builder()
            .table_name(&self.table)
            .set_item(Some(item))
            .condition_expression(NEW_TASK_CONDITION)
            .expression_attribute_names("#status", STATUS)
            .expression_attribute_names("#created_at", CREATED_AT)
            .expression_attribute_values(":staged", s(TaskStatus::Staged.as_str()))
            .expression_attribute_values(":cutoff", s(&cutoff))
            .build()
            .map(|put| TransactWriteItem::builder().put(put).build())
            .map_err(|e| build_error("Put", e))
    }

    /// What exists under an id that refused a conditional insert.
    async fn existing(&self, task_id: &str) -> Result<InsertOutcome, Error> {
        let item = self.get(task_key(task_id)).await?;
        let staged = item
            .as_ref()
            .is_some_and(|i| status_of(i).is_ok_and(|s| s == TaskStatus::Staged));
        Ok(InsertOutcome::Exists {
            request_digest: item.as_ref().and_then(|i| opt_s(i, REQUEST_DIGEST)),
            staged_by: item
                .as_ref()
                .filter(|_| staged)
                .and_then(|i| opt_s(i, REQUEST_ID)),
        })
    }

    async fn insert_one(&self, item: Item, task_id: &str) -> Result<InsertOutcome, Error> {
        let Some(put) = self.put_new_task(item)?.put else {
            return Err(Error::permanent("PutItem", "no put"));
        };
        let result = self
            .client
            .put_item()
            .table_name(put.table_name)
            .set_item(Some(put.item))
            .set_condition_expression(put.condition_expression)
            .set_expression_attribute_names(put.expression_attribute_names)
            .set_expression_attribute_values(put.expression_attribute_values)
            .send()
            .await;
        match result {
            Ok(_) => Ok(InsertOutcome::Inserted),
            Err(SdkError::ServiceError(e)) if e.err().is_conditional_check_failed_exception() => {
                self.existing(task_id).await
            }
            Err(e) => Err(classify("PutItem", e)),
        }
    }

    /// Conditional inserts of keyed tasks, in transactions bounded by count
    /// and bytes; a task whose id exists is reported, the others inserted.
    async fn stage_keyed(
        &self,
        request_id: &str,
        tasks: &[&NewTask],
    ) -> Result<HashMap<String, InsertOutcome>, Error> {
        let mut outcomes = HashMap::new();
        let sized = tasks
            .iter()
            .map(|task| {
                let item = self.task_item(task, request_id);
                let size = item_size(&item);
                ((task.id.clone(), item), size)
            })
            .collect();
        for mut group in transaction_groups(sized, 0) {
            while !group.is_empty() {
                let puts = group
                    .iter()
                    .map(|(_, item)| self.put_new_task(item.clone()))
                    .collect::<Result<Vec<_>, Error>>()?;
                let codes = match self.transact(puts).await? {
                    Transaction::Committed => {
                        for (id, _) in group.drain(..) {
                            outcomes.insert(id, InsertOutcome::Inserted);
                        }
                        break;
                    }
                    Transaction::Cancelled(codes) => codes,
                };
                if codes.len() != group.len() {
                    // No reasons given: settle one by one.
                    for (id, item) in group.drain(..) {
                        let outcome = self.insert_one(item, &id).await?;
                        outcomes.insert(id, outcome);
                    }
                    break;
                }
                let mut rest = Vec::new();
                for ((id, item), code) in group.drain(..).zip(codes) {
                    match code.as_deref() {
                        Some(CONDITION_FAILED) => {
                            let outcome = self.existing(&id).await?;
                            outcomes.insert(id, outcome);
                        }
                        Some(other) => {
                            return Err(Error::permanent(
                                "TransactWriteItems",
                                format!("task {id} refused: {other}"),
                            ));
                        }
                        None => rest.push((id, item)),
                    }
                }
                group = rest;
            }
        }
        Ok(outcomes)
    }
}

#[async_trait]
impl TaskWriter for DynamoStore {
    async fn stage(
        &self,
        request_id: &str,
        tasks: &[NewTask],
    ) -> Result<Vec<InsertOutcome>, Error> {
        let (keyed, plain): (Vec<&NewTask>, Vec<&NewTask>) =
            tasks.iter().partition(|t| t.idempotency.is_some());
        let requests = plain
            .iter()
            .map(|task| Self::put_request(self.task_item(task, request_id)))
            .collect::<Result<Vec<_>, Error>>()?;
        self.batch_write(requests).await?;
        let mut keyed_outcomes = self.stage_keyed(request_id, &keyed).await?;
        Ok(tasks
            .iter()
            .map(|task| {
                keyed_outcomes
                    .remove(&task.id)
                    .unwrap_or(InsertOutcome::Inserted)
            })
            .collect())
    }

    async fn commit(&self, request_id: &str, tasks: &[NewTask]) -> Result<(), Error> {
        // Each on the condition that the item is still this request's
        // STAGED one: a commit repeated after its answer was lost must not
        // make a task that a dispatcher has queued since pending again.
        let updates = tasks
            .iter()
            .map(|task| {
                let size = item_size(&self.task_item(task, request_id));
                Ok((self.commit_update(request_id, task)?, size))
            })
            .collect::<Result<Vec<_>, Error>>()?;
        self.transact_each(updates).await
    }

    async fn abort(&self, request_id: &str, task_ids: &[String]) -> Result<(), Error> {
        // Only what this request wrote and no dispatcher has queued yet.
        let deletes = task_ids
            .iter()
            .map(|id| Ok((self.abort_delete(request_id, id)?, 0)))
            .collect::<Result<Vec<_>, Error>>()?;
        self.transact_each(deletes).await
    }
}

impl DynamoStore {
    fn commit_update(&self, request_id: &str, task: &NewTask) -> Result<TransactWriteItem, Error> {
        let shard = task.pending_shard(self.pending_shards).to_string();
        let update = self.update(
            task_key(&task.id),
            "SET #status = :pending, #pending_shard = :shard REMOVE #expires_at",
            Some("#request_id = :request AND #status = :staged"),
            &[STATUS, PENDING_SHARD, EXPIRES_AT, REQUEST_ID],
            HashMap::from([
                (":pending".into(), s(TaskStatus::Pending.as_str())),
                (":shard".into(), s(&shard)),
                (":request".into(), s(request_id)),
                (":staged".into(), s(TaskStatus::Staged.as_str())),
            ]),
        )?;
        Ok(TransactWriteItem::builder().update(update).build())
    }

    fn abort_delete(&self, request_id: &str, task_id: &str) -> Result<TransactWriteItem, Error> {
        Delete::builder()
            .table_name(&self.table)
            .set_key(Some(task_key(task_id)))
            .condition_expression(
                "#request_id = :request AND (#status = :staged OR #status = :pending)",
            )
            .expression_attribute_names("#request_id", REQUEST_ID)
            .expression_attribute_names("#status", STATUS)
            .expression_attribute_values(":request", s(request_id))
            .expression_attribute_values(":staged", s(TaskStatus::Staged.as_str()))
            .expression_attribute_values(":pending", s(TaskStatus::Pending.as_str()))
            .build()
            .map(|delete| TransactWriteItem::builder().delete(delete).build())
            .map_err(|e| build_error("Delete", e))
    }
}

#[async_trait]
impl TaskReader for DynamoStore {
    async fn task(&self, task_id: &str) -> Result<Option<Task>, Error> {
        let Some(item) = self.get(task_key(task_id)).await? else {
            return Ok(None);
        };
        let task = task_from_item(&item)?;
        Ok((task.status != TaskStatus::Staged).then_some(task))
    }

    async fn tasks(&self, task_ids: &[String]) -> Result<Vec<Task>, Error> {
        self.batch_get_tasks(task_ids, None)
            .await?
            .iter()
            .map(task_from_item)
            .collect()
    }

    async fn run_tasks_page(
        &self,
        run_id: &str,
        limit: usize,
        after: Option<&Cursor>,
    ) -> Result<Page<Task>, Error> {
        let (items, next) = self
            .index_page("by_run", (RUN_ID, run_id), true, limit.min(1000), after)
            .await?;
        Ok(Page {
            items: items
                .iter()
                .map(codec::task_from_item)
                .collect::<Result<_, _>>()?,
            next,
        })
    }
}

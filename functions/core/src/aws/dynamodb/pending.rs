//! [`PendingTasks`]: the sparse pending index, paged by `LastEvaluatedKey`,
//! and the move to QUEUED with the run's counter.

use async_trait::async_trait;
use aws_sdk_dynamodb::types::TransactWriteItem;
use chrono::Utc;

use super::codec::*;
use super::{CONDITION_FAILED, DynamoStore, Ended, TRANSACTION_ITEMS, Transaction};
use crate::Error;
use crate::aws::build_error;
use crate::model::{PendingTask, TaskStatus};
use crate::ports::{Cursor, Page, PendingTasks};
use crate::rules::TaskChange;

impl DynamoStore {
    fn queue_update(
        &self,
        run_id: &str,
        task_id: &str,
        now: &str,
    ) -> Result<TransactWriteItem, Error> {
        let (condition, mut names, mut values) = condition(&TaskChange::Queue, None);
        names.extend([RUN_ID, QUEUED_AT, PENDING_SHARD]);
        values.extend([
            (":queued".to_owned(), s(TaskStatus::Queued.as_str())),
            (":run".to_owned(), s(run_id)),
            (":now".to_owned(), s(now)),
        ]);
        let update = self.update(
            task_key(task_id),
            "SET #status = :queued, #run_id = :run, #queued_at = :now REMOVE #pending_shard",
            Some(condition),
            &names,
            values,
        )?;
        Ok(TransactWriteItem::builder().update(update).build())
    }

    /// Moves the run's counters, and what each instance ended: its tasks
    /// and the time its kernels took (maps by instance id).
    pub(super) fn run_counter(
        &self,
        run_id: &str,
        counters: &[(&'static str, u64)],
        per_instance: &[(&str, Ended)],
    ) -> Result<TransactWriteItem, Error> {
        let mut adds: Vec<String> = counters
            .iter()
            .map(|(name, _)| format!("#{name} :{name}"))
            .collect();
        let mut values: Item = counters
            .iter()
            .map(|(name, n)| (format!(":{name}"), num(*n)))
            .collect();
        let mut names: std::collections::HashMap<String, String> = counters
            .iter()
            .map(|(name, _)| (format!("#{name}"), (*name).to_owned()))
            .collect();
        for (i, (instance_id, ended)) in per_instance.iter().enumerate() {
            adds.push(format!("#{INSTANCE_TASKS}.#i{i} :i{i}"));
            adds.push(format!("#{INSTANCE_BUSY_MS}.#i{i} :b{i}"));
            values.insert(format!(":i{i}"), num(ended.tasks));
            values.insert(format!(":b{i}"), num(ended.busy_ms));
            names.insert(format!("#i{i}"), (*instance_id).to_owned());
        }
        if !per_instance.is_empty() {
            for name in [INSTANCE_TASKS, INSTANCE_BUSY_MS] {
                names.insert(format!("#{name}"), name.to_owned());
            }
        }
        let update = aws_sdk_dynamodb::types::Update::builder()
            .table_name(&self.table)
            .set_key(Some(run_key(run_id)))
            .update_expression(format!("ADD {}", adds.join(", ")))
            .condition_expression("attribute_exists(pk)")
            .set_expression_attribute_names(Some(names))
            .set_expression_attribute_values(Some(values))
            .build()
            .map_err(|e| build_error("Update", e))?;
        Ok(TransactWriteItem::builder().update(update).build())
    }

    /// Queues a group of tasks in one transaction with the counter; tasks
    /// that are no longer PENDING are dropped from the group and the rest
    /// tried again. Returns the ids queued.
    async fn queue_group(
        &self,
        run_id: &str,
        mut ids: Vec<String>,
        now: &str,
    ) -> Result<Vec<String>, Error> {
        while !ids.is_empty() {
            let mut items = ids
                .iter()
                .map(|id| self.queue_update(run_id, id, now))
                .collect::<Result<Vec<_>, Error>>()?;
            items.push(self.run_counter(run_id, &[(QUEUED, ids.len() as u64)], &[])?);
            let codes = match self.transact(items).await? {
                Transaction::Committed => return Ok(ids),
                Transaction::Cancelled(codes) => codes,
            };
            if codes.len() != ids.len() + 1 {
                // No reasons given: one at a time.
                let mut queued = Vec::new();
                for id in ids {
                    if !self.queue_group_of_one(run_id, &id, now).await? {
                        continue;
                    }
                    queued.push(id);
                }
                return Ok(queued);
            }
            if codes.last().is_some_and(Option::is_some) {
                return Err(Error::permanent(
                    "TransactWriteItems",
                    format!("run {run_id} refused its counter: {:?}", codes.last()),
                ));
            }
            let mut rest = Vec::new();
            for (id, code) in ids.into_iter().zip(codes) {
                match code.as_deref() {
                    None => rest.push(id),
                    Some(CONDITION_FAILED) => {} // no longer PENDING: left alone
                    Some(other) => {
                        return Err(Error::permanent(
                            "TransactWriteItems",
                            format!("task {id} refused: {other}"),
                        ));
                    }
                }
            }
            ids = rest;
        }
        Ok(ids)
    }

    async fn queue_group_of_one(&self, run_id: &str, id: &str, now: &str) -> Result<bool, Error> {
        let items = vec![
            self.queue_update(run_id, id, now)?,
            self.run_counter(run_id, &[(QUEUED, 1)], &[])?,
        ];
        Ok(self.transact(items).await? == Transaction::Committed)
    }
}

#[async_trait]
impl PendingTasks for DynamoStore {
    async fn pending(
        &self,
        shard: u32,
        limit: usize,
        after: Option<&Cursor>,
    ) -> Result<Page<PendingTask>, Error> {
        let (keys, next) = self
            .index_page(
                "pending",
                (PENDING_SHARD, &shard.to_string()),
                true,
                limit,
                after,
            )
            .await?;
        // The index carries keys only, and is eventually consistent: one
        // consistent read of the items gives their payloads and drops the
        // tasks queued a moment ago.
        let ids: Vec<String> = keys.iter().filter_map(task_id_of_key).collect();
        let mut items: std::collections::HashMap<String, Item> = self
            .batch_get_tasks(&ids, None)
            .await?
            .into_iter()
            .filter(|item| status_of(item).is_ok_and(|s| s == TaskStatus::Pending))
            .filter_map(|item| Some((opt_s(&item, TASK_ID)?, item)))
            .collect();
        let items = ids
            .iter()
            .filter_map(|id| items.remove(id))
            .map(|item| {
                Ok(PendingTask {
                    id: req_s(&item, TASK_ID)?,
                    account: req_s(&item, ACCOUNT)?,
                    kernel: req_s(&item, KERNEL)?,
                    payload: blob_from_item(&item, PAYLOAD, PAYLOAD_KEY)?
                        .ok_or_else(|| Error::malformed("pending task", "no payload"))?,
                })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        Ok(Page { items, next })
    }

    async fn mark_queued(&self, run_id: &str, task_ids: &[String]) -> Result<Vec<String>, Error> {
        let now = timestamp(Utc::now());
        let mut changed = Vec::with_capacity(task_ids.len());
        for chunk in task_ids.chunks(TRANSACTION_ITEMS - 1) {
            changed.extend(self.queue_group(run_id, chunk.to_vec(), &now).await?);
        }
        Ok(changed)
    }
}

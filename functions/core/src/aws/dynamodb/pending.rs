//! [`PendingTasks`]: the sparse pending index, paged by `LastEvaluatedKey`,
//! and the move to QUEUED with the run's counter.

use async_trait::async_trait;
use aws_sdk_dynamodb::types::TransactWriteItem;
use chrono::Utc;

use super::codec::*;
use super::{CONDITION_FAILED, DynamoStore, RunMove, TRANSACTION_ITEMS, Transaction};
use crate::Error;
use crate::aws::build_error;
use crate::model::{PendingTask, TaskStatus};
use crate::ports::{Cursor, Page, PendingTasks, Sent};
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

    /// Moves the run's counters and entries of its counter maps.
    pub(super) fn run_counter(
        &self,
        run_id: &str,
        moves: &RunMove<'_>,
    ) -> Result<TransactWriteItem, Error> {
        let mut adds = Vec::new();
        let mut sets = Vec::new();
        let mut values = Item::new();
        let mut names = std::collections::HashMap::new();
        for (name, n) in &moves.counters {
            adds.push(format!("#{name} :{name}"));
            values.insert(format!(":{name}"), num(*n));
            names.insert(format!("#{name}"), (*name).to_owned());
        }
        // ADD takes top-level attributes only: an entry of a map is set to
        // itself (or zero) plus the count, in the same single update.
        for (i, ((map, key), n)) in moves.entries.iter().enumerate() {
            let path = format!("#{map}.#k{i}");
            sets.push(format!("{path} = if_not_exists({path}, :zero) + :k{i}"));
            values.insert(format!(":k{i}"), num(*n));
            names.insert(format!("#{map}"), (*map).to_owned());
            names.insert(format!("#k{i}"), (*key).to_owned());
        }
        if !sets.is_empty() {
            values.insert(":zero".to_owned(), num(0));
        }
        let mut expression = Vec::new();
        if !sets.is_empty() {
            expression.push(format!("SET {}", sets.join(", ")));
        }
        if !adds.is_empty() {
            expression.push(format!("ADD {}", adds.join(", ")));
        }
        let update = aws_sdk_dynamodb::types::Update::builder()
            .table_name(&self.table)
            .set_key(Some(run_key(run_id)))
            .update_expression(expression.join(" "))
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
        mut tasks: Vec<&Sent>,
        now: &str,
    ) -> Result<Vec<String>, Error> {
        while !tasks.is_empty() {
            let mut items = tasks
                .iter()
                .map(|task| self.queue_update(run_id, &task.task_id, now))
                .collect::<Result<Vec<_>, Error>>()?;
            let moves = tasks.iter().fold(
                RunMove::default().count(QUEUED, tasks.len() as u64),
                |moves, task| moves.queued(&task.kernel, 1),
            );
            items.push(self.run_counter(run_id, &moves)?);
            let codes = match self.transact(items).await? {
                Transaction::Committed => {
                    return Ok(tasks.into_iter().map(|t| t.task_id.clone()).collect());
                }
                Transaction::Cancelled(codes) => codes,
            };
            if codes.len() != tasks.len() + 1 {
                // No reasons given: one at a time.
                let mut queued = Vec::new();
                for task in tasks {
                    if self.queue_group_of_one(run_id, task, now).await? {
                        queued.push(task.task_id.clone());
                    }
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
            for (task, code) in tasks.into_iter().zip(codes) {
                match code.as_deref() {
                    None => rest.push(task),
                    Some(CONDITION_FAILED) => {} // no longer PENDING: left alone
                    Some(other) => {
                        return Err(Error::permanent(
                            "TransactWriteItems",
                            format!("task {} refused: {other}", task.task_id),
                        ));
                    }
                }
            }
            tasks = rest;
        }
        Ok(Vec::new())
    }

    async fn queue_group_of_one(
        &self,
        run_id: &str,
        task: &Sent,
        now: &str,
    ) -> Result<bool, Error> {
        let moves = RunMove::default().count(QUEUED, 1).queued(&task.kernel, 1);
        let items = vec![
            self.queue_update(run_id, &task.task_id, now)?,
            self.run_counter(run_id, &moves)?,
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

    async fn mark_queued(&self, run_id: &str, tasks: &[Sent]) -> Result<Vec<String>, Error> {
        let now = timestamp(Utc::now());
        let mut changed = Vec::with_capacity(tasks.len());
        for chunk in tasks.chunks(TRANSACTION_ITEMS - 1) {
            changed.extend(
                self.queue_group(run_id, chunk.iter().collect(), &now)
                    .await?,
            );
        }
        Ok(changed)
    }
}

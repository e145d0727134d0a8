//! [`PendingTasks`]: the sparse pending index, paged by `LastEvaluatedKey`,
//! and the move to QUEUED with the run's counter.

use async_trait::async_trait;
use aws_sdk_dynamodb::types::TransactWriteItem;
use chrono::{DateTime, Utc};

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
        for (i, (name, n)) in moves.counters.iter().enumerate() {
            adds.push(format!("#c{i} :c{i}"));
            values.insert(format!(":c{i}"), num(*n));
            names.insert(format!("#c{i}"), name.clone());
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

    /// Changes a group of tasks in one transaction with the run's counters
    /// (`moves` of the tasks in it); tasks whose condition fails are left
    /// alone and the rest tried again (one at a time when the service gives
    /// no reasons). Returns the ids changed.
    async fn change_group<'a>(
        &self,
        run_id: &str,
        mut tasks: Vec<&'a Sent>,
        update: impl Fn(&str) -> Result<TransactWriteItem, Error>,
        moves: impl Fn(&[&'a Sent]) -> RunMove<'a>,
    ) -> Result<Vec<String>, Error> {
        let mut one_at_a_time = false;
        let mut changed = Vec::new();
        while !tasks.is_empty() {
            let group: Vec<&'a Sent> = if one_at_a_time {
                vec![tasks.remove(0)]
            } else {
                std::mem::take(&mut tasks)
            };
            let mut items = group
                .iter()
                .map(|task| update(&task.task_id))
                .collect::<Result<Vec<_>, Error>>()?;
            items.push(self.run_counter(run_id, &moves(&group))?);
            let codes = match self.transact(items).await? {
                Transaction::Committed => {
                    changed.extend(group.iter().map(|t| t.task_id.clone()));
                    continue;
                }
                Transaction::Cancelled(codes) => codes,
            };
            if group.len() == 1
                && codes
                    .first()
                    .is_none_or(|c| c.as_deref() == Some(CONDITION_FAILED))
            {
                continue; // refused: left alone
            }
            if codes.len() != group.len() + 1 {
                one_at_a_time = true;
                tasks.extend(group);
                continue;
            }
            if codes.last().is_some_and(Option::is_some) {
                return Err(Error::permanent(
                    "TransactWriteItems",
                    format!("run {run_id} refused its counter: {:?}", codes.last()),
                ));
            }
            for (task, code) in group.into_iter().zip(codes) {
                match code.as_deref() {
                    None => tasks.push(task),
                    Some(CONDITION_FAILED) => {} // past the change: left alone
                    Some(other) => {
                        return Err(Error::permanent(
                            "TransactWriteItems",
                            format!("task {} refused: {other}", task.task_id),
                        ));
                    }
                }
            }
        }
        Ok(changed)
    }

    fn cancel_update(
        &self,
        run_id: &str,
        task_id: &str,
        now: &str,
    ) -> Result<TransactWriteItem, Error> {
        let (condition, mut names, mut values) = condition(&TaskChange::Cancel { run_id }, None);
        names.extend([FINISHED_AT, PENDING_SHARD]);
        values.extend([
            (":cancelled".to_owned(), s(TaskStatus::Cancelled.as_str())),
            (":run".to_owned(), s(run_id)),
            (":now".to_owned(), s(now)),
        ]);
        let update = self.update(
            task_key(task_id),
            "SET #status = :cancelled, #run_id = :run, #finished_at = :now REMOVE #pending_shard",
            Some(condition),
            &names,
            values,
        )?;
        Ok(TransactWriteItem::builder().update(update).build())
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
                    created_at: opt_time(&item, CREATED_AT)?
                        .ok_or_else(|| Error::malformed("pending task", "no created_at"))?,
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
            let queued = self
                .change_group(
                    run_id,
                    chunk.iter().collect(),
                    |id| self.queue_update(run_id, id, &now),
                    |group| {
                        group.iter().fold(
                            RunMove::default().count(QUEUED, group.len() as u64),
                            |moves, task| moves.queued(&task.kernel, 1),
                        )
                    },
                )
                .await?;
            changed.extend(queued);
        }
        Ok(changed)
    }

    async fn cancel_tasks(
        &self,
        run_id: &str,
        task_ids: &[String],
        now: DateTime<Utc>,
    ) -> Result<Vec<String>, Error> {
        let now = timestamp(now);
        // A cancel moves no kernel's counters.
        let tasks = Sent::all(task_ids, "");
        let mut changed = Vec::with_capacity(tasks.len());
        for chunk in tasks.chunks(TRANSACTION_ITEMS - 1) {
            let cancelled = self
                .change_group(
                    run_id,
                    chunk.iter().collect(),
                    |id| self.cancel_update(run_id, id, &now),
                    |group| RunMove::default().count(CANCELLED, group.len() as u64),
                )
                .await?;
            changed.extend(cancelled);
        }
        Ok(changed)
    }
}

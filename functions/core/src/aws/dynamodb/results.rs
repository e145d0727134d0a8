//! [`ResultRecorder`]: results, attempts and dead letters, each recorded
//! once, with the run's counters in the same transaction.

use std::collections::{BTreeMap, HashMap, HashSet};

use async_trait::async_trait;
use aws_sdk_dynamodb::types::{AttributeValue, TransactWriteItem};
use chrono::{DateTime, Utc};

use super::codec::*;
use super::{
    CONDITION_FAILED, DynamoStore, RunMove, Transaction, VALIDATION_ERROR, transaction_groups,
};
use crate::Error;
use crate::aws::build_error;
use crate::limits::{ERROR_LIMIT, RESULT_TOO_LARGE, SUMMARY_LIMIT, bounded};
use crate::message::{AttemptEvent, TaskOutcome, TaskResult};
use crate::model::{AttemptRecord, TaskStatus, Usage};
use crate::ports::{AttemptKind, RecordOutcome, ResultRecorder};
use crate::rules::TaskChange;

const DEFAULT_DEAD_LETTER_ERROR: &str = "no attempt succeeded within the queue's delivery limit";
/// Room kept in each results transaction for the run counters.
const COUNTER_ROOM: usize = 10;

/// Whether DynamoDB refused a write because an item would pass 400 KB.
fn is_item_too_large(error: &Error) -> bool {
    matches!(error, Error::Permanent { reason, .. } if reason.contains("Item size"))
}

/// The counter a result moves.
fn counter(outcome: &TaskOutcome) -> &'static str {
    match outcome {
        TaskOutcome::Done { .. } => DONE,
        TaskOutcome::Failed { .. } => FAILED,
    }
}

impl DynamoStore {
    /// The task's side of a result: QUEUED in its run → DONE | FAILED.
    /// With `failed_instead`, the task FAILS with that reason and keeps no
    /// result (the result itself could not be stored).
    /// A late one (its run cancelled the task first) is kept on the task,
    /// which stays CANCELLED.
    fn result_update(
        &self,
        result: &TaskResult,
        failed_instead: Option<&str>,
        late: bool,
    ) -> Result<TransactWriteItem, Error> {
        let run_id = &result.run_id;
        let change = if late {
            TaskChange::RecordLate { run_id }
        } else {
            TaskChange::Finish { run_id }
        };
        let (condition, mut names, mut values) = condition(&change, None);
        values.extend([
            (":instance".to_owned(), s(&result.instance_id)),
            (":attempts".to_owned(), num(u64::from(result.attempts))),
            (":started".to_owned(), s(&timestamp(result.started_at))),
            (":finished".to_owned(), s(&timestamp(result.finished_at))),
            (":duration".to_owned(), num(result.duration_ms())),
        ]);
        names.extend([INSTANCE_ID, ATTEMPTS, STARTED_AT, FINISHED_AT, DURATION_MS]);
        let mut sets = vec![
            "#status = :status".to_owned(),
            "#instance_id = :instance".to_owned(),
            "#attempts = :attempts".to_owned(),
            "#started_at = :started".to_owned(),
            "#finished_at = :finished".to_owned(),
            "#duration_ms = :duration".to_owned(),
        ];
        let failure = match (&result.outcome, failed_instead) {
            (_, Some(reason)) => Some(reason),
            (TaskOutcome::Failed { error }, None) => Some(error.as_str()),
            (TaskOutcome::Done { result, summary }, None) => {
                values.insert(":status".into(), s(TaskStatus::Done.as_str()));
                values.insert(":summary".into(), s(&bounded(summary, SUMMARY_LIMIT)));
                names.push(SUMMARY);
                sets.push("#summary = :summary".to_owned());
                let (name, value) = blob_attribute(RESULT, RESULT_KEY, result);
                values.insert(":result".into(), value);
                names.push(name);
                sets.push(format!("#{name} = :result"));
                None
            }
        };
        if let Some(error) = failure {
            values.insert(":status".into(), s(TaskStatus::Failed.as_str()));
            values.insert(":error".into(), s(&bounded(error, ERROR_LIMIT)));
            names.push(LAST_ERROR);
            sets.push("#last_error = :error".to_owned());
        }
        let expression = if late {
            sets.retain(|set| set != "#status = :status");
            values.remove(":status");
            values.insert(
                ":late".into(),
                AttributeValue::Ss(vec![crate::rules::LATE_RESULT.to_owned()]),
            );
            format!("SET {} ADD #seen_events :late", sets.join(", "))
        } else {
            names.push(STATUS);
            format!("SET {}", sets.join(", "))
        };
        let update = self.update(
            task_key(&result.task_id),
            &expression,
            Some(condition),
            &names,
            values,
        )?;
        Ok(TransactWriteItem::builder().update(update).build())
    }

    /// Why a change to a task was refused, by the rules, from the task as
    /// it is now.
    async fn settle_refused(
        &self,
        task_id: &str,
        change: &TaskChange<'_>,
        event_id: Option<&str>,
    ) -> Result<RecordOutcome, Error> {
        let item = self.get(task_key(task_id)).await?;
        let facts = item
            .as_ref()
            .map(|item| facts(item, event_id))
            .transpose()?;
        Ok(change.refusal(facts.as_ref()).into())
    }

    /// One result on its own, with its counter. An item limit that refuses
    /// it fails the task with the reason instead.
    async fn record_one(&self, result: &TaskResult) -> Result<RecordOutcome, Error> {
        let finish = TaskChange::Finish {
            run_id: &result.run_id,
        };
        let items = vec![
            self.result_update(result, None, false)?,
            self.run_counter(
                &result.run_id,
                &RunMove::default().ended(result, counter(&result.outcome)),
            )?,
        ];
        // AWS names an item over 400 KB as a cancellation reason; the
        // emulator refuses the whole call: both mean the same here.
        let too_large = match self.transact(items).await {
            Ok(Transaction::Committed) => return Ok(RecordOutcome::Recorded),
            Ok(Transaction::Cancelled(codes)) => {
                codes.first().cloned().flatten().as_deref() == Some(VALIDATION_ERROR)
            }
            Err(error) if is_item_too_large(&error) => true,
            Err(error) => return Err(error),
        };
        if too_large {
            self.fail_instead(result, RESULT_TOO_LARGE).await
        } else {
            self.settle_refused(&result.task_id, &finish, None).await
        }
    }

    /// A result for a task its run cancelled first, kept on it as late,
    /// with the run's `late` counter.
    async fn record_late(&self, result: &TaskResult) -> Result<RecordOutcome, Error> {
        let items = vec![
            self.result_update(result, None, true)?,
            self.run_counter(&result.run_id, &RunMove::default().count(LATE, 1))?,
        ];
        match self.transact(items).await? {
            Transaction::Committed => Ok(RecordOutcome::Late),
            Transaction::Cancelled(_) => {
                let late = TaskChange::RecordLate {
                    run_id: &result.run_id,
                };
                self.settle_refused(&result.task_id, &late, Some(crate::rules::LATE_RESULT))
                    .await
            }
        }
    }

    async fn fail_instead(
        &self,
        result: &TaskResult,
        reason: &str,
    ) -> Result<RecordOutcome, Error> {
        let items = vec![
            self.result_update(result, Some(reason), false)?,
            self.run_counter(&result.run_id, &RunMove::default().ended(result, FAILED))?,
        ];
        match self.transact(items).await? {
            Transaction::Committed => Ok(RecordOutcome::FailedInstead(reason.to_owned())),
            Transaction::Cancelled(_) => {
                let finish = TaskChange::Finish {
                    run_id: &result.run_id,
                };
                self.settle_refused(&result.task_id, &finish, None).await
            }
        }
    }

    /// Records a group of results of distinct tasks in one transaction;
    /// refused ones are settled by the rules and the rest tried again.
    async fn record_group(
        &self,
        results: &[&TaskResult],
        outcomes: &mut HashMap<String, RecordOutcome>,
    ) -> Result<(), Error> {
        let mut group: Vec<&TaskResult> = results.to_vec();
        while !group.is_empty() {
            let mut counters: BTreeMap<&str, RunMove> = BTreeMap::new();
            for result in &group {
                let moves = counters.remove(result.run_id.as_str()).unwrap_or_default();
                counters.insert(
                    &result.run_id,
                    moves.ended(result, counter(&result.outcome)),
                );
            }
            let mut items = group
                .iter()
                .map(|r| self.result_update(r, None, false))
                .collect::<Result<Vec<_>, Error>>()?;
            for (run_id, moves) in &counters {
                items.push(self.run_counter(run_id, moves)?);
            }
            let codes = match self.transact(items).await {
                Ok(Transaction::Committed) => {
                    for result in group.drain(..) {
                        outcomes.insert(result.task_id.clone(), RecordOutcome::Recorded);
                    }
                    return Ok(());
                }
                Ok(Transaction::Cancelled(codes)) => codes,
                // Refused whole (the emulator's way with an item over the
                // limit): each on its own tells which.
                Err(error) if !error.is_retryable() => Vec::new(),
                Err(error) => return Err(error),
            };
            let counters_refused = codes.iter().skip(group.len()).any(Option::is_some);
            if codes.len() != group.len() + counters.len() || counters_refused {
                // No reasons, or a run refused its counter: one by one.
                for result in group.drain(..) {
                    let outcome = self.record_one(result).await?;
                    outcomes.insert(result.task_id.clone(), outcome);
                }
                return Ok(());
            }
            let mut rest = Vec::new();
            for (result, code) in group.drain(..).zip(codes) {
                let outcome = match code.as_deref() {
                    None => {
                        rest.push(result);
                        continue;
                    }
                    Some(CONDITION_FAILED) => {
                        let finish = TaskChange::Finish {
                            run_id: &result.run_id,
                        };
                        self.settle_refused(&result.task_id, &finish, None).await?
                    }
                    Some(VALIDATION_ERROR) => self.fail_instead(result, RESULT_TOO_LARGE).await?,
                    Some(_) => self.record_one(result).await?,
                };
                outcomes.insert(result.task_id.clone(), outcome);
            }
            group = rest;
        }
        Ok(())
    }
}

#[async_trait]
impl ResultRecorder for DynamoStore {
    async fn record_results(&self, results: &[TaskResult]) -> Result<Vec<RecordOutcome>, Error> {
        // The first result of each task goes in a transaction; a second
        // one for the same task in this batch is settled afterwards.
        let mut seen = HashSet::new();
        let firsts: Vec<(&TaskResult, usize)> = results
            .iter()
            .filter(|r| seen.insert(r.task_id.as_str()))
            .map(|r| {
                let size = match &r.outcome {
                    TaskOutcome::Done { result, summary } => {
                        summary.len().min(SUMMARY_LIMIT) + result.inline_bytes()
                    }
                    TaskOutcome::Failed { error } => error.len().min(ERROR_LIMIT),
                };
                // A stored result's key fits the margin with the rest.
                (r, size + 512)
            })
            .collect();
        let mut outcomes: HashMap<String, RecordOutcome> = HashMap::new();
        for group in transaction_groups(firsts, COUNTER_ROOM) {
            self.record_group(&group, &mut outcomes).await?;
        }
        let mut settled_first = HashSet::new();
        let mut answer = Vec::with_capacity(results.len());
        for result in results {
            if settled_first.insert(result.task_id.as_str())
                && let Some(outcome) = outcomes.get(&result.task_id)
            {
                answer.push(outcome.clone());
                continue;
            }
            let finish = TaskChange::Finish {
                run_id: &result.run_id,
            };
            answer.push(self.settle_refused(&result.task_id, &finish, None).await?);
        }
        for (outcome, result) in answer.iter_mut().zip(results) {
            if *outcome == RecordOutcome::CancelledFirst {
                *outcome = self.record_late(result).await?;
            }
        }
        Ok(answer)
    }

    async fn record_attempt(
        &self,
        event: &AttemptEvent,
        kind: AttemptKind,
    ) -> Result<RecordOutcome, Error> {
        let change = TaskChange::CountAttempt {
            run_id: &event.run_id,
        };
        let counter = match kind {
            AttemptKind::Failed => FAILED_ATTEMPTS,
            AttemptKind::Interrupted => INTERRUPTIONS,
        };
        let (condition, mut names, mut values) = condition(&change, Some(&event.event_id));
        values.extend([
            (":one".to_owned(), num(1)),
            (
                ":event".to_owned(),
                AttributeValue::Ss(vec![event.event_id.clone()]),
            ),
        ]);
        let record = AttemptRecord {
            instance_id: event.instance_id.clone(),
            started_at: event.started_at,
            ended_at: event.at,
            outcome: kind,
        };
        values.extend([
            (
                ":attempt".to_owned(),
                AttributeValue::L(vec![attempt_value(&record)]),
            ),
            (":none".to_owned(), AttributeValue::L(Vec::new())),
        ]);
        names.extend([counter, ATTEMPT_LOG]);
        let mut expression = format!(
            "ADD #{counter} :one, #seen_events :event \
             SET #attempt_log = list_append(if_not_exists(#attempt_log, :none), :attempt)"
        );
        if let Some(error) = &event.error {
            values.insert(":error".into(), s(&bounded(error, ERROR_LIMIT)));
            names.push(LAST_ERROR);
            expression.push_str(", #last_error = :error");
        }
        let update = self.update(
            task_key(&event.task_id),
            &expression,
            Some(condition),
            &names,
            values,
        )?;
        if self.conditional_update(update).await? {
            Ok(RecordOutcome::Recorded)
        } else {
            self.settle_refused(&event.task_id, &change, Some(&event.event_id))
                .await
        }
    }

    async fn add_usage(&self, run_id: &str, usage: &Usage) -> Result<(), Error> {
        let fields: Vec<(&str, f64)> = usage
            .fields()
            .into_iter()
            .filter(|(_, value)| *value != 0.0)
            .collect();
        if fields.is_empty() && usage.calls.is_empty() {
            return Ok(());
        }
        let mut adds: Vec<String> = fields
            .iter()
            .map(|(name, _)| format!("#usage.#{name} :{name}"))
            .collect();
        // Each call's count is a top-level counter (`calls:<component>/<call>`).
        adds.extend((0..usage.calls.len()).map(|i| format!("#c{i} :c{i}")));
        let mut update = aws_sdk_dynamodb::types::Update::builder()
            .table_name(&self.table)
            .set_key(Some(run_key(run_id)))
            .update_expression(format!("ADD {}", adds.join(", ")))
            .condition_expression("attribute_exists(#usage)")
            .expression_attribute_names("#usage", USAGE);
        for (name, value) in fields {
            update = update
                .expression_attribute_names(format!("#{name}"), name)
                .expression_attribute_values(
                    format!(":{name}"),
                    AttributeValue::N(value.to_string()),
                );
        }
        for (i, (call, n)) in usage.calls.iter().enumerate() {
            update = update
                .expression_attribute_names(format!("#c{i}"), format!("{CALLS_PREFIX}{call}"))
                .expression_attribute_values(format!(":c{i}"), num(*n));
        }
        let update = update.build().map_err(|e| build_error("Update", e))?;
        // Refused only for a run that is not there: nothing to count on.
        self.conditional_update(update).await?;
        Ok(())
    }

    async fn fail_task(
        &self,
        task_id: &str,
        run_id: &str,
        at: DateTime<Utc>,
        reason: Option<&str>,
    ) -> Result<RecordOutcome, Error> {
        let finish = TaskChange::Finish { run_id };
        let (condition, mut names, mut values) = condition(&finish, None);
        names.extend([FINISHED_AT, LAST_ERROR]);
        values.extend([
            (":failed".to_owned(), s(TaskStatus::Failed.as_str())),
            (":at".to_owned(), s(&timestamp(at))),
            (
                ":error".to_owned(),
                s(&bounded(
                    reason.unwrap_or(DEFAULT_DEAD_LETTER_ERROR),
                    ERROR_LIMIT,
                )),
            ),
        ]);
        let error = if reason.is_some() {
            ":error"
        } else {
            "if_not_exists(#last_error, :error)"
        };
        let update = self.update(
            task_key(task_id),
            &format!("SET #status = :failed, #finished_at = :at, #last_error = {error}"),
            Some(condition),
            &names,
            values,
        )?;
        let items = vec![
            TransactWriteItem::builder().update(update).build(),
            self.run_counter(run_id, &RunMove::default().count(FAILED, 1))?,
        ];
        match self.transact(items).await? {
            Transaction::Committed => Ok(RecordOutcome::Recorded),
            Transaction::Cancelled(_) => self.settle_refused(task_id, &finish, None).await,
        }
    }
}

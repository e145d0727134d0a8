//! [`RunStore`]: runs, the current-run pointer, the dispatch lease and the
//! fleet record.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_dynamodb::error::SdkError;
use aws_sdk_dynamodb::types::{AttributeValue, Delete, TransactWriteItem};
use chrono::{DateTime, Utc};

use super::codec::*;
use super::{DynamoStore, Transaction};
use crate::Error;
use crate::aws::build_error;
use crate::model::{InstanceSeen, Launched, Run, RunState, SpotPrice};
use crate::plan::FleetPlan;
use crate::ports::{Cursor, Page, RunReader, RunStore};

#[async_trait]
impl RunReader for DynamoStore {
    async fn run(&self, run_id: &str) -> Result<Option<Run>, Error> {
        self.get(run_key(run_id))
            .await?
            .map(|item| run_from_item(&item))
            .transpose()
    }
}

#[async_trait]
impl RunStore for DynamoStore {
    async fn current_run(&self) -> Result<Option<Run>, Error> {
        let Some(pointer) = self.get(current_run_key()).await? else {
            return Ok(None);
        };
        self.run(&req_s(&pointer, CURRENT_RUN_ID)?).await
    }

    async fn runs_page(&self, limit: usize, after: Option<&Cursor>) -> Result<Page<Run>, Error> {
        let (items, next) = self
            .index_page(
                "runs",
                (RUN_LIST, RUN_LIST_VALUE),
                false,
                limit.min(1000),
                after,
            )
            .await?;
        Ok(Page {
            items: items.iter().map(run_from_item).collect::<Result<_, _>>()?,
            next,
        })
    }

    async fn open_run(
        &self,
        new_run_id: &str,
        now: DateTime<Utc>,
        deadline: DateTime<Utc>,
    ) -> Result<(Run, bool), Error> {
        if let Some(run) = self.current_run().await? {
            return Ok((run, false));
        }
        let mut pointer = current_run_key();
        pointer.insert(CURRENT_RUN_ID.into(), s(new_run_id));
        let mut run_item = run_key(new_run_id);
        run_item.extend([
            (ID.to_owned(), s(new_run_id)),
            (RUN_LIST.to_owned(), s(RUN_LIST_VALUE)),
            (STATE.to_owned(), s(RunState::Open.as_str())),
            (STARTED_AT.to_owned(), s(&timestamp(now))),
            (DEADLINE.to_owned(), s(&timestamp(deadline))),
            (QUEUED.to_owned(), num(0)),
            (DONE.to_owned(), num(0)),
            (FAILED.to_owned(), num(0)),
            (FLEET_REQUESTS.to_owned(), num(0)),
            (INSTANCES.to_owned(), AttributeValue::M(HashMap::new())),
            (SPOT_PRICES.to_owned(), AttributeValue::M(HashMap::new())),
            (INSTANCE_TASKS.to_owned(), AttributeValue::M(HashMap::new())),
            (USAGE.to_owned(), AttributeValue::M(HashMap::new())),
            (
                INSTANCE_BUSY_MS.to_owned(),
                AttributeValue::M(HashMap::new()),
            ),
            (WAITING.to_owned(), AttributeValue::Bool(false)),
        ]);
        let run = run_from_item(&run_item)?;
        let transaction = self
            .transact(vec![
                self.put_if_absent(pointer)?,
                self.put_if_absent(run_item)?,
            ])
            .await?;
        if transaction == Transaction::Committed {
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
        // The owner's own lease counts as free: an acquire whose answer was
        // lost is repeated by the SDK and must find its write, not refuse
        // the run for a whole lease.
        self.conditional_update(self.update(
            run_key(run_id),
            "SET #lease_owner = :owner, #lease_until = :until",
            Some(
                "#state = :open AND (attribute_not_exists(#lease_until) OR #lease_until < :now OR #lease_owner = :owner)",
            ),
            &[LEASE_OWNER, LEASE_UNTIL, STATE],
            HashMap::from([
                (":owner".into(), s(owner)),
                (":until".into(), num(until)),
                (":now".into(), num(now_ms)),
                (":open".into(), s(RunState::Open.as_str())),
            ]),
        )?)
        .await
    }

    async fn release_lease(
        &self,
        run_id: &str,
        owner: &str,
        waiting: bool,
        plan: Option<&FleetPlan>,
    ) -> Result<(), Error> {
        let mut values = HashMap::from([
            (":owner".into(), s(owner)),
            (":waiting".into(), AttributeValue::Bool(waiting)),
        ]);
        let mut sets = "SET #waiting = :waiting";
        if let Some(plan) = plan {
            let text = serde_json::to_string(plan).map_err(|e| Error::malformed("plan", e))?;
            values.insert(":plan".into(), s(&text));
            sets = "SET #waiting = :waiting, #plan = :plan";
        }
        // A refusal means the lease expired and was taken over: nothing of
        // ours is left to release.
        self.conditional_update(self.update(
            run_key(run_id),
            &format!("{sets} REMOVE #lease_owner, #lease_until"),
            Some("#lease_owner = :owner"),
            &[LEASE_OWNER, LEASE_UNTIL, WAITING, PLAN][..if plan.is_some() { 4 } else { 3 }],
            values,
        )?)
        .await?;
        Ok(())
    }

    async fn record_fleet(
        &self,
        run_id: &str,
        request_number: u32,
        launched: &[Launched],
        prices: &[SpotPrice],
    ) -> Result<bool, Error> {
        let mut values: Item = HashMap::from([
            (":n".into(), num(u64::from(request_number))),
            (":next".into(), num(u64::from(request_number) + 1)),
        ]);
        let mut sets = vec!["#fleet_requests = :next".to_owned()];
        for (i, instance) in launched.iter().enumerate() {
            values.insert(format!(":i{i}"), launched_value(instance));
            sets.push(format!("#instances.#i{i} = :i{i}"));
        }
        for (i, price) in prices.iter().enumerate() {
            values.insert(format!(":p{i}"), spot_price_value(price));
            sets.push(format!("#spot_prices.#p{i} = :p{i}"));
        }
        let mut update = aws_sdk_dynamodb::types::Update::builder()
            .table_name(&self.table)
            .set_key(Some(run_key(run_id)))
            .update_expression(format!("SET {}", sets.join(", ")))
            .condition_expression("#fleet_requests = :n")
            .set_expression_attribute_values(Some(values));
        for (i, instance) in launched.iter().enumerate() {
            update = update.expression_attribute_names(format!("#i{i}"), &instance.id);
        }
        for (i, price) in prices.iter().enumerate() {
            update = update.expression_attribute_names(format!("#p{i}"), spot_price_key(price));
        }
        if !prices.is_empty() {
            update = update.expression_attribute_names(format!("#{SPOT_PRICES}"), SPOT_PRICES);
        }
        // DynamoDB refuses a name the expressions do not use: a request
        // that launched nothing records only its number.
        if !launched.is_empty() {
            update = update.expression_attribute_names(format!("#{INSTANCES}"), INSTANCES);
        }
        update = update.expression_attribute_names(format!("#{FLEET_REQUESTS}"), FLEET_REQUESTS);
        let update = update.build().map_err(|e| build_error("Update", e))?;
        if self.conditional_update(update).await? {
            return Ok(true);
        }
        // Refused: another pass recorded this request, or this call's own
        // write did and its answer was lost.
        let run = self.run(run_id).await?;
        Ok(run.is_some_and(|run| run.records_fleet_request(request_number, launched)))
    }

    async fn record_instances(&self, run_id: &str, seen: &[InstanceSeen]) -> Result<(), Error> {
        // One update for them all; `if_not_exists` keeps a field already
        // recorded, so passes that race record the same first sighting.
        let mut update = aws_sdk_dynamodb::types::Update::builder()
            .table_name(&self.table)
            .set_key(Some(run_key(run_id)));
        let mut sets = Vec::new();
        let mut exists = Vec::new();
        let mut used = std::collections::BTreeSet::from([INSTANCES]);
        for (i, instance) in seen.iter().enumerate() {
            let fields = [
                (ZONE, instance.zone.clone()),
                (ENDED_AT, instance.ended_at.map(timestamp)),
            ];
            for (field, value) in fields {
                let Some(value) = value else { continue };
                used.insert(field);
                let path = format!("#instances.#i{i}.#{field}");
                sets.push(format!("{path} = if_not_exists({path}, :{field}{i})"));
                update = update.expression_attribute_values(format!(":{field}{i}"), s(&value));
            }
            update = update.expression_attribute_names(format!("#i{i}"), &instance.id);
            exists.push(format!("attribute_exists(#instances.#i{i})"));
        }
        if sets.is_empty() {
            return Ok(());
        }
        // DynamoDB refuses a name the expressions do not use.
        for name in used {
            update = update.expression_attribute_names(format!("#{name}"), name);
        }
        let update = update
            .update_expression(format!("SET {}", sets.join(", ")))
            .condition_expression(exists.join(" AND "))
            .build()
            .map_err(|e| build_error("Update", e))?;
        // Refused only for an instance the run does not record: nothing to do.
        self.conditional_update(update).await?;
        Ok(())
    }

    async fn cancel_run(&self, run_id: &str, now: DateTime<Utc>) -> Result<bool, Error> {
        self.conditional_update(self.update(
            run_key(run_id),
            "SET #state = :cancelled, #finished_at = :now",
            Some("#state = :open"),
            &[STATE, FINISHED_AT],
            HashMap::from([
                (":cancelled".into(), s(RunState::Cancelled.as_str())),
                (":open".into(), s(RunState::Open.as_str())),
                (":now".into(), s(&timestamp(now))),
            ]),
        )?)
        .await
    }

    async fn release_run(&self, run_id: &str) -> Result<(), Error> {
        let release = self
            .client
            .delete_item()
            .table_name(&self.table)
            .set_key(Some(current_run_key()))
            .condition_expression("#current = :run")
            .expression_attribute_names("#current", CURRENT_RUN_ID)
            .expression_attribute_values(":run", s(run_id))
            .send()
            .await;
        match release {
            Ok(_) => Ok(()),
            // Another run is current, or none: nothing of this one to release.
            Err(SdkError::ServiceError(e)) if e.err().is_conditional_check_failed_exception() => {
                Ok(())
            }
            Err(error) => Err(crate::aws::classify("DeleteItem", error)),
        }
    }

    async fn close_run(&self, run_id: &str, now: DateTime<Utc>) -> Result<bool, Error> {
        let close = self.update(
            run_key(run_id),
            "SET #state = :finished, #finished_at = :now",
            Some("#state = :open"),
            &[STATE, FINISHED_AT],
            HashMap::from([
                (":finished".into(), s(RunState::Finished.as_str())),
                (":open".into(), s(RunState::Open.as_str())),
                (":now".into(), s(&timestamp(now))),
            ]),
        )?;
        let release_pointer = Delete::builder()
            .table_name(&self.table)
            .set_key(Some(current_run_key()))
            .condition_expression("#current = :run")
            .expression_attribute_names("#current", CURRENT_RUN_ID)
            .expression_attribute_values(":run", s(run_id))
            .build()
            .map_err(|e| build_error("Delete", e))?;
        let transaction = self
            .transact(vec![
                TransactWriteItem::builder().update(close).build(),
                TransactWriteItem::builder().delete(release_pointer).build(),
            ])
            .await?;
        Ok(transaction == Transaction::Committed)
    }
}

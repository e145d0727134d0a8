//! What a component's AWS calls are billed by, counted inside the SDK: an
//! interceptor on each client counts every attempt (a retry is billed too)
//! by service, and asks DynamoDB for the capacity each request consumes,
//! which it then adds up. The same count works against AWS and the local
//! stack.

use std::sync::{Arc, Mutex, PoisonError};

use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::interceptors::Intercept;
use aws_smithy_runtime_api::client::interceptors::context::{
    BeforeSerializationInterceptorContextMut, FinalizerInterceptorContextRef,
};
use aws_smithy_runtime_api::client::orchestrator::Metadata;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::config_bag::ConfigBag;

use crate::model::Usage;
use crate::ports::UsageSource;

/// A component's count since it was last taken. Clones share it.
#[derive(Debug, Clone)]
pub struct Meter {
    /// The component its calls are counted for (`dispatcher`, `worker`, …).
    component: &'static str,
    used: Arc<Mutex<Usage>>,
}

impl UsageSource for Meter {
    /// What was counted since the last take, and a fresh count.
    fn take(&self) -> Usage {
        std::mem::take(&mut *self.used.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

impl Meter {
    pub fn new(component: &'static str) -> Self {
        Self {
            component,
            used: Arc::default(),
        }
    }

    /// What an invocation of `elapsed` with `memory_mb` cost: the requests
    /// counted since the last take, and the invocation itself.
    pub fn take_invocation(&self, elapsed: std::time::Duration, memory_mb: u32) -> Usage {
        let mut used = self.take();
        used.add(&Usage::invocation(elapsed, memory_mb));
        used
    }

    fn count(&self, change: impl FnOnce(&mut Usage)) {
        change(&mut self.used.lock().unwrap_or_else(PoisonError::into_inner));
    }
}

/// How S3 bills an operation: PUT, COPY, POST and LIST requests as
/// writes, DELETE free, the rest as reads.
fn s3_kind(operation: &str) -> S3Kind {
    if operation.starts_with("Put")
        || operation.starts_with("Copy")
        || operation.starts_with("List")
        || operation.starts_with("CreateMultipart")
        || operation.starts_with("CompleteMultipart")
        || operation == "UploadPart"
    {
        S3Kind::Write
    } else if operation.starts_with("Delete") {
        S3Kind::Free
    } else {
        S3Kind::Read
    }
}

#[derive(Debug, PartialEq, Eq)]
enum S3Kind {
    Write,
    Read,
    Free,
}

/// Counts one attempt of `operation` on `service` (the SDK's names).
fn count_attempt(used: &mut Usage, service: &str, operation: &str) {
    match service {
        "SQS" => used.sqs_requests += 1,
        "S3" => match s3_kind(operation) {
            S3Kind::Write => used.s3_writes += 1,
            S3Kind::Read => used.s3_reads += 1,
            S3Kind::Free => used.free_requests += 1,
        },
        // DynamoDB is billed by the capacity its answers report.
        "DynamoDB" => {}
        _ => used.free_requests += 1,
    }
}

impl Intercept for Meter {
    fn name(&self) -> &'static str {
        "NightshiftMeter"
    }

    fn modify_before_serialization(
        &self,
        context: &mut BeforeSerializationInterceptorContextMut<'_>,
        _: &RuntimeComponents,
        _: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        #[cfg(feature = "dynamodb")]
        dynamodb::ask_for_capacity(context.input_mut());
        #[cfg(not(feature = "dynamodb"))]
        let _ = context;
        Ok(())
    }

    fn read_after_attempt(
        &self,
        context: &FinalizerInterceptorContextRef<'_>,
        _: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let Some(metadata) = cfg.load::<Metadata>() else {
            return Ok(());
        };
        let (service, operation) = (metadata.service(), metadata.name());
        let call = format!("{}/{service}.{operation}", self.component);
        self.count(|used| {
            *used.calls.entry(call).or_default() += 1;
            count_attempt(used, service, operation);
            #[cfg(feature = "dynamodb")]
            if let Some(Ok(output)) = context.output_or_error() {
                dynamodb::add_capacity(used, output);
            }
        });
        #[cfg(not(feature = "dynamodb"))]
        let _ = context;
        Ok(())
    }
}

#[cfg(feature = "dynamodb")]
mod dynamodb {
    //! Every DynamoDB operation nightshift calls, asked for its consumed
    //! capacity, and the capacity read from its answer.

    use aws_sdk_dynamodb::operation::{
        batch_get_item::{BatchGetItemInput, BatchGetItemOutput},
        batch_write_item::{BatchWriteItemInput, BatchWriteItemOutput},
        delete_item::{DeleteItemInput, DeleteItemOutput},
        get_item::{GetItemInput, GetItemOutput},
        put_item::{PutItemInput, PutItemOutput},
        query::{QueryInput, QueryOutput},
        transact_write_items::{TransactWriteItemsInput, TransactWriteItemsOutput},
        update_item::{UpdateItemInput, UpdateItemOutput},
    };
    use aws_sdk_dynamodb::types::{ConsumedCapacity, ReturnConsumedCapacity};
    use aws_smithy_runtime_api::client::interceptors::context::{Input, Output};

    use crate::model::Usage;

    pub(super) fn ask_for_capacity(input: &mut Input) {
        let total = Some(ReturnConsumedCapacity::Total);
        if let Some(i) = input.downcast_mut::<PutItemInput>() {
            i.return_consumed_capacity = total;
        } else if let Some(i) = input.downcast_mut::<UpdateItemInput>() {
            i.return_consumed_capacity = total;
        } else if let Some(i) = input.downcast_mut::<DeleteItemInput>() {
            i.return_consumed_capacity = total;
        } else if let Some(i) = input.downcast_mut::<GetItemInput>() {
            i.return_consumed_capacity = total;
        } else if let Some(i) = input.downcast_mut::<QueryInput>() {
            i.return_consumed_capacity = total;
        } else if let Some(i) = input.downcast_mut::<BatchGetItemInput>() {
            i.return_consumed_capacity = total;
        } else if let Some(i) = input.downcast_mut::<BatchWriteItemInput>() {
            i.return_consumed_capacity = total;
        } else if let Some(i) = input.downcast_mut::<TransactWriteItemsInput>() {
            i.return_consumed_capacity = total;
        }
    }

    pub(super) fn add_capacity(used: &mut Usage, output: &Output) {
        let one = |c: Option<&ConsumedCapacity>| c.and_then(|c| c.capacity_units).unwrap_or(0.0);
        let all = |c: &[ConsumedCapacity]| c.iter().map(|c| one(Some(c))).sum::<f64>();
        if let Some(o) = output.downcast_ref::<PutItemOutput>() {
            used.dynamodb_write_units += one(o.consumed_capacity());
        } else if let Some(o) = output.downcast_ref::<UpdateItemOutput>() {
            used.dynamodb_write_units += one(o.consumed_capacity());
        } else if let Some(o) = output.downcast_ref::<DeleteItemOutput>() {
            used.dynamodb_write_units += one(o.consumed_capacity());
        } else if let Some(o) = output.downcast_ref::<BatchWriteItemOutput>() {
            used.dynamodb_write_units += all(o.consumed_capacity());
        } else if let Some(o) = output.downcast_ref::<TransactWriteItemsOutput>() {
            used.dynamodb_write_units += all(o.consumed_capacity());
        } else if let Some(o) = output.downcast_ref::<GetItemOutput>() {
            used.dynamodb_read_units += one(o.consumed_capacity());
        } else if let Some(o) = output.downcast_ref::<QueryOutput>() {
            used.dynamodb_read_units += one(o.consumed_capacity());
        } else if let Some(o) = output.downcast_ref::<BatchGetItemOutput>() {
            used.dynamodb_read_units += all(o.consumed_capacity());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attempts_are_counted_as_their_service_bills_them() {
        let mut used = Usage::default();
        for (service, operation) in [
            ("SQS", "SendMessageBatch"),
            ("SQS", "ReceiveMessage"),
            ("S3", "PutObject"),
            ("S3", "ListObjectsV2"),
            ("S3", "GetObject"),
            ("S3", "DeleteObjects"),
            ("EC2", "CreateFleet"),
            ("DynamoDB", "PutItem"),
        ] {
            count_attempt(&mut used, service, operation);
        }
        assert_eq!(
            (
                used.sqs_requests,
                used.s3_writes,
                used.s3_reads,
                used.free_requests
            ),
            (2, 2, 1, 2)
        );
        assert_eq!(
            used.dynamodb_write_units, 0.0,
            "DynamoDB counts by capacity"
        );
    }
}

//! Waking the dispatcher when an operator starts a run, instead of waiting
//! for its schedule.

use async_trait::async_trait;
use aws_sdk_lambda::Client;
use aws_sdk_lambda::primitives::Blob;
use aws_sdk_lambda::types::InvocationType;

#[async_trait]
pub trait DispatchTrigger: Send + Sync {
    /// Asks for a dispatch soon; returns once the request is accepted.
    async fn dispatch_soon(&self, run_id: &str) -> Result<(), nightshift_core::Error>;
}

/// Invokes the dispatcher function asynchronously (an `Event` invocation).
#[derive(Debug, Clone)]
pub struct LambdaTrigger {
    client: Client,
    function: String,
}

impl LambdaTrigger {
    pub fn new(client: Client, function: impl Into<String>) -> Self {
        Self {
            client,
            function: function.into(),
        }
    }
}

#[async_trait]
impl DispatchTrigger for LambdaTrigger {
    async fn dispatch_soon(&self, run_id: &str) -> Result<(), nightshift_core::Error> {
        let event = serde_json::json!({ "source": "nightshift.api", "run_id": run_id });
        self.client
            .invoke()
            .function_name(&self.function)
            .invocation_type(InvocationType::Event)
            .payload(Blob::new(event.to_string()))
            .send()
            .await
            .map_err(|e| nightshift_core::Error::transient("Invoke", e))?;
        Ok(())
    }
}

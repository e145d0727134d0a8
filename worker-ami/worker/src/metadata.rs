//! The instance metadata service (IMDSv2): who this instance is, and whether
//! EC2 has announced that it will reclaim it.

use async_trait::async_trait;
use aws_config::imds::client::error::ImdsError;

#[async_trait]
pub trait InstanceMetadata: Send + Sync {
    async fn instance_id(&self) -> Result<String, nightshift_core::Error>;
    /// The run this instance was launched for (its `nightshift:run-id`
    /// tag, which the launch template makes readable), if it has one.
    async fn run_id(&self) -> Result<Option<String>, nightshift_core::Error>;
    /// The pending spot action (`terminate`, `stop`, `hibernate`), if any.
    async fn spot_action(&self) -> Result<Option<String>, nightshift_core::Error>;
}

/// IMDSv2 through the SDK's client (a session token first, then reads). It
/// follows `AWS_EC2_METADATA_SERVICE_ENDPOINT`.
#[derive(Debug, Clone)]
pub struct Imds {
    client: aws_config::imds::Client,
}

impl Imds {
    pub fn new() -> Self {
        Self {
            client: aws_config::imds::Client::builder().build(),
        }
    }
}

impl Imds {
    /// This instance's type (`c7g.xlarge`).
    pub async fn instance_type(&self) -> Result<String, nightshift_core::Error> {
        self.client
            .get("/latest/meta-data/instance-type")
            .await
            .map(String::from)
            .map_err(|e| nightshift_core::Error::transient("IMDS instance-type", e))
    }

    /// A path that may not exist: 404 is the normal "no".
    async fn optional(&self, path: &'static str) -> Result<Option<String>, nightshift_core::Error> {
        match self.client.get(path).await {
            Ok(body) => Ok(Some(String::from(body))),
            Err(ImdsError::ErrorResponse(response))
                if response.response().status().as_u16() == 404 =>
            {
                Ok(None)
            }
            Err(e) => Err(nightshift_core::Error::transient("IMDS", e)),
        }
    }
}

impl Default for Imds {
    fn default() -> Self {
        Self::new()
    }
}

#[async_trait]
impl InstanceMetadata for Imds {
    async fn instance_id(&self) -> Result<String, nightshift_core::Error> {
        self.client
            .get("/latest/meta-data/instance-id")
            .await
            .map(String::from)
            .map_err(|e| nightshift_core::Error::transient("IMDS instance-id", e))
    }

    async fn run_id(&self) -> Result<Option<String>, nightshift_core::Error> {
        self.optional("/latest/meta-data/tags/instance/nightshift:run-id")
            .await
    }

    async fn spot_action(&self) -> Result<Option<String>, nightshift_core::Error> {
        let Some(body) = self
            .optional("/latest/meta-data/spot/instance-action")
            .await?
        else {
            return Ok(None);
        };
        let notice: serde_json::Value = serde_json::from_str(&body)
            .map_err(|e| nightshift_core::Error::malformed("spot instance-action", e))?;
        Ok(Some(
            notice["action"].as_str().unwrap_or("terminate").to_owned(),
        ))
    }
}

//! EC2 adapters: the spot fleet ([`Fleet`]) and a worker's own instance
//! ([`InstanceControl`]).

use async_trait::async_trait;
pub use aws_sdk_ec2::Client;
use aws_sdk_ec2::types::{
    DefaultTargetCapacityType, Filter, FleetLaunchTemplateConfigRequest,
    FleetLaunchTemplateOverridesRequest, FleetLaunchTemplateSpecificationRequest, FleetType,
    InstanceType, ResourceType, SpotAllocationStrategy, SpotOptionsRequest, Tag, TagSpecification,
    TargetCapacitySpecificationRequest,
};

use crate::Error;
use crate::ports::{Fleet, InstanceControl};

/// The tag that ties an instance to its run.
pub const RUN_TAG: &str = "nightshift:run-id";
/// The tag the workers' IAM policies are scoped by (the launch template sets
/// it too; the request carries it so tag-conditioned launch rights apply).
pub const ROLE_TAG: (&str, &str) = ("nightshift:role", "worker");

#[derive(Debug, Clone)]
pub struct SpotFleet {
    client: Client,
    launch_template_id: String,
    instance_types: Vec<String>,
}

impl SpotFleet {
    pub fn new(
        client: Client,
        launch_template_id: impl Into<String>,
        instance_types: Vec<String>,
    ) -> Self {
        Self {
            client,
            launch_template_id: launch_template_id.into(),
            instance_types,
        }
    }
}

#[async_trait]
impl Fleet for SpotFleet {
    async fn launch(&self, run_id: &str, count: u32, token: &str) -> Result<Vec<String>, Error> {
        let overrides = self.instance_types.iter().map(|instance_type| {
            FleetLaunchTemplateOverridesRequest::builder()
                .instance_type(InstanceType::from(instance_type.as_str()))
                .build()
        });
        let template = FleetLaunchTemplateConfigRequest::builder()
            .launch_template_specification(
                FleetLaunchTemplateSpecificationRequest::builder()
                    .launch_template_id(&self.launch_template_id)
                    .version("$Latest")
                    .build(),
            )
            .set_overrides(Some(overrides.collect()))
            .build();
        let output = self
            .client
            .create_fleet()
            .r#type(FleetType::Instant)
            .client_token(token)
            .target_capacity_specification(
                TargetCapacitySpecificationRequest::builder()
                    .total_target_capacity(i32::try_from(count).unwrap_or(i32::MAX))
                    .default_target_capacity_type(DefaultTargetCapacityType::Spot)
                    .build(),
            )
            .spot_options(
                SpotOptionsRequest::builder()
                    .allocation_strategy(SpotAllocationStrategy::PriceCapacityOptimized)
                    .build(),
            )
            .launch_template_configs(template)
            .tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::Instance)
                    .tags(Tag::builder().key(RUN_TAG).value(run_id).build())
                    .tags(Tag::builder().key(ROLE_TAG.0).value(ROLE_TAG.1).build())
                    .build(),
            )
            .send()
            .await
            .map_err(|e| Error::service("CreateFleet", e))?;
        for error in output.errors() {
            tracing::warn!(
                run_id,
                code = error.error_code().unwrap_or_default(),
                message = error.error_message().unwrap_or_default(),
                "part of the fleet could not launch"
            );
        }
        Ok(output
            .instances()
            .iter()
            .flat_map(|i| i.instance_ids().iter().cloned())
            .collect())
    }

    async fn active_instances(&self, run_id: &str) -> Result<Vec<String>, Error> {
        let mut ids = Vec::new();
        let mut pages = self
            .client
            .describe_instances()
            .filters(
                Filter::builder()
                    .name(format!("tag:{RUN_TAG}"))
                    .values(run_id)
                    .build(),
            )
            .filters(
                Filter::builder()
                    .name("instance-state-name")
                    .values("pending")
                    .values("running")
                    .build(),
            )
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| Error::service("DescribeInstances", e))?;
            for reservation in page.reservations() {
                ids.extend(
                    reservation
                        .instances()
                        .iter()
                        .filter_map(|i| i.instance_id().map(str::to_owned)),
                );
            }
        }
        Ok(ids)
    }
}

/// Lets a worker terminate its own instance when the queue is drained.
#[derive(Debug, Clone)]
pub struct Ec2Instances {
    client: Client,
}

impl Ec2Instances {
    pub fn new(client: Client) -> Self {
        Self { client }
    }
}

#[async_trait]
impl InstanceControl for Ec2Instances {
    async fn terminate(&self, instance_id: &str) -> Result<(), Error> {
        self.client
            .terminate_instances()
            .instance_ids(instance_id)
            .send()
            .await
            .map_err(|e| Error::service("TerminateInstances", e))?;
        Ok(())
    }
}

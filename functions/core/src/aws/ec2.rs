//! EC2 adapter of [`Fleet`]: instant fleets (spot or on-demand) from the
//! worker launch template, weighted by each type's slots; this stack's
//! workers, and terminating them.

use std::collections::BTreeMap;

use async_trait::async_trait;
pub use aws_sdk_ec2::Client;

/// A client whose every call `meter` counts.
pub fn metered_client(config: &aws_types::SdkConfig, meter: &crate::aws::meter::Meter) -> Client {
    Client::from_conf(
        aws_sdk_ec2::config::Builder::from(config)
            .interceptor(meter.clone())
            .build(),
    )
}
use aws_sdk_ec2::types::{
    DefaultTargetCapacityType, Filter, FleetLaunchTemplateConfigRequest,
    FleetLaunchTemplateOverridesRequest, FleetLaunchTemplateSpecificationRequest,
    FleetOnDemandAllocationStrategy, FleetType, InstanceStateName, InstanceType,
    OnDemandOptionsRequest, ResourceType, SpotAllocationStrategy, SpotOptionsRequest, Tag,
    TagSpecification, TargetCapacitySpecificationRequest,
};
use chrono::{DateTime, Utc};

use super::classify;
use crate::Error;
use crate::model::{Launched, SpotPrice};
use crate::plan::{Lifecycle, slots_of};
use crate::ports::{Fleet, WorkerInstance};

/// The tag that ties an instance to its run.
pub const RUN_TAG: &str = "nightshift:run-id";
/// The tag that ties an instance to this stack: its launch template's id.
/// The dispatcher may terminate only instances that carry it.
pub const TEMPLATE_TAG: &str = "nightshift:launch-template";
/// The tag the workers' IAM policies are scoped by (the launch template sets
/// it too; the request carries it so tag-conditioned launch rights apply).
pub const ROLE_TAG: (&str, &str) = ("nightshift:role", "worker");
/// TerminateInstances' most ids a call.
const TERMINATE_BATCH: usize = 1000;

#[derive(Debug, Clone)]
pub struct SpotFleet {
    client: Client,
    launch_template_id: String,
    /// Each type and the slots an instance of it has.
    instance_types: Vec<(String, u32)>,
    subnet_ids: Vec<String>,
}

impl SpotFleet {
    /// A fleet of these types, in these subnets (none: the default VPC's);
    /// an instance of the first type has `slots`, the others by their
    /// vCPUs.
    pub fn new(
        client: Client,
        launch_template_id: impl Into<String>,
        instance_types: Vec<String>,
        subnet_ids: Vec<String>,
        slots: u32,
    ) -> Self {
        let reference = instance_types.first().cloned().unwrap_or_default();
        Self {
            client,
            launch_template_id: launch_template_id.into(),
            instance_types: instance_types
                .into_iter()
                .map(|t| {
                    let weight = slots_of(&t, &reference, slots);
                    (t, weight)
                })
                .collect(),
            subnet_ids,
        }
    }

    /// The fleet's target for `slots`: a whole number of the first type's
    /// instances. EC2 would round up itself; asking it in whole instances
    /// keeps every implementation of `CreateFleet` from rounding down.
    fn target(&self, slots: u32) -> u32 {
        let first = self.slots_of(None).max(1);
        slots.div_ceil(first).saturating_mul(first)
    }

    fn slots_of(&self, instance_type: Option<&str>) -> u32 {
        self.instance_types
            .iter()
            .find(|(t, _)| Some(t.as_str()) == instance_type)
            .or(self.instance_types.first())
            .map_or(1, |(_, slots)| *slots)
    }

    /// Every type in every subnet, so that capacity is sought across types
    /// and zones; each type weighs its slots, so the target is in slots.
    fn overrides(&self) -> Vec<FleetLaunchTemplateOverridesRequest> {
        let subnets: Vec<Option<&String>> = if self.subnet_ids.is_empty() {
            vec![None]
        } else {
            self.subnet_ids.iter().map(Some).collect()
        };
        self.instance_types
            .iter()
            .flat_map(|(instance_type, slots)| {
                subnets.iter().map(move |subnet| {
                    FleetLaunchTemplateOverridesRequest::builder()
                        .instance_type(InstanceType::from(instance_type.as_str()))
                        .weighted_capacity(f64::from(*slots))
                        .set_subnet_id(subnet.cloned())
                        .build()
                })
            })
            .collect()
    }
}

fn time_of(at: Option<&aws_sdk_ec2::primitives::DateTime>) -> DateTime<Utc> {
    at.and_then(|t| DateTime::from_timestamp(t.secs(), t.subsec_nanos()))
        .unwrap_or_else(Utc::now)
}

#[async_trait]
impl Fleet for SpotFleet {
    async fn launch(
        &self,
        run_id: &str,
        slots: u32,
        lifecycle: Lifecycle,
        token: &str,
    ) -> Result<Vec<Launched>, Error> {
        let template = FleetLaunchTemplateConfigRequest::builder()
            .launch_template_specification(
                FleetLaunchTemplateSpecificationRequest::builder()
                    .launch_template_id(&self.launch_template_id)
                    .version("$Latest")
                    .build(),
            )
            .set_overrides(Some(self.overrides()))
            .build();
        let capacity_type = match lifecycle {
            Lifecycle::Spot => DefaultTargetCapacityType::Spot,
            Lifecycle::OnDemand => DefaultTargetCapacityType::OnDemand,
        };
        let output = self
            .client
            .create_fleet()
            .r#type(FleetType::Instant)
            .client_token(token)
            .target_capacity_specification(
                TargetCapacitySpecificationRequest::builder()
                    .total_target_capacity(i32::try_from(self.target(slots)).unwrap_or(i32::MAX))
                    .default_target_capacity_type(capacity_type)
                    .build(),
            )
            .spot_options(
                SpotOptionsRequest::builder()
                    .allocation_strategy(SpotAllocationStrategy::PriceCapacityOptimized)
                    .build(),
            )
            .on_demand_options(
                OnDemandOptionsRequest::builder()
                    .allocation_strategy(FleetOnDemandAllocationStrategy::LowestPrice)
                    .build(),
            )
            .launch_template_configs(template)
            .tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::Instance)
                    .tags(Tag::builder().key(RUN_TAG).value(run_id).build())
                    .tags(
                        Tag::builder()
                            .key(TEMPLATE_TAG)
                            .value(&self.launch_template_id)
                            .build(),
                    )
                    .tags(Tag::builder().key(ROLE_TAG.0).value(ROLE_TAG.1).build())
                    .build(),
            )
            .send()
            .await
            .map_err(|e| classify("CreateFleet", e))?;
        for error in output.errors() {
            tracing::warn!(
                run_id,
                code = error.error_code().unwrap_or_default(),
                message = error.error_message().unwrap_or_default(),
                "part of the fleet could not launch"
            );
        }
        let now = Utc::now();
        Ok(output
            .instances()
            .iter()
            .flat_map(|group| {
                let instance_type = group.instance_type().map(|t| t.as_str().to_owned());
                let lifecycle = group.lifecycle().map(|l| l.as_str().to_owned());
                let slots = self.slots_of(instance_type.as_deref());
                group.instance_ids().iter().map(move |id| Launched {
                    slots,
                    ..Launched::new(id, now, instance_type.clone(), lifecycle.clone())
                })
            })
            .collect())
    }

    async fn instances(&self) -> Result<Vec<WorkerInstance>, Error> {
        let mut found = Vec::new();
        let mut pages = self
            .client
            .describe_instances()
            .filters(
                Filter::builder()
                    .name(format!("tag:{TEMPLATE_TAG}"))
                    .values(&self.launch_template_id)
                    .build(),
            )
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| classify("DescribeInstances", e))?;
            for instance in page.reservations().iter().flat_map(|r| r.instances()) {
                let Some(id) = instance.instance_id() else {
                    continue;
                };
                let state = instance.state().and_then(|s| s.name());
                let alive = matches!(
                    state,
                    Some(InstanceStateName::Pending | InstanceStateName::Running)
                );
                found.push(WorkerInstance {
                    id: id.to_owned(),
                    alive,
                    zone: instance
                        .placement()
                        .and_then(|p| p.availability_zone())
                        .map(str::to_owned),
                    ended_at: if alive {
                        None
                    } else {
                        instance.state_transition_reason().and_then(transition_time)
                    },
                    run_id: instance
                        .tags()
                        .iter()
                        .find(|t| t.key() == Some(RUN_TAG))
                        .and_then(|t| t.value().map(str::to_owned)),
                    launched_at: time_of(instance.launch_time()),
                });
            }
        }
        Ok(found)
    }

    async fn terminate(&self, instance_ids: &[String]) -> Result<(), Error> {
        for chunk in instance_ids.chunks(TERMINATE_BATCH) {
            self.client
                .terminate_instances()
                .set_instance_ids(Some(chunk.to_vec()))
                .send()
                .await
                .map_err(|e| classify("TerminateInstances", e))?;
        }
        Ok(())
    }

    async fn spot_prices(
        &self,
        instance_types: &[String],
        now: DateTime<Utc>,
    ) -> Result<Vec<SpotPrice>, Error> {
        if instance_types.is_empty() {
            return Ok(Vec::new());
        }
        // From now to now: the price in force, for each type in each zone.
        let at = aws_sdk_ec2::primitives::DateTime::from_secs(now.timestamp());
        let mut pages = self
            .client
            .describe_spot_price_history()
            .set_instance_types(Some(
                instance_types
                    .iter()
                    .map(|t| InstanceType::from(t.as_str()))
                    .collect(),
            ))
            .product_descriptions("Linux/UNIX")
            .start_time(at)
            .end_time(at)
            .into_paginator()
            .send();
        let mut latest: BTreeMap<(String, String), (DateTime<Utc>, f64)> = BTreeMap::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| classify("DescribeSpotPriceHistory", e))?;
            for entry in page.spot_price_history() {
                let (Some(instance_type), Some(zone), Some(price)) = (
                    entry.instance_type(),
                    entry.availability_zone(),
                    entry.spot_price().and_then(|p| p.parse::<f64>().ok()),
                ) else {
                    continue;
                };
                let published = time_of(entry.timestamp());
                let key = (instance_type.as_str().to_owned(), zone.to_owned());
                if latest.get(&key).is_none_or(|(at, _)| *at < published) {
                    latest.insert(key, (published, price));
                }
            }
        }
        Ok(latest
            .into_iter()
            .map(|((instance_type, zone), (_, usd_per_hour))| SpotPrice {
                instance_type,
                zone,
                usd_per_hour,
                read_at: now,
            })
            .collect())
    }
}

/// The time in an instance's state-transition reason, e.g. `User initiated
/// (2026-11-28 05:12:09 GMT)`: when it began to stop.
fn transition_time(reason: &str) -> Option<DateTime<Utc>> {
    let inside = reason.rsplit_once('(')?.1.strip_suffix(')')?;
    let stamp = inside
        .strip_suffix(" GMT")
        .or_else(|| inside.strip_suffix(" UTC"))?;
    chrono::NaiveDateTime::parse_from_str(stamp, "%Y-%m-%d %H:%M:%S")
        .ok()
        .map(|t| t.and_utc())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fleet(types: &[&str], subnets: &[&str]) -> SpotFleet {
        let config = aws_sdk_ec2::Config::builder()
            .behavior_version(aws_sdk_ec2::config::BehaviorVersion::latest())
            .region(aws_sdk_ec2::config::Region::new("us-east-1"))
            .build();
        SpotFleet::new(
            Client::from_conf(config),
            "lt-1",
            types.iter().map(|t| (*t).to_owned()).collect(),
            subnets.iter().map(|s| (*s).to_owned()).collect(),
            2,
        )
    }

    #[test]
    fn the_end_of_an_instance_is_read_from_its_transition_reason() {
        let at = |text| transition_time(text).map(|t| t.to_rfc3339());
        assert_eq!(
            at("User initiated (2026-11-28 05:12:09 GMT)").as_deref(),
            Some("2026-11-28T05:12:09+00:00")
        );
        assert_eq!(
            at("User initiated (2026-11-28 05:12:09 UTC)").as_deref(),
            Some("2026-11-28T05:12:09+00:00")
        );
        assert_eq!(at(""), None);
        assert_eq!(at("Server.SpotInstanceTermination"), None);
    }

    #[test]
    fn types_weigh_their_slots_and_the_target_is_whole_instances() {
        let fleet = SpotFleet::new(
            fleet(&[], &[]).client,
            "lt-1",
            vec!["c7g.large".into(), "c7g.xlarge".into()],
            Vec::new(),
            3,
        );
        let weights: Vec<Option<f64>> = fleet
            .overrides()
            .iter()
            .map(|o| o.weighted_capacity())
            .collect();
        assert_eq!(weights, [Some(3.0), Some(6.0)]);
        assert_eq!(fleet.target(1), 3);
        assert_eq!(fleet.target(4), 6);
        assert_eq!(fleet.target(6), 6);
    }

    #[test]
    fn overrides_span_every_type_in_every_subnet() {
        let pairs = |fleet: SpotFleet| -> Vec<(String, Option<String>)> {
            fleet
                .overrides()
                .iter()
                .map(|o| {
                    (
                        o.instance_type()
                            .map(|t| t.as_str().to_owned())
                            .unwrap_or_default(),
                        o.subnet_id().map(str::to_owned),
                    )
                })
                .collect()
        };
        assert_eq!(
            pairs(fleet(
                &["c7g.large", "m7g.large"],
                &["subnet-a", "subnet-b"]
            )),
            [
                ("c7g.large".into(), Some("subnet-a".into())),
                ("c7g.large".into(), Some("subnet-b".into())),
                ("m7g.large".into(), Some("subnet-a".into())),
                ("m7g.large".into(), Some("subnet-b".into())),
            ]
        );
        assert_eq!(
            pairs(fleet(&["c7g.large"], &[])),
            [("c7g.large".into(), None)],
            "without subnets, EC2 picks the default VPC's"
        );
    }
}

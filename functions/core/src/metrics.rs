//! Metrics as CloudWatch Embedded Metric Format lines: a JSON line on
//! standard output that CloudWatch Logs turns into metrics (Lambda's log
//! capture, or the CloudWatch agent on a worker), so dashboards and alarms
//! need no API call and no code of their own. The run id rides along as a
//! property, searchable in Logs Insights without multiplying metrics.

use serde_json::{Map, Value, json};

/// The namespace every metric of nightshift is in.
pub const NAMESPACE: &str = "nightshift";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Count,
    Milliseconds,
}

impl Unit {
    fn as_str(self) -> &'static str {
        match self {
            Self::Count => "Count",
            Self::Milliseconds => "Milliseconds",
        }
    }
}

/// One EMF line: values of one component, with its dimensions.
#[derive(Debug, Clone)]
pub struct Emf {
    dimensions: Vec<(&'static str, String)>,
    values: Vec<(&'static str, Unit, f64)>,
    properties: Map<String, Value>,
}

impl Emf {
    /// Metrics of `component` (dispatcher, collector, worker), for a run.
    pub fn of(component: &str, run_id: &str) -> Self {
        let mut properties = Map::new();
        properties.insert("run_id".into(), json!(run_id));
        Self {
            dimensions: vec![("Component", component.to_owned())],
            values: Vec::new(),
            properties,
        }
    }

    /// Another dimension (e.g. the kernel a duration is of).
    pub fn by(mut self, name: &'static str, value: &str) -> Self {
        self.dimensions.push((name, value.to_owned()));
        self
    }

    pub fn count(self, name: &'static str, value: u64) -> Self {
        self.value(name, Unit::Count, value as f64)
    }

    pub fn milliseconds(self, name: &'static str, value: u64) -> Self {
        self.value(name, Unit::Milliseconds, value as f64)
    }

    fn value(mut self, name: &'static str, unit: Unit, value: f64) -> Self {
        self.values.push((name, unit, value));
        self
    }

    /// The line, stamped `at_ms` (milliseconds since the epoch).
    pub fn line(&self, at_ms: i64) -> String {
        let mut document = self.properties.clone();
        for (name, value) in &self.dimensions {
            document.insert((*name).to_owned(), json!(value));
        }
        for (name, _, value) in &self.values {
            document.insert((*name).to_owned(), json!(value));
        }
        let metrics: Vec<Value> = self
            .values
            .iter()
            .map(|(name, unit, _)| json!({ "Name": name, "Unit": unit.as_str() }))
            .collect();
        let dimensions: Vec<&str> = self.dimensions.iter().map(|(name, _)| *name).collect();
        document.insert(
            "_aws".into(),
            json!({
                "Timestamp": at_ms,
                "CloudWatchMetrics": [{
                    "Namespace": NAMESPACE,
                    "Dimensions": [dimensions],
                    "Metrics": metrics,
                }],
            }),
        );
        Value::Object(document).to_string()
    }

    /// Writes the line to standard output, where the log capture takes it.
    pub fn emit(&self) {
        if self.values.is_empty() {
            return;
        }
        println!("{}", self.line(chrono::Utc::now().timestamp_millis()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_declares_its_metrics_and_carries_their_values_and_the_run() {
        let line = Emf::of("worker", "r1")
            .by("Kernel", "sleep")
            .milliseconds("TaskDuration", 1500)
            .count("TasksDone", 1)
            .line(1_800_000_000_000);
        let value: Value = serde_json::from_str(&line).unwrap_or_default();
        assert_eq!(value["run_id"], "r1");
        assert_eq!(value["Component"], "worker");
        assert_eq!(value["Kernel"], "sleep");
        assert_eq!(value["TaskDuration"], 1500.0);
        assert_eq!(value["TasksDone"], 1.0);
        let declared = &value["_aws"]["CloudWatchMetrics"][0];
        assert_eq!(declared["Namespace"], NAMESPACE);
        assert_eq!(declared["Dimensions"], json!([["Component", "Kernel"]]));
        assert_eq!(
            declared["Metrics"],
            json!([
                {"Name": "TaskDuration", "Unit": "Milliseconds"},
                {"Name": "TasksDone", "Unit": "Count"}
            ])
        );
        assert_eq!(value["_aws"]["Timestamp"], 1_800_000_000_000_i64);
    }
}

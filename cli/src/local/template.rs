//! template.yaml, read for the local stack: the resources that are not
//! functions become a CloudFormation stack in the emulator, and the
//! collector's event sources tell the local feeder how to poll.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value, json};

use super::resolve::Resolved;

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("template is not valid YAML: {0}")]
    Yaml(#[from] serde_norway::Error),
    #[error("template has no {0}")]
    Missing(String),
    #[error("template: {0}")]
    Unsupported(String),
}

/// The template as JSON, with YAML short tags (`!Ref`, `!Sub`, ...) in
/// their long form.
#[derive(Debug, Clone)]
pub struct Template {
    pub(super) document: Value,
}

/// How an SQS event source feeds a function.
#[derive(Debug, Clone, PartialEq)]
pub struct SqsSource {
    /// Logical id of the queue resource.
    pub queue: String,
    pub batch_size: u32,
    pub batching_window_seconds: u64,
    pub report_batch_item_failures: bool,
}

impl Template {
    pub fn load(path: &std::path::Path) -> Result<Self, TemplateError> {
        let text = std::fs::read_to_string(path).map_err(|source| TemplateError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text)
    }

    pub fn parse(text: &str) -> Result<Self, TemplateError> {
        let yaml: serde_norway::Value = serde_norway::from_str(text)?;
        Ok(Self {
            document: long_form(yaml),
        })
    }

    pub(super) fn resources(&self) -> Result<&Map<String, Value>, TemplateError> {
        self.document["Resources"]
            .as_object()
            .ok_or_else(|| TemplateError::Missing("Resources".into()))
    }

    /// Parameter defaults, as strings.
    pub fn parameter_defaults(&self) -> BTreeMap<String, String> {
        let Some(parameters) = self.document["Parameters"].as_object() else {
            return BTreeMap::new();
        };
        parameters
            .iter()
            .filter_map(|(name, spec)| {
                let default = match &spec["Default"] {
                    Value::String(s) => s.clone(),
                    Value::Null => return None,
                    other => other.to_string(),
                };
                Some((name.clone(), default))
            })
            .collect()
    }

    /// The template without its functions: SAM and Lambda resources, and
    /// everything that refers to them, are set aside.
    pub fn without_functions(&self) -> Result<Value, TemplateError> {
        let resources = self.resources()?;
        let mut removed: BTreeSet<String> = resources
            .keys()
            .filter(|name| self.is_function(name))
            .cloned()
            .collect();
        // Anything that refers to a removed resource goes too, until stable.
        loop {
            let more: Vec<String> = resources
                .iter()
                .filter(|(name, r)| !removed.contains(*name) && refers_to_any(r, &removed))
                .map(|(name, _)| name.clone())
                .collect();
            if more.is_empty() {
                break;
            }
            removed.extend(more);
        }
        let mut document = self.document.clone();
        if let Some(object) = document.as_object_mut() {
            object.remove("Transform");
            object.remove("Globals");
        }
        if let Some(resources) = document["Resources"].as_object_mut() {
            resources.retain(|name, _| !removed.contains(name));
        }
        if let Some(outputs) = document["Outputs"].as_object_mut() {
            outputs.retain(|_, output| !refers_to_any(output, &removed));
        }
        Ok(document)
    }

    /// The environment the template declares for a function (its own over
    /// the Globals'), resolved against the stack.
    pub fn function_environment(
        &self,
        function: &str,
        resolved: &Resolved,
    ) -> Result<BTreeMap<String, String>, TemplateError> {
        let resource = self
            .resources()?
            .get(function)
            .ok_or_else(|| TemplateError::Missing(function.to_owned()))?;
        let globals = &self.document["Globals"]["Function"]["Environment"]["Variables"];
        let own = &resource["Properties"]["Environment"]["Variables"];
        let mut environment = BTreeMap::new();
        for variables in [globals, own] {
            for (name, value) in variables.as_object().into_iter().flatten() {
                environment.insert(name.clone(), self.single(value, resolved)?);
            }
        }
        // What Lambda's runtime adds to every function's environment.
        let memory = [
            &resource["Properties"]["MemorySize"],
            &self.document["Globals"]["Function"]["MemorySize"],
        ]
        .into_iter()
        .find(|m| !m.is_null());
        if let Some(memory) = memory {
            let megabytes = match memory {
                Value::Number(n) => n.to_string(),
                other => self.single(other, resolved)?,
            };
            environment.insert("AWS_LAMBDA_FUNCTION_MEMORY_SIZE".to_owned(), megabytes);
        }
        Ok(environment)
    }

    /// The logical ids of the template's functions.
    pub fn functions(&self) -> Result<Vec<String>, TemplateError> {
        Ok(self
            .resources()?
            .iter()
            .filter(|(_, r)| r["Type"] == "AWS::Serverless::Function")
            .map(|(name, _)| name.clone())
            .collect())
    }

    /// Whether a resource is a function (SAM's or Lambda's), which the
    /// local stack runs itself.
    pub(super) fn is_function(&self, name: &str) -> bool {
        self.resources()
            .ok()
            .and_then(|r| r.get(name))
            .is_some_and(|r| {
                let kind = r["Type"].as_str().unwrap_or_default();
                kind.starts_with("AWS::Serverless::") || kind.starts_with("AWS::Lambda::")
            })
    }

    /// The boot configuration a launch template's user data writes for the
    /// worker: the `KEY=value` lines of the cloud-config file written to
    /// `path`, resolved against the stack.
    pub fn boot_environment(
        &self,
        launch_template: &str,
        path: &str,
        resolved: &Resolved,
    ) -> Result<Vec<(String, String)>, TemplateError> {
        let user_data = &self
            .resources()?
            .get(launch_template)
            .ok_or_else(|| TemplateError::Missing(launch_template.to_owned()))?["Properties"]["LaunchTemplateData"]
            ["UserData"]["Fn::Base64"];
        let text = self.single(user_data, resolved)?;
        let missing =
            || TemplateError::Missing(format!("{path} in the user data of {launch_template}"));
        let lines: Vec<&str> = text.lines().collect();
        let at = lines
            .iter()
            .position(|line| line.trim().trim_start_matches("- ") == format!("path: {path}"))
            .ok_or_else(missing)?;
        let content = lines[at..]
            .iter()
            .position(|line| line.trim().starts_with("content: |"))
            .map(|n| at + n)
            .ok_or_else(missing)?;
        let indent = |line: &str| line.len() - line.trim_start().len();
        let content_indent = indent(lines[content]);
        Ok(lines[content + 1..]
            .iter()
            .take_while(|line| line.trim().is_empty() || indent(line) > content_indent)
            .filter_map(|line| line.trim().split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect())
    }

    /// A plain setting of a launch template's data (EC2's default applies
    /// when it is not there).
    pub fn launch_template_data(&self, resource: &str, name: &str) -> Option<String> {
        self.document["Resources"][resource]["Properties"]["LaunchTemplateData"][name]
            .as_str()
            .map(str::to_owned)
    }

    /// The SQS event sources of a function, as the template declares them.
    pub fn sqs_sources(&self, function: &str) -> Result<Vec<SqsSource>, TemplateError> {
        let function = self
            .resources()?
            .get(function)
            .ok_or_else(|| TemplateError::Missing(function.to_owned()))?;
        let Some(events) = function["Properties"]["Events"].as_object() else {
            return Ok(Vec::new());
        };
        Ok(events
            .values()
            .filter(|event| event["Type"] == "SQS")
            .filter_map(|event| {
                let properties = &event["Properties"];
                let queue = referenced_resource(&properties["Queue"])?;
                Some(SqsSource {
                    queue,
                    batch_size: properties["BatchSize"].as_u64().unwrap_or(10) as u32,
                    batching_window_seconds: properties["MaximumBatchingWindowInSeconds"]
                        .as_u64()
                        .unwrap_or(0),
                    report_batch_item_failures: properties["FunctionResponseTypes"]
                        .as_array()
                        .is_some_and(|types| types.iter().any(|t| t == "ReportBatchItemFailures")),
                })
            })
            .collect())
    }
}

/// `!GetAtt Queue.Arn` or `!Ref Queue`: the resource's logical id.
fn referenced_resource(value: &Value) -> Option<String> {
    if let Some(name) = value["Ref"].as_str() {
        return Some(name.to_owned());
    }
    value["Fn::GetAtt"][0].as_str().map(str::to_owned)
}

/// Converts YAML to JSON, turning `!Tag x` into `{"Fn::Tag": x}` (and
/// `!Ref`, `!Condition`, `!GetAtt a.b` into their own long forms).
fn long_form(value: serde_norway::Value) -> Value {
    use serde_norway::Value as Y;
    match value {
        Y::Null => Value::Null,
        Y::Bool(b) => Value::Bool(b),
        Y::Number(n) => serde_json::to_value(n).unwrap_or(Value::Null),
        Y::String(s) => Value::String(s),
        Y::Sequence(items) => Value::Array(items.into_iter().map(long_form).collect()),
        Y::Mapping(mapping) => Value::Object(
            mapping
                .into_iter()
                .map(|(k, v)| {
                    let key = match k {
                        Y::String(s) => s,
                        other => serde_norway::to_string(&other)
                            .unwrap_or_default()
                            .trim()
                            .to_owned(),
                    };
                    (key, long_form(v))
                })
                .collect(),
        ),
        Y::Tagged(tagged) => {
            let tag = tagged.tag.to_string();
            let tag = tag.trim_start_matches('!');
            let inner = long_form(tagged.value);
            match tag {
                "Ref" => json!({ "Ref": inner }),
                "Condition" => json!({ "Condition": inner }),
                "GetAtt" => match inner {
                    Value::String(s) => {
                        let (resource, attribute) = s.split_once('.').unwrap_or((s.as_str(), ""));
                        json!({ "Fn::GetAtt": [resource, attribute] })
                    }
                    other => json!({ "Fn::GetAtt": other }),
                },
                other => json!({ format!("Fn::{other}"): inner }),
            }
        }
    }
}

/// Whether `value` refers (Ref, GetAtt, Sub, DependsOn) to any of `names`.
fn refers_to_any(value: &Value, names: &BTreeSet<String>) -> bool {
    match value {
        Value::Object(object) => object.iter().any(|(key, inner)| {
            let direct = match key.as_str() {
                "Ref" => inner.as_str().is_some_and(|n| names.contains(n)),
                "Fn::GetAtt" => inner[0].as_str().is_some_and(|n| names.contains(n)),
                "DependsOn" => match inner {
                    Value::String(n) => names.contains(n),
                    Value::Array(list) => list
                        .iter()
                        .any(|n| n.as_str().is_some_and(|n| names.contains(n))),
                    _ => false,
                },
                "Fn::Sub" => {
                    let text = match inner {
                        Value::String(s) => s.as_str(),
                        Value::Array(parts) => {
                            parts.first().and_then(Value::as_str).unwrap_or_default()
                        }
                        _ => "",
                    };
                    sub_references(text).iter().any(|n| names.contains(n))
                }
                _ => false,
            };
            direct || refers_to_any(inner, names)
        }),
        Value::Array(items) => items.iter().any(|item| refers_to_any(item, names)),
        _ => false,
    }
}

/// The resource names in a `Fn::Sub` string: `${Name}` and `${Name.Attr}`.
fn sub_references(text: &str) -> Vec<String> {
    text.split("${")
        .skip(1)
        .filter_map(|rest| rest.split_once('}'))
        .map(|(inner, _)| inner.split('.').next().unwrap_or(inner).to_owned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEMPLATE: &str = r#"
Transform: AWS::Serverless-2016-10-31
Parameters:
  Size: { Type: Number, Default: 3 }
  Types: { Type: CommaDelimitedList, Default: "a,b" }
Globals:
  Function: { Runtime: provided.al2023 }
Resources:
  Queue:
    Type: AWS::SQS::Queue
  Role:
    Type: AWS::IAM::Role
    Properties:
      Policies: [{ Resource: !GetAtt Queue.Arn }]
  Fn:
    Type: AWS::Serverless::Function
    Properties:
      Events:
        Results:
          Type: SQS
          Properties:
            Queue: !GetAtt Queue.Arn
            BatchSize: 7
            FunctionResponseTypes: [ReportBatchItemFailures]
  Alarm:
    Type: AWS::CloudWatch::Alarm
    Properties:
      AlarmName: !Sub "${Fn}-errors"
Outputs:
  QueueUrl: { Value: !Ref Queue }
  FnName: { Value: !Ref Fn }
"#;

    #[test]
    fn functions_and_what_refers_to_them_are_set_aside() {
        let template = Template::parse(TEMPLATE).unwrap();
        let stack = template.without_functions().unwrap();
        let resources: Vec<&String> = stack["Resources"].as_object().unwrap().keys().collect();
        assert_eq!(resources, vec!["Queue", "Role"]);
        assert_eq!(
            stack["Resources"]["Role"]["Properties"]["Policies"][0]["Resource"],
            json!({"Fn::GetAtt": ["Queue", "Arn"]})
        );
        assert_eq!(
            stack["Outputs"],
            json!({"QueueUrl": {"Value": {"Ref": "Queue"}}})
        );
        assert!(stack.get("Transform").is_none() && stack.get("Globals").is_none());
    }

    #[test]
    fn event_sources_and_defaults_come_from_the_template() {
        let template = Template::parse(TEMPLATE).unwrap();
        assert_eq!(
            template.sqs_sources("Fn").unwrap(),
            vec![SqsSource {
                queue: "Queue".into(),
                batch_size: 7,
                batching_window_seconds: 0,
                report_batch_item_failures: true
            }]
        );
        let defaults = template.parameter_defaults();
        assert_eq!(
            (defaults["Size"].as_str(), defaults["Types"].as_str()),
            ("3", "a,b")
        );
    }

    #[test]
    fn the_real_template_keeps_its_data_resources() {
        // Read at run time: a shared build cache may hold another checkout's build.
        let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR").expect("run through cargo test");
        let path = std::path::Path::new(&manifest_dir).join("../template.yaml");
        let template = Template::load(&path).unwrap();
        let stack = template.without_functions().unwrap();
        for name in [
            "TasksTable",
            "TaskQueue",
            "TaskDeadLetterQueue",
            "ResultQueue",
            "PayloadBucket",
            "WorkerLaunchTemplate",
        ] {
            assert!(stack["Resources"].get(name).is_some(), "{name} is kept");
        }
        let sources = template.sqs_sources("CollectorFunction").unwrap();
        assert!(sources.iter().all(|s| s.report_batch_item_failures));
        let queues: Vec<&str> = sources.iter().map(|s| s.queue.as_str()).collect();
        assert_eq!(queues.len(), 3);
        for queue in [
            "ResultQueue",
            "TaskDeadLetterQueue",
            "ResultDeadLetterQueue",
        ] {
            assert!(
                queues.contains(&queue),
                "every dead-letter queue has a consumer: {queue}"
            );
        }
        assert_eq!(
            template
                .launch_template_data("WorkerLaunchTemplate", "InstanceInitiatedShutdownBehavior")
                .as_deref(),
            Some("terminate"),
            "a worker's instance that powers off is terminated"
        );
        // The API accepts the kernels the workers have, and defaults to theirs.
        let mut configured: Vec<String> = template.parameter_defaults()["WorkerKernels"]
            .split(',')
            .map(str::to_owned)
            .collect();
        assert_eq!(
            configured.first().map(String::as_str),
            Some(nightshift_kernels::DEFAULT_KERNEL)
        );
        configured.sort();
        assert_eq!(configured, nightshift_kernels::builtin_names());
    }

    #[test]
    fn a_function_environment_resolves_parameters_resources_and_other_functions() {
        let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR").expect("run through cargo test");
        let template =
            Template::load(&std::path::Path::new(&manifest_dir).join("../template.yaml")).unwrap();
        let parameters = template.parameter_defaults();
        let resolved = Resolved {
            parameters: parameters.clone(),
            resources: [
                ("TasksTable", "AWS::DynamoDB::Table", "the-table"),
                ("TaskQueue", "AWS::SQS::Queue", "http://queue"),
                ("PayloadBucket", "AWS::S3::Bucket", "the-bucket"),
                ("WorkerLaunchTemplate", "AWS::EC2::LaunchTemplate", "lt-1"),
            ]
            .into_iter()
            .map(|(l, k, p)| (l.to_owned(), (k.to_owned(), p.to_owned())))
            .collect(),
            ..Resolved::default()
        };
        let dispatcher = template
            .function_environment("DispatcherFunction", &resolved)
            .unwrap();
        assert_eq!(
            dispatcher["NIGHTSHIFT_TABLE"], "the-table",
            "from the Globals"
        );
        assert_eq!(dispatcher["NIGHTSHIFT_TASK_QUEUE_URL"], "http://queue");
        assert_eq!(
            dispatcher["NIGHTSHIFT_INSTANCE_TYPES"],
            parameters["InstanceTypes"]
        );
        assert_eq!(
            dispatcher["NIGHTSHIFT_MAX_INSTANCES"],
            parameters["MaxInstances"]
        );
        let ingest = template
            .function_environment("IngestFunction", &resolved)
            .unwrap();
        assert_eq!(
            ingest["NIGHTSHIFT_DISPATCHER_FUNCTION"],
            "local-DispatcherFunction"
        );
    }
}

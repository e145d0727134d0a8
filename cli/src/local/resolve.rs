//! Template values resolved as CloudFormation resolves them, against a
//! stack's parameters and the physical ids of its resources: `Ref`,
//! `Fn::GetAtt` (the attributes nightshift's template uses), `Fn::Sub`,
//! `Fn::Join`, `Fn::If` and the conditions it names. A function, which the
//! local stack does not create, is referred to by a local name.

use std::collections::BTreeMap;

use serde_json::Value;

use super::template::{Template, TemplateError};

/// The physical side of the stack, to resolve ARNs.
#[derive(Debug, Clone, Default)]
pub struct Resolved {
    pub parameters: BTreeMap<String, String>,
    /// Logical id → (resource type, physical id).
    pub resources: BTreeMap<String, (String, String)>,
    pub region: String,
    pub account: String,
    pub stack: String,
}

impl Template {
    /// A value as the strings it stands for (a list for lists, nothing for
    /// `AWS::NoValue`).
    pub fn strings(
        &self,
        value: &Value,
        resolved: &Resolved,
    ) -> Result<Vec<String>, TemplateError> {
        let unresolved = || TemplateError::Missing(format!("a way to resolve {value}"));
        let Value::Object(object) = value else {
            return match value {
                Value::String(text) => Ok(vec![text.clone()]),
                Value::Array(items) => Ok(items
                    .iter()
                    .map(|item| self.strings(item, resolved))
                    .collect::<Result<Vec<_>, _>>()?
                    .concat()),
                Value::Null => Ok(Vec::new()),
                other => Ok(vec![other.to_string()]),
            };
        };
        if let Some(name) = object.get("Ref").and_then(Value::as_str) {
            return Ok(self.reference(name, resolved)?.into_iter().collect());
        }
        if let Some(get_att) = object.get("Fn::GetAtt") {
            let (Some(name), Some(attribute)) = (get_att[0].as_str(), get_att[1].as_str()) else {
                return Err(unresolved());
            };
            return Ok(vec![attribute_of(name, attribute, resolved)?]);
        }
        if let Some(sub) = object.get("Fn::Sub") {
            let (text, names) = match sub {
                Value::String(text) => (text.as_str(), None),
                Value::Array(parts) => (parts[0].as_str().ok_or_else(unresolved)?, Some(&parts[1])),
                _ => return Err(unresolved()),
            };
            return Ok(vec![self.substitute(text, names, resolved)?]);
        }
        if let Some(select) = object.get("Fn::Select") {
            let index = match &select[0] {
                Value::Number(n) => n.as_u64(),
                Value::String(s) => s.parse().ok(),
                _ => None,
            };
            // A list parameter resolves to its text, items joined by commas.
            let items: Vec<String> = self
                .strings(&select[1], resolved)?
                .iter()
                .flat_map(|s| s.split(',').map(str::to_owned).collect::<Vec<_>>())
                .collect();
            let item = index.and_then(|i| items.get(usize::try_from(i).ok()?));
            return Ok(vec![item.cloned().ok_or_else(unresolved)?]);
        }
        if let Some(join) = object.get("Fn::Join") {
            let separator = join[0].as_str().unwrap_or_default();
            return Ok(vec![self.strings(&join[1], resolved)?.join(separator)]);
        }
        if let Some(branches) = object.get("Fn::If") {
            let condition = branches[0].as_str().ok_or_else(unresolved)?;
            let branch = if self.condition(condition, resolved)? {
                &branches[1]
            } else {
                &branches[2]
            };
            return self.strings(branch, resolved);
        }
        Err(unresolved())
    }

    pub fn single(&self, value: &Value, resolved: &Resolved) -> Result<String, TemplateError> {
        Ok(self.strings(value, resolved)?.join(","))
    }

    /// `Ref`: a pseudo parameter, a parameter, or a resource's physical id.
    fn reference(&self, name: &str, resolved: &Resolved) -> Result<Option<String>, TemplateError> {
        Ok(Some(match name {
            "AWS::NoValue" => return Ok(None),
            "AWS::Region" => resolved.region.clone(),
            "AWS::AccountId" => resolved.account.clone(),
            "AWS::Partition" => "aws".to_owned(),
            "AWS::URLSuffix" => "amazonaws.com".to_owned(),
            "AWS::StackName" => resolved.stack.clone(),
            _ => match (resolved.parameters.get(name), resolved.resources.get(name)) {
                (Some(value), _) => value.clone(),
                (None, Some((_, id))) => id.clone(),
                (None, None) if self.is_function(name) => format!("local-{name}"),
                (None, None) => return Err(TemplateError::Missing(format!("a value for {name}"))),
            },
        }))
    }

    fn substitute(
        &self,
        text: &str,
        names: Option<&Value>,
        resolved: &Resolved,
    ) -> Result<String, TemplateError> {
        let mut out = String::new();
        let mut rest = text;
        while let Some(start) = rest.find("${") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let end = after
                .find('}')
                .ok_or_else(|| TemplateError::Missing(format!("a closing brace in {text}")))?;
            let name = &after[..end];
            if let Some(literal) = name.strip_prefix('!') {
                out.push_str(&format!("${{{literal}}}"));
            } else if let Some(value) = names.and_then(|n| n.get(name)) {
                out.push_str(&self.single(value, resolved)?);
            } else if let Some((resource, attribute)) = name.split_once('.')
                && !name.starts_with("AWS::")
            {
                out.push_str(&attribute_of(resource, attribute, resolved)?);
            } else {
                out.push_str(&self.reference(name, resolved)?.unwrap_or_default());
            }
            rest = &after[end + 1..];
        }
        out.push_str(rest);
        Ok(out)
    }

    fn condition(&self, name: &str, resolved: &Resolved) -> Result<bool, TemplateError> {
        let condition = &self.document["Conditions"][name];
        if condition.is_null() {
            return Err(TemplateError::Missing(format!("condition {name}")));
        }
        self.truth(condition, resolved)
    }

    fn truth(&self, value: &Value, resolved: &Resolved) -> Result<bool, TemplateError> {
        if let Some(name) = value["Condition"].as_str() {
            return self.condition(name, resolved);
        }
        if let Some(pair) = value.get("Fn::Equals") {
            return Ok(self.single(&pair[0], resolved)? == self.single(&pair[1], resolved)?);
        }
        if let Some(inner) = value.get("Fn::Not") {
            return Ok(!self.truth(&inner[0], resolved)?);
        }
        let all = |items: &Value| -> Result<Vec<bool>, TemplateError> {
            items
                .as_array()
                .into_iter()
                .flatten()
                .map(|item| self.truth(item, resolved))
                .collect()
        };
        if let Some(items) = value.get("Fn::And") {
            return Ok(all(items)?.into_iter().all(|b| b));
        }
        if let Some(items) = value.get("Fn::Or") {
            return Ok(all(items)?.into_iter().any(|b| b));
        }
        Err(TemplateError::Missing(format!("a way to evaluate {value}")))
    }
}

/// `Fn::GetAtt Resource.Arn`, from the resource's type and physical id.
fn attribute_of(name: &str, attribute: &str, resolved: &Resolved) -> Result<String, TemplateError> {
    let (kind, id) = resolved
        .resources
        .get(name)
        .ok_or_else(|| TemplateError::Missing(format!("resource {name}")))?;
    let (region, account) = (&resolved.region, &resolved.account);
    let arn = match (kind.as_str(), attribute) {
        ("AWS::DynamoDB::Table", "Arn") => {
            format!("arn:aws:dynamodb:{region}:{account}:table/{id}")
        }
        ("AWS::SQS::Queue", "Arn") => {
            let queue = id.rsplit('/').next().unwrap_or(id);
            format!("arn:aws:sqs:{region}:{account}:{queue}")
        }
        ("AWS::SQS::Queue", "QueueName") => id.rsplit('/').next().unwrap_or(id).to_owned(),
        ("AWS::S3::Bucket", "Arn") => format!("arn:aws:s3:::{id}"),
        ("AWS::Logs::LogGroup", "Arn") => {
            format!("arn:aws:logs:{region}:{account}:log-group:{id}:*")
        }
        ("AWS::IAM::Role", "Arn") => format!("arn:aws:iam::{account}:role/{id}"),
        ("AWS::IAM::InstanceProfile", "Arn") => {
            format!("arn:aws:iam::{account}:instance-profile/{id}")
        }
        ("AWS::SNS::Topic", "TopicArn") => id.clone(),
        _ => {
            return Err(TemplateError::Missing(format!(
                "the {attribute} of {name} ({kind})"
            )));
        }
    };
    Ok(arn)
}

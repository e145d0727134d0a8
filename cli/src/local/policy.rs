//! The IAM roles template.yaml declares, resolved against the local stack's
//! resources, and the question AWS asks of every call: does the caller's
//! role have a statement that allows this action on this resource?
//!
//! Only what the template's roles use is evaluated: Allow statements with
//! Action and Resource. Conditions are AWS's alone (they narrow a grant, so
//! a call allowed here may still be refused there by a condition, never the
//! other way round).

use serde::Serialize;
use serde_json::Value;

use super::resolve::Resolved;
use super::template::{Template, TemplateError};

/// One statement of a role's inline policies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Grant {
    pub role: String,
    pub sid: String,
    pub actions: Vec<String>,
    /// ARN patterns, resolved; empty when not resolved (see `Template::grants`).
    pub resources: Vec<String>,
}

/// What a call asks of IAM: one action on one resource (none for the
/// actions whose resources are not evaluated here, such as EC2's).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Ask {
    pub action: String,
    pub resource: Option<String>,
}

/// Every role's grants, resolved.
#[derive(Debug, Clone, Default)]
pub struct Policies {
    grants: Vec<Grant>,
}

impl Policies {
    pub fn new(grants: Vec<Grant>) -> Self {
        Self { grants }
    }

    /// The statement that allows `ask` for `role`, if any.
    pub fn allowing(&self, role: &str, ask: &Ask) -> Option<&Grant> {
        self.grants.iter().find(|grant| {
            grant.role == role
                && grant
                    .actions
                    .iter()
                    .any(|pattern| matches(&pattern.to_lowercase(), &ask.action.to_lowercase()))
                && match &ask.resource {
                    Some(resource) => grant.resources.iter().any(|p| matches(p, resource)),
                    None => true,
                }
        })
    }
}

/// IAM's wildcards: `*` any run of characters, `?` one.
pub(super) fn matches(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti) = (0, 0);
    let mut backtrack: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            backtrack = Some((pi, ti));
            pi += 1;
        } else if let Some((star, matched)) = backtrack {
            pi = star + 1;
            ti = matched + 1;
            backtrack = Some((star, matched + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

impl Template {
    /// Every statement of every `AWS::IAM::Role`, with its resources
    /// resolved when `resolved` is given. A role with managed policies is
    /// an error: what they grant cannot be read from the template.
    pub fn grants(&self, resolved: Option<&Resolved>) -> Result<Vec<Grant>, TemplateError> {
        let mut grants = Vec::new();
        for (role, resource) in self.resources()? {
            if resource["Type"] != "AWS::IAM::Role" {
                continue;
            }
            let properties = &resource["Properties"];
            if properties.get("ManagedPolicyArns").is_some() {
                return Err(TemplateError::Unsupported(format!(
                    "{role} has managed policies; grant what it needs inline"
                )));
            }
            for policy in properties["Policies"].as_array().into_iter().flatten() {
                let statements = &policy["PolicyDocument"]["Statement"];
                for (n, statement) in statements.as_array().into_iter().flatten().enumerate() {
                    if statement["Effect"] != "Allow"
                        || statement.get("NotAction").is_some()
                        || statement.get("NotResource").is_some()
                    {
                        return Err(TemplateError::Unsupported(format!(
                            "{role}: only Allow statements with Action and Resource are read"
                        )));
                    }
                    let sid = statement["Sid"]
                        .as_str()
                        .map_or_else(|| format!("#{n}"), str::to_owned);
                    let actions = literal_strings(&statement["Action"]);
                    let resources = match resolved {
                        Some(resolved) => self.strings(&statement["Resource"], resolved)?,
                        None => Vec::new(),
                    };
                    grants.push(Grant {
                        role: role.clone(),
                        sid,
                        actions,
                        resources,
                    });
                }
            }
        }
        Ok(grants)
    }

    /// The role a function runs as (`Role: !GetAtt SomeRole.Arn`).
    pub fn function_role(&self, function: &str) -> Option<String> {
        let role = &self.resources().ok()?.get(function)?["Properties"]["Role"];
        role["Fn::GetAtt"][0].as_str().map(str::to_owned)
    }

    /// The role of the instance profile a launch template gives its
    /// instances.
    pub fn instance_role(&self, launch_template: &str) -> Option<String> {
        let resources = self.resources().ok()?;
        let profile = &resources.get(launch_template)?["Properties"]["LaunchTemplateData"]["IamInstanceProfile"]
            ["Arn"]["Fn::GetAtt"][0];
        let roles = &resources.get(profile.as_str()?)?["Properties"]["Roles"];
        roles[0]["Ref"].as_str().map(str::to_owned)
    }
}

/// `Action: x` or `Action: [x, y]`.
fn literal_strings(value: &Value) -> Vec<String> {
    match value {
        Value::String(s) => vec![s.clone()],
        Value::Array(items) => items
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEMPLATE: &str = r#"
Parameters:
  Bucket:
    Type: String
    Default: ""
Conditions:
  HasBucket: !Not [!Equals [!Ref Bucket, ""]]
Resources:
  Queue:
    Type: AWS::SQS::Queue
  Store:
    Type: AWS::S3::Bucket
  Role:
    Type: AWS::IAM::Role
    Properties:
      Policies:
        - PolicyName: p
          PolicyDocument:
            Statement:
              - Sid: Send
                Effect: Allow
                Action: sqs:SendMessage
                Resource: !GetAtt Queue.Arn
              - Sid: Objects
                Effect: Allow
                Action: [s3:GetObject, s3:PutObject]
                Resource:
                  - !Sub ${Store.Arn}/runs/*
                  - !If [HasBucket, !Sub "arn:${AWS::Partition}:s3:::${Bucket}/*", !Ref AWS::NoValue]
  Profile:
    Type: AWS::IAM::InstanceProfile
    Properties:
      Roles: [!Ref Role]
  Launch:
    Type: AWS::EC2::LaunchTemplate
    Properties:
      LaunchTemplateData:
        IamInstanceProfile:
          Arn: !GetAtt Profile.Arn
  Function:
    Type: AWS::Serverless::Function
    Properties:
      Role: !GetAtt Role.Arn
"#;

    fn resolved(bucket: &str) -> Resolved {
        Resolved {
            parameters: [("Bucket".to_owned(), bucket.to_owned())].into(),
            resources: [
                ("Queue", "AWS::SQS::Queue", "http://h/123/tasks"),
                ("Store", "AWS::S3::Bucket", "store"),
            ]
            .into_iter()
            .map(|(l, k, p)| (l.to_owned(), (k.to_owned(), p.to_owned())))
            .collect(),
            region: "eu-west-1".into(),
            account: "123".into(),
            stack: "s".into(),
        }
    }

    fn ask(action: &str, resource: &str) -> Ask {
        Ask {
            action: action.into(),
            resource: Some(resource.into()),
        }
    }

    #[test]
    fn a_call_is_allowed_only_by_a_statement_with_its_action_and_resource() {
        let template = Template::parse(TEMPLATE).unwrap();
        let policies = Policies::new(template.grants(Some(&resolved(""))).unwrap());
        let send = ask("sqs:SendMessage", "arn:aws:sqs:eu-west-1:123:tasks");
        assert_eq!(policies.allowing("Role", &send).unwrap().sid, "Send");
        assert!(policies.allowing("Other", &send).is_none(), "another role");
        let receive = ask("sqs:ReceiveMessage", "arn:aws:sqs:eu-west-1:123:tasks");
        assert!(
            policies.allowing("Role", &receive).is_none(),
            "another action"
        );
        let elsewhere = ask("sqs:SendMessage", "arn:aws:sqs:eu-west-1:123:results");
        assert!(
            policies.allowing("Role", &elsewhere).is_none(),
            "another queue"
        );
        let put = ask("s3:PutObject", "arn:aws:s3:::store/runs/r1/x.json");
        assert_eq!(policies.allowing("Role", &put).unwrap().sid, "Objects");
        let outside = ask("s3:PutObject", "arn:aws:s3:::store/payloads/x.json");
        assert!(
            policies.allowing("Role", &outside).is_none(),
            "another prefix"
        );
    }

    #[test]
    fn conditions_choose_between_resources() {
        let template = Template::parse(TEMPLATE).unwrap();
        let artifact = ask("s3:GetObject", "arn:aws:s3:::artifacts/worker");
        let without = Policies::new(template.grants(Some(&resolved(""))).unwrap());
        assert!(without.allowing("Role", &artifact).is_none());
        let with = Policies::new(template.grants(Some(&resolved("artifacts"))).unwrap());
        assert!(with.allowing("Role", &artifact).is_some());
    }

    #[test]
    fn roles_are_found_for_functions_and_instances() {
        let template = Template::parse(TEMPLATE).unwrap();
        assert_eq!(template.function_role("Function").as_deref(), Some("Role"));
        assert_eq!(template.instance_role("Launch").as_deref(), Some("Role"));
        assert_eq!(template.function_role("Queue"), None);
    }

    #[test]
    fn wildcards_match_as_iam_matches_them() {
        assert!(matches("arn:aws:s3:::b/runs/*", "arn:aws:s3:::b/runs/r/x"));
        assert!(matches("sqs:*", "sqs:sendmessage"));
        assert!(matches("a?c", "abc"));
        assert!(!matches("a?c", "abbc"));
        assert!(matches("*", ""));
        assert!(!matches("arn:aws:s3:::b/runs/*", "arn:aws:s3:::b/run"));
    }
}

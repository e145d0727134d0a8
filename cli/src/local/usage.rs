//! `nightshift local iam-report`: what the recorded calls used of each role's
//! grants, both ways: calls a role's policies refused, and grants that no
//! recorded call used.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::proxy::Recorded;
use super::template::Template;
use crate::CliError;

/// One action of one statement, and the calls it authorized.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GrantUse {
    pub role: String,
    pub sid: String,
    pub action: String,
    /// `service:Operation` of each call it authorized.
    pub used_by: BTreeSet<String>,
}

/// A call the caller's role did not allow.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Refusal {
    pub role: String,
    pub action: String,
    pub resource: String,
    pub operation: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Usage {
    pub calls: usize,
    pub grants: Vec<GrantUse>,
    pub refused: BTreeSet<Refusal>,
}

impl Usage {
    pub fn of(template: &Template, recorded: &[Recorded]) -> Result<Self, CliError> {
        let mut grants: BTreeMap<(String, String, String), BTreeSet<String>> = BTreeMap::new();
        for grant in template.grants(None)? {
            for action in &grant.actions {
                grants.insert(
                    (grant.role.clone(), grant.sid.clone(), action.clone()),
                    BTreeSet::new(),
                );
            }
        }
        let mut refused = BTreeSet::new();
        for call in recorded {
            let operation = format!("{}:{}", call.service, call.operation);
            match &call.sid {
                Some(sid) => {
                    let key = (call.role.clone(), sid.clone(), call.ask.action.clone());
                    // A statement's action may be a wildcard: file it under
                    // the statement's actions that match. An action whose
                    // resources are not evaluated here (EC2's) uses every
                    // statement that grants it: on AWS each statement
                    // covers some of the resources the call touches.
                    let matching: Vec<_> = grants
                        .keys()
                        .filter(|(role, s, action)| {
                            role == &key.0
                                && (s == sid || call.ask.resource.is_none())
                                && super::policy::matches(
                                    &action.to_lowercase(),
                                    &key.2.to_lowercase(),
                                )
                        })
                        .cloned()
                        .collect();
                    for key in matching {
                        grants.entry(key).or_default().insert(operation.clone());
                    }
                }
                None => {
                    refused.insert(Refusal {
                        role: call.role.clone(),
                        action: call.ask.action.clone(),
                        resource: call.ask.resource.clone().unwrap_or_else(|| "*".into()),
                        operation,
                    });
                }
            }
        }
        Ok(Self {
            calls: recorded.len(),
            grants: grants
                .into_iter()
                .map(|((role, sid, action), used_by)| GrantUse {
                    role,
                    sid,
                    action,
                    used_by,
                })
                .collect(),
            refused,
        })
    }

    pub fn unused(&self) -> impl Iterator<Item = &GrantUse> {
        self.grants.iter().filter(|g| g.used_by.is_empty())
    }

    /// A table for a terminal.
    pub fn table(&self) -> String {
        let mut out = format!(
            "{:<16} {:<26} {:<30} used by\n",
            "role", "statement", "action"
        );
        for grant in &self.grants {
            let used = if grant.used_by.is_empty() {
                "NOT USED".to_owned()
            } else {
                grant.used_by.iter().cloned().collect::<Vec<_>>().join(", ")
            };
            out.push_str(&format!(
                "{:<16} {:<26} {:<30} {used}\n",
                grant.role, grant.sid, grant.action
            ));
        }
        out.push_str(&format!(
            "{} calls recorded; {} grants not used; {} refused\n",
            self.calls,
            self.unused().count(),
            self.refused.len()
        ));
        for refusal in &self.refused {
            out.push_str(&format!(
                "REFUSED {} {} on {} ({})\n",
                refusal.role, refusal.action, refusal.resource, refusal.operation
            ));
        }
        out
    }
}

/// The recorded calls in these files, or in the `calls.jsonl` files under
/// these directories.
pub fn read_recorded(paths: &[PathBuf]) -> Result<Vec<Recorded>, CliError> {
    let mut files = Vec::new();
    for path in paths {
        if path.is_dir() {
            collect_files(path, &mut files)?;
        } else {
            files.push(path.clone());
        }
    }
    let mut recorded = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).map_err(|e| CliError::io(&file, e))?;
        for (n, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            recorded.push(serde_json::from_str(line).map_err(|e| {
                CliError::Usage(format!(
                    "{}:{}: not a recorded call: {e}",
                    file.display(),
                    n + 1
                ))
            })?);
        }
    }
    Ok(recorded)
}

fn collect_files(dir: &Path, files: &mut Vec<PathBuf>) -> Result<(), CliError> {
    let entries = std::fs::read_dir(dir).map_err(|e| CliError::io(dir, e))?;
    for entry in entries {
        let path = entry.map_err(|e| CliError::io(dir, e))?.path();
        if path.is_dir() {
            collect_files(&path, files)?;
        } else if path.extension().is_some_and(|e| e == "jsonl") {
            files.push(path);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::local::policy::Ask;

    const TEMPLATE: &str = r#"
Resources:
  Role:
    Type: AWS::IAM::Role
    Properties:
      Policies:
        - PolicyName: p
          PolicyDocument:
            Statement:
              - Sid: Queue
                Effect: Allow
                Action: [sqs:SendMessage, sqs:ReceiveMessage]
                Resource: "*"
"#;

    fn call(action: &str, sid: Option<&str>) -> Recorded {
        Recorded {
            role: "Role".into(),
            session: "function".into(),
            service: "sqs".into(),
            operation: "SendMessageBatch".into(),
            ask: Ask {
                action: action.into(),
                resource: Some("arn:aws:sqs:r:1:q".into()),
            },
            sid: sid.map(str::to_owned),
        }
    }

    #[test]
    fn grants_no_call_used_and_calls_refused_are_both_reported() {
        let template = Template::parse(TEMPLATE).unwrap();
        let usage = Usage::of(
            &template,
            &[
                call("sqs:SendMessage", Some("Queue")),
                call("sqs:DeleteMessage", None),
            ],
        )
        .unwrap();
        let unused: Vec<&str> = usage.unused().map(|g| g.action.as_str()).collect();
        assert_eq!(unused, ["sqs:ReceiveMessage"]);
        assert_eq!(
            usage.grants[1].used_by,
            BTreeSet::from(["sqs:SendMessageBatch".to_owned()])
        );
        assert_eq!(usage.refused.len(), 1);
        assert!(usage.table().contains("REFUSED Role sqs:DeleteMessage"));
    }
}

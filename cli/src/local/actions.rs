//! What a call asks of IAM, read from the request as the SDK sends it:
//! its service and operation, and the IAM actions and resources AWS's
//! service authorization reference names for it. A batch operation is
//! authorized as its single form (`SendMessageBatch` as `sqs:SendMessage`),
//! a transaction as each of its items (`TransactWriteItems` of an Update as
//! `dynamodb:UpdateItem`), `DeleteObjects` as `s3:DeleteObject` per key.

use axum::http::{HeaderMap, Method, Uri};
use serde_json::Value;

use super::policy::Ask;

/// A request, as the proxy sees it.
pub struct Call<'a> {
    pub method: &'a Method,
    pub uri: &'a Uri,
    pub headers: &'a HeaderMap,
    pub body: &'a [u8],
}

/// Who signed a call: the access key (the local stack names each role's
/// key after the role), the session (its security token) and the region.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Signer {
    pub key: String,
    pub session: String,
    pub region: String,
}

impl Call<'_> {
    /// The service and operation, from the way the SDK sends each protocol.
    pub fn operation(&self) -> (&'static str, String) {
        if let Some(target) = self.header("x-amz-target") {
            let (prefix, op) = target.split_once('.').unwrap_or(("", target));
            let service = if prefix.starts_with("DynamoDB") {
                "dynamodb"
            } else {
                "sqs"
            };
            return (service, op.to_owned());
        }
        if let Some(action) = self.form("Action") {
            return ("ec2", action);
        }
        let path = self.uri.path();
        if path.starts_with("/2015-03-31/functions/") {
            return ("lambda", "Invoke".to_owned());
        }
        ("s3", self.s3_operation().to_owned())
    }

    pub fn signer(&self) -> Signer {
        let authorization = self.header("authorization").unwrap_or_default();
        let credential = authorization
            .split_once("Credential=")
            .map(|(_, rest)| rest.split([',', ' ']).next().unwrap_or_default())
            .unwrap_or_default();
        let mut scope = credential.split('/');
        Signer {
            key: scope.next().unwrap_or_default().to_owned(),
            region: scope.nth(1).unwrap_or_default().to_owned(),
            session: self
                .header("x-amz-security-token")
                .unwrap_or_default()
                .to_owned(),
        }
    }

    /// The IAM actions and resources this call, of `service` and
    /// `operation` (as `operation()` reads them), is authorized by.
    pub fn asks(&self, service: &str, operation: &str, region: &str, account: &str) -> Vec<Ask> {
        match service {
            "dynamodb" => self.dynamodb_asks(operation, region, account),
            "sqs" => vec![self.sqs_ask(operation, region, account)],
            "s3" => self.s3_asks(operation),
            "lambda" => {
                let name = self.uri.path().split('/').nth(3).unwrap_or_default();
                vec![Ask {
                    action: "lambda:InvokeFunction".into(),
                    resource: Some(format!("arn:aws:lambda:{region}:{account}:function:{name}")),
                }]
            }
            // EC2 authorizes against each resource a launch touches and its
            // tags, which the request does not name: the action alone here.
            _ => {
                let mut actions = vec![format!("ec2:{operation}")];
                if operation == "CreateFleet" {
                    // A fleet runs, tags and passes the instance profile's
                    // role on the caller's behalf.
                    actions.extend(
                        ["ec2:RunInstances", "ec2:CreateTags", "iam:PassRole"].map(str::to_owned),
                    );
                }
                actions
                    .into_iter()
                    .map(|action| Ask {
                        action,
                        resource: None,
                    })
                    .collect()
            }
        }
    }

    fn dynamodb_asks(&self, operation: &str, region: &str, account: &str) -> Vec<Ask> {
        let body: Value = serde_json::from_slice(self.body).unwrap_or(Value::Null);
        let table = |name: &str| format!("arn:aws:dynamodb:{region}:{account}:table/{name}");
        let ask = |action: &str, resource: String| Ask {
            action: format!("dynamodb:{action}"),
            resource: Some(resource),
        };
        match operation {
            "BatchGetItem" | "BatchWriteItem" => body["RequestItems"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(name, _)| ask(operation, table(name)))
                .collect(),
            "TransactWriteItems" | "TransactGetItems" => body["TransactItems"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|item| {
                    let (kind, inner) = item.as_object()?.iter().next()?;
                    let action = match kind.as_str() {
                        "Put" => "PutItem",
                        "Update" => "UpdateItem",
                        "Delete" => "DeleteItem",
                        "Get" => "GetItem",
                        _ => "ConditionCheckItem",
                    };
                    Some(ask(action, table(inner["TableName"].as_str()?)))
                })
                .collect(),
            _ => {
                let name = body["TableName"].as_str().unwrap_or("*");
                let resource = match body["IndexName"].as_str() {
                    Some(index) => format!("{}/index/{index}", table(name)),
                    None => table(name),
                };
                vec![ask(operation, resource)]
            }
        }
    }

    fn sqs_ask(&self, operation: &str, region: &str, account: &str) -> Ask {
        let body: Value = serde_json::from_slice(self.body).unwrap_or(Value::Null);
        let queue = body["QueueUrl"]
            .as_str()
            .and_then(|url| url.rsplit('/').next())
            .or_else(|| body["QueueName"].as_str())
            .unwrap_or("*");
        let action = operation.strip_suffix("Batch").unwrap_or(operation);
        Ask {
            action: format!("sqs:{action}"),
            resource: Some(format!("arn:aws:sqs:{region}:{account}:{queue}")),
        }
    }

    /// Path-style S3 (the SDK's choice for an IP endpoint): `/bucket/key`.
    fn s3_target(&self) -> (&str, Option<&str>) {
        let path = self.uri.path().trim_start_matches('/');
        match path.split_once('/') {
            Some((bucket, key)) if !key.is_empty() => (bucket, Some(key)),
            Some((bucket, _)) => (bucket, None),
            None => (path, None),
        }
    }

    fn s3_operation(&self) -> &'static str {
        let query = self.uri.query().unwrap_or_default();
        let has = |name: &str| query.split('&').any(|p| p.split('=').next() == Some(name));
        match (self.method.as_str(), self.s3_target().1) {
            ("POST", None) if has("delete") => "DeleteObjects",
            ("GET", None) if has("list-type") => "ListObjectsV2",
            ("GET", None) => "ListObjects",
            ("PUT", None) => "CreateBucket",
            ("GET", Some(_)) => "GetObject",
            ("HEAD", Some(_)) => "HeadObject",
            ("PUT", Some(_)) => "PutObject",
            ("DELETE", Some(_)) => "DeleteObject",
            _ => "Unknown",
        }
    }

    fn s3_asks(&self, operation: &str) -> Vec<Ask> {
        let (bucket, key) = self.s3_target();
        let object = |key: &str| Some(format!("arn:aws:s3:::{bucket}/{}", decode(key)));
        let action = |name: &str, resource| Ask {
            action: format!("s3:{name}"),
            resource,
        };
        match operation {
            "DeleteObjects" => xml_values(&String::from_utf8_lossy(self.body), "Key")
                .iter()
                .map(|key| action("DeleteObject", object(key)))
                .collect(),
            "ListObjectsV2" | "ListObjects" => {
                vec![action("ListBucket", Some(format!("arn:aws:s3:::{bucket}")))]
            }
            "HeadObject" => vec![action("GetObject", key.and_then(object))],
            other => vec![action(other, key.and_then(object))],
        }
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// A field of a form-encoded (query protocol) body.
    fn form(&self, name: &str) -> Option<String> {
        let text = std::str::from_utf8(self.body).ok()?;
        text.split('&').find_map(|pair| {
            let (key, value) = pair.split_once('=')?;
            (key == name).then(|| value.to_owned())
        })
    }
}

/// Percent-decoding of a URL path segment.
fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(byte) = text
                .get(i + 1..i + 3)
                .and_then(|hex| u8::from_str_radix(hex, 16).ok())
        {
            out.push(byte);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The text of every `<tag>…</tag>` (XML's five entities unescaped).
fn xml_values(xml: &str, tag: &str) -> Vec<String> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    xml.split(&open)
        .skip(1)
        .filter_map(|rest| rest.split_once(&close))
        .map(|(value, _)| {
            value
                .replace("&lt;", "<")
                .replace("&gt;", ">")
                .replace("&quot;", "\"")
                .replace("&apos;", "'")
                .replace("&amp;", "&")
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn asks(method: &str, uri: &str, headers: &[(&'static str, &str)], body: &str) -> Vec<Ask> {
        let method: Method = method.parse().unwrap();
        let uri: Uri = uri.parse().unwrap();
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.insert(*name, HeaderValue::from_str(value).unwrap());
        }
        let call = Call {
            method: &method,
            uri: &uri,
            headers: &map,
            body: body.as_bytes(),
        };
        let (service, operation) = call.operation();
        call.asks(service, &operation, "r", "1")
    }

    fn ask(action: &str, resource: &str) -> Ask {
        Ask {
            action: action.into(),
            resource: Some(resource.into()),
        }
    }

    #[test]
    fn batches_are_authorized_as_their_single_form() {
        let body = r#"{"QueueUrl":"http://h/1/tasks","Entries":[]}"#;
        let target = [("x-amz-target", "AmazonSQS.SendMessageBatch")];
        assert_eq!(
            asks("POST", "/", &target, body),
            [ask("sqs:SendMessage", "arn:aws:sqs:r:1:tasks")]
        );
        let xml = "<Delete><Object><Key>runs/a&amp;b.json</Key></Object><Object><Key>runs/c</Key></Object></Delete>";
        assert_eq!(
            asks("POST", "/bucket?delete", &[], xml),
            [
                ask("s3:DeleteObject", "arn:aws:s3:::bucket/runs/a&b.json"),
                ask("s3:DeleteObject", "arn:aws:s3:::bucket/runs/c")
            ]
        );
    }

    #[test]
    fn a_transaction_is_authorized_item_by_item() {
        let body = r#"{"TransactItems":[{"Update":{"TableName":"t"}},{"Delete":{"TableName":"t"}},{"ConditionCheck":{"TableName":"t"}}]}"#;
        let target = [("x-amz-target", "DynamoDB_20120810.TransactWriteItems")];
        assert_eq!(
            asks("POST", "/", &target, body),
            [
                ask("dynamodb:UpdateItem", "arn:aws:dynamodb:r:1:table/t"),
                ask("dynamodb:DeleteItem", "arn:aws:dynamodb:r:1:table/t"),
                ask(
                    "dynamodb:ConditionCheckItem",
                    "arn:aws:dynamodb:r:1:table/t"
                ),
            ]
        );
        let query = r#"{"TableName":"t","IndexName":"pending"}"#;
        let target = [("x-amz-target", "DynamoDB_20120810.Query")];
        assert_eq!(
            asks("POST", "/", &target, query),
            [ask(
                "dynamodb:Query",
                "arn:aws:dynamodb:r:1:table/t/index/pending"
            )]
        );
    }

    #[test]
    fn objects_and_listings_name_their_resources() {
        assert_eq!(
            asks(
                "PUT",
                "/b/runs/r1/results/t%2Fx.json?x-id=PutObject",
                &[],
                ""
            ),
            [ask(
                "s3:PutObject",
                "arn:aws:s3:::b/runs/r1/results/t/x.json"
            )]
        );
        assert_eq!(
            asks("GET", "/b?list-type=2&prefix=runs%2F", &[], ""),
            [ask("s3:ListBucket", "arn:aws:s3:::b")]
        );
        let fleet = asks("POST", "/", &[], "Action=CreateFleet&Version=2016-11-15");
        let actions: Vec<&str> = fleet.iter().map(|a| a.action.as_str()).collect();
        assert_eq!(
            actions,
            [
                "ec2:CreateFleet",
                "ec2:RunInstances",
                "ec2:CreateTags",
                "iam:PassRole"
            ]
        );
    }

    #[test]
    fn the_signer_is_read_from_the_authorization_header() {
        let mut headers = HeaderMap::new();
        headers.insert("authorization", HeaderValue::from_static(
            "AWS4-HMAC-SHA256 Credential=WorkerRole/20261127/eu-west-1/sqs/aws4_request, SignedHeaders=host, Signature=0",
        ));
        headers.insert("x-amz-security-token", HeaderValue::from_static("instance"));
        let (method, uri) = (Method::POST, Uri::from_static("/"));
        let call = Call {
            method: &method,
            uri: &uri,
            headers: &headers,
            body: b"",
        };
        assert_eq!(
            call.signer(),
            Signer {
                key: "WorkerRole".into(),
                session: "instance".into(),
                region: "eu-west-1".into()
            }
        );
    }
}

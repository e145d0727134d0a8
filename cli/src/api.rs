//! The HTTP API as the CLI reaches it: over TLS (rustls) for a deployed
//! stack, every request signed with SigV4 for API Gateway's IAM auth
//! (service `execute-api`) with the standard AWS credential chain; the local
//! stack's API takes the same signed requests.

use std::time::SystemTime;

use aws_credential_types::Credentials;
use aws_credential_types::provider::ProvideCredentials;
use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
use aws_sigv4::sign::v4;
use serde_json::Value;

use crate::CliError;

pub struct Api {
    base: String,
    http: reqwest::Client,
    signer: Option<Signer>,
}

struct Signer {
    credentials: Credentials,
    region: String,
}

impl Api {
    /// A deployed (or any) API: credentials from the standard chain
    /// (environment, profile, SSO, instance role, ...). An `https://` API
    /// without credentials is an error; a plain `http://` one (a local
    /// stack) is called unsigned then.
    pub async fn with_default_credentials(base: &str) -> Result<Self, CliError> {
        let config = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
        let credentials = match config.credentials_provider() {
            Some(provider) => provider.provide_credentials().await.ok(),
            None => None,
        };
        if credentials.is_none() && base.starts_with("https://") {
            return Err(CliError::Usage(format!(
                "no AWS credentials to sign requests to {base} with: set AWS_PROFILE or AWS_ACCESS_KEY_ID, or run `aws sso login`"
            )));
        }
        let region = region_of(base)
            .or_else(|| config.region().map(ToString::to_string))
            .unwrap_or_else(|| "us-east-1".to_owned());
        Ok(Self::new(
            base,
            credentials.map(|credentials| Signer {
                credentials,
                region,
            }),
        ))
    }

    /// The local stack's API, with the credentials of its env file.
    pub fn with_static_credentials(base: &str, key: &str, secret: &str, region: &str) -> Self {
        let credentials = Credentials::new(key, secret, None, None, "nightshift-local-env");
        Self::new(
            base,
            Some(Signer {
                credentials,
                region: region.to_owned(),
            }),
        )
    }

    fn new(base: &str, signer: Option<Signer>) -> Self {
        Self {
            base: base.trim_end_matches('/').to_owned(),
            http: reqwest::Client::new(),
            signer,
        }
    }

    /// Calls `path` (e.g. `/runs`); an answer of 400 or more is an error.
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Value), CliError> {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let answer = self.send(method, path, body, "application/json").await?;
        let value = serde_json::from_str(&answer.text).unwrap_or(Value::String(answer.text));
        Ok((answer.status, value))
    }

    /// Sends a request accepting `accept`, signed when credentials were
    /// given; an answer of 400 or more is an error.
    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: String,
        accept: &str,
    ) -> Result<Answer, CliError> {
        let url = format!("{}{path}", self.base);
        let mut headers = vec![
            ("content-type".to_owned(), "application/json".to_owned()),
            ("accept".to_owned(), accept.to_owned()),
        ];
        if let Some(signer) = &self.signer {
            headers.extend(signer.sign(method.as_str(), &url, &headers, body.as_bytes())?);
        }
        let mut request = self.http.request(method, &url);
        for (name, value) in &headers {
            request = request.header(name, value);
        }
        if !body.is_empty() {
            request = request.body(body);
        }
        let http_error = |source| CliError::Http {
            url: url.clone(),
            source,
        };
        let response = request.send().await.map_err(http_error)?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let text = response.text().await.map_err(http_error)?;
        if status == 403 && self.signer.is_none() {
            return Err(CliError::Usage(format!(
                "the API at {url} refused an unsigned request: give AWS credentials"
            )));
        }
        if status >= 400 {
            return Err(CliError::Api { status, body: text });
        }
        Ok(Answer {
            status,
            headers,
            text,
        })
    }

    /// The base URL requests go to.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// Whether requests are signed.
    pub fn is_signed(&self) -> bool {
        self.signer.is_some()
    }
}

/// An answer of the API under 400.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub text: String,
}

impl Signer {
    /// The headers that sign this request (authorization, date, token).
    fn sign(
        &self,
        method: &str,
        url: &str,
        headers: &[(String, String)],
        body: &[u8],
    ) -> Result<Vec<(String, String)>, CliError> {
        let failed = |e: &dyn std::fmt::Display| CliError::Local(format!("cannot sign: {e}"));
        let identity = self.credentials.clone().into();
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region(&self.region)
            .name("execute-api")
            .time(SystemTime::now())
            .settings(SigningSettings::default())
            .build()
            .map_err(|e| failed(&e))?
            .into();
        let request = SignableRequest::new(
            method,
            url,
            headers.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            SignableBody::Bytes(body),
        )
        .map_err(|e| failed(&e))?;
        let (instructions, _) = sign(request, &params).map_err(|e| failed(&e))?.into_parts();
        Ok(instructions
            .headers()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect())
    }
}

/// The region of an API Gateway URL (`https://id.execute-api.REGION.amazonaws.com`).
fn region_of(url: &str) -> Option<String> {
    let host = url.split("://").nth(1)?.split(['/', ':']).next()?;
    let mut labels = host.split('.');
    labels.find(|label| *label == "execute-api")?;
    labels.next().map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_region_comes_from_an_api_gateway_url() {
        assert_eq!(
            region_of("https://abc123.execute-api.eu-west-2.amazonaws.com/prod").as_deref(),
            Some("eu-west-2")
        );
        assert_eq!(region_of("http://127.0.0.1:3000"), None);
    }

    #[test]
    fn a_signed_request_carries_sigv4_for_execute_api() {
        let signer = Signer {
            credentials: Credentials::new("AKIDEXAMPLE", "secret", Some("token".into()), None, "t"),
            region: "eu-west-2".into(),
        };
        let headers = signer
            .sign(
                "POST",
                "https://abc.execute-api.eu-west-2.amazonaws.com/tasks",
                &[("content-type".into(), "application/json".into())],
                b"{}",
            )
            .unwrap();
        let get = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
                .unwrap_or_default()
        };
        let authorization = get("authorization");
        assert!(authorization.starts_with("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/"));
        assert!(authorization.contains("/eu-west-2/execute-api/aws4_request"));
        assert!(authorization.contains("SignedHeaders=content-type;host;x-amz-date"));
        assert_eq!(get("x-amz-security-token"), "token");
    }
}

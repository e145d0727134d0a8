//! Turns a request body into tasks, or into the first error found. Nothing
//! is written until the whole body is valid.

use axum::http::StatusCode;
use serde_json::value::RawValue;

use crate::error::ApiError;

/// One task as the client described it.
#[derive(Debug, Clone)]
pub struct TaskRequest {
    pub account: String,
    pub kernel: String,
    /// The payload's JSON text, written once here and carried as it is.
    pub payload: Box<RawValue>,
    pub idempotency_key: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_batch: usize,
    pub max_payload_bytes: usize,
    pub kernels: Vec<String>,
    pub default_kernel: String,
}

impl Limits {
    /// The API's limits. `kernels` names the kernels built into the
    /// workers (configuration, comma-separated); the first is the one a
    /// task that names none runs.
    pub fn new(max_payload_bytes: usize, kernels: &str) -> Self {
        let kernels = names(kernels);
        Self {
            max_batch: 1000,
            max_payload_bytes,
            default_kernel: kernels.first().cloned().unwrap_or_default(),
            kernels,
        }
    }

    /// Also accepts the programs the workers' image offers, given as a
    /// comma-separated list of names.
    pub fn with_programs(mut self, programs: &str) -> Self {
        self.kernels.extend(names(programs));
        self
    }
}

fn names(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(str::to_owned)
        .collect()
}

const MAX_ACCOUNT_LEN: usize = 128;
const MAX_KEY_LEN: usize = 128;
const TASK_FIELDS: [&str; 4] = ["account", "payload", "kernel", "idempotency_key"];

/// An object's members, each kept as its JSON text.
type Members<'a> = std::collections::BTreeMap<String, &'a RawValue>;

/// Parses `POST /tasks`: one task object, or `{"tasks": [...]}`. Payloads
/// are kept as the client wrote them, never parsed into numbers: an integer
/// beyond 64 bits or `1e400` reaches the kernel as it was sent.
pub fn parse_tasks(body: &[u8], limits: &Limits) -> Result<Vec<TaskRequest>, ApiError> {
    let document: &RawValue = serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed_json",
            format!("body is not valid JSON: {e}"),
        )
    })?;
    let object = members(document)
        .ok_or_else(|| ApiError::invalid("invalid_type", "", "body must be a JSON object"))?;
    let Some(tasks) = object.get("tasks") else {
        return Ok(vec![parse_task(&object, "", limits)?]);
    };
    if object.len() > 1 {
        let extra = object
            .keys()
            .find(|k| *k != "tasks")
            .cloned()
            .unwrap_or_default();
        return Err(ApiError::invalid(
            "unknown_field",
            extra,
            "a batch body holds only `tasks`",
        ));
    }
    let tasks: Vec<&RawValue> = serde_json::from_str(tasks.get())
        .map_err(|_| ApiError::invalid("invalid_type", "tasks", "tasks must be an array"))?;
    if tasks.is_empty() {
        return Err(ApiError::invalid(
            "empty_batch",
            "tasks",
            "tasks must hold at least one task",
        ));
    }
    let parsed = tasks
        .iter()
        .enumerate()
        .map(|(i, task)| {
            let prefix = format!("tasks[{i}].");
            match members(task) {
                Some(object) => parse_task(&object, &prefix, limits),
                None => Err(ApiError::invalid(
                    "invalid_type",
                    format!("tasks[{i}]"),
                    "each task must be an object",
                )),
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    // After the tasks themselves: a malformed task is named first.
    if parsed.len() > limits.max_batch {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "batch_too_large",
            format!(
                "a batch holds at most {} tasks, this one {}",
                limits.max_batch,
                parsed.len()
            ),
        )
        .at("tasks"));
    }
    reject_repeated_keys(&parsed)?;
    Ok(parsed)
}

/// The members of a JSON object, or `None` for any other value.
fn members(value: &RawValue) -> Option<Members<'_>> {
    value
        .get()
        .trim_start()
        .starts_with('{')
        .then(|| serde_json::from_str(value.get()).ok())
        .flatten()
}

fn parse_task(
    object: &Members<'_>,
    prefix: &str,
    limits: &Limits,
) -> Result<TaskRequest, ApiError> {
    if let Some(unknown) = object.keys().find(|k| !TASK_FIELDS.contains(&k.as_str())) {
        return Err(ApiError::invalid(
            "unknown_field",
            format!("{prefix}{unknown}"),
            format!("unknown field `{unknown}`"),
        ));
    }
    let account = required_string(object, "account", prefix)?;
    if account.len() > MAX_ACCOUNT_LEN || account.chars().any(is_invisible) {
        return Err(ApiError::invalid(
            "invalid_value",
            format!("{prefix}account"),
            format!(
                "account must be at most {MAX_ACCOUNT_LEN} bytes of printable characters \
                 (no control or format characters)"
            ),
        ));
    }
    let payload = match object.get("payload") {
        None => None,
        Some(raw) if raw.get().trim() == "null" => None,
        Some(raw) => Some((*raw).to_owned()),
    };
    let Some(payload) = payload else {
        return Err(ApiError::invalid(
            "missing_field",
            format!("{prefix}payload"),
            "payload is required",
        ));
    };
    let payload_bytes = payload.get().len();
    if payload_bytes > limits.max_payload_bytes {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!(
                "payload is {payload_bytes} bytes, the limit is {}",
                limits.max_payload_bytes
            ),
        )
        .at(format!("{prefix}payload")));
    }
    let kernel =
        optional_string(object, "kernel", prefix)?.unwrap_or_else(|| limits.default_kernel.clone());
    if !limits.kernels.contains(&kernel) {
        return Err(ApiError::invalid(
            "unknown_kernel",
            format!("{prefix}kernel"),
            format!(
                "unknown kernel `{kernel}`; known: {}",
                limits.kernels.join(", ")
            ),
        ));
    }
    let idempotency_key = optional_string(object, "idempotency_key", prefix)?;
    if idempotency_key
        .as_ref()
        .is_some_and(|k| k.is_empty() || k.len() > MAX_KEY_LEN)
    {
        return Err(ApiError::invalid(
            "invalid_value",
            format!("{prefix}idempotency_key"),
            format!("idempotency_key must be 1 to {MAX_KEY_LEN} characters"),
        ));
    }
    Ok(TaskRequest {
        account,
        kernel,
        payload,
        idempotency_key,
    })
}

/// Control characters, and Unicode's format characters (bidirectional
/// overrides such as U+202E, zero-width ones, the byte-order mark): in an
/// account they would make two different names look the same.
fn is_invisible(c: char) -> bool {
    c.is_control()
        || matches!(
            u32::from(c),
            0x00AD
                | 0x0600..=0x0605
                | 0x061C
                | 0x06DD
                | 0x070F
                | 0x08E2
                | 0x180E
                | 0x200B..=0x200F
                | 0x202A..=0x202E
                | 0x2060..=0x2064
                | 0x2066..=0x206F
                | 0xFEFF
                | 0xFFF9..=0xFFFB
                | 0x110BD
                | 0x110CD
                | 0x13430..=0x1343F
                | 0x1BCA0..=0x1BCA3
                | 0x1D173..=0x1D17A
                | 0xE0001
                | 0xE0020..=0xE007F
        )
}

fn required_string(object: &Members<'_>, name: &str, prefix: &str) -> Result<String, ApiError> {
    match optional_string(object, name, prefix)? {
        Some(value) if !value.trim().is_empty() => Ok(value),
        Some(_) => Err(ApiError::invalid(
            "invalid_value",
            format!("{prefix}{name}"),
            format!("{name} must not be empty"),
        )),
        None => Err(ApiError::invalid(
            "missing_field",
            format!("{prefix}{name}"),
            format!("{name} is required"),
        )),
    }
}

fn optional_string(
    object: &Members<'_>,
    name: &str,
    prefix: &str,
) -> Result<Option<String>, ApiError> {
    let Some(raw) = object.get(name) else {
        return Ok(None);
    };
    match serde_json::from_str::<Option<String>>(raw.get()) {
        Ok(value) => Ok(value),
        Err(_) => Err(ApiError::invalid(
            "invalid_type",
            format!("{prefix}{name}"),
            format!("{name} must be a string"),
        )),
    }
}

fn reject_repeated_keys(tasks: &[TaskRequest]) -> Result<(), ApiError> {
    let mut seen = std::collections::HashSet::new();
    for (i, task) in tasks.iter().enumerate() {
        if let Some(key) = &task.idempotency_key
            && !seen.insert((task.account.as_str(), key.as_str()))
        {
            return Err(ApiError::invalid(
                "duplicate_idempotency_key",
                format!("tasks[{i}].idempotency_key"),
                "the same idempotency key appears twice in this batch",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    #[test]
    fn a_payload_reaches_the_kernel_as_it_was_written() {
        let body = br#"{"account": "a", "payload": {"big": 123456789012345678901234567890, "tiny": 1e400, "neg": -0.0}}"#;
        let tasks = parse_tasks(body, &limits()).unwrap();
        assert_eq!(
            tasks[0].payload.get(),
            r#"{"big": 123456789012345678901234567890, "tiny": 1e400, "neg": -0.0}"#
        );
    }

    #[test]
    fn an_account_with_format_or_control_characters_is_refused() {
        for account in [r"a\u202eb", r"\u200bsame", r"bom\ufeff", r"tab\t"] {
            let body = format!(r#"{{"account": "{account}", "payload": 1}}"#);
            let error = parse_tasks(body.as_bytes(), &limits()).unwrap_err();
            assert_eq!(
                (error.code, error.field.as_deref()),
                ("invalid_value", Some("account")),
                "{account}"
            );
        }
        assert!(
            parse_tasks(
                r#"{"account": "Zoë Ørsted", "payload": 1}"#.as_bytes(),
                &limits()
            )
            .is_ok()
        );
    }

    fn limits() -> Limits {
        Limits {
            max_batch: 3,
            max_payload_bytes: 100,
            kernels: vec!["sleep".into(), "portfolio-risk".into()],
            default_kernel: "sleep".into(),
        }
    }

    fn error_of(body: Value) -> ApiError {
        parse_tasks(body.to_string().as_bytes(), &limits()).unwrap_err()
    }

    #[test]
    fn a_single_task_and_a_batch_are_accepted() {
        let one = parse_tasks(br#"{"account":"a","payload":{"seconds":1}}"#, &limits()).unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].kernel, "sleep");
        let body = json!({"tasks": [
            {"account": "a", "payload": [1, 2], "kernel": "portfolio-risk", "idempotency_key": "k1"},
            {"account": "b", "payload": 3}
        ]});
        let batch = parse_tasks(body.to_string().as_bytes(), &limits()).unwrap();
        assert_eq!(batch[0].idempotency_key.as_deref(), Some("k1"));
        assert_eq!(batch[1].account, "b");
    }

    #[test]
    fn each_mistake_names_its_field_and_code() {
        let cases = [
            (json!({"payload": 1}), "missing_field", "account"),
            (
                json!({"account": 7, "payload": 1}),
                "invalid_type",
                "account",
            ),
            (json!({"account": "a"}), "missing_field", "payload"),
            (
                json!({"account": "a", "payload": 1, "kernel": "rm -rf"}),
                "unknown_kernel",
                "kernel",
            ),
            (
                json!({"account": "a", "payload": 1, "colour": "red"}),
                "unknown_field",
                "colour",
            ),
            (json!({"tasks": []}), "empty_batch", "tasks"),
            (json!({"tasks": {}}), "invalid_type", "tasks"),
            (
                json!({"tasks": [{"account": "a", "payload": 1}, 5]}),
                "invalid_type",
                "tasks[1]",
            ),
            (
                json!({"tasks": [{"account": "a", "payload": 1}, {"account": " ", "payload": 1}]}),
                "invalid_value",
                "tasks[1].account",
            ),
            (
                json!({"tasks": [{"account": "a", "payload": 1, "idempotency_key": "k"},
                              {"account": "a", "payload": 2, "idempotency_key": "k"}]}),
                "duplicate_idempotency_key",
                "tasks[1].idempotency_key",
            ),
        ];
        for (body, code, field) in cases {
            let error = error_of(body.clone());
            assert_eq!(
                (error.code, error.field.as_deref()),
                (code, Some(field)),
                "{body}"
            );
            assert_eq!(error.status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        }
    }

    #[test]
    fn size_limits_answer_413() {
        let big = json!({"account": "a", "payload": "x".repeat(200)});
        let error = error_of(big);
        assert_eq!(
            (error.status, error.code),
            (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
        );
        let many = json!({"tasks": vec![json!({"account": "a", "payload": 1}); 4]});
        let error = error_of(many);
        assert_eq!(
            (error.status, error.code),
            (StatusCode::PAYLOAD_TOO_LARGE, "batch_too_large")
        );
    }

    #[test]
    fn malformed_json_is_a_400() {
        let error = parse_tasks(b"{\"account\":", &limits()).unwrap_err();
        assert_eq!(
            (error.status, error.code),
            (StatusCode::BAD_REQUEST, "malformed_json")
        );
    }
}

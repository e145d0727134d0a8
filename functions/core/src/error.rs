use std::error::Error as StdError;

type Source = Box<dyn StdError + Send + Sync>;

/// Errors from the ports. Each is either retryable (a service call failed,
/// try again later) or permanent (the data itself is wrong).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A call to a backing service failed; the same call may succeed later.
    #[error("{operation} failed")]
    Service {
        operation: &'static str,
        #[source]
        source: Source,
    },
    /// Stored or received data does not have the shape nightshift writes.
    #[error("malformed {what}: {detail}")]
    Malformed { what: &'static str, detail: String },
}

impl Error {
    pub fn service(operation: &'static str, source: impl Into<Source>) -> Self {
        Self::Service {
            operation,
            source: source.into(),
        }
    }

    pub fn malformed(what: &'static str, detail: impl ToString) -> Self {
        Self::Malformed {
            what,
            detail: detail.to_string(),
        }
    }

    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Service { .. })
    }
}

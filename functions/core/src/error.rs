use std::error::Error as StdError;

type Source = Box<dyn StdError + Send + Sync>;

/// Errors from the ports, classified where they arise: a call that may
/// succeed later is [`Error::Transient`]; one that never will is
/// [`Error::Permanent`] and says which limit or rule refused it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Throttling, a conflicting transaction, a 5xx, a timeout: the same
    /// call may succeed later (after a backoff).
    #[error("{operation} failed (transient)")]
    Transient {
        operation: &'static str,
        #[source]
        source: Source,
    },
    /// The request itself is refused (a size limit, validation, access
    /// denied, a missing object): retrying it changes nothing.
    #[error("{operation} refused: {reason}")]
    Permanent {
        operation: &'static str,
        reason: String,
        #[source]
        source: Option<Source>,
    },
    /// Stored or received data does not have the shape nightshift writes.
    #[error("malformed {what}: {detail}")]
    Malformed { what: &'static str, detail: String },
}

impl Error {
    pub fn transient(operation: &'static str, source: impl Into<Source>) -> Self {
        Self::Transient {
            operation,
            source: source.into(),
        }
    }

    pub fn permanent(operation: &'static str, reason: impl ToString) -> Self {
        Self::Permanent {
            operation,
            reason: reason.to_string(),
            source: None,
        }
    }

    pub fn malformed(what: &'static str, detail: impl ToString) -> Self {
        Self::Malformed {
            what,
            detail: detail.to_string(),
        }
    }

    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Transient { .. })
    }

    /// The message with every source, for logs and for the reason a task
    /// failed.
    pub fn chain(&self) -> String {
        let mut text = self.to_string();
        let mut source = StdError::source(self);
        while let Some(inner) = source {
            text.push_str(": ");
            text.push_str(&inner.to_string());
            source = inner.source();
        }
        text
    }
}

//! AWS adapters of the ports, one module per SDK client, each behind the
//! cargo feature of that client. Every SDK error is classified here, where
//! it arises: transient (retry later) or permanent (it never succeeds).

#[cfg(feature = "dynamodb")]
pub mod dynamodb;
#[cfg(feature = "ec2")]
pub mod ec2;
pub mod meter;
#[cfg(feature = "s3")]
pub mod s3;
#[cfg(feature = "sqs")]
pub mod sqs;

use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
use aws_smithy_runtime_api::client::result::SdkError;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;

use crate::Error;

/// Error codes that mean "not now" across the services nightshift calls.
const TRANSIENT_CODES: &[&str] = &[
    "ThrottlingException",
    "Throttling",
    "ThrottledException",
    "RequestThrottled",
    "RequestThrottledException",
    "RequestLimitExceeded",
    "TooManyRequestsException",
    "ProvisionedThroughputExceededException",
    "RequestLimitExceededException",
    "SlowDown",
    "TransactionConflictException",
    "TransactionInProgressException",
    "InternalServerError",
    "InternalFailure",
    "InternalError",
    "ServiceUnavailable",
    "ServiceUnavailableException",
    "Unavailable",
];

/// Whether an error code means "try again later".
pub(crate) fn is_transient_code(code: &str) -> bool {
    TRANSIENT_CODES.contains(&code)
}

/// Classifies an SDK error: throttling, conflicts, 5xx, timeouts and lost
/// connections are transient; the rest (validation, size limits, access
/// denied, missing resources) are permanent and keep the service's reason.
pub(crate) fn classify<E>(operation: &'static str, error: SdkError<E, HttpResponse>) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    match &error {
        SdkError::ServiceError(context) => {
            let code = context.err().code().unwrap_or("Unknown").to_owned();
            let status = context.raw().status().as_u16();
            if is_transient_code(&code) || status >= 500 || status == 429 {
                return Error::transient(operation, error);
            }
            let message = context.err().message().unwrap_or_default().to_owned();
            Error::Permanent {
                operation,
                reason: format!("{code}: {message}"),
                source: Some(Box::new(error)),
            }
        }
        SdkError::ConstructionFailure(_) => Error::Permanent {
            operation,
            reason: "the request could not be built".into(),
            source: Some(Box::new(error)),
        },
        _ => Error::transient(operation, error),
    }
}

/// Builder errors are programming errors in the adapter: permanent.
pub(crate) fn build_error(what: &'static str, error: impl std::error::Error) -> Error {
    Error::permanent(what, error.to_string())
}

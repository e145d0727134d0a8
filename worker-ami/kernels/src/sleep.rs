//! `sleep`: waits `seconds`, for tests of the machinery around kernels.
//! Payload `{"seconds": 1.5}`, and optionally `"fail": "an error"` (a
//! permanent failure), `"fail_retryable": "an error"` (one that fails every
//! attempt, until the queue's delivery limit), `"data": ...` (carried and ignored, to test payloads
//! of any size) and `"result_bytes": n` (a result of that size).
//! It stops early when asked and checkpoints the time already slept.

use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{Value, json};

use crate::{Control, Kernel, KernelError, Outcome};

const TICK: Duration = Duration::from_millis(50);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SleepInput {
    seconds: f64,
    #[serde(default)]
    fail: Option<String>,
    #[serde(default)]
    fail_retryable: Option<String>,
    #[serde(default)]
    data: Option<Value>,
    #[serde(default)]
    result_bytes: usize,
}

/// The largest result a test may ask for.
const MAX_RESULT_BYTES: usize = 16 << 20;

#[derive(Debug, Clone, Copy)]
pub struct SleepKernel;

impl Kernel for SleepKernel {
    fn run(
        &self,
        payload: &Value,
        checkpoint: Option<&[u8]>,
        control: &Control,
    ) -> Result<Outcome, KernelError> {
        let input =
            SleepInput::deserialize(payload).map_err(|e| KernelError::Permanent(e.to_string()))?;
        if !(input.seconds.is_finite() && (0.0..=86_400.0).contains(&input.seconds)) {
            return Err(KernelError::Permanent(
                "seconds must be between 0 and 86400".into(),
            ));
        }
        if let Some(message) = input.fail {
            return Err(KernelError::Permanent(message));
        }
        if let Some(message) = input.fail_retryable {
            return Err(KernelError::Retryable(message));
        }
        if input.result_bytes > MAX_RESULT_BYTES {
            return Err(KernelError::Permanent(format!(
                "result_bytes is over {MAX_RESULT_BYTES}"
            )));
        }
        let already_slept = match checkpoint {
            Some(bytes) => std::str::from_utf8(bytes)
                .ok()
                .and_then(|s| s.parse::<f64>().ok())
                .ok_or_else(|| KernelError::Permanent("unreadable sleep checkpoint".into()))?,
            None => 0.0,
        };
        let remaining = Duration::from_secs_f64((input.seconds - already_slept).max(0.0));
        let started = Instant::now();
        while started.elapsed() < remaining {
            if control.should_stop() {
                let slept = already_slept + started.elapsed().as_secs_f64();
                return Ok(Outcome::Stopped {
                    checkpoint: Some(slept.to_string().into_bytes()),
                });
            }
            std::thread::sleep(TICK.min(remaining.saturating_sub(started.elapsed())));
        }
        let data_bytes = input.data.map_or(0, |data| data.to_string().len());
        Ok(Outcome::Done {
            result: json!({
                "slept_seconds": input.seconds,
                "data_bytes": data_bytes,
                "filler": "x".repeat(input.result_bytes),
            }),
            summary: format!("slept {:.1}s", input.seconds),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sleeps_and_reports() {
        let outcome = SleepKernel
            .run(&json!({"seconds": 0.01}), None, &Control::new())
            .expect("sleep runs");
        assert!(matches!(outcome, Outcome::Done { ref summary, .. } if summary == "slept 0.0s"));
    }

    #[test]
    fn stops_with_a_checkpoint_and_resumes_from_it() {
        let control = Control::new();
        control.request_stop();
        let Outcome::Stopped { checkpoint } = SleepKernel
            .run(&json!({"seconds": 5}), Some(b"4.99"), &control)
            .expect("stops")
        else {
            panic!("expected a stop");
        };
        let checkpoint = checkpoint.expect("a checkpoint");
        let slept: f64 = String::from_utf8(checkpoint)
            .expect("utf8")
            .parse()
            .expect("number");
        assert!(slept >= 4.99);
    }

    #[test]
    fn bad_input_is_permanent() {
        for payload in [
            json!({}),
            json!({"seconds": -1}),
            json!({"seconds": 1, "x": 1}),
        ] {
            let error = SleepKernel
                .run(&payload, None, &Control::new())
                .unwrap_err();
            assert!(matches!(error, KernelError::Permanent(_)), "{payload}");
        }
    }
}

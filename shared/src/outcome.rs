//! The outcome of a run as the API reports it.

use serde::{Deserialize, Serialize};

use crate::job::JobId;

/// How a run ended. Every outcome of the user's code is one of these; HTTP errors are only for
/// requests that could not be run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// Exited 0 with no uncaught exception.
    Success,
    /// An uncaught exception, or a non-zero exit status.
    Error,
    /// Stopped at its wall-clock or CPU-time limit.
    Timeout,
    /// Ran out of its memory limit.
    MemoryExceeded,
    /// Wrote more than the output cap on stdout or stderr.
    OutputLimitExceeded,
    /// Ended by a signal that is not one of the limits above.
    Killed,
    /// The service failed; never the user's code.
    InternalError,
    /// Cancelled with `DELETE /jobs/{id}` before it finished.
    Cancelled,
}

impl RunStatus {
    /// The name used on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Success => "success",
            RunStatus::Error => "error",
            RunStatus::Timeout => "timeout",
            RunStatus::MemoryExceeded => "memory_exceeded",
            RunStatus::OutputLimitExceeded => "output_limit_exceeded",
            RunStatus::Killed => "killed",
            RunStatus::InternalError => "internal_error",
            RunStatus::Cancelled => "cancelled",
        }
    }
}

/// An uncaught Python exception.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExceptionInfo {
    /// Qualified type name, e.g. `ZeroDivisionError` or `numpy.core._exceptions._ArrayMemoryError`.
    #[serde(rename = "type")]
    pub kind: String,
    pub message: String,
    /// The formatted traceback, limited to the user's frames.
    pub traceback: String,
}

/// The result of one run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunResult {
    pub id: JobId,
    pub status: RunStatus,
    /// Exit status when the process exited normally.
    pub exit_code: Option<i32>,
    /// Signal number when the process was ended by a signal.
    pub signal: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    pub exception: Option<ExceptionInfo>,
    pub duration_ms: u64,
    pub cpu_ms: u64,
    pub peak_memory_kb: u64,
    /// The isolation layers the run went through (none for an `internal_error`).
    #[serde(default)]
    pub layers: Vec<String>,
}

impl RunResult {
    /// The result of a job cancelled before it finished: whatever it had written is dropped.
    pub fn cancelled(id: JobId) -> Self {
        Self {
            status: RunStatus::Cancelled,
            stderr: String::new(),
            ..Self::internal_error(id, "")
        }
    }

    /// The result of a run the service could not carry out. The reason is logged by the caller;
    /// the client only learns that the service failed.
    pub fn internal_error(id: JobId, message: &str) -> Self {
        Self {
            id,
            status: RunStatus::InternalError,
            exit_code: None,
            signal: None,
            stdout: String::new(),
            stderr: message.to_owned(),
            stdout_truncated: false,
            stderr_truncated: false,
            exception: None,
            duration_ms: 0,
            cpu_ms: 0,
            peak_memory_kb: 0,
            layers: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_names_match_serde() {
        let all = [
            RunStatus::Success,
            RunStatus::Error,
            RunStatus::Timeout,
            RunStatus::MemoryExceeded,
            RunStatus::OutputLimitExceeded,
            RunStatus::Killed,
            RunStatus::InternalError,
            RunStatus::Cancelled,
        ];
        for s in all {
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
    }

    #[test]
    fn exception_kind_is_serialised_as_type() {
        let e = ExceptionInfo {
            kind: "ValueError".into(),
            message: "bad".into(),
            traceback: String::new(),
        };
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["type"], "ValueError");
    }
}

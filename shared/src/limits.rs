//! Run limits: the server's policy, and the concrete limits of one run.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::job::RunRequest;

const MIB: u64 = 1024 * 1024;

/// The limits one run gets, resolved from a request against the server's [`LimitPolicy`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunLimits {
    /// Wall-clock limit in milliseconds.
    pub timeout_ms: u64,
    /// Memory limit in MiB.
    pub memory_mb: u64,
    /// Bytes of standard output kept before the run is stopped.
    pub stdout_max_bytes: u64,
    /// Bytes of standard error kept before the run is stopped.
    pub stderr_max_bytes: u64,
}

impl RunLimits {
    /// The wall-clock limit.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    /// The memory limit in bytes.
    pub fn memory_bytes(&self) -> u64 {
        self.memory_mb * MIB
    }
}

/// The server's limits: defaults, and the bounds a request may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct LimitPolicy {
    pub default_timeout_ms: u64,
    pub max_timeout_ms: u64,
    pub default_memory_mb: u64,
    pub min_memory_mb: u64,
    pub max_memory_mb: u64,
    pub max_output_bytes: u64,
    pub max_code_bytes: u64,
    pub max_stdin_bytes: u64,
}

impl Default for LimitPolicy {
    fn default() -> Self {
        Self {
            default_timeout_ms: 10_000,
            max_timeout_ms: 300_000,
            default_memory_mb: 512,
            min_memory_mb: 64,
            max_memory_mb: 2048,
            max_output_bytes: MIB,
            max_code_bytes: MIB,
            max_stdin_bytes: MIB,
        }
    }
}

/// A request that asks for something the policy does not allow.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum LimitError {
    #[error("code is {size} bytes, more than the limit of {max} bytes")]
    CodeTooLarge { size: u64, max: u64 },
    #[error("stdin is {size} bytes, more than the limit of {max} bytes")]
    StdinTooLarge { size: u64, max: u64 },
    #[error("timeout_ms must be between 1 and {max}, got {got}")]
    TimeoutOutOfRange { got: u64, max: u64 },
    #[error("memory_mb must be between {min} and {max}, got {got}")]
    MemoryOutOfRange { got: u64, min: u64, max: u64 },
}

impl LimitError {
    /// The request field the error is about.
    pub fn field(&self) -> &'static str {
        match self {
            LimitError::CodeTooLarge { .. } => "code",
            LimitError::StdinTooLarge { .. } => "stdin",
            LimitError::TimeoutOutOfRange { .. } => "timeout_ms",
            LimitError::MemoryOutOfRange { .. } => "memory_mb",
        }
    }
}

impl LimitPolicy {
    /// Checks the policy itself, so a misconfigured server refuses to start.
    pub fn validate(&self) -> Result<(), String> {
        if self.default_timeout_ms == 0 || self.default_timeout_ms > self.max_timeout_ms {
            return Err(format!(
                "default timeout {} ms must be between 1 and the maximum {} ms",
                self.default_timeout_ms, self.max_timeout_ms
            ));
        }
        if self.min_memory_mb == 0
            || self.min_memory_mb > self.default_memory_mb
            || self.default_memory_mb > self.max_memory_mb
        {
            return Err(format!(
                "memory limits must satisfy 0 < min ({}) <= default ({}) <= max ({})",
                self.min_memory_mb, self.default_memory_mb, self.max_memory_mb
            ));
        }
        if self.max_output_bytes == 0 || self.max_code_bytes == 0 {
            return Err("output and code limits must be positive".into());
        }
        Ok(())
    }

    /// Resolves a request's limits, or says which field is out of range.
    pub fn resolve(&self, request: &RunRequest) -> Result<RunLimits, LimitError> {
        let code_size = request.code.len() as u64;
        if code_size > self.max_code_bytes {
            return Err(LimitError::CodeTooLarge {
                size: code_size,
                max: self.max_code_bytes,
            });
        }
        let stdin_size = request.stdin.as_ref().map_or(0, |s| s.len() as u64);
        if stdin_size > self.max_stdin_bytes {
            return Err(LimitError::StdinTooLarge {
                size: stdin_size,
                max: self.max_stdin_bytes,
            });
        }
        let timeout_ms = request.timeout_ms.unwrap_or(self.default_timeout_ms);
        if timeout_ms == 0 || timeout_ms > self.max_timeout_ms {
            return Err(LimitError::TimeoutOutOfRange {
                got: timeout_ms,
                max: self.max_timeout_ms,
            });
        }
        let memory_mb = request.memory_mb.unwrap_or(self.default_memory_mb);
        if memory_mb < self.min_memory_mb || memory_mb > self.max_memory_mb {
            return Err(LimitError::MemoryOutOfRange {
                got: memory_mb,
                min: self.min_memory_mb,
                max: self.max_memory_mb,
            });
        }
        Ok(RunLimits {
            timeout_ms,
            memory_mb,
            stdout_max_bytes: self.max_output_bytes,
            stderr_max_bytes: self.max_output_bytes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(timeout_ms: Option<u64>, memory_mb: Option<u64>) -> RunRequest {
        RunRequest {
            code: "pass".into(),
            stdin: None,
            timeout_ms,
            memory_mb,
        }
    }

    #[test]
    fn defaults_apply_when_the_request_is_silent() {
        let limits = LimitPolicy::default()
            .resolve(&request(None, None))
            .unwrap();
        assert_eq!(limits.timeout_ms, 10_000);
        assert_eq!(limits.memory_mb, 512);
        assert_eq!(limits.stdout_max_bytes, MIB);
        assert_eq!(limits.stderr_max_bytes, MIB);
    }

    #[test]
    fn out_of_range_values_name_their_field() {
        let policy = LimitPolicy::default();
        let cases = [
            (request(Some(0), None), "timeout_ms"),
            (request(Some(300_001), None), "timeout_ms"),
            (request(None, Some(63)), "memory_mb"),
            (request(None, Some(2049)), "memory_mb"),
        ];
        for (req, field) in cases {
            assert_eq!(policy.resolve(&req).unwrap_err().field(), field, "{req:?}");
        }
        let edges = [
            request(Some(1), Some(64)),
            request(Some(300_000), Some(2048)),
        ];
        for req in edges {
            assert!(policy.resolve(&req).is_ok(), "{req:?}");
        }
    }

    #[test]
    fn oversized_code_and_stdin_are_refused() {
        let policy = LimitPolicy::default();
        let mut req = request(None, None);
        req.code = "x".repeat(MIB as usize + 1);
        assert_eq!(policy.resolve(&req).unwrap_err().field(), "code");
        req.code = "x".repeat(MIB as usize);
        req.stdin = Some("y".repeat(MIB as usize + 1));
        assert_eq!(policy.resolve(&req).unwrap_err().field(), "stdin");
    }

    #[test]
    fn inconsistent_policies_are_rejected() {
        let mut policy = LimitPolicy::default();
        assert!(policy.validate().is_ok());
        policy.default_timeout_ms = policy.max_timeout_ms + 1;
        assert!(policy.validate().is_err());
        let policy = LimitPolicy {
            min_memory_mb: 1024,
            ..LimitPolicy::default()
        };
        assert!(policy.validate().is_err());
    }
}

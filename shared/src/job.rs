//! Jobs: the request body a caller sends, and the job that travels to a worker.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::limits::RunLimits;
use crate::outcome::RunResult;

/// Identifier of one job, a random UUID chosen by the API when the job is accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JobId(Uuid);

impl JobId {
    /// A fresh random id.
    pub fn new() -> Self {
        Self(Uuid::new_v4())
    }
}

impl Default for JobId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.as_hyphenated().fmt(f)
    }
}

impl FromStr for JobId {
    type Err = uuid::Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s).map(Self)
    }
}

/// The body of `POST /run` and `POST /jobs`, exactly as the caller sent it.
///
/// Unknown fields are rejected so that a typo (`timeout` for `timeout_ms`) is an error
/// instead of a silently ignored setting.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunRequest {
    /// Python source to run.
    pub code: String,
    /// Bytes fed to the program's standard input; none means `/dev/null`.
    #[serde(default)]
    pub stdin: Option<String>,
    /// Wall-clock limit asked for, in milliseconds.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Memory limit asked for, in MiB.
    #[serde(default)]
    pub memory_mb: Option<u64>,
}

/// A job as it travels from the API to a worker: the code and its resolved limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub id: JobId,
    pub code: String,
    #[serde(default)]
    pub stdin: Option<String>,
    pub limits: RunLimits,
    /// The name of the API key that submitted it (none when the service runs open), for the
    /// run's log line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caller: Option<String>,
    /// The quota period the api accepted it in, which its usage counts in (with a caller).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub period: Option<crate::ledger::Period>,
}

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Running,
    Done,
}

impl JobState {
    /// The name used on the wire and in the store.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Done => "done",
        }
    }

    /// Parses the store's representation.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "queued" => Some(JobState::Queued),
            "running" => Some(JobState::Running),
            "done" => Some(JobState::Done),
            _ => None,
        }
    }
}

/// What `GET /jobs/{id}` returns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobView {
    pub id: JobId,
    pub status: JobState,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub result: Option<RunResult>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_id_round_trips_through_text() {
        let id = JobId::new();
        assert_eq!(id.to_string().parse::<JobId>().unwrap(), id);
        assert!("not-a-uuid".parse::<JobId>().is_err());
    }

    #[test]
    fn request_rejects_unknown_fields() {
        let err = serde_json::from_str::<RunRequest>(r#"{"code":"1","timeout":5}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field `timeout`"), "{err}");
    }

    #[test]
    fn job_state_names_round_trip() {
        for s in [JobState::Queued, JobState::Running, JobState::Done] {
            assert_eq!(JobState::parse(s.as_str()), Some(s));
        }
        assert_eq!(JobState::parse("lost"), None);
    }
}

//! Turns what was observed of a finished run into its [`RunStatus`].

use pyrunner_shared::{ExceptionInfo, RunStatus};
use serde::Deserialize;

use crate::sandbox::sys::Exit;

/// What the harness reports about an uncaught exception (descriptor 4).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct HarnessReport {
    #[serde(rename = "type")]
    pub kind: String,
    pub message: String,
    pub traceback: String,
    /// The exception is a `MemoryError` or a subclass of it.
    #[serde(default)]
    pub memory: bool,
}

impl HarnessReport {
    /// Parses the report; anything malformed (user code can write to the descriptor too) is
    /// ignored rather than trusted.
    pub fn parse(bytes: &[u8]) -> Option<Self> {
        if bytes.is_empty() {
            return None;
        }
        serde_json::from_slice(bytes).ok()
    }

    pub fn into_exception(self) -> ExceptionInfo {
        ExceptionInfo {
            kind: self.kind,
            message: self.message,
            traceback: self.traceback,
        }
    }
}

/// Everything the status depends on.
#[derive(Debug, Clone)]
pub struct Observation<'a> {
    pub exit: Exit,
    /// The worker killed the run at its wall-clock deadline.
    pub timed_out: bool,
    /// The worker killed the run because it wrote past an output cap.
    pub output_exceeded: bool,
    /// The kernel killed a process of the run at the run's memory limit (cgroup OOM).
    pub oom_killed: bool,
    pub cpu_ms: u64,
    /// The soft CPU-time rlimit, in milliseconds.
    pub cpu_limit_ms: u64,
    pub report: Option<&'a HarnessReport>,
}

/// The status of a run. What the worker did to the run decides first (it knows why it killed
/// it), then what the kernel did (CPU limit), then what the program reported.
pub fn status(o: &Observation<'_>) -> RunStatus {
    if o.output_exceeded {
        return RunStatus::OutputLimitExceeded;
    }
    if o.timed_out {
        return RunStatus::Timeout;
    }
    if o.oom_killed {
        return RunStatus::MemoryExceeded;
    }
    match o.exit {
        Exit::Signal(libc::SIGXCPU) => return RunStatus::Timeout,
        Exit::Signal(libc::SIGKILL) if o.cpu_ms >= o.cpu_limit_ms => return RunStatus::Timeout,
        _ => {}
    }
    if o.report.is_some_and(|r| r.memory) {
        return RunStatus::MemoryExceeded;
    }
    match o.exit {
        Exit::Signal(_) => RunStatus::Killed,
        Exit::Code(0) if o.report.is_none() => RunStatus::Success,
        Exit::Code(_) => RunStatus::Error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(memory: bool) -> HarnessReport {
        HarnessReport {
            kind: if memory { "MemoryError" } else { "ValueError" }.into(),
            message: String::new(),
            traceback: String::new(),
            memory,
        }
    }

    #[test]
    fn statuses_follow_the_documented_precedence() {
        let mem = report(true);
        let val = report(false);
        let base = Observation {
            exit: Exit::Code(0),
            timed_out: false,
            output_exceeded: false,
            oom_killed: false,
            cpu_ms: 10,
            cpu_limit_ms: 2000,
            report: None,
        };
        let cases: Vec<(Observation, RunStatus)> = vec![
            (base.clone(), RunStatus::Success),
            (
                Observation {
                    exit: Exit::Code(3),
                    ..base.clone()
                },
                RunStatus::Error,
            ),
            (
                Observation {
                    exit: Exit::Code(1),
                    report: Some(&val),
                    ..base.clone()
                },
                RunStatus::Error,
            ),
            (
                Observation {
                    exit: Exit::Code(1),
                    report: Some(&mem),
                    ..base.clone()
                },
                RunStatus::MemoryExceeded,
            ),
            (
                Observation {
                    exit: Exit::Signal(9),
                    timed_out: true,
                    ..base.clone()
                },
                RunStatus::Timeout,
            ),
            (
                Observation {
                    exit: Exit::Signal(libc::SIGXCPU),
                    ..base.clone()
                },
                RunStatus::Timeout,
            ),
            (
                Observation {
                    exit: Exit::Signal(9),
                    cpu_ms: 2000,
                    ..base.clone()
                },
                RunStatus::Timeout,
            ),
            (
                Observation {
                    exit: Exit::Signal(9),
                    ..base.clone()
                },
                RunStatus::Killed,
            ),
            (
                Observation {
                    exit: Exit::Signal(11),
                    ..base.clone()
                },
                RunStatus::Killed,
            ),
            (
                Observation {
                    exit: Exit::Signal(9),
                    output_exceeded: true,
                    timed_out: true,
                    ..base.clone()
                },
                RunStatus::OutputLimitExceeded,
            ),
        ];
        for (obs, want) in cases {
            assert_eq!(status(&obs), want, "{obs:?}");
        }
    }

    #[test]
    fn malformed_reports_are_ignored() {
        assert_eq!(HarnessReport::parse(b""), None);
        assert_eq!(HarnessReport::parse(b"{\"type\": 1}"), None);
        let r = HarnessReport::parse(br#"{"type":"X","message":"m","traceback":"t"}"#).unwrap();
        assert!(!r.memory);
    }
}

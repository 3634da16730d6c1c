//! Data-driven run cases: a snippet, its limits, the status it must end with, and a check of
//! the rest of the result.

use pyrunner_shared::{RunResult, RunStatus};
use pyrunner_worker::Executor;

use crate::{job, limits};

/// One case of a catalogue.
pub struct Case {
    pub name: &'static str,
    pub code: &'static str,
    pub stdin: Option<&'static str>,
    pub timeout_ms: Option<u64>,
    pub memory_mb: Option<u64>,
    pub status: RunStatus,
    pub check: fn(&RunResult),
}

/// A case with default limits and no stdin.
pub const fn case(
    name: &'static str,
    code: &'static str,
    status: RunStatus,
    check: fn(&RunResult),
) -> Case {
    Case {
        name,
        code,
        stdin: None,
        timeout_ms: None,
        memory_mb: None,
        status,
        check,
    }
}

/// A check that only the status matters.
pub fn no_check(_: &RunResult) {}

/// Checks one result against its case; the error says what differed.
pub fn verify(case: &Case, result: &RunResult) -> Result<(), String> {
    let outcome = std::panic::catch_unwind(|| {
        assert_eq!(result.status, case.status, "status of {result:#?}");
        (case.check)(result);
    });
    outcome.map_err(|panic| {
        let msg = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        format!("{}: {msg}", case.name)
    })
}

/// Runs every case through `executor`, `parallel` at a time, and returns the failures.
pub async fn run_all(executor: &Executor, cases: Vec<Case>) -> Vec<String> {
    let mut failures = Vec::new();
    for case in cases {
        let job = job(
            case.code,
            case.stdin,
            limits(case.timeout_ms, case.memory_mb),
        );
        let result = executor.run(&job).await;
        if result.id != job.id {
            failures.push(format!("{}: result has another job's id", case.name));
        }
        if let Err(e) = verify(&case, &result) {
            failures.push(e);
        }
    }
    failures
}

#[cfg(test)]
mod tests {
    use super::*;
    use pyrunner_shared::JobId;

    #[test]
    fn verify_reports_a_wrong_status_and_a_failed_check() {
        let mut result = RunResult::internal_error(JobId::new(), "");
        result.status = RunStatus::Success;
        result.stdout = "1\n".into();
        let good = case("good", "", RunStatus::Success, |r| {
            assert_eq!(r.stdout, "1\n")
        });
        assert!(verify(&good, &result).is_ok());
        let wrong_status = case("status", "", RunStatus::Error, no_check);
        assert!(verify(&wrong_status, &result)
            .unwrap_err()
            .starts_with("status"));
        let wrong_output = case("output", "", RunStatus::Success, |r| {
            assert_eq!(r.stdout, "2\n")
        });
        assert!(verify(&wrong_output, &result)
            .unwrap_err()
            .starts_with("output"));
    }
}

//! Helpers shared by the integration tests: the prepared runtime, executors, and running the
//! real api and worker binaries.

pub mod catalogue;
pub mod fleet;
pub mod http;

use std::path::PathBuf;

use pyrunner_shared::{Job, JobId, LimitPolicy, RunLimits, RunRequest};
use pyrunner_worker::config::ExecutorArgs;
use pyrunner_worker::Executor;

/// The runtime the test command prepared (scripts/test exports its location).
pub fn runtime_dir() -> PathBuf {
    std::env::var_os("PYRUNNER_RUNTIME_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/pyrunner/runtime"))
}

/// Executor settings for tests: the prepared runtime and `concurrency` slots.
pub fn executor_args(concurrency: usize) -> ExecutorArgs {
    ExecutorArgs {
        runtime_dir: runtime_dir(),
        work_dir: std::env::temp_dir(),
        concurrency: Some(concurrency),
        sandbox_uid_base: 64_000,
        slot_lock_dir: PathBuf::from("/run/pyrunner/slots"),
        max_processes: 64,
        max_file_mb: 64,
        max_open_files: 256,
    }
}

/// A real executor; keep the returned guard alive while it is used.
pub fn executor(concurrency: usize) -> (Executor, tempfile::TempDir) {
    executor_args(concurrency)
        .build()
        .expect("the runtime is prepared: run scripts/prepare-runtime")
}

/// Limits resolved from the default policy, with optional overrides.
pub fn limits(timeout_ms: Option<u64>, memory_mb: Option<u64>) -> RunLimits {
    LimitPolicy::default()
        .resolve(&RunRequest {
            code: String::new(),
            stdin: None,
            timeout_ms,
            memory_mb,
        })
        .expect("test limits are within the default policy")
}

/// A job for `code` with the given limits and stdin.
pub fn job(code: &str, stdin: Option<&str>, limits: RunLimits) -> Job {
    Job {
        id: JobId::new(),
        code: code.to_owned(),
        stdin: stdin.map(str::to_owned),
        limits,
    }
}

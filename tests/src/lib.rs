//! Helpers shared by the integration tests: the prepared runtime, executors, and running the
//! real api and worker binaries.

pub mod callers;
pub mod catalogue;
pub mod checks;
pub mod cri;
pub mod fleet;
pub mod http;
pub mod kubelet;
pub mod outage;
pub mod procfs;

use std::path::PathBuf;

use clap::Parser;
use pyrunner_shared::{Job, JobId, LimitPolicy, RunLimits, RunRequest};
use pyrunner_worker::config::ExecutorArgs;
use pyrunner_worker::Executor;

/// Executor settings for tests: the service's own defaults (and `PYRUNNER_*` variables, as in
/// production; scripts/test exports the runtime's location), with `concurrency` slots.
pub fn executor_args(concurrency: usize) -> ExecutorArgs {
    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        executor: ExecutorArgs,
    }
    let concurrency = concurrency.to_string();
    let mut args = Flags::try_parse_from(["pyrunner-tests", "--concurrency", &concurrency])
        .expect("the executor's defaults parse")
        .executor;
    // Test executables live in deps/, not beside the zygote.
    args.zygote_bin
        .get_or_insert_with(|| fleet::binary("pyrunner-zygote"));
    args
}

/// The prepared runtime the tests use.
pub fn runtime_dir() -> PathBuf {
    executor_args(1).runtime_dir
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
        caller: None,
        period: None,
    }
}

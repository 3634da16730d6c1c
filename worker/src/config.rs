//! Configuration of the worker binary, and of the executor that embedded mode shares.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser};
use thiserror::Error;

use crate::executor::Executor;
use crate::runtime::{PythonRuntime, RuntimeError};
use crate::sandbox::{self, Sandbox, SandboxError, SandboxSettings};
use crate::slots::{SlotError, SlotPool};

/// How runs are executed: runtime, sandbox settings and concurrency.
#[derive(Debug, Clone, Args)]
pub struct ExecutorArgs {
    /// Prepared Python runtime (made by scripts/prepare-runtime).
    #[arg(
        long,
        env = "PYRUNNER_RUNTIME_DIR",
        default_value = "/var/lib/pyrunner/runtime"
    )]
    pub runtime_dir: PathBuf,
    /// Directory under which each run gets a private working directory.
    #[arg(long, env = "PYRUNNER_WORK_DIR", default_value_os_t = std::env::temp_dir())]
    pub work_dir: PathBuf,
    /// Runs carried out at once (default: the number of cores).
    #[arg(long, env = "PYRUNNER_CONCURRENCY")]
    pub concurrency: Option<usize>,
    /// First uid of the run slots when the worker runs as root; slot i runs as base + i.
    #[arg(long, env = "PYRUNNER_SANDBOX_UID_BASE", default_value_t = 64_000)]
    pub sandbox_uid_base: u32,
    /// Where slot uids are claimed with lock files, host-wide (used when running as root).
    #[arg(
        long,
        env = "PYRUNNER_SLOT_LOCK_DIR",
        default_value = "/run/pyrunner/slots"
    )]
    pub slot_lock_dir: PathBuf,
    /// Most processes and threads one run may have.
    #[arg(long, env = "PYRUNNER_MAX_PROCESSES", default_value_t = 64)]
    pub max_processes: u64,
    /// Largest file one run may write, in MiB.
    #[arg(long, env = "PYRUNNER_MAX_FILE_MB", default_value_t = 64)]
    pub max_file_mb: u64,
    /// Most open descriptors of one run's process.
    #[arg(long, env = "PYRUNNER_MAX_OPEN_FILES", default_value_t = 256)]
    pub max_open_files: u64,
}

/// The executor cannot be set up.
#[derive(Debug, Error)]
pub enum SetupError {
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error(transparent)]
    Slots(#[from] SlotError),
    #[error("cannot create the work directory under {path}: {source}")]
    WorkDir {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl ExecutorArgs {
    /// Concurrency with its default applied.
    pub fn concurrency(&self) -> usize {
        self.concurrency.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        })
    }

    /// Builds the executor and its work root, which is deleted when the returned guard drops.
    pub fn build(&self) -> Result<(Executor, tempfile::TempDir), SetupError> {
        let runtime = PythonRuntime::open(&self.runtime_dir)?;
        let sandbox = Sandbox::new(SandboxSettings {
            max_file_bytes: self.max_file_mb * 1024 * 1024,
            max_open_files: self.max_open_files,
            max_processes: self.max_processes,
        })?;
        let slots = if sandbox::sys::is_root() {
            SlotPool::with_uids(
                self.concurrency(),
                self.sandbox_uid_base,
                &self.slot_lock_dir,
                Some(self.max_processes),
            )?
        } else {
            SlotPool::new(self.concurrency())
        };
        let work_err = |source| SetupError::WorkDir {
            path: self.work_dir.clone(),
            source,
        };
        // A fresh directory with a random name: nobody can have prepared it in advance.
        let root = tempfile::Builder::new()
            .prefix("pyrunner-")
            .tempdir_in(&self.work_dir)
            .map_err(work_err)?;
        // Traversable, not listable, by the sandbox uids: each run only reaches its own dir.
        std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o711))
            .map_err(work_err)?;
        let executor = Executor::new(sandbox, runtime, root.path(), slots);
        Ok((executor, root))
    }
}

/// Configuration of a fleet worker.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "pyrunner-worker",
    version,
    about = "PyRunner worker: runs queued jobs in sandboxed Python processes"
)]
pub struct WorkerConfig {
    /// RabbitMQ URL.
    #[arg(long, env = "AMQP_URL")]
    pub amqp_url: String,
    /// Redis URL.
    #[arg(long, env = "REDIS_URL")]
    pub redis_url: String,
    /// Name of the job queue.
    #[arg(long, env = "PYRUNNER_QUEUE", default_value = pyrunner_shared::queue::DEFAULT_QUEUE)]
    pub queue: String,
    /// How long results stay retrievable, in seconds.
    #[arg(long, env = "PYRUNNER_RESULT_TTL_SECS", default_value_t = 3600)]
    pub result_ttl_secs: u64,
    #[command(flatten)]
    pub executor: ExecutorArgs,
}

impl WorkerConfig {
    /// The result TTL.
    pub fn result_ttl(&self) -> Duration {
        Duration::from_secs(self.result_ttl_secs.max(1))
    }
}

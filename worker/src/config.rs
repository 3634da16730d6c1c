//! Configuration of the worker binary, and of the executor that embedded mode shares.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser};
use pyrunner_shared::isolation;
use thiserror::Error;

use crate::executor::Executor;
use crate::runtime::{PythonRuntime, RuntimeError};
use crate::sandbox::cgroup::CgroupLimits;
use crate::sandbox::{self, idmap, Sandbox, SandboxError, SandboxSettings};
use crate::slots::{SlotError, SlotPool, UID_RANGE};
use crate::warm_pool::{WarmError, WarmPool, WarmPoolSettings};
use crate::zygote::ZygoteSettings;

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
    /// Directory under which each run gets a private working directory, where runs get no
    /// mount namespace (with one, each works in a tmpfs of its own at /work).
    #[arg(long, env = "PYRUNNER_WORK_DIR", default_value_os_t = std::env::temp_dir())]
    pub work_dir: PathBuf,
    /// Runs carried out at once (default: the number of cores).
    #[arg(long, env = "PYRUNNER_CONCURRENCY")]
    pub concurrency: Option<usize>,
    /// First uid of the run slots; slot uids are claimed from it upwards. Without real root
    /// they are ids of the user's subordinate range, counted from 1 (where the range is smaller
    /// than the base, slots take its first ids).
    #[arg(long, env = "PYRUNNER_SANDBOX_UID_BASE", default_value_t = 64_000)]
    pub sandbox_uid_base: u32,
    /// Where slot uids are claimed with lock files, shared by the workers of one host (default:
    /// /run/pyrunner/slots as root; without real root, pyrunner-UID-slots in the work dir,
    /// which all workers of that user must share).
    #[arg(long, env = "PYRUNNER_SLOT_LOCK_DIR")]
    pub slot_lock_dir: Option<PathBuf>,
    /// Most processes and threads one run may have.
    #[arg(long, env = "PYRUNNER_MAX_PROCESSES", default_value_t = 64)]
    pub max_processes: u64,
    /// Most cores one run's processes and threads may use together (a cgroup CPU quota per
    /// slot, where the host has the cpu controller); 0 for none.
    #[arg(long, env = "PYRUNNER_CPUS_PER_RUN", default_value_t = 1.0)]
    pub cpus_per_run: f64,
    /// Largest file one run may write, in MiB.
    #[arg(long, env = "PYRUNNER_MAX_FILE_MB", default_value_t = 64)]
    pub max_file_mb: u64,
    /// Size of each private tmpfs of a run (its working directory, /dev/shm), in MiB;
    /// they count against the run's memory limit too.
    #[arg(long, env = "PYRUNNER_MAX_WORKDIR_MB", default_value_t = 256)]
    pub max_workdir_mb: u64,
    /// Most open descriptors of one run's process.
    #[arg(long, env = "PYRUNNER_MAX_OPEN_FILES", default_value_t = 256)]
    pub max_open_files: u64,
    /// How runs get their interpreter: `zygote` (a warm child forked from a preloaded
    /// interpreter), `fresh` (a new interpreter per run), or `auto` (zygote, falling back to
    /// fresh where the zygote cannot start).
    #[arg(long, env = "PYRUNNER_EXECUTOR", value_enum, default_value_t = ExecutorKind::Auto)]
    pub executor: ExecutorKind,
    /// Modules the zygote imports once, so that runs import them for free (comma-separated).
    #[arg(
        long,
        env = "PYRUNNER_PRELOAD",
        value_delimiter = ',',
        default_value = "numpy,numpy.random,sympy"
    )]
    pub preload: Vec<String>,
    /// Warm children kept ready, each in a slot (a uid and cgroups) of its own (default: four
    /// per concurrent run). More than the concurrency, so that a slot's next child can get
    /// ready while other slots serve.
    #[arg(long, env = "PYRUNNER_WARM_CHILDREN")]
    pub warm_children: Option<usize>,
    /// The zygote executable (default: pyrunner-zygote beside this program).
    #[arg(long, env = "PYRUNNER_ZYGOTE_BIN")]
    pub zygote_bin: Option<PathBuf>,
    /// A zygote is replaced after forking this many children, renewing the hash secret and
    /// address layout its children share.
    #[arg(long, env = "PYRUNNER_ZYGOTE_MAX_RUNS", default_value_t = 10_000)]
    pub zygote_max_runs: u64,
    /// A zygote is replaced after this many seconds.
    #[arg(long, env = "PYRUNNER_ZYGOTE_MAX_AGE_SECS", default_value_t = 600)]
    pub zygote_max_age_secs: u64,
    /// Isolation layers runs must get: without any of them the worker (or the embedded api)
    /// refuses to start (comma-separated; `GET /isolation` lists the names). The default holds
    /// on any Linux host; a deployment adds what its hosts are set up for, such as
    /// `landlock,network_namespace,pid_namespace,uid_per_slot,cgroup_memory,cgroup_pids`.
    #[arg(
        long,
        env = "PYRUNNER_REQUIRE_LAYERS",
        value_delimiter = ',',
        value_parser = parse_layer,
        default_value = "rlimits,process_group,no_new_privs,seccomp,empty_env"
    )]
    pub require_layers: Vec<String>,
}

/// A known isolation layer name.
fn parse_layer(name: &str) -> Result<String, String> {
    let name = name.trim();
    if isolation::is_layer(name) {
        Ok(name.to_owned())
    } else {
        let known: Vec<_> = isolation::LAYERS.iter().map(|(n, _)| *n).collect();
        Err(format!(
            "unknown layer {name:?}; known: {}",
            known.join(", ")
        ))
    }
}

/// How runs get their interpreter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExecutorKind {
    /// The zygote where it can start, else a fresh interpreter per run.
    Auto,
    /// Warm children of a zygote; refuse to start without one.
    Zygote,
    /// A fresh interpreter per run.
    Fresh,
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
    #[error("the warm pool cannot start: {0}")]
    Warm(#[from] WarmError),
    #[error("cannot create the work directory under {path}: {source}")]
    WorkDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("runs would lack required isolation layers (PYRUNNER_REQUIRE_LAYERS): {0}")]
    Isolation(String),
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
        let settings = SandboxSettings {
            max_file_bytes: self.max_file_mb * 1024 * 1024,
            max_open_files: self.max_open_files,
            max_processes: self.max_processes,
            max_workdir_bytes: self.max_workdir_mb * 1024 * 1024,
        };
        let sandbox = Sandbox::new(settings.clone(), runtime.dir())?;
        let slot_count = match self.executor {
            ExecutorKind::Fresh => self.concurrency(),
            ExecutorKind::Auto | ExecutorKind::Zygote => self
                .warm_children
                .unwrap_or(4 * self.concurrency())
                .max(self.concurrency()),
        };
        let base = self.sandbox_uid_base;
        let limits = CgroupLimits {
            max_processes: self.max_processes,
            cpus: (self.cpus_per_run > 0.0).then_some(self.cpus_per_run),
        };
        let lock_dir = self.slot_lock_dir();
        let slots = if sandbox::sys::is_host_root() {
            let uids = base..base.saturating_add(UID_RANGE);
            SlotPool::with_uids(slot_count, uids, &lock_dir, Some(limits))?
        } else if sandbox::sys::is_root() {
            // Root of a user namespace of its own: ids of a subordinate range, if it maps one,
            // and cgroups where a cgroup v2 group is delegated to its user, with ids or without.
            match idmap::own_slot_ids(base, UID_RANGE) {
                Some(uids) => SlotPool::with_uids(slot_count, uids, &lock_dir, Some(limits))?,
                None => SlotPool::without_uids(slot_count, 0..UID_RANGE, &lock_dir, limits)?,
            }
        } else {
            SlotPool::new(slot_count)
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
        let executor = match self.executor {
            ExecutorKind::Fresh => Executor::fresh(sandbox, runtime, root.path(), slots),
            ExecutorKind::Auto | ExecutorKind::Zygote => {
                let pool = WarmPool::new(
                    WarmPoolSettings {
                        zygote: ZygoteSettings {
                            binary: self.zygote_binary(),
                            preload: self.preload.clone(),
                            netns: sandbox.netns().cloned(),
                        },
                        recycle_after_runs: self.zygote_max_runs.max(1),
                        recycle_after: Duration::from_secs(self.zygote_max_age_secs.max(1)),
                        landlock: sandbox.landlock().cloned(),
                        private_namespaces: sandbox.private_namespaces(),
                        private_mounts: sandbox
                            .private_mounts()
                            .map(|(view, size)| (view.clone(), size)),
                        pid_namespace: sandbox.pid_namespaces().is_some(),
                        user_namespace: sandbox.user_namespaces(),
                    },
                    settings,
                    runtime.clone(),
                    Arc::from(root.path()),
                    slots.size(),
                );
                Executor::warm(
                    sandbox,
                    runtime,
                    root.path(),
                    slots,
                    self.concurrency(),
                    pool,
                )
            }
        };
        Ok((executor, root))
    }

    /// Builds the executor and gets it ready to serve (see [`Executor::start`]): with `auto`, a
    /// zygote that cannot start leaves a fresh executor.
    pub async fn start(&self) -> Result<(Executor, tempfile::TempDir), SetupError> {
        let (executor, root) = self.build()?;
        let executor = executor.start(self.executor == ExecutorKind::Auto).await?;
        let missing = isolation::missing(&executor.isolation(), &self.require_layers);
        if !missing.is_empty() {
            let list: Vec<_> = missing
                .iter()
                .map(|(name, why)| format!("{name} ({why})"))
                .collect();
            return Err(SetupError::Isolation(list.join("; ")));
        }
        Ok((executor, root))
    }

    /// Where slot uids are claimed: as configured, else by who the worker is on the host.
    pub fn slot_lock_dir(&self) -> PathBuf {
        match &self.slot_lock_dir {
            Some(dir) => dir.clone(),
            None if sandbox::sys::is_host_root() => PathBuf::from("/run/pyrunner/slots"),
            None => self
                .work_dir
                .join(format!("pyrunner-{}-slots", idmap::host_uid())),
        }
    }

    /// The zygote executable: as configured, else beside the running program.
    pub fn zygote_binary(&self) -> PathBuf {
        self.zygote_bin.clone().unwrap_or_else(|| {
            std::env::current_exe()
                .ok()
                .and_then(|exe| exe.parent().map(|dir| dir.join("pyrunner-zygote")))
                .unwrap_or_else(|| PathBuf::from("pyrunner-zygote"))
        })
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
    #[command(flatten)]
    pub queue: pyrunner_shared::queue::QueueSettings,
    /// How long results stay retrievable, in seconds.
    #[arg(long, env = "PYRUNNER_RESULT_TTL_SECS", default_value_t = 3600)]
    pub result_ttl_secs: u64,
    /// On SIGTERM the worker stops consuming and lets its runs finish for this long, in seconds;
    /// then it stops those left and requeues their jobs for another worker.
    #[arg(long, env = "PYRUNNER_SHUTDOWN_GRACE_SECS", default_value_t = 25)]
    pub shutdown_grace_secs: u64,
    #[command(flatten)]
    pub executor: ExecutorArgs,
}

impl WorkerConfig {
    /// How long runs may finish after SIGTERM.
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }

    /// The result TTL.
    pub fn result_ttl(&self) -> Duration {
        Duration::from_secs(self.result_ttl_secs.max(1))
    }
}

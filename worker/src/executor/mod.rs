//! Carries out runs: a private working directory, a sandboxed Python process fed with the code
//! and stdin, output read up to its caps, the wall-clock deadline, and the final result.
//!
//! Two ways to get the process, chosen by configuration:
//! - [`fresh`]: a new interpreter per run (`python -I`), which pays for the interpreter start and
//!   every import. The baseline of the benchmark, and the fallback where the zygote cannot run.
//! - [`warm`]: a child of the zygote, forked ahead of time with the preload set imported and
//!   already inside its sandbox, taken from the [`WarmPool`](crate::warm_pool::WarmPool).

mod capture;
mod fresh;
mod warm;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use pyrunner_shared::{Job, JobId, RunLimits, RunResult, RunStatus};
use thiserror::Error;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use pyrunner_shared::isolation::{self, IsolationReport, LayerStatus};

use crate::classify::{self, HarnessReport, Observation};
use crate::runtime::PythonRuntime;
use crate::sandbox::{cgroup, rlimits, sys, Sandbox};
use crate::slots::{Slot, SlotPool};
use crate::warm_pool::{WarmError, WarmPool};

/// The Python harness every run executes in (see its opening comment).
pub const HARNESS: &str = include_str!("../harness.py");
/// Most bytes of exception report kept.
const REPORT_MAX_BYTES: usize = 4 * 1024 * 1024;

/// A run that could not be carried out for a reason of the service's own.
#[derive(Debug, Error)]
pub enum ExecError {
    #[error(transparent)]
    Workdir(#[from] crate::workdir::WorkdirError),
    #[error("cannot create a pipe: {0}")]
    Pipe(io::Error),
    #[error("cannot start the sandboxed python {python}: {source}")]
    Spawn { python: PathBuf, source: io::Error },
    #[error(transparent)]
    Cgroup(#[from] crate::sandbox::cgroup::CgroupError),
    #[error(transparent)]
    Sandbox(#[from] crate::sandbox::SandboxError),
    #[error("cannot wait for process {pid}: {source}")]
    Wait { pid: i32, source: io::Error },
    #[error(transparent)]
    Warm(#[from] WarmError),
    #[error("the zygote lost the run's process: {0}")]
    ChildLost(#[from] crate::zygote::ChildLost),
}

/// The right to start one run: a place among the concurrent runs, and a slot.
pub struct Reservation {
    slot: Slot,
    _running: OwnedSemaphorePermit,
}

/// How runs get their process.
#[derive(Clone)]
enum Mode {
    Fresh,
    Warm(WarmPool),
}

/// Runs jobs in sandboxed Python processes, at most one per slot at a time.
#[derive(Clone)]
pub struct Executor {
    sandbox: Sandbox,
    runtime: PythonRuntime,
    work_root: Arc<Path>,
    slots: SlotPool,
    concurrency: usize,
    running: Arc<Semaphore>,
    mode: Mode,
    preloaded: Arc<Vec<String>>,
    /// The names of the layers every run gets, for its result.
    applied: Arc<Vec<String>>,
}

/// What was observed of a finished run, by either way of running it.
struct Finished {
    exit: sys::Exit,
    timed_out: bool,
    output_exceeded: bool,
    /// Stopped because its job was cancelled.
    cancelled: bool,
    oom_killed: bool,
    cpu_ms: u64,
    peak_memory_kb: u64,
    duration: Duration,
    stdout: (Vec<u8>, bool),
    stderr: (Vec<u8>, bool),
    report: Vec<u8>,
}

impl Executor {
    /// An executor starting a fresh interpreter per run, one run per slot at a time, creating
    /// working directories under `work_root` (which must exist and be reachable by the slots'
    /// uids).
    pub fn fresh(
        sandbox: Sandbox,
        runtime: PythonRuntime,
        work_root: &Path,
        slots: SlotPool,
    ) -> Self {
        let concurrency = slots.size();
        Self {
            sandbox,
            runtime,
            work_root: Arc::from(work_root),
            slots,
            concurrency,
            running: Arc::new(Semaphore::new(concurrency)),
            mode: Mode::Fresh,
            preloaded: Arc::new(Vec::new()),
            applied: Arc::default(),
        }
        .with_applied_layers()
    }

    fn with_applied_layers(mut self) -> Self {
        self.applied = Arc::new(isolation::active_layers(&self.isolation()));
        self
    }

    /// An executor taking each run's process from `pool`, with at most `concurrency` runs at
    /// once (`slots` should have more slots than that, so that refills are off the request
    /// path).
    pub fn warm(
        sandbox: Sandbox,
        runtime: PythonRuntime,
        work_root: &Path,
        slots: SlotPool,
        concurrency: usize,
        pool: WarmPool,
    ) -> Self {
        let concurrency = concurrency.clamp(1, slots.size());
        Self {
            mode: Mode::Warm(pool),
            concurrency,
            running: Arc::new(Semaphore::new(concurrency)),
            ..Self::fresh(sandbox, runtime, work_root, slots)
        }
        .with_applied_layers()
    }

    /// Gets the executor ready to serve: a warm executor starts its zygote and forks a warm
    /// child for every slot. With `fall_back`, a warm executor whose zygote cannot start becomes
    /// a fresh one (and says so in the log); without, that is an error.
    pub async fn start(mut self, fall_back: bool) -> Result<Self, WarmError> {
        let Mode::Warm(pool) = &self.mode else {
            return Ok(self);
        };
        let info = match pool.zygote_info().await {
            Ok(info) => info,
            Err(error) if fall_back => {
                tracing::warn!(
                    %error,
                    "the zygote cannot run here; every run starts a fresh interpreter instead \
                     (slower, same sandbox)"
                );
                self.mode = Mode::Fresh;
                return Ok(self.with_applied_layers());
            }
            Err(error) => return Err(error),
        };
        self.preloaded = Arc::new(info.preloaded.into_iter().map(|(m, _)| m).collect());
        let mut held = Vec::new();
        for _ in 0..self.slots.size() {
            held.push(self.slots.acquire().await);
        }
        // All at once: joins of cgroups close together share one RCU grace period.
        let fills = held.iter().map(|slot| pool.fill(slot));
        for filled in futures_util::future::join_all(fills).await {
            filled?;
        }
        Ok(self)
    }

    /// What the zygote reported when it got ready; `None` for fresh interpreters, or when no
    /// zygote can be had.
    pub async fn zygote_info(&self) -> Option<crate::zygote::ZygoteInfo> {
        match &self.mode {
            Mode::Warm(pool) => pool.zygote_info().await.ok(),
            Mode::Fresh => None,
        }
    }

    /// Which way runs get their process: `zygote` or `fresh`.
    pub fn kind(&self) -> &'static str {
        match self.mode {
            Mode::Fresh => "fresh",
            Mode::Warm(_) => "zygote",
        }
    }

    /// Modules every run finds imported already (known once a warm executor has started).
    pub fn preloaded(&self) -> &[String] {
        &self.preloaded
    }

    /// The sandbox runs go into.
    pub fn sandbox(&self) -> &Sandbox {
        &self.sandbox
    }

    /// The names of the isolation layers every run gets.
    pub fn layers(&self) -> &[String] {
        &self.applied
    }

    /// Every isolation layer the service knows, and whether (and how) runs get it.
    pub fn isolation(&self) -> IsolationReport {
        let mut report: IsolationReport = self
            .sandbox
            .isolation()
            .into_iter()
            .map(|(name, status)| (name.to_owned(), status))
            .collect();
        let slots = self.slots.size();
        let mut set = |name: &str, status: LayerStatus| {
            report.insert(name.to_owned(), status);
        };
        set(
            "not_dumpable",
            match self.mode {
                Mode::Warm(_) => LayerStatus::active("set in every warm child"),
                Mode::Fresh => {
                    LayerStatus::inactive("a fresh interpreter is dumpable again after exec")
                }
            },
        );
        set(
            "uid_per_slot",
            if self.slots.has_uids() {
                LayerStatus::active(format!("{slots} slots, each with its own uid and gid"))
            } else {
                LayerStatus::inactive(
                    "the worker has no real root and no subordinate ids mapped (/etc/subuid \
                     and newuidmap): runs keep its uid",
                )
            },
        );
        let cgroups = match self.slots.cgroups_described() {
            Some(described) => LayerStatus::active(described),
            None => LayerStatus::inactive(
                cgroup::unavailable_reason()
                    .unwrap_or(
                        "the worker is neither the host's root nor root of a user namespace of its \
                         own",
                    )
                    .to_owned(),
            ),
        };
        set("cgroup_memory", cgroups.clone());
        set("cgroup_pids", cgroups);
        set(
            "cgroup_cpu",
            match self.slots.cpu_quota() {
                Some(cpus) => LayerStatus::active(format!(
                    "a run's processes together use at most {cpus} cores ({})",
                    self.slots.cgroups_described().unwrap_or_default()
                )),
                None => LayerStatus::inactive(
                    "no quota asked for (PYRUNNER_CPUS_PER_RUN=0), no cpu controller for the \
                     slots (none writable in cgroup v1, none delegated in v2), or no cgroups",
                ),
            },
        );
        // Every layer decided neither here nor by the sandbox is one this version lacks.
        for (name, _) in isolation::LAYERS {
            report
                .entry((*name).to_owned())
                .or_insert_with(|| LayerStatus::inactive("not in this version"));
        }
        report
    }

    /// The Python runtime runs use.
    pub fn runtime(&self) -> &PythonRuntime {
        &self.runtime
    }

    /// The run slots.
    pub fn slots(&self) -> &SlotPool {
        &self.slots
    }

    /// How many runs go at once.
    pub fn concurrency(&self) -> usize {
        self.concurrency
    }

    /// Waits until a run may start: a free place among the concurrent runs, and a free slot.
    pub async fn reserve(&self) -> Reservation {
        let running = Arc::clone(&self.running)
            .acquire_owned()
            .await
            .expect("the run semaphore is never closed");
        Reservation {
            slot: self.slots.acquire().await,
            _running: running,
        }
    }

    /// For diagnostics and the benchmark: how long one warm child takes from the fork until it
    /// is ready (inside its sandbox, prepared), measured by replacing a slot's waiting child.
    /// None for the fresh executor.
    pub async fn refill_time(&self) -> Option<Result<Duration, WarmError>> {
        let Mode::Warm(pool) = &self.mode else {
            return None;
        };
        let reservation = self.reserve().await;
        // Its code pipe closes as it drops: the child exits without running anything.
        drop(pool.take(&reservation.slot).await);
        let started = std::time::Instant::now();
        Some(
            pool.fill(&reservation.slot)
                .await
                .map(|()| started.elapsed()),
        )
    }

    /// Waits until a run may start, then runs the job.
    pub async fn run(&self, job: &Job) -> RunResult {
        let reservation = self.reserve().await;
        self.run_in(reservation, job).await
    }

    /// Runs the job with a reservation from [`Executor::reserve`]. Its slot is free again once
    /// the run is cleaned up (for a warm executor, after the result is returned). Never fails: a
    /// failure of the service becomes an `internal_error` result, and its cause is logged.
    pub async fn run_in(&self, reservation: Reservation, job: &Job) -> RunResult {
        self.run_until(reservation, job, &CancellationToken::new())
            .await
    }

    /// As [`Executor::run_in`], and `cancel` stops the run (its whole process group) at once:
    /// it then ends `cancelled`.
    pub async fn run_until(
        &self,
        reservation: Reservation,
        job: &Job,
        cancel: &CancellationToken,
    ) -> RunResult {
        let Reservation { slot, _running } = reservation;
        let outcome = match &self.mode {
            Mode::Fresh => self.run_fresh(&slot, job, cancel).await,
            Mode::Warm(pool) => self.run_warm(pool, slot, job, cancel).await,
        };
        match outcome {
            Ok(finished) => result(job, finished, &self.applied),
            Err(error) => {
                tracing::error!(job = %job.id, %error, "run failed inside the service");
                RunResult::internal_error(job.id, "the service could not run this job")
            }
        }
    }
}

/// The result of a finished run.
fn result(job: &Job, f: Finished, layers: &[String]) -> RunResult {
    let report = HarnessReport::parse(&f.report);
    let observation = Observation {
        exit: f.exit,
        timed_out: f.timed_out,
        // Output cut at its cap decides, however the process then ended: a writer that got
        // EPIPE after the cap may exit (with an error) before the overflow kill lands.
        output_exceeded: f.output_exceeded || f.stdout.1 || f.stderr.1,
        oom_killed: f.oom_killed,
        cpu_ms: f.cpu_ms,
        cpu_limit_ms: rlimits::cpu_limit_secs(&job.limits) * 1000,
        report: report.as_ref(),
    };
    // A cancelled run's own outcome does not matter: it was stopped on purpose.
    let status = if f.cancelled {
        RunStatus::Cancelled
    } else {
        classify::status(&observation)
    };
    let (exit_code, signal) = match f.exit {
        sys::Exit::Code(c) => (Some(c), None),
        sys::Exit::Signal(s) => (None, Some(s)),
    };
    RunResult {
        id: job.id,
        status,
        exit_code,
        signal,
        stdout: String::from_utf8_lossy(&f.stdout.0).into_owned(),
        stderr: String::from_utf8_lossy(&f.stderr.0).into_owned(),
        stdout_truncated: f.stdout.1,
        stderr_truncated: f.stderr.1,
        exception: report.map(HarnessReport::into_exception),
        duration_ms: f.duration.as_millis() as u64,
        cpu_ms: f.cpu_ms,
        peak_memory_kb: f.peak_memory_kb,
        layers: layers.to_vec(),
    }
}

/// A job that runs `code` with `limits` and no stdin, for start-up probes.
pub fn probe_job(code: &str, limits: RunLimits) -> Job {
    Job {
        id: JobId::new(),
        code: code.to_owned(),
        stdin: None,
        limits,
        caller: None,
        period: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finished(exit: sys::Exit, stdout_cut: bool, output_exceeded: bool) -> Finished {
        Finished {
            exit,
            timed_out: false,
            output_exceeded,
            cancelled: false,
            oom_killed: false,
            cpu_ms: 5,
            peak_memory_kb: 1024,
            duration: Duration::from_millis(10),
            stdout: (b"x".repeat(16), stdout_cut),
            stderr: (Vec::new(), false),
            report: Vec::new(),
        }
    }

    #[test]
    fn output_cut_at_its_cap_decides_however_the_process_ended() {
        let limits = RunLimits {
            timeout_ms: 1000,
            memory_mb: 128,
            stdout_max_bytes: 16,
            stderr_max_bytes: 16,
        };
        let job = probe_job("print()", limits);
        // (exit, stdout cut, overflow seen by the supervisor) -> status
        let cases = [
            (
                sys::Exit::Code(1),
                true,
                false,
                RunStatus::OutputLimitExceeded,
            ),
            (
                sys::Exit::Signal(9),
                true,
                true,
                RunStatus::OutputLimitExceeded,
            ),
            (
                sys::Exit::Code(0),
                true,
                false,
                RunStatus::OutputLimitExceeded,
            ),
            (sys::Exit::Code(0), false, false, RunStatus::Success),
        ];
        for (exit, cut, seen, status) in cases {
            let r = result(&job, finished(exit, cut, seen), &[]);
            assert_eq!(r.status, status, "{exit:?} cut={cut} seen={seen}");
            assert_eq!(r.stdout_truncated, cut);
        }
    }
}

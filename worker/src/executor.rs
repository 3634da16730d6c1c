//! Carries out one run: a private working directory, a sandboxed Python process fed with the
//! code and stdin, output read up to its caps, the wall-clock deadline, and the final result.

use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pyrunner_shared::{Job, JobId, RunLimits, RunResult};
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::Notify;

use crate::classify::{self, HarnessReport, Observation};
use crate::reaper;
use crate::runtime::PythonRuntime;
use crate::sandbox::{rlimits, sys, Sandbox};
use crate::slots::{Slot, SlotPool};

const HARNESS: &str = include_str!("harness.py");
/// Most bytes of exception report kept.
const REPORT_MAX_BYTES: usize = 4 * 1024 * 1024;
/// How long output is still read after the process group was killed. Only a process that left
/// the group (a new session) can hold the pipes open past that.
const DRAIN_GRACE: Duration = Duration::from_millis(250);

/// A run that could not be carried out for a reason of the service's own.
#[derive(Debug, Error)]
pub enum ExecError {
    #[error("cannot create the working directory under {path}: {source}")]
    CreateWorkdir { path: PathBuf, source: io::Error },
    #[error("cannot hand the working directory {path} to uid {uid}: {source}")]
    ChownWorkdir {
        path: PathBuf,
        uid: u32,
        source: nix::Error,
    },
    #[error("cannot create a pipe: {0}")]
    Pipe(io::Error),
    #[error("cannot start the sandboxed python {python}: {source}")]
    Spawn { python: PathBuf, source: io::Error },
    #[error(transparent)]
    Cgroup(#[from] crate::sandbox::cgroup::CgroupError),
    #[error("cannot wait for process {pid}: {source}")]
    Wait { pid: i32, source: io::Error },
}

/// Runs jobs in sandboxed Python processes, at most one per slot at a time.
#[derive(Clone)]
pub struct Executor {
    sandbox: Sandbox,
    runtime: PythonRuntime,
    work_root: Arc<Path>,
    slots: SlotPool,
}

impl Executor {
    /// An executor running in `slots`, creating working directories under `work_root` (which
    /// must exist and be reachable by the slots' uids).
    pub fn new(
        sandbox: Sandbox,
        runtime: PythonRuntime,
        work_root: &Path,
        slots: SlotPool,
    ) -> Self {
        Self {
            sandbox,
            runtime,
            work_root: Arc::from(work_root),
            slots,
        }
    }

    /// The sandbox runs go into.
    pub fn sandbox(&self) -> &Sandbox {
        &self.sandbox
    }

    /// The protection layers every run gets.
    pub fn layers(&self) -> Vec<&'static str> {
        let mut layers = self.sandbox.layers();
        if self.slots.has_uids() {
            layers.push("uid_per_slot");
        }
        if self.slots.has_cgroups() {
            layers.extend(["cgroup_memory", "cgroup_pids"]);
        }
        layers
    }

    /// The Python runtime runs use.
    pub fn runtime(&self) -> &PythonRuntime {
        &self.runtime
    }

    /// The run slots.
    pub fn slots(&self) -> &SlotPool {
        &self.slots
    }

    /// Waits for a free slot, then runs the job in it.
    pub async fn run(&self, job: &Job) -> RunResult {
        let slot = self.slots.acquire().await;
        self.run_in(&slot, job).await
    }

    /// Runs the job in a slot the caller holds. Never fails: a failure of the service becomes
    /// an `internal_error` result, and its cause is logged.
    pub async fn run_in(&self, slot: &Slot, job: &Job) -> RunResult {
        match self.try_run(slot, job).await {
            Ok(result) => result,
            Err(error) => {
                tracing::error!(job = %job.id, %error, "run failed inside the service");
                RunResult::internal_error(job.id, "the service could not run this job")
            }
        }
    }

    async fn try_run(&self, slot: &Slot, job: &Job) -> Result<RunResult, ExecError> {
        let setup_started = Instant::now();
        let workdir = self.make_workdir(slot)?;
        let (code_read, code_write) = sys::pipe().map_err(ExecError::Pipe)?;
        let (report_read, report_write) = sys::pipe().map_err(ExecError::Pipe)?;

        let oom_kills_before = slot
            .cgroups()
            .map(|c| c.prepare(job.limits.memory_bytes()))
            .transpose()?;
        let mut command = self.command(workdir.path(), job.stdin.is_some());
        let setup = setup_started.elapsed();
        let started = Instant::now();
        let mut child = reaper::spawn_leader(|| {
            self.sandbox.spawn(
                &mut command,
                &job.limits,
                slot.uid(),
                slot.cgroups(),
                code_read,
                report_write,
            )
        })
        .map_err(|source| ExecError::Spawn {
            python: self.runtime.python(),
            source,
        })?;
        let pid = child.id() as i32;
        let spawned = started.elapsed();

        let overflow = Arc::new(Notify::new());
        let writers = [
            Some(job.code.clone().into_bytes()).map(|b| feed(code_write, b)),
            child
                .stdin
                .take()
                .zip(job.stdin.clone())
                .map(|(pipe, data)| feed(OwnedFd::from(pipe), data.into_bytes())),
        ];
        let stdout = Capture::start(
            child.stdout.take().map(OwnedFd::from),
            job.limits.stdout_max_bytes as usize,
            Some(Arc::clone(&overflow)),
        );
        let stderr = Capture::start(
            child.stderr.take().map(OwnedFd::from),
            job.limits.stderr_max_bytes as usize,
            Some(Arc::clone(&overflow)),
        );
        let report = Capture::start(Some(report_read), REPORT_MAX_BYTES, None);

        let (timed_out, output_exceeded) = supervise(pid, &job.limits, started, &overflow).await?;
        let duration = started.elapsed();
        // Whatever is left of the group (background children) dies with the run.
        sys::kill_group(pid);
        let reaped = tokio::task::spawn_blocking(move || sys::reap(pid))
            .await
            .expect("reap does not panic");
        let cleanup_started = Instant::now();
        self.clean_up_after(pid, slot);
        let reaped = reaped.map_err(|source| ExecError::Wait { pid, source })?;
        let usage = slot
            .cgroups()
            .zip(oom_kills_before)
            .map(|(c, before)| c.usage(before))
            .unwrap_or_default();
        drop(child);
        for writer in writers.into_iter().flatten() {
            writer.abort();
        }

        let (stdout, stdout_truncated) = stdout.finish().await;
        let (stderr, stderr_truncated) = stderr.finish().await;
        let (report, _) = report.finish().await;
        tracing::debug!(
            job = %job.id,
            setup_us = setup.as_micros() as u64,
            spawn_us = spawned.as_micros() as u64,
            run_us = (duration - spawned).as_micros() as u64,
            cleanup_us = cleanup_started.elapsed().as_micros() as u64,
            "run phases"
        );
        let report = HarnessReport::parse(&report);

        let observation = Observation {
            exit: reaped.exit,
            timed_out,
            output_exceeded,
            oom_killed: usage.oom_killed,
            cpu_ms: reaped.cpu_ms,
            cpu_limit_ms: rlimits::cpu_limit_secs(&job.limits) * 1000,
            report: report.as_ref(),
        };
        let status = classify::status(&observation);
        let (exit_code, signal) = match reaped.exit {
            sys::Exit::Code(c) => (Some(c), None),
            sys::Exit::Signal(s) => (None, Some(s)),
        };
        Ok(RunResult {
            id: job.id,
            status,
            exit_code,
            signal,
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
            stdout_truncated,
            stderr_truncated,
            exception: report.map(HarnessReport::into_exception),
            duration_ms: duration.as_millis() as u64,
            cpu_ms: reaped.cpu_ms,
            peak_memory_kb: reaped.peak_rss_kb.max(usage.peak_kb),
        })
    }

    /// Kills what is left of a run and reaps it. With a uid of its own, a run's processes are
    /// exactly those of that uid, including any that left the process group.
    fn clean_up_after(&self, leader: i32, slot: &Slot) {
        if let Some(uid) = slot.uid() {
            if let Err(error) = sys::kill_all_of_uid(uid) {
                tracing::warn!(uid, %error, "cannot kill the processes left by a run");
            }
        }
        reaper::release_leader(leader);
    }

    fn make_workdir(&self, slot: &Slot) -> Result<tempfile::TempDir, ExecError> {
        // Private to the run's uid: concurrent runs must not read each other's files.
        let dir = tempfile::Builder::new()
            .prefix("run-")
            .permissions(std::fs::Permissions::from_mode(0o700))
            .tempdir_in(&self.work_root)
            .map_err(|source| ExecError::CreateWorkdir {
                path: self.work_root.to_path_buf(),
                source,
            })?;
        if let Some(uid) = slot.uid() {
            let gid = uid;
            nix::unistd::chown(
                dir.path(),
                Some(nix::unistd::Uid::from_raw(uid)),
                Some(nix::unistd::Gid::from_raw(gid)),
            )
            .map_err(|source| ExecError::ChownWorkdir {
                path: dir.path().to_path_buf(),
                uid,
                source,
            })?;
        }
        Ok(dir)
    }

    fn command(&self, workdir: &Path, with_stdin: bool) -> Command {
        let mut command = Command::new(self.runtime.python());
        command
            .arg("-I")
            .arg("-B")
            .arg("-c")
            .arg(HARNESS)
            .current_dir(workdir)
            .env_clear()
            .envs(self.runtime.env(workdir))
            .stdin(if with_stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        command
    }
}

/// Waits until the process ends, killing its group at the deadline or when output overflows.
/// Returns (timed out, output exceeded).
async fn supervise(
    pid: i32,
    limits: &RunLimits,
    started: Instant,
    overflow: &Notify,
) -> Result<(bool, bool), ExecError> {
    let exited = tokio::task::spawn_blocking(move || sys::wait_exited(pid));
    tokio::pin!(exited);
    let deadline = tokio::time::Instant::from_std(started + limits.timeout());
    let (mut timed_out, mut output_exceeded) = (false, false);
    let finished = tokio::select! {
        r = &mut exited => Some(r),
        _ = tokio::time::sleep_until(deadline) => { timed_out = true; None }
        _ = overflow.notified() => { output_exceeded = true; None }
    };
    let result = match finished {
        Some(r) => r,
        None => {
            sys::kill_group(pid);
            exited.await
        }
    };
    result
        .expect("wait does not panic")
        .map_err(|source| ExecError::Wait { pid, source })?;
    Ok((timed_out, output_exceeded))
}

/// Writes `data` to a pipe and closes it; a reader that goes away early is not an error.
fn feed(fd: OwnedFd, data: Vec<u8>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if let Ok(mut pipe) = pipe::Sender::from_owned_fd(fd) {
            let _ = pipe.write_all(&data).await;
        }
    })
}

/// Output read from a pipe into memory, up to a cap.
struct Capture {
    buffer: Arc<Mutex<(Vec<u8>, bool)>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Capture {
    /// Reads `fd` until end of file or `cap` bytes; past the cap it marks the capture truncated,
    /// signals `overflow` and stops reading.
    fn start(fd: Option<OwnedFd>, cap: usize, overflow: Option<Arc<Notify>>) -> Self {
        let buffer = Arc::new(Mutex::new((Vec::new(), false)));
        let task = fd.map(|fd| {
            let buffer = Arc::clone(&buffer);
            tokio::spawn(async move {
                let Ok(mut pipe) = pipe::Receiver::from_owned_fd(fd) else {
                    return;
                };
                let mut chunk = vec![0u8; 64 * 1024];
                loop {
                    let n = match pipe.read(&mut chunk).await {
                        Ok(0) => return,
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(_) => return,
                    };
                    let mut guard = buffer.lock().unwrap_or_else(|e| e.into_inner());
                    let room = cap - guard.0.len();
                    if n > room {
                        guard.0.extend_from_slice(&chunk[..room]);
                        guard.1 = true;
                        if let Some(overflow) = &overflow {
                            overflow.notify_one();
                        }
                        return;
                    }
                    guard.0.extend_from_slice(&chunk[..n]);
                }
            })
        });
        Self { buffer, task }
    }

    /// What was read, once the writers are gone (or after a short grace).
    async fn finish(mut self) -> (Vec<u8>, bool) {
        if let Some(mut task) = self.task.take() {
            if tokio::time::timeout(DRAIN_GRACE, &mut task).await.is_err() {
                task.abort();
            }
        }
        let mut guard = self.buffer.lock().unwrap_or_else(|e| e.into_inner());
        (std::mem::take(&mut guard.0), guard.1)
    }
}

/// A job that runs `code` with `limits` and no stdin, for start-up probes.
pub fn probe_job(code: &str, limits: RunLimits) -> Job {
    Job {
        id: JobId::new(),
        code: code.to_owned(),
        stdin: None,
        limits,
    }
}

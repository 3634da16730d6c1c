//! The fresh-interpreter way: every run starts `python -I -B -c <harness>` in its sandbox. It
//! pays for the interpreter start and every import; it needs nothing but the runtime.

use std::os::fd::OwnedFd;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Instant;

use pyrunner_shared::{Job, RunLimits};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::capture::{feed, Capture};
use super::{ExecError, Executor, Finished, HARNESS, REPORT_MAX_BYTES};
use crate::reaper;
use crate::sandbox::sys;
use crate::slots::Slot;
use crate::workdir::RunDir;

impl Executor {
    pub(super) async fn run_fresh(
        &self,
        slot: &Slot,
        job: &Job,
        cancel: &CancellationToken,
    ) -> Result<Finished, ExecError> {
        let setup_started = Instant::now();
        let workdir = self.sandbox.run_dir(&self.work_root, slot.uid())?;
        let (code_read, code_write) = sys::pipe().map_err(ExecError::Pipe)?;
        let (report_read, report_write) = sys::pipe().map_err(ExecError::Pipe)?;

        let watch = slot
            .cgroups()
            .map(|c| c.prepare(job.limits.memory_bytes()))
            .transpose()?;
        let ruleset = self.sandbox.landlock_ruleset(&workdir)?;
        let mut command = self.command(&workdir, job.stdin.is_some());
        let setup = setup_started.elapsed();
        let started = Instant::now();
        let (mut child, init) = reaper::spawn_leader(|| {
            self.sandbox.spawn(
                &mut command,
                &job.limits,
                slot.uid(),
                slot.cgroups(),
                code_read,
                report_write,
                ruleset,
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
            Some(feed(code_write, job.code.clone().into_bytes())),
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

        let (timed_out, output_exceeded, cancelled) =
            supervise(pid, &job.limits, started, &overflow, cancel).await?;
        let duration = started.elapsed();
        // Whatever is left of the group (background children) dies with the run, and with its
        // PID namespace whatever left the group.
        sys::kill_group(pid);
        drop(init);
        let reaped = tokio::task::spawn_blocking(move || sys::reap(pid))
            .await
            .expect("reap does not panic");
        let cleanup_started = Instant::now();
        let cleared = slot.cgroups().is_some_and(|c| c.empty_or_killed());
        if let Some(uid) = slot.uid().filter(|_| !cleared) {
            if let Err(error) = sys::kill_all_of_uid(uid) {
                tracing::warn!(uid, %error, "cannot kill the processes left by a run");
            }
        }
        reaper::release_leader(pid);
        let reaped = reaped.map_err(|source| ExecError::Wait { pid, source })?;
        let usage = slot
            .cgroups()
            .zip(watch)
            .map(|(c, watch)| c.usage(watch))
            .unwrap_or_default();
        drop(child);
        for writer in writers.into_iter().flatten() {
            writer.abort();
        }

        let stdout = stdout.finish().await;
        let stderr = stderr.finish().await;
        let (report, _) = report.finish().await;
        tracing::debug!(
            job = %job.id,
            setup_us = setup.as_micros() as u64,
            spawn_us = spawned.as_micros() as u64,
            run_us = (duration - spawned).as_micros() as u64,
            cleanup_us = cleanup_started.elapsed().as_micros() as u64,
            "run phases"
        );
        Ok(Finished {
            exit: reaped.exit,
            timed_out,
            output_exceeded,
            cancelled,
            oom_killed: usage.oom_killed,
            // The slot's group counts the run's processes that were never waited for, too.
            cpu_ms: usage.cpu_us.unwrap_or(reaped.cpu_us) / 1000,
            peak_memory_kb: reaped.peak_rss_kb.max(usage.peak_kb.unwrap_or(0)),
            duration,
            stdout,
            stderr,
            report,
        })
    }

    fn command(&self, workdir: &RunDir, with_stdin: bool) -> Command {
        let mut command = Command::new(self.runtime.python());
        // UTF-8 mode: UTF-8 streams and files even where the host has no C.UTF-8 locale.
        command.args(["-I", "-B", "-X", "utf8", "-c"]).arg(HARNESS);
        // A directory of the run's own is mounted, and entered, as it enters its sandbox.
        if let Some(dir) = workdir.host_path() {
            command.current_dir(dir);
        }
        command
            .env_clear()
            .envs(self.runtime.env(workdir.path()))
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

/// Waits until the process ends, killing its group at the deadline, when output overflows or
/// when the run is cancelled. Returns (timed out, output exceeded, cancelled).
async fn supervise(
    pid: i32,
    limits: &RunLimits,
    started: Instant,
    overflow: &Notify,
    cancel: &CancellationToken,
) -> Result<(bool, bool, bool), ExecError> {
    let exited = tokio::task::spawn_blocking(move || sys::wait_exited(pid));
    tokio::pin!(exited);
    let deadline = tokio::time::Instant::from_std(started + limits.timeout());
    let (mut timed_out, mut output_exceeded, mut cancelled) = (false, false, false);
    let finished = tokio::select! {
        r = &mut exited => Some(r),
        _ = tokio::time::sleep_until(deadline) => { timed_out = true; None }
        _ = overflow.notified() => { output_exceeded = true; None }
        _ = cancel.cancelled() => { cancelled = true; None }
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
    Ok((timed_out, output_exceeded, cancelled))
}

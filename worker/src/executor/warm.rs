//! The warm way: the run's process is the slot's warm child, forked by the zygote ahead of time
//! and already inside its sandbox. The job's own limits go with the code (the child applies
//! them before any user code runs); the slot's cleanup and its next child come after the result.
//!
//! What a run used, CPU time and peak memory, comes from the kernel, never from the child after
//! the run's code started (that code can write anything the child could): from the slot's
//! cgroup where it counts both, else from the zygote's report of the child's exit, less what
//! the child had used by the time it said it was ready.

use std::sync::Arc;
use std::time::{Duration, Instant};

use pyrunner_shared::Job;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::capture::{feed, Capture};
use super::{ExecError, Executor, Finished, REPORT_MAX_BYTES};
use crate::sandbox::cgroup::RunWatch;
use crate::sandbox::{rlimits, sys};
use crate::slots::Slot;
use crate::warm_pool::WarmPool;
use crate::zygote::protocol::{EndRecord, JobHeader};
use crate::zygote::{ChildExit, ChildHandle, ChildLost, Zygote};

/// How long a child that wrote its end record may take to exit by itself.
const EXIT_GRACE: Duration = Duration::from_millis(100);
/// How long a killed child may take to be reaped.
const EXIT_WAIT: Duration = Duration::from_secs(5);

/// How a run's wait ended.
enum Ended {
    /// The zygote reaped the child (or lost it).
    Exited(Result<ChildExit, ChildLost>),
    /// The child closed its pipes after its end record.
    Record(EndRecord),
}

/// Waits for the exit of a child that wrote its end record; kills it if it goes on instead (the
/// record was the run's own).
async fn exit_after_record(
    zygote: &Zygote,
    child: &mut ChildHandle,
) -> Result<ChildExit, ChildLost> {
    if let Ok(exit) = tokio::time::timeout(EXIT_GRACE, child.exited()).await {
        return exit;
    }
    zygote.kill(child.token).await;
    tokio::time::timeout(EXIT_WAIT, child.exited())
        .await
        .unwrap_or(Err(ChildLost::NotReaped(EXIT_WAIT)))
}

/// Waits until every capture has stopped reading.
async fn all_stopped(stdout: &Capture, stderr: &Capture, report: &Capture) {
    stdout.stopped().await;
    stderr.stopped().await;
    report.stopped().await;
}

impl Executor {
    pub(super) async fn run_warm(
        &self,
        pool: &WarmPool,
        slot: Slot,
        job: &Job,
        cancel: &CancellationToken,
    ) -> Result<Finished, ExecError> {
        let taken = Instant::now();
        let child = match pool.take(&slot).await {
            Ok(child) => child,
            Err(error) => {
                self.clean_up(pool.clone(), slot, None, None);
                return Err(error.into());
            }
        };
        let watch = match slot
            .cgroups()
            .map(|c| c.prepare(job.limits.memory_bytes()))
            .transpose()
        {
            Ok(before) => before,
            Err(error) => {
                child.zygote.kill(child.handle.token).await;
                let exiting = Some((child.zygote, child.handle));
                self.clean_up(pool.clone(), slot, exiting, Some(child.workdir));
                return Err(error.into());
            }
        };
        let header = JobHeader {
            cpu_secs: rlimits::cpu_limit_secs(&job.limits),
            address_space_bytes: rlimits::address_space_bytes(
                &job.limits,
                slot.cgroups().is_some(),
            ),
            exit_awaited: !watch.as_ref().is_some_and(RunWatch::counts_run),
        };
        let mut input = header.line();
        input.extend_from_slice(job.code.as_bytes());

        let started = Instant::now();
        let setup = started - taken;
        let writers = [
            feed(child.code, input),
            feed(
                child.stdin,
                job.stdin
                    .clone()
                    .map(String::into_bytes)
                    .unwrap_or_default(),
            ),
        ];
        let overflow = Arc::new(Notify::new());
        let stdout = Capture::start(
            Some(child.stdout),
            job.limits.stdout_max_bytes as usize,
            Some(Arc::clone(&overflow)),
        );
        let stderr = Capture::start(
            Some(child.stderr),
            job.limits.stderr_max_bytes as usize,
            Some(Arc::clone(&overflow)),
        );
        let report = Capture::from_receiver(Some(child.report), REPORT_MAX_BYTES, None);

        let mut handle = child.handle;
        let zygote = child.zygote;
        let deadline = tokio::time::Instant::from_std(started + job.limits.timeout());
        let (mut timed_out, mut output_exceeded, mut closed) = (false, false, false);
        let mut cancelled = false;
        // The run is over when the zygote reports the child's exit, or, sooner, when the child
        // has closed all its pipes after writing its end record.
        let ended = loop {
            tokio::select! {
                exited = handle.exited() => break Ended::Exited(exited),
                _ = all_stopped(&stdout, &stderr, &report), if !closed => {
                    closed = true;
                    if let (_, Some(record)) = EndRecord::split(&report.snapshot()) {
                        break Ended::Record(record);
                    }
                }
                _ = tokio::time::sleep_until(deadline), if !timed_out => {
                    timed_out = true;
                    zygote.kill(handle.token).await;
                }
                _ = overflow.notified(), if !output_exceeded => {
                    output_exceeded = true;
                    zygote.kill(handle.token).await;
                }
                _ = cancel.cancelled(), if !cancelled => {
                    cancelled = true;
                    zygote.kill(handle.token).await;
                }
            }
        };
        let duration = started.elapsed();
        for writer in writers {
            writer.abort();
        }
        let (exit, mut reaped) = match ended {
            Ended::Exited(Ok(reaped)) => (reaped.exit, Some(reaped)),
            Ended::Record(record) => (sys::Exit::Code(record.exit), None),
            Ended::Exited(Err(lost)) => {
                self.clean_up(pool.clone(), slot, None, Some(child.workdir));
                return Err(lost.into());
            }
        };
        let usage = slot
            .cgroups()
            .zip(watch)
            .map(|(c, watch)| c.usage(watch))
            .unwrap_or_default();
        if reaped.is_none() && (usage.cpu_us.is_none() || usage.peak_kb.is_none()) {
            // No cgroup counts the run: its figures come with the exit (which the child, told
            // so in its header, does not put off).
            match exit_after_record(&zygote, &mut handle).await {
                Ok(exit) => reaped = Some(exit),
                Err(lost) => {
                    self.clean_up(pool.clone(), slot, None, Some(child.workdir));
                    return Err(lost.into());
                }
            }
        }
        // Since the child was ready: its sandbox entry and preparation are the service's.
        let ready = child.ready;
        let cpu_us = usage
            .cpu_us
            .or_else(|| reaped.map(|r| r.cpu_us.saturating_sub(ready.cpu_us)))
            .unwrap_or(0);
        // The slot's group counts only what the run itself touched; the child's resident set
        // counts the zygote's pages it maps, which it had already when it was ready.
        let peak_memory_kb = usage
            .peak_kb
            .or_else(|| reaped.map(|r| r.peak_rss_kb.saturating_sub(ready.resident_kb)))
            .unwrap_or(0);
        let stdout = stdout.finish().await;
        let stderr = stderr.finish().await;
        let (report, _) = report.finish().await;
        let report = EndRecord::split(&report).0.to_vec();
        tracing::debug!(
            job = %job.id,
            setup_us = setup.as_micros() as u64,
            run_us = duration.as_micros() as u64,
            collect_us = (started.elapsed() - duration).as_micros() as u64,
            "run phases"
        );
        // A child that ended with its record is still exiting; the clean-up waits for it (and
        // kills it if the record came from the run's own code and the process goes on).
        let exiting = match handle.try_exited() {
            None => Some((zygote, handle)),
            Some(_) => None,
        };
        self.clean_up(pool.clone(), slot, exiting, Some(child.workdir));
        Ok(Finished {
            exit,
            timed_out,
            output_exceeded,
            cancelled,
            oom_killed: usage.oom_killed,
            cpu_ms: cpu_us / 1000,
            peak_memory_kb,
            duration,
            stdout,
            stderr,
            report,
        })
    }

    /// After a run, off the request path: kills what the run left behind, removes its working
    /// directory, forks the slot's next warm child, and only then frees the slot.
    fn clean_up(
        &self,
        pool: WarmPool,
        slot: Slot,
        exiting: Option<(Arc<Zygote>, ChildHandle)>,
        workdir: Option<crate::workdir::RunDir>,
    ) {
        tokio::spawn(async move {
            if let Some((zygote, mut child)) = exiting {
                let _ = exit_after_record(&zygote, &mut child).await;
            }
            // With cgroups, an empty group proves that nothing was left behind; what is left,
            // cgroup v2 kills at once, else every process of the slot's uid is looked for.
            let leftovers = slot.cgroups().is_none_or(|c| !c.empty_or_killed());
            let kill = slot.uid().filter(|_| leftovers);
            let empty_dir = workdir
                .as_ref()
                .is_none_or(crate::workdir::RunDir::is_empty);
            if kill.is_none() && empty_dir {
                // The usual case: nothing left running and nothing written, so no need for a
                // thread of the blocking pool (the switch costs more than the removal).
                drop(workdir);
            } else {
                let cleaned = tokio::task::spawn_blocking(move || {
                    if let Some(uid) = kill {
                        if let Err(error) = sys::kill_all_of_uid(uid) {
                            tracing::warn!(uid, %error, "cannot kill the processes left by a run");
                        }
                    }
                    drop(workdir);
                });
                let _ = cleaned.await;
            }
            pool.refill(&slot).await;
        });
    }
}

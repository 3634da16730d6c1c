//! The warm pool: for each run slot, one child forked ahead of time by the zygote, already inside
//! its sandbox (the slot's uid and cgroups, the pool's limits, seccomp) with a private working
//! directory, waiting for exactly one job. A child serves one run and exits; the slot's next
//! child is forked once the run is cleaned up, off the request path, and the slot is free again
//! once that child is ready. There are more slots than runs at once: joining a cgroup waits for an
//! RCU grace period (5 to 17 ms here), and spare slots hide that wait from the next request.
//!
//! The pool also keeps its zygote: it starts one when there is none or the last one died, and
//! replaces it in the background after a number of forks or an age, so that what every child
//! inherits from it (the str hash secret, the address-space layout) is renewed.

use std::io;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use thiserror::Error;
use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;

use crate::runtime::PythonRuntime;
use crate::sandbox::landlock::LandlockPolicy;
use crate::sandbox::rootfs::RootView;
use crate::sandbox::{rlimits, sys, SandboxError, SandboxSettings};
use crate::slots::Slot;
use crate::workdir::{RunDir, WorkdirError};
use crate::zygote::protocol::{ReadyRecord, SpawnSpec, ENTRY_FAILED};
use crate::zygote::{ChildHandle, Zygote, ZygoteError, ZygoteInfo, ZygoteSettings};

/// How long a warm child may take to enter its sandbox.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long after a failed zygote start the next attempt waits.
const RESTART_BACKOFF: Duration = Duration::from_secs(1);
/// Most bytes of a failed child's stderr kept for the log.
const FAILURE_TEXT_MAX: usize = 4096;

/// How the pool runs its zygotes.
#[derive(Debug, Clone)]
pub struct WarmPoolSettings {
    pub zygote: ZygoteSettings,
    /// A zygote is replaced after forking this many children...
    pub recycle_after_runs: u64,
    /// ...or after serving this long, whichever comes first.
    pub recycle_after: Duration,
    /// The Landlock policy of runs, where the kernel has Landlock.
    pub landlock: Option<LandlockPolicy>,
    /// Whether each child makes private UTS and IPC namespaces.
    pub private_namespaces: bool,
    /// The view each child gets a private copy of, and the size of each of its tmpfs, where
    /// children get a mount namespace.
    pub private_mounts: Option<(RootView, u64)>,
    /// Whether each child is forked into a PID namespace of its own (the sandbox offers it only
    /// with the mount namespace, where its /proc is mounted).
    pub pid_namespace: bool,
    /// Whether each child makes a user namespace of its own.
    pub user_namespace: bool,
}

/// A warm child could not be had.
#[derive(Debug, Error)]
pub enum WarmError {
    #[error(transparent)]
    Zygote(#[from] ZygoteError),
    #[error("the zygote failed to start {0:?} ago; waiting before the next attempt")]
    Backoff(Duration),
    #[error("cannot create a pipe: {0}")]
    Pipe(io::Error),
    #[error(transparent)]
    Workdir(#[from] WorkdirError),
    #[error("the warm child did not get ready: {0}")]
    NotReady(String),
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
}

struct ZygoteSlot {
    current: Option<Arc<Zygote>>,
    failed_at: Option<Instant>,
}

struct Inner {
    settings: WarmPoolSettings,
    sandbox: SandboxSettings,
    runtime: PythonRuntime,
    work_root: Arc<Path>,
    zygote: tokio::sync::Mutex<ZygoteSlot>,
    replacing: AtomicBool,
    /// The warm child of each slot, by slot index.
    warm: Vec<Mutex<Option<WarmChild>>>,
}

/// Warm children for a fixed set of slots, and the zygote they come from.
#[derive(Clone)]
pub struct WarmPool {
    inner: Arc<Inner>,
}

/// A child forked for one slot, with the worker's ends of its pipes.
pub struct WarmChild {
    /// Keeps the zygote (the child's parent, which reaps it) alive while the child is.
    pub zygote: Arc<Zygote>,
    pub handle: ChildHandle,
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
    pub code: OwnedFd,
    pub report: pipe::Receiver,
    pub workdir: RunDir,
    /// What the child had used when it was ready (zero until it is).
    pub ready: ReadyRecord,
}

impl WarmPool {
    /// A pool for `slots` slots; nothing starts until [`WarmPool::fill`] or the first run.
    pub fn new(
        settings: WarmPoolSettings,
        sandbox: SandboxSettings,
        runtime: PythonRuntime,
        work_root: Arc<Path>,
        slots: usize,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                settings,
                sandbox,
                runtime,
                work_root,
                zygote: tokio::sync::Mutex::new(ZygoteSlot {
                    current: None,
                    failed_at: None,
                }),
                replacing: AtomicBool::new(false),
                warm: (0..slots).map(|_| Mutex::new(None)).collect(),
            }),
        }
    }

    /// What the current zygote reported when it got ready, starting one if needed.
    pub async fn zygote_info(&self) -> Result<ZygoteInfo, WarmError> {
        Ok(self.zygote().await?.info().clone())
    }

    /// Forks a warm child for `slot` if it has none, and waits until it is in its sandbox.
    pub async fn fill(&self, slot: &Slot) -> Result<(), WarmError> {
        if !self.has_warm(slot) {
            let child = ready(self.spawn_for(slot).await?).await?;
            *self.inner.warm[slot.index() as usize]
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = Some(child);
        }
        Ok(())
    }

    /// Forks the next warm child of `slot`, whose last one has been used, and waits until it is
    /// ready; logs a failure (the next run in the slot tries again).
    pub async fn refill(&self, slot: &Slot) {
        if let Err(error) = self.fill(slot).await {
            tracing::warn!(slot = slot.index(), %error, "cannot fork a warm child");
        }
    }

    fn has_warm(&self, slot: &Slot) -> bool {
        self.inner.warm[slot.index() as usize]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// The warm child of `slot`, inside its sandbox and waiting for its job: the one forked for
    /// it ahead of time if it is still alive, else a new one.
    pub async fn take(&self, slot: &Slot) -> Result<WarmChild, WarmError> {
        let waiting = self.inner.warm[slot.index() as usize]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(mut child) = waiting {
            match child.handle.try_exited() {
                None if child.zygote.is_alive() => return Ok(child),
                ended => tracing::warn!(
                    slot = slot.index(),
                    ended = ?ended,
                    "a warm child died while waiting; forking another"
                ),
            }
        }
        ready(self.spawn_for(slot).await?).await
    }

    async fn spawn_for(&self, slot: &Slot) -> Result<WarmChild, WarmError> {
        let zygote = self.zygote().await?;
        let workdir = RunDir::make(
            self.inner.settings.private_mounts.is_some(),
            &self.inner.work_root,
            slot.uid(),
        )?;
        let pipe = || sys::pipe().map_err(WarmError::Pipe);
        let (stdin_r, stdin_w) = pipe()?;
        let (stdout_r, stdout_w) = pipe()?;
        let (stderr_r, stderr_w) = pipe()?;
        let (code_r, code_w) = pipe()?;
        let (report_r, report_w) = pipe()?;
        let spec = SpawnSpec {
            token: 0,
            ids: slot.uid().map(|u| (u, u)),
            cgroup_procs: slot.cgroups().map(|c| c.procs_paths()).unwrap_or_default(),
            workdir: workdir.path().to_path_buf(),
            rlimits: rlimits::for_pool(&self.inner.sandbox),
            landlock: false,
            private_namespaces: self.inner.settings.private_namespaces,
            private_mounts: self
                .inner
                .settings
                .private_mounts
                .as_ref()
                .map(|(_, size)| *size),
            landlock_mount_access: self
                .inner
                .settings
                .landlock
                .as_ref()
                .map_or(0, LandlockPolicy::mount_access),
            pid_namespace: self.inner.settings.pid_namespace,
            user_namespace: self.inner.settings.user_namespace,
            landlock_proc_access: self
                .inner
                .settings
                .landlock
                .as_ref()
                .map_or(0, LandlockPolicy::proc_access),
        };
        let ruleset = match &self.inner.settings.landlock {
            Some(policy) => policy
                .ruleset(workdir.host_path())
                .map_err(SandboxError::from)?,
            None => None,
        };
        let view = match &self.inner.settings.private_mounts {
            Some((view, _)) => Some(view.try_clone_fd().map_err(WarmError::Pipe)?),
            None => None,
        };
        let handle = zygote
            .spawn(
                spec,
                [stdin_r, stdout_w, stderr_w, code_r, report_w],
                ruleset,
                view,
            )
            .await?;
        let report = pipe::Receiver::from_owned_fd(report_r).map_err(WarmError::Pipe)?;
        Ok(WarmChild {
            zygote,
            handle,
            stdin: stdin_w,
            stdout: stdout_r,
            stderr: stderr_r,
            code: code_w,
            report,
            workdir,
            ready: ReadyRecord::default(),
        })
    }

    /// The zygote to fork from: the current one, or a new one if it is gone. One that is due
    /// for replacement keeps serving while its successor starts in the background.
    async fn zygote(&self) -> Result<Arc<Zygote>, WarmError> {
        let mut state = self.inner.zygote.lock().await;
        if let Some(zygote) = state.current.as_ref().filter(|z| z.is_alive()) {
            let settings = &self.inner.settings;
            let due = zygote.spawned() >= settings.recycle_after_runs
                || zygote.age() >= settings.recycle_after;
            if due && !self.inner.replacing.swap(true, Ordering::AcqRel) {
                let pool = self.clone();
                tokio::spawn(async move { pool.replace_zygote().await });
            }
            return Ok(Arc::clone(zygote));
        }
        if let Some(failed_at) = state.failed_at {
            if failed_at.elapsed() < RESTART_BACKOFF {
                return Err(WarmError::Backoff(failed_at.elapsed()));
            }
        }
        if state.current.take().is_some() {
            tracing::warn!("the zygote died; starting another");
        }
        match self.start_zygote().await {
            Ok(zygote) => {
                state.failed_at = None;
                state.current = Some(Arc::clone(&zygote));
                Ok(zygote)
            }
            Err(error) => {
                state.failed_at = Some(Instant::now());
                Err(error.into())
            }
        }
    }

    async fn replace_zygote(&self) {
        match self.start_zygote().await {
            Ok(zygote) => {
                let old = self.inner.zygote.lock().await.current.replace(zygote);
                if let Some(old) = old {
                    tracing::info!(
                        pid = old.pid(),
                        spawned = old.spawned(),
                        age_s = old.age().as_secs(),
                        "zygote replaced; the old one ends with its last child"
                    );
                }
            }
            Err(error) => tracing::error!(%error, "cannot start a replacement zygote"),
        }
        self.inner.replacing.store(false, Ordering::Release);
    }

    async fn start_zygote(&self) -> Result<Arc<Zygote>, ZygoteError> {
        let inner = &self.inner;
        Zygote::start(&inner.settings.zygote, &inner.runtime, &inner.work_root)
            .await
            .map(Arc::new)
    }
}

/// Waits until `child` is inside its sandbox. A child that failed reports why on its stderr.
async fn ready(mut child: WarmChild) -> Result<WarmChild, WarmError> {
    let mut bytes = [0u8; ReadyRecord::LEN];
    let read = tokio::time::timeout(READY_TIMEOUT, child.report.read_exact(&mut bytes)).await;
    match read {
        Ok(Ok(_)) => {
            if let Some(ready) = ReadyRecord::parse(&bytes) {
                child.ready = ready;
                return Ok(child);
            }
        }
        Err(_) => {
            child.zygote.kill(child.handle.token).await;
            return Err(WarmError::NotReady(format!(
                "no word within {READY_TIMEOUT:?}"
            )));
        }
        Ok(_) => {}
    }
    let exit = tokio::time::timeout(Duration::from_secs(2), child.handle.exited()).await;
    let mut stderr = Vec::new();
    if let Ok(pipe) = pipe::Receiver::from_owned_fd(child.stderr) {
        let _ = tokio::time::timeout(
            Duration::from_millis(200),
            pipe.take(FAILURE_TEXT_MAX as u64).read_to_end(&mut stderr),
        )
        .await;
    }
    let text = String::from_utf8_lossy(&stderr).trim().to_owned();
    let reason = match exit {
        Ok(Ok(exit)) if exit.exit == sys::Exit::Code(ENTRY_FAILED) => text,
        Ok(Ok(exit)) => format!("it ended ({:?}) {text}", exit.exit),
        Ok(Err(lost)) => lost.to_string(),
        Err(_) => format!("it closed its report pipe {text}"),
    };
    Err(WarmError::NotReady(reason))
}

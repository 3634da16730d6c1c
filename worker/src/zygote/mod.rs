//! The zygote: a single-threaded process, apart from the async worker, that embeds CPython from
//! the runtime's virtual environment, imports the preload set once, and forks one warm child per
//! run through CPython's fork hooks. The process is the `pyrunner-zygote` binary; this module
//! starts it and talks to it. [`protocol`] is what they say to each other.
//!
//! Forking needs a process with exactly one thread (tokio's worker threads, or OpenBLAS's, would
//! leave locks held in the child), hence a process of its own rather than a fork of the worker.

pub mod protocol;

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use thiserror::Error;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::oneshot;

use self::protocol::{Event, ProtocolError, Request, SpawnSpec, CONTROL_FD, SPAWN_FDS};
use crate::reaper;
use crate::runtime::PythonRuntime;
use crate::sandbox::namespaces::NetNamespace;
use crate::sandbox::sys;

/// How long a zygote may take to import its preload set.
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// How to start zygotes.
#[derive(Debug, Clone)]
pub struct ZygoteSettings {
    /// The `pyrunner-zygote` executable.
    pub binary: PathBuf,
    /// Modules imported before forking.
    pub preload: Vec<String>,
    /// The runs' network namespace: the zygote starts in it, and its children inherit it.
    pub netns: Option<NetNamespace>,
}

/// A zygote that cannot start or serve.
#[derive(Debug, Error)]
pub enum ZygoteError {
    #[error("cannot create the zygote socket: {0}")]
    Socket(nix::Error),
    #[error("cannot start the zygote {binary}: {source}")]
    Start { binary: PathBuf, source: io::Error },
    #[error("the zygote did not get ready within {0:?}")]
    StartTimeout(Duration),
    #[error("the zygote failed to start: {0}")]
    Failed(String),
    #[error("the zygote exited while starting (its stderr, in the worker's log, says why)")]
    ExitedEarly,
    #[error("the zygote sent {0} before it was ready")]
    Unexpected(String),
    #[error("cannot send to the zygote: {0}")]
    Send(io::Error),
    #[error("cannot receive from the zygote: {0}")]
    Receive(io::Error),
    #[error("the zygote is gone")]
    Gone,
}

/// What a zygote reported when it got ready.
#[derive(Debug, Clone)]
pub struct ZygoteInfo {
    /// `sys.version` of the embedded interpreter.
    pub python: String,
    /// The preloaded modules and the milliseconds each import took.
    pub preloaded: Vec<(String, u64)>,
    /// Milliseconds from the process start until ready.
    pub startup_ms: u64,
    /// How much of the preloaded heap moved to 2 MiB pages (cheaper forks and exits).
    pub huge_pages_mib: u64,
    /// How much of it is object arenas laid out in one region for that.
    pub arena_mib: u64,
}

/// How a child of the zygote ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChildExit {
    pub exit: sys::Exit,
    /// CPU time since the fork, the child's waited-for children included.
    pub cpu_us: u64,
    /// Largest resident set, the zygote's pages the child maps included.
    pub peak_rss_kb: u64,
}

/// Why a child's end is unknown.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum ChildLost {
    #[error("the zygote could not fork: {0}")]
    SpawnFailed(String),
    #[error("the zygote ended before the child did")]
    ZygoteLost,
    #[error("the child was not reaped within {0:?} of its kill")]
    NotReaped(std::time::Duration),
}

/// The state shared by a zygote's handle and the task reading its events.
struct Shared {
    socket: AsyncFd<OwnedFd>,
    alive: AtomicBool,
    waiters: Mutex<HashMap<u64, oneshot::Sender<Result<ChildExit, ChildLost>>>>,
}

/// A running zygote process. Dropping the handle closes the socket: the zygote then kills the
/// children it still has and exits.
pub struct Zygote {
    shared: Arc<Shared>,
    reader: tokio::task::JoinHandle<()>,
    pid: u32,
    started: Instant,
    spawned: AtomicU64,
    info: ZygoteInfo,
}

/// A child forked by a zygote, until it is reaped.
#[derive(Debug)]
pub struct ChildHandle {
    pub token: u64,
    exited: oneshot::Receiver<Result<ChildExit, ChildLost>>,
}

impl ChildHandle {
    /// Waits until the child has ended and been reaped.
    pub async fn exited(&mut self) -> Result<ChildExit, ChildLost> {
        (&mut self.exited)
            .await
            .unwrap_or(Err(ChildLost::ZygoteLost))
    }

    /// The child's end, if it has been reported already.
    pub fn try_exited(&mut self) -> Option<Result<ChildExit, ChildLost>> {
        match self.exited.try_recv() {
            Ok(result) => Some(result),
            Err(oneshot::error::TryRecvError::Empty) => None,
            Err(oneshot::error::TryRecvError::Closed) => Some(Err(ChildLost::ZygoteLost)),
        }
    }
}

static NEXT_TOKEN: AtomicU64 = AtomicU64::new(1);

/// A protocol error as the I/O error tokio's readiness loop expects: `WouldBlock` for a full or
/// empty non-blocking socket, any other error carried along.
fn would_block(e: ProtocolError) -> io::Error {
    match e {
        ProtocolError::Send(nix::Error::EAGAIN) | ProtocolError::Receive(nix::Error::EAGAIN) => {
            io::ErrorKind::WouldBlock.into()
        }
        other => io::Error::other(other),
    }
}

impl Zygote {
    /// Starts a zygote for `runtime` and waits until it has imported its preload set.
    /// `work_root` becomes the HOME and TMPDIR of its environment until a run sets its own.
    pub async fn start(
        settings: &ZygoteSettings,
        runtime: &PythonRuntime,
        work_root: &Path,
    ) -> Result<Self, ZygoteError> {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        )
        .map_err(ZygoteError::Socket)?;
        // The zygote's end blocks: it has nothing else to do while it waits.
        nix::fcntl::fcntl(
            &theirs,
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::empty()),
        )
        .map_err(ZygoteError::Socket)?;
        let mut command = Command::new(&settings.binary);
        command
            .arg("--python")
            .arg(runtime.python())
            .arg("--preload")
            .arg(settings.preload.join(","))
            // Its environment is the one runs see (os.environ is inherited by every fork).
            .env_clear()
            .envs(runtime.env(work_root))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        sys::inherit_fd(&mut command, theirs.as_raw_fd(), CONTROL_FD);
        if let Some(netns) = &settings.netns {
            sys::join_netns(&mut command, netns.fd());
        }
        // Orphans of runs end up here if the zygote dies; the reaper also reaps the zygote.
        reaper::start();
        let child = command.spawn().map_err(|source| ZygoteError::Start {
            binary: settings.binary.clone(),
            source,
        })?;
        drop(theirs);
        let socket = sys::async_fd(ours).map_err(|e| ZygoteError::Start {
            binary: settings.binary.clone(),
            source: e,
        })?;
        let first = tokio::time::timeout(START_TIMEOUT, receive(&socket))
            .await
            .map_err(|_| ZygoteError::StartTimeout(START_TIMEOUT))?;
        let info = match first? {
            Some(Event::Ready {
                python,
                preloaded,
                startup_ms,
                huge_pages_mib,
                arena_mib,
            }) => ZygoteInfo {
                python,
                preloaded,
                startup_ms,
                huge_pages_mib,
                arena_mib,
            },
            Some(Event::Failed { error }) => return Err(ZygoteError::Failed(error)),
            Some(other) => return Err(ZygoteError::Unexpected(format!("{other:?}"))),
            None => return Err(ZygoteError::ExitedEarly),
        };
        let shared = Arc::new(Shared {
            socket,
            alive: AtomicBool::new(true),
            waiters: Mutex::new(HashMap::new()),
        });
        let pid = child.id();
        let reader = tokio::spawn(read_events(Arc::clone(&shared), pid));
        tracing::info!(
            pid,
            startup_ms = info.startup_ms,
            huge_pages_mib = info.huge_pages_mib,
            arena_mib = info.arena_mib,
            preloaded = ?info.preloaded,
            "zygote ready"
        );
        Ok(Self {
            shared,
            reader,
            pid,
            started: Instant::now(),
            spawned: AtomicU64::new(0),
            info,
        })
    }

    /// What the zygote reported when it got ready.
    pub fn info(&self) -> &ZygoteInfo {
        &self.info
    }

    /// The zygote's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Whether the zygote is still serving.
    pub fn is_alive(&self) -> bool {
        self.shared.alive.load(Ordering::Acquire)
    }

    /// How many children it has been asked for.
    pub fn spawned(&self) -> u64 {
        self.spawned.load(Ordering::Relaxed)
    }

    /// How long it has been serving.
    pub fn age(&self) -> Duration {
        self.started.elapsed()
    }

    /// Asks for a warm child; `fds` are the child's ends of its stdin, stdout, stderr, code and
    /// report pipes, which the zygote's child installs as its descriptors 0 to 4, `ruleset`
    /// its Landlock ruleset, if any, and `view` the view it copies for its mount namespace,
    /// if it makes one (`spec.private_mounts`).
    pub async fn spawn(
        &self,
        mut spec: SpawnSpec,
        fds: [OwnedFd; SPAWN_FDS],
        ruleset: Option<OwnedFd>,
        view: Option<OwnedFd>,
    ) -> Result<ChildHandle, ZygoteError> {
        if spec.private_mounts.is_some() != view.is_some() {
            return Err(ZygoteError::Unexpected(
                "a mount namespace needs the view, and only it".to_owned(),
            ));
        }
        spec.landlock = ruleset.is_some();
        spec.token = NEXT_TOKEN.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.shared
            .waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(spec.token, tx);
        if !self.is_alive() {
            self.forget(spec.token);
            return Err(ZygoteError::Gone);
        }
        self.spawned.fetch_add(1, Ordering::Relaxed);
        let raw: Vec<_> = fds
            .iter()
            .chain(&ruleset)
            .chain(&view)
            .map(|fd| fd.as_raw_fd())
            .collect();
        if let Err(error) = self.send(&Request::Spawn(spec.clone()), &raw).await {
            self.forget(spec.token);
            return Err(error);
        }
        Ok(ChildHandle {
            token: spec.token,
            exited: rx,
        })
    }

    /// Kills the process group of child `token`, unless it has already been reaped.
    pub async fn kill(&self, token: u64) {
        if let Err(error) = self.send(&Request::Kill { token }, &[]).await {
            tracing::warn!(token, %error, "cannot ask the zygote to kill a child");
        }
    }

    fn forget(&self, token: u64) {
        self.shared
            .waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&token);
    }

    async fn send(&self, request: &Request, fds: &[i32]) -> Result<(), ZygoteError> {
        self.shared
            .socket
            .async_io(Interest::WRITABLE, |fd| {
                protocol::send(fd, request, fds).map_err(would_block)
            })
            .await
            .map_err(|e| {
                self.shared.alive.store(false, Ordering::Release);
                ZygoteError::Send(e)
            })
    }
}

impl Drop for Zygote {
    fn drop(&mut self) {
        self.reader.abort();
        tracing::info!(pid = self.pid, spawned = self.spawned(), "zygote retired");
    }
}

async fn receive(socket: &AsyncFd<OwnedFd>) -> Result<Option<Event>, ZygoteError> {
    socket
        .async_io(Interest::READABLE, |fd| {
            protocol::receive::<Event>(fd).map_err(would_block)
        })
        .await
        .map(|message| message.map(|(event, _fds)| event))
        .map_err(ZygoteError::Receive)
}

/// Routes the zygote's events to the children's handles until the socket closes; then every
/// handle still waiting learns that its child is lost.
async fn read_events(shared: Arc<Shared>, pid: u32) {
    loop {
        let event = match receive(&shared.socket).await {
            Ok(Some(event)) => event,
            Ok(None) => {
                tracing::error!(pid, "the zygote closed its socket");
                break;
            }
            Err(error) => {
                tracing::error!(pid, %error, "cannot read from the zygote");
                break;
            }
        };
        let (token, outcome) = match event {
            Event::Exited {
                token,
                status,
                cpu_us,
                peak_rss_kb,
            } => (
                token,
                Ok(ChildExit {
                    exit: if status < 0 {
                        sys::Exit::Signal(-status)
                    } else {
                        sys::Exit::Code(status)
                    },
                    cpu_us,
                    peak_rss_kb,
                }),
            ),
            Event::SpawnFailed { token, error } => (token, Err(ChildLost::SpawnFailed(error))),
            other => {
                tracing::warn!(pid, event = ?other, "unexpected event from the zygote");
                continue;
            }
        };
        let waiter = shared
            .waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&token);
        if let Some(waiter) = waiter {
            let _ = waiter.send(outcome);
        }
    }
    shared.alive.store(false, Ordering::Release);
    // Dropping the senders tells every waiting handle that its child is lost.
    shared
        .waiters
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clear();
}

//! The zygote's loop: one thread, blocking in `poll` on its control socket and on a signalfd for
//! `SIGCHLD`. It forks a warm child per spawn request (into a PID namespace of its own, made by
//! the helper in [`crate::inits`], where asked), kills children on request, and reaps every
//! child that ends, reporting the runs' children to the worker.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};
use pyrunner_worker::sandbox::namespaces::PidNamespaces;
use pyrunner_worker::sandbox::sys;
use pyrunner_worker::zygote::protocol::{self, Event, ProtocolError, Request, SpawnSpec};
use seccompiler::BpfProgram;
use thiserror::Error;

use crate::child;
use crate::ffi::{self, Interpreter};
use crate::inits::Inits;

/// The loop cannot go on.
#[derive(Debug, Error)]
pub enum ServerError {
    #[error("cannot watch for SIGCHLD: {0}")]
    Signals(nix::Error),
    #[error("cannot poll: {0}")]
    Poll(nix::Error),
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("cannot return to the zygote's own PID namespace: {0}")]
    PidNamespace(std::io::Error),
    #[error("{0}")]
    Inits(String),
}

/// What the zygote keeps of a child until it has reaped it.
struct Child {
    token: u64,
    /// The init of the child's PID namespace, killed once the child has ended.
    init: Option<i32>,
}

impl Child {
    /// Kills what is left of the child's run: its process group and its PID namespace.
    fn kill_rest(&self, pid: i32) {
        sys::kill_group(pid);
        if let Some(init) = self.init {
            sys::kill_process(init);
        }
    }
}

/// How the zygote makes its children.
pub struct Forking<'a> {
    pub interpreter: &'a Interpreter,
    /// The program each child adds to its inherited seccomp filter once in its sandbox.
    pub entry_closed: &'a Arc<Vec<BpfProgram>>,
    /// The zygote's own PID namespace and pidfd.
    pub pid_namespaces: &'a PidNamespaces,
    /// The helper that makes the children's PID namespaces, if it could start.
    pub inits: Result<Inits, String>,
}

/// Serves the worker on `control` until it closes the socket, then kills and reaps every child.
pub fn serve(forking: &Forking<'_>, control: OwnedFd) -> Result<(), ServerError> {
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGCHLD);
    mask.thread_block().map_err(ServerError::Signals)?;
    let signals = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
        .map_err(ServerError::Signals)?;
    // Children not reaped yet, by pid.
    let mut children: HashMap<i32, Child> = HashMap::new();
    // Why the zygote forks no more children and ends with its last one (the worker then
    // starts a new zygote): its PID namespace helper is gone.
    let mut draining: Option<String> = None;
    let result = loop {
        if draining.is_some() && children.is_empty() {
            break Ok(());
        }
        let mut fds = [
            PollFd::new(control.as_fd(), PollFlags::POLLIN),
            PollFd::new(signals.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Err(nix::Error::EINTR) => continue,
            Err(e) => break Err(ServerError::Poll(e)),
            Ok(_) => {}
        }
        let request_ready = fds[0].any().unwrap_or(false);
        let child_ended = fds[1].any().unwrap_or(false);
        if child_ended {
            while let Ok(Some(_)) = signals.read_signal() {}
            reap(&mut children, &control);
        }
        if !request_ready {
            continue;
        }
        match protocol::receive::<Request>(&control) {
            Ok(Some((Request::Spawn(spec), fds))) => {
                let token = spec.token;
                let spawned = match &draining {
                    Some(why) => Err(why.clone()),
                    None => match spawn(forking, &spec, fds) {
                        Err(ServerError::Inits(why)) => {
                            eprintln!("pyrunner-zygote: {why}; ending with the last child");
                            let why = format!("{why}; the zygote is being replaced");
                            draining = Some(why.clone());
                            Err(why)
                        }
                        other => other?,
                    },
                };
                match spawned {
                    Ok((pid, init)) => {
                        children.insert(pid, Child { token, init });
                    }
                    Err(error) => {
                        protocol::send(&control, &Event::SpawnFailed { token, error }, &[])?;
                    }
                }
            }
            Ok(Some((Request::Kill { token }, _))) => {
                if let Some((&pid, child)) = children.iter().find(|(_, c)| c.token == token) {
                    // Before it has called setsid the child is not a group leader yet.
                    let _ =
                        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
                    child.kill_rest(pid);
                }
            }
            Ok(None) => break Ok(()),
            Err(ProtocolError::Malformed(message)) => {
                eprintln!("pyrunner-zygote: ignoring a malformed request: {message}");
            }
            Err(error) => break Err(error.into()),
        }
    };
    for (&pid, child) in &children {
        child.kill_rest(pid);
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
    }
    for &pid in children.keys() {
        let _ = sys::reap(pid);
    }
    result
}

/// Forks a warm child for `spec`, into a PID namespace of its own where asked. In the child it
/// never returns. The outer error ends the zygote; the inner one fails this spawn.
fn spawn(
    forking: &Forking<'_>,
    spec: &SpawnSpec,
    fds: Vec<OwnedFd>,
) -> Result<Result<(i32, Option<i32>), String>, ServerError> {
    let namespace = if spec.pid_namespace {
        // A helper that is gone takes the zygote with it: the worker then starts a new pair.
        let made = match &forking.inits {
            Ok(inits) => inits.make().map_err(ServerError::Inits)?,
            Err(why) => Err(format!("no PID namespaces: {why}")),
        };
        match made {
            Ok(namespace) => Some(namespace),
            Err(error) => return Ok(Err(error)),
        }
    } else {
        None
    };
    if let Some(namespace) = &namespace {
        if let Err(error) = forking
            .pid_namespaces
            .send_children(namespace.namespace.as_fd())
        {
            sys::kill_process(namespace.init);
            return Ok(Err(format!(
                "cannot enter the run's PID namespace: {error}"
            )));
        }
    }
    let forked = ffi::fork();
    if let Ok(ffi::Forked::Child) = forked {
        drop(namespace);
        child::run(forking, spec, fds)
    }
    if namespace.is_some() {
        forking
            .pid_namespaces
            .return_children()
            .map_err(ServerError::PidNamespace)?;
    }
    drop(fds);
    match forked {
        Ok(ffi::Forked::Parent(pid)) => Ok(Ok((pid, namespace.map(|n| n.init)))),
        Ok(ffi::Forked::Child) => unreachable!("the child runs and exits above"),
        Err(error) => {
            if let Some(namespace) = &namespace {
                sys::kill_process(namespace.init);
            }
            Ok(Err(error.to_string()))
        }
    }
}

/// Reaps every child that has ended. For a run's child, what is left of its process group and
/// its PID namespace is killed first (while the leader is unreaped its pid, and so the group
/// id, cannot be reused), then its end is reported. Other children are orphans of runs, adopted
/// as subreaper.
fn reap(children: &mut HashMap<i32, Child>, control: &OwnedFd) {
    loop {
        let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
        let pid = match waitid(Id::All, flags) {
            Ok(WaitStatus::StillAlive) | Err(_) => return,
            Ok(status) => match status.pid() {
                Some(pid) => pid.as_raw(),
                None => return,
            },
        };
        let child = children.remove(&pid);
        if let Some(child) = &child {
            child.kill_rest(pid);
        }
        let token = child.map(|c| c.token);
        let reaped = sys::reap(pid);
        if let (Some(token), Ok(reaped)) = (token, reaped) {
            let status = match reaped.exit {
                sys::Exit::Code(code) => code,
                sys::Exit::Signal(signal) => -signal,
            };
            let event = Event::Exited {
                token,
                status,
                cpu_us: reaped.cpu_us,
                peak_rss_kb: reaped.peak_rss_kb,
            };
            // A worker that has gone away no longer needs to know; the loop sees the socket
            // close next and shuts down.
            let _ = protocol::send(control, &event, &[]);
        }
    }
}

//! The zygote's loop: one thread, blocking in `poll` on its control socket and on a signalfd for
//! `SIGCHLD`. It forks a warm child per spawn request, kills children on request, and reaps every
//! child that ends, reporting the runs' children to the worker.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};
use pyrunner_worker::sandbox::sys;
use pyrunner_worker::zygote::protocol::{self, Event, ProtocolError, Request};
use seccompiler::BpfProgram;
use thiserror::Error;

use crate::child;
use crate::ffi::{self, Interpreter};

/// The loop cannot go on.
#[derive(Debug, Error)]
pub enum ServerError {
    #[error("cannot watch for SIGCHLD: {0}")]
    Signals(nix::Error),
    #[error("cannot poll: {0}")]
    Poll(nix::Error),
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
}

/// Serves the worker on `control` until it closes the socket, then kills and reaps every child.
/// Each child adds `entry_closed` to its inherited seccomp filter once it is in its sandbox.
pub fn serve(
    interpreter: &Interpreter,
    entry_closed: &Arc<Vec<BpfProgram>>,
    control: OwnedFd,
) -> Result<(), ServerError> {
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGCHLD);
    mask.thread_block().map_err(ServerError::Signals)?;
    let signals = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
        .map_err(ServerError::Signals)?;
    let zygote = nix::unistd::getpid().as_raw();
    // Children not reaped yet: pid -> token.
    let mut children: HashMap<i32, u64> = HashMap::new();
    let result = loop {
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
                match ffi::fork() {
                    Ok(ffi::Forked::Child) => {
                        child::run(interpreter, &spec, fds, zygote, entry_closed)
                    }
                    Ok(ffi::Forked::Parent(pid)) => {
                        drop(fds);
                        children.insert(pid, token);
                    }
                    Err(error) => {
                        let error = error.to_string();
                        protocol::send(&control, &Event::SpawnFailed { token, error }, &[])?;
                    }
                }
            }
            Ok(Some((Request::Kill { token }, _))) => {
                if let Some((&pid, _)) = children.iter().find(|(_, &t)| t == token) {
                    // Before it has called setsid the child is not a group leader yet.
                    let _ =
                        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
                    sys::kill_group(pid);
                }
            }
            Ok(None) => break Ok(()),
            Err(ProtocolError::Malformed(message)) => {
                eprintln!("pyrunner-zygote: ignoring a malformed request: {message}");
            }
            Err(error) => break Err(error.into()),
        }
    };
    for &pid in children.keys() {
        sys::kill_group(pid);
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
    }
    for &pid in children.keys() {
        let _ = sys::reap(pid);
    }
    result
}

/// Reaps every child that has ended. For a run's child, what is left of its process group is
/// killed first (while the leader is unreaped its pid, and so the group id, cannot be reused),
/// then its end is reported. Other children are orphans of runs, adopted as subreaper.
fn reap(children: &mut HashMap<i32, u64>, control: &OwnedFd) {
    loop {
        let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
        let pid = match waitid(Id::All, flags) {
            Ok(WaitStatus::StillAlive) | Err(_) => return,
            Ok(status) => match status.pid() {
                Some(pid) => pid.as_raw(),
                None => return,
            },
        };
        let token = children.remove(&pid);
        if token.is_some() {
            sys::kill_group(pid);
        }
        let reaped = sys::reap(pid);
        if let (Some(token), Ok(reaped)) = (token, reaped) {
            let status = match reaped.exit {
                sys::Exit::Code(code) => code,
                sys::Exit::Signal(signal) => -signal,
            };
            let event = Event::Exited {
                token,
                status,
                cpu_ms: reaped.cpu_ms,
                peak_rss_kb: reaped.peak_rss_kb,
            };
            // A worker that has gone away no longer needs to know; the loop sees the socket
            // close next and shuts down.
            let _ = protocol::send(control, &event, &[]);
        }
    }
}

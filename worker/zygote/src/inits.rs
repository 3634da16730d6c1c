//! The helper that makes the runs' PID namespaces.
//!
//! Each run gets a PID namespace whose pid 1 is a small init of the service's own, not the run's
//! process (see `pyrunner_worker::sandbox::namespaces::PidNamespaces`). The init is a forked
//! process, and a fork copies the page tables of its parent: forked from the zygote, whose heap
//! holds the preloaded libraries, each init would cost about as much as a warm child. So the
//! zygote forks this helper first, while it is still small, and asks it for a namespace per
//! warm child. The helper makes the namespace and its init, and passes the namespace back as a
//! descriptor; the zygote forks the child into it (it becomes pid 2) and kills the init once the
//! child has ended, which ends everything left in the namespace.
//!
//! The helper runs under the zygote's seccomp filter, dies with the zygote, and reaps its inits.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use nix::sys::wait::{waitpid, WaitPidFlag};
use nix::unistd::Pid;
use pyrunner_worker::sandbox::namespaces::PidNamespaces;
use pyrunner_worker::zygote::protocol::{self, ProtocolError};
use seccompiler::BpfProgram;
use serde::{Deserialize, Serialize};

use crate::ffi;

/// The zygote's request: a new namespace.
#[derive(Debug, Serialize, Deserialize)]
struct MakeNamespace;

/// The helper's answer; a made namespace comes as the message's descriptor.
#[derive(Debug, Serialize, Deserialize)]
enum Made {
    Namespace { init: i32 },
    Failed { error: String },
}

/// A run's PID namespace, as the zygote holds it.
#[derive(Debug)]
pub struct RunNamespace {
    /// The init's pid: the helper reaps it, so the pid stays the init's until it is killed.
    pub init: i32,
    /// The namespace, to fork the run's process into.
    pub namespace: OwnedFd,
}

/// The zygote's end of its helper.
#[derive(Debug)]
pub struct Inits {
    socket: OwnedFd,
}

impl Inits {
    /// Forks the helper; call it while the zygote is small and single-threaded. The helper
    /// installs `filters` on itself.
    pub fn start(filters: &[BpfProgram]) -> Result<Self, String> {
        let (zygote_end, helper_end) = nix::sys::socket::socketpair(
            nix::sys::socket::AddressFamily::Unix,
            nix::sys::socket::SockType::SeqPacket,
            None,
            nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| format!("cannot make the helper's socket: {e}"))?;
        let zygote = nix::unistd::getpid().as_raw();
        match ffi::fork_small().map_err(|e| format!("cannot fork the helper: {e}"))? {
            ffi::Forked::Child => {
                drop(zygote_end);
                ffi::exit_now(serve(zygote, filters, helper_end))
            }
            ffi::Forked::Parent(_) => Ok(Self { socket: zygote_end }),
        }
    }

    /// A new PID namespace with its init. `Ok(Err(_))`: this one could not be made;
    /// `Err(_)`: the helper is gone or broken, and no other will be.
    pub fn make(&self) -> Result<Result<RunNamespace, String>, String> {
        let broken = |e: ProtocolError| format!("the PID namespace helper: {e}");
        protocol::send(&self.socket, &MakeNamespace, &[]).map_err(broken)?;
        match protocol::receive::<Made>(&self.socket).map_err(broken)? {
            Some((Made::Namespace { init }, mut fds)) if fds.len() == 1 => Ok(Ok(RunNamespace {
                init,
                namespace: fds.remove(0),
            })),
            Some((Made::Failed { error }, _)) => Ok(Err(error)),
            Some(_) => Err("the PID namespace helper sent no namespace".into()),
            None => Err("the PID namespace helper has gone".into()),
        }
    }
}

/// The helper's life: answers requests until the zygote closes its end; returns the exit code.
fn serve(zygote: i32, filters: &[BpfProgram], socket: OwnedFd) -> i32 {
    // The helper's own pidfd, with which its inits check that it is alive, opened before the
    // filter, which does not allow pidfd_open.
    let pid_namespaces = match ffi::enter_helper(zygote).and_then(|()| PidNamespaces::open()) {
        Ok(pid_namespaces) => pid_namespaces,
        Err(error) => {
            eprintln!("pyrunner-zygote: the PID namespace helper cannot start: {error}");
            return 1;
        }
    };
    for filter in filters {
        if let Err(error) = seccompiler::apply_filter(filter) {
            eprintln!("pyrunner-zygote: the PID namespace helper has no filter: {error}");
            return 1;
        }
    }
    loop {
        match protocol::receive::<MakeNamespace>(socket.as_fd()) {
            Ok(Some(_)) => {}
            Ok(None) => return 0,
            Err(ProtocolError::Malformed(_)) => continue,
            Err(_) => return 1,
        }
        // Inits killed since the last request.
        while let Ok(status) = waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            if status.pid().is_none() {
                break;
            }
        }
        let sent = match pid_namespaces.make() {
            Ok((init, namespace)) => {
                let init = init.into_pid();
                protocol::send(&socket, &Made::Namespace { init }, &[namespace.as_raw_fd()])
            }
            Err(error) => protocol::send(
                &socket,
                &Made::Failed {
                    error: format!("cannot make a PID namespace: {error}"),
                },
                &[],
            ),
        };
        if sent.is_err() {
            return 1;
        }
    }
}

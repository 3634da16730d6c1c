//! The namespaces of runs.
//!
//! Each run makes its own UTS and IPC namespaces as it enters its sandbox (`sys::enter`); here
//! the worker only checks, at start, that it may.
//!
//! The network namespace is shared: one per worker, made at start, with no interface but the
//! loopback every namespace has, which stays down. A run there has no route anywhere, and the
//! host's abstract unix sockets (which belong to a network namespace) are out of its reach.
//!
//! A new network namespace costs about half a millisecond and the kernel tears it down slowly,
//! so runs share this one rather than get their own: there is nothing in it to share. Fresh
//! interpreters join it between fork and exec; the zygote is started inside it, and its
//! children inherit it.
//!
//! Making one needs `CAP_SYS_ADMIN` (a default container lacks it); without it runs keep the
//! worker's network namespace, and the seccomp filter alone keeps them off the network.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use nix::sched::CloneFlags;

use super::sys;

/// Whether this process may make the private UTS and IPC namespaces of runs: a short-lived
/// thread makes them for itself (namespaces belong to a thread until it forks).
pub fn can_make_private_namespaces() -> io::Result<()> {
    std::thread::spawn(|| {
        nix::sched::unshare(CloneFlags::CLONE_NEWUTS | CloneFlags::CLONE_NEWIPC)
            .map_err(io::Error::from)
    })
    .join()
    .map_err(|_| io::Error::other("the probe thread panicked"))?
}

/// An empty network namespace, alive while this handle (or a process in it) is.
#[derive(Debug, Clone)]
pub struct NetNamespace {
    fd: Arc<OwnedFd>,
}

impl NetNamespace {
    /// Makes the namespace. A short-lived thread moves itself into a new network namespace and
    /// opens it; the namespace then lives on through the open descriptor, and no thread of the
    /// worker stays in it.
    pub fn create() -> io::Result<Self> {
        let made = std::thread::spawn(|| -> io::Result<File> {
            nix::sched::unshare(CloneFlags::CLONE_NEWNET)?;
            File::open("/proc/thread-self/ns/net")
        })
        .join()
        .map_err(|_| io::Error::other("the namespace thread panicked"))??;
        Ok(Self {
            fd: Arc::new(OwnedFd::from(made)),
        })
    }

    /// The namespace's descriptor, for `setns`.
    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Whether runs can have private mounts (a mount namespace with tmpfs mounts, see
/// [`sys::PrivateMounts`]): a short-lived `/bin/sh` is started with the same entry a run's
/// process has, minus everything else.
pub fn can_make_private_mounts() -> io::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut command = std::process::Command::new("/bin/sh");
    command
        .args(["-c", ":"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    sys::set_entry(
        &mut command,
        sys::EntryPlan {
            entry: sys::Entry::BeforeExec,
            rlimits: Vec::new(),
            ids: None,
            fds: Vec::new(),
            cgroup_procs: Vec::new(),
            netns: None,
            private_namespaces: false,
            mounts: Some(sys::PrivateMounts::new(dir.path(), None, 1 << 20, 0)?),
            landlock: false,
            filters: std::sync::Arc::new(Vec::new()),
        },
    );
    let status = command.status()?;
    if status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!("the probe ended with {status}")))
    }
}

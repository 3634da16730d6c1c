//! The namespaces of runs.
//!
//! Each run makes its own UTS, IPC and mount namespaces as it enters its sandbox
//! (`sys::enter`); here the worker only checks, at start, that it may. Each run is also born in
//! a PID namespace of its own, with an init ([`PidNamespaces`]).
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
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::Arc;

use nix::sched::CloneFlags;

use super::rootfs::{RootView, RUN_DIR};
use super::{cgroup, idmap, sys};

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

/// Where runs get PID namespaces: one per run, each with an init of its own as pid 1 and the
/// run's process as pid 2, so that a run sees and signals only its own processes, and
/// everything it starts dies with its init. The run's process is not the init because an init
/// ignores every signal it has no handler for, its own `kill(getpid(), SIGKILL)` and `abort`
/// included, and a run should behave as a program does anywhere.
///
/// A new namespace is made for the children of one thread (`unshare(CLONE_NEWPID)`): the
/// thread forks the init, which becomes pid 1, then the run's process, then returns its
/// children to its own namespace (`setns`). A procfs of the run's namespace is mounted on
/// `/proc` in the run's mount namespace ([`sys::PrivateMounts::with_proc`]).
#[derive(Debug)]
pub struct PidNamespaces {
    /// This thread's own PID namespace, to return to.
    own: OwnedFd,
    /// This process's pidfd, with which each init checks that its parent is alive.
    pidfd: OwnedFd,
}

/// The init of a run's PID namespace. Dropping it kills it, and with it every process left in
/// the namespace: drop it once the run's process has ended.
#[derive(Debug)]
pub struct RunInit {
    pid: i32,
}

impl RunInit {
    /// Kills the init and waits for it (and so for the whole namespace) to be gone, for a
    /// caller that reaps its own children.
    pub fn kill_and_reap(self) -> io::Result<()> {
        let pid = self.into_pid();
        sys::kill_process(pid);
        sys::reap(pid).map(drop)
    }

    /// The init's pid, in this process's namespace, for a caller that takes over killing it.
    pub fn into_pid(self) -> i32 {
        let pid = self.pid;
        std::mem::forget(self);
        pid
    }
}

impl Drop for RunInit {
    fn drop(&mut self) {
        sys::kill_process(self.pid);
    }
}

impl PidNamespaces {
    /// Opens this thread's PID namespace and this process's pidfd. Fails where the thread could
    /// make a run's namespace but not send its children back to its own afterwards (its user
    /// namespace does not own its PID namespace): its next threads would fail to start.
    pub fn open() -> io::Result<Self> {
        let own: OwnedFd = File::open("/proc/thread-self/ns/pid")?.into();
        sys::set_pid_namespace_for_children(own.as_fd())?;
        Ok(Self {
            own,
            pidfd: sys::own_pidfd()?,
        })
    }

    /// This process's pidfd, at a number no sandbox entry installs over (see
    /// [`sys::own_pidfd`]).
    pub fn pidfd(&self) -> RawFd {
        self.pidfd.as_raw_fd()
    }

    /// Makes a new PID namespace with its init, and calls `spawn` (on this thread) to fork the
    /// run's process into it, as its pid 2. The init is returned with what `spawn` returned;
    /// if anything fails, the init is killed, and with it whatever `spawn` started.
    pub fn spawn_in_new<T>(
        &self,
        spawn: impl FnOnce() -> io::Result<T>,
    ) -> io::Result<(RunInit, T)> {
        sys::unshare_pid_namespace()?;
        let spawned = sys::fork_init(self.pidfd.as_fd()).and_then(|pid| {
            let init = RunInit { pid };
            spawn().map(|spawned| (init, spawned))
        });
        // Back to this thread's own namespace for its next children, whatever happened.
        let returned = self.return_children();
        match (spawned, returned) {
            (Ok(spawned), Ok(())) => Ok(spawned),
            (Ok(_), Err(error)) | (Err(error), _) => Err(error),
        }
    }

    /// Makes a new PID namespace with its init, and returns the init and a descriptor of the
    /// namespace, for another process to fork a run's process into (see
    /// [`Self::send_children`]).
    pub fn make(&self) -> io::Result<(RunInit, OwnedFd)> {
        self.spawn_in_new(|| Ok(File::open("/proc/thread-self/ns/pid_for_children")?.into()))
    }

    /// Makes this thread's next children start in `namespace` (one made by [`Self::make`],
    /// here or in a process of this namespace), until [`Self::return_children`].
    pub fn send_children(&self, namespace: BorrowedFd<'_>) -> io::Result<()> {
        sys::set_pid_namespace_for_children(namespace)
    }

    /// Makes this thread's next children start in its own PID namespace again.
    pub fn return_children(&self) -> io::Result<()> {
        sys::set_pid_namespace_for_children(self.own.as_fd())
    }
}

/// Whether runs can have private mounts (a copy of `view` with tmpfs mounts, see
/// [`sys::PrivateMounts`]): a short-lived `/bin/sh` is started with the same entry a run's
/// process has, minus everything else, and finds its working directory in the view.
pub fn can_make_private_mounts(view: &RootView) -> io::Result<()> {
    let mounts = sys::PrivateMounts::new(view.fd(), None, 1 << 20, 0)?;
    probe_entry(
        mounts,
        None,
        &format!("[ \"$PWD\" = {RUN_DIR} ] && [ -w . ]"),
    )
}

/// Whether runs can have PID namespaces: a short-lived `/bin/sh` is started as a run's process
/// would be, and checks that it is pid 2 in its own /proc.
pub fn can_make_pid_namespaces(pid: &PidNamespaces, view: &RootView) -> io::Result<()> {
    let mounts = sys::PrivateMounts::new(view.fd(), None, 1 << 20, 0)?.with_proc(0);
    probe_entry(
        mounts,
        Some(pid),
        "read me rest < /proc/self/stat && [ $$ = 2 ] && [ \"$me\" = 2 ]",
    )
}

/// The uid and gid the user namespace probe runs as, where it is mapped.
pub const PROBE_ID: u32 = 65_534;

/// Whether runs can have user namespaces of their own (they need a PID namespace, for their
/// own /proc): a short-lived `/bin/sh` enters one as a run's process would (after taking the
/// unprivileged id `probe_id`, where slots get ids of their own), and checks its uid map and
/// that it holds no capability.
pub fn can_make_user_namespaces(
    pid: &PidNamespaces,
    view: &RootView,
    probe_id: Option<u32>,
) -> io::Result<()> {
    let (ids, map) = match probe_id {
        Some(id) => (Some((id, id)), format!("{id} {id} 1")),
        None => (None, format!("{} 0 1", sys::RUN_ID)),
    };
    let mounts = sys::PrivateMounts::new(view.fd(), ids, 1 << 20, 0)?.with_proc(0);
    let script = format!(
        "read inside outside count < /proc/self/uid_map && \
         [ \"$inside $outside $count\" = \"{map}\" ] && \
         while read key value; do [ \"$key\" != CapBnd: ] || [ \"$value\" = 0000000000000000 ]; \
         done < /proc/self/status"
    );
    probe_entry_as(
        mounts,
        Some(pid),
        ids,
        Some(sys::UserNamespace::for_run(ids)),
        &script,
    )
}

/// For a worker that is not root: makes it root of a user namespace of its own, where it may
/// make the runs' namespaces and mounts without real root on the host (it keeps its own uid
/// there, and runs get cgroups only in a cgroup v2 group delegated to its user). Where the host
/// gives its user a subordinate range of ids, that range is mapped too, and run slots get ids of
/// their own from it (see [`idmap`]); without one, runs share the worker's uid. Where the host allows no user namespace, the
/// worker goes on without, with fewer layers.
///
/// A worker that is root of a user namespace it was started in (a container under Docker's
/// `userns-remap`, a Kubernetes pod with `hostUsers: false`) stays in it, but where that user
/// namespace does not own the PID namespace the worker is in, it goes on in a PID namespace of
/// its own, as a worker that made its user namespace does: it could not bring its children back
/// from the runs' PID namespaces otherwise. Call it while the process has one thread.
pub fn enter_own_user_namespace_unless_root() {
    if sys::is_root() {
        if sys::in_own_user_namespace() && !sys::may_return_children_to_own_pid_namespace() {
            cgroup::look_for_hierarchy_early();
            tracing::info!(
                "root of a user namespace that does not own our PID namespace: going on in a \
                 PID namespace of our own"
            );
            if let Err(error) = sys::continue_in_own_pid_namespace() {
                tracing::warn!(%error, "no PID namespace of our own: runs get none either");
            }
        }
        return;
    }
    let (uid, gid) = (nix::unistd::getuid(), nix::unistd::getgid());
    let name = nix::unistd::User::from_uid(uid)
        .ok()
        .flatten()
        .map_or_else(|| uid.to_string(), |user| user.name);
    let subordinate = idmap::Subordinate::find(&name, uid.as_raw(), gid.as_raw());
    // The slots get cgroups in the user's delegated cgroup v2 group, if it has one.
    cgroup::look_for_hierarchy_early();
    let map = subordinate.as_ref().ok().map(|s| move |pid| s.map(pid));
    let mapped = match sys::become_root_of_own_user_namespace(
        map.as_ref().map(|m| m as &dyn Fn(i32) -> io::Result<()>),
    ) {
        Ok(mapped) => mapped,
        Err(error) => {
            tracing::warn!(
                %error,
                "not root, and no user namespace of our own: runs get no namespaces or mounts"
            );
            return;
        }
    };
    match (&subordinate, mapped) {
        (Ok(s), true) => {
            let (uids, gids) = s.ranges();
            tracing::info!(
                user = %name,
                ?uids,
                ?gids,
                "not root: running as root of a user namespace of our own, which maps our uid \
                 and our subordinate ids (run slots take ids of their own from them)"
            );
        }
        (Ok(_), false) => tracing::warn!(
            user = %name,
            "not root: our subordinate ids could not be mapped (the helpers said why above; \
             under no_new_privs a setuid helper cannot work); runs share our uid"
        ),
        (Err(why), _) => tracing::info!(
            user = %name,
            %why,
            "not root: running as root of a user namespace of our own, which maps only our \
             uid (runs share it; a subordinate range would give each slot its own)"
        ),
    }
    if let Err(error) = sys::continue_in_own_pid_namespace() {
        tracing::warn!(%error, "no PID namespace of our own: runs get none either");
    }
}

fn probe_entry(
    mounts: sys::PrivateMounts,
    pid: Option<&PidNamespaces>,
    script: &str,
) -> io::Result<()> {
    probe_entry_as(mounts, pid, None, None, script)
}

fn probe_entry_as(
    mounts: sys::PrivateMounts,
    pid: Option<&PidNamespaces>,
    ids: Option<(u32, u32)>,
    user_namespace: Option<sys::UserNamespace>,
    script: &str,
) -> io::Result<()> {
    let mut command = std::process::Command::new("/bin/sh");
    command
        .args(["-c", script])
        .env_clear()
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    sys::set_entry(
        &mut command,
        sys::EntryPlan {
            entry: sys::Entry::BeforeExec,
            rlimits: Vec::new(),
            ids,
            user_namespace,
            fds: Vec::new(),
            cgroup_procs: Vec::new(),
            netns: None,
            private_namespaces: false,
            mounts: Some(mounts),
            landlock: false,
            filters: std::sync::Arc::new(Vec::new()),
        },
    );
    let status = match pid {
        Some(pid) => {
            let (init, child) = pid.spawn_in_new(|| command.spawn())?;
            let status = child.wait_with_output().map(|o| o.status);
            init.kill_and_reap()?;
            status?
        }
        None => command.status()?,
    };
    if status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!("the probe ended with {status}")))
    }
}

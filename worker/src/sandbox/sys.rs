//! The system calls of the sandbox, and the only module of the worker that uses `unsafe`.
//!
//! [`enter`] runs in the forked child, between `fork` and `exec` for a fresh interpreter or after
//! the zygote's fork. The worker is multi-threaded, so everything it does there must be
//! async-signal-safe: raw system calls on values prepared before the fork, no allocation, no locks.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::Arc;

use seccompiler::BpfProgram;

/// The descriptor the harness reads the user's code from.
pub const CODE_FD: RawFd = 3;
/// The descriptor the harness writes its exception report to.
pub const REPORT_FD: RawFd = 4;
/// The mounts of a run: a private copy of the worker's read-only view (`rootfs::RootView`),
/// with tmpfs of its own on its working directory, `/tmp` and `/dev/shm`, built before the fork.
#[derive(Debug, Clone)]
pub struct PrivateMounts {
    /// The view's mount namespace, to join and copy.
    view: RawFd,
    tmpfs: Vec<(std::ffi::CString, std::ffi::CString)>,
    /// Landlock rights to grant on each mount (see `LandlockPolicy::mount_access`).
    landlock_access: u64,
    /// Whether to mount a procfs of the process's own PID namespace on `/proc`, and the
    /// Landlock rights to grant on it.
    proc: Option<u64>,
}

impl PrivateMounts {
    /// A copy of the view `view` (a descriptor of its mount namespace) with three tmpfs of
    /// `size_bytes` each: the working directory [`rootfs::RUN_DIR`](super::rootfs::RUN_DIR)
    /// (mode 0700, owned by `ids`), `/tmp` and `/dev/shm` (mode 1777).
    pub fn new(
        view: RawFd,
        ids: Option<(u32, u32)>,
        size_bytes: u64,
        landlock_access: u64,
    ) -> io::Result<Self> {
        let c = |text: String| {
            std::ffi::CString::new(text).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
        };
        let owner = ids.map_or(String::new(), |(uid, gid)| format!(",uid={uid},gid={gid}"));
        let shared = format!("size={size_bytes},mode=1777");
        Ok(Self {
            view,
            tmpfs: vec![
                (
                    c(super::rootfs::RUN_DIR.to_owned())?,
                    c(format!("size={size_bytes},mode=0700{owner}"))?,
                ),
                (c("/tmp".to_owned())?, c(shared.clone())?),
                (c("/dev/shm".to_owned())?, c(shared)?),
            ],
            landlock_access,
            proc: None,
        })
    }

    /// Also mounts a procfs on `/proc`, for a process that is in a PID namespace of its own:
    /// it then shows that namespace's processes only. `landlock_access` is granted on it.
    pub fn with_proc(mut self, landlock_access: u64) -> Self {
        self.proc = Some(landlock_access);
        self
    }
}

/// A user namespace of the run's own, in which only its uid and gid are mapped (to themselves),
/// with the map lines written before the fork.
#[derive(Debug, Clone)]
pub struct UserNamespace {
    uid_map: Vec<u8>,
    gid_map: Vec<u8>,
}

impl UserNamespace {
    /// The namespace of a run that takes `ids` (uid, gid). Under a worker with real root they
    /// are a slot's, and keep their numbers. Under a worker without (see
    /// [`become_root_of_own_user_namespace`]) there are none: the worker's one uid and gid, 0
    /// in its namespace, become [`RUN_ID`] in the run's, as for any unprivileged user.
    pub fn for_run(ids: Option<(u32, u32)>) -> Self {
        let ((uid_in, uid_out), (gid_in, gid_out)) = match ids {
            Some((uid, gid)) => ((uid, uid), (gid, gid)),
            None => ((RUN_ID, 0), (RUN_ID, 0)),
        };
        Self {
            uid_map: format!("{uid_in} {uid_out} 1\n").into_bytes(),
            gid_map: format!("{gid_in} {gid_out} 1\n").into_bytes(),
        }
    }
}

/// The uid and gid a run of a worker without real root has in its own user namespace.
pub const RUN_ID: u32 = 1000;

/// `struct __user_cap_header_struct`.
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}
/// `struct __user_cap_data_struct`.
#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}
const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// `struct landlock_path_beneath_attr` (packed in the kernel's header).
#[repr(C, packed)]
struct LandlockPathBeneath {
    allowed_access: u64,
    parent_fd: i32,
}
const LANDLOCK_RULE_PATH_BENEATH: libc::c_int = 1;

/// The Landlock ABI version of this kernel (0 without Landlock).
pub fn landlock_abi() -> i32 {
    // SAFETY: with a null attribute, size 0 and the VERSION flag, the call only returns a
    // number.
    let version = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            1 as libc::c_uint,
        )
    };
    i32::try_from(version.max(0)).unwrap_or(0)
}

/// The host name of a run's UTS namespace.
const HOSTNAME: &[u8] = b"pyrunner";
/// The descriptor a Landlock ruleset is installed as, until the process enforces it.
pub const LANDLOCK_FD: RawFd = 5;
/// Most descriptors an [`EntryPlan`] installs.
const MAX_FDS: usize = 8;

/// One resource limit: `(resource, soft, hard)`.
pub type Rlimit = (libc::__rlimit_resource_t, u64, u64);

/// How a process enters its sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// Between fork and exec of a fresh interpreter: the process is about to exec, so inherited
    /// descriptors are only marked close-on-exec, and exec resets signal handlers.
    BeforeExec,
    /// In a child forked from the zygote, which will not exec: inherited descriptors are closed
    /// now, signal mask and handlers are reset here, and the process is made non-dumpable (exec
    /// would have reset that from the file's permissions).
    Forked {
        /// A pidfd of the zygote ([`own_pidfd`]): a child whose parent is already gone exits
        /// instead of running. (Its parent's pid says nothing in a PID namespace of its own.)
        parent: RawFd,
    },
}

/// Everything the child needs to enter its sandbox, prepared in the parent.
pub struct EntryPlan {
    pub entry: Entry,
    /// Resource limits to set.
    pub rlimits: Vec<Rlimit>,
    /// Uid and gid to switch to; none keeps the worker's own.
    pub ids: Option<(u32, u32)>,
    /// A user namespace to make right after the switch to `ids` (or in place of it, for a
    /// worker without real root), before the resource limits.
    pub user_namespace: Option<UserNamespace>,
    /// Descriptors to install, as `(open descriptor, number it gets)`; every number from the
    /// highest target up is then closed (or marked close-on-exec). At most eight.
    pub fds: Vec<(RawFd, RawFd)>,
    /// `cgroup.procs` files to join, first of all (joining needs the worker's privileges).
    pub cgroup_procs: Vec<std::ffi::CString>,
    /// A network namespace to join, right after the cgroups (it needs `CAP_SYS_ADMIN`).
    pub netns: Option<RawFd>,
    /// Whether to make private UTS and IPC namespaces (named `pyrunner`), after the network
    /// namespace (it needs `CAP_SYS_ADMIN`).
    pub private_namespaces: bool,
    /// A mount namespace of the run's own with these tmpfs mounts, made after the other
    /// namespaces; the process then changes into the first mount (its working directory).
    pub mounts: Option<PrivateMounts>,
    /// Whether `fds` installs a Landlock ruleset as [`LANDLOCK_FD`], to enforce (and close)
    /// after `no_new_privs`.
    pub landlock: bool,
    /// Seccomp filters, installed last.
    pub filters: Arc<Vec<BpfProgram>>,
}

/// Makes `command` enter the sandbox described by `plan` in its child, between fork and exec.
pub fn set_entry(command: &mut Command, plan: EntryPlan) {
    // SAFETY: `enter` is async-signal-safe: it reads `plan`, which the closure owns and which
    // was fully built before the fork, and makes system calls without allocating or locking.
    unsafe {
        command.pre_exec(move || enter(&plan));
    }
}

/// Makes `command`'s process start in the network namespace `netns` (an open descriptor of
/// one), or fail to start.
pub fn join_netns(command: &mut Command, netns: RawFd) {
    // SAFETY: setns is async-signal-safe and only takes integers; `netns` stays open until the
    // spawn returns.
    unsafe {
        command.pre_exec(move || check(libc::setns(netns, libc::CLONE_NEWNET).into()));
    }
}

/// Makes `fd` (which may be close-on-exec) descriptor `target` of `command`'s process.
pub fn inherit_fd(command: &mut Command, fd: RawFd, target: RawFd) {
    // SAFETY: dup2 is async-signal-safe and only takes integers. It clears close-on-exec on the
    // copy; when `fd == target` the flag is cleared explicitly instead.
    unsafe {
        command.pre_exec(move || {
            if fd == target {
                check(libc::fcntl(fd, libc::F_SETFD, 0).into())
            } else {
                check(libc::dup2(fd, target).into())
            }
        });
    }
}

fn check(rc: libc::c_long) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Puts the calling (freshly forked) process into its sandbox. Order matters: cgroups,
/// namespaces and mounts first (they need privilege), then descriptors and session, then the
/// identity change and the user namespace, then limits, then `no_new_privs`, and seccomp last
/// so that the steps before it may use any system call.
///
/// # Safety
/// Call only in a freshly forked child (e.g. from `CommandExt::pre_exec`, or after the zygote's
/// fork), with a plan whose descriptors are open in this process. Other descriptors of the
/// process are closed or marked close-on-exec, so no live object may still rely on them.
pub unsafe fn enter(plan: &EntryPlan) -> io::Result<()> {
    if plan.fds.len() > MAX_FDS {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: all calls below are plain system calls on integers and on memory owned by `plan`,
    // which outlives this function; none of them allocates or takes a lock.
    unsafe {
        // Join the slot's cgroups: "0" means the writing process itself.
        for procs in &plan.cgroup_procs {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            check(fd.into())?;
            let written = libc::write(fd, b"0".as_ptr().cast(), 1);
            libc::close(fd);
            check(written as libc::c_long)?;
        }
        if let Some(netns) = plan.netns {
            check(libc::setns(netns, libc::CLONE_NEWNET).into())?;
        }
        if plan.private_namespaces {
            check(libc::unshare(libc::CLONE_NEWUTS | libc::CLONE_NEWIPC).into())?;
            check(libc::sethostname(HOSTNAME.as_ptr().cast(), HOSTNAME.len()).into())?;
        }
        if let Some(mounts) = &plan.mounts {
            // Into the view, and at once into a copy of it: nothing is mounted before the
            // copy, and every mount of the view is private, so nothing mounted here reaches
            // the view or the host.
            check(libc::setns(mounts.view, libc::CLONE_NEWNS).into())?;
            check(libc::unshare(libc::CLONE_NEWNS).into())?;
            for (target, options) in &mounts.tmpfs {
                check(
                    libc::mount(
                        c"tmpfs".as_ptr(),
                        target.as_ptr(),
                        c"tmpfs".as_ptr(),
                        libc::MS_NOSUID | libc::MS_NODEV,
                        options.as_ptr().cast(),
                    )
                    .into(),
                )?;
            }
            if mounts.proc.is_some() {
                // Mounted by a process of the new PID namespace, it shows that namespace.
                check(
                    libc::mount(
                        c"proc".as_ptr(),
                        c"/proc".as_ptr(),
                        c"proc".as_ptr(),
                        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                        std::ptr::null(),
                    )
                    .into(),
                )?;
            }
            if let Some((workdir, _)) = mounts.tmpfs.first() {
                check(libc::chdir(workdir.as_ptr()).into())?;
            }
        }
        // Install the descriptors through copies above every target, so that no dup2 can
        // clobber another's source. dup2 clears FD_CLOEXEC on the copy.
        let mut copies = [0 as RawFd; MAX_FDS];
        let mut first_free: RawFd = 0;
        for (i, &(fd, target)) in plan.fds.iter().enumerate() {
            copies[i] = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 16);
            check(copies[i].into())?;
            first_free = first_free.max(target + 1);
        }
        for (i, &(_, target)) in plan.fds.iter().enumerate() {
            check(libc::dup2(copies[i], target).into())?;
        }

        // Own session and process group: the whole tree can be killed with kill(-pid).
        check(libc::setsid().into())?;

        if let Entry::Forked { .. } = plan.entry {
            reset_signals()?;
        }

        if let Some((uid, gid)) = plan.ids {
            check(libc::setgroups(0, std::ptr::null()).into())?;
            check(libc::setresgid(gid, gid, gid).into())?;
            check(libc::setresuid(uid, uid, uid).into())?;
        }
        if let Some(namespace) = &plan.user_namespace {
            enter_user_namespace(namespace)?;
        }
        // After the user namespace: the kernel checks RLIMIT_NPROC at every user namespace
        // level up to the host's, each against the limit its creator had. Set before, the
        // run's limit would also count, at the worker's level, the processes of the worker
        // and of every other run sharing its uid (a worker without real root): a fork bomb
        // test there stopped at fewer than 40 processes in 2 of 6 tries.
        for &(resource, soft, hard) in &plan.rlimits {
            let limit = libc::rlimit {
                rlim_cur: soft,
                rlim_max: hard,
            };
            check(libc::setrlimit(resource, &limit).into())?;
        }
        // After the identity change, which would clear it: die with the parent.
        check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0).into())?;
        if let Entry::Forked { parent } = plan.entry {
            // The parent may have died before the line above took effect.
            if has_exited(parent) {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
        }
        // Every other inherited descriptor goes, whatever flags it was opened with (the
        // parent's pidfd among them).
        let flags = match plan.entry {
            Entry::BeforeExec => libc::CLOSE_RANGE_CLOEXEC as libc::c_uint,
            Entry::Forked { .. } => 0,
        };
        check(libc::syscall(
            libc::SYS_close_range,
            first_free as libc::c_uint,
            libc::c_uint::MAX,
            flags,
        ))?;
        if let Entry::Forked { .. } = plan.entry {
            // No core dumps and no ptrace or /proc access to this process by its own uid.
            check(libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0).into())?;
        }
        check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0).into())?;
        if plan.landlock {
            // Rules on the mount points would not reach the file systems mounted on them:
            // rules for the mounts themselves, added to the ruleset before it is enforced.
            let mounted = plan.mounts.iter().flat_map(|m| {
                let tmpfs = m
                    .tmpfs
                    .iter()
                    .map(|(target, _)| (target.as_c_str(), m.landlock_access));
                tmpfs.chain(m.proc.map(|access| (c"/proc", access)))
            });
            for (target, access) in mounted {
                let fd = libc::open(target.as_ptr(), libc::O_PATH | libc::O_CLOEXEC);
                check(fd.into())?;
                let rule = LandlockPathBeneath {
                    allowed_access: access,
                    parent_fd: fd,
                };
                let added = libc::syscall(
                    libc::SYS_landlock_add_rule,
                    LANDLOCK_FD,
                    LANDLOCK_RULE_PATH_BENEATH,
                    &rule as *const LandlockPathBeneath,
                    0 as libc::c_uint,
                );
                libc::close(fd);
                check(added)?;
            }
            check(libc::syscall(
                libc::SYS_landlock_restrict_self,
                LANDLOCK_FD,
                0 as libc::c_uint,
            ))?;
            libc::close(LANDLOCK_FD);
        }
    }
    for filter in plan.filters.iter() {
        seccompiler::apply_filter(filter).map_err(|e| match e {
            seccompiler::Error::Seccomp(err) | seccompiler::Error::Prctl(err) => err,
            _ => io::Error::from_raw_os_error(libc::EINVAL),
        })?;
    }
    Ok(())
}

/// Makes the calling process, which has just taken its unprivileged uid and gid (or holds the
/// one uid of a worker without real root), the only member of a new user namespace that maps
/// them and nothing else, and drops every capability it gets there (bounding set included).
///
/// # Safety
/// Async-signal-safe: system calls on integers and on memory owned by `namespace`.
unsafe fn enter_user_namespace(namespace: &UserNamespace) -> io::Result<()> {
    // SAFETY: plain system calls on integers, on constant strings and on memory owned by
    // `namespace` or local to this function.
    unsafe {
        // The uid change made the process non-dumpable, which makes its /proc files root's and
        // so its own maps unwritable; the caller makes it non-dumpable again later (a warm
        // child), or exec decides (a fresh interpreter).
        check(libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0).into())?;
        check(libc::unshare(libc::CLONE_NEWUSER).into())?;
        write_file(c"/proc/self/uid_map", &namespace.uid_map)?;
        // An unprivileged writer of a gid map must first give up setgroups for good.
        write_file(c"/proc/self/setgroups", b"deny")?;
        write_file(c"/proc/self/gid_map", &namespace.gid_map)?;
        // The creator of a namespace holds every capability in it: drop them all. The bounding
        // set first (it needs CAP_SETPCAP), up to the first number this kernel does not know.
        for cap in 0..64 {
            if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) < 0 {
                let error = io::Error::last_os_error();
                if error.raw_os_error() == Some(libc::EINVAL) {
                    break;
                }
                return Err(error);
            }
        }
        let header = CapHeader {
            version: LINUX_CAPABILITY_VERSION_3,
            pid: 0,
        };
        let none = [CapData {
            effective: 0,
            permitted: 0,
            inheritable: 0,
        }; 2];
        check(libc::syscall(
            libc::SYS_capset,
            &header as *const CapHeader,
            none.as_ptr(),
        ))
    }
}

/// Writes `bytes` to the file at `path` in one `write`.
///
/// # Safety
/// Async-signal-safe.
unsafe fn write_file(path: &std::ffi::CStr, bytes: &[u8]) -> io::Result<()> {
    // SAFETY: open, write and close on a valid C string and a valid buffer.
    unsafe {
        let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        check(fd.into())?;
        let written = libc::write(fd, bytes.as_ptr().cast(), bytes.len());
        // Read before close, which may change errno.
        let outcome = match written {
            n if n == bytes.len() as isize => Ok(()),
            n if n < 0 => Err(io::Error::last_os_error()),
            _ => Err(io::Error::from(io::ErrorKind::WriteZero)),
        };
        libc::close(fd);
        outcome
    }
}

/// Whether the process of `pidfd` has ended (without waiting).
///
/// # Safety
/// Async-signal-safe; `pidfd` must be a pidfd.
unsafe fn has_exited(pidfd: RawFd) -> bool {
    let mut poll = libc::pollfd {
        fd: pidfd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no timeout. A pidfd polls readable once its process has ended.
    let ready = unsafe { libc::poll(&mut poll, 1, 0) };
    ready != 0
}

/// Unblocks every signal and restores default handling, as a fresh interpreter would start,
/// except that SIGPIPE and SIGXFSZ are ignored as CPython ignores them (writes then fail with
/// `BrokenPipeError` and `OSError(EFBIG)` instead of killing the process), and SIGINT keeps
/// CPython's handler, which the zygote installed.
///
/// # Safety
/// Only for a single-threaded process about to run code that installs its own handlers.
unsafe fn reset_signals() -> io::Result<()> {
    // SAFETY: sigset and sigaction values are initialised by the libc calls that fill them.
    unsafe {
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        check(libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut()).into())?;
        for signal in 1..libc::SIGRTMAX() {
            // SIGINT keeps the handler CPython's signal module installed in the zygote, as a
            // fresh interpreter installs it: a run gets KeyboardInterrupt, not death.
            if signal == libc::SIGKILL || signal == libc::SIGSTOP || signal == libc::SIGINT {
                continue;
            }
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = match signal {
                libc::SIGPIPE | libc::SIGXFSZ => libc::SIG_IGN,
                _ => libc::SIG_DFL,
            };
            libc::sigemptyset(&mut action.sa_mask);
            // Numbers glibc reserves for itself fail with EINVAL; they have no handler to reset.
            libc::sigaction(signal, &action, std::ptr::null_mut());
        }
    }
    Ok(())
}

/// One packet received by [`receive_with_fds`].
pub struct Received {
    /// Bytes of the message.
    pub len: usize,
    /// Descriptors that came with it, close-on-exec.
    pub fds: Vec<OwnedFd>,
    /// The message or its descriptors did not fit.
    pub truncated: bool,
}

/// Receives one packet into `buffer`, with up to `max_fds` descriptors passed as `SCM_RIGHTS`.
pub fn receive_with_fds(
    socket: BorrowedFd<'_>,
    buffer: &mut [u8],
    max_fds: usize,
) -> Result<Received, nix::Error> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let mut space = vec![0u8; nix::sys::socket::cmsg_space::<RawFd>() * max_fds.max(1)];
    loop {
        let mut iov = [std::io::IoSliceMut::new(buffer)];
        match recvmsg::<()>(
            socket.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Err(nix::Error::EINTR) => continue,
            Err(e) => return Err(e),
            Ok(msg) => {
                let mut fds = Vec::new();
                for cmsg in msg.cmsgs()? {
                    if let ControlMessageOwned::ScmRights(raw) = cmsg {
                        // SAFETY: the kernel has just installed these descriptors in this
                        // process for this message; nothing else knows or owns them.
                        fds.extend(
                            raw.into_iter()
                                .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                        );
                    }
                }
                return Ok(Received {
                    len: msg.bytes,
                    fds,
                    truncated: msg
                        .flags
                        .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC),
                });
            }
        }
    }
}

/// Registers a socket or pipe with the tokio reactor (which must be running).
pub fn async_fd(fd: OwnedFd) -> io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: an OwnedFd is open for as long as it lives, always returns the same number, and
    // is owned (so kept open) by the AsyncFd until the AsyncFd is dropped.
    Ok(unsafe { tokio::io::unix::AsyncFd::register(fd) }?)
}

/// A pipe whose both ends close on exec.
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: `fds` is a valid array of two descriptors for pipe2 to fill.
    check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }.into())?;
    // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Sends SIGKILL to every process of the group led by `pgid`. A group that is already empty
/// is not an error.
pub fn kill_group(pgid: i32) {
    // SAFETY: kill has no memory effects; a negative pid addresses a process group.
    unsafe { libc::kill(-pgid, libc::SIGKILL) };
}

/// Blocks until process `pid` has ended, without reaping it, so that its pid (and with it the
/// process group id) cannot be reused while the group is being killed.
pub fn wait_exited(pid: i32) -> io::Result<()> {
    loop {
        // SAFETY: `info` is a valid siginfo_t for waitid to fill.
        let rc = unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT,
            )
        };
        match check(rc.into()) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// How a reaped process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
}

/// What the kernel reports about a reaped process.
#[derive(Debug, Clone, Copy)]
pub struct Reaped {
    pub exit: Exit,
    /// CPU time of the process and its waited-for children.
    pub cpu_us: u64,
    pub peak_rss_kb: u64,
}

/// Reaps process `pid` and returns its exit and resource usage.
pub fn reap(pid: i32) -> io::Result<Reaped> {
    let mut status: libc::c_int = 0;
    loop {
        // SAFETY: `status` and `usage` are valid for wait4 to fill.
        let (rc, usage) = unsafe {
            let mut usage: libc::rusage = std::mem::zeroed();
            let rc = libc::wait4(pid, &mut status, 0, &mut usage);
            (rc, usage)
        };
        match check(rc.into()) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
            Ok(()) => {
                let exit = if libc::WIFSIGNALED(status) {
                    Exit::Signal(libc::WTERMSIG(status))
                } else {
                    Exit::Code(libc::WEXITSTATUS(status))
                };
                let us = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
                return Ok(Reaped {
                    exit,
                    cpu_us: us(usage.ru_utime) + us(usage.ru_stime),
                    peak_rss_kb: usage.ru_maxrss.max(0) as u64,
                });
            }
        }
    }
}

/// Whether this process is root of the host: uid 0 in the host's user namespace, where it may
/// take other uids and make cgroups.
pub fn is_host_root() -> bool {
    is_root() && !in_own_user_namespace()
}

/// Whether this process runs in a user namespace of its own rather than the host's, where
/// every uid is mapped to itself.
pub fn in_own_user_namespace() -> bool {
    std::fs::read_to_string("/proc/self/uid_map")
        .is_ok_and(|map| map.split_whitespace().collect::<Vec<_>>() != ["0", "0", "4294967295"])
}

/// Makes this process root of a new user namespace of its own: there it may make namespaces and
/// mounts without real root on the host, where it keeps its own uid. The kernel allows it only
/// to a process with one thread.
///
/// With `map_from_outside`, a child forked before the process leaves calls it with the
/// process's pid once it has left: from the old namespace, it may write maps that the process
/// itself may not (a subordinate range, through the setuid helpers; see `idmap`). Where it
/// fails, or without it, only the process's own uid and gid are mapped, to 0. Returns whether
/// `map_from_outside` mapped the namespace.
pub fn become_root_of_own_user_namespace(
    map_from_outside: Option<&dyn Fn(i32) -> io::Result<()>>,
) -> io::Result<bool> {
    // SAFETY: getuid, getgid and getpid cannot fail and have no memory effects.
    let (uid, gid, pid) = unsafe { (libc::getuid(), libc::getgid(), libc::getpid()) };
    let helper = match map_from_outside {
        Some(map) => Some(fork_outside_mapper(pid, map)?),
        None => None,
    };
    // SAFETY: unshare takes an integer.
    let left = check(unsafe { libc::unshare(libc::CLONE_NEWUSER) }.into());
    let mapped = match helper {
        // Written or dropped, the pipe lets the helper go: it maps, or exits at once.
        Some((go, child)) => {
            if left.is_ok() {
                let _ = nix::unistd::write(&go, b"m");
            }
            drop(go);
            let ended = reap(child)?.exit;
            left.is_ok() && ended == Exit::Code(0)
        }
        None => false,
    };
    left?;
    if !mapped {
        // The helper may have written the uid map and failed on the gid map.
        if std::fs::read_to_string("/proc/self/uid_map")?.is_empty() {
            std::fs::write("/proc/self/uid_map", format!("0 {uid} 1\n"))?;
        }
        if std::fs::read_to_string("/proc/self/gid_map")?.is_empty() {
            std::fs::write("/proc/self/setgroups", "deny")?;
            std::fs::write("/proc/self/gid_map", format!("0 {gid} 1\n"))?;
        }
    }
    Ok(mapped)
}

/// Forks the child of [`become_root_of_own_user_namespace`]: it waits for a byte on the pipe
/// returned, then calls `map(pid)` and exits 0 if it succeeded; it exits at once if the pipe
/// closes without one.
fn fork_outside_mapper(
    pid: i32,
    map: &dyn Fn(i32) -> io::Result<()>,
) -> io::Result<(OwnedFd, i32)> {
    let threads = std::fs::read_dir("/proc/self/task")?.count();
    if threads != 1 {
        return Err(io::Error::other(format!(
            "{threads} threads: a user namespace needs a process with one"
        )));
    }
    let (wait, go) = pipe()?;
    // SAFETY: the process has one thread (checked above), so the child's copy of its memory
    // is consistent (no lock held by another thread) and it may run any code; it leaves with
    // _exit, running no destructor of the parent's state twice.
    let child = unsafe { libc::fork() };
    check(child.into())?;
    if child == 0 {
        drop(go);
        let mut byte = [0u8; 1];
        let asked = matches!(nix::unistd::read(&wait, &mut byte), Ok(1));
        let code = match asked.then(|| map(pid)) {
            Some(Ok(())) => 0,
            Some(Err(error)) => {
                eprintln!("cannot map the worker's user namespace: {error}");
                1
            }
            None => 2,
        };
        // SAFETY: _exit takes an integer and ends the process.
        unsafe { libc::_exit(code) }
    }
    Ok((go, child))
}

/// Goes on in a PID namespace of this process's own, as its pid 1: the process forks, the child
/// returns from here and is the service from then on, and the parent stays behind, forwards
/// SIGTERM, SIGINT, SIGHUP and SIGQUIT to it, and exits as it does (the child dies with it).
/// A worker without real root needs this: it may move its children into the runs' PID
/// namespaces and back only from a PID namespace its own user namespace owns. Call it while
/// the process has one thread.
pub fn continue_in_own_pid_namespace() -> io::Result<()> {
    unshare_pid_namespace()?;
    // SAFETY: the process has one thread, so the child's copy of its state is whole; the child
    // goes on as the service.
    let pid = unsafe { libc::fork() };
    check(pid.into())?;
    if pid == 0 {
        // SAFETY: prctl with integer arguments only.
        check(unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) }.into())?;
        return Ok(());
    }
    // SAFETY: sigset and siginfo values are initialised by the libc calls that fill them, and
    // the calls take them by pointer; kill, waitpid and _exit take integers.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        let forwarded = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGQUIT];
        for signal in forwarded.iter().chain([&libc::SIGCHLD]) {
            libc::sigaddset(&mut set, *signal);
        }
        libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        loop {
            let mut status = 0;
            let ended = libc::waitpid(pid, &mut status, libc::WNOHANG);
            if ended == pid {
                let code = if libc::WIFEXITED(status) {
                    libc::WEXITSTATUS(status)
                } else {
                    128 + libc::WTERMSIG(status)
                };
                libc::_exit(code);
            }
            let mut info: libc::siginfo_t = std::mem::zeroed();
            let signal = libc::sigwaitinfo(&set, &mut info);
            if forwarded.contains(&signal) {
                libc::kill(pid, signal);
            }
        }
    }
}

/// Whether this process runs with the effective uid 0.
pub fn is_root() -> bool {
    // SAFETY: geteuid cannot fail and has no memory effects.
    unsafe { libc::geteuid() == 0 }
}

/// Makes this process the reaper of its orphaned descendants, so that processes a run leaves
/// behind are reparented here (and reaped by [`reap_orphans`]) instead of to the host's init.
pub fn become_child_subreaper() -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    check(unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) }.into())
}

/// Kills every process whose real uid is `uid`, from a short-lived child that takes that uid
/// and calls `kill(-1, SIGKILL)`. The kernel delivers that signal under the task-list lock, and a
/// process with a fatal signal pending cannot fork, so no process of the uid escapes it.
pub fn kill_all_of_uid(uid: u32) -> io::Result<()> {
    // SAFETY: the child calls only async-signal-safe system calls and leaves with _exit, so the
    // state of other threads copied by fork (locks, allocator) is never touched.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: as above; these calls only take integers.
        unsafe {
            if libc::setresuid(uid, uid, uid) == 0 {
                libc::kill(-1, libc::SIGKILL);
            }
            libc::_exit(0);
        }
    }
    check(pid.into())?;
    loop {
        let mut status = 0;
        // SAFETY: `status` is valid for waitpid to fill.
        let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
        match check(rc.into()) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// Reaps every child of this process that has ended, except the pids in `keep` (run leaders
/// whose executor reaps them itself, to read their resource usage).
pub fn reap_orphans(keep: &std::collections::HashSet<i32>) {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return;
    };
    for task in tasks.flatten() {
        let Ok(children) = std::fs::read_to_string(task.path().join("children")) else {
            continue;
        };
        for pid in children
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
        {
            if !keep.contains(&pid) {
                let mut status = 0;
                // SAFETY: `status` is valid; WNOHANG returns at once for a live child.
                unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
            }
        }
    }
}

/// A pidfd of this process, at a descriptor number of at least 16 (above every number an
/// [`EntryPlan`] installs), close-on-exec.
pub fn own_pidfd() -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes integers and returns a new descriptor, owned here.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0 as libc::c_uint) };
    check(fd)?;
    // SAFETY: pidfd_open succeeded, so `fd` is open and owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    // SAFETY: fcntl duplicates an open descriptor into a new one, owned here.
    let high = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 16) };
    check(high.into())?;
    // SAFETY: as above.
    Ok(unsafe { OwnedFd::from_raw_fd(high) })
}

/// Makes the calling thread's next children start in a new PID namespace; the thread itself
/// stays in its own. The first child becomes the namespace's init.
pub fn unshare_pid_namespace() -> io::Result<()> {
    // SAFETY: unshare takes an integer.
    check(unsafe { libc::unshare(libc::CLONE_NEWPID) }.into())
}

/// Whether the calling thread may send its children to its own PID namespace (with `setns`),
/// which it must do after making each run's: only where its user namespace holds
/// `CAP_SYS_ADMIN` over the user namespace that owns its PID namespace. Leaves the thread's
/// children where they were.
pub fn may_return_children_to_own_pid_namespace() -> bool {
    std::fs::File::open("/proc/thread-self/ns/pid")
        .is_ok_and(|own| set_pid_namespace_for_children(own.as_fd()).is_ok())
}

/// Makes the calling thread's next children start in the PID namespace `namespace` (the
/// thread's own, or one nested in it).
pub fn set_pid_namespace_for_children(namespace: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: setns takes a borrowed, open descriptor and an integer.
    check(unsafe { libc::setns(namespace.as_raw_fd(), libc::CLONE_NEWPID) }.into())
}

/// Forks the init of the PID namespace the calling thread's children start in (after
/// [`unshare_pid_namespace`]) and returns its pid. The init holds the namespace open and does
/// nothing else: it dies with this process (`parent` is this process's pidfd), is killed by it
/// with SIGKILL (the only signal an init without handlers receives), and then the kernel kills
/// every process left in the namespace.
pub fn fork_init(parent: BorrowedFd<'_>) -> io::Result<i32> {
    let parent = parent.as_raw_fd();
    // SAFETY: the child runs `init`, which makes only async-signal-safe system calls and never
    // returns, so the state of other threads copied by fork (locks, allocator) is never touched.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: as above, in the freshly forked child.
        unsafe { init(parent) }
    }
    check(pid.into())?;
    Ok(pid)
}

/// The life of a namespace's init; never returns.
///
/// # Safety
/// Only in a freshly forked child: it closes every descriptor.
unsafe fn init(parent: RawFd) -> ! {
    // SAFETY: plain system calls on integers and on local, initialised values.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
        if has_exited(parent) {
            libc::_exit(0);
        }
        libc::syscall(
            libc::SYS_close_range,
            0 as libc::c_uint,
            libc::c_uint::MAX,
            0 as libc::c_uint,
        );
        // The run's orphans are reparented here; ignoring SIGCHLD has the kernel reap them, so
        // they do not count against the run's process limit as zombies.
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = libc::SIG_IGN;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(libc::SIGCHLD, &action, std::ptr::null_mut());
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
        libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
        loop {
            libc::pause();
        }
    }
}

/// Sends SIGKILL to process `pid` (a child of this process, so its pid cannot have been reused).
pub fn kill_process(pid: i32) {
    // SAFETY: kill has no memory effects.
    unsafe { libc::kill(pid, libc::SIGKILL) };
}

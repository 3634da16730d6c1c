//! The system calls of the sandbox, and the only module of the worker that uses `unsafe`.
//!
//! [`enter`] runs in the forked child between `fork` and `exec`. The parent process is
//! multi-threaded, so everything it does there must be async-signal-safe: raw system calls on
//! values prepared before the fork, no allocation, no locks.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::Arc;

use seccompiler::BpfProgram;

/// The descriptor the harness reads the user's code from.
pub const CODE_FD: RawFd = 3;
/// The descriptor the harness writes its exception report to.
pub const REPORT_FD: RawFd = 4;

/// One resource limit: `(resource, soft, hard)`.
pub type Rlimit = (libc::__rlimit_resource_t, u64, u64);

/// Everything the child needs to enter its sandbox, prepared in the parent.
pub struct EntryPlan {
    /// Resource limits to set.
    pub rlimits: Vec<Rlimit>,
    /// Uid and gid to switch to; none keeps the worker's own.
    pub ids: Option<(u32, u32)>,
    /// Read end of the code pipe, moved to [`CODE_FD`].
    pub code_fd: RawFd,
    /// Write end of the report pipe, moved to [`REPORT_FD`].
    pub report_fd: RawFd,
    /// `cgroup.procs` files to join, first of all (joining needs the worker's privileges).
    pub cgroup_procs: Vec<std::ffi::CString>,
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

fn check(rc: libc::c_long) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Puts the calling (freshly forked) process into its sandbox. Order matters: descriptors and
/// session first, then limits, then the identity change (which needs privilege), then
/// `no_new_privs`, and seccomp last so that the steps before it may use any system call.
///
/// # Safety
/// Call only in the child between `fork` and `exec` (e.g. from `CommandExt::pre_exec`), with a
/// plan whose descriptors are open in this process.
unsafe fn enter(plan: &EntryPlan) -> io::Result<()> {
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
        // Move the pipes to their fixed numbers through numbers above both targets, so that
        // neither dup2 can clobber the other's source. dup2 clears FD_CLOEXEC on the copy.
        let code = libc::fcntl(plan.code_fd, libc::F_DUPFD_CLOEXEC, 10);
        check(code.into())?;
        let report = libc::fcntl(plan.report_fd, libc::F_DUPFD_CLOEXEC, 10);
        check(report.into())?;
        check(libc::dup2(code, CODE_FD).into())?;
        check(libc::dup2(report, REPORT_FD).into())?;
        // Every other inherited descriptor closes at exec, whatever flags it was opened with.
        check(libc::syscall(
            libc::SYS_close_range,
            (REPORT_FD + 1) as libc::c_uint,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC as libc::c_uint,
        ))?;

        // Own session and process group: the whole tree can be killed with kill(-pid).
        check(libc::setsid().into())?;

        for &(resource, soft, hard) in &plan.rlimits {
            let limit = libc::rlimit {
                rlim_cur: soft,
                rlim_max: hard,
            };
            check(libc::setrlimit(resource, &limit).into())?;
        }

        if let Some((uid, gid)) = plan.ids {
            check(libc::setgroups(0, std::ptr::null()).into())?;
            check(libc::setresgid(gid, gid, gid).into())?;
            check(libc::setresuid(uid, uid, uid).into())?;
        }
        // After the identity change, which would clear it: die with the worker.
        check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0).into())?;
        check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0).into())?;
    }
    for filter in plan.filters.iter() {
        seccompiler::apply_filter(filter).map_err(|e| match e {
            seccompiler::Error::Seccomp(err) | seccompiler::Error::Prctl(err) => err,
            _ => io::Error::from_raw_os_error(libc::EINVAL),
        })?;
    }
    Ok(())
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
    pub cpu_ms: u64,
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
                let ms = |t: libc::timeval| t.tv_sec as u64 * 1000 + t.tv_usec as u64 / 1000;
                return Ok(Reaped {
                    exit,
                    cpu_ms: ms(usage.ru_utime) + ms(usage.ru_stime),
                    peak_rss_kb: usage.ru_maxrss.max(0) as u64,
                });
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

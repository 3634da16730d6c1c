//! The seccomp policy: an allowlist, default deny. Each system call a run may make is listed with
//! the reason it is allowed; everything else fails with `EPERM`. The policy is compiled once into
//! BPF programs: a fresh interpreter installs them just before exec, the zygote on itself once
//! (its children inherit them).
//!
//! - Other architectures' numbering (i386 through `int 0x80`) kills the process in seccompiler's
//!   prologue, and x32 numbers (bit 30 set) in a check added here.
//! - A few calls are allowed only with safe arguments: `socket` for `AF_UNIX`, `clone` without
//!   namespace flags, `sendto` without a destination address.
//! - A few return `ENOSYS` instead of `EPERM`, so that libraries fall back to what is allowed:
//!   `clone3` (glibc then uses `clone`, whose flags the filter can read) and `io_uring_*`.
//! - The zygote's copy also allows [`ENTRY`] (`unshare` of a UTS, an IPC, a mount, a user and a
//!   PID namespace, `setns` of a PID or a mount namespace, `sethostname`, `mount`, `capset`),
//!   which the zygote needs to fork a warm child into its PID namespace and the child to enter
//!   its sandbox; each child then adds [`compile_entry_closed`], so a run's code never has
//!   them.
//!
//! The calls listed cover CPython, numpy, sympy, threads, subprocesses, `multiprocessing`, the
//! dynamic loader of a fresh interpreter, a warm child's own entry into its sandbox (set*id,
//! rlimits, `prctl`, Landlock), and the zygote's loop, which runs under the same filter.
//! [`NEVER`] names, with reasons, what is deliberately left out; a test checks none of it is
//! allowed.

use std::collections::BTreeMap;

use libc::c_long;
use seccompiler::{
    sock_filter, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};
use thiserror::Error;

/// When an allowed call is allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Condition {
    /// On every call.
    Always,
    /// When the `int` argument `arg` equals `value` (a socket family).
    IntEq { arg: u8, value: u32 },
    /// When the `int` argument `arg` equals one of `values` (namespace types).
    IntIn { arg: u8, values: &'static [u32] },
    /// When the pointer argument `arg` is null (all 64 bits).
    NullPointer { arg: u8 },
    /// When argument `arg` has none of the bits of `mask` (namespace flags of `clone`).
    ArgLacksBits { arg: u8, mask: u64 },
    /// When argument `arg` has no bit outside `allowed` (the namespaces `unshare` may make).
    FlagsWithin { arg: u8, allowed: u64 },
}

/// A group of calls allowed for one reason.
#[derive(Debug, Clone, Copy)]
pub struct Allowed {
    pub reason: &'static str,
    pub calls: &'static [(&'static str, c_long)],
    pub when: Condition,
}

const fn always(reason: &'static str, calls: &'static [(&'static str, c_long)]) -> Allowed {
    Allowed {
        reason,
        calls,
        when: Condition::Always,
    }
}

const NAMESPACE_FLAGS: u64 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWCGROUP
    | libc::CLONE_NEWTIME) as u64;

/// The allowlist.
pub const POLICY: &[Allowed] = &[
    always(
        "files and directories, within what Landlock and the slot uid allow",
        &[
            ("read", libc::SYS_read),
            ("write", libc::SYS_write),
            ("open", libc::SYS_open),
            ("openat", libc::SYS_openat),
            ("openat2", libc::SYS_openat2),
            ("close", libc::SYS_close),
            ("close_range", libc::SYS_close_range),
            ("stat", libc::SYS_stat),
            ("fstat", libc::SYS_fstat),
            ("lstat", libc::SYS_lstat),
            ("newfstatat", libc::SYS_newfstatat),
            ("statx", libc::SYS_statx),
            ("statfs", libc::SYS_statfs),
            ("fstatfs", libc::SYS_fstatfs),
            ("lseek", libc::SYS_lseek),
            ("pread64", libc::SYS_pread64),
            ("pwrite64", libc::SYS_pwrite64),
            ("readv", libc::SYS_readv),
            ("writev", libc::SYS_writev),
            ("preadv", libc::SYS_preadv),
            ("pwritev", libc::SYS_pwritev),
            ("preadv2", libc::SYS_preadv2),
            ("pwritev2", libc::SYS_pwritev2),
            ("access", libc::SYS_access),
            ("faccessat", libc::SYS_faccessat),
            ("faccessat2", libc::SYS_faccessat2),
            ("dup", libc::SYS_dup),
            ("dup2", libc::SYS_dup2),
            ("dup3", libc::SYS_dup3),
            ("fcntl", libc::SYS_fcntl),
            ("flock", libc::SYS_flock),
            ("fsync", libc::SYS_fsync),
            ("fdatasync", libc::SYS_fdatasync),
            ("truncate", libc::SYS_truncate),
            ("ftruncate", libc::SYS_ftruncate),
            ("fallocate", libc::SYS_fallocate),
            ("fadvise64", libc::SYS_fadvise64),
            ("getdents", libc::SYS_getdents),
            ("getdents64", libc::SYS_getdents64),
            ("getcwd", libc::SYS_getcwd),
            ("chdir", libc::SYS_chdir),
            ("fchdir", libc::SYS_fchdir),
            ("rename", libc::SYS_rename),
            ("renameat", libc::SYS_renameat),
            ("renameat2", libc::SYS_renameat2),
            ("mkdir", libc::SYS_mkdir),
            ("mkdirat", libc::SYS_mkdirat),
            // FIFOs (os.mkfifo) and plain files; device nodes need CAP_MKNOD, which runs lack.
            ("mknod", libc::SYS_mknod),
            ("mknodat", libc::SYS_mknodat),
            ("rmdir", libc::SYS_rmdir),
            ("creat", libc::SYS_creat),
            ("link", libc::SYS_link),
            ("linkat", libc::SYS_linkat),
            ("unlink", libc::SYS_unlink),
            ("unlinkat", libc::SYS_unlinkat),
            ("symlink", libc::SYS_symlink),
            ("symlinkat", libc::SYS_symlinkat),
            ("readlink", libc::SYS_readlink),
            ("readlinkat", libc::SYS_readlinkat),
            ("chmod", libc::SYS_chmod),
            ("fchmod", libc::SYS_fchmod),
            ("fchmodat", libc::SYS_fchmodat),
            ("fchmodat2", libc::SYS_fchmodat2),
            ("chown", libc::SYS_chown),
            ("fchown", libc::SYS_fchown),
            ("lchown", libc::SYS_lchown),
            ("fchownat", libc::SYS_fchownat),
            ("umask", libc::SYS_umask),
            ("utime", libc::SYS_utime),
            ("utimes", libc::SYS_utimes),
            ("utimensat", libc::SYS_utimensat),
            ("futimesat", libc::SYS_futimesat),
            ("sendfile", libc::SYS_sendfile),
            ("copy_file_range", libc::SYS_copy_file_range),
            ("splice", libc::SYS_splice),
            ("tee", libc::SYS_tee),
            ("sync_file_range", libc::SYS_sync_file_range),
            ("readahead", libc::SYS_readahead),
            ("getxattr", libc::SYS_getxattr),
            ("lgetxattr", libc::SYS_lgetxattr),
            ("fgetxattr", libc::SYS_fgetxattr),
            ("listxattr", libc::SYS_listxattr),
            ("llistxattr", libc::SYS_llistxattr),
            ("flistxattr", libc::SYS_flistxattr),
        ],
    ),
    always(
        "terminal queries (isatty) and descriptor flags; the run has no terminal",
        &[("ioctl", libc::SYS_ioctl)],
    ),
    always(
        "pipes, waiting on descriptors and event descriptors",
        &[
            ("pipe", libc::SYS_pipe),
            ("pipe2", libc::SYS_pipe2),
            ("poll", libc::SYS_poll),
            ("ppoll", libc::SYS_ppoll),
            ("select", libc::SYS_select),
            ("pselect6", libc::SYS_pselect6),
            ("epoll_create", libc::SYS_epoll_create),
            ("epoll_create1", libc::SYS_epoll_create1),
            ("epoll_ctl", libc::SYS_epoll_ctl),
            ("epoll_wait", libc::SYS_epoll_wait),
            ("epoll_pwait", libc::SYS_epoll_pwait),
            ("epoll_pwait2", libc::SYS_epoll_pwait2),
            ("eventfd", libc::SYS_eventfd),
            ("eventfd2", libc::SYS_eventfd2),
            ("timerfd_create", libc::SYS_timerfd_create),
            ("timerfd_settime", libc::SYS_timerfd_settime),
            ("timerfd_gettime", libc::SYS_timerfd_gettime),
            ("signalfd", libc::SYS_signalfd),
            ("signalfd4", libc::SYS_signalfd4),
        ],
    ),
    always(
        "memory: the allocator, numpy, ctypes and the dynamic loader",
        &[
            ("mmap", libc::SYS_mmap),
            ("munmap", libc::SYS_munmap),
            ("mprotect", libc::SYS_mprotect),
            ("mremap", libc::SYS_mremap),
            ("brk", libc::SYS_brk),
            ("madvise", libc::SYS_madvise),
            ("msync", libc::SYS_msync),
            ("mincore", libc::SYS_mincore),
            ("memfd_create", libc::SYS_memfd_create),
            ("mbind", libc::SYS_mbind),
            ("get_mempolicy", libc::SYS_get_mempolicy),
            ("set_mempolicy", libc::SYS_set_mempolicy),
            ("membarrier", libc::SYS_membarrier),
        ],
    ),
    always(
        "processes and threads of the run itself (namespaces excluded, see clone)",
        &[
            ("fork", libc::SYS_fork),
            ("vfork", libc::SYS_vfork),
            ("execve", libc::SYS_execve),
            ("execveat", libc::SYS_execveat),
            ("exit", libc::SYS_exit),
            ("exit_group", libc::SYS_exit_group),
            ("wait4", libc::SYS_wait4),
            ("waitid", libc::SYS_waitid),
            ("set_tid_address", libc::SYS_set_tid_address),
            ("set_robust_list", libc::SYS_set_robust_list),
            ("get_robust_list", libc::SYS_get_robust_list),
            ("rseq", libc::SYS_rseq),
            ("arch_prctl", libc::SYS_arch_prctl),
            ("futex", libc::SYS_futex),
            ("futex_waitv", libc::SYS_futex_waitv),
            ("sched_yield", libc::SYS_sched_yield),
            ("sched_getaffinity", libc::SYS_sched_getaffinity),
            ("sched_setaffinity", libc::SYS_sched_setaffinity),
            ("sched_getparam", libc::SYS_sched_getparam),
            ("sched_getscheduler", libc::SYS_sched_getscheduler),
            ("sched_get_priority_max", libc::SYS_sched_get_priority_max),
            ("sched_get_priority_min", libc::SYS_sched_get_priority_min),
            ("sched_getattr", libc::SYS_sched_getattr),
            ("getpriority", libc::SYS_getpriority),
            ("setpriority", libc::SYS_setpriority),
            ("getcpu", libc::SYS_getcpu),
        ],
    ),
    Allowed {
        reason: "fork and threads; namespace flags are refused (new namespaces widen the \
                 kernel's attack surface)",
        calls: &[("clone", libc::SYS_clone)],
        when: Condition::ArgLacksBits {
            arg: 0,
            mask: NAMESPACE_FLAGS,
        },
    },
    always(
        "identities and process attributes: a warm child enters its sandbox under this \
         filter (set*id, rlimits, prctl), and an unprivileged run cannot gain anything from them",
        &[
            ("getpid", libc::SYS_getpid),
            ("getppid", libc::SYS_getppid),
            ("gettid", libc::SYS_gettid),
            ("getuid", libc::SYS_getuid),
            ("geteuid", libc::SYS_geteuid),
            ("getgid", libc::SYS_getgid),
            ("getegid", libc::SYS_getegid),
            ("getresuid", libc::SYS_getresuid),
            ("getresgid", libc::SYS_getresgid),
            ("getgroups", libc::SYS_getgroups),
            ("setuid", libc::SYS_setuid),
            ("setgid", libc::SYS_setgid),
            ("setreuid", libc::SYS_setreuid),
            ("setregid", libc::SYS_setregid),
            ("setresuid", libc::SYS_setresuid),
            ("setresgid", libc::SYS_setresgid),
            ("setgroups", libc::SYS_setgroups),
            ("setfsuid", libc::SYS_setfsuid),
            ("setfsgid", libc::SYS_setfsgid),
            ("capget", libc::SYS_capget),
            ("getpgid", libc::SYS_getpgid),
            ("getpgrp", libc::SYS_getpgrp),
            ("setpgid", libc::SYS_setpgid),
            ("getsid", libc::SYS_getsid),
            ("setsid", libc::SYS_setsid),
            ("prctl", libc::SYS_prctl),
            ("getrlimit", libc::SYS_getrlimit),
            ("setrlimit", libc::SYS_setrlimit),
            ("prlimit64", libc::SYS_prlimit64),
            ("getrusage", libc::SYS_getrusage),
            ("times", libc::SYS_times),
            ("uname", libc::SYS_uname),
            ("sysinfo", libc::SYS_sysinfo),
            ("landlock_create_ruleset", libc::SYS_landlock_create_ruleset),
            ("landlock_add_rule", libc::SYS_landlock_add_rule),
            ("landlock_restrict_self", libc::SYS_landlock_restrict_self),
        ],
    ),
    always(
        "adding seccomp filters, which only narrow what a process may do: a fresh interpreter \
         and the zygote install the second program of this policy under the first",
        &[("seccomp", libc::SYS_seccomp)],
    ),
    always(
        "signals, to the run's own processes (the slot uid and Landlock keep others out)",
        &[
            ("rt_sigaction", libc::SYS_rt_sigaction),
            ("rt_sigprocmask", libc::SYS_rt_sigprocmask),
            ("rt_sigreturn", libc::SYS_rt_sigreturn),
            ("restart_syscall", libc::SYS_restart_syscall),
            ("rt_sigpending", libc::SYS_rt_sigpending),
            ("rt_sigtimedwait", libc::SYS_rt_sigtimedwait),
            ("rt_sigsuspend", libc::SYS_rt_sigsuspend),
            ("rt_sigqueueinfo", libc::SYS_rt_sigqueueinfo),
            ("rt_tgsigqueueinfo", libc::SYS_rt_tgsigqueueinfo),
            ("sigaltstack", libc::SYS_sigaltstack),
            ("kill", libc::SYS_kill),
            ("tkill", libc::SYS_tkill),
            ("tgkill", libc::SYS_tgkill),
            ("pause", libc::SYS_pause),
        ],
    ),
    always(
        "time and timers",
        &[
            ("clock_gettime", libc::SYS_clock_gettime),
            ("clock_getres", libc::SYS_clock_getres),
            ("clock_nanosleep", libc::SYS_clock_nanosleep),
            ("gettimeofday", libc::SYS_gettimeofday),
            ("time", libc::SYS_time),
            ("nanosleep", libc::SYS_nanosleep),
            ("alarm", libc::SYS_alarm),
            ("getitimer", libc::SYS_getitimer),
            ("setitimer", libc::SYS_setitimer),
            ("timer_create", libc::SYS_timer_create),
            ("timer_settime", libc::SYS_timer_settime),
            ("timer_gettime", libc::SYS_timer_gettime),
            ("timer_getoverrun", libc::SYS_timer_getoverrun),
            ("timer_delete", libc::SYS_timer_delete),
        ],
    ),
    always(
        "randomness (os.urandom, the reseeds)",
        &[("getrandom", libc::SYS_getrandom)],
    ),
    Allowed {
        reason: "unix sockets only (socketpair, multiprocessing); no other family",
        calls: &[
            ("socket", libc::SYS_socket),
            ("socketpair", libc::SYS_socketpair),
        ],
        when: Condition::IntEq {
            arg: 0,
            value: libc::AF_UNIX as u32,
        },
    },
    always(
        "using sockets the run holds (a socket pair, the zygote's control socket); connect, \
         bind, listen and accept are not allowed, so no socket reaches beyond",
        &[
            ("recvfrom", libc::SYS_recvfrom),
            ("sendmsg", libc::SYS_sendmsg),
            ("recvmsg", libc::SYS_recvmsg),
            ("sendmmsg", libc::SYS_sendmmsg),
            ("recvmmsg", libc::SYS_recvmmsg),
            ("shutdown", libc::SYS_shutdown),
            ("getsockname", libc::SYS_getsockname),
            ("getpeername", libc::SYS_getpeername),
            ("getsockopt", libc::SYS_getsockopt),
            ("setsockopt", libc::SYS_setsockopt),
        ],
    ),
    Allowed {
        reason: "sending on a connected socket; with a destination address it could reach a \
                 host datagram socket",
        calls: &[("sendto", libc::SYS_sendto)],
        when: Condition::NullPointer { arg: 4 },
    },
];

/// The namespaces a warm child makes for itself when it enters its sandbox.
pub const PRIVATE_NAMESPACES: libc::c_int =
    libc::CLONE_NEWUTS | libc::CLONE_NEWIPC | libc::CLONE_NEWNS;

/// Allowed to the zygote and to its children until they have entered their sandbox: the zygote
/// forks each warm child into a PID namespace made for it, and a warm child makes its own UTS,
/// IPC and mount namespaces, names its host and mounts its tmpfs and /proc, under the filter it
/// inherited. Each child then adds [`compile_entry_closed`], which refuses these again, before
/// any run's code.
pub const ENTRY: &[Allowed] = &[
    Allowed {
        reason: "a warm child's own UTS, IPC, mount and user namespaces, made as it enters \
                 its sandbox, and the runs' PID namespaces, made by the zygote's helper",
        calls: &[("unshare", libc::SYS_unshare)],
        when: Condition::FlagsWithin {
            arg: 0,
            allowed: (PRIVATE_NAMESPACES | libc::CLONE_NEWPID | libc::CLONE_NEWUSER) as u64,
        },
    },
    Allowed {
        reason: "the zygote forks a warm child into the PID namespace made for it, then \
                 returns to its own; a warm child joins the view of the filesystem it copies \
                 for its mount namespace",
        calls: &[("setns", libc::SYS_setns)],
        when: Condition::IntIn {
            arg: 1,
            values: &[libc::CLONE_NEWPID as u32, libc::CLONE_NEWNS as u32],
        },
    },
    always(
        "a warm child names the host of its UTS namespace, mounts its private tmpfs and \
         /proc, and drops the capabilities it holds in its user namespace",
        &[
            ("sethostname", libc::SYS_sethostname),
            ("mount", libc::SYS_mount),
            ("capset", libc::SYS_capset),
        ],
    ),
];

/// Calls that return `ENOSYS`, so that libraries fall back to calls the policy allows.
pub const ENOSYS: &[(&str, c_long, &str)] = &[
    (
        "clone3",
        libc::SYS_clone3,
        "its flags live in memory the filter cannot read; glibc falls back to clone",
    ),
    (
        "io_uring_setup",
        libc::SYS_io_uring_setup,
        "io_uring performs operations the filter never sees",
    ),
    (
        "io_uring_enter",
        libc::SYS_io_uring_enter,
        "io_uring performs operations the filter never sees",
    ),
    (
        "io_uring_register",
        libc::SYS_io_uring_register,
        "io_uring performs operations the filter never sees",
    ),
];

/// Left out on purpose, with the reason; a test checks that none of them is allowed.
pub const NEVER: &[(&str, c_long, &str)] = &[
    (
        "connect",
        libc::SYS_connect,
        "no network, not even host unix sockets",
    ),
    (
        "bind",
        libc::SYS_bind,
        "no listening services, abstract unix sockets included",
    ),
    ("listen", libc::SYS_listen, "no listening services"),
    ("accept", libc::SYS_accept, "no listening services"),
    ("accept4", libc::SYS_accept4, "no listening services"),
    (
        "ptrace",
        libc::SYS_ptrace,
        "no inspecting or controlling other processes",
    ),
    (
        "process_vm_readv",
        libc::SYS_process_vm_readv,
        "no reading other processes' memory",
    ),
    (
        "process_vm_writev",
        libc::SYS_process_vm_writev,
        "no writing other processes' memory",
    ),
    (
        "kcmp",
        libc::SYS_kcmp,
        "no probing other processes' kernel state",
    ),
    (
        "pidfd_getfd",
        libc::SYS_pidfd_getfd,
        "no stealing other processes' descriptors",
    ),
    ("mount", libc::SYS_mount, "no changing the filesystem view"),
    (
        "umount2",
        libc::SYS_umount2,
        "no changing the filesystem view",
    ),
    (
        "pivot_root",
        libc::SYS_pivot_root,
        "no changing the filesystem view",
    ),
    (
        "chroot",
        libc::SYS_chroot,
        "no changing the filesystem view",
    ),
    ("fsopen", libc::SYS_fsopen, "the new mount API"),
    ("open_tree", libc::SYS_open_tree, "the new mount API"),
    (
        "unshare",
        libc::SYS_unshare,
        "no new namespaces: they widen the kernel's attack surface",
    ),
    ("setns", libc::SYS_setns, "no joining other namespaces"),
    (
        "bpf",
        libc::SYS_bpf,
        "eBPF is a large kernel attack surface",
    ),
    (
        "perf_event_open",
        libc::SYS_perf_event_open,
        "side channels, a large attack surface",
    ),
    (
        "userfaultfd",
        libc::SYS_userfaultfd,
        "widens kernel race windows in exploits",
    ),
    (
        "keyctl",
        libc::SYS_keyctl,
        "the kernel keyring is not namespaced",
    ),
    (
        "add_key",
        libc::SYS_add_key,
        "the kernel keyring is not namespaced",
    ),
    (
        "request_key",
        libc::SYS_request_key,
        "the kernel keyring is not namespaced",
    ),
    (
        "open_by_handle_at",
        libc::SYS_open_by_handle_at,
        "opens files bypassing paths",
    ),
    (
        "shmget",
        libc::SYS_shmget,
        "System V IPC is shared by the host's processes of a uid",
    ),
    (
        "semget",
        libc::SYS_semget,
        "System V IPC is shared by the host's processes of a uid",
    ),
    (
        "msgget",
        libc::SYS_msgget,
        "System V IPC is shared by the host's processes of a uid",
    ),
    (
        "mq_open",
        libc::SYS_mq_open,
        "POSIX message queues are host-wide",
    ),
    (
        "mlock",
        libc::SYS_mlock,
        "pinning memory the cgroup cannot reclaim",
    ),
    (
        "personality",
        libc::SYS_personality,
        "can turn off address space randomisation",
    ),
    ("syslog", libc::SYS_syslog, "the kernel log leaks addresses"),
    ("kexec_load", libc::SYS_kexec_load, "host administration"),
    ("init_module", libc::SYS_init_module, "host administration"),
    ("reboot", libc::SYS_reboot, "host administration"),
    ("swapon", libc::SYS_swapon, "host administration"),
    (
        "settimeofday",
        libc::SYS_settimeofday,
        "the clock is the host's",
    ),
    (
        "clock_settime",
        libc::SYS_clock_settime,
        "the clock is the host's",
    ),
    (
        "sethostname",
        libc::SYS_sethostname,
        "the host name is the host's",
    ),
    ("iopl", libc::SYS_iopl, "direct hardware access"),
    ("ioperm", libc::SYS_ioperm, "direct hardware access"),
    (
        "sched_setscheduler",
        libc::SYS_sched_setscheduler,
        "real-time scheduling",
    ),
    (
        "fanotify_init",
        libc::SYS_fanotify_init,
        "watching the host's filesystem",
    ),
    (
        "inotify_init1",
        libc::SYS_inotify_init1,
        "watching the host's filesystem",
    ),
    ("vhangup", libc::SYS_vhangup, "terminal control of the host"),
];

/// System call numbers with this bit are x32 calls, a second table on x86_64 kernels.
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

/// A policy that does not compile.
#[derive(Debug, Error)]
pub enum SeccompError {
    #[error("cannot build the seccomp filter: {0}")]
    Build(#[from] seccompiler::BackendError),
}

/// How many calls the policy allows (for reports).
pub fn allowed_count(policy: &[Allowed]) -> usize {
    policy.iter().map(|a| a.calls.len()).sum()
}

/// Compiles the allowlist into BPF programs, in the order to install them: the allowlist
/// (`EPERM` for anything else), then the `ENOSYS` calls. The kernel runs every installed program
/// and applies the strictest answer; between two errnos the last installed program's wins, so
/// the `ENOSYS` calls return `ENOSYS`.
pub fn compile(policy: &[Allowed]) -> Result<Vec<BpfProgram>, SeccompError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for allowed in policy {
        for &(_, nr) in allowed.calls {
            // An empty chain matches every call; the rules of one chain are alternatives.
            let chain = rules.entry(nr).or_default();
            let (arg, len, op, value) = match allowed.when {
                Condition::Always => continue,
                Condition::IntEq { arg, value } => {
                    (arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value.into())
                }
                Condition::IntIn { arg, values } => {
                    for &value in values {
                        chain.push(SeccompRule::new(vec![SeccompCondition::new(
                            arg,
                            SeccompCmpArgLen::Dword,
                            SeccompCmpOp::Eq,
                            value.into(),
                        )?])?);
                    }
                    continue;
                }
                Condition::NullPointer { arg } => {
                    (arg, SeccompCmpArgLen::Qword, SeccompCmpOp::Eq, 0)
                }
                Condition::FlagsWithin { arg, allowed } => (
                    arg,
                    SeccompCmpArgLen::Qword,
                    SeccompCmpOp::MaskedEq(!allowed),
                    0,
                ),
                Condition::ArgLacksBits { arg, mask } => (
                    arg,
                    SeccompCmpArgLen::Qword,
                    SeccompCmpOp::MaskedEq(mask),
                    0,
                ),
            };
            chain.push(SeccompRule::new(vec![SeccompCondition::new(
                arg, len, op, value,
            )?])?);
        }
    }
    let allowlist = program(
        rules,
        SeccompAction::Errno(libc::EPERM as u32),
        SeccompAction::Allow,
    )?;
    let enosys = refusing(ENOSYS.iter().map(|&(_, nr, _)| nr), libc::ENOSYS)?;
    Ok(vec![allowlist, enosys])
}

/// The zygote's programs: the policy with [`ENTRY`] added.
pub fn compile_for_zygote() -> Result<Vec<BpfProgram>, SeccompError> {
    let policy: Vec<Allowed> = POLICY.iter().chain(ENTRY).copied().collect();
    compile(&policy)
}

/// The program a warm child adds once it has entered its sandbox: the calls of [`ENTRY`] fail
/// with `EPERM` again, whatever their arguments.
pub fn compile_entry_closed() -> Result<BpfProgram, SeccompError> {
    refusing(
        ENTRY.iter().flat_map(|a| a.calls).map(|&(_, nr)| nr),
        libc::EPERM,
    )
}

/// A program that fails `calls` with `errno` and allows everything else.
fn refusing(
    calls: impl Iterator<Item = c_long>,
    errno: libc::c_int,
) -> Result<BpfProgram, SeccompError> {
    let rules = calls.map(|nr| (nr, Vec::new())).collect();
    program(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(errno as u32),
    )
}

/// `rules` compiled for x86_64, with the x32 check: `matched` for calls that match a rule,
/// `mismatch` for every other.
fn program(
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    mismatch: SeccompAction,
    matched: SeccompAction,
) -> Result<BpfProgram, SeccompError> {
    let mut program: BpfProgram =
        SeccompFilter::new(rules, mismatch, matched, TargetArch::x86_64)?.try_into()?;
    insert_x32_check(&mut program);
    Ok(program)
}

/// Adds, right after seccompiler's architecture check, "kill the process if the call number has
/// the x32 bit". seccompiler emits that check as exactly three instructions (load arch, compare,
/// kill), and every jump after it is relative, so inserting at index 3 keeps the program valid.
fn insert_x32_check(program: &mut BpfProgram) {
    const LD_W_ABS: u16 = 0x20;
    const JSET_K: u16 = 0x45;
    const RET_K: u16 = 0x06;
    const NR_OFFSET: u32 = 0;
    let check = [
        sock_filter {
            code: LD_W_ABS,
            jt: 0,
            jf: 0,
            k: NR_OFFSET,
        },
        sock_filter {
            code: JSET_K,
            jt: 0,
            jf: 1,
            k: X32_SYSCALL_BIT,
        },
        sock_filter {
            code: RET_K,
            jt: 0,
            jf: 0,
            k: libc::SECCOMP_RET_KILL_PROCESS,
        },
    ];
    program.splice(3..3, check);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_call_is_listed_once_with_a_reason() {
        let mut seen = std::collections::BTreeSet::new();
        for allowed in POLICY {
            assert!(!allowed.reason.is_empty());
            for &(name, nr) in allowed.calls {
                assert!(seen.insert(nr), "{name} is listed twice");
            }
        }
        for &(name, nr, reason) in ENOSYS {
            assert!(!reason.is_empty());
            assert!(seen.insert(nr), "{name} is both allowed and ENOSYS");
        }
    }

    #[test]
    fn nothing_left_out_on_purpose_is_allowed() {
        for &(name, nr, reason) in NEVER {
            assert!(!reason.is_empty());
            let allowed = POLICY.iter().any(|a| a.calls.iter().any(|&(_, n)| n == nr));
            assert!(!allowed, "{name} is in the allowlist");
        }
    }

    #[test]
    fn the_policy_compiles() {
        assert_eq!(compile(POLICY).unwrap().len(), 2);
        assert_eq!(compile_for_zygote().unwrap().len(), 2);
        compile_entry_closed().unwrap();
    }
}

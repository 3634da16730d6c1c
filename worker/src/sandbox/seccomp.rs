//! The seccomp policy: a table of denied system calls, each with the reason it is denied, compiled
//! once into BPF programs that every run's child installs before it executes Python.
//!
//! This first policy is a deny list over a default of "allow". Its weak spot, system call numbers
//! that the table does not name, is closed for the two ways around a deny list on x86_64: calls
//! made with another architecture's numbering (i386 via `int 0x80`) kill the process in
//! seccompiler's own prologue, and x32 numbers (bit 30 set) kill it in a check added here.

use std::collections::BTreeMap;

use seccompiler::{
    sock_filter, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};
use thiserror::Error;

/// What a denied call returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denial {
    /// `EPERM`: the caller is not allowed.
    Eperm,
    /// `ENOSYS`: the caller believes the kernel lacks the call and falls back (glibc falls back
    /// from clone3 to clone only on ENOSYS).
    Enosys,
}

/// When an entry applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Condition {
    /// On every call.
    Always,
    /// When argument `arg` differs from `value` (e.g. a socket family other than AF_UNIX).
    ArgNe { arg: u8, value: u64 },
    /// When argument `arg` has any of the bits in `mask` set (e.g. namespace flags of clone).
    ArgHasBits { arg: u8, mask: u64 },
}

/// One entry of the policy.
#[derive(Debug, Clone, Copy)]
pub struct Entry {
    pub name: &'static str,
    pub nr: libc::c_long,
    pub when: Condition,
    pub denial: Denial,
    pub reason: &'static str,
}

const fn deny(name: &'static str, nr: libc::c_long, reason: &'static str) -> Entry {
    Entry {
        name,
        nr,
        when: Condition::Always,
        denial: Denial::Eperm,
        reason,
    }
}

const NAMESPACE_FLAGS: u64 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWCGROUP) as u64;

/// The policy. Everything not listed is allowed.
pub const POLICY: &[Entry] = &[
    Entry {
        name: "socket",
        nr: libc::SYS_socket,
        when: Condition::ArgNe {
            arg: 0,
            value: libc::AF_UNIX as u64,
        },
        denial: Denial::Eperm,
        reason: "no network: only AF_UNIX sockets (used by multiprocessing) may be created",
    },
    deny(
        "connect",
        libc::SYS_connect,
        "no network: nothing to connect to, not even host unix sockets",
    ),
    deny(
        "bind",
        libc::SYS_bind,
        "no listening services, including abstract unix sockets",
    ),
    deny("listen", libc::SYS_listen, "no listening services"),
    deny("accept", libc::SYS_accept, "no listening services"),
    deny("accept4", libc::SYS_accept4, "no listening services"),
    deny(
        "ptrace",
        libc::SYS_ptrace,
        "no inspecting or controlling other processes",
    ),
    deny(
        "process_vm_readv",
        libc::SYS_process_vm_readv,
        "no reading other processes' memory",
    ),
    deny(
        "process_vm_writev",
        libc::SYS_process_vm_writev,
        "no writing other processes' memory",
    ),
    deny(
        "kcmp",
        libc::SYS_kcmp,
        "no probing other processes' kernel state",
    ),
    deny(
        "pidfd_getfd",
        libc::SYS_pidfd_getfd,
        "no stealing other processes' descriptors",
    ),
    deny("mount", libc::SYS_mount, "no changing the filesystem view"),
    deny(
        "umount2",
        libc::SYS_umount2,
        "no changing the filesystem view",
    ),
    deny(
        "pivot_root",
        libc::SYS_pivot_root,
        "no changing the filesystem view",
    ),
    deny(
        "chroot",
        libc::SYS_chroot,
        "no changing the filesystem view",
    ),
    deny("open_tree", libc::SYS_open_tree, "new mount API"),
    deny("move_mount", libc::SYS_move_mount, "new mount API"),
    deny("fsopen", libc::SYS_fsopen, "new mount API"),
    deny("fsconfig", libc::SYS_fsconfig, "new mount API"),
    deny("fsmount", libc::SYS_fsmount, "new mount API"),
    deny("fspick", libc::SYS_fspick, "new mount API"),
    deny("mount_setattr", libc::SYS_mount_setattr, "new mount API"),
    deny(
        "unshare",
        libc::SYS_unshare,
        "no new namespaces: user namespaces widen the kernel's attack surface",
    ),
    deny("setns", libc::SYS_setns, "no joining other namespaces"),
    Entry {
        name: "clone",
        nr: libc::SYS_clone,
        when: Condition::ArgHasBits {
            arg: 0,
            mask: NAMESPACE_FLAGS,
        },
        denial: Denial::Eperm,
        reason: "no new namespaces through clone flags; plain fork and threads stay allowed",
    },
    Entry {
        name: "clone3",
        nr: libc::SYS_clone3,
        when: Condition::Always,
        denial: Denial::Enosys,
        reason:
            "its flags live in memory seccomp cannot read; ENOSYS makes glibc fall back to clone",
    },
    deny(
        "bpf",
        libc::SYS_bpf,
        "eBPF is a large kernel attack surface",
    ),
    deny(
        "perf_event_open",
        libc::SYS_perf_event_open,
        "side channels and a large attack surface",
    ),
    deny(
        "userfaultfd",
        libc::SYS_userfaultfd,
        "used to widen kernel race windows in exploits",
    ),
    deny(
        "keyctl",
        libc::SYS_keyctl,
        "the kernel keyring is shared and not namespaced",
    ),
    deny(
        "add_key",
        libc::SYS_add_key,
        "the kernel keyring is shared and not namespaced",
    ),
    deny(
        "request_key",
        libc::SYS_request_key,
        "the kernel keyring is shared and not namespaced",
    ),
    Entry {
        name: "io_uring_setup",
        nr: libc::SYS_io_uring_setup,
        when: Condition::Always,
        denial: Denial::Enosys,
        reason: "io_uring bypasses seccomp for the operations it performs",
    },
    Entry {
        name: "io_uring_enter",
        nr: libc::SYS_io_uring_enter,
        when: Condition::Always,
        denial: Denial::Enosys,
        reason: "io_uring bypasses seccomp for the operations it performs",
    },
    Entry {
        name: "io_uring_register",
        nr: libc::SYS_io_uring_register,
        when: Condition::Always,
        denial: Denial::Enosys,
        reason: "io_uring bypasses seccomp for the operations it performs",
    },
    deny(
        "open_by_handle_at",
        libc::SYS_open_by_handle_at,
        "opens files by handle, bypassing paths",
    ),
    deny(
        "name_to_handle_at",
        libc::SYS_name_to_handle_at,
        "companion of open_by_handle_at",
    ),
    deny(
        "fanotify_init",
        libc::SYS_fanotify_init,
        "watching the host's filesystem",
    ),
    deny("kexec_load", libc::SYS_kexec_load, "host administration"),
    deny(
        "kexec_file_load",
        libc::SYS_kexec_file_load,
        "host administration",
    ),
    deny("init_module", libc::SYS_init_module, "host administration"),
    deny(
        "finit_module",
        libc::SYS_finit_module,
        "host administration",
    ),
    deny(
        "delete_module",
        libc::SYS_delete_module,
        "host administration",
    ),
    deny("reboot", libc::SYS_reboot, "host administration"),
    deny("swapon", libc::SYS_swapon, "host administration"),
    deny("swapoff", libc::SYS_swapoff, "host administration"),
    deny("acct", libc::SYS_acct, "host administration"),
    deny("quotactl", libc::SYS_quotactl, "host administration"),
    deny(
        "syslog",
        libc::SYS_syslog,
        "reading the kernel log leaks addresses",
    ),
    deny(
        "settimeofday",
        libc::SYS_settimeofday,
        "the clock is shared with the host",
    ),
    deny(
        "clock_settime",
        libc::SYS_clock_settime,
        "the clock is shared with the host",
    ),
    deny(
        "clock_adjtime",
        libc::SYS_clock_adjtime,
        "the clock is shared with the host",
    ),
    deny(
        "adjtimex",
        libc::SYS_adjtimex,
        "the clock is shared with the host",
    ),
    deny(
        "sethostname",
        libc::SYS_sethostname,
        "the host name is shared with the host",
    ),
    deny(
        "setdomainname",
        libc::SYS_setdomainname,
        "the domain name is shared with the host",
    ),
    deny("iopl", libc::SYS_iopl, "direct hardware access"),
    deny("ioperm", libc::SYS_ioperm, "direct hardware access"),
    deny(
        "personality",
        libc::SYS_personality,
        "can turn off address space randomisation",
    ),
    deny("vhangup", libc::SYS_vhangup, "terminal control of the host"),
    deny(
        "uselib",
        libc::SYS_uselib,
        "obsolete and only an attack surface",
    ),
];

/// System call numbers with this bit are x32 calls, a second table on x86_64 kernels.
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

/// A policy that does not compile.
#[derive(Debug, Error)]
pub enum SeccompError {
    #[error("cannot build the seccomp filter: {0}")]
    Build(#[from] seccompiler::BackendError),
}

/// Compiles the policy into BPF programs, one per kind of denial. The kernel runs every installed
/// program and applies the strictest answer, so splitting by return value loses nothing.
pub fn compile(policy: &[Entry]) -> Result<Vec<BpfProgram>, SeccompError> {
    let mut programs = Vec::new();
    for denial in [Denial::Eperm, Denial::Enosys] {
        let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
        for entry in policy.iter().filter(|e| e.denial == denial) {
            // An empty chain matches every call; the rules of one chain are alternatives.
            let chain = rules.entry(entry.nr).or_default();
            match entry.when {
                Condition::Always => {}
                Condition::ArgNe { arg, value } => {
                    chain.push(SeccompRule::new(vec![SeccompCondition::new(
                        arg,
                        SeccompCmpArgLen::Dword,
                        SeccompCmpOp::Ne,
                        value,
                    )?])?)
                }
                Condition::ArgHasBits { arg, mask } => {
                    for bit in (0..64).map(|i| 1u64 << i).filter(|b| mask & b != 0) {
                        chain.push(SeccompRule::new(vec![SeccompCondition::new(
                            arg,
                            SeccompCmpArgLen::Qword,
                            SeccompCmpOp::MaskedEq(bit),
                            bit,
                        )?])?);
                    }
                }
            }
        }
        if rules.is_empty() {
            continue;
        }
        let errno = match denial {
            Denial::Eperm => libc::EPERM,
            Denial::Enosys => libc::ENOSYS,
        } as u32;
        let mut program: BpfProgram = SeccompFilter::new(
            rules,
            SeccompAction::Allow,
            SeccompAction::Errno(errno),
            TargetArch::x86_64,
        )?
        .try_into()?;
        insert_x32_check(&mut program);
        programs.push(program);
    }
    Ok(programs)
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

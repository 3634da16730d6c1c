//! The seccomp profile of the worker's container (`deploy/docker/seccomp.json`).
//!
//! A container runtime installs this filter on every process of the container: tini, the
//! worker, the zygote and every run. Runs are held by the service's own allowlist on top of it
//! ([`super::seccomp`]), so this profile only has to keep the service's own processes away from
//! what they never need, and let through what the sandbox needs. It is a deny list: Docker's
//! default profile is an allowlist that refuses `pivot_root` to every container and the
//! namespace and mount calls to containers without `CAP_SYS_ADMIN`, so the worker would get no
//! read-only view and no mount or PID namespace with it. This profile refuses what Docker's
//! default refuses to a container that holds `CAP_SYS_ADMIN`, except `pivot_root`, and more
//! besides: every call group below, with its reason.
//!
//! The file is generated from this table (`cargo run -p pyrunner-worker --example
//! container-seccomp > deploy/docker/seccomp.json`), and a test checks that they agree.

use serde_json::{json, Value};

/// Calls refused to every process of the container, in groups, each with its reason.
pub const DENIED: &[(&str, &[&str])] = &[
    (
        "host administration: modules, kexec, reboot, swap, accounting, quotas, obsolete \
         interfaces",
        &[
            "init_module",
            "finit_module",
            "delete_module",
            "create_module",
            "get_kernel_syms",
            "query_module",
            "kexec_load",
            "kexec_file_load",
            "reboot",
            "swapon",
            "swapoff",
            "acct",
            "quotactl",
            "quotactl_fd",
            "nfsservctl",
            "uselib",
            "ustat",
            "sysfs",
            "_sysctl",
            "vhangup",
            "lookup_dcookie",
            "getpmsg",
            "putpmsg",
            "afs_syscall",
            "tuxcall",
            "security",
            "vserver",
        ],
    ),
    (
        "the clock and the domain name are the host's (each run names its own UTS namespace \
         with sethostname, which stays allowed)",
        &[
            "settimeofday",
            "clock_settime",
            "clock_adjtime",
            "adjtimex",
            "setdomainname",
        ],
    ),
    (
        "direct hardware and kernel log access",
        &["iopl", "ioperm", "syslog"],
    ),
    ("the kernel keyring", &["add_key", "request_key", "keyctl"]),
    (
        "reading or changing other processes (the service signals and waits, nothing more)",
        &[
            "ptrace",
            "process_vm_readv",
            "process_vm_writev",
            "process_madvise",
            "kcmp",
            "pidfd_getfd",
        ],
    ),
    (
        "memory placement across NUMA nodes (OpenBLAS falls back without it)",
        &[
            "mbind",
            "set_mempolicy",
            "get_mempolicy",
            "set_mempolicy_home_node",
            "migrate_pages",
            "move_pages",
        ],
    ),
    (
        "eBPF, performance counters, userfaultfd and io_uring: large kernel surfaces the \
         service does not use",
        &[
            "bpf",
            "perf_event_open",
            "userfaultfd",
            "io_uring_setup",
            "io_uring_enter",
            "io_uring_register",
        ],
    ),
    (
        "files by handle, around path checks",
        &["open_by_handle_at", "name_to_handle_at"],
    ),
    (
        "the new mount API and chroot (the sandbox uses mount, umount2 and pivot_root)",
        &[
            "fsopen",
            "fsconfig",
            "fsmount",
            "fspick",
            "open_tree",
            "move_mount",
            "mount_setattr",
            "chroot",
        ],
    ),
    (
        "execution domains, which can turn off address-space randomisation",
        &["personality"],
    ),
];

/// `AF_VSOCK`: sockets to the hypervisor, refused as Docker's default refuses them.
const AF_VSOCK: u32 = 40;

/// The Docker (OCI) seccomp profile: every call allowed but those of [`DENIED`], which fail
/// with `EPERM`, and `socket(AF_VSOCK)`. x86_64 only, like the service's own filter.
pub fn docker_seccomp_profile() -> Value {
    let mut syscalls: Vec<Value> = DENIED
        .iter()
        .map(|(reason, names)| {
            json!({
                "names": names,
                "action": "SCMP_ACT_ERRNO",
                "errnoRet": libc::EPERM,
                "comment": reason,
            })
        })
        .collect();
    syscalls.push(json!({
        "names": ["socket"],
        "action": "SCMP_ACT_ERRNO",
        "errnoRet": libc::EPERM,
        "args": [{"index": 0, "value": AF_VSOCK, "op": "SCMP_CMP_EQ"}],
        "comment": "sockets to the hypervisor",
    }));
    json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": syscalls,
    })
}

/// The profile as the file holds it.
pub fn docker_seccomp_profile_text() -> String {
    let mut text = serde_json::to_string_pretty(&docker_seccomp_profile())
        .expect("a JSON value always serialises");
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_profile_is_the_generated_one() {
        let shipped = include_str!("../../../deploy/docker/seccomp.json");
        assert!(
            shipped == docker_seccomp_profile_text(),
            "deploy/docker/seccomp.json is stale: regenerate it with \
             `cargo run -p pyrunner-worker --example container-seccomp > deploy/docker/seccomp.json`"
        );
    }

    #[test]
    fn the_profile_lets_the_sandbox_through() {
        let denied: Vec<&str> = DENIED
            .iter()
            .flat_map(|(_, names)| names.iter())
            .copied()
            .collect();
        for needed in [
            "unshare",
            "setns",
            "mount",
            "umount2",
            "pivot_root",
            "sethostname",
            "capset",
            "clone",
            "clone3",
            "landlock_create_ruleset",
            "landlock_restrict_self",
            "seccomp",
            "pidfd_open",
            "prctl",
        ] {
            assert!(!denied.contains(&needed), "{needed} is denied");
        }
        let mut seen = std::collections::BTreeSet::new();
        for name in denied {
            assert!(seen.insert(name), "{name} is listed twice");
        }
    }
}

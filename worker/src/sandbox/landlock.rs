//! The Landlock ruleset of a run: what of the filesystem its processes may touch, whatever their
//! uid could. A run may read and execute the Python runtime, the system's libraries and
//! programs, a few files of `/etc` the C library and Python read, `/proc`, the CPU topology
//! in `/sys` and the harmless devices; it may write only in its own working directory, to
//! `/dev/null`, and in `/dev/shm`, where POSIX semaphores live (without it `multiprocessing`'s
//! locks and pools fail; it becomes private to each run with the mount namespace). Everything
//! else (the rest of `/etc`, `/tmp`, `/var/tmp`, other runs' directories, the worker's files) is
//! out of reach, for reading and writing alike.
//!
//! Where the kernel has them (Landlock ABI 6, Linux 6.12), the ruleset also scopes abstract
//! unix sockets and signals to the run's own processes, and (ABI 4) denies TCP bind and
//! connect.
//!
//! The worker builds one ruleset per run, outside the run (opening the allowed paths needs no
//! privilege the run lacks, but is done before the run exists), and hands over its descriptor:
//! the run's process enforces it with `landlock_restrict_self`, one system call, right after
//! `no_new_privs` and before the seccomp filter.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use landlock::{
    path_beneath_rules, Access, AccessFs, AccessNet, CompatLevel, Compatible, Ruleset, RulesetAttr,
    RulesetCreatedAttr, RulesetError, Scope, ABI,
};

/// The newest Landlock ABI this policy knows; older kernels get what they support.
const ABI_TARGET: ABI = ABI::V6;

/// Read-only system paths every run may read and execute (missing ones are skipped).
const SYSTEM_READ: &[&str] = &[
    "/usr",
    "/lib",
    "/lib64",
    "/bin",
    // The dynamic loader's cache and the time zone.
    "/etc/ld.so.cache",
    "/etc/localtime",
    // The process's own view of itself (CPython reads /proc/self/fd, for one).
    "/proc",
    // CPU topology, which the C library and OpenBLAS read to count CPUs.
    "/sys/devices/system/cpu",
    "/dev/zero",
    "/dev/full",
    "/dev/random",
    "/dev/urandom",
];

/// Files every run may also write.
const SYSTEM_WRITE: &[&str] = &["/dev/null"];
/// Directories every run may also write in.
const SHARED_WRITE: &[&str] = &["/dev/shm"];

/// Builds the rulesets of runs.
#[derive(Debug, Clone)]
pub struct LandlockPolicy {
    /// Paths readable and executable besides [`SYSTEM_READ`]: the Python runtime.
    read: Vec<PathBuf>,
}

impl LandlockPolicy {
    /// The policy for runs of the runtime at `runtime_root`, if this kernel has Landlock at all.
    pub fn probe(runtime_root: &Path) -> Result<Self, RulesetError> {
        let policy = Self {
            read: vec![runtime_root.to_path_buf()],
        };
        // A ruleset that cannot be made here never will be: say so once, at start.
        policy.ruleset(runtime_root)?;
        Ok(policy)
    }

    /// A ruleset for a run working in `workdir`, ready to enforce. `None` where the kernel has
    /// no Landlock (it cannot happen after a successful [`probe`](Self::probe) on the same
    /// host, but the kernel decides).
    pub fn ruleset(&self, workdir: &Path) -> Result<Option<OwnedFd>, RulesetError> {
        let read = AccessFs::from_read(ABI_TARGET);
        let created = Ruleset::default()
            // Hard: a ruleset that handles nothing would allow everything silently.
            .set_compatibility(CompatLevel::HardRequirement)
            .handle_access(AccessFs::from_read(ABI::V1))?
            .set_compatibility(CompatLevel::BestEffort)
            .handle_access(AccessFs::from_all(ABI_TARGET))?
            .handle_access(AccessNet::from_all(ABI_TARGET))?
            .scope(Scope::from_all(ABI_TARGET))?
            .create()?
            .add_rules(path_beneath_rules(
                SYSTEM_READ
                    .iter()
                    .map(Path::new)
                    .chain(self.read.iter().map(PathBuf::as_path)),
                read,
            ))?
            .add_rules(path_beneath_rules(SYSTEM_WRITE, read | AccessFs::WriteFile))?
            .add_rules(path_beneath_rules(
                SHARED_WRITE,
                AccessFs::from_all(ABI_TARGET),
            ))?
            .add_rules(path_beneath_rules(
                [workdir],
                AccessFs::from_all(ABI_TARGET),
            ))?;
        Ok(created.into())
    }
}

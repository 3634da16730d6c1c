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
//! The worker builds one ruleset per run, because it names the run's own directory: the fixed
//! paths are opened once at start and shared, so a ruleset costs one `open` and a few
//! `landlock_add_rule` calls. The run's process gets its descriptor and enforces it with
//! `landlock_restrict_self`, one system call, right after `no_new_privs` and before the seccomp
//! filter.

use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;

use super::sys;
use landlock::{
    path_beneath_rules, Access, AccessFs, AccessNet, BitFlags, CompatLevel, Compatible,
    PathBeneath, PathFd, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetError, Scope, ABI,
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

/// Builds the rulesets of runs. The fixed paths are opened once (`O_PATH`) and shared by every
/// ruleset; only the run's own directory is opened per run.
#[derive(Debug, Clone)]
pub struct LandlockPolicy {
    fixed: Arc<Vec<(PathFd, BitFlags<AccessFs>)>>,
    /// Every filesystem right this kernel's Landlock handles (see [`Self::mount_access`]).
    mount_access: u64,
}

impl LandlockPolicy {
    /// The policy for runs of the runtime at `runtime_root`, if this kernel has Landlock at all.
    /// Paths that do not exist on this host are left out.
    pub fn probe(runtime_root: &Path) -> Result<Self, RulesetError> {
        let read = AccessFs::from_read(ABI_TARGET);
        let all = AccessFs::from_all(ABI_TARGET);
        let groups: [(Vec<&Path>, BitFlags<AccessFs>); 3] = [
            (
                SYSTEM_READ
                    .iter()
                    .map(Path::new)
                    .chain([runtime_root])
                    .collect(),
                read,
            ),
            (
                SYSTEM_WRITE.iter().map(Path::new).collect(),
                read | AccessFs::WriteFile,
            ),
            (SHARED_WRITE.iter().map(Path::new).collect(), all),
        ];
        let mut fixed = Vec::new();
        for (paths, access) in groups {
            for path in paths {
                let Ok(fd) = PathFd::new(path) else { continue };
                // A rule on a file may only hold the rights that apply to files.
                let access = if std::fs::metadata(path).is_ok_and(|m| !m.is_dir()) {
                    access & AccessFs::from_file(ABI_TARGET)
                } else {
                    access
                };
                fixed.push((fd, access));
            }
        }
        let policy = Self {
            fixed: Arc::new(fixed),
            mount_access: AccessFs::from_all(ABI::from(sys::landlock_abi()).min(ABI_TARGET)).bits(),
        };
        // A ruleset that cannot be made here never will be: say so once, at start.
        policy.ruleset(Some(runtime_root))?;
        Ok(policy)
    }

    /// The rights a run's process grants itself on the tmpfs it mounts: every filesystem right
    /// this kernel's Landlock handles.
    pub fn mount_access(&self) -> u64 {
        self.mount_access
    }

    /// The rights a run's process grants itself on the procfs it mounts on `/proc` in its own
    /// PID namespace: reading, as on the host's `/proc`.
    pub fn proc_access(&self) -> u64 {
        AccessFs::from_read(ABI::V1).bits()
    }

    /// A ruleset for a run working in `workdir` (none for a run whose directory is a tmpfs of
    /// its own, which it grants itself), ready to enforce. `None` where the kernel has
    /// no Landlock (it cannot happen after a successful [`probe`](Self::probe) on the same
    /// host, but the kernel decides).
    ///
    /// Landlock does not apply a rule on a mount point to what is mounted there: a run that
    /// mounts its own tmpfs (on `workdir`, on /dev/shm) adds rules for them itself, with
    /// [`mount_access`](Self::mount_access), before it enforces the ruleset.
    pub fn ruleset(&self, workdir: Option<&Path>) -> Result<Option<OwnedFd>, RulesetError> {
        let fixed = self
            .fixed
            .iter()
            .map(|(fd, access)| Ok::<_, RulesetError>(PathBeneath::new(fd.as_fd(), *access)));
        let created = Ruleset::default()
            // Hard: a ruleset that handles nothing would allow everything silently.
            .set_compatibility(CompatLevel::HardRequirement)
            .handle_access(AccessFs::from_read(ABI::V1))?
            .set_compatibility(CompatLevel::BestEffort)
            .handle_access(AccessFs::from_all(ABI_TARGET))?
            .handle_access(AccessNet::from_all(ABI_TARGET))?
            .scope(Scope::from_all(ABI_TARGET))?
            .create()?
            .add_rules(fixed)?
            .add_rules(path_beneath_rules(workdir, AccessFs::from_all(ABI_TARGET)))?;
        Ok(created.into())
    }
}

//! The sandbox a run's Python process starts in: its slot's cgroups, an empty network namespace,
//! private user (mapping only its own uid), UTS, IPC, mount and PID namespaces (a copy of a
//! read-only view of only what it needs, with its own tmpfs for its directory, /tmp and
//! /dev/shm, and its own /proc), its own session and process group, resource limits, an
//! unprivileged uid per run slot, `no_new_privs`, a Landlock ruleset and a seccomp allowlist.
//!
//! A worker without real root gets all of it but the cgroups, and a uid per slot only where its
//! user has a subordinate range of ids ([`idmap`]); docs/SECURITY.md says what runs get then.

pub mod cgroup;
pub mod container_profile;
pub mod idmap;
pub mod landlock;
pub mod namespaces;
pub mod rlimits;
pub mod rootfs;
pub mod seccomp;
pub mod sys;

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::process::{Child, Command};
use std::sync::Arc;

use pyrunner_shared::isolation::LayerStatus;
use pyrunner_shared::RunLimits;
use seccompiler::BpfProgram;
use thiserror::Error;

/// Settings of the sandbox that do not vary per run.
#[derive(Debug, Clone)]
pub struct SandboxSettings {
    /// Largest file a run may write, in bytes.
    pub max_file_bytes: u64,
    /// Most descriptors a run's process may hold.
    pub max_open_files: u64,
    /// Most processes and threads a run may have at once.
    pub max_processes: u64,
    /// Size of each private tmpfs of a run (working directory, /dev/shm), in bytes.
    pub max_workdir_bytes: u64,
}

impl Default for SandboxSettings {
    fn default() -> Self {
        Self {
            max_file_bytes: 64 * 1024 * 1024,
            max_open_files: 256,
            max_processes: 64,
            max_workdir_bytes: 256 * 1024 * 1024,
        }
    }
}

/// The outcome of probing an optional layer: logged with `consequence` when it failed, and kept
/// with `why` and the error for the isolation report.
fn probed<T, E: std::fmt::Display>(
    outcome: Result<T, E>,
    consequence: &str,
    why: &str,
) -> Result<T, String> {
    outcome.map_err(|error| {
        tracing::warn!(%error, "{consequence}");
        format!("{why}: {error}")
    })
}

/// A sandbox that cannot be prepared.
#[derive(Debug, Error)]
pub enum SandboxError {
    #[error(transparent)]
    Seccomp(#[from] seccomp::SeccompError),
    #[error("cannot make the run's Landlock ruleset: {0}")]
    Landlock(#[from] ::landlock::RulesetError),
}

/// The sandbox of a worker: settings, the compiled seccomp filters and the network namespace,
/// shared by all runs.
#[derive(Clone)]
pub struct Sandbox {
    settings: SandboxSettings,
    filters: Arc<Vec<BpfProgram>>,
    netns: Result<namespaces::NetNamespace, String>,
    landlock: Result<landlock::LandlockPolicy, String>,
    /// Whether each run gets private UTS and IPC namespaces.
    private_namespaces: Result<(), String>,
    /// The read-only view of the filesystem that each run gets a private copy of, with tmpfs
    /// mounts of its own.
    private_mounts: Result<rootfs::RootView, String>,
    /// Where each run gets a PID namespace (with its own /proc, in its mount namespace).
    pid_namespaces: Result<Arc<namespaces::PidNamespaces>, String>,
    /// Whether each run gets a user namespace of its own, and who the worker is on the host.
    user_namespaces: Result<WorkerIdentity, String>,
}

/// Who the worker is on the host, which decides the ids runs can have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WorkerIdentity {
    /// Real root: slots take ids of the host's.
    HostRoot,
    /// Root of a user namespace (its own, or its container's) that maps its uid and a range of
    /// other ids: slots take ids of the range.
    SubordinateIds,
    /// Root of a user namespace of its own that maps only its uid: runs share it.
    OwnUidOnly,
}

impl WorkerIdentity {
    /// What the runs' user namespaces are, under a worker of this identity.
    fn user_namespace_detail(self) -> &'static str {
        match self {
            Self::HostRoot => {
                "one per run, mapping only the run's uid and gid (root and every other uid are \
                 unmapped); the run holds no capability in it, bounding set included"
            }
            Self::SubordinateIds => {
                "the worker runs without real root, as root of a user namespace that maps its \
                 uid and a range of other ids (its subordinate ids from /etc/subuid, or the \
                 range a container engine mapped); each run has one more inside it, mapping \
                 only its slot's uid and gid, holding no capability"
            }
            Self::OwnUidOnly => {
                "the worker runs without real root, as root of a user namespace of its own that \
                 maps only its uid; each run has one more inside it, as uid 1000, holding no \
                 capability (runs share the worker's uid on the host)"
            }
        }
    }
}

impl Sandbox {
    /// Compiles the seccomp policy, makes the runs' network namespace and checks that Landlock
    /// rulesets can be made for runs of the runtime in `runtime_dir` (each where the host
    /// allows it; see [`namespaces`] and [`landlock`]).
    pub fn new(settings: SandboxSettings, runtime_dir: &Path) -> Result<Self, SandboxError> {
        // Root of a user namespace of its own only (see
        // `namespaces::enter_own_user_namespace_unless_root`).
        let rootless = sys::is_root() && sys::in_own_user_namespace();
        // An id a slot could take: where there is none, runs share the worker's.
        let probe_id = idmap::own_slot_ids(namespaces::PROBE_ID, 1).map(|ids| ids.start);
        let identity = match (rootless, probe_id) {
            (false, _) => WorkerIdentity::HostRoot,
            (true, Some(_)) => WorkerIdentity::SubordinateIds,
            (true, None) => WorkerIdentity::OwnUidOnly,
        };
        let private_mounts = probed(
            rootfs::RootView::build(runtime_dir, rootless).and_then(|view| {
                namespaces::can_make_private_mounts(&view)?;
                Ok(view)
            }),
            "runs see the host's filesystem (as far as Landlock lets them) and share its /tmp \
             and /dev/shm, and their directory has no size cap",
            "cannot make them (they need CAP_SYS_ADMIN and mount)",
        );
        let pid_namespaces = private_mounts
            .as_ref()
            .map_err(|_| "runs have no mount namespace to mount their /proc in".to_owned())
            .and_then(|view| {
                probed(
                    namespaces::PidNamespaces::open().and_then(|pid| {
                        namespaces::can_make_pid_namespaces(&pid, view)?;
                        Ok(Arc::new(pid))
                    }),
                    "runs see the host's processes in /proc and share the worker's PID namespace",
                    "cannot make them (they need CAP_SYS_ADMIN)",
                )
            });
        let user_namespaces = match (&private_mounts, &pid_namespaces) {
            (Ok(view), Ok(pid)) => probed(
                namespaces::can_make_user_namespaces(pid, view, probe_id).map(|()| identity),
                "runs hold their uid in the host's user namespace",
                "cannot make them",
            ),
            _ => Err("runs have no PID namespace, whose /proc they need to map their uid".into()),
        };
        let landlock = probed(
            landlock::LandlockPolicy::probe(runtime_dir),
            "no Landlock: runs reach the filesystem as far as their uid allows",
            "cannot make a ruleset",
        );
        let netns = probed(
            namespaces::NetNamespace::create(),
            "runs share the worker's network namespace (seccomp alone keeps them off the network)",
            "cannot make one (it needs CAP_SYS_ADMIN)",
        );
        let private_namespaces = probed(
            namespaces::can_make_private_namespaces(),
            "runs share the worker's UTS and IPC namespaces",
            "cannot make them (they need CAP_SYS_ADMIN)",
        );
        Ok(Self {
            filters: Arc::new(seccomp::compile(seccomp::POLICY)?),
            settings,
            netns,
            landlock,
            private_namespaces,
            private_mounts,
            pid_namespaces,
            user_namespaces,
        })
    }

    /// The status of the layers this sandbox decides, whatever the executor.
    pub fn isolation(&self) -> Vec<(&'static str, LayerStatus)> {
        let s = &self.settings;
        let status = |r: Result<&str, &String>| match r {
            Ok(detail) => LayerStatus::active(detail),
            Err(why) => LayerStatus::inactive(why.as_str()),
        };
        vec![
            (
                "rlimits",
                LayerStatus::active(format!(
                    "CPU seconds and address space per run; files up to {} MiB, {} descriptors, \
                     {} processes, no core dumps",
                    s.max_file_bytes >> 20,
                    s.max_open_files,
                    s.max_processes
                )),
            ),
            (
                "process_group",
                LayerStatus::active("each run leads its own session, killed as a group"),
            ),
            (
                "no_new_privs",
                LayerStatus::active("set before the run's code"),
            ),
            (
                "seccomp",
                LayerStatus::active(format!(
                    "allowlist of {} calls, each with its reason, default EPERM; clone3 and \
                     io_uring ENOSYS; other architectures' and x32 numbers kill",
                    seccomp::allowed_count(seccomp::POLICY)
                )),
            ),
            (
                "empty_env",
                LayerStatus::active("PATH, HOME, TMPDIR, locale and library settings only"),
            ),
            (
                "network_namespace",
                status(
                    self.netns
                        .as_ref()
                        .map(|_| "one empty namespace (a loopback that is down) for all runs"),
                ),
            ),
            (
                "uts_namespace",
                status(
                    self.private_namespaces
                        .as_ref()
                        .map(|_| "one per run, host name \"pyrunner\""),
                ),
            ),
            (
                "mount_namespace",
                status(self.private_mounts.as_ref().map(|_| {
                    "one per run: a read-only view of the runtime, /usr, two files of /etc, the \
                     CPU topology and five devices, and nothing else of the host; private tmpfs \
                     on its directory /work, /tmp and /dev/shm"
                })),
            ),
            (
                "pid_namespace",
                status(self.pid_namespaces.as_ref().map(|_| {
                    "one per run, with an init of its own as pid 1 and its own /proc; the init's \
                     death kills every process left in it"
                })),
            ),
            (
                "user_namespace",
                status(
                    self.user_namespaces
                        .as_ref()
                        .map(|identity| identity.user_namespace_detail()),
                ),
            ),
            (
                "ipc_namespace",
                status(self.private_namespaces.as_ref().map(|_| {
                    "one per run (System V IPC and message queues are refused by seccomp too)"
                })),
            ),
            (
                "landlock",
                status(self.landlock.as_ref().map(|_| {
                    "reads: the runtime, /usr, /lib, /bin, /proc, a few files of /etc and /dev; \
                     writes: the run's directory, /dev/null, /dev/shm; abstract unix sockets \
                     and signals scoped where the kernel can"
                })),
            ),
        ]
    }

    /// The Landlock policy of runs, where the kernel has Landlock.
    pub fn landlock(&self) -> Option<&landlock::LandlockPolicy> {
        self.landlock.as_ref().ok()
    }

    /// The view runs get a private copy of, and the size of each of their tmpfs, where runs
    /// get a mount namespace.
    pub fn private_mounts(&self) -> Option<(&rootfs::RootView, u64)> {
        self.private_mounts
            .as_ref()
            .ok()
            .map(|view| (view, self.settings.max_workdir_bytes))
    }

    /// The directory a run works in: its own tmpfs at [`rootfs::RUN_DIR`] where runs get a
    /// mount namespace, else a private directory under `work_root`, made for `uid`.
    pub fn run_dir(
        &self,
        work_root: &Path,
        uid: Option<u32>,
    ) -> Result<crate::workdir::RunDir, crate::workdir::WorkdirError> {
        crate::workdir::RunDir::make(self.private_mounts.is_ok(), work_root, uid)
    }

    /// Whether runs get private UTS and IPC namespaces.
    pub fn private_namespaces(&self) -> bool {
        self.private_namespaces.is_ok()
    }

    /// Whether each run gets a user namespace of its own.
    pub fn user_namespaces(&self) -> bool {
        self.user_namespaces.is_ok()
    }

    /// Where runs get PID namespaces.
    pub fn pid_namespaces(&self) -> Option<&Arc<namespaces::PidNamespaces>> {
        self.pid_namespaces.as_ref().ok()
    }

    /// The Landlock rights a run's process grants itself on the tmpfs it mounts (0 without
    /// Landlock).
    pub fn landlock_mount_access(&self) -> u64 {
        self.landlock()
            .map_or(0, landlock::LandlockPolicy::mount_access)
    }

    /// The Landlock rights a run's process grants itself on the /proc it mounts (0 without
    /// Landlock).
    pub fn landlock_proc_access(&self) -> u64 {
        self.landlock()
            .map_or(0, landlock::LandlockPolicy::proc_access)
    }

    /// The runs' network namespace, where the host allowed one.
    pub fn netns(&self) -> Option<&namespaces::NetNamespace> {
        self.netns.as_ref().ok()
    }

    /// The Landlock ruleset of a run working in `workdir`, where the kernel has Landlock.
    pub fn landlock_ruleset(
        &self,
        workdir: &crate::workdir::RunDir,
    ) -> Result<Option<OwnedFd>, SandboxError> {
        match &self.landlock {
            Ok(policy) => Ok(policy.ruleset(workdir.host_path())?),
            Err(_) => Ok(None),
        }
    }

    /// Spawns `command` inside the sandbox, as `uid` (and the same gid) when given, and in
    /// `cgroups` when given. `code` (a read end) becomes descriptor 3 and `report` (a write end)
    /// descriptor 4 of the child, and `ruleset` is enforced before exec; the parent's copies
    /// are closed. Where runs get PID namespaces, the child is pid 2 of a new one, and its init
    /// is returned too: kill it once the child has ended.
    #[allow(clippy::too_many_arguments)]
    pub fn spawn(
        &self,
        command: &mut Command,
        limits: &RunLimits,
        uid: Option<u32>,
        cgroups: Option<&cgroup::SlotCgroups>,
        code: OwnedFd,
        report: OwnedFd,
        ruleset: Option<OwnedFd>,
    ) -> io::Result<(Child, Option<namespaces::RunInit>)> {
        let mut fds = vec![
            (code.as_raw_fd(), sys::CODE_FD),
            (report.as_raw_fd(), sys::REPORT_FD),
        ];
        fds.extend(ruleset.as_ref().map(|r| (r.as_raw_fd(), sys::LANDLOCK_FD)));
        let plan = sys::EntryPlan {
            entry: sys::Entry::BeforeExec,
            rlimits: rlimits::for_run(limits, &self.settings, cgroups.is_some()),
            ids: uid.map(|u| (u, u)),
            user_namespace: self
                .user_namespaces()
                .then(|| sys::UserNamespace::for_run(uid.map(|u| (u, u)))),
            fds,
            landlock: ruleset.is_some(),
            cgroup_procs: cgroups.map(|c| c.procs_files()).unwrap_or_default(),
            netns: self.netns().map(namespaces::NetNamespace::fd),
            private_namespaces: self.private_namespaces(),
            mounts: self
                .private_mounts()
                .map(|(view, size)| {
                    let mounts = sys::PrivateMounts::new(
                        view.fd(),
                        uid.map(|u| (u, u)),
                        size,
                        self.landlock_mount_access(),
                    )?;
                    Ok::<_, io::Error>(match self.pid_namespaces() {
                        Some(_) => mounts.with_proc(self.landlock_proc_access()),
                        None => mounts,
                    })
                })
                .transpose()?,
            filters: Arc::clone(&self.filters),
        };
        sys::set_entry(command, plan);
        let spawned = match self.pid_namespaces() {
            Some(pid) => pid
                .spawn_in_new(|| command.spawn())
                .map(|(init, child)| (child, Some(init))),
            None => command.spawn().map(|child| (child, None)),
        };
        drop((code, report, ruleset));
        spawned
    }
}

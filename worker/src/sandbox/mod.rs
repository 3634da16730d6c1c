//! The sandbox a run's Python process starts in: its slot's cgroups, an empty network namespace,
//! its own session and process group, resource limits, an unprivileged uid per run slot,
//! `no_new_privs`, a Landlock ruleset and a seccomp filter.
//!
//! Other namespaces are not applied yet; docs/SECURITY.md says what this leaves open.

pub mod cgroup;
pub mod landlock;
pub mod netns;
pub mod rlimits;
pub mod seccomp;
pub mod sys;

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::process::{Child, Command};
use std::sync::Arc;

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
}

impl Default for SandboxSettings {
    fn default() -> Self {
        Self {
            max_file_bytes: 64 * 1024 * 1024,
            max_open_files: 256,
            max_processes: 64,
        }
    }
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
    netns: Option<netns::NetNamespace>,
    landlock: Option<landlock::LandlockPolicy>,
}

impl Sandbox {
    /// Compiles the seccomp policy, makes the runs' network namespace and checks that Landlock
    /// rulesets can be made for runs of the runtime in `runtime_dir` (each where the host
    /// allows it; see [`netns`] and [`landlock`]).
    pub fn new(settings: SandboxSettings, runtime_dir: &Path) -> Result<Self, SandboxError> {
        let landlock = landlock::LandlockPolicy::probe(runtime_dir)
            .inspect_err(|error| {
                tracing::warn!(
                    %error,
                    "no Landlock: runs reach the filesystem as far as their uid allows"
                )
            })
            .ok();
        let netns = netns::NetNamespace::create()
            .inspect_err(|error| {
                tracing::warn!(
                    %error,
                    "runs share the worker's network namespace (seccomp alone keeps them off \
                     the network)"
                )
            })
            .ok();
        Ok(Self {
            filters: Arc::new(seccomp::compile(seccomp::POLICY)?),
            settings,
            netns,
            landlock,
        })
    }

    /// The protection layers every run gets, for logs and reports.
    pub fn layers(&self) -> Vec<&'static str> {
        let mut layers = vec![
            "rlimits",
            "process_group",
            "no_new_privs",
            "seccomp",
            "empty_env",
        ];
        if self.netns.is_some() {
            layers.push("network_namespace");
        }
        if self.landlock.is_some() {
            layers.push("landlock");
        }
        layers
    }

    /// The Landlock policy of runs, where the kernel has Landlock.
    pub fn landlock(&self) -> Option<&landlock::LandlockPolicy> {
        self.landlock.as_ref()
    }

    /// The runs' network namespace, where the host allowed one.
    pub fn netns(&self) -> Option<&netns::NetNamespace> {
        self.netns.as_ref()
    }

    /// The Landlock ruleset of a run working in `workdir`, where the kernel has Landlock.
    pub fn landlock_ruleset(&self, workdir: &Path) -> Result<Option<OwnedFd>, SandboxError> {
        match &self.landlock {
            Some(policy) => Ok(policy.ruleset(workdir)?),
            None => Ok(None),
        }
    }

    /// Spawns `command` inside the sandbox, as `uid` (and the same gid) when given, and in
    /// `cgroups` when given. `code` (a read end) becomes descriptor 3 and `report` (a write end)
    /// descriptor 4 of the child, and `ruleset` is enforced before exec; the parent's copies
    /// are closed.
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
    ) -> io::Result<Child> {
        let mut fds = vec![
            (code.as_raw_fd(), sys::CODE_FD),
            (report.as_raw_fd(), sys::REPORT_FD),
        ];
        fds.extend(ruleset.as_ref().map(|r| (r.as_raw_fd(), sys::LANDLOCK_FD)));
        let plan = sys::EntryPlan {
            entry: sys::Entry::BeforeExec,
            rlimits: rlimits::for_run(limits, &self.settings, cgroups.is_some()),
            ids: uid.map(|u| (u, u)),
            fds,
            landlock: ruleset.is_some(),
            cgroup_procs: cgroups.map(|c| c.procs_files()).unwrap_or_default(),
            netns: self.netns.as_ref().map(netns::NetNamespace::fd),
            filters: Arc::clone(&self.filters),
        };
        sys::set_entry(command, plan);
        let child = command.spawn();
        drop((code, report, ruleset));
        child
    }
}

//! Per-slot control groups: memory, pids and, where the host has the controller, cpu, for each
//! run slot, so that a run's limits hold for all of its processes together (rlimits hold per
//! process only: a run forking 64 processes could otherwise use 64 times its memory limit), and
//! a run's processes and threads together use at most so many cores. The groups also count what
//! a run used, CPU time and peak memory, of all its processes, as the kernel saw it.
//!
//! Two hierarchies, whichever holds the host's limit controllers: cgroup v1 (`v1`), where a
//! hybrid host keeps them, else cgroup v2 (`v2`), the unified hierarchy of current hosts. The
//! child joins its slot's groups between fork and exec, by writing `0` (itself) to each
//! `cgroup.procs`. A slot's groups are reused run after run: the memory limit is set and the peak
//! counter reset before each run.

mod v1;
mod v2;

use std::ffi::CString;
use std::fs::{self, File};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use thiserror::Error;

/// A cgroup operation failed.
#[derive(Debug, Error)]
pub enum CgroupError {
    #[error("cannot create cgroup {path}: {source}")]
    Create { path: PathBuf, source: io::Error },
    #[error("cannot write {value} to {path}: {source}")]
    Write {
        path: PathBuf,
        value: String,
        source: io::Error,
    },
}

/// The period of the CPU quota, in microseconds: the kernel's default, short enough that a run
/// over its quota waits at most this long.
const CPU_PERIOD_US: u64 = 100_000;

/// The quota of `cpus` cores per [`CPU_PERIOD_US`], in microseconds (the kernel's least is 1 ms).
fn cpu_quota_us(cpus: f64) -> u64 {
    ((cpus * CPU_PERIOD_US as f64) as u64).max(1000)
}

/// What a slot's cgroups limit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CgroupLimits {
    /// Most processes and threads of a run.
    pub max_processes: u64,
    /// Most cores a run's processes may use together; `None` for no quota.
    pub cpus: Option<f64>,
}

/// What a run's cgroup saw.
#[derive(Debug, Clone, Copy, Default)]
pub struct CgroupUsage {
    /// The kernel killed a process of the run for exceeding the memory limit.
    pub oom_killed: bool,
    /// Highest memory use of the whole run (all processes, page cache included), in KiB, where
    /// the kernel can count it per run.
    pub peak_kb: Option<u64>,
    /// CPU time of all the run's processes, waited for or not, in microseconds, where the slot's
    /// group counts it.
    pub cpu_us: Option<u64>,
}

/// What [`SlotCgroups::usage`] compares a run's end with, taken as the run starts.
#[derive(Debug)]
pub struct RunWatch {
    oom_kills_before: u64,
    /// v2: `memory.peak`, reset for the run through this descriptor.
    peak: Option<File>,
    /// Whether the usage will have the run's peak: v1 always, v2 with `peak`.
    peak_counted: bool,
    /// The CPU time the slot's group had used as the run started, in microseconds, where it
    /// counts it.
    cpu_before_us: Option<u64>,
}

impl RunWatch {
    /// Whether the run's usage will have both its CPU time and its peak memory.
    pub fn counts_run(&self) -> bool {
        self.peak_counted && self.cpu_before_us.is_some()
    }

    /// The CPU time used since the run started, from the group's counter now.
    fn cpu_since(&self, now_us: Option<u64>) -> Option<u64> {
        Some(now_us?.saturating_sub(self.cpu_before_us?))
    }
}

/// The cgroup version whose hierarchies hold the slots' groups on this host.
#[derive(Debug)]
enum Hierarchy {
    V1(v1::Parents),
    V2(v2::Base),
}

/// The hierarchy found at the first call of [`hierarchy`], or why there is none.
static FOUND: OnceLock<Result<Hierarchy, String>> = OnceLock::new();

/// The hierarchy for the slots' groups, looked for once: making a place in the v2 hierarchy may
/// move the process (see `v2`).
fn hierarchy() -> Result<&'static Hierarchy, &'static str> {
    FOUND
        .get_or_init(|| {
            let v1 = match v1::Parents::find() {
                Ok(parents) => return Ok(Hierarchy::V1(parents)),
                Err(why) => why,
            };
            v2::Base::set_up()
                .map(Hierarchy::V2)
                .map_err(|v2| format!("{v1}; {v2}"))
        })
        .as_ref()
        .map_err(String::as_str)
}

/// Whether this host has a hierarchy for the slots' groups. The first call as root may move the
/// process to a leaf group of the v2 hierarchy (see `v2`).
pub fn available() -> bool {
    hierarchy().is_ok()
}

/// Looks for the hierarchy now, before the process leaves for a PID namespace of its own: in a
/// group delegated to it, the worker moves every process of the group to a leaf first, and from
/// inside another PID namespace the processes left outside it are listed as pid 0, which cannot
/// be moved. Logs what it found.
pub fn look_for_hierarchy_early() {
    match hierarchy() {
        Ok(found) => tracing::info!(?found, "cgroups for the run slots"),
        Err(why) => tracing::info!(%why, "no cgroups for the run slots"),
    }
}

/// Why the slots get no cgroups, if [`available`] found no hierarchy; `None` if it found one, or
/// was never asked (the worker is not the host's root).
pub fn unavailable_reason() -> Option<&'static str> {
    FOUND
        .get()
        .and_then(|found| found.as_ref().err())
        .map(String::as_str)
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    fs::write(path, value).map_err(|source| CgroupError::Write {
        path: path.to_path_buf(),
        value: value.to_owned(),
        source,
    })
}

fn read_u64(path: &Path) -> Option<u64> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The value of the line `name N` of a flat keyed cgroup file (`memory.events`,
/// `memory.oom_control`, `cgroup.events`).
fn counter(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (key, value) = line.split_once(' ')?;
        (key == name).then(|| value.trim().parse().ok()).flatten()
    })
}

/// The groups of one slot.
#[derive(Debug)]
pub struct SlotCgroups(Groups);

#[derive(Debug)]
enum Groups {
    V1(v1::SlotGroups),
    V2(v2::SlotGroup),
}

impl SlotCgroups {
    /// Creates (or reuses) the groups of the slot named `name` (`uid-N` for a slot with uid N),
    /// with `limits`, in the hierarchy [`available`] found.
    pub fn create(name: &str, limits: CgroupLimits) -> Result<Self, CgroupError> {
        match hierarchy() {
            Ok(Hierarchy::V1(parents)) => {
                v1::SlotGroups::create(parents, name, limits).map(Groups::V1)
            }
            Ok(Hierarchy::V2(base)) => v2::SlotGroup::create(base, name, limits).map(Groups::V2),
            Err(reason) => Err(CgroupError::Create {
                path: PathBuf::from(name),
                source: io::Error::other(reason),
            }),
        }
        .map(Self)
    }

    /// Which cgroup version the groups are, and where, for the isolation report.
    pub fn describe(&self) -> String {
        match (&self.0, hierarchy()) {
            (Groups::V2(_), Ok(Hierarchy::V2(base))) => {
                format!("cgroup v2, one group per slot in {}", base.dir().display())
            }
            (Groups::V1(groups), Ok(Hierarchy::V1(parents))) => {
                let mut described = format!(
                    "cgroup v1, one group per slot and controller {}",
                    parents.describe()
                );
                if !groups.counts_cpu() {
                    described.push_str(
                        "; no cpuacct, so a run's CPU time leaves out its processes never \
                         waited for",
                    );
                }
                described
            }
            _ => "cgroups of another hierarchy than the one found".to_owned(),
        }
    }

    /// The `cgroup.procs` files a child writes itself into, as C strings ready before fork.
    pub fn procs_files(&self) -> Vec<CString> {
        self.procs_paths()
            .iter()
            .map(|path| {
                CString::new(path.as_os_str().as_bytes()).expect("cgroup paths have no NUL byte")
            })
            .collect()
    }

    /// The `cgroup.procs` files to join, as paths.
    pub fn procs_paths(&self) -> Vec<PathBuf> {
        match &self.0 {
            Groups::V1(groups) => groups.procs_paths(),
            Groups::V2(group) => vec![group.procs_path()],
        }
    }

    /// The CPU quota of the slot, in cores, if it has one.
    pub fn cpu_quota(&self) -> Option<f64> {
        match &self.0 {
            Groups::V1(groups) => groups.cpu_quota(),
            Groups::V2(group) => group.cpu_quota(),
        }
    }

    /// Whether nothing is left in the slot after a run: none was, or the hierarchy killed what
    /// was at once (cgroup v2). False where the caller must find what is left another way.
    pub fn empty_or_killed(&self) -> bool {
        match &self.0 {
            Groups::V1(groups) => groups.is_empty(),
            Groups::V2(group) => group.is_empty() || group.kill(),
        }
    }

    /// Sets the memory limit of the next run and starts watching it: its peak, its CPU time
    /// and its OOM kills.
    pub fn prepare(&self, memory_bytes: u64) -> Result<RunWatch, CgroupError> {
        match &self.0 {
            Groups::V1(groups) => groups.prepare(memory_bytes),
            Groups::V2(group) => group.prepare(memory_bytes),
        }
    }

    /// What the run watched since [`prepare`](Self::prepare) did.
    pub fn usage(&self, mut watch: RunWatch) -> CgroupUsage {
        match &self.0 {
            Groups::V1(groups) => groups.usage(&watch),
            Groups::V2(group) => group.usage(&mut watch),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_flat_keyed_counters() {
        let events = "low 0\nhigh 0\nmax 12\noom 3\noom_kill 2\noom_group_kill 0\n";
        assert_eq!(counter(events, "oom_kill"), Some(2));
        assert_eq!(counter(events, "oom"), Some(3));
        assert_eq!(counter(events, "missing"), None);
        assert_eq!(counter("populated 0\nfrozen 0\n", "populated"), Some(0));
        assert_eq!(
            counter("oom_kill_disable 0\nunder_oom 0\noom_kill 7\n", "oom_kill"),
            Some(7)
        );
    }

    #[test]
    fn the_cpu_quota_has_the_kernel_s_floor() {
        assert_eq!(cpu_quota_us(1.0), 100_000);
        assert_eq!(cpu_quota_us(0.5), 50_000);
        assert_eq!(cpu_quota_us(0.001), 1000);
    }
}

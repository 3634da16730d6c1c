//! cgroup v1: a memory, a pids and (where the host has the controllers) a cpu and a cpuacct
//! group per slot, in the hierarchies where a hybrid host keeps its limit controllers.
//!
//! The slot groups live under `pyrunner/` in each hierarchy's root where the worker may write
//! there (root on a host, or a container given a writable directory per controller), else in the
//! worker's own group of that hierarchy where that group is delegated to the worker's user: its
//! directory is the user's, as `cgcreate -a USER -t USER` or an administrator's `chown` makes it
//! (cgroup v1 has no other delegation). A process may move itself into a group whose
//! `cgroup.procs` it may write, so the runs' children, which join their groups themselves before
//! they take their slot's uid, need nothing more.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::{read_u64, write, CgroupError, CgroupLimits, CgroupUsage, RunWatch, CPU_PERIOD_US};

/// Root of the cgroup v1 hierarchies.
const ROOT: &str = "/sys/fs/cgroup";
/// The parent group of every slot group, in each hierarchy.
const PARENT: &str = "pyrunner";

/// Where the slots' groups go in each v1 hierarchy: the directory under which [`PARENT`] is made.
#[derive(Debug)]
pub(super) struct Parents {
    memory: PathBuf,
    pids: PathBuf,
    /// Where the host has a writable cpu hierarchy with CFS quotas.
    cpu: Option<PathBuf>,
    /// Where the host has a writable cpuacct hierarchy (to count each run's CPU time).
    cpuacct: Option<PathBuf>,
    /// Whether any of them is the worker's own group, delegated to its user, rather than the
    /// hierarchy's root.
    delegated: bool,
}

impl Parents {
    /// Finds a writable place in the memory and pids hierarchies (and in the cpu and cpuacct
    /// ones, where they are), or says why there is none.
    pub(super) fn find() -> Result<Self, String> {
        let own = fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        let place = |controller, file| place(Path::new(ROOT), controller, file, &own);
        let (Some(memory), Some(pids)) = (
            place("memory", "memory.limit_in_bytes"),
            // The root of the pids hierarchy has none of its controller's files.
            place("pids", "cgroup.procs"),
        ) else {
            return Err(
                "no writable cgroup v1 memory and pids hierarchies, nor groups of them \
                 delegated to the service's user"
                    .to_owned(),
            );
        };
        let cpu = place("cpu", "cpu.cfs_quota_us");
        let cpuacct = place("cpuacct", "cpuacct.usage");
        let delegated = [Some(&memory), Some(&pids), cpu.as_ref(), cpuacct.as_ref()]
            .into_iter()
            .flatten()
            .any(|(_, delegated)| *delegated);
        Ok(Self {
            memory: memory.0,
            pids: pids.0,
            cpu: cpu.map(|(dir, _)| dir),
            cpuacct: cpuacct.map(|(dir, _)| dir),
            delegated,
        })
    }

    /// Where the groups are, for the isolation report.
    pub(super) fn describe(&self) -> String {
        if self.delegated {
            format!(
                "in the groups delegated to the service ({})",
                self.memory.display()
            )
        } else {
            "in each hierarchy's root".to_owned()
        }
    }
}

/// Where the slots' groups of `controller` go, and whether that is a delegated group: the
/// hierarchy's root under `root` if the worker may write there, else the worker's own group of
/// that hierarchy (from `own`, the text of `/proc/self/cgroup`) if it may write there. `file`
/// names a file that the hierarchy's root and its groups have.
fn place(root: &Path, controller: &str, file: &str, own: &str) -> Option<(PathBuf, bool)> {
    let hierarchy = root.join(controller);
    if !hierarchy.join(file).is_file() {
        return None;
    }
    if writable(&hierarchy) {
        return Some((hierarchy, false));
    }
    let group = own_group(own, controller)?.trim_start_matches('/');
    let dir = hierarchy.join(group);
    (!group.is_empty() && dir.join(file).is_file() && writable(&dir)).then_some((dir, true))
}

/// Whether the worker may make groups in `dir`.
fn writable(dir: &Path) -> bool {
    nix::unistd::access(dir, nix::unistd::AccessFlags::W_OK).is_ok()
}

/// The process's group in the v1 hierarchy of `controller`, from `/proc/self/cgroup` (its
/// `ID:controllers:path` line whose controllers name it).
fn own_group<'a>(proc_cgroup: &'a str, controller: &str) -> Option<&'a str> {
    proc_cgroup.lines().find_map(|line| {
        let mut fields = line.splitn(3, ':');
        let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
        (!controller.is_empty() && controllers.split(',').any(|c| c == controller)).then_some(path)
    })
}

/// The CPU time a v1 cpuacct group has used, in microseconds.
fn cpu_used_us(cpuacct: &Path) -> Option<u64> {
    read_u64(&cpuacct.join("cpuacct.usage")).map(|ns| ns / 1000)
}

/// The `oom_kill` counter of a v1 memory cgroup.
fn oom_kills(memory: &Path) -> u64 {
    fs::read_to_string(memory.join("memory.oom_control"))
        .ok()
        .and_then(|text| super::counter(&text, "oom_kill"))
        .unwrap_or(0)
}

/// The v1 groups of one slot.
#[derive(Debug)]
pub(super) struct SlotGroups {
    memory: PathBuf,
    pids: PathBuf,
    /// The cpu group, where the host has a writable cpu hierarchy and a quota is asked for.
    cpu: Option<PathBuf>,
    /// The cpuacct group, where the host has a writable cpuacct hierarchy (it may be the cpu
    /// group, where the host mounts the two controllers together).
    cpuacct: Option<PathBuf>,
    /// The memory limit last written, in bytes (0 before the first): most runs of a slot have
    /// the same limit, and each write is a file operation on the request path.
    memory_limit: AtomicU64,
}

impl SlotGroups {
    /// Creates (or reuses) the groups of the slot named `name` under `parents`, with `limits`.
    pub(super) fn create(
        parents: &Parents,
        name: &str,
        limits: CgroupLimits,
    ) -> Result<Self, CgroupError> {
        let make = |parent: &Path| -> Result<PathBuf, CgroupError> {
            let path = parent.join(PARENT).join(name);
            fs::create_dir_all(&path)
                // One path per group where the host mounts controllers together (`cpu` and
                // `cpuacct` are links to `cpu,cpuacct`), so that a child joins it once.
                .and_then(|()| fs::canonicalize(&path))
                .map_err(|source| CgroupError::Create {
                    path: path.clone(),
                    source,
                })
        };
        let cpu = match (limits.cpus, &parents.cpu) {
            (Some(cpus), Some(parent)) => {
                let cpu = make(parent)?;
                write(&cpu.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                write(
                    &cpu.join("cpu.cfs_quota_us"),
                    &super::cpu_quota_us(cpus).to_string(),
                )?;
                Some(cpu)
            }
            _ => None,
        };
        let cpuacct = parents.cpuacct.as_deref().map(make).transpose()?;
        let groups = Self {
            memory: make(&parents.memory)?,
            pids: make(&parents.pids)?,
            cpu,
            cpuacct,
            memory_limit: AtomicU64::new(0),
        };
        write(
            &groups.pids.join("pids.max"),
            &limits.max_processes.to_string(),
        )?;
        // Kill on OOM rather than pause the run (the default, but a host may have changed it).
        let _ = fs::write(groups.memory.join("memory.oom_control"), "0");
        Ok(groups)
    }

    /// The `cgroup.procs` files to join.
    pub(super) fn procs_paths(&self) -> Vec<PathBuf> {
        let groups = [
            Some(&self.memory),
            Some(&self.pids),
            self.cpu.as_ref(),
            self.cpuacct.as_ref(),
        ];
        let mut paths: Vec<PathBuf> = Vec::new();
        for path in groups
            .into_iter()
            .flatten()
            .map(|dir| dir.join("cgroup.procs"))
        {
            if !paths.contains(&path) {
                paths.push(path);
            }
        }
        paths
    }

    /// Whether the slot has a cpuacct group, which counts its runs' CPU time.
    pub(super) fn counts_cpu(&self) -> bool {
        self.cpuacct.is_some()
    }

    /// The CPU quota of the slot, in cores, if it has a cpu group.
    pub(super) fn cpu_quota(&self) -> Option<f64> {
        let cpu = self.cpu.as_ref()?;
        let quota = read_u64(&cpu.join("cpu.cfs_quota_us"))?;
        let period = read_u64(&cpu.join("cpu.cfs_period_us"))?;
        Some(quota as f64 / period as f64)
    }

    /// Whether no process is left in the slot (its pids group counts none).
    pub(super) fn is_empty(&self) -> bool {
        read_u64(&self.pids.join("pids.current")) == Some(0)
    }

    /// Sets the memory limit of the next run and resets the peak counter.
    pub(super) fn prepare(&self, memory_bytes: u64) -> Result<RunWatch, CgroupError> {
        if self.memory_limit.load(Ordering::Relaxed) != memory_bytes {
            self.set_memory_limit(memory_bytes)?;
            self.memory_limit.store(memory_bytes, Ordering::Relaxed);
        }
        let _ = fs::write(self.memory.join("memory.max_usage_in_bytes"), "0");
        Ok(RunWatch {
            oom_kills_before: oom_kills(&self.memory),
            peak: None,
            peak_counted: true,
            cpu_before_us: self.cpuacct.as_deref().and_then(cpu_used_us),
        })
    }

    fn set_memory_limit(&self, memory_bytes: u64) -> Result<(), CgroupError> {
        let limit = memory_bytes.to_string();
        let mem = self.memory.join("memory.limit_in_bytes");
        let memsw = self.memory.join("memory.memsw.limit_in_bytes");
        // memory <= memory+swap must hold after each write: lower memory first, raise memsw
        // first. Swap accounting may be off (no memsw file): then memory alone is the limit.
        if write(&mem, &limit).is_err() {
            if memsw.exists() {
                write(&memsw, &limit)?;
            }
            write(&mem, &limit)?;
        }
        if memsw.exists() {
            write(&memsw, &limit)?;
        }
        Ok(())
    }

    /// What the run did.
    pub(super) fn usage(&self, watch: &RunWatch) -> CgroupUsage {
        CgroupUsage {
            oom_killed: oom_kills(&self.memory) > watch.oom_kills_before,
            peak_kb: read_u64(&self.memory.join("memory.max_usage_in_bytes")).map(|b| b / 1024),
            cpu_us: watch.cpu_since(self.cpuacct.as_deref().and_then(cpu_used_us)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROC_CGROUP: &str = "12:pids:/svc/pyrunner\n\
                               4:cpu,cpuacct:/svc\n\
                               3:memory:/a:b\n\
                               1:name=systemd:/user.slice\n\
                               0::/user.slice/svc.service\n";

    #[test]
    fn finds_the_own_group_of_each_controller() {
        assert_eq!(own_group(PROC_CGROUP, "pids"), Some("/svc/pyrunner"));
        assert_eq!(own_group(PROC_CGROUP, "cpu"), Some("/svc"));
        assert_eq!(own_group(PROC_CGROUP, "cpuacct"), Some("/svc"));
        // A path may hold a colon.
        assert_eq!(own_group(PROC_CGROUP, "memory"), Some("/a:b"));
        assert_eq!(own_group(PROC_CGROUP, "blkio"), None);
        // Neither the named hierarchy nor the unified one is a controller's.
        assert_eq!(own_group(PROC_CGROUP, "systemd"), None);
        assert_eq!(own_group(PROC_CGROUP, ""), None);
    }

    #[test]
    fn a_hierarchy_without_the_controller_s_file_is_no_place() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("memory")).unwrap();
        assert_eq!(
            place(root.path(), "memory", "memory.limit_in_bytes", PROC_CGROUP),
            None
        );
        assert_eq!(
            place(root.path(), "pids", "cgroup.procs", PROC_CGROUP),
            None
        );
        std::fs::write(root.path().join("memory/memory.limit_in_bytes"), "").unwrap();
        assert_eq!(
            place(root.path(), "memory", "memory.limit_in_bytes", PROC_CGROUP),
            Some((root.path().join("memory"), false))
        );
    }
}

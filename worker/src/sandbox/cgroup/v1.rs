//! cgroup v1: a memory, a pids and (where the host has the controllers) a cpu and a cpuacct
//! group per slot, in the hierarchies where a hybrid host keeps its limit controllers.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::{read_u64, write, CgroupError, CgroupLimits, CgroupUsage, RunWatch, CPU_PERIOD_US};

/// Root of the cgroup v1 hierarchies.
const ROOT: &str = "/sys/fs/cgroup";
/// The parent group of every slot group, in each hierarchy.
const PARENT: &str = "pyrunner";

/// Whether this host has a writable v1 hierarchy for `controller`, whose root has `file`.
fn writable(controller: &str, file: &str) -> bool {
    let dir = Path::new(ROOT).join(controller);
    dir.join(file).is_file() && nix::unistd::access(&dir, nix::unistd::AccessFlags::W_OK).is_ok()
}

/// Whether this host has writable v1 memory and pids hierarchies.
pub(super) fn available() -> bool {
    writable("memory", "cgroup.procs") && writable("pids", "cgroup.procs")
}

/// Whether this host has a writable v1 cpu hierarchy with CFS quotas.
fn cpu_available() -> bool {
    writable("cpu", "cpu.cfs_quota_us")
}

/// Whether this host has a writable v1 cpuacct hierarchy (to count each run's CPU time).
fn cpuacct_available() -> bool {
    writable("cpuacct", "cpuacct.usage")
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
    /// Creates (or reuses) the groups of the slot named `name`, with `limits`.
    pub(super) fn create(name: &str, limits: CgroupLimits) -> Result<Self, CgroupError> {
        let root = Path::new(ROOT);
        let make = |controller: &str| -> Result<PathBuf, CgroupError> {
            let path = root.join(controller).join(PARENT).join(name);
            fs::create_dir_all(&path)
                // One path per group where the host mounts controllers together (`cpu` and
                // `cpuacct` are links to `cpu,cpuacct`), so that a child joins it once.
                .and_then(|()| fs::canonicalize(&path))
                .map_err(|source| CgroupError::Create {
                    path: path.clone(),
                    source,
                })
        };
        let cpu = match limits.cpus {
            Some(cpus) if cpu_available() => {
                let cpu = make("cpu")?;
                write(&cpu.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                write(
                    &cpu.join("cpu.cfs_quota_us"),
                    &super::cpu_quota_us(cpus).to_string(),
                )?;
                Some(cpu)
            }
            _ => None,
        };
        let cpuacct = cpuacct_available().then(|| make("cpuacct")).transpose()?;
        let groups = Self {
            memory: make("memory")?,
            pids: make("pids")?,
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

//! Per-slot control groups: one memory cgroup and one pids cgroup for each run slot, so that a
//! run's limits hold for all of its processes together (rlimits hold per process only: a run
//! forking 64 processes could otherwise use 64 times its memory limit), and, where the host has
//! the controller, one cpu cgroup with a quota, so that a run's processes and threads together
//! use at most so many cores.
//!
//! This version uses the cgroup v1 `memory`, `pids` and `cpu` hierarchies, where this kind of
//! host keeps its limit controllers. The child joins its slot's cgroups between fork and exec, by
//! writing `0` (itself) to each `cgroup.procs`. A slot's cgroups are reused run after run: the
//! memory limit is set and the peak counter reset before each run.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use thiserror::Error;

/// Root of the cgroup v1 hierarchies.
const V1_ROOT: &str = "/sys/fs/cgroup";
/// The parent group of every slot group, in each hierarchy.
const PARENT: &str = "pyrunner";

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

/// What a slot's cgroups limit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CgroupLimits {
    /// Most processes and threads of a run.
    pub max_processes: u64,
    /// Most cores a run's processes may use together; `None` for no quota.
    pub cpus: Option<f64>,
}

/// The memory, pids and (where the host has it) cpu cgroups of one slot.
#[derive(Debug)]
pub struct SlotCgroups {
    memory: PathBuf,
    pids: PathBuf,
    /// The cpu cgroup, where the host has a writable cpu hierarchy and a quota is asked for.
    cpu: Option<PathBuf>,
    /// The memory limit last written, in bytes (0 before the first): most runs of a slot have
    /// the same limit, and each write is a file operation on the request path.
    memory_limit: AtomicU64,
}

/// What a run's cgroup saw.
#[derive(Debug, Clone, Copy, Default)]
pub struct CgroupUsage {
    /// The kernel killed a process of the run for exceeding the memory limit.
    pub oom_killed: bool,
    /// Highest memory use of the whole run (all processes, page cache included), in KiB.
    pub peak_kb: u64,
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

/// The `oom_kill` counter of a v1 memory cgroup.
fn oom_kills(memory: &Path) -> u64 {
    fs::read_to_string(memory.join("memory.oom_control"))
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("oom_kill "))
                .and_then(|n| n.trim().parse().ok())
        })
        .unwrap_or(0)
}

impl SlotCgroups {
    /// Whether this host has writable v1 memory and pids hierarchies.
    pub fn available() -> bool {
        let root = Path::new(V1_ROOT);
        ["memory", "pids"].iter().all(|c| {
            let dir = root.join(c);
            dir.join("cgroup.procs").is_file()
                && nix::unistd::access(&dir, nix::unistd::AccessFlags::W_OK).is_ok()
        })
    }

    /// Whether this host has a writable v1 cpu hierarchy with CFS quotas.
    pub fn cpu_available() -> bool {
        let dir = Path::new(V1_ROOT).join("cpu");
        dir.join("cpu.cfs_quota_us").is_file()
            && nix::unistd::access(&dir, nix::unistd::AccessFlags::W_OK).is_ok()
    }

    /// Creates (or reuses) the cgroups of the slot with `uid`, with `limits`.
    pub fn create(uid: u32, limits: CgroupLimits) -> Result<Self, CgroupError> {
        let root = Path::new(V1_ROOT);
        let name = format!("uid-{uid}");
        let make = |controller: &str| -> Result<PathBuf, CgroupError> {
            let path = root.join(controller).join(PARENT).join(&name);
            fs::create_dir_all(&path).map_err(|source| CgroupError::Create {
                path: path.clone(),
                source,
            })?;
            Ok(path)
        };
        let cpu = match limits.cpus {
            Some(cpus) if Self::cpu_available() => {
                let cpu = make("cpu")?;
                let quota = ((cpus * CPU_PERIOD_US as f64) as u64).max(1000);
                write(&cpu.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                write(&cpu.join("cpu.cfs_quota_us"), &quota.to_string())?;
                Some(cpu)
            }
            _ => None,
        };
        let groups = Self {
            memory: make("memory")?,
            pids: make("pids")?,
            cpu,
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
        [Some(&self.memory), Some(&self.pids), self.cpu.as_ref()]
            .into_iter()
            .flatten()
            .map(|dir| dir.join("cgroup.procs"))
            .collect()
    }

    /// The CPU quota of the slot, in cores, if it has a cpu cgroup.
    pub fn cpu_quota(&self) -> Option<f64> {
        let cpu = self.cpu.as_ref()?;
        let quota = read_u64(&cpu.join("cpu.cfs_quota_us"))?;
        let period = read_u64(&cpu.join("cpu.cfs_period_us"))?;
        Some(quota as f64 / period as f64)
    }

    /// Whether no process is left in the slot (its pids cgroup counts none).
    pub fn is_empty(&self) -> bool {
        read_u64(&self.pids.join("pids.current")) == Some(0)
    }

    /// Sets the memory limit of the next run and resets the peak counter. Returns the OOM kill
    /// count before the run, to compare with afterwards.
    pub fn prepare(&self, memory_bytes: u64) -> Result<u64, CgroupError> {
        if self.memory_limit.load(Ordering::Relaxed) != memory_bytes {
            self.set_memory_limit(memory_bytes)?;
            self.memory_limit.store(memory_bytes, Ordering::Relaxed);
        }
        let _ = fs::write(self.memory.join("memory.max_usage_in_bytes"), "0");
        Ok(oom_kills(&self.memory))
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

    /// What the run did, given the OOM kill count [`prepare`](Self::prepare) returned.
    pub fn usage(&self, oom_kills_before: u64) -> CgroupUsage {
        CgroupUsage {
            oom_killed: oom_kills(&self.memory) > oom_kills_before,
            peak_kb: read_u64(&self.memory.join("memory.max_usage_in_bytes")).unwrap_or(0) / 1024,
        }
    }
}

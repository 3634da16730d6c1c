//! cgroup v2: one group per slot in the unified hierarchy, with the memory, pids and (where it
//! is delegated) cpu controllers, as on hosts that have no v1 limit hierarchies (most current
//! distributions, and their containers).
//!
//! The slot groups live under `pyrunner/` in the highest group of the hierarchy that the worker
//! sees and can enable the controllers in: the root on a host (real root may enable them with
//! processes in it), or the group a container or a delegated service was given. Such a group
//! must hold no process once its controllers are enabled for children (the "no internal
//! processes" rule), so the worker first moves the processes in it to a leaf group of their own,
//! `pyrunner-service`, as a container's init or a service manager does.
//!
//! A container gets its group mounted read-only at `/sys/fs/cgroup` (Docker's default on such
//! hosts). The worker, which has `CAP_SYS_ADMIN` there to make the runs' mounts, then mounts the
//! hierarchy once more, writable, at [`OWN_MOUNT`] in its own mount namespace: behind the
//! container's cgroup namespace, that mount too shows only the container's group.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::{write, CgroupError, CgroupLimits, CgroupUsage, RunWatch, CPU_PERIOD_US};

/// The group the slot groups are made in, below the group that delegates the controllers.
const PARENT: &str = "pyrunner";
/// The leaf group the processes of a delegating group are moved to.
const SERVICE_LEAF: &str = "pyrunner-service";
/// Where the worker mounts the hierarchy when every mount of it it sees is read-only.
const OWN_MOUNT: &str = "/run/pyrunner/cgroup";

/// Where the slots' groups go, with what the hierarchy delegates to them.
#[derive(Debug)]
pub(super) struct Base {
    dir: PathBuf,
    cpu: bool,
}

impl Base {
    /// Finds the unified hierarchy and makes a place for slot groups in it, with the memory and
    /// pids controllers (and cpu where delegated); or says why there is none.
    pub(super) fn set_up() -> Result<Self, String> {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| format!("cannot read /proc/self/mountinfo: {e}"))?;
        let mounts = cgroup2_mounts(&mountinfo);
        let (mountpoint, mount_root) = match (writable_mount(&mounts), mounts.first()) {
            (Some(mount), _) => (mount.point.clone(), mount.root.clone()),
            // Only read-only mounts: a writable one of its own, if the group they show has
            // the controllers at all (a hybrid host's v2 hierarchy has none).
            (None, Some(read_only)) => {
                limit_controllers(&read_only.point)
                    .map_err(|reason| format!("{}: {reason}", read_only.point.display()))?;
                (mount_own()?, "/".to_owned())
            }
            (None, None) => return Err("no cgroup v2 hierarchy is mounted".to_owned()),
        };
        let own = fs::read_to_string("/proc/self/cgroup")
            .ok()
            .and_then(|text| own_group(&text))
            .and_then(|group| group_dir(&mountpoint, &mount_root, &group));
        let mut candidates = vec![mountpoint];
        candidates.extend(own.filter(|own| *own != candidates[0]));
        let mut why = Vec::new();
        for dir in candidates {
            match Self::set_up_in(&dir) {
                Ok(base) => return Ok(base),
                Err(reason) => why.push(format!("{}: {reason}", dir.display())),
            }
        }
        Err(format!("cgroup v2: {}", why.join("; ")))
    }

    fn set_up_in(dir: &Path) -> Result<Self, String> {
        let cpu = limit_controllers(dir)?;
        let wanted = if cpu {
            "+memory +pids +cpu"
        } else {
            "+memory +pids"
        };
        let subtree = dir.join("cgroup.subtree_control");
        match fs::write(&subtree, wanted) {
            Ok(()) => {}
            // Processes in a group other than the root: move them to a leaf first.
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                vacate(dir).map_err(|e| format!("cannot move its processes to a leaf: {e}"))?;
                fs::write(&subtree, wanted)
                    .map_err(|e| format!("cannot enable {wanted} in it: {e}"))?;
            }
            Err(e) => return Err(format!("cannot enable {wanted} in it: {e}")),
        }
        let base = dir.join(PARENT);
        fs::create_dir_all(&base).map_err(|e| format!("cannot create {PARENT}: {e}"))?;
        fs::write(base.join("cgroup.subtree_control"), wanted)
            .map_err(|e| format!("cannot enable {wanted} in {PARENT}: {e}"))?;
        Ok(Self { dir: base, cpu })
    }

    /// The directory of the slot groups.
    pub(super) fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Whether the group `dir` has the memory and pids controllers (else why not), and whether it has
/// cpu.
fn limit_controllers(dir: &Path) -> Result<bool, String> {
    let available = fs::read_to_string(dir.join("cgroup.controllers"))
        .map_err(|e| format!("cannot read cgroup.controllers: {e}"))?;
    let available: Vec<&str> = available.split_whitespace().collect();
    if !["memory", "pids"].iter().all(|c| available.contains(c)) {
        return Err(format!(
            "the memory and pids controllers are not delegated here (it has: {})",
            if available.is_empty() {
                "none".to_owned()
            } else {
                available.join(" ")
            }
        ));
    }
    Ok(available.contains(&"cpu"))
}

/// Moves every process of the group `dir` into its leaf group [`SERVICE_LEAF`].
fn vacate(dir: &Path) -> io::Result<()> {
    let leaf = dir.join(SERVICE_LEAF);
    fs::create_dir_all(&leaf)?;
    // A process may fork while the others move; a few passes catch its children.
    for _ in 0..10 {
        let procs = fs::read_to_string(dir.join("cgroup.procs"))?;
        if procs.trim().is_empty() {
            return Ok(());
        }
        for pid in procs.lines() {
            match fs::write(leaf.join("cgroup.procs"), pid) {
                // Gone since the list was read.
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
                other => other?,
            }
        }
    }
    Err(io::Error::other("processes keep appearing in the group"))
}

/// A mount of the cgroup v2 hierarchy.
#[derive(Debug, Clone, PartialEq)]
struct Cgroup2Mount {
    point: PathBuf,
    /// The group it shows as its root.
    root: String,
    writable: bool,
}

/// The cgroup v2 mounts in `mountinfo` (`/proc/self/mountinfo`).
fn cgroup2_mounts(mountinfo: &str) -> Vec<Cgroup2Mount> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (fields, after) = line.split_once(" - ")?;
            if after.split_whitespace().next()? != "cgroup2" {
                return None;
            }
            let fields: Vec<&str> = fields.split_whitespace().collect();
            Some(Cgroup2Mount {
                point: PathBuf::from(unescape(fields.get(4)?)),
                root: unescape(fields.get(3)?),
                writable: fields.get(5)?.split(',').any(|option| option == "rw"),
            })
        })
        .collect()
}

/// The writable mount to use: `/sys/fs/cgroup` where it is one, else the first.
fn writable_mount(mounts: &[Cgroup2Mount]) -> Option<&Cgroup2Mount> {
    let mut writable = mounts.iter().filter(|m| m.writable);
    let first = writable.clone().next();
    writable
        .find(|m| m.point == Path::new("/sys/fs/cgroup"))
        .or(first)
}

/// Mounts the hierarchy, writable, at [`OWN_MOUNT`] (in the worker's mount namespace).
fn mount_own() -> Result<PathBuf, String> {
    use nix::mount::{mount, MsFlags};
    let point = PathBuf::from(OWN_MOUNT);
    fs::create_dir_all(&point).map_err(|e| format!("cannot create {OWN_MOUNT}: {e}"))?;
    mount(
        Some("cgroup2"),
        &point,
        Some("cgroup2"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(|e| {
        format!("its mounts are read-only, and it cannot mount a writable one at {OWN_MOUNT}: {e}")
    })?;
    Ok(point)
}

/// A field of `/proc/self/mountinfo`, whose spaces, tabs, newlines and backslashes are written
/// as octal escapes.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|digits| {
            let text = std::str::from_utf8(digits).ok()?;
            u8::from_str_radix(text, 8).ok()
        });
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The process's group in the unified hierarchy, from `/proc/self/cgroup` (its `0::` line).
fn own_group(proc_cgroup: &str) -> Option<String> {
    proc_cgroup
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .map(str::to_owned)
}

/// The directory of `group` under a mount of the hierarchy at `mountpoint` that shows the group
/// `mount_root`; none if the mount does not show it.
fn group_dir(mountpoint: &Path, mount_root: &str, group: &str) -> Option<PathBuf> {
    let relative = if mount_root == "/" {
        group
    } else {
        group
            .strip_prefix(mount_root)
            .filter(|rest| rest.is_empty() || rest.starts_with('/'))?
    };
    Some(mountpoint.join(relative.trim_start_matches('/')))
}

/// The v2 group of one slot.
#[derive(Debug)]
pub(super) struct SlotGroup {
    dir: PathBuf,
    /// Whether the group has a CPU quota.
    cpu: bool,
    /// The memory limit last written, in bytes (0 before the first), as in v1.
    memory_limit: AtomicU64,
}

impl SlotGroup {
    /// Creates (or reuses) the group of the slot named `name` under `base`, with `limits`.
    pub(super) fn create(
        base: &Base,
        name: &str,
        limits: CgroupLimits,
    ) -> Result<Self, CgroupError> {
        let dir = base.dir.join(name);
        fs::create_dir_all(&dir).map_err(|source| CgroupError::Create {
            path: dir.clone(),
            source,
        })?;
        let group = Self {
            cpu: base.cpu && limits.cpus.is_some(),
            dir,
            memory_limit: AtomicU64::new(0),
        };
        // What an earlier worker of this slot left running.
        if !group.is_empty() {
            group.kill();
        }
        write(
            &group.dir.join("pids.max"),
            &limits.max_processes.to_string(),
        )?;
        if let Some(cpus) = limits.cpus.filter(|_| group.cpu) {
            write(
                &group.dir.join("cpu.max"),
                &format!("{} {CPU_PERIOD_US}", super::cpu_quota_us(cpus)),
            )?;
        }
        // Memory including swap: a run gets none (the file is missing without swap
        // accounting, and then there is no swap to limit).
        let swap = group.dir.join("memory.swap.max");
        if swap.exists() {
            write(&swap, "0")?;
        }
        Ok(group)
    }

    /// The `cgroup.procs` file to join.
    pub(super) fn procs_path(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }

    /// The CPU quota of the slot, in cores, if it has one.
    pub(super) fn cpu_quota(&self) -> Option<f64> {
        if !self.cpu {
            return None;
        }
        let max = fs::read_to_string(self.dir.join("cpu.max")).ok()?;
        let (quota, period) = max.trim().split_once(' ')?;
        Some(quota.parse::<f64>().ok()? / period.parse::<f64>().ok()?)
    }

    /// Whether no process is left in the slot's group.
    pub(super) fn is_empty(&self) -> bool {
        fs::read_to_string(self.dir.join("cgroup.events"))
            .ok()
            .and_then(|events| super::counter(&events, "populated"))
            == Some(0)
    }

    /// Kills every process in the slot's group at once (`cgroup.kill`, Linux 5.14); false where
    /// the kernel cannot.
    pub(super) fn kill(&self) -> bool {
        fs::write(self.dir.join("cgroup.kill"), "1").is_ok()
    }

    /// Sets the memory limit of the next run and starts watching its peak.
    pub(super) fn prepare(&self, memory_bytes: u64) -> Result<RunWatch, CgroupError> {
        if self.memory_limit.load(Ordering::Relaxed) != memory_bytes {
            write(&self.dir.join("memory.max"), &memory_bytes.to_string())?;
            self.memory_limit.store(memory_bytes, Ordering::Relaxed);
        }
        let peak = self.reset_peak();
        Ok(RunWatch {
            oom_kills_before: self.oom_kills(),
            peak_counted: peak.is_some(),
            peak,
            cpu_before_us: self.cpu_used_us(),
        })
    }

    /// `memory.peak` reset for this run: since Linux 6.12 a write resets the peak seen through
    /// the descriptor that wrote it. On older kernels the slot's peak spans all its runs, so
    /// there is none for the run.
    fn reset_peak(&self) -> Option<File> {
        let mut peak = OpenOptions::new()
            .read(true)
            .write(true)
            .open(self.dir.join("memory.peak"))
            .ok()?;
        peak.write_all(b"reset").ok()?;
        Some(peak)
    }

    /// The CPU time the slot's group has used, in microseconds (`cpu.stat` has it whether or
    /// not the cpu controller is enabled).
    fn cpu_used_us(&self) -> Option<u64> {
        fs::read_to_string(self.dir.join("cpu.stat"))
            .ok()
            .and_then(|stat| super::counter(&stat, "usage_usec"))
    }

    /// The `oom_kill` counter of the slot's group and its descendants.
    fn oom_kills(&self) -> u64 {
        fs::read_to_string(self.dir.join("memory.events"))
            .ok()
            .and_then(|events| super::counter(&events, "oom_kill"))
            .unwrap_or(0)
    }

    /// What the run did.
    pub(super) fn usage(&self, watch: &mut RunWatch) -> CgroupUsage {
        let peak_kb = watch.peak.as_mut().and_then(|peak| {
            let mut text = String::new();
            peak.rewind().ok()?;
            peak.read_to_string(&mut text).ok()?;
            Some(text.trim().parse::<u64>().ok()? / 1024)
        });
        CgroupUsage {
            oom_killed: self.oom_kills() > watch.oom_kills_before,
            peak_kb,
            cpu_us: watch.cpu_since(self.cpu_used_us()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
24 1 0:22 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
25 24 0:23 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
26 24 0:24 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,memory";

    fn mount(point: &str, root: &str, writable: bool) -> Cgroup2Mount {
        Cgroup2Mount {
            point: PathBuf::from(point),
            root: root.to_owned(),
            writable,
        }
    }

    #[test]
    fn finds_the_unified_mount_of_a_hybrid_host() {
        let mounts = cgroup2_mounts(HYBRID);
        assert_eq!(mounts, [mount("/sys/fs/cgroup/unified", "/", true)]);
        assert_eq!(writable_mount(&mounts), Some(&mounts[0]));
        assert_eq!(cgroup2_mounts(&HYBRID.replace("cgroup2", "cgroup")), []);
    }

    #[test]
    fn reads_escaped_fields_and_prefers_a_writable_sys_fs_cgroup() {
        let mountinfo = "\
30 1 0:26 / /run/my\\040cgroup rw - cgroup2 cgroup2 rw
31 1 0:26 /docker/abc /sys/fs/cgroup rw,relatime - cgroup2 cgroup2 rw";
        let mounts = cgroup2_mounts(mountinfo);
        assert_eq!(
            mounts,
            [
                mount("/run/my cgroup", "/", true),
                mount("/sys/fs/cgroup", "/docker/abc", true)
            ]
        );
        assert_eq!(writable_mount(&mounts), Some(&mounts[1]));
    }

    #[test]
    fn a_container_s_read_only_mount_is_not_used() {
        // Docker's mount of a container's group on a cgroup v2 host.
        let mountinfo = "\
612 605 0:30 / /sys/fs/cgroup ro,nosuid,nodev,noexec,relatime - cgroup2 cgroup ro";
        let mounts = cgroup2_mounts(mountinfo);
        assert_eq!(mounts, [mount("/sys/fs/cgroup", "/", false)]);
        assert_eq!(writable_mount(&mounts), None);
        // Once the worker has mounted its own, that one is used.
        let own = format!("{mountinfo}\n700 612 0:30 / {OWN_MOUNT} rw,nosuid - cgroup2 cgroup2 rw");
        let mounts = cgroup2_mounts(&own);
        assert_eq!(writable_mount(&mounts), Some(&mounts[1]));
    }

    #[test]
    fn finds_the_own_group_in_proc_self_cgroup() {
        assert_eq!(
            own_group("4:memory:/x\n0::/system.slice/pyrunner.service\n"),
            Some("/system.slice/pyrunner.service".to_owned())
        );
        assert_eq!(own_group("4:memory:/x\n"), None);
    }

    #[test]
    fn places_the_own_group_under_the_mount() {
        let point = Path::new("/sys/fs/cgroup");
        assert_eq!(
            group_dir(point, "/", "/system.slice/a.service"),
            Some(PathBuf::from("/sys/fs/cgroup/system.slice/a.service"))
        );
        assert_eq!(
            group_dir(point, "/", "/"),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(
            group_dir(point, "/docker/abc", "/docker/abc/inner"),
            Some(PathBuf::from("/sys/fs/cgroup/inner"))
        );
        // A mount of another subtree does not show the group.
        assert_eq!(group_dir(point, "/docker/abc", "/docker/abcd"), None);
        assert_eq!(group_dir(point, "/docker/abc", "/other"), None);
    }
}

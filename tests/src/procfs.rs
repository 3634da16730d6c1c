//! Processes as `/proc` shows them, for the tests and the benchmark.

/// Every process id on the host.
pub fn pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|dir| {
            dir.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The command name of `pid` (at most 15 bytes).
pub fn comm(pid: u32) -> Option<String> {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    Some(comm.trim_end().to_owned())
}

/// The parent of `pid`.
pub fn parent(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces; the parent is the second field
    // after it.
    let after = &stat[stat.rfind(')')? + 2..];
    after.split_whitespace().nth(1)?.parse().ok()
}

/// The processes whose command line (arguments separated by NUL bytes, each ending with one) is
/// exactly `cmdline`.
pub fn with_cmdline(cmdline: &str) -> Vec<u32> {
    pids()
        .into_iter()
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c == cmdline.as_bytes())
        })
        .collect()
}

/// The real uid of `pid`.
pub fn uid(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|u| u.parse().ok())
}

/// Whether `pid` exists and is named `name`.
pub fn is_named(pid: Option<u32>, name: &str) -> bool {
    pid.and_then(comm).is_some_and(|c| c == name)
}

/// Whether `pid` has ended and waits to be reaped.
pub fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| Some(stat[stat.rfind(')')? + 2..].starts_with('Z')))
        .unwrap_or(false)
}

/// The living children of `parent` named `name` (not those that have ended and wait to be
/// reaped).
pub fn children_named(parent_pid: u32, name: &str) -> Vec<u32> {
    pids()
        .into_iter()
        .filter(|&pid| {
            parent(pid) == Some(parent_pid) && is_named(Some(pid), name) && !is_zombie(pid)
        })
        .collect()
}

/// Unique memory (USS) of `pid`, in MiB: its private pages, clean and dirty.
pub fn uss_mib(pid: u32) -> Option<f64> {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let kb: u64 = rollup
        .lines()
        .filter(|l| l.starts_with("Private_Clean:") || l.starts_with("Private_Dirty:"))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum();
    Some(kb as f64 / 1024.0)
}

/// The peak resident memory of a process (`VmHWM`), in MiB.
pub fn peak_rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

/// CPU time (user and system) of `pid`, in clock ticks: its own, and that of the children it
/// has reaped.
pub fn cpu_ticks(pid: u32) -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields 14 to 17 (utime, stime, cutime, cstime) are the 12th to 15th after the name.
    let fields: Vec<u64> = stat[stat.rfind(')')? + 2..]
        .split_whitespace()
        .skip(11)
        .take(4)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    Some((fields[0] + fields[1], fields[2] + fields[3]))
}

/// Every living descendant of `ancestor`.
pub fn descendants(ancestor: u32) -> Vec<u32> {
    let parents: Vec<(u32, u32)> = pids()
        .into_iter()
        .filter_map(|pid| Some((pid, parent(pid)?)))
        .collect();
    let mut found = vec![ancestor];
    let mut next = 0;
    while next < found.len() {
        let of = found[next];
        found.extend(
            parents
                .iter()
                .filter(|&&(_, p)| p == of)
                .map(|&(pid, _)| pid),
        );
        next += 1;
    }
    found.remove(0);
    found
}

/// The busy and total time of the whole machine so far, in clock ticks (`/proc/stat`; idle and
/// I/O wait are not busy).
pub fn machine_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let times: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    let total: u64 = times.iter().sum();
    Some((total - times.get(3)? - times.get(4)?, total))
}

/// Clock ticks per second, the unit of [`cpu_ticks`] and [`machine_ticks`]: Linux gives these
/// times in `USER_HZ`, which is 100 on x86-64 and arm64.
pub const TICKS_PER_SECOND: u64 = 100;

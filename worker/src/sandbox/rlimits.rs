//! The resource limits of one run, derived from its [`RunLimits`] and the worker's settings.

use pyrunner_shared::RunLimits;

use super::sys::Rlimit;
use super::SandboxSettings;

/// Address space a process may reserve beyond the run's memory limit when a memory cgroup holds
/// the real (resident) limit: room for reservations that are never touched, such as OpenBLAS's
/// buffers and 8 MiB thread stacks.
const ADDRESS_SPACE_HEADROOM: u64 = 1 << 30;

/// The soft CPU-time limit of a run, in seconds: its timeout rounded up, plus one.
pub fn cpu_limit_secs(limits: &RunLimits) -> u64 {
    limits.timeout_ms.div_ceil(1000) + 1
}

/// The address space a run's process may add to what it starts with. With a memory cgroup the
/// address space is only a backstop: an allocation far past the limit still fails at once with
/// `MemoryError`, and what is touched is bounded by the cgroup. Without one, the address space is
/// the only memory limit there is, and it is per process.
pub fn address_space_bytes(limits: &RunLimits, memory_cgroup: bool) -> u64 {
    if memory_cgroup {
        limits.memory_bytes() + ADDRESS_SPACE_HEADROOM
    } else {
        limits.memory_bytes()
    }
}

/// The rlimits a run's process gets. They are inherited by every process it forks.
/// `memory_cgroup` says whether a memory cgroup enforces the run's memory limit.
pub fn for_run(limits: &RunLimits, settings: &SandboxSettings, memory_cgroup: bool) -> Vec<Rlimit> {
    // CPU time is a backstop behind the wall-clock deadline: a busy loop uses at most one core,
    // so it would meet the deadline first; several busy threads or processes meet this first.
    // The hard limit, one second later, is SIGKILL for a process that ignores SIGXCPU.
    let cpu_secs = cpu_limit_secs(limits);
    let address_space = address_space_bytes(limits, memory_cgroup);
    let mut rlimits = vec![
        (libc::RLIMIT_CPU, cpu_secs, cpu_secs + 1),
        (libc::RLIMIT_AS, address_space, address_space),
    ];
    rlimits.extend(for_pool(settings));
    rlimits
}

/// The rlimits that do not depend on the run: what a warm child gets when it is forked, before
/// it knows its job. CPU time and address space are set once the job arrives.
pub fn for_pool(settings: &SandboxSettings) -> Vec<Rlimit> {
    vec![
        (
            libc::RLIMIT_FSIZE,
            settings.max_file_bytes,
            settings.max_file_bytes,
        ),
        (
            libc::RLIMIT_NOFILE,
            settings.max_open_files,
            settings.max_open_files,
        ),
        // Counted per uid, so it bounds a run only when the run has a uid of its own (the worker
        // runs as root and gives each slot one); root itself is exempt.
        (
            libc::RLIMIT_NPROC,
            settings.max_processes,
            settings.max_processes,
        ),
        (libc::RLIMIT_CORE, 0, 0),
        (libc::RLIMIT_MEMLOCK, 0, 0),
        (libc::RLIMIT_MSGQUEUE, 0, 0),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use pyrunner_shared::LimitPolicy;

    #[test]
    fn limits_follow_the_run() {
        let mut limits = LimitPolicy::default()
            .resolve(&pyrunner_shared::RunRequest {
                code: String::new(),
                stdin: None,
                timeout_ms: Some(2500),
                memory_mb: Some(128),
            })
            .unwrap();
        let settings = SandboxSettings::default();
        let find = |rl: &[Rlimit], r| rl.iter().find(|(res, _, _)| *res == r).copied().unwrap();
        let rl = for_run(&limits, &settings, false);
        assert_eq!(find(&rl, libc::RLIMIT_CPU), (libc::RLIMIT_CPU, 4, 5));
        assert_eq!(find(&rl, libc::RLIMIT_AS).1, 128 * 1024 * 1024);
        assert_eq!(find(&rl, libc::RLIMIT_CORE).2, 0);
        let with_cgroup = for_run(&limits, &settings, true);
        assert_eq!(
            find(&with_cgroup, libc::RLIMIT_AS).1,
            (128 << 20) + (1 << 30)
        );
        limits.timeout_ms = 1;
        assert_eq!(
            find(&for_run(&limits, &settings, false), libc::RLIMIT_CPU).1,
            2
        );
    }
}

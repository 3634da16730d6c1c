//! The resource limits of one run, derived from its [`RunLimits`] and the worker's settings.

use pyrunner_shared::RunLimits;

use super::sys::Rlimit;
use super::SandboxSettings;

/// The rlimits a run's process gets. They are inherited by every process it forks.
pub fn for_run(limits: &RunLimits, settings: &SandboxSettings) -> Vec<Rlimit> {
    // CPU time is a backstop behind the wall-clock deadline: a busy loop uses at most one core,
    // so it would meet the deadline first; several busy threads or processes meet this first.
    // The hard limit, one second later, is SIGKILL for a process that ignores SIGXCPU.
    let cpu_secs = limits.timeout_ms.div_ceil(1000) + 1;
    vec![
        (libc::RLIMIT_CPU, cpu_secs, cpu_secs + 1),
        // Address space, not resident memory: it makes allocation fail with MemoryError instead
        // of invoking the OOM killer. numpy and sympy need about 135 MiB of it once imported.
        (
            libc::RLIMIT_AS,
            limits.memory_bytes(),
            limits.memory_bytes(),
        ),
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
        let rl = for_run(&limits, &settings);
        assert_eq!(find(&rl, libc::RLIMIT_CPU), (libc::RLIMIT_CPU, 4, 5));
        assert_eq!(find(&rl, libc::RLIMIT_AS).1, 128 * 1024 * 1024);
        assert_eq!(find(&rl, libc::RLIMIT_CORE).2, 0);
        limits.timeout_ms = 1;
        assert_eq!(find(&for_run(&limits, &settings), libc::RLIMIT_CPU).1, 2);
    }
}

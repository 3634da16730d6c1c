//! Hostile code against the first sandbox: each case is a snippet and the outcome that proves
//! the layer holds. Run as root, as the service runs, so that the uid drop is exercised.

use std::time::Duration;

use pyrunner_shared::RunStatus;
use pyrunner_tests::catalogue::{hostile, run_all};
use pyrunner_tests::{executor, job, limits};
use pyrunner_worker::config::ExecutorKind;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_code_is_contained() {
    // A secret in the worker's environment must never reach a run.
    std::env::set_var("PYRUNNER_TEST_SECRET", "s3cret");
    let (executor, _root) = executor(2);
    assert_eq!(executor.kind(), "zygote");
    let failures = run_all(&executor, hostile()).await;
    assert!(
        failures.is_empty(),
        "failed cases:\n{}",
        failures.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_code_is_contained_in_fresh_interpreters() {
    std::env::set_var("PYRUNNER_TEST_SECRET", "s3cret");
    let mut args = pyrunner_tests::executor_args(2);
    args.executor = ExecutorKind::Fresh;
    // Uids apart from the zygote test's slots, which run at the same time.
    args.sandbox_uid_base = 64_600;
    let (executor, _root) = args.build().unwrap();
    let failures = run_all(&executor, hostile()).await;
    assert!(
        failures.is_empty(),
        "failed cases:\n{}",
        failures.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_children_die_with_their_run() {
    for (kind, marker) in [
        (ExecutorKind::Zygote, "307.1"),
        (ExecutorKind::Fresh, "307.2"),
    ] {
        // Slots of this executor get uids far from the other tests' executors.
        let mut args = pyrunner_tests::executor_args(1);
        args.sandbox_uid_base = 64_500;
        args.executor = kind;
        let (executor, _root) = args.build().unwrap();
        // Three sleepers, recognisable on the host by their argument: a subprocess, a forked
        // child, and a forked child that leaves the run's session and process group.
        let code = format!(
            "import subprocess, os, time\n\
             subprocess.Popen(['sleep', '{marker}'])\n\
             if os.fork() == 0:\n    os.execvp('sleep', ['sleep', '{marker}'])\n\
             if os.fork() == 0:\n    os.setsid()\n    os.execvp('sleep', ['sleep', '{marker}'])\n\
             time.sleep(0.5)\n\
             def mine(p):\n    try:\n        return open(f'/proc/{{p}}/cmdline', 'rb').read() == b'sleep\\x00{marker}\\x00'\n    \
             except OSError:\n        return False\n\
             print(sum(mine(p) for p in os.listdir('/proc') if p.isdigit()))"
        );
        let r = executor.run(&job(&code, None, limits(None, None))).await;
        assert_eq!(r.status, RunStatus::Success, "{kind:?}: {r:#?}");
        assert_eq!(
            r.stdout.trim(),
            "3",
            "{kind:?}: the sleepers did not start: {r:#?}"
        );
        // Killed processes are reaped by the worker within a moment.
        let mut left = pyrunner_tests::procfs::with_cmdline(&format!("sleep\0{marker}\0"));
        for _ in 0..20 {
            if left.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            left = pyrunner_tests::procfs::with_cmdline(&format!("sleep\0{marker}\0"));
        }
        assert!(
            left.is_empty(),
            "{kind:?}: processes outlived their run: {left:?}"
        );
    }
}

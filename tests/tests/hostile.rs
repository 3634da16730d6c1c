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
    for kind in [ExecutorKind::Zygote, ExecutorKind::Fresh] {
        // Slots of this executor get uids far from the other tests' executors.
        let mut args = pyrunner_tests::executor_args(1);
        args.sandbox_uid_base = 64_500;
        args.executor = kind;
        let (executor, _root) = args.build().unwrap();
        let code = "import subprocess, os, time\n\
                    pids = [subprocess.Popen(['sleep', '300']).pid]\n\
                    pid = os.fork()\n\
                    if pid == 0:\n    time.sleep(300)\n\
                    pids.append(pid)\n\
                    pid = os.fork()\n\
                    if pid == 0:\n    os.setsid()\n    time.sleep(300)\n\
                    pids.append(pid)\n\
                    print(*pids)";
        let r = executor.run(&job(code, None, limits(None, None))).await;
        assert_eq!(r.status, RunStatus::Success, "{kind:?}: {r:#?}");
        let pids: Vec<u32> = r
            .stdout
            .split_whitespace()
            .map(|p| p.parse().unwrap())
            .collect();
        assert_eq!(pids.len(), 3, "{kind:?}: {r:#?}");
        let uid = 64_500..64_501;
        // Killed processes are reaped by the worker within a moment.
        let alive = || -> Vec<u32> {
            pids.iter()
                .copied()
                .filter(|&p| pyrunner_tests::procfs::uid(p).is_some_and(|u| uid.contains(&u)))
                .collect()
        };
        let mut left = alive();
        for _ in 0..20 {
            if left.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            left = alive();
        }
        assert!(
            left.is_empty(),
            "{kind:?}: processes outlived their run: {left:?}"
        );
    }
}

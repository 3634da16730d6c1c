//! Hostile code against the first sandbox: each case is a snippet and the outcome that proves
//! the layer holds. Run as root, as the service runs, so that the uid drop is exercised.

use std::time::Duration;

use pyrunner_shared::RunStatus;
use pyrunner_tests::catalogue::{hostile, run_all};
use pyrunner_tests::{executor, job, limits};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_code_is_contained() {
    // A secret in the worker's environment must never reach a run.
    std::env::set_var("PYRUNNER_TEST_SECRET", "s3cret");
    let (executor, _root) = executor(2);
    let failures = run_all(&executor, hostile()).await;
    assert!(
        failures.is_empty(),
        "failed cases:\n{}",
        failures.join("\n")
    );
}

fn processes_of_uid_range(from: u32, to: u32) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else {
            continue;
        };
        let uid = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|u| u.parse::<u32>().ok());
        if uid.is_some_and(|u| (from..to).contains(&u)) {
            let state = status
                .lines()
                .find(|l| l.starts_with("State:"))
                .unwrap_or_default();
            found.push(format!(
                "{} {state}",
                status.lines().next().unwrap_or_default()
            ));
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_children_die_with_their_run() {
    // Slots of this executor get uids far from the other tests' executors.
    let mut args = pyrunner_tests::executor_args(1);
    args.sandbox_uid_base = 64_500;
    let (executor, _root) = args.build().unwrap();
    let code = "import subprocess, os, time\n\
                subprocess.Popen(['sleep', '300'])\n\
                if os.fork() == 0:\n    time.sleep(300)\n\
                if os.fork() == 0:\n    os.setsid()\n    time.sleep(300)\n\
                print('parent done')";
    let r = executor.run(&job(code, None, limits(None, None))).await;
    assert_eq!(r.status, RunStatus::Success, "{r:#?}");
    // Killed processes are reaped by the worker within a moment.
    let mut left = processes_of_uid_range(64_500, 64_501);
    for _ in 0..20 {
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        left = processes_of_uid_range(64_500, 64_501);
    }
    assert!(left.is_empty(), "processes outlived their run: {left:?}");
}

//! Runs in real sandboxes, straight through the executor: every status, for the zygote's warm
//! children (the default) and for fresh interpreters. Each case is data: a snippet, its limits, what must come out.

use std::time::{Duration, Instant};

use pyrunner_shared::RunStatus;
use pyrunner_tests::catalogue::{run_all, statuses};
use pyrunner_tests::{executor, executor_args, job, limits};
use pyrunner_worker::config::{ExecutorArgs, ExecutorKind};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_case_ends_with_its_documented_status() {
    let (executor, _root) = executor(2);
    assert_eq!(executor.kind(), "zygote");
    let failures = run_all(&executor, statuses()).await;
    assert!(failures.is_empty(), "failed cases: {failures:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_required_layer_that_runs_would_lack_stops_the_start() {
    let mut args = executor_args(1);
    // No CPU quota asked for: the layer is not active.
    args.cpus_per_run = 0.0;
    args.require_layers = vec!["seccomp".into(), "cgroup_cpu".into()];
    let error = args.start().await.err().expect("the start is refused");
    let message = error.to_string();
    assert!(
        message.contains("cgroup_cpu (no quota asked for"),
        "{message}"
    );
    assert!(!message.contains("seccomp"), "{message}");
    // Names are checked when the configuration is read.
    #[derive(clap::Parser)]
    struct Flags {
        #[command(flatten)]
        executor: ExecutorArgs,
    }
    let error = <Flags as clap::Parser>::try_parse_from(["w", "--require-layers", "seccomp,moat"])
        .err()
        .expect("an unknown layer is refused");
    assert!(
        error.to_string().contains("unknown layer \"moat\""),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fresh_executor_gives_the_same_statuses() {
    let mut args = executor_args(2);
    args.executor = ExecutorKind::Fresh;
    let (executor, _root) = args.build().unwrap();
    assert_eq!(executor.kind(), "fresh");
    let failures = run_all(&executor, statuses()).await;
    assert!(failures.is_empty(), "failed cases: {failures:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_infinite_loop_does_not_hold_up_other_runs() {
    let (executor, _root) = executor(2);
    let hog = {
        let executor = executor.clone();
        tokio::spawn(async move {
            executor
                .run(&job("while True: pass", None, limits(Some(3000), None)))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    for _ in 0..3 {
        let r = executor
            .run(&job("print(6 * 7)", None, limits(None, None)))
            .await;
        assert_eq!(r.status, RunStatus::Success);
        assert_eq!(r.stdout, "42\n");
    }
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "quick runs waited for the loop"
    );
    assert!(!hog.is_finished());
    assert_eq!(hog.await.unwrap().status, RunStatus::Timeout);
}

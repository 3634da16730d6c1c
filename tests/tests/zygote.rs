//! The zygote's life: replaced when it dies (the runs it had end `internal_error`, nothing
//! hangs), a warm child that dies is replaced, the zygote is recycled after its runs (renewing
//! the hash secret), and `auto` falls back to fresh interpreters where no zygote can start.

use std::time::{Duration, Instant};

use pyrunner_shared::RunStatus;
use pyrunner_tests::{executor_args, job, limits};
use pyrunner_worker::config::{ExecutorArgs, ExecutorKind};
use pyrunner_worker::Executor;

/// The zygotes this test process started.
fn zygotes() -> Vec<u32> {
    pyrunner_tests::procfs::children_named(std::process::id(), "pyrunner-zygote")
}

/// Settings of a zygote executor for one run at a time, with `warm_children` slots.
fn zygote_args(warm_children: usize) -> ExecutorArgs {
    let mut args = executor_args(1);
    args.executor = ExecutorKind::Zygote;
    args.warm_children = Some(warm_children);
    args
}

/// An executor built from `args` and started: its zygote up, its warm children ready.
async fn started(args: &ExecutorArgs) -> (Executor, tempfile::TempDir) {
    let (executor, root) = args.build().unwrap();
    (executor.start(false).await.unwrap(), root)
}

/// The zygote's children: its PID namespace helper, which keeps root's uid, and its warm
/// children.
fn helper_and_warm(zygote: u32) -> (Vec<u32>, Vec<u32>) {
    pyrunner_tests::procfs::children_named(zygote, "pyrunner-zygote")
        .into_iter()
        .partition(|&p| pyrunner_tests::procfs::uid(p) == Some(0))
}

fn kill(pid: u32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_zygote_fails_its_runs_and_is_replaced() {
    let (executor, _root) = started(&zygote_args(2)).await;
    let first = zygotes();
    assert_eq!(first.len(), 1, "{first:?}");

    let running = {
        let executor = executor.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let code = "import time\nprint('started', flush=True)\ntime.sleep(20)";
            let result = executor.run(&job(code, None, limits(None, None))).await;
            (result, started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    kill(first[0]);
    let (result, took) = running.await.unwrap();
    assert_eq!(result.status, RunStatus::InternalError, "{result:#?}");
    assert!(took < Duration::from_secs(5), "the run hung for {took:?}");

    // The next run gets a new zygote (the old one's warm children died with it).
    let next = executor
        .run(&job("print(6 * 7)", None, limits(None, None)))
        .await;
    assert_eq!(next.status, RunStatus::Success, "{next:#?}");
    assert_eq!(next.stdout, "42\n");
    let now = zygotes();
    assert_eq!(now.len(), 1, "{now:?}");
    assert_ne!(now, first);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_warm_child_is_replaced() {
    let (executor, _root) = started(&zygote_args(1)).await;
    for _ in 0..3 {
        // The slot's waiting child is the zygote's only warm child.
        let (_, warm) = helper_and_warm(zygotes()[0]);
        assert_eq!(warm.len(), 1, "{warm:?}");
        kill(warm[0]);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let r = executor
            .run(&job("print('fine')", None, limits(None, None)))
            .await;
        assert_eq!(r.status, RunStatus::Success, "{r:#?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_pid_namespace_helper_takes_its_zygote_and_both_are_replaced() {
    let (executor, _root) = started(&zygote_args(1)).await;
    let first = zygotes();
    let (helpers, _) = helper_and_warm(first[0]);
    assert_eq!(helpers.len(), 1, "{helpers:?}");
    let helper = helpers[0];
    kill(helper);
    // The helper's inits die with it, and with each init its namespace: the waiting child
    // too. A run meanwhile ends killed or internal_error, none hangs; the next spawn finds the
    // helper gone, the zygote ends with its last child, and a new pair serves the next runs.
    let mut served = None;
    for _ in 0..10 {
        let r = executor
            .run(&job("print(6 * 7)", None, limits(None, None)))
            .await;
        if r.status == RunStatus::Success && zygotes() != first {
            served = Some(r);
            break;
        }
        assert!(
            matches!(
                r.status,
                RunStatus::Success | RunStatus::InternalError | RunStatus::Killed
            ),
            "{r:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let served = served.expect("a new zygote serves runs");
    assert_eq!(served.stdout, "42\n");
    let now = zygotes();
    assert_eq!(now.len(), 1, "{now:?}");
    assert!(
        pyrunner_tests::procfs::comm(helper).is_none(),
        "the old helper is still there"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_zygote_is_recycled_after_its_runs() {
    let mut args = zygote_args(1);
    args.zygote_max_runs = 3;
    let (executor, _root) = started(&args).await;
    let first = zygotes();
    let mut hashes = std::collections::BTreeSet::new();
    // The successor starts in the background while the old zygote keeps serving.
    let started = Instant::now();
    let mut runs = 0;
    while hashes.len() < 2 && started.elapsed() < Duration::from_secs(10) {
        let r = executor
            .run(&job("print(hash('pyrunner'))", None, limits(None, None)))
            .await;
        assert_eq!(r.status, RunStatus::Success, "{r:#?}");
        hashes.insert(r.stdout);
        runs += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Children of one zygote share its hash secret; a new zygote draws a new one.
    assert!(
        hashes.len() >= 2,
        "one hash secret for {runs} runs: {hashes:?}"
    );
    // The old one ends with its last child, and is reaped.
    let retired = Instant::now();
    while zygotes().iter().any(|z| first.contains(z)) {
        assert!(
            retired.elapsed() < Duration::from_secs(3),
            "the first zygote is still there"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_falls_back_to_fresh_interpreters_without_a_zygote() {
    let mut args = executor_args(1);
    args.zygote_bin = Some("/nonexistent/pyrunner-zygote".into());

    args.executor = ExecutorKind::Zygote;
    let (executor, _root) = args.build().unwrap();
    assert!(
        executor.start(false).await.is_err(),
        "zygote mode must refuse"
    );

    args.executor = ExecutorKind::Auto;
    let (executor, _root) = args.build().unwrap();
    let executor = executor.start(true).await.unwrap();
    assert_eq!(executor.kind(), "fresh");
    let r = executor
        .run(&job(
            "import sympy; print(sympy.Integer(2)**10)",
            None,
            limits(None, None),
        ))
        .await;
    assert_eq!(r.status, RunStatus::Success, "{r:#?}");
    assert_eq!(r.stdout, "1024\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_descriptor_in_place_of_the_report_pipe_gets_no_end_record() {
    let (executor, _root) = pyrunner_tests::executor(1);
    // The run puts its stdout in place of the report pipe: an end record written to descriptor
    // 4 would show in its output.
    let code = "import os\nos.dup2(1, 4)\nprint('mine', flush=True)";
    let r = executor.run(&job(code, None, limits(None, None))).await;
    assert_eq!(r.status, RunStatus::Success, "{r:#?}");
    assert_eq!(
        r.stdout, "mine\n",
        "the end record went to the run's descriptor"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_zygote_runs_under_the_runs_seccomp_filter() {
    let (_executor, _root) = started(&zygote_args(1)).await;
    let zygote = zygotes()[0];
    let status = std::fs::read_to_string(format!("/proc/{zygote}/status")).unwrap();
    // Mode 2: a filter is installed (and its children inherit it).
    assert!(
        status
            .lines()
            .any(|l| l.split_whitespace().eq(["Seccomp:", "2"])),
        "{status}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_preload_s_object_arenas_sit_in_one_region_for_huge_pages() {
    let (executor, _root) = started(&zygote_args(1)).await;
    let info = executor.zygote_info().await.expect("a zygote");
    // numpy and sympy fill about 30 MiB of arenas; all of them come from the region.
    assert!(info.arena_mib >= 8, "{info:?}");
    // Arenas past the seal come from mmap as usual, and runs that allocate many go on working.
    let r = executor
        .run(&job(
            "x = [str(i) * 3 for i in range(300_000)]\nprint(len(x))",
            None,
            limits(None, None),
        ))
        .await;
    assert_eq!(
        (r.status, r.stdout.as_str()),
        (RunStatus::Success, "300000\n")
    );
}

/// The anonymous memory of `pid` held in 2 MiB pages, in MiB.
fn huge_pages_mib(pid: u32) -> u64 {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let kib: u64 = smaps
        .lines()
        .filter_map(|l| l.strip_prefix("AnonHugePages:"))
        .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    kib >> 10
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_zygote_keeps_its_huge_pages_through_its_forks() {
    let (executor, _root) = started(&zygote_args(2)).await;
    let info = executor.zygote_info().await.expect("a zygote");
    for _ in 0..20 {
        let r = executor.run(&job("pass", None, limits(None, None))).await;
        assert_eq!(r.status, RunStatus::Success, "{r:#?}");
    }
    // Its own allocations after a fork (its messages, each spawn request) would split the
    // 2 MiB pages of the heap it shares with its children, had they come from that heap.
    let zygote = zygotes()[0];
    let kept = huge_pages_mib(zygote);
    assert!(
        kept + 2 >= info.huge_pages_mib,
        "{kept} of {} MiB in huge pages after 20 runs",
        info.huge_pages_mib
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_end_record_ends_only_its_own_run_and_the_process_dies() {
    let (executor, _root) = pyrunner_tests::executor(1);
    // The run writes a record of its own, closes its pipes and goes on.
    let code = r#"
import ctypes, os, sys, time
# A name to find it by on the host: its pid is its PID namespace's.
ctypes.CDLL(None).prctl(15, b"forged-end", 0, 0, 0)
print(open('/proc/self/comm').read().strip(), flush=True)
os.write(4, b'\n\x1epyrunner-end {"exit":7,"cpu_ms":0,"peak_rss_kb":0}\n')
for fd in (1, 2, 4):
    os.close(fd)
time.sleep(30)
"#;
    let started = Instant::now();
    let r = executor.run(&job(code, None, limits(None, None))).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    // It only lied about itself: its own result says what it wrote.
    assert_eq!(r.exit_code, Some(7), "{r:#?}");
    assert_eq!(r.stdout, "forged-end\n", "{r:#?}");
    let gone = Instant::now();
    while pyrunner_tests::procfs::pids()
        .into_iter()
        .any(|p| pyrunner_tests::procfs::comm(p).as_deref() == Some("forged-end"))
    {
        assert!(
            gone.elapsed() < Duration::from_secs(2),
            "the process went on after its answer"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The slot serves the next run.
    let next = executor
        .run(&job("print('next')", None, limits(None, None)))
        .await;
    assert_eq!(next.stdout, "next\n");
}

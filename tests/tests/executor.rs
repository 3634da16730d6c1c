//! Runs in real sandboxes, straight through the executor: every status, and the containment
//! the first sandbox promises. Each case is data: a snippet, its limits, what must come out.

use std::time::{Duration, Instant};

use pyrunner_shared::{RunResult, RunStatus};
use pyrunner_tests::catalogue::{case, no_check, run_all, Case};
use pyrunner_tests::{executor, job, limits};

fn cases() -> Vec<Case> {
    vec![
        case("hello", "print('hello')", RunStatus::Success, |r| {
            assert_eq!(r.stdout, "hello\n");
            assert_eq!(r.exit_code, Some(0));
            assert!(r.exception.is_none());
        }),
        case(
            "stdout and stderr apart",
            "import sys\nprint('out')\nprint('err', file=sys.stderr)",
            RunStatus::Success,
            |r| {
                assert_eq!(r.stdout, "out\n");
                assert_eq!(r.stderr, "err\n");
            },
        ),
        Case {
            stdin: Some("3\n4\n"),
            ..case(
                "stdin",
                "a = int(input()); b = int(input()); print(a * b)",
                RunStatus::Success,
                |r| assert_eq!(r.stdout, "12\n"),
            )
        },
        case(
            "no stdin reads eof",
            "import sys; print(repr(sys.stdin.read()))",
            RunStatus::Success,
            |r| assert_eq!(r.stdout, "''\n"),
        ),
        case(
            "sympy",
            "import sympy; print(sympy.factorint(10**10))",
            RunStatus::Success,
            |r| assert_eq!(r.stdout, "{2: 10, 5: 10}\n"),
        ),
        case(
            "numpy",
            "import numpy as np; print(np.arange(10).sum())",
            RunStatus::Success,
            |r| assert_eq!(r.stdout, "45\n"),
        ),
        case(
            "unicode",
            "print('héllo ∑ 😀')",
            RunStatus::Success,
            |r| assert_eq!(r.stdout, "héllo ∑ 😀\n"),
        ),
        case(
            "uncaught exception",
            "def f():\n    return 1 / 0\nf()",
            RunStatus::Error,
            |r| {
                let e = r.exception.as_ref().expect("exception reported");
                assert_eq!(e.kind, "ZeroDivisionError");
                assert_eq!(e.message, "division by zero");
                assert!(
                    e.traceback.contains("main.py\", line 2, in f"),
                    "{}",
                    e.traceback
                );
                assert!(e.traceback.contains("return 1 / 0"), "{}", e.traceback);
                assert!(
                    !e.traceback.contains("_pyrunner"),
                    "harness frames leak: {}",
                    e.traceback
                );
                assert_eq!(r.exit_code, Some(1));
                assert!(r.stderr.contains("ZeroDivisionError"));
            },
        ),
        case("syntax error", "print(", RunStatus::Error, |r| {
            assert_eq!(r.exception.as_ref().unwrap().kind, "SyntaxError");
        }),
        case(
            "exception from a module",
            "import json; json.loads('{')",
            RunStatus::Error,
            |r| {
                assert_eq!(
                    r.exception.as_ref().unwrap().kind,
                    "json.decoder.JSONDecodeError"
                );
            },
        ),
        case(
            "sys.exit with a code",
            "import sys; print('x'); sys.exit(3)",
            RunStatus::Error,
            |r| {
                assert_eq!(r.exit_code, Some(3));
                assert!(r.exception.is_none());
                assert_eq!(r.stdout, "x\n");
            },
        ),
        case(
            "sys.exit(0) is success",
            "import sys; sys.exit(0)",
            RunStatus::Success,
            no_check,
        ),
        case(
            "__name__ is __main__",
            "print(__name__)",
            RunStatus::Success,
            |r| assert_eq!(r.stdout, "__main__\n"),
        ),
        Case {
            timeout_ms: Some(1000),
            ..case(
                "infinite loop",
                "while True: pass",
                RunStatus::Timeout,
                |r| {
                    assert!(
                        r.duration_ms >= 1000 && r.duration_ms < 3000,
                        "{}",
                        r.duration_ms
                    );
                },
            )
        },
        Case {
            timeout_ms: Some(1000),
            ..case(
                "sleep past the deadline",
                "import time; print('start', flush=True); time.sleep(60)",
                RunStatus::Timeout,
                |r| {
                    assert_eq!(r.stdout, "start\n");
                },
            )
        },
        Case {
            memory_mb: Some(128),
            ..case(
                "memory hog",
                "x = bytearray(512 * 1024 * 1024)",
                RunStatus::MemoryExceeded,
                |r| {
                    assert_eq!(r.exception.as_ref().unwrap().kind, "MemoryError");
                },
            )
        },
        Case {
            memory_mb: Some(256),
            ..case(
                "numpy memory hog",
                "import numpy as np; a = np.ones((1 << 30,))",
                RunStatus::MemoryExceeded,
                no_check,
            )
        },
        case(
            "growing list",
            "x = []\nwhile True: x.append(' ' * 10**6)",
            RunStatus::MemoryExceeded,
            no_check,
        ),
        case(
            "stdout flood",
            "import sys\nwhile True: sys.stdout.write('x' * 65536)",
            RunStatus::OutputLimitExceeded,
            |r| {
                assert_eq!(r.stdout.len(), 1024 * 1024);
                assert!(r.stdout_truncated);
                assert!(!r.stderr_truncated);
            },
        ),
        case(
            "stderr flood",
            "import os\nwhile True: os.write(2, b'e' * 65536)",
            RunStatus::OutputLimitExceeded,
            |r| {
                assert_eq!(r.stderr.len(), 1024 * 1024);
                assert!(r.stderr_truncated);
            },
        ),
        case(
            "killed by a signal",
            "import os, signal; os.kill(os.getpid(), signal.SIGTERM)",
            RunStatus::Killed,
            |r| {
                assert_eq!(r.signal, Some(libc_sigterm()));
            },
        ),
        case(
            "segfault through ctypes",
            "import ctypes; ctypes.string_at(0)",
            RunStatus::Killed,
            |r| {
                assert_eq!(r.signal, Some(11));
            },
        ),
    ]
}

fn libc_sigterm() -> i32 {
    15
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_case_ends_with_its_documented_status() {
    let (executor, _root) = executor(2);
    let failures = run_all(&executor, cases()).await;
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

//! No state crosses runs: what one run changes or leaves behind is invisible to the next run in
//! the same slot, and to runs going on at the same time. Each case is a pair of snippets: the
//! first tries to leave something behind, the second looks for it.

use std::time::Duration;

use pyrunner_shared::{RunResult, RunStatus};
use pyrunner_tests::{executor, job, limits};
use pyrunner_worker::config::ExecutorKind;
use pyrunner_worker::Executor;

struct Pair {
    name: &'static str,
    first: &'static str,
    second: &'static str,
    check: fn(&RunResult, &RunResult),
}

fn pairs() -> Vec<Pair> {
    vec![
        Pair {
            name: "a module, a global and a builtin changed by one run are pristine in the next",
            first: "import math, builtins, sys\nmath.pi = 3\nbuiltins.len = None\n\
                    sys.modules['json'] = None\nglobal_mark = 'dirty'\nprint('changed')",
            second: "import math, json\nprint(math.pi, len([1, 2]), 'global_mark' in globals(), json.dumps(1))",
            check: |_, b| assert_eq!(b.stdout, "3.141592653589793 2 False 1\n"),
        },
        Pair {
            name: "random, numpy.random and os.urandom differ from run to run",
            first: "import random, os, numpy\nprint(random.random(), numpy.random.rand(), os.urandom(8).hex())",
            second: "import random, os, numpy\nprint(random.random(), numpy.random.rand(), os.urandom(8).hex())",
            check: |a, b| {
                let (a, b): (Vec<&str>, Vec<&str>) =
                    (a.stdout.split_whitespace().collect(), b.stdout.split_whitespace().collect());
                assert_eq!(a.len(), 3, "{a:?}");
                for i in 0..3 {
                    assert_ne!(a[i], b[i], "value {i} repeated across runs");
                }
            },
        },
        Pair {
            name: "sympy's own random generator differs from run to run",
            first: "from sympy.core.random import randint\nprint([randint(0, 10**9) for _ in range(3)])",
            second: "from sympy.core.random import randint\nprint([randint(0, 10**9) for _ in range(3)])",
            check: |a, b| assert_ne!(a.stdout, b.stdout),
        },
        Pair {
            name: "files in the working directory and /tmp are gone, and the directory is new",
            first: "import os\nopen('left.txt', 'w').write('secret')\nos.mkdir('sub')\n\
                    open('/tmp/left.txt', 'w').write('secret')\nprint(os.getcwd())",
            second: "import os\nprint(os.getcwd())\nprint(sorted(os.listdir('.')), os.path.exists('/tmp/left.txt'))",
            check: |a, b| {
                let mut lines = b.stdout.lines();
                // A tmpfs of each run's own at the same place, or a new directory on the host.
                let second_dir = lines.next();
                assert!(
                    second_dir == Some("/work") || second_dir != Some(a.stdout.trim()),
                    "the working directory was reused"
                );
                assert_eq!(lines.next(), Some("[] False"));
                // A directory on the host is removed once the run is cleaned up, which may end
                // just after its result (a tmpfs of the run's own goes with its namespace).
                let first_dir = std::path::Path::new(a.stdout.trim());
                if first_dir == std::path::Path::new("/work") {
                    return;
                }
                let deadline = std::time::Instant::now() + Duration::from_secs(2);
                while first_dir.exists() && std::time::Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
                assert!(!first_dir.exists(), "the first run's directory remains");
            },
        },
        Pair {
            name: "descriptors and pipes left open are not inherited",
            first: "import os\nf = open('x', 'w')\nr, w = os.pipe()\nos.set_inheritable(r, True)\n\
                    os.set_inheritable(w, True)\nprint(sorted(int(n) for n in os.listdir('/proc/self/fd')))",
            second: "import os\nprint(sorted(int(n) for n in os.listdir('/proc/self/fd')))",
            check: |a, b| {
                assert!(a.stdout.len() > b.stdout.len(), "{} vs {}", a.stdout, b.stdout);
                // stdin, stdout, stderr, the report pipe, and the descriptor of the listing.
                assert_eq!(b.stdout, "[0, 1, 2, 3, 4]\n");
            },
        },
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_crosses_consecutive_runs_in_one_slot() {
    for kind in [ExecutorKind::Zygote, ExecutorKind::Fresh] {
        // One slot: every run follows the previous one in the same slot (same uid, same
        // cgroups), as a reused process would.
        let mut args = pyrunner_tests::executor_args(1);
        args.executor = kind;
        args.warm_children = Some(1);
        let (executor, _root) = args.build().unwrap();
        let failures = run_pairs(&executor).await;
        assert!(failures.is_empty(), "{kind:?}: failed: {failures:?}");
    }
}

async fn run_pairs(executor: &Executor) -> Vec<&'static str> {
    let mut failures = Vec::new();
    for pair in pairs() {
        let a = executor
            .run(&job(pair.first, None, limits(None, None)))
            .await;
        let b = executor
            .run(&job(pair.second, None, limits(None, None)))
            .await;
        let outcome = std::panic::catch_unwind(|| {
            assert_eq!(a.status, RunStatus::Success, "first run: {a:#?}");
            assert_eq!(b.status, RunStatus::Success, "second run: {b:#?}");
            (pair.check)(&a, &b);
        });
        if outcome.is_err() {
            failures.push(pair.name);
        }
    }
    failures
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_runs_cannot_reach_each_other() {
    let (executor, _root) = executor(2);
    // The first run keeps a file and a pipe open in its working directory, and waits.
    let holder = {
        let executor = executor.clone();
        tokio::spawn(async move {
            let code = r#"
import os, time
open('mine.txt', 'w').write('secret')
r, w = os.pipe()
time.sleep(3)
print(open('mine.txt').read())
"#;
            executor.run(&job(code, None, limits(None, None))).await
        })
    };
    // Its pid on the host is the process whose root holds the file, and its directory is
    // there (the way the host reaches into a run's mount namespace). A curious neighbour could
    // guess both.
    let mut target = None;
    for _ in 0..100 {
        if let Some(pid) = find_pid_with_file("work/mine.txt") {
            target = Some((format!("/proc/{pid}/root/work"), pid));
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (dir, pid) = target.expect("the holder runs");
    let probe = r#"
import os, sys
cwd, pid = sys.stdin.read().split()
attempts = [
    lambda: open(cwd + '/mine.txt').read(),
    lambda: os.listdir(cwd),
    lambda: os.listdir(f'/proc/{pid}/fd'),
    lambda: open(f'/proc/{pid}/mem', 'rb').read(1),
    lambda: os.kill(int(pid), 9),
]
results = []
for attempt in attempts:
    try:
        attempt()
        results.append('reached')
    except PermissionError:
        results.append('denied')
    except (FileNotFoundError, ProcessLookupError):
        # The neighbour's pid means nothing in this run's PID namespace.
        results.append('absent')
print(results)
"#;
    let b = executor
        .run(&job(
            probe,
            Some(&format!("{dir} {pid}")),
            limits(None, None),
        ))
        .await;
    assert_eq!(b.status, RunStatus::Success, "{b:#?}");
    assert_eq!(
        b.stdout,
        "['absent', 'absent', 'absent', 'absent', 'absent']\n"
    );
    let a = holder.await.unwrap();
    assert_eq!(
        a.status,
        RunStatus::Success,
        "the holder was disturbed: {a:#?}"
    );
    assert_eq!(a.stdout, "secret\n");
}

/// The pid of a process whose root directory holds `file` (a relative path).
fn find_pid_with_file(file: &str) -> Option<i32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        e.path().join("root").join(file).exists().then_some(pid)
    })
}

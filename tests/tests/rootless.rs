//! A service without real root: the embedded api started as an unprivileged user makes itself
//! root of a user namespace of its own, and runs still get their namespaces, their read-only
//! view, Landlock and seccomp; what it cannot have (a uid per slot, cgroups) it reports off.

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pyrunner_shared::RunStatus;
use pyrunner_tests::catalogue::{case, no_check, Case};
use pyrunner_tests::fleet::{binary, free_port};
use pyrunner_tests::http::{get, run_cases};

/// The unprivileged user the api runs as.
const NOBODY: u32 = 65_534;

struct Api {
    child: Child,
    url: String,
}

impl Drop for Api {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_as_nobody() -> Api {
    let port = free_port();
    let child = Command::new(binary("pyrunner-api"))
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("PYRUNNER_BIND", format!("127.0.0.1:{port}"))
        .env("PYRUNNER_RUNTIME_DIR", pyrunner_tests::runtime_dir())
        .env("PYRUNNER_CONCURRENCY", "2")
        .env("RUST_LOG", "warn")
        .uid(NOBODY)
        .gid(NOBODY)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("start the api as nobody");
    let api = Api {
        child,
        url: format!("http://127.0.0.1:{port}"),
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ready = reqwest::get(format!("{}/readyz", api.url))
            .await
            .is_ok_and(|r| r.status().is_success());
        if ready {
            return api;
        }
        assert!(Instant::now() < deadline, "the api did not get ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What a run of a service without real root must and must not reach.
fn cases() -> Vec<Case> {
    vec![
        case(
            "the run is uid 1000 of a user namespace of its own, alone in its PID namespace",
            "import os\nprint(os.getuid(), open('/proc/self/uid_map').read().split(), os.getcwd(), \
             sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))",
            RunStatus::Success,
            |r| assert_eq!(r.stdout, "1000 ['1000', '0', '1'] /work [1, 2]\n", "{r:#?}"),
        ),
        case(
            "the run holds no capability",
            "print({l.split()[1] for l in open('/proc/self/status') if l.startswith('Cap')})",
            RunStatus::Success,
            |r| assert_eq!(r.stdout, "{'0000000000000000'}\n", "{r:#?}"),
        ),
        case(
            "the host's files are not in the run's view, and the view is read-only",
            "import os\nprint([p for p in ('/etc/passwd', '/home', '/root', '/run', '/var/log') \
             if os.path.lexists(p)], bool(os.statvfs('/usr').f_flag & os.ST_RDONLY))",
            RunStatus::Success,
            |r| assert_eq!(r.stdout, "[] True\n", "{r:#?}"),
        ),
        case(
            "the network namespace is empty",
            "import socket\ntry:\n    socket.create_connection(('127.0.0.1', 6379), 1)\n\
             except OSError as e:\n    print(type(e).__name__)",
            RunStatus::Success,
            |r| assert_eq!(r.stdout, "PermissionError\n", "{r:#?}"),
        ),
        case(
            "numpy and sympy work",
            "import numpy as np, sympy\nprint(np.arange(10).sum(), sympy.factorint(360))",
            RunStatus::Success,
            |r| assert_eq!(r.stdout, "45 {2: 3, 3: 2, 5: 1}\n", "{r:#?}"),
        ),
        case(
            "a file in /tmp stays in the run",
            "open('/tmp/pyrunner-rootless', 'w').write('x')\nprint(open('/tmp/pyrunner-rootless').read())",
            RunStatus::Success,
            |r| {
                assert_eq!(r.stdout, "x\n");
                assert!(!std::path::Path::new("/tmp/pyrunner-rootless").exists());
            },
        ),
        // The process limit counts the run's processes in its own user namespace, not every
        // process of the uid it shares with the worker and the other runs.
        case(
            "the process limit is the run's own",
            "import os\nn = 0\ntry:\n    while True:\n        if os.fork() == 0:\n            \
             import time; time.sleep(30)\n        n += 1\nexcept OSError as e:\n    print(40 < n < 64)",
            RunStatus::Success,
            |r| assert_eq!(r.stdout, "True\n", "{r:#?}"),
        ),
        case(
            "a memory hog",
            "x = bytearray(4 << 30)",
            RunStatus::MemoryExceeded,
            no_check,
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_real_root_runs_keep_their_namespaces_view_landlock_and_seccomp() {
    let api = start_as_nobody().await;
    let report = get(&format!("{}/isolation", api.url)).await;
    let layers = report.body["layers"].as_object().expect("a report");
    for name in [
        "user_namespace",
        "network_namespace",
        "mount_namespace",
        "pid_namespace",
        "uts_namespace",
        "ipc_namespace",
        "landlock",
        "seccomp",
    ] {
        assert_eq!(layers[name]["active"], true, "{name}: {}", layers[name]);
    }
    let detail = layers["user_namespace"]["detail"].as_str().unwrap();
    assert!(detail.contains("without real root"), "{detail}");
    for name in ["uid_per_slot", "cgroup_memory", "cgroup_pids"] {
        assert_eq!(layers[name]["active"], false, "{name}: {}", layers[name]);
    }
    // The service itself runs as nobody on the host.
    let status = std::fs::read_to_string(format!("/proc/{}/status", api.child.id())).unwrap();
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(
        uid_line.split_whitespace().skip(1).all(|u| u == "65534"),
        "{uid_line}"
    );
    let failures = run_cases(&api.url, cases()).await;
    assert!(
        failures.is_empty(),
        "failed cases:\n{}",
        failures.join("\n")
    );
}

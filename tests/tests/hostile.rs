//! Hostile code against the first sandbox: each case is a snippet and the outcome that proves
//! the layer holds. Run as root, as the service runs, so that the uid drop is exercised.

use std::time::Duration;

use pyrunner_shared::{RunResult, RunStatus};
use pyrunner_tests::catalogue::{case, no_check, run_all, Case};
use pyrunner_tests::{executor, job, limits};

fn exception(r: &RunResult) -> &str {
    r.exception.as_ref().map_or("", |e| e.kind.as_str())
}

fn denied(r: &RunResult) {
    assert_eq!(exception(r), "PermissionError", "{r:#?}");
}

/// A snippet that calls a system call through ctypes and prints the errno it failed with.
macro_rules! syscall_errno {
    ($nr:expr, $args:expr) => {
        concat!(
            "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n",
            "rc = libc.syscall(",
            $nr,
            $args,
            ")\n",
            "print(rc, os.strerror(ctypes.get_errno()) if rc == -1 else 'ok')"
        )
    };
}

fn cases() -> Vec<Case> {
    vec![
        case("inet socket", "import socket; socket.socket(socket.AF_INET)", RunStatus::Error, denied),
        case("inet6 socket", "import socket; socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)", RunStatus::Error, denied),
        case("raw socket", "import socket; socket.socket(socket.AF_INET, socket.SOCK_RAW, 1)", RunStatus::Error, denied),
        case("packet socket", "import socket; socket.socket(socket.AF_PACKET, socket.SOCK_RAW)", RunStatus::Error, denied),
        case("netlink socket", "import socket; socket.socket(socket.AF_NETLINK, socket.SOCK_RAW)", RunStatus::Error, denied),
        case("vsock", "import socket; socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)", RunStatus::Error, denied),
        case("dns lookup", "import socket; socket.getaddrinfo('example.com', 80)", RunStatus::Error, |r| {
            assert!(exception(r).contains("gaierror") || exception(r) == "PermissionError", "{r:#?}")
        }),
        case(
            "connect to redis over a unix socket",
            "import socket; s = socket.socket(socket.AF_UNIX); s.connect('/var/run/redis/redis-server.sock')",
            RunStatus::Error,
            denied,
        ),
        case(
            "unix socket pair still works",
            "import socket; a, b = socket.socketpair(); a.send(b'hi'); print(b.recv(2))",
            RunStatus::Success,
            |r| assert_eq!(r.stdout, "b'hi'\n"),
        ),
        case("environment is empty of the worker's variables", "import os; print(sorted(os.environ))", RunStatus::Success, |r| {
            assert!(!r.stdout.contains("PYRUNNER_TEST_SECRET"), "{}", r.stdout);
            assert!(!r.stdout.contains("REDIS_URL") && !r.stdout.contains("AMQP_URL"), "{}", r.stdout);
        }),
        case("runs as an unprivileged uid", "import os; print(os.getuid(), os.geteuid(), os.getgroups())", RunStatus::Success, |r| {
            let uid: u32 = r.stdout.split_whitespace().next().unwrap().parse().unwrap();
            assert!(uid >= 64_000, "{}", r.stdout);
            assert!(r.stdout.trim_end().ends_with("[]"), "{}", r.stdout);
        }),
        case("reading /etc/shadow", "open('/etc/shadow').read()", RunStatus::Error, denied),
        case("reading the worker's environment", "open('/proc/1/environ').read()", RunStatus::Error, denied),
        case("writing outside the working directory", "open('/etc/pyrunner-test', 'w')", RunStatus::Error, denied),
        case("writing in the working directory", "open('f.txt', 'w').write('x'); print(open('f.txt').read())", RunStatus::Success, |r| {
            assert_eq!(r.stdout, "x\n")
        }),
        case("setuid to root", "import os; os.setuid(0)", RunStatus::Error, denied),
        case("ptrace", syscall_errno!("101", ", 16, 1, 0, 0"), RunStatus::Success, |r| {
            assert_eq!(r.stdout, "-1 Operation not permitted\n")
        }),
        case("process_vm_readv", syscall_errno!("310", ", 1, 0, 0, 0, 0, 0"), RunStatus::Success, |r| {
            assert_eq!(r.stdout, "-1 Operation not permitted\n")
        }),
        case("unshare a user namespace", syscall_errno!("272", ", 0x10000000"), RunStatus::Success, |r| {
            assert_eq!(r.stdout, "-1 Operation not permitted\n")
        }),
        case("clone into a new pid namespace", syscall_errno!("56", ", 0x20000000 | 17, 0, 0, 0, 0"), RunStatus::Success, |r| {
            assert_eq!(r.stdout, "-1 Operation not permitted\n")
        }),
        case("bpf", syscall_errno!("321", ", 0, 0, 0"), RunStatus::Success, |r| {
            assert_eq!(r.stdout, "-1 Operation not permitted\n")
        }),
        case("keyctl", syscall_errno!("250", ", 0, 0, 0"), RunStatus::Success, |r| {
            assert_eq!(r.stdout, "-1 Operation not permitted\n")
        }),
        case("io_uring_setup", syscall_errno!("425", ", 8, 0"), RunStatus::Success, |r| {
            assert_eq!(r.stdout, "-1 Function not implemented\n")
        }),
        case("userfaultfd", syscall_errno!("323", ", 0"), RunStatus::Success, |r| {
            assert_eq!(r.stdout, "-1 Operation not permitted\n")
        }),
        case("mount", syscall_errno!("165", ", 0, 0, 0, 0, 0"), RunStatus::Success, |r| {
            assert_eq!(r.stdout, "-1 Operation not permitted\n")
        }),
        case("x32 system call number", syscall_errno!("0x40000000 | 39", ""), RunStatus::Killed, |r| {
            assert_eq!(r.signal, Some(31), "SIGSYS expected: {r:#?}")
        }),
        case(
            "threads still start (clone3 falls back to clone)",
            "import threading\nt = threading.Thread(target=print, args=('thread',))\nt.start(); t.join()",
            RunStatus::Success,
            |r| assert_eq!(r.stdout, "thread\n"),
        ),
        case(
            "subprocesses still start",
            "import subprocess; print(subprocess.run(['echo', 'child'], capture_output=True, text=True).stdout, end='')",
            RunStatus::Success,
            |r| assert_eq!(r.stdout, "child\n"),
        ),
        Case {
            timeout_ms: Some(3000),
            ..case(
                "fork bomb",
                "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
                RunStatus::Timeout,
                no_check,
            )
        },
        case(
            "process limit",
            "import os\nn = 0\ntry:\n    while True:\n        if os.fork() == 0:\n            import time; time.sleep(30)\n        n += 1\nexcept OSError as e:\n    print('stopped', n < 64)",
            RunStatus::Success,
            |r| assert_eq!(r.stdout, "stopped True\n"),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_code_is_contained() {
    // A secret in the worker's environment must never reach a run.
    std::env::set_var("PYRUNNER_TEST_SECRET", "s3cret");
    let (executor, _root) = executor(2);
    let failures = run_all(&executor, cases()).await;
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

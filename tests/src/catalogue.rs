//! Data-driven run cases: a snippet, its limits, the status it must end with, and a check of
//! the rest of the result.

use std::future::Future;

use pyrunner_shared::{RunResult, RunStatus};
use pyrunner_worker::Executor;

use crate::{job, limits};

/// One case of a catalogue.
#[derive(Clone, Copy)]
pub struct Case {
    pub name: &'static str,
    pub code: &'static str,
    pub stdin: Option<&'static str>,
    pub timeout_ms: Option<u64>,
    pub memory_mb: Option<u64>,
    pub status: RunStatus,
    pub check: fn(&RunResult),
}

/// A case with default limits and no stdin.
pub const fn case(
    name: &'static str,
    code: &'static str,
    status: RunStatus,
    check: fn(&RunResult),
) -> Case {
    Case {
        name,
        code,
        stdin: None,
        timeout_ms: None,
        memory_mb: None,
        status,
        check,
    }
}

/// A check that only the status matters.
pub fn no_check(_: &RunResult) {}

/// Checks one result against its case; the error says what differed.
pub fn verify(case: &Case, result: &RunResult) -> Result<(), String> {
    let outcome = std::panic::catch_unwind(|| {
        assert_eq!(result.status, case.status, "status of {result:#?}");
        (case.check)(result);
    });
    outcome.map_err(|panic| {
        let msg = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        format!("{}: {msg}", case.name)
    })
}

/// Runs every case with `run` (one transport: the executor, or the HTTP API) and checks each
/// result; returns the failures.
pub async fn check_each<F, Fut>(cases: Vec<Case>, mut run: F) -> Vec<String>
where
    F: FnMut(Case) -> Fut,
    Fut: Future<Output = Result<RunResult, String>>,
{
    let mut failures = Vec::new();
    for case in cases {
        match run(case).await {
            Ok(result) => failures.extend(verify(&case, &result).err()),
            Err(e) => failures.push(format!("{}: {e}", case.name)),
        }
    }
    failures
}

/// Runs every case through `executor` and returns the failures.
pub async fn run_all(executor: &Executor, cases: Vec<Case>) -> Vec<String> {
    check_each(cases, |case| async move {
        let job = job(
            case.code,
            case.stdin,
            limits(case.timeout_ms, case.memory_mb),
        );
        let result = executor.run(&job).await;
        if result.id != job.id {
            return Err("result has another job's id".to_owned());
        }
        Ok(result)
    })
    .await
}

/// One or more cases for every status a run can end with.
pub fn statuses() -> Vec<Case> {
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
            "home and temporary directory are the run's own directory, for children too",
            "import os, subprocess, tempfile\nhere = os.getcwd()\n\
             child = subprocess.run(['sh', '-c', 'echo $HOME $TMPDIR'], capture_output=True, text=True)\n\
             print(os.environ['HOME'] == here, os.environ['TMPDIR'] == here,\n\
             tempfile.gettempdir() == here, os.path.expanduser('~') == here,\n\
             child.stdout.split() == [here, here])",
            RunStatus::Success,
            |r| assert_eq!(r.stdout, "True True True True True\n"),
        ),
        preparation_is_not_counted(),
        case(
            "SIGINT raises KeyboardInterrupt, as in any interpreter",
            "import os, signal\ntry:\n    os.kill(os.getpid(), signal.SIGINT)\n    \
             import time; time.sleep(1)\nexcept KeyboardInterrupt:\n    print('interrupted')",
            RunStatus::Success,
            |r| assert_eq!(r.stdout, "interrupted\n"),
        ),
        case(
            "atexit handlers and non-daemon threads finish before the end",
            "import atexit, threading, time\natexit.register(lambda: print('at exit'))\n\
             threading.Thread(target=lambda: (time.sleep(0.2), print('thread'))).start()\n\
             print('main')",
            RunStatus::Success,
            |r| assert_eq!(r.stdout, "main\nthread\nat exit\n"),
        ),
        case(
            "a thread pool's queued work finishes before the end",
            "from concurrent.futures import ThreadPoolExecutor\nimport time\n\
             pool = ThreadPoolExecutor(1)\n\
             pool.submit(time.sleep, 0.2)\npool.submit(print, 'queued')\nprint('main')",
            RunStatus::Success,
            |r| assert_eq!(r.stdout, "main\nqueued\n"),
        ),
        case(
            "threading's own exit callbacks run before the end",
            "import threading\nthreading._register_atexit(print, 'threading exit')\nprint('main')",
            RunStatus::Success,
            |r| assert_eq!(r.stdout, "main\nthreading exit\n"),
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
        case(
            "exception message with quotes, controls and unicode",
            "raise ValueError('a \\\"q\\\"\\n\\ttab \\x01 \\\\ é 😀')",
            RunStatus::Error,
            |r| {
                let e = r.exception.as_ref().expect("exception reported");
                assert_eq!(e.kind, "ValueError");
                assert_eq!(e.message, "a \"q\"\n\ttab \u{1} \\ é 😀");
            },
        ),
        case(
            "exception message with a lone surrogate",
            "raise ValueError('\\ud800')",
            RunStatus::Error,
            |r| {
                assert_eq!(
                    r.exception.as_ref().expect("exception reported").message,
                    "\u{fffd}"
                );
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
                "x = b'x' * (512 << 20)",
                RunStatus::MemoryExceeded,
                no_check,
            )
        },
        Case {
            memory_mb: Some(256),
            ..case(
                "numpy allocation far past the limit",
                "import numpy as np; a = np.ones((1 << 30,))",
                RunStatus::MemoryExceeded,
                |r| {
                    let kind = &r.exception.as_ref().expect("a MemoryError").kind;
                    assert!(kind.ends_with("MemoryError"), "{kind}");
                },
            )
        },
        Case {
            memory_mb: Some(256),
            ..case(
                "numpy memory hog",
                "import numpy as np; a = np.ones((64 << 20,)); print(a.sum())",
                RunStatus::MemoryExceeded,
                no_check,
            )
        },
        Case {
            memory_mb: Some(64),
            ..case(
                "numpy at the smallest memory limit",
                "import numpy as np; print(np.arange(3).sum())",
                RunStatus::Success,
                |r| assert_eq!(r.stdout, "3\n"),
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

fn exception(r: &RunResult) -> &str {
    r.exception.as_ref().map_or("", |e| e.kind.as_str())
}

fn denied(r: &RunResult) {
    assert_eq!(exception(r), "PermissionError", "{r:#?}");
}

/// A path of the host a run must not reach: absent from its view of the filesystem, refused
/// by Landlock where it has no view, or on a read-only mount.
fn out_of_reach(r: &RunResult) {
    let refused = match exception(r) {
        "PermissionError" | "FileNotFoundError" => true,
        "OSError" => r.stderr.contains("Read-only file system"),
        _ => false,
    };
    assert!(refused, "{r:#?}");
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

/// A warm child enters its sandbox before its job comes (about 3 ms of CPU time): that is the
/// service's, not the run's.
pub fn preparation_is_not_counted() -> Case {
    case(
        "the sandbox's preparation is not the run's CPU time",
        "import os; os._exit(0)",
        RunStatus::Success,
        |r| assert!(r.cpu_ms <= r.duration_ms + 1, "{r:#?}"),
    )
}

/// A run can write a warm child's end record itself and close its pipes: that ends its run early
/// (the process goes on, until the worker kills it), but what it used comes from the kernel, not
/// from the record. (A fresh interpreter's run goes on to its end.)
pub fn forged_end_record() -> Case {
    case(
        "a forged end record hides no CPU time",
        r#"import os, time
t = time.process_time()
while time.process_time() - t < 0.3: pass
os.write(4, b'\n\x1epyrunner-end {"exit":0,"cpu_ms":0,"peak_rss_kb":0}\n')
for fd in (1, 2, 4): os.close(fd)
t = time.process_time()
while time.process_time() - t < 0.2: pass
os._exit(0)"#,
        RunStatus::Success,
        |r| assert!(r.cpu_ms >= 290, "{r:#?}"),
    )
}

/// Hostile code, each case with the outcome that proves a layer holds. The worker's
/// environment must hold `PYRUNNER_TEST_SECRET`, which no run may see.
pub fn hostile() -> Vec<Case> {
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
        case(
            "the host name is the run's own, and so are its IPC objects",
            "import os, socket; print(socket.gethostname(), os.readlink('/proc/self/ns/ipc'))",
            RunStatus::Success,
            |r| {
                let host_ipc = std::fs::read_link("/proc/self/ns/ipc").unwrap();
                let (name, ipc) = r.stdout.trim_end().split_once(' ').unwrap();
                assert_eq!(name, "pyrunner");
                assert_ne!(ipc, host_ipc.to_str().unwrap(), "the host's IPC namespace");
            },
        ),
        case(
            "renaming the host",
            "import socket; socket.sethostname('mine')",
            RunStatus::Error,
            denied,
        ),
        case(
            "a UTS namespace of the run's own (what a warm child's entry may make)",
            syscall_errno!("272", ", 0x04000000"),
            RunStatus::Success,
            |r| assert_eq!(r.stdout, "-1 Operation not permitted\n"),
        ),
        case(
            "the network namespace has no interface but a loopback, and no route",
            "lines = open('/proc/self/net/dev').read().splitlines()[2:]\n\
             print([l.split(':')[0].strip() for l in lines])\n\
             print(open('/proc/self/net/route').read().splitlines()[1:])",
            RunStatus::Success,
            |r| assert_eq!(r.stdout, "['lo']\n[]\n"),
        ),
        // A PID namespace per run: an init of the service's own is pid 1, the run is pid 2, and
        // its /proc shows nothing else.
        case(
            "a run sees only its own processes",
            "import os, subprocess\np = subprocess.Popen(['sleep', '5'])\n\
             print(os.getpid(), os.getppid(), sorted(int(x) for x in os.listdir('/proc') if x.isdigit()))\n\
             p.kill()",
            RunStatus::Success,
            |r| assert_eq!(r.stdout, "2 0 [1, 2, 3]\n"),
        ),
        case(
            "signalling the init of the run's PID namespace",
            "import os, signal; os.kill(1, signal.SIGKILL)",
            RunStatus::Error,
            denied,
        ),
        case(
            "a PID namespace of the run's own (what the zygote's helper may make)",
            syscall_errno!("272", ", 0x20000000"),
            RunStatus::Success,
            |r| assert_eq!(r.stdout, "-1 Operation not permitted\n"),
        ),
        case(
            "joining a mount namespace (what a warm child does to copy the view)",
            concat!(
                "import os\nfd = os.open('/proc/self/ns/mnt', os.O_RDONLY)\n",
                syscall_errno!("308", ", fd, 0x20000")
            ),
            RunStatus::Success,
            |r| assert_eq!(r.stdout, "-1 Operation not permitted\n"),
        ),
        case(
            "moving its children into another PID namespace (what the zygote may do)",
            concat!(
                "import os\nfd = os.open('/proc/self/ns/pid', os.O_RDONLY)\n",
                syscall_errno!("308", ", fd, 0x20000000")
            ),
            RunStatus::Success,
            |r| assert_eq!(r.stdout, "-1 Operation not permitted\n"),
        ),
        case("environment is empty of the worker's variables", "import os; print(sorted(os.environ))", RunStatus::Success, |r| {
            assert!(!r.stdout.contains("PYRUNNER_TEST_SECRET"), "{}", r.stdout);
            assert!(!r.stdout.contains("REDIS_URL") && !r.stdout.contains("AMQP_URL"), "{}", r.stdout);
        }),
        // A user namespace per run: only the run's own uid and gid are mapped, and it holds no
        // capability there.
        case(
            "the run is alone in a user namespace that maps only its uid",
            "print(open('/proc/self/uid_map').read().split(), open('/proc/self/gid_map').read().split(), \
             open('/proc/self/setgroups').read().strip())",
            RunStatus::Success,
            |r| {
                let line = r.stdout.trim_end();
                let uid = line.split('\'').nth(1).unwrap_or_default();
                assert!(uid.parse::<u32>().is_ok_and(|u| u >= 64_000), "{line}");
                assert_eq!(line, format!("['{uid}', '{uid}', '1'] ['{uid}', '{uid}', '1'] deny"));
            },
        ),
        case(
            "the run holds no capability, bounding set included",
            "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('Cap')])",
            RunStatus::Success,
            |r| assert_eq!(r.stdout, format!("{:?}\n", ["0000000000000000"; 5]).replace('"', "'")),
        ),
        case(
            "root's files belong to a uid the run's namespace does not map",
            "import os; print(os.stat('/usr').st_uid, os.stat('/proc/1').st_uid)",
            RunStatus::Success,
            |r| assert_eq!(r.stdout, "65534 65534\n"),
        ),
        case("runs as an unprivileged uid", "import os; print(os.getuid(), os.geteuid(), os.getgroups())", RunStatus::Success, |r| {
            let uid: u32 = r.stdout.split_whitespace().next().unwrap().parse().unwrap();
            assert!(uid >= 64_000, "{}", r.stdout);
            assert!(r.stdout.trim_end().ends_with("[]"), "{}", r.stdout);
        }),
        case("reading /etc/shadow", "open('/etc/shadow').read()", RunStatus::Error, out_of_reach),
        // Pid 1 is the init of the run's PID namespace, a root process; without that namespace
        // it would be the host's init.
        case("reading pid 1's environment", "open('/proc/1/environ').read()", RunStatus::Error, denied),
        case("writing outside the working directory", "open('/etc/pyrunner-test', 'w')", RunStatus::Error, |r| {
            out_of_reach(r);
            assert!(!std::path::Path::new("/etc/pyrunner-test").exists(), "it reached the host's /etc");
        }),
        case("writing in the working directory", "open('f.txt', 'w').write('x'); print(open('f.txt').read())", RunStatus::Success, |r| {
            assert_eq!(r.stdout, "x\n")
        }),
        // A mount namespace per run: a read-only view of what it needs, in which its directory,
        // /tmp and /dev/shm are tmpfs of its own. Landlock: only those are writable, and only
        // the runtime, the system's libraries and programs and a few files of /etc are
        // readable, whatever the uid allows.
        case(
            "a file in /tmp stays in the run",
            "open('/tmp/pyrunner-left-behind', 'w').write('x'); print(open('/tmp/pyrunner-left-behind').read())",
            RunStatus::Success,
            |r| {
                assert_eq!(r.stdout, "x\n");
                assert!(!std::path::Path::new("/tmp/pyrunner-left-behind").exists(), "it reached the host's /tmp");
            },
        ),
        case(
            "the host's files are not in the run's view (the runtime's own directories aside)",
            "import os, sys\n\
             paths = ['/etc/passwd', '/etc/shadow', '/etc/hostname', '/root', '/home', '/var/log', '/var/lib/dpkg', '/run', \
                      '/srv', '/opt', '/mnt', '/boot', '/dev/log', '/dev/pts', '/dev/kmsg', '/dev/tty', '/dev/console', \
                      '/dev/vda', '/dev/mem', '/dev/fuse', '/dev/net', '/sys/fs/cgroup', '/sys/kernel', '/sys/class']\n\
             parts = sys.prefix.split(os.sep)\n\
             ancestors = {os.sep.join(parts[:i]): parts[i] for i in range(2, len(parts))}\n\
             def exposed(p):\n    \
                 if not os.path.lexists(p):\n        return False\n    \
                 if p not in ancestors:\n        return True\n    \
                 try:\n        return os.listdir(p) != [ancestors[p]]\n    \
                 except PermissionError:\n        return False\n\
             print([p for p in paths if exposed(p)])",
            RunStatus::Success,
            |r| assert_eq!(r.stdout, "[]\n", "{r:#?}"),
        ),
        case(
            "the view is read-only, and the run works in /work",
            "import os\nprint(os.getcwd(), [bool(os.statvfs(p).f_flag & os.ST_RDONLY) for p in ('/', '/usr', '.', '/tmp')])",
            RunStatus::Success,
            |r| assert_eq!(r.stdout, "/work [True, True, False, False]\n"),
        ),
        case(
            "a file in /dev/shm stays in the run",
            "open('/dev/shm/pyrunner-left-behind', 'w').write('x'); print(open('/dev/shm/pyrunner-left-behind').read())",
            RunStatus::Success,
            |r| {
                assert_eq!(r.stdout, "x\n");
                assert!(!std::path::Path::new("/dev/shm/pyrunner-left-behind").exists(), "it reached the host's /dev/shm");
            },
        ),
        case(
            "the working directory is a tmpfs of 256 MiB",
            "import os; s = os.statvfs('.'); print(s.f_blocks * s.f_frsize >> 20)",
            RunStatus::Success,
            |r| assert_eq!(r.stdout, "256\n"),
        ),
        case(
            "filling the working directory",
            "for i in range(8):\n    open(f'f{i}', 'wb').write(b'x' * (60 << 20))",
            RunStatus::Error,
            |r| assert!(r.stderr.contains("No space left on device"), "{r:#?}"),
        ),
        case("writing to /var/tmp", "open('/var/tmp/pyrunner-left-behind', 'w')", RunStatus::Error, out_of_reach),
        case("multiprocessing pools work (their semaphores live in /dev/shm)",
            "import multiprocessing as m\nwith m.Pool(2) as p:\n    print(p.map(abs, [-1, -2]))",
            RunStatus::Success, |r| assert_eq!(r.stdout, "[1, 2]\n")),
        case("reading /etc/passwd", "open('/etc/passwd').read()", RunStatus::Error, out_of_reach),
        case("listing /etc", "import os; os.listdir('/etc')", RunStatus::Error, denied),
        case("reading a host file through a symlink", "import os; os.symlink('/etc/hostname', 'h'); open('h').read()", RunStatus::Error, out_of_reach),
        case("writing /dev/null and reading the runtime still work",
            "import os, sys\nopen(os.devnull, 'w').write('x')\nprint(os.path.isfile(sys.executable), len(os.urandom(4)))",
            RunStatus::Success, |r| assert_eq!(r.stdout, "True 4\n")),
        // Refused for want of the capability, or (in a user namespace) for want of a uid 0.
        case("setuid to root", "import os; os.setuid(0)", RunStatus::Error, |r| {
            let refused = exception(r) == "PermissionError"
                || (exception(r) == "OSError" && r.stderr.contains("Invalid argument"));
            assert!(refused, "{r:#?}");
        }),
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
        // The seccomp policy is an allowlist: what it does not name is refused, even calls the
        // kernel does not have (EPERM, not ENOSYS).
        case("a system call no kernel has yet", syscall_errno!("999", ""), RunStatus::Success, |r| {
            assert_eq!(r.stdout, "-1 Operation not permitted\n")
        }),
        case("System V shared memory", syscall_errno!("29", ", 0, 4096, 0o1600"), RunStatus::Success, |r| {
            assert_eq!(r.stdout, "-1 Operation not permitted\n")
        }),
        case("POSIX message queues", syscall_errno!("240", ", b'/q', 0o100, 0o600, 0"), RunStatus::Success, |r| {
            assert_eq!(r.stdout, "-1 Operation not permitted\n")
        }),
        case(
            "a datagram to a host unix socket",
            "import socket; socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b'x', '/dev/log')",
            RunStatus::Error,
            denied,
        ),
        case("a FIFO in the working directory", "import os; os.mkfifo('f'); print(os.path.exists('f'))", RunStatus::Success, |r| {
            assert_eq!(r.stdout, "True\n")
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
            memory_mb: Some(256),
            timeout_ms: Some(20_000),
            ..case(
                "memory hog spread over processes (each under its own rlimit)",
                "import os\nfor i in range(8):\n    if os.fork() == 0:\n        b = b'x' * (200 << 20)\n        import time; time.sleep(5)\n        os._exit(0)\nfor i in range(8):\n    os.wait()\nprint('parent survived')",
                RunStatus::MemoryExceeded,
                no_check,
            )
        },
        case(
            "thread bomb",
            "import threading, time\nn = 0\ntry:\n    for i in range(1000):\n        threading.Thread(target=time.sleep, args=(5,), daemon=True).start()\n        n += 1\nexcept RuntimeError:\n    pass\nprint(n < 64)",
            RunStatus::Success,
            |r| assert_eq!(r.stdout, "True\n"),
        ),
        case(
            "peak memory is reported",
            "b = b'x' * (100 << 20)\nprint(len(b))",
            RunStatus::Success,
            |r| assert!(r.peak_memory_kb >= 100 * 1024, "{}", r.peak_memory_kb),
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
        case(
            "the cloud metadata address and the loopback ports of the api, RabbitMQ and Redis",
            "import socket\ndenied = 0\n\
             for addr in [('169.254.169.254', 80), ('127.0.0.1', 8000), ('127.0.0.1', 5672), ('127.0.0.1', 6379)]:\n\
             \x20   try:\n\
             \x20       socket.create_connection(addr, timeout=1)\n\
             \x20   except PermissionError:\n\
             \x20       denied += 1\n\
             print(denied)",
            RunStatus::Success,
            |r| assert_eq!(r.stdout, "4\n"),
        ),
        case(
            "signalling the process that started the run (outside the run's PID namespace, \
             its parent has no pid there: a guess at the worker's pid reaches nothing)",
            "import os, signal\nprint(os.getppid())\n\
             for pid in range(3, 400):\n    try:\n        os.kill(pid, signal.SIGTERM)\n    \
             except ProcessLookupError:\n        pass\nprint('none there')",
            RunStatus::Success,
            |r| assert_eq!(r.stdout, "0\nnone there\n"),
        ),
        // A CPU quota per slot: a run's processes together get one core, whatever their
        // number. Two processes that each spin for 0.3 s of CPU take 0.3 s on two free cores,
        // and at least 0.5 s on one (a busy machine only makes it longer).
        case(
            "two processes spinning share the run's one core",
            "import os, time\nstart = time.monotonic()\npids = []\n\
             for _ in range(2):\n    pid = os.fork()\n    if pid == 0:\n        \
             while time.process_time() < 0.3:\n            pass\n        os._exit(0)\n    \
             pids.append(pid)\n\
             for pid in pids:\n    os.waitpid(pid, 0)\n\
             print(time.monotonic() - start >= 0.5)",
            RunStatus::Success,
            |r| assert_eq!(r.stdout, "True\n", "{r:#?}"),
        ),
        case(
            "kill(-1) reaches only the run's own processes",
            "import os, signal, subprocess\np = subprocess.Popen(['sleep', '30'])\n\
             os.kill(-1, signal.SIGKILL)\nprint(p.wait())",
            RunStatus::Success,
            |r| assert_eq!(r.stdout, "-9\n"),
        ),
        case("abort", "import os; os.abort()", RunStatus::Killed, |r| {
            assert_eq!(r.signal, Some(6))
        }),
        Case {
            timeout_ms: Some(1000),
            ..case(
                "endless reads of /dev/urandom",
                "f = open('/dev/urandom', 'rb')\nwhile True: f.read(1 << 20)",
                RunStatus::Timeout,
                no_check,
            )
        },
        case(
            "a sparse file past the file size limit",
            "f = open('sparse', 'wb'); f.seek(1 << 30); f.write(b'x'); f.flush()",
            RunStatus::Error,
            |r| assert!(exception(r) == "OSError", "{r:#?}"),
        ),
        forged_end_record(),
        // A process that is never waited for is in no rusage of the run's; the slot's cgroup
        // counts it.
        case(
            "a child never waited for counts its CPU time",
            r#"import os, time
r, w = os.pipe()
if os.fork() == 0:
    t = time.process_time()
    while time.process_time() - t < 0.3: pass
    os.write(w, b'x')
    os._exit(0)
os.read(r, 1)"#,
            RunStatus::Success,
            |r| assert!(r.cpu_ms >= 290, "{r:#?}"),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use pyrunner_shared::JobId;

    #[test]
    fn verify_reports_a_wrong_status_and_a_failed_check() {
        let mut result = RunResult::internal_error(JobId::new(), "");
        result.status = RunStatus::Success;
        result.stdout = "1\n".into();
        let good = case("good", "", RunStatus::Success, |r| {
            assert_eq!(r.stdout, "1\n")
        });
        assert!(verify(&good, &result).is_ok());
        let wrong_status = case("status", "", RunStatus::Error, no_check);
        assert!(verify(&wrong_status, &result)
            .unwrap_err()
            .starts_with("status"));
        let wrong_output = case("output", "", RunStatus::Success, |r| {
            assert_eq!(r.stdout, "2\n")
        });
        assert!(verify(&wrong_output, &result)
            .unwrap_err()
            .starts_with("output"));
    }
}

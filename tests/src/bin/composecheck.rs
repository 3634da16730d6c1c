//! The compose test of docs/DEPLOY.md: builds the images with `docker compose`, starts the whole
//! stack (RabbitMQ, Redis, the api and two workers) as a project of its own, checks the images
//! and the containers' settings, runs the API smoke and hostile-code catalogues through the
//! published port, kills the worker container that holds a run, and checks that the run's answer
//! still comes back and that Docker restarts the container. Prints a Markdown table of the
//! checks; exits non-zero at the first that fails, after taking the stack down.
//!
//! Usage (as root, with a Docker engine and Compose v2: `scripts/compose-test` sets them up):
//!   composecheck [--keep] [--workers N] [--no-build] [--repo DIR]
//! `--keep` leaves the stack running (`docker compose -p pyrunner-check ... down -v` removes it).
//! `--no-build` uses the images there are (loaded, on a machine that cannot build them), and
//! `--repo` names the directory of the compose files (default: the source tree built from).
//! Everything is bounded: each wait has a deadline, and the api is published on a free loopback
//! port only.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use pyrunner_shared::RunStatus;
use pyrunner_tests::catalogue::{hostile, statuses};
use pyrunner_tests::checks::{self, all_pass, wait_ready, Report};
use pyrunner_tests::http::{get, poll_done, run, send, submit, wait_state};
use serde_json::{json, Value};

/// The compose project: containers, network and volume names start with it.
const PROJECT: &str = "pyrunner-check";
/// How long the images may take to build (a first build compiles the workspace twice).
const BUILD_FOR: Duration = Duration::from_secs(45 * 60);
/// How long the stack may take to become healthy.
const START_FOR: Duration = Duration::from_secs(240);

fn main() {
    let mut keep = false;
    let mut build = true;
    let mut repo = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the repository")
        .to_path_buf();
    let mut workers = 2;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--keep" => keep = true,
            "--no-build" => build = false,
            "--repo" => {
                repo = args
                    .next()
                    .map(PathBuf::from)
                    .unwrap_or_else(|| usage("--repo takes a directory"))
            }
            "--workers" => {
                workers = args
                    .next()
                    .and_then(|n| n.parse().ok())
                    .filter(|n| *n >= 2)
                    .unwrap_or_else(|| usage("--workers takes a number, at least 2"))
            }
            _ => usage(&format!("unknown argument {arg:?}")),
        }
    }
    let stack = Stack::new(repo, workers, keep, build);
    let mut report = Report::default();
    let passed = checks::passed(check(&stack, &mut report));
    report.print();
    if !passed {
        eprintln!("\nthe compose test failed; the containers' last log lines:");
        stack.print_logs();
        drop(stack);
        std::process::exit(1);
    }
    println!("\nall checks passed");
}

fn usage(problem: &str) -> ! {
    eprintln!(
        "error: {problem}\nusage: composecheck [--keep] [--workers N] [--no-build] [--repo DIR]"
    );
    std::process::exit(2);
}

/// The checks, in order; each panics with what differed.
async fn check(stack: &Stack, report: &mut Report) {
    if stack.build {
        report.timed("images build (`docker compose build`)", || {
            stack.compose(&["build"], BUILD_FOR);
            String::new()
        });
    }
    report.timed("images: tini as init, a HEALTHCHECK, the user", || {
        check_images()
    });
    report.timed("stack starts and turns healthy (`up --wait`)", || {
        stack.up();
        format!("{} workers", stack.workers)
    });
    report.timed("containers: ports, read-only api, privileges", || {
        check_containers(stack)
    });
    let base = stack.base_url();
    let started = Instant::now();
    wait_ready(&base, Duration::from_secs(60)).await;
    let isolation = check_isolation(&base, stack).await;
    report.add("the workers' isolation layers", started, isolation);

    let started = Instant::now();
    all_pass(&base, statuses(), "smoke").await;
    let detail = smoke(&base).await;
    report.add(
        &format!(
            "API smoke: {} status cases, async, cancel",
            statuses().len()
        ),
        started,
        detail,
    );

    let started = Instant::now();
    all_pass(&base, hostile(), "hostile").await;
    report.add(
        &format!("hostile-code catalogue: {} cases", hostile().len()),
        started,
        String::from("all contained"),
    );

    let started = Instant::now();
    let detail = worker_killed_mid_run(&base, stack).await;
    report.add("a worker container killed mid-run", started, detail);
}

/// The built images: size, init, healthcheck and user.
fn check_images() -> String {
    let mut sizes = Vec::new();
    for (image, user) in [("pyrunner-api", "pyrunner"), ("pyrunner-worker", "root")] {
        let info = inspect(&["image", "inspect", image]);
        let config = &info["Config"];
        assert_eq!(
            config["Entrypoint"],
            json!(["/usr/bin/tini", "--"]),
            "{image}: tini is not the entrypoint"
        );
        let test = &config["Healthcheck"]["Test"];
        assert!(
            test.as_array().is_some_and(|t| t.len() > 1),
            "{image}: no HEALTHCHECK: {test}"
        );
        assert_eq!(config["User"], user, "{image}: the user");
        let mb = info["Size"].as_f64().unwrap_or(0.0) / 1e6;
        sizes.push(format!("{image} {mb:.0} MB"));
    }
    sizes.join(", ")
}

/// The running containers: only the api publishes a port, on loopback; the api's root is
/// read-only and it holds no capability; PID 1 is tini everywhere; every container is healthy.
fn check_containers(stack: &Stack) -> String {
    let ids = stack.container_ids(None);
    assert_eq!(ids.len(), 3 + stack.workers, "containers: {ids:?}");
    for id in &ids {
        let info = inspect(&["container", "inspect", id]);
        let service = info["Config"]["Labels"]["com.docker.compose.service"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let host = &info["HostConfig"];
        let ports = &host["PortBindings"];
        if service == "api" {
            let binding = &ports["8000/tcp"][0];
            assert_eq!(binding["HostIp"], "127.0.0.1", "api's binding: {ports}");
            assert_eq!(host["ReadonlyRootfs"], true, "the api's root is writable");
            assert_eq!(host["CapDrop"], json!(["ALL"]), "the api's capabilities");
            assert!(host["CapAdd"].is_null(), "the api gains {}", host["CapAdd"]);
            let probe = exec(id, &["sh", "-c", "touch /probe 2>&1; id -un"]);
            assert!(probe.contains("Read-only file system"), "api: {probe}");
            assert!(probe.trim_end().ends_with("pyrunner"), "api user: {probe}");
        } else {
            assert!(
                ports.as_object().is_none_or(|p| p.is_empty()),
                "{service} publishes {ports}"
            );
        }
        let options = host["SecurityOpt"].to_string();
        if service == "worker" {
            assert_eq!(host["CapDrop"], json!(["ALL"]), "the worker's capabilities");
            assert_eq!(host["Privileged"], false, "the worker is privileged");
            assert!(
                options.contains("apparmor=pyrunner-worker"),
                "the worker's AppArmor setting: {options}"
            );
            if stack.apparmor {
                // Docker applied it: the container's processes are held by it.
                let held = exec(id, &["cat", "/proc/1/attr/current"]);
                assert_eq!(
                    held.trim(),
                    "pyrunner-worker (enforce)",
                    "the worker's profile"
                );
            }
            let status = exec(id, &["grep", "CapEff", "/proc/1/status"]);
            // SYS_ADMIN, SYS_CHROOT, SETUID, SETGID, CHOWN, DAC_OVERRIDE and KILL.
            assert_eq!(
                status.split_whitespace().nth(1),
                Some("00000000002400e3"),
                "{status}"
            );
            // The replicas claim slot uids through lock files in a volume they share; the
            // worker must be told that directory (its own default may be its work dir).
            let env = &info["Config"]["Env"];
            let lock_dir = env
                .as_array()
                .into_iter()
                .flatten()
                .find_map(|v| v.as_str()?.strip_prefix("PYRUNNER_SLOT_LOCK_DIR="))
                .unwrap_or_else(|| panic!("the worker has no PYRUNNER_SLOT_LOCK_DIR: {env}"));
            let mounts = info["Mounts"].as_array().cloned().unwrap_or_default();
            assert!(
                mounts
                    .iter()
                    .any(|m| m["Type"] == "volume" && m["Destination"] == lock_dir),
                "the worker's slot lock directory {lock_dir} is not a shared volume: {mounts:?}"
            );
        }
        assert!(
            options.contains("no-new-privileges"),
            "{service}: no no-new-privileges in {options}"
        );
        let init = exec(id, &["cat", "/proc/1/comm"]);
        if service == "api" || service == "worker" {
            assert_eq!(init.trim(), "tini", "{service}'s PID 1");
        }
        assert_eq!(
            info["State"]["Health"]["Status"], "healthy",
            "{service} is not healthy"
        );
        assert_eq!(
            host["RestartPolicy"]["Name"], "unless-stopped",
            "{service}'s restart policy"
        );
    }
    let apparmor = if stack.apparmor {
        ", under AppArmor profile pyrunner-worker"
    } else {
        ""
    };
    format!(
        "only the api published, on 127.0.0.1; read-only api; worker: 7 capabilities{apparmor}; \
         all healthy"
    )
}

/// Inside Docker with the compose file's settings every layer is expected, cgroups too on a
/// cgroup v2 host or when the v1 file is added.
async fn check_isolation(base: &str, stack: &Stack) -> String {
    let expected = |name: &str| stack.cgroups || !name.starts_with("cgroup_");
    checks::fleet_layers(base, stack.workers, expected).await.0
}

/// The async path and cancellation, beside the status catalogue.
async fn smoke(base: &str) -> String {
    let info = get(base).await;
    assert_eq!(info.status, 200, "{info:?}");
    assert_eq!(info.body["mode"], "fleet", "{info:?}");
    let id = submit(base, &json!({ "code": "print(6 * 7)" })).await;
    let view = poll_done(base, &id, Duration::from_secs(30)).await;
    let result = view.result.expect("a result");
    assert_eq!(result.stdout, "42\n", "{result:?}");

    let long = json!({ "code": "import time; time.sleep(60)", "timeout_ms": 90_000 });
    let running = submit(base, &long).await;
    wait_state(base, &running, "running", Duration::from_secs(30)).await;
    let reply = send("DELETE", &format!("{base}/jobs/{running}"), None).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.body["result"]["status"], "cancelled", "{reply:?}");

    let bad = send(
        "POST",
        &format!("{base}/run"),
        Some(("application/json", b"{".to_vec())),
    )
    .await;
    assert_eq!(bad.status, 400, "{bad:?}");
    "async submit and poll, a cancelled run, 400 on a malformed body".to_owned()
}

/// Starts a run that takes a few seconds, finds the worker container that logged it, kills that
/// container's init from the host (as an OOM kill or a crash would), and checks that another
/// worker answers the run and that Docker restarts the killed one.
async fn worker_killed_mid_run(base: &str, stack: &Stack) -> String {
    let code = "import time\ntime.sleep(4)\nprint('survived')";
    let id = submit(base, &json!({ "code": code, "timeout_ms": 30_000 })).await;
    wait_state(base, &id, "running", Duration::from_secs(30)).await;
    let needle = format!("job={id}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let holder = loop {
        let found = stack
            .container_ids(Some("worker"))
            .into_iter()
            .find(|c| logs(c).contains(&needle));
        if let Some(found) = found {
            break found;
        }
        assert!(Instant::now() < deadline, "no worker logged {needle}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let before = inspect(&["container", "inspect", &holder]);
    let pid = before["State"]["Pid"]
        .as_u64()
        .expect("the container's pid");
    let restarts = before["RestartCount"].as_u64().unwrap_or(0);
    let killed = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("the worker container's init is killed");

    let view = poll_done(base, &id, Duration::from_secs(120)).await;
    let answered = killed.elapsed();
    let result = view.result.expect("a result");
    assert_eq!(result.status, RunStatus::Success, "{result:?}");
    assert_eq!(result.stdout, "survived\n", "{result:?}");

    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let after = inspect(&["container", "inspect", &holder]);
        if after["RestartCount"].as_u64().unwrap_or(0) > restarts
            && after["State"]["Running"] == true
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Docker did not restart the killed worker: {}",
            after["State"]
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // The stack serves again with every worker, the restarted one included.
    let next = run(base, &json!({ "code": "print('after')" })).await;
    assert_eq!(next.stdout, "after\n", "{next:?}");
    format!(
        "answered {:.1} s after the kill; the container restarted",
        answered.as_secs_f64()
    )
}

/// The compose project under test.
struct Stack {
    repo: PathBuf,
    files: Vec<PathBuf>,
    port: u16,
    workers: usize,
    /// Whether the runs get cgroups: on a cgroup v2 host, or with the cgroup v1 compose file
    /// (added where the host's limit controllers are v1).
    cgroups: bool,
    /// Whether the host enforces AppArmor (the workers then run under their profile).
    apparmor: bool,
    keep: bool,
    /// Whether the images are built first.
    build: bool,
}

impl Stack {
    fn new(repo: PathBuf, workers: usize, keep: bool, build: bool) -> Stack {
        // On a host that enforces AppArmor, the workers' profile must be loaded before they
        // start (the compose file names it); elsewhere Docker ignores the setting.
        let apparmor = std::fs::read_to_string("/sys/module/apparmor/parameters/enabled")
            .is_ok_and(|enabled| enabled.trim() == "Y");
        if apparmor {
            let profile = repo.join("deploy/apparmor/pyrunner-worker");
            let loaded = Command::new("apparmor_parser")
                .arg("--replace")
                .arg(&profile)
                .status();
            assert!(
                loaded.as_ref().is_ok_and(|s| s.success()),
                "cannot load {} (apparmor_parser, from Debian's apparmor): {loaded:?}",
                profile.display()
            );
        }
        let mut files = vec![repo.join("docker-compose.yml")];
        let v1 = Path::new("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists();
        if v1 {
            files.push(repo.join("docker-compose.cgroup-v1.yml"));
        }
        let v2 = std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers")
            .is_ok_and(|c| c.split_whitespace().any(|c| c == "memory"));
        let cgroups = v1 || v2;
        let stack = Stack {
            repo,
            files,
            port: pyrunner_tests::fleet::free_port(),
            workers,
            cgroups,
            apparmor,
            keep,
            build,
        };
        // A project left by an earlier run would keep its volume and its containers' state.
        stack.down();
        stack
    }

    fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("docker");
        cmd.current_dir(&self.repo)
            .args(["compose", "--project-name", PROJECT]);
        for file in &self.files {
            cmd.arg("--file").arg(file);
        }
        cmd.args(args).env("PYRUNNER_PORT", self.port.to_string());
        cmd
    }

    /// Runs `docker compose <args>` within `within`; panics with its output if it fails.
    fn compose(&self, args: &[&str], within: Duration) -> String {
        let out = bounded(self.command(args), within);
        let text = text(&out);
        assert!(
            out.status.success(),
            "docker compose {} failed:\n{}",
            args.join(" "),
            tail(&text, 40)
        );
        text
    }

    fn up(&self) {
        let scale = format!("worker={}", self.workers);
        let wait = START_FOR.as_secs().to_string();
        self.compose(
            &[
                "up",
                "--detach",
                "--no-build",
                "--scale",
                &scale,
                "--wait",
                "--wait-timeout",
                &wait,
            ],
            START_FOR + Duration::from_secs(30),
        );
    }

    fn down(&self) {
        let _ = bounded(
            self.command(&["down", "--volumes", "--remove-orphans", "--timeout", "5"]),
            Duration::from_secs(120),
        );
    }

    /// The ids of the project's containers, or of one service's.
    fn container_ids(&self, service: Option<&str>) -> Vec<String> {
        let mut args = vec!["ps", "--quiet"];
        args.extend(service);
        self.compose(&args, Duration::from_secs(30))
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn print_logs(&self) {
        let out = bounded(
            self.command(&["logs", "--no-color", "--tail", "30"]),
            Duration::from_secs(60),
        );
        eprintln!("{}", String::from_utf8_lossy(&out.stdout));
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if self.keep {
            eprintln!(
                "the stack is left running: {}; api at {}",
                PROJECT,
                self.base_url()
            );
        } else {
            self.down();
        }
    }
}

/// Runs `docker <args>` (a command that answers at once: at most 30 s).
fn docker(args: &[&str]) -> Output {
    let mut docker = Command::new("docker");
    docker.args(args);
    bounded(docker, Duration::from_secs(30))
}

/// What a command printed, its output then its errors.
fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// What `cmd` prints when run in container `id`.
fn exec(id: &str, cmd: &[&str]) -> String {
    text(&docker(&[&["exec", id], cmd].concat()))
}

/// The log of container `id`.
fn logs(id: &str) -> String {
    text(&docker(&["logs", id]))
}

/// `docker <args>` as JSON: the first object of what `inspect` prints.
fn inspect(args: &[&str]) -> Value {
    let out = docker(args);
    assert!(
        out.status.success(),
        "docker {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    let all: Value = serde_json::from_slice(&out.stdout).expect("docker inspect prints JSON");
    all[0].clone()
}

/// Runs `cmd`, killing it past `within`; its output is collected.
fn bounded(mut cmd: Command, within: Duration) -> Output {
    use std::process::Stdio;
    let dir = tempfile::tempdir().expect("a temporary directory");
    let (out_path, err_path) = (dir.path().join("out"), dir.path().join("err"));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).expect("an output file"))
        .stderr(std::fs::File::create(&err_path).expect("an output file"))
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let deadline = Instant::now() + within;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{cmd:?} did not finish within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    Output {
        status,
        stdout: std::fs::read(&out_path).unwrap_or_default(),
        stderr: std::fs::read(&err_path).unwrap_or_default(),
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

//! The Kubernetes node test (`scripts/node-test`, docs/DEPLOY.md): starts the pods of the
//! rendered Kubernetes manifests (`deploy/k8s`) through a container runtime's CRI socket, as a
//! kubelet starts them (`pyrunner_tests::kubelet`), then checks what the runtime made of their
//! settings (each container's user, capabilities, no_new_privs, seccomp, AppArmor, masked and
//! read-only paths, read-only root), the worker's liveness probe, the workers' isolation layers,
//! and the status and hostile-code catalogues through the api pod. Stops and removes the pods at
//! the end. Prints a Markdown table of the checks; exits non-zero at the first that fails.
//!
//! Usage: nodecheck --socket CRI_SOCKET --manifests RENDERED.json --kubelet-root DIR
//!                  --pods-dir DIR --amqp URL --redis URL --port PORT
//! The manifests are rendered with the components the node needs (`deploy/k8s/cgroup-v1` on a
//! cgroup v1 node, `deploy/k8s/apparmor` where AppArmor is enforced): every layer is expected.
//! Everything is bounded: each wait has a deadline, each CRI call and each run its limits.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use pyrunner_tests::catalogue::{hostile, statuses};
use pyrunner_tests::checks::{self, wait_ready, Report};
use pyrunner_tests::cri::{ContainerState, Runtime};
use pyrunner_tests::http::get;
use pyrunner_tests::kubelet::{deployment_pods, Node, Objects, Pod};
use serde_json::Value;

/// The queue of this test's pods, apart from any other service on the broker.
const QUEUE: &str = "pyrunner.nodecheck";
/// How long the pods may take to run (the first container of an image unpacks its layers).
const START_FOR: Duration = Duration::from_secs(180);
/// The worker's capabilities as the manifest gives them: SYS_ADMIN, SYS_CHROOT, SETUID,
/// SETGID, CHOWN, DAC_OVERRIDE and KILL.
const WORKER_CAPS: &str = "00000000002400e3";

struct Args {
    socket: PathBuf,
    manifests: PathBuf,
    kubelet_root: PathBuf,
    pods_dir: PathBuf,
    amqp: String,
    redis: String,
    port: u16,
}

fn main() {
    let args = parse_args();
    let node = Node {
        root_dir: args.kubelet_root.clone(),
        pods_dir: args.pods_dir.clone(),
        memory_bytes: node_memory(),
        apparmor: std::fs::read_to_string("/sys/module/apparmor/parameters/enabled")
            .is_ok_and(|e| e.trim() == "Y"),
    };
    let started = std::sync::Mutex::new(Vec::new());
    let mut report = Report::default();
    let passed = checks::passed(check(&args, &node, &started, &mut report));
    report.print();
    // Stop and remove every pod, whatever happened.
    let sandboxes = started.into_inner().unwrap_or_else(|e| e.into_inner());
    let cleaned = checks::passed(async {
        let runtime = Runtime::new(&args.socket);
        for id in &sandboxes {
            if let Err(e) = runtime.stop_pod_sandbox(id).await {
                eprintln!("stopping {id}: {e}");
            }
            if let Err(e) = runtime.remove_pod_sandbox(id).await {
                eprintln!("removing {id}: {e}");
            }
        }
    });
    if !passed {
        eprintln!(
            "\nthe node checks failed; the containers' logs are under {:?}",
            args.pods_dir
        );
        std::process::exit(1);
    }
    assert!(cleaned, "the pods could not all be removed");
    println!("\nall checks passed");
}

fn parse_args() -> Args {
    let usage = |problem: &str| -> ! {
        eprintln!(
            "error: {problem}\nusage: nodecheck --socket CRI_SOCKET --manifests RENDERED.json \
             --kubelet-root DIR --pods-dir DIR --amqp URL --redis URL --port PORT"
        );
        std::process::exit(2);
    };
    let mut values: HashMap<String, String> = HashMap::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--socket" | "--manifests" | "--kubelet-root" | "--pods-dir" | "--amqp" | "--redis"
            | "--port" => {
                let value = args
                    .next()
                    .unwrap_or_else(|| usage(&format!("{arg} takes a value")));
                values.insert(arg, value);
            }
            _ => usage(&format!("unknown argument {arg:?}")),
        }
    }
    let mut take = |flag: &str| {
        values
            .remove(flag)
            .unwrap_or_else(|| usage(&format!("{flag} is required")))
    };
    Args {
        socket: take("--socket").into(),
        manifests: take("--manifests").into(),
        kubelet_root: take("--kubelet-root").into(),
        pods_dir: take("--pods-dir").into(),
        amqp: take("--amqp"),
        redis: take("--redis"),
        port: take("--port")
            .parse()
            .unwrap_or_else(|_| usage("--port takes a port number")),
    }
}

/// The node's memory, from `/proc/meminfo`.
fn node_memory() -> i64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").expect("/proc/meminfo");
    let kb: i64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("MemTotal in /proc/meminfo");
    kb * 1024
}

async fn check(
    args: &Args,
    node: &Node,
    started: &std::sync::Mutex<Vec<String>>,
    report: &mut Report,
) {
    let runtime = Runtime::new(&args.socket);
    let version = async {
        let v = runtime.version().await.expect("the runtime answers");
        format!(
            "{} {} (CRI {})",
            v.runtime_name, v.runtime_version, v.runtime_api_version
        )
    };
    report
        .awaited("the runtime answers on its CRI socket", version)
        .await;

    let text = std::fs::read_to_string(&args.manifests).expect("the rendered manifests");
    let resources: Vec<Value> = serde_json::from_str(&text).expect("a JSON list of resources");
    // The base leaves this Secret to the operator; here it names the node's broker and store.
    let secrets = HashMap::from([(
        String::from("pyrunner-connections"),
        BTreeMap::from([
            (String::from("AMQP_URL"), args.amqp.clone()),
            (String::from("REDIS_URL"), args.redis.clone()),
        ]),
    )]);
    let objects = Objects::new(&resources, &secrets);
    let bind = format!("127.0.0.1:{}", args.port);
    let worker_pods = deployment_pods(
        &objects,
        "pyrunner-worker",
        node,
        &[("PYRUNNER_QUEUE", QUEUE)],
    )
    .expect("the worker pods");
    let api_pods = deployment_pods(
        &objects,
        "pyrunner-api",
        node,
        &[("PYRUNNER_QUEUE", QUEUE), ("PYRUNNER_BIND", &bind)],
    )
    .expect("the api pods");

    let mut workers = Vec::new();
    let mut apis = Vec::new();
    let start = async {
        for pod in &worker_pods {
            workers.push(start_pod(&runtime, pod, started).await);
        }
        // One api is enough here: the others would bind the same port on the node's network.
        apis.push(start_pod(&runtime, &api_pods[0], started).await);
        for id in workers.iter().chain(&apis) {
            wait_running(&runtime, id).await;
        }
        format!(
            "{} worker pods and 1 of {} api pods running",
            worker_pods.len(),
            api_pods.len()
        )
    };
    report
        .awaited("pods start as a kubelet starts them", start)
        .await;

    let settings = async {
        let mut seen = Vec::new();
        for id in &workers {
            seen.push(check_worker(&runtime, id, node, &worker_pods[0]).await);
        }
        seen.dedup();
        seen.join("; ")
    };
    report
        .awaited("worker containers: what the runtime applied", settings)
        .await;
    let api = async { check_api(&runtime, &apis[0]).await };
    report
        .awaited("api container: what the runtime applied", api)
        .await;

    let base = format!("http://{bind}");
    let ready = async {
        wait_ready(&base, Duration::from_secs(120)).await;
        String::from("/readyz 200")
    };
    report.awaited("the api pod is ready", ready).await;
    report
        .awaited(
            "the workers' isolation layers",
            check_isolation(&base, worker_pods.len()),
        )
        .await;
    report
        .catalogue(&base, "status catalogue", statuses(), "all as documented")
        .await;
    report
        .catalogue(&base, "hostile-code catalogue", hostile(), "all contained")
        .await;
    let healthy = async {
        let reply = get(&format!("{base}/healthz")).await;
        assert_eq!(reply.status, 200, "{reply:?}");
        for id in &workers {
            let status = runtime.container_status(id).await.expect("a status");
            let state = status.status.map(|s| s.state);
            assert_eq!(state, Some(ContainerState::Running as i32), "worker {id}");
        }
        String::from("api healthy, every worker container still running")
    };
    report.awaited("after the catalogues", healthy).await;
}

/// Runs the pod's sandbox and its one container, as a kubelet does; the container's id.
async fn start_pod(
    runtime: &Runtime,
    pod: &Pod,
    started: &std::sync::Mutex<Vec<String>>,
) -> String {
    let sandbox = runtime
        .run_pod_sandbox(&pod.sandbox)
        .await
        .unwrap_or_else(|e| panic!("{}: {e}", pod.name));
    started.lock().expect("not poisoned").push(sandbox.clone());
    let [container] = &pod.containers[..] else {
        panic!("{}: one container expected", pod.name);
    };
    let id = runtime
        .create_container(&sandbox, &container.config, &pod.sandbox)
        .await
        .unwrap_or_else(|e| panic!("{}/{}: {e}", pod.name, container.name));
    runtime
        .start_container(&id)
        .await
        .unwrap_or_else(|e| panic!("{}/{}: {e}", pod.name, container.name));
    id
}

async fn wait_running(runtime: &Runtime, id: &str) {
    let deadline = Instant::now() + START_FOR;
    loop {
        let status = runtime.container_status(id).await.expect("a status");
        let status = status.status.expect("a status");
        if status.state == ContainerState::Running as i32 {
            return;
        }
        assert!(
            status.state == ContainerState::Created as i32 && Instant::now() < deadline,
            "container {id}: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The container's first process, from the runtime's verbose status.
async fn container_pid(runtime: &Runtime, id: &str) -> u32 {
    let status = runtime.container_status(id).await.expect("a status");
    let info: Value =
        serde_json::from_str(status.info.get("info").expect("verbose info")).expect("JSON info");
    info["pid"]
        .as_u64()
        .and_then(|p| u32::try_from(p).ok())
        .unwrap_or_else(|| panic!("no pid in {info}"))
}

/// The fields of `/proc/<pid>/status` a container's settings show in.
fn process_status(pid: u32) -> HashMap<String, String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("its status");
    text.lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_owned(), v.trim().to_owned()))
        .collect()
}

/// Runs `script` in the container through the runtime, as a kubelet runs an `exec` probe.
async fn exec(runtime: &Runtime, id: &str, script: &str) -> (i32, String) {
    let reply = runtime
        .exec_sync(id, &["sh", "-c", script], 30)
        .await
        .expect("an exec");
    let mut out = String::from_utf8_lossy(&reply.stdout).into_owned();
    out.push_str(&String::from_utf8_lossy(&reply.stderr));
    (reply.exit_code, out)
}

/// The sandbox's part of what the runtime applied to a worker container, checked on its first
/// process and from inside: root in the container, the seven capabilities, no_new_privs, the
/// seccomp filter, the AppArmor profile where the node has AppArmor, the masked and read-only
/// `/proc` paths, and the liveness probe.
async fn check_worker(runtime: &Runtime, id: &str, node: &Node, pod: &Pod) -> String {
    let pid = container_pid(runtime, id).await;
    let status = process_status(pid);
    let field = |k: &str| status.get(k).map(String::as_str).unwrap_or_default();
    assert_eq!(field("Name"), "tini", "the worker's PID 1: {status:?}");
    assert!(
        field("Uid").starts_with("0\t"),
        "the worker's uid: {}",
        field("Uid")
    );
    assert_eq!(field("CapEff"), WORKER_CAPS, "{status:?}");
    assert_eq!(field("CapBnd"), WORKER_CAPS, "{status:?}");
    assert_eq!(field("NoNewPrivs"), "1", "{status:?}");
    assert_eq!(field("Seccomp"), "2", "no seccomp filter: {status:?}");
    let apparmor = if node.apparmor {
        let label = std::fs::read_to_string(format!("/proc/{pid}/attr/current"))
            .expect("an AppArmor label");
        assert_eq!(
            label.trim(),
            "pyrunner-worker (enforce)",
            "the worker's profile"
        );
        ", AppArmor pyrunner-worker (enforce)"
    } else {
        ""
    };
    let (code, out) = exec(runtime, id, "wc -c < /proc/keys; wc -c < /proc/timer_list").await;
    assert_eq!(
        (code, out.split_whitespace().collect::<Vec<_>>()),
        (0, vec!["0", "0"]),
        "{out}"
    );
    let (code, out) = exec(runtime, id, "echo 10 > /proc/sys/vm/swappiness").await;
    assert!(
        code != 0 && out.contains("Read-only"),
        "/proc/sys is writable: {out}"
    );
    let probe = pod.containers[0]
        .liveness_exec
        .clone()
        .expect("the worker's exec liveness probe");
    let probe: Vec<&str> = probe.iter().map(String::as_str).collect();
    let reply = runtime
        .exec_sync(id, &probe, 3)
        .await
        .expect("the probe runs");
    assert_eq!(reply.exit_code, 0, "the liveness probe fails: {reply:?}");
    format!(
        "uid 0, CapEff {WORKER_CAPS}, no_new_privs, seccomp filter{apparmor}, /proc masked \
         and read-only as a kubelet asks, liveness probe passes"
    )
}

/// What the runtime applied to the api container: its non-root user, no capability,
/// no_new_privs, the runtime's default seccomp profile, a read-only root.
async fn check_api(runtime: &Runtime, id: &str) -> String {
    let pid = container_pid(runtime, id).await;
    let status = process_status(pid);
    let field = |k: &str| status.get(k).map(String::as_str).unwrap_or_default();
    assert!(
        field("Uid").starts_with("65532\t"),
        "the api's uid: {}",
        field("Uid")
    );
    assert_eq!(field("CapEff"), "0000000000000000", "{status:?}");
    assert_eq!(field("CapBnd"), "0000000000000000", "{status:?}");
    assert_eq!(field("NoNewPrivs"), "1", "{status:?}");
    assert_eq!(field("Seccomp"), "2", "no seccomp filter: {status:?}");
    let (code, out) = exec(runtime, id, "touch /probe").await;
    assert!(
        code != 0 && out.contains("Read-only"),
        "the api's root: {out}"
    );
    String::from("uid 65532, no capability, no_new_privs, seccomp RuntimeDefault, read-only root")
}

/// Every layer is active on each of the `workers` workers.
async fn check_isolation(base: &str, workers: usize) -> String {
    let (summary, report) = checks::fleet_layers(base, workers, |_| true).await;
    let cgroup = &report["layers"]["cgroup_memory"]["detail"];
    format!("{summary}; cgroup_memory: {cgroup}")
}

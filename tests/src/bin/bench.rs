//! The benchmark: the workloads of docs/PERFORMANCE.md through the real binaries, for each
//! executor, in one run. Prints one Markdown table; each executor's figures are also given as a
//! ratio of the first executor's (the baseline), measured in the same run. A last column gives,
//! for reference, the runtime's interpreter started directly, without the service.
//!
//! Usage (after `cargo build --release --bins`, with RabbitMQ and Redis reachable):
//!   target/release/bench [REQUESTS]      (default 200 sequential requests per workload)
//! or `scripts/bench`, which builds first. Load stays on loopback and is bounded: at most
//! `8 × REQUESTS` requests, and at most 60 s, for the throughput row.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use pyrunner_shared::RunStatus;
use pyrunner_tests::fleet::Fleet;
use pyrunner_tests::http::run_with;
use serde_json::json;

/// Executors to compare, with the environment that selects each. The first is the baseline.
const EXECUTORS: &[(&str, &[(&str, &str)])] = &[
    ("fresh interpreter", &[("PYRUNNER_EXECUTOR", "fresh")]),
    ("zygote + warm pool", &[("PYRUNNER_EXECUTOR", "zygote")]),
];

const SYMPY: &str = "import sympy; print(sympy.factorint(10**10))";
const NUMPY: &str = "import numpy as np; print(np.arange(10).sum())";
const CONCURRENT_CLIENTS: usize = 8;
const THROUGHPUT_DEADLINE: Duration = Duration::from_secs(60);
/// The pause between the requests of the spaced row, which measures a service with CPU to spare.
/// Back to back, one client keeps a small machine busy with the work each run leaves off the
/// request path (the child's exit, the next child's preparation).
const SPACED: Duration = Duration::from_millis(10);

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

/// p50, p95, p99 in ms of `requests` sequential runs of `code`, each sent `gap` after the answer
/// to the one before (zero: back to back).
async fn latency(url: &str, code: &str, requests: usize, gap: Duration) -> [f64; 3] {
    // One client keeping its connection open, as an application calling the service would.
    let client = reqwest::Client::new();
    for _ in 0..3 {
        run_with(&client, url, &json!({ "code": code })).await;
    }
    let mut times = Vec::with_capacity(requests);
    for _ in 0..requests {
        let started = Instant::now();
        let result = run_with(&client, url, &json!({ "code": code })).await;
        times.push(started.elapsed());
        assert_eq!(result.status, RunStatus::Success, "{result:?}");
        if !gap.is_zero() {
            tokio::time::sleep(gap).await;
        }
    }
    times.sort();
    [0.5, 0.95, 0.99].map(|p| percentile(&times, p))
}

/// Runs per second, errors and successful runs of up to `total` runs of `pass` from concurrent
/// clients.
async fn throughput(url: &str, total: usize) -> (f64, usize, usize) {
    let started = Instant::now();
    let clients: Vec<_> = (0..CONCURRENT_CLIENTS)
        .map(|_| {
            let url = url.to_owned();
            tokio::spawn(async move {
                let client = reqwest::Client::new();
                let (mut done, mut errors) = (0, 0);
                while done + errors < total / CONCURRENT_CLIENTS
                    && started.elapsed() < THROUGHPUT_DEADLINE
                {
                    let reply = client
                        .post(format!("{url}/run"))
                        .json(&json!({ "code": "pass" }))
                        .send()
                        .await;
                    let ok = match reply {
                        Ok(reply) if reply.status() == 200 => reply
                            .json::<serde_json::Value>()
                            .await
                            .is_ok_and(|body| body["status"] == "success"),
                        _ => false,
                    };
                    if ok {
                        done += 1;
                    } else {
                        errors += 1;
                    }
                }
                (done, errors)
            })
        })
        .collect();
    let (mut done, mut errors) = (0, 0);
    for client in clients {
        let (d, e) = client.await.expect("client task");
        done += d;
        errors += e;
    }
    (done as f64 / started.elapsed().as_secs_f64(), errors, done)
}

/// The parts of a fleet whose CPU time the throughput row accounts for, in the order of
/// [`cpu_snapshot`]'s figures.
const CPU_PARTS: [&str; 7] = [
    "broker (RabbitMQ's `beam.smp`)",
    "store (`redis-server`)",
    "api",
    "worker (its own threads)",
    "runs: the zygote and its children, or the fresh interpreters",
    "the benchmark's 8 clients",
    "the whole machine, busy",
];

/// CPU time used so far by each part of `fleet` on this host, in ms (see [`CPU_PARTS`]). The
/// broker and the store are counted whole: nothing else uses them while the benchmark runs.
fn cpu_snapshot(fleet: &mut Fleet) -> [f64; 7] {
    use pyrunner_tests::procfs::{
        comm, cpu_ticks, descendants, machine_ticks, pids, TICKS_PER_SECOND,
    };
    let ms = |ticks: u64| (ticks * 1000 / TICKS_PER_SECOND) as f64;
    let own = |pid: u32| cpu_ticks(pid).map_or(0, |(own, _)| own);
    let named = |name: &str| -> u64 {
        pids()
            .into_iter()
            .filter(|&pid| comm(pid).as_deref() == Some(name))
            .map(own)
            .sum()
    };
    let fleet_pids = fleet.pids();
    let part = |name: &str| {
        fleet_pids
            .iter()
            .find(|(n, _)| n == name)
            .map(|&(_, pid)| pid)
            .expect("the fleet's process runs")
    };
    let (api, worker) = (part("api"), part("worker-0"));
    // A run's processes are the worker's descendants, alive or reaped: reaped ones count in
    // their parent's reaped time, once the parent has waited for them.
    let runs = cpu_ticks(worker).map_or(0, |(_, reaped)| reaped)
        + descendants(worker)
            .into_iter()
            .filter_map(cpu_ticks)
            .map(|(own, reaped)| own + reaped)
            .sum::<u64>();
    let client =
        nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF).map_or(0.0, |u| {
            let us =
                |t: nix::sys::time::TimeVal| t.tv_sec() as f64 * 1e3 + t.tv_usec() as f64 / 1e3;
            us(u.user_time()) + us(u.system_time())
        });
    [
        ms(named("beam.smp")),
        ms(named("redis-server")),
        ms(own(api)),
        ms(own(worker)),
        ms(runs),
        client,
        ms(machine_ticks().map_or(0, |(busy, _)| busy)),
    ]
}

/// Median time from starting a worker until it consumes (its runtime check done), in ms.
async fn worker_start(fleet: &mut Fleet) -> f64 {
    let mut times = Vec::new();
    for _ in 0..3 {
        let started = Instant::now();
        let index = fleet.add_worker();
        while !fleet.worker_log(index).contains("consuming jobs") {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "worker did not start"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        times.push(started.elapsed());
    }
    times.sort();
    percentile(&times, 0.5)
}

/// The median USS of the idle warm children of fleet workers on this host (children of a
/// zygote, which carry its name, whose parent is a pyrunner-worker), in MiB; none without one.
fn idle_warm_child_uss() -> Option<f64> {
    use pyrunner_tests::procfs::{is_named, parent, pids, uss_mib};
    let mut sizes: Vec<f64> = pids()
        .into_iter()
        .filter(|&pid| is_named(Some(pid), "pyrunner-zygote"))
        .filter(|&pid| {
            let zygote = parent(pid);
            is_named(zygote, "pyrunner-zygote")
                && is_named(zygote.and_then(parent), "pyrunner-worker")
        })
        .filter_map(uss_mib)
        .collect();
    if sizes.is_empty() {
        return None;
    }
    sizes.sort_by(f64::total_cmp);
    Some(sizes[sizes.len() / 2])
}

/// p50, p95, p99 in ms of starting the runtime's interpreter directly for `code`, without the
/// service or the sandbox: the floor of any executor that starts an interpreter per run.
fn bare_interpreter(code: &str, requests: usize) -> [f64; 3] {
    let run = || {
        runtime_python(code);
    };
    for _ in 0..3 {
        run();
    }
    let mut times: Vec<Duration> = (0..requests)
        .map(|_| {
            let started = Instant::now();
            run();
            started.elapsed()
        })
        .collect();
    times.sort();
    [0.5, 0.95, 0.99].map(|p| percentile(&times, p))
}

/// What a run's fork costs at the least: the runtime's interpreter with the default preload
/// set imported and its heap frozen, forking a child that exits at once, `forks` times. Returns
/// the CPU time (parent and children) per fork, in ms. No sandbox, no Python work in the child.
fn bare_fork(forks: usize) -> f64 {
    let script = format!(
        "import gc, os\n\
         import numpy, numpy.random, sympy\n\
         gc.collect(); gc.freeze()\n\
         def fork():\n    pid = os.fork()\n    if pid == 0: os._exit(0)\n    os.waitpid(pid, 0)\n\
         for _ in range(20): fork()\n\
         t = os.times()\n\
         for _ in range({forks}): fork()\n\
         u = os.times()\n\
         print(sum(u[:4]) - sum(t[:4]))"
    );
    let secs: f64 = runtime_python(&script).trim().parse().expect("CPU seconds");
    secs * 1e3 / forks as f64
}

/// Runs `code` with the runtime's interpreter, directly (`python -I -B -c`), and returns what it
/// printed; panics if it fails.
fn runtime_python(code: &str) -> String {
    let runtime = pyrunner_tests::runtime_dir();
    let out = std::process::Command::new(runtime.join("venv/bin/python3"))
        .args(["-I", "-B", "-c", code])
        .env("LD_LIBRARY_PATH", runtime.join("python/lib"))
        .env("OPENBLAS_NUM_THREADS", "1")
        .output()
        .expect("the runtime's python starts");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One executor's figures: as shown, and the number each ratio is taken of.
#[derive(Default)]
struct Figures {
    shown: BTreeMap<&'static str, String>,
    value: BTreeMap<&'static str, f64>,
    /// CPU time per run of each part of the fleet in the throughput row, in ms.
    cpu: Vec<(&'static str, f64)>,
}

impl Figures {
    fn latency(&mut self, row: &'static str, v: [f64; 3]) {
        self.shown
            .insert(row, format!("{:.1} / {:.1} / {:.1}", v[0], v[1], v[2]));
        self.value.insert(row, v[0]);
    }

    fn single(&mut self, row: &'static str, shown: String, value: f64) {
        self.shown.insert(row, shown);
        self.value.insert(row, value);
    }
}

async fn measure(env: &[(&str, &str)], requests: usize) -> Figures {
    let mut f = Figures::default();
    let mut fleet = Fleet::start(1, env).await;
    for (row, code) in [
        ("1 `pass`, fleet, p50 / p95 / p99 ms", "pass"),
        ("2 sympy factorint, fleet, p50 / p95 / p99 ms", SYMPY),
        ("3 numpy small, fleet, p50 / p95 / p99 ms", NUMPY),
    ] {
        f.latency(
            row,
            latency(&fleet.url, code, requests, Duration::ZERO).await,
        );
    }
    let before = cpu_snapshot(&mut fleet);
    let started = Instant::now();
    let (rate, errors, done) = throughput(&fleet.url, CONCURRENT_CLIENTS * requests).await;
    let elapsed = started.elapsed();
    let after = cpu_snapshot(&mut fleet);
    f.single(
        "4 `pass`, 8 clients, fleet, runs/s (errors)",
        format!("{rate:.0} ({errors})"),
        rate,
    );
    let per_run = |ms: f64| ms / done.max(1) as f64;
    for (i, part) in CPU_PARTS.iter().enumerate() {
        f.cpu.push((part, per_run(after[i] - before[i])));
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    f.cpu.push((
        "the machine's cores, elapsed time × cores",
        per_run(elapsed.as_secs_f64() * 1e3 * cores as f64),
    ));
    // Idle by now: every slot holds a warm child waiting for its job.
    tokio::time::sleep(Duration::from_millis(500)).await;
    if let Some(uss) = idle_warm_child_uss() {
        f.single("7 one idle warm child, USS MiB", format!("{uss:.2}"), uss);
    }
    let start = worker_start(&mut fleet).await;
    f.single(
        "8 worker start until consuming, ms",
        format!("{start:.0}"),
        start,
    );
    fleet.stop().await;

    let embedded = Fleet::embedded(env).await;
    embedded.wait_for("/readyz").await;
    f.latency(
        "5 `pass`, embedded, p50 / p95 / p99 ms",
        latency(&embedded.url, "pass", requests, Duration::ZERO).await,
    );
    f.latency(
        "6 `pass`, embedded, one request every 10 ms, p50 / p95 / p99 ms",
        latency(&embedded.url, "pass", requests, SPACED).await,
    );
    embedded.stop().await;
    f
}

/// p50 in ms of `n` timed calls of `f` (after 3 untimed ones).
async fn p50<F, Fut>(n: usize, mut f: F) -> f64
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    for _ in 0..3 {
        f().await;
    }
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        f().await;
        times.push(started.elapsed());
    }
    times.sort();
    percentile(&times, 0.5)
}

/// Where the time of a `pass` run through the fleet goes: each part measured on its own, p50.
async fn profile(requests: usize) -> Vec<(&'static str, f64)> {
    let mut parts = Vec::new();
    let fleet = Fleet::start(1, &[("PYRUNNER_EXECUTOR", "zygote")]).await;
    let client = reqwest::Client::new();
    let health = format!("{}/healthz", fleet.url);
    parts.push((
        "HTTP: a request and its answer (`GET /healthz`, kept-alive connection)",
        p50(requests, || async {
            client
                .get(&health)
                .send()
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap();
        })
        .await,
    ));
    let redis = pyrunner_shared::store::ResultStore::Redis(
        pyrunner_shared::store::RedisStore::new(
            &pyrunner_tests::fleet::redis_url(),
            Duration::from_secs(60),
            1,
        )
        .unwrap(),
    );
    parts.push((
        "store: one Redis round trip (the path has three: queued, running, result + wake)",
        p50(requests, || async { redis.ping().await.unwrap() }).await,
    ));
    let queue = pyrunner_shared::queue::QueueSettings::named(&format!(
        "pyrunner.bench.{}",
        std::process::id()
    ));
    let publisher =
        pyrunner_shared::queue::JobPublisher::connect(&pyrunner_tests::fleet::amqp_url(), &queue)
            .await
            .unwrap();
    let connection = pyrunner_shared::queue::connect(&pyrunner_tests::fleet::amqp_url())
        .await
        .unwrap();
    let (channel, consumer) =
        pyrunner_shared::queue::consume(&connection, &queue, &queue.name, 1, "bench")
            .await
            .unwrap();
    let consumer = tokio::sync::Mutex::new(consumer);
    let job = pyrunner_tests::job("pass", None, pyrunner_tests::limits(None, None));
    parts.push((
        "broker: publish (persistent, confirmed) until a consumer has it",
        p50(requests, || async {
            use futures_util::StreamExt;
            let mut consumer = consumer.lock().await;
            let (published, delivery) = tokio::join!(publisher.publish(&job), consumer.next());
            published.unwrap();
            let delivery = delivery.unwrap().unwrap();
            delivery
                .ack(lapin::options::BasicAckOptions::default())
                .await
                .unwrap();
        })
        .await,
    ));
    for name in [queue.name.clone(), queue.dead_letter_queue()] {
        let _ = channel
            .queue_delete(name.as_str().into(), Default::default())
            .await;
    }
    fleet.stop().await;

    let mut args = pyrunner_tests::executor_args(1);
    args.executor = pyrunner_worker::config::ExecutorKind::Zygote;
    let (executor, _root) = args.build().unwrap();
    let executor = executor.start(false).await.unwrap();
    parts.push((
        "executor: a warm child runs `pass` (job written, end record read), in process",
        p50(requests, || async {
            let r = executor
                .run(&pyrunner_tests::job(
                    "pass",
                    None,
                    pyrunner_tests::limits(None, None),
                ))
                .await;
            assert_eq!(r.status, RunStatus::Success);
        })
        .await,
    ));
    parts.push((
        "off the request path: fork, sandbox setup and preparation of a warm child",
        p50(requests.min(50), || async {
            executor.refill_time().await.unwrap().unwrap();
        })
        .await,
    ));
    parts
}

#[tokio::main]
async fn main() {
    let requests: usize = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(200);
    let mut results = Vec::new();
    for (name, env) in EXECUTORS {
        eprintln!("measuring the {name} executor ...");
        results.push((name, measure(env, requests).await));
    }
    let mut bare = Figures::default();
    for (row, code) in [
        ("1 `pass`, fleet, p50 / p95 / p99 ms", "pass"),
        ("2 sympy factorint, fleet, p50 / p95 / p99 ms", SYMPY),
        ("3 numpy small, fleet, p50 / p95 / p99 ms", NUMPY),
    ] {
        bare.latency(row, bare_interpreter(code, requests));
    }
    let names: Vec<String> = results.iter().map(|(n, _)| n.to_string()).collect();
    println!(
        "| workload | {} | for reference: bare `python -I`, no service |",
        names.join(" | ")
    );
    println!("|---|{}|---:|", vec!["---:"; results.len()].join("|"));
    let baseline = &results[0].1;
    let rows: std::collections::BTreeSet<&str> = results
        .iter()
        .flat_map(|(_, f)| f.shown.keys().copied())
        .collect();
    for row in rows {
        let cells: Vec<String> = results
            .iter()
            .enumerate()
            .map(
                |(i, (_, f))| match (f.shown.get(row), baseline.value.get(row)) {
                    (None, _) => "n/a".to_owned(),
                    (Some(shown), Some(base)) if i > 0 => {
                        format!("{shown} ({:.2}× baseline)", f.value[row] / base)
                    }
                    (Some(shown), _) => shown.clone(),
                },
            )
            .collect();
        let reference = bare.shown.get(row).map_or("", String::as_str);
        // Rows are keyed with a digit for their order; it is not shown.
        println!("| {} | {} | {reference} |", &row[2..], cells.join(" | "));
    }
    println!(
        "\n{requests} sequential requests per latency row; the throughput row sends at most {} requests.",
        CONCURRENT_CLIENTS * requests
    );
    println!(
        "\n| CPU time per `pass` run in the throughput row, ms | {} |\n|---|{}|",
        names.join(" | "),
        vec!["---:"; results.len()].join("|")
    );
    for (i, (part, _)) in results[0].1.cpu.iter().enumerate() {
        let cells: Vec<String> = results
            .iter()
            .map(|(_, f)| format!("{:.2}", f.cpu[i].1))
            .collect();
        println!("| {part} | {} |", cells.join(" | "));
    }
    println!(
        "\nFor reference, a bare fork of the preloaded interpreter (numpy, numpy.random, sympy; \
         `os.fork`, `os._exit(0)`, `waitpid`; no sandbox): {:.2} ms of CPU per fork (500 forks).",
        bare_fork(500)
    );
    eprintln!("measuring the parts of a run ...");
    println!("\n| part of a `pass` run through the fleet (zygote) | p50 ms |\n|---|---:|");
    for (part, ms) in profile(requests).await {
        println!("| {part} | {ms:.2} |");
    }
}

//! Latency of `POST /run` through the real binaries, embedded and fleet, with one sequential
//! client. Prints a Markdown table of p50/p95/p99 per workload and mode, with the ratio of each
//! p50 to a baseline measured in the same run: the runtime's bare interpreter started directly
//! (`python -I -c CODE`), without the service or the sandbox.
//!
//! Usage: `cargo run --release -p pyrunner-tests --bin latency -- [REQUESTS]` (default 50),
//! after `cargo build --release --bins` and with RabbitMQ and Redis reachable.

use std::time::{Duration, Instant};

use pyrunner_shared::RunStatus;
use pyrunner_tests::fleet::Fleet;
use pyrunner_tests::http::run;
use serde_json::json;

const WORKLOADS: &[(&str, &str)] = &[
    ("print(1)", "print(1)"),
    (
        "sympy.factorint(10**10)",
        "import sympy; print(sympy.factorint(10**10))",
    ),
    (
        "numpy small",
        "import numpy as np; print(np.arange(10).sum())",
    ),
];

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

async fn measure(url: &str, code: &str, requests: usize) -> Vec<Duration> {
    // Warm up caches (page cache of the runtime, connections) before measuring.
    for _ in 0..3 {
        run(url, &json!({ "code": code })).await;
    }
    let mut times = Vec::with_capacity(requests);
    for _ in 0..requests {
        let started = Instant::now();
        let result = run(url, &json!({ "code": code })).await;
        times.push(started.elapsed());
        assert_eq!(result.status, RunStatus::Success, "{result:?}");
    }
    times.sort();
    times
}

fn measure_bare(code: &str, requests: usize) -> Vec<Duration> {
    let runtime = pyrunner_tests::runtime_dir();
    let python = runtime.join("venv/bin/python3");
    let run = || {
        let out = std::process::Command::new(&python)
            .args(["-I", "-B", "-c", code])
            .env("LD_LIBRARY_PATH", runtime.join("python/lib"))
            .env("OPENBLAS_NUM_THREADS", "1")
            .output()
            .expect("the runtime's python starts");
        assert!(out.status.success(), "{out:?}");
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
    times
}

fn row(mode: &str, name: &str, t: &[Duration], baseline_p50: f64) {
    let p50 = percentile(t, 0.5);
    println!(
        "| {mode} | `{name}` | {p50:.1} | {:.1} | {:.1} | {:.2} |",
        percentile(t, 0.95),
        percentile(t, 0.99),
        p50 / baseline_p50
    );
}

#[tokio::main]
async fn main() {
    let requests: usize = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(50);
    println!("| mode | workload | p50 ms | p95 ms | p99 ms | p50 / baseline |");
    println!("|---|---|---:|---:|---:|---:|");
    let mut baseline = Vec::new();
    for (name, code) in WORKLOADS {
        let t = measure_bare(code, requests);
        let p50 = percentile(&t, 0.5);
        row("baseline: bare `python -I`", name, &t, p50);
        baseline.push(p50);
    }
    for mode in ["embedded", "fleet"] {
        let fleet = if mode == "fleet" {
            Fleet::start(1, &[]).await
        } else {
            let f = Fleet::embedded(&[]).await;
            f.wait_for("/readyz").await;
            f
        };
        for ((name, code), base) in WORKLOADS.iter().zip(&baseline) {
            let t = measure(&fleet.url, code, requests).await;
            row(mode, name, &t, *base);
        }
        fleet.stop().await;
    }
}

//! What the check programs (`composecheck`, `cgroupcheck`, `nodecheck`) share: waiting for an
//! api, a fleet's isolation layers, running a catalogue through it, and the table of checks
//! they print.

use std::future::Future;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::catalogue::Case;
use crate::http::{get, run_cases};

/// Runs `checks`, which panic at the first that fails, on a runtime of two threads; whether they
/// all passed.
pub fn passed(checks: impl Future<Output = ()>) -> bool {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| runtime.block_on(checks))).is_ok()
}

/// Waits until `base`'s `/readyz` answers 200; panics after `within`.
pub async fn wait_ready(base: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let ready = reqwest::get(format!("{base}/readyz")).await;
        if ready.is_ok_and(|r| r.status() == 200) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{base}/readyz is not 200 after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Waits until a fleet's `/isolation` report counts `workers` live workers (it holds the layers
/// every one of them has), and panics unless every layer `expected` names is active. Returns
/// "N of M layers active" and the report.
pub async fn fleet_layers(
    base: &str,
    workers: usize,
    expected: impl Fn(&str) -> bool,
) -> (String, Value) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let report = loop {
        let reply = get(&format!("{base}/isolation")).await;
        if reply.status == 200 && reply.body["workers"] == workers {
            break reply.body;
        }
        assert!(Instant::now() < deadline, "/isolation: {reply:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let active: Vec<&str> = report["active"]
        .as_array()
        .expect("a list of active layers")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let all = pyrunner_shared::isolation::LAYERS;
    let missing: Vec<String> = all
        .iter()
        .map(|(name, _)| *name)
        .filter(|name| expected(name) && !active.contains(name))
        .map(|name| format!("{name}: {}", report["layers"][name]))
        .collect();
    assert!(
        missing.is_empty(),
        "inactive layers:\n{}",
        missing.join("\n")
    );
    let summary = format!(
        "{} of {} layers active, on each of the {workers} workers",
        active.len(),
        all.len()
    );
    (summary, report)
}

/// Runs a catalogue through the api's `POST /run`; panics with every case that failed.
pub async fn all_pass(base: &str, cases: Vec<Case>, catalogue: &str) {
    let failures = run_cases(base, cases).await;
    assert!(
        failures.is_empty(),
        "{catalogue} cases failed:\n{}",
        failures.join("\n")
    );
}

/// The table printed at the end: each check, its time and what it found.
#[derive(Default)]
pub struct Report {
    rows: Vec<(String, Duration, String)>,
}

impl Report {
    /// Records a check that passed, started at `started`, and prints it at once.
    pub fn add(&mut self, check: &str, started: Instant, detail: String) {
        println!(
            "ok  {check} ({:.1} s) {detail}",
            started.elapsed().as_secs_f64()
        );
        self.rows
            .push((check.to_owned(), started.elapsed(), detail));
    }

    /// Runs and records a check that returns what it found (it panics if it fails).
    pub fn timed(&mut self, check: &str, f: impl FnOnce() -> String) {
        let started = Instant::now();
        println!("..  {check}");
        let detail = f();
        self.add(check, started, detail);
    }

    /// [`timed`](Self::timed), for a check that waits.
    pub async fn awaited(&mut self, check: &str, found: impl Future<Output = String>) {
        let started = Instant::now();
        println!("..  {check}");
        let detail = found.await;
        self.add(check, started, detail);
    }

    /// Runs `cases` through the api at `base` as the check "`title`: N cases", which reports
    /// `outcome` when every case passed.
    pub async fn catalogue(&mut self, base: &str, title: &str, cases: Vec<Case>, outcome: &str) {
        let check = format!("{title}: {} cases", cases.len());
        let passed = async {
            all_pass(base, cases, title).await;
            outcome.to_owned()
        };
        self.awaited(&check, passed).await;
    }

    /// Prints the table.
    pub fn print(&self) {
        println!("\n| check | time | result |\n|---|---:|---|");
        for (check, took, detail) in &self.rows {
            println!("| {check} | {:.1} s | {detail} |", took.as_secs_f64());
        }
    }
}

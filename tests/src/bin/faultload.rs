//! The load and fault program of docs/RELIABILITY.md: mixed jobs through a fleet of two workers
//! while a worker is killed, the broker restarts and Redis restarts. It checks that every job
//! accepted got exactly one final result, the one its snippet calls for, and prints the counts,
//! the latency, the peak memory of each process and the number of lost jobs (expected 0).
//!
//! Usage (after `cargo build --release --bins`, as root, with RabbitMQ reachable):
//!   target/release/faultload [JOBS]      (default 10000)
//! or `scripts/faultload`, which builds first. Everything stays on loopback and is bounded: at
//! most JOBS jobs, each submitted at most 50 times (503s during the outages) and polled for at
//! most 120 s, and the whole run stops after 30 minutes.
//!
//! The faults: worker 0 is killed with SIGKILL at 20% of the jobs (a new worker takes its
//! place), RabbitMQ is restarted with `rabbitmqctl stop_app` / `start_app` at 45% (this
//! restarts the machine's broker: run it where nothing else uses that broker), and Redis, a
//! `redis-server` of the program's own, is killed and started again, empty, at 70%.

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pyrunner_shared::{RunResult, RunStatus};
use pyrunner_tests::fleet::Fleet;
use pyrunner_tests::http::send_with;
use pyrunner_tests::outage::PrivateRedis;
use pyrunner_tests::procfs;
use serde_json::{json, Value};

const CLIENTS: usize = 16;
const MAX_ATTEMPTS: usize = 50;
const POLL_FOR: Duration = Duration::from_secs(120);
const RUN_FOR_AT_MOST: Duration = Duration::from_secs(30 * 60);

/// The kinds of job in the mix, one of each per 20 jobs in these proportions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Success,
    Error,
    Timeout,
    MemoryHog,
    OutputFlood,
}

impl Kind {
    fn of(n: usize) -> Kind {
        match n % 20 {
            0..=9 => Kind::Success,
            10..=12 => Kind::Error,
            13..=14 => Kind::Timeout,
            15..=16 => Kind::MemoryHog,
            _ => Kind::OutputFlood,
        }
    }

    fn request(self, n: usize) -> Value {
        match self {
            Kind::Success => json!({ "code": format!("print({n} * 2)") }),
            Kind::Error => json!({ "code": format!("raise ValueError('job {n}')") }),
            Kind::Timeout => json!({ "code": "while True: pass", "timeout_ms": 300 }),
            Kind::MemoryHog => json!({ "code": "b = bytearray(200 * 2**20)", "memory_mb": 64 }),
            Kind::OutputFlood => json!({
                "code": "import sys\nwhile True: sys.stdout.write('x' * 65536)"
            }),
        }
    }

    fn expected(self) -> RunStatus {
        match self {
            Kind::Success => RunStatus::Success,
            Kind::Error => RunStatus::Error,
            Kind::Timeout => RunStatus::Timeout,
            Kind::MemoryHog => RunStatus::MemoryExceeded,
            Kind::OutputFlood => RunStatus::OutputLimitExceeded,
        }
    }

    /// Whether `result` is the one job `n` of this kind calls for.
    fn matches(self, n: usize, result: &RunResult) -> bool {
        result.status == self.expected()
            && match self {
                Kind::Success => result.stdout == format!("{}\n", n * 2),
                Kind::Error => result
                    .exception
                    .as_ref()
                    .is_some_and(|e| e.kind == "ValueError" && e.message == format!("job {n}")),
                _ => true,
            }
    }
}

/// What became of one job.
struct Outcome {
    n: usize,
    kind: Kind,
    /// The accepted job's id, its result, and when the answer came.
    answered: Option<(String, RunResult, Instant)>,
    /// Submissions refused with 503 before one was accepted.
    refused: usize,
    latency: Duration,
}

/// Submits job `n` until it is accepted, and gets its final result.
async fn one_job(client: &reqwest::Client, base: &str, n: usize) -> Outcome {
    let kind = Kind::of(n);
    let body = serde_json::to_vec(&kind.request(n)).unwrap();
    let started = Instant::now();
    let mut refused = 0;
    let outcome = |answered, refused| Outcome {
        n,
        kind,
        answered,
        refused,
        latency: started.elapsed(),
    };
    for _ in 0..MAX_ATTEMPTS {
        let reply = tokio::time::timeout(
            Duration::from_secs(60),
            send_with(
                client,
                "POST",
                &format!("{base}/run"),
                Some(("application/json", body.clone())),
            ),
        )
        .await;
        let Ok(reply) = reply else { continue };
        match reply.status {
            200 => {
                let result: RunResult = serde_json::from_value(reply.body).unwrap();
                let id = result.id.to_string();
                return outcome(Some((id, result, Instant::now())), refused);
            }
            // Accepted, but no answer within the wait: poll for it.
            504 => {
                let id = reply.body["error"]["job_id"].as_str().unwrap().to_owned();
                let answer = poll(client, base, &id).await;
                return outcome(answer.map(|r| (id, r, Instant::now())), refused);
            }
            503 => {
                refused += 1;
                tokio::time::sleep(Duration::from_millis(250 + 50 * refused as u64)).await;
            }
            other => panic!("job {n}: unexpected HTTP {other}: {}", reply.body),
        }
    }
    outcome(None, refused)
}

async fn poll(client: &reqwest::Client, base: &str, id: &str) -> Option<RunResult> {
    let deadline = Instant::now() + POLL_FOR;
    while Instant::now() < deadline {
        let reply = send_with(client, "GET", &format!("{base}/jobs/{id}"), None).await;
        if reply.status == 200 && reply.body["result"].is_object() {
            return serde_json::from_value(reply.body["result"].clone()).ok();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    None
}

/// When each fault happened, as offsets from the start.
#[derive(Default)]
struct Faults {
    log: Vec<(Duration, String)>,
    redis_restarted_at: Option<Instant>,
}

fn restart_broker() -> Result<(), String> {
    for action in ["stop_app", "start_app"] {
        let status = Command::new("rabbitmqctl")
            .arg(action)
            .stdout(std::process::Stdio::null())
            .status()
            .map_err(|e| format!("rabbitmqctl: {e}"))?;
        if !status.success() {
            return Err(format!("rabbitmqctl {action} failed: {status}"));
        }
    }
    Ok(())
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() {
    let jobs: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("JOBS is a number"))
        .unwrap_or(10_000);
    let started = Instant::now();
    let mut redis = PrivateRedis::start();
    let redis_url = redis.url();
    let fleet = Fleet::start(2, &[("REDIS_URL", redis_url.as_str())]).await;
    let base = fleet.url.clone();
    let fleet = Arc::new(Mutex::new(fleet));
    let peaks: Arc<Mutex<BTreeMap<String, f64>>> = Arc::default();
    let broker = procfs::pids()
        .into_iter()
        .find(|&pid| procfs::comm(pid).as_deref() == Some("beam.smp"));
    let record_peaks = {
        let (fleet, peaks) = (fleet.clone(), peaks.clone());
        move |redis: Option<u32>| {
            let mut pids = fleet.lock().unwrap().pids();
            pids.extend(redis.map(|pid| ("redis-server (the program's)".to_owned(), pid)));
            pids.extend(broker.map(|pid| ("RabbitMQ (beam.smp)".to_owned(), pid)));
            let mut peaks = peaks.lock().unwrap();
            for (name, pid) in pids {
                let mut family = vec![(name.clone(), pid)];
                for zygote in procfs::children_named(pid, "pyrunner-zygote") {
                    family.push((format!("{name} zygote"), zygote));
                }
                for (name, pid) in family {
                    if let Some(mib) = procfs::peak_rss_mib(pid) {
                        let peak = peaks.entry(name).or_insert(0.0);
                        *peak = peak.max(mib);
                    }
                }
            }
        }
    };

    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (next, done, base) = (next.clone(), done.clone(), base.clone());
            tokio::spawn(async move {
                let client = reqwest::Client::new();
                let mut outcomes = Vec::new();
                loop {
                    let n = next.fetch_add(1, Ordering::SeqCst);
                    if n >= jobs || started.elapsed() > RUN_FOR_AT_MOST {
                        return outcomes;
                    }
                    outcomes.push(one_job(&client, &base, n).await);
                    done.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();

    // The faults, at fixed shares of the jobs answered.
    let mut faults = Faults::default();
    let at = |share: f64| (jobs as f64 * share) as usize;
    let mut plan = vec![
        (at(0.20), "kill"),
        (at(0.45), "broker"),
        (at(0.70), "redis"),
    ];
    plan.reverse();
    while let Some((threshold, fault)) = plan.pop() {
        while done.load(Ordering::SeqCst) < threshold && started.elapsed() < RUN_FOR_AT_MOST {
            tokio::time::sleep(Duration::from_millis(100)).await;
            record_peaks(redis.pid());
        }
        let when = started.elapsed();
        match fault {
            "kill" => {
                record_peaks(redis.pid());
                let mut fleet = fleet.lock().unwrap();
                fleet.kill_worker(0);
                fleet.add_worker();
                faults
                    .log
                    .push((when, "worker 0 killed (SIGKILL); worker 2 started".into()));
            }
            "broker" => {
                let outcome = tokio::task::spawn_blocking(restart_broker).await.unwrap();
                let took = started.elapsed() - when;
                faults.log.push((
                    when,
                    match outcome {
                        Ok(()) => format!("RabbitMQ restarted (stop_app, start_app: {took:.1?})"),
                        Err(e) => format!("RabbitMQ restart FAILED: {e}"),
                    },
                ));
            }
            _ => {
                redis.stop();
                tokio::time::sleep(Duration::from_secs(2)).await;
                redis.restart();
                faults.redis_restarted_at = Some(Instant::now());
                faults
                    .log
                    .push((when, "Redis killed, started again empty 2 s later".into()));
            }
        }
    }
    let mut outcomes = Vec::new();
    for client in clients {
        outcomes.extend(client.await.unwrap());
    }
    record_peaks(redis.pid());
    let elapsed = started.elapsed();

    // Each answered job: its result is the one its snippet calls for, and the store (where it
    // still has the job) holds the same one.
    let client = reqwest::Client::new();
    let (mut lost, mut wrong, mut inconsistent, mut gone_with_redis) = (0, 0, 0, 0);
    let mut by_kind: BTreeMap<Kind, (usize, BTreeMap<&'static str, usize>)> = BTreeMap::new();
    let mut examples = Vec::new();
    for outcome in &outcomes {
        let entry = by_kind.entry(outcome.kind).or_default();
        entry.0 += 1;
        let Some((id, result, answered_at)) = &outcome.answered else {
            lost += 1;
            examples.push(format!(
                "job {} ({:?}): no final answer",
                outcome.n, outcome.kind
            ));
            continue;
        };
        *entry.1.entry(result.status.as_str()).or_default() += 1;
        if !outcome.kind.matches(outcome.n, result) {
            wrong += 1;
            if examples.len() < 10 {
                examples.push(format!(
                    "job {} ({:?}): {} {:?} {:?}",
                    outcome.n,
                    outcome.kind,
                    result.status.as_str(),
                    result.stdout,
                    result.stderr
                ));
            }
        }
        let stored = send_with(&client, "GET", &format!("{base}/jobs/{id}"), None).await;
        match stored.status {
            200 => {
                let again: RunResult =
                    serde_json::from_value(stored.body["result"].clone()).unwrap();
                if &again != result {
                    inconsistent += 1;
                }
            }
            404 if faults.redis_restarted_at.is_some_and(|t| *answered_at < t) => {
                gone_with_redis += 1;
            }
            other => {
                inconsistent += 1;
                examples.push(format!("job {} ({id}): GET answered {other}", outcome.n));
            }
        }
    }
    let mut latencies: Vec<Duration> = outcomes
        .iter()
        .filter(|o| o.answered.is_some())
        .map(|o| o.latency)
        .collect();
    latencies.sort();
    let refused: usize = outcomes.iter().map(|o| o.refused).sum();
    let refused_jobs = outcomes.iter().filter(|o| o.refused > 0).count();

    println!("## Load and fault run\n");
    println!(
        "{} jobs from {CLIENTS} clients (`POST /run`, polling after a 504) through an api and 2 \
         workers, in {:.0} s.\n",
        outcomes.len(),
        elapsed.as_secs_f64()
    );
    println!("| fault | at |\n|---|---:|");
    for (when, what) in &faults.log {
        println!("| {what} | {:.1} s |", when.as_secs_f64());
    }
    println!("\n| kind | jobs | statuses |\n|---|---:|---|");
    for (kind, (count, statuses)) in &by_kind {
        let list: Vec<_> = statuses.iter().map(|(s, c)| format!("{s} {c}")).collect();
        println!(
            "| {kind:?} (expects {}) | {count} | {} |",
            kind.expected().as_str(),
            list.join(", ")
        );
    }
    println!("\n| check | count |\n|---|---:|");
    println!("| jobs with a final answer | {} |", outcomes.len() - lost);
    println!("| **lost** (no final answer) | **{lost}** |");
    println!("| answers not the one the snippet calls for | {wrong} |");
    println!("| answers that differ from the stored result | {inconsistent} |");
    println!(
        "| answered before the Redis restart, gone from the store with it | {gone_with_redis} |"
    );
    println!("| submissions refused with 503 during the outages (then retried) | {refused} (of {refused_jobs} jobs) |");
    println!(
        "\nLatency from the first submission to the final answer, including retries: p50 {:.1} ms, \
         p99 {:.1} ms, max {:.1} ms.\n",
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies.last().map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    );
    println!("| process | peak RSS MiB |\n|---|---:|");
    for (name, mib) in peaks.lock().unwrap().iter() {
        println!("| {name} | {mib:.1} |");
    }
    for example in &examples {
        println!("\n- {example}");
    }
    drop(record_peaks);
    let fleet = Arc::try_unwrap(fleet)
        .ok()
        .expect("the fleet is no longer shared")
        .into_inner()
        .unwrap();
    fleet.stop().await;
    if lost > 0 || wrong > 0 || inconsistent > 0 {
        std::process::exit(1);
    }
}

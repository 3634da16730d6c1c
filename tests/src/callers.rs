//! Checks of what each caller (API key) is held to and what it is shown, run against any api:
//! concurrency, the CPU quota and its reset, usage through the admin command and the admin
//! endpoints, and fair turns between callers.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::http::{poll_done_as, send_keyed, Reply};

/// The quota period the apis of these checks run with (`PYRUNNER_QUOTA_PERIOD_SECS`): short,
/// so that a test sees a quota reset, and long enough that a CPU burn, its usage record and the
/// refusal that follows fit in one period on a loaded host.
pub const QUOTA_PERIOD_SECS: u64 = 10;

/// `key`'s request through `base`.
async fn call(base: &str, method: &str, path: &str, key: &str, body: Option<&Value>) -> Reply {
    send_keyed(method, &format!("{base}{path}"), "x-api-key", key, body).await
}

/// Sleeps until just after the next quota period starts.
async fn next_period() {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let next = Duration::from_secs((now.as_secs() / QUOTA_PERIOD_SECS + 1) * QUOTA_PERIOD_SECS);
    tokio::time::sleep(next - now + Duration::from_millis(100)).await;
}

/// The usage of the key `limited` (read with the admin key `ops`) once it counts `runs` runs:
/// the worker records a run's usage just after its result.
async fn settled(base: &str, ops: &str, runs: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let reply = call(base, "GET", "/admin/usage/limited", ops, None).await;
        assert_eq!(reply.status, 200, "{reply:?}");
        if reply.body["total"]["runs"] == runs {
            return reply.body;
        }
        assert!(Instant::now() < deadline, "never {runs} runs: {reply:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Through the replicas `bases` of an api whose key store `admin` manages (the admin command,
/// on the same stores), running with [`QUOTA_PERIOD_SECS`]:
/// - a key with `--max-concurrent 1` gets 429 `concurrency_limit` on any replica while its job
///   is in flight, and is admitted again once it finishes;
/// - a key with a CPU quota gets 429 `quota_exhausted` once its runs used it, until the next
///   period;
/// - its usage (runs by status, CPU, wall time) shows through the admin command and
///   `GET /admin/usage/{name}`, which wants an admin key (401 without a key, 403 with another).
pub async fn check_key_limits(bases: &[&str], admin: impl Fn(&[&str]) -> Value) {
    let ops = admin(&["create", "--name", "ops", "--admin"]);
    let ops = ops["key"].as_str().unwrap().to_owned();
    let made = admin(&[
        "create",
        "--name",
        "limited",
        "--max-concurrent",
        "1",
        "--cpu-quota-secs",
        "0.3",
    ]);
    let key = made["key"].as_str().unwrap().to_owned();
    // An open service looks for keys again at most a second later.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let other = bases[bases.len() - 1];

    // Concurrency: one job in flight, so the next one is refused, on any replica.
    let slow = json!({ "code": "import time; time.sleep(1.5); print('slept')" });
    let accepted = call(bases[0], "POST", "/jobs", &key, Some(&slow)).await;
    assert_eq!(accepted.status, 202, "{accepted:?}");
    let id = accepted.body["id"].as_str().unwrap().to_owned();
    let pass = json!({ "code": "pass" });
    for path in ["/jobs", "/run"] {
        let refused = call(other, "POST", path, &key, Some(&pass)).await;
        assert_eq!(refused.status, 429, "{path}: {refused:?}");
        assert_eq!(refused.body["error"]["code"], "concurrency_limit");
        assert_eq!(refused.body["error"]["limit"], "max_concurrent");
        assert_eq!(refused.retry_after(), 1);
    }
    // Another key is not held by this one's limit.
    let free = call(other, "POST", "/run", &ops, Some(&pass)).await;
    assert_eq!(free.status, 200, "{free:?}");
    let slept = poll_done_as(bases[0], Some(&key), &id, Duration::from_secs(30)).await;
    assert_eq!(slept.result.unwrap().stdout, "slept\n");
    let sleep_cpu_ms = settled(other, &ops, 1).await["total"]["cpu_ms"]
        .as_u64()
        .unwrap();

    // The CPU quota: a run that burns more than 0.3 s of CPU uses it up for the period.
    next_period().await;
    let burn = json!({
        "code": "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.4: pass\nprint('burnt')"
    });
    let burnt = call(other, "POST", "/run", &key, Some(&burn)).await;
    assert_eq!(burnt.status, 200, "{burnt:?}");
    assert_eq!(burnt.body["stdout"], "burnt\n", "{burnt:?}");
    let cpu_ms = burnt.body["cpu_ms"].as_u64().unwrap();
    assert!(cpu_ms >= 400, "{burnt:?}");
    settled(other, &ops, 2).await;
    let exhausted = call(bases[0], "POST", "/run", &key, Some(&pass)).await;
    assert_eq!(exhausted.status, 429, "{exhausted:?}");
    assert_eq!(exhausted.body["error"]["code"], "quota_exhausted");
    assert_eq!(exhausted.body["error"]["limit"], "cpu_quota_secs");
    let wait = exhausted.retry_after();
    assert!((1..=QUOTA_PERIOD_SECS).contains(&wait), "{exhausted:?}");

    // Usage, through the admin endpoint and the admin command.
    let path = "/admin/usage/limited";
    let shown = call(other, "GET", path, &ops, None).await;
    assert_eq!(shown.status, 200, "{shown:?}");
    let usage = &shown.body;
    assert_eq!(usage["name"], "limited");
    assert_eq!(usage["in_flight"], 0, "{usage}");
    assert_eq!(usage["total"]["by_status"]["success"], 2, "{usage}");
    assert_eq!(usage["total"]["runs"], 2, "{usage}");
    assert_eq!(usage["total"]["cpu_ms"], sleep_cpu_ms + cpu_ms, "{usage}");
    assert!(usage["total"]["wall_ms"].as_u64().unwrap() >= 1500 + cpu_ms);
    assert_eq!(usage["period"]["usage"]["cpu_ms"], cpu_ms, "{usage}");
    assert_eq!(usage["period"]["cpu_quota_secs"], 0.3);
    // The embedded api saves its ledger for the admin command every second.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let listed = admin(&["usage", "limited"]);
        if listed["total"] == usage["total"] {
            break;
        }
        assert!(Instant::now() < deadline, "{listed} != {usage}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let all = call(bases[0], "GET", "/admin/usage", &ops, None).await;
    let names: Vec<_> = all
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["name"].clone())
        .collect();
    assert_eq!(names, [json!("limited"), json!("ops")], "{all:?}");
    let keys = call(bases[0], "GET", "/admin/keys", &ops, None).await;
    assert_eq!(keys.body[1]["admin"], true, "{keys:?}");
    assert!(
        !keys.body.to_string().contains(&key),
        "no key is shown: {keys:?}"
    );
    for (who, status, code) in [
        (Some(key.as_str()), 403, "not_admin"),
        (None, 401, "unauthorized"),
    ] {
        let reply = match who {
            Some(key) => call(bases[0], "GET", path, key, None).await,
            None => crate::http::get(&format!("{}{path}", bases[0])).await,
        };
        assert_eq!(reply.status, status, "{reply:?}");
        assert_eq!(reply.body["error"]["code"], code, "{reply:?}");
    }
    let unknown = call(bases[0], "GET", "/admin/usage/nobody", &ops, None).await;
    assert_eq!(unknown.status, 404, "{unknown:?}");
    assert_eq!(unknown.body["error"]["code"], "key_not_found");

    // The next period has a fresh quota.
    tokio::time::sleep(Duration::from_millis(wait * 1000 + 200)).await;
    let again = call(other, "POST", "/run", &key, Some(&pass)).await;
    assert_eq!(again.status, 200, "the quota is reset: {again:?}");
}

/// Jobs the flooding caller of [`check_fairness`] submits.
pub const FLOOD_JOBS: usize = 1000;

/// How long another caller's single run may take while [`FLOOD_JOBS`] jobs of 50 ms from one
/// caller wait: it waits for at most one flood run per slot (50 ms), not for the backlog (25 s
/// on two slots), and the rest is its own run and the service's overhead on a loaded host.
pub const FAIRNESS_BOUND: Duration = Duration::from_secs(2);

/// Through an api whose key store `admin` manages, with two run slots in all: a caller submits
/// [`FLOOD_JOBS`] jobs of 50 ms, then another caller's `POST /run` answers within
/// [`FAIRNESS_BOUND`], while most of the flood still waits; and neither key sees the other's
/// jobs. Returns the run's latency.
pub async fn check_fairness(base: &str, admin: impl Fn(&[&str]) -> Value) -> Duration {
    let flood = admin(&["create", "--name", "flood"])["key"]
        .as_str()
        .unwrap()
        .to_owned();
    let tutor = admin(&["create", "--name", "tutor"])["key"]
        .as_str()
        .unwrap()
        .to_owned();
    tokio::time::sleep(Duration::from_millis(1100)).await;

    let client = reqwest::Client::new();
    let job = json!({ "code": "import time; time.sleep(0.05)" });
    let submitted = Instant::now();
    let mut submitters = tokio::task::JoinSet::new();
    for part in 0..8 {
        let (client, job) = (client.clone(), job.clone());
        let (url, flood) = (format!("{base}/jobs"), flood.clone());
        submitters.spawn(async move {
            let mut ids = Vec::new();
            for _ in (part..FLOOD_JOBS).step_by(8) {
                let reply = client
                    .post(&url)
                    .header("x-api-key", &flood)
                    .json(&job)
                    .send()
                    .await
                    .expect("submitted");
                assert_eq!(reply.status(), 202);
                let body: Value = reply.json().await.unwrap();
                ids.push(body["id"].as_str().unwrap().to_owned());
            }
            ids
        });
    }
    let mut ids = Vec::new();
    while let Some(part) = submitters.join_next().await {
        ids.extend(part.unwrap());
    }
    assert_eq!(ids.len(), FLOOD_JOBS);
    println!("{FLOOD_JOBS} jobs submitted in {:?}", submitted.elapsed());

    let started = Instant::now();
    let mine = call(
        base,
        "POST",
        "/run",
        &tutor,
        Some(&json!({ "code": "print('mine')" })),
    )
    .await;
    let latency = started.elapsed();
    assert_eq!(mine.status, 200, "{mine:?}");
    assert_eq!(mine.body["stdout"], "mine\n", "{mine:?}");
    assert!(
        latency <= FAIRNESS_BOUND,
        "another caller's run took {latency:?} behind a flood of {FLOOD_JOBS} jobs"
    );
    // It went ahead of the backlog: most of the flood still waits.
    let mut waiting = 0;
    for id in ids.iter().rev().take(20) {
        let view = call(base, "GET", &format!("/jobs/{id}"), &flood, None).await;
        if view.body["status"] == "queued" {
            waiting += 1;
        }
    }
    assert!(
        waiting >= 15,
        "only {waiting} of the flood's last 20 jobs still wait"
    );
    // A key sees and cancels only its own jobs: another key's are not found.
    let theirs = format!("/jobs/{}", ids[0]);
    for method in ["GET", "DELETE"] {
        let reply = call(base, method, &theirs, &tutor, None).await;
        assert_eq!(reply.status, 404, "{method} {theirs}: {reply:?}");
        assert_eq!(reply.body["error"]["code"], "job_not_found");
    }
    let own = call(base, "GET", &theirs, &flood, None).await;
    assert_eq!(own.status, 200, "{own:?}");
    latency
}

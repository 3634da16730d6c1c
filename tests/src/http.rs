//! HTTP helpers: an embedded api served in-process on a real socket, and calls to any api.

use std::time::{Duration, Instant};

use clap::Parser;
use pyrunner_api::config::ApiConfig;
use pyrunner_api::server::Api;
use pyrunner_shared::{JobView, RunResult};
use serde_json::{json, Value};

/// An embedded api served on a loopback port until dropped.
pub struct EmbeddedApi {
    pub url: String,
    /// Its API keys file (none in it unless a test makes some).
    pub keys_file: std::path::PathBuf,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    _keys_dir: tempfile::TempDir,
}

impl EmbeddedApi {
    /// Starts one with the given flags on top of the test defaults (2 slots, the prepared
    /// runtime, and never fleet mode).
    pub async fn start(flags: &[&str]) -> EmbeddedApi {
        let runtime = crate::runtime_dir().display().to_string();
        let mut args = vec!["pyrunner-api", "--runtime-dir", &runtime];
        if !flags.contains(&"--concurrency") {
            args.extend(["--concurrency", "2"]);
        }
        // Test executables live in deps/, not beside the zygote.
        let zygote = crate::fleet::binary("pyrunner-zygote")
            .display()
            .to_string();
        if !flags.contains(&"--zygote-bin") {
            args.extend(["--zygote-bin", &zygote]);
        }
        // Keys of its own: none, so open, unless the test makes some.
        let keys_dir = tempfile::tempdir().expect("a keys dir");
        let keys_file = keys_dir.path().join("keys.json");
        let keys_arg = keys_file.display().to_string();
        args.extend(["--keys-file", &keys_arg]);
        args.extend_from_slice(flags);
        let mut config = ApiConfig::try_parse_from(args).expect("valid test flags");
        config.amqp_url = None;
        config.redis_url = None;
        let api = Api::build(&config).await.expect("embedded api starts");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(api.serve(listener, async move {
            let _ = rx.await;
        }));
        EmbeddedApi {
            url,
            keys_file,
            shutdown: Some(tx),
            _keys_dir: keys_dir,
        }
    }
}

impl Drop for EmbeddedApi {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// A response: status code and JSON body (null when the body is not JSON).
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: Value,
    pub headers: reqwest::header::HeaderMap,
}

impl Reply {
    /// The seconds of its `Retry-After`; panics without one.
    pub fn retry_after(&self) -> u64 {
        self.headers["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap()
    }
}

/// Sends a request with a raw body and content type, on a connection of its own.
pub async fn send(method: &str, url: &str, body: Option<(&str, Vec<u8>)>) -> Reply {
    send_with(&reqwest::Client::new(), method, url, body).await
}

/// Sends a request through `client`, which keeps its connections open between requests.
pub async fn send_with(
    client: &reqwest::Client,
    method: &str,
    url: &str,
    body: Option<(&str, Vec<u8>)>,
) -> Reply {
    let mut req = client.request(method.parse().unwrap(), url);
    if let Some((content_type, bytes)) = body {
        req = req.header("content-type", content_type).body(bytes);
    }
    reply(req.send().await.expect("request sent")).await
}

/// The status, headers and JSON body (null when not JSON) of a response.
async fn reply(resp: reqwest::Response) -> Reply {
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let bytes = resp.bytes().await.unwrap_or_default();
    Reply {
        status,
        body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        headers,
    }
}

/// POSTs a JSON value.
pub async fn post_json(url: &str, body: &Value) -> Reply {
    send(
        "POST",
        url,
        Some(("application/json", serde_json::to_vec(body).unwrap())),
    )
    .await
}

/// GETs a path.
pub async fn get(url: &str) -> Reply {
    send("GET", url, None).await
}

/// Runs code synchronously; panics unless the answer is 200.
pub async fn run(base: &str, request: &Value) -> RunResult {
    run_with(&reqwest::Client::new(), base, request).await
}

/// Runs code synchronously through `client`; panics unless the answer is 200.
pub async fn run_with(client: &reqwest::Client, base: &str, request: &Value) -> RunResult {
    let body = serde_json::to_vec(request).unwrap();
    let url = format!("{base}/run");
    let reply = send_with(client, "POST", &url, Some(("application/json", body))).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    serde_json::from_value(reply.body).expect("a run result")
}

/// The request body for a catalogue case.
pub fn request_for(case: &crate::catalogue::Case) -> Value {
    let mut body = json!({ "code": case.code });
    if let Some(stdin) = case.stdin {
        body["stdin"] = json!(stdin);
    }
    if let Some(t) = case.timeout_ms {
        body["timeout_ms"] = json!(t);
    }
    if let Some(m) = case.memory_mb {
        body["memory_mb"] = json!(m);
    }
    body
}

/// Runs each case through `POST /run` and returns the failures.
pub async fn run_cases(base: &str, cases: Vec<crate::catalogue::Case>) -> Vec<String> {
    crate::catalogue::check_each(cases, |case| async move {
        let reply = post_json(&format!("{base}/run"), &request_for(&case)).await;
        if reply.status != 200 {
            return Err(format!("HTTP {} {}", reply.status, reply.body));
        }
        serde_json::from_value(reply.body).map_err(|e| format!("not a run result: {e}"))
    })
    .await
}

/// Polls `GET /jobs/{id}` until the job is done (at most `within`).
pub async fn poll_done(base: &str, id: &str, within: Duration) -> JobView {
    poll_done_as(base, None, id, within).await
}

/// As [`poll_done`], with the API key `key` if given.
pub async fn poll_done_as(base: &str, key: Option<&str>, id: &str, within: Duration) -> JobView {
    let deadline = Instant::now() + within;
    let url = format!("{base}/jobs/{id}");
    loop {
        let reply = match key {
            Some(key) => send_keyed("GET", &url, "x-api-key", key, None).await,
            None => get(&url).await,
        };
        assert_eq!(reply.status, 200, "{reply:?}");
        let view: JobView = serde_json::from_value(reply.body).unwrap();
        if view.result.is_some() {
            return view;
        }
        assert!(
            Instant::now() < deadline,
            "job {id} not done within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Submits code with `POST /jobs`; returns the job id.
pub async fn submit(base: &str, request: &Value) -> String {
    let reply = post_json(&format!("{base}/jobs"), request).await;
    assert_eq!(reply.status, 202, "{reply:?}");
    reply.body["id"].as_str().expect("a job id").to_owned()
}

/// Polls `GET /jobs/{id}` until the job is in `state` (at most `within`).
pub async fn wait_state(base: &str, id: &str, state: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let reply = get(&format!("{base}/jobs/{id}")).await;
        if reply.body["status"] == state {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "job {id} not {state} within {within:?}: {reply:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Through an api whose workers run one job at a time: cancels a queued job and a running one,
/// and checks that both end `cancelled`, that the running one is stopped at once (the next run
/// is answered long before it would have ended), and what a second cancellation, an unknown id
/// and a malformed one get.
pub async fn check_cancellation(base: &str) {
    let long = json!({ "code": "import time; time.sleep(60)", "timeout_ms": 90_000 });
    let running = submit(base, &long).await;
    wait_state(base, &running, "running", Duration::from_secs(20)).await;
    let queued = submit(base, &json!({ "code": "print('never')" })).await;
    for id in [&queued, &running] {
        let reply = send("DELETE", &format!("{base}/jobs/{id}"), None).await;
        assert_eq!(reply.status, 200, "{reply:?}");
        assert_eq!(reply.body["status"], "done", "{reply:?}");
        assert_eq!(reply.body["result"]["status"], "cancelled", "{reply:?}");
    }
    let started = Instant::now();
    let next = run(base, &json!({ "code": "print(7)" })).await;
    assert_eq!(next.stdout, "7\n", "{next:?}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the cancelled run held its slot"
    );
    for id in [&queued, &running] {
        let view = poll_done(base, id, Duration::from_secs(1)).await;
        let result = view.result.unwrap();
        assert_eq!(
            result.status,
            pyrunner_shared::RunStatus::Cancelled,
            "{result:?}"
        );
        assert_eq!(result.stdout, "", "{result:?}");
    }
    let again = send("DELETE", &format!("{base}/jobs/{running}"), None).await;
    assert_eq!(again.status, 409, "{again:?}");
    assert_eq!(again.body["error"]["code"], "job_finished", "{again:?}");
    let unknown = pyrunner_shared::JobId::new();
    for id in [unknown.to_string(), "not-a-job".to_owned()] {
        let reply = send("DELETE", &format!("{base}/jobs/{id}"), None).await;
        assert_eq!(reply.status, 404, "{reply:?}");
        assert_eq!(reply.body["error"]["code"], "job_not_found", "{reply:?}");
    }
}

/// Runs `pyrunner-api keys <args>` with `env` (the admin command), and returns what it printed.
pub fn admin(args: &[&str], env: &[(&str, &str)]) -> Value {
    let out = std::process::Command::new(crate::fleet::binary("pyrunner-api"))
        .arg("keys")
        .args(args)
        .env_remove("REDIS_URL")
        .env_remove("AMQP_URL")
        .envs(env.iter().copied())
        .output()
        .expect("the admin command runs");
    assert!(
        out.status.success(),
        "keys {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("the admin command prints JSON")
}

/// Sends a request with an API key in `header` (`authorization` gets `Bearer <key>`).
pub async fn send_keyed(
    method: &str,
    url: &str,
    header: &str,
    key: &str,
    body: Option<&Value>,
) -> Reply {
    let value = if header == "authorization" {
        format!("Bearer {key}")
    } else {
        key.to_owned()
    };
    let mut req = reqwest::Client::new()
        .request(method.parse().unwrap(), url)
        .header(header, value);
    if let Some(body) = body {
        req = req.json(body);
    }
    reply(req.send().await.expect("request sent")).await
}

/// Through an api whose key store is empty (`admin` runs the admin command on that store): it
/// is open and says so; once a key exists, requests without it get 401, with it go through
/// (both headers), its policy holds, and once revoked it gets 403 at once.
pub async fn check_api_keys(base: &str, admin: impl Fn(&[&str]) -> Value) {
    let info = get(&format!("{base}/")).await;
    assert!(
        info.body["auth"].as_str().unwrap().starts_with("open"),
        "{info:?}"
    );
    let pass = json!({ "code": "print('in')" });
    assert_eq!(post_json(&format!("{base}/run"), &pass).await.status, 200);

    let created = admin(&["create", "--name", "tutor", "--max-timeout-ms", "1500"]);
    let key = created["key"]
        .as_str()
        .expect("the key is shown")
        .to_owned();
    // An open service looks for keys again at most a second later.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(key.starts_with("pyr_"), "{created}");
    let listed = admin(&["list"]);
    assert_eq!(listed[0]["name"], "tutor", "{listed}");
    assert!(
        !listed.to_string().contains(&key),
        "a listing shows no key: {listed}"
    );

    let info = get(&format!("{base}/")).await;
    assert_eq!(info.body["auth"], "api_keys", "{info:?}");
    let run_url = format!("{base}/run");
    let missing = post_json(&run_url, &pass).await;
    assert_eq!(missing.status, 401, "{missing:?}");
    assert_eq!(missing.body["error"]["code"], "unauthorized");
    assert_eq!(missing.headers["www-authenticate"], "Bearer");
    let wrong = send_keyed("POST", &run_url, "x-api-key", "pyr_not-a-key", Some(&pass)).await;
    assert_eq!(wrong.status, 401, "{wrong:?}");
    assert!(wrong.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("unknown"));
    for header in ["authorization", "x-api-key"] {
        let ok = send_keyed("POST", &run_url, header, &key, Some(&pass)).await;
        assert_eq!(ok.status, 200, "{header}: {ok:?}");
        assert_eq!(ok.body["stdout"], "in\n");
    }
    // Probes and the service's description stay open; the jobs do not.
    assert_eq!(get(&format!("{base}/healthz")).await.status, 200);
    let job = get(&format!("{base}/jobs/{}", pyrunner_shared::JobId::new())).await;
    assert_eq!(job.status, 401, "{job:?}");

    // The key's policy: a larger timeout is refused, and a silent request gets the key's.
    let over = json!({ "code": "pass", "timeout_ms": 5000 });
    let refused = send_keyed("POST", &run_url, "x-api-key", &key, Some(&over)).await;
    assert_eq!(refused.status, 422, "{refused:?}");
    assert!(refused.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("API key"));
    let slow = json!({ "code": "import time; time.sleep(5)" });
    let capped = send_keyed("POST", &run_url, "x-api-key", &key, Some(&slow)).await;
    assert_eq!(capped.body["status"], "timeout", "{capped:?}");

    let revoked = admin(&["revoke", "tutor"]);
    assert!(revoked["revoked_at"].is_u64(), "{revoked}");
    let denied = send_keyed("POST", &run_url, "authorization", &key, Some(&pass)).await;
    assert_eq!(denied.status, 403, "{denied:?}");
    assert_eq!(denied.body["error"]["code"], "key_revoked");
}

/// Through one or more replicas of an api whose store `admin` manages: a key limited to a
/// request every 2 s with a burst of 3 gets its burst across all the replicas together, then
/// 429 with Retry-After and RateLimit headers, and again a request once Retry-After has passed.
/// (The four requests must come within 2 s; a slow interval keeps that true on a loaded host.)
pub async fn check_rate_limit(bases: &[&str], admin: impl Fn(&[&str]) -> Value) {
    let created = admin(&[
        "create",
        "--name",
        "metered",
        "--rate-per-sec",
        "0.5",
        "--burst",
        "3",
    ]);
    let key = created["key"].as_str().unwrap().to_owned();
    let path = format!("/jobs/{}", pyrunner_shared::JobId::new());
    let mut replies = Vec::new();
    for n in 0..4 {
        let base = bases[n % bases.len()];
        replies.push(send_keyed("GET", &format!("{base}{path}"), "x-api-key", &key, None).await);
    }
    for (reply, remaining) in replies[..3].iter().zip(["2", "1", "0"]) {
        assert_eq!(
            reply.status, 404,
            "allowed, and the job is unknown: {reply:?}"
        );
        assert_eq!(reply.headers["ratelimit-limit"], "3", "{reply:?}");
        assert_eq!(reply.headers["ratelimit-remaining"], remaining, "{reply:?}");
    }
    let denied = &replies[3];
    assert_eq!(denied.status, 429, "{denied:?}");
    assert_eq!(denied.body["error"]["code"], "rate_limited", "{denied:?}");
    let retry_after = denied.retry_after();
    assert!((1..=2).contains(&retry_after), "{denied:?}");
    assert_eq!(denied.headers["ratelimit-remaining"], "0", "{denied:?}");
    tokio::time::sleep(Duration::from_millis(retry_after * 1000 + 100)).await;
    let again = send_keyed(
        "GET",
        &format!("{}{path}", bases[0]),
        "x-api-key",
        &key,
        None,
    )
    .await;
    assert_eq!(again.status, 404, "allowed again: {again:?}");
}

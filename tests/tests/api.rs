//! The HTTP API in embedded mode, over a real socket: every HTTP error, every run status,
//! submit-and-poll, result expiry, the 504 of a sync run that outlives its wait, and the
//! informational endpoints.

use std::time::Duration;

use pyrunner_tests::catalogue::{hostile, statuses};
use pyrunner_tests::http::{get, poll_done, post_json, run, run_cases, send, EmbeddedApi};
use serde_json::{json, Value};

/// A request that must be refused: method, path, content type and body, then the status, the
/// error code and a word the message must contain (the field it is about).
struct Refusal {
    name: &'static str,
    method: &'static str,
    path: &'static str,
    content_type: &'static str,
    body: Vec<u8>,
    status: u16,
    code: &'static str,
    mentions: &'static str,
}

fn refusal(
    name: &'static str,
    body: impl Into<Vec<u8>>,
    status: u16,
    code: &'static str,
    mentions: &'static str,
) -> Refusal {
    Refusal {
        name,
        method: "POST",
        path: "/run",
        content_type: "application/json",
        body: body.into(),
        status,
        code,
        mentions,
    }
}

fn refusals() -> Vec<Refusal> {
    let big_code = serde_json::to_vec(&json!({ "code": "#".repeat((1 << 20) + 1) })).unwrap();
    let big_stdin =
        serde_json::to_vec(&json!({ "code": "1", "stdin": "x".repeat((1 << 20) + 1) })).unwrap();
    vec![
        refusal("malformed json", "{\"code\": ", 400, "invalid_json", "JSON"),
        refusal("empty body", "", 400, "invalid_json", "empty"),
        refusal(
            "invalid utf-8",
            b"{\"code\": \"\xff\xfe\"}".to_vec(),
            400,
            "invalid_json",
            "JSON",
        ),
        refusal(
            "lone surrogate",
            "{\"code\": \"\\ud800\"}",
            400,
            "invalid_json",
            "JSON",
        ),
        refusal(
            "trailing garbage",
            "{\"code\": \"1\"} {}",
            400,
            "invalid_json",
            "trailing",
        ),
        refusal(
            "not an object",
            "[\"print(1)\"]",
            422,
            "invalid_request",
            "object",
        ),
        refusal(
            "missing code",
            "{\"stdin\": \"x\"}",
            422,
            "invalid_request",
            "code",
        ),
        refusal(
            "code of the wrong type",
            "{\"code\": 5}",
            422,
            "invalid_request",
            "code",
        ),
        refusal(
            "null code",
            "{\"code\": null}",
            422,
            "invalid_request",
            "code",
        ),
        refusal(
            "stdin of the wrong type",
            "{\"code\": \"1\", \"stdin\": [1]}",
            422,
            "invalid_request",
            "stdin",
        ),
        refusal(
            "timeout as a string",
            "{\"code\": \"1\", \"timeout_ms\": \"5\"}",
            422,
            "invalid_request",
            "timeout_ms",
        ),
        refusal(
            "negative timeout",
            "{\"code\": \"1\", \"timeout_ms\": -1}",
            422,
            "invalid_request",
            "timeout_ms",
        ),
        refusal(
            "fractional memory",
            "{\"code\": \"1\", \"memory_mb\": 1.5}",
            422,
            "invalid_request",
            "memory_mb",
        ),
        refusal(
            "unknown field",
            "{\"code\": \"1\", \"timeout\": 5}",
            422,
            "invalid_request",
            "timeout",
        ),
        refusal(
            "zero timeout",
            "{\"code\": \"1\", \"timeout_ms\": 0}",
            422,
            "limit_out_of_range",
            "timeout_ms",
        ),
        refusal(
            "timeout above the maximum",
            "{\"code\": \"1\", \"timeout_ms\": 300001}",
            422,
            "limit_out_of_range",
            "timeout_ms",
        ),
        refusal(
            "memory below the minimum",
            "{\"code\": \"1\", \"memory_mb\": 63}",
            422,
            "limit_out_of_range",
            "memory_mb",
        ),
        refusal(
            "memory above the maximum",
            "{\"code\": \"1\", \"memory_mb\": 2049}",
            422,
            "limit_out_of_range",
            "memory_mb",
        ),
        refusal("code over 1 MiB", big_code, 413, "code_too_large", "code"),
        refusal(
            "stdin over 1 MiB",
            big_stdin,
            413,
            "stdin_too_large",
            "stdin",
        ),
        Refusal {
            content_type: "application/x-www-form-urlencoded",
            ..refusal(
                "form content type",
                "{\"code\": \"1\"}",
                415,
                "unsupported_media_type",
                "application/json",
            )
        },
        Refusal {
            path: "/jobs",
            ..refusal(
                "async submit validates too",
                "{\"code\": \"1\", \"memory_mb\": 1}",
                422,
                "limit_out_of_range",
                "memory_mb",
            )
        },
        Refusal {
            method: "GET",
            path: "/jobs/2f1bbd9e-1ec8-4a0a-9a42-3f3a8e4b8f00",
            ..refusal("unknown job", "", 404, "job_not_found", "2f1bbd9e")
        },
        Refusal {
            method: "GET",
            path: "/jobs/not-a-uuid",
            ..refusal("malformed job id", "", 404, "job_not_found", "not-a-uuid")
        },
        Refusal {
            method: "GET",
            path: "/nope",
            ..refusal("unknown route", "", 404, "not_found", "/nope")
        },
        Refusal {
            method: "GET",
            path: "/run",
            ..refusal("wrong method", "", 405, "method_not_allowed", "method")
        },
        Refusal {
            method: "DELETE",
            path: "/",
            ..refusal("wrong method on /", "", 405, "method_not_allowed", "method")
        },
    ]
}

async fn check_refusals(base: &str) -> Vec<String> {
    let mut failures = Vec::new();
    for r in refusals() {
        let body =
            (!r.body.is_empty() || r.method == "POST").then(|| (r.content_type, r.body.clone()));
        let reply = send(r.method, &format!("{base}{}", r.path), body).await;
        let error = &reply.body["error"];
        let message = error["message"].as_str().unwrap_or_default();
        let ok =
            reply.status == r.status && error["code"] == r.code && message.contains(r.mentions);
        if !ok {
            failures.push(format!("{}: got {} {}", r.name, reply.status, reply.body));
        }
    }
    failures
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_errors() {
    let api = EmbeddedApi::start(&[]).await;
    let failures = check_refusals(&api.url).await;
    assert!(
        failures.is_empty(),
        "refusals that went wrong:\n{}",
        failures.join("\n")
    );
    // The service is still healthy after all of them.
    assert_eq!(get(&format!("{}/healthz", api.url)).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_body_is_refused_before_it_is_read() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let api = EmbeddedApi::start(&[]).await;
    let addr = api.url.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    // Declare 64 MiB, send only the headers and a few bytes: the answer must come anyway.
    let head = format!(
        "POST /run HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{{\"code\": \"",
        64 << 20
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut answer))
        .await
        .expect("answered without the body")
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("body_too_large"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_status_through_post_run() {
    let api = EmbeddedApi::start(&[]).await;
    let failures = run_cases(&api.url, statuses()).await;
    assert!(
        failures.is_empty(),
        "failed cases:\n{}",
        failures.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_code_through_post_run() {
    std::env::set_var("PYRUNNER_TEST_SECRET", "s3cret");
    let api = EmbeddedApi::start(&[]).await;
    let failures = run_cases(&api.url, hostile()).await;
    assert!(
        failures.is_empty(),
        "failed cases:\n{}",
        failures.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_then_poll() {
    let api = EmbeddedApi::start(&[]).await;
    let reply = post_json(
        &format!("{}/jobs", api.url),
        &json!({ "code": "import time; time.sleep(0.5); print(input())", "stdin": "polled" }),
    )
    .await;
    assert_eq!(reply.status, 202, "{reply:?}");
    assert_eq!(reply.body["status"], "queued");
    let id = reply.body["id"].as_str().unwrap().to_owned();
    assert_eq!(reply.headers["location"], format!("/jobs/{id}").as_str());
    let early = get(&format!("{}/jobs/{id}", api.url)).await;
    assert!(
        ["queued", "running"].contains(&early.body["status"].as_str().unwrap()),
        "{early:?}"
    );
    assert!(early.body.get("result").is_none());
    let view = poll_done(&api.url, &id, Duration::from_secs(15)).await;
    let result = view.result.unwrap();
    assert_eq!(result.stdout, "polled\n");
    assert_eq!(result.id.to_string(), id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_expire_after_their_ttl() {
    let api = EmbeddedApi::start(&["--result-ttl-secs", "1"]).await;
    let result = run(&api.url, &json!({ "code": "print(1)" })).await;
    let path = format!("{}/jobs/{}", api.url, result.id);
    assert_eq!(get(&path).await.status, 200);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let gone = get(&path).await;
    assert_eq!(gone.status, 404, "{gone:?}");
    assert_eq!(gone.body["error"]["code"], "job_not_found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_run_that_outlives_its_wait_gets_504_and_can_be_polled() {
    let api = EmbeddedApi::start(&["--concurrency", "1", "--sync-wait-margin-ms", "200"]).await;
    // Occupy the only slot, so the next run waits in the queue past its own wait.
    let busy = post_json(
        &format!("{}/jobs", api.url),
        &json!({ "code": "import time; time.sleep(1.5)" }),
    )
    .await;
    assert_eq!(busy.status, 202);
    // Only once it runs is the slot surely taken (queued tasks race for it).
    let busy_id = busy.body["id"].as_str().unwrap().to_owned();
    let started = std::time::Instant::now();
    while get(&format!("{}/jobs/{busy_id}", api.url)).await.body["status"] != "running" {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the busy job never ran"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let reply = post_json(
        &format!("{}/run", api.url),
        &json!({ "code": "print('late')", "timeout_ms": 100 }),
    )
    .await;
    assert_eq!(reply.status, 504, "{reply:?}");
    assert_eq!(reply.body["error"]["code"], "result_not_ready");
    let id = reply.body["error"]["job_id"]
        .as_str()
        .expect("the 504 names the job")
        .to_owned();
    assert_eq!(reply.headers["location"], format!("/jobs/{id}").as_str());
    let view = poll_done(&api.url, &id, Duration::from_secs(15)).await;
    assert_eq!(view.result.unwrap().stdout, "late\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn info_health_and_readiness() {
    let api = EmbeddedApi::start(&[]).await;
    let info = get(&format!("{}/", api.url)).await;
    assert_eq!(info.status, 200);
    assert_eq!(info.body["mode"], "embedded");
    assert_eq!(info.body["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(info.body["limits"]["default_timeout_ms"], 10_000);
    assert_eq!(info.body["limits"]["max_timeout_ms"], 300_000);
    assert_eq!(info.body["limits"]["default_memory_mb"], 512);
    let packages: Vec<&Value> = info.body["packages"].as_array().unwrap().iter().collect();
    for name in ["numpy", "sympy"] {
        let p = packages.iter().find(|p| p["name"] == name).expect(name);
        assert!(p["version"]
            .as_str()
            .unwrap()
            .chars()
            .next()
            .unwrap()
            .is_ascii_digit());
    }
    assert!(info.body["python"].as_str().unwrap().starts_with("3."));
    assert_eq!(info.body["executor"], "zygote");
    assert_eq!(
        info.body["preloaded"],
        serde_json::json!(["numpy", "numpy.random", "sympy"])
    );
    assert_eq!(get(&format!("{}/healthz", api.url)).await.status, 200);
    let ready = get(&format!("{}/readyz", api.url)).await;
    assert_eq!(ready.status, 200);
    assert_eq!(ready.body["status"], "ready");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolation_reports_every_layer_and_each_result_names_its_own() {
    let api = EmbeddedApi::start(&[]).await;
    let report = get(&format!("{}/isolation", api.url)).await;
    assert_eq!(report.status, 200);
    let layers = report.body["layers"].as_object().unwrap();
    // Every layer the service knows is there, built or not, each with a reason.
    for (name, _) in pyrunner_shared::isolation::LAYERS {
        let layer = &layers[*name];
        assert!(layer["active"].is_boolean(), "{name}: {layer}");
        assert!(!layer["detail"].as_str().unwrap().is_empty(), "{name}");
    }
    // The tests run as root on a kernel with Landlock: every layer is active.
    for name in [
        "user_namespace",
        "seccomp",
        "landlock",
        "network_namespace",
        "uid_per_slot",
        "cgroup_memory",
        "cgroup_pids",
        "not_dumpable",
        "uts_namespace",
        "ipc_namespace",
        "mount_namespace",
        "pid_namespace",
        "cgroup_cpu",
        "rlimits",
        "no_new_privs",
    ] {
        assert_eq!(layers[name]["active"], true, "{name}: {}", layers[name]);
    }
    for (name, layer) in layers {
        assert_eq!(layer["active"], true, "{name}: {layer}");
    }
    let result = run(&api.url, &json!({ "code": "pass" })).await;
    assert_eq!(json!(result.layers), report.body["active"]);
    let info = get(&format!("{}/", api.url)).await;
    assert_eq!(info.body["isolation"], report.body["active"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_and_running_jobs_can_be_cancelled() {
    let api = EmbeddedApi::start(&["--concurrency", "1"]).await;
    pyrunner_tests::http::check_cancellation(&api.url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_past_the_embedded_queue_limit_get_503() {
    let api = EmbeddedApi::start(&["--concurrency", "1", "--max-queue-length", "2"]).await;
    let long = json!({ "code": "import time; time.sleep(30)", "timeout_ms": 60000 });
    let held = [
        pyrunner_tests::http::submit(&api.url, &long).await,
        pyrunner_tests::http::submit(&api.url, &long).await,
    ];
    for path in ["jobs", "run"] {
        let reply = post_json(&format!("{}/{path}", api.url), &json!({ "code": "pass" })).await;
        assert_eq!(reply.status, 503, "{reply:?}");
        assert_eq!(reply.body["error"]["code"], "queue_full", "{reply:?}");
        assert!(reply.headers.contains_key("retry-after"), "{reply:?}");
    }
    for id in &held {
        let reply = send("DELETE", &format!("{}/jobs/{id}", api.url), None).await;
        assert_eq!(reply.status, 200, "{reply:?}");
    }
    // Room again once the held jobs are let go.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let reply = post_json(&format!("{}/run", api.url), &json!({ "code": "print(1)" })).await;
        if reply.status == 200 {
            assert_eq!(reply.body["stdout"], "1\n", "{reply:?}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{reply:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_guard_the_service_once_one_exists() {
    let api = EmbeddedApi::start(&[]).await;
    let file = api.keys_file.display().to_string();
    pyrunner_tests::http::check_api_keys(&api.url, |args| {
        pyrunner_tests::http::admin(args, &[("PYRUNNER_KEYS_FILE", file.as_str())])
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_s_request_rate_is_held() {
    let api = EmbeddedApi::start(&[]).await;
    let file = api.keys_file.display().to_string();
    pyrunner_tests::http::check_rate_limit(&[&api.url], |args| {
        pyrunner_tests::http::admin(args, &[("PYRUNNER_KEYS_FILE", file.as_str())])
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_s_concurrency_quota_and_usage() {
    let period = pyrunner_tests::callers::QUOTA_PERIOD_SECS.to_string();
    let api = EmbeddedApi::start(&["--quota-period-secs", &period]).await;
    let file = api.keys_file.display().to_string();
    pyrunner_tests::callers::check_key_limits(&[&api.url], |args| {
        pyrunner_tests::http::admin(
            args,
            &[
                ("PYRUNNER_KEYS_FILE", file.as_str()),
                ("PYRUNNER_QUOTA_PERIOD_SECS", period.as_str()),
            ],
        )
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_key_does_not_hold_back_another() {
    let api = EmbeddedApi::start(&[]).await;
    let file = api.keys_file.display().to_string();
    let latency = pyrunner_tests::callers::check_fairness(&api.url, |args| {
        pyrunner_tests::http::admin(args, &[("PYRUNNER_KEYS_FILE", file.as_str())])
    })
    .await;
    println!("another key's run behind the flood: {latency:?}");
}

//! The fleet end to end: the real api and worker binaries, the real RabbitMQ and Redis.

use std::time::{Duration, Instant};

use pyrunner_shared::RunStatus;
use pyrunner_tests::catalogue::statuses;
use pyrunner_tests::fleet::Fleet;
use pyrunner_tests::http::{get, poll_done, post_json, run, run_cases};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_status_through_the_fleet() {
    let fleet = Fleet::start(1, &[("PYRUNNER_TEST_SECRET", "s3cret")]).await;
    let failures = run_cases(&fleet.url, statuses()).await;
    assert!(
        failures.is_empty(),
        "failed cases:\n{}",
        failures.join("\n")
    );
    // The worker's own environment (broker and store URLs, secrets) never reaches a run.
    let env = run(
        &fleet.url,
        &json!({ "code": "import os; print(sorted(os.environ))" }),
    )
    .await;
    for leaked in ["PYRUNNER_TEST_SECRET", "AMQP_URL", "REDIS_URL"] {
        assert!(
            !env.stdout.contains(leaked),
            "{leaked} leaked: {}",
            env.stdout
        );
    }
    let net = run(
        &fleet.url,
        &json!({ "code": "import socket; socket.create_connection(('127.0.0.1', 6379))" }),
    )
    .await;
    assert_eq!(net.status, RunStatus::Error);
    assert_eq!(net.exception.unwrap().kind, "PermissionError");
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_then_poll_through_the_fleet() {
    let fleet = Fleet::start(1, &[]).await;
    let reply = post_json(
        &format!("{}/jobs", fleet.url),
        &json!({ "code": "import time; time.sleep(0.5); print('async')" }),
    )
    .await;
    assert_eq!(reply.status, 202, "{reply:?}");
    assert_eq!(reply.body["status"], "queued");
    let id = reply.body["id"].as_str().unwrap().to_owned();
    let view = poll_done(&fleet.url, &id, Duration::from_secs(20)).await;
    let result = view.result.unwrap();
    assert_eq!(result.status, RunStatus::Success);
    assert_eq!(result.stdout, "async\n");
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_expire_in_redis_after_their_ttl() {
    let fleet = Fleet::start(1, &[("PYRUNNER_RESULT_TTL_SECS", "1")]).await;
    let result = run(&fleet.url, &json!({ "code": "print(1)" })).await;
    let path = format!("{}/jobs/{}", fleet.url, result.id);
    assert_eq!(get(&path).await.status, 200);
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let gone = get(&path).await;
    assert_eq!(gone.status, 404, "{gone:?}");
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_share_one_queue() {
    let fleet = Fleet::start(2, &[("PYRUNNER_CONCURRENCY", "1")]).await;
    // Wait until both workers consume, so neither takes every job.
    for _ in 0..100 {
        if (0..2).all(|i| fleet.worker_log(i).contains("consuming jobs")) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let started = Instant::now();
    let jobs: Vec<_> = (0..4)
        .map(|i| {
            let url = fleet.url.clone();
            tokio::spawn(async move {
                run(
                    &url,
                    &json!({ "code": format!("import time; time.sleep(1); print({i})") }),
                )
                .await
            })
        })
        .collect();
    for (i, job) in jobs.into_iter().enumerate() {
        let result = job.await.unwrap();
        assert_eq!(result.stdout, format!("{i}\n"));
    }
    let elapsed = started.elapsed();
    // A worker logs a run once its result is stored, which can be just after the api answered.
    let count = || -> Vec<usize> {
        (0..2)
            .map(|i| fleet.worker_log(i).matches("run finished").count())
            .collect()
    };
    let mut per_worker = count();
    let logged = Instant::now();
    while per_worker.iter().sum::<usize>() < 4 && logged.elapsed() < Duration::from_secs(2) {
        tokio::time::sleep(Duration::from_millis(20)).await;
        per_worker = count();
    }
    assert!(
        per_worker.iter().all(|&n| n >= 1),
        "each worker ran jobs: {per_worker:?}"
    );
    assert_eq!(per_worker.iter().sum::<usize>(), 4, "{per_worker:?}");
    // Four one-second jobs on two single-slot workers take about two seconds, not four.
    assert!(elapsed < Duration::from_millis(3500), "{elapsed:?}");
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_infinite_loop_is_stopped_while_other_runs_go_on() {
    let fleet = Fleet::start(1, &[("PYRUNNER_CONCURRENCY", "2")]).await;
    let url = fleet.url.clone();
    let hog = tokio::spawn(async move {
        run(
            &url,
            &json!({ "code": "while True: pass", "timeout_ms": 2000 }),
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    for _ in 0..3 {
        let r = run(&fleet.url, &json!({ "code": "print(sum(range(10)))" })).await;
        assert_eq!(r.stdout, "45\n");
    }
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
    let hog = hog.await.unwrap();
    assert_eq!(hog.status, RunStatus::Timeout);
    assert!(
        hog.duration_ms >= 2000 && hog.duration_ms < 4000,
        "{}",
        hog.duration_ms
    );
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_workers_and_a_sync_run_without_one_gets_504() {
    let mut fleet = Fleet::start(0, &[("PYRUNNER_SYNC_WAIT_MARGIN_MS", "300")]).await;
    assert_eq!(get(&format!("{}/healthz", fleet.url)).await.status, 200);
    let unready = get(&format!("{}/readyz", fleet.url)).await;
    assert_eq!(unready.status, 503);
    assert!(
        unready.body["reason"].as_str().unwrap().contains("worker"),
        "{unready:?}"
    );

    // Accepted with no worker: the sync wait ends in 504 naming the job, which stays queued.
    let reply = post_json(
        &format!("{}/run", fleet.url),
        &json!({ "code": "print('later')", "timeout_ms": 200 }),
    )
    .await;
    assert_eq!(reply.status, 504, "{reply:?}");
    let id = reply.body["error"]["job_id"].as_str().unwrap().to_owned();
    assert_eq!(
        get(&format!("{}/jobs/{id}", fleet.url)).await.body["status"],
        "queued"
    );

    // A worker arrives: the api becomes ready and the waiting job is answered.
    fleet.add_worker();
    fleet.wait_for("/readyz").await;
    let view = poll_done(&fleet.url, &id, Duration::from_secs(20)).await;
    assert_eq!(view.result.unwrap().stdout, "later\n");

    let info = get(&format!("{}/", fleet.url)).await;
    assert_eq!(info.body["mode"], "fleet");
    assert!(info.body["packages"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["name"] == "sympy"));
    // The workers report how they run code: warm children of a zygote with the preload set.
    assert_eq!(info.body["executor"], "zygote", "{info:?}");
    assert_eq!(info.body["preloaded"][2], "sympy", "{info:?}");
    // And which isolation layers their runs get, which each result names too.
    let report = get(&format!("{}/isolation", fleet.url)).await;
    assert_eq!(report.status, 200, "{report:?}");
    assert_eq!(
        report.body["layers"]["landlock"]["active"], true,
        "{report:?}"
    );
    assert_eq!(
        report.body["layers"]["user_namespace"]["active"], true,
        "{report:?}"
    );
    let result = run(&fleet.url, &json!({ "code": "pass" })).await;
    assert_eq!(json!(result.layers), report.body["active"]);
    fleet.stop().await;
}

/// Waits (at most 30 s) until `/isolation` counts `workers` live workers, and returns it.
async fn isolation_of(fleet: &Fleet, workers: u64) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let report = get(&format!("{}/isolation", fleet.url)).await;
        if report.status == 200 && report.body["workers"] == workers {
            return report.body;
        }
        assert!(
            Instant::now() < deadline,
            "/isolation never counted {workers} workers: {report:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A run may go to any worker, so the fleet's report holds a layer active only where every live
/// worker has it, and says on how many it is off: a worker that joins with fewer layers lowers
/// it at once, and it comes back when that worker stops. Each result still names its own run's
/// layers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_reports_only_the_layers_every_worker_has() {
    let mut fleet = Fleet::start(1, &[("PYRUNNER_CONCURRENCY", "1")]).await;
    let full = isolation_of(&fleet, 1).await;
    assert_eq!(full["layers"]["cgroup_cpu"]["active"], true, "{full}");

    // A worker without a CPU quota per run.
    let fewer = fleet.add_worker_with(&[("PYRUNNER_CPUS_PER_RUN", "0")]);
    let mixed = isolation_of(&fleet, 2).await;
    let cpu = &mixed["layers"]["cgroup_cpu"];
    assert_eq!(cpu["active"], false, "{mixed}");
    let detail = cpu["detail"].as_str().unwrap();
    assert!(
        detail.starts_with("off on 1 of the 2 workers: no quota asked for"),
        "{detail}"
    );
    assert!(
        !mixed["active"]
            .as_array()
            .unwrap()
            .contains(&json!("cgroup_cpu")),
        "{mixed}"
    );
    // The layers both have stay active, as `GET /` says too.
    assert_eq!(mixed["layers"]["seccomp"]["active"], true, "{mixed}");
    let info = get(&format!("{}/", fleet.url)).await;
    assert_eq!(info.body["isolation"], mixed["active"]);
    // It stays so, whichever worker reported last (each reports every 10 s).
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert_eq!(isolation_of(&fleet, 2).await, mixed);

    // A worker that stops takes itself off at once.
    fleet.terminate_worker(fewer, Duration::from_secs(30));
    let back = isolation_of(&fleet, 1).await;
    assert_eq!(back, full);
    fleet.stop().await;
}

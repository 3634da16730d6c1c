//! Faults across the fleet, on the real RabbitMQ and Redis with real worker processes: every
//! accepted job gets exactly one final answer, whatever breaks in between.

use std::time::{Duration, Instant};

use pyrunner_shared::RunStatus;
use pyrunner_tests::fleet::{amqp_url, service_addr, Fleet};
use pyrunner_tests::http::{get, poll_done, post_json, run, submit};
use pyrunner_tests::outage::{PrivateRedis, Proxy};
use serde_json::json;

/// Small workers: one run at a time, two warm children.
const SMALL: [(&str, &str); 2] = [
    ("PYRUNNER_CONCURRENCY", "1"),
    ("PYRUNNER_WARM_CHILDREN", "2"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_run_has_its_job_finished_by_another() {
    let mut fleet = Fleet::start(2, &SMALL).await;
    let url = fleet.url.clone();
    // A client waits on POST /run while the worker running its job is killed.
    let client = tokio::spawn(async move {
        run(
            &url,
            &json!({ "code": "import time; time.sleep(2); print('finished')" }),
        )
        .await
    });
    let lost = fleet
        .worker_running(None, &[], Duration::from_secs(20))
        .await;
    fleet.kill_worker(lost);
    let result = tokio::time::timeout(Duration::from_secs(30), client)
        .await
        .expect("the waiting client got an answer")
        .unwrap();
    assert_eq!(result.status, RunStatus::Success, "{result:?}");
    assert_eq!(result.stdout, "finished\n");
    let other = 1 - lost;
    let log = fleet.worker_log(other);
    assert!(
        log.contains("running a job again") && log.contains(&result.id.to_string()),
        "the other worker did not take the job over:\n{log}"
    );
    assert_eq!(fleet.dead_letters().await, 0);
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_keeps_losing_its_worker_ends_dead_lettered_as_internal_error() {
    let env = [SMALL[0], SMALL[1], ("PYRUNNER_MAX_DELIVERIES", "2")];
    let mut fleet = Fleet::start(1, &env).await;
    let reply = post_json(
        &format!("{}/jobs", fleet.url),
        &json!({ "code": "import time; time.sleep(60)", "timeout_ms": 90000 }),
    )
    .await;
    assert_eq!(reply.status, 202, "{reply:?}");
    let id = reply.body["id"].as_str().unwrap().to_owned();
    // Each worker that starts the job is lost; a new one takes its place.
    let mut lost = Vec::new();
    for _ in 0..2 {
        let worker = fleet
            .worker_running(Some(&id), &lost, Duration::from_secs(30))
            .await;
        fleet.kill_worker(worker);
        lost.push(worker);
        fleet.add_worker();
    }
    let view = poll_done(&fleet.url, &id, Duration::from_secs(30)).await;
    let result = view.result.unwrap();
    assert_eq!(result.status, RunStatus::InternalError, "{result:?}");
    assert!(result.stderr.contains("worker lost"), "{result:?}");
    assert_eq!(fleet.dead_letters().await, 1);
    // The fleet goes on serving.
    let next = run(&fleet.url, &json!({ "code": "print(6 * 7)" })).await;
    assert_eq!(next.status, RunStatus::Success, "{next:?}");
    assert_eq!(next.stdout, "42\n");
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_are_dead_lettered_and_the_worker_goes_on() {
    let fleet = Fleet::start(1, &SMALL).await;
    fleet.publish_raw(b"not json at all", None).await;
    // A message that names a job id but whose body is damaged: that job still gets an answer.
    let id = pyrunner_shared::JobId::new().to_string();
    fleet.publish_raw(b"{\"id\": 12}", Some(&id)).await;
    fleet.publish_raw(&[0xff, 0xfe, 0x00], None).await;
    let view = poll_done(&fleet.url, &id, Duration::from_secs(20)).await;
    let result = view.result.unwrap();
    assert_eq!(result.status, RunStatus::InternalError, "{result:?}");
    assert!(result.stderr.contains("malformed"), "{result:?}");
    let next = run(&fleet.url, &json!({ "code": "print('still serving')" })).await;
    assert_eq!(next.status, RunStatus::Success, "{next:?}");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while fleet.dead_letters().await < 3 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(fleet.dead_letters().await, 3);
    let log = fleet.worker_log(0);
    assert_eq!(
        log.matches("dead-lettering a malformed message").count(),
        3,
        "{log}"
    );
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submissions_past_the_queue_limit_get_503_and_the_queued_jobs_still_run() {
    let env = [SMALL[0], SMALL[1], ("PYRUNNER_MAX_QUEUE_LENGTH", "3")];
    // No worker yet: the jobs wait in the queue.
    let mut fleet = Fleet::start(0, &env).await;
    let jobs = format!("{}/jobs", fleet.url);
    let mut ids = Vec::new();
    for n in 0..3 {
        let reply = post_json(&jobs, &json!({ "code": format!("print({n})") })).await;
        assert_eq!(reply.status, 202, "{reply:?}");
        ids.push(reply.body["id"].as_str().unwrap().to_owned());
    }
    for url in [jobs.clone(), format!("{}/run", fleet.url)] {
        let reply = post_json(&url, &json!({ "code": "print('one too many')" })).await;
        assert_eq!(reply.status, 503, "{reply:?}");
        assert_eq!(reply.body["error"]["code"], "queue_full", "{reply:?}");
        assert!(reply.headers.contains_key("retry-after"), "{reply:?}");
    }
    fleet.add_worker();
    for (n, id) in ids.iter().enumerate() {
        let result = poll_done(&fleet.url, id, Duration::from_secs(30))
            .await
            .result
            .unwrap();
        assert_eq!(result.status, RunStatus::Success, "{result:?}");
        assert_eq!(result.stdout, format!("{n}\n"));
    }
    // With room in the queue again, submissions are accepted.
    let reply = post_json(&jobs, &json!({ "code": "print('room again')" })).await;
    assert_eq!(reply.status, 202, "{reply:?}");
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_runs_past_the_waiting_limit_get_503_at_once() {
    let env = [
        ("PYRUNNER_MAX_SYNC_WAITERS", "2"),
        ("PYRUNNER_SYNC_WAIT_MARGIN_MS", "0"),
    ];
    // No worker: the first two runs wait out their timeout.
    let fleet = Fleet::start(0, &env).await;
    let run_url = format!("{}/run", fleet.url);
    let waiting: Vec<_> = (0..2)
        .map(|_| {
            let url = run_url.clone();
            tokio::spawn(async move {
                post_json(&url, &json!({ "code": "pass", "timeout_ms": 4000 })).await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let started = std::time::Instant::now();
    let reply = post_json(&run_url, &json!({ "code": "pass" })).await;
    assert!(started.elapsed() < Duration::from_secs(1), "it waited");
    assert_eq!(reply.status, 503, "{reply:?}");
    assert_eq!(reply.body["error"]["code"], "too_many_waiting", "{reply:?}");
    assert!(reply.headers.contains_key("retry-after"), "{reply:?}");
    // Submitting without waiting is still accepted.
    let reply = post_json(&format!("{}/jobs", fleet.url), &json!({ "code": "pass" })).await;
    assert_eq!(reply.status, 202, "{reply:?}");
    for waiter in waiting {
        let reply = waiter.await.unwrap();
        assert_eq!(reply.status, 504, "{reply:?}");
        assert!(reply.body["error"]["job_id"].is_string(), "{reply:?}");
    }
    // Their places are free again.
    let reply = post_json(&run_url, &json!({ "code": "pass", "timeout_ms": 100 })).await;
    assert_eq!(reply.status, 504, "{reply:?}");
    fleet.stop().await;
}

/// Checks that the api says it is not ready, and refuses new work with 503 and Retry-After.
async fn refuses_work_while_away(fleet: &Fleet, what: &str) {
    let ready = get(&format!("{}/readyz", fleet.url)).await;
    assert_eq!(ready.status, 503, "{ready:?}");
    assert!(
        ready.body["reason"].as_str().unwrap_or("").contains(what),
        "{ready:?}"
    );
    let started = Instant::now();
    let reply = post_json(&format!("{}/jobs", fleet.url), &json!({ "code": "pass" })).await;
    assert!(started.elapsed() < Duration::from_secs(5), "it hung");
    assert_eq!(reply.status, 503, "{reply:?}");
    assert_eq!(reply.body["error"]["code"], "service_unavailable");
    assert!(reply.headers.contains_key("retry-after"), "{reply:?}");
}

/// An outage made by `away` and ended by `back` `away_for` later, with a run in flight: the
/// api refuses work while it lasts, the waiting client gets the run's answer, and the fleet is
/// ready and serving again afterwards.
async fn ride_out(
    fleet: &Fleet,
    what: &str,
    away: impl FnOnce(),
    back: impl FnOnce(),
    away_for: Duration,
) {
    assert_eq!(
        run(&fleet.url, &json!({ "code": "pass" })).await.status,
        RunStatus::Success
    );
    let url = fleet.url.clone();
    let client = tokio::spawn(async move {
        run(
            &url,
            &json!({ "code": "import time; time.sleep(2); print('through')" }),
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(700)).await;
    away();
    tokio::time::sleep(Duration::from_millis(300)).await;
    refuses_work_while_away(fleet, what).await;
    tokio::time::sleep(away_for.saturating_sub(Duration::from_millis(300))).await;
    back();
    let result = tokio::time::timeout(Duration::from_secs(30), client)
        .await
        .expect("the waiting client got an answer")
        .unwrap();
    assert_eq!(result.status, RunStatus::Success, "{result:?}");
    assert_eq!(result.stdout, "through\n");
    // The api and the worker reconnect by themselves.
    fleet.wait_for("/readyz").await;
    let after = run(&fleet.url, &json!({ "code": "print('after')" })).await;
    assert_eq!(after.stdout, "after\n", "{after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_rides_out_a_broker_outage() {
    let broker = service_addr(&amqp_url(), 5672).parse().unwrap();
    let proxy = Proxy::start(broker).await;
    let through_proxy = format!("amqp://guest:guest@127.0.0.1:{}/%2f", proxy.port);
    let env = [SMALL[0], SMALL[1], ("AMQP_URL", through_proxy.as_str())];
    let fleet = Fleet::start(1, &env).await;
    // The run in flight goes on; its message comes back to the worker once it reconnects.
    ride_out(
        &fleet,
        "broker",
        || proxy.cut(),
        || proxy.restore(),
        Duration::from_millis(1800),
    )
    .await;
    assert!(fleet.worker_log(0).contains("reconnecting"));
    assert!(fleet.api_log().contains("reconnected to the broker"));
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_rides_out_a_redis_restart() {
    let redis = std::cell::RefCell::new(PrivateRedis::start());
    let redis_url = redis.borrow().url();
    let env = [SMALL[0], SMALL[1], ("REDIS_URL", redis_url.as_str())];
    let fleet = Fleet::start(1, &env).await;
    // The worker keeps the run's result until Redis is back.
    ride_out(
        &fleet,
        "store",
        || redis.borrow_mut().stop(),
        || redis.borrow_mut().restart(),
        Duration::from_millis(2500),
    )
    .await;
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_and_running_jobs_can_be_cancelled_across_the_fleet() {
    let fleet = Fleet::start(1, &SMALL).await;
    pyrunner_tests::http::check_cancellation(&fleet.url).await;
    assert!(fleet.worker_log(0).contains("stopping a cancelled job"));
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_worker_finishes_its_run_or_requeues_it_at_its_deadline() {
    let env = [SMALL[0], SMALL[1], ("PYRUNNER_SHUTDOWN_GRACE_SECS", "2")];
    let mut fleet = Fleet::start(1, &env).await;
    // A run shorter than the grace period is finished and answered by the stopping worker.
    let short = submit(
        &fleet.url,
        &json!({ "code": "import time; time.sleep(1); print('short')" }),
    )
    .await;
    fleet
        .worker_running(Some(&short), &[], Duration::from_secs(20))
        .await;
    fleet.terminate_worker(0, Duration::from_secs(10));
    let result = poll_done(&fleet.url, &short, Duration::from_secs(5))
        .await
        .result
        .unwrap();
    assert_eq!(result.stdout, "short\n", "{result:?}");
    // A run longer than it is stopped at the deadline and requeued; another worker finishes it.
    fleet.add_worker();
    let long = submit(
        &fleet.url,
        &json!({ "code": "import time; time.sleep(4); print('long')" }),
    )
    .await;
    fleet
        .worker_running(Some(&long), &[0], Duration::from_secs(20))
        .await;
    let stopping = Instant::now();
    fleet.terminate_worker(1, Duration::from_secs(10));
    assert!(
        stopping.elapsed() < Duration::from_secs(4),
        "it waited for the run"
    );
    assert!(fleet
        .worker_log(1)
        .contains("requeueing a job stopped at shutdown"));
    fleet.add_worker();
    let result = poll_done(&fleet.url, &long, Duration::from_secs(30))
        .await
        .result
        .unwrap();
    assert_eq!(result.status, RunStatus::Success, "{result:?}");
    assert_eq!(result.stdout, "long\n", "{result:?}");
    assert!(fleet.worker_log(2).contains(&long));
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_in_redis_guard_the_fleet() {
    // A Redis of the test's own: keys in the shared one would close the service to every other
    // test.
    let redis = PrivateRedis::start();
    let url = redis.url();
    let fleet = Fleet::start(1, &[SMALL[0], SMALL[1], ("REDIS_URL", url.as_str())]).await;
    pyrunner_tests::http::check_api_keys(&fleet.url, |args| {
        pyrunner_tests::http::admin(args, &[("REDIS_URL", url.as_str())])
    })
    .await;
    // Each run's log line names the key that submitted it.
    let log = fleet.worker_log(0);
    assert!(
        log.lines()
            .any(|l| l.contains("run finished") && l.contains("key=tutor")),
        "{log}"
    );
    assert!(log
        .lines()
        .any(|l| l.contains("run finished") && l.contains("key=-")));
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_s_request_rate_is_shared_by_two_api_replicas() {
    let redis = PrivateRedis::start();
    let url = redis.url();
    let mut fleet = Fleet::start(1, &[SMALL[0], SMALL[1], ("REDIS_URL", url.as_str())]).await;
    let second = fleet.add_api().await;
    pyrunner_tests::http::check_rate_limit(&[&fleet.url, &second], |args| {
        pyrunner_tests::http::admin(args, &[("REDIS_URL", url.as_str())])
    })
    .await;
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_s_limits_and_usage_hold_across_two_api_replicas() {
    let redis = PrivateRedis::start();
    let url = redis.url();
    let period = pyrunner_tests::callers::QUOTA_PERIOD_SECS.to_string();
    let env = [
        SMALL[0],
        SMALL[1],
        ("REDIS_URL", url.as_str()),
        ("PYRUNNER_QUOTA_PERIOD_SECS", period.as_str()),
    ];
    let mut fleet = Fleet::start(1, &env).await;
    let second = fleet.add_api().await;
    pyrunner_tests::callers::check_key_limits(&[&fleet.url, &second], |args| {
        pyrunner_tests::http::admin(
            args,
            &[
                ("REDIS_URL", url.as_str()),
                ("PYRUNNER_QUOTA_PERIOD_SECS", period.as_str()),
            ],
        )
    })
    .await;
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_key_does_not_hold_back_another_in_the_fleet() {
    let redis = PrivateRedis::start();
    let url = redis.url();
    let env = [("PYRUNNER_CONCURRENCY", "2"), ("REDIS_URL", url.as_str())];
    let fleet = Fleet::start(1, &env).await;
    let latency = pyrunner_tests::callers::check_fairness(&fleet.url, |args| {
        pyrunner_tests::http::admin(args, &[("REDIS_URL", url.as_str())])
    })
    .await;
    println!("another key's run behind the flood: {latency:?}");
    fleet.stop().await;
}

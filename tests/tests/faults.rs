//! Faults across the fleet, on the real RabbitMQ and Redis with real worker processes: every
//! accepted job gets exactly one final answer, whatever breaks in between.

use std::time::Duration;

use pyrunner_shared::RunStatus;
use pyrunner_tests::fleet::Fleet;
use pyrunner_tests::http::{poll_done, post_json, run};
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

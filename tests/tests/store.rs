//! The Redis result store on a real Redis: the first result written for a job is the one every
//! waiter and every reader gets, whether it comes with the wake-up (small) or is read after it
//! (large), and a waiter that starts after the result still gets it at once; a job's owner lasts
//! as long as its result.

use std::time::{Duration, Instant};

use pyrunner_shared::store::{RedisStore, ResultStore};
use pyrunner_shared::{JobId, RunResult};

fn store() -> ResultStore {
    ResultStore::Redis(
        RedisStore::new(
            &pyrunner_tests::fleet::redis_url(),
            Duration::from_secs(60),
            4,
        )
        .unwrap(),
    )
}

fn result(id: JobId, stdout: String) -> RunResult {
    RunResult {
        stdout,
        ..RunResult::internal_error(id, "placeholder")
    }
}

#[tokio::test]
async fn the_first_result_is_the_one_every_waiter_gets() {
    let store = store();
    // Small results come with the wake-up; large ones are read after it.
    for size in [10, 200 * 1024] {
        let id = JobId::new();
        let first = result(id, "a".repeat(size));
        let second = result(id, "b".repeat(size));
        let waiter = {
            let store = store.clone();
            tokio::spawn(async move { store.wait_result(id, Duration::from_secs(5)).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            store.put_result(&first).await.unwrap(),
            "the first write stores"
        );
        assert!(
            !store.put_result(&second).await.unwrap(),
            "a second write is refused"
        );
        let woken = waiter.await.unwrap().unwrap().expect("the waiter is woken");
        assert_eq!(woken.stdout, first.stdout, "size {size}");
        // Waiters that come after both writes get the first one at once, every one of them.
        for _ in 0..3 {
            let started = Instant::now();
            let late = store
                .wait_result(id, Duration::from_secs(5))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(late.stdout, first.stdout, "size {size}");
            assert!(started.elapsed() < Duration::from_secs(1));
        }
        let view = store.view(id).await.unwrap().unwrap();
        assert_eq!(view.result.unwrap().stdout, first.stdout);
    }
}

#[tokio::test]
async fn a_wait_without_a_result_times_out_empty() {
    let store = store();
    let started = Instant::now();
    let none = store
        .wait_result(JobId::new(), Duration::from_millis(300))
        .await
        .unwrap();
    assert!(none.is_none());
    assert!(started.elapsed() >= Duration::from_millis(250));
}

#[tokio::test]
async fn a_job_s_owner_lives_as_long_as_its_result() {
    let short = |ttl| {
        ResultStore::Redis(RedisStore::new(&pyrunner_tests::fleet::redis_url(), ttl, 1).unwrap())
    };
    let (owned, open) = (JobId::new(), JobId::new());
    let queued = short(Duration::from_secs(2));
    queued.mark_queued(owned, Some("tutor")).await.unwrap();
    queued.mark_queued(open, None).await.unwrap();
    assert_eq!(queued.owner(owned).await.unwrap().as_deref(), Some("tutor"));
    assert_eq!(queued.owner(open).await.unwrap(), None);
    // A result stored later, with a longer TTL, keeps its owner as long as itself.
    let finished = short(Duration::from_secs(60));
    tokio::time::sleep(Duration::from_millis(1200)).await;
    finished
        .put_result(&result(owned, "done".into()))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(finished.view(owned).await.unwrap().is_some());
    assert_eq!(
        finished.owner(owned).await.unwrap().as_deref(),
        Some("tutor")
    );
}

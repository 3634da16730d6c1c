//! The Redis result store on a real Redis: the first result written for a job is the one every
//! waiter and every reader gets, whether it comes with the wake-up (small) or is read after it
//! (large), and a waiter that starts after the result still gets it at once.

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

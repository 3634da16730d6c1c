//! The result store: job state (queued, running, done) and results, each kept for a TTL.
//!
//! Two implementations behind one type: [`RedisStore`] for the fleet, where the api and the
//! workers are separate processes, and [`MemoryStore`] for embedded mode. Both follow the same
//! rules:
//! - a result is written once per job id; the first writer wins and later writes are ignored;
//! - state and result expire together, `ttl` after the last write;
//! - a waiter blocks on a notification, never polls.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deadpool_redis::{Config as PoolConfig, Pool, PoolConfig as PoolSize, Runtime};
use redis::AsyncCommands;
use thiserror::Error;
use tokio::sync::Notify;

use crate::job::{JobId, JobState, JobView};
use crate::outcome::RunResult;

/// A failure to reach or use the store.
#[derive(Debug, Error)]
pub enum StoreError {
    #[error("cannot create the redis pool for {url}: {source}")]
    CreatePool {
        url: String,
        source: deadpool_redis::CreatePoolError,
    },
    #[error("cannot get a redis connection: {0}")]
    Connection(#[from] deadpool_redis::PoolError),
    #[error("redis command failed: {0}")]
    Command(#[from] redis::RedisError),
    #[error("stored result of job {id} is not valid json: {source}")]
    DecodeResult {
        id: JobId,
        source: serde_json::Error,
    },
}

/// Where job state and results live.
#[derive(Clone)]
pub enum ResultStore {
    Redis(RedisStore),
    Memory(MemoryStore),
}

impl ResultStore {
    /// Records that a job was accepted and is waiting in the queue, and the name of the API key
    /// that owns it (none when the service runs open).
    pub async fn mark_queued(&self, id: JobId, owner: Option<&str>) -> Result<(), StoreError> {
        match self {
            // Only if the job has no state yet: a worker that got the job first has already
            // said it is running (the api records and publishes at the same time).
            ResultStore::Redis(s) => s.mark_queued(id, owner).await,
            ResultStore::Memory(s) => {
                s.set_state(id, JobState::Queued);
                if let Some(owner) = owner {
                    s.with_entry(id, true, |e| e.owner = Some(owner.to_owned()));
                }
                Ok(())
            }
        }
    }

    /// The name of the API key that owns the job, if it has one and is known.
    pub async fn owner(&self, id: JobId) -> Result<Option<String>, StoreError> {
        match self {
            ResultStore::Redis(s) => s.owner(id).await,
            ResultStore::Memory(s) => Ok(s.with_entry(id, false, |e| e.owner.clone()).flatten()),
        }
    }

    /// Records that a worker has started the job. Returns true when the job already has a
    /// result (it was cancelled while it waited in the queue), in which case it need not run.
    pub async fn mark_running(&self, id: JobId) -> Result<bool, StoreError> {
        match self {
            ResultStore::Redis(s) => s.mark_running(id).await,
            ResultStore::Memory(s) => {
                s.set_state(id, JobState::Running);
                Ok(false)
            }
        }
    }

    /// Stores a job's final result and wakes its waiters. Returns false when a result was
    /// already stored for this id, in which case the stored one is kept.
    pub async fn put_result(&self, result: &RunResult) -> Result<bool, StoreError> {
        match self {
            ResultStore::Redis(s) => s.put_result(result).await,
            ResultStore::Memory(s) => Ok(s.put_result(result)),
        }
    }

    /// The job's state and result, or none when the id is unknown or expired.
    pub async fn view(&self, id: JobId) -> Result<Option<JobView>, StoreError> {
        match self {
            ResultStore::Redis(s) => s.view(id).await,
            ResultStore::Memory(s) => Ok(s.view(id)),
        }
    }

    /// Waits up to `timeout` for the job's result.
    pub async fn wait_result(
        &self,
        id: JobId,
        timeout: Duration,
    ) -> Result<Option<RunResult>, StoreError> {
        match self {
            ResultStore::Redis(s) => s.wait_result(id, timeout).await,
            ResultStore::Memory(s) => Ok(s.wait_result(id, timeout).await),
        }
    }

    /// Checks that the store answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        match self {
            ResultStore::Redis(s) => s.ping().await,
            ResultStore::Memory(_) => Ok(()),
        }
    }
}

/// What wakes the waiters of a job whose result is larger than [`INLINE_RESULT_MAX_BYTES`]
/// (they then read the result key).
const DONE_MARKER: &str = "1";
/// Results up to this size come to the waiters with the wake-up itself, saving a round trip;
/// larger ones are not stored twice.
const INLINE_RESULT_MAX_BYTES: usize = 64 * 1024;

/// Stores a result if none is stored yet (first writer wins), marks the job done, and wakes its
/// waiters with the stored result (or a marker when it is large): a redelivered job's waiter
/// always gets the first result; the job's owner, if any, lives as long as its result. Returns 1
/// if this call stored the result.
const PUT_RESULT: &str = r#"
local stored = redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2])
redis.call('SET', KEYS[2], 'done', 'EX', ARGV[2])
local result = redis.call('GET', KEYS[1])
if not result or string.len(result) > tonumber(ARGV[3]) then
  result = '1'
end
redis.call('RPUSH', KEYS[3], result)
redis.call('EXPIRE', KEYS[3], ARGV[2])
redis.call('EXPIRE', KEYS[4], ARGV[2])
if stored then return 1 else return 0 end
"#;

/// Key names in Redis. Every key of a job shares the `{id}` hash tag, so a Redis Cluster keeps
/// them in one slot and the multi-key transaction below stays valid.
mod keys {
    use crate::job::JobId;

    pub fn state(id: JobId) -> String {
        format!("pyrunner:job:{{{id}}}:state")
    }
    pub fn result(id: JobId) -> String {
        format!("pyrunner:job:{{{id}}}:result")
    }
    pub fn done(id: JobId) -> String {
        format!("pyrunner:job:{{{id}}}:done")
    }
    pub fn owner(id: JobId) -> String {
        format!("pyrunner:job:{{{id}}}:owner")
    }
    /// The channel on which the api tells the workers which job to stop.
    pub const CANCEL: &str = "pyrunner:cancel";
}

/// Job state and results in Redis.
#[derive(Clone)]
pub struct RedisStore {
    /// Short commands.
    pool: Pool,
    /// Blocking waits, which hold their connection until the result comes or the wait ends.
    wait_pool: Pool,
    ttl_secs: u64,
    url: String,
}

/// A pool of at most `size` connections to the Redis at `url`; none is made until the first
/// command.
pub fn redis_pool(url: &str, size: usize) -> Result<Pool, StoreError> {
    let mut config = PoolConfig::from_url(url);
    config.pool = Some(PoolSize::new(size));
    config
        .create_pool(Some(Runtime::Tokio1))
        .map_err(|source| StoreError::CreatePool {
            url: url.to_owned(),
            source,
        })
}

impl RedisStore {
    /// Creates the pools; no connection is made until the first command.
    pub fn new(url: &str, ttl: Duration, max_waiters: usize) -> Result<Self, StoreError> {
        Ok(Self {
            pool: redis_pool(url, 64)?,
            wait_pool: redis_pool(url, max_waiters.max(1))?,
            ttl_secs: ttl.as_secs().max(1),
            url: url.to_owned(),
        })
    }

    async fn mark_queued(&self, id: JobId, owner: Option<&str>) -> Result<(), StoreError> {
        let mut conn = self.pool.get().await?;
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(keys::state(id))
            .arg(JobState::Queued.as_str())
            .arg("NX")
            .arg("EX")
            .arg(self.ttl_secs)
            .ignore();
        if let Some(owner) = owner {
            pipe.set_ex(keys::owner(id), owner, self.ttl_secs).ignore();
        }
        pipe.query_async::<()>(&mut *conn).await?;
        Ok(())
    }

    async fn owner(&self, id: JobId) -> Result<Option<String>, StoreError> {
        let mut conn = self.pool.get().await?;
        Ok(conn.get(keys::owner(id)).await?)
    }

    async fn mark_running(&self, id: JobId) -> Result<bool, StoreError> {
        let mut conn = self.pool.get().await?;
        let ((), done): ((), bool) = redis::pipe()
            .set_ex(keys::state(id), JobState::Running.as_str(), self.ttl_secs)
            .exists(keys::result(id))
            .query_async(&mut *conn)
            .await?;
        Ok(done)
    }

    /// Tells every worker subscribed with [`RedisStore::cancellations`] to stop job `id`.
    pub async fn publish_cancel(&self, id: JobId) -> Result<(), StoreError> {
        let mut conn = self.pool.get().await?;
        let _: i64 = conn.publish(keys::CANCEL, id.to_string()).await?;
        Ok(())
    }

    /// Subscribes to the cancellations; each message is the id of a job to stop.
    pub async fn cancellations(
        &self,
    ) -> Result<impl futures_util::Stream<Item = JobId> + use<>, StoreError> {
        let client = redis::Client::open(self.url.as_str())?;
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.subscribe(keys::CANCEL).await?;
        Ok(futures_util::StreamExt::filter_map(
            pubsub.into_on_message(),
            |message| async move {
                message
                    .get_payload::<String>()
                    .ok()
                    .and_then(|id| id.parse().ok())
            },
        ))
    }

    async fn put_result(&self, result: &RunResult) -> Result<bool, StoreError> {
        let id = result.id;
        let json = serde_json::to_string(result).expect("a result always serialises");
        let mut conn = self.pool.get().await?;
        let stored: i64 = redis::Script::new(PUT_RESULT)
            .key(keys::result(id))
            .key(keys::state(id))
            .key(keys::done(id))
            .key(keys::owner(id))
            .arg(json)
            .arg(self.ttl_secs)
            .arg(INLINE_RESULT_MAX_BYTES)
            .invoke_async(&mut *conn)
            .await?;
        Ok(stored == 1)
    }

    async fn view(&self, id: JobId) -> Result<Option<JobView>, StoreError> {
        let mut conn = self.pool.get().await?;
        let (state, result): (Option<String>, Option<String>) = redis::pipe()
            .get(keys::state(id))
            .get(keys::result(id))
            .query_async(&mut *conn)
            .await?;
        if let Some(json) = result {
            let result = decode(id, &json)?;
            return Ok(Some(JobView {
                id,
                status: JobState::Done,
                result: Some(result),
            }));
        }
        Ok(state
            .and_then(|s| JobState::parse(&s))
            .map(|status| JobView {
                id,
                status,
                result: None,
            }))
    }

    async fn wait_result(
        &self,
        id: JobId,
        timeout: Duration,
    ) -> Result<Option<RunResult>, StoreError> {
        let mut conn = self.wait_pool.get().await?;
        // The multiplexed connection gives up on a reply after a default of 500 ms; a blocking
        // wait needs the whole timeout plus the round trip.
        conn.set_response_timeout(timeout + Duration::from_secs(2));
        let done = keys::done(id);
        // BLMOVE from the list onto itself: the marker stays for any other waiter, and a result
        // stored before the wait began is seen at once.
        let moved: Option<String> = redis::cmd("BLMOVE")
            .arg(&done)
            .arg(&done)
            .arg("LEFT")
            .arg("RIGHT")
            .arg(timeout.as_secs_f64().max(0.01))
            .query_async(&mut *conn)
            .await?;
        drop(conn);
        match moved.as_deref() {
            None => Ok(None),
            // A marker: the result was too large to come with it, so it is read on its own.
            Some(DONE_MARKER) => {
                let mut conn = self.pool.get().await?;
                let json: Option<String> = conn.get(keys::result(id)).await?;
                json.map(|j| decode(id, &j)).transpose()
            }
            Some(json) => decode(id, json).map(Some),
        }
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.pool.get().await?;
        let _: String = redis::cmd("PING").query_async(&mut *conn).await?;
        Ok(())
    }
}

fn decode(id: JobId, json: &str) -> Result<RunResult, StoreError> {
    serde_json::from_str(json).map_err(|source| StoreError::DecodeResult { id, source })
}

/// Job state and results in this process's memory, for embedded mode.
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Mutex<MemoryInner>>,
    ttl: Duration,
}

struct MemoryInner {
    entries: HashMap<JobId, Entry>,
    last_sweep: Instant,
}

struct Entry {
    state: JobState,
    /// The API key that owns the job.
    owner: Option<String>,
    result: Option<RunResult>,
    expires_at: Instant,
    done: Arc<Notify>,
}

impl MemoryStore {
    /// An empty store whose entries live for `ttl` after their last write.
    pub fn new(ttl: Duration) -> Self {
        Self {
            inner: Arc::new(Mutex::new(MemoryInner {
                entries: HashMap::new(),
                last_sweep: Instant::now(),
            })),
            ttl,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryInner> {
        // A panic while holding the lock leaves the map consistent (every write is one insert),
        // so a poisoned lock is still safe to use.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The live entry for `id`, creating it when `create` is set.
    fn with_entry<R>(&self, id: JobId, create: bool, f: impl FnOnce(&mut Entry) -> R) -> Option<R> {
        let now = Instant::now();
        let mut inner = self.lock();
        if now.duration_since(inner.last_sweep) > Duration::from_secs(1) {
            inner.entries.retain(|_, e| e.expires_at > now);
            inner.last_sweep = now;
        }
        if inner.entries.get(&id).is_some_and(|e| e.expires_at <= now) {
            inner.entries.remove(&id);
        }
        let entry = if create {
            inner.entries.entry(id).or_insert_with(|| Entry {
                state: JobState::Queued,
                owner: None,
                result: None,
                expires_at: now,
                done: Arc::new(Notify::new()),
            })
        } else {
            inner.entries.get_mut(&id)?
        };
        Some(f(entry))
    }

    fn set_state(&self, id: JobId, state: JobState) {
        let ttl = self.ttl;
        self.with_entry(id, true, |e| {
            if e.result.is_none() {
                e.state = state;
            }
            e.expires_at = Instant::now() + ttl;
        });
    }

    fn put_result(&self, result: &RunResult) -> bool {
        let ttl = self.ttl;
        self.with_entry(result.id, true, |e| {
            if e.result.is_some() {
                return false;
            }
            e.state = JobState::Done;
            e.result = Some(result.clone());
            e.expires_at = Instant::now() + ttl;
            e.done.notify_waiters();
            true
        })
        .unwrap_or(false)
    }

    fn view(&self, id: JobId) -> Option<JobView> {
        self.with_entry(id, false, |e| JobView {
            id,
            status: e.state,
            result: e.result.clone(),
        })
    }

    async fn wait_result(&self, id: JobId, timeout: Duration) -> Option<RunResult> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let (result, done) =
                self.with_entry(id, false, |e| (e.result.clone(), e.done.clone()))?;
            if result.is_some() {
                return result;
            }
            let notified = done.notified();
            tokio::pin!(notified);
            // Register before re-checking, so a result stored in between is not missed.
            notified.as_mut().enable();
            if let Some(result) = self.with_entry(id, false, |e| e.result.clone())? {
                return Some(result);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::RunStatus;

    fn result(id: JobId, stdout: &str) -> RunResult {
        let mut r = RunResult::internal_error(id, "");
        r.status = RunStatus::Success;
        r.stdout = stdout.into();
        r
    }

    #[tokio::test]
    async fn memory_store_tracks_state_and_keeps_the_first_result() {
        let store = MemoryStore::new(Duration::from_secs(60));
        let id = JobId::new();
        assert!(store.view(id).is_none());
        store.set_state(id, JobState::Queued);
        assert_eq!(store.view(id).unwrap().status, JobState::Queued);
        store.set_state(id, JobState::Running);
        assert_eq!(store.view(id).unwrap().status, JobState::Running);
        assert!(store.put_result(&result(id, "first")));
        assert!(!store.put_result(&result(id, "second")));
        let view = store.view(id).unwrap();
        assert_eq!(view.status, JobState::Done);
        assert_eq!(view.result.unwrap().stdout, "first");
        // A late state change from a redelivery does not hide the result.
        store.set_state(id, JobState::Running);
        assert_eq!(store.view(id).unwrap().status, JobState::Done);
    }

    #[tokio::test]
    async fn memory_store_wakes_a_waiter_and_times_out_otherwise() {
        let store = MemoryStore::new(Duration::from_secs(60));
        let id = JobId::new();
        store.set_state(id, JobState::Queued);
        let waiter = {
            let store = store.clone();
            tokio::spawn(async move { store.wait_result(id, Duration::from_secs(5)).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        store.put_result(&result(id, "ok"));
        assert_eq!(waiter.await.unwrap().unwrap().stdout, "ok");

        let other = JobId::new();
        store.set_state(other, JobState::Queued);
        let started = Instant::now();
        assert!(store
            .wait_result(other, Duration::from_millis(50))
            .await
            .is_none());
        assert!(started.elapsed() >= Duration::from_millis(50));
    }

    #[tokio::test]
    async fn memory_store_entries_expire() {
        let store = MemoryStore::new(Duration::from_millis(30));
        let id = JobId::new();
        store.put_result(&result(id, "x"));
        assert!(store.view(id).is_some());
        tokio::time::sleep(Duration::from_millis(40)).await;
        assert!(store.view(id).is_none());
    }
}

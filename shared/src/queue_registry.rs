//! Which callers have a job queue of their own, kept in Redis so that every worker finds and
//! consumes each of them. A keyed job goes to its key's queue (see
//! [`QueueSettings::queue_of`](crate::queue::QueueSettings::queue_of)); the api registers the
//! key in the set `pyrunner:callers:<queue>` before publishing to its queue, and announces a new
//! one on the channel of the same name. Workers read the set when they connect and every few
//! seconds after, and open a consumer on an announced queue at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use deadpool_redis::Pool;
use redis::AsyncCommands;

use crate::store::StoreError;

/// How long the api trusts that a caller is registered before it registers it again (the set
/// may have been lost with a Redis restart).
const REGISTERED_FOR: Duration = Duration::from_secs(60);

/// The callers' queues of the job queue `base`.
#[derive(Clone)]
pub struct QueueRegistry {
    pool: Pool,
    url: String,
    /// The set, and the channel of announcements.
    key: String,
    /// When each caller was last registered by this process.
    registered: Arc<Mutex<HashMap<String, Instant>>>,
}

impl QueueRegistry {
    /// The registry of the job queue `base`, in the Redis at `url`, reached through `pool`
    /// (announcements take a connection of their own).
    pub fn new(pool: Pool, url: &str, base: &str) -> Self {
        Self {
            pool,
            url: url.to_owned(),
            key: format!("pyrunner:callers:{base}"),
            registered: Arc::default(),
        }
    }

    /// Makes sure the workers consume `caller`'s queue: registers it, unless this process did
    /// lately, and announces it when it is new.
    pub async fn register(&self, caller: &str) -> Result<(), StoreError> {
        let fresh = |at: &Instant| at.elapsed() < REGISTERED_FOR;
        let known = self
            .registered
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(caller)
            .is_some_and(fresh);
        if known {
            return Ok(());
        }
        let mut conn = self.pool.get().await?;
        let added: i64 = conn.sadd(&self.key, caller).await?;
        if added == 1 {
            let _: i64 = conn.publish(&self.key, caller).await?;
        }
        self.registered
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(caller.to_owned(), Instant::now());
        Ok(())
    }

    /// Every registered caller.
    pub async fn callers(&self) -> Result<Vec<String>, StoreError> {
        let mut conn = self.pool.get().await?;
        Ok(conn.smembers(&self.key).await?)
    }

    /// The callers announced from now on.
    pub async fn announcements(
        &self,
    ) -> Result<impl futures_util::Stream<Item = String> + use<>, StoreError> {
        let client = redis::Client::open(self.url.as_str())?;
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.subscribe(&self.key).await?;
        Ok(futures_util::StreamExt::filter_map(
            pubsub.into_on_message(),
            |message| async move { message.get_payload::<String>().ok() },
        ))
    }
}

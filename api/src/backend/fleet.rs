//! Fleet mode: jobs go to RabbitMQ, results come back through Redis.

use pyrunner_shared::queue::{Publisher, QueueError};
use pyrunner_shared::queue_registry::QueueRegistry;
use pyrunner_shared::runtime::RuntimeInfo;
use pyrunner_shared::store::{RedisStore, ResultStore};
use pyrunner_shared::Job;

use super::SubmitError;

/// The fleet backend.
#[derive(Clone)]
pub struct FleetBackend {
    publisher: Publisher,
    redis: RedisStore,
    store: ResultStore,
    registry: QueueRegistry,
}

impl FleetBackend {
    /// Publishes with `publisher` (keyed jobs to their key's queue, which `registry` makes
    /// known to the workers) and reads results from `redis`.
    pub fn new(publisher: Publisher, redis: RedisStore, registry: QueueRegistry) -> Self {
        Self {
            publisher,
            store: ResultStore::Redis(redis.clone()),
            redis,
            registry,
        }
    }

    /// Makes sure the queue of the API key `caller` exists and the workers consume it. The
    /// queue is declared before the workers hear of it: RabbitMQ 3.10 may fail a consumer of a
    /// quorum queue still being declared on another connection (and close that connection).
    pub(super) async fn prepare_caller(&self, caller: &str) -> Result<(), SubmitError> {
        self.publisher.declare_caller(caller).await?;
        self.registry.register(caller).await?;
        Ok(())
    }

    pub(super) fn store(&self) -> &ResultStore {
        &self.store
    }

    pub(super) async fn publish(&self, job: &Job) -> Result<(), QueueError> {
        self.publisher.publish(job).await
    }

    /// Tells the workers to stop job `id`.
    pub(super) async fn stop(&self, id: pyrunner_shared::JobId) {
        if let Err(error) = self.redis.publish_cancel(id).await {
            // Its cancelled result is stored: at worst the run goes on to its end unseen.
            tracing::warn!(job = %id, %error, "cannot tell the workers to stop a cancelled job");
        }
    }

    pub(super) async fn readiness(&self) -> Result<(), String> {
        match self.publisher.consumer_count().await {
            Ok(0) => Err("no worker is consuming the job queue".into()),
            Ok(_) => Ok(()),
            Err(e) => Err(format!("broker unreachable: {e}")),
        }
    }

    pub(super) async fn runtime_info(&self) -> Option<RuntimeInfo> {
        let json = self.redis.runtime_info().await.ok().flatten()?;
        serde_json::from_str(&json).ok()
    }
}

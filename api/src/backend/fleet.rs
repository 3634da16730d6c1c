//! Fleet mode: jobs go to RabbitMQ, results come back through Redis.

use pyrunner_shared::queue::{Publisher, QueueError};
use pyrunner_shared::queue_registry::QueueRegistry;
use pyrunner_shared::roster::WorkerRoster;
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
    roster: WorkerRoster,
}

impl FleetBackend {
    /// Publishes with `publisher` (keyed jobs to their key's queue, which `registry` makes
    /// known to the workers), reads results from `redis`, and what the workers offer from
    /// `roster`.
    pub fn new(
        publisher: Publisher,
        redis: RedisStore,
        registry: QueueRegistry,
        roster: WorkerRoster,
    ) -> Self {
        Self {
            publisher,
            store: ResultStore::Redis(redis.clone()),
            redis,
            registry,
            roster,
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

    /// What every run gets, whichever live worker takes it, and how many workers reported;
    /// `None` until one has.
    pub(super) async fn runtime_info(&self) -> Option<(RuntimeInfo, usize)> {
        let reports: Vec<RuntimeInfo> = match self.roster.live().await {
            Ok(reports) => reports
                .iter()
                .filter_map(|json| {
                    serde_json::from_str(json)
                        .inspect_err(|error| {
                            tracing::warn!(%error, "a worker's runtime report does not parse");
                        })
                        .ok()
                })
                .collect(),
            Err(error) => {
                tracing::warn!(%error, "cannot read the workers' roster");
                return None;
            }
        };
        let workers = reports.len();
        RuntimeInfo::of_fleet(reports).map(|info| (info, workers))
    }
}

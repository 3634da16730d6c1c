//! Where accepted jobs go: to the fleet (RabbitMQ and Redis) or to the in-process embedded pool.

pub mod embedded;
pub mod fleet;

use std::time::Duration;

use pyrunner_shared::isolation::IsolationReport;
use pyrunner_shared::runtime::RuntimeInfo;
use pyrunner_shared::store::{ResultStore, StoreError};
use pyrunner_shared::{Job, JobId, JobView, RunResult};
use thiserror::Error;

pub use embedded::EmbeddedBackend;
pub use fleet::FleetBackend;

/// A job could not be accepted.
#[derive(Debug, Error)]
pub enum SubmitError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Queue(#[from] pyrunner_shared::queue::QueueError),
    #[error("the embedded queue is full")]
    Full,
}

/// What `DELETE /jobs/{id}` found.
pub enum Cancelled {
    /// The job was queued or running; it is stopped, and its result is
    /// [`RunResult::cancelled`].
    Now,
    /// The job had finished already.
    AlreadyDone,
    /// No such job (or it has expired).
    Unknown,
}

/// The backend of an api process.
// One per process, built once: the size of its larger variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone)]
pub enum Backend {
    Fleet(FleetBackend),
    Embedded(EmbeddedBackend),
}

impl Backend {
    /// `"fleet"` or `"embedded"`.
    pub fn mode(&self) -> &'static str {
        match self {
            Backend::Fleet(_) => "fleet",
            Backend::Embedded(_) => "embedded",
        }
    }

    fn store(&self) -> &ResultStore {
        match self {
            Backend::Fleet(b) => b.store(),
            Backend::Embedded(b) => b.store(),
        }
    }

    /// Accepts a job: records it as queued and hands it to the workers.
    pub async fn submit(&self, job: Job) -> Result<(), SubmitError> {
        let owner = job.caller.as_deref();
        match self {
            // Both at once, to save a round trip: the queued state is written only if no worker
            // has written a later one.
            Backend::Fleet(b) => {
                if let Some(caller) = &job.caller {
                    b.prepare_caller(caller).await?;
                }
                let (queued, published) =
                    tokio::join!(self.store().mark_queued(job.id, owner), b.publish(&job));
                queued?;
                published?;
            }
            Backend::Embedded(b) => {
                if b.is_full() {
                    return Err(SubmitError::Full);
                }
                self.store().mark_queued(job.id, owner).await?;
                b.enqueue(job);
            }
        }
        Ok(())
    }

    /// Waits up to `timeout` for the job's result.
    pub async fn wait_result(
        &self,
        id: JobId,
        timeout: Duration,
    ) -> Result<Option<RunResult>, StoreError> {
        self.store().wait_result(id, timeout).await
    }

    /// The name of the API key that owns job `id`, if it has one.
    pub async fn owner(&self, id: JobId) -> Result<Option<String>, StoreError> {
        self.store().owner(id).await
    }

    /// The job's state and result.
    pub async fn view(&self, id: JobId) -> Result<Option<JobView>, StoreError> {
        self.store().view(id).await
    }

    /// Cancels a queued or running job: its result becomes `cancelled` (stored first, so it is
    /// the one kept), then the run, wherever it is, is stopped.
    pub async fn cancel(&self, id: JobId) -> Result<Cancelled, StoreError> {
        let Some(view) = self.view(id).await? else {
            return Ok(Cancelled::Unknown);
        };
        let result = RunResult::cancelled(id);
        // Stored only if the job has no result yet: one that landed in between is kept.
        if view.result.is_some() || !self.store().put_result(&result).await? {
            return Ok(Cancelled::AlreadyDone);
        }
        match self {
            Backend::Fleet(b) => b.stop(id).await,
            Backend::Embedded(b) => b.stop(id),
        }
        Ok(Cancelled::Now)
    }

    /// Whether jobs can be served now; the error says what is missing.
    pub async fn readiness(&self) -> Result<(), String> {
        self.store()
            .ping()
            .await
            .map_err(|e| format!("result store unreachable: {e}"))?;
        match self {
            Backend::Fleet(b) => b.readiness().await,
            Backend::Embedded(_) => Ok(()),
        }
    }

    /// What the runtime offers every run, when known: the executor's (embedded), or what every
    /// live worker has (fleet); with the number of workers that reported, in a fleet.
    pub async fn runtime(&self) -> Option<(RuntimeInfo, Option<usize>)> {
        match self {
            Backend::Fleet(b) => b
                .runtime_info()
                .await
                .map(|(info, workers)| (info, Some(workers))),
            Backend::Embedded(b) => Some((b.runtime_info().clone(), None)),
        }
    }

    /// What the runtime offers every run, when known.
    pub async fn runtime_info(&self) -> Option<RuntimeInfo> {
        self.runtime().await.map(|(info, _)| info)
    }

    /// Every isolation layer and whether every run gets it, as the executor (embedded) or every
    /// live worker (fleet: a layer only where all of them have it) reported, with the number of
    /// workers in a fleet; `None` until a worker has reported.
    pub async fn isolation(&self) -> Option<(IsolationReport, Option<usize>)> {
        self.runtime()
            .await
            .map(|(info, workers)| (info.isolation, workers))
            .filter(|(report, _)| !report.is_empty())
    }
}

//! Embedded mode: an in-process queue, result store and worker pool behind the same API, for
//! one machine with no broker. The queue is the executor's slot pool: jobs wait for a free slot
//! in order of arrival, exactly as they would wait in RabbitMQ for a free worker slot.

use std::time::Duration;

use pyrunner_shared::runtime::RuntimeInfo;
use pyrunner_shared::store::{MemoryStore, ResultStore};
use pyrunner_shared::{Job, JobId, RunResult};
use pyrunner_worker::consumer::process_job;
use pyrunner_worker::in_flight::InFlight;
use pyrunner_worker::Executor;

/// The embedded backend.
#[derive(Clone)]
pub struct EmbeddedBackend {
    executor: Executor,
    store: ResultStore,
    runtime: RuntimeInfo,
    held: InFlight,
}

impl EmbeddedBackend {
    /// Runs jobs with `executor`, keeping results for `ttl`.
    pub fn new(executor: Executor, runtime: RuntimeInfo, ttl: Duration) -> Self {
        Self {
            executor,
            store: ResultStore::Memory(MemoryStore::new(ttl)),
            runtime,
            held: InFlight::default(),
        }
    }

    pub(super) fn store(&self) -> &ResultStore {
        &self.store
    }

    pub(super) fn runtime_info(&self) -> &RuntimeInfo {
        &self.runtime
    }

    /// Stops job `id`, waiting for a slot or running.
    pub(super) fn stop(&self, id: JobId) {
        self.held.cancel(id);
    }

    /// Queues a job; a task runs it once a slot is free and stores its result.
    pub(super) fn enqueue(&self, job: Job) {
        let (executor, store) = (self.executor.clone(), self.store.clone());
        let holding = self.held.hold(job.id);
        tokio::spawn(async move {
            if let Err(error) = process_job(&executor, &store, &job, &holding.control).await {
                // The memory store cannot fail; keep the job answered all the same.
                tracing::error!(job = %job.id, %error, "cannot store a result");
                let _ = store
                    .put_result(&RunResult::internal_error(
                        job.id,
                        "the service lost this result",
                    ))
                    .await;
            }
        });
    }
}

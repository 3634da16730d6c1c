//! Embedded mode: an in-process queue, result store and worker pool behind the same API, for
//! one machine with no broker. The queue is the executor's slot pool: jobs wait for a free slot
//! in order of arrival, exactly as they would wait in RabbitMQ for a free worker slot.

use std::time::Duration;

use pyrunner_shared::ledger::Ledger;
use pyrunner_shared::runtime::RuntimeInfo;
use pyrunner_shared::store::{MemoryStore, ResultStore};
use pyrunner_shared::{Job, JobId, RunResult};
use pyrunner_worker::in_flight::InFlight;
use pyrunner_worker::runner::Runner;
use pyrunner_worker::Executor;

/// How often the usage ledger is saved to its file (for the admin command) while it changes.
const SAVE_USAGE_EVERY: Duration = Duration::from_secs(1);

/// The embedded backend.
#[derive(Clone)]
pub struct EmbeddedBackend {
    runner: Runner,
    runtime: RuntimeInfo,
    held: InFlight,
    /// Most jobs held at once, waiting or running (0: no bound).
    max_held: usize,
}

impl EmbeddedBackend {
    /// Runs jobs with `executor`, keeping results for `ttl` and the keys' usage in `ledger`
    /// (saved to its file every second while it changes), and holds at most `max_held` jobs
    /// (waiting or running; 0: no bound).
    pub fn new(
        executor: Executor,
        runtime: RuntimeInfo,
        ledger: Ledger,
        ttl: Duration,
        max_held: usize,
    ) -> Self {
        let saved = ledger.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(SAVE_USAGE_EVERY).await;
                if let Err(error) = saved.save() {
                    tracing::warn!(%error, "cannot save the usage ledger");
                }
            }
        });
        Self {
            max_held,
            runner: Runner::new(executor, ResultStore::Memory(MemoryStore::new(ttl)), ledger),
            runtime,
            held: InFlight::default(),
        }
    }

    pub(super) fn store(&self) -> &ResultStore {
        &self.runner.store
    }

    pub(super) fn runtime_info(&self) -> &RuntimeInfo {
        &self.runtime
    }

    /// Whether no more jobs may be held.
    pub(super) fn is_full(&self) -> bool {
        self.max_held > 0 && self.held.len() >= self.max_held
    }

    /// Waits, at most `grace`, until the jobs held have finished; past it, stops the runs left.
    pub async fn drain(&self, grace: Duration) {
        let deadline = tokio::time::Instant::now() + grace;
        if !self.held.is_empty() {
            tracing::info!(jobs = self.held.len(), ?grace, "finishing the jobs held");
        }
        while !self.held.is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let stopped = self.held.requeue_all();
        if stopped > 0 {
            tracing::warn!(
                jobs = stopped,
                "the shutdown deadline passed: stopping the jobs left"
            );
        }
        if let Err(error) = self.runner.ledger.save() {
            tracing::warn!(%error, "cannot save the usage ledger");
        }
    }

    /// Stops job `id`, waiting for a slot or running.
    pub(super) fn stop(&self, id: JobId) {
        self.held.cancel(id);
    }

    /// Queues a job; a task runs it once a slot is free and stores its result.
    pub(super) fn enqueue(&self, job: Job) {
        let runner = self.runner.clone();
        let holding = self.held.hold(job.id);
        tokio::spawn(async move {
            if let Err(error) = runner.process(&job, &holding.control).await {
                // The memory store cannot fail; keep the job answered all the same.
                tracing::error!(job = %job.id, %error, "cannot store a result");
                let _ = runner
                    .store
                    .put_result(&RunResult::internal_error(
                        job.id,
                        "the service lost this result",
                    ))
                    .await;
            }
        });
    }
}

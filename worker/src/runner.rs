//! One job from its turn to its settled answer: wait for a run slot, mark the job running, run
//! it, store its result, then release its caller's place and record its usage in the ledger.
//! The fleet's consumer and the embedded api both run jobs through a [`Runner`].

use std::time::{Duration, Instant};

use pyrunner_shared::backoff::Backoff;
use pyrunner_shared::ledger::{FinishedRun, Ledger};
use pyrunner_shared::store::{ResultStore, StoreError};
use pyrunner_shared::{Job, RunResult, RunStatus};

use crate::executor::Executor;
use crate::fair::FairTurns;
use crate::in_flight::Control;

/// How long a finished run's result is retried while the store is away, before its job is
/// given back to the queue.
const STORE_RETRY_WINDOW: Duration = Duration::from_secs(60);

/// How long a keyed run's usage is retried while the ledger is away; past it the usage is lost
/// (and the caller's place lapses by itself).
const SETTLE_RETRY_WINDOW: Duration = Duration::from_secs(10);

/// What running a job needs.
#[derive(Clone)]
pub struct Runner {
    pub executor: Executor,
    pub store: ResultStore,
    pub ledger: Ledger,
    turns: FairTurns,
}

impl Runner {
    /// Runs jobs with `executor`, in fair turns between callers, storing results in `store`
    /// and usage in `ledger`. Needs a tokio runtime.
    pub fn new(executor: Executor, store: ResultStore, ledger: Ledger) -> Self {
        Self {
            turns: FairTurns::new(executor.clone()),
            executor,
            store,
            ledger,
        }
    }

    /// Runs one job: waits for its caller's turn at a slot, marks the job running, runs it, stores the result and
    /// settles the caller's ledger. Returns the result whether or not it was the first one
    /// stored for the id, or `None` when `control` stopped the job for it to go back to the
    /// queue (nothing is stored then).
    pub async fn process(
        &self,
        job: &Job,
        control: &Control,
    ) -> Result<Option<RunResult>, StoreError> {
        let (executor, store) = (&self.executor, &self.store);
        // Whether the job ran: not when it had an answer before its turn (it was cancelled while
        // it waited, or this is a second delivery of a job answered already).
        let (result, ran) = tokio::select! {
            reservation = self.turns.reserve(job.caller.as_deref()) => {
                tracing::info!(job = %job.id, "run started");
                // The state is written while the run goes on, and before the result. A job that
                // already has a result stops at once.
                let marking = async {
                    match store.mark_running(job.id).await {
                        Ok(true) => {
                            control.token.cancel();
                            false
                        }
                        Ok(false) => true,
                        Err(error) => {
                            tracing::warn!(job = %job.id, %error, "cannot mark job running");
                            true
                        }
                    }
                };
                let (ran, result) = tokio::join!(
                    marking,
                    executor.run_until(reservation, job, &control.token)
                );
                (result, ran)
            }
            _ = control.token.cancelled() => (RunResult::cancelled(job.id), false),
        };
        if control.requeued() {
            return Ok(None);
        }
        let first = self.store_result(&result).await?;
        if !first {
            tracing::info!(job = %job.id, "a result was already stored; keeping the first");
        }
        // Counted once: the run whose result was kept, or one cancelled while it ran (the api
        // stored the cancellation, and the run used what it used).
        let counted = ran && (first || result.status == RunStatus::Cancelled);
        self.settle(job, &result, counted).await;
        tracing::info!(
            job = %job.id,
            key = %job.caller.as_deref().unwrap_or("-"),
            status = result.status.as_str(),
            duration_ms = result.duration_ms,
            cpu_ms = result.cpu_ms,
            "run finished"
        );
        Ok(Some(result))
    }

    /// Stores `result`, retrying with backoff for up to [`STORE_RETRY_WINDOW`] while the store
    /// is away (a Redis restart), so that a finished run's answer is not lost with it.
    pub async fn store_result(&self, result: &RunResult) -> Result<bool, StoreError> {
        let deadline = Instant::now() + STORE_RETRY_WINDOW;
        let mut backoff = Backoff::reconnect();
        loop {
            match self.store.put_result(result).await {
                Ok(first) => return Ok(first),
                Err(error) if Instant::now() < deadline => {
                    let wait = backoff.next_wait();
                    tracing::warn!(job = %result.id, %error, ?wait, "cannot store the result yet; retrying");
                    tokio::time::sleep(wait).await;
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// Releases a keyed job's place among its caller's jobs in flight and, if `counted`,
    /// records what its run used (each job counts once: not a second delivery of a job, nor a
    /// job cancelled before it ran). Retried for a while if the ledger is away.
    pub async fn settle(&self, job: &Job, result: &RunResult, counted: bool) {
        let Some(caller) = &job.caller else {
            return;
        };
        if !counted {
            if let Err(error) = self.ledger.release(caller, job.id).await {
                tracing::warn!(job = %job.id, key = %caller, %error, "cannot release the job's place; it lapses by itself");
            }
            return;
        }
        let run = FinishedRun {
            job: job.id,
            status: result.status,
            cpu_ms: result.cpu_ms,
            wall_ms: result.duration_ms,
        };
        let deadline = Instant::now() + SETTLE_RETRY_WINDOW;
        let mut backoff = Backoff::reconnect();
        while let Err(error) = self.ledger.finish(caller, job.period, &run).await {
            if Instant::now() >= deadline {
                tracing::error!(job = %job.id, key = %caller, %error, "cannot record the run's usage; it is lost");
                return;
            }
            tokio::time::sleep(backoff.next_wait()).await;
        }
    }
}

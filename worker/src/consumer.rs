//! The fleet worker's loop: consume jobs from RabbitMQ, run them, store results in Redis, and
//! acknowledge each message only once its result is stored (at-least-once delivery).

use std::future::Future;

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use pyrunner_shared::queue::{self, QueueError};
use pyrunner_shared::store::{ResultStore, StoreError};
use pyrunner_shared::{Job, RunResult};
use thiserror::Error;
use tokio::task::JoinSet;

use crate::executor::Executor;

/// The worker loop stopped for a reason other than shutdown.
#[derive(Debug, Error)]
pub enum ConsumerError {
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error("the broker cancelled the consumer or closed the connection")]
    Cancelled,
    #[error("cannot receive from the broker: {0}")]
    Receive(#[source] lapin::Error),
}

/// Runs one job: waits for a slot, marks the job running, runs it and stores the result.
/// Returns the result whether or not it was the first one stored for the id.
pub async fn process_job(
    executor: &Executor,
    store: &ResultStore,
    job: &Job,
) -> Result<RunResult, StoreError> {
    let reservation = executor.reserve().await;
    // The state is written while the run goes on, and before the result.
    let (marked, result) = tokio::join!(
        store.mark_running(job.id),
        executor.run_in(reservation, job)
    );
    if let Err(error) = marked {
        tracing::warn!(job = %job.id, %error, "cannot mark job running");
    }
    if !store.put_result(&result).await? {
        tracing::info!(job = %job.id, "a result was already stored; keeping the first");
    }
    tracing::info!(
        job = %job.id,
        status = result.status.as_str(),
        duration_ms = result.duration_ms,
        cpu_ms = result.cpu_ms,
        "run finished"
    );
    Ok(result)
}

/// Consumes jobs until `shutdown` completes, then finishes the runs in flight.
pub async fn consume(
    amqp_url: &str,
    queue_name: &str,
    executor: Executor,
    store: ResultStore,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ConsumerError> {
    let connection = queue::connect(amqp_url).await?;
    let prefetch = u16::try_from(executor.concurrency()).unwrap_or(u16::MAX);
    let tag = format!("pyrunner-worker-{}", std::process::id());
    let (channel, mut consumer) = queue::consume(&connection, queue_name, prefetch, &tag).await?;
    tracing::info!(queue = queue_name, prefetch, "consuming jobs");
    let mut in_flight = JoinSet::new();
    tokio::pin!(shutdown);
    let outcome = loop {
        tokio::select! {
            delivery = consumer.next() => match delivery {
                Some(Ok(delivery)) => {
                    let (executor, store) = (executor.clone(), store.clone());
                    in_flight.spawn(async move { handle(delivery, &executor, &store).await });
                }
                Some(Err(error)) => break Err(ConsumerError::Receive(error)),
                None => break Err(ConsumerError::Cancelled),
            },
            Some(_) = in_flight.join_next(), if !in_flight.is_empty() => {}
            _ = &mut shutdown => break Ok(()),
        }
    };
    tracing::info!(
        runs = in_flight.len(),
        "stopping: finishing the runs in flight"
    );
    while in_flight.join_next().await.is_some() {}
    let _ = channel.close(200, "worker stopping".into()).await;
    let _ = connection.close(200, "worker stopping".into()).await;
    outcome
}

async fn handle(delivery: Delivery, executor: &Executor, store: &ResultStore) {
    let job = match queue::decode(&delivery.data) {
        Ok(job) => job,
        Err(error) => {
            tracing::error!(%error, bytes = delivery.data.len(), "dropping a malformed message");
            let _ = delivery
                .nack(BasicNackOptions {
                    requeue: false,
                    ..BasicNackOptions::default()
                })
                .await;
            return;
        }
    };
    match process_job(executor, store, &job).await {
        Ok(_) => {
            if let Err(error) = delivery.ack(BasicAckOptions::default()).await {
                tracing::warn!(job = %job.id, %error, "cannot ack; the job may run again");
            }
        }
        Err(error) => {
            // The result is not stored: give the job back so that a worker retries it.
            tracing::error!(job = %job.id, %error, "cannot store the result; requeueing");
            let _ = delivery
                .nack(BasicNackOptions {
                    requeue: true,
                    ..BasicNackOptions::default()
                })
                .await;
        }
    }
}

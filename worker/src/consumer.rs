//! The fleet worker's loop: consume jobs from RabbitMQ, run them, store results in Redis, and
//! acknowledge each message only once its result is stored (at-least-once delivery).
//!
//! A job whose earlier deliveries all ended without an answer (their workers were lost mid-run)
//! is not run again past the queue's `max_deliveries`: its result becomes `internal_error`
//! ("worker lost") and the message goes to the dead-letter queue, as a malformed one does.

use std::future::Future;

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions};
use pyrunner_shared::queue::{self, QueueError, QueueSettings};
use pyrunner_shared::store::{ResultStore, StoreError};
use pyrunner_shared::{Job, JobId, RunResult};
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
    tracing::info!(job = %job.id, "run started");
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
    queue: &QueueSettings,
    executor: Executor,
    store: ResultStore,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ConsumerError> {
    let connection = queue::connect(amqp_url).await?;
    let prefetch = u16::try_from(executor.concurrency()).unwrap_or(u16::MAX);
    let tag = format!("pyrunner-worker-{}", std::process::id());
    let (channel, mut consumer) = queue::consume(&connection, queue, prefetch, &tag).await?;
    tracing::info!(queue = queue.name, prefetch, "consuming jobs");
    let mut in_flight = JoinSet::new();
    tokio::pin!(shutdown);
    let outcome = loop {
        tokio::select! {
            delivery = consumer.next() => match delivery {
                Some(Ok(delivery)) => {
                    let (executor, store) = (executor.clone(), store.clone());
                    let max_deliveries = queue.max_deliveries;
                    in_flight.spawn(async move {
                        handle(delivery, &executor, &store, max_deliveries).await
                    });
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

async fn handle(delivery: Delivery, executor: &Executor, store: &ResultStore, max_deliveries: u32) {
    let previous = queue::previous_deliveries(&delivery);
    let job = match queue::decode(&delivery.data) {
        Ok(job) => job,
        Err(error) => {
            let message_id = delivery
                .properties
                .message_id()
                .as_ref()
                .map(|id| id.to_string());
            tracing::error!(
                %error,
                bytes = delivery.data.len(),
                message_id,
                "dead-lettering a malformed message"
            );
            // A job of ours whose body was damaged still gets an answer.
            if let Some(id) = message_id.and_then(|id| id.parse::<JobId>().ok()) {
                let result = RunResult::internal_error(id, "the job's message was malformed");
                if let Err(error) = store.put_result(&result).await {
                    tracing::error!(job = %id, %error, "cannot store the result of a malformed message");
                }
            }
            dead_letter(&delivery).await;
            return;
        }
    };
    if previous >= max_deliveries {
        tracing::error!(
            job = %job.id,
            deliveries = previous,
            "worker lost: no worker finished the job in its deliveries; dead-lettering it"
        );
        let result = RunResult::internal_error(
            job.id,
            &format!(
                "worker lost: the job was handed to a worker {previous} times and none finished it"
            ),
        );
        match store.put_result(&result).await {
            Ok(_) => dead_letter(&delivery).await,
            Err(error) => {
                // The broker dead-letters it after one more delivery in any case.
                tracing::error!(job = %job.id, %error, "cannot store the lost job's result; requeueing");
                requeue(&delivery).await;
            }
        }
        return;
    }
    if previous > 0 {
        tracing::warn!(job = %job.id, deliveries = previous, "running a job again: its worker was lost");
    }
    match process_job(executor, store, &job).await {
        Ok(_) => {
            if let Err(error) = delivery.ack(BasicAckOptions::default()).await {
                tracing::warn!(job = %job.id, %error, "cannot ack; the job may run again");
            }
        }
        Err(error) => {
            // The result is not stored: give the job back so that a worker retries it.
            tracing::error!(job = %job.id, %error, "cannot store the result; requeueing");
            requeue(&delivery).await;
        }
    }
}

/// Rejects `delivery` without requeueing it: the broker moves it to the dead-letter queue.
async fn dead_letter(delivery: &Delivery) {
    if let Err(error) = delivery.reject(BasicRejectOptions { requeue: false }).await {
        tracing::warn!(%error, "cannot dead-letter a message; it will come back");
    }
}

/// Gives `delivery` back to the queue, counting one more delivery.
async fn requeue(delivery: &Delivery) {
    let options = BasicNackOptions {
        requeue: true,
        ..BasicNackOptions::default()
    };
    if let Err(error) = delivery.nack(options).await {
        tracing::warn!(%error, "cannot requeue a message; the broker will when the channel closes");
    }
}

//! The fleet worker's loop: consume jobs from RabbitMQ (the shared queue and every caller's),
//! run them in fair turns between callers, store results in Redis, and acknowledge each message
//! only once its result is stored (at-least-once delivery).
//!
//! A job whose earlier deliveries all ended without an answer (their workers were lost mid-run)
//! is not run again past the queue's `max_deliveries`: its result becomes `internal_error`
//! ("worker lost") and the message goes to the dead-letter queue, as a malformed one does.

use std::collections::HashSet;
use std::future::Future;
use std::time::Duration;

use futures_util::stream::{BoxStream, SelectAll};
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicNackOptions, BasicRejectOptions};
use pyrunner_shared::backoff::Backoff;
use pyrunner_shared::queue::{self, QueueError, QueueSettings};
use pyrunner_shared::queue_registry::QueueRegistry;
use pyrunner_shared::store::{RedisStore, ResultStore};
use pyrunner_shared::{JobId, RunResult};
use thiserror::Error;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::in_flight::InFlight;
use crate::runner::Runner;

/// How often the worker lists the callers' queues, besides the announcements of new ones.
const CALLERS_LISTED_EVERY: Duration = Duration::from_secs(5);

/// The worker loop stopped for a reason other than shutdown.
#[derive(Debug, Error)]
pub enum ConsumerError {
    #[error(transparent)]
    Queue(#[from] QueueError),
}

/// Consumes jobs until `shutdown` completes, then finishes the runs in flight: from the shared
/// queue and from the queue of every caller in `registry`, as they appear. A lost broker
/// connection is reopened with backoff; the runs in flight go on meanwhile (their messages went
/// back to the queue with the connection, and the first result stored for a job is the one
/// kept). Returns an error only for a queue declared with other arguments.
pub async fn consume(
    amqp_url: &str,
    queue: &QueueSettings,
    registry: QueueRegistry,
    runner: Runner,
    grace: Duration,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ConsumerError> {
    let prefetch = u16::try_from(runner.executor.concurrency()).unwrap_or(u16::MAX);
    let tag = format!("pyrunner-worker-{}", std::process::id());
    let mut in_flight = JoinSet::new();
    let held = InFlight::default();
    let mut watchers = JoinSet::new();
    if let ResultStore::Redis(redis) = &runner.store {
        watchers.spawn(watch_cancellations(redis.clone(), held.clone()));
    }
    let (callers_found, mut found) = mpsc::channel(16);
    watchers.spawn(watch_callers(registry.clone(), callers_found));
    let mut backoff = Backoff::reconnect();
    tokio::pin!(shutdown);
    let outcome = 'session: loop {
        let opened = tokio::select! {
            opened = Session::open(amqp_url, queue, prefetch, &tag) => opened,
            _ = &mut shutdown => break Ok(()),
        };
        let mut session = match opened {
            Ok(session) => session,
            Err(error @ QueueError::Mismatch { .. }) => break Err(error.into()),
            Err(error) => {
                let wait = backoff.next_wait();
                tracing::warn!(%error, ?wait, "cannot reach the broker yet");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => continue 'session,
                    _ = &mut shutdown => break Ok(()),
                }
            }
        };
        backoff.reset();
        tracing::info!(queue = queue.name, prefetch, "consuming jobs");
        // The callers' queues known now; those that come later are announced.
        let mut lost = match registry.callers().await {
            Ok(callers) => session.add_callers(callers, queue, prefetch, &tag).await,
            Err(error) => {
                tracing::warn!(%error, "cannot list the callers' queues yet");
                None
            }
        };
        while lost.is_none() {
            tokio::select! {
                incoming = session.incoming.next() => match incoming {
                    Some(Incoming::Delivery(Ok(delivery))) => {
                        let (runner, held) = (runner.clone(), held.clone());
                        let max_deliveries = queue.max_deliveries;
                        in_flight.spawn(async move {
                            handle(delivery, &runner, &held, max_deliveries).await
                        });
                    }
                    Some(Incoming::Delivery(Err(error))) => lost = Some(error.to_string()),
                    Some(Incoming::Ended(Some(caller))) => {
                        // Opened again when the registry next lists it.
                        tracing::warn!(caller, "the broker cancelled a caller queue's consumer");
                        session.consumed.remove(&caller);
                    }
                    Some(Incoming::Ended(None)) | None => {
                        lost = Some("the broker cancelled the consumer".to_owned());
                    }
                },
                Some(callers) = found.recv() => {
                    lost = session.add_callers(callers, queue, prefetch, &tag).await;
                }
                Some(_) = in_flight.join_next(), if !in_flight.is_empty() => {}
                _ = &mut shutdown => break,
            }
        }
        let Some(reason) = lost else {
            // No more deliveries; those not started yet go back with the channels, which stay
            // open until the runs in flight are acknowledged.
            session.cancel(&tag).await;
            finish(&mut in_flight, &held, grace).await;
            session.close().await;
            break Ok(());
        };
        tracing::warn!(
            %reason,
            runs = in_flight.len(),
            "the broker connection is lost; reconnecting (the runs in flight go on)"
        );
    };
    // Stopped while away from the broker: the runs' results are stored, their acks go nowhere.
    finish(&mut in_flight, &held, grace).await;
    watchers.abort_all();
    outcome
}

/// What a connection's consumers yield: a delivery, or the end of the consumer of a caller's
/// queue (`None`: of the shared queue).
// Every item but the last of a consumer is a delivery: boxing them would cost an allocation each.
#[allow(clippy::large_enum_variant)]
enum Incoming {
    Delivery(Result<Delivery, lapin::Error>),
    Ended(Option<String>),
}

/// One broker connection and its consumers, the shared queue's and each caller's, merged.
struct Session {
    connection: lapin::Connection,
    channels: Vec<lapin::Channel>,
    /// The callers whose queues are consumed.
    consumed: HashSet<String>,
    incoming: SelectAll<BoxStream<'static, Incoming>>,
}

fn tagged(consumer: lapin::Consumer, caller: Option<String>) -> BoxStream<'static, Incoming> {
    consumer
        .map(Incoming::Delivery)
        .chain(futures_util::stream::once(async move {
            Incoming::Ended(caller)
        }))
        .boxed()
}

impl Session {
    /// Connects and consumes the shared queue.
    async fn open(
        amqp_url: &str,
        queue: &QueueSettings,
        prefetch: u16,
        tag: &str,
    ) -> Result<Self, QueueError> {
        let connection = queue::connect(amqp_url).await?;
        let (channel, consumer) =
            queue::consume(&connection, queue, &queue.name, prefetch, tag).await?;
        let mut incoming = SelectAll::new();
        incoming.push(tagged(consumer, None));
        Ok(Self {
            connection,
            channels: vec![channel],
            consumed: HashSet::new(),
            incoming,
        })
    }

    /// Consumes the queues of the `callers` not consumed yet, each on a channel of its own with
    /// `prefetch` messages, so that every caller's jobs reach this worker's fair turns. Returns
    /// why the connection is lost, if it is.
    async fn add_callers(
        &mut self,
        callers: Vec<String>,
        queue: &QueueSettings,
        prefetch: u16,
        tag: &str,
    ) -> Option<String> {
        for caller in callers {
            if self.consumed.contains(&caller) {
                continue;
            }
            let name = queue.caller_queue(&caller);
            match queue::consume(&self.connection, queue, &name, prefetch, tag).await {
                Ok((channel, consumer)) => {
                    tracing::info!(queue = name, "consuming a caller's jobs");
                    self.channels.push(channel);
                    self.incoming.push(tagged(consumer, Some(caller.clone())));
                    self.consumed.insert(caller);
                }
                Err(error) if !self.connection.status().connected() => {
                    return Some(error.to_string());
                }
                // Tried again when the registry next lists it.
                Err(error) => {
                    tracing::warn!(queue = name, %error, "cannot consume a caller's queue")
                }
            }
        }
        None
    }

    /// Stops every consumer: no more deliveries.
    async fn cancel(&self, tag: &str) {
        for channel in &self.channels {
            let _ = channel
                .basic_cancel(tag.into(), BasicCancelOptions::default())
                .await;
        }
    }

    async fn close(self) {
        for channel in &self.channels {
            let _ = channel.close(200, "worker stopping".into()).await;
        }
        let _ = self.connection.close(200, "worker stopping".into()).await;
    }
}

/// Passes on the callers whose queues the worker must consume: each one announced, at once, and
/// every registered one every few seconds (which covers an announcement missed while the
/// subscription was down).
async fn watch_callers(registry: QueueRegistry, found: mpsc::Sender<Vec<String>>) {
    let mut backoff = Backoff::reconnect();
    let mut every = tokio::time::interval(CALLERS_LISTED_EVERY);
    loop {
        let announced = match registry.announcements().await {
            Ok(announced) => announced,
            Err(error) => {
                let wait = backoff.next_wait();
                tracing::warn!(%error, ?wait, "cannot subscribe to the callers' queues yet");
                tokio::time::sleep(wait).await;
                continue;
            }
        };
        backoff.reset();
        tokio::pin!(announced);
        loop {
            let callers = tokio::select! {
                caller = announced.next() => match caller {
                    Some(caller) => vec![caller],
                    None => break,
                },
                _ = every.tick() => match registry.callers().await {
                    Ok(callers) => callers,
                    Err(_) => continue,
                },
            };
            if found.send(callers).await.is_err() {
                return;
            }
        }
        tracing::warn!("the callers' subscription ended; renewing it");
    }
}

/// Stops the runs of the jobs cancelled through the store, for as long as the worker consumes;
/// a lost subscription is renewed with backoff. A cancellation missed meanwhile costs only CPU:
/// the cancelled result was stored first, and it is the one kept.
async fn watch_cancellations(redis: RedisStore, held: InFlight) {
    let mut backoff = Backoff::reconnect();
    loop {
        match redis.cancellations().await {
            Ok(cancellations) => {
                backoff.reset();
                tokio::pin!(cancellations);
                while let Some(id) = cancellations.next().await {
                    if held.cancel(id) {
                        tracing::info!(job = %id, "stopping a cancelled job");
                    }
                }
                tracing::warn!("the cancellation subscription ended; renewing it");
            }
            Err(error) => {
                let wait = backoff.next_wait();
                tracing::warn!(%error, ?wait, "cannot subscribe to cancellations yet");
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// Lets the jobs in flight finish within `grace`; past it, stops their runs and requeues them.
async fn finish(in_flight: &mut JoinSet<()>, held: &InFlight, grace: Duration) {
    if in_flight.is_empty() {
        return;
    }
    tracing::info!(
        runs = in_flight.len(),
        ?grace,
        "stopping: finishing the runs in flight"
    );
    let all = async { while in_flight.join_next().await.is_some() {} };
    if tokio::time::timeout(grace, all).await.is_err() {
        let stopped = held.requeue_all();
        tracing::warn!(
            runs = stopped,
            "the shutdown deadline passed: stopping the runs left and requeueing their jobs"
        );
        while in_flight.join_next().await.is_some() {}
    }
}

async fn handle(delivery: Delivery, runner: &Runner, held: &InFlight, max_deliveries: u32) {
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
                if let Err(error) = runner.store.put_result(&result).await {
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
        match runner.store_result(&result).await {
            Ok(_) => {
                runner.settle(&job, &result, true).await;
                dead_letter(&delivery).await;
            }
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
    let holding = held.hold(job.id);
    match runner.process(&job, &holding.control).await {
        Ok(Some(_)) => {
            if let Err(error) = delivery.ack(BasicAckOptions::default()).await {
                tracing::warn!(job = %job.id, %error, "cannot ack; the job may run again");
            }
        }
        Ok(None) => {
            tracing::info!(job = %job.id, "requeueing a job stopped at shutdown");
            requeue(&delivery).await;
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

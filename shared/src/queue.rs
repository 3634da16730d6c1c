//! The job queue on RabbitMQ: its name and arguments, the message format, the publisher and the
//! consumer side's setup. Both the api and the workers declare the queue with the same arguments
//! ([`QueueSettings`]), so either may start first.
//!
//! The jobs go through a quorum queue, which counts the deliveries of each message: a message
//! whose consumer went away without acknowledging it (a worker killed mid-run) goes back to the
//! queue with its count raised (`x-delivery-count`). Each job may be delivered
//! `max_deliveries` times; a worker that receives it once more stores `internal_error` ("worker
//! lost") for it and rejects it into the dead-letter queue `<name>.dead`, where malformed
//! messages also end. The broker itself dead-letters a message one delivery later, should that
//! last worker die too. Past `max_length` waiting jobs the broker refuses new ones.
//!
//! Jobs of the open service go to the queue `<name>`; each API key's jobs go to a queue of its
//! own, `<name>.key.<key name>`, declared alike, so that a caller that floods its queue does not
//! hold back the others: every worker consumes every queue (they find the keys' queues through
//! the [`queue_registry`](crate::queue_registry)) and runs the jobs it holds in fair turns.

use lapin::message::Delivery;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use thiserror::Error;

use crate::backoff::Backoff;
use crate::job::Job;

/// The default name of the durable queue every job goes through.
pub const DEFAULT_QUEUE: &str = "pyrunner.jobs";

/// Messages the dead-letter queue keeps; past them the oldest go.
pub const DEAD_LETTER_MAX_LENGTH: i64 = 10_000;

/// How the job queue is declared. The api and every worker of a fleet must agree: the broker
/// refuses to declare an existing queue with other arguments.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct QueueSettings {
    /// Name of the job queue; its dead letters go to `<name>.dead`.
    #[arg(long = "queue", env = "PYRUNNER_QUEUE", default_value = DEFAULT_QUEUE)]
    pub name: String,
    /// Times a job is handed to a worker before it ends `internal_error` ("worker lost") in the
    /// dead-letter queue; more than one lets another worker finish the job of a worker that was
    /// lost mid-run. Part of the queue's declaration.
    #[arg(long, env = "PYRUNNER_MAX_DELIVERIES", default_value_t = 3,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub max_deliveries: u32,
    /// Jobs that may wait in the queue; past them a submission gets 503 with Retry-After
    /// (0: no bound). Part of the queue's declaration.
    #[arg(
        long = "max-queue-length",
        env = "PYRUNNER_MAX_QUEUE_LENGTH",
        default_value_t = 10_000
    )]
    pub max_length: u32,
    /// Bytes of jobs that may wait in the queue, in MiB, which bounds the broker's memory and
    /// disk whatever the jobs' sizes; past them as past the length (0: no bound). Part of the
    /// queue's declaration.
    #[arg(
        long = "max-queue-mb",
        env = "PYRUNNER_MAX_QUEUE_MB",
        default_value_t = 512
    )]
    pub max_mb: u32,
}

impl QueueSettings {
    /// Settings with the defaults for the queue `name`.
    pub fn named(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            max_deliveries: 3,
            max_length: 10_000,
            max_mb: 512,
        }
    }

    /// The queue where dead letters end.
    pub fn dead_letter_queue(&self) -> String {
        format!("{}.dead", self.name)
    }

    /// The queue of the jobs of the API key named `caller`.
    pub fn caller_queue(&self, caller: &str) -> String {
        format!("{}.key.{caller}", self.name)
    }

    /// The queue `job` goes to: its caller's, or the shared one when the service runs open.
    pub fn queue_of(&self, job: &Job) -> String {
        match &job.caller {
            Some(caller) => self.caller_queue(caller),
            None => self.name.clone(),
        }
    }

    /// The job queue's arguments.
    fn arguments(&self) -> FieldTable {
        let mut args = FieldTable::default();
        let mut set = |key: &str, value: AMQPValue| {
            args.insert(ShortString::from(key), value);
        };
        set("x-queue-type", AMQPValue::LongString("quorum".into()));
        // One more than the deliveries that run the job: the last one records its loss.
        set(
            "x-delivery-limit",
            AMQPValue::LongLongInt(i64::from(self.max_deliveries) + 1),
        );
        set("x-dead-letter-exchange", AMQPValue::LongString("".into()));
        set(
            "x-dead-letter-routing-key",
            AMQPValue::LongString(self.dead_letter_queue().into()),
        );
        if self.max_length > 0 {
            // RabbitMQ 3.10's quorum queue refuses a message only once it holds more than its
            // limit, so it would take one more than declared.
            set(
                "x-max-length",
                AMQPValue::LongLongInt(i64::from(self.max_length) - 1),
            );
        }
        if self.max_mb > 0 {
            set(
                "x-max-length-bytes",
                AMQPValue::LongLongInt(i64::from(self.max_mb) << 20),
            );
        }
        set("x-overflow", AMQPValue::LongString("reject-publish".into()));
        args
    }

    /// Declares the dead-letter queue and the job queue `queue` (the shared one, or a caller's)
    /// on `channel` (`passive`: only checks that the job queue exists, and reads its counts).
    async fn declare(
        &self,
        channel: &Channel,
        queue: &str,
        passive: bool,
    ) -> Result<lapin::Queue, QueueError> {
        if !passive {
            let mut dead = FieldTable::default();
            dead.insert(
                "x-max-length".into(),
                AMQPValue::LongLongInt(DEAD_LETTER_MAX_LENGTH),
            );
            declare(channel, &self.dead_letter_queue(), false, dead).await?;
        }
        declare(channel, queue, passive, self.arguments()).await
    }
}

/// How many times `delivery` was handed out before, as the quorum queue counts them.
pub fn previous_deliveries(delivery: &Delivery) -> u32 {
    let count = delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|headers| headers.inner().get("x-delivery-count"))
        .and_then(integer);
    match count {
        Some(n) => u32::try_from(n.max(0)).unwrap_or(u32::MAX),
        // A broker that does not count says at least whether this is a redelivery.
        None => u32::from(delivery.redelivered),
    }
}

fn integer(value: &AMQPValue) -> Option<i64> {
    Some(match *value {
        AMQPValue::ShortShortInt(n) => n.into(),
        AMQPValue::ShortShortUInt(n) => n.into(),
        AMQPValue::ShortInt(n) => n.into(),
        AMQPValue::ShortUInt(n) => n.into(),
        AMQPValue::LongInt(n) => n.into(),
        AMQPValue::LongUInt(n) => n.into(),
        AMQPValue::LongLongInt(n) => n,
        _ => return None,
    })
}

/// A failure to reach or use the broker.
#[derive(Debug, Error)]
pub enum QueueError {
    #[error("cannot connect to the broker: {0}")]
    Connect(#[source] lapin::Error),
    #[error("cannot open a channel: {0}")]
    OpenChannel(#[source] lapin::Error),
    #[error("cannot declare queue {queue}: {source}")]
    Declare { queue: String, source: lapin::Error },
    #[error(
        "queue {queue} exists with other arguments than this process's settings (a queue of an \
         earlier version, or an api and workers configured differently): {source}; delete the \
         queue or use the same PYRUNNER_MAX_DELIVERIES, PYRUNNER_MAX_QUEUE_LENGTH and \
         PYRUNNER_MAX_QUEUE_MB everywhere"
    )]
    Mismatch { queue: String, source: lapin::Error },
    #[error("cannot publish job {id}: {source}")]
    Publish { id: String, source: lapin::Error },
    #[error("the broker refused job {id}: the queue is full")]
    Refused { id: String },
    #[error("the broker connection is closed")]
    Disconnected,
    #[error("the broker did not answer within {0:?}")]
    Timeout(Duration),
    #[error("cannot start consuming: {0}")]
    Consume(#[source] lapin::Error),
}

/// Connects to the broker at `url` (an `amqp://` URL).
pub async fn connect(url: &str) -> Result<Connection, QueueError> {
    let props = ConnectionProperties::default().with_connection_name("pyrunner".into());
    Connection::connect(url, props)
        .await
        .map_err(QueueError::Connect)
}

async fn declare(
    channel: &Channel,
    queue: &str,
    passive: bool,
    arguments: FieldTable,
) -> Result<lapin::Queue, QueueError> {
    let options = QueueDeclareOptions {
        durable: true,
        passive,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(queue.into(), options, arguments)
        .await
        .map_err(|source| {
            let queue = queue.to_owned();
            // 406 PRECONDITION_FAILED: the queue exists with other arguments.
            if source.to_string().contains("PRECONDITION_FAILED") {
                QueueError::Mismatch { queue, source }
            } else {
                QueueError::Declare { queue, source }
            }
        })
}

/// Encodes a job as a queue message body.
pub fn encode(job: &Job) -> Vec<u8> {
    serde_json::to_vec(job).expect("a job always serialises")
}

/// Decodes a queue message body.
pub fn decode(body: &[u8]) -> Result<Job, serde_json::Error> {
    serde_json::from_slice(body)
}

/// Publishes jobs as persistent messages and waits for the broker's confirm of each.
#[derive(Clone)]
pub struct JobPublisher {
    connection: std::sync::Arc<Connection>,
    channel: Channel,
    settings: QueueSettings,
    /// The callers' queues declared on this connection.
    declared: Arc<Mutex<std::collections::HashSet<String>>>,
}

impl JobPublisher {
    /// Opens a confirming channel on a new connection and declares the queue.
    pub async fn connect(url: &str, settings: &QueueSettings) -> Result<Self, QueueError> {
        let connection = connect(url).await?;
        let channel = connection
            .create_channel()
            .await
            .map_err(QueueError::OpenChannel)?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(QueueError::OpenChannel)?;
        settings.declare(&channel, &settings.name, false).await?;
        Ok(Self {
            connection: std::sync::Arc::new(connection),
            channel,
            settings: settings.clone(),
            declared: Arc::default(),
        })
    }

    /// Publishes one job to its queue, declared first if it is a caller's seen for the first
    /// time; returns once the broker has the job on disk.
    pub async fn publish(&self, job: &Job) -> Result<(), QueueError> {
        let queue = self.settings.queue_of(job);
        if let Some(caller) = &job.caller {
            // Published to a queue that does not exist, the job would be dropped.
            self.declare_caller(caller).await?;
        }
        let id = job.id.to_string();
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_message_id(id.as_str().into());
        let publish_err = |source| QueueError::Publish {
            id: id.clone(),
            source,
        };
        let body = encode(job);
        let mut wait = Duration::from_millis(20);
        let give_up = std::time::Instant::now() + REFUSED_RETRY_WINDOW;
        loop {
            let confirm = self
                .channel
                .basic_publish(
                    "".into(),
                    queue.as_str().into(),
                    BasicPublishOptions::default(),
                    &body,
                    props.clone(),
                )
                .await
                .map_err(publish_err)?
                .await
                .map_err(publish_err)?;
            if confirm.is_ack() {
                return Ok(());
            }
            // Refused: because the queue is full, or, for a quorum queue declared a moment ago
            // on a loaded broker, because it is not ready yet; only the second passes.
            let depth = self
                .settings
                .declare(&self.channel, &queue, true)
                .await?
                .message_count();
            let full = self.settings.max_length > 0 && depth + 1 >= self.settings.max_length;
            if full || std::time::Instant::now() + wait > give_up {
                return Err(QueueError::Refused { id });
            }
            tracing::warn!(
                queue,
                depth,
                "the broker refused a job below the queue's bound; retrying"
            );
            tokio::time::sleep(wait).await;
            wait *= 2;
        }
    }

    /// Declares the queue of the API key `caller`, unless it was on this connection.
    pub async fn declare_caller(&self, caller: &str) -> Result<(), QueueError> {
        let queue = self.settings.caller_queue(caller);
        let declared = |q: &String| {
            self.declared
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .contains(q)
        };
        if !declared(&queue) {
            self.settings.declare(&self.channel, &queue, false).await?;
            self.declared
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(queue);
        }
        Ok(())
    }

    /// Whether its connection and channel are open.
    pub fn is_connected(&self) -> bool {
        self.connection.status().connected() && self.channel.status().connected()
    }

    /// How many consumers (worker slots' channels) the queue has right now.
    pub async fn consumer_count(&self) -> Result<u32, QueueError> {
        if !self.is_connected() {
            return Err(QueueError::Disconnected);
        }
        Ok(self
            .settings
            .declare(&self.channel, &self.settings.name, true)
            .await?
            .consumer_count())
    }
}

/// How long a job the broker refuses while its queue is below its bound is published again.
const REFUSED_RETRY_WINDOW: Duration = Duration::from_secs(2);

/// Longest wait for the broker's confirm of a publish, or its answer to a declare.
const BROKER_ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// How often the publisher checks its connection while it is up.
const CHECK_EVERY: Duration = Duration::from_millis(250);

/// A [`JobPublisher`] that reconnects by itself. While the broker is away, publishing fails at
/// once with [`QueueError::Disconnected`] (the api answers 503), and a background task
/// reconnects with backoff.
#[derive(Clone)]
pub struct Publisher {
    shared: Arc<Shared>,
}

struct Shared {
    url: String,
    settings: QueueSettings,
    current: Mutex<Option<JobPublisher>>,
}

impl Shared {
    fn current(&self) -> Option<JobPublisher> {
        self.current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn set(&self, publisher: Option<JobPublisher>) {
        *self
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = publisher;
    }
}

impl Publisher {
    /// Connects once (an unreachable broker or a queue declared otherwise is an error here), then
    /// keeps the connection up in the background.
    pub async fn connect(url: &str, settings: &QueueSettings) -> Result<Self, QueueError> {
        let first = JobPublisher::connect(url, settings).await?;
        let shared = Arc::new(Shared {
            url: url.to_owned(),
            settings: settings.clone(),
            current: Mutex::new(Some(first)),
        });
        tokio::spawn(keep_connected(Arc::downgrade(&shared)));
        Ok(Self { shared })
    }

    fn connected(&self) -> Result<JobPublisher, QueueError> {
        self.shared
            .current()
            .filter(JobPublisher::is_connected)
            .ok_or(QueueError::Disconnected)
    }

    /// Publishes one job; returns once the broker has it on disk.
    pub async fn publish(&self, job: &Job) -> Result<(), QueueError> {
        let publisher = self.connected()?;
        tokio::time::timeout(BROKER_ANSWER_TIMEOUT, publisher.publish(job))
            .await
            .unwrap_or(Err(QueueError::Timeout(BROKER_ANSWER_TIMEOUT)))
    }

    /// Declares the queue of the API key `caller` (once per connection).
    pub async fn declare_caller(&self, caller: &str) -> Result<(), QueueError> {
        let publisher = self.connected()?;
        tokio::time::timeout(BROKER_ANSWER_TIMEOUT, publisher.declare_caller(caller))
            .await
            .unwrap_or(Err(QueueError::Timeout(BROKER_ANSWER_TIMEOUT)))
    }

    /// How many consumers the queue has right now.
    pub async fn consumer_count(&self) -> Result<u32, QueueError> {
        let publisher = self.connected()?;
        tokio::time::timeout(BROKER_ANSWER_TIMEOUT, publisher.consumer_count())
            .await
            .unwrap_or(Err(QueueError::Timeout(BROKER_ANSWER_TIMEOUT)))
    }
}

/// Replaces a lost connection, with backoff, for as long as the publisher exists.
async fn keep_connected(shared: Weak<Shared>) {
    let mut backoff = Backoff::reconnect();
    let mut lost = false;
    loop {
        tokio::time::sleep(CHECK_EVERY).await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        if shared.current().is_some_and(|p| p.is_connected()) {
            continue;
        }
        if !lost {
            tracing::warn!("the broker connection is lost; reconnecting");
            lost = true;
        }
        shared.set(None);
        let attempt = tokio::time::timeout(
            BROKER_ANSWER_TIMEOUT,
            JobPublisher::connect(&shared.url, &shared.settings),
        )
        .await
        .unwrap_or(Err(QueueError::Timeout(BROKER_ANSWER_TIMEOUT)));
        match attempt {
            Ok(publisher) => {
                tracing::info!("reconnected to the broker");
                shared.set(Some(publisher));
                backoff.reset();
                lost = false;
            }
            Err(error) => {
                let wait = backoff.next_wait();
                tracing::warn!(%error, ?wait, "cannot reconnect to the broker yet");
                drop(shared);
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// Declares the job queue `queue` (the shared one, or a caller's) and opens a channel consuming
/// it, with `prefetch` unacknowledged messages at most.
pub async fn consume(
    connection: &Connection,
    settings: &QueueSettings,
    queue: &str,
    prefetch: u16,
    tag: &str,
) -> Result<(Channel, Consumer), QueueError> {
    let channel = connection
        .create_channel()
        .await
        .map_err(QueueError::OpenChannel)?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await
        .map_err(QueueError::Consume)?;
    settings.declare(&channel, queue, false).await?;
    let consumer = channel
        .basic_consume(
            queue.into(),
            tag.into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(QueueError::Consume)?;
    Ok((channel, consumer))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::JobId;
    use crate::limits::{LimitPolicy, RunLimits};

    #[test]
    fn the_queue_is_declared_with_its_bounds() {
        let settings = QueueSettings {
            max_deliveries: 2,
            max_length: 50,
            max_mb: 3,
            ..QueueSettings::named("jobs")
        };
        let args = settings.arguments();
        let get = |key: &str| args.inner().get(key).cloned();
        assert_eq!(
            get("x-queue-type"),
            Some(AMQPValue::LongString("quorum".into()))
        );
        // One delivery more than those that run the job, for the one that records its loss.
        assert_eq!(get("x-delivery-limit").as_ref().and_then(integer), Some(3));
        assert_eq!(get("x-max-length").as_ref().and_then(integer), Some(49));
        assert_eq!(
            get("x-max-length-bytes").as_ref().and_then(integer),
            Some(3 << 20)
        );
        assert_eq!(
            get("x-dead-letter-routing-key"),
            Some(AMQPValue::LongString("jobs.dead".into()))
        );
        let unbounded = QueueSettings {
            max_length: 0,
            max_mb: 0,
            ..settings
        }
        .arguments();
        assert!(unbounded.inner().get("x-max-length").is_none());
        assert!(unbounded.inner().get("x-max-length-bytes").is_none());
    }

    #[test]
    fn jobs_round_trip_through_the_message_format() {
        let limits: RunLimits = LimitPolicy::default()
            .resolve(&crate::job::RunRequest {
                code: "print('é')".into(),
                stdin: Some("in".into()),
                timeout_ms: Some(5),
                memory_mb: None,
            })
            .unwrap();
        let job = Job {
            id: JobId::new(),
            code: "print('é')".into(),
            stdin: Some("in".into()),
            limits,
            caller: Some("tutor".into()),
            period: Some(crate::ledger::Period::at(100_000, 86_400)),
        };
        assert_eq!(decode(&encode(&job)).unwrap(), job);
        let settings = QueueSettings::named("jobs");
        assert_eq!(settings.queue_of(&job), "jobs.key.tutor");
        // A message without a caller (the service ran open, or an older api sent it).
        let open = Job {
            caller: None,
            period: None,
            ..job
        };
        let json = String::from_utf8(encode(&open)).unwrap();
        assert!(!json.contains("caller"), "{json}");
        assert_eq!(decode(json.as_bytes()).unwrap(), open);
        assert_eq!(settings.queue_of(&open), "jobs");
        assert!(decode(b"{\"id\":1}").is_err());
    }
}

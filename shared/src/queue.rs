//! The job queue on RabbitMQ: its name and arguments, the message format, the publisher and the
//! consumer side's setup. Both the api and the workers declare the queue with the same arguments,
//! so either may start first.

use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer};
use thiserror::Error;

use crate::job::Job;

/// The default name of the durable queue every job goes through.
pub const DEFAULT_QUEUE: &str = "pyrunner.jobs";

/// A failure to reach or use the broker.
#[derive(Debug, Error)]
pub enum QueueError {
    #[error("cannot connect to the broker: {0}")]
    Connect(#[source] lapin::Error),
    #[error("cannot open a channel: {0}")]
    OpenChannel(#[source] lapin::Error),
    #[error("cannot declare queue {queue}: {source}")]
    Declare { queue: String, source: lapin::Error },
    #[error("cannot publish job {id}: {source}")]
    Publish { id: String, source: lapin::Error },
    #[error("the broker refused job {id}")]
    Refused { id: String },
    #[error("the broker connection is closed")]
    Disconnected,
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
) -> Result<lapin::Queue, QueueError> {
    let options = QueueDeclareOptions {
        durable: true,
        passive,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(queue.into(), options, FieldTable::default())
        .await
        .map_err(|source| QueueError::Declare {
            queue: queue.to_owned(),
            source,
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
    queue: String,
}

impl JobPublisher {
    /// Opens a confirming channel on a new connection and declares `queue`.
    pub async fn connect(url: &str, queue: &str) -> Result<Self, QueueError> {
        let connection = connect(url).await?;
        let channel = connection
            .create_channel()
            .await
            .map_err(QueueError::OpenChannel)?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(QueueError::OpenChannel)?;
        declare(&channel, queue, false).await?;
        Ok(Self {
            connection: std::sync::Arc::new(connection),
            channel,
            queue: queue.to_owned(),
        })
    }

    /// Publishes one job; returns once the broker has it on disk.
    pub async fn publish(&self, job: &Job) -> Result<(), QueueError> {
        let id = job.id.to_string();
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_message_id(id.as_str().into());
        let publish_err = |source| QueueError::Publish {
            id: id.clone(),
            source,
        };
        let confirm = self
            .channel
            .basic_publish(
                "".into(),
                self.queue.as_str().into(),
                BasicPublishOptions::default(),
                &encode(job),
                props,
            )
            .await
            .map_err(publish_err)?
            .await
            .map_err(publish_err)?;
        if confirm.is_ack() {
            Ok(())
        } else {
            Err(QueueError::Refused { id })
        }
    }

    /// How many consumers (worker slots' channels) the queue has right now.
    pub async fn consumer_count(&self) -> Result<u32, QueueError> {
        if !self.connection.status().connected() {
            return Err(QueueError::Disconnected);
        }
        Ok(declare(&self.channel, &self.queue, true)
            .await?
            .consumer_count())
    }
}

/// Opens a channel consuming `queue`, with `prefetch` unacknowledged messages at most.
pub async fn consume(
    connection: &Connection,
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
    declare(&channel, queue, false).await?;
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
        };
        assert_eq!(decode(&encode(&job)).unwrap(), job);
        assert!(decode(b"{\"id\":1}").is_err());
    }
}

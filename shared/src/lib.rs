//! Types and contracts shared by the PyRunner api and worker.
//!
//! - [`job`]: what a caller asks for and what travels on the queue.
//! - [`limits`]: the server's limit policy and the per-run limits it resolves to.
//! - [`outcome`]: the result of a run, as the API returns it.
//! - [`store`]: where job state and results live (Redis, or memory in embedded mode).
//! - [`queue`]: the RabbitMQ contract (queue name, message format, publisher).
//! - [`queue_registry`]: which callers have a queue of their own, for the workers to consume.
//! - [`ledger`]: each API key's jobs in flight and usage, which its limits are held against.
//! - [`runtime`]: what the Python runtime of a worker offers.
//! - [`isolation`]: the isolation layers, and the report of which ones runs get.
//! - [`service`]: logging and the shutdown signal of both binaries.
//! - [`backoff`]: waits between attempts to reach a dependency that is away.

pub mod backoff;
pub mod isolation;
pub mod job;
pub mod ledger;
pub mod limits;
pub mod outcome;
pub mod queue;
pub mod queue_registry;
pub mod roster;
pub mod runtime;
pub mod service;
pub mod store;

pub use job::{Job, JobId, JobState, JobView, RunRequest};
pub use limits::{LimitPolicy, RunLimits};
pub use outcome::{ExceptionInfo, RunResult, RunStatus};

//! The PyRunner worker: takes jobs from the queue and runs each in a sandboxed Python process.
//!
//! - [`sandbox`]: the layers a run's process starts in (seccomp, rlimits, uid, session).
//! - [`executor`]: one run from start to result, in a fresh interpreter or a warm child.
//! - [`zygote`]: the process that forks warm children, and how the worker talks to it.
//! - [`warm_pool`]: one warm child per slot, and the zygote's replacement.
//! - [`workdir`]: a run's private working directory.
//! - [`classify`]: how a finished run maps to a status.
//! - [`slots`]: how many runs go at once, and which uid each gets.
//! - [`reaper`]: reaping the processes runs leave behind.
//! - [`runtime`]: the Python runtime and its start-up probe.
//! - [`fair`]: fair turns at the run slots between callers.
//! - [`runner`]: one job from its turn to its stored result and settled usage.
//! - [`consumer`]: the RabbitMQ consumer loop of a fleet worker.
//! - [`in_flight`]: the jobs held, each stoppable by its id (cancellation, shutdown).
//! - [`config`]: command-line and environment configuration.

pub mod classify;
pub mod config;
pub mod consumer;
pub mod executor;
pub mod fair;
pub mod in_flight;
pub mod reaper;
pub mod runner;
pub mod runtime;
pub mod sandbox;
pub mod slots;
pub mod warm_pool;
pub mod workdir;
pub mod zygote;

pub use executor::Executor;
pub use runtime::PythonRuntime;

//! The PyRunner HTTP API.
//!
//! - [`routes`]: the router and its handlers.
//! - [`body`]: parsing and validating JSON request bodies.
//! - [`error`]: the one error type every handler returns.
//! - [`backend`]: where jobs go (the fleet, or the embedded pool).
//! - [`state`]: what handlers share.
//! - [`config`]: flags and environment variables.
//! - [`keys`]: API keys, their records and where they are stored.
//! - [`auth`]: which key a request presents, and whether it may go on.
//! - [`rate`]: request rates per key, across replicas.
//! - [`admin`]: the `keys` admin command.
//! - [`server`]: start-up and serving.

pub mod admin;
pub mod auth;
pub mod backend;
pub mod body;
pub mod config;
pub mod error;
pub mod keys;
pub mod rate;
pub mod routes;
pub mod server;
pub mod state;

pub use routes::app;

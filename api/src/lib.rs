//! The PyRunner HTTP API.
//!
//! - [`routes`]: the router and its handlers.
//! - [`body`]: parsing and validating JSON request bodies.
//! - [`error`]: the one error type every handler returns.
//! - [`backend`]: where jobs go (the fleet, or the embedded pool).
//! - [`state`]: what handlers share.
//! - [`config`]: flags and environment variables.
//! - [`server`]: start-up and serving.

pub mod backend;
pub mod body;
pub mod config;
pub mod error;
pub mod routes;
pub mod server;
pub mod state;

pub use routes::app;

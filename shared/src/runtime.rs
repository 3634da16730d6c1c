//! What a worker's Python runtime offers, as reported by `GET /`.

use serde::{Deserialize, Serialize};

/// The Python runtime of a worker: interpreter version and preinstalled packages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeInfo {
    pub python: String,
    /// Preinstalled packages and their versions, sorted by name.
    pub packages: Vec<Package>,
}

/// One installed distribution.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Package {
    pub name: String,
    pub version: String,
}

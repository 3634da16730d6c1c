//! What a worker's Python runtime offers, as reported by `GET /`.

use serde::{Deserialize, Serialize};

/// The Python runtime of a worker: interpreter version and preinstalled packages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeInfo {
    pub python: String,
    /// Preinstalled packages and their versions, sorted by name.
    pub packages: Vec<Package>,
    /// How runs get their interpreter: `zygote` (forked from a preloaded one) or `fresh`.
    #[serde(default)]
    pub executor: String,
    /// Modules already imported when a run starts: importing them costs nothing.
    #[serde(default)]
    pub preloaded: Vec<String>,
    /// Every isolation layer, and whether runs get it.
    #[serde(default)]
    pub isolation: crate::isolation::IsolationReport,
}

/// One installed distribution.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Package {
    pub name: String,
    pub version: String,
}

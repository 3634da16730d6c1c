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

impl RuntimeInfo {
    /// What a fleet whose workers sent `reports` offers every run: the runtime of the first
    /// report, and the isolation layers every worker has ([`isolation::weakest`]); `None`
    /// without a report.
    ///
    /// [`isolation::weakest`]: crate::isolation::weakest
    pub fn of_fleet(mut reports: Vec<RuntimeInfo>) -> Option<RuntimeInfo> {
        let layers: Vec<_> = reports.iter().map(|r| r.isolation.clone()).collect();
        let mut first = reports.drain(..).next()?;
        first.isolation = crate::isolation::weakest(&layers);
        Some(first)
    }
}

/// One installed distribution.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Package {
    pub name: String,
    pub version: String,
}

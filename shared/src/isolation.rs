//! The isolation layers a run can get, and the report of which ones a worker applies.
//!
//! Every layer the service knows is listed here, the ones this version does not build included,
//! so that a report says plainly what is missing rather than leaving it out. Workers probe their
//! layers at start-up and publish the report with their runtime; `GET /isolation` shows it, and
//! each result names the layers its run went through.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Every layer, with what it stops, in the order a run meets them.
pub const LAYERS: &[(&str, &str)] = &[
    (
        "uid_per_slot",
        "a separate unprivileged uid for each concurrent run slot",
    ),
    (
        "cgroup_memory",
        "the memory limit holds for all of a run's processes together",
    ),
    (
        "cgroup_pids",
        "fork and thread bombs, across all of a run's processes",
    ),
    ("cgroup_cpu", "a CPU share or quota per run"),
    ("user_namespace", "runs without real root on the host"),
    (
        "network_namespace",
        "every network: runs share an empty namespace",
    ),
    (
        "mount_namespace",
        "a read-only view of only what a run needs, private /tmp and /dev/shm",
    ),
    (
        "pid_namespace",
        "seeing or signalling other processes; all of a run's die with it",
    ),
    (
        "ipc_namespace",
        "System V IPC objects shared with other runs",
    ),
    ("uts_namespace", "the host name"),
    (
        "process_group",
        "background processes outliving the run (killed with the group)",
    ),
    (
        "rlimits",
        "CPU time, file size, descriptors, processes, address space per process",
    ),
    (
        "not_dumpable",
        "core dumps, and tracing by other processes of the slot uid",
    ),
    (
        "no_new_privs",
        "gaining privileges through setuid binaries or file capabilities",
    ),
    (
        "landlock",
        "reading host files and writing outside the run's directory",
    ),
    (
        "seccomp",
        "system calls that reach the network, other processes or the kernel's riskier parts",
    ),
    ("empty_env", "secrets in the worker's environment"),
];

/// Whether a layer is applied to runs, and the specifics (or why not).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerStatus {
    pub active: bool,
    pub detail: String,
}

impl LayerStatus {
    pub fn active(detail: impl Into<String>) -> Self {
        Self {
            active: true,
            detail: detail.into(),
        }
    }

    pub fn inactive(detail: impl Into<String>) -> Self {
        Self {
            active: false,
            detail: detail.into(),
        }
    }
}

/// Every known layer by name, each with its status.
pub type IsolationReport = BTreeMap<String, LayerStatus>;

/// Whether `name` is a layer this service knows.
pub fn is_layer(name: &str) -> bool {
    LAYERS.iter().any(|(layer, _)| *layer == name)
}

/// The names of the active layers of `report`, in [`LAYERS`] order.
pub fn active_layers(report: &IsolationReport) -> Vec<String> {
    LAYERS
        .iter()
        .filter(|(name, _)| report.get(*name).is_some_and(|s| s.active))
        .map(|(name, _)| (*name).to_owned())
        .collect()
}

/// The layers of `required` that `report` does not have active, with why.
pub fn missing<'a>(report: &IsolationReport, required: &'a [String]) -> Vec<(&'a str, String)> {
    required
        .iter()
        .filter_map(|name| match report.get(name) {
            Some(status) if status.active => None,
            Some(status) => Some((name.as_str(), status.detail.clone())),
            None => Some((name.as_str(), "not reported".to_owned())),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_are_named_once() {
        let mut names: Vec<_> = LAYERS.iter().map(|(n, _)| n).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), LAYERS.len());
    }

    #[test]
    fn missing_names_the_inactive_and_the_unreported() {
        let report: IsolationReport = [
            ("seccomp".to_owned(), LayerStatus::active("deny list")),
            (
                "landlock".to_owned(),
                LayerStatus::inactive("kernel without it"),
            ),
        ]
        .into();
        let required = ["seccomp", "landlock", "pid_namespace"].map(String::from);
        assert_eq!(
            missing(&report, &required),
            [
                ("landlock", "kernel without it".to_owned()),
                ("pid_namespace", "not reported".to_owned())
            ]
        );
        assert_eq!(active_layers(&report), ["seccomp"]);
    }
}

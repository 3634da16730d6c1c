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

/// What every run of a fleet gets, from its workers' `reports`: a layer is active only where
/// every worker has it (a run may go to any of them). Where the workers differ, the detail says
/// on how many of them the layer is off, and why; where they agree, it is theirs.
pub fn weakest(reports: &[IsolationReport]) -> IsolationReport {
    let names: std::collections::BTreeSet<&String> =
        reports.iter().flat_map(|report| report.keys()).collect();
    let not_reported = LayerStatus::inactive("not reported");
    names
        .into_iter()
        .map(|name| {
            let statuses: Vec<&LayerStatus> = reports
                .iter()
                .map(|report| report.get(name).unwrap_or(&not_reported))
                .collect();
            let off: Vec<&LayerStatus> = statuses.iter().copied().filter(|s| !s.active).collect();
            let details = |of: &[&LayerStatus]| {
                let distinct: std::collections::BTreeSet<&str> =
                    of.iter().map(|s| s.detail.as_str()).collect();
                distinct.into_iter().collect::<Vec<_>>().join(" | ")
            };
            let status = if off.is_empty() {
                LayerStatus::active(details(&statuses))
            } else if off.len() == statuses.len() {
                LayerStatus::inactive(details(&off))
            } else {
                LayerStatus::inactive(format!(
                    "off on {} of the {} workers: {}",
                    off.len(),
                    statuses.len(),
                    details(&off)
                ))
            };
            (name.clone(), status)
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

    #[test]
    fn a_fleet_has_a_layer_only_where_every_worker_has_it() {
        let report = |layers: &[(&str, bool, &str)]| -> IsolationReport {
            layers
                .iter()
                .map(|(name, active, detail)| {
                    let status = if *active {
                        LayerStatus::active(*detail)
                    } else {
                        LayerStatus::inactive(*detail)
                    };
                    ((*name).to_owned(), status)
                })
                .collect()
        };
        let full = report(&[
            ("seccomp", true, "allowlist"),
            ("cgroup_cpu", true, "1 core"),
            ("landlock", false, "kernel without it"),
        ]);
        let fewer = report(&[
            ("seccomp", true, "allowlist"),
            ("cgroup_cpu", false, "no quota asked for"),
            ("landlock", false, "kernel without it"),
        ]);
        let fleet = weakest(&[full.clone(), fewer, report(&[("seccomp", true, "list")])]);
        assert_eq!(fleet["seccomp"], LayerStatus::active("allowlist | list"));
        assert_eq!(
            fleet["cgroup_cpu"],
            LayerStatus::inactive("off on 2 of the 3 workers: no quota asked for | not reported")
        );
        assert_eq!(
            fleet["landlock"],
            LayerStatus::inactive("kernel without it | not reported")
        );
        assert_eq!(active_layers(&fleet), ["seccomp"]);
        // One worker, or workers that agree: their own report.
        assert_eq!(weakest(std::slice::from_ref(&full)), full);
        assert_eq!(weakest(&[full.clone(), full.clone()]), full);
        assert!(weakest(&[]).is_empty());
    }
}

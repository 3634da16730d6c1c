//! The checks of the cgroup v2 test (`scripts/cgroup-v2-test`, docs/SECURITY.md): run inside a
//! machine whose kernel keeps every controller in cgroup v2, against an api started there. It
//! checks that every isolation layer is active, the cgroups as v2; that a run's processes are in
//! their slot's group; that each run gets its own memory peak; and that the status and
//! hostile-code catalogues pass. Prints a Markdown table of the checks; exits non-zero at the
//! first that fails.
//!
//! Usage: cgroupcheck URL [--without-slot-uids]
//! `--without-slot-uids`: the api's user has no subordinate range, so its slots have no uids of
//! their own (that layer alone is then inactive, and the three hostile cases that check the
//! slot uid are left out), and their groups are named `slot-N`.
//! Everything is bounded: each wait has a deadline, and each run its limits.

use std::time::Duration;

use pyrunner_shared::RunStatus;
use pyrunner_tests::catalogue::{hostile, statuses};
use pyrunner_tests::checks::{self, wait_ready, Report};
use pyrunner_tests::http::{get, run};
use serde_json::json;

/// The hostile cases that check a run's slot uid: left out `--without-slot-uids`, where runs
/// keep the api's user's uid (each in a user namespace of its own).
const SLOT_UID_CASES: [&str; 3] = [
    "the run is alone in a user namespace that maps only its uid",
    "root's files belong to a uid the run's namespace does not map",
    "runs as an unprivileged uid",
];

/// How long the api may take to be ready (the script that starts it has waited for it already).
const START_FOR: Duration = Duration::from_secs(60);

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (base, uids) = match &args[..] {
        [base] => (base.clone(), true),
        [base, flag] if flag == "--without-slot-uids" => (base.clone(), false),
        _ => {
            eprintln!("usage: cgroupcheck URL [--without-slot-uids]");
            std::process::exit(2);
        }
    };
    let mut report = Report::default();
    let passed = checks::passed(check(&base, uids, &mut report));
    report.print();
    if !passed {
        eprintln!("\nthe cgroup v2 checks failed");
        std::process::exit(1);
    }
    println!("\nall checks passed");
}

async fn check(base: &str, uids: bool, report: &mut Report) {
    let ready = async {
        wait_ready(base, START_FOR).await;
        String::new()
    };
    report.awaited("the api is ready", ready).await;
    report
        .awaited("isolation layers", check_isolation(base, uids))
        .await;
    report
        .awaited(
            "a run's processes are in its slot's group",
            check_slot_group(base, uids),
        )
        .await;
    report
        .awaited("each run's own memory peak", check_peak_per_run(base))
        .await;
    report
        .catalogue(base, "status catalogue", statuses(), "all as documented")
        .await;
    let mut cases = hostile();
    for name in SLOT_UID_CASES {
        assert!(
            cases.iter().any(|c| c.name == name),
            "no hostile case {name:?}"
        );
    }
    if !uids {
        cases.retain(|c| !SLOT_UID_CASES.contains(&c.name));
    }
    report
        .catalogue(base, "hostile-code catalogue", cases, "all contained")
        .await;
    let healthy = async {
        let healthy = get(&format!("{base}/healthz")).await;
        assert_eq!(healthy.status, 200, "{healthy:?}");
        String::new()
    };
    report
        .awaited("the api is healthy after the catalogues", healthy)
        .await;
}

/// Every layer is active (but the slot uids, `without` them), and the three cgroup layers are
/// v2.
async fn check_isolation(base: &str, uids: bool) -> String {
    let reply = get(&format!("{base}/isolation")).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    let layers = &reply.body["layers"];
    let inactive: Vec<String> = pyrunner_shared::isolation::LAYERS
        .iter()
        .map(|(name, _)| *name)
        .filter(|name| uids || *name != "uid_per_slot")
        .filter(|name| layers[name]["active"] != true)
        .map(|name| format!("{name}: {}", layers[name]["detail"]))
        .collect();
    assert!(
        inactive.is_empty(),
        "inactive layers:\n{}",
        inactive.join("\n")
    );
    for name in ["cgroup_memory", "cgroup_pids", "cgroup_cpu"] {
        let detail = layers[name]["detail"].as_str().unwrap_or_default();
        assert!(detail.contains("cgroup v2"), "{name}: {detail}");
    }
    let all = pyrunner_shared::isolation::LAYERS.len();
    let active = if uids { all } else { all - 1 };
    format!(
        "{active} of {all} active; cgroups: {}",
        layers["cgroup_memory"]["detail"]
    )
}

/// A run, and a process it starts, are in `pyrunner/uid-<slot uid>` of the group the worker was
/// given, or `pyrunner/slot-<N>` where the slots have no uids.
async fn check_slot_group(base: &str, uids: bool) -> String {
    let code = "import os, subprocess, sys\n\
                read = \"print(open('/proc/self/cgroup').read().strip())\"\n\
                own = open('/proc/self/cgroup').read().strip()\n\
                child = subprocess.run([sys.executable, '-c', read], capture_output=True, \
                text=True).stdout.strip()\n\
                print(os.getuid(), own, child)";
    let result = run(base, &json!({ "code": code })).await;
    assert_eq!(result.status, RunStatus::Success, "{result:?}");
    let fields: Vec<&str> = result.stdout.split_whitespace().collect();
    let [uid, own, child] = fields[..] else {
        panic!("unexpected output: {result:?}");
    };
    // Under the group the worker was given: the root, a container's, or a user's.
    let slot = if uids {
        format!("/pyrunner/uid-{uid}")
    } else {
        let number = own.rsplit_once("/pyrunner/slot-").map(|(_, n)| n);
        assert!(
            number.is_some_and(|n| n.parse::<u32>().is_ok()),
            "{result:?}"
        );
        String::new()
    };
    assert!(
        own.starts_with("0::/") && own.ends_with(&slot),
        "{result:?}"
    );
    assert_eq!(child, own, "{result:?}");
    own.to_owned()
}

/// A run that fills 200 MiB reports at least that as its peak, and a small run that comes
/// after it in the same slot (the same group) reports its own, small peak: the slot's peak is
/// reset for each run.
async fn check_peak_per_run(base: &str) -> String {
    let big = json!({ "code": "b = bytearray(200 * 2**20)\n\
                               for i in range(0, len(b), 4096): b[i] = 1\n\
                               print(open('/proc/self/cgroup').read().strip().rsplit('/', 1)[-1])" });
    let small =
        json!({ "code": "print(open('/proc/self/cgroup').read().strip().rsplit('/', 1)[-1])" });
    let mut seen = Vec::new();
    for _ in 0..3 {
        let filled = run(base, &big).await;
        assert_eq!(filled.status, RunStatus::Success, "{filled:?}");
        assert!(
            filled.peak_memory_kb >= 200 * 1024,
            "a 200 MiB run reported a peak of {} KiB",
            filled.peak_memory_kb
        );
        // The slots are taken in turn; within a few runs one lands in the same slot.
        let mut after = None;
        for _ in 0..32 {
            let result = run(base, &small).await;
            assert_eq!(result.status, RunStatus::Success, "{result:?}");
            if result.stdout == filled.stdout {
                after = Some(result);
                break;
            }
        }
        let after = after.expect("a run in the same slot within 32 runs");
        assert!(
            after.peak_memory_kb < 16 * 1024,
            "a run after a 200 MiB run in the same slot reported {} KiB",
            after.peak_memory_kb
        );
        seen.push(format!(
            "{}: {} then {} KiB",
            filled.stdout.trim(),
            filled.peak_memory_kb,
            after.peak_memory_kb
        ));
    }
    seen.join("; ")
}

//! The checks of the cgroup v2 test (`scripts/cgroup-v2-test`, docs/SECURITY.md): run inside a
//! machine whose kernel keeps every controller in cgroup v2, against an api started there. It
//! checks that every isolation layer is active, the cgroups as v2; that a run's processes are in
//! their slot's group; that each run gets its own memory peak; and that the status and
//! hostile-code catalogues pass. Prints a Markdown table of the checks; exits non-zero at the
//! first that fails.
//!
//! Usage: cgroupcheck URL
//! Everything is bounded: each wait has a deadline, and each run its limits.

use std::time::Duration;

use pyrunner_shared::RunStatus;
use pyrunner_tests::catalogue::{hostile, statuses};
use pyrunner_tests::checks::{self, all_pass, wait_ready, Report};
use pyrunner_tests::http::{get, run};
use serde_json::json;

/// How long the api may take to be ready (the script that starts it has waited for it already).
const START_FOR: Duration = Duration::from_secs(60);

fn main() {
    let Some(base) = std::env::args().nth(1) else {
        eprintln!("usage: cgroupcheck URL");
        std::process::exit(2);
    };
    let mut report = Report::default();
    let passed = checks::passed(check(&base, &mut report));
    report.print();
    if !passed {
        eprintln!("\nthe cgroup v2 checks failed");
        std::process::exit(1);
    }
    println!("\nall checks passed");
}

async fn check(base: &str, report: &mut Report) {
    let ready = async {
        wait_ready(base, START_FOR).await;
        String::new()
    };
    report.awaited("the api is ready", ready).await;
    report
        .awaited("isolation layers", check_isolation(base))
        .await;
    report
        .awaited(
            "a run's processes are in its slot's group",
            check_slot_group(base),
        )
        .await;
    report
        .awaited("each run's own memory peak", check_peak_per_run(base))
        .await;
    let status = async {
        all_pass(base, statuses(), "status").await;
        String::from("all as documented")
    };
    report
        .awaited(
            &format!("status catalogue: {} cases", statuses().len()),
            status,
        )
        .await;
    let hostile_cases = async {
        all_pass(base, hostile(), "hostile").await;
        String::from("all contained")
    };
    report
        .awaited(
            &format!("hostile-code catalogue: {} cases", hostile().len()),
            hostile_cases,
        )
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

/// Every layer is active, and the three cgroup layers are v2.
async fn check_isolation(base: &str) -> String {
    let reply = get(&format!("{base}/isolation")).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    let layers = &reply.body["layers"];
    let inactive: Vec<String> = pyrunner_shared::isolation::LAYERS
        .iter()
        .map(|(name, _)| *name)
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
    format!(
        "{} of {} active; cgroups: {}",
        pyrunner_shared::isolation::LAYERS.len(),
        pyrunner_shared::isolation::LAYERS.len(),
        layers["cgroup_memory"]["detail"]
    )
}

/// A run, and a process it starts, are in `pyrunner/uid-<slot uid>` of the group the worker was
/// given.
async fn check_slot_group(base: &str) -> String {
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
    let slot = format!("/pyrunner/uid-{uid}");
    assert!(
        own.starts_with("0::/") && own.ends_with(&slot),
        "{result:?}"
    );
    assert_eq!(child, own, "{result:?}");
    own.to_owned()
}

/// A run that fills 200 MiB reports at least that as its peak, and a small run that comes
/// after it in the same slot (the same uid) reports its own, small peak: the slot's peak is
/// reset for each run.
async fn check_peak_per_run(base: &str) -> String {
    let big = json!({ "code": "import os\nb = bytearray(200 * 2**20)\n\
                               for i in range(0, len(b), 4096): b[i] = 1\nprint(os.getuid())" });
    let small = json!({ "code": "import os; print(os.getuid())" });
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
            "uid {}: {} then {} KiB",
            filled.stdout.trim(),
            filled.peak_memory_kb,
            after.peak_memory_kb
        ));
    }
    seen.join("; ")
}

//! A service without real root: the embedded api started as an unprivileged user makes itself
//! root of a user namespace of its own, and runs still get their namespaces, their read-only
//! view, Landlock and seccomp; what it cannot have (cgroups unless a group is delegated to its
//! user, and a uid per slot unless the user has a subordinate range of ids) it reports off.

use std::collections::{BTreeSet, HashMap};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pyrunner_shared::RunStatus;
use pyrunner_tests::catalogue::{
    case, forged_end_record, hostile, no_check, preparation_is_not_counted, Case,
};
use pyrunner_tests::fleet::{binary, free_port};
use pyrunner_tests::http::{get, run, run_cases};
use serde_json::json;

/// The unprivileged user the api runs as.
const NOBODY: u32 = 65_534;

struct Api {
    child: Child,
    url: String,
}

impl Drop for Api {
    fn drop(&mut self) {
        // The api may be a descendant of the child rather than the child itself (the init of a
        // PID namespace under `unshare --fork`, which does not die with its parent once it has
        // changed its uid): nothing of it may outlive the test.
        for pid in descendants(self.child.id()).into_keys() {
            let pid = nix::unistd::Pid::from_raw(pid as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The api's environment, on `port`.
fn api_env(command: &mut Command, port: u16) -> &mut Command {
    command
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("PYRUNNER_BIND", format!("127.0.0.1:{port}"))
        .env("PYRUNNER_RUNTIME_DIR", pyrunner_tests::runtime_dir())
        .env("PYRUNNER_CONCURRENCY", "2")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
}

async fn start_as_nobody() -> Api {
    let port = free_port();
    let child = api_env(&mut Command::new(binary("pyrunner-api")), port)
        .uid(NOBODY)
        .gid(NOBODY)
        .spawn()
        .expect("start the api as nobody");
    wait_ready(child, port).await
}

/// Where the subordinate ids of the test's nobody start, on the host (no account has them).
const SUBORDINATE_START: u32 = 2_000_000;
const SUBORDINATE_COUNT: u32 = 65_536;

/// Starts the api as nobody, with a subordinate range of ids: in a mount namespace of the
/// test's own, private `/etc/subuid` and `/etc/subgid` give nobody the range (the host's files
/// are not touched), and `newuidmap` and `newgidmap` read them there. `dir` holds the files
/// and the api's work dir.
async fn start_as_nobody_with_subordinate_ids(dir: &Path) -> Api {
    start_as_nobody_with_subordinate_ids_in(dir, &[]).await
}

/// As [`start_as_nobody_with_subordinate_ids`], with the api in the cgroup v1 `groups` (the
/// group directories, one per hierarchy).
async fn start_as_nobody_with_subordinate_ids_in(dir: &Path, groups: &[PathBuf]) -> Api {
    let join = join_groups(groups);
    assert!(
        Path::new("/usr/bin/newuidmap").exists(),
        "newuidmap is missing: install the uidmap package (scripts/test does)"
    );
    let range = format!("nobody:{SUBORDINATE_START}:{SUBORDINATE_COUNT}");
    let port = free_port();
    let child = with_private_subordinate_ids(
        dir,
        &range,
        NOBODY,
        port,
        &format!("{join}shift && exec setpriv --reuid=65534 --regid=65534 --clear-groups \"$@\""),
    )
    .arg(binary("pyrunner-api"))
    .spawn()
    .expect("start the api as nobody in a mount namespace of its own");
    wait_ready(child, port).await
}

/// A shell command line that moves the shell into the cgroup v1 `groups` (their directories),
/// followed by ` && `; empty without groups.
fn join_groups(groups: &[PathBuf]) -> String {
    groups
        .iter()
        .map(|group| format!("echo $$ > '{}/cgroup.procs' && ", group.display()))
        .collect()
}

/// A command that gives `dir`'s own `subuid` and `subgid`, each holding the line `range`, in
/// place of `/etc`'s, in a mount namespace of its own, then runs `then` (a shell command line
/// whose `$1` is `dir`, followed by the command's further arguments) as the api's environment
/// for `port` says, with `dir/work`, owned by `owner`, as the api's work dir.
fn with_private_subordinate_ids(
    dir: &Path,
    range: &str,
    owner: u32,
    port: u16,
    then: &str,
) -> Command {
    for file in ["subuid", "subgid"] {
        std::fs::write(dir.join(file), format!("{range}\n")).unwrap();
    }
    let work = dir.join("work");
    std::fs::create_dir(&work).unwrap();
    std::os::unix::fs::chown(&work, Some(owner), Some(owner)).unwrap();
    let script = format!(
        "mount --bind \"$1/subuid\" /etc/subuid && mount --bind \"$1/subgid\" /etc/subgid \
         && {then}"
    );
    let mut command = Command::new("unshare");
    api_env(&mut command, port)
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(script)
        .arg("sh")
        .arg(dir)
        .env("PYRUNNER_WORK_DIR", &work);
    command
}

/// Where the ids of the remapped user namespace start on the host (no account has them).
const REMAP_START: u32 = 3_000_000;

/// How the remapped user namespace comes with the other namespaces.
#[derive(Clone, Copy)]
enum Remapped {
    /// As a container engine makes it: with PID and mount namespaces that it owns, a procfs of
    /// its own, and the api as its pid 1.
    AsAContainer,
    /// Alone: the api stays in the host's PID namespace, which its user namespace does not own.
    Alone,
}

/// Starts the api as root of a user namespace that maps 65536 ids, 0 included, to a range of
/// the host's, as Docker's `userns-remap` (or a Kubernetes pod with `hostUsers: false`) starts a
/// container. `unshare` maps the range with `newuidmap` and `newgidmap`, which a private
/// `/etc/subuid` and `/etc/subgid` (bind-mounted in a mount namespace of the test's own) let root
/// use. `dir` holds the files and the api's work dir; the api starts in the cgroup v1 `groups`.
async fn start_in_remapped_user_namespace(dir: &Path, how: Remapped, groups: &[PathBuf]) -> Api {
    let range = format!("root:{REMAP_START}:{SUBORDINATE_COUNT}");
    let port = free_port();
    let map = format!("{REMAP_START},0,{SUBORDINATE_COUNT}");
    let namespaces: &[&str] = match how {
        Remapped::AsAContainer => &["--pid", "--fork", "--mount-proc"],
        Remapped::Alone => &[],
    };
    let child = with_private_subordinate_ids(
        dir,
        &range,
        REMAP_START,
        port,
        &format!(
            "{}map=$2 && shift 2 && exec unshare --user --map-users=$map --map-groups=$map \
             --setuid 0 --setgid 0 \"$@\"",
            join_groups(groups)
        ),
    )
    .arg(map)
    .args(namespaces)
    .arg(binary("pyrunner-api"))
    .spawn()
    .expect("start the api in a remapped user namespace");
    wait_ready(child, port).await
}

/// The layers `api` reports, by name.
async fn layers(api: &Api) -> serde_json::Map<String, serde_json::Value> {
    let report = get(&format!("{}/isolation", api.url)).await;
    report.body["layers"].as_object().expect("a report").clone()
}

/// Checks that each of `names` is `active` (or not) in `layers`.
fn assert_layers(
    layers: &serde_json::Map<String, serde_json::Value>,
    names: &[&str],
    active: bool,
) {
    for name in names {
        assert_eq!(layers[*name]["active"], active, "{name}: {}", layers[*name]);
    }
}

/// Runs `cases` through `api`; fails with every case that failed.
async fn assert_all_pass(api: &Api, cases: Vec<Case>) {
    let failures = run_cases(&api.url, cases).await;
    assert!(
        failures.is_empty(),
        "failed cases:\n{}",
        failures.join("\n")
    );
}

async fn wait_ready(child: Child, port: u16) -> Api {
    let mut api = Api {
        child,
        url: format!("http://127.0.0.1:{port}"),
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ready = reqwest::get(format!("{}/readyz", api.url))
            .await
            .is_ok_and(|r| r.status().is_success());
        if ready {
            return api;
        }
        if let Ok(Some(status)) = api.child.try_wait() {
            panic!("the api (or what started it) exited before it got ready: {status}");
        }
        assert!(Instant::now() < deadline, "the api did not get ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What a run of a service without real root must show, with or without subordinate ids.
fn shared_cases() -> Vec<Case> {
    vec![
        case(
            "the run holds no capability",
            "print({l.split()[1] for l in open('/proc/self/status') if l.startswith('Cap')})",
            RunStatus::Success,
            |r| assert_eq!(r.stdout, "{'0000000000000000'}\n", "{r:#?}"),
        ),
        case(
            "numpy and sympy work",
            "import numpy as np, sympy\nprint(np.arange(10).sum(), sympy.factorint(360))",
            RunStatus::Success,
            |r| assert_eq!(r.stdout, "45 {2: 3, 3: 2, 5: 1}\n", "{r:#?}"),
        ),
        // The process limit counts the run's processes in its own user namespace, not every
        // process of the uid it may share with the worker and the other runs.
        case(
            "the process limit is the run's own",
            "import os\nn = 0\ntry:\n    while True:\n        if os.fork() == 0:\n            \
             import time; time.sleep(30)\n        n += 1\nexcept OSError as e:\n    print(40 < n < 64)",
            RunStatus::Success,
            |r| assert_eq!(r.stdout, "True\n", "{r:#?}"),
        ),
        case(
            "a memory hog",
            "x = bytearray(4 << 30)",
            RunStatus::MemoryExceeded,
            no_check,
        ),
        // Without a memory cgroup the peak is the run's own process's: not the zygote's pages
        // it maps (about 60 MiB), which every run would report otherwise.
        case("`pass` reports a small peak", "pass", RunStatus::Success, |r| {
            assert!(r.peak_memory_kb < 16 * 1024, "{r:#?}")
        }),
        // Without cgroups the figures come from the kernel's report of the child's exit.
        forged_end_record(),
        preparation_is_not_counted(),
        case(
            "a run filling 50 MiB reports 50 MiB",
            "b = bytearray(50 * 2**20)\nfor i in range(0, len(b), 4096): b[i] = 1",
            RunStatus::Success,
            |r| {
                let mib = r.peak_memory_kb / 1024;
                assert!((50..66).contains(&mib), "{r:#?}")
            },
        ),
    ]
}

/// What a run of a service without real root must and must not reach.
fn cases() -> Vec<Case> {
    let mut cases = vec![
        case(
            "the run is uid 1000 of a user namespace of its own, alone in its PID namespace",
            "import os\nprint(os.getuid(), open('/proc/self/uid_map').read().split(), os.getcwd(), \
             sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))",
            RunStatus::Success,
            |r| assert_eq!(r.stdout, "1000 ['1000', '0', '1'] /work [1, 2]\n", "{r:#?}"),
        ),
        case(
            "the host's files are not in the run's view, and the view is read-only",
            "import os\nprint([p for p in ('/etc/passwd', '/home', '/root', '/run', '/var/log') \
             if os.path.lexists(p)], bool(os.statvfs('/usr').f_flag & os.ST_RDONLY))",
            RunStatus::Success,
            |r| assert_eq!(r.stdout, "[] True\n", "{r:#?}"),
        ),
        case(
            "the network namespace is empty",
            "import socket\ntry:\n    socket.create_connection(('127.0.0.1', 6379), 1)\n\
             except OSError as e:\n    print(type(e).__name__)",
            RunStatus::Success,
            |r| assert_eq!(r.stdout, "PermissionError\n", "{r:#?}"),
        ),
        case(
            "a file in /tmp stays in the run",
            "open('/tmp/pyrunner-rootless', 'w').write('x')\nprint(open('/tmp/pyrunner-rootless').read())",
            RunStatus::Success,
            |r| {
                assert_eq!(r.stdout, "x\n");
                assert!(!std::path::Path::new("/tmp/pyrunner-rootless").exists());
            },
        ),
    ];
    cases.extend(shared_cases());
    cases
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_real_root_runs_keep_their_namespaces_view_landlock_and_seccomp() {
    let api = start_as_nobody().await;
    let layers = layers(&api).await;
    assert_layers(
        &layers,
        &[
            "user_namespace",
            "network_namespace",
            "mount_namespace",
            "pid_namespace",
            "uts_namespace",
            "ipc_namespace",
            "landlock",
            "seccomp",
        ],
        true,
    );
    let detail = layers["user_namespace"]["detail"].as_str().unwrap();
    assert!(detail.contains("without real root"), "{detail}");
    assert_layers(
        &layers,
        &["uid_per_slot", "cgroup_memory", "cgroup_pids"],
        false,
    );
    // The service itself runs as nobody on the host.
    let status = std::fs::read_to_string(format!("/proc/{}/status", api.child.id())).unwrap();
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(
        uid_line.split_whitespace().skip(1).all(|u| u == "65534"),
        "{uid_line}"
    );
    assert_all_pass(&api, cases()).await;
}

/// Every process descending from `root`, with its host uid.
fn descendants(root: u32) -> HashMap<u32, u32> {
    let mut parents = HashMap::new();
    let mut uids = HashMap::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else {
            continue;
        };
        let field = |name: &str| -> Option<u32> {
            let line = status.lines().find(|l| l.starts_with(name))?;
            line.split_whitespace().nth(1)?.parse().ok()
        };
        if let (Some(ppid), Some(uid)) = (field("PPid:"), field("Uid:")) {
            parents.insert(pid, ppid);
            uids.insert(pid, uid);
        }
    }
    let descends = |mut pid: u32| {
        while let Some(&parent) = parents.get(&pid) {
            if parent == root {
                return true;
            }
            pid = parent;
        }
        false
    };
    uids.into_iter().filter(|&(pid, _)| descends(pid)).collect()
}

/// The layers a service without real root but with a range of ids has.
const RANGE_LAYERS: &[&str] = &[
    "uid_per_slot",
    "user_namespace",
    "pid_namespace",
    "landlock",
    "seccomp",
];

/// Starts two runs at once that report their uid and sleep, and checks from the host, while
/// they run: every process of `api` other than `service` holds an id of `range`; the eight warm
/// children wait under eight of them; and each run's uid `u` is host id `to_host(u)` among
/// them, a different one for each run. Returns every process of `api` with its host uid.
async fn check_slot_uids_on_host(
    api: &Api,
    service: u32,
    range: std::ops::Range<u32>,
    to_host: impl Fn(u32) -> u32,
) -> HashMap<u32, u32> {
    let sleeper = json!({ "code": "import os, time\nprint(os.getuid())\ntime.sleep(3)" });
    let runs: Vec<_> = (0..2)
        .map(|_| {
            let (url, sleeper) = (api.url.clone(), sleeper.clone());
            tokio::spawn(async move { run(&url, &sleeper).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let on_host = descendants(api.child.id());
    let slot_uids: BTreeSet<u32> = on_host
        .values()
        .copied()
        .filter(|&u| u != service)
        .collect();
    assert!(
        slot_uids.iter().all(|u| range.contains(u)),
        "processes of the service outside its range: {on_host:?}"
    );
    // The warm children of the eight slots wait under eight uids.
    assert!(slot_uids.len() >= 8, "{slot_uids:?}");
    let mut inside = BTreeSet::new();
    for running in runs {
        let result = running.await.unwrap();
        assert_eq!(result.status, RunStatus::Success, "{result:#?}");
        let uid: u32 = result.stdout.trim().parse().unwrap();
        assert!(
            slot_uids.contains(&to_host(uid)),
            "uid {uid} is not host uid {} in {slot_uids:?}",
            to_host(uid)
        );
        inside.insert(uid);
    }
    assert_eq!(inside.len(), 2, "two runs at once shared a uid: {inside:?}");
    on_host
}

/// What a run of a service without real root but with subordinate ids must show.
fn subordinate_cases() -> Vec<Case> {
    let mut cases = vec![
        case(
            "the run holds its slot's uid, alone in a user namespace of its own",
            "import os\nu = os.getuid()\nprint(64000 <= u < 64008, open('/proc/self/uid_map').read().split() \
             == [str(u), str(u), '1'], os.getgid() == u)",
            RunStatus::Success,
            |r| assert_eq!(r.stdout, "True True True\n", "{r:#?}"),
        ),
        case(
            "no process of another run or of the service can be signalled",
            "import os\ntry:\n    os.kill(-1, 9)\nexcept ProcessLookupError:\n    print('alone')",
            RunStatus::Success,
            |r| assert_eq!(r.stdout, "alone\n", "{r:#?}"),
        ),
    ];
    cases.extend(shared_cases());
    cases
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_real_root_but_with_subordinate_ids_each_slot_has_its_own_uid() {
    let dir = tempfile::tempdir().unwrap();
    let api = start_as_nobody_with_subordinate_ids(dir.path()).await;
    let layers = layers(&api).await;
    assert_layers(&layers, RANGE_LAYERS, true);
    let detail = layers["user_namespace"]["detail"].as_str().unwrap();
    assert!(detail.contains("subordinate ids"), "{detail}");
    assert_layers(&layers, &["cgroup_memory"], false);

    // Inside id i is host id start + i - 1; the service itself is nobody.
    check_slot_uids_on_host(
        &api,
        NOBODY,
        SUBORDINATE_START..SUBORDINATE_START + SUBORDINATE_COUNT,
        |uid| SUBORDINATE_START + uid - 1,
    )
    .await;

    assert_all_pass(&api, subordinate_cases()).await;
}

/// In a container whose cgroup v1 groups are given to its remapped root (as the host's
/// `pyrunner-workers` directories of `docker-compose.cgroup-v1.yml` would be, chowned to it), the
/// slots also get cgroups there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_remapped_container_each_slot_has_its_own_uid_of_the_range() {
    let groups = DelegatedV1Groups::make(REMAP_START);
    let delegated = groups.as_ref().map_or(&[][..], |g| &g.0[..]);
    each_slot_has_its_own_uid_of_the_range(Remapped::AsAContainer, delegated).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_remapped_user_namespace_alone_each_slot_has_its_own_uid_of_the_range() {
    each_slot_has_its_own_uid_of_the_range(Remapped::Alone, &[]).await;
}

/// The api started as root of a remapped user namespace (`how`) gives each slot an id of the
/// range, and has every layer, the cgroups only where it starts in the delegated cgroup v1
/// `groups`.
async fn each_slot_has_its_own_uid_of_the_range(how: Remapped, groups: &[PathBuf]) {
    let dir = tempfile::tempdir().unwrap();
    let api = start_in_remapped_user_namespace(dir.path(), how, groups).await;
    let layers = layers(&api).await;
    assert_layers(&layers, RANGE_LAYERS, true);
    let detail = layers["user_namespace"]["detail"].as_str().unwrap();
    assert!(detail.contains("a container engine mapped"), "{detail}");
    assert_layers(
        &layers,
        &["mount_namespace", "network_namespace", "ipc_namespace"],
        true,
    );
    assert_layers(
        &layers,
        &["cgroup_memory", "cgroup_pids", "cgroup_cpu"],
        !groups.is_empty(),
    );

    // The service is the range's first id (root inside), which lies in the range too; inside
    // id i is host id start + i. (`unshare` itself, the api's parent or the api before its
    // exec, is host root and not among the service's processes.)
    let on_host = check_slot_uids_on_host(
        &api,
        REMAP_START,
        REMAP_START..REMAP_START + SUBORDINATE_COUNT,
        |uid| REMAP_START + uid,
    )
    .await;
    assert!(
        on_host.values().any(|&u| u == REMAP_START),
        "no process of the service is the range's first id: {on_host:?}"
    );

    assert_all_pass(&api, subordinate_cases()).await;
}

/// The cgroup v1 hierarchies whose groups a service without real root uses where they are
/// delegated to its user, with a file their roots have (only a v1 hierarchy of the controller
/// has it there).
const V1_CONTROLLERS: [(&str, &str); 4] = [
    ("memory", "memory.limit_in_bytes"),
    ("pids", "cgroup.procs"),
    ("cpu", "cpu.cfs_quota_us"),
    ("cpuacct", "cpuacct.usage"),
];

/// A group in each cgroup v1 limit hierarchy, delegated to a user as an administrator delegates
/// one (`cgcreate -a USER -t USER`): made by root, its directory and `cgroup.procs` given to
/// the user. Removed on drop, with the groups made in it, once their processes are gone.
struct DelegatedV1Groups(Vec<PathBuf>);

impl DelegatedV1Groups {
    /// The groups, delegated to `owner`; `None` where the host keeps no such hierarchy in
    /// cgroup v1 (a cgroup v2 host).
    fn make(owner: u32) -> Option<Self> {
        let root = Path::new("/sys/fs/cgroup");
        if !V1_CONTROLLERS
            .iter()
            .all(|(controller, file)| root.join(controller).join(file).is_file())
        {
            return None;
        }
        let name = format!("pyrunner-test-delegated-{}", std::process::id());
        let groups = Self(
            V1_CONTROLLERS
                .iter()
                .map(|(controller, _)| root.join(controller).join(&name))
                .collect(),
        );
        for group in &groups.0 {
            std::fs::create_dir(group).unwrap();
            for path in [group.clone(), group.join("cgroup.procs")] {
                std::os::unix::fs::chown(&path, Some(owner), Some(owner)).unwrap();
            }
        }
        Some(groups)
    }
}

impl Drop for DelegatedV1Groups {
    fn drop(&mut self) {
        /// Every group below `dir`, deepest first.
        fn below(dir: &Path, out: &mut Vec<PathBuf>) {
            for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    below(&entry.path(), out);
                    out.push(entry.path());
                }
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for group in &self.0 {
            let mut groups = Vec::new();
            below(group, &mut groups);
            groups.push(group.clone());
            for group in groups {
                // A group empties as its killed processes finish exiting.
                while std::fs::remove_dir(&group).is_err() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }
}

/// On a host that keeps its limit controllers in cgroup v1 (as this project's reference host
/// does), a service without real root whose user has a group of each hierarchy delegated to
/// it puts its slots' groups there, and has every layer: its runs pass the whole hostile-code
/// catalogue, the cases that need cgroups (a memory hog spread over processes, two processes
/// spinning against the CPU quota, a child never waited for) included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_real_root_a_delegated_cgroup_v1_group_gives_every_layer() {
    let Some(groups) = DelegatedV1Groups::make(NOBODY) else {
        // The cgroup v2 counterpart runs in scripts/cgroup-v2-test.
        eprintln!("skipped: this host keeps its limit controllers in cgroup v2");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let api = start_as_nobody_with_subordinate_ids_in(dir.path(), &groups.0).await;
    let layers = layers(&api).await;
    let inactive: Vec<_> = layers
        .iter()
        .filter(|(_, layer)| layer["active"] != true)
        .collect();
    assert!(inactive.is_empty(), "inactive layers: {inactive:?}");
    let detail = layers["cgroup_memory"]["detail"].as_str().unwrap();
    assert!(
        detail.contains("cgroup v1") && detail.contains("delegated"),
        "{detail}"
    );

    // The slots' groups are in the delegated ones, each with its limits.
    let slots: Vec<PathBuf> = std::fs::read_dir(groups.0[0].join("pyrunner"))
        .expect("the slots' memory groups are in the delegated group")
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| path.is_dir())
        .collect();
    assert!(slots.len() >= 2, "{slots:?}");
    let pids_max = groups.0[1].join("pyrunner/uid-64000/pids.max");
    assert_eq!(
        std::fs::read_to_string(&pids_max).unwrap().trim(),
        "64",
        "{}",
        pids_max.display()
    );
    let quota = groups.0[2].join("pyrunner/uid-64000/cpu.cfs_quota_us");
    assert_eq!(std::fs::read_to_string(&quota).unwrap().trim(), "100000");

    let mut cases = hostile();
    cases.extend(subordinate_cases());
    assert_all_pass(&api, cases).await;
    drop(api);
    drop(groups);
}

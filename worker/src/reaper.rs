//! Reaping of a run's leftover processes. The worker is a child subreaper: processes a run
//! leaves behind are reparented to it, killed at the end of their run, and reaped here so that
//! they do not linger as zombies (which would still count against their uid's process limit).
//!
//! Run leaders are reaped by their executor instead (to read their resource usage), so they are
//! registered for the whole of their life and the reaper leaves them alone. The registry is
//! process-wide because a process has one set of children, however many executors it has.

use std::collections::HashSet;
use std::process::Child;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use crate::sandbox::sys;

/// How often ended orphans are reaped.
const INTERVAL: Duration = Duration::from_millis(200);

static LEADERS: Mutex<Option<HashSet<i32>>> = Mutex::new(None);
static STARTED: OnceLock<()> = OnceLock::new();

fn leaders() -> MutexGuard<'static, Option<HashSet<i32>>> {
    LEADERS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Makes this process a subreaper and starts the reaper thread, once.
pub fn start() {
    STARTED.get_or_init(|| {
        // Orphans are found through /proc/self/task/*/children (CONFIG_PROC_CHILDREN). Without
        // it they could never be reaped here, so they are better left to init.
        // (thread-self, not our tid: that names us in our PID namespace, which may not be the
        // one /proc shows.)
        if !std::path::Path::new("/proc/thread-self/children").exists() {
            tracing::warn!("this kernel does not list children in /proc; orphans go to init");
            return;
        }
        if let Err(error) = sys::become_child_subreaper() {
            tracing::warn!(%error, "cannot become a child subreaper; orphans go to init");
        }
        std::thread::Builder::new()
            .name("pyrunner-reaper".into())
            .spawn(|| loop {
                std::thread::sleep(INTERVAL);
                reap_now();
            })
            .expect("can start the reaper thread");
    });
}

/// Spawns a run leader with `spawn` (which may return more with it) and registers it before the
/// reaper can see it.
pub fn spawn_leader<T>(
    spawn: impl FnOnce() -> std::io::Result<(Child, T)>,
) -> std::io::Result<(Child, T)> {
    start();
    let mut guard = leaders();
    let (child, more) = spawn()?;
    guard
        .get_or_insert_with(HashSet::new)
        .insert(child.id() as i32);
    Ok((child, more))
}

/// Forgets a leader its executor has reaped, and reaps what has ended meanwhile.
pub fn release_leader(pid: i32) {
    if let Some(set) = leaders().as_mut() {
        set.remove(&pid);
    }
    reap_now();
}

fn reap_now() {
    let guard = leaders();
    let empty = HashSet::new();
    sys::reap_orphans(guard.as_ref().unwrap_or(&empty));
}

//! Run slots: how many runs a worker carries out at once, and which uid each run gets.
//!
//! A worker that runs as root, or without it but with a subordinate range of ids
//! (`sandbox::idmap`), gives each slot a uid of its own, claimed host-wide: slot uids are taken
//! from a range by holding an exclusive `flock` on one lock file per uid, so two workers on one
//! host (sharing a PID namespace) never use the same uid. Workers of one user without real root
//! map the same subordinate range, so they too must share a lock directory. The end of a run kills
//! every process of its uid, which is exact only because no one else uses that uid meanwhile.
//! The kernel drops the locks when the worker exits, however it exits.

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use nix::fcntl::{Flock, FlockArg};
use thiserror::Error;

use crate::sandbox::cgroup::{self, CgroupError, CgroupLimits, SlotCgroups};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// How many uids past the base are tried when claiming slot uids.
pub const UID_RANGE: u32 = 4096;

/// Slot uids cannot be claimed.
#[derive(Debug, Error)]
pub enum SlotError {
    #[error("cannot create the slot lock directory {path}: {source}")]
    LockDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the slot lock directory {path} is not ours alone (owner {owner}, mode {mode:o}): anyone able to write there could take or hold our slot uids")]
    LockDirNotOwn {
        path: PathBuf,
        owner: u32,
        mode: u32,
    },
    #[error("no free sandbox uid in {0:?}: other workers hold them all")]
    Exhausted(Range<u32>),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
}

struct SlotState {
    uid: Option<u32>,
    cgroups: Option<SlotCgroups>,
    _lock: Option<Flock<File>>,
}

/// A fixed set of numbered slots. Waiters are served in order of arrival.
#[derive(Clone)]
pub struct SlotPool {
    states: Arc<Vec<SlotState>>,
    free: Arc<Mutex<Vec<u32>>>,
    permits: Arc<Semaphore>,
}

/// Makes `path` if it is missing, and checks that no one else may write there: a lock file
/// someone else could create or replace would let them hold our uids, or make us share one.
fn own_lock_dir(path: &Path) -> Result<(), SlotError> {
    let failed = |source| SlotError::LockDir {
        path: path.to_path_buf(),
        source,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(path)
        .map_err(failed)?;
    let meta = std::fs::metadata(path).map_err(failed)?;
    let ours = meta.uid() == nix::unistd::geteuid().as_raw();
    if !ours || meta.mode() & 0o022 != 0 {
        return Err(SlotError::LockDirNotOwn {
            path: path.to_path_buf(),
            owner: meta.uid(),
            mode: meta.mode() & 0o7777,
        });
    }
    Ok(())
}

/// A slot held by one run; it returns to the pool when dropped.
pub struct Slot {
    index: u32,
    states: Arc<Vec<SlotState>>,
    free: Arc<Mutex<Vec<u32>>>,
    _permit: OwnedSemaphorePermit,
}

impl SlotPool {
    /// A pool of `size` slots that keep the worker's own identity.
    pub fn new(size: usize) -> Self {
        let states = (0..size.max(1))
            .map(|_| SlotState {
                uid: None,
                cgroups: None,
                _lock: None,
            })
            .collect();
        Self::from_states(states)
    }

    /// A pool of `size` slots, each with a uid (and the same gid) of its own claimed from
    /// `uids` through lock files in `lock_dir`, and, when `limits` are given and the host has
    /// them, cgroups of its own with those limits.
    pub fn with_uids(
        size: usize,
        uids: Range<u32>,
        lock_dir: &Path,
        limits: Option<CgroupLimits>,
    ) -> Result<Self, SlotError> {
        Self::claim(size, uids, lock_dir, limits, true)
    }

    /// A pool of `size` slots that keep the worker's own identity but have cgroups of their
    /// own, with `limits`, where the host has them (a worker without real root and without a
    /// subordinate range, in a delegated cgroup v2 group). Each slot's number is claimed from
    /// `numbers` through a lock file in `lock_dir`, as a uid is, so that the workers sharing
    /// the delegated group never share a slot's group.
    pub fn without_uids(
        size: usize,
        numbers: Range<u32>,
        lock_dir: &Path,
        limits: CgroupLimits,
    ) -> Result<Self, SlotError> {
        if !cgroup::available() {
            return Ok(Self::new(size));
        }
        Self::claim(size, numbers, lock_dir, Some(limits), false)
    }

    /// Claims `size` ids of `ids` through lock files in `lock_dir`; each names a slot's
    /// cgroups and, `with_uids`, is also the slot's uid.
    fn claim(
        size: usize,
        ids: Range<u32>,
        lock_dir: &Path,
        limits: Option<CgroupLimits>,
        with_uids: bool,
    ) -> Result<Self, SlotError> {
        let cgroup_limit = limits.filter(|_| cgroup::available());
        own_lock_dir(lock_dir)?;
        let kind = if with_uids { "uid" } else { "slot" };
        let mut states = Vec::new();
        for id in ids.clone() {
            if states.len() == size.max(1) {
                break;
            }
            let Ok(file) = File::create(lock_dir.join(format!("{kind}-{id}.lock"))) else {
                continue;
            };
            if let Ok(lock) = Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                let cgroups = cgroup_limit
                    .map(|limits| SlotCgroups::create(&format!("{kind}-{id}"), limits))
                    .transpose()?;
                states.push(SlotState {
                    uid: with_uids.then_some(id),
                    cgroups,
                    _lock: Some(lock),
                });
            }
        }
        if states.len() < size.max(1) {
            return Err(SlotError::Exhausted(ids));
        }
        Ok(Self::from_states(states))
    }

    fn from_states(states: Vec<SlotState>) -> Self {
        let size = states.len();
        Self {
            states: Arc::new(states),
            free: Arc::new(Mutex::new((0..size as u32).rev().collect())),
            permits: Arc::new(Semaphore::new(size)),
        }
    }

    /// Number of slots.
    pub fn size(&self) -> usize {
        self.states.len()
    }

    /// Whether runs get a uid of their own.
    pub fn has_uids(&self) -> bool {
        self.states.iter().all(|s| s.uid.is_some())
    }

    /// Whether runs get cgroups of their own.
    pub fn has_cgroups(&self) -> bool {
        self.states.iter().all(|s| s.cgroups.is_some())
    }

    /// What the slots' cgroups are, where every slot has them.
    pub fn cgroups_described(&self) -> Option<String> {
        if !self.has_cgroups() {
            return None;
        }
        self.states
            .first()
            .and_then(|s| s.cgroups.as_ref())
            .map(SlotCgroups::describe)
    }

    /// The CPU quota of every slot, in cores, where all of them have one.
    pub fn cpu_quota(&self) -> Option<f64> {
        let quotas: Option<Vec<f64>> = self
            .states
            .iter()
            .map(|s| s.cgroups.as_ref().and_then(SlotCgroups::cpu_quota))
            .collect();
        quotas.and_then(|q| q.first().copied())
    }

    /// Slots not in use right now.
    pub fn available(&self) -> usize {
        self.permits.available_permits()
    }

    /// Waits for a free slot.
    pub async fn acquire(&self) -> Slot {
        let permit = Arc::clone(&self.permits)
            .acquire_owned()
            .await
            .expect("the slot semaphore is never closed");
        let index = self
            .free
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop()
            .expect("a permit always has a free slot");
        Slot {
            index,
            states: Arc::clone(&self.states),
            free: Arc::clone(&self.free),
            _permit: permit,
        }
    }
}

impl Slot {
    /// The slot's number, from 0 to the pool size.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The uid (and gid) runs in this slot take, if the slot has one.
    pub fn uid(&self) -> Option<u32> {
        self.states[self.index as usize].uid
    }

    /// The cgroups of this slot, if it has them.
    pub fn cgroups(&self) -> Option<&SlotCgroups> {
        self.states[self.index as usize].cgroups.as_ref()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.free
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(self.index);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[tokio::test]
    async fn concurrent_slots_are_distinct_and_return_on_drop() {
        let pool = SlotPool::new(3);
        let held: Vec<Slot> = vec![
            pool.acquire().await,
            pool.acquire().await,
            pool.acquire().await,
        ];
        let ids: HashSet<u32> = held.iter().map(Slot::index).collect();
        assert_eq!(ids, HashSet::from([0, 1, 2]));
        assert_eq!(pool.available(), 0);
        let waiter = tokio::spawn({
            let pool = pool.clone();
            async move { pool.acquire().await.index() }
        });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        drop(held);
        assert!(waiter.await.unwrap() < 3);
    }

    const UIDS: Range<u32> = 70_000..70_000 + UID_RANGE;

    #[test]
    fn a_lock_directory_others_may_write_to_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let refused = SlotPool::with_uids(1, UIDS, dir.path(), None).err();
        assert!(
            matches!(refused, Some(SlotError::LockDirNotOwn { mode: 0o777, .. })),
            "{refused:?}"
        );
        // Made where it is missing, and ours alone.
        let made = dir.path().join("a/b");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let pool = SlotPool::with_uids(2, UIDS, &made, None).unwrap();
        assert_eq!(pool.size(), 2);
        let mode = std::fs::metadata(&made).unwrap().permissions().mode();
        assert_eq!(mode & 0o022, 0, "{mode:o}");
    }

    #[tokio::test]
    async fn two_pools_never_share_a_uid() {
        let dir = tempfile::tempdir().unwrap();
        let a = SlotPool::with_uids(3, UIDS, dir.path(), None).unwrap();
        let b = SlotPool::with_uids(3, UIDS, dir.path(), None).unwrap();
        let uids =
            |p: &SlotPool| -> HashSet<u32> { p.states.iter().filter_map(|s| s.uid).collect() };
        assert_eq!(uids(&a).len(), 3);
        assert!(
            uids(&a).is_disjoint(&uids(&b)),
            "{:?} {:?}",
            uids(&a),
            uids(&b)
        );
        drop(a);
        // The first pool's uids are free again once it is gone.
        let c = SlotPool::with_uids(3, UIDS, dir.path(), None).unwrap();
        assert!(uids(&c).contains(&70_000));
    }
}

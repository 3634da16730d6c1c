//! The jobs a worker (or the embedded api) holds, each stoppable by its id: cancelled by a
//! caller (`DELETE /jobs/{id}`), or stopped at the shutdown deadline to be requeued.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use pyrunner_shared::JobId;
use tokio_util::sync::CancellationToken;

/// How one held job is stopped.
#[derive(Clone, Default)]
pub struct Control {
    /// Stops the job: the wait for a slot, or the run (its whole process group).
    pub token: CancellationToken,
    requeue: Arc<AtomicBool>,
}

impl Control {
    /// Whether the job was stopped to go back to the queue rather than to end: its run's
    /// result is then not stored.
    pub fn requeued(&self) -> bool {
        self.requeue.load(Ordering::SeqCst)
    }
}

/// The held jobs. A job may be held twice (its message came back to this worker while the first
/// run was still going, after a lost broker connection); a cancellation stops both.
#[derive(Clone, Default)]
pub struct InFlight {
    jobs: Arc<Mutex<HashMap<(JobId, u64), Control>>>,
    serial: Arc<AtomicU64>,
}

impl InFlight {
    /// Holds job `id` until the returned guard drops.
    pub fn hold(&self, id: JobId) -> Held {
        let key = (id, self.serial.fetch_add(1, Ordering::Relaxed));
        let control = Control::default();
        self.lock().insert(key, control.clone());
        Held {
            key,
            control,
            jobs: self.clone(),
        }
    }

    /// How many jobs are held.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no job is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Stops every holding of job `id`; false when none is held here.
    pub fn cancel(&self, id: JobId) -> bool {
        let jobs = self.lock();
        let mut found = false;
        for control in jobs
            .iter()
            .filter(|((job, _), _)| *job == id)
            .map(|(_, c)| c)
        {
            control.token.cancel();
            found = true;
        }
        found
    }

    /// Stops every held job so that it goes back to the queue (the shutdown deadline).
    pub fn requeue_all(&self) -> usize {
        let jobs = self.lock();
        for control in jobs.values() {
            control.requeue.store(true, Ordering::SeqCst);
            control.token.cancel();
        }
        jobs.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(JobId, u64), Control>> {
        self.jobs.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One holding of a job; it is let go when this drops.
pub struct Held {
    key: (JobId, u64),
    pub control: Control,
    jobs: InFlight,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.jobs.lock().remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cancelling_stops_every_holding_of_the_job_and_only_it() {
        let jobs = InFlight::default();
        let (a, b) = (JobId::new(), JobId::new());
        let (first, second, other) = (jobs.hold(a), jobs.hold(a), jobs.hold(b));
        assert!(jobs.cancel(a));
        assert!(first.control.token.is_cancelled() && second.control.token.is_cancelled());
        assert!(!other.control.token.is_cancelled());
        assert!(!first.control.requeued());
        drop((first, second));
        assert!(!jobs.cancel(a), "let go of when dropped");
        assert_eq!(jobs.requeue_all(), 1);
        assert!(other.control.token.is_cancelled() && other.control.requeued());
    }
}

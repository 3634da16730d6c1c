//! Fair turns between callers. The jobs a worker holds wait for a run slot in one line per caller
//! (per API key, and one for the open service), and each slot that frees goes to the next line in
//! rotation. So a caller with a thousand jobs waiting delays another caller's job by at most the
//! runs already started, not by its backlog.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{oneshot, Notify};
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::executor::{Executor, Reservation};

/// Hands the executor's run slots to the callers' lines in turn.
#[derive(Clone)]
pub struct FairTurns {
    shared: Arc<Shared>,
}

struct Shared {
    lines: Arc<Mutex<Lines<Waiter>>>,
    wake: Arc<Notify>,
    /// Stops the dispatcher when the last handle goes.
    _stop: DropGuard,
}

/// A job waiting for its turn: where to send its slot.
type Waiter = oneshot::Sender<Reservation>;

/// The callers waiting, each with its line of `W`s, and whose turn is next.
struct Lines<W> {
    /// Callers with someone waiting, in turn order.
    rotation: VecDeque<Option<String>>,
    waiting: HashMap<Option<String>, VecDeque<W>>,
}

impl<W> Default for Lines<W> {
    fn default() -> Self {
        Self {
            rotation: VecDeque::new(),
            waiting: HashMap::new(),
        }
    }
}

impl<W> Lines<W> {
    fn join(&mut self, caller: Option<String>, waiter: W) {
        let line = self.waiting.entry(caller.clone()).or_default();
        if line.is_empty() {
            self.rotation.push_back(caller);
        }
        line.push_back(waiter);
    }

    /// The first waiter of the caller whose turn it is; the caller goes to the back of the
    /// rotation if more of its jobs wait.
    fn next(&mut self) -> Option<W> {
        let caller = self.rotation.pop_front()?;
        let line = self.waiting.get_mut(&caller)?;
        let waiter = line.pop_front();
        if line.is_empty() {
            self.waiting.remove(&caller);
        } else {
            self.rotation.push_back(caller);
        }
        waiter
    }
}

impl FairTurns {
    /// Fair turns over `executor`'s slots. Needs a tokio runtime (it spawns the dispatcher).
    pub fn new(executor: Executor) -> Self {
        let (lines, wake) = (Arc::default(), Arc::new(Notify::new()));
        let stop = CancellationToken::new();
        tokio::spawn(dispatch(
            executor,
            Arc::clone(&lines),
            Arc::clone(&wake),
            stop.clone(),
        ));
        Self {
            shared: Arc::new(Shared {
                lines,
                wake,
                _stop: stop.drop_guard(),
            }),
        }
    }

    /// Waits for `caller`'s turn and a free slot. Dropping the future leaves the line.
    pub async fn reserve(&self, caller: Option<&str>) -> Reservation {
        let (tx, rx) = oneshot::channel();
        self.shared
            .lines
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .join(caller.map(str::to_owned), tx);
        self.shared.wake.notify_one();
        rx.await
            .expect("the dispatcher lives as long as the turns' handles")
    }
}

/// Takes each slot as it frees and gives it to the next waiter in turn; a waiter that left
/// passes its turn on.
async fn dispatch(
    executor: Executor,
    lines: Arc<Mutex<Lines<Waiter>>>,
    wake: Arc<Notify>,
    stop: CancellationToken,
) {
    let lock = || lines.lock().unwrap_or_else(PoisonError::into_inner);
    // Waits for a wake-up (a job joined a line); false once the turns are dropped.
    let woken = || async {
        tokio::select! {
            () = wake.notified() => true,
            () = stop.cancelled() => false,
        }
    };
    loop {
        while lock().rotation.is_empty() {
            if !woken().await {
                return;
            }
        }
        let mut reservation = tokio::select! {
            reservation = executor.reserve() => reservation,
            () = stop.cancelled() => return,
        };
        loop {
            let next = lock().next();
            match next {
                Some(waiter) => match waiter.send(reservation) {
                    Ok(()) => break,
                    Err(back) => reservation = back,
                },
                // Everyone who waited left: the slot is kept for the next to come.
                None => {
                    if !woken().await {
                        return;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn turns_rotate_between_callers() {
        let mut lines = Lines::default();
        // A flood from one caller, then one job each from another key and the open service.
        for n in 0..100 {
            lines.join(Some("flood".to_owned()), format!("flood {n}"));
        }
        lines.join(Some("tutor".to_owned()), "tutor 0".to_owned());
        lines.join(None, "open 0".to_owned());
        let order: Vec<String> = std::iter::from_fn(|| lines.next()).take(5).collect();
        assert_eq!(
            order,
            ["flood 0", "tutor 0", "open 0", "flood 1", "flood 2"]
        );
        // A caller whose line emptied joins at the back again.
        lines.join(Some("tutor".to_owned()), "tutor 1".to_owned());
        assert_eq!(lines.next().unwrap(), "flood 3");
        assert_eq!(lines.next().unwrap(), "tutor 1");
        assert_eq!(lines.next().unwrap(), "flood 4");
    }
}

//! The state every handler shares.

use std::sync::Arc;
use std::time::Duration;

use pyrunner_shared::ledger::{Ledger, Period};
use pyrunner_shared::LimitPolicy;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::backend::Backend;
use crate::keys::KeyStore;
use crate::rate::RateLimiter;

/// Who may call, and the ledger their limits are held against.
pub struct Callers {
    pub keys: KeyStore,
    pub ledger: Ledger,
    /// Length of a quota period, in seconds.
    pub quota_period_secs: u64,
}

/// How synchronous runs wait: for their timeout plus `margin` before 504, and at most
/// `max_waiters` at once.
pub struct SyncWaits {
    pub margin: Duration,
    pub max_waiters: usize,
}

/// Shared, cheaply cloned state of the api.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    backend: Backend,
    policy: LimitPolicy,
    sync_margin: Duration,
    /// One permit per synchronous run that may wait at once.
    sync_waiters: Arc<Semaphore>,
    keys: KeyStore,
    rate: RateLimiter,
    ledger: Ledger,
    /// Length of a quota period, in seconds.
    quota_period_secs: u64,
    /// Until when the service is known to run open (no key in the store).
    open_until: std::sync::Mutex<Option<std::time::Instant>>,
}

impl AppState {
    /// State over `backend`, enforcing `policy` and the callers' own limits.
    pub fn new(backend: Backend, callers: Callers, policy: LimitPolicy, sync: SyncWaits) -> Self {
        let Callers {
            keys,
            ledger,
            quota_period_secs,
        } = callers;
        Self {
            inner: Arc::new(Inner {
                backend,
                policy,
                sync_margin: sync.margin,
                sync_waiters: Arc::new(Semaphore::new(sync.max_waiters.max(1))),
                ledger,
                quota_period_secs,
                rate: match &keys {
                    KeyStore::Redis(pool) => RateLimiter::Redis(pool.clone()),
                    KeyStore::File(_) => RateLimiter::memory(),
                },
                keys,
                open_until: std::sync::Mutex::new(None),
            }),
        }
    }

    /// A place among the synchronous runs that wait, if one is free.
    pub fn try_wait_place(&self) -> Option<OwnedSemaphorePermit> {
        self.inner.sync_waiters.clone().try_acquire_owned().ok()
    }

    /// Where the API keys are.
    pub fn keys(&self) -> &KeyStore {
        &self.inner.keys
    }

    /// Until when the service is known to run open, if it was found so lately.
    pub fn open_until(&self) -> Option<std::time::Instant> {
        *self
            .inner
            .open_until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records whether the service was found open, and until when to trust it.
    pub fn set_open_until(&self, until: Option<std::time::Instant>) {
        *self
            .inner
            .open_until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = until;
    }

    /// The request rates per key.
    pub fn rate(&self) -> &RateLimiter {
        &self.inner.rate
    }

    /// Each key's jobs in flight and usage.
    pub fn ledger(&self) -> &Ledger {
        &self.inner.ledger
    }

    /// The quota period that holds now.
    pub fn quota_period(&self) -> Period {
        Period::current(self.inner.quota_period_secs)
    }

    pub fn backend(&self) -> &Backend {
        &self.inner.backend
    }

    pub fn policy(&self) -> &LimitPolicy {
        &self.inner.policy
    }

    pub fn sync_margin(&self) -> Duration {
        self.inner.sync_margin
    }

    /// Largest request body read. JSON escapes can make a string up to six times longer than
    /// its text (`\u0000`), so the body may be larger than the code and stdin limits; what
    /// counts for those limits is checked after parsing.
    pub fn body_limit(&self) -> usize {
        let p = &self.inner.policy;
        (6 * (p.max_code_bytes + p.max_stdin_bytes) + 64 * 1024) as usize
    }
}

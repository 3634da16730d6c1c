//! The ledger of callers: which jobs each API key has in flight (queued or running), and what its
//! runs have used (runs by status, CPU ms, wall ms), in all and in the current quota period.
//!
//! The api admits a keyed job through the ledger, which refuses it past the key's concurrency or
//! its CPU quota for the period; the worker that finishes the job releases it and records its
//! usage. For a fleet the ledger is in Redis, on Redis's clock, so every api replica and worker
//! shares it; embedded, it is in memory, saved to a file that the admin command reads.
//!
//! A job's place among its key's jobs in flight lapses by itself `hold` after its admission (its
//! timeout and a margin), so that a release lost with a worker does not hold the place forever.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use deadpool_redis::Pool;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::job::JobId;
use crate::outcome::RunStatus;

/// A failure to read or write the ledger.
#[derive(Debug, Error)]
pub enum LedgerError {
    #[error("cannot reach redis for the usage ledger: {0}")]
    Redis(String),
    #[error("cannot read or write the usage file {path}: {message}")]
    File { path: PathBuf, message: String },
}

/// One quota period: the `index`-th span of `secs` seconds since the Unix epoch (with a day,
/// UTC days).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Period {
    pub secs: u64,
    pub index: u64,
}

impl Period {
    /// The period of `secs` seconds that holds the instant `unix_secs`.
    pub fn at(unix_secs: u64, secs: u64) -> Self {
        let secs = secs.max(1);
        Self {
            secs,
            index: unix_secs / secs,
        }
    }

    /// The period of `secs` seconds that holds now.
    pub fn current(secs: u64) -> Self {
        Self::at(unix_now().as_secs(), secs)
    }

    /// When it starts, in seconds since the Unix epoch.
    pub fn starts_at(self) -> u64 {
        self.index * self.secs
    }

    /// When it ends (and the next starts).
    pub fn ends_at(self) -> u64 {
        self.starts_at() + self.secs
    }

    /// Whole seconds from now until it ends (0 once it has).
    pub fn secs_left(self) -> u64 {
        self.ends_at().saturating_sub(unix_now().as_secs())
    }
}

fn unix_now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// What a key's runs used.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub runs: u64,
    /// Runs by their status (`success`, `timeout`, ...).
    pub by_status: BTreeMap<String, u64>,
    pub cpu_ms: u64,
    pub wall_ms: u64,
}

impl Usage {
    fn add(&mut self, run: &FinishedRun) {
        self.runs += 1;
        *self
            .by_status
            .entry(run.status.as_str().to_owned())
            .or_default() += 1;
        self.cpu_ms += run.cpu_ms;
        self.wall_ms += run.wall_ms;
    }

    /// From a Redis hash of the fields [`Ledger::finish`] counts.
    fn from_fields(fields: HashMap<String, u64>) -> Self {
        let mut usage = Usage::default();
        for (field, n) in fields {
            match field.as_str() {
                "runs" => usage.runs = n,
                "cpu_ms" => usage.cpu_ms = n,
                "wall_ms" => usage.wall_ms = n,
                other => {
                    if let Some(status) = other.strip_prefix("status:") {
                        usage.by_status.insert(status.to_owned(), n);
                    }
                }
            }
        }
        usage
    }
}

/// A key's standing: its usage in all and in a period, and its jobs in flight.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyUsage {
    pub total: Usage,
    pub period: Usage,
    /// Jobs admitted and not finished (queued or running).
    pub in_flight: u64,
}

/// What admitting a job asks of the ledger.
#[derive(Debug, Clone)]
pub struct Admission<'a> {
    pub caller: &'a str,
    pub job: JobId,
    pub period: Period,
    /// Most jobs of the key in flight at once, if limited.
    pub max_in_flight: Option<u32>,
    /// CPU ms the key's runs may use in the period, if limited.
    pub cpu_quota_ms: Option<u64>,
    /// How long the job's place lasts if no worker releases it.
    pub hold: Duration,
}

/// The ledger's answer to an admission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admitted {
    Yes,
    /// The key has `limit` jobs in flight already.
    TooManyInFlight {
        limit: u32,
    },
    /// The key's runs used `used_ms` of CPU in the period, at or past its quota.
    QuotaExhausted {
        used_ms: u64,
        quota_ms: u64,
    },
}

/// A run to release and record.
#[derive(Debug, Clone)]
pub struct FinishedRun {
    pub job: JobId,
    pub status: RunStatus,
    pub cpu_ms: u64,
    pub wall_ms: u64,
}

/// Redis keys of the ledger.
mod keys {
    use super::Period;

    pub fn in_flight(caller: &str) -> String {
        format!("pyrunner:inflight:{caller}")
    }
    pub fn total(caller: &str) -> String {
        format!("pyrunner:usage:{caller}")
    }
    pub fn period(caller: &str, period: Period) -> String {
        format!("pyrunner:usage:{caller}:{}:{}", period.secs, period.index)
    }
}

/// Admits a job, on Redis's clock. KEYS: the in-flight set, the period's usage. ARGV: job id,
/// hold ms, max in flight (0: none), CPU quota ms (0: none). Returns {0} when admitted,
/// {1, in flight} past the concurrency, {2, used ms} past the quota.
const ADMIT: &str = r#"
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local quota = tonumber(ARGV[4])
if quota > 0 then
  local used = tonumber(redis.call('HGET', KEYS[2], 'cpu_ms') or '0')
  if used >= quota then return {2, used} end
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local max = tonumber(ARGV[3])
if max > 0 then
  local n = redis.call('ZCARD', KEYS[1])
  if n >= max then return {1, n} end
end
local hold = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now + hold, ARGV[1])
if redis.call('PTTL', KEYS[1]) < hold then redis.call('PEXPIRE', KEYS[1], hold) end
return {0, 0}
"#;

/// Where the ledger is.
#[derive(Clone)]
pub enum Ledger {
    /// In Redis, through this pool.
    Redis(Pool),
    Memory(MemoryLedger),
}

impl Ledger {
    /// A ledger in this process's memory, loaded from and saved to `file` when given.
    pub fn memory(file: Option<&Path>) -> Result<Self, LedgerError> {
        MemoryLedger::load(file).map(Ledger::Memory)
    }

    /// Admits job `a.job` of `a.caller`, unless that takes the key past a limit.
    pub async fn admit(&self, a: &Admission<'_>) -> Result<Admitted, LedgerError> {
        match self {
            Ledger::Redis(pool) => {
                let mut conn = pool.get().await.map_err(redis_error)?;
                let (code, n): (u8, u64) = redis::Script::new(ADMIT)
                    .key(keys::in_flight(a.caller))
                    .key(keys::period(a.caller, a.period))
                    .arg(a.job.to_string())
                    .arg(a.hold.as_millis().max(1) as u64)
                    .arg(a.max_in_flight.unwrap_or(0))
                    .arg(a.cpu_quota_ms.unwrap_or(0))
                    .invoke_async(&mut *conn)
                    .await
                    .map_err(redis_error)?;
                Ok(match code {
                    0 => Admitted::Yes,
                    1 => Admitted::TooManyInFlight {
                        limit: a.max_in_flight.unwrap_or(0),
                    },
                    _ => Admitted::QuotaExhausted {
                        used_ms: n,
                        quota_ms: a.cpu_quota_ms.unwrap_or(0),
                    },
                })
            }
            Ledger::Memory(memory) => Ok(memory.admit(a)),
        }
    }

    /// Gives back the place of a job that was admitted but could not be queued.
    pub async fn release(&self, caller: &str, job: JobId) -> Result<(), LedgerError> {
        match self {
            Ledger::Redis(pool) => {
                let mut conn = pool.get().await.map_err(redis_error)?;
                let _: i64 = redis::cmd("ZREM")
                    .arg(keys::in_flight(caller))
                    .arg(job.to_string())
                    .query_async(&mut *conn)
                    .await
                    .map_err(redis_error)?;
                Ok(())
            }
            Ledger::Memory(memory) => {
                memory.release(caller, job);
                Ok(())
            }
        }
    }

    /// Releases a finished job's place and records its run, in all and in `period`.
    pub async fn finish(
        &self,
        caller: &str,
        period: Option<Period>,
        run: &FinishedRun,
    ) -> Result<(), LedgerError> {
        match self {
            Ledger::Redis(pool) => {
                let mut conn = pool.get().await.map_err(redis_error)?;
                let mut pipe = redis::pipe();
                pipe.cmd("ZREM")
                    .arg(keys::in_flight(caller))
                    .arg(run.job.to_string())
                    .ignore();
                let status = format!("status:{}", run.status.as_str());
                let mut count = |key: &str| {
                    pipe.hincr(key, "runs", 1)
                        .ignore()
                        .hincr(key, &status, 1)
                        .ignore()
                        .hincr(key, "cpu_ms", run.cpu_ms)
                        .ignore()
                        .hincr(key, "wall_ms", run.wall_ms)
                        .ignore();
                };
                count(&keys::total(caller));
                if let Some(period) = period {
                    let key = keys::period(caller, period);
                    count(&key);
                    // Kept through the next period, for a look back.
                    pipe.cmd("EXPIREAT")
                        .arg(&key)
                        .arg(period.ends_at() + period.secs)
                        .ignore();
                }
                pipe.query_async::<()>(&mut *conn)
                    .await
                    .map_err(redis_error)
            }
            Ledger::Memory(memory) => {
                memory.finish(caller, period, run);
                Ok(())
            }
        }
    }

    /// The standing of the key named `caller`, with its usage in `period`.
    pub async fn usage(&self, caller: &str, period: Period) -> Result<KeyUsage, LedgerError> {
        match self {
            Ledger::Redis(pool) => {
                let mut conn = pool.get().await.map_err(redis_error)?;
                let now_ms = unix_now().as_millis() as u64;
                let (total, in_period, in_flight): (
                    HashMap<String, u64>,
                    HashMap<String, u64>,
                    u64,
                ) = redis::pipe()
                    .hgetall(keys::total(caller))
                    .hgetall(keys::period(caller, period))
                    .cmd("ZCOUNT")
                    .arg(keys::in_flight(caller))
                    .arg(now_ms)
                    .arg("+inf")
                    .query_async(&mut *conn)
                    .await
                    .map_err(redis_error)?;
                Ok(KeyUsage {
                    total: Usage::from_fields(total),
                    period: Usage::from_fields(in_period),
                    in_flight,
                })
            }
            Ledger::Memory(memory) => Ok(memory.usage(caller, period)),
        }
    }

    /// Saves an in-memory ledger to its file, if it has one and changed since the last save.
    pub fn save(&self) -> Result<(), LedgerError> {
        match self {
            Ledger::Redis(_) => Ok(()),
            Ledger::Memory(memory) => memory.save(),
        }
    }
}

fn redis_error(e: impl std::fmt::Display) -> LedgerError {
    LedgerError::Redis(e.to_string())
}

/// The ledger of embedded mode.
#[derive(Clone)]
pub struct MemoryLedger {
    inner: Arc<Mutex<MemoryInner>>,
    file: Option<PathBuf>,
}

#[derive(Default)]
struct MemoryInner {
    callers: HashMap<String, CallerBook>,
    /// Changed since the last save.
    dirty: bool,
}

/// One key's entries; what is saved of it is its usage.
#[derive(Default, Serialize, Deserialize)]
struct CallerBook {
    total: Usage,
    /// Usage by period, the current and the one before.
    periods: Vec<(Period, Usage)>,
    #[serde(skip)]
    in_flight: HashMap<JobId, Instant>,
}

impl CallerBook {
    fn live_in_flight(&mut self) -> usize {
        let now = Instant::now();
        self.in_flight.retain(|_, until| *until > now);
        self.in_flight.len()
    }

    fn period(&self, period: Period) -> Usage {
        self.periods
            .iter()
            .find(|(p, _)| *p == period)
            .map(|(_, usage)| usage.clone())
            .unwrap_or_default()
    }
}

impl MemoryLedger {
    fn load(file: Option<&Path>) -> Result<Self, LedgerError> {
        let callers = match file {
            Some(path) => match std::fs::read_to_string(path) {
                Ok(text) => serde_json::from_str(&text).map_err(|e| LedgerError::File {
                    path: path.to_owned(),
                    message: e.to_string(),
                })?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => HashMap::new(),
                Err(e) => {
                    return Err(LedgerError::File {
                        path: path.to_owned(),
                        message: e.to_string(),
                    })
                }
            },
            None => HashMap::new(),
        };
        Ok(Self {
            inner: Arc::new(Mutex::new(MemoryInner {
                callers,
                dirty: false,
            })),
            file: file.map(Path::to_owned),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryInner> {
        // Every change is a few field updates of one entry: a poisoned lock is still consistent.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn admit(&self, a: &Admission<'_>) -> Admitted {
        let mut inner = self.lock();
        let book = inner.callers.entry(a.caller.to_owned()).or_default();
        if let Some(quota_ms) = a.cpu_quota_ms {
            let used_ms = book.period(a.period).cpu_ms;
            if used_ms >= quota_ms {
                return Admitted::QuotaExhausted { used_ms, quota_ms };
            }
        }
        if let Some(limit) = a.max_in_flight {
            if book.live_in_flight() >= limit as usize {
                return Admitted::TooManyInFlight { limit };
            }
        }
        book.in_flight.insert(a.job, Instant::now() + a.hold);
        Admitted::Yes
    }

    fn release(&self, caller: &str, job: JobId) {
        if let Some(book) = self.lock().callers.get_mut(caller) {
            book.in_flight.remove(&job);
        }
    }

    fn finish(&self, caller: &str, period: Option<Period>, run: &FinishedRun) {
        let mut inner = self.lock();
        inner.dirty = true;
        let book = inner.callers.entry(caller.to_owned()).or_default();
        book.in_flight.remove(&run.job);
        book.total.add(run);
        if let Some(period) = period {
            // The current period and the one before are kept.
            book.periods
                .retain(|(p, _)| p.secs != period.secs || p.index + 1 >= period.index);
            match book.periods.iter_mut().find(|(p, _)| *p == period) {
                Some((_, usage)) => usage.add(run),
                None => {
                    let mut usage = Usage::default();
                    usage.add(run);
                    book.periods.push((period, usage));
                }
            }
        }
    }

    fn usage(&self, caller: &str, period: Period) -> KeyUsage {
        let mut inner = self.lock();
        let Some(book) = inner.callers.get_mut(caller) else {
            return KeyUsage::default();
        };
        KeyUsage {
            in_flight: book.live_in_flight() as u64,
            total: book.total.clone(),
            period: book.period(period),
        }
    }

    /// Writes the usage to the file (a new file renamed over it), if it changed.
    fn save(&self) -> Result<(), LedgerError> {
        let Some(path) = &self.file else {
            return Ok(());
        };
        let json = {
            let mut inner = self.lock();
            if !inner.dirty {
                return Ok(());
            }
            inner.dirty = false;
            serde_json::to_vec_pretty(&inner.callers).expect("usage serialises")
        };
        let error = |e: std::io::Error| LedgerError::File {
            path: path.clone(),
            message: e.to_string(),
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(error)?;
        }
        let temp = path.with_extension("tmp");
        std::fs::write(&temp, json).map_err(error)?;
        std::fs::rename(&temp, path).map_err(error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(job: JobId, status: RunStatus, cpu_ms: u64) -> FinishedRun {
        FinishedRun {
            job,
            status,
            cpu_ms,
            wall_ms: cpu_ms + 5,
        }
    }

    #[test]
    fn periods_split_time_from_the_epoch() {
        let day = Period::at(86_400 * 3 + 5, 86_400);
        assert_eq!(day.index, 3);
        assert_eq!((day.starts_at(), day.ends_at()), (259_200, 345_600));
        assert_eq!(Period::at(86_400 * 4, 86_400).index, 4);
        assert_eq!(
            Period::at(7, 0).secs,
            1,
            "a zero length is taken as a second"
        );
    }

    #[tokio::test]
    async fn memory_ledger_holds_the_limits_and_counts_usage() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("usage.json");
        let ledger = Ledger::memory(Some(&file)).unwrap();
        let period = Period::at(1000, 100);
        let admission = |job, max, quota| Admission {
            caller: "tutor",
            job,
            period,
            max_in_flight: max,
            cpu_quota_ms: quota,
            hold: Duration::from_secs(60),
        };
        let (a, b) = (JobId::new(), JobId::new());
        assert_eq!(
            ledger.admit(&admission(a, Some(1), None)).await.unwrap(),
            Admitted::Yes
        );
        assert_eq!(
            ledger.admit(&admission(b, Some(1), None)).await.unwrap(),
            Admitted::TooManyInFlight { limit: 1 }
        );
        assert_eq!(ledger.usage("tutor", period).await.unwrap().in_flight, 1);
        ledger
            .finish("tutor", Some(period), &run(a, RunStatus::Success, 300))
            .await
            .unwrap();
        assert_eq!(
            ledger
                .admit(&admission(b, Some(1), Some(300)))
                .await
                .unwrap(),
            Admitted::QuotaExhausted {
                used_ms: 300,
                quota_ms: 300
            }
        );
        // The next period has its own quota.
        let next = Period::at(1100, 100);
        assert_eq!(
            ledger
                .admit(&Admission {
                    period: next,
                    ..admission(b, Some(1), Some(300))
                })
                .await
                .unwrap(),
            Admitted::Yes
        );
        ledger
            .finish("tutor", Some(next), &run(b, RunStatus::Timeout, 50))
            .await
            .unwrap();
        let usage = ledger.usage("tutor", next).await.unwrap();
        assert_eq!(usage.in_flight, 0);
        assert_eq!(usage.period.cpu_ms, 50);
        assert_eq!(usage.total.runs, 2);
        assert_eq!(usage.total.cpu_ms, 350);
        assert_eq!(usage.total.wall_ms, 360);
        assert_eq!(usage.total.by_status["success"], 1);
        assert_eq!(usage.total.by_status["timeout"], 1);

        // Saved, a new ledger on the same file (the admin command) reads the same usage.
        ledger.save().unwrap();
        let reread = Ledger::memory(Some(&file)).unwrap();
        assert_eq!(reread.usage("tutor", next).await.unwrap(), usage);
    }

    #[test]
    fn a_place_lapses_after_its_hold() {
        let ledger = MemoryLedger::load(None).unwrap();
        let period = Period::at(0, 10);
        let admission = |job| Admission {
            caller: "c",
            job,
            period,
            max_in_flight: Some(1),
            cpu_quota_ms: None,
            hold: Duration::from_millis(20),
        };
        assert_eq!(ledger.admit(&admission(JobId::new())), Admitted::Yes);
        assert!(matches!(
            ledger.admit(&admission(JobId::new())),
            Admitted::TooManyInFlight { .. }
        ));
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(ledger.admit(&admission(JobId::new())), Admitted::Yes);
    }

    #[test]
    fn usage_reads_back_from_redis_fields() {
        let fields = HashMap::from([
            ("runs".to_owned(), 3),
            ("status:success".to_owned(), 2),
            ("status:error".to_owned(), 1),
            ("cpu_ms".to_owned(), 40),
            ("wall_ms".to_owned(), 90),
        ]);
        let usage = Usage::from_fields(fields);
        assert_eq!((usage.runs, usage.cpu_ms, usage.wall_ms), (3, 40, 90));
        assert_eq!(usage.by_status.len(), 2);
    }
}

//! The live workers of a fleet and what each reported of its runtime, kept in Redis so that the
//! api can tell what every run gets, whichever worker takes it.
//!
//! Each worker reports its [`RuntimeInfo`](crate::runtime::RuntimeInfo) when it is ready and
//! every [`REPORT_EVERY`] after (a Redis restart loses the roster), and withdraws it when it
//! stops. A worker that died without withdrawing drops out once it has missed three reports.
//! Two keys per job queue `base`: the sorted set `pyrunner:workers:<base>` holds each worker's
//! id with the time of its last report, and the hash `pyrunner:workers:<base>:reports` its
//! report. Times are Redis's own, so the workers' clocks do not matter.

use std::time::Duration;

use deadpool_redis::Pool;

use crate::store::StoreError;

/// How often a worker reports.
pub const REPORT_EVERY: Duration = Duration::from_secs(10);

/// How long a report counts without being renewed: three reports missed, and a margin.
const LIVE_FOR: Duration = Duration::from_secs(3 * REPORT_EVERY.as_secs() + 5);

/// How long the roster of a fleet that no worker reports to any more stays in Redis.
const FORGET_AFTER: Duration = Duration::from_secs(24 * 3600);

/// Records worker `ARGV[1]`'s report `ARGV[2]` at the server's time, and forgets the workers
/// whose last report is older than `ARGV[3]` ms.
const REPORT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[1], now, ARGV[1])
local stale = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[3]))
for _, id in ipairs(stale) do
  redis.call('HDEL', KEYS[2], id)
  redis.call('ZREM', KEYS[1], id)
end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return #stale
";

/// The reports of the workers whose last report is at most `ARGV[1]` ms old.
const LIVE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], now - tonumber(ARGV[1]), '+inf')
if #ids == 0 then
  return {}
end
return redis.call('HMGET', KEYS[2], unpack(ids))
";

/// The workers of the job queue `base`.
#[derive(Clone)]
pub struct WorkerRoster {
    pool: Pool,
    /// The sorted set of worker ids by the time of their last report.
    members: String,
    /// The hash of their reports.
    reports: String,
}

impl WorkerRoster {
    /// The roster of the workers of the job queue `base`, in the Redis reached through `pool`.
    pub fn new(pool: Pool, base: &str) -> Self {
        let members = format!("pyrunner:workers:{base}");
        Self {
            pool,
            reports: format!("{members}:reports"),
            members,
        }
    }

    /// Records that `worker` is live, with its runtime report (JSON).
    pub async fn report(&self, worker: &str, report: &str) -> Result<(), StoreError> {
        let mut conn = self.pool.get().await?;
        let _: i64 = redis::Script::new(REPORT)
            .key(&self.members)
            .key(&self.reports)
            .arg(worker)
            .arg(report)
            .arg(LIVE_FOR.as_millis() as u64)
            .arg(FORGET_AFTER.as_millis() as u64)
            .invoke_async(&mut *conn)
            .await?;
        Ok(())
    }

    /// Puts a worker with the runtime `report` (JSON) on the roster under a new id, and keeps
    /// it there, reporting every [`REPORT_EVERY`], until [`Membership::leave`]. Fails if the
    /// first report cannot be made.
    pub async fn join(&self, report: String) -> Result<Membership, StoreError> {
        let id = uuid::Uuid::new_v4().to_string();
        self.report(&id, &report).await?;
        let (roster, worker) = (self.clone(), id.clone());
        let renewal = tokio::spawn(async move {
            loop {
                tokio::time::sleep(REPORT_EVERY).await;
                if let Err(error) = roster.report(&worker, &report).await {
                    tracing::debug!(%error, "cannot renew this worker's report");
                }
            }
        });
        Ok(Membership {
            roster: self.clone(),
            id,
            renewal,
        })
    }

    /// Takes `worker` off the roster (it is stopping).
    pub async fn withdraw(&self, worker: &str) -> Result<(), StoreError> {
        let mut conn = self.pool.get().await?;
        let _: () = redis::pipe()
            .atomic()
            .zrem(&self.members, worker)
            .ignore()
            .hdel(&self.reports, worker)
            .ignore()
            .query_async(&mut *conn)
            .await?;
        Ok(())
    }

    /// The reports (JSON) of the live workers, the most lately renewed last.
    pub async fn live(&self) -> Result<Vec<String>, StoreError> {
        let mut conn = self.pool.get().await?;
        let reports: Vec<Option<String>> = redis::Script::new(LIVE)
            .key(&self.members)
            .key(&self.reports)
            .arg(LIVE_FOR.as_millis() as u64)
            .invoke_async(&mut *conn)
            .await?;
        Ok(reports.into_iter().flatten().collect())
    }
}

/// A worker's place on the roster, renewed until it leaves.
pub struct Membership {
    roster: WorkerRoster,
    id: String,
    renewal: tokio::task::JoinHandle<()>,
}

impl Membership {
    /// Stops renewing, and takes the worker off the roster at once (else it would count for
    /// the api until its last report lapsed).
    pub async fn leave(self) {
        self.renewal.abort();
        if let Err(error) = self.roster.withdraw(&self.id).await {
            tracing::warn!(%error, worker = %self.id, "cannot take this worker off the roster");
        }
    }
}

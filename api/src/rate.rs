//! Request rates per API key, held across api replicas: the generic cell rate algorithm (GCRA).
//! Each key has a theoretical arrival time (TAT); a request is allowed while the TAT is at most
//! `burst - 1` intervals ahead of now, and moves it one interval on. One number per key, kept in
//! Redis (`pyrunner:rate:<name>`, updated by one script on Redis's own clock, so replicas with
//! skewed clocks agree) for a fleet, or in memory embedded.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use deadpool_redis::Pool;

/// A key's rate: `per_sec` requests a second on average, up to `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub per_sec: f64,
    pub burst: u32,
}

impl Rate {
    /// Milliseconds between requests at the average rate.
    fn interval_ms(self) -> f64 {
        1000.0 / self.per_sec.max(1e-6)
    }
}

/// What the limiter decided for one request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decision {
    pub allowed: bool,
    /// Requests still allowed at once after this one.
    pub remaining: u32,
    /// When denied: milliseconds until a request would be allowed.
    pub retry_after_ms: u64,
    /// Milliseconds until the full burst is available again.
    pub reset_ms: u64,
}

/// The GCRA step: from the stored TAT (if any) and now, in ms, the decision and the new TAT.
pub fn step(tat: Option<f64>, now: f64, rate: Rate) -> (Decision, f64) {
    let t = rate.interval_ms();
    let tolerance = f64::from(rate.burst.max(1) - 1) * t;
    let tat = tat.unwrap_or(now).max(now);
    if tat - now > tolerance {
        let decision = Decision {
            allowed: false,
            remaining: 0,
            retry_after_ms: (tat - now - tolerance).ceil() as u64,
            reset_ms: (tat - now).ceil() as u64,
        };
        return (decision, tat);
    }
    let new_tat = tat + t;
    let decision = Decision {
        allowed: true,
        // Whole requests left; the small term keeps a float error from costing one.
        remaining: ((now + tolerance + t - new_tat) / t + 1e-6)
            .floor()
            .max(0.0) as u32,
        retry_after_ms: 0,
        reset_ms: (new_tat - now).ceil() as u64,
    };
    (decision, new_tat)
}

/// The same step in Redis, on Redis's clock. Returns {allowed, remaining, retry_after_ms,
/// reset_ms}.
const GCRA: &str = r#"
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + tonumber(time[2]) / 1000
local t = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
if tat - now > tolerance then
  return {0, 0, math.ceil(tat - now - tolerance), math.ceil(tat - now)}
end
local new_tat = tat + t
redis.call('SET', KEYS[1], tostring(new_tat), 'PX', math.max(1, math.ceil(new_tat - now)))
local remaining = math.floor((now + tolerance + t - new_tat) / t + 1e-6)
if remaining < 0 then remaining = 0 end
return {1, remaining, 0, math.ceil(new_tat - now)}
"#;

/// Where the TATs live.
#[derive(Clone)]
pub enum RateLimiter {
    Redis(Pool),
    Memory(Arc<Mutex<(Instant, HashMap<String, f64>)>>),
}

impl RateLimiter {
    /// A limiter in this process's memory (embedded mode).
    pub fn memory() -> Self {
        RateLimiter::Memory(Arc::new(Mutex::new((Instant::now(), HashMap::new()))))
    }

    /// Decides one request of the key named `name`.
    pub async fn check(&self, name: &str, rate: Rate) -> Result<Decision, String> {
        match self {
            RateLimiter::Redis(pool) => {
                let mut conn = pool.get().await.map_err(|e| e.to_string())?;
                let t = rate.interval_ms();
                let tolerance = f64::from(rate.burst.max(1) - 1) * t;
                let (allowed, remaining, retry_after_ms, reset_ms): (i64, u32, u64, u64) =
                    redis::Script::new(GCRA)
                        .key(format!("pyrunner:rate:{name}"))
                        .arg(t)
                        .arg(tolerance)
                        .invoke_async(&mut *conn)
                        .await
                        .map_err(|e| e.to_string())?;
                Ok(Decision {
                    allowed: allowed == 1,
                    remaining,
                    retry_after_ms,
                    reset_ms,
                })
            }
            RateLimiter::Memory(state) => {
                let mut state = state.lock().unwrap_or_else(PoisonError::into_inner);
                let now = state.0.elapsed().as_secs_f64() * 1000.0;
                let (decision, tat) = step(state.1.get(name).copied(), now, rate);
                state.1.insert(name.to_owned(), tat);
                Ok(decision)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_average_rate() {
        let rate = Rate {
            per_sec: 2.0,
            burst: 3,
        };
        let mut tat = None;
        let mut at = |now: f64| {
            let (decision, next) = step(tat, now, rate);
            tat = Some(next);
            decision
        };
        // Three at once, with 2, 1, 0 left; the fourth waits one interval (500 ms) less the
        // time gone.
        assert_eq!(at(0.0).remaining, 2);
        assert_eq!(at(0.0).remaining, 1);
        assert_eq!(at(0.0).remaining, 0);
        let denied = at(100.0);
        assert!(!denied.allowed);
        assert_eq!(denied.retry_after_ms, 400);
        // A denied request does not move the TAT: at 500 ms one is allowed again.
        assert!(at(500.0).allowed);
        assert!(!at(600.0).allowed);
        // After a long pause the whole burst is back.
        assert_eq!(at(10_000.0).remaining, 2);
        // Whatever the clock reads: sums of such floats are not exact.
        for now in [1234.567891, 98765.4321, 0.1 + 0.2] {
            assert_eq!(step(None, now, rate).0.remaining, 2, "at {now}");
        }
    }
}

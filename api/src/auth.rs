//! Who is calling: the API key in `Authorization: Bearer <key>` or `X-API-Key`, checked against
//! the key store on every guarded request (so a revocation holds at once, on every replica).
//! With no key in the store the service runs open.

use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;
use crate::keys::{self, KeyPolicy, KeyRecord};
use crate::rate::{Decision, Rate};
use crate::state::AppState;

/// How long the service, found open (no key at all), is taken to stay open before the store is
/// asked again.
pub const OPEN_CHECK_EVERY: Duration = Duration::from_secs(1);

/// The caller of a request: its key's record, or `None` when the service runs open.
#[derive(Debug, Clone)]
pub struct Caller(pub Option<KeyRecord>);

impl Caller {
    /// The caller's policy (none when open).
    pub fn policy(&self) -> KeyPolicy {
        self.0
            .as_ref()
            .map(|record| record.policy.clone())
            .unwrap_or_default()
    }
}

/// The key a request presents, if any.
fn presented(headers: &HeaderMap) -> Option<&str> {
    let bearer = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        });
    bearer
        .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()))
        .map(str::trim)
        .filter(|key| !key.is_empty())
}

/// The middleware of the guarded routes: 401 without a known key (once any key exists), 403
/// with a revoked one; else the request goes on with its [`Caller`].
pub async fn authenticate(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    // While the service runs open, a request costs no lookup; a first key takes effect within
    // OPEN_CHECK_EVERY. Once keys exist, every request is looked up (a revocation holds at once).
    if state
        .open_until()
        .is_some_and(|until| Instant::now() < until)
    {
        request.extensions_mut().insert(Caller(None));
        return Ok(next.run(request).await);
    }
    let key = presented(request.headers());
    let digest = key.map(keys::digest).unwrap_or_default();
    let (record, any) = state
        .keys()
        .lookup(&digest)
        .await
        .map_err(|e| ApiError::unavailable("cannot check the API key", e))?;
    state.set_open_until((!any).then(|| Instant::now() + OPEN_CHECK_EVERY));
    let caller = match (record, any, key) {
        (_, false, _) => Caller(None),
        (Some(record), true, _) if record.revoked_at.is_some() => {
            return Err(ApiError::key_revoked(&record.name));
        }
        (Some(record), true, _) => Caller(Some(record)),
        (None, true, None) => return Err(ApiError::unauthorized("missing API key")),
        (None, true, Some(_)) => return Err(ApiError::unauthorized("unknown API key")),
    };
    let limited = match &caller.0 {
        Some(record) => record.policy.rate().map(|rate| (record.name.clone(), rate)),
        None => None,
    };
    let Some((name, rate)) = limited else {
        request.extensions_mut().insert(caller);
        return Ok(next.run(request).await);
    };
    let decision = state
        .rate()
        .check(&name, rate)
        .await
        .map_err(|e| ApiError::unavailable("cannot check the request rate", e))?;
    let mut response = if decision.allowed {
        request.extensions_mut().insert(caller);
        next.run(request).await
    } else {
        ApiError::rate_limited(&name, rate.per_sec).into_response()
    };
    rate_headers(response.headers_mut(), rate, decision);
    Ok(response)
}

/// The RateLimit headers (IETF draft) of a limited key, and Retry-After when denied.
fn rate_headers(headers: &mut HeaderMap, rate: Rate, decision: Decision) {
    let secs = |ms: u64| HeaderValue::from(ms.div_ceil(1000));
    headers.insert("ratelimit-limit", HeaderValue::from(rate.burst));
    headers.insert("ratelimit-remaining", HeaderValue::from(decision.remaining));
    headers.insert("ratelimit-reset", secs(decision.reset_ms));
    if !decision.allowed {
        headers.insert(header::RETRY_AFTER, secs(decision.retry_after_ms.max(1)));
    }
}

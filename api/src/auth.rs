//! Who is calling: the API key in `Authorization: Bearer <key>` or `X-API-Key`, checked against
//! the key store on every guarded request (so a revocation holds at once, on every replica).
//! With no key in the store the service runs open.

use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::Response;

use crate::error::ApiError;
use crate::keys::{self, KeyPolicy, KeyRecord};
use crate::state::AppState;

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
    let key = presented(request.headers());
    let digest = key.map(keys::digest).unwrap_or_default();
    let (record, any) = state
        .keys()
        .lookup(&digest)
        .await
        .map_err(|e| ApiError::unavailable("cannot check the API key", e))?;
    let caller = match (record, any, key) {
        (_, false, _) => Caller(None),
        (Some(record), true, _) if record.revoked_at.is_some() => {
            return Err(ApiError::key_revoked(&record.name));
        }
        (Some(record), true, _) => Caller(Some(record)),
        (None, true, None) => return Err(ApiError::unauthorized("missing API key")),
        (None, true, Some(_)) => return Err(ApiError::unauthorized("unknown API key")),
    };
    request.extensions_mut().insert(caller);
    Ok(next.run(request).await)
}

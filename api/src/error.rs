//! The API's one error type: a stable machine-readable `code`, a human `message`, and the
//! HTTP status. Details of server-side failures are logged, never sent.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use pyrunner_shared::JobId;
use serde_json::json;

/// An HTTP error response.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    job_id: Option<JobId>,
    /// The caller's limit that was reached, named as in its key's policy.
    limit: Option<&'static str>,
    /// Seconds after which the request may succeed.
    retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            job_id: None,
            limit: None,
            retry_after: None,
        }
    }

    /// The body is not valid JSON (or not UTF-8).
    pub fn invalid_json(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_json", message)
    }

    /// The body is JSON but a field is missing, unknown or of the wrong type.
    pub fn invalid_field(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", message)
    }

    /// A value is outside what the server allows.
    pub fn out_of_range(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "limit_out_of_range",
            message,
        )
    }

    /// The body or the code is larger than allowed.
    pub fn too_large(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, code, message)
    }

    /// The body is not declared as JSON.
    pub fn unsupported_media_type() -> Self {
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the request body as JSON with content-type: application/json",
        )
    }

    /// No job with this id exists (or it has expired).
    pub fn job_not_found(id: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "job_not_found",
            format!("no job {id}: unknown, or its result has expired"),
        )
    }

    /// The job has a result already, so it cannot be cancelled.
    pub fn job_finished(id: JobId) -> Self {
        Self {
            job_id: Some(id),
            ..Self::new(
                StatusCode::CONFLICT,
                "job_finished",
                format!("job {id} has finished already; GET /jobs/{id} has its result"),
            )
        }
    }

    /// No key, or an unknown one, where the service requires keys.
    pub fn unauthorized(what: &str) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            format!("{what}: send it as Authorization: Bearer <key>, or X-API-Key: <key>"),
        )
    }

    /// The key is past its request rate.
    pub fn rate_limited(name: &str, per_sec: f64) -> Self {
        Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!("the API key {name:?} is over its rate of {per_sec} requests a second"),
        )
    }

    /// The key has as many jobs queued or running as its policy allows.
    pub fn too_many_in_flight(name: &str, limit: u32) -> Self {
        Self {
            limit: Some("max_concurrent"),
            retry_after: Some(1),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "concurrency_limit",
                format!(
                    "the API key {name:?} already has its max_concurrent of {limit} jobs queued \
                     or running; wait for one to finish"
                ),
            )
        }
    }

    /// The key's runs used up its CPU quota for the period, which ends in `resets_in` seconds.
    pub fn quota_exhausted(name: &str, used_ms: u64, quota_ms: u64, resets_in: u64) -> Self {
        Self {
            limit: Some("cpu_quota_secs"),
            retry_after: Some(resets_in.max(1)),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "quota_exhausted",
                format!(
                    "the API key {name:?} used {:.3} CPU seconds of its quota of {:.3} for this \
                     period, which ends in {resets_in} s",
                    used_ms as f64 / 1000.0,
                    quota_ms as f64 / 1000.0
                ),
            )
        }
    }

    /// The key may not use the admin endpoints.
    pub fn not_admin(name: &str) -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "not_admin",
            format!(
                "the API key {name:?} is not an admin key; make one with \
                 `pyrunner-api keys create --name <name> --admin`"
            ),
        )
    }

    /// No key has this name.
    pub fn key_not_found(name: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "key_not_found",
            format!("no API key is named {name:?}"),
        )
    }

    /// The key was revoked.
    pub fn key_revoked(name: &str) -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "key_revoked",
            format!("the API key {name:?} was revoked"),
        )
    }

    /// The route does not exist.
    pub fn route_not_found(path: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no route {path}"),
        )
    }

    /// The route exists with other methods.
    pub fn method_not_allowed() -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "this method is not allowed on this route",
        )
    }

    /// A synchronous run did not finish within its wait; the job goes on and can be polled.
    pub fn result_not_ready(id: JobId) -> Self {
        Self {
            job_id: Some(id),
            ..Self::new(
                StatusCode::GATEWAY_TIMEOUT,
                "result_not_ready",
                format!("job {id} has no result yet; poll GET /jobs/{id}"),
            )
        }
    }

    /// The service is at one of its limits (`code` names which); the client should retry later.
    pub fn overloaded(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, code, message)
    }

    /// A dependency (broker, store, workers) is unreachable. The cause is logged.
    pub fn unavailable(context: &str, cause: impl std::fmt::Display) -> Self {
        tracing::error!(%cause, "{context}");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
            format!("{context}; try again shortly"),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut error = json!({ "code": self.code, "message": self.message });
        if let Some(id) = self.job_id {
            error["job_id"] = json!(id);
        }
        if let Some(limit) = self.limit {
            error["limit"] = json!(limit);
        }
        let mut response = (self.status, Json(json!({ "error": error }))).into_response();
        if let Some(id) = self.job_id {
            if let Ok(location) = HeaderValue::from_str(&format!("/jobs/{id}")) {
                response.headers_mut().insert(header::LOCATION, location);
            }
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        let retry_after = self
            .retry_after
            .or((self.status == StatusCode::SERVICE_UNAVAILABLE).then_some(1));
        if let Some(secs) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

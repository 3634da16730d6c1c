//! The HTTP routes.

use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::{header, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use pyrunner_shared::backoff::Backoff;
use pyrunner_shared::isolation;
use pyrunner_shared::ledger::{Admission, Admitted};
use pyrunner_shared::limits::LimitError;
use pyrunner_shared::queue::QueueError;
use pyrunner_shared::{Job, JobId, JobState, JobView, RunRequest, RunResult};
use serde_json::json;

use crate::auth::{self, Caller};
use crate::backend::{Cancelled, SubmitError};
use crate::body::JsonBody;
use crate::error::ApiError;
use crate::state::AppState;

/// The router of the api, over `state`.
pub fn app(state: AppState) -> Router {
    let guarded = Router::new()
        .route("/isolation", get(isolation))
        .route("/run", post(run_code))
        .route("/jobs", post(submit_job))
        .route("/jobs/{id}", get(get_job).delete(cancel_job))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::authenticate,
        ));
    Router::new()
        .route("/", get(service_info))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .merge(guarded)
        .nest("/admin", crate::admin::routes(state.clone()))
        .fallback(route_not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(state)
}

/// Resolves a request into a job, within the server's limits and the caller's, or says which
/// field is wrong. A request silent on a limit gets the server's default, lowered to the
/// caller's maximum.
fn accept(state: &AppState, caller: &Caller, mut request: RunRequest) -> Result<Job, ApiError> {
    let key = caller.policy();
    let server = state.policy();
    for (asked, default, max, field) in [
        (
            &mut request.timeout_ms,
            server.default_timeout_ms,
            key.max_timeout_ms,
            "timeout_ms",
        ),
        (
            &mut request.memory_mb,
            server.default_memory_mb,
            key.max_memory_mb,
            "memory_mb",
        ),
    ] {
        let Some(max) = max else { continue };
        match *asked {
            Some(value) if value > max => {
                return Err(ApiError::out_of_range(format!(
                    "{field} {value} is over this API key's maximum of {max}"
                )));
            }
            Some(_) => {}
            None => *asked = Some(default.min(max)),
        }
    }
    let limits = state.policy().resolve(&request).map_err(|e| match e {
        LimitError::CodeTooLarge { .. } => ApiError::too_large("code_too_large", e.to_string()),
        LimitError::StdinTooLarge { .. } => ApiError::too_large("stdin_too_large", e.to_string()),
        _ => ApiError::out_of_range(e.to_string()),
    })?;
    Ok(Job {
        id: JobId::new(),
        code: request.code,
        stdin: request.stdin,
        limits,
        caller: caller.0.as_ref().map(|record| record.name.clone()),
        period: caller.0.as_ref().map(|_| state.quota_period()),
    })
}

/// How long a job's place among its key's jobs in flight outlasts its timeout, should its
/// release be lost (a worker killed between storing the result and releasing the place).
const IN_FLIGHT_MARGIN: Duration = Duration::from_secs(600);

/// Holds a keyed job against its key's concurrency and CPU quota, and takes its place among the
/// key's jobs in flight.
async fn admit(state: &AppState, caller: &Caller, job: &Job) -> Result<(), ApiError> {
    let (Some(record), Some(period)) = (&caller.0, job.period) else {
        return Ok(());
    };
    let admission = Admission {
        caller: &record.name,
        job: job.id,
        period,
        max_in_flight: record.policy.max_concurrent,
        cpu_quota_ms: record.policy.cpu_quota_ms(),
        hold: job.limits.timeout() + IN_FLIGHT_MARGIN,
    };
    let admitted = state
        .ledger()
        .admit(&admission)
        .await
        .map_err(|e| ApiError::unavailable("cannot check the API key's limits", e))?;
    match admitted {
        Admitted::Yes => Ok(()),
        Admitted::TooManyInFlight { limit } => {
            Err(ApiError::too_many_in_flight(&record.name, limit))
        }
        Admitted::QuotaExhausted { used_ms, quota_ms } => Err(ApiError::quota_exhausted(
            &record.name,
            used_ms,
            quota_ms,
            period.secs_left(),
        )),
    }
}

/// Admits the job and hands it to the workers; a job admitted but not queued gives its place
/// back.
async fn submit(state: &AppState, caller: &Caller, job: Job) -> Result<(), ApiError> {
    admit(state, caller, &job).await?;
    let (id, name) = (job.id, job.caller.clone());
    let Err(error) = state.backend().submit(job).await else {
        return Ok(());
    };
    if let Some(name) = name {
        if let Err(error) = state.ledger().release(&name, id).await {
            tracing::warn!(job = %id, %error, "cannot give back the place of a job not queued");
        }
    }
    Err(match error {
        SubmitError::Queue(QueueError::Refused { .. }) | SubmitError::Full => ApiError::overloaded(
            "queue_full",
            "the job queue is full (PYRUNNER_MAX_QUEUE_LENGTH); try again shortly",
        ),
        e => ApiError::unavailable("cannot queue the job", e),
    })
}

/// `POST /run`: runs the code and answers with its result.
async fn run_code(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    JsonBody(request): JsonBody<RunRequest>,
) -> Result<Response, ApiError> {
    let job = accept(&state, &caller, request)?;
    let Some(_place) = state.try_wait_place() else {
        return Err(ApiError::overloaded(
            "too_many_waiting",
            "too many synchronous runs are waiting (PYRUNNER_MAX_SYNC_WAITERS); try again \
             shortly, or submit with POST /jobs and poll",
        ));
    };
    let (id, wait) = (job.id, job.limits.timeout() + state.sync_margin());
    submit(&state, &caller, job).await?;
    // The job is accepted: from here on the client gets its result, or its id to poll.
    let deadline = Instant::now() + wait;
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ApiError::result_not_ready(id));
        }
        match state.backend().wait_result(id, left).await {
            Ok(Some(result)) => return Ok(Json(result).into_response()),
            Ok(None) => return Err(ApiError::result_not_ready(id)),
            // The store is away (a restart, say): the worker stores the result once it is back.
            Err(error) => {
                tracing::warn!(job = %id, %error, "cannot wait for the result; retrying");
                tokio::time::sleep(backoff.next_wait().min(left)).await;
            }
        }
    }
}

/// `POST /jobs`: queues the code and answers at once with the job id.
async fn submit_job(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    JsonBody(request): JsonBody<RunRequest>,
) -> Result<Response, ApiError> {
    let job = accept(&state, &caller, request)?;
    let id = job.id;
    submit(&state, &caller, job).await?;
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, format!("/jobs/{id}"))],
        Json(json!({ "id": id, "status": "queued" })),
    )
        .into_response())
}

/// The job id of a path, for `caller`: a path that is not an id names no job, and a key sees
/// only its own jobs (an admin key sees all, and every key those accepted while the service ran
/// open), so another key's job is not found either.
async fn job_id(state: &AppState, caller: &Caller, id: &str) -> Result<JobId, ApiError> {
    let job_id = id.parse().map_err(|_| ApiError::job_not_found(id))?;
    let Some(record) = caller.0.as_ref().filter(|record| !record.admin) else {
        return Ok(job_id);
    };
    let owner = state
        .backend()
        .owner(job_id)
        .await
        .map_err(|e| ApiError::unavailable("cannot read the job", e))?;
    match owner {
        Some(owner) if owner != record.name => Err(ApiError::job_not_found(id)),
        _ => Ok(job_id),
    }
}

/// `GET /jobs/{id}`: the job's state, and its result once done.
async fn get_job(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let job_id = job_id(&state, &caller, &id).await?;
    match state.backend().view(job_id).await {
        Ok(Some(view)) => Ok(Json(view).into_response()),
        Ok(None) => Err(ApiError::job_not_found(&id)),
        Err(e) => Err(ApiError::unavailable("cannot read the job", e)),
    }
}

/// `DELETE /jobs/{id}`: cancels a queued or running job; its result says `cancelled`.
async fn cancel_job(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let job_id = job_id(&state, &caller, &id).await?;
    match state.backend().cancel(job_id).await {
        Ok(Cancelled::Now) => {
            tracing::info!(job = %job_id, "job cancelled");
            Ok(Json(JobView {
                id: job_id,
                status: JobState::Done,
                result: Some(RunResult::cancelled(job_id)),
            })
            .into_response())
        }
        Ok(Cancelled::AlreadyDone) => Err(ApiError::job_finished(job_id)),
        Ok(Cancelled::Unknown) => Err(ApiError::job_not_found(&id)),
        Err(e) => Err(ApiError::unavailable("cannot cancel the job", e)),
    }
}

/// `GET /healthz`: the process is alive.
async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

/// `GET /readyz`: the broker, the store and at least one worker can be reached.
async fn readyz(State(state): State<AppState>) -> Response {
    let check = tokio::time::timeout(Duration::from_secs(3), state.backend().readiness()).await;
    match check.unwrap_or_else(|_| Err("readiness check timed out".into())) {
        Ok(()) => {
            Json(json!({ "status": "ready", "mode": state.backend().mode() })).into_response()
        }
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "1")],
            Json(json!({ "status": "unavailable", "reason": reason })),
        )
            .into_response(),
    }
}

/// `GET /`: version, mode, effective limits, the executor, and the preinstalled and preloaded
/// packages.
async fn service_info(State(state): State<AppState>) -> Json<serde_json::Value> {
    let backend = state.backend();
    let runtime = backend.runtime_info().await;
    let auth = match state.keys().any().await {
        Ok(true) => "api_keys",
        Ok(false) => "open: no API key is configured, anyone who can reach the service may use it",
        Err(_) => "unknown: the key store cannot be reached",
    };
    Json(json!({
        "name": "pyrunner",
        "version": env!("CARGO_PKG_VERSION"),
        "mode": backend.mode(),
        "auth": auth,
        "limits": state.policy(),
        "python": runtime.as_ref().map(|r| r.python.clone()),
        "executor": runtime.as_ref().map(|r| r.executor.clone()),
        "preloaded": runtime.as_ref().map(|r| r.preloaded.clone()),
        "packages": runtime.as_ref().map(|r| r.packages.clone()),
        "isolation": runtime.as_ref().map(|r| isolation::active_layers(&r.isolation)),
    }))
}

/// `GET /isolation`: every isolation layer the service knows, each with whether every run gets it
/// and the specifics (or why not), and the names of the active ones; in a fleet, also how many
/// live workers reported (a layer is active only where all of them have it).
async fn isolation(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    match state.backend().isolation().await {
        Some((layers, workers)) => {
            let mut body = json!({
                "active": isolation::active_layers(&layers),
                "layers": layers,
            });
            if let Some(workers) = workers {
                body["workers"] = workers.into();
            }
            Ok(Json(body))
        }
        None => Err(ApiError::unavailable(
            "no worker has reported its isolation layers yet",
            "no runtime information in the store",
        )),
    }
}

async fn route_not_found(uri: Uri) -> ApiError {
    ApiError::route_not_found(uri.path())
}

async fn method_not_allowed() -> ApiError {
    ApiError::method_not_allowed()
}

//! Administration: the admin command, `pyrunner-api keys ...`, which creates, lists, updates and
//! revokes API keys and shows their usage in the stores the api would use with the same settings
//! (Redis with `REDIS_URL`, else the keys and usage files); and the admin endpoints under
//! `/admin`, which show the same to a request with an admin key.

use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Extension, Json, Router};
use clap::Subcommand;
use pyrunner_shared::ledger::{Ledger, LedgerError, Period, Usage};
use serde_json::json;
use thiserror::Error;

use crate::auth::{self, Caller};
use crate::error::ApiError;
use crate::keys::{KeyError, KeyPolicy, KeyRecord, KeyStore};
use crate::state::AppState;

/// A failure of an admin command.
#[derive(Debug, Error)]
pub enum AdminError {
    #[error(transparent)]
    Keys(#[from] KeyError),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
}

/// What `pyrunner-api keys` does.
#[derive(Debug, Clone, Subcommand)]
pub enum KeysCommand {
    /// Makes a key and prints it once; only its hash is stored.
    Create {
        /// A name for the key's holder (letters, digits, '.', '_', '-').
        #[arg(long)]
        name: String,
        #[command(flatten)]
        policy: KeyPolicy,
        /// The key may also use the admin endpoints (`/admin/...`).
        #[arg(long)]
        admin: bool,
    },
    /// Lists the keys: name, prefix, dates and policy (never the key).
    List,
    /// Changes the policy of a key.
    Update {
        /// The key's name.
        name: String,
        #[command(flatten)]
        policy: KeyPolicy,
    },
    /// Revokes a key: from now on, requests with it get 403.
    Revoke {
        /// The key's name.
        name: String,
    },
    /// Shows what each key's runs used (runs by status, CPU ms, wall ms), in all and in the
    /// current quota period, and its jobs in flight.
    Usage {
        /// Only this key.
        name: Option<String>,
    },
}

fn shown(record: &KeyRecord) -> serde_json::Value {
    json!({
        "name": record.name,
        "prefix": record.prefix,
        "created_at": record.created_at,
        "revoked_at": record.revoked_at,
        "policy": record.policy,
        "admin": record.admin,
    })
}

fn shown_usage(usage: &Usage) -> serde_json::Value {
    json!({
        "runs": usage.runs,
        "by_status": usage.by_status,
        "cpu_ms": usage.cpu_ms,
        "wall_ms": usage.wall_ms,
    })
}

/// The usage of the keys (one, when `only` names it), in all and in `period`.
async fn usage(
    store: &KeyStore,
    ledger: &Ledger,
    period: Period,
    only: Option<&str>,
) -> Result<Option<serde_json::Value>, AdminError> {
    let mut records: Vec<_> = store
        .all()
        .await?
        .into_values()
        .filter(|r| only.is_none_or(|name| r.name == name))
        .collect();
    if records.is_empty() && only.is_some() {
        return Ok(None);
    }
    records.sort_by(|a, b| a.name.cmp(&b.name));
    let mut shown = Vec::new();
    for record in records {
        let standing = ledger.usage(&record.name, period).await?;
        shown.push(json!({
            "name": record.name,
            "revoked": record.revoked_at.is_some(),
            "in_flight": standing.in_flight,
            "period": {
                "start": period.starts_at(),
                "end": period.ends_at(),
                "cpu_quota_secs": record.policy.cpu_quota_secs,
                "usage": shown_usage(&standing.period),
            },
            "total": shown_usage(&standing.total),
        }));
    }
    Ok(Some(match only {
        Some(_) => shown.remove(0),
        None => json!(shown),
    }))
}

/// Carries out `command` on `store` and `ledger` (usage in `period`); returns what to print
/// (JSON).
pub async fn run(
    command: &KeysCommand,
    store: &KeyStore,
    ledger: &Ledger,
    period: Period,
) -> Result<String, AdminError> {
    let out = match command {
        KeysCommand::Create {
            name,
            policy,
            admin,
        } => {
            let (key, record) = store.create(name, policy.clone(), *admin).await?;
            let mut shown = shown(&record);
            shown["key"] = json!(key);
            shown["note"] = json!("the key is shown this once; only its hash is stored");
            shown
        }
        KeysCommand::List => list(store).await?,
        KeysCommand::Update { name, policy } => shown(&store.update(name, policy).await?),
        KeysCommand::Revoke { name } => shown(&store.revoke(name).await?),
        KeysCommand::Usage { name } => usage(store, ledger, period, name.as_deref())
            .await?
            .ok_or_else(|| KeyError::UnknownName(name.clone().unwrap_or_default()))?,
    };
    Ok(serde_json::to_string_pretty(&out).expect("json serialises"))
}

async fn list(store: &KeyStore) -> Result<serde_json::Value, KeyError> {
    let mut records: Vec<_> = store.all().await?.into_values().collect();
    records.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(json!(records.iter().map(shown).collect::<Vec<_>>()))
}

/// The admin endpoints, for requests with an admin key: `GET /admin/keys`, `GET /admin/usage`
/// and `GET /admin/usage/{name}`.
pub fn routes(state: AppState) -> Router<AppState> {
    Router::new()
        .route("/keys", get(list_keys))
        .route("/usage", get(all_usage))
        .route("/usage/{name}", get(key_usage))
        .route_layer(axum::middleware::from_fn_with_state(
            state,
            auth::authenticate,
        ))
}

/// The caller must hold an admin key.
fn require_admin(caller: &Caller) -> Result<(), ApiError> {
    match &caller.0 {
        Some(record) if record.admin => Ok(()),
        Some(record) => Err(ApiError::not_admin(&record.name)),
        None => Err(ApiError::unauthorized(
            "the admin endpoints need an admin key (`pyrunner-api keys create --name <name> \
             --admin`)",
        )),
    }
}

async fn list_keys(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<serde_json::Value>, ApiError> {
    require_admin(&caller)?;
    list(state.keys())
        .await
        .map(Json)
        .map_err(|e| ApiError::unavailable("cannot read the keys", e))
}

async fn all_usage(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<serde_json::Value>, ApiError> {
    require_admin(&caller)?;
    usage(state.keys(), state.ledger(), state.quota_period(), None)
        .await
        .map_err(|e| ApiError::unavailable("cannot read the usage", e))
        .map(|shown| Json(shown.unwrap_or_default()))
}

async fn key_usage(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    require_admin(&caller)?;
    usage(
        state.keys(),
        state.ledger(),
        state.quota_period(),
        Some(&name),
    )
    .await
    .map_err(|e| ApiError::unavailable("cannot read the usage", e))?
    .map(Json)
    .ok_or_else(|| ApiError::key_not_found(&name))
}

//! Start-up: builds the backend the configuration asks for and serves the router.

use std::future::Future;

use pyrunner_shared::queue::{Publisher, QueueError};
use pyrunner_shared::queue_registry::QueueRegistry;
use pyrunner_shared::roster::WorkerRoster;
use pyrunner_shared::store::{RedisStore, StoreError};
use pyrunner_worker::config::SetupError;
use pyrunner_worker::runtime::RuntimeError;
use thiserror::Error;
use tokio::net::TcpListener;

use crate::backend::{Backend, EmbeddedBackend, FleetBackend};
use crate::config::ApiConfig;
use crate::keys::KeyStore;
use crate::routes::app;
use crate::state::{AppState, Callers, SyncWaits};

/// The api cannot start.
#[derive(Debug, Error)]
pub enum StartError {
    #[error("invalid limits: {0}")]
    Limits(String),
    #[error("set both AMQP_URL and REDIS_URL for fleet mode, or neither for embedded mode")]
    HalfFleet,
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Setup(#[from] SetupError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Keys(#[from] crate::keys::KeyError),
    #[error(transparent)]
    Ledger(#[from] pyrunner_shared::ledger::LedgerError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("server error: {0}")]
    Serve(std::io::Error),
}

/// A built api: its state, plus what must live as long as it (the embedded work root).
pub struct Api {
    pub state: AppState,
    shutdown_grace: std::time::Duration,
    _work_root: Option<tempfile::TempDir>,
}

impl Api {
    /// Builds the backend: fleet when both URLs are set, embedded when neither is.
    pub async fn build(config: &ApiConfig) -> Result<Self, StartError> {
        let policy = config.policy();
        policy.validate().map_err(StartError::Limits)?;
        let keys = config.key_store()?;
        match keys.any().await {
            Ok(true) => tracing::info!("API keys required"),
            Ok(false) => tracing::warn!(
                "NO API KEY IS CONFIGURED: the service is open to anyone who can reach it; \
                 create one with `pyrunner-api keys create --name <name>`"
            ),
            Err(error) => return Err(error.into()),
        }
        let ledger = config.ledger(&keys)?;
        let (backend, work_root) = match (&config.amqp_url, &config.redis_url, &keys) {
            (Some(amqp), Some(redis), KeyStore::Redis(pool)) => {
                let publisher = Publisher::connect(amqp, &config.queue).await?;
                let registry = QueueRegistry::new(pool.clone(), redis, &config.queue.name);
                let roster = WorkerRoster::new(pool.clone(), &config.queue.name);
                let redis = RedisStore::new(redis, config.result_ttl(), config.max_sync_waiters)?;
                let backend = FleetBackend::new(publisher, redis, registry, roster);
                (Backend::Fleet(backend), None)
            }
            (None, None, _) => {
                let (executor, work_root) = config.executor.start().await?;
                let runtime = executor.runtime().probe(&executor).await?;
                tracing::info!(
                    python = %runtime.python,
                    concurrency = executor.concurrency(),
                    executor = executor.kind(),
                    layers = ?executor.layers(),
                    "embedded runtime ready"
                );
                let backend = EmbeddedBackend::new(
                    executor,
                    runtime,
                    ledger.clone(),
                    config.result_ttl(),
                    config.queue.max_length as usize,
                );
                (Backend::Embedded(backend), Some(work_root))
            }
            _ => return Err(StartError::HalfFleet),
        };
        Ok(Self {
            state: AppState::new(
                backend,
                Callers {
                    keys,
                    ledger,
                    quota_period_secs: config.quota_period_secs,
                },
                policy,
                SyncWaits {
                    margin: config.sync_margin(),
                    max_waiters: config.max_sync_waiters,
                },
            ),
            shutdown_grace: config.shutdown_grace(),
            _work_root: work_root,
        })
    }

    /// Serves on `listener` until `shutdown` completes, then finishes the requests in flight.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), StartError> {
        let backend = self.state.backend().clone();
        axum::serve(listener, app(self.state))
            .with_graceful_shutdown(shutdown)
            .await
            .map_err(StartError::Serve)?;
        // Embedded, the jobs accepted with POST /jobs are held here: let them finish.
        if let Backend::Embedded(embedded) = backend {
            embedded.drain(self.shutdown_grace).await;
        }
        Ok(())
    }
}

/// Binds the configured address.
pub async fn listen(config: &ApiConfig) -> Result<TcpListener, StartError> {
    TcpListener::bind(config.bind)
        .await
        .map_err(|source| StartError::Bind {
            addr: config.bind,
            source,
        })
}

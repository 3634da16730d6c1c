use anyhow::Context;
use clap::Parser;
use pyrunner_shared::ledger::Ledger;
use pyrunner_shared::queue_registry::QueueRegistry;
use pyrunner_shared::roster::WorkerRoster;
use pyrunner_shared::service::{init_logging, shutdown_signal};
use pyrunner_shared::store::{redis_pool, RedisStore, ResultStore};
use pyrunner_worker::config::WorkerConfig;
use pyrunner_worker::runner::Runner;

fn main() -> anyhow::Result<()> {
    init_logging("info");
    let config = WorkerConfig::parse();
    // While this process still has one thread.
    pyrunner_worker::sandbox::namespaces::enter_own_user_namespace_unless_root();
    tokio::runtime::Runtime::new()?.block_on(run(config))
}

async fn run(config: WorkerConfig) -> anyhow::Result<()> {
    let (executor, _work_root) = config.executor.start().await?;
    let info = executor
        .runtime()
        .probe(&executor)
        .await
        .context("runtime check failed")?;
    tracing::info!(
        python = %info.python,
        concurrency = executor.concurrency(),
        executor = executor.kind(),
        layers = ?executor.layers(),
        "runtime ready"
    );
    let redis = RedisStore::new(&config.redis_url, config.result_ttl(), 4)?;
    // The ledger, the registry of the keys' queues and the roster of workers share a pool.
    let callers = redis_pool(&config.redis_url, 8)?;
    // The api reads the roster for `GET /isolation` and `GET /`.
    let membership = WorkerRoster::new(callers.clone(), &config.queue.name)
        .join(serde_json::to_string(&info)?)
        .await
        .context("cannot reach redis")?;
    let runner = Runner::new(
        executor,
        ResultStore::Redis(redis),
        Ledger::Redis(callers.clone()),
    );
    let consumed = pyrunner_worker::consumer::consume(
        &config.amqp_url,
        &config.queue,
        QueueRegistry::new(callers, &config.redis_url, &config.queue.name),
        runner,
        config.shutdown_grace(),
        shutdown_signal(),
    )
    .await;
    membership.leave().await;
    consumed?;
    Ok(())
}

use anyhow::Context;
use clap::Parser;
use pyrunner_shared::store::{RedisStore, ResultStore};
use pyrunner_worker::config::WorkerConfig;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let config = WorkerConfig::parse();
    let (executor, _work_root) = config.executor.build()?;
    let info = executor
        .runtime()
        .probe(&executor)
        .await
        .context("runtime check failed")?;
    tracing::info!(
        python = %info.python,
        concurrency = executor.slots().size(),
        layers = ?executor.layers(),
        "runtime ready"
    );
    let redis = RedisStore::new(&config.redis_url, config.result_ttl(), 4)?;
    redis
        .put_runtime_info(&serde_json::to_string(&info)?)
        .await
        .context("cannot reach redis")?;
    let store = ResultStore::Redis(redis);
    pyrunner_worker::consumer::consume(
        &config.amqp_url,
        &config.queue,
        executor,
        store,
        shutdown_signal(),
    )
    .await?;
    Ok(())
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("can install a SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

use clap::Parser;
use pyrunner_api::config::ApiConfig;
use pyrunner_api::server::{listen, Api};
use pyrunner_shared::service::{init_logging, shutdown_signal};

fn main() -> anyhow::Result<()> {
    init_logging("info,tower_http=warn");
    let config = ApiConfig::parse();
    if config.amqp_url.is_none() && config.redis_url.is_none() {
        // Embedded, it runs code itself; while this process still has one thread.
        pyrunner_worker::sandbox::namespaces::enter_own_user_namespace_unless_root();
    }
    tokio::runtime::Runtime::new()?.block_on(run(config))
}

async fn run(config: ApiConfig) -> anyhow::Result<()> {
    let api = Api::build(&config).await?;
    let listener = listen(&config).await?;
    tracing::info!(
        addr = %listener.local_addr()?,
        mode = api.state.backend().mode(),
        "serving"
    );
    api.serve(listener, shutdown_signal()).await?;
    Ok(())
}

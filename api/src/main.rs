use clap::Parser;
use pyrunner_api::config::ApiConfig;
use pyrunner_api::server::{listen, Api};
use pyrunner_shared::service::{init_logging, shutdown_signal};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_logging("info,tower_http=warn");
    let config = ApiConfig::parse();
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

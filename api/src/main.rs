use clap::Parser;
use pyrunner_api::config::ApiConfig;
use pyrunner_api::server::{listen, Api};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,tower_http=warn".into()),
        )
        .init();
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

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("can install a SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("shutting down: finishing requests in flight");
}

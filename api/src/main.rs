use clap::{Parser, Subcommand};
use pyrunner_api::admin::{self, KeysCommand};
use pyrunner_api::config::ApiConfig;
use pyrunner_api::server::{listen, Api};
use pyrunner_shared::service::{init_logging, shutdown_signal};

/// PyRunner api: runs untrusted Python code behind an HTTP API.
///
/// With AMQP_URL and REDIS_URL it serves a fleet of workers; with neither, it runs embedded:
/// an in-process queue, store and worker pool. `pyrunner-api keys ...` manages the API keys.
#[derive(Debug, Parser)]
#[command(name = "pyrunner-api", version)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    config: ApiConfig,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Creates, lists, updates and revokes API keys (in Redis with REDIS_URL, else in the keys
    /// file).
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
}

fn main() -> anyhow::Result<()> {
    let Cli { command, config } = Cli::parse();
    if let Some(Command::Keys { command }) = command {
        let store = config.key_store()?;
        let ledger = config.ledger(&store)?;
        let period = pyrunner_shared::ledger::Period::current(config.quota_period_secs);
        let out = tokio::runtime::Runtime::new()?
            .block_on(admin::run(&command, &store, &ledger, period))?;
        println!("{out}");
        return Ok(());
    }
    init_logging("info,tower_http=warn");
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

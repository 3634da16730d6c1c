//! What both binaries do the same way around their work: logging and the shutdown signal.

/// Structured logs to stdout, filtered by `RUST_LOG` (else `default_filter`), coloured only on
/// a terminal (a log collector gets plain `key=value` text).
pub fn init_logging(default_filter: &str) {
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_ansi(std::io::stdout().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default_filter.into()),
        )
        .init();
}

/// Completes on SIGTERM or Ctrl-C: the signal to stop taking work and finish what is held.
pub async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("can install a SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("shutting down: finishing the work in flight");
}

//! Configuration of the api binary: flags, each with an environment variable.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use pyrunner_shared::LimitPolicy;
use pyrunner_worker::config::ExecutorArgs;

/// The api's settings (the binary's `Cli` adds the `keys` admin command).
#[derive(Debug, Clone, Parser)]
#[command(name = "pyrunner-api", version)]
pub struct ApiConfig {
    /// Address to listen on.
    #[arg(long, env = "PYRUNNER_BIND", default_value = "127.0.0.1:8000")]
    pub bind: SocketAddr,
    /// RabbitMQ URL (fleet mode).
    #[arg(long, env = "AMQP_URL")]
    pub amqp_url: Option<String>,
    /// Redis URL (fleet mode).
    #[arg(long, env = "REDIS_URL")]
    pub redis_url: Option<String>,
    /// The job queue (fleet mode).
    #[command(flatten)]
    pub queue: pyrunner_shared::queue::QueueSettings,
    /// How long results stay retrievable, in seconds.
    #[arg(long, env = "PYRUNNER_RESULT_TTL_SECS", default_value_t = 3600)]
    pub result_ttl_secs: u64,
    /// Wall-clock limit of a run that asks for none, in ms.
    #[arg(long, env = "PYRUNNER_DEFAULT_TIMEOUT_MS", default_value_t = 10_000)]
    pub default_timeout_ms: u64,
    /// Largest wall-clock limit a run may ask for, in ms.
    #[arg(long, env = "PYRUNNER_MAX_TIMEOUT_MS", default_value_t = 300_000)]
    pub max_timeout_ms: u64,
    /// Memory limit of a run that asks for none, in MiB.
    #[arg(long, env = "PYRUNNER_DEFAULT_MEMORY_MB", default_value_t = 512)]
    pub default_memory_mb: u64,
    /// Smallest memory limit a run may ask for, in MiB.
    #[arg(long, env = "PYRUNNER_MIN_MEMORY_MB", default_value_t = 64)]
    pub min_memory_mb: u64,
    /// Largest memory limit a run may ask for, in MiB.
    #[arg(long, env = "PYRUNNER_MAX_MEMORY_MB", default_value_t = 2048)]
    pub max_memory_mb: u64,
    /// Bytes of stdout, and of stderr, kept before a run is stopped.
    #[arg(long, env = "PYRUNNER_MAX_OUTPUT_BYTES", default_value_t = 1 << 20)]
    pub max_output_bytes: u64,
    /// Largest code accepted, in bytes (413 past it).
    #[arg(long, env = "PYRUNNER_MAX_CODE_BYTES", default_value_t = 1 << 20)]
    pub max_code_bytes: u64,
    /// Largest stdin accepted, in bytes (413 past it).
    #[arg(long, env = "PYRUNNER_MAX_STDIN_BYTES", default_value_t = 1 << 20)]
    pub max_stdin_bytes: u64,
    /// How much longer than its timeout a synchronous run waits before answering 504, in ms.
    #[arg(long, env = "PYRUNNER_SYNC_WAIT_MARGIN_MS", default_value_t = 5_000)]
    pub sync_wait_margin_ms: u64,
    /// Synchronous runs that may wait at once (fleet mode: Redis connections held); past them
    /// `POST /run` answers 503 with Retry-After, and `POST /jobs` still accepts.
    #[arg(long, env = "PYRUNNER_MAX_SYNC_WAITERS", default_value_t = 512)]
    pub max_sync_waiters: usize,
    /// Embedded mode, on SIGTERM: how long the jobs held may finish after the last request, in
    /// seconds; then those left are stopped.
    #[arg(long, env = "PYRUNNER_SHUTDOWN_GRACE_SECS", default_value_t = 25)]
    pub shutdown_grace_secs: u64,
    /// The API keys of embedded mode (a fleet keeps them in Redis); default
    /// /var/lib/pyrunner/keys.json as root, else ~/.config/pyrunner/keys.json.
    #[arg(long, env = "PYRUNNER_KEYS_FILE")]
    pub keys_file: Option<std::path::PathBuf>,
    /// Length of the period each key's CPU quota (`--cpu-quota-secs`) is for, in seconds;
    /// periods start at the Unix epoch, so a day's are UTC days.
    #[arg(long, env = "PYRUNNER_QUOTA_PERIOD_SECS", default_value_t = 86_400,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub quota_period_secs: u64,
    /// Executor settings, used in embedded mode.
    #[command(flatten)]
    pub executor: ExecutorArgs,
}

impl ApiConfig {
    /// The limit policy these settings describe.
    pub fn policy(&self) -> LimitPolicy {
        LimitPolicy {
            default_timeout_ms: self.default_timeout_ms,
            max_timeout_ms: self.max_timeout_ms,
            default_memory_mb: self.default_memory_mb,
            min_memory_mb: self.min_memory_mb,
            max_memory_mb: self.max_memory_mb,
            max_output_bytes: self.max_output_bytes,
            max_code_bytes: self.max_code_bytes,
            max_stdin_bytes: self.max_stdin_bytes,
        }
    }

    pub fn result_ttl(&self) -> Duration {
        Duration::from_secs(self.result_ttl_secs.max(1))
    }

    /// Where the keys are: Redis in fleet mode, else the keys file.
    pub fn key_store(&self) -> Result<crate::keys::KeyStore, crate::keys::KeyError> {
        match &self.redis_url {
            Some(url) => crate::keys::KeyStore::redis(url),
            None => Ok(crate::keys::KeyStore::file(&self.keys_file())),
        }
    }

    /// The keys file of embedded mode, with its default applied.
    pub fn keys_file(&self) -> std::path::PathBuf {
        self.keys_file
            .clone()
            .unwrap_or_else(|| match std::env::var_os("HOME") {
                Some(home) if !pyrunner_worker::sandbox::sys::is_root() => {
                    std::path::Path::new(&home).join(".config/pyrunner/keys.json")
                }
                _ => "/var/lib/pyrunner/keys.json".into(),
            })
    }

    /// Where embedded mode keeps each key's usage: `usage.json` beside the keys file.
    pub fn usage_file(&self) -> std::path::PathBuf {
        self.keys_file().with_file_name("usage.json")
    }

    /// The ledger of the keys' jobs in flight and usage, beside the `keys`: in their Redis
    /// (through the same pool) in fleet mode, else in memory saved to the usage file.
    pub fn ledger(
        &self,
        keys: &crate::keys::KeyStore,
    ) -> Result<pyrunner_shared::ledger::Ledger, pyrunner_shared::ledger::LedgerError> {
        use pyrunner_shared::ledger::Ledger;
        match keys {
            crate::keys::KeyStore::Redis(pool) => Ok(Ledger::Redis(pool.clone())),
            crate::keys::KeyStore::File(_) => Ledger::memory(Some(&self.usage_file())),
        }
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }

    pub fn sync_margin(&self) -> Duration {
        Duration::from_millis(self.sync_wait_margin_ms)
    }
}

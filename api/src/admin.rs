//! The admin command, `pyrunner-api keys ...`: creates, lists, updates and revokes API keys in
//! the store the api would use with the same settings (Redis with `REDIS_URL`, else the keys
//! file).

use clap::Subcommand;
use serde_json::json;

use crate::keys::{KeyError, KeyPolicy, KeyRecord, KeyStore};

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
}

fn shown(record: &KeyRecord) -> serde_json::Value {
    json!({
        "name": record.name,
        "prefix": record.prefix,
        "created_at": record.created_at,
        "revoked_at": record.revoked_at,
        "policy": record.policy,
    })
}

/// Carries out `command` on `store`; returns what to print (JSON).
pub async fn run(command: &KeysCommand, store: &KeyStore) -> Result<String, KeyError> {
    let out = match command {
        KeysCommand::Create { name, policy } => {
            let (key, record) = store.create(name, policy.clone()).await?;
            let mut shown = shown(&record);
            shown["key"] = json!(key);
            shown["note"] = json!("the key is shown this once; only its hash is stored");
            shown
        }
        KeysCommand::List => {
            let mut records: Vec<_> = store.all().await?.into_values().collect();
            records.sort_by(|a, b| a.name.cmp(&b.name));
            json!(records.iter().map(shown).collect::<Vec<_>>())
        }
        KeysCommand::Update { name, policy } => shown(&store.update(name, policy).await?),
        KeysCommand::Revoke { name } => shown(&store.revoke(name).await?),
    };
    Ok(serde_json::to_string_pretty(&out).expect("json serialises"))
}

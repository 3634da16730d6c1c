//! API keys: who is calling, and what each caller may ask for.
//!
//! A key is 32 random bytes from the kernel, shown once, as `pyr_` and 64 hex digits. Only its
//! SHA-256 is stored (a fast hash is enough: the key itself is random, not a password), with a
//! record: the key's name, when it was made and revoked, and its policy. The records live in
//! Redis (the hash `pyrunner:keys`) for a fleet, so that every api replica sees a revocation at
//! once, and in a JSON file for embedded mode. With no key at all the service runs open.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use deadpool_redis::Pool;
use pyrunner_shared::store::redis_pool;
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;

/// The Redis hash of key records, by the SHA-256 of each key.
const REDIS_KEYS: &str = "pyrunner:keys";
/// What every key starts with, so that a leaked one is easy to recognise.
const KEY_PREFIX: &str = "pyr_";

/// A failure of the key store.
#[derive(Debug, Error)]
pub enum KeyError {
    #[error("cannot reach redis for the keys: {0}")]
    Redis(String),
    #[error("cannot read or write the key file {path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("no key is named {0:?}")]
    UnknownName(String),
    #[error("a key named {0:?} exists already")]
    NameTaken(String),
    #[error("a key name is 1 to 64 letters, digits, '.', '_' or '-'; {0:?} is not")]
    BadName(String),
    #[error("the kernel gave no random bytes: {0}")]
    Random(String),
}

/// What a key's holder may ask for, on top of the server's own limits.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, clap::Args)]
pub struct KeyPolicy {
    /// Requests a second this key may make on average, over every api replica (429 past it).
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_per_sec: Option<f64>,
    /// Requests this key may make at once before the average rate applies (default: the rate,
    /// rounded up).
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    /// Largest `timeout_ms` this key may ask for (and its default when it asks for none).
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_timeout_ms: Option<u64>,
    /// Largest `memory_mb` this key may ask for (and its default when it asks for none).
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_memory_mb: Option<u64>,
    /// Jobs this key may have queued or running at once, over every api replica (429 past it).
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent: Option<u32>,
    /// CPU seconds this key's runs may use in each quota period, a UTC day unless
    /// PYRUNNER_QUOTA_PERIOD_SECS says otherwise (429 past it, until the next period).
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_quota_secs: Option<f64>,
}

impl KeyPolicy {
    /// This policy with the fields `update` sets replaced.
    pub fn merged(&self, update: &KeyPolicy) -> KeyPolicy {
        KeyPolicy {
            rate_per_sec: update.rate_per_sec.or(self.rate_per_sec),
            burst: update.burst.or(self.burst),
            max_timeout_ms: update.max_timeout_ms.or(self.max_timeout_ms),
            max_memory_mb: update.max_memory_mb.or(self.max_memory_mb),
            max_concurrent: update.max_concurrent.or(self.max_concurrent),
            cpu_quota_secs: update.cpu_quota_secs.or(self.cpu_quota_secs),
        }
    }

    /// The key's CPU quota per period, in ms, when it has one.
    pub fn cpu_quota_ms(&self) -> Option<u64> {
        self.cpu_quota_secs
            .map(|secs| (secs.max(0.0) * 1000.0).round() as u64)
    }

    /// The key's rate, when it has one.
    pub fn rate(&self) -> Option<crate::rate::Rate> {
        let per_sec = self.rate_per_sec.filter(|r| *r > 0.0)?;
        Some(crate::rate::Rate {
            per_sec,
            burst: self.burst.unwrap_or(per_sec.ceil() as u32).max(1),
        })
    }
}

/// What is stored of a key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyRecord {
    pub name: String,
    /// The first characters of the key, to tell keys apart in a listing.
    pub prefix: String,
    /// Seconds since the Unix epoch.
    pub created_at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<u64>,
    #[serde(default)]
    pub policy: KeyPolicy,
    /// Whether the key may use the admin endpoints (`/admin/...`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub admin: bool,
}

/// The SHA-256 of a key, in hex: what the store knows it by.
pub fn digest(key: &str) -> String {
    hex(&Sha256::digest(key.as_bytes()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn new_key() -> Result<String, KeyError> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| KeyError::Random(e.to_string()))?;
    Ok(format!("{KEY_PREFIX}{}", hex(&bytes)))
}

fn check_name(name: &str) -> Result<(), KeyError> {
    let ok = (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(KeyError::BadName(name.to_owned()))
    }
}

/// Where key records live.
#[derive(Clone)]
pub enum KeyStore {
    Redis(Pool),
    File(FileKeys),
}

impl KeyStore {
    /// The fleet's store, in the Redis at `url`. Its pool also serves the request rates, the
    /// ledger and the registry of the keys' queues.
    pub fn redis(url: &str) -> Result<Self, KeyError> {
        redis_pool(url, 64)
            .map(KeyStore::Redis)
            .map_err(|e| KeyError::Redis(e.to_string()))
    }

    /// Embedded mode's store, the JSON file at `path` (made on the first key).
    pub fn file(path: &Path) -> Self {
        KeyStore::File(FileKeys {
            path: path.to_owned(),
            cache: Arc::default(),
        })
    }

    /// Every record, by digest.
    pub async fn all(&self) -> Result<BTreeMap<String, KeyRecord>, KeyError> {
        match self {
            KeyStore::Redis(pool) => {
                let mut conn = pool.get().await.map_err(redis_error)?;
                let raw: BTreeMap<String, String> =
                    conn.hgetall(REDIS_KEYS).await.map_err(redis_error)?;
                Ok(raw
                    .into_iter()
                    .filter_map(|(digest, json)| Some((digest, serde_json::from_str(&json).ok()?)))
                    .collect())
            }
            KeyStore::File(file) => file.read(),
        }
    }

    /// Whether any key exists (else the service runs open).
    pub async fn any(&self) -> Result<bool, KeyError> {
        Ok(self.lookup("").await?.1)
    }

    /// The record of the key with this digest, and whether any key exists at all (when none
    /// does, the service runs open). One round trip to Redis.
    pub async fn lookup(&self, digest: &str) -> Result<(Option<KeyRecord>, bool), KeyError> {
        match self {
            KeyStore::Redis(pool) => {
                let mut conn = pool.get().await.map_err(redis_error)?;
                let (json, any): (Option<String>, bool) = redis::pipe()
                    .hget(REDIS_KEYS, digest)
                    .exists(REDIS_KEYS)
                    .query_async(&mut *conn)
                    .await
                    .map_err(redis_error)?;
                Ok((json.and_then(|j| serde_json::from_str(&j).ok()), any))
            }
            KeyStore::File(file) => {
                let all = file.read()?;
                Ok((all.get(digest).cloned(), !all.is_empty()))
            }
        }
    }

    async fn put(&self, digest: &str, record: &KeyRecord) -> Result<(), KeyError> {
        match self {
            KeyStore::Redis(pool) => {
                let mut conn = pool.get().await.map_err(redis_error)?;
                let json = serde_json::to_string(record).expect("a record serialises");
                let _: () = conn
                    .hset(REDIS_KEYS, digest, json)
                    .await
                    .map_err(redis_error)?;
                Ok(())
            }
            KeyStore::File(file) => {
                let mut all = file.read()?;
                all.insert(digest.to_owned(), record.clone());
                file.write(&all)
            }
        }
    }

    /// Makes a key named `name`; returns the key itself (shown once, never stored) and its
    /// record.
    pub async fn create(
        &self,
        name: &str,
        policy: KeyPolicy,
        admin: bool,
    ) -> Result<(String, KeyRecord), KeyError> {
        check_name(name)?;
        if self.all().await?.values().any(|r| r.name == name) {
            return Err(KeyError::NameTaken(name.to_owned()));
        }
        let key = new_key()?;
        let record = KeyRecord {
            name: name.to_owned(),
            prefix: key[..KEY_PREFIX.len() + 6].to_owned(),
            created_at: now(),
            revoked_at: None,
            policy,
            admin,
        };
        self.put(&digest(&key), &record).await?;
        Ok((key, record))
    }

    /// Changes the policy of the key named `name` (the fields `update` sets).
    pub async fn update(&self, name: &str, update: &KeyPolicy) -> Result<KeyRecord, KeyError> {
        let (digest, mut record) = self.named(name).await?;
        record.policy = record.policy.merged(update);
        self.put(&digest, &record).await?;
        Ok(record)
    }

    /// Revokes the key named `name`: from now on it gets 403.
    pub async fn revoke(&self, name: &str) -> Result<KeyRecord, KeyError> {
        let (digest, mut record) = self.named(name).await?;
        record.revoked_at.get_or_insert_with(now);
        self.put(&digest, &record).await?;
        Ok(record)
    }

    async fn named(&self, name: &str) -> Result<(String, KeyRecord), KeyError> {
        self.all()
            .await?
            .into_iter()
            .find(|(_, r)| r.name == name)
            .ok_or_else(|| KeyError::UnknownName(name.to_owned()))
    }
}

fn redis_error(e: impl std::fmt::Display) -> KeyError {
    KeyError::Redis(e.to_string())
}

/// Keys in a JSON file, re-read when the file changes (the admin command writes it while the
/// api runs).
#[derive(Clone)]
pub struct FileKeys {
    path: PathBuf,
    cache: Arc<Mutex<Option<Cached>>>,
}

/// The file's records as last read, with what identified that version of the file (each write
/// renames a new file over it, so its inode changes).
struct Cached {
    version: (u64, SystemTime, u64),
    keys: BTreeMap<String, KeyRecord>,
}

impl FileKeys {
    fn error(&self, message: impl std::fmt::Display) -> KeyError {
        KeyError::File {
            path: self.path.clone(),
            message: message.to_string(),
        }
    }

    fn read(&self) -> Result<BTreeMap<String, KeyRecord>, KeyError> {
        let meta = match std::fs::metadata(&self.path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
            Err(e) => return Err(self.error(e)),
        };
        let version = (
            std::os::unix::fs::MetadataExt::ino(&meta),
            meta.modified().map_err(|e| self.error(e))?,
            meta.len(),
        );
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(cached) = cache.as_ref() {
            if cached.version == version {
                return Ok(cached.keys.clone());
            }
        }
        let text = std::fs::read_to_string(&self.path).map_err(|e| self.error(e))?;
        let keys: BTreeMap<String, KeyRecord> =
            serde_json::from_str(&text).map_err(|e| self.error(e))?;
        *cache = Some(Cached {
            version,
            keys: keys.clone(),
        });
        Ok(keys)
    }

    /// Replaces the file atomically (a new file renamed over it), readable by its owner only.
    fn write(&self, keys: &BTreeMap<String, KeyRecord>) -> Result<(), KeyError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let dir = self.path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(|e| self.error(e))?;
        let temp = self.path.with_extension("tmp");
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temp)
            .map_err(|e| self.error(e))?;
        let json = serde_json::to_vec_pretty(keys).expect("records serialise");
        file.write_all(&json)
            .and_then(|()| file.sync_all())
            .map_err(|e| self.error(e))?;
        std::fs::rename(&temp, &self.path).map_err(|e| self.error(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn keys_are_stored_by_digest_and_found_revoked() {
        let dir = tempfile::tempdir().unwrap();
        let store = KeyStore::file(&dir.path().join("keys.json"));
        assert_eq!(store.lookup(&digest("pyr_x")).await.unwrap(), (None, false));
        let (key, record) = store
            .create("tutor", KeyPolicy::default(), false)
            .await
            .unwrap();
        assert!(key.starts_with("pyr_") && key.len() == 68, "{key}");
        assert!(key.starts_with(&record.prefix));
        let text = std::fs::read_to_string(dir.path().join("keys.json")).unwrap();
        assert!(!text.contains(&key), "the key itself is never stored");
        assert!(matches!(
            store.create("tutor", KeyPolicy::default(), false).await,
            Err(KeyError::NameTaken(_))
        ));
        assert!(matches!(
            store.create("a b", KeyPolicy::default(), false).await,
            Err(KeyError::BadName(_))
        ));
        let (found, any) = store.lookup(&digest(&key)).await.unwrap();
        assert!(any && found.unwrap().revoked_at.is_none());
        let update = KeyPolicy {
            max_timeout_ms: Some(500),
            ..KeyPolicy::default()
        };
        assert_eq!(
            store
                .update("tutor", &update)
                .await
                .unwrap()
                .policy
                .max_timeout_ms,
            Some(500)
        );
        store.revoke("tutor").await.unwrap();
        let (found, _) = store.lookup(&digest(&key)).await.unwrap();
        assert!(found.unwrap().revoked_at.is_some());
        assert!(matches!(
            store.revoke("nobody").await,
            Err(KeyError::UnknownName(_))
        ));
    }
}

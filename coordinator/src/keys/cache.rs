//! Checking the key a request carries, cheaply. What the database says about a
//! key id (its hash, scope, accounts, expiry, revocation, or that there is no
//! such key) is kept for `ttl`; within that time a request costs one SHA-256
//! and a constant-time comparison, no database round trip.
//!
//! The bound that follows: a key revoked by another process is refused here
//! at most `ttl` later (`HOLDFAST_API_KEY_CACHE_SECS`); one revoked through
//! this process's API is forgotten at once ([`Keyring::forget`]). Expiry is
//! checked on every request against the cached time, so it is exact.
//!
//! A string that is not shaped like a key is refused before any look-up; ids
//! that do not exist are remembered too (for the same `ttl`), so that
//! repeating a made-up key does not reach the database every time. The cache
//! holds at most [`MAX_ENTRIES`] ids.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use holdfast_common::ledger::LedgerError;

use super::store::{KeyStore, LAST_USED_EVERY_SECS};
use super::{token, Credentials};

/// Most key ids the cache remembers.
pub const MAX_ENTRIES: usize = 10_000;

/// What a key turned out to be.
#[derive(Clone, Debug)]
pub enum Verdict {
    /// A key in force.
    Valid(Arc<Credentials>),
    /// Not a key: malformed, unknown, or the secret does not match.
    Unknown,
    /// The key was revoked.
    Revoked,
    /// The key expired (at this time, RFC 3339).
    Expired(String),
}

struct Entry {
    /// What the database said; `None`: no such key.
    found: Option<Arc<Credentials>>,
    fetched: Instant,
    /// When this process last recorded a use of the key.
    touched: Option<Instant>,
}

/// The keys of one process: a [`KeyStore`] behind a short-lived cache.
pub struct Keyring {
    store: KeyStore,
    ttl: Duration,
    entries: Mutex<HashMap<String, Entry>>,
}

impl Keyring {
    pub fn new(store: KeyStore, ttl: Duration) -> Self {
        Self {
            store,
            ttl,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// The store behind the cache.
    pub fn store(&self) -> &KeyStore {
        &self.store
    }

    /// How long what the database said about a key is believed.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Check `key`. Fails only when the database cannot be asked.
    pub async fn check(&self, key: &str) -> Result<Verdict, LedgerError> {
        let Some(id) = token::key_id(key) else {
            return Ok(Verdict::Unknown);
        };
        let found = match self.cached(id) {
            Some(found) => found,
            None => {
                let found = self.store.credentials(id).await?.map(Arc::new);
                self.remember(id, found.clone());
                found
            }
        };
        let Some(creds) = found else {
            return Ok(Verdict::Unknown);
        };
        if !token::matches(key, &creds.hash) {
            return Ok(Verdict::Unknown);
        }
        if creds.revoked_at.is_some() {
            return Ok(Verdict::Revoked);
        }
        if let Some(at) = creds.expires_at.filter(|at| *at <= Utc::now()) {
            return Ok(Verdict::Expired(holdfast_common::ledger::rfc3339(at)));
        }
        self.record_use(id).await;
        Ok(Verdict::Valid(creds))
    }

    /// Drop what is cached about key `id` (it was just revoked here).
    pub fn forget(&self, id: &str) {
        if let Ok(mut entries) = self.entries.lock() {
            entries.remove(id);
        }
    }

    fn cached(&self, id: &str) -> Option<Option<Arc<Credentials>>> {
        let entries = self.entries.lock().ok()?;
        let entry = entries.get(id)?;
        (entry.fetched.elapsed() < self.ttl).then(|| entry.found.clone())
    }

    fn remember(&self, id: &str, found: Option<Arc<Credentials>>) {
        let Ok(mut entries) = self.entries.lock() else {
            return;
        };
        if entries.len() >= MAX_ENTRIES && !entries.contains_key(id) {
            let ttl = self.ttl;
            entries.retain(|_, e| e.fetched.elapsed() < ttl);
            if entries.len() >= MAX_ENTRIES {
                // Full of fresh entries: keep the keys that exist.
                entries.retain(|_, e| e.found.is_some());
            }
            if entries.len() >= MAX_ENTRIES {
                return;
            }
        }
        let fetched = Instant::now();
        entries
            .entry(id.to_string())
            .and_modify(|e| {
                e.found = found.clone();
                e.fetched = fetched;
            })
            .or_insert(Entry {
                found,
                fetched,
                touched: None,
            });
    }

    /// Write `last_used_at` when this process has not for a minute. A failure
    /// is logged and does not refuse the request.
    async fn record_use(&self, id: &str) {
        let due = match self.entries.lock() {
            Ok(mut entries) => match entries.get_mut(id) {
                Some(e) => {
                    let due = e
                        .touched
                        .is_none_or(|t| t.elapsed() >= Duration::from_secs(LAST_USED_EVERY_SECS));
                    if due {
                        e.touched = Some(Instant::now());
                    }
                    due
                }
                // Not cached (a full cache): record at most what the statement allows.
                None => true,
            },
            Err(_) => false,
        };
        if due {
            if let Err(e) = self.store.touch(id).await {
                tracing::debug!(key_id = id, error = %e, "last_used_at not recorded");
            }
        }
    }
}

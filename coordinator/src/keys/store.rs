//! Keys in PostgreSQL (`api_keys`, migrations/V11__api_keys.sql): create,
//! list, show, revoke, and what checking a request needs. Creating and
//! revoking need a database user in `holdfast_admin`; any service group may
//! read the credentials and record a use.

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use holdfast_common::ledger::{rfc3339, LedgerError};
use tokio_postgres::error::SqlState;
use tokio_postgres::Row;

use super::token;
use super::{Accounts, CreatedKey, Credentials, KeyInfo, KeySpec, KeyState, Scope};

/// How many fresh ids a create tries when the random id is taken (never,
/// in practice: 60 random bits).
const ID_TRIES: usize = 3;

/// How often at most a key's `last_used_at` is written (by each process, and
/// by the statement itself across processes).
pub const LAST_USED_EVERY_SECS: u64 = 60;

/// The columns a [`KeyInfo`] is read from.
const INFO_COLUMNS: &str =
    "id, name, scope, accounts, created_at, expires_at, last_used_at, revoked_at,
    CASE WHEN revoked_at IS NOT NULL THEN 'revoked'
         WHEN expires_at IS NOT NULL AND expires_at <= now() THEN 'expired'
         ELSE 'active' END AS state";

/// The key table on a connection pool. Cheap to clone.
#[derive(Clone)]
pub struct KeyStore {
    pool: Pool,
}

type Result<T> = std::result::Result<T, LedgerError>;

impl KeyStore {
    pub fn new(pool: Pool) -> Self {
        Self { pool }
    }

    /// Create a key: the whole key is in the answer, and nowhere else.
    pub async fn create(&self, spec: &KeySpec) -> Result<CreatedKey> {
        if let Err(errors) = spec.check() {
            let why = errors
                .iter()
                .map(|e| format!("{}: {}", e.field, e.reason))
                .collect::<Vec<_>>()
                .join("; ");
            return Err(LedgerError::Invalid(why));
        }
        let client = self.pool.get().await?;
        let accounts = spec.accounts.as_list().map(<[String]>::to_vec);
        for _ in 0..ID_TRIES {
            let new = token::generate().map_err(|e| LedgerError::Unavailable(e.to_string()))?;
            let hash = token::hash(&new.key);
            let inserted = client
                .query_one(
                    &format!(
                        "INSERT INTO api_keys (id, key_hash, scope, accounts, name, expires_at)
                         VALUES ($1, $2, $3, $4, $5, $6)
                         RETURNING {INFO_COLUMNS}"
                    ),
                    &[
                        &new.id,
                        &hash.as_slice(),
                        &spec.scope.as_str(),
                        &accounts,
                        &spec.name,
                        &spec.expires_at,
                    ],
                )
                .await;
            match inserted {
                Ok(row) => {
                    return Ok(CreatedKey {
                        key: new.key,
                        info: info(&row)?,
                    })
                }
                Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(LedgerError::Unavailable(
            "no free key id after several tries".into(),
        ))
    }

    /// Every key, oldest first (revoked and expired ones too).
    pub async fn list(&self) -> Result<Vec<KeyInfo>> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                &format!("SELECT {INFO_COLUMNS} FROM api_keys ORDER BY created_at, id"),
                &[],
            )
            .await?;
        rows.iter().map(info).collect()
    }

    /// One key.
    pub async fn get(&self, id: &str) -> Result<KeyInfo> {
        let client = self.pool.get().await?;
        let row = client
            .query_opt(
                &format!("SELECT {INFO_COLUMNS} FROM api_keys WHERE id = $1"),
                &[&id],
            )
            .await?;
        match row {
            Some(row) => info(&row),
            None => Err(unknown(id)),
        }
    }

    /// Revoke a key: it is refused from now on (by other processes once
    /// their cache of it expires). A key revoked before is answered as it is.
    pub async fn revoke(&self, id: &str) -> Result<KeyInfo> {
        let client = self.pool.get().await?;
        let row = client
            .query_opt(
                &format!(
                    "UPDATE api_keys SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL
                     RETURNING {INFO_COLUMNS}"
                ),
                &[&id],
            )
            .await?;
        match row {
            Some(row) => info(&row),
            None => self.get(id).await,
        }
    }

    /// What checking a request's key needs, or `None` for no such key.
    pub async fn credentials(&self, id: &str) -> Result<Option<Credentials>> {
        let client = self.pool.get().await?;
        let row = client
            .query_opt(
                "SELECT id, key_hash, scope, accounts, expires_at, revoked_at
                 FROM api_keys WHERE id = $1",
                &[&id],
            )
            .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        Ok(Some(Credentials {
            id: row.get("id"),
            hash: row.get("key_hash"),
            scope: scope(&row)?,
            accounts: Accounts::from_list(row.get("accounts")),
            expires_at: row.get("expires_at"),
            revoked_at: row.get("revoked_at"),
        }))
    }

    /// Record that the key was used now, unless that was recorded less than
    /// [`LAST_USED_EVERY_SECS`] ago.
    pub async fn touch(&self, id: &str) -> Result<()> {
        let client = self.pool.get().await?;
        client
            .execute(
                "UPDATE api_keys SET last_used_at = now()
                 WHERE id = $1
                   AND (last_used_at IS NULL OR last_used_at <= now() - make_interval(secs => $2))",
                &[&id, &(LAST_USED_EVERY_SECS as f64)],
            )
            .await?;
        Ok(())
    }
}

fn unknown(id: &str) -> LedgerError {
    LedgerError::NotFound(format!("no API key `{id}`"))
}

fn scope(row: &Row) -> Result<Scope> {
    let s: String = row.get("scope");
    s.parse()
        .map_err(|e: String| LedgerError::Invalid(format!("stored scope: {e}")))
}

fn info(row: &Row) -> Result<KeyInfo> {
    let id: String = row.get("id");
    let state = match row.get::<_, String>("state").as_str() {
        "revoked" => KeyState::Revoked,
        "expired" => KeyState::Expired,
        _ => KeyState::Active,
    };
    let time = |c: &str| row.get::<_, Option<DateTime<Utc>>>(c).map(rfc3339);
    Ok(KeyInfo {
        prefix: format!("{}{id}_", token::PREFIX),
        id,
        name: row.get("name"),
        scope: scope(row)?,
        accounts: row.get("accounts"),
        state,
        created_at: rfc3339(row.get("created_at")),
        expires_at: time("expires_at"),
        last_used_at: time("last_used_at"),
        revoked_at: time("revoked_at"),
    })
}

//! API keys: who may call the HTTP API, and for which accounts.
//!
//! A key (`hf_live_<id>_<secret>`, see [`token`]) is shown once, when it is
//! created, and stored only as its SHA-256 ([`store`], migrations/V11). It has
//! one [`Scope`]:
//!
//! | scope | may |
//! |---|---|
//! | `reader` | read batches, reservations and accounts |
//! | `producer` | what a reader may, and preview, reserve, submit and cancel |
//! | `admin` | everything: grants, allowances, keys; every account |
//!
//! A reader or producer key is limited to a list of accounts, or covers all
//! of them ([`Accounts`]). A key may expire, and may be revoked (final).
//! [`cache::Keyring`] checks the keys requests carry, keeping what it read for
//! a short time so that the database is not asked on every request.

pub mod cache;
pub mod store;
pub mod token;

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use holdfast_common::messages::FieldError;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

pub use cache::{Keyring, Verdict};
pub use store::KeyStore;

/// Most accounts one key may be limited to.
pub const MAX_KEY_ACCOUNTS: usize = 1000;
/// Longest name of a key, in characters.
pub const MAX_KEY_NAME_CHARS: usize = 200;
/// Longest lifetime given in days (`--expires-in`, `expires_in_days`): ten years.
pub const MAX_KEY_DAYS: u32 = 3650;

/// What a key may do. Each scope may do what the one before it may.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Read batches, reservations and accounts.
    Reader,
    /// Also preview, reserve, submit and cancel.
    Producer,
    /// Everything, on every account: grants, allowances, keys.
    Admin,
}

impl Scope {
    /// The scope's name, as stored and documented.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Reader => "reader",
            Scope::Producer => "producer",
            Scope::Admin => "admin",
        }
    }

    /// Whether a key of this scope may do what `needed` allows.
    pub fn allows(self, needed: Scope) -> bool {
        self >= needed
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Scope {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "reader" => Ok(Scope::Reader),
            "producer" => Ok(Scope::Producer),
            "admin" => Ok(Scope::Admin),
            other => Err(format!("must be reader, producer or admin, got `{other}`")),
        }
    }
}

/// The accounts a key may use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Accounts {
    /// Every account, including those created later.
    All,
    /// These accounts only.
    Only(Vec<String>),
}

impl Accounts {
    /// Whether the key may use `account`.
    pub fn covers(&self, account: &str) -> bool {
        match self {
            Accounts::All => true,
            Accounts::Only(list) => list.iter().any(|a| a == account),
        }
    }

    /// As stored: `None` for every account.
    pub fn as_list(&self) -> Option<&[String]> {
        match self {
            Accounts::All => None,
            Accounts::Only(list) => Some(list),
        }
    }

    fn from_list(list: Option<Vec<String>>) -> Self {
        list.map_or(Accounts::All, Accounts::Only)
    }
}

/// A key to create.
#[derive(Clone, Debug)]
pub struct KeySpec {
    pub scope: Scope,
    pub accounts: Accounts,
    /// The key is refused from this time on; `None`: never expires.
    pub expires_at: Option<DateTime<Utc>>,
    /// What the key is for.
    pub name: Option<String>,
}

impl KeySpec {
    /// Check the spec; each problem names the field of `POST /v1/keys` it concerns.
    pub fn check(&self) -> Result<(), Vec<FieldError>> {
        let mut errors = Vec::new();
        let mut bad = |field: &str, reason: String| {
            errors.push(FieldError {
                field: field.into(),
                reason,
            })
        };
        match (&self.scope, &self.accounts) {
            (Scope::Admin, Accounts::Only(_)) => bad(
                "accounts",
                "an admin key covers every account: give no accounts".into(),
            ),
            (_, Accounts::Only(list)) if list.is_empty() => bad(
                "accounts",
                "name at least one account, or set all_accounts".into(),
            ),
            (_, Accounts::Only(list)) if list.len() > MAX_KEY_ACCOUNTS => {
                bad("accounts", format!("at most {MAX_KEY_ACCOUNTS} accounts"))
            }
            (_, Accounts::Only(list)) => {
                for (i, a) in list.iter().enumerate() {
                    if let Err(reason) = crate::intake::check_id(a) {
                        bad(&format!("accounts[{i}]"), reason);
                    }
                }
            }
            (_, Accounts::All) => {}
        }
        if let Some(at) = self.expires_at {
            if at <= Utc::now() {
                bad("expires_at", "must be in the future".into());
            }
        }
        if let Some(name) = &self.name {
            if name.chars().count() > MAX_KEY_NAME_CHARS {
                bad(
                    "name",
                    format!("must be at most {MAX_KEY_NAME_CHARS} characters"),
                );
            } else if name.chars().any(char::is_control) {
                bad("name", "must not contain control characters".into());
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }
}

/// Whether a key is accepted now.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum KeyState {
    /// Accepted.
    Active,
    /// Past its `expires_at`: refused.
    Expired,
    /// Revoked: refused, for good.
    Revoked,
}

/// A key as lists show it: never its secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, ToSchema)]
pub struct KeyInfo {
    /// The key's public id (the part after `hf_live_`).
    #[schema(example = "k3q7m2xw5abc")]
    pub id: String,
    /// How the key starts (`hf_live_<id>_`), to recognise it.
    pub prefix: String,
    /// What the key is for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub scope: Scope,
    /// The accounts the key may use; `null`: every account.
    pub accounts: Option<Vec<String>>,
    pub state: KeyState,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339; absent: never expires.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    /// RFC 3339: the key was used then, and may have been used up to a minute
    /// later (the time is written at most once a minute); absent: never used.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_used_at: Option<String>,
    /// RFC 3339; absent: not revoked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<String>,
}

/// A key just created: the key itself, shown this once, and what lists show.
#[derive(Clone, Serialize, ToSchema)]
pub struct CreatedKey {
    /// The whole key, `hf_live_<id>_<secret>`: send it as
    /// `Authorization: Bearer <key>`. Shown once: Holdfast keeps only its hash.
    pub key: String,
    #[serde(flatten)]
    pub info: KeyInfo,
}

impl fmt::Debug for CreatedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CreatedKey")
            .field("key", &"***")
            .field("info", &self.info)
            .finish()
    }
}

/// What checking a request's key needs to know about it.
#[derive(Clone, Debug)]
pub struct Credentials {
    pub id: String,
    pub hash: Vec<u8>,
    pub scope: Scope,
    pub accounts: Accounts,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(scope: Scope, accounts: Accounts) -> KeySpec {
        KeySpec {
            scope,
            accounts,
            expires_at: None,
            name: None,
        }
    }

    #[test]
    fn scopes_include_the_ones_below() {
        assert!(Scope::Admin.allows(Scope::Producer));
        assert!(Scope::Producer.allows(Scope::Reader));
        assert!(Scope::Producer.allows(Scope::Producer));
        assert!(!Scope::Reader.allows(Scope::Producer));
        assert!(!Scope::Producer.allows(Scope::Admin));
        assert_eq!("producer".parse::<Scope>(), Ok(Scope::Producer));
        assert!("root".parse::<Scope>().is_err());
    }

    #[test]
    fn specs_are_checked() {
        let only = |a: &[&str]| Accounts::Only(a.iter().map(|s| s.to_string()).collect());
        assert!(spec(Scope::Producer, only(&["acme"])).check().is_ok());
        assert!(spec(Scope::Reader, Accounts::All).check().is_ok());
        assert!(spec(Scope::Admin, Accounts::All).check().is_ok());
        assert!(spec(Scope::Admin, only(&["acme"])).check().is_err());
        assert!(spec(Scope::Producer, only(&[])).check().is_err());
        let errors = spec(Scope::Producer, only(&["ok", ""]))
            .check()
            .unwrap_err();
        assert_eq!(errors[0].field, "accounts[1]");
        let mut past = spec(Scope::Reader, Accounts::All);
        past.expires_at = Some(Utc::now() - chrono::Duration::seconds(1));
        assert_eq!(past.check().unwrap_err()[0].field, "expires_at");
        let mut named = spec(Scope::Reader, Accounts::All);
        named.name = Some("line\nbreak".into());
        assert_eq!(named.check().unwrap_err()[0].field, "name");
        assert!(only(&["a", "b"]).covers("b"));
        assert!(!only(&["a", "b"]).covers("c"));
        assert!(Accounts::All.covers("anything"));
    }
}

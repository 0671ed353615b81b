//! API keys over HTTP, for admins: create one (the key is in the answer,
//! once), list them, show one, revoke one. The same as `holdfast key
//! create | list | revoke`. The process's database user must be a member of
//! `holdfast_admin` to create and revoke (else `403`).

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use holdfast_common::messages::FieldError;
use serde::Deserialize;
use serde_json::Value;
use utoipa::ToSchema;

use super::body::{self, JsonBody, PathId};
use super::problem::Problem;
use super::ApiState;
use crate::keys::{Accounts, CreatedKey, KeyInfo, KeySpec, Scope, MAX_KEY_DAYS};

/// A key to create.
#[derive(Deserialize, ToSchema)]
#[allow(dead_code)] // Describes the body for the OpenAPI document; parsed by hand.
pub struct KeyRequest {
    /// `reader`, `producer` or `admin`.
    scope: Scope,
    /// The accounts a reader or producer key may use (or set `all_accounts`).
    /// An admin key takes none: it covers every account.
    #[schema(min_items = 1, max_items = 1000, example = json!(["acme"]))]
    accounts: Option<Vec<String>>,
    /// The key may use every account, including those created later.
    all_accounts: Option<bool>,
    /// The key expires this many days from now (or give `expires_at`).
    #[schema(minimum = 1, maximum = 3650)]
    expires_in_days: Option<u32>,
    /// RFC 3339, in the future: the key expires then. Default: never.
    #[schema(format = DateTime)]
    expires_at: Option<String>,
    /// What the key is for.
    #[schema(max_length = 200)]
    name: Option<String>,
}

fn parse(body: &[u8]) -> Result<KeySpec, Problem> {
    let obj = body::object(body)?;
    let mut errors = Vec::new();
    let mut bad = |field: &str, reason: String| {
        errors.push(FieldError {
            field: field.into(),
            reason,
        })
    };
    let scope = match obj.get("scope") {
        None | Some(Value::Null) => {
            bad("scope", "is required: reader, producer or admin".into());
            None
        }
        Some(Value::String(s)) => s.parse().map_err(|e| bad("scope", e)).ok(),
        Some(_) => {
            bad("scope", "must be reader, producer or admin".into());
            None
        }
    };
    let listed = match obj.get("accounts") {
        None | Some(Value::Null) => None,
        Some(Value::Array(items)) => {
            let mut list = Vec::new();
            for (i, v) in items.iter().enumerate() {
                match v {
                    Value::String(a) => list.push(a.clone()),
                    _ => bad(&format!("accounts[{i}]"), "must be a string".into()),
                }
            }
            Some(list)
        }
        Some(_) => {
            bad("accounts", "must be a list of account ids".into());
            None
        }
    };
    let all = match obj.get("all_accounts") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            bad("all_accounts", "must be true or false".into());
            false
        }
    };
    let accounts = match (scope, listed, all) {
        (_, Some(_), true) => {
            bad(
                "all_accounts",
                "give accounts, or all_accounts: not both".into(),
            );
            Accounts::All
        }
        (_, Some(list), false) => Accounts::Only(list),
        (Some(Scope::Admin), None, _) | (_, None, true) => Accounts::All,
        (Some(s), None, false) => {
            bad(
                "accounts",
                format!("a {s} key needs accounts (one or more), or all_accounts: true"),
            );
            Accounts::All
        }
        (None, None, false) => Accounts::All,
    };
    let in_days = match obj.get("expires_in_days") {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_u64() {
            Some(d) if (1..=u64::from(MAX_KEY_DAYS)).contains(&d) => {
                Some(Utc::now() + chrono::Duration::days(d as i64))
            }
            _ => {
                bad(
                    "expires_in_days",
                    format!("must be a whole number of days from 1 to {MAX_KEY_DAYS}, got {v}"),
                );
                None
            }
        },
    };
    let at = match obj.get("expires_at") {
        None | Some(Value::Null) => None,
        Some(Value::String(t)) => match DateTime::parse_from_rfc3339(t) {
            Ok(t) => Some(t.with_timezone(&Utc)),
            Err(e) => {
                bad(
                    "expires_at",
                    format!("must be an RFC 3339 time ({e}), got `{t}`"),
                );
                None
            }
        },
        Some(_) => {
            bad("expires_at", "must be an RFC 3339 time as a string".into());
            None
        }
    };
    if in_days.is_some() && at.is_some() {
        bad(
            "expires_at",
            "give expires_at, or expires_in_days: not both".into(),
        );
    }
    let name = match obj.get("name") {
        None | Some(Value::Null) => None,
        Some(Value::String(n)) => Some(n.clone()),
        Some(_) => {
            bad("name", "must be a string".into());
            None
        }
    };
    let (Some(scope), true) = (scope, errors.is_empty()) else {
        return Err(Problem::invalid(StatusCode::BAD_REQUEST, errors));
    };
    let spec = KeySpec {
        scope,
        accounts,
        expires_at: in_days.or(at),
        name,
    };
    spec.check()
        .map_err(|errors| Problem::invalid(StatusCode::BAD_REQUEST, errors))?;
    Ok(spec)
}

/// Create an API key. The answer carries the key itself, this once: only its
/// hash is stored.
#[utoipa::path(
    post,
    path = "/v1/keys",
    tag = "keys",
    request_body(content = KeyRequest, content_type = "application/json"),
    security(("api_key" = ["admin"])),
    responses(
        (status = 201, description = "Created: `key` is shown this once", body = CreatedKey,
            headers(("Location" = String, description = "/v1/keys/{id}"))),
        (status = 400, description = "Invalid request; `errors` names each field", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "This process's database user may not create keys", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Body is not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Database unavailable; retry", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn create(
    State(s): State<ApiState>,
    JsonBody(body): JsonBody,
) -> Result<Response, Problem> {
    let spec = parse(&body)?;
    let created = s.access.keyring.store().create(&spec).await?;
    tracing::info!(key_id = %created.info.id, scope = %spec.scope, "API key created over HTTP");
    let location = format!("/v1/keys/{}", created.info.id);
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(created),
    )
        .into_response())
}

/// Every API key, oldest first (revoked and expired ones too); never a secret.
#[utoipa::path(
    get,
    path = "/v1/keys",
    tag = "keys",
    security(("api_key" = ["admin"])),
    responses(
        (status = 200, description = "The keys", body = Vec<KeyInfo>),
        (status = 403, description = "This process's database user may not list keys", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Database unavailable; retry", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn list(State(s): State<ApiState>) -> Result<Json<Vec<KeyInfo>>, Problem> {
    Ok(Json(s.access.keyring.store().list().await?))
}

/// One API key (never its secret).
#[utoipa::path(
    get,
    path = "/v1/keys/{id}",
    tag = "keys",
    params(("id" = String, Path, description = "The key's id (the part after `hf_live_`)", example = "k3q7m2xw5abc")),
    security(("api_key" = ["admin"])),
    responses(
        (status = 200, description = "The key", body = KeyInfo),
        (status = 400, description = "Malformed id", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "This process's database user may not read keys", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such key", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Database unavailable; retry", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn show(State(s): State<ApiState>, PathId(id): PathId) -> Result<Json<KeyInfo>, Problem> {
    Ok(Json(s.access.keyring.store().get(&id).await?))
}

/// Revoke an API key: refused from now on by this process, and by the
/// others within `HOLDFAST_API_KEY_CACHE_SECS`. Final. A key revoked before
/// is answered as it is.
#[utoipa::path(
    delete,
    path = "/v1/keys/{id}",
    tag = "keys",
    params(("id" = String, Path, description = "The key's id (the part after `hf_live_`)", example = "k3q7m2xw5abc")),
    security(("api_key" = ["admin"])),
    responses(
        (status = 200, description = "Revoked (or already revoked): the key as it is now", body = KeyInfo),
        (status = 400, description = "Malformed id", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "This process's database user may not revoke keys", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such key", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Database unavailable; retry", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn revoke(
    State(s): State<ApiState>,
    PathId(id): PathId,
) -> Result<Json<KeyInfo>, Problem> {
    let revoked = s.access.keyring.store().revoke(&id).await?;
    s.access.keyring.forget(&id);
    tracing::info!(key_id = %id, "API key revoked over HTTP");
    Ok(Json(revoked))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_key_requests() {
        let k = parse(br#"{"scope":"producer","accounts":["acme","beta"],"expires_in_days":7}"#)
            .unwrap();
        assert_eq!(k.scope, Scope::Producer);
        assert_eq!(
            k.accounts,
            Accounts::Only(vec!["acme".into(), "beta".into()])
        );
        assert!(k.expires_at.unwrap() > Utc::now() + chrono::Duration::days(6));
        let admin = parse(br#"{"scope":"admin","name":"ops"}"#).unwrap();
        assert_eq!(admin.accounts, Accounts::All);
        let all = parse(br#"{"scope":"reader","all_accounts":true}"#).unwrap();
        assert_eq!(all.accounts, Accounts::All);
    }

    #[test]
    fn refuses_bad_key_requests() {
        for (body, field) in [
            (r#"{}"#, "scope"),
            (r#"{"scope":"root","all_accounts":true}"#, "scope"),
            (r#"{"scope":"producer"}"#, "accounts"),
            (r#"{"scope":"producer","accounts":[]}"#, "accounts"),
            (r#"{"scope":"producer","accounts":[7]}"#, "accounts[0]"),
            (r#"{"scope":"admin","accounts":["acme"]}"#, "accounts"),
            (
                r#"{"scope":"reader","accounts":["a"],"all_accounts":true}"#,
                "all_accounts",
            ),
            (
                r#"{"scope":"reader","all_accounts":true,"expires_in_days":0}"#,
                "expires_in_days",
            ),
            (
                r#"{"scope":"reader","all_accounts":true,"expires_at":"2001-01-01T00:00:00Z"}"#,
                "expires_at",
            ),
            (
                r#"{"scope":"reader","all_accounts":true,"expires_at":"soon"}"#,
                "expires_at",
            ),
            (r#"{"scope":"reader","all_accounts":true,"name":5}"#, "name"),
        ] {
            let p = parse(body.as_bytes()).unwrap_err();
            assert_eq!(p.status, 400, "{body}");
            assert!(
                p.extensions.errors.iter().any(|e| e.field == field),
                "{body}: {:?}",
                p.extensions.errors
            );
        }
    }
}

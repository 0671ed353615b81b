//! Accounts over HTTP: balances with their grants, allowances and open
//! holds, and (admin only) adding and voiding grants. Allowances are
//! managed in [`super::allowances`].

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, Utc};
use holdfast_common::ledger::{Allowance, Grant, GrantSource, GrantSpec, ALLOWANCE_GRANT_PREFIX};
use holdfast_common::messages::Reservation;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use super::auth::Caller;
use super::body::{self, JsonBody, PathId, PathIds};
use super::problem::Problem;
use super::ApiState;

/// Longest journal note a grant may carry, in characters.
const MAX_NOTE_CHARS: usize = 1000;

/// An account's credits, its grants and the holds on them.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct AccountView {
    /// The account id.
    pub id: String,
    /// Credits the grants have left (including what open holds took).
    pub balance: i64,
    /// Sum of the open holds.
    pub held: i64,
    /// What a new hold may take now: what the active grants have left, less
    /// what open holds took of them (a grant past its expiry counts for nothing).
    pub available: i64,
    /// How many holds are open.
    pub open_holds: i64,
    /// The grants, in the order new holds use them (active first).
    pub grants: Vec<Grant>,
    /// The allowances, oldest first: each issues one `plan` grant per period.
    pub allowances: Vec<Allowance>,
    /// The open holds: soft holds (with `expires_at`) and running batches' holds (with `batch_id`).
    pub holds: Vec<Reservation>,
}

pub(super) async fn view(s: &ApiState, id: &str) -> Result<AccountView, Problem> {
    let a = s.ledger.account(id).await?;
    let grants = s.ledger.grants(id).await?;
    let allowances = s.ledger.allowances(id).await?;
    let holds = s.ledger.open_holds(id).await?;
    Ok(AccountView {
        id: a.id,
        balance: a.balance,
        held: a.held,
        available: a.available,
        open_holds: a.open_holds,
        grants,
        allowances,
        holds,
    })
}

/// Balance, held and available credits, the grants, the allowances and the open holds.
#[utoipa::path(
    get,
    path = "/v1/accounts/{id}",
    tag = "accounts",
    params(("id" = String, Path, description = "The account id", example = "acme")),
    security(("api_key" = ["reader"])),
    responses(
        (status = 200, description = "The account", body = AccountView),
        (status = 400, description = "Malformed id", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Unknown account", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Ledger unavailable; retry", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn show(
    State(s): State<ApiState>,
    caller: Caller,
    PathId(id): PathId,
) -> Result<Json<AccountView>, Problem> {
    caller.may_use(&id)?;
    Ok(Json(view(&s, &id).await?))
}

/// Credits to add to an account: one grant.
#[derive(Deserialize, ToSchema)]
#[allow(dead_code)] // Describes the body for the OpenAPI document; parsed by hand.
pub struct GrantRequest {
    /// Credits to add, in the smallest unit.
    #[schema(minimum = 1)]
    amount: i64,
    /// Idempotency key within the account: the same id with the same terms
    /// adds nothing the second time, with other terms it is a 409. Default: a new id.
    #[schema(min_length = 1, max_length = 128)]
    grant_id: Option<String>,
    /// Where the credits come from (default `manual`).
    source: Option<GrantSource>,
    /// Lower is used first (default 0).
    #[schema(minimum = -2147483648, maximum = 2147483647)]
    priority: Option<i32>,
    /// RFC 3339, in the future: what is left of the grant then expires.
    /// Default: never.
    #[schema(format = DateTime)]
    expires_at: Option<String>,
    /// A reference stored with the grant and in the journal (invoice, reason).
    #[schema(max_length = 1000)]
    note: Option<String>,
    /// Create the account if it does not exist (default false: unknown accounts are 404).
    create: Option<bool>,
}

struct NewGrant {
    spec: GrantSpec,
    create: bool,
}

fn parse_grant(body: &[u8]) -> Result<NewGrant, Problem> {
    let obj = body::object(body)?;
    let mut errors = Vec::new();
    let mut bad = |field: &str, reason: String| {
        errors.push(holdfast_common::messages::FieldError {
            field: field.into(),
            reason,
        })
    };
    let amount = match obj.get("amount") {
        None | Some(Value::Null) => {
            bad("amount", "is required".into());
            0
        }
        Some(v) => match v.as_i64() {
            Some(a) if a > 0 => a,
            _ => {
                bad(
                    "amount",
                    format!("must be a positive whole number of credits, got {v}"),
                );
                0
            }
        },
    };
    let note = match obj.get("note") {
        None | Some(Value::Null) => None,
        Some(Value::String(n)) if n.chars().count() > MAX_NOTE_CHARS => {
            bad(
                "note",
                format!("must be at most {MAX_NOTE_CHARS} characters"),
            );
            None
        }
        Some(Value::String(n)) if n.contains('\0') => {
            bad("note", "must not contain the NUL character".into());
            None
        }
        Some(Value::String(n)) => Some(n.clone()),
        Some(_) => {
            bad("note", "must be a string".into());
            None
        }
    };
    let create = match obj.get("create") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            bad("create", "must be true or false".into());
            false
        }
    };
    let grant_id = match obj.get("grant_id") {
        None | Some(Value::Null) => None,
        Some(Value::String(g)) if g.starts_with(ALLOWANCE_GRANT_PREFIX) => {
            bad(
                "grant_id",
                format!("must not start with `{ALLOWANCE_GRANT_PREFIX}`: the grants of allowances are named so"),
            );
            None
        }
        Some(Value::String(g)) => match crate::intake::check_id(g) {
            Ok(()) => Some(g.clone()),
            Err(reason) => {
                bad("grant_id", reason);
                None
            }
        },
        Some(_) => {
            bad("grant_id", "must be a string".into());
            None
        }
    };
    let source = match obj.get("source") {
        None | Some(Value::Null) => GrantSource::Manual,
        Some(Value::String(s)) => s.parse().unwrap_or_else(|_| {
            bad(
                "source",
                format!("must be plan, purchase, promotion or manual, got `{s}`"),
            );
            GrantSource::Manual
        }),
        Some(_) => {
            bad(
                "source",
                "must be plan, purchase, promotion or manual".into(),
            );
            GrantSource::Manual
        }
    };
    let priority = match obj.get("priority") {
        None | Some(Value::Null) => 0,
        Some(v) => match v.as_i64().and_then(|p| i32::try_from(p).ok()) {
            Some(p) => p,
            None => {
                bad(
                    "priority",
                    format!("must be a whole number between -2147483648 and 2147483647, got {v}"),
                );
                0
            }
        },
    };
    let expires_at = match obj.get("expires_at") {
        None | Some(Value::Null) => None,
        Some(Value::String(t)) => match DateTime::parse_from_rfc3339(t) {
            Ok(t) if t.with_timezone(&Utc) > Utc::now() => Some(t.with_timezone(&Utc)),
            Ok(_) => {
                bad("expires_at", format!("must be in the future, got {t}"));
                None
            }
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
    if errors.is_empty() {
        Ok(NewGrant {
            spec: GrantSpec {
                grant_id,
                amount,
                source,
                priority,
                expires_at,
                note,
            },
            create,
        })
    } else {
        Err(Problem::invalid(StatusCode::BAD_REQUEST, errors))
    }
}

/// Add credits as one grant (admin scope).
#[utoipa::path(
    post,
    path = "/v1/accounts/{id}/grants",
    tag = "accounts",
    params(("id" = String, Path, description = "The account id", example = "acme")),
    request_body(content = GrantRequest, content_type = "application/json"),
    security(("api_key" = ["admin"])),
    responses(
        (status = 200, description = "Granted: the account afterwards", body = AccountView),
        (status = 400, description = "Invalid request; `errors` names each field", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "This process's database user may not grant", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Unknown account (and `create` not set)", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "This `grant_id` was granted before with other terms", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Body is not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Ledger unavailable; retry", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn grant(
    State(s): State<ApiState>,
    id: Result<PathId, Problem>,
    body: Result<JsonBody, Problem>,
) -> Result<Json<AccountView>, Problem> {
    let PathId(id) = id?;
    let JsonBody(body) = body?;
    let g = parse_grant(&body)?;
    s.ledger.add_grant(&id, &g.spec, g.create).await?;
    Ok(Json(view(&s, &id).await?))
}

/// Void what a grant has left (admin). What open holds took of it stays
/// theirs; whatever they release of it later is voided too.
#[utoipa::path(
    delete,
    path = "/v1/accounts/{id}/grants/{grant_id}",
    tag = "accounts",
    params(
        ("id" = String, Path, description = "The account id", example = "acme"),
        ("grant_id" = String, Path, description = "The grant id", example = "topup-2026-12"),
    ),
    security(("api_key" = ["admin"])),
    responses(
        (status = 200, description = "Voided (or already expired or voided): the grant as it is now", body = Grant),
        (status = 400, description = "Malformed id", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "This process's database user may not void", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such grant on this account", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Ledger unavailable; retry", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn void(
    State(s): State<ApiState>,
    ids: Result<PathIds, Problem>,
) -> Result<Json<Grant>, Problem> {
    let PathIds(id, grant_id) = ids?;
    Ok(Json(s.ledger.void_grant(&id, &grant_id, None).await?))
}

//! Accounts over HTTP: balances with the open holds, and (admin only) grants.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use holdfast_common::messages::Reservation;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use super::auth::require_admin;
use super::body::{self, JsonBody, PathId};
use super::problem::Problem;
use super::ApiState;

/// Longest journal note a grant may carry, in characters.
const MAX_NOTE_CHARS: usize = 1000;

/// An account's credits and the holds on them. `available = balance - held`.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct AccountView {
    /// The account id.
    pub id: String,
    /// Posted credits.
    pub balance: i64,
    /// Sum of the open holds.
    pub held: i64,
    /// What a new hold may take: `balance - held`.
    pub available: i64,
    /// How many holds are open.
    pub open_holds: i64,
    /// The open holds: soft holds (with `expires_at`) and running batches' holds (with `batch_id`).
    pub holds: Vec<Reservation>,
}

async fn view(s: &ApiState, id: &str) -> Result<AccountView, Problem> {
    let a = s.ledger.account(id).await?;
    let holds = s.ledger.open_holds(id).await?;
    Ok(AccountView {
        id: a.id,
        balance: a.balance,
        held: a.held,
        available: a.available,
        open_holds: a.open_holds,
        holds,
    })
}

/// Balance, held and available credits, and the open holds.
#[utoipa::path(
    get,
    path = "/v1/accounts/{id}",
    tag = "accounts",
    params(("id" = String, Path, description = "The account id", example = "acme")),
    responses(
        (status = 200, description = "The account", body = AccountView),
        (status = 400, description = "Malformed id", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Unknown account", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Ledger unavailable; retry", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn show(
    State(s): State<ApiState>,
    PathId(id): PathId,
) -> Result<Json<AccountView>, Problem> {
    Ok(Json(view(&s, &id).await?))
}

/// Credits to add to an account.
#[derive(Deserialize, ToSchema)]
#[allow(dead_code)] // Describes the body for the OpenAPI document; parsed by hand.
pub struct GrantRequest {
    /// Credits to add, in the smallest unit.
    #[schema(minimum = 1)]
    amount: i64,
    /// A reference stored in the journal (invoice, reason).
    #[schema(max_length = 1000)]
    note: Option<String>,
    /// Create the account if it does not exist (default false: unknown accounts are 404).
    create: Option<bool>,
}

struct Grant {
    amount: i64,
    note: Option<String>,
    create: bool,
}

fn parse_grant(body: &[u8]) -> Result<Grant, Problem> {
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
    if errors.is_empty() {
        Ok(Grant {
            amount,
            note,
            create,
        })
    } else {
        Err(Problem::invalid(StatusCode::BAD_REQUEST, errors))
    }
}

/// Add credits (admin: `Authorization: Bearer $HOLDFAST_ADMIN_TOKEN`).
#[utoipa::path(
    post,
    path = "/v1/accounts/{id}/grants",
    tag = "accounts",
    params(("id" = String, Path, description = "The account id", example = "acme")),
    request_body(content = GrantRequest, content_type = "application/json"),
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "Granted: the account afterwards", body = AccountView),
        (status = 400, description = "Invalid request; `errors` names each field", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing or wrong bearer token", body = Problem, content_type = "application/problem+json",
            headers(("WWW-Authenticate" = String, description = "Bearer realm=\"holdfast-admin\""))),
        (status = 403, description = "Admin API disabled (HOLDFAST_ADMIN_TOKEN is not set), or this process's database user may not grant", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Unknown account (and `create` not set)", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Body is not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Ledger unavailable; retry", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn grant(
    State(s): State<ApiState>,
    headers: HeaderMap,
    id: Result<PathId, Problem>,
    body: Result<JsonBody, Problem>,
) -> Result<Json<AccountView>, Problem> {
    // Authenticate before looking at anything the caller sent.
    require_admin(s.admin_token.as_deref(), &headers)?;
    let PathId(id) = id?;
    let JsonBody(body) = body?;
    let g = parse_grant(&body)?;
    s.ledger
        .grant(&id, g.amount, g.note.as_deref(), g.create)
        .await?;
    Ok(Json(view(&s, &id).await?))
}

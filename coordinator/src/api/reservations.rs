//! Soft holds over HTTP: `POST /v1/reservations` sets credits aside for a
//! TTL (between a preview and the click), `GET` shows one, `DELETE` gives the
//! credits back. A batch request naming the `reservation_id` consumes it.

use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use holdfast_common::messages::{FieldError, Reservation};
use holdfast_common::pricing;
use serde::Deserialize;
use serde_json::{Map, Value};
use utoipa::ToSchema;

use super::auth::Caller;
use super::body::{self, JsonBody, PathId};
use super::problem::Problem;
use super::ApiState;
use crate::intake;
use holdfast_common::messages::PreviewRequest;

/// TTL of a soft hold whose request names none (capped by the configured maximum).
pub const DEFAULT_TTL_SECS: u64 = 300;

/// Credits to hold: an `amount`, or a batch whose total is held, described
/// exactly as `POST /v1/preview` takes it (`items`, or `count` × `cost`).
#[derive(Deserialize, ToSchema)]
#[serde(untagged)]
#[allow(dead_code)] // Describes the body for the OpenAPI document; parsed by hand.
pub enum ReservationRequest {
    /// A number of credits.
    Amount {
        /// The account whose credits are held.
        #[schema(example = "acme")]
        account_id: String,
        /// Credits to hold.
        #[schema(minimum = 1)]
        amount: i64,
        /// The spender the hold is charged to (and every spender above it);
        /// the batch that consumes it must name the same `spender_id`.
        spender_id: Option<String>,
        /// Seconds until the hold expires unless a batch consumes it (default 300,
        /// at most `HOLDFAST_MAX_RESERVATION_TTL_SECS`, 900 by default).
        #[schema(minimum = 1)]
        ttl_seconds: Option<u64>,
    },
    /// The total of a batch: reserve exactly what the batch request will cost.
    Batch {
        /// The batch, as a preview prices it.
        #[serde(flatten)]
        batch: PreviewRequest,
        /// Seconds until the hold expires unless a batch consumes it (default 300,
        /// at most `HOLDFAST_MAX_RESERVATION_TTL_SECS`, 900 by default).
        #[schema(minimum = 1)]
        ttl_seconds: Option<u64>,
    },
}

/// What to hold, for how long.
struct Wanted {
    account_id: String,
    spender_id: Option<String>,
    amount: i64,
    ttl: Duration,
}

fn bad(errors: Vec<FieldError>) -> Problem {
    Problem::invalid(StatusCode::BAD_REQUEST, errors)
}

fn err(field: &str, reason: impl Into<String>) -> FieldError {
    FieldError {
        field: field.into(),
        reason: reason.into(),
    }
}

fn ttl_field(obj: &Map<String, Value>, max: u64) -> Result<Duration, FieldError> {
    match obj.get("ttl_seconds") {
        None | Some(Value::Null) => Ok(Duration::from_secs(DEFAULT_TTL_SECS.min(max.max(1)))),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(0) => Err(err("ttl_seconds", "must be at least 1")),
            Some(t) if t > max => Err(err(
                "ttl_seconds",
                format!("{t} is longer than the maximum of {max} seconds"),
            )),
            Some(t) => Ok(Duration::from_secs(t)),
            None => Err(err(
                "ttl_seconds",
                format!("must be a positive whole number of seconds, got {n}"),
            )),
        },
        Some(_) => Err(err("ttl_seconds", "must be an integer")),
    }
}

fn parse(body: &[u8], s: &ApiState) -> Result<Wanted, Problem> {
    let obj = body::object(body)?;
    let mut errors = Vec::new();
    let ttl = ttl_field(&obj, s.config.settings.max_reservation_ttl_secs)
        .map_err(|e| errors.push(e))
        .ok();
    let given = |f: &str| obj.get(f).is_some_and(|v| !v.is_null());
    let wanted = if given("amount") {
        if ["items", "count", "cost"].iter().any(|f| given(f)) {
            errors.push(err(
                "amount",
                "give amount, or items, or count and cost: only one of them",
            ));
        }
        let account_id = match obj.get("account_id") {
            Some(Value::String(a)) => intake::check_id(a)
                .map(|()| a.clone())
                .map_err(|reason| errors.push(err("account_id", reason)))
                .ok(),
            None | Some(Value::Null) => {
                errors.push(err("account_id", "is required"));
                None
            }
            Some(_) => {
                errors.push(err("account_id", "must be a string"));
                None
            }
        };
        let amount = match obj.get("amount").and_then(Value::as_i64) {
            Some(a) if a > 0 => Some(a),
            _ => {
                errors.push(err(
                    "amount",
                    format!(
                        "must be a positive whole number of credits, got {}",
                        obj["amount"]
                    ),
                ));
                None
            }
        };
        let spender_id = match obj.get("spender_id") {
            None | Some(Value::Null) => None,
            Some(Value::String(sp)) => intake::check_id(sp)
                .map(|()| sp.clone())
                .map_err(|reason| errors.push(err("spender_id", reason)))
                .ok(),
            Some(_) => {
                errors.push(err("spender_id", "must be a string"));
                None
            }
        };
        account_id.zip(amount).map(|(a, n)| (a, spender_id, n))
    } else if !["items", "count", "cost"].iter().any(|f| given(f)) {
        errors.push(err("amount", "is required (or items, or count and cost)"));
        None
    } else {
        match intake::parse_preview(body, &s.config.limits) {
            Ok(req) => {
                let amount = pricing::cost_of(&req.items, &pricing::requested(&req));
                Some((req.account_id, req.spender_id, amount))
            }
            Err(r) => {
                errors.extend(r.errors);
                None
            }
        }
    };
    match (wanted, ttl) {
        (Some((account_id, spender_id, amount)), Some(ttl)) if errors.is_empty() => Ok(Wanted {
            account_id,
            spender_id,
            amount,
            ttl,
        }),
        _ => Err(bad(errors)),
    }
}

/// Hold credits for a TTL.
#[utoipa::path(
    post,
    path = "/v1/reservations",
    tag = "reservations",
    request_body(content = ReservationRequest, content_type = "application/json"),
    security(("api_key" = ["producer"])),
    responses(
        (status = 201, description = "Held; `Location` names the reservation", body = Reservation,
            headers(("Location" = String, description = "/v1/reservations/{reservation_id}"))),
        (status = 400, description = "Invalid request (including a TTL above the maximum); `errors` names each field", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Unknown account or spender", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Insufficient credits (or a spender's remaining limit): `requested` and `available`; nothing was held", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Body is not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Ledger unavailable; retry", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn create(
    State(s): State<ApiState>,
    caller: Caller,
    JsonBody(body): JsonBody,
) -> Result<Response, Problem> {
    let wanted = parse(&body, &s)?;
    caller.may_use(&wanted.account_id)?;
    let r = s
        .ledger
        .reserve_soft_for(
            &wanted.account_id,
            wanted.spender_id.as_deref(),
            wanted.amount,
            wanted.ttl,
        )
        .await?;
    let location = format!("/v1/reservations/{}", r.reservation_id);
    Ok((StatusCode::CREATED, [(header::LOCATION, location)], Json(r)).into_response())
}

/// One reservation (or any hold, by id).
#[utoipa::path(
    get,
    path = "/v1/reservations/{id}",
    tag = "reservations",
    params(("id" = String, Path, description = "The reservation_id")),
    security(("api_key" = ["reader"])),
    responses(
        (status = 200, description = "The reservation", body = Reservation),
        (status = 400, description = "Malformed id", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such reservation", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Ledger unavailable; retry", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn show(
    State(s): State<ApiState>,
    caller: Caller,
    PathId(id): PathId,
) -> Result<Json<Reservation>, Problem> {
    Ok(Json(owned(&s, &caller, &id).await?))
}

/// The reservation `id`, if the caller may use its account (see [`Caller::owned`]).
async fn owned(s: &ApiState, caller: &Caller, id: &str) -> Result<Reservation, Problem> {
    use holdfast_common::ledger::LedgerError;
    let (found, missing) = match s.ledger.reservation(id).await {
        Ok(r) => (Some(r), None),
        Err(e @ LedgerError::NotFound(_)) => (None, Some(e)),
        Err(e) => return Err(e.into()),
    };
    caller.owned(
        "reservation",
        id,
        found,
        |r| &r.account_id,
        || {
            missing.map_or_else(
                || Problem::status(StatusCode::NOT_FOUND, "no such reservation"),
                Problem::from,
            )
        },
    )
}

/// Cancel a soft hold no batch has consumed: its credits return at once.
/// A reservation that already closed or expired is answered as it is.
#[utoipa::path(
    delete,
    path = "/v1/reservations/{id}",
    tag = "reservations",
    params(("id" = String, Path, description = "The reservation_id")),
    security(("api_key" = ["producer"])),
    responses(
        (status = 200, description = "The reservation, now closed (or as it already was)", body = Reservation),
        (status = 400, description = "Malformed id", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such reservation", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "In use by a batch: cancel the batch instead", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Ledger unavailable; retry", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn cancel(
    State(s): State<ApiState>,
    caller: Caller,
    PathId(id): PathId,
) -> Result<Json<Reservation>, Problem> {
    if !caller.every_account() {
        owned(&s, &caller, &id).await?;
    }
    Ok(Json(s.ledger.cancel_soft(&id).await?))
}

//! Allowances over HTTP (admin only): `POST /v1/accounts/{id}/allowances`
//! gives an account credits every period, `PUT …/{allowance_id}` changes its
//! terms from the next period on, `DELETE …/{allowance_id}` stops it after
//! the current period. The reconciler issues the periods; the account view
//! (`GET /v1/accounts/{id}`) lists the allowances and the grants they issued.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use holdfast_common::ledger::{
    check_allowance_id, Allowance, AllowanceSpec, AllowanceTerms, Period, MAX_BACKDATE_DAYS,
};
use holdfast_common::messages::FieldError;
use serde::Deserialize;
use serde_json::{Map, Value};
use utoipa::ToSchema;

use super::body::{self, JsonBody, PathId, PathIds};
use super::problem::Problem;
use super::ApiState;

/// An allowance: `amount` credits every `period`, from `anchor` on.
#[derive(Deserialize, ToSchema)]
#[allow(dead_code)] // Describes the body for the OpenAPI document; parsed by hand.
pub struct AllowanceRequest {
    /// Credits issued each period, in the smallest unit.
    #[schema(minimum = 1)]
    amount: i64,
    /// How long a period lasts: `day`, `week` or `month` (a calendar month, UTC).
    period: Period,
    /// RFC 3339: the start of the first period; periods start at
    /// anchor + k·period. At most 366 days in the past (the periods missed
    /// since then are issued at once); whole seconds. Default: now.
    #[schema(format = DateTime)]
    anchor: Option<String>,
    /// Most unused credits carried from one period into the next, as a
    /// grant of their own (default 0: none).
    #[schema(minimum = 0)]
    rollover_cap: Option<i64>,
    /// Idempotency key within the account: the same id with the terms the
    /// allowance has now changes nothing, with other terms it is a 409.
    /// Default: a new id.
    allowance_id: Option<String>,
}

/// New terms for an allowance, from its next period on.
#[derive(Deserialize, ToSchema)]
#[allow(dead_code)] // Describes the body for the OpenAPI document; parsed by hand.
pub struct AllowanceChange {
    /// Credits issued each period from the next period on.
    #[schema(minimum = 1)]
    amount: i64,
    /// `day`, `week` or `month`; a new length starts its periods at the end of the current one.
    period: Period,
    /// Most unused credits carried into each period from the next one on (default 0).
    #[schema(minimum = 0)]
    rollover_cap: Option<i64>,
}

fn reason(field: &str, reason: impl Into<String>) -> FieldError {
    FieldError {
        field: field.into(),
        reason: reason.into(),
    }
}

/// `amount`, `period` and `rollover_cap`, each problem named.
fn terms(obj: &Map<String, Value>, errors: &mut Vec<FieldError>) -> AllowanceTerms {
    let amount = match obj.get("amount") {
        None | Some(Value::Null) => {
            errors.push(reason("amount", "is required"));
            0
        }
        Some(v) => match v.as_i64() {
            Some(a) if a > 0 => a,
            _ => {
                errors.push(reason(
                    "amount",
                    format!("must be a positive whole number of credits, got {v}"),
                ));
                0
            }
        },
    };
    let period = match obj.get("period") {
        None | Some(Value::Null) => {
            errors.push(reason("period", "is required: day, week or month"));
            Period::Month
        }
        Some(Value::String(p)) => p.parse().unwrap_or_else(|_| {
            errors.push(reason(
                "period",
                format!("must be day, week or month, got `{p}`"),
            ));
            Period::Month
        }),
        Some(_) => {
            errors.push(reason("period", "must be day, week or month"));
            Period::Month
        }
    };
    let rollover_cap = match obj.get("rollover_cap") {
        None | Some(Value::Null) => 0,
        Some(v) => match v.as_i64() {
            Some(c) if c >= 0 => c,
            _ => {
                errors.push(reason(
                    "rollover_cap",
                    format!("must be a whole number of credits, 0 or more, got {v}"),
                ));
                0
            }
        },
    };
    AllowanceTerms {
        amount,
        period,
        rollover_cap,
    }
}

fn anchor(obj: &Map<String, Value>, errors: &mut Vec<FieldError>) -> Option<DateTime<Utc>> {
    match obj.get("anchor") {
        None | Some(Value::Null) => None,
        Some(Value::String(t)) => match DateTime::parse_from_rfc3339(t) {
            Ok(t) if t.with_timezone(&Utc) >= earliest_anchor() => Some(t.with_timezone(&Utc)),
            Ok(_) => {
                errors.push(reason(
                    "anchor",
                    format!("must be at most {MAX_BACKDATE_DAYS} days in the past, got {t}"),
                ));
                None
            }
            Err(e) => {
                errors.push(reason(
                    "anchor",
                    format!("must be an RFC 3339 time ({e}), got `{t}`"),
                ));
                None
            }
        },
        Some(_) => {
            errors.push(reason("anchor", "must be an RFC 3339 time as a string"));
            None
        }
    }
}

fn earliest_anchor() -> DateTime<Utc> {
    Utc::now() - chrono::Duration::days(MAX_BACKDATE_DAYS.into())
}

fn parse_allowance(body: &[u8]) -> Result<AllowanceSpec, Problem> {
    let obj = body::object(body)?;
    let mut errors = Vec::new();
    let terms = terms(&obj, &mut errors);
    let anchor = anchor(&obj, &mut errors);
    let allowance_id = match obj.get("allowance_id") {
        None | Some(Value::Null) => None,
        Some(Value::String(a)) => match check_allowance_id(a) {
            Ok(()) => Some(a.clone()),
            Err(why) => {
                errors.push(reason("allowance_id", why));
                None
            }
        },
        Some(_) => {
            errors.push(reason("allowance_id", "must be a string"));
            None
        }
    };
    if !errors.is_empty() {
        return Err(Problem::invalid(StatusCode::BAD_REQUEST, errors));
    }
    Ok(AllowanceSpec {
        allowance_id,
        terms,
        anchor,
    })
}

fn parse_change(body: &[u8]) -> Result<AllowanceTerms, Problem> {
    let obj = body::object(body)?;
    let mut errors = Vec::new();
    let terms = terms(&obj, &mut errors);
    if obj.get("anchor").is_some_and(|a| !a.is_null()) {
        errors.push(reason(
            "anchor",
            "cannot change: new terms start at the end of the current period; stop this allowance and create another to move its periods",
        ));
    }
    if !errors.is_empty() {
        return Err(Problem::invalid(StatusCode::BAD_REQUEST, errors));
    }
    Ok(terms)
}

/// The `{id}` and `{allowance_id}` of the path, the latter within the
/// allowance id's length.
fn allowance_path(ids: Result<PathIds, Problem>) -> Result<(String, String), Problem> {
    let PathIds(id, allowance) = ids?;
    check_allowance_id(&allowance)
        .map_err(|why| Problem::field(StatusCode::BAD_REQUEST, "allowance_id", why))?;
    Ok((id, allowance))
}

/// Give an account credits every period (admin scope).
/// The reconciler issues each period's `plan` grant once the period has begun.
#[utoipa::path(
    post,
    path = "/v1/accounts/{id}/allowances",
    tag = "accounts",
    params(("id" = String, Path, description = "The account id", example = "acme")),
    request_body(content = AllowanceRequest, content_type = "application/json"),
    security(("api_key" = ["admin"])),
    responses(
        (status = 201, description = "Created: the allowance", body = Allowance),
        (status = 200, description = "This `allowance_id` exists with these terms: nothing changed", body = Allowance),
        (status = 400, description = "Invalid request; `errors` names each field", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "This process's database user may not manage allowances", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Unknown account", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "This `allowance_id` exists with other terms", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Body is not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Ledger unavailable; retry", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn create(
    State(s): State<ApiState>,
    id: Result<PathId, Problem>,
    body: Result<JsonBody, Problem>,
) -> Result<Response, Problem> {
    let PathId(id) = id?;
    let JsonBody(body) = body?;
    let spec = parse_allowance(&body)?;
    let allowed = s.ledger.create_allowance(&id, &spec).await?;
    let status = if allowed.replayed {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((status, Json(allowed.allowance)).into_response())
}

/// Change an allowance's terms from its next period on (admin). The period
/// under way keeps its grant; before the first period begins, it starts
/// with the new terms.
#[utoipa::path(
    put,
    path = "/v1/accounts/{id}/allowances/{allowance_id}",
    tag = "accounts",
    params(
        ("id" = String, Path, description = "The account id", example = "acme"),
        ("allowance_id" = String, Path, description = "The allowance id", example = "pro-plan"),
    ),
    request_body(content = AllowanceChange, content_type = "application/json"),
    security(("api_key" = ["admin"])),
    responses(
        (status = 200, description = "Changed: the allowance, its new terms in `next_terms` until they apply", body = Allowance),
        (status = 400, description = "Invalid request; `errors` names each field", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "This process's database user may not manage allowances", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Unknown account or allowance", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The allowance is stopped", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Body is not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Ledger unavailable; retry", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn change(
    State(s): State<ApiState>,
    ids: Result<PathIds, Problem>,
    body: Result<JsonBody, Problem>,
) -> Result<Json<Allowance>, Problem> {
    let (id, allowance) = allowance_path(ids)?;
    let JsonBody(body) = body?;
    let terms = parse_change(&body)?;
    Ok(Json(
        s.ledger.change_allowance(&id, &allowance, &terms).await?,
    ))
}

/// Stop an allowance after its current period (admin): the current
/// period's grant stays, no later period is issued.
#[utoipa::path(
    delete,
    path = "/v1/accounts/{id}/allowances/{allowance_id}",
    tag = "accounts",
    params(
        ("id" = String, Path, description = "The account id", example = "acme"),
        ("allowance_id" = String, Path, description = "The allowance id", example = "pro-plan"),
    ),
    security(("api_key" = ["admin"])),
    responses(
        (status = 200, description = "Stopped (or stopped before): the allowance, with `stops_at`", body = Allowance),
        (status = 400, description = "Malformed id", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "This process's database user may not manage allowances", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Unknown account or allowance", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Ledger unavailable; retry", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn stop(
    State(s): State<ApiState>,
    ids: Result<PathIds, Problem>,
) -> Result<Json<Allowance>, Problem> {
    let (id, allowance) = allowance_path(ids)?;
    Ok(Json(s.ledger.stop_allowance(&id, &allowance).await?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fields(p: Problem) -> Vec<String> {
        p.extensions.errors.into_iter().map(|e| e.field).collect()
    }

    #[test]
    fn each_bad_field_is_named() {
        let body = json!({"amount": 0, "period": "year", "rollover_cap": -1,
                          "anchor": "soon", "allowance_id": "x".repeat(65)});
        let p = parse_allowance(body.to_string().as_bytes()).unwrap_err();
        assert_eq!(
            fields(p),
            ["amount", "period", "rollover_cap", "anchor", "allowance_id"]
        );
        let p =
            parse_change(br#"{"period": "week", "anchor": "2030-01-01T00:00:00Z"}"#).unwrap_err();
        assert_eq!(fields(p), ["amount", "anchor"]);
    }

    #[test]
    fn defaults() {
        let spec = parse_allowance(br#"{"amount": 5, "period": "day"}"#).unwrap();
        assert_eq!(
            spec,
            AllowanceSpec {
                allowance_id: None,
                terms: AllowanceTerms {
                    amount: 5,
                    period: Period::Day,
                    rollover_cap: 0
                },
                anchor: None,
            }
        );
    }
}

//! Spenders over HTTP (admin only): `PUT /v1/accounts/{id}/spenders/{spender_id}`
//! creates or changes a spender (its parent, limit and period), `GET` shows
//! one (or `GET …/spenders` all of them) with its usage in the current
//! period, `DELETE` removes one that has nothing below it and no open hold.
//! Usage per spender is served here, never as a metric label.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use holdfast_common::ledger::{check_spender_id, Spender, SpenderSpec};
use holdfast_common::messages::{FieldError, LimitPeriod};
use serde::Deserialize;
use serde_json::{Map, Value};
use utoipa::ToSchema;

use super::body::{self, JsonBody, PathId, PathIds};
use super::problem::Problem;
use super::ApiState;

/// A spender's whole definition.
#[derive(Deserialize, ToSchema)]
#[allow(dead_code)] // Describes the body for the OpenAPI document; parsed by hand.
pub struct SpenderRequest {
    /// The spender above this one (same account); absent: a root.
    #[schema(example = "design")]
    parent: Option<String>,
    /// What it is to people, used in decisions ("Your team 'design' has …"):
    /// 1 to 32 characters, default `spender`.
    #[schema(example = "team")]
    kind: Option<String>,
    /// Most credits held plus captured per period by batches charged to it
    /// or below it; absent: no limit (usage is still counted).
    #[schema(minimum = 0)]
    limit: Option<i64>,
    /// `day`, `week`, `month` (calendar, UTC unless anchored) or `none` (a
    /// lifetime cap); default `none`.
    period: Option<LimitPeriod>,
    /// RFC 3339, not in the future: periods start at anchor + k·period.
    /// Absent: calendar periods in UTC (midnight, Monday, the 1st).
    #[schema(format = DateTime)]
    anchor: Option<String>,
}

fn reason(field: &str, reason: impl Into<String>) -> FieldError {
    FieldError {
        field: field.into(),
        reason: reason.into(),
    }
}

/// The spec, or every problem named by field.
fn parse_spender(body: &[u8]) -> Result<SpenderSpec, Problem> {
    let obj: Map<String, Value> = body::object(body)?;
    let mut errors = Vec::new();
    let text = |field: &str, errors: &mut Vec<FieldError>| match obj.get(field) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => {
            errors.push(reason(field, "must be a string"));
            None
        }
    };
    let parent = text("parent", &mut errors);
    if let Some(p) = &parent {
        if let Err(why) = check_spender_id(p) {
            errors.push(reason("parent", why));
        }
    }
    let kind = text("kind", &mut errors);
    if kind
        .as_ref()
        .is_some_and(|k| k.is_empty() || k.chars().count() > 32 || k.chars().any(char::is_control))
    {
        errors.push(reason("kind", "must be 1 to 32 printable characters"));
    }
    let limit = match obj.get("limit") {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_i64() {
            Some(l) if l >= 0 => Some(l),
            _ => {
                errors.push(reason(
                    "limit",
                    format!("must be a whole number of credits, 0 or more, got {v}"),
                ));
                None
            }
        },
    };
    let period = match text("period", &mut errors) {
        None => LimitPeriod::None,
        Some(p) => LimitPeriod::parse(&p).unwrap_or_else(|| {
            errors.push(reason(
                "period",
                format!("must be day, week, month or none, got `{p}`"),
            ));
            LimitPeriod::None
        }),
    };
    let anchor = match text("anchor", &mut errors) {
        None => None,
        Some(a) => match DateTime::parse_from_rfc3339(&a) {
            Ok(t) if t.with_timezone(&Utc) > Utc::now() => {
                errors.push(reason("anchor", "must not be in the future"));
                None
            }
            Ok(t) => Some(t.with_timezone(&Utc)),
            Err(e) => {
                errors.push(reason("anchor", format!("must be RFC 3339: {e}")));
                None
            }
        },
    };
    if anchor.is_some() && period == LimitPeriod::None {
        errors.push(reason("anchor", "needs a period: day, week or month"));
    }
    if !errors.is_empty() {
        return Err(Problem::invalid(StatusCode::BAD_REQUEST, errors));
    }
    Ok(SpenderSpec {
        parent,
        kind,
        limit,
        period,
        anchor,
    })
}

fn spender_path(ids: Result<PathIds, Problem>) -> Result<(String, String), Problem> {
    let PathIds(id, spender) = ids?;
    check_spender_id(&spender)
        .map_err(|why| Problem::field(StatusCode::BAD_REQUEST, "spender_id", why))?;
    Ok((id, spender))
}

/// Create or change a spender (admin). Its usage in the current period
/// stays; a new limit applies to it at once.
#[utoipa::path(
    put,
    path = "/v1/accounts/{id}/spenders/{spender_id}",
    tag = "accounts",
    params(
        ("id" = String, Path, description = "The account id", example = "acme"),
        ("spender_id" = String, Path, description = "The spender id", example = "design"),
    ),
    request_body(content = SpenderRequest, content_type = "application/json"),
    security(("api_key" = ["admin"])),
    responses(
        (status = 200, description = "Changed: the spender and its usage", body = Spender),
        (status = 201, description = "Created: the spender", body = Spender),
        (status = 400, description = "Invalid request (a cycle, more than 8 levels, an unknown parent); `errors` names each field", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "This process's database user may not manage spenders", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Unknown account", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Body is not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Ledger unavailable; retry", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn put(
    State(s): State<ApiState>,
    ids: Result<PathIds, Problem>,
    body: Result<JsonBody, Problem>,
) -> Result<Response, Problem> {
    let (id, spender) = spender_path(ids)?;
    let JsonBody(body) = body?;
    let spec = parse_spender(&body)?;
    let put = s.ledger.put_spender(&id, &spender, &spec).await?;
    let status = if put.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(put.spender)).into_response())
}

/// One spender: limit, used, held, remaining, resets_at and children (admin).
#[utoipa::path(
    get,
    path = "/v1/accounts/{id}/spenders/{spender_id}",
    tag = "accounts",
    params(
        ("id" = String, Path, description = "The account id", example = "acme"),
        ("spender_id" = String, Path, description = "The spender id", example = "design"),
    ),
    security(("api_key" = ["admin"])),
    responses(
        (status = 200, description = "The spender and its usage in the current period", body = Spender),
        (status = 400, description = "Malformed id", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Unknown account or spender", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Ledger unavailable; retry", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn show(
    State(s): State<ApiState>,
    ids: Result<PathIds, Problem>,
) -> Result<Json<Spender>, Problem> {
    let (id, spender) = spender_path(ids)?;
    Ok(Json(s.ledger.spender(&id, &spender).await?))
}

/// Every spender of an account, roots first (admin).
#[utoipa::path(
    get,
    path = "/v1/accounts/{id}/spenders",
    tag = "accounts",
    params(("id" = String, Path, description = "The account id", example = "acme")),
    security(("api_key" = ["admin"])),
    responses(
        (status = 200, description = "The spenders and their usage in their current periods", body = Vec<Spender>),
        (status = 400, description = "Malformed id", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Unknown account", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Ledger unavailable; retry", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn list(
    State(s): State<ApiState>,
    id: Result<PathId, Problem>,
) -> Result<Json<Vec<Spender>>, Problem> {
    let PathId(id) = id?;
    Ok(Json(s.ledger.spenders(&id).await?))
}

/// Remove a spender (admin): refused (409) while spenders are below it or
/// open holds count against it.
#[utoipa::path(
    delete,
    path = "/v1/accounts/{id}/spenders/{spender_id}",
    tag = "accounts",
    params(
        ("id" = String, Path, description = "The account id", example = "acme"),
        ("spender_id" = String, Path, description = "The spender id", example = "design"),
    ),
    security(("api_key" = ["admin"])),
    responses(
        (status = 204, description = "Removed"),
        (status = 400, description = "Malformed id", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "This process's database user may not manage spenders", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Unknown account or spender", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Spenders below it, or open holds against it", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Ledger unavailable; retry", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn delete(
    State(s): State<ApiState>,
    ids: Result<PathIds, Problem>,
) -> Result<StatusCode, Problem> {
    let (id, spender) = spender_path(ids)?;
    s.ledger.delete_spender(&id, &spender).await?;
    Ok(StatusCode::NO_CONTENT)
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
        let body = json!({"parent": "", "kind": 3, "limit": -1, "period": "year",
                          "anchor": "soon"});
        let p = parse_spender(body.to_string().as_bytes()).unwrap_err();
        assert_eq!(fields(p), ["parent", "kind", "limit", "period", "anchor"]);
        let p = parse_spender(br#"{"anchor": "2020-01-01T00:00:00Z"}"#).unwrap_err();
        assert_eq!(fields(p), ["anchor"]);
    }

    #[test]
    fn defaults() {
        let spec =
            parse_spender(br#"{"limit": 300, "period": "month", "parent": "design"}"#).unwrap();
        assert_eq!(
            spec,
            SpenderSpec {
                parent: Some("design".into()),
                kind: None,
                limit: Some(300),
                period: LimitPeriod::Month,
                anchor: None,
            }
        );
    }
}

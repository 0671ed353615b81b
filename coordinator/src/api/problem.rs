//! Problem documents (RFC 9457): the body of every error the API answers,
//! served as `application/problem+json`. Ledger errors map to statuses here,
//! in one place, and [`problem_responses`] turns the plain-text rejections of
//! the HTTP framework itself (unknown route, wrong method, unreadable body)
//! into problem documents too.

use axum::body::Body;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use holdfast_common::ledger::LedgerError;
use holdfast_common::messages::{FieldError, Rejected};
use holdfast_common::topology::BrokerError;
use serde::Serialize;
use utoipa::ToSchema;

/// The media type of every error body.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// What went wrong, for people and for programs (RFC 9457).
#[derive(Clone, Debug, PartialEq, Serialize, ToSchema)]
pub struct Problem {
    /// `about:blank` for a plain HTTP status, or `urn:holdfast:problem:<kind>`.
    #[serde(rename = "type")]
    pub kind: String,
    /// A short summary of the kind of problem.
    pub title: String,
    /// The HTTP status code.
    pub status: u16,
    /// What happened to this request, and what to do about it.
    pub detail: String,
    /// Members some problems add (boxed: a handler's error stays small).
    #[serde(flatten)]
    pub extensions: Box<Extensions>,
}

/// The members a problem adds to the standard ones, when they apply.
#[derive(Clone, Debug, Default, PartialEq, Serialize, ToSchema)]
pub struct Extensions {
    /// Validation problems, one per field (a JSON path such as `items[3].estimated_cost`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
    /// Insufficient credits: what was asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested: Option<i64>,
    /// Insufficient credits: what the account has available.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub available: Option<i64>,
    /// The batch the problem concerns, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_id: Option<String>,
    /// The account the problem concerns, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account_id: Option<String>,
}

impl Problem {
    /// A problem of a plain HTTP status (`type: about:blank`).
    pub fn status(status: StatusCode, detail: impl Into<String>) -> Self {
        Self {
            kind: "about:blank".into(),
            title: status.canonical_reason().unwrap_or("Error").into(),
            status: status.as_u16(),
            detail: detail.into(),
            extensions: Box::default(),
        }
    }

    /// A Holdfast-specific problem: `type` is `urn:holdfast:problem:<kind>`.
    pub fn new(status: StatusCode, kind: &str, title: &str, detail: impl Into<String>) -> Self {
        Self {
            kind: format!("urn:holdfast:problem:{kind}"),
            title: title.into(),
            ..Self::status(status, detail)
        }
    }

    /// The request is not acceptable as sent; `errors` names each field.
    pub fn invalid(status: StatusCode, errors: Vec<FieldError>) -> Self {
        let detail = errors
            .iter()
            .map(|e| format!("{}: {}", e.field, e.reason))
            .collect::<Vec<_>>()
            .join("; ");
        let mut p = Self::new(status, "invalid-request", "Invalid request", detail);
        p.extensions.errors = errors;
        p
    }

    /// One invalid field.
    pub fn field(status: StatusCode, field: &str, reason: impl Into<String>) -> Self {
        Self::invalid(
            status,
            vec![FieldError {
                field: field.into(),
                reason: reason.into(),
            }],
        )
    }

    /// A batch request the intake rejected: the `rejected` decision as a problem.
    pub fn rejected(status: StatusCode, rejected: Rejected) -> Self {
        let mut p = Self::invalid(status, rejected.errors);
        p.extensions.batch_id = rejected.batch_id;
        p.extensions.account_id = rejected.account_id;
        p
    }

    /// RabbitMQ could not be reached or refused a message: retry later.
    pub fn broker(e: &BrokerError) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "Temporarily unavailable",
            format!("{e}; try again shortly"),
        )
    }

    /// The same problem, naming the batch it concerns.
    pub fn with_batch(mut self, batch_id: impl Into<String>) -> Self {
        self.extensions.batch_id = Some(batch_id.into());
        self
    }

    /// The same problem, naming the account it concerns.
    pub fn with_account(mut self, account_id: impl Into<String>) -> Self {
        self.extensions.account_id = Some(account_id.into());
        self
    }

    /// The HTTP status.
    pub fn code(&self) -> StatusCode {
        StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }
}

impl From<LedgerError> for Problem {
    fn from(e: LedgerError) -> Self {
        use StatusCode as S;
        match e {
            LedgerError::UnknownAccount(a) => Self::new(
                S::NOT_FOUND,
                "unknown-account",
                "Unknown account",
                format!("unknown account `{a}`"),
            )
            .with_account(a),
            e @ LedgerError::UnknownSpender { .. } => Self::new(
                S::NOT_FOUND,
                "unknown-spender",
                "Unknown spender",
                e.to_string(),
            ),
            LedgerError::AccountExists(a) => Self::new(
                S::CONFLICT,
                "account-exists",
                "Account exists",
                format!("account `{a}` already exists"),
            ),
            LedgerError::Conflict(b) => Self::new(
                S::CONFLICT,
                "conflict",
                "Conflict",
                format!(
                    "batch `{b}` was already submitted with a different request; use a new batch_id"
                ),
            )
            .with_batch(b),
            e @ LedgerError::GrantConflict { .. } => Self::new(
                S::CONFLICT,
                "grant-conflict",
                "Grant conflict",
                format!("{e}; use a new grant_id"),
            ),
            e @ LedgerError::AllowanceConflict { .. } => Self::new(
                S::CONFLICT,
                "allowance-conflict",
                "Allowance conflict",
                format!("{e}; change its terms with PUT, or use a new allowance_id"),
            ),
            LedgerError::Invalid(why) => {
                Self::new(S::BAD_REQUEST, "invalid-request", "Invalid request", why)
            }
            LedgerError::Reservation(why) => {
                Self::new(S::CONFLICT, "reservation", "Reservation unusable", why)
            }
            LedgerError::Insufficient {
                requested,
                available,
            } => {
                let mut p = Self::new(
                    S::CONFLICT,
                    "insufficient-credits",
                    "Insufficient credits",
                    format!(
                        "{requested} credits requested, {available} available; nothing was held"
                    ),
                );
                p.extensions.requested = Some(requested);
                p.extensions.available = Some(available);
                p
            }
            LedgerError::NotFound(why) => Self::new(S::NOT_FOUND, "not-found", "Not found", why),
            LedgerError::WrongState(why) => {
                Self::new(S::CONFLICT, "wrong-state", "Wrong state", why)
            }
            e @ LedgerError::Unavailable(_) => Self::new(
                S::SERVICE_UNAVAILABLE,
                "unavailable",
                "Temporarily unavailable",
                format!("{e}; try again shortly"),
            ),
            LedgerError::Forbidden(why) => {
                tracing::error!(error = %why, "the database user lacks a privilege");
                Self::new(
                    S::FORBIDDEN,
                    "forbidden",
                    "Forbidden",
                    "this process's database user may not do this; send it to a process whose user may",
                )
            }
            e @ LedgerError::Database(_) => {
                tracing::error!(error = %e, "ledger error answering an HTTP request");
                Self::status(S::INTERNAL_SERVER_ERROR, e.to_string())
            }
        }
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = self.code();
        let body = serde_json::to_vec(&self).expect("problems serialise");
        let mut response = (status, [(header::CONTENT_TYPE, PROBLEM_JSON)], body).into_response();
        let headers = response.headers_mut();
        match status {
            StatusCode::UNAUTHORIZED => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static(r#"Bearer realm="holdfast""#),
                );
            }
            StatusCode::SERVICE_UNAVAILABLE => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
        response
    }
}

/// Middleware: an error response that is not JSON (the framework's own
/// rejections are plain text) becomes a problem document with the same
/// status and headers, its text as `detail`.
pub async fn problem_responses(response: Response) -> Response {
    let status = response.status();
    let json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json") || v.starts_with(PROBLEM_JSON));
    if !(status.is_client_error() || status.is_server_error()) || json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 16 * 1024)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let detail = match (text.is_empty(), status) {
        (false, _) => text,
        (true, StatusCode::NOT_FOUND) => "no such resource; see /openapi.json".into(),
        (true, StatusCode::METHOD_NOT_ALLOWED) => {
            "this resource does not support the method; see the Allow header".into()
        }
        (true, s) => s.canonical_reason().unwrap_or("error").to_string(),
    };
    let problem = Problem::status(status, detail);
    parts
        .headers
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
    parts.headers.remove(header::CONTENT_LENGTH);
    let body = serde_json::to_vec(&problem).expect("problems serialise");
    Response::from_parts(parts, Body::from(body))
}

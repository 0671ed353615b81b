//! Reading requests: a JSON body (content type checked, size limited, bytes
//! kept so the intake validates exactly what was sent) and ids from the path.
//! Every refusal is a [`Problem`], never the framework's plain text; a body
//! that stops arriving for longer than the body timeout is 408.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use serde_json::{Map, Value};
use tower_http::timeout::TimeoutError;

use super::problem::Problem;
use super::ApiState;
use crate::intake;

/// A request body that declares itself JSON, within the size limit
/// (`HOLDFAST_MAX_MESSAGE_BYTES`); its bytes are parsed by the handler.
pub struct JsonBody(pub Bytes);

/// True for `application/json` and `application/<something>+json`, with any parameters.
fn is_json(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

impl FromRequest<ApiState> for JsonBody {
    type Rejection = Problem;

    async fn from_request(req: Request, state: &ApiState) -> Result<Self, Problem> {
        let content_type = req
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap_or(""));
        match content_type {
            Some(ct) if is_json(ct) => {}
            Some(ct) => {
                return Err(Problem::status(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    format!("the body must be JSON (Content-Type: application/json), not `{ct}`"),
                ))
            }
            None => {
                return Err(Problem::status(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "the body must be JSON: send it with Content-Type: application/json",
                ))
            }
        }
        let limit = state.config.limits.max_message_bytes;
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|e| body_problem(e, limit, state.server.body_timeout))?;
        if bytes.is_empty() {
            return Err(Problem::field(
                StatusCode::BAD_REQUEST,
                "body",
                "is empty; send a JSON object",
            ));
        }
        Ok(JsonBody(bytes))
    }
}

fn body_problem(e: BytesRejection, limit: usize, timeout: Duration) -> Problem {
    if timed_out(&e) {
        return Problem::status(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the body stopped arriving for {} s; send it whole, without pauses",
                timeout.as_secs_f64()
            ),
        );
    }
    match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => Problem::status(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body is larger than the limit of {limit} bytes"),
        ),
        status => Problem::status(status, e.body_text()),
    }
}

/// Whether reading the body failed because the body timeout struck (the
/// server's `RequestBodyTimeoutLayer`, somewhere down the error's causes).
fn timed_out(e: &BytesRejection) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if c.is::<TimeoutError>() {
            return true;
        }
        cause = c.source();
    }
    false
}

/// The body as a JSON object, or a 400 problem naming `body`.
pub fn object(body: &[u8]) -> Result<Map<String, Value>, Problem> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(obj)) => Ok(obj),
        Ok(_) => Err(Problem::field(
            StatusCode::BAD_REQUEST,
            "body",
            "must be a JSON object",
        )),
        Err(e) => Err(Problem::field(
            StatusCode::BAD_REQUEST,
            "body",
            format!("not valid JSON: {e}"),
        )),
    }
}

/// The `{id}` of the path, checked like every id (1 to 128 printable characters).
pub struct PathId(pub String);

impl<S: Send + Sync> FromRequestParts<S> for PathId {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Problem> {
        let Path(id) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| Problem::field(StatusCode::BAD_REQUEST, "id", e.body_text()))?;
        intake::check_id(&id)
            .map_err(|reason| Problem::field(StatusCode::BAD_REQUEST, "id", reason))?;
        Ok(PathId(id))
    }
}

/// Two path segments, `{id}` and a second id (`{grant_id}`,
/// `{allowance_id}`), each checked like an id; a problem names the segment
/// as the route does.
pub struct PathIds(pub String, pub String);

impl<S: Send + Sync> FromRequestParts<S> for PathIds {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Problem> {
        let Path(segments) = Path::<Vec<(String, String)>>::from_request_parts(parts, state)
            .await
            .map_err(|e| Problem::field(StatusCode::BAD_REQUEST, "id", e.body_text()))?;
        let [(_, id), (name, second)] =
            <[(String, String); 2]>::try_from(segments).map_err(|_| {
                Problem::status(StatusCode::INTERNAL_SERVER_ERROR, "route without two ids")
            })?;
        intake::check_id(&id)
            .map_err(|reason| Problem::field(StatusCode::BAD_REQUEST, "id", reason))?;
        intake::check_id(&second)
            .map_err(|reason| Problem::field(StatusCode::BAD_REQUEST, &name, reason))?;
        Ok(PathIds(id, second))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_content_types() {
        assert!(is_json("application/json"));
        assert!(is_json("Application/JSON; charset=utf-8"));
        assert!(is_json("application/merge-patch+json"));
        assert!(!is_json("text/plain"));
        assert!(!is_json("application/x-www-form-urlencoded"));
        assert!(!is_json(""));
    }
}

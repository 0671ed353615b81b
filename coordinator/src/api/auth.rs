//! The admin endpoints' bearer token. The token is a setting
//! (`HOLDFAST_ADMIN_TOKEN`); without it the admin endpoints are disabled.
//! Tokens are compared in constant time: both sides are hashed to a fixed
//! length first, so neither the content nor the length leaks through timing.

use axum::http::{header, HeaderMap, StatusCode};
use sha2::{Digest, Sha256};

use super::problem::Problem;

/// Check the `Authorization: Bearer <token>` header against `expected`.
pub fn require_admin(expected: Option<&str>, headers: &HeaderMap) -> Result<(), Problem> {
    let Some(expected) = expected.filter(|t| !t.is_empty()) else {
        return Err(Problem::new(
            StatusCode::FORBIDDEN,
            "admin-disabled",
            "Admin API disabled",
            "admin API disabled: set HOLDFAST_ADMIN_TOKEN",
        ));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        });
    let Some(given) = given else {
        return Err(Problem::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "Unauthorized",
            "send the admin token as `Authorization: Bearer <token>`",
        ));
    };
    if !same_token(given, expected) {
        return Err(Problem::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "Unauthorized",
            "the bearer token is not the admin token",
        ));
    }
    Ok(())
}

/// Constant-time equality of two tokens (of any lengths).
fn same_token(a: &str, b: &str) -> bool {
    let (a, b) = (Sha256::digest(a.as_bytes()), Sha256::digest(b.as_bytes()));
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(auth: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, auth.parse().unwrap());
        h
    }

    #[test]
    fn bearer_token_checks() {
        let ok = headers("Bearer s3cret");
        assert!(require_admin(Some("s3cret"), &ok).is_ok());
        assert!(require_admin(Some("s3cret"), &headers("bearer  s3cret ")).is_ok());
        assert_eq!(
            require_admin(Some("s3cret"), &headers("Bearer s3cre"))
                .unwrap_err()
                .status,
            401
        );
        assert_eq!(
            require_admin(Some("s3cret"), &headers("Basic s3cret"))
                .unwrap_err()
                .status,
            401
        );
        assert_eq!(
            require_admin(Some("s3cret"), &HeaderMap::new())
                .unwrap_err()
                .status,
            401
        );
        assert_eq!(require_admin(None, &ok).unwrap_err().status, 403);
        assert_eq!(require_admin(Some(""), &ok).unwrap_err().status, 403);
    }
}

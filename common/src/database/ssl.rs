//! `sslmode` and `sslrootcert` of a PostgreSQL URL, with libpq's meaning.
//!
//! tokio-postgres itself knows `sslmode=disable|prefer|require` only, and
//! no `sslrootcert`; Holdfast takes both out of the URL (either form:
//! `postgres://…?sslmode=verify-full&sslrootcert=/ca.pem` or
//! `host=… sslmode=verify-full sslrootcert=/ca.pem`), hands tokio-postgres
//! the rest, and makes the TLS connector that checks what the mode says:
//!
//! | sslmode | TLS | the server's certificate |
//! |---|---|---|
//! | not named, `disable` | never | — |
//! | `prefer` | when the server offers it | not checked |
//! | `require` | always | not checked; with `sslrootcert`, as `verify-ca` |
//! | `verify-ca` | always | chain to the CA of `sslrootcert` |
//! | `verify-full` | always | chain to the CA of `sslrootcert`, and the host name |
//!
//! Unlike libpq, a URL naming no `sslmode` does not try TLS (libpq's
//! `prefer` protects nothing against an active attacker, and costs a
//! handshake); `sslrootcert` must be given for `verify-ca` and
//! `verify-full` (there is no `~/.postgresql/root.crt` default), and is
//! refused with the modes that would ignore it.

use std::path::PathBuf;
use std::str::FromStr;

use percent_encoding::percent_decode_str;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::DatabaseError;
use crate::tls::{self, Verify};

/// libpq's `sslmode` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Result<Self, DatabaseError> {
        Ok(match value {
            "disable" => Self::Disable,
            "prefer" => Self::Prefer,
            "require" => Self::Require,
            "verify-ca" => Self::VerifyCa,
            "verify-full" => Self::VerifyFull,
            // libpq's `allow` tries without TLS first, which no server
            // that accepts TLS needs: not worth a mode of its own.
            other => {
                return Err(DatabaseError::Ssl(format!(
                    "sslmode={other} is not one of disable, prefer, require, verify-ca, verify-full"
                )))
            }
        })
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::Disable => "disable",
            Self::Prefer => "prefer",
            Self::Require => "require",
            Self::VerifyCa => "verify-ca",
            Self::VerifyFull => "verify-full",
        }
    }

    /// What tokio-postgres is told: it only asks whether to try TLS and
    /// whether to insist; the connector does the checking.
    fn for_tokio_postgres(self) -> &'static str {
        match self {
            Self::Disable => "disable",
            Self::Prefer => "prefer",
            Self::Require | Self::VerifyCa | Self::VerifyFull => "require",
        }
    }
}

/// A parsed PostgreSQL URL: tokio-postgres's configuration and the TLS settings.
#[derive(Clone)]
pub struct Target {
    pub config: tokio_postgres::Config,
    pub mode: Option<SslMode>,
    pub rootcert: Option<PathBuf>,
}

impl Target {
    /// Parse `url` (URL or key/value form).
    pub fn parse(url: &str) -> Result<Self, DatabaseError> {
        let (rest, mode, rootcert) = split_ssl(url)?;
        let mode = mode.as_deref().map(SslMode::parse).transpose()?;
        let rootcert = rootcert.map(PathBuf::from);
        if let Some(path) = &rootcert {
            if !matches!(
                mode,
                Some(SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull)
            ) {
                return Err(DatabaseError::Ssl(format!(
                    "sslrootcert={} is used only with sslmode=require, verify-ca or verify-full, \
                     and the URL names {}",
                    path.display(),
                    mode.map_or("no sslmode".to_string(), |m| format!(
                        "sslmode={}",
                        m.as_str()
                    ))
                )));
            }
        }
        if let Some(m @ (SslMode::VerifyCa | SslMode::VerifyFull)) = mode {
            if rootcert.is_none() {
                return Err(DatabaseError::Ssl(format!(
                    "sslmode={} needs sslrootcert=<file of the CA that signed the server's certificate>",
                    m.as_str()
                )));
            }
        }
        let mut rest = rest;
        let tokio_mode = mode.unwrap_or(SslMode::Disable).for_tokio_postgres();
        add_param(&mut rest, "sslmode", tokio_mode);
        let config = tokio_postgres::Config::from_str(&rest).map_err(DatabaseError::Url)?;
        Ok(Self {
            config,
            mode,
            rootcert,
        })
    }

    /// How much the connector checks; `None`: no TLS at all.
    pub fn verify(&self) -> Result<Option<Verify>, DatabaseError> {
        let roots = || -> Result<_, DatabaseError> {
            match &self.rootcert {
                Some(path) => Ok(Some(tls::load_roots(path)?)),
                None => Ok(None),
            }
        };
        Ok(match self.mode {
            None | Some(SslMode::Disable) => None,
            Some(SslMode::Prefer) => Some(Verify::Nothing),
            // libpq: "if a root CA file exists, require behaves as verify-ca".
            Some(SslMode::Require) => Some(roots()?.map_or(Verify::Nothing, Verify::Chain)),
            Some(SslMode::VerifyCa) => roots()?.map(Verify::Chain),
            Some(SslMode::VerifyFull) => roots()?.map(Verify::Full),
        })
    }

    /// The TLS connector for this URL, `None` when it uses no TLS. Reads the
    /// CA file: build once per pool, not per connection.
    pub fn connector(&self) -> Result<Option<MakeRustlsConnect>, DatabaseError> {
        match self.verify()? {
            None => Ok(None),
            Some(v) => Ok(Some(MakeRustlsConnect::new(tls::client_config(&v)?))),
        }
    }

    /// `sslmode=…, sslrootcert=…` for messages, empty when no mode is named.
    pub fn describe_ssl(&self) -> String {
        match (self.mode, &self.rootcert) {
            (None, _) => String::new(),
            (Some(m), None) => format!("sslmode={}", m.as_str()),
            (Some(m), Some(p)) => format!("sslmode={}, sslrootcert={}", m.as_str(), p.display()),
        }
    }
}

/// `url` without its `sslmode` and `sslrootcert`, and their values (the last one given wins).
type Split = (String, Option<String>, Option<String>);

fn split_ssl(url: &str) -> Result<Split, DatabaseError> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(split_url(url))
    } else {
        split_key_values(url)
    }
}

fn split_url(url: &str) -> Split {
    let Some((base, query)) = url.split_once('?') else {
        return (url.to_string(), None, None);
    };
    let (mut mode, mut rootcert) = (None, None);
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let decode = |s: &str| percent_decode_str(s).decode_utf8_lossy().into_owned();
        match decode(key).as_str() {
            "sslmode" => mode = Some(decode(value)),
            "sslrootcert" => rootcert = Some(decode(value)),
            _ => kept.push(pair),
        }
    }
    let rest = if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    (rest, mode, rootcert)
}

/// libpq's key/value form: `key = value` pairs separated by spaces, a value
/// in single quotes when it holds spaces, `\` escaping `'` and `\`.
fn split_key_values(text: &str) -> Result<Split, DatabaseError> {
    let (mut mode, mut rootcert) = (None, None);
    let mut kept = Vec::new();
    let mut chars = text.chars().peekable();
    let skip_spaces = |chars: &mut std::iter::Peekable<std::str::Chars>| {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
    };
    loop {
        skip_spaces(&mut chars);
        if chars.peek().is_none() {
            break;
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        skip_spaces(&mut chars);
        if chars.next() != Some('=') {
            return Err(DatabaseError::Ssl(format!(
                "`{key}` in the database URL has no `=value`"
            )));
        }
        skip_spaces(&mut chars);
        let mut value = String::new();
        let quoted = chars.peek() == Some(&'\'');
        if quoted {
            chars.next();
        }
        loop {
            match chars.next() {
                None if quoted => {
                    return Err(DatabaseError::Ssl(format!(
                        "the value of `{key}` in the database URL has no closing quote"
                    )))
                }
                None => break,
                Some('\'') if quoted => break,
                Some(c) if c.is_whitespace() && !quoted => break,
                Some('\\') => value.extend(chars.next()),
                Some(c) => value.push(c),
            }
        }
        match key.as_str() {
            "sslmode" => mode = Some(value),
            "sslrootcert" => rootcert = Some(value),
            _ => kept.push(format!(
                "{key}='{}'",
                value.replace('\\', "\\\\").replace('\'', "\\'")
            )),
        }
    }
    Ok((kept.join(" "), mode, rootcert))
}

/// Append `key=value` to a URL or key/value text.
fn add_param(text: &mut String, key: &str, value: &str) {
    if text.starts_with("postgres://") || text.starts_with("postgresql://") {
        text.push(if text.contains('?') { '&' } else { '?' });
        text.push_str(&format!("{key}={value}"));
    } else {
        if !text.is_empty() {
            text.push(' ');
        }
        text.push_str(&format!("{key}={value}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_postgres::config::SslMode as TokioMode;

    fn parse(url: &str) -> Target {
        Target::parse(url).unwrap_or_else(|e| panic!("{url}: {e}"))
    }

    fn error(url: &str) -> String {
        match Target::parse(url) {
            Ok(_) => panic!("{url} parsed"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn libpq_modes_in_both_forms() {
        let t = parse("postgres://u:p@db.example:6432/ledger?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&application_name=hf");
        assert_eq!(t.mode, Some(SslMode::VerifyFull));
        assert_eq!(t.rootcert, Some(PathBuf::from("/etc/ca.pem")));
        assert_eq!(t.config.get_ssl_mode(), TokioMode::Require);
        assert_eq!(t.config.get_dbname(), Some("ledger"));
        assert_eq!(t.config.get_application_name(), Some("hf"));
        assert_eq!(t.config.get_password(), Some(&b"p"[..]));

        let t = parse("host=db.example port=6432 user=u dbname=ledger sslmode = verify-ca sslrootcert='/etc/my ca.pem' password='it\\'s'");
        assert_eq!(t.mode, Some(SslMode::VerifyCa));
        assert_eq!(t.rootcert, Some(PathBuf::from("/etc/my ca.pem")));
        assert_eq!(t.config.get_ssl_mode(), TokioMode::Require);
        assert_eq!(t.config.get_password(), Some(&b"it's"[..]));
        assert_eq!(t.config.get_ports(), &[6432]);

        let t = parse("postgres://u@h/db?sslmode=prefer");
        assert_eq!(t.config.get_ssl_mode(), TokioMode::Prefer);
        assert!(matches!(t.verify().unwrap(), Some(Verify::Nothing)));
        let t = parse("postgres://u@h/db?sslmode=require");
        assert!(matches!(t.verify().unwrap(), Some(Verify::Nothing)));

        // No sslmode: no TLS, as before (not libpq's `prefer`).
        let t = parse("postgres://u@h/db");
        assert_eq!(t.mode, None);
        assert_eq!(t.config.get_ssl_mode(), TokioMode::Disable);
        assert!(t.verify().unwrap().is_none());
        assert_eq!(t.describe_ssl(), "");
        let t = parse("host=h user=u dbname=db");
        assert!(t.verify().unwrap().is_none());
    }

    #[test]
    fn settings_that_cannot_work_are_refused_by_name() {
        let e = error("postgres://u@h/db?sslmode=verify-full");
        assert!(e.contains("sslmode=verify-full needs sslrootcert"), "{e}");
        let e = error("host=h sslmode=verify-ca");
        assert!(e.contains("sslmode=verify-ca needs sslrootcert"), "{e}");
        let e = error("postgres://u@h/db?sslmode=always");
        assert!(e.contains("sslmode=always is not one of"), "{e}");
        let e = error("postgres://u@h/db?sslrootcert=/ca.pem");
        assert!(
            e.contains("sslrootcert=/ca.pem is used only with") && e.contains("no sslmode"),
            "{e}"
        );
        let e = error("postgres://u@h/db?sslmode=prefer&sslrootcert=/ca.pem");
        assert!(e.contains("the URL names sslmode=prefer"), "{e}");
        let e = error("host=h sslrootcert='/ca.pem");
        assert!(e.contains("no closing quote"), "{e}");

        // A CA file that is not there is named when the connector is made.
        let t = parse("postgres://u@h/db?sslmode=require&sslrootcert=/nonexistent/ca.pem");
        let e = t.connector().err().expect("no CA file").to_string();
        assert!(e.contains("/nonexistent/ca.pem"), "{e}");
        assert_eq!(
            t.describe_ssl(),
            "sslmode=require, sslrootcert=/nonexistent/ca.pem"
        );
    }
}

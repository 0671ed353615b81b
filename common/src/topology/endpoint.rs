//! An AMQP URL made ready to connect, with TLS for `amqps://`.
//!
//! `amqps://` always checks the broker's certificate: its chain and that it
//! was issued for the host name of the URL. Which CAs are trusted:
//! - `?cacertfile=/path/ca.pem` (the query parameter of RabbitMQ's URI
//!   spec, URL-encoded): the certificates of that PEM file, and only them;
//! - without it: the system's trusted CAs (lapin's platform verifier).
//!
//! The spec's other TLS parameters (`certfile`, `keyfile`, `verify`, …) are
//! refused by name rather than silently ignored: client certificates and
//! turning verification off are not supported.

use std::path::PathBuf;

use lapin::tcp::{AMQPUriTcpExt, RustlsConnector};
use lapin::uri::{AMQPScheme, AMQPUri};
use lapin::{Connection, ConnectionProperties};
use percent_encoding::percent_decode_str;

use super::{describe, BrokerError};
use crate::tls::{self, Verify};

/// The TLS parameters of RabbitMQ's URI spec that Holdfast does not support.
const UNSUPPORTED: &[&str] = &[
    "certfile",
    "keyfile",
    "password",
    "verify",
    "fail_if_no_peer_cert",
    "server_name_indication",
    "depth",
];

/// A parsed AMQP URL and, for `amqps://…?cacertfile=`, the TLS connector
/// trusting that CA (the file is read once, when parsing).
#[derive(Clone)]
pub struct Endpoint {
    /// lapin's view of the URL (it ignores `cacertfile`).
    pub uri: AMQPUri,
    ca: Option<(PathBuf, RustlsConnector)>,
    described: String,
}

impl Endpoint {
    /// Parse `url`; a CA file that cannot be used is an error here.
    pub fn parse(url: &str) -> Result<Self, BrokerError> {
        let described = describe(url);
        let invalid = |why: String| BrokerError::Url(described.clone(), why);
        let uri: AMQPUri = url.parse().map_err(|e: String| invalid(e))?;
        let mut ca_file = None;
        if let Some((_, query)) = url.split_once('?') {
            for pair in query.split('&').filter(|p| !p.is_empty()) {
                let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                let key = percent_decode_str(key).decode_utf8_lossy();
                if key == "cacertfile" {
                    let path = percent_decode_str(value).decode_utf8_lossy().into_owned();
                    if path.is_empty() {
                        return Err(invalid("cacertfile= names no file".into()));
                    }
                    ca_file = Some(PathBuf::from(path));
                } else if UNSUPPORTED.contains(&key.as_ref()) {
                    return Err(invalid(format!(
                        "the TLS parameter `{key}` is not supported (amqps:// always verifies \
                         the broker's certificate and host name; `cacertfile` names the CA)"
                    )));
                }
            }
        }
        let ca = match ca_file {
            None => None,
            Some(path) => {
                if uri.scheme != AMQPScheme::AMQPS {
                    return Err(invalid(format!(
                        "cacertfile={} is given but the URL is amqp://, without TLS: use amqps://",
                        path.display()
                    )));
                }
                let roots = tls::load_roots(&path)
                    .map_err(|e| BrokerError::TlsSetup(described.clone(), e))?;
                let config = tls::client_config(&Verify::Full(roots))
                    .map_err(|e| BrokerError::TlsSetup(described.clone(), e))?;
                Some((path, RustlsConnector::from(config)))
            }
        };
        Ok(Self { uri, ca, described })
    }

    /// `host:port/vhost`, for messages.
    pub fn describe(&self) -> &str {
        &self.described
    }

    /// What an `amqps://` connection checks, for messages; `None` for `amqp://`.
    pub fn tls_checks(&self) -> Option<String> {
        if self.uri.scheme != AMQPScheme::AMQPS {
            return None;
        }
        let host = &self.uri.authority.host;
        Some(match &self.ca {
            Some((path, _)) => {
                format!(
                    "amqps: chain to the CA file {} and host name {host}",
                    path.display()
                )
            }
            None => format!("amqps: chain to the system's trusted CAs and host name {host}"),
        })
    }

    /// One connection attempt. A certificate the broker's TLS handshake
    /// did not pass is [`BrokerError::Tls`], which no retry cures.
    pub async fn connect(&self, props: ConnectionProperties) -> Result<Connection, BrokerError> {
        let result = match &self.ca {
            None => Connection::connect_uri(self.uri.clone(), props).await,
            Some((_, connector)) => {
                let connector = connector.clone();
                let host = self.uri.authority.host.clone();
                let runtime = lapin::runtime::default_runtime()?;
                // lapin's own TLS would add the system's CAs to ours: open
                // the TCP stream with it, then run our handshake on top.
                Connection::connector(
                    self.uri.clone(),
                    runtime,
                    async move |uri, runtime| {
                        let mut plain = uri;
                        plain.scheme = AMQPScheme::AMQP;
                        let stream = plain.connect_async(&runtime).await?;
                        Ok(stream.into_rustls(&connector, &host).await?)
                    },
                    props,
                )
                .await
            }
        };
        result.map_err(|e| self.classify(e))
    }

    fn classify(&self, e: lapin::Error) -> BrokerError {
        let tls_error = match e.kind() {
            lapin::ErrorKind::IOError(io) => {
                let as_error: &(dyn std::error::Error + 'static) = io.as_ref();
                tls::explain(as_error).map(|why| {
                    let detail = io.get_ref().map(ToString::to_string).unwrap_or_default();
                    format!("{detail} ({why})")
                })
            }
            _ => None,
        };
        match (tls_error, self.tls_checks()) {
            (Some(reason), Some(checks)) => BrokerError::Tls {
                broker: self.described.clone(),
                checks,
                reason,
            },
            _ => BrokerError::Amqp(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(url: &str) -> String {
        match Endpoint::parse(url) {
            Ok(_) => panic!("{url} parsed"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn tls_parameters_are_checked_when_parsing() {
        let plain = Endpoint::parse("amqp://guest:guest@127.0.0.1:5672/%2f").unwrap();
        assert!(plain.tls_checks().is_none());
        let system = Endpoint::parse("amqps://u:p@mq.example:5671/%2f").unwrap();
        assert_eq!(
            system.tls_checks().unwrap(),
            "amqps: chain to the system's trusted CAs and host name mq.example"
        );

        let e = error("amqp://u:p@h:5672/%2f?cacertfile=%2Fetc%2Fca.pem");
        assert!(
            e.contains("cacertfile=/etc/ca.pem is given but the URL is amqp://"),
            "{e}"
        );
        assert!(!e.contains("u:p"), "{e}");
        let e = error("amqps://u:p@h:5671/%2f?cacertfile=%2Fnonexistent%2Fca.pem");
        assert!(
            e.contains("cannot read the CA file /nonexistent/ca.pem"),
            "{e}"
        );
        let e = error("amqps://u:p@h:5671/%2f?verify=verify_none");
        assert!(e.contains("`verify` is not supported"), "{e}");
        let e = error("amqps://u:p@h:5671/%2f?certfile=%2Fc.pem&keyfile=%2Fk.pem");
        assert!(e.contains("`certfile` is not supported"), "{e}");
        let e = error("amqps://u:p@h:5671/%2f?cacertfile=");
        assert!(e.contains("names no file"), "{e}");
    }
}

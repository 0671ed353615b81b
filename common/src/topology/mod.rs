//! AMQP names, declarations, and a publisher that waits for confirms.
//!
//! Every name starts with the namespace (default `holdfast`):
//! - `<ns>.requests`: quorum queue of batch requests (producers publish here
//!   through the default exchange);
//! - `<ns>.jobs`: quorum queue of item jobs;
//! - `<ns>.events`: topic exchange of decisions, progress and completions;
//! - `<ns>.dead`: direct exchange receiving dead letters, routed to
//!   `<ns>.requests.dead` and `<ns>.jobs.dead`.
//!
//! Declarations are idempotent and every role makes them at start, so the
//! roles may start in any order. Their arguments must agree everywhere: a
//! queue declared with other arguments makes RabbitMQ close the channel.
//!
//! The module is split by concern: [`names`] (the names of a namespace and
//! their declarations), [`publisher`] (publishing with confirms), [`session`]
//! (connections, consuming sessions and their supervision), [`endpoint`]
//! (an AMQP URL made ready to connect, with TLS for `amqps://`).

use lapin::types::ShortString;

mod brokers;
mod endpoint;
mod names;
mod publisher;
mod session;

pub use brokers::{current_nodes, describe_list, BrokerNode, Brokers, ATTEMPT_TIMEOUT};
pub use endpoint::Endpoint;
pub use names::*;
pub use publisher::*;
pub use session::*;

/// `value` as an AMQP short string (at most 255 bytes), or an error naming
/// `what`. Every string Holdfast puts in a short string goes through here
/// or is bounded by construction, so no value can panic a role.
pub fn short(what: &'static str, value: &str) -> Result<ShortString, BrokerError> {
    ShortString::try_new(value).map_err(|_| BrokerError::TooLong(what, value.len()))
}

/// What can go wrong talking to RabbitMQ.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("RabbitMQ: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("RabbitMQ refused the message (nack) on {0}")]
    Nacked(String),
    #[error("RabbitMQ could not route the message to {0}: {1}")]
    Unroutable(String, String),
    #[error("the connection to RabbitMQ closed")]
    Closed,
    /// A node did not complete the connection in time.
    #[error("RabbitMQ at {0} did not accept a connection within {1:?}")]
    Timeout(String, std::time::Duration),
    /// Every node of a list refused; the last node's error is the source.
    #[error("none of the {0} RabbitMQ nodes accepted a connection; the last: {1}")]
    NoNode(usize, Box<BrokerError>),
    #[error("RabbitMQ cancelled the consumer of {0}")]
    ConsumerCancelled(String),
    /// A value longer than an AMQP short string allows (255 bytes): a bug or
    /// a setting to fix, never the broker's fault.
    #[error("{0} has {1} bytes; AMQP allows at most 255")]
    TooLong(&'static str, usize),
    /// A message that does not serialise (strings, integers and JSON values
    /// always do: a bug if ever seen).
    #[error("a message could not be encoded: {0}")]
    Encode(#[source] serde_json::Error),
    /// The AMQP URL does not parse: fix the setting, retrying will not help.
    #[error("the AMQP URL for {0} is not valid: {1}")]
    Url(String, String),
    /// The CA file of `cacertfile=` cannot be used: fix the setting.
    #[error("TLS to RabbitMQ at {0}: {1}")]
    TlsSetup(String, #[source] crate::tls::TlsError),
    /// The broker's certificate did not pass the checks: retrying will not
    /// help until the certificate, the CA file or the host name changes.
    #[error("TLS to RabbitMQ at {broker} refused the broker's certificate ({checks}): {reason}")]
    Tls {
        broker: String,
        checks: String,
        reason: String,
    },
}

impl BrokerError {
    /// True for errors of the settings or certificates, which no retry cures.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            BrokerError::Url(..) | BrokerError::TlsSetup(..) | BrokerError::Tls { .. }
        )
    }
}

/// `host:port/vhost` of an AMQP URL, for messages: never the password.
/// A comma-separated list is described URL by URL.
pub fn describe(url: &str) -> String {
    if url.contains(',') {
        return describe_list(url);
    }
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    let rest = rest.rsplit_once('@').map(|(_, r)| r).unwrap_or(rest);
    rest.split('?').next().unwrap_or(rest).to_string()
}

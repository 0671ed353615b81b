//! Several RabbitMQ nodes of one cluster, given as a comma-separated list of
//! AMQP URLs (`HOLDFAST_AMQP_URL=amqp://u:p@mq1:5672/%2f,amqp://u:p@mq2:5672/%2f`).
//!
//! lapin connects to one host: the list is Holdfast's. Every URL carries its
//! own credentials and TLS parameters (see [`Endpoint`]); a comma inside a
//! URL (a password, a path) must be percent-encoded (`%2C`). A connection
//! goes to the first node that answers; a process that loses its connection
//! starts its next round of attempts at the node after the one it was on, so
//! a node that went down is tried last.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use lapin::{Connection, ConnectionProperties};
use serde::Serialize;

use super::{describe, BrokerError, Endpoint};

/// Longest wait for one node to accept a connection (TCP, TLS and the AMQP
/// handshake): a node that is unreachable without refusing (a dropped route)
/// must not hold up the others.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// The parsed list, in the order given.
#[derive(Clone)]
pub struct Brokers {
    endpoints: Vec<Endpoint>,
}

/// The node a connection went to, for logs and `/readyz`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct BrokerNode {
    /// `host:port` of the node, as in the URL (never credentials).
    pub address: String,
    /// `host:port/vhost`.
    pub endpoint: String,
    /// The node's position in the configured list, from 1.
    pub position: usize,
}

impl Brokers {
    /// Parse a comma-separated list of AMQP URLs (one URL is a list of one).
    /// An empty element or a URL that does not parse is an error naming its
    /// position and its `host:port/vhost`, never a password.
    pub fn parse(list: &str) -> Result<Self, BrokerError> {
        let parts: Vec<&str> = list.split(',').map(str::trim).collect();
        if parts.len() == 1 {
            if parts[0].is_empty() {
                return Err(BrokerError::Url(
                    "RabbitMQ".into(),
                    "the URL is empty".into(),
                ));
            }
            return Ok(Self {
                endpoints: vec![Endpoint::parse(parts[0])?],
            });
        }
        let total = parts.len();
        let mut endpoints = Vec::with_capacity(total);
        for (i, part) in parts.iter().enumerate() {
            let n = i + 1;
            if part.is_empty() {
                return Err(BrokerError::Url(
                    format!("the list of {total} URLs"),
                    format!("URL #{n} is empty (a stray comma?)"),
                ));
            }
            let endpoint = Endpoint::parse(part).map_err(|e| match e {
                BrokerError::Url(described, why) => {
                    BrokerError::Url(format!("URL #{n} of {total} ({described})"), why)
                }
                BrokerError::TlsSetup(described, why) => {
                    BrokerError::TlsSetup(format!("URL #{n} of {total} ({described})"), why)
                }
                other => other,
            })?;
            endpoints.push(endpoint);
        }
        Ok(Self { endpoints })
    }

    /// How many nodes the list names.
    pub fn len(&self) -> usize {
        self.endpoints.len()
    }

    /// Never true: parsing refuses an empty list.
    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }

    /// The endpoint at `index` (modulo the list's length).
    pub fn get(&mut self, index: usize) -> &mut Endpoint {
        let n = self.endpoints.len();
        &mut self.endpoints[index % n]
    }

    /// What is known of the node at `index`.
    pub fn node(&self, index: usize) -> BrokerNode {
        let endpoint = &self.endpoints[index % self.endpoints.len()];
        let authority = &endpoint.uri.authority;
        BrokerNode {
            address: format!("{}:{}", authority.host, authority.port),
            endpoint: endpoint.describe().to_string(),
            position: index % self.endpoints.len() + 1,
        }
    }

    /// One round: try every node once, in order from `start`, each for at
    /// most [`ATTEMPT_TIMEOUT`]. Returns the index of the node that accepted.
    /// When all refuse, the error is the last one, permanent only if every
    /// node's error was (one node with a bad certificate does not stop the
    /// process from using the others).
    pub async fn connect_round(
        &self,
        start: usize,
        props: &ConnectionProperties,
    ) -> Result<(usize, Connection), BrokerError> {
        let n = self.endpoints.len();
        let mut last = None;
        let mut all_permanent = true;
        for k in 0..n {
            let index = (start + k) % n;
            let endpoint = &self.endpoints[index];
            let attempt =
                tokio::time::timeout(ATTEMPT_TIMEOUT, endpoint.connect(props.clone())).await;
            let e = match attempt {
                Ok(Ok(conn)) => return Ok((index, conn)),
                Ok(Err(e)) => e,
                Err(_) => BrokerError::Timeout(endpoint.describe().to_string(), ATTEMPT_TIMEOUT),
            };
            if n > 1 {
                tracing::debug!(error = %e, broker = %endpoint.describe(), "RabbitMQ node did not accept the connection; trying the next");
            }
            all_permanent &= e.is_permanent();
            last = Some(e);
        }
        let e = last.unwrap_or(BrokerError::Closed);
        if all_permanent || n == 1 {
            Err(e)
        } else {
            Err(BrokerError::NoNode(n, Box::new(e)))
        }
    }
}

/// Per connection name, the index of the node it last connected to: where
/// its next connection starts (the node after), and what `/readyz` shows.
static CURRENT: LazyLock<Mutex<HashMap<String, (usize, BrokerNode)>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

/// Where the next connection named `name` starts: the first node for the
/// first connection, the node after the last one otherwise.
pub(crate) fn next_start(name: &str) -> usize {
    let current = CURRENT.lock().unwrap_or_else(|p| p.into_inner());
    current.get(name).map(|(i, _)| i + 1).unwrap_or(0)
}

/// Record that the connection named `name` went to node `index`.
pub(crate) fn record(name: &str, index: usize, node: BrokerNode) {
    let mut current = CURRENT.lock().unwrap_or_else(|p| p.into_inner());
    current.insert(name.to_string(), (index, node));
}

/// The node each of this process's named connections is on (or last was
/// on), sorted by name: for `/readyz`.
pub fn current_nodes() -> Vec<(String, BrokerNode)> {
    let current = CURRENT.lock().unwrap_or_else(|p| p.into_inner());
    let mut nodes: Vec<_> = current
        .iter()
        .map(|(name, (_, node))| (name.clone(), node.clone()))
        .collect();
    nodes.sort_by(|a, b| a.0.cmp(&b.0));
    nodes
}

/// `host:port/vhost` of every URL of a list, comma-separated: never a password.
pub fn describe_list(list: &str) -> String {
    list.split(',')
        .map(|u| describe(u.trim()))
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(list: &str) -> String {
        match Brokers::parse(list) {
            Ok(_) => panic!("{list} parsed"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn a_list_parses_in_order() {
        let brokers = Brokers::parse(
            "amqp://a:pa@mq1:5672/%2f, amqp://b:pb@mq2:5673/%2f ,amqps://c:pc@mq3.example:5671/%2f",
        )
        .unwrap();
        assert_eq!(brokers.len(), 3);
        assert_eq!(brokers.node(0).address, "mq1:5672");
        assert_eq!(brokers.node(1).address, "mq2:5673");
        assert_eq!(brokers.node(2).address, "mq3.example:5671");
        assert_eq!(brokers.node(2).position, 3);
        assert_eq!(brokers.node(3).address, "mq1:5672", "wraps around");
        let one = Brokers::parse("amqp://guest:guest@127.0.0.1:5672/%2f").unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(one.node(5).address, "127.0.0.1:5672");
    }

    #[test]
    fn list_errors_name_the_position_never_a_password() {
        let e = error("amqp://u:s3cret@mq1:5672/%2f,,amqp://u:s3cret@mq3:5672/%2f");
        assert!(e.contains("URL #2 is empty"), "{e}");
        assert!(!e.contains("s3cret"), "{e}");
        let e = error("amqp://u:s3cret@mq1:5672/%2f,");
        assert!(e.contains("URL #2 is empty"), "{e}");
        let e = error("");
        assert!(e.contains("empty"), "{e}");
        let e = error("amqp://u:s3cret@mq1:5672/%2f,http://u:s3cret@mq2:5672/%2f");
        assert!(e.contains("URL #2 of 2 (mq2:5672/%2f)"), "{e}");
        assert!(!e.contains("s3cret"), "{e}");
        let e = error("amqp://u:s3cret@mq1:5672/%2f,amqp://u:s3cret@mq2:notaport/%2f");
        assert!(e.contains("URL #2 of 2"), "{e}");
        assert!(!e.contains("s3cret"), "{e}");
        let e =
            error("amqp://u:s3cret@mq1:5672/%2f,amqps://u:s3cret@mq2:5671/%2f?verify=verify_none");
        assert!(
            e.contains("URL #2 of 2") && e.contains("`verify` is not supported"),
            "{e}"
        );
        let e = error("amqps://u:s3cret@mq1:5671/%2f?cacertfile=%2Fnonexistent%2Fca.pem,amqp://u:s3cret@mq2:5672/%2f");
        assert!(e.contains("URL #1 of 2"), "{e}");
        assert!(!e.contains("s3cret"), "{e}");
    }

    #[test]
    fn lists_are_described_without_passwords() {
        assert_eq!(
            describe_list(
                "amqp://a:pa@mq1:5672/%2f,amqps://b:pb@mq2:5671/%2f?cacertfile=%2Fca.pem"
            ),
            "mq1:5672/%2f,mq2:5671/%2f"
        );
    }

    #[tokio::test]
    async fn a_round_over_closed_ports_fails_naming_the_count() {
        // Two ports nothing listens on: bound, then released.
        let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let b = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let list = format!(
            "amqp://u:s3cret@127.0.0.1:{}/%2f,amqp://u:s3cret@127.0.0.1:{}/%2f",
            a.local_addr().unwrap().port(),
            b.local_addr().unwrap().port()
        );
        drop((a, b));
        let brokers = Brokers::parse(&list).unwrap();
        let e = brokers
            .connect_round(1, &ConnectionProperties::default())
            .await
            .expect_err("nothing listens");
        assert!(!e.is_permanent());
        let shown = e.to_string();
        assert!(shown.contains("none of the 2 RabbitMQ nodes"), "{shown}");
        assert!(!shown.contains("s3cret"), "{shown}");
    }

    #[test]
    fn reconnections_start_after_the_last_node() {
        let name = "test-rotation/ns";
        assert_eq!(next_start(name), 0);
        let brokers = Brokers::parse("amqp://a:b@mq1:5672/%2f,amqp://a:b@mq2:5672/%2f").unwrap();
        record(name, 0, brokers.node(0));
        assert_eq!(next_start(name), 1);
        record(name, 1, brokers.node(1));
        assert_eq!(next_start(name), 2, "taken modulo the list's length");
        assert!(current_nodes()
            .iter()
            .any(|(n, node)| n == name && node.address == "mq2:5672"));
    }
}

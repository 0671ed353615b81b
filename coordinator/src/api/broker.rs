//! The API's link to RabbitMQ: one connection and one confirming publisher,
//! made on first use and made again after it is lost.
//!
//! The API role decides batch requests in-process and so must publish
//! decisions, item jobs and completions. It keeps no session of its own that
//! a supervisor restarts (unlike the consumers); instead each request asks
//! [`Broker::publisher`] for the publisher, which reconnects when the
//! connection or channel is gone, and a request that failed on the broker
//! calls [`Broker::forget`] so the next one starts afresh. Connecting is
//! bounded by a short timeout: an HTTP caller gets a 503 problem rather than
//! waiting for RabbitMQ to come back. The topology is declared on every new
//! connection, so the API may start before any other role.

use std::time::Duration;

use holdfast_common::config::QueueSettings;
use holdfast_common::topology::{self, BrokerError, Names, Publisher};
use lapin::Connection;
use tokio::sync::Mutex;

/// How long one request waits for a new connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A lazily (re)connecting publisher. Owned by the API state; closed by [`Broker::close`].
pub struct Broker {
    url: String,
    names: Names,
    queues: QueueSettings,
    link: Mutex<Option<Link>>,
}

struct Link {
    connection: Connection,
    publisher: Publisher,
}

impl Link {
    fn usable(&self) -> bool {
        self.connection.status().connected() && self.publisher.channel().status().connected()
    }
}

impl Broker {
    /// A broker link for `names`; nothing connects until the first [`Broker::publisher`].
    pub fn new(url: impl Into<String>, names: Names, queues: QueueSettings) -> Self {
        Self {
            url: url.into(),
            names,
            queues,
            link: Mutex::new(None),
        }
    }

    /// The publisher, connecting first when there is no usable connection.
    /// Concurrent callers wait for one connection attempt rather than each making one.
    pub async fn publisher(&self) -> Result<Publisher, BrokerError> {
        let mut link = self.link.lock().await;
        if let Some(l) = link.as_ref().filter(|l| l.usable()) {
            return Ok(l.publisher.clone());
        }
        if let Some(old) = link.take() {
            topology::close(&old.connection, "reconnecting").await;
        }
        let fresh = tokio::time::timeout(CONNECT_TIMEOUT, self.connect())
            .await
            .map_err(|_| BrokerError::Closed)??;
        let publisher = fresh.publisher.clone();
        *link = Some(fresh);
        Ok(publisher)
    }

    async fn connect(&self) -> Result<Link, BrokerError> {
        let name = format!("holdfast-api/{}", self.names.namespace);
        let (connection, _node) = topology::connect_once(&self.url, &name).await?;
        let channel = connection.create_channel().await?;
        topology::declare(&channel, &self.names, &self.queues).await?;
        topology::close_channel(&channel, "declared").await;
        let publisher = Publisher::new(&connection).await?;
        tracing::info!(broker = %topology::describe(&self.url), "HTTP API connected to RabbitMQ");
        Ok(Link {
            connection,
            publisher,
        })
    }

    /// Drop the connection after a failure so that the next request reconnects.
    pub async fn forget(&self) {
        if let Some(old) = self.link.lock().await.take() {
            topology::close(&old.connection, "forgotten after an error").await;
        }
    }

    /// Close the connection (at shutdown).
    pub async fn close(&self) {
        if let Some(old) = self.link.lock().await.take() {
            topology::close(&old.connection, "shutdown").await;
        }
    }
}

//! Connections, consuming sessions, and the supervision that starts a
//! session again when its connection fails or it panics.

use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

use crate::config::QueueSettings;

use super::{declare, describe, BrokerError, BrokerNode, Brokers, Names, Publisher};

/// The AMQP frame size Holdfast asks for unless the URL names one
/// (`?frame_max=`). lapin keeps two ring buffers of 32 frames per
/// connection, touched as they cycle: RabbitMQ's default 128 KiB frames make
/// that 8 MiB resident per connection, 32 KiB frames 2 MiB. Every Holdfast
/// message but a large batch request fits one frame; larger ones are split,
/// so no size limit changes.
pub const FRAME_MAX: u32 = 32 * 1024;

/// Connect, retrying with backoff for about a minute while the broker is
/// away. A URL, CA file or certificate that cannot work fails at once.
///
/// `url` may be a comma-separated list of the nodes of one cluster (see
/// [`Brokers`]): each round of attempts tries every node once, starting at
/// the node after the one the connection named `name` was on last (the first
/// node the first time), and the backoff runs between rounds.
pub async fn connect(url: &str, name: &str) -> Result<Connection, BrokerError> {
    connect_node(url, name).await.map(|(conn, _)| conn)
}

/// [`connect`], also saying which node of the list the connection went to.
pub async fn connect_node(url: &str, name: &str) -> Result<(Connection, BrokerNode), BrokerError> {
    let brokers = brokers_of(url)?;
    (|| connect_round(&brokers, name))
        .retry(
            ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(100))
                .with_max_delay(Duration::from_secs(5))
                .with_max_times(20),
        )
        .when(|e| !e.is_permanent())
        .notify(|e, after| {
            tracing::warn!(error = %e, ?after, broker = %describe(url), "connecting to RabbitMQ: retrying")
        })
        .await
}

/// One round of [`connect_node`]: every node of `url` tried once, without
/// waiting between rounds (for callers with their own retry and timeout).
pub async fn connect_once(url: &str, name: &str) -> Result<(Connection, BrokerNode), BrokerError> {
    connect_round(&brokers_of(url)?, name).await
}

fn brokers_of(url: &str) -> Result<Brokers, BrokerError> {
    let mut brokers = Brokers::parse(url)?;
    for i in 0..brokers.len() {
        brokers.get(i).uri.query.frame_max.get_or_insert(FRAME_MAX);
    }
    Ok(brokers)
}

async fn connect_round(
    brokers: &Brokers,
    name: &str,
) -> Result<(Connection, BrokerNode), BrokerError> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    let start = super::brokers::next_start(name);
    let (index, conn) = brokers.connect_round(start, &props).await?;
    let node = brokers.node(index);
    super::brokers::record(name, index, node.clone());
    crate::telemetry::record::broker_connected(&node.address);
    tracing::info!(
        connection = name,
        broker = %node.endpoint,
        position = node.position,
        nodes = brokers.len(),
        "connected to RabbitMQ node {}",
        node.address
    );
    Ok((conn, node))
}

/// Resolves when `conn` fails (closed by the broker, network error). Every
/// session waits on this beside its own work and starts over when it fires:
/// a consumer's stream ends on its own, but a role that only publishes (the
/// reconciler) would otherwise notice only at its next publish.
pub fn watch(conn: &Connection) -> impl std::future::Future<Output = BrokerError> + Send + 'static {
    use futures::StreamExt;
    // Boxed as a 'static trait object: the listener owns its channel, but its
    // opaque type still mentions the connection's borrow.
    let mut events: std::pin::Pin<Box<dyn futures::Stream<Item = lapin::Event> + Send>> =
        Box::pin(conn.events_listener());
    async move {
        while let Some(event) = events.next().await {
            if let lapin::Event::Error(e) = event {
                return BrokerError::Amqp(e);
            }
        }
        BrokerError::Closed
    }
}

/// How many times RabbitMQ delivered this message before (quorum queues count
/// in `x-delivery-count`; absent on the first delivery).
pub fn delivery_count(properties: &BasicProperties) -> u32 {
    properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("x-delivery-count").cloned())
        .and_then(|v| match v {
            AMQPValue::LongLongInt(n) => Some(n as u32),
            AMQPValue::LongInt(n) => Some(n as u32),
            AMQPValue::LongUInt(n) => Some(n),
            AMQPValue::ShortInt(n) => Some(n as u32),
            AMQPValue::ShortShortInt(n) => Some(n as u32),
            AMQPValue::ShortShortUInt(n) => Some(n as u32),
            AMQPValue::ShortUInt(n) => Some(n as u32),
            _ => None,
        })
        .unwrap_or(0)
}

/// Return a delivery to its queue (a quorum queue counts it against the
/// message's delivery limit).
pub async fn requeue(delivery: &lapin::message::Delivery) -> Result<(), lapin::Error> {
    delivery
        .acker
        .nack(lapin::options::BasicNackOptions {
            requeue: true,
            ..Default::default()
        })
        .await
        .map(|_| ())
}

/// Why a role's session ended. The supervisor ([`supervise`]) logs it with
/// its cause chain and starts a new session; whatever the session held
/// unacknowledged goes back to its queue.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The broker went away or refused something: reconnect.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// The ledger failed in a way waiting did not cure.
    #[error(transparent)]
    Ledger(#[from] crate::ledger::LedgerError),
    /// The session itself panicked (a unit of work's panic is caught closer).
    #[error(transparent)]
    Panicked(#[from] crate::supervise::Panicked),
    /// A task of the session ended without finishing its work.
    #[error("a task of the session stopped: {0}")]
    Task(String),
}

impl From<lapin::Error> for SessionError {
    fn from(e: lapin::Error) -> Self {
        SessionError::Broker(BrokerError::Amqp(e))
    }
}

impl From<tokio::task::JoinError> for SessionError {
    fn from(e: tokio::task::JoinError) -> Self {
        SessionError::Task(e.to_string())
    }
}

impl From<serde_json::Error> for SessionError {
    fn from(e: serde_json::Error) -> Self {
        SessionError::Broker(BrokerError::Encode(e))
    }
}

/// Run `session` until `shutdown`, starting it again with backoff whenever it
/// fails (the broker restarted, the connection dropped) or panics (counted as
/// a panic of `role`'s `task`). Each session builds its own connection,
/// channels, QoS and consumers from scratch, so nothing depends on a client
/// library re-applying state after a reconnect. `name` tells the logs which
/// of several sessions of one task it is.
pub async fn supervise<F, Fut>(
    role: &'static str,
    task: &'static str,
    name: &str,
    shutdown: tokio_util::sync::CancellationToken,
    mut session: F,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), SessionError>>,
{
    let mut delay = Duration::from_millis(200);
    while !shutdown.is_cancelled() {
        let started = std::time::Instant::now();
        let ended = match crate::supervise::guard(role, task, session()).await {
            Ok(ended) => ended,
            Err(panicked) => {
                tracing::error!(role, task, session = name, panic = %panicked.0,
                    "session panicked; its unacknowledged deliveries return to the queue");
                Err(SessionError::Panicked(panicked))
            }
        };
        match ended {
            Ok(()) => return,
            Err(e) => {
                if started.elapsed() > Duration::from_secs(30) {
                    delay = Duration::from_millis(200);
                }
                tracing::warn!(
                    role = name,
                    error = %crate::telemetry::chain(&e),
                    ?delay,
                    "session ended; reconnecting"
                );
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => return,
                }
                delay = (delay * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// Longest wait for the broker to acknowledge a close.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Close `conn`, waiting at most [`CLOSE_TIMEOUT`] for the broker's answer:
/// on a connection whose socket is already gone the answer may never come,
/// and dropping the connection is then all that is left to do.
pub async fn close(conn: &Connection, reason: &str) {
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, conn.close(200, reason.into())).await;
}

/// Close `channel` like [`close`] closes a connection.
pub async fn close_channel(channel: &Channel, reason: &str) {
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, channel.close(200, reason.into())).await;
}

/// True when RabbitMQ accepts a connection (for readiness probes).
pub async fn ping(url: &str) -> bool {
    ping_node(url).await.is_some()
}

/// The first node of the list `url` that accepts a connection (for
/// readiness probes), trying each once; `None` when none does.
pub async fn ping_node(url: &str) -> Option<BrokerNode> {
    let mut brokers = Brokers::parse(url).ok()?;
    for index in 0..brokers.len() {
        let attempt = brokers.get(index).connect(ConnectionProperties::default());
        if let Ok(Ok(conn)) = tokio::time::timeout(Duration::from_secs(3), attempt).await {
            close(&conn, "ping").await;
            return Some(brokers.node(index));
        }
    }
    None
}

/// A consuming session: one connection (watched), one consuming channel with
/// its QoS, and a confirming publisher. Every consumer role opens one per
/// (re)connection, so QoS and declarations are re-applied each time.
pub struct Session {
    pub conn: Connection,
    pub channel: Channel,
    pub consumer: lapin::Consumer,
    pub publisher: Publisher,
    /// Resolves when the connection fails; `select!` on `&mut session.lost`.
    pub lost: std::pin::Pin<Box<dyn std::future::Future<Output = BrokerError> + Send>>,
}

impl Session {
    /// Connect as `role` (the connection is named `<role>/<namespace>`), declare
    /// the topology, set the prefetch, and consume `queue`.
    pub async fn open(
        url: &str,
        role: &str,
        names: &Names,
        settings: &QueueSettings,
        queue: &str,
        prefetch: u16,
    ) -> Result<Session, BrokerError> {
        let conn = connect(url, &format!("{role}/{}", names.namespace)).await?;
        let lost = Box::pin(watch(&conn));
        let channel = conn.create_channel().await?;
        declare(&channel, names, settings).await?;
        channel
            .basic_qos(prefetch, lapin::options::BasicQosOptions::default())
            .await?;
        let publisher = Publisher::new(&conn).await?;
        let consumer = channel
            .basic_consume(
                queue.into(),
                "".into(),
                lapin::options::BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(Session {
            conn,
            channel,
            consumer,
            publisher,
            lost,
        })
    }

    /// The next delivery; `None` once `shutdown` is cancelled; an error when
    /// the connection is lost or the broker cancels the consumer.
    pub async fn next(
        &mut self,
        shutdown: &tokio_util::sync::CancellationToken,
    ) -> Result<Option<lapin::message::Delivery>, BrokerError> {
        use futures::StreamExt;
        tokio::select! {
            d = self.consumer.next() => match d {
                Some(Ok(d)) => Ok(Some(d)),
                Some(Err(e)) => Err(e.into()),
                None => Err(BrokerError::ConsumerCancelled(self.consumer.queue().to_string())),
            },
            e = &mut self.lost => Err(e),
            _ = shutdown.cancelled() => Ok(None),
        }
    }

    /// A delivery that has already arrived, without waiting; `None` when
    /// there is none right now (errors surface on the next [`Session::next`]).
    pub fn ready(&mut self) -> Option<lapin::message::Delivery> {
        use futures::{FutureExt, StreamExt};
        match self.consumer.next().now_or_never() {
            Some(Some(Ok(d))) => Some(d),
            _ => None,
        }
    }

    /// The next delivery and then every delivery already here, up to `max`
    /// in all: under load a group shares one transaction and one confirm
    /// wait; idle, nothing waits for a group to fill. Empty once `shutdown`
    /// is cancelled.
    pub async fn next_group(
        &mut self,
        shutdown: &tokio_util::sync::CancellationToken,
        max: usize,
    ) -> Result<Vec<lapin::message::Delivery>, BrokerError> {
        let Some(first) = self.next(shutdown).await? else {
            return Ok(vec![]);
        };
        let mut group = vec![first];
        while group.len() < max {
            match self.ready() {
                Some(d) => group.push(d),
                None => break,
            }
        }
        Ok(group)
    }

    /// Run `work` (the handling of one delivery) unless the connection is lost
    /// first. After the broker drops a connection, a publisher confirm or an
    /// ack awaited on it may never resolve: without this race the consumer
    /// would wait on it for ever instead of reconnecting. Dropping `work`
    /// midway is what a crash would do: its delivery was not acknowledged and
    /// goes back to the queue; its ledger transaction commits whole or not at all.
    pub async fn while_connected<T>(
        &mut self,
        work: impl std::future::Future<Output = T>,
    ) -> Result<T, BrokerError> {
        tokio::select! {
            r = work => Ok(r),
            e = &mut self.lost => Err(e),
        }
    }

    /// Close the channel (unacknowledged deliveries return to the queue) and the connection.
    pub async fn close(self) {
        close_channel(&self.channel, "shutdown").await;
        close(&self.conn, "shutdown").await;
    }
}

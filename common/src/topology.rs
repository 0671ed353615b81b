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

use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use lapin::{Confirmation, PublisherConfirm};

use crate::config::QueueSettings;

/// The names of one namespace.
#[derive(Clone, Debug)]
pub struct Names {
    pub namespace: String,
}

impl Names {
    pub fn new(namespace: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
        }
    }
    pub fn requests(&self) -> String {
        format!("{}.requests", self.namespace)
    }
    pub fn jobs(&self) -> String {
        format!("{}.jobs", self.namespace)
    }
    pub fn events(&self) -> String {
        format!("{}.events", self.namespace)
    }
    pub fn dead_exchange(&self) -> String {
        format!("{}.dead", self.namespace)
    }
    pub fn requests_dead(&self) -> String {
        format!("{}.requests.dead", self.namespace)
    }
    pub fn jobs_dead(&self) -> String {
        format!("{}.jobs.dead", self.namespace)
    }
    /// Quota previews (request/reply): nothing is held, so nothing is dead-lettered.
    pub fn previews(&self) -> String {
        format!("{}.previews", self.namespace)
    }
}

/// The longest namespace: every name it prefixes (the longest suffix is
/// `.requests.dead`) must fit an AMQP short string, with room to spare.
pub const MAX_NAMESPACE_BYTES: usize = 200;

/// A namespace from the command line: 1 to [`MAX_NAMESPACE_BYTES`] bytes, no
/// control characters, no whitespace (it becomes part of queue names).
pub fn parse_namespace(s: &str) -> Result<String, String> {
    if s.is_empty() || s.len() > MAX_NAMESPACE_BYTES {
        return Err(format!(
            "a namespace has 1 to {MAX_NAMESPACE_BYTES} bytes; this one has {}",
            s.len()
        ));
    }
    if s.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err("a namespace has no control characters or whitespace".into());
    }
    Ok(s.to_string())
}

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
}

/// `host:port/vhost` of an AMQP URL, for messages: never the password.
pub fn describe(url: &str) -> String {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    let rest = rest.rsplit_once('@').map(|(_, r)| r).unwrap_or(rest);
    rest.split('?').next().unwrap_or(rest).to_string()
}

/// The AMQP frame size Holdfast asks for unless the URL names one
/// (`?frame_max=`). lapin keeps two ring buffers of 32 frames per
/// connection, touched as they cycle: RabbitMQ's default 128 KiB frames make
/// that 8 MiB resident per connection, 32 KiB frames 2 MiB. Every Holdfast
/// message but a large batch request fits one frame; larger ones are split,
/// so no size limit changes.
pub const FRAME_MAX: u32 = 32 * 1024;

/// Connect, retrying with backoff for about a minute while the broker is away.
pub async fn connect(url: &str, name: &str) -> Result<Connection, BrokerError> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    let mut uri: lapin::uri::AMQPUri = url
        .parse()
        .map_err(|e| BrokerError::Url(describe(url), e))?;
    uri.query.frame_max.get_or_insert(FRAME_MAX);
    let conn = (|| Connection::connect_uri(uri.clone(), props.clone()))
        .retry(
            ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(100))
                .with_max_delay(Duration::from_secs(5))
                .with_max_times(20),
        )
        .notify(|e, after| {
            tracing::warn!(error = %e, ?after, broker = %describe(url), "connecting to RabbitMQ: retrying")
        })
        .await?;
    Ok(conn)
}

fn quorum_args(names: &Names, dead_key: &str, delivery_limit: u32) -> FieldTable {
    let mut t = FieldTable::default();
    t.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    t.insert(
        "x-delivery-limit".into(),
        AMQPValue::LongInt(delivery_limit as i32),
    );
    t.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(LongString::from(names.dead_exchange())),
    );
    t.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(LongString::from(dead_key)),
    );
    // At-least-once dead-lettering: a dead letter is not lost if the DLQ is busy.
    t.insert(
        "x-dead-letter-strategy".into(),
        AMQPValue::LongString(LongString::from("at-least-once")),
    );
    t.insert(
        "x-overflow".into(),
        AMQPValue::LongString(LongString::from("reject-publish")),
    );
    t
}

fn plain_quorum() -> FieldTable {
    let mut t = FieldTable::default();
    t.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    t
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

/// Declare every exchange and queue of `names`. Idempotent.
pub async fn declare(
    channel: &Channel,
    names: &Names,
    settings: &QueueSettings,
) -> Result<(), BrokerError> {
    let durable_exchange = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let durable_queue = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .exchange_declare(
            names.dead_exchange().into(),
            ExchangeKind::Direct,
            durable_exchange,
            FieldTable::default(),
        )
        .await?;
    channel
        .exchange_declare(
            names.events().into(),
            ExchangeKind::Topic,
            durable_exchange,
            FieldTable::default(),
        )
        .await?;
    for (queue, key) in [
        (names.requests_dead(), "requests"),
        (names.jobs_dead(), "jobs"),
    ] {
        channel
            .queue_declare(queue.clone().into(), durable_queue, plain_quorum())
            .await?;
        channel
            .queue_bind(
                queue.into(),
                names.dead_exchange().into(),
                key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    channel
        .queue_declare(
            names.requests().into(),
            durable_queue,
            quorum_args(names, "requests", settings.request_delivery_limit),
        )
        .await?;
    channel
        .queue_declare(
            names.jobs().into(),
            durable_queue,
            quorum_args(names, "jobs", settings.job_delivery_limit),
        )
        .await?;
    channel
        .queue_declare(names.previews().into(), durable_queue, plain_quorum())
        .await?;
    Ok(())
}

/// Delete every queue and exchange of `names` (tests clean up with this).
pub async fn delete(channel: &Channel, names: &Names) -> Result<(), BrokerError> {
    for q in [
        names.requests(),
        names.jobs(),
        names.requests_dead(),
        names.jobs_dead(),
        names.previews(),
    ] {
        channel
            .queue_delete(q.into(), QueueDeleteOptions::default())
            .await?;
    }
    for x in [names.events(), names.dead_exchange()] {
        channel
            .exchange_delete(x.into(), ExchangeDeleteOptions::default())
            .await?;
    }
    Ok(())
}

/// Properties of a persistent JSON message.
pub fn json_properties() -> BasicProperties {
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
}

/// A channel in confirm mode. Publish, then await the confirm (or a window of them).
#[derive(Clone)]
pub struct Publisher {
    channel: Channel,
}

impl Publisher {
    pub async fn new(connection: &Connection) -> Result<Self, BrokerError> {
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Self { channel })
    }

    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Publish without waiting; `mandatory`, so an unroutable message comes back in its confirm.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<PublisherConfirm, BrokerError> {
        Ok(self
            .channel
            .basic_publish(
                short("an exchange name", exchange)?,
                short("a routing key", routing_key)?,
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body,
                properties,
            )
            .await?)
    }

    /// Await one confirm: Ok only for a routed, acknowledged message.
    pub async fn confirmed(confirm: PublisherConfirm, target: &str) -> Result<(), BrokerError> {
        match confirm.await? {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(returned)) => Err(BrokerError::Unroutable(
                target.into(),
                returned.reply_text.to_string(),
            )),
            Confirmation::Nack(_) => Err(BrokerError::Nacked(target.into())),
            Confirmation::NotRequested => Ok(()),
        }
    }

    /// Publish and wait for the broker's confirm.
    pub async fn publish_confirmed(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), BrokerError> {
        let confirm = self
            .publish(exchange, routing_key, body, properties)
            .await?;
        let target = if exchange.is_empty() {
            routing_key
        } else {
            exchange
        };
        Self::confirmed(confirm, target).await
    }

    /// Publish to a topic exchange where no binding is fine (nobody listening).
    pub async fn publish_event(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
    ) -> Result<(), BrokerError> {
        let confirm = self.send_event(exchange, routing_key, body).await?;
        Self::confirmed(confirm, exchange).await
    }

    /// Like [`Publisher::publish_event`], without waiting for the confirm.
    pub async fn send_event(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
    ) -> Result<PublisherConfirm, BrokerError> {
        Ok(self
            .channel
            .basic_publish(
                short("an exchange name", exchange)?,
                short("a routing key", routing_key)?,
                BasicPublishOptions::default(),
                body,
                json_properties(),
            )
            .await?)
    }
}

/// Publisher confirms awaited together: publish many messages, then wait
/// once, instead of one round trip per message. Waits by itself when
/// `window` confirms are outstanding, so memory stays bounded.
pub struct Confirms {
    pending: Vec<(PublisherConfirm, String, bool)>,
    window: usize,
}

impl Confirms {
    pub fn new(window: usize) -> Self {
        Self {
            pending: Vec::new(),
            window: window.max(1),
        }
    }

    /// Track `confirm` for a message sent to `target`. `optional`: an
    /// unroutable message is fine (a reply queue whose producer went away).
    pub async fn push(
        &mut self,
        confirm: PublisherConfirm,
        target: &str,
        optional: bool,
    ) -> Result<(), BrokerError> {
        self.pending.push((confirm, target.to_string(), optional));
        if self.pending.len() >= self.window {
            self.wait().await?;
        }
        Ok(())
    }

    /// Messages published and not confirmed yet.
    pub fn outstanding(&self) -> usize {
        self.pending.len()
    }

    /// Wait for every outstanding confirm; the first refusal is the error.
    pub async fn wait(&mut self) -> Result<(), BrokerError> {
        for (confirm, target, optional) in self.pending.drain(..) {
            match Publisher::confirmed(confirm, &target).await {
                Err(BrokerError::Unroutable(q, why)) if optional => {
                    tracing::info!(reply_to = %q, %why, "reply queue gone; answer sent as an event only");
                }
                other => other?,
            }
        }
        Ok(())
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

/// Headers that say why Holdfast parked a message in a dead-letter queue.
pub fn parked_headers(reason: &str) -> FieldTable {
    let mut t = FieldTable::default();
    t.insert(
        "x-holdfast-reason".into(),
        AMQPValue::LongString(LongString::from(reason)),
    );
    t
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
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let mut delay = Duration::from_millis(200);
    while !shutdown.is_cancelled() {
        let started = std::time::Instant::now();
        let ended = match crate::supervise::guard(role, task, session()).await {
            Ok(ended) => ended,
            Err(panicked) => {
                tracing::error!(role, task, session = name, panic = %panicked.0,
                    "session panicked; its unacknowledged deliveries return to the queue");
                Err(anyhow::anyhow!(panicked))
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
                    error = format!("{e:#}"),
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
    match tokio::time::timeout(
        Duration::from_secs(3),
        Connection::connect(url, ConnectionProperties::default()),
    )
    .await
    {
        Ok(Ok(conn)) => {
            close(&conn, "ping").await;
            true
        }
        _ => false,
    }
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

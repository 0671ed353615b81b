//! A producer client: publish batch requests the way any AMQP client would
//! (exchange `<ns>.intake`, routing key `requests`, `reply_to` +
//! `correlation_id`, and `user_id` = the login) and read the answers from a
//! private reply queue. `holdfast submit` and the tests use it.
//!
//! Besides the answers, a producer may follow the `batch.progress` events of
//! the events exchange ([`Producer::follow_progress`]), and ask how many
//! consumers a queue has ([`Producer::queue_depth`]) to say why no answer came.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use futures::StreamExt;
use holdfast_common::config::QueueSettings;
use holdfast_common::messages::{short_id, Decision, Event};
use holdfast_common::topology::{self, json_properties, BrokerError, Names, Publisher};
use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, Consumer};

/// No answer came for a request within the time allowed.
#[derive(Debug, thiserror::Error)]
#[error("no answer for `{correlation_id}` within {timeout:?}")]
pub struct NoAnswer {
    pub correlation_id: String,
    pub timeout: Duration,
}

/// What a passive declare tells of a queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueDepth {
    /// Messages ready in the queue (not those delivered and unacknowledged).
    pub messages: u32,
    /// Consumers reading it.
    pub consumers: u32,
}

/// The `batch.progress` events of the namespace, on a private queue of this
/// producer's (see [`Producer::follow_progress`]).
pub struct ProgressFeed {
    channel: lapin::Channel,
    events: Consumer,
}

impl ProgressFeed {
    /// The next progress event of `batch_id` (others are skipped); `None`
    /// once the feed has closed.
    pub async fn next_for(&mut self, batch_id: &str) -> Option<Event> {
        while let Some(delivery) = self.events.next().await {
            let Ok(delivery) = delivery else { return None };
            let event = serde_json::from_slice::<Event>(&delivery.data);
            if let Ok(e @ Event::Progress { .. }) = event {
                if matches!(&e, Event::Progress { batch_id: b, .. } if b == batch_id) {
                    return Some(e);
                }
            }
        }
        None
    }

    pub async fn close(self) {
        topology::close_channel(&self.channel, "done").await;
    }
}

/// A connection with a reply queue.
pub struct Producer {
    conn: Connection,
    publisher: Publisher,
    names: Names,
    reply_queue: String,
    replies: Consumer,
    pending: HashMap<String, VecDeque<Event>>,
    user_id: Option<String>,
}

impl Producer {
    /// Connect, make sure the topology exists (unless `queues.declare` is
    /// off), and open an exclusive reply queue. Requests carry the URL's user
    /// name as `user_id` (RabbitMQ checks it against the login).
    pub async fn connect(
        amqp_url: &str,
        names: &Names,
        queues: &QueueSettings,
    ) -> anyhow::Result<Self> {
        let (conn, node) =
            topology::connect_node(amqp_url, &format!("holdfast-producer/{}", names.namespace))
                .await?;
        // The login of the node connected to: each URL of a list has its own.
        let user_id = topology::Brokers::parse(amqp_url).ok().map(|mut b| {
            b.get(node.position - 1)
                .uri
                .authority
                .userinfo
                .username
                .clone()
        });
        let channel = conn.create_channel().await?;
        topology::declare(&channel, names, queues).await?;
        let queue = channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        let reply_queue = queue.name().to_string();
        let replies = channel
            .basic_consume(
                reply_queue.clone().into(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        let publisher = Publisher::new(&conn).await?;
        Ok(Self {
            conn,
            publisher,
            names: names.clone(),
            reply_queue,
            replies,
            pending: HashMap::new(),
            user_id,
        })
    }

    /// The `user_id` property of the requests sent from now on; `None` sends
    /// none (a producer is free to leave it out; RabbitMQ checks it only when set).
    pub fn set_user_id(&mut self, user_id: Option<String>) {
        self.user_id = user_id;
    }

    /// Publish one request body (any bytes: the coordinator validates) and wait for the broker's confirm.
    pub async fn send(&self, body: &[u8], correlation_id: &str) -> anyhow::Result<()> {
        let props = self.properties(correlation_id)?;
        self.publisher
            .publish_confirmed(&self.names.intake(), "requests", body, props)
            .await?;
        Ok(())
    }

    /// Publish many request bodies, waiting for the broker's confirms a window at a time.
    pub async fn send_many(
        &self,
        requests: &[(String, Vec<u8>)],
        window: usize,
    ) -> anyhow::Result<()> {
        for chunk in requests.chunks(window.max(1)) {
            let mut confirms = Vec::with_capacity(chunk.len());
            for (correlation_id, body) in chunk {
                let props = self.properties(correlation_id)?;
                confirms.push(
                    self.publisher
                        .publish(&self.names.intake(), "requests", body, props)
                        .await?,
                );
            }
            for c in confirms {
                Publisher::confirmed(c, &self.names.requests()).await?;
            }
        }
        Ok(())
    }

    /// A request's properties: answers to our reply queue, tagged with
    /// `correlation_id` (or, past 255 bytes, its hash: see [`short_id`]).
    fn properties(&self, correlation_id: &str) -> Result<BasicProperties, BrokerError> {
        let mut props = json_properties();
        if let Some(user) = &self.user_id {
            props = props.with_user_id(topology::short("a user_id", user)?);
        }
        Ok(props
            .with_reply_to(topology::short("a reply queue", &self.reply_queue)?)
            .with_correlation_id(topology::short(
                "a correlation_id",
                &short_id(correlation_id),
            )?))
    }

    /// The next answer for `correlation_id`, buffering answers to other requests.
    pub async fn next_for(
        &mut self,
        correlation_id: &str,
        timeout: Duration,
    ) -> anyhow::Result<Event> {
        let wanted = short_id(correlation_id);
        if let Some(e) = self
            .pending
            .get_mut(wanted.as_ref())
            .and_then(VecDeque::pop_front)
        {
            return Ok(e);
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let next = tokio::time::timeout_at(deadline, self.replies.next())
                .await
                .map_err(|_| NoAnswer {
                    correlation_id: correlation_id.to_string(),
                    timeout,
                })?;
            let delivery = next.ok_or_else(|| anyhow::anyhow!("reply queue closed"))??;
            let corr = delivery
                .properties
                .correlation_id()
                .as_ref()
                .map(|c| c.to_string())
                .unwrap_or_default();
            let event: Event = serde_json::from_slice(&delivery.data)?;
            if corr == wanted {
                return Ok(event);
            }
            self.pending.entry(corr).or_default().push_back(event);
        }
    }

    /// Ask for a quota preview over AMQP; the answer is `Event::Preview`, or a
    /// rejected `Event::Decision` naming the problem.
    pub async fn preview(
        &mut self,
        body: &[u8],
        correlation_id: &str,
        timeout: Duration,
    ) -> anyhow::Result<Event> {
        let props = self.properties(correlation_id)?;
        self.publisher
            .publish_confirmed(&self.names.intake(), "previews", body, props)
            .await?;
        self.next_for(correlation_id, timeout).await
    }

    /// Send `body` and wait for its decision.
    pub async fn submit(
        &mut self,
        body: &[u8],
        correlation_id: &str,
        timeout: Duration,
    ) -> anyhow::Result<Decision> {
        self.send(body, correlation_id).await?;
        self.decision_for(correlation_id, timeout).await
    }

    /// Wait for the decision answering `correlation_id`.
    pub async fn decision_for(
        &mut self,
        correlation_id: &str,
        timeout: Duration,
    ) -> anyhow::Result<Decision> {
        loop {
            match self.next_for(correlation_id, timeout).await? {
                Event::Decision(d) => return Ok(d),
                other => tracing::debug!(?other, "answer before the decision; skipped"),
            }
        }
    }

    /// Wait for the `completed` summary of a granted batch sent with `correlation_id`.
    pub async fn completed_for(
        &mut self,
        correlation_id: &str,
        timeout: Duration,
    ) -> anyhow::Result<Event> {
        loop {
            match self.next_for(correlation_id, timeout).await? {
                e @ Event::Completed { .. } => return Ok(e),
                _ => continue,
            }
        }
    }

    /// Follow the namespace's `batch.progress` events: a private, exclusive
    /// queue bound to `<ns>.events`. Bind it before sending the request, so
    /// that the first progress of a short batch is not missed. A broker user
    /// may lack the permission (a least-privilege producer user reads only
    /// its reply queues, since the events of every account go through that
    /// exchange): the error says so, and the caller does without.
    pub async fn follow_progress(&self) -> anyhow::Result<ProgressFeed> {
        // A channel of its own: a refused bind closes the channel it was sent on.
        let channel = self.conn.create_channel().await?;
        let queue = channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        let name = queue.name().to_string();
        let exchange = self.names.events();
        if let Err(e) = channel
            .queue_bind(
                name.clone().into(),
                exchange.clone().into(),
                "batch.progress".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
        {
            anyhow::bail!("cannot bind a queue to `{exchange}`: {e}");
        }
        let events = channel
            .basic_consume(
                name.into(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        Ok(ProgressFeed { channel, events })
    }

    /// Messages waiting in `queue` and consumers reading it, from a passive
    /// declare (which needs no permission), on a channel of its own.
    pub async fn queue_depth(&self, queue: &str) -> anyhow::Result<QueueDepth> {
        let channel = self.conn.create_channel().await?;
        let declared = channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await;
        // A passive declare of a missing queue closes the channel itself.
        if declared.is_ok() {
            topology::close_channel(&channel, "done").await;
        }
        let q = declared.map_err(|e| anyhow::anyhow!("queue `{queue}`: {e}"))?;
        Ok(QueueDepth {
            messages: q.message_count(),
            consumers: q.consumer_count(),
        })
    }

    pub async fn close(self) {
        topology::close(&self.conn, "bye").await;
    }
}

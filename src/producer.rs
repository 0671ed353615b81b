//! A producer client: publish batch requests the way any AMQP client would
//! (exchange `<ns>.intake`, routing key `requests`, `reply_to` +
//! `correlation_id`, and `user_id` = the login) and read the answers from a
//! private reply queue. `holdfast submit` and the tests use it.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use futures::StreamExt;
use holdfast_common::config::QueueSettings;
use holdfast_common::messages::{short_id, Decision, Event};
use holdfast_common::topology::{self, json_properties, BrokerError, Names, Publisher};
use lapin::options::{BasicConsumeOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, Consumer};

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
        let conn =
            topology::connect(amqp_url, &format!("holdfast-producer/{}", names.namespace)).await?;
        let user_id = amqp_url
            .parse::<lapin::uri::AMQPUri>()
            .ok()
            .map(|u| u.authority.userinfo.username);
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
                .map_err(|_| {
                    anyhow::anyhow!("no answer for `{correlation_id}` within {timeout:?}")
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

    pub async fn close(self) {
        topology::close(&self.conn, "bye").await;
    }
}

//! Publishing with publisher confirms, one at a time or in windows.

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection};
use lapin::{Confirmation, PublisherConfirm};

use super::{short, BrokerError};

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

/// Headers that say why Holdfast parked a message in a dead-letter queue.
pub fn parked_headers(reason: &str) -> FieldTable {
    let mut t = FieldTable::default();
    t.insert(
        "x-holdfast-reason".into(),
        AMQPValue::LongString(LongString::from(reason)),
    );
    t
}

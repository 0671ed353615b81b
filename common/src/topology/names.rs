//! The names of one namespace, and their declarations.

use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, ExchangeKind};

use crate::config::QueueSettings;

use super::BrokerError;

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

//! The names of one namespace, and their declarations.

use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, ExchangeKind};

use crate::config::QueueSettings;

use super::BrokerError;

/// The routing key of item jobs on the dispatch exchange ([`Names::dispatch`]).
pub const DISPATCH_KEY: &str = "jobs";

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
    /// Direct exchange producers publish to: routing key `requests` reaches
    /// the requests queue, `previews` the previews queue. A broker user
    /// allowed to write here can reach those two queues and nothing else
    /// (the default exchange reaches every queue by name).
    pub fn intake(&self) -> String {
        format!("{}.intake", self.namespace)
    }
    /// Direct exchange every role publishes item jobs to: routing key `jobs`
    /// reaches the jobs queue and nothing else. Workers (a sequential batch's
    /// next chunk) and reconcilers (re-dispatches) publish jobs through it,
    /// so their broker users need no write on the default exchange, which
    /// reaches every queue by name (the requests queue included).
    pub fn dispatch(&self) -> String {
        format!("{}.dispatch", self.namespace)
    }

    /// Every queue and exchange name of the namespace (docs/asyncapi.yaml
    /// describes each one; a test keeps the two in step).
    pub fn all(&self) -> [String; 9] {
        [
            self.requests(),
            self.jobs(),
            self.events(),
            self.dead_exchange(),
            self.requests_dead(),
            self.jobs_dead(),
            self.previews(),
            self.intake(),
            self.dispatch(),
        ]
    }

    /// The least-privilege RabbitMQ permissions of `role` on this namespace
    /// (see docs/security.md, "Broker users").
    pub fn permissions(&self, role: BrokerRole) -> Permissions {
        let ns = regex_escape(&self.namespace);
        let one_of = |suffixes: &[&str]| {
            let alts: Vec<String> = suffixes.iter().map(|s| regex_escape(s)).collect();
            format!("^{ns}\\.({})$", alts.join("|"))
        };
        // Server-named exclusive reply queues (`amq.gen-…`). Exclusive: only
        // the connection that declared one may consume it.
        const REPLY_QUEUES: &str = "^amq\\.gen-.*$";
        const NOTHING: &str = "^$";
        const ALL: &[&str] = &[
            "requests",
            "jobs",
            "events",
            "dead",
            "requests.dead",
            "jobs.dead",
            "previews",
            "intake",
            "dispatch",
        ];
        match role {
            BrokerRole::Producer => Permissions {
                configure: REPLY_QUEUES.into(),
                write: one_of(&["intake"]),
                read: REPLY_QUEUES.into(),
            },
            // Jobs through the dispatch exchange (a sequential batch's next
            // chunk), parked jobs to the dead-letter exchange; events and
            // summaries go through the outbox, relayed by coordinators. No
            // write on `amq.default`: it reaches every queue by name.
            BrokerRole::Worker => Permissions {
                configure: NOTHING.into(),
                write: one_of(&["dispatch", "dead"]),
                read: one_of(&["jobs"]),
            },
            // Re-dispatched jobs through the dispatch exchange.
            BrokerRole::Reconciler => Permissions {
                configure: NOTHING.into(),
                write: one_of(&["dispatch", "dead"]),
                read: NOTHING.into(),
            },
            BrokerRole::Coordinator => Permissions {
                configure: one_of(ALL),
                write: format!(
                    "^(amq\\.default|{ns}\\.({}))$",
                    ALL.iter()
                        .map(|s| regex_escape(s))
                        .collect::<Vec<_>>()
                        .join("|")
                ),
                read: one_of(ALL),
            },
        }
    }
}

/// The roles that get a RabbitMQ user of their own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BrokerRole {
    /// Publishes batch requests and previews, reads its own reply queue.
    Producer,
    /// Declares the topology, consumes requests and previews, publishes
    /// jobs, answers and events.
    Coordinator,
    /// Consumes jobs, publishes events, parks jobs.
    Worker,
    /// Re-dispatches jobs, publishes events.
    Reconciler,
}

/// RabbitMQ's three permission regexes of one user on one vhost.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Permissions {
    pub configure: String,
    pub write: String,
    pub read: String,
}

/// `s` with every regex metacharacter escaped (RabbitMQ uses PCRE-like regexes).
pub fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 2);
    for c in s.chars() {
        if "\\.^$|?*+()[]{}-/".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
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

fn quorum_args(
    names: &Names,
    settings: &QueueSettings,
    dead_key: &str,
    delivery_limit: u32,
) -> FieldTable {
    let mut t = plain_quorum(settings);
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

/// A quorum queue's type and, when set, its initial group size. Unset, the
/// argument is left out: queues declared before the setting existed match.
fn plain_quorum(settings: &QueueSettings) -> FieldTable {
    let mut t = FieldTable::default();
    t.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    if let Some(size) = settings.quorum_initial_group_size {
        t.insert(
            "x-quorum-initial-group-size".into(),
            AMQPValue::LongInt(size.min(i32::MAX as u32) as i32),
        );
    }
    t
}

/// Declare every exchange and queue of `names`. Idempotent. Does nothing
/// when `settings.declare` is off (a broker user without configure
/// permissions: the coordinator, or an operator, declares).
pub async fn declare(
    channel: &Channel,
    names: &Names,
    settings: &QueueSettings,
) -> Result<(), BrokerError> {
    if !settings.declare {
        return Ok(());
    }
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
            .queue_declare(queue.clone().into(), durable_queue, plain_quorum(settings))
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
            quorum_args(names, settings, "requests", settings.request_delivery_limit),
        )
        .await?;
    channel
        .queue_declare(
            names.jobs().into(),
            durable_queue,
            quorum_args(names, settings, "jobs", settings.job_delivery_limit),
        )
        .await?;
    channel
        .queue_declare(
            names.previews().into(),
            durable_queue,
            plain_quorum(settings),
        )
        .await?;
    channel
        .exchange_declare(
            names.intake().into(),
            ExchangeKind::Direct,
            durable_exchange,
            FieldTable::default(),
        )
        .await?;
    for (queue, key) in [
        (names.requests(), "requests"),
        (names.previews(), "previews"),
    ] {
        channel
            .queue_bind(
                queue.into(),
                names.intake().into(),
                key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    channel
        .exchange_declare(
            names.dispatch().into(),
            ExchangeKind::Direct,
            durable_exchange,
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_bind(
            names.jobs().into(),
            names.dispatch().into(),
            DISPATCH_KEY.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
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
    for x in [
        names.events(),
        names.dead_exchange(),
        names.intake(),
        names.dispatch(),
    ] {
        channel
            .exchange_delete(x.into(), ExchangeDeleteOptions::default())
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// docs/asyncapi.yaml names every queue and exchange of the topology
    /// (with the namespace as its `{namespace}` parameter), so that a name
    /// added here cannot be missing from the contract.
    #[test]
    fn asyncapi_describes_every_name() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/asyncapi.yaml");
        let doc = std::fs::read_to_string(path).expect("docs/asyncapi.yaml");
        let names = Names::new("{namespace}");
        let missing: Vec<String> = names
            .all()
            .into_iter()
            .filter(|n| !doc.contains(&format!("name: '{n}'")))
            .collect();
        assert!(
            missing.is_empty(),
            "docs/asyncapi.yaml has no queue or exchange binding `name: '<name>'` for {missing:?}"
        );
    }

    #[test]
    fn permissions_are_anchored_and_escaped() {
        let names = Names::new("t.1+x");
        let p = names.permissions(BrokerRole::Producer);
        assert_eq!(p.configure, r"^amq\.gen-.*$");
        assert_eq!(p.write, r"^t\.1\+x\.(intake)$");
        assert_eq!(p.read, r"^amq\.gen-.*$");
        let w = names.permissions(BrokerRole::Worker);
        assert_eq!(w.configure, "^$");
        assert_eq!(w.write, r"^t\.1\+x\.(dispatch|dead)$");
        assert_eq!(w.read, r"^t\.1\+x\.(jobs)$");
        let c = names.permissions(BrokerRole::Coordinator);
        assert!(c.configure.contains(r"requests\.dead|"), "{}", c.configure);
        assert!(c.write.starts_with(r"^(amq\.default|t\.1\+x\."));
    }
}

//! What Holdfast's roles share, and nothing else.
//!
//! The ledger's files follow a batch: `ledger::reserve` (one hold for the
//! batch) → [`dispatch`] and `ledger::dispatch` (publish its jobs, record it)
//! → `ledger::capture` (each item's cost) → `ledger::close` (release the
//! rest), with `ledger::expire` and `ledger::cancel` as the other endings.
//!
//! - [`ledger`]: the credit ledger in PostgreSQL (grant, reserve, capture, close, audit).
//! - [`messages`]: the JSON wire types exchanged over RabbitMQ.
//! - [`pricing`]: which items of a batch fit the credits available, and the human sentence.
//! - [`topology`]: AMQP names and declarations, the confirming publisher, sessions.
//! - [`events`]: answering producers directly (replies, rejections).
//! - [`outbox`]: events written with the ledger change that causes them, and their relay.
//! - [`dispatch`]: publishing a batch's item jobs with publisher confirms.
//! - [`config`]: settings from flags, `HOLDFAST_*` variables and local defaults.
//! - [`telemetry`]: logs and the Prometheus metrics, recorded in one place.
//! - [`supervise`]: catching a panic in one unit of work, so no panic ends a role.
//! - [`faults`]: named crash points used by the fault-injection tests.
//! - [`tls`]: TLS client settings for PostgreSQL and RabbitMQ (CA files, how much is verified).

pub mod breakdown;
pub mod config;
pub mod database;
pub mod dispatch;
pub mod events;
pub mod faults;
pub mod ledger;
pub mod messages;
pub mod outbox;
pub mod pricing;
pub mod schemas;
pub mod supervise;
pub mod telemetry;
pub mod tls;
pub mod topology;

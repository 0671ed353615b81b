//! What Holdfast's roles share, and nothing else.
//!
//! - [`ledger`]: the credit ledger in PostgreSQL (grant, reserve, capture, close, audit).
//! - [`messages`]: the JSON wire types exchanged over RabbitMQ.
//! - [`pricing`]: which items of a batch fit the credits available, and the human sentence.
//! - [`topology`]: AMQP names, declarations and a confirming publisher.
//! - [`events`]: publishing decisions, progress and completions to producers.
//! - [`dispatch`]: publishing a batch's item jobs with publisher confirms.
//! - [`config`]: settings from flags, `HOLDFAST_*` variables and local defaults.
//! - [`telemetry`]: logs and the Prometheus metrics, recorded in one place.
//! - [`supervise`]: catching a panic in one unit of work, so no panic ends a role.
//! - [`faults`]: named crash points used by the fault-injection tests.

pub mod config;
pub mod database;
pub mod dispatch;
pub mod events;
pub mod faults;
pub mod ledger;
pub mod messages;
pub mod pricing;
pub mod supervise;
pub mod telemetry;
pub mod topology;

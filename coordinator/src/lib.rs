//! Holdfast's coordinator crate: request intake, the decider that takes one
//! reservation per batch and dispatches its jobs, the reconciler, and the
//! HTTP API.
//!
//! A batch request's way through it:
//!
//! ```text
//! <ns>.requests ─▶ requests (the role: a group of deliveries)
//!                   ├─▶ intake   bytes → BatchRequest, or `rejected` naming each field
//!                   ├─▶ decide   one ledger transaction for the group (ledger::reserve),
//!                   │            answer each (events), publish the granted jobs (dispatch)
//!                   └─▶ ack each delivery once its outcome is committed and confirmed
//! POST /v1/batches ─▶ api::batches ─▶ intake, decide (the same path, answered over HTTP)
//! <ns>.previews ─▶ previews: price without holding, answer to reply_to
//! every sweep ─▶ reconcile: close finished, expire overdue, re-dispatch stranded, audit
//! ```
//!
//! - [`config`]: the coordinator's and reconciler's settings and configurations.
//! - [`intake`]: bytes → validated request, or a rejection naming each field.
//! - [`decide`]: the decider: reserve in one transaction, answer, dispatch.
//! - [`requests`]: the coordinator role (consume, decide, ack; poison requests parked).
//! - [`previews`]: quota previews over AMQP.
//! - [`reconcile`]: the reconciler role.
//! - [`api`]: the HTTP API role.
//! - [`bindings`]: which broker users may submit for which accounts.
//! - [`keys`]: the API keys its requests carry (create, list, revoke, check).

pub mod api;
pub mod bindings;
pub mod config;
pub mod decide;
pub mod intake;
pub mod keys;
pub mod previews;
pub mod reconcile;
pub mod requests;

//! Holdfast's coordinator crate: request intake, pricing and one reservation
//! per batch, dispatch of item jobs, the reconciler, and the HTTP API.
//!
//! - [`intake`]: bytes → validated request, or a rejection naming each field.
//! - [`requests`]: the coordinator role (consume, decide, answer, dispatch, ack).
//! - [`reconcile`]: the reconciler role.
//! - [`api`]: the HTTP API role.

pub mod api;
pub mod config;
pub mod decide;
pub mod intake;
pub mod previews;
pub mod reconcile;
pub mod requests;

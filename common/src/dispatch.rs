//! Dispatch: publish a granted batch's pending item jobs with publisher
//! confirms, in windows, then record the batch as dispatched. Safe to repeat:
//! only pending items are sent, and workers settle each item once.

use crate::faults::crash_point;
use crate::ledger::{Ledger, LedgerError};
use crate::messages::ItemJob;
use crate::topology::{json_properties, BrokerError, Names, Publisher};
use lapin::types::ShortString;

/// Why a dispatch stopped before the end; the batch stays `granted` and will be sent again.
#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

/// Publish every pending job of `batch_id`; returns how many were confirmed.
pub async fn dispatch(
    ledger: &Ledger,
    publisher: &Publisher,
    names: &Names,
    batch_id: &str,
    attempt: u32,
    window: usize,
) -> Result<usize, DispatchError> {
    let (account_id, jobs) = ledger.pending_jobs(batch_id).await?;
    let queue = names.jobs();
    let mut sent = 0;
    for chunk in jobs.chunks(window.max(1)) {
        let mut confirms = Vec::with_capacity(chunk.len());
        for job in chunk {
            let message = ItemJob {
                batch_id: batch_id.into(),
                item_id: job.item_id.clone(),
                account_id: account_id.clone(),
                reserved: job.reserved,
                payload: job.payload.clone(),
                attempt,
            };
            let body = serde_json::to_vec(&message).expect("jobs serialise");
            let props = json_properties().with_message_id(ShortString::from(message.message_id()));
            confirms.push(publisher.publish("", &queue, &body, props).await?);
        }
        for confirm in confirms {
            Publisher::confirmed(confirm, &queue).await?;
        }
        sent += chunk.len();
        crash_point("coordinator.mid_dispatch");
    }
    ledger.mark_dispatched(batch_id).await?;
    tracing::debug!(%batch_id, jobs = sent, attempt, "dispatched");
    Ok(sent)
}

//! Dispatch: publish a granted batch's pending item jobs with publisher
//! confirms, in windows, then record the batch as dispatched. Safe to repeat:
//! only pending items are sent, and workers settle each item once.

use crate::faults::crash_point;
use crate::ledger::{Ledger, LedgerError};
use crate::messages::{Attempt, BatchRequest, ItemJob, SCHEMA_VERSION};
use crate::topology::{json_properties, short, BrokerError, Confirms, Names, Publisher};

/// Why a dispatch stopped before the end; the batch stays `granted` and will be sent again.
#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

impl From<DispatchError> for crate::topology::SessionError {
    fn from(e: DispatchError) -> Self {
        match e {
            DispatchError::Ledger(e) => e.into(),
            DispatchError::Broker(e) => e.into(),
        }
    }
}

/// Publish every pending job of `batch_id`, as the ledger has them (a
/// replayed or stranded batch); returns how many were confirmed.
pub async fn dispatch(
    ledger: &Ledger,
    publisher: &Publisher,
    names: &Names,
    batch_id: &str,
    attempt: Attempt,
    window: usize,
) -> Result<usize, DispatchError> {
    let (account_id, jobs) = ledger.pending_jobs(batch_id).await?;
    let mut confirms = Confirms::new(usize::MAX);
    let mut sent = 0;
    for chunk in jobs.chunks(window.max(1)) {
        for job in chunk {
            let message = ItemJob {
                schema_version: SCHEMA_VERSION,
                batch_id: batch_id.into(),
                item_id: job.item_id.clone(),
                account_id: account_id.clone(),
                reserved: job.reserved,
                payload: job.payload.clone(),
                attempt: attempt.number(),
            };
            publish_job(publisher, names, &message, &mut confirms).await?;
        }
        confirms.wait().await?;
        sent += chunk.len();
        crash_point("coordinator.mid_dispatch");
    }
    ledger.mark_dispatched(&[batch_id]).await?;
    tracing::debug!(%batch_id, jobs = sent, attempt = attempt.number(), "dispatched");
    Ok(sent)
}

/// Publish the jobs of a batch granted just now, straight from its request
/// (`run`: the positions of the items that run now), without reading them
/// back from the ledger. The confirms go to `confirms`, which waits every
/// `window` jobs; the caller waits for the rest and then marks the batch
/// dispatched.
pub async fn dispatch_granted(
    publisher: &Publisher,
    names: &Names,
    request: &BatchRequest,
    run: &[usize],
    window: usize,
    confirms: &mut Confirms,
) -> Result<usize, BrokerError> {
    for (n, &i) in run.iter().enumerate() {
        let Some(item) = request.items.get(i) else {
            continue;
        };
        let message = ItemJob {
            schema_version: SCHEMA_VERSION,
            batch_id: request.batch_id.clone(),
            item_id: item.item_id.clone(),
            account_id: request.account_id.clone(),
            reserved: item.estimated_cost,
            payload: item.payload.clone(),
            attempt: Attempt::First.number(),
        };
        publish_job(publisher, names, &message, confirms).await?;
        if (n + 1) % window.max(1) == 0 {
            confirms.wait().await?;
            crash_point("coordinator.mid_dispatch");
        }
    }
    Ok(run.len())
}

/// A job's body and AMQP properties, as published. Never fails for a job
/// built from a request the intake accepted: its `message_id` is at most 255
/// bytes by construction (a hash of long ids; see
/// [`crate::messages::job_message_id`]).
pub fn job_message(message: &ItemJob) -> Result<(Vec<u8>, lapin::BasicProperties), BrokerError> {
    let body = serde_json::to_vec(message).map_err(BrokerError::Encode)?;
    let id = short("a job's message_id", &message.message_id())?;
    Ok((body, json_properties().with_message_id(id)))
}

async fn publish_job(
    publisher: &Publisher,
    names: &Names,
    message: &ItemJob,
    confirms: &mut Confirms,
) -> Result<(), BrokerError> {
    crate::faults::panic_point("dispatch.job", &names.namespace);
    // Through the dispatch exchange, not the default one: a worker's or
    // reconciler's broker user may write there and nowhere a request goes.
    let exchange = names.dispatch();
    let (body, props) = job_message(message)?;
    let confirm = publisher
        .publish(&exchange, crate::topology::DISPATCH_KEY, &body, props)
        .await?;
    confirms.push(confirm, &exchange, false).await
}

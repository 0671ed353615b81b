//! Where the jobs of a group stand before they run, at the cost of one read
//! per batch rather than one per item.
//!
//! A job's first delivery (`attempt` 1, not redelivered by RabbitMQ) is of
//! an item that was pending when it was published: only its batch can have
//! moved on since (cancelled, or closed past its deadline). So the worker
//! reads the batch's state, once per batch, and keeps it for
//! `HOLDFAST_BATCH_STATE_TTL_MS`: the next deliveries of the same batch are
//! not looked up at all. A redelivery, a re-dispatch (`attempt` 2), a batch
//! that is unknown or no longer running: the item itself is looked up, as
//! before, so a duplicate is acknowledged without running again.
//!
//! What a first delivery gives up: if the same job was published twice with
//! `attempt` 1 (it is not, in any path the coordinator or reconciler takes),
//! its generator would run twice; the capture still charges the item once.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use holdfast_common::ledger::{BatchState, ItemState, LedgerError};
use holdfast_common::messages::ItemJob;
use holdfast_common::telemetry::record;
use holdfast_common::topology::delivery_count;
use lapin::message::Delivery;
use moka::sync::Cache;

use crate::job::{Item, ItemStates};

/// Batches kept at most (a worker sees a few hundred at once at the very most).
const CAPACITY: u64 = 10_000;

/// Recently read batch states, by batch id; `None` when the time to live is 0.
#[derive(Clone)]
pub(crate) struct BatchStates(Option<Cache<String, BatchState>>);

impl BatchStates {
    pub(crate) fn new(ttl: Duration) -> Self {
        Self((!ttl.is_zero()).then(|| {
            Cache::builder()
                .max_capacity(CAPACITY)
                .time_to_live(ttl)
                .build()
        }))
    }

    fn get(&self, batch_id: &str) -> Option<BatchState> {
        self.0.as_ref().and_then(|c| c.get(batch_id))
    }

    fn insert(&self, batch_id: String, state: BatchState) {
        if let Some(c) = &self.0 {
            c.insert(batch_id, state);
        }
    }
}

/// Whether this is the job's first delivery of its first dispatch: the item
/// was pending when the job was published, and no worker has had it since.
pub(crate) fn first_delivery(delivery: &Delivery, job: &ItemJob) -> bool {
    job.attempt == 1 && !delivery.redelivered && delivery_count(&delivery.properties) == 0
}

impl Item {
    /// The state of each job's item and batch, as far as running it goes:
    /// first deliveries from their batch's state (read once per batch, then
    /// cached), everything else from the item itself. A job absent from the
    /// answer is of an item the ledger does not have.
    pub(crate) async fn job_states(
        &self,
        jobs: &[(&Delivery, &ItemJob)],
    ) -> Result<ItemStates, LedgerError> {
        let (first, again): (Vec<_>, Vec<_>) = jobs.iter().partition(|(d, j)| first_delivery(d, j));
        let mut batches = HashMap::new();
        let mut unread = HashSet::new();
        for (_, job) in &first {
            match self.batches.get(&job.batch_id) {
                Some(state) => {
                    batches.insert(job.batch_id.as_str(), state);
                }
                None => {
                    unread.insert(job.batch_id.as_str());
                }
            }
        }
        if !unread.is_empty() {
            let ids: Vec<&str> = unread.into_iter().collect();
            record::worker_lookup("batch", ids.len());
            let read = self.batch_states(&ids).await?;
            for id in ids {
                if let Some(&state) = read.get(id) {
                    self.batches.insert(id.to_owned(), state);
                    batches.insert(id, state);
                }
            }
        }
        let mut states = ItemStates::with_capacity(jobs.len());
        let mut look_up: Vec<(&str, &str)> = again
            .iter()
            .map(|(_, j)| (j.batch_id.as_str(), j.item_id.as_str()))
            .collect();
        for (_, job) in &first {
            match batches.get(job.batch_id.as_str()) {
                Some(&state) if state.is_running() => {
                    let key = (job.batch_id.clone(), job.item_id.clone());
                    states.insert(key, (ItemState::Pending, state));
                }
                // Unknown, or closed since the job was published: ask about the item.
                _ => look_up.push((job.batch_id.as_str(), job.item_id.as_str())),
            }
        }
        if !look_up.is_empty() {
            record::worker_lookup("item", look_up.len());
            states.extend(self.item_states(&look_up).await?);
        }
        Ok(states)
    }
}

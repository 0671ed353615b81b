//! The settler: capture finished items in batches, acknowledge their jobs
//! after the commit, announce the batches that closed, send a sequential
//! batch's next chunk, and publish coalesced progress.

use std::time::Duration;

use holdfast_common::dispatch::dispatch;
use holdfast_common::faults::crash_point;
use holdfast_common::ledger::{wait_out, Ledger, Settled, Settlement};
use holdfast_common::messages::Attempt;
use holdfast_common::supervise::guard;
use holdfast_common::telemetry::record;
use holdfast_common::topology::{requeue, Publisher};
use lapin::message::Delivery;
use lapin::options::BasicAckOptions;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::WorkerConfig;

/// Jobs of a sequential batch's next chunk published per confirm wait.
pub(crate) const CHUNK_CONFIRM_WINDOW: usize = 500;

/// A finished item waiting for its capture and ack.
pub(crate) struct Finished {
    pub(crate) settlement: Settlement,
    pub(crate) delivery: Delivery,
}

/// Capture finished items in batches, ack them after the commit, announce
/// closed batches, and publish coalesced progress.
pub(crate) async fn settle_loop(
    ledger: Ledger,
    mut rx: mpsc::Receiver<Finished>,
    publisher: Publisher,
    config: WorkerConfig,
    shutdown: CancellationToken,
) {
    let max = config.settings.settle_batch.max(1);
    let mut progress: std::collections::BTreeSet<String> = Default::default();
    let mut tick = tokio::time::interval(Duration::from_millis(
        config.settings.progress_interval_ms.max(10),
    ));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let first = tokio::select! {
            f = rx.recv() => match f {
                Some(f) => f,
                None => break,
            },
            _ = tick.tick() => {
                write_progress(&ledger, &mut progress).await;
                continue;
            }
        };
        let mut batch = vec![first];
        while batch.len() < max {
            match rx.try_recv() {
                Ok(f) => batch.push(f),
                Err(_) => break,
            }
        }
        let settled = guard(
            "worker",
            "settler",
            settle_and_ack(
                &ledger,
                &publisher,
                &config,
                &batch,
                &mut progress,
                &shutdown,
            ),
        )
        .await;
        if let Err(panicked) = settled {
            // Whatever the capture did rolled back or committed whole: the
            // jobs come back, and a redelivery captures each at most once.
            let items: Vec<(&str, &str)> = batch
                .iter()
                .map(|f| {
                    (
                        f.settlement.batch_id.as_str(),
                        f.settlement.item_id.as_str(),
                    )
                })
                .collect();
            tracing::error!(?items, panic = %panicked.0, "capturing panicked; returning the jobs");
            for f in &batch {
                let _ = requeue(&f.delivery).await;
            }
        }
    }
    write_progress(&ledger, &mut progress).await;
}

/// Capture one batch of finished items, ack their jobs after the commit,
/// announce what closed and dispatch what a sequential batch reserved next.
/// The result of each capture, in order; none when the capture failed and
/// the jobs went back to their queue.
pub(crate) async fn settle_and_ack(
    ledger: &Ledger,
    publisher: &Publisher,
    config: &WorkerConfig,
    batch: &[Finished],
    progress: &mut std::collections::BTreeSet<String>,
    shutdown: &CancellationToken,
) -> Vec<Settled> {
    let names = &config.names;
    holdfast_common::faults::panic_point("worker.settle", &names.namespace);
    let settlements: Vec<Settlement> = batch.iter().map(|f| f.settlement.clone()).collect();
    let report = match settle_patiently(ledger, &settlements, shutdown).await {
        Ok(r) => r,
        Err(e) => {
            // The work is done but not captured: return the jobs; the
            // redelivery captures them (each at most once).
            tracing::error!(error = %e, items = batch.len(), "capture failed; returning the jobs");
            for f in batch {
                let _ = requeue(&f.delivery).await;
            }
            return Vec::new();
        }
    };
    crash_point("worker.after_capture");
    for (f, result) in batch.iter().zip(&report.results) {
        if *result == Settled::Unknown {
            tracing::warn!(batch_id = %f.settlement.batch_id, item_id = %f.settlement.item_id,
                    "captured nothing: no such pending item");
        }
        match f.delivery.acker.ack(BasicAckOptions::default()).await {
            Ok(true) => {}
            Ok(false) | Err(_) => record::ack_lost(),
        }
    }
    progress.extend(report.progress);
    for closed in &report.closed {
        progress.remove(&closed.batch_id);
    }
    // The closed batches' completed events were written to the outbox with
    // the capture; this process's relay publishes them.
    for b in &report.closed {
        tracing::info!(batch_id = %b.batch_id, state = %b.state, captured = b.figures.captured,
            released = b.figures.released, "batch closed");
    }
    // Sequential batches whose next chunk this settle reserved: send its jobs
    // (a reconciler does it after the lease if this fails).
    for batch_id in &report.advanced {
        if let Err(e) = dispatch(
            ledger,
            publisher,
            names,
            batch_id,
            Attempt::First,
            CHUNK_CONFIRM_WINDOW,
        )
        .await
        {
            tracing::warn!(%batch_id, error = %e, "next chunk not dispatched; the reconciler will");
        }
    }
    report.results
}

/// Settle, asking again with backoff while the ledger is unavailable (the
/// deliveries stay unacknowledged meanwhile, so no delivery is spent on an
/// outage). Gives up on a non-transient error, or once shutting down.
pub(crate) async fn settle_patiently(
    ledger: &Ledger,
    settlements: &[Settlement],
    shutdown: &CancellationToken,
) -> Result<holdfast_common::ledger::SettleReport, holdfast_common::ledger::LedgerError> {
    wait_out("captures", shutdown, || ledger.settle(settlements)).await
}

/// One `batch.progress` event for each batch settled since the last one,
/// with its figures as they are now, written to the outbox (coalesced: at
/// most one per batch per interval, whatever the number of items settled).
pub(crate) async fn write_progress(
    ledger: &Ledger,
    progress: &mut std::collections::BTreeSet<String>,
) {
    if progress.is_empty() {
        return;
    }
    let ids: Vec<&str> = progress.iter().map(String::as_str).collect();
    if let Err(e) = ledger.write_progress(&ids).await {
        // A snapshot, superseded by the next one or the completed event.
        tracing::debug!(error = %e, "progress events not written");
    }
    progress.clear();
}

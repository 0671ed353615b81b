//! Quota previews over AMQP: a producer sends the same body as
//! `POST /v1/preview` to `<ns>.previews` with `reply_to` and `correlation_id`,
//! and gets `{"event": "preview", ...}` back (or a `rejected` decision naming
//! the problem). Nothing is held; a preview is answered and acknowledged.

use holdfast_common::events::{self, ReplyTo};
use holdfast_common::ledger::{Ledger, LedgerError};
use holdfast_common::messages::{Decision, Event, Rejected};
use holdfast_common::pricing;
use holdfast_common::supervise::guard;
use holdfast_common::topology::{self, SessionError};
use lapin::options::BasicAckOptions;
use tokio_util::sync::CancellationToken;

use crate::config::CoordinatorConfig;
use crate::intake;

/// Answer one preview body: the preview, or why it cannot be priced.
pub async fn answer(
    ledger: &Ledger,
    config: &CoordinatorConfig,
    body: &[u8],
) -> Result<Event, LedgerError> {
    let request = match intake::parse_preview(body, &config.limits) {
        Ok(r) => r,
        Err(rejected) => return Ok(Event::Decision(Decision::Rejected(*rejected))),
    };
    let priced = async {
        let pots = ledger.pots(&request.account_id).await?;
        let spenders = ledger
            .spender_levels(&request.account_id, request.spender_id.as_deref())
            .await?;
        Ok::<_, LedgerError>((pots, spenders))
    };
    match priced.await {
        Ok((pots, spenders)) => Ok(Event::Preview(pricing::preview(
            &request,
            &pots,
            &spenders,
            config.settings.sequential_chunk,
            config.settings.execution_timeout(),
        ))),
        Err(e @ LedgerError::UnknownSpender { .. }) => {
            let mut r = Rejected::one(None, "spender_id", e.to_string());
            r.account_id = Some(request.account_id.clone());
            Ok(Event::Decision(Decision::Rejected(r)))
        }
        Err(LedgerError::UnknownAccount(a)) => {
            let mut r = Rejected::one(None, "account_id", format!("unknown account `{a}`"));
            r.account_id = Some(a);
            Ok(Event::Decision(Decision::Rejected(r)))
        }
        Err(e) => Err(e),
    }
}

/// One session of the preview consumer.
pub async fn consume(
    ledger: &Ledger,
    config: &CoordinatorConfig,
    shutdown: &CancellationToken,
) -> Result<(), SessionError> {
    let mut session = topology::Session::open(
        &config.amqp_url,
        "holdfast-previews",
        &config.names,
        &config.queues,
        &config.names.previews(),
        config.settings.coordinator_prefetch,
    )
    .await?;
    let publisher = session.publisher.clone();
    while let Some(delivery) = session.next(shutdown).await? {
        // Answered unless the connection goes first (a confirm may then never come).
        let handled = async {
            holdfast_common::faults::panic_point("previews.answer", &config.names.namespace);
            match answer(ledger, config, &delivery.data).await {
                Ok(event) => {
                    let to = ReplyTo::of(&delivery.properties);
                    if let Some(queue) = to.queue.as_deref().filter(|q| !q.is_empty()) {
                        let props = events::reply_properties(&to);
                        let body = event.to_wire()?;
                        if let Err(e) = publisher.publish_confirmed("", queue, &body, props).await {
                            tracing::info!(error = %e, "preview answer not delivered (reply queue gone?)");
                        }
                    } else {
                        tracing::debug!("preview without reply_to: nobody to answer");
                    }
                    delivery.acker.ack(BasicAckOptions::default()).await?;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "preview not answered; returning it");
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                    topology::requeue(&delivery).await?;
                }
            }
            Ok::<(), SessionError>(())
        };
        let guarded = guard("coordinator", "previews", handled);
        match session.while_connected(guarded).await? {
            Ok(handled) => handled?,
            // A preview holds nothing, and its queue has no delivery limit:
            // returning it would panic again for ever. Drop it; the producer
            // times out and may ask again.
            Err(panicked) => {
                let to = ReplyTo::of(&delivery.properties);
                tracing::error!(correlation_id = to.correlation_id.as_deref().unwrap_or("-"),
                    panic = %panicked.0, "answering a preview panicked; dropping it");
                delivery.acker.ack(BasicAckOptions::default()).await?;
            }
        }
    }
    session.close().await;
    Ok(())
}

//! The process's decider: one task per coordinator process that every request
//! consumer feeds. It takes whatever the consumers have queued and decides
//! it in one ledger transaction ([`Ledger::reserve_many`]), so that on a hot
//! account the process's own transactions do not queue on the account row,
//! each waiting for the previous one's commit flush (group commit, or
//! "smart batching": the busier the ledger, the larger the group).
//!
//! While one group's transaction commits, the next group is collected and
//! may start on a second connection (`decider_pipeline` transactions at
//! once): its reads and inserts run during the first one's flush, and only
//! its last statement (the account rows) waits for that commit. The size
//! of a group adapts to a latency budget: halved when a transaction takes
//! longer than `decider_budget_ms`, doubled (up to `decider_max_group`)
//! when it takes less than half of it.
//!
//! The decider decides and nothing else: each consumer still answers,
//! dispatches and acknowledges its own deliveries, after the commit. A
//! group that panics is decided again one consumer's share at a time, so a
//! poisoned request only fails the consumer that took it, which then
//! handles its requests one by one as before ([`crate::requests`]).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use holdfast_common::ledger::{Ledger, LedgerError, ReserveInput, Reserved};
use holdfast_common::messages::BatchRequest;
use holdfast_common::supervise::guard;
use holdfast_common::telemetry::record;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::task::JoinHandle;

/// How the decider groups requests.
#[derive(Clone, Copy, Debug)]
pub struct GroupSettings {
    /// Most requests decided in one transaction.
    pub max_group: usize,
    /// A transaction longer than this halves the group size.
    pub budget: Duration,
    /// Group transactions in flight at once.
    pub pipeline: usize,
    /// Submissions (one consumer's group each) that may wait for the decider.
    pub queue: usize,
}

/// One request as the decider holds it (owned: it crosses tasks).
struct Owned {
    request: BatchRequest,
    reply_to: Option<String>,
    correlation_id: Option<String>,
    execution_timeout: Duration,
    dispatch_grace: Duration,
    chunk_size: usize,
}

impl Owned {
    fn of(input: &ReserveInput<'_>) -> Self {
        Self {
            request: input.request.clone(),
            reply_to: input.reply_to.clone(),
            correlation_id: input.correlation_id.clone(),
            execution_timeout: input.execution_timeout,
            dispatch_grace: input.dispatch_grace,
            chunk_size: input.chunk_size,
        }
    }

    fn input(&self) -> ReserveInput<'_> {
        ReserveInput {
            request: &self.request,
            reply_to: self.reply_to.clone(),
            correlation_id: self.correlation_id.clone(),
            execution_timeout: self.execution_timeout,
            dispatch_grace: self.dispatch_grace,
            chunk_size: self.chunk_size,
        }
    }
}

/// The decisions of a submission, or the text of the panic that deciding it raised.
type Answer = Result<Vec<Result<Reserved, LedgerError>>, String>;

/// One consumer's requests, waiting for the decider.
struct Submission {
    requests: Vec<Owned>,
    answer: oneshot::Sender<Answer>,
}

/// A handle on the process's decider; cheap to clone. The decider stops
/// once every handle is dropped and what was queued is decided.
#[derive(Clone)]
pub struct GroupDecider {
    tx: mpsc::Sender<Submission>,
    transactions: Arc<AtomicU64>,
}

impl GroupDecider {
    /// Start the decider on `ledger`. The task ends when every handle is
    /// dropped, after deciding (and committing) everything queued.
    pub fn start(ledger: Ledger, settings: GroupSettings) -> (Self, JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(settings.queue.max(1));
        let transactions = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(run(ledger, settings, rx, transactions.clone()));
        (Self { tx, transactions }, task)
    }

    /// Group transactions the decider has run (for tests and logs).
    pub fn transactions(&self) -> u64 {
        self.transactions.load(Ordering::Relaxed)
    }

    /// Decide `inputs` with whatever else is queued, one result per input,
    /// in order. A request that starts from a soft hold is decided here, on
    /// its own (it takes no credit check). Panics if deciding this
    /// consumer's share panicked, so that the caller's guard sees it as its
    /// own panic.
    pub async fn reserve_many(
        &self,
        ledger: &Ledger,
        inputs: &[ReserveInput<'_>],
    ) -> Vec<Result<Reserved, LedgerError>> {
        let (soft, plain): (Vec<usize>, Vec<usize>) =
            (0..inputs.len()).partition(|&i| inputs[i].request.reservation_id.is_some());
        let mut results: Vec<Option<Result<Reserved, LedgerError>>> =
            (0..inputs.len()).map(|_| None).collect();
        if !plain.is_empty() {
            let (answer, answered) = oneshot::channel();
            let submission = Submission {
                requests: plain.iter().map(|&i| Owned::of(&inputs[i])).collect(),
                answer,
            };
            let decided = match self.tx.send(submission).await {
                Ok(()) => answered.await.unwrap_or_else(|_| Ok(stopped(plain.len()))),
                Err(_) => Ok(stopped(plain.len())),
            };
            match decided {
                Ok(decided) => {
                    for (i, r) in plain.iter().zip(decided) {
                        results[*i] = Some(r);
                    }
                }
                Err(panic) => panic!("{panic}"),
            }
        }
        for i in soft {
            results[i] = Some(ledger.reserve(&inputs[i]).await);
        }
        results
            .into_iter()
            .map(|r| r.expect("every input decided"))
            .collect()
    }
}

/// The answer for `n` requests when the decider is gone (the process is
/// stopping): transient, so the request is handled on its own or comes back.
fn stopped(n: usize) -> Vec<Result<Reserved, LedgerError>> {
    (0..n)
        .map(|_| {
            Err(LedgerError::Unavailable(
                "the coordinator's decider has stopped".into(),
            ))
        })
        .collect()
}

/// The decider's loop: collect, decide, repeat; drain on the way out.
async fn run(
    ledger: Ledger,
    settings: GroupSettings,
    mut rx: mpsc::Receiver<Submission>,
    transactions: Arc<AtomicU64>,
) {
    let max_group = settings.max_group.max(1);
    let pipeline = settings.pipeline.max(1);
    let permits = Arc::new(Semaphore::new(pipeline));
    let cap = Arc::new(AtomicUsize::new(max_group));
    let mut held: Option<Submission> = None;
    loop {
        let first = match held.take() {
            Some(s) => s,
            None => match rx.recv().await {
                Some(s) => s,
                None => break,
            },
        };
        // Wait for a free connection slot; meanwhile requests queue up, and
        // the group taken next is as large as the wait was long.
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        let limit = cap.load(Ordering::Relaxed);
        let mut size = first.requests.len();
        let mut group = vec![first];
        while size < limit {
            match rx.try_recv() {
                Ok(s) if size + s.requests.len() > limit => {
                    held = Some(s);
                    break;
                }
                Ok(s) => {
                    size += s.requests.len();
                    group.push(s);
                }
                Err(_) => break,
            }
        }
        let (ledger, cap, transactions) = (ledger.clone(), cap.clone(), transactions.clone());
        tokio::spawn(async move {
            let started = Instant::now();
            decide(&ledger, group, size).await;
            transactions.fetch_add(1, Ordering::Relaxed);
            adapt(&cap, started.elapsed(), settings.budget, max_group);
            drop(permit);
        });
    }
    // Every handle is gone: wait for the transactions still in flight.
    let _ = permits.acquire_many(pipeline as u32).await;
}

/// Halve the group size after a transaction over the budget; double it
/// (up to `max`) after one under half of it.
fn adapt(cap: &AtomicUsize, took: Duration, budget: Duration, max: usize) {
    let now = cap.load(Ordering::Relaxed);
    let next = if took > budget {
        (now / 2).max(1)
    } else if took < budget / 2 {
        (now * 2).min(max)
    } else {
        now
    };
    cap.store(next, Ordering::Relaxed);
}

/// Decide `group` (of `size` requests) in one transaction and answer each
/// submission. If it panics, each submission is decided on its own, so the
/// panic reaches only the consumer whose requests raise it.
async fn decide(ledger: &Ledger, group: Vec<Submission>, size: usize) {
    record::decider_group(size);
    let inputs: Vec<ReserveInput<'_>> = group
        .iter()
        .flat_map(|s| s.requests.iter().map(Owned::input))
        .collect();
    let decided = guard("coordinator", "requests", ledger.reserve_many(&inputs)).await;
    drop(inputs);
    match decided {
        Ok(decided) => {
            let mut decided = decided.into_iter();
            for s in group {
                let mine: Vec<_> = decided.by_ref().take(s.requests.len()).collect();
                // A consumer that went away (its connection lost) gets its
                // requests again: they replay this decision.
                let _ = s.answer.send(Ok(mine));
            }
        }
        Err(panicked) if group.len() == 1 => {
            let s = group.into_iter().next().expect("one submission");
            let _ = s.answer.send(Err(panicked.0));
        }
        Err(panicked) => {
            tracing::error!(panic = %panicked.0, submissions = group.len(),
                "deciding a group of requests panicked; deciding each consumer's share on its own");
            for s in group {
                let inputs: Vec<ReserveInput<'_>> = s.requests.iter().map(Owned::input).collect();
                let decided = guard("coordinator", "requests", ledger.reserve_many(&inputs))
                    .await
                    .map_err(|p| p.0);
                drop(inputs);
                let _ = s.answer.send(decided);
            }
        }
    }
}

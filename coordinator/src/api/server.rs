//! The HTTP/1.1 server under the API: accepts connections and serves each
//! with hyper, with limits and timeouts of our own rather than the
//! framework's defaults (which have no header or body timeout, so a few
//! clients that send slowly would each hold a connection, and a graceful
//! shutdown would wait on them, forever).
//!
//! What hyper itself would refuse with an empty body (a request target over
//! 65,534 bytes, more than 100 header fields, a head over
//! [`HEAD_BUFFER_BYTES`], malformed syntax) is refused first, with a problem
//! document, by the watch every connection reads through
//! ([`super::heads`]); our other limits ([`ServerLimits`]) sit below hyper's
//! and are answered by [`super::guard`]. A client that has not sent
//! a whole request head within the header timeout is disconnected without an
//! answer; the same timeout closes an idle keep-alive connection. At most
//! [`ServerLimits::max_connections`] connections are served at once.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper::service::{service_fn, Service};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::guard;
use super::heads::HeadWatch;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The most a request head (request line and header fields) may take in
/// hyper's read buffer; above it hyper answers 431 on its own. It holds the
/// longest URL and header block [`ServerLimits`] allows, so those limits are
/// ours to answer.
pub const HEAD_BUFFER_BYTES: usize = 256 * 1024;

/// How long a shutdown gives a connection with no request in flight (one
/// that may still be writing its last answer) before closing it.
pub const SHUTDOWN_IDLE_GRACE: Duration = Duration::from_secs(1);

/// The longest request target hyper parses (it answers 414 above it).
pub const HYPER_MAX_URL_BYTES: usize = (u16::MAX - 1) as usize;

/// Limits and timeouts of every connection and request (from [`super::ApiSettings`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerLimits {
    /// A client must send a whole request head within this; otherwise (and
    /// when a keep-alive connection idles this long) the connection is closed.
    pub header_timeout: Duration,
    /// Longest wait for the next part of a request body: 408 after it.
    pub body_timeout: Duration,
    /// Longest a whole request may take, body and handler: 503 after it.
    /// Also how long a shutdown waits for requests in flight.
    pub request_timeout: Duration,
    /// Longest request target (path and query): 414 above it.
    pub max_url_bytes: usize,
    /// Largest header block (`name: value` lines): 431 above it.
    pub max_header_bytes: usize,
    /// Most connections served at once; the next clients wait in the
    /// listen queue (the kernel's backlog) until one closes.
    pub max_connections: usize,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(60),
            max_url_bytes: 8 * 1024,
            max_header_bytes: 16 * 1024,
            max_connections: 1024,
        }
    }
}

/// Serve `app`, guarded (see [`guard::protect`]), on `listener` until
/// `shutdown`. Then accept no more connections, let requests in flight finish
/// (each within the request timeout), and close every other connection.
pub async fn serve(
    app: Router,
    listener: TcpListener,
    limits: ServerLimits,
    shutdown: CancellationToken,
) {
    let app = guard::protect(app, &limits);
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(HEAD_BUFFER_BYTES);
    // Owns every connection: dropped, it closes those still open.
    let mut connections = JoinSet::new();
    let mut full = false;
    loop {
        // At the cap, stop accepting: new clients wait in the listen queue
        // until a connection ends (each is bounded by the timeouts).
        let room = connections.len() < limits.max_connections.max(1);
        if !room && !full {
            tracing::warn!(
                max = limits.max_connections,
                "HTTP connections at HOLDFAST_HTTP_MAX_CONNECTIONS; new clients wait"
            );
        }
        full = !room;
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(done) = connections.join_next(), if !connections.is_empty() => {
                if let Err(e) = done {
                    tracing::error!(error = %e, "an HTTP connection task failed");
                }
                continue;
            }
            accepted = listener.accept(), if room => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            },
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(%peer, error = %e, "TCP_NODELAY not set");
        }
        connections.spawn(connection(
            builder.clone(),
            stream,
            peer,
            app.clone(),
            limits,
            shutdown.clone(),
        ));
    }
    drop(listener);
    // Each connection ends on its own within this; the bound is a backstop.
    let bound = limits.request_timeout + SHUTDOWN_IDLE_GRACE;
    let drained = tokio::time::timeout(bound, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            open = connections.len(),
            "HTTP connections still open {bound:?} after shutdown; closing them"
        );
        connections.shutdown().await;
    }
}

/// Serve one connection until it closes. On `shutdown`, a request in flight
/// may finish (its own timeouts bound it); a connection with none (idle, or
/// with half a request head) is closed after [`SHUTDOWN_IDLE_GRACE`].
async fn connection(
    builder: http1::Builder,
    stream: TcpStream,
    peer: SocketAddr,
    app: Router,
    limits: ServerLimits,
    shutdown: CancellationToken,
) {
    let in_flight = Arc::new(AtomicUsize::new(0));
    let counted = in_flight.clone();
    let app = TowerToHyperService::new(app);
    let service = service_fn(move |req| {
        let busy = Busy::enter(&counted);
        let answer = app.call(req);
        async move {
            let answer = answer.await;
            drop(busy);
            answer
        }
    });
    // A second handle on the socket, to answer a head the watch refuses
    // once hyper has let go of the connection.
    let (stream, answer) = match two_handles(stream) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::debug!(%peer, error = %e, "HTTP connection dropped: no second handle");
            return;
        }
    };
    let most_head = limits.max_url_bytes + limits.max_header_bytes + HEAD_SLACK;
    let (watched, refused) = HeadWatch::new(stream, limits.max_url_bytes, most_head);
    let connection = builder.serve_connection(TokioIo::new(watched), service);
    let mut connection = std::pin::pin!(connection);
    let served = tokio::select! {
        served = connection.as_mut() => served,
        _ = shutdown.cancelled() => {
            // Answer the request in flight, if any, then close.
            connection.as_mut().graceful_shutdown();
            let grace = if in_flight.load(Ordering::Acquire) > 0 {
                limits.request_timeout
            } else {
                SHUTDOWN_IDLE_GRACE
            };
            match tokio::time::timeout(grace, connection).await {
                Ok(served) => served,
                Err(_) => {
                    tracing::debug!(%peer, "HTTP connection closed at shutdown");
                    return;
                }
            }
        }
    };
    if let Err(e) = served {
        // Timeouts, resets and parse errors: the client's doing.
        tracing::debug!(%peer, error = %e, "HTTP connection ended");
    }
    let refusal = refused.lock().ok().and_then(|mut slot| slot.take());
    if let Some(refusal) = refusal {
        tracing::debug!(%peer, status = %refusal.status, detail = %refusal.detail, "request head refused");
        let mut answer = answer;
        let answered = async {
            answer.write_all(&refusal.response()).await?;
            answer.shutdown().await?;
            // Read what the client still sends until it closes: closing with
            // unread data would reset the connection, and the client could
            // lose the answer.
            let mut sink = [0u8; 8192];
            while answer.read(&mut sink).await? > 0 {}
            std::io::Result::Ok(())
        };
        match tokio::time::timeout(limits.header_timeout, answered).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "a refused request's answer was not delivered")
            }
            Err(_) => tracing::debug!(%peer, "a refused request's client did not close in time"),
        }
    }
}

/// Room in a request head beyond the URL and header limits (the request
/// line's method and version, line ends).
const HEAD_SLACK: usize = 1024;

/// Two handles on one socket (a duplicated descriptor).
fn two_handles(stream: TcpStream) -> std::io::Result<(TcpStream, TcpStream)> {
    let stream = stream.into_std()?;
    let other = stream.try_clone()?;
    Ok((TcpStream::from_std(stream)?, TcpStream::from_std(other)?))
}

/// Counts one request of a connection as in flight until dropped.
struct Busy(Arc<AtomicUsize>);

impl Busy {
    fn enter(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        Busy(count.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An accept that failed. A connection reset before it was accepted is the
/// client's affair; anything else (out of file descriptors) is logged and
/// retried after a pause rather than spun on.
async fn accept_failed(e: std::io::Error) {
    use std::io::ErrorKind as K;
    if matches!(
        e.kind(),
        K::ConnectionAborted | K::ConnectionReset | K::ConnectionRefused | K::Interrupted
    ) {
        return;
    }
    tracing::warn!(error = %e, "accepting an HTTP connection failed; retrying in 1 s");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

//! Request heads that hyper would refuse on its own, refused by us first.
//!
//! hyper answers a few requests itself, with an empty body, before any of
//! our code sees them: a request target over 65,534 bytes (414), more than
//! 100 header fields or a head over its read buffer (431), malformed syntax
//! (400). [`HeadWatch`] wraps a connection's socket and reads each request
//! head as it arrives, before hyper does. A head that hyper would refuse
//! (with [`httparse`], the parser hyper itself uses, and limits a little
//! above the guard's in [`super::guard`]) ends the connection with a
//! [`Refusal`], and the server answers it with a problem document.
//!
//! Between heads it skips each request's body by its `Content-Length`; a
//! chunked body ends the watch for that connection (hyper's own limits then
//! apply to the requests after it on the same connection).

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use axum::http::StatusCode;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::problem::{Problem, PROBLEM_JSON};

/// The most header fields hyper parses (it answers 431 above it).
const MAX_HEADERS: usize = 100;

/// A head is parsed on every read up to this size (so a bad byte in a
/// request line is caught before hyper answers it), then once a line.
const EVERY_READ_BYTES: usize = 1024;

/// Room for the method and the protocol version beside the URL on the request line.
const REQUEST_LINE_SLACK: usize = 64;

/// Why a connection's request head was refused: the answer to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    pub detail: String,
}

impl Refusal {
    /// The whole HTTP/1.1 response: a problem document, then the connection closes.
    pub fn response(&self) -> Vec<u8> {
        let problem = Problem::status(self.status, self.detail.clone());
        let body = serde_json::to_vec(&problem).unwrap_or_default();
        let mut out = format!(
            "HTTP/1.1 {} {}\r\ncontent-type: {PROBLEM_JSON}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            self.status.as_u16(),
            self.status.canonical_reason().unwrap_or("Error"),
            body.len()
        )
        .into_bytes();
        out.extend_from_slice(&body);
        out
    }
}

/// Where the watch is in the byte stream.
#[derive(Debug)]
enum Position {
    /// Reading a request head (kept until it ends).
    Head(Vec<u8>),
    /// Skipping this many bytes of a body.
    Body(u64),
    /// A chunked body: no more watching on this connection.
    Off,
}

/// The state of one connection's watch.
#[derive(Debug)]
struct Watch {
    position: Position,
    /// The URL limit the guard enforces (for the answer's detail).
    max_url: usize,
    max_line: usize,
    max_head: usize,
}

impl Watch {
    /// Look at the bytes just read; a refusal as soon as the head in them is one.
    fn feed(&mut self, mut bytes: &[u8]) -> Option<Refusal> {
        while !bytes.is_empty() {
            match &mut self.position {
                Position::Off => return None,
                Position::Body(left) => {
                    let skip = usize::try_from(*left)
                        .unwrap_or(usize::MAX)
                        .min(bytes.len());
                    *left -= skip as u64;
                    bytes = &bytes[skip..];
                    if *left == 0 {
                        self.position = Position::Head(Vec::new());
                    }
                }
                Position::Head(head) => {
                    // Up to the end of this head, or all of it.
                    let before = head.len();
                    head.extend_from_slice(bytes);
                    let end = find_end(head, before.saturating_sub(3));
                    let used = end.map_or(bytes.len(), |e| e - before);
                    let line_ended = bytes[..used].contains(&b'\n');
                    bytes = &bytes[used..];
                    let head = std::mem::take(head);
                    let head = &head[..end.unwrap_or(head.len())];
                    match self.judge(head, end.is_some(), line_ended) {
                        Ok(Next::More) => self.position = Position::Head(head.to_vec()),
                        Ok(Next::Body(0)) => self.position = Position::Head(Vec::new()),
                        Ok(Next::Body(n)) => self.position = Position::Body(n),
                        Ok(Next::Chunked) => self.position = Position::Off,
                        Err(refusal) => return Some(refusal),
                    }
                }
            }
        }
        None
    }

    /// What a head (`complete`, or so far, `new_line` when a line of it just
    /// ended) says comes next, or why it is refused.
    fn judge(&self, head: &[u8], complete: bool, new_line: bool) -> Result<Next, Refusal> {
        let line_ended = head.contains(&b'\n');
        let line = head.iter().position(|&b| b == b'\n').unwrap_or(head.len());
        if line > self.max_line {
            return Err(Refusal {
                status: StatusCode::URI_TOO_LONG,
                detail: format!(
                    "the request line is over {} bytes; the URL limit is {} bytes",
                    self.max_line, self.max_url
                ),
            });
        }
        if head.len() > self.max_head {
            return Err(Refusal {
                status: StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                detail: format!("the request head is over {} bytes", self.max_head),
            });
        }
        // Past its first KiB, a head is parsed again only when a line of it
        // ends: a client trickling bytes costs no full parse per byte.
        if !complete && !new_line && head.len() > EVERY_READ_BYTES {
            return Ok(Next::More);
        }
        let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut request = httparse::Request::new(&mut fields);
        match request.parse(head) {
            Ok(httparse::Status::Partial) if !complete => Ok(Next::More),
            Ok(_) if !complete => Ok(Next::More),
            Ok(_) => Ok(body_of(request.headers)),
            Err(httparse::Error::TooManyHeaders) => Err(Refusal {
                status: StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                detail: format!("a request has at most {MAX_HEADERS} header fields"),
            }),
            // A request line still arriving may not parse yet.
            Err(_) if !line_ended && !complete => Ok(Next::More),
            Err(e) => Err(Refusal {
                status: StatusCode::BAD_REQUEST,
                detail: format!("the request is not HTTP/1.1: {e}"),
            }),
        }
    }
}

/// What follows a complete head.
enum Next {
    More,
    Body(u64),
    Chunked,
}

/// The body a complete head announces.
fn body_of(fields: &[httparse::Header<'_>]) -> Next {
    let named = |name: &str| {
        fields
            .iter()
            .find(|f| f.name.eq_ignore_ascii_case(name))
            .and_then(|f| std::str::from_utf8(f.value).ok())
    };
    if named("transfer-encoding").is_some() {
        return Next::Chunked;
    }
    let length = named("content-length").and_then(|v| v.trim().parse::<u64>().ok());
    Next::Body(length.unwrap_or(0))
}

/// The end (just past the blank line) of the head in `bytes`, searching from `from`.
fn find_end(bytes: &[u8], from: usize) -> Option<usize> {
    let from = from.min(bytes.len());
    bytes[from..]
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| from + p + 4)
}

/// A connection's socket, read through a [`Watch`]. A refused head ends the
/// read with an error (hyper then closes without answering) and leaves the
/// [`Refusal`] in the shared slot for the server to answer.
pub struct HeadWatch<S> {
    inner: S,
    watch: Watch,
    refused: Arc<Mutex<Option<Refusal>>>,
}

impl<S> HeadWatch<S> {
    /// Watch `inner` with URLs up to `max_url` bytes and heads up to
    /// `max_head` (both a little above the guard's limits, so that the guard
    /// answers what is just over them, with its own detail).
    pub fn new(inner: S, max_url: usize, max_head: usize) -> (Self, Arc<Mutex<Option<Refusal>>>) {
        let refused = Arc::new(Mutex::new(None));
        let watch = Watch {
            position: Position::Head(Vec::new()),
            max_url,
            max_line: max_url + REQUEST_LINE_SLACK,
            max_head,
        };
        let me = Self {
            inner,
            watch,
            refused: refused.clone(),
        };
        (me, refused)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for HeadWatch<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let read = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = read {
            let me = &mut *self;
            if let Some(refusal) = me.watch.feed(&buf.filled()[before..]) {
                let detail = refusal.detail.clone();
                if let Ok(mut slot) = me.refused.lock() {
                    *slot = Some(refusal);
                }
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, detail)));
            }
        }
        read
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for HeadWatch<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // A refused connection is the server's to answer and close: hyper
        // shutting the socket's write side now would lose that answer.
        if self.refused.lock().map(|r| r.is_some()).unwrap_or(false) {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn watch() -> Watch {
        Watch {
            position: Position::Head(Vec::new()),
            max_url: 100,
            max_line: 100 + REQUEST_LINE_SLACK,
            max_head: 1000,
        }
    }

    fn status(bytes: &[&[u8]]) -> Option<u16> {
        let mut w = watch();
        bytes
            .iter()
            .find_map(|b| w.feed(b))
            .map(|r| r.status.as_u16())
    }

    #[test]
    fn refuses_what_hyper_would_and_passes_the_rest() {
        let ok = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(status(&[ok]), None);
        // A head in pieces, then a second request with a body, pipelined.
        let post =
            b"POST /v1/preview HTTP/1.1\r\nContent-Length: 5\r\n\r\n{\"a\"}GET / HTTP/1.1\r\n\r\n";
        assert_eq!(status(&[&ok[..7], &ok[7..], post]), None);
        let long = format!("GET /{} HTTP/1.1\r\n", "x".repeat(300));
        assert_eq!(status(&[long.as_bytes()]), Some(414));
        let fields: String = (0..120).map(|i| format!("X-{i}: v\r\n")).collect();
        let many = format!("GET / HTTP/1.1\r\n{fields}\r\n");
        assert_eq!(status(&[many.as_bytes()]), Some(431));
        let big = format!("GET / HTTP/1.1\r\nX: {}\r\n", "y".repeat(2000));
        assert_eq!(status(&[big.as_bytes()]), Some(431));
        assert_eq!(status(&[b"NOT HTTP\r\n\r\n"]), Some(400));
        // A body with a line that looks like garbage is a body, not a head.
        let body = b"POST / HTTP/1.1\r\nContent-Length: 12\r\n\r\nNOT HTTP\r\n\r\n";
        assert_eq!(status(&[body]), None);
        // After a chunked body, the connection is no longer watched.
        let chunked =
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nNOT HTTP\r\n\r\n";
        assert_eq!(status(&[chunked]), None);
    }

    #[test]
    fn the_answer_is_a_problem_document_that_closes_the_connection() {
        let r = Refusal {
            status: StatusCode::URI_TOO_LONG,
            detail: "too long".into(),
        };
        let text = String::from_utf8(r.response()).unwrap();
        assert!(text.starts_with("HTTP/1.1 414 URI Too Long\r\n"), "{text}");
        assert!(text.contains("content-type: application/problem+json\r\n"));
        assert!(text.contains("connection: close\r\n"));
        assert!(text.ends_with(r#""detail":"too long"}"#), "{text}");
    }
}

//! A hardened HTTP/1.1 server for the gateway and the worker's `/metrics`: hyper's
//! connection driver plus the limits a public listener needs, none of which `axum::serve`
//! or a bare accept loop has.
//!
//! - **Header read timeout**: a request's line and headers must arrive within
//!   `header_read_timeout` of the connection's start, or of the first byte of a later
//!   request on a kept-alive connection (a slow header trickle is cut off).
//! - **Idle timeout**: a connection with no request in progress is closed after
//!   `idle_timeout`; so is one whose response write makes no progress that long (a client
//!   that stops reading).
//! - **Body read timeout**: a request body must arrive in full within `body_read_timeout`
//!   of its headers; the handler then sees a body error and the client gets
//!   `408 {"error":"request_timeout"}` with `connection: close`.
//! - **Connection cap**: at most `max_connections` are served at once; further clients wait
//!   in the kernel's listen backlog (no descriptor is spent on them).
//! - **Accept errors** (`EMFILE`, `ENFILE`, `ENOMEM`…) back off exponentially up to one
//!   second instead of retrying in a hot loop; per-connection errors are skipped.
//!
//! The phase of each connection (head, busy, idle) lives in a small shared clock updated by
//! the I/O wrapper (bytes read, writes stalled) and the service wrapper (request started,
//! response finished); a watchdog per connection closes it when the current phase's deadline
//! passes.

use bytes::Bytes;
use honua_shared::config::HttpServerConfig;
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// The limits, from [`HttpServerConfig`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub body_read_timeout: Duration,
    pub max_connections: usize,
}

impl From<&HttpServerConfig> for Limits {
    fn from(c: &HttpServerConfig) -> Self {
        Self {
            header_read_timeout: c.header_read_timeout(),
            idle_timeout: c.idle_timeout(),
            body_read_timeout: c.body_read_timeout(),
            max_connections: c.max_connections,
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A service the server runs: axum's `Router`, a `tower::service_fn`…
pub trait HttpService<B>:
    tower::Service<
        Request<TimedBody>,
        Response = Response<B>,
        Error = Infallible,
        Future: Send + 'static,
    > + Clone
    + Send
    + 'static
{
}

impl<S, B> HttpService<B> for S where
    S: tower::Service<
            Request<TimedBody>,
            Response = Response<B>,
            Error = Infallible,
            Future: Send + 'static,
        > + Clone
        + Send
        + 'static
{
}

/// A response body the server sends.
pub trait ResponseBody: Body<Data = Bytes, Error: Into<BoxError>> + Send + Unpin + 'static {}

impl<B> ResponseBody for B where
    B: Body<Data = Bytes, Error: Into<BoxError>> + Send + Unpin + 'static
{
}

/// Serves `service` on `listener` until `shutdown` fires, then lets open connections finish
/// their request in progress (idle ones close at once) and returns when all are closed.
pub async fn serve<S, B>(
    listener: TcpListener,
    service: S,
    limits: Limits,
    shutdown: CancellationToken,
) -> io::Result<()>
where
    S: HttpService<B>,
    B: ResponseBody,
{
    let max = limits.max_connections.clamp(1, Semaphore::MAX_PERMITS);
    let slots = Arc::new(Semaphore::new(max));
    const MIN_BACKOFF: Duration = Duration::from_millis(5);
    let mut backoff = MIN_BACKOFF;
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p.map_err(io::Error::other)?,
            _ = shutdown.cancelled() => break,
        };
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.cancelled() => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => {
                backoff = MIN_BACKOFF;
                stream
            }
            // The client gave up before the accept: nothing wrong with the listener.
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                // Out of descriptors or memory: retrying at once would spin a core.
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "accepting a connection failed");
                drop(permit);
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.cancelled() => break,
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let (service, shutdown) = (service.clone(), shutdown.clone());
        tokio::spawn(async move {
            connection(stream, service, limits, shutdown).await;
            drop(permit);
        });
    }
    // Every connection holds a permit until it is closed.
    let _ = slots.acquire_many(max as u32).await;
    Ok(())
}

fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// Drives one connection until it ends, a deadline passes or shutdown completes.
async fn connection<S, B>(
    stream: TcpStream,
    service: S,
    limits: Limits,
    shutdown: CancellationToken,
) where
    S: HttpService<B>,
    B: ResponseBody,
{
    let clock = Arc::new(Clock::new(limits));
    let io = TokioIo::new(Watched {
        inner: stream,
        clock: clock.clone(),
    });
    let svc = Svc {
        inner: service,
        clock: clock.clone(),
        limits,
    };
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .serve_connection(io, svc);
    tokio::pin!(conn);
    let mut draining = false;
    loop {
        let changed = clock.changed.notified();
        let deadline = clock.deadline();
        tokio::select! {
            _ = conn.as_mut() => return,
            _ = changed => {}
            _ = sleep_until(deadline) => {
                if clock.deadline().is_some_and(|d| d <= Instant::now()) {
                    // Dropping the connection closes the socket.
                    tracing::debug!(phase = ?clock.phase(), "http connection timed out");
                    return;
                }
            }
            _ = shutdown.cancelled(), if !draining => {
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// What a connection is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for a request's line and headers (from the connection's start or the
    /// request's first byte).
    Head,
    /// Request `n` is being handled or answered (its body has its own deadline).
    Busy(u64),
    /// Between requests.
    Idle,
}

#[derive(Debug)]
struct State {
    phase: Phase,
    since: Instant,
    /// When the current response write started to make no progress.
    write_stalled: Option<Instant>,
    requests: u64,
}

/// The shared phase clock of one connection.
struct Clock {
    limits: Limits,
    state: Mutex<State>,
    /// Fired when the deadline may have moved earlier.
    changed: Notify,
}

impl Clock {
    fn new(limits: Limits) -> Self {
        Self {
            limits,
            state: Mutex::new(State {
                phase: Phase::Head,
                since: Instant::now(),
                write_stalled: None,
                requests: 0,
            }),
            changed: Notify::new(),
        }
    }

    fn phase(&self) -> Phase {
        self.state.lock().unwrap().phase
    }

    fn deadline(&self) -> Option<Instant> {
        let s = self.state.lock().unwrap();
        let phase = match s.phase {
            Phase::Head => Some(s.since + self.limits.header_read_timeout),
            Phase::Idle => Some(s.since + self.limits.idle_timeout),
            Phase::Busy(_) => None,
        };
        let stall = s.write_stalled.map(|t| t + self.limits.idle_timeout);
        match (phase, stall) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn set(&self, from: impl Fn(Phase) -> bool, to: Phase) {
        let mut s = self.state.lock().unwrap();
        if from(s.phase) {
            s.phase = to;
            s.since = Instant::now();
            drop(s);
            self.changed.notify_one();
        }
    }

    /// Bytes arrived: an idle connection starts a request head.
    fn on_read(&self) {
        self.set(|p| p == Phase::Idle, Phase::Head);
    }

    /// A request's head was parsed; returns its number.
    fn begin_request(&self) -> u64 {
        let mut s = self.state.lock().unwrap();
        s.requests += 1;
        let n = s.requests;
        s.phase = Phase::Busy(n);
        s.since = Instant::now();
        n
    }

    /// Request `n`'s response was sent (or dropped).
    fn end_request(&self, n: u64) {
        self.set(|p| p == Phase::Busy(n), Phase::Idle);
    }

    fn on_write(&self, progressed: bool) {
        let mut s = self.state.lock().unwrap();
        if progressed {
            s.write_stalled = None;
        } else if s.write_stalled.is_none() {
            s.write_stalled = Some(Instant::now());
            drop(s);
            self.changed.notify_one();
        }
    }
}

/// The socket, reporting reads and stalled writes to the clock.
struct Watched {
    inner: TcpStream,
    clock: Arc<Clock>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.clock.on_read();
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.clock.on_write(r.is_ready());
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.clock.on_write(r.is_ready());
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The body read deadline passed.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within {0:?}")]
pub struct BodyTimeout(Duration);

/// A request body that fails with [`BodyTimeout`] once its deadline passes.
pub struct TimedBody {
    inner: Incoming,
    deadline: Pin<Box<tokio::time::Sleep>>,
    limit: Duration,
    fired: Arc<AtomicBool>,
}

impl Body for TimedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        ready!(self.deadline.as_mut().poll(cx));
        self.fired.store(true, Ordering::SeqCst);
        Poll::Ready(Some(Err(BodyTimeout(self.limit).into())))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A whole body in one buffer (simple handlers, the 408 answer).
#[derive(Debug, Default)]
pub struct FullBody(Option<Bytes>);

impl FullBody {
    pub fn new(b: impl Into<Bytes>) -> Self {
        Self(Some(b.into()))
    }
}

impl Body for FullBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.0.take().map(|b| Ok(Frame::data(b))))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.0.as_ref().map_or(0, |b| b.len() as u64))
    }
}

/// The response body: the handler's, or the 408 answer; ends request `n` on the clock when
/// dropped (hyper drops it once it is written).
struct OutBody<B> {
    inner: Result<B, FullBody>,
    clock: Arc<Clock>,
    request: u64,
}

impl<B> Drop for OutBody<B> {
    fn drop(&mut self) {
        self.clock.end_request(self.request);
    }
}

impl<B> Body for OutBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.inner {
            Ok(b) => Pin::new(b)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(Into::into))),
            Err(full) => Pin::new(full).poll_frame(cx).map(|f| f.map(|r| Ok(r?))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Ok(b) => b.is_end_stream(),
            Err(full) => full.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Ok(b) => b.size_hint(),
            Err(full) => full.size_hint(),
        }
    }
}

/// The per-connection service hyper calls: marks the clock, times the body, and answers
/// 408 when the body deadline passed.
struct Svc<S> {
    inner: S,
    clock: Arc<Clock>,
    limits: Limits,
}

impl<S, B> hyper::service::Service<Request<Incoming>> for Svc<S>
where
    S: tower::Service<Request<TimedBody>, Response = Response<B>> + HttpService<B>,
    B: ResponseBody,
{
    type Response = Response<OutBody<B>>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let request = self.clock.begin_request();
        let fired = Arc::new(AtomicBool::new(false));
        let limit = self.limits.body_read_timeout;
        let req = req.map(|inner| TimedBody {
            inner,
            deadline: Box::pin(tokio::time::sleep(limit)),
            limit,
            fired: fired.clone(),
        });
        let (inner, clock) = (self.inner.clone(), self.clock.clone());
        Box::pin(async move {
            let resp = inner.oneshot(req).await?;
            let (mut parts, body) = resp.into_parts();
            let body = if fired.load(Ordering::SeqCst) {
                let secs = limit.as_secs_f64();
                let json = format!(
                    r#"{{"error":"request_timeout","detail":"the request body did not arrive within {secs} s"}}"#
                );
                let mut timeout = Response::new(());
                *timeout.status_mut() = StatusCode::REQUEST_TIMEOUT;
                let h = timeout.headers_mut();
                h.insert(
                    http::header::CONTENT_TYPE,
                    "application/json".parse().unwrap(),
                );
                h.insert(http::header::CONNECTION, "close".parse().unwrap());
                parts = timeout.into_parts().0;
                Err(FullBody::new(json))
            } else {
                Ok(body)
            };
            Ok(Response::from_parts(
                parts,
                OutBody {
                    inner: body,
                    clock,
                    request,
                },
            ))
        })
    }
}

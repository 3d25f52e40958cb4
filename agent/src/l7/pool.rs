//! HTTP connections from one pod to service endpoints, reused across requests: HTTP/1.1
//! connections wait idle between requests (one request at a time each), one HTTP/2 connection
//! per endpoint carries every concurrent request. A connection to a meshed endpoint is a
//! stream of the pod's mTLS tunnel; to anything else, plain TCP from inside the pod.
use std::{
    collections::{HashMap, HashSet},
    io,
    net::SocketAddrV4,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use anyhow::{anyhow, Result};
use bytes::Bytes;
use http::{Request, Response, Version};
use hyper::{
    body::{Body, Frame, Incoming, SizeHint},
    client::conn::{http1, http2},
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tracing::debug;

use super::{body::UpstreamBody, deliver::UNDELIVERED};
use crate::{
    lock,
    proxy::{open_upstream, PodProxy, ProxyContext, Upstream},
    stats::Transport,
    tunnel::TunnelIo,
};

/// Idle HTTP/1.1 connections kept per endpoint; more are closed once their request is done.
const MAX_IDLE_PER_ENDPOINT: usize = 64;
/// What a tunnel stream to an endpoint carries (see `tunnel::APP_PROTOCOL`).
pub const HTTP1: &str = "http/1.1";
pub const HTTP2: &str = "h2";

/// How a request failed before a response arrived, as retries need to know it.
pub enum SendError {
    /// No connection could be made: the request never reached the endpoint.
    Connect(anyhow::Error),
    /// The connection failed after the request may have been sent.
    Reset(hyper::Error),
}

/// Either kind of connection to an endpoint.
pub enum UpstreamIo {
    Tcp(TcpStream),
    Tunnel(TunnelIo),
}

#[derive(Default)]
pub struct ConnectionPool {
    idle_http1: Mutex<HashMap<SocketAddrV4, Vec<IdleHttp1>>>,
    http2: Mutex<HashMap<SocketAddrV4, Http2Slot>>,
}

/// An HTTP/1.1 connection waiting for its next request, and how it reaches its endpoint.
type IdleHttp1 = (http1::SendRequest<UpstreamBody>, Transport);

type Http2Slot = Arc<tokio::sync::Mutex<Http2Connection>>;

/// The one HTTP/2 connection to an endpoint, or how its last dial failed.
#[derive(Default)]
struct Http2Connection {
    connection: Option<(http2::SendRequest<UpstreamBody>, Transport)>,
    failure: Option<(Instant, String)>,
}

/// How long a failed HTTP/2 dial answers for the requests queued behind it.
const DIAL_FAILURE_MEMORY: Duration = Duration::from_secs(1);
/// Idle probes of plain TCP connections to endpoints; a peer silent for three is dead.
const TCP_KEEPALIVE: Duration = Duration::from_secs(10);

impl ConnectionPool {
    /// Sends `request` to `endpoint` in the HTTP version of the request; the response body
    /// returns its HTTP/1.1 connection to the pool once read to the end.
    pub async fn send(
        self: &Arc<Self>,
        ctx: &ProxyContext,
        pod: &PodProxy,
        endpoint: SocketAddrV4,
        mut request: Request<UpstreamBody>,
    ) -> Result<(Response<PooledBody>, Transport), SendError> {
        if request.version() == Version::HTTP_2 {
            let (mut sender, transport) = self.http2_sender(ctx, pod, endpoint).await?;
            let response = sender.send_request(request).await.map_err(classify)?;
            undelivered(&response)?;
            return Ok((
                response.map(|inner| PooledBody {
                    inner,
                    release: None,
                }),
                transport,
            ));
        }
        *request.version_mut() = Version::HTTP_11;
        let (mut sender, transport) = self.http1_sender(ctx, pod, endpoint).await?;
        let response = sender.send_request(request).await.map_err(classify)?;
        undelivered(&response)?;
        let release = Some(Release {
            pool: Arc::clone(self),
            endpoint,
            sender,
            transport,
        });
        let mut response = response.map(|inner| PooledBody { inner, release });
        // A bodiless response (HEAD, 204, 304) is never polled to its end.
        if response.body().inner.is_end_stream() {
            response.body_mut().release();
        }
        Ok((response, transport))
    }

    /// Closes the pooled connections to endpoints not in `keep` (endpoints no service has any
    /// more); requests in flight on them finish first.
    pub fn retain(&self, keep: &HashSet<SocketAddrV4>) {
        lock(&self.idle_http1).retain(|endpoint, _| keep.contains(endpoint));
        lock(&self.http2).retain(|endpoint, _| keep.contains(endpoint));
    }

    /// Sends a request that asks to switch protocols on a connection of its own, opaque to the
    /// destination agent, so the switched conversation flows through it untouched.
    pub async fn send_upgrade(
        &self,
        ctx: &ProxyContext,
        pod: &PodProxy,
        endpoint: SocketAddrV4,
        mut request: Request<UpstreamBody>,
    ) -> Result<Response<PooledBody>, SendError> {
        *request.version_mut() = Version::HTTP_11;
        let (io, _) = connect(ctx, pod, endpoint, None).await?;
        let mut sender = http1_connection(io, endpoint).await?;
        let response = sender.send_request(request).await.map_err(classify)?;
        Ok(response.map(|inner| PooledBody {
            inner,
            release: None,
        }))
    }

    /// A ready HTTP/1.1 connection: an idle one that is still open, else a new one. An idle
    /// connection that turns out closed costs nothing but the next try: no request was sent.
    async fn http1_sender(
        &self,
        ctx: &ProxyContext,
        pod: &PodProxy,
        endpoint: SocketAddrV4,
    ) -> Result<IdleHttp1, SendError> {
        while let Some((mut sender, transport)) = self.idle_http1(endpoint) {
            if sender.ready().await.is_ok() {
                return Ok((sender, transport));
            }
        }
        let (io, transport) = connect(ctx, pod, endpoint, Some(HTTP1)).await?;
        let mut sender = http1_connection(io, endpoint).await?;
        sender
            .ready()
            .await
            .map_err(|err| SendError::Connect(err.into()))?;
        Ok((sender, transport))
    }

    fn idle_http1(
        &self,
        endpoint: SocketAddrV4,
    ) -> Option<(http1::SendRequest<UpstreamBody>, Transport)> {
        let mut idle = lock(&self.idle_http1);
        let senders = idle.get_mut(&endpoint)?;
        while let Some((sender, transport)) = senders.pop() {
            if !sender.is_closed() {
                return Some((sender, transport));
            }
        }
        None
    }

    async fn http2_sender(
        &self,
        ctx: &ProxyContext,
        pod: &PodProxy,
        endpoint: SocketAddrV4,
    ) -> Result<(http2::SendRequest<UpstreamBody>, Transport), SendError> {
        let slot = Arc::clone(lock(&self.http2).entry(endpoint).or_default());
        // Concurrent first requests wait for one dial instead of each opening a connection.
        let mut slot = slot.lock().await;
        if let Some((sender, transport)) = slot.connection.as_ref().filter(|(s, _)| !s.is_closed())
        {
            return Ok((sender.clone(), *transport));
        }
        // The requests that queued behind a failed dial fail with it rather than each waiting
        // for a dial of its own.
        if let Some((at, error)) = &slot.failure {
            if at.elapsed() < DIAL_FAILURE_MEMORY {
                return Err(SendError::Connect(anyhow!("{error}")));
            }
        }
        let dialed = async {
            let (io, transport) = connect(ctx, pod, endpoint, Some(HTTP2)).await?;
            let (sender, connection) = http2::handshake(TokioExecutor::new(), TokioIo::new(io))
                .await
                .map_err(|err| SendError::Connect(err.into()))?;
            Ok((sender, connection, transport))
        };
        let (sender, connection, transport) = match dialed.await {
            Ok(dialed) => dialed,
            Err(SendError::Connect(err)) => {
                slot.failure = Some((Instant::now(), format!("{err:#}")));
                return Err(SendError::Connect(err));
            }
            Err(err) => return Err(err),
        };
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                debug!(%endpoint, error = %err, "upstream HTTP/2 connection ended");
            }
        });
        slot.connection = Some((sender.clone(), transport));
        slot.failure = None;
        Ok((sender, transport))
    }
}

/// An HTTP/1.1 client connection over `io`, driven by a task of its own.
async fn http1_connection(
    io: UpstreamIo,
    endpoint: SocketAddrV4,
) -> Result<http1::SendRequest<UpstreamBody>, SendError> {
    let (sender, connection) = http1::handshake(TokioIo::new(io))
        .await
        .map_err(|err| SendError::Connect(err.into()))?;
    tokio::spawn(async move {
        if let Err(err) = connection.with_upgrades().await {
            debug!(%endpoint, error = %err, "upstream HTTP/1.1 connection ended");
        }
    });
    Ok(sender)
}

/// The destination agent could not hand the request to the app (see [`UNDELIVERED`]): for
/// retries and the balancer, a failed connect.
fn undelivered(response: &Response<Incoming>) -> Result<(), SendError> {
    if response.headers().contains_key(UNDELIVERED) {
        return Err(SendError::Connect(anyhow!(
            "the destination's connection to the app had closed"
        )));
    }
    Ok(())
}

/// A hyper error before any response: cancelled requests were never written, so they count as
/// connect failures (safe to retry whatever the method).
fn classify(err: hyper::Error) -> SendError {
    if err.is_canceled() {
        SendError::Connect(err.into())
    } else {
        SendError::Reset(err)
    }
}

/// A connection to `endpoint` as `pod` (see [`open_upstream`]).
async fn connect(
    ctx: &ProxyContext,
    pod: &PodProxy,
    endpoint: SocketAddrV4,
    app_protocol: Option<&'static str>,
) -> Result<(UpstreamIo, Transport), SendError> {
    let (upstream, transport) = open_upstream(ctx, pod, endpoint, app_protocol)
        .await
        .map_err(|err| SendError::Connect(anyhow!("connecting to {endpoint}: {err}")))?;
    let io = match upstream {
        Upstream::Tunnel(stream) => UpstreamIo::Tunnel(stream.into_io()),
        Upstream::Tcp(stream) => {
            let _ = stream.set_nodelay(true);
            // A pooled connection to a vanished endpoint must fail in seconds, not after the
            // kernel's ~15 minutes of retransmissions (tunnel connections do this themselves).
            let socket = socket2::SockRef::from(&stream);
            let _ = socket.set_tcp_keepalive(
                &socket2::TcpKeepalive::new()
                    .with_time(TCP_KEEPALIVE)
                    .with_interval(TCP_KEEPALIVE)
                    .with_retries(3),
            );
            let _ = socket.set_tcp_user_timeout(Some(TCP_KEEPALIVE * 3));
            UpstreamIo::Tcp(stream)
        }
    };
    Ok((io, transport))
}

/// Gives an HTTP/1.1 connection back to the pool when its response has been read.
struct Release {
    pool: Arc<ConnectionPool>,
    endpoint: SocketAddrV4,
    sender: http1::SendRequest<UpstreamBody>,
    transport: Transport,
}

/// An endpoint's response body; see [`ConnectionPool::send`].
pub struct PooledBody {
    inner: Incoming,
    release: Option<Release>,
}

impl PooledBody {
    fn release(&mut self) {
        let Some(release) = self.release.take() else {
            return;
        };
        if release.sender.is_closed() {
            return;
        }
        let mut idle = lock(&release.pool.idle_http1);
        let senders = idle.entry(release.endpoint).or_default();
        if senders.len() < MAX_IDLE_PER_ENDPOINT {
            senders.push((release.sender, release.transport));
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let poll = Pin::new(&mut self.inner).poll_frame(cx);
        match &poll {
            Poll::Ready(None) => self.release(),
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.release(),
            _ => {}
        }
        poll
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl AsyncRead for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tunnel(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tunnel(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_flush(cx),
            Self::Tunnel(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tunnel(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retain_forgets_endpoints_no_service_has() {
        let pool = ConnectionPool::default();
        let (kept, gone): (SocketAddrV4, SocketAddrV4) = (
            "10.0.0.1:80".parse().unwrap(),
            "10.0.0.2:80".parse().unwrap(),
        );
        for endpoint in [kept, gone] {
            lock(&pool.http2).entry(endpoint).or_default();
            lock(&pool.idle_http1).entry(endpoint).or_default();
        }
        pool.retain(&HashSet::from([kept]));
        assert_eq!(lock(&pool.http2).keys().collect::<Vec<_>>(), [&kept]);
        assert_eq!(lock(&pool.idle_http1).keys().collect::<Vec<_>>(), [&kept]);
    }
}

//! The client side of the tunnels between node agents (the scheme of Istio's HBONE): mutual TLS
//! 1.3 to port 15008 of the destination pod, carrying HTTP/2, one CONNECT stream per proxied TCP
//! connection, `:authority` = the original destination.
//!
//! Connections are pooled per (source identity, destination node, destination identity): TLS
//! proves one server identity per connection, so workloads with different identities on one node
//! need a connection each; all pods of one identity share theirs. A pooled connection is not
//! reused once the client certificate it was opened with has been renewed: new streams then open
//! a fresh connection with the new certificate while old streams finish on the old one.
use std::{
    collections::HashMap,
    future::poll_fn,
    io,
    net::{Ipv4Addr, SocketAddrV4},
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering::Relaxed},
        Arc, Mutex,
    },
    task::{ready, Poll},
    time::Duration,
};

use anyhow::{anyhow, Context, Result};
use bytes::{BufMut, Bytes, BytesMut};
use h2::{client::SendRequest, Reason, RecvStream, SendStream};
use http::{header::HeaderValue, Method, Request, StatusCode};
use rustls::pki_types::ServerName;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter, ReadBuf},
    net::{
        tcp::{ReadHalf, WriteHalf},
        TcpSocket, TcpStream,
    },
};
use tokio_rustls::TlsConnector;
use tracing::{debug, info};

use crate::{
    identity::{CertificateStore, Identity, WorkloadCertificate},
    lock,
    proxy::connect_within,
    state::Workload,
    stats::{ByteMeter, Stats},
};

/// The header carrying the client pod's address, so the destination can deliver with it as source.
pub const FORWARDED: &str = "forwarded";
/// The header of a stream that carries HTTP (`http/1.1` or `h2`) rather than opaque bytes: the
/// destination agent then serves it request by request.
pub const APP_PROTOCOL: &str = "x-weft-app-protocol";
/// HTTP/2 windows large enough for bulk transfers over one stream.
pub const STREAM_WINDOW_BYTES: u32 = 4 * 1024 * 1024;
pub const CONNECTION_WINDOW_BYTES: u32 = 16 * 1024 * 1024;
/// The largest DATA frame either agent accepts: a whole read from the TCP side goes out as one
/// frame, in one write to TLS.
pub const MAX_FRAME_BYTES: u32 = 64 * 1024;
/// Tunnel requests and responses carry a few short headers; anything larger is not ours.
pub const MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;
/// Bytes read from a tunnel's TCP connection per system call. rustls reads at most 4 KiB at a
/// time, so without this a full TLS record takes several reads.
pub const TLS_READ_BUFFER_BYTES: usize = 64 * 1024;
/// HTTP/2 frames smaller than this are gathered until h2 flushes, then go out in one TLS write:
/// fewer TLS records and system calls when several streams or frames are ready at once.
pub const TLS_WRITE_BUFFER_BYTES: usize = 16 * 1024;
/// The most read from a proxied TCP connection at once: with the 9-byte frame header, a full
/// read fills four TLS records of 16 KiB exactly, so no runt records are sent.
const READ_CHUNK_BYTES: usize = 64 * 1024 - 9;
/// A read buffer with less room than this is replaced rather than reused for the next read.
const MIN_READ_ROOM_BYTES: usize = 16 * 1024;

/// Idle probe interval of tunnel connections; a peer silent for three of them is dead.
const TUNNEL_KEEPALIVE: Duration = Duration::from_secs(10);

#[derive(Clone, PartialEq, Eq, Hash)]
struct PoolKey {
    source: Identity,
    node: String,
    destination: Identity,
}

struct PooledConnection {
    sender: SendRequest<Bytes>,
    /// Set when the connection's task has ended: no stream can open on it any more.
    closed: Arc<AtomicBool>,
    /// The client certificate the connection was opened with.
    certificate: Arc<WorkloadCertificate>,
}

type Slot = Arc<tokio::sync::Mutex<Option<PooledConnection>>>;

pub struct TunnelPool {
    certs: Arc<CertificateStore>,
    stats: Arc<Stats>,
    tunnel_port: u16,
    socket_mark: u32,
    connect_timeout: Duration,
    slots: Mutex<HashMap<PoolKey, Slot>>,
}

impl TunnelPool {
    pub fn new(
        certs: Arc<CertificateStore>,
        stats: Arc<Stats>,
        tunnel_port: u16,
        socket_mark: u32,
        connect_timeout: Duration,
    ) -> Self {
        Self {
            certs,
            stats,
            tunnel_port,
            socket_mark,
            connect_timeout,
            slots: Mutex::new(HashMap::new()),
        }
    }

    /// Pooled tunnel connections that are open.
    pub fn open_connections(&self) -> usize {
        lock(&self.slots)
            .values()
            .filter(|slot| {
                // A slot being filled or used right now is counted as open.
                slot.try_lock().map_or(true, |held| {
                    held.as_ref().is_some_and(|c| !c.closed.load(Relaxed))
                })
            })
            .count()
    }

    /// Closes the pooled connections of source identities no longer on this node (their open
    /// streams finish first).
    pub fn retain_sources(&self, keep: &std::collections::HashSet<Identity>) {
        lock(&self.slots).retain(|key, _| keep.contains(&key.source));
    }

    /// Opens a stream from `source` (a pod at `client_ip`) to `target` on `destination`,
    /// carrying `app_protocol` (see [`APP_PROTOCOL`]) or, without it, opaque bytes. A pooled
    /// connection the destination agent is closing (GOAWAY, say while it hands over to a new
    /// agent) refuses new streams; the stream is then opened once more on a fresh connection.
    /// A destination agent that does not serve the target yet is asked again for a moment: a
    /// workload that just joined reaches the agents of its nodes a few milliseconds apart. Both
    /// are safe, as nothing reached the app yet.
    pub async fn open_stream(
        &self,
        source: &Identity,
        client_ip: Ipv4Addr,
        destination: &Workload,
        target: SocketAddrV4,
        app_protocol: Option<&'static str>,
    ) -> Result<TunnelStream> {
        let deadline = tokio::time::Instant::now() + REFUSED_RETRY_PERIOD;
        let mut reopened = false;
        loop {
            let (sender, closed) = self.sender(source, destination).await?;
            match open_on(sender, client_ip, target, app_protocol).await {
                Err(StreamError::Refused(err)) if !reopened => {
                    debug!(error = format!("{err:#}"), destination = %destination.identity, "pooled tunnel connection refused the stream; opening it on a new one");
                    closed.store(true, Relaxed);
                    reopened = true;
                }
                Err(StreamError::NotServed(err)) if tokio::time::Instant::now() < deadline => {
                    debug!(error = format!("{err:#}"), destination = %destination.identity, %target, "the destination agent does not serve the target yet; asking again");
                    tokio::time::sleep(REFUSED_RETRY_INTERVAL).await;
                }
                opened => return opened.map_err(StreamError::into_error),
            }
        }
    }

    /// A sender on a live pooled connection whose client certificate is current, dialling one
    /// if needed. Concurrent callers for the same key wait for a single dial.
    async fn sender(
        &self,
        source: &Identity,
        destination: &Workload,
    ) -> Result<(SendRequest<Bytes>, Arc<AtomicBool>)> {
        let key = PoolKey {
            source: source.clone(),
            node: destination.node.clone(),
            destination: destination.identity.clone(),
        };
        let slot = Arc::clone(lock(&self.slots).entry(key).or_default());
        let mut slot = slot.lock().await;
        let current = self.certs.certificate(source)?;
        if let Some(pooled) = slot.as_ref() {
            if !pooled.closed.load(Relaxed) && Arc::ptr_eq(&pooled.certificate, &current) {
                return Ok((pooled.sender.clone(), Arc::clone(&pooled.closed)));
            }
        }
        let pooled = self.dial(source, destination).await?;
        let opened = (pooled.sender.clone(), Arc::clone(&pooled.closed));
        *slot = Some(pooled);
        Ok(opened)
    }

    async fn dial(&self, source: &Identity, destination: &Workload) -> Result<PooledConnection> {
        let address = SocketAddrV4::new(destination.ip, self.tunnel_port);
        let (tls_config, certificate) = self.certs.client_config(source, &destination.identity)?;
        let tcp = self.connect_tunnel_port(address).await?;
        let tls = tokio::time::timeout(
            self.connect_timeout,
            TlsConnector::from(tls_config).connect(
                ServerName::IpAddress(destination.ip.into()),
                BufReader::with_capacity(TLS_READ_BUFFER_BYTES, tcp),
            ),
        )
        .await
        .map_err(|_| anyhow!("TLS handshake with {address} timed out"))?
        .with_context(|| {
            format!(
                "TLS handshake with {address} (expecting {})",
                destination.identity
            )
        })?;
        self.stats.tunnels.client_handshakes.fetch_add(1, Relaxed);
        let (sender, connection) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW_BYTES)
            .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
            .max_frame_size(MAX_FRAME_BYTES)
            .max_header_list_size(MAX_HEADER_LIST_BYTES)
            .handshake(BufWriter::with_capacity(TLS_WRITE_BUFFER_BYTES, tls))
            .await
            .with_context(|| format!("HTTP/2 handshake with {address}"))?;
        info!(%source, destination = %destination.identity, node = %destination.node, %address, "tunnel connection opened");
        let stats = Arc::clone(&self.stats);
        let closed = Arc::new(AtomicBool::new(false));
        let ended = Arc::clone(&closed);
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                stats.tunnels.connection_errors.fetch_add(1, Relaxed);
                debug!(%address, error = %err, "tunnel connection ended with an error");
            }
            ended.store(true, Relaxed);
        });
        Ok(PooledConnection {
            sender,
            closed,
            certificate,
        })
    }

    /// Connects to a destination's tunnel port. Refused connects are retried for a moment: a
    /// namespace just enrolled reaches the agents of its nodes a few milliseconds apart, and the
    /// destination's agent may not have opened the tunnel listener yet.
    async fn connect_tunnel_port(&self, address: SocketAddrV4) -> Result<TcpStream> {
        let deadline = tokio::time::Instant::now() + REFUSED_RETRY_PERIOD;
        loop {
            let socket = self.tunnel_socket()?;
            match connect_within(socket, address, self.connect_timeout).await {
                Err(err)
                    if err.kind() == io::ErrorKind::ConnectionRefused
                        && tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(REFUSED_RETRY_INTERVAL).await;
                }
                connected => {
                    return connected
                        .with_context(|| format!("connecting to the tunnel port {address}"))
                }
            }
        }
    }

    fn tunnel_socket(&self) -> Result<TcpSocket> {
        // Opened in the agent's own namespace: the connection is shared by all local pods of
        // `source`; each stream names its pod in the `forwarded` header.
        let socket = TcpSocket::new_v4().context("creating a tunnel socket")?;
        socket2::SockRef::from(&socket)
            .set_mark(self.socket_mark)
            .context("marking a tunnel socket")?;
        socket.set_nodelay(true)?;
        // A pooled connection to a node or pod that vanished must fail in seconds, not after
        // the kernel's ~15 minutes of retransmissions, or new streams would queue on it.
        let socket_ref = socket2::SockRef::from(&socket);
        socket_ref
            .set_tcp_keepalive(
                &socket2::TcpKeepalive::new()
                    .with_time(TUNNEL_KEEPALIVE)
                    .with_interval(TUNNEL_KEEPALIVE)
                    .with_retries(3),
            )
            .context("enabling keepalive on a tunnel socket")?;
        socket_ref
            .set_tcp_user_timeout(Some(TUNNEL_KEEPALIVE * 3))
            .context("setting the tunnel socket's user timeout")?;
        Ok(socket)
    }
}

/// How long refused connects to a tunnel port are retried, and how often.
const REFUSED_RETRY_PERIOD: Duration = Duration::from_secs(1);
const REFUSED_RETRY_INTERVAL: Duration = Duration::from_millis(25);

/// Why a stream did not open.
enum StreamError {
    /// The connection takes no new streams (going away, or the stream was refused before the
    /// destination agent handled it): another connection may.
    Refused(anyhow::Error),
    /// The destination agent has no such workload (404), perhaps not yet.
    NotServed(anyhow::Error),
    Failed(anyhow::Error),
}

impl StreamError {
    fn into_error(self) -> anyhow::Error {
        match self {
            Self::Refused(err) | Self::NotServed(err) | Self::Failed(err) => err,
        }
    }
}

/// The stream never reached the destination agent's handler: safe to open elsewhere.
fn refused(err: &h2::Error) -> bool {
    err.is_go_away() || err.reason() == Some(h2::Reason::REFUSED_STREAM)
}

async fn open_on(
    sender: SendRequest<Bytes>,
    client_ip: Ipv4Addr,
    target: SocketAddrV4,
    app_protocol: Option<&'static str>,
) -> Result<TunnelStream, StreamError> {
    let classify = |err: h2::Error, what: &'static str| {
        let err_refused = refused(&err);
        let err = anyhow::Error::new(err).context(what);
        if err_refused {
            StreamError::Refused(err)
        } else {
            StreamError::Failed(err)
        }
    };
    let mut sender = sender
        .ready()
        .await
        .map_err(|err| classify(err, "the tunnel connection cannot open streams"))?;
    let mut request = Request::builder()
        .method(Method::CONNECT)
        .uri(target.to_string())
        .header(FORWARDED, format!("for={client_ip}"))
        .body(())
        .map_err(|err| {
            StreamError::Failed(anyhow::Error::new(err).context("building the CONNECT request"))
        })?;
    if let Some(protocol) = app_protocol {
        request
            .headers_mut()
            .insert(APP_PROTOCOL, HeaderValue::from_static(protocol));
    }
    let (response, send) = sender
        .send_request(request, false)
        .map_err(|err| classify(err, "sending CONNECT over the tunnel"))?;
    let response = response
        .await
        .map_err(|err| classify(err, "the tunnel stream did not open"))?;
    if response.status() != StatusCode::OK {
        let err = anyhow!(
            "the destination agent refused the stream: {}",
            response.status()
        );
        return Err(match response.status() {
            StatusCode::NOT_FOUND => StreamError::NotServed(err),
            _ => StreamError::Failed(err),
        });
    }
    Ok(TunnelStream {
        send,
        recv: response.into_body(),
    })
}

/// One open CONNECT stream: a proxied TCP connection inside a tunnel connection.
pub struct TunnelStream {
    send: SendStream<Bytes>,
    recv: RecvStream,
}

impl TunnelStream {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        Self { send, recv }
    }

    /// Copies between `tcp` and the stream until both directions have ended, with backpressure
    /// (a TCP read waits for stream capacity; the peer's window reopens only once its data has
    /// been written to `tcp`) and half-close (TCP EOF ends the stream, the stream's end shuts
    /// down `tcp`'s sending side). Counts the bytes read from each side as they flow.
    pub async fn splice(
        &mut self,
        tcp: &mut TcpStream,
        read_from_tcp: ByteMeter<'_>,
        read_from_stream: ByteMeter<'_>,
    ) -> io::Result<(u64, u64)> {
        let (mut tcp_read, mut tcp_write) = tcp.split();
        tokio::try_join!(
            tcp_to_stream(&mut tcp_read, &mut self.send, read_from_tcp),
            stream_to_tcp(&mut self.recv, &mut tcp_write, read_from_stream),
        )
    }

    /// Ends the stream abnormally, so the peer resets its side instead of seeing a clean end.
    pub fn reset(&mut self, reason: Reason) {
        self.send.send_reset(reason);
    }

    /// Queues bytes already read from the client ahead of what the splice relays (h2 holds
    /// them until the peer's window opens).
    pub fn send_prefix(&mut self, prefix: Bytes) -> io::Result<()> {
        if prefix.is_empty() {
            return Ok(());
        }
        self.send.send_data(prefix, false).map_err(h2_error)
    }

    /// The stream as a byte stream, for an HTTP client or server running inside it.
    pub fn into_io(self) -> TunnelIo {
        TunnelIo {
            stream: self,
            unread: Bytes::new(),
        }
    }
}

/// A tunnel stream read and written as bytes. Received data is acknowledged to the peer's flow
/// control as soon as it is read.
pub struct TunnelIo {
    stream: TunnelStream,
    /// The part of the last DATA frame not yet read.
    unread: Bytes,
}

impl AsyncRead for TunnelIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        while self.unread.is_empty() {
            match ready!(self.stream.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    self.stream
                        .recv
                        .flow_control()
                        .release_capacity(data.len())
                        .map_err(h2_error)?;
                    self.unread = data;
                }
                Some(Err(err)) => return Poll::Ready(Err(h2_error(err))),
                None => return Poll::Ready(Ok(())),
            }
        }
        let n = self.unread.len().min(buf.remaining());
        buf.put_slice(&self.unread.split_to(n));
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for TunnelIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let send = &mut self.stream.send;
        if send.capacity() == 0 {
            send.reserve_capacity(buf.len().min(MAX_FRAME_BYTES as usize));
            loop {
                match ready!(send.poll_capacity(cx)) {
                    Some(Ok(0)) => continue,
                    Some(Ok(_)) => break,
                    Some(Err(err)) => return Poll::Ready(Err(h2_error(err))),
                    None => {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::BrokenPipe,
                            "the tunnel stream closed",
                        )))
                    }
                }
            }
        }
        let n = send.capacity().min(buf.len());
        send.send_data(Bytes::copy_from_slice(&buf[..n]), false)
            .map_err(h2_error)?;
        Poll::Ready(Ok(n))
    }

    /// h2's connection task writes queued frames out; nothing is buffered here.
    fn poll_flush(self: Pin<&mut Self>, _: &mut std::task::Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> Poll<io::Result<()>> {
        Poll::Ready(
            self.stream
                .send
                .send_data(Bytes::new(), true)
                .map_err(h2_error),
        )
    }
}

async fn tcp_to_stream(
    tcp: &mut ReadHalf<'_>,
    send: &mut SendStream<Bytes>,
    counter: ByteMeter<'_>,
) -> io::Result<u64> {
    let mut buffer = BytesMut::new();
    let mut total = 0;
    loop {
        // The previous chunk may still be queued in h2: reuse the buffer's room while it lasts.
        if buffer.capacity() < MIN_READ_ROOM_BYTES {
            buffer.reserve(READ_CHUNK_BYTES);
        }
        let mut room = (&mut buffer).limit(READ_CHUNK_BYTES);
        let read = tokio::select! {
            biased;
            read = tcp.read_buf(&mut room) => read?,
            // A reset stream must not wait for the TCP side to speak again.
            reset = poll_fn(|cx| send.poll_reset(cx)) => return Err(reset_error(reset)),
        };
        if read == 0 {
            send.send_data(Bytes::new(), true).map_err(h2_error)?;
            return Ok(total);
        }
        counter.add(read as u64);
        total += read as u64;
        let mut chunk = buffer.split().freeze();
        send.reserve_capacity(chunk.len());
        while !chunk.is_empty() {
            let capacity = send_capacity(send).await?;
            send.send_data(chunk.split_to(capacity.min(chunk.len())), false)
                .map_err(h2_error)?;
        }
    }
}

/// Waits until the stream may send at least one byte (peer windows and h2's send buffer).
async fn send_capacity(send: &mut SendStream<Bytes>) -> io::Result<usize> {
    loop {
        let capacity = send.capacity();
        if capacity > 0 {
            return Ok(capacity);
        }
        match poll_fn(|cx| send.poll_capacity(cx)).await {
            Some(Ok(_)) => {}
            Some(Err(err)) => return Err(h2_error(err)),
            None => {
                return Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "the tunnel stream closed",
                ))
            }
        }
    }
}

async fn stream_to_tcp(
    recv: &mut RecvStream,
    tcp: &mut WriteHalf<'_>,
    counter: ByteMeter<'_>,
) -> io::Result<u64> {
    let mut total = 0;
    while let Some(data) = recv.data().await {
        let data = data.map_err(h2_error)?;
        counter.add(data.len() as u64);
        total += data.len() as u64;
        tcp.write_all(&data).await?;
        recv.flow_control()
            .release_capacity(data.len())
            .map_err(h2_error)?;
    }
    tcp.shutdown().await?;
    Ok(total)
}

fn reset_error(reset: Result<Reason, h2::Error>) -> io::Error {
    match reset {
        Ok(reason) => io::Error::new(
            io::ErrorKind::ConnectionReset,
            format!("the tunnel stream was reset: {reason}"),
        ),
        Err(err) => h2_error(err),
    }
}

fn h2_error(err: h2::Error) -> io::Error {
    if err.is_io() {
        err.into_io()
            .unwrap_or_else(|| io::Error::other("tunnel connection I/O error"))
    } else {
        io::Error::other(err)
    }
}

//! The outbound proxy: accepts redirected connections on a pod's listener, recovers where they
//! were going, and sends them on: through an mTLS tunnel when the destination is a meshed
//! workload, else as plain TCP from inside the pod.
use std::{
    collections::HashMap,
    fmt,
    future::Future,
    io,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    pin::Pin,
    sync::{atomic::Ordering::Relaxed, Arc, RwLock},
    task::{Context, Poll},
    time::{Duration, Instant, SystemTime},
};

use bytes::Bytes;
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::{TcpListener, TcpSocket, TcpStream},
    sync::Semaphore,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, info, warn};

use crate::{
    access_log::{AccessEntry, AccessLog, Party},
    config::PodId,
    datapath::Datapath,
    identity::Identity,
    l7::{pool::ConnectionPool, trace::ExhaustedTraces},
    netns::PodNetns,
    state::{MeshState, SharedState, Workload},
    stats::{ByteMeter, ConnectionBytes, Flow, FlowKey, Peer, Reporter, Stats, Transport},
    tunnel::{TunnelPool, TunnelStream},
};

const COPY_BUFFER_BYTES: usize = 64 * 1024;

/// Released pods by IP: the pod and the workload it was.
pub type LeavingPods = HashMap<Ipv4Addr, (Arc<PodProxy>, Arc<Workload>)>;

/// What every connection handler needs, shared by all pods.
pub struct ProxyContext {
    pub datapath: Arc<Datapath>,
    pub stats: Arc<Stats>,
    pub state: SharedState,
    /// Present when workload identities are configured.
    pub tunnels: Option<TunnelPool>,
    pub socket_mark: u32,
    pub delivery_mark: u32,
    pub tunnel_port: u16,
    pub connect_timeout: Duration,
    /// Incoming tunnel connections without a stream for this long are closed.
    pub tunnel_idle_timeout: Duration,
    /// Tunnel TLS handshakes in progress as a server: bounded, so a flood of connections that
    /// never finish their hello cannot take the agent's memory and CPU.
    pub handshakes: Semaphore,
    /// How long a service connection may stay silent before it is taken for opaque TCP.
    pub protocol_detection_timeout: Duration,
    /// Service ports never inspected for HTTP.
    pub opaque_ports: Vec<u16>,
    /// Request bodies up to this size are held for retries and mirrors.
    pub retry_body_limit: usize,
    /// STRICT pods accept plaintext from the node's own addresses (the kubelet's probes).
    pub strict_allows_node: bool,
    /// Traces whose requests this agent gave up retrying.
    pub exhausted: ExhaustedTraces,
    /// One line per connection and request.
    pub access_log: AccessLog,
    /// Enrolled pods by IP, for delivering inbound streams.
    pub local_pods: RwLock<HashMap<Ipv4Addr, Arc<PodProxy>>>,
    /// Pods released moments ago, by IP, with the workload they were: connections steered to
    /// them before the release may still sit in their listeners' queues, and are served as
    /// they would have been a moment earlier instead of being reset.
    pub leaving: RwLock<LeavingPods>,
    /// Tracks open connections so shutdown can drain them.
    pub connections: TaskTracker,
    /// Cancelled when the agent starts draining: HTTP connections are asked to finish.
    pub draining: CancellationToken,
    /// Cancelled when the drain period is over: open connections are then reset.
    pub abort: CancellationToken,
}

impl ProxyContext {
    /// The pod at `ip` inbound connections are delivered to, enrolled or leaving.
    pub fn local_pod(&self, ip: &Ipv4Addr) -> Option<Arc<PodProxy>> {
        if let Some(pod) = crate::read(&self.local_pods).get(ip) {
            return Some(Arc::clone(pod));
        }
        crate::read(&self.leaving)
            .get(ip)
            .map(|(pod, _)| Arc::clone(pod))
    }

    /// The meshed workload at `ip` on this node in `state`, or the one that just left it.
    pub fn arriving_workload(&self, state: &MeshState, ip: Ipv4Addr) -> Option<Arc<Workload>> {
        if let Some(workload) = state.local_workload(ip) {
            return Some(Arc::clone(workload));
        }
        crate::read(&self.leaving)
            .get(&ip)
            .map(|(_, workload)| Arc::clone(workload))
    }
}

pub struct PodProxy {
    pub id: PodId,
    /// How metrics and logs name the pod as a client.
    pub peer: Peer,
    pub ip: Ipv4Addr,
    pub netns: PodNetns,
    /// The pod's workload identity, when identities are configured.
    pub identity: Option<Identity>,
    /// Inbound deliveries may use the client's address as source (see `inbound::deliver`).
    pub transparent_delivery: bool,
    /// The pod's HTTP connections to service endpoints.
    pub http: Arc<ConnectionPool>,
}

/// Accepts on one of a pod's listeners until `stop` is cancelled, serving each connection with
/// `serve` in a task the drain tracks. Open connections are not affected by `stop`.
pub async fn accept_until_stopped<F, Fut>(
    listener: TcpListener,
    pod: Arc<PodProxy>,
    ctx: Arc<ProxyContext>,
    stop: CancellationToken,
    kind: &'static str,
    serve: F,
) where
    F: Fn(Arc<ProxyContext>, Arc<PodProxy>, TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                let task = serve(Arc::clone(&ctx), Arc::clone(&pod), stream, peer);
                ctx.connections.spawn(task);
            }
            Err(err) => {
                // Usually fd exhaustion: back off instead of spinning, keep serving.
                warn!(pod = %pod.id, listener = kind, error = %err, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    debug!(pod = %pod.id, listener = kind, "listener closed");
}

/// Serves a connection accepted on a pod's outbound listener.
pub async fn serve_outbound(
    ctx: Arc<ProxyContext>,
    pod: Arc<PodProxy>,
    client: TcpStream,
    peer: SocketAddr,
) {
    let SocketAddr::V4(peer) = peer else {
        warn!(pod = %pod.id, %peer, "unexpected IPv6 client on the IPv4 outbound listener");
        return;
    };
    let Some(destination) = ctx.datapath.original_destination(pod.netns.cookie(), peer) else {
        ctx.stats.unknown_origin.fetch_add(1, Relaxed);
        warn!(pod = %pod.id, client = %peer, "connection was not redirected by weft (no original destination); resetting");
        let _ = client.set_zero_linger();
        return;
    };
    let service = ctx.state.get().services.at(destination).cloned();
    if let Some(entry) = service {
        crate::l7::serve_service(ctx, pod, client, destination, entry).await;
        return;
    }
    let _ = client.set_nodelay(true);
    match open_upstream(&ctx, &pod, destination, None).await {
        Ok((upstream, transport)) => {
            let to = Destination {
                address: destination,
                transport,
                service: None,
            };
            relay(&ctx, &pod, client, &to, upstream, Bytes::new()).await;
        }
        Err(err) => {
            let to = Destination {
                address: destination,
                transport: err.transport,
                service: None,
            };
            refuse(&ctx, &pod, &to, &client, err.reason);
        }
    }
}

/// A connection from a pod towards a destination, before any byte is relayed.
pub enum Upstream {
    Tunnel(TunnelStream),
    Tcp(TcpStream),
}

/// An upstream that could not be opened, and the way it would have left (for the counters).
pub struct OpenError {
    pub transport: Transport,
    pub reason: String,
}

impl fmt::Display for OpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason)
    }
}

/// Opens the way from `pod` to `destination`: through a tunnel when the destination is a meshed
/// workload and the pod has an identity, else as plain TCP from inside the pod; bounded by the
/// connect timeout. A tunnel stream carries `app_protocol` (see `tunnel::APP_PROTOCOL`).
pub async fn open_upstream(
    ctx: &ProxyContext,
    pod: &PodProxy,
    destination: SocketAddrV4,
    app_protocol: Option<&'static str>,
) -> Result<(Upstream, Transport), OpenError> {
    let state = ctx.state.get();
    let meshed = ctx
        .tunnels
        .as_ref()
        .zip(pod.identity.as_ref())
        .zip(state.workload(*destination.ip()));
    if let Some(((tunnels, source), workload)) = meshed {
        // Bounded: a stream that never opens (an unresponsive peer agent) fails like a connect.
        return tokio::time::timeout(
            ctx.connect_timeout,
            tunnels.open_stream(source, pod.ip, workload, destination, app_protocol),
        )
        .await
        .unwrap_or_else(|_| Err(anyhow::anyhow!("the tunnel stream did not open in time")))
        .map(|stream| (Upstream::Tunnel(stream), Transport::Mtls))
        .map_err(|err| OpenError {
            transport: Transport::Mtls,
            reason: format!("{err:#}"),
        });
    }
    connect_upstream(ctx, pod, destination)
        .await
        .map(|stream| (Upstream::Tcp(stream), Transport::Plaintext))
        .map_err(|err| OpenError {
            transport: Transport::Plaintext,
            reason: err.to_string(),
        })
}

/// Where an outbound connection went: the address (an endpoint, for a service), how, and the
/// service (`name.namespace.svc.cluster.local`) the pod asked for, if any.
pub struct Destination<'a> {
    pub address: SocketAddrV4,
    pub transport: Transport,
    pub service: Option<&'a Arc<str>>,
}

/// The counters of connections from `pod` to `to`.
pub fn outbound_flow(ctx: &ProxyContext, pod: &PodProxy, to: &Destination) -> Arc<Flow> {
    let key = FlowKey {
        pod: pod.id.clone(),
        destination: to.address,
        transport: to.transport,
        service: to.service.cloned(),
    };
    ctx.stats.flow(&key, || {
        let state = ctx.state.get();
        let destination = state.peer_at(*to.address.ip());
        let service = to
            .service
            .or_else(|| state.services.serving(to.address))
            .cloned();
        (pod.peer.clone(), destination, service)
    })
}

/// How a connection from `pod` to the workload at `ip` travels: through a tunnel when both are
/// in the mesh.
pub fn transport_to(ctx: &ProxyContext, pod: &PodProxy, ip: Ipv4Addr) -> Transport {
    let meshed =
        ctx.tunnels.is_some() && pod.identity.is_some() && ctx.state.get().workload(ip).is_some();
    if meshed {
        Transport::Mtls
    } else {
        Transport::Plaintext
    }
}

/// Relays between `client` and an opened upstream until both sides are done, first sending
/// `prefix` (bytes already read from the client), counting it all under (pod, destination).
pub async fn relay(
    ctx: &ProxyContext,
    pod: &PodProxy,
    mut client: TcpStream,
    to: &Destination<'_>,
    upstream: Upstream,
    prefix: Bytes,
) {
    let destination = to.address;
    let flow = outbound_flow(ctx, pod, to);
    let started = (Instant::now(), SystemTime::now());
    flow.opened.fetch_add(1, Relaxed);
    let bytes = ConnectionBytes::default();
    let (from_client, from_upstream) = flow.meters(&bytes);
    from_client.add(prefix.len() as u64);
    let result = match upstream {
        Upstream::Tunnel(mut stream) => match stream.send_prefix(prefix) {
            Ok(()) => {
                splice_metered(ctx, &mut client, &mut stream, from_client, from_upstream).await
            }
            Err(err) => Err(err),
        },
        Upstream::Tcp(mut upstream) => {
            let result = match upstream.write_all(&prefix).await {
                Ok(()) => {
                    copy_metered(ctx, &mut client, &mut upstream, from_client, from_upstream).await
                }
                Err(err) => Err(err),
            };
            if result.is_err() {
                let _ = upstream.set_zero_linger();
            }
            result
        }
    };
    finish(pod, destination, &flow, &client, result);
    if ctx.access_log.wants(false) {
        let mut entry = connection_entry(pod, &client, &flow, destination, started);
        (entry.bytes_received, entry.bytes_sent) = bytes.get();
        ctx.access_log.log(entry);
    }
}

/// The access-log line of an outbound connection from `pod` through `flow`.
fn connection_entry(
    pod: &PodProxy,
    client: &TcpStream,
    flow: &Flow,
    destination: SocketAddrV4,
    (started, start_time): (Instant, SystemTime),
) -> AccessEntry {
    let mut entry = AccessEntry::connection(
        Reporter::Source,
        // The accepted socket's peer is the pod's redirected connect on loopback; the pod's own
        // address with that port is what the connection looks like on the network.
        Party::of(
            &pod.peer,
            client
                .peer_addr()
                .ok()
                .map(|peer| SocketAddr::new(pod.ip.into(), peer.port())),
        ),
        Party::of(&flow.destination, Some(SocketAddr::V4(destination))),
        flow.transport,
        start_time,
        started.elapsed(),
    );
    entry.destination_service = flow.service.clone();
    entry
}

/// Records how a relayed connection ended. When it ended with an error, the client is reset
/// (the caller has reset the other side), so an abort is not passed on as a clean end.
fn finish(
    pod: &PodProxy,
    destination: SocketAddrV4,
    flow: &Flow,
    client: &TcpStream,
    result: io::Result<(u64, u64)>,
) {
    flow.closed.fetch_add(1, Relaxed);
    match result {
        Ok((sent, received)) => {
            debug!(pod = %pod.id, %destination, sent, received, "connection closed");
        }
        Err(err) => {
            info!(pod = %pod.id, %destination, error = %err, "connection ended with an error");
            let _ = client.set_zero_linger();
        }
    }
}

/// The destination could not be reached: a reset tells the client, as a direct connect would.
pub fn refuse(
    ctx: &ProxyContext,
    pod: &PodProxy,
    to: &Destination,
    client: &TcpStream,
    error: String,
) {
    let started = (Instant::now(), SystemTime::now());
    let flow = outbound_flow(ctx, pod, to);
    flow.failed.fetch_add(1, Relaxed);
    warn!(pod = %pod.id, destination = %to.address, error, "upstream connect failed");
    if ctx.access_log.wants(false) {
        let mut entry = connection_entry(pod, client, &flow, to.address, started);
        entry.response_flags = "UF";
        ctx.access_log.log(entry);
    }
    let _ = client.set_zero_linger();
}

/// Copies between `a` and `b` with backpressure and half-close, counting the bytes read from
/// each; ends with an error when the agent's drain period is over.
pub async fn copy_metered<A, B>(
    ctx: &ProxyContext,
    a: &mut A,
    b: &mut B,
    read_from_a: ByteMeter<'_>,
    read_from_b: ByteMeter<'_>,
) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let mut a = Metered {
        inner: a,
        meter: read_from_a,
    };
    let mut b = Metered {
        inner: b,
        meter: read_from_b,
    };
    let copy = tokio::io::copy_bidirectional_with_sizes(
        &mut a,
        &mut b,
        COPY_BUFFER_BYTES,
        COPY_BUFFER_BYTES,
    );
    tokio::select! {
        result = copy => result,
        () = ctx.abort.cancelled() => Err(io::Error::other("the agent's drain period is over")),
    }
}

/// [`copy_metered`] between a TCP connection and a tunnel stream. On an error the stream is
/// reset; the caller resets the TCP side.
pub async fn splice_metered(
    ctx: &ProxyContext,
    tcp: &mut TcpStream,
    stream: &mut TunnelStream,
    read_from_tcp: ByteMeter<'_>,
    read_from_stream: ByteMeter<'_>,
) -> io::Result<(u64, u64)> {
    let spliced = tokio::select! {
        biased;
        result = stream.splice(tcp, read_from_tcp, read_from_stream) => Some(result),
        () = ctx.abort.cancelled() => None,
    };
    match spliced {
        Some(Ok(counts)) => Ok(counts),
        Some(Err(err)) => {
            // RFC 9113 §8.5: a failed TCP connection behind CONNECT is signalled so.
            stream.reset(h2::Reason::CONNECT_ERROR);
            Err(err)
        }
        None => {
            stream.reset(h2::Reason::CANCEL);
            Err(io::Error::other("the agent's drain period is over"))
        }
    }
}

async fn connect_upstream(
    ctx: &ProxyContext,
    pod: &PodProxy,
    destination: SocketAddrV4,
) -> io::Result<TcpStream> {
    let socket = pod.netns.upstream_socket(ctx.socket_mark).await?;
    connect_within(socket, destination, ctx.connect_timeout).await
}

/// Connects `socket` to `destination`, failing with `TimedOut` after `limit`.
pub async fn connect_within(
    socket: TcpSocket,
    destination: SocketAddrV4,
    limit: Duration,
) -> io::Result<TcpStream> {
    tokio::time::timeout(limit, socket.connect(destination.into()))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))?
}

/// Counts the bytes read through a stream as they flow.
struct Metered<'a, S> {
    inner: S,
    meter: ByteMeter<'a>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<'_, S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.meter.add((buf.filled().len() - before) as u64);
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<'_, S> {
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
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

//! The destination side: connections arriving at an enrolled pod, either as mTLS tunnel streams on
//! port 15008 or as plaintext steered here by the `sk_lookup` program, are checked (identity,
//! STRICT/PERMISSIVE, authorization) and delivered to the app from inside the pod.
use std::{
    io,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::{
        atomic::{AtomicBool, Ordering::Relaxed},
        Arc,
    },
    time::{Duration, Instant, SystemTime},
};

use bytes::Bytes;
use h2::{server::SendResponse, RecvStream};
use http::{Method, Request, Response, StatusCode};
use tokio::{
    io::{AsyncWriteExt, BufReader, BufWriter},
    net::TcpStream,
};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::{
    access_log::{AccessEntry, Party, Policy},
    config::{InboundMode, PodId},
    identity::{peer_identity, Identity},
    l7::{
        self,
        detect::{detect, Prefixed, Protocol},
        pool::HTTP2,
    },
    policy::{Decision, Request as PolicyRequest},
    proxy::{connect_within, copy_metered, splice_metered, PodProxy, ProxyContext},
    state::{MeshState, Workload},
    stats::{
        ByteMeter, ConnectionBytes, Flow, InboundCounters, InboundFlowKey, Peer, Reporter,
        Transport, UNKNOWN,
    },
    tunnel::{
        TunnelStream, APP_PROTOCOL, CONNECTION_WINDOW_BYTES, FORWARDED, MAX_FRAME_BYTES,
        MAX_HEADER_LIST_BYTES, STREAM_WINDOW_BYTES, TLS_READ_BUFFER_BYTES, TLS_WRITE_BUFFER_BYTES,
    },
};

/// What the access log names as the rule refusing plaintext to a STRICT workload.
const STRICT_REFUSAL: &str = "inbound_mode: STRICT";
/// A client that opens TCP but never finishes its TLS hello must not hold a task forever.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Tunnel handshakes a server runs at once; connections beyond are closed at once, failing
/// that dial (pooled connections are unaffected). Far above what a node's peers need.
pub const MAX_CONCURRENT_HANDSHAKES: usize = 512;
/// Far above what 1,000 concurrent connections between two identities need.
const MAX_STREAMS_PER_CONNECTION: u32 = 16_384;

async fn serve_tunnel_connection(
    ctx: &Arc<ProxyContext>,
    pod: &PodProxy,
    tls: TlsAcceptor,
    stream: TcpStream,
    peer: SocketAddr,
) {
    let _ = stream.set_nodelay(true);
    let counters = &ctx.stats.tunnels;
    let Ok(handshaking) = ctx.handshakes.try_acquire() else {
        counters.shed_handshakes.fetch_add(1, Relaxed);
        debug!(pod = %pod.id, %peer, "too many tunnel handshakes in progress; closing");
        return;
    };
    let handshake = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        tls.accept(BufReader::with_capacity(TLS_READ_BUFFER_BYTES, stream)),
    )
    .await;
    let tls_stream = match handshake {
        Ok(Ok(stream)) => stream,
        Ok(Err(err)) => {
            counters.rejected_handshakes.fetch_add(1, Relaxed);
            warn!(pod = %pod.id, %peer, error = %err, "tunnel handshake rejected");
            return;
        }
        Err(_) => {
            counters.rejected_handshakes.fetch_add(1, Relaxed);
            warn!(pod = %pod.id, %peer, "tunnel handshake timed out");
            return;
        }
    };
    let client = match tls_stream
        .get_ref()
        .1
        .peer_certificates()
        .ok_or_else(|| anyhow::anyhow!("no client certificate"))
        .and_then(peer_identity)
        .and_then(|identity| match &pod.identity {
            // Namespace rules and `forwarded` checks compare within one trust domain only.
            Some(own) if own.trust_domain() != identity.trust_domain() => Err(anyhow::anyhow!(
                "{identity} is not in trust domain {}",
                own.trust_domain()
            )),
            _ => Ok(identity),
        }) {
        Ok(identity) => identity,
        Err(err) => {
            counters.rejected_handshakes.fetch_add(1, Relaxed);
            warn!(pod = %pod.id, %peer, error = format!("{err:#}"), "tunnel client identity unreadable");
            return;
        }
    };
    drop(handshaking);
    counters.server_handshakes.fetch_add(1, Relaxed);
    debug!(pod = %pod.id, %peer, %client, "tunnel connection accepted");
    let client = Arc::new(client);
    let handshake = h2::server::Builder::new()
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .max_header_list_size(MAX_HEADER_LIST_BYTES)
        .initial_window_size(STREAM_WINDOW_BYTES)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
        .max_frame_size(MAX_FRAME_BYTES)
        .handshake::<_, Bytes>(BufWriter::with_capacity(TLS_WRITE_BUFFER_BYTES, tls_stream));
    let mut connection = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(Ok(connection)) => connection,
        Ok(Err(err)) => {
            counters.connection_errors.fetch_add(1, Relaxed);
            warn!(pod = %pod.id, %peer, error = %err, "tunnel connection closed on a protocol error");
            return;
        }
        Err(_) => {
            counters.connection_errors.fetch_add(1, Relaxed);
            warn!(pod = %pod.id, %peer, "tunnel connection sent no HTTP/2 preface in time");
            return;
        }
    };
    // Accepting also drives the connection: frames of open streams flow only while this runs.
    // Once the agent drains, GOAWAY tells the client agent to open new streams elsewhere (on a
    // new connection, which reaches the agent that took over); open streams finish here.
    // A connection that carries no stream for the idle timeout is closed the same way.
    let mut going_away = false;
    let streams = Arc::new(OpenStreams::default());
    let idle_check = tokio::time::sleep(ctx.tunnel_idle_timeout);
    tokio::pin!(idle_check);
    loop {
        let accepted = tokio::select! {
            accepted = connection.accept() => accepted,
            () = ctx.draining.cancelled(), if !going_away => {
                going_away = true;
                connection.graceful_shutdown();
                continue;
            }
            () = &mut idle_check, if !going_away => {
                let idle_deadline = streams.idle_since() + ctx.tunnel_idle_timeout;
                if idle_deadline <= tokio::time::Instant::now() {
                    counters.idle_closed.fetch_add(1, Relaxed);
                    debug!(pod = %pod.id, %peer, %client, "tunnel connection idle; closing");
                    going_away = true;
                    connection.graceful_shutdown();
                } else {
                    idle_check.as_mut().reset(idle_deadline);
                }
                continue;
            }
        };
        let Some(accepted) = accepted else { break };
        match accepted {
            Ok((request, respond)) => {
                let (ctx, client) = (Arc::clone(ctx), Arc::clone(&client));
                let open = OpenStreams::open(&streams);
                ctx.connections.clone().spawn(async move {
                    serve_stream(&ctx, &client, peer, request, respond).await;
                    drop(open);
                });
            }
            Err(err) => {
                counters.connection_errors.fetch_add(1, Relaxed);
                warn!(pod = %pod.id, %peer, error = %err, "tunnel connection closed on a protocol error");
                return;
            }
        }
    }
}

/// The streams open on one incoming tunnel connection, and since when it has had none.
#[derive(Default)]
struct OpenStreams(std::sync::Mutex<(usize, Option<tokio::time::Instant>)>);

impl OpenStreams {
    /// Counts a stream as open until the returned guard is dropped.
    fn open(this: &Arc<Self>) -> OpenStream {
        let mut state = crate::lock(&this.0);
        state.0 += 1;
        OpenStream(Arc::clone(this))
    }

    /// When the last stream closed (or the connection opened); now while streams are open, so
    /// a busy connection is looked at again one timeout later (the loop is not woken when its
    /// last stream closes, only when its idle check is due).
    fn idle_since(&self) -> tokio::time::Instant {
        let mut state = crate::lock(&self.0);
        let (open, since) = &mut *state;
        if *open > 0 {
            return tokio::time::Instant::now();
        }
        *since.get_or_insert_with(tokio::time::Instant::now)
    }
}

struct OpenStream(Arc<OpenStreams>);

impl Drop for OpenStream {
    fn drop(&mut self) {
        let mut state = crate::lock(&self.0 .0);
        state.0 -= 1;
        if state.0 == 0 {
            state.1 = Some(tokio::time::Instant::now());
        }
    }
}

/// Handles one CONNECT stream: checks it, connects to the app, answers, then splices the stream
/// to the app.
async fn serve_stream(
    ctx: &Arc<ProxyContext>,
    client: &Identity,
    peer: SocketAddr,
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) {
    let (arrival, mut app) = match open_stream(ctx, client, peer, &request).await {
        Ok(opened) => opened,
        Err(status) => {
            let _ = respond.send_response(status_response(status), true);
            return;
        }
    };
    let send = match respond.send_response(Response::new(()), false) {
        Ok(send) => send,
        Err(err) => {
            debug!(pod = %arrival.workload.id, error = %err, "tunnel stream closed before it opened");
            let _ = app.set_zero_linger();
            return;
        }
    };
    let app_protocol = request.headers().get(APP_PROTOCOL).cloned();
    let mut stream = TunnelStream::new(send, request.into_body());
    if let Some(protocol) = app_protocol {
        let http2 = protocol == HTTP2;
        let pod = arrival.workload.id.clone();
        let served = l7::deliver::serve(
            Arc::clone(ctx),
            arrival,
            stream.into_io(),
            app,
            http2,
            false,
        )
        .await;
        if let Err(err) = served {
            debug!(%pod, error = %err, "HTTP stream ended with an error");
        }
        return;
    }
    let flow = arrival.flow(ctx);
    flow.opened.fetch_add(1, Relaxed);
    let bytes = ConnectionBytes::default();
    let (from_client, from_app) = flow.meters(&bytes);
    let result = splice_metered(ctx, &mut app, &mut stream, from_app, from_client).await;
    flow.closed.fetch_add(1, Relaxed);
    if let Err(err) = result {
        debug!(pod = %arrival.workload.id, error = %err, "inbound connection ended with an error");
        let _ = app.set_zero_linger();
    }
    let (sent, received) = bytes.get();
    arrival.log(ctx, sent, received, "-");
}

/// A connection or stream arriving at a local workload, as checked.
pub struct Arrival {
    pub workload: Arc<Workload>,
    pub counters: Arc<InboundCounters>,
    /// Who is calling, as far as the agent can tell.
    pub source: Peer,
    pub source_address: Option<SocketAddr>,
    /// Where the client was going: the workload's address and port.
    pub target: SocketAddrV4,
    /// The service the target address serves, looked up once for every metric and log line.
    pub service: Option<Arc<str>>,
    pub transport: Transport,
    pub started: Instant,
    pub start_time: SystemTime,
}

impl Arrival {
    /// The access-log line of an L4 connection that arrived: `sent` bytes from the client,
    /// `received` from the app.
    fn log(&self, ctx: &ProxyContext, sent: u64, received: u64, flags: &'static str) {
        if !ctx.access_log.wants(false) {
            return;
        }
        let mut entry = self.entry();
        entry.destination_service = self.service.clone();
        entry.bytes_received = sent;
        entry.bytes_sent = received;
        entry.response_flags = flags;
        ctx.access_log.log(entry);
    }

    /// A connection refused by `policy`: counted, and always logged (auditors want every one).
    fn refuse(&self, ctx: &ProxyContext, policy: &str) {
        self.counters.denied.fetch_add(1, Relaxed);
        ctx.stats.count_denial(&self.workload.peer, policy);
        self.audit_refusal(ctx, policy);
    }

    fn audit_refusal(&self, ctx: &ProxyContext, policy: &str) {
        if !ctx.access_log.wants(true) {
            return;
        }
        let mut entry = self.entry();
        entry.policy = Policy::denied(policy);
        ctx.access_log.log(entry);
    }

    /// The connection's access-log line as far as every outcome shares it.
    fn entry(&self) -> AccessEntry {
        AccessEntry::connection(
            Reporter::Destination,
            Party::of(&self.source, self.source_address),
            Party::of(&self.workload.peer, Some(SocketAddr::V4(self.target))),
            self.transport,
            self.start_time,
            self.started.elapsed(),
        )
    }

    /// The counters of L4 connections from this source to the workload.
    pub fn flow(&self, ctx: &ProxyContext) -> Arc<Flow> {
        let key = InboundFlowKey {
            pod: self.workload.id.clone(),
            source: self.source.clone(),
            transport: self.transport,
        };
        ctx.stats
            .inbound_flow(&key, &self.workload.peer, || self.service.clone())
    }
}

/// Checks a CONNECT stream and connects to its app: who arrived and the app connection, or the
/// status to refuse the stream with.
async fn open_stream(
    ctx: &ProxyContext,
    client: &Identity,
    peer: SocketAddr,
    request: &Request<RecvStream>,
) -> Result<(Arrival, TcpStream), StatusCode> {
    let (started, start_time) = (Instant::now(), SystemTime::now());
    let state = ctx.state.get();
    let (workload, target, source) = match check_stream(ctx, &state, client, request) {
        Ok(checked) => checked,
        Err((status, reason)) => {
            ctx.stats.tunnels.rejected_streams.fetch_add(1, Relaxed);
            warn!(%client, %peer, authority = ?request.uri().authority().map(|a| a.as_str()), reason, "tunnel stream rejected");
            return Err(status);
        }
    };
    // The client's agent names the pod it speaks for; without that, the identity is all.
    let source_peer = match source.and_then(|s| state.workload(*s.ip())) {
        Some(source) => source.peer.clone(),
        None => Peer::new(UNKNOWN, client.namespace(), Some(client.to_string())),
    };
    let arrival = Arrival {
        counters: ctx.stats.inbound(&workload.id),
        source: source_peer,
        source_address: Some(source.map_or(peer, SocketAddr::V4)),
        target,
        service: state.services.serving(target).cloned(),
        transport: Transport::Mtls,
        started,
        start_time,
        workload,
    };
    let workload = &arrival.workload;
    if let Decision::Deny { policy } = state.policies.evaluate(&PolicyRequest {
        source_principal: Some(&client.to_string()),
        source_namespace: Some(client.namespace()),
        destination_namespace: &workload.namespace,
        destination_labels: &workload.labels,
        destination_port: target.port(),
    }) {
        warn!(source = %client, destination = %workload.identity, pod = %workload.id, port = target.port(), policy, "connection denied by policy");
        arrival.refuse(ctx, &policy);
        return Err(StatusCode::FORBIDDEN);
    }
    let Some(pod) = ctx.local_pod(target.ip()) else {
        ctx.stats.tunnels.rejected_streams.fetch_add(1, Relaxed);
        warn!(%client, %target, "tunnel stream for a workload that is not enrolled here");
        return Err(StatusCode::NOT_FOUND);
    };
    match deliver(ctx, &pod, source, target).await {
        Ok(app) => {
            arrival.counters.mtls.fetch_add(1, Relaxed);
            Ok((arrival, app))
        }
        Err(err) => {
            arrival.counters.failed.fetch_add(1, Relaxed);
            arrival.flow(ctx).failed.fetch_add(1, Relaxed);
            info!(pod = %arrival.workload.id, %target, %client, error = %err, "cannot reach the app");
            arrival.log(ctx, 0, 0, "UF");
            Err(StatusCode::SERVICE_UNAVAILABLE)
        }
    }
}

type Rejection = (StatusCode, &'static str);

/// The stream's target workload, address and the source address to deliver from.
fn check_stream(
    ctx: &ProxyContext,
    state: &MeshState,
    client: &Identity,
    request: &Request<RecvStream>,
) -> Result<(Arc<Workload>, SocketAddrV4, Option<SocketAddrV4>), Rejection> {
    if request.method() != Method::CONNECT {
        return Err((StatusCode::METHOD_NOT_ALLOWED, "not a CONNECT request"));
    }
    let target: SocketAddrV4 = request
        .uri()
        .authority()
        .and_then(|authority| authority.as_str().parse().ok())
        .ok_or((
            StatusCode::BAD_REQUEST,
            "the authority is not an IPv4 address and port",
        ))?;
    let workload = ctx.arriving_workload(state, *target.ip()).ok_or((
        StatusCode::NOT_FOUND,
        "the target is not a workload on this node",
    ))?;
    if target.port() == ctx.tunnel_port {
        return Err((
            StatusCode::BAD_REQUEST,
            "the target is the tunnel port itself",
        ));
    }
    let source = match request.headers().get(FORWARDED) {
        None => None,
        Some(value) => {
            let ip = value
                .to_str()
                .ok()
                .and_then(|v| v.strip_prefix("for="))
                .and_then(|ip| ip.parse::<Ipv4Addr>().ok())
                .ok_or((StatusCode::BAD_REQUEST, "malformed forwarded header"))?;
            // A peer may only speak for addresses of its own identity.
            match state.workload(ip) {
                Some(source) if &source.identity == client => Some(SocketAddrV4::new(ip, 0)),
                _ => {
                    return Err((
                        StatusCode::FORBIDDEN,
                        "the forwarded address is not a workload of the client's identity",
                    ))
                }
            }
        }
    };
    Ok((workload, target, source))
}

fn status_response(status: StatusCode) -> Response<()> {
    let mut response = Response::new(());
    *response.status_mut() = status;
    response
}

/// Serves a connection accepted on a pod's tunnel listener.
pub async fn serve_tunnel(
    ctx: Arc<ProxyContext>,
    pod: Arc<PodProxy>,
    tls: TlsAcceptor,
    stream: TcpStream,
    peer: SocketAddr,
) {
    serve_tunnel_connection(&ctx, &pod, tls, stream, peer).await;
}

/// Serves a plaintext connection the `sk_lookup` program steered to a pod's listener.
pub async fn serve_steered(
    ctx: Arc<ProxyContext>,
    pod: Arc<PodProxy>,
    stream: TcpStream,
    peer: SocketAddr,
) {
    serve_plaintext(&ctx, &pod, stream, peer).await;
}

async fn serve_plaintext(
    ctx: &Arc<ProxyContext>,
    pod: &PodProxy,
    client: TcpStream,
    peer: SocketAddr,
) {
    // The steered socket's local address is where the client was going.
    let (Ok(SocketAddr::V4(target)), SocketAddr::V4(peer)) = (client.local_addr(), peer) else {
        let _ = client.set_zero_linger();
        return;
    };
    let state = ctx.state.get();
    let Some(workload) = ctx.arriving_workload(&state, *target.ip()) else {
        warn!(pod = %pod.id, %target, "plaintext connection for an address that is not a local workload; resetting");
        let _ = client.set_zero_linger();
        return;
    };
    // Plaintext proves no identity: the source is named by its address only.
    let source = Peer {
        principal: UNKNOWN.into(),
        ..state.peer_at(*peer.ip())
    };
    let arrival = Arrival {
        counters: ctx.stats.inbound(&workload.id),
        workload,
        source,
        source_address: Some(SocketAddr::V4(peer)),
        target,
        service: state.services.serving(target).cloned(),
        transport: Transport::Plaintext,
        started: Instant::now(),
        start_time: SystemTime::now(),
    };
    let workload = &arrival.workload;
    let from_node = ctx.strict_allows_node && is_node_address(*peer.ip());
    if workload.inbound_mode == InboundMode::Strict && !from_node {
        arrival.counters.plaintext_rejected.fetch_add(1, Relaxed);
        info!(pod = %workload.id, client = %peer, port = target.port(), "plaintext connection rejected (STRICT)");
        arrival.audit_refusal(ctx, STRICT_REFUSAL);
        let _ = client.set_zero_linger();
        return;
    }
    if let Decision::Deny { policy } = state.policies.evaluate(&PolicyRequest {
        source_principal: None,
        source_namespace: None,
        destination_namespace: &workload.namespace,
        destination_labels: &workload.labels,
        destination_port: target.port(),
    }) {
        warn!(source = "plaintext", client = %peer, destination = %workload.identity, pod = %workload.id, port = target.port(), policy, "connection denied by policy");
        arrival.refuse(ctx, &policy);
        let _ = client.set_zero_linger();
        return;
    }
    let app = match deliver(ctx, pod, Some(peer), target).await {
        Ok(app) => app,
        Err(err) => {
            arrival.counters.failed.fetch_add(1, Relaxed);
            arrival.flow(ctx).failed.fetch_add(1, Relaxed);
            info!(pod = %arrival.workload.id, %target, client = %peer, error = %err, "cannot reach the app");
            arrival.log(ctx, 0, 0, "UF");
            let _ = client.set_zero_linger();
            return;
        }
    };
    arrival.counters.plaintext.fetch_add(1, Relaxed);
    let mut client = client;
    let mut app = app;
    let mut prefix = Bytes::new();
    // HTTP from outside the mesh is served request by request too (deadlines checked on
    // arrival); anything else is relayed as bytes, starting with what detection read.
    if !ctx.opaque_ports.contains(&target.port()) {
        match detect(&mut client, ctx.protocol_detection_timeout).await {
            Ok((Protocol::Opaque, read)) => prefix = read,
            Ok((protocol, read)) => {
                let pod_id = arrival.workload.id.clone();
                let served = l7::deliver::serve(
                    Arc::clone(ctx),
                    arrival,
                    Prefixed::new(read, client),
                    app,
                    protocol == Protocol::Http2,
                    true,
                )
                .await;
                if let Err(err) = served {
                    debug!(pod = %pod_id, error = %err, "plaintext HTTP connection ended with an error");
                }
                return;
            }
            Err(err) => {
                debug!(pod = %arrival.workload.id, error = %err, "plaintext connection failed during protocol detection");
                arrival.flow(ctx).failed.fetch_add(1, Relaxed);
                let _ = app.set_zero_linger();
                arrival.log(ctx, 0, 0, "DC");
                return;
            }
        }
    }
    let flow = arrival.flow(ctx);
    flow.opened.fetch_add(1, Relaxed);
    let bytes = ConnectionBytes::default();
    let meters = flow.meters(&bytes);
    meters.0.add(prefix.len() as u64);
    let relayed = match app.write_all(&prefix).await {
        Ok(()) => splice(ctx, meters, &mut client, app, &arrival.workload.id).await,
        Err(err) => {
            debug!(pod = %arrival.workload.id, error = %err, "the app closed before the first bytes");
            false
        }
    };
    flow.closed.fetch_add(1, Relaxed);
    if !relayed {
        let _ = client.set_zero_linger();
    }
    let (sent, received) = bytes.get();
    arrival.log(ctx, sent, received, "-");
}

/// Whether `ip` is an address of the agent's own network namespace, the node's (the agent runs
/// in it; only pod network namespaces are entered, on helper threads). Asked only for plaintext
/// to STRICT pods, which is rare, so the addresses are listed afresh: CNIs add some per pod.
fn is_node_address(ip: Ipv4Addr) -> bool {
    if ip.is_loopback() {
        return false;
    }
    match nix::ifaddrs::getifaddrs() {
        Ok(mut addresses) => addresses.any(|interface| {
            interface
                .address
                .and_then(|address| address.as_sockaddr_in().map(|sin| sin.ip()))
                == Some(ip)
        }),
        Err(err) => {
            warn!(error = %err, "cannot list the node's addresses; plaintext from the node is rejected by STRICT pods");
            false
        }
    }
}

/// Connects to the app from inside its pod, from the client's address when the pod's routing
/// allows it, else from the pod's own (logged once per agent).
async fn deliver(
    ctx: &ProxyContext,
    pod: &PodProxy,
    source: Option<SocketAddrV4>,
    target: SocketAddrV4,
) -> io::Result<TcpStream> {
    static FALLBACK_LOGGED: AtomicBool = AtomicBool::new(false);
    let transparent = source.filter(|_| pod.transparent_delivery);
    if source.is_some() && transparent.is_none() && !FALLBACK_LOGGED.swap(true, Relaxed) {
        warn!(pod = %pod.id, "apps see the pod's own address instead of the client's: transparent delivery is not available (see the README)");
    }
    let socket = pod
        .netns
        .delivery_socket(ctx.delivery_mark, transparent)
        .await?;
    // Held until connected: the app's SYN must not be steered back to the agent.
    let _delivery = match (transparent, socket.local_addr()?) {
        (Some(_), SocketAddr::V4(bound)) => Some(
            ctx.datapath
                .begin_delivery(bound, target)
                .map_err(|err| io::Error::other(format!("{err:#}")))?,
        ),
        _ => None,
    };
    connect_within(socket, target, ctx.connect_timeout).await
}

/// Relays between the client side and the app; false when it ended with an error, after which
/// the app connection has been reset and the caller resets the client side.
async fn splice(
    ctx: &ProxyContext,
    (from_client, from_app): (ByteMeter<'_>, ByteMeter<'_>),
    client: &mut TcpStream,
    mut app: TcpStream,
    pod: &PodId,
) -> bool {
    let result = copy_metered(ctx, client, &mut app, from_client, from_app).await;
    match result {
        Ok(_) => true,
        Err(err) => {
            debug!(%pod, error = %err, "inbound connection ended with an error");
            let _ = app.set_zero_linger();
            false
        }
    }
}

//! The HTTP proxy for connections to a service: each request is routed, sent to an endpoint
//! the balancer picks, and retried within the route's policy, the service's retry budget and
//! the request's deadline.
//!
//! One request's path: [`serve`] runs hyper's server on the client connection → [`handle`]
//! checks the deadline and selects the route rule → [`forward`]
//! loops over tries: pick an endpoint, send it through the pod's [`ConnectionPool`], judge the
//! outcome, and either answer or back off and try another endpoint.
use std::{
    convert::Infallible,
    future::Future,
    net::{SocketAddr, SocketAddrV4},
    pin::{pin, Pin},
    sync::{atomic::Ordering::Relaxed, Arc},
    time::{Duration, Instant, SystemTime},
};

use bytes::Bytes;
use http::{
    header::{self, HeaderName, HeaderValue},
    request::Parts,
    HeaderMap, Request, Response, StatusCode,
};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::{body::Incoming, server::conn, service::service_fn, upgrade::OnUpgrade};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use super::{
    body::{RecordedBody, UpstreamBody},
    deadline::{request_deadline, set_deadline},
    detect::{Prefixed, Protocol},
    observe::{flags, PendingRecord, RequestBytes, RequestRecord},
    pool::SendError,
    retry::{Outcome, RETRIES_EXHAUSTED},
    service::{CompiledRule, ServiceBackend, ServicePortEntry},
    trace::ensure_trace,
};
use crate::{
    proxy::{transport_to, PodProxy, ProxyContext},
    stats::{Peer, Reporter, ServiceCounters, Transport},
};

/// The largest request head accepted from a pod; larger ones get 431.
const MAX_REQUEST_HEAD_BYTES: usize = 64 * 1024;
/// A mirrored request that takes longer than this is abandoned.
const MIRROR_TIMEOUT: Duration = Duration::from_secs(10);

pub type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// Serves HTTP on a client connection to the service port at `vip` (`entry` when the
/// connection was accepted) until the client closes it or the agent's drain period ends. Each
/// request is routed by the service's routes in force when it arrives, so a reload reaches
/// long-lived connections too.
pub async fn serve(
    ctx: Arc<ProxyContext>,
    pod: Arc<PodProxy>,
    client: Prefixed<TcpStream>,
    client_address: Option<SocketAddr>,
    protocol: Protocol,
    vip: SocketAddrV4,
    entry: &ServicePortEntry,
) {
    let counters = Arc::clone(&entry.backend.counters);
    let service = {
        let (ctx, pod) = (Arc::clone(&ctx), Arc::clone(&pod));
        service_fn(move |request| {
            let (ctx, pod) = (Arc::clone(&ctx), Arc::clone(&pod));
            async move {
                let entry = ctx.state.get().services.at(vip).cloned();
                let response = match entry {
                    Some(entry) => handle(&ctx, &pod, &entry, request, client_address).await,
                    None => agent_reply(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "the service is no longer configured",
                    ),
                };
                Ok::<_, Infallible>(response)
            }
        })
    };
    let io = TokioIo::new(client);
    let served = if protocol == Protocol::Http2 {
        let connection = conn::http2::Builder::new(TokioExecutor::new())
            .max_header_list_size(MAX_REQUEST_HEAD_BYTES as u32)
            .serve_connection(io, service);
        until_finished(&ctx, &ctx.draining, pin!(connection), |c| {
            c.graceful_shutdown()
        })
        .await
    } else {
        let connection = conn::http1::Builder::new()
            .max_buf_size(MAX_REQUEST_HEAD_BYTES)
            .serve_connection(io, service)
            .with_upgrades();
        until_finished(&ctx, &ctx.draining, pin!(connection), |c| {
            c.graceful_shutdown()
        })
        .await
    };
    if let Some(Err(err)) = served {
        // hyper answered malformed requests (400) and oversized heads (431) before this.
        if err.is_parse() || err.is_parse_too_large() {
            counters.requests.fetch_add(1, Relaxed);
            counters.responses_4xx.fetch_add(1, Relaxed);
            counters.local_replies.fetch_add(1, Relaxed);
        }
        info!(pod = %pod.id, error = %err, "HTTP connection from the pod ended with an error");
    }
}

/// Drives a served HTTP connection; once `finish` is cancelled (the agent drains, or the
/// connection has nowhere left to send requests), asks it to finish gracefully (HTTP/1.1: close
/// after the request in progress; HTTP/2: GOAWAY), so idle keep-alive connections do not hold
/// the drain for its whole period. `None` when the drain period ended first.
pub async fn until_finished<C>(
    ctx: &ProxyContext,
    finish: &CancellationToken,
    mut connection: Pin<&mut C>,
    graceful_shutdown: impl FnOnce(Pin<&mut C>),
) -> Option<hyper::Result<()>>
where
    C: Future<Output = hyper::Result<()>>,
{
    tokio::select! {
        served = connection.as_mut() => return Some(served),
        () = finish.cancelled() => graceful_shutdown(connection.as_mut()),
        () = ctx.abort.cancelled() => return None,
    }
    tokio::select! {
        served = connection => Some(served),
        () = ctx.abort.cancelled() => None,
    }
}

/// Answers one request from the pod, and records it once the answer has been sent.
async fn handle(
    ctx: &Arc<ProxyContext>,
    pod: &Arc<PodProxy>,
    entry: &ServicePortEntry,
    request: Request<Incoming>,
    client_address: Option<SocketAddr>,
) -> Response<ProxyBody> {
    let (started, start_time) = (Instant::now(), SystemTime::now());
    let grpc = is_grpc(request.headers());
    let (version, method, uri) = (
        request.version(),
        request.method().clone(),
        request.uri().clone(),
    );
    let host = request.headers().get(header::HOST).cloned();
    // Recorded even if the client goes away before the answer (status 0, `DC`).
    let mut pending = PendingRecord::new(RequestRecord {
        ctx: Arc::clone(ctx),
        reporter: Reporter::Source,
        source: pod.peer.clone(),
        source_address: client_address,
        destination: Peer::unknown(),
        destination_address: None,
        service: Arc::clone(&entry.backend.host),
        transport: Transport::Plaintext,
        grpc,
        version,
        method,
        uri,
        host,
        trace_id: None,
        started,
        start_time,
        request_bytes: RequestBytes::Unread,
        status: 0,
        grpc_status: "",
        flags: flags::NONE,
        retries: 0,
    });
    let mut served = Served {
        service: Arc::clone(&entry.backend.host),
        endpoint: None,
        transport: Transport::Plaintext,
        flags: flags::NONE,
        retries: 0,
        request_bytes: RequestBytes::Unread,
        trace_id: None,
    };
    let mut response = route_and_forward(ctx, pod, entry, request, &mut served).await;
    if grpc {
        response = grpc_shaped(response);
    }
    if let Some(record) = pending.record_mut() {
        if let Some(endpoint) = served.endpoint {
            record.destination = ctx.state.get().peer_at(*endpoint.ip());
            record.destination_address = Some(SocketAddr::V4(endpoint));
        }
        record.service = served.service;
        record.transport = served.transport;
        record.trace_id = served.trace_id;
        record.request_bytes = served.request_bytes;
        record.flags = served.flags;
        record.retries = served.retries;
    }
    pending.respond(response)
}

/// How a request was served, for its record.
struct Served {
    /// The service that answered (a route may send to another service than the one asked).
    service: Arc<str>,
    /// The endpoint of the last try.
    endpoint: Option<SocketAddrV4>,
    transport: Transport,
    flags: &'static str,
    retries: u32,
    request_bytes: RequestBytes,
    trace_id: Option<u128>,
}

async fn route_and_forward(
    ctx: &Arc<ProxyContext>,
    pod: &Arc<PodProxy>,
    entry: &ServicePortEntry,
    request: Request<Incoming>,
    served: &mut Served,
) -> Response<ProxyBody> {
    let counters = Arc::clone(&entry.backend.counters);
    counters.requests.fetch_add(1, Relaxed);
    let now = SystemTime::now();
    let deadline = match request_deadline(request.headers(), now) {
        Ok(deadline) => deadline,
        Err(err) => {
            served.flags = flags::BAD_REQUEST;
            return local_reply(StatusCode::BAD_REQUEST, &format!("{err}"), &counters);
        }
    };
    if deadline.is_some_and(|d| d <= now) {
        counters.deadline_exceeded.fetch_add(1, Relaxed);
        served.flags = flags::DEADLINE_EXCEEDED;
        return local_reply(
            StatusCode::GATEWAY_TIMEOUT,
            "the request's deadline had passed",
            &counters,
        );
    }
    let Some(rule) = entry.select(request.method(), request.uri().path(), request.headers()) else {
        served.flags = flags::NO_ROUTE;
        return local_reply(
            StatusCode::NOT_FOUND,
            "no route rule matches the request",
            &counters,
        );
    };
    let deadline = match (deadline, rule.timeouts.request) {
        (Some(d), Some(t)) => Some(d.min(now + t)),
        (d, t) => d.or_else(|| t.map(|t| now + t)),
    };
    if request.headers().contains_key(header::UPGRADE) {
        return forward_upgrade(ctx, pod, rule, request, &counters, served).await;
    }
    let (mut parts, body) = request.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let trace = ensure_trace(&mut parts.headers);
    served.trace_id = Some(trace);
    let mut body = RecordedBody::new(body, ctx.retry_body_limit);
    served.request_bytes = RequestBytes::Recorded(body.received_bytes());
    let outgoing = Outgoing {
        parts: &parts,
        body: &mut body,
        deadline,
    };
    let response = forward(ctx, pod, rule, outgoing, &counters, served).await;
    if response.headers().contains_key(RETRIES_EXHAUSTED) {
        ctx.exhausted.record(trace, Instant::now());
    }
    // The copy goes once the body has been seen whole (by the first try); a body too large or
    // still streaming is not mirrored.
    if let Some(mirror) = &rule.mirror {
        if let Some(copy) = body.replay() {
            mirror_request(ctx, pod, mirror, &parts, copy, deadline, &counters);
        }
    }
    response
}

/// A request on its way to an endpoint: its head, its body and its deadline.
struct Outgoing<'a> {
    parts: &'a Parts,
    body: &'a mut RecordedBody,
    deadline: Option<SystemTime>,
}

/// Tries the request on endpoints of a backend the rule picks until it succeeds, the policy
/// or budget allows no more tries, or the deadline passes.
async fn forward(
    ctx: &ProxyContext,
    pod: &PodProxy,
    rule: &CompiledRule,
    outgoing: Outgoing<'_>,
    counters: &ServiceCounters,
    served: &mut Served,
) -> Response<ProxyBody> {
    let Outgoing {
        parts,
        body,
        deadline,
    } = outgoing;
    let backend = rule.pick_backend();
    served.service = Arc::clone(&backend.host);
    let policy = &rule.retry;
    let started = Instant::now();
    if let Some(budget) = &backend.budget {
        budget.record_request(started);
    }
    let mut avoid = Vec::new();
    let mut tries = 0;
    loop {
        tries += 1;
        served.retries = tries - 1;
        let remaining = match deadline.map(|d| d.duration_since(SystemTime::now())) {
            Some(Err(_)) => {
                counters.deadline_exceeded.fetch_add(1, Relaxed);
                served.flags = flags::DEADLINE_EXCEEDED;
                return local_reply(
                    StatusCode::GATEWAY_TIMEOUT,
                    "the request's deadline passed",
                    counters,
                );
            }
            Some(Ok(remaining)) => Some(remaining),
            None => None,
        };
        let pick = match backend.balancer.pick(&avoid, Instant::now()) {
            Ok(pick) => pick,
            Err(err) => {
                counters.no_endpoint.fetch_add(1, Relaxed);
                served.flags = flags::NO_HEALTHY_UPSTREAM;
                return local_reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &format!("{}: {err}", backend.id),
                    counters,
                );
            }
        };
        let endpoint = pick.endpoint();
        served.endpoint = Some(endpoint);
        served.transport = transport_to(ctx, pod, *endpoint.ip());
        let Some(request_body) = body.first().or_else(|| body.replay()) else {
            // Unreachable: a retry starts only with a recorded body.
            served.flags = flags::UPSTREAM_RESET;
            return local_reply(
                StatusCode::BAD_GATEWAY,
                "the request body was already sent",
                counters,
            );
        };
        let mut upstream = Request::from_parts(parts.clone(), request_body);
        if let Some(deadline) = deadline {
            set_deadline(upstream.headers_mut(), deadline, SystemTime::now());
        }
        let per_try = match (policy.per_try_timeout, remaining) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let sent_at = Instant::now();
        let send = pod.http.send(ctx, pod, endpoint, upstream);
        let result = match per_try {
            Some(limit) => tokio::time::timeout(limit, send).await.ok(),
            None => Some(send.await),
        };
        let latency = sent_at.elapsed();
        let (outcome, response) = match &result {
            None => (Outcome::PerTryTimeout, None),
            Some(Err(SendError::Connect(_))) => (Outcome::ConnectFailure, None),
            Some(Err(SendError::Reset(_))) => (Outcome::ResetBeforeResponse, None),
            Some(Ok((response, _))) => (
                Outcome::Response {
                    status: response.status(),
                    headers: response.headers(),
                },
                Some(is_failure(response.status(), response.headers())),
            ),
        };
        let failed = response.unwrap_or(true);
        let retry_allowed = policy.should_retry(&parts.method, &outcome);
        if failed {
            pick.failure(latency, Instant::now());
        } else {
            pick.success(latency, Instant::now());
        }
        // Another try needs the whole body again, and time left for it.
        let time_left = deadline.is_none_or(|d| d > SystemTime::now());
        let more_tries = tries < policy.attempts && time_left && body.is_replayable();
        let retry = retry_allowed
            && more_tries
            && match &backend.budget {
                Some(budget) => {
                    let granted = budget.try_retry(Instant::now());
                    if !granted {
                        counters.retries_suppressed.fetch_add(1, Relaxed);
                    }
                    granted
                }
                None => true,
            };
        if retry {
            counters.retries.fetch_add(1, Relaxed);
            avoid.push(endpoint);
            let mut pause = policy.backoff(tries);
            if let Some(deadline) = deadline {
                pause = pause.min(
                    deadline
                        .duration_since(SystemTime::now())
                        .unwrap_or_default(),
                );
            }
            debug!(pod = %pod.id, service = %backend.id, %endpoint, tries, ?pause, "retrying");
            tokio::time::sleep(pause).await;
            continue;
        }
        // This agent would have retried but may not, or a hop further down already gave up:
        // callers further up must not retry either, or retries multiply hop by hop.
        let marked = matches!(&result, Some(Ok((response, _))) if response.headers().contains_key(RETRIES_EXHAUSTED));
        let exhausted = retry_allowed || marked;
        return match result {
            Some(Ok((response, transport))) => {
                served.transport = transport;
                served.flags = if retry_allowed && is_failure(response.status(), response.headers())
                {
                    flags::RETRIES_EXHAUSTED
                } else {
                    flags::NONE
                };
                counters.count_response(response.status());
                let mut response = response.map(|body| body.boxed());
                strip_hop_by_hop(response.headers_mut());
                if exhausted {
                    response
                        .headers_mut()
                        .insert(RETRIES_EXHAUSTED, HeaderValue::from_static("1"));
                }
                response
            }
            failure => {
                let (status, flag, reason) = match failure {
                    None => (
                        StatusCode::GATEWAY_TIMEOUT,
                        flags::UPSTREAM_TIMEOUT,
                        format!("{endpoint} did not answer in time"),
                    ),
                    Some(Err(SendError::Connect(err))) => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        flags::UPSTREAM_CONNECT_FAILURE,
                        format!("connecting to {endpoint}: {err:#}"),
                    ),
                    Some(Err(SendError::Reset(err))) => (
                        StatusCode::BAD_GATEWAY,
                        flags::UPSTREAM_RESET,
                        format!("{endpoint} failed before answering: {err}"),
                    ),
                    Some(Ok(_)) => (
                        StatusCode::BAD_GATEWAY,
                        flags::UPSTREAM_RESET,
                        String::new(),
                    ),
                };
                served.flags = if retry_allowed {
                    flags::with_retries_exhausted(flag)
                } else {
                    flag
                };
                info!(pod = %pod.id, service = %backend.id, tries, error = %reason, "request failed");
                let mut response = local_reply(status, &reason, counters);
                if exhausted {
                    response
                        .headers_mut()
                        .insert(RETRIES_EXHAUSTED, HeaderValue::from_static("1"));
                }
                response
            }
        };
    }
}

/// Sends a copy of the request to the mirror backend in the background; its answer and
/// failures never reach the caller.
fn mirror_request(
    ctx: &Arc<ProxyContext>,
    pod: &Arc<PodProxy>,
    mirror: &Arc<ServiceBackend>,
    parts: &Parts,
    body: UpstreamBody,
    deadline: Option<SystemTime>,
    counters: &ServiceCounters,
) {
    // A slow shadow must not pile up connections: past the cap, copies are skipped.
    let Ok(slot) = Arc::clone(&mirror.mirror_slots).try_acquire_owned() else {
        counters.mirrors_skipped.fetch_add(1, Relaxed);
        return;
    };
    let Ok(pick) = mirror.balancer.pick(&[], Instant::now()) else {
        return;
    };
    counters.mirrored.fetch_add(1, Relaxed);
    let mut request = Request::from_parts(parts.clone(), body);
    if let Some(deadline) = deadline {
        set_deadline(request.headers_mut(), deadline, SystemTime::now());
    }
    let (ctx, pod, mirror) = (Arc::clone(ctx), Arc::clone(pod), Arc::clone(mirror));
    let tasks = ctx.connections.clone();
    tasks.spawn(async move {
        let _slot = slot;
        let started = Instant::now();
        let endpoint = pick.endpoint();
        let sent = tokio::time::timeout(MIRROR_TIMEOUT, async {
            let (response, _) = pod.http.send(&ctx, &pod, endpoint, request).await.ok()?;
            let status = response.status();
            // Read to the end so the connection can serve the next mirrored request.
            response.into_body().collect().await.ok()?;
            Some(status)
        })
        .await;
        match sent {
            Ok(Some(status)) if !status.is_server_error() => {
                pick.success(started.elapsed(), Instant::now())
            }
            _ => pick.failure(started.elapsed(), Instant::now()),
        }
        debug!(service = %mirror.id, %endpoint, "mirrored request done");
    });
}

/// Forwards a request asking to switch protocols (WebSocket, h2c upgrade): once the endpoint
/// agrees (101), both connections are handed over and their bytes copied both ways. Never
/// retried: the request starts a conversation, not an exchange.
async fn forward_upgrade(
    ctx: &ProxyContext,
    pod: &PodProxy,
    rule: &CompiledRule,
    mut request: Request<Incoming>,
    counters: &ServiceCounters,
    served: &mut Served,
) -> Response<ProxyBody> {
    let backend = rule.pick_backend();
    served.service = Arc::clone(&backend.host);
    let pick = match backend.balancer.pick(&[], Instant::now()) {
        Ok(pick) => pick,
        Err(err) => {
            counters.no_endpoint.fetch_add(1, Relaxed);
            served.flags = flags::NO_HEALTHY_UPSTREAM;
            let reason = format!("{}: {err}", backend.id);
            return local_reply(StatusCode::SERVICE_UNAVAILABLE, &reason, counters);
        }
    };
    let endpoint = pick.endpoint();
    served.endpoint = Some(endpoint);
    served.transport = transport_to(ctx, pod, *endpoint.ip());
    let client_side = hyper::upgrade::on(&mut request);
    let (parts, body) = request.into_parts();
    let mut body = RecordedBody::new(body, 0);
    let started = Instant::now();
    let Some(body) = body.first() else {
        return local_reply(StatusCode::BAD_GATEWAY, "no request body to send", counters);
    };
    let request = Request::from_parts(parts, body);
    let sent = pod.http.send_upgrade(ctx, pod, endpoint, request).await;
    let mut response = match sent {
        Ok(response) => response,
        Err(SendError::Connect(err)) => {
            pick.failure(started.elapsed(), Instant::now());
            served.flags = flags::UPSTREAM_CONNECT_FAILURE;
            let reason = format!("connecting to {endpoint}: {err:#}");
            return local_reply(StatusCode::SERVICE_UNAVAILABLE, &reason, counters);
        }
        Err(SendError::Reset(err)) => {
            pick.failure(started.elapsed(), Instant::now());
            served.flags = flags::UPSTREAM_RESET;
            let reason = format!("{endpoint} failed before answering: {err}");
            return local_reply(StatusCode::BAD_GATEWAY, &reason, counters);
        }
    };
    pick.success(started.elapsed(), Instant::now());
    counters.count_response(response.status());
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        splice_upgraded(ctx, client_side, hyper::upgrade::on(&mut response));
    }
    response.map(|body| body.boxed())
}

/// Once both sides of a protocol switch have handed over their connections, copies bytes
/// between them in a task the drain tracks.
pub fn splice_upgraded(ctx: &ProxyContext, client: OnUpgrade, upstream: OnUpgrade) {
    let abort = ctx.abort.clone();
    ctx.connections.spawn(async move {
        let (client, upstream) = match tokio::try_join!(client, upstream) {
            Ok(both) => both,
            Err(err) => {
                debug!(error = %err, "protocol switch did not complete");
                return;
            }
        };
        let (mut client, mut upstream) = (TokioIo::new(client), TokioIo::new(upstream));
        tokio::select! {
            copied = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {
                if let Err(err) = copied {
                    debug!(error = %err, "switched-protocol connection ended with an error");
                }
            }
            () = abort.cancelled() => {}
        }
    });
}

/// An answer made by the agent itself, counted and marked so it is told apart from the app's.
pub fn local_reply(
    status: StatusCode,
    reason: &str,
    counters: &ServiceCounters,
) -> Response<ProxyBody> {
    counters.count_response(status);
    counters.local_replies.fetch_add(1, Relaxed);
    agent_reply(status, reason)
}

/// An answer made by the agent itself, marked so it is told apart from the app's.
pub fn agent_reply(status: StatusCode, reason: &str) -> Response<ProxyBody> {
    let body = Full::new(Bytes::from(format!("{reason}\n")))
        .map_err(|never: Infallible| match never {})
        .boxed();
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
        .headers_mut()
        .insert(LOCAL_REPLY, HeaderValue::from_static("1"));
    response
}

/// Whether an answer is a failure of the endpoint: a 5xx, or for gRPC (whose errors travel as
/// HTTP 200) a status that says the server could not do the work.
pub fn is_failure(status: StatusCode, headers: &HeaderMap) -> bool {
    if status.is_server_error() {
        return true;
    }
    const UNKNOWN: &[u8] = b"2";
    const DEADLINE_EXCEEDED: &[u8] = b"4";
    const INTERNAL: &[u8] = b"13";
    const UNAVAILABLE: &[u8] = b"14";
    is_grpc(headers)
        && headers.get("grpc-status").is_some_and(|code| {
            [UNKNOWN, DEADLINE_EXCEEDED, INTERNAL, UNAVAILABLE].contains(&code.as_bytes())
        })
}

pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// gRPC clients read errors from `grpc-status`, not the HTTP status: an answer of the agent's
/// own to a gRPC request takes that shape (trailers-only, HTTP 200), with the gRPC status that
/// stands for its HTTP status. Answers from apps pass unchanged.
pub fn grpc_shaped(response: Response<ProxyBody>) -> Response<ProxyBody> {
    if !response.headers().contains_key(LOCAL_REPLY) {
        return response;
    }
    let (mut parts, _) = response.into_parts();
    let code = match parts.status {
        StatusCode::BAD_REQUEST => 3,     // INVALID_ARGUMENT
        StatusCode::NOT_FOUND => 12,      // UNIMPLEMENTED
        StatusCode::GATEWAY_TIMEOUT => 4, // DEADLINE_EXCEEDED
        StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE => 14, // UNAVAILABLE
        _ => 2,                           // UNKNOWN
    };
    let message = parts.status.canonical_reason().unwrap_or("error");
    parts.status = StatusCode::OK;
    let headers = &mut parts.headers;
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    headers.insert("grpc-status", HeaderValue::from(code));
    if let Ok(message) = HeaderValue::from_str(&format!("weft: {message}")) {
        headers.insert("grpc-message", message);
    }
    let body = Full::new(Bytes::new())
        .map_err(|never: Infallible| match never {})
        .boxed();
    Response::from_parts(parts, body)
}

/// Header of the agent's own answers.
pub const LOCAL_REPLY: &str = "x-weft-local-reply";

/// Headers of one connection, not of the request (RFC 9110 §7.6.1): never forwarded.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHORIZATION,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
    ] {
        headers.remove(name);
    }
    // `te: trailers` is how gRPC clients say they accept trailers; any other value is hop-by-hop.
    if headers.get(header::TE).is_some_and(|v| v != "trailers") {
        headers.remove(header::TE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_not_forwarded() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, "keep-alive, x-private".parse().unwrap());
        headers.insert("x-private", "1".parse().unwrap());
        headers.insert("keep-alive", "timeout=5".parse().unwrap());
        headers.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        headers.insert(header::TE, "trailers".parse().unwrap());
        headers.insert("x-weft-deadline", "1".parse().unwrap());
        strip_hop_by_hop(&mut headers);
        let mut left: Vec<&str> = headers.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, ["te", "x-weft-deadline"]);
        headers.insert(header::TE, "gzip".parse().unwrap());
        strip_hop_by_hop(&mut headers);
        assert!(!headers.contains_key(header::TE));
    }

    #[test]
    fn local_replies_are_counted_and_marked() {
        let counters = ServiceCounters::default();
        let response = local_reply(StatusCode::SERVICE_UNAVAILABLE, "none", &counters);
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()["x-weft-local-reply"], "1");
        assert_eq!(counters.local_replies.load(Relaxed), 1);
        assert_eq!(counters.responses_5xx.load(Relaxed), 1);
    }
}

#[cfg(test)]
mod grpc_tests {
    use super::*;

    #[test]
    fn agent_answers_to_grpc_requests_carry_a_grpc_status() {
        for (status, code) in [
            (StatusCode::GATEWAY_TIMEOUT, "4"),
            (StatusCode::SERVICE_UNAVAILABLE, "14"),
            (StatusCode::BAD_GATEWAY, "14"),
            (StatusCode::NOT_FOUND, "12"),
            (StatusCode::BAD_REQUEST, "3"),
        ] {
            let mut reply = agent_reply(status, "why");
            reply
                .headers_mut()
                .insert(RETRIES_EXHAUSTED, HeaderValue::from_static("1"));
            let shaped = grpc_shaped(reply);
            assert_eq!(shaped.status(), StatusCode::OK);
            assert_eq!(shaped.headers()["grpc-status"], code, "{status}");
            assert_eq!(shaped.headers()[header::CONTENT_TYPE], "application/grpc");
            assert!(shaped.headers().contains_key(RETRIES_EXHAUSTED));
            assert!(hyper::body::Body::is_end_stream(shaped.body()));
        }
        // An app's own answer is left alone.
        let mut app = Response::new(
            Full::new(Bytes::from_static(b"x"))
                .map_err(|n: Infallible| match n {})
                .boxed(),
        );
        *app.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        assert_eq!(grpc_shaped(app).status(), StatusCode::SERVICE_UNAVAILABLE);
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc+proto"),
        );
        assert!(is_grpc(&headers));
    }
}

//! The destination side of HTTP carried through a tunnel: requests from the stream are handed
//! to the app one by one over a connection of their own, so the agent can answer a request
//! whose deadline passed in transit without bothering the app, and mark a failing answer whose
//! trace this agent already gave up retrying (see `trace`).
//!
//! The stream lives as long as its app connection: when the app closes it (an idle keep-alive
//! timeout, a restart), the stream is finished gracefully, so the source agent's pooled
//! connection ends and its next request opens a new stream and a new app connection. A request
//! caught in between never reaches the app and is answered so (see [`UNDELIVERED`]).
use std::{
    convert::Infallible,
    net::SocketAddr,
    pin::pin,
    sync::{atomic::Ordering::Relaxed, Arc},
    time::{Instant, SystemTime},
};

use http::{
    header::{self, HeaderValue},
    Request, Response, StatusCode,
};
use http_body_util::BodyExt;
use hyper::{
    body::Incoming,
    client::conn::{http1, http2},
    server::conn,
    service::service_fn,
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
    sync::Mutex,
};
use tracing::debug;

use super::{
    deadline::request_deadline,
    http::{
        agent_reply, grpc_shaped, is_failure, is_grpc, splice_upgraded, strip_hop_by_hop,
        until_finished, ProxyBody, LOCAL_REPLY,
    },
    observe::{flags, CountedBody, PendingRecord, RequestBytes, RequestRecord},
    retry::RETRIES_EXHAUSTED,
    trace::ensure_trace,
};
use crate::{
    inbound::Arrival,
    proxy::ProxyContext,
    stats::{Reporter, UNKNOWN},
};

/// Header of an answer to a request that was not written to the app because its connection had
/// closed: the source agent treats it as a failed connect, which is safe to retry.
pub const UNDELIVERED: &str = "x-weft-undelivered";

/// The connection to the app that a stream's requests go through.
enum AppConnection {
    /// One request at a time, as the stream's own HTTP/1.1 requests arrive.
    Http1(Mutex<http1::SendRequest<AppBody>>),
    Http2(http2::SendRequest<AppBody>),
}

type AppBody = CountedBody<Incoming>;

impl AppConnection {
    async fn send(&self, request: Request<AppBody>) -> hyper::Result<Response<Incoming>> {
        match self {
            Self::Http1(sender) => {
                let mut sender = sender.lock().await;
                sender.ready().await?;
                sender.send_request(request).await
            }
            Self::Http2(sender) => sender.clone().send_request(request).await,
        }
    }
}

/// Serves the HTTP requests arriving on `stream` to `app`, in the stream's protocol. `stream` is
/// a tunnel stream from another agent, or a plaintext connection from a client outside the
/// mesh (`client_facing`: the agent's own answers to gRPC requests then take the gRPC form; to
/// another agent they keep their HTTP status, which that agent judges and shapes itself).
pub async fn serve<S>(
    ctx: Arc<ProxyContext>,
    arrival: Arrival,
    stream: S,
    app: TcpStream,
    http2: bool,
    client_facing: bool,
) -> Result<(), hyper::Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let _ = app.set_nodelay(true);
    let app = TokioIo::new(app);
    // Cancelled when the app connection ends or the agent drains.
    let finish = ctx.draining.child_token();
    let app_closed = finish.clone();
    let connection = if http2 {
        let (sender, connection) = http2::handshake(TokioExecutor::new(), app).await?;
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                debug!(error = %err, "app HTTP/2 connection ended");
            }
            app_closed.cancel();
        });
        AppConnection::Http2(sender)
    } else {
        let (sender, connection) = http1::handshake(app).await?;
        tokio::spawn(async move {
            if let Err(err) = connection.with_upgrades().await {
                debug!(error = %err, "app HTTP/1.1 connection ended");
            }
            app_closed.cancel();
        });
        AppConnection::Http1(Mutex::new(sender))
    };
    let connection = Arc::new(connection);
    let service_ctx = Arc::clone(&ctx);
    let arrival = Arc::new(arrival);
    let service = service_fn(move |mut request: Request<Incoming>| {
        let (ctx, arrival, connection) = (
            Arc::clone(&service_ctx),
            Arc::clone(&arrival),
            Arc::clone(&connection),
        );
        async move {
            let grpc = is_grpc(request.headers());
            let (started, start_time) = (Instant::now(), SystemTime::now());
            let (version, method, uri) = (
                request.version(),
                request.method().clone(),
                request.uri().clone(),
            );
            let host = request.headers().get(http::header::HOST).cloned();
            // A request from outside the mesh may come without a trace: it starts here.
            let trace_id = Some(ensure_trace(request.headers_mut()));
            let (request, request_bytes) = {
                let (parts, body) = request.into_parts();
                let (body, count) = CountedBody::new(body);
                (Request::from_parts(parts, body), count)
            };
            let service = arrival.service.clone().unwrap_or_else(|| UNKNOWN.into());
            // Recorded even if the client goes away before the answer (status 0, `DC`).
            let mut pending = PendingRecord::new(RequestRecord {
                ctx: Arc::clone(&ctx),
                reporter: Reporter::Destination,
                source: arrival.source.clone(),
                source_address: arrival.source_address,
                destination: arrival.workload.peer.clone(),
                destination_address: Some(SocketAddr::V4(arrival.target)),
                service,
                transport: arrival.transport,
                grpc,
                version,
                method,
                uri,
                host,
                trace_id,
                started,
                start_time,
                request_bytes: RequestBytes::Counted(request_bytes),
                status: 0,
                grpc_status: "",
                flags: flags::NONE,
                retries: 0,
            });
            let (mut response, flags) =
                deliver(&ctx, &arrival, &connection, request, trace_id).await;
            if grpc && client_facing {
                response = grpc_shaped(response);
            } else if grpc && response.headers().contains_key(LOCAL_REPLY) {
                // The source agent reads gRPC errors from an HTTP status in a gRPC answer.
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/grpc"),
                );
            }
            if let Some(record) = pending.record_mut() {
                record.flags = flags;
            }
            Ok::<_, Infallible>(pending.respond(response))
        }
    });
    let stream = TokioIo::new(stream);
    let served = if http2 {
        let connection =
            conn::http2::Builder::new(TokioExecutor::new()).serve_connection(stream, service);
        until_finished(&ctx, &finish, pin!(connection), |c| c.graceful_shutdown()).await
    } else {
        let connection = conn::http1::Builder::new()
            .serve_connection(stream, service)
            .with_upgrades();
        until_finished(&ctx, &finish, pin!(connection), |c| c.graceful_shutdown()).await
    };
    served.unwrap_or(Ok(()))
}

/// Hands one request to the app: its answer, and the response flags it is recorded with.
async fn deliver(
    ctx: &ProxyContext,
    arrival: &Arrival,
    app: &AppConnection,
    mut request: Request<AppBody>,
    trace: Option<u128>,
) -> (Response<ProxyBody>, &'static str) {
    let pod = &arrival.workload.id;
    arrival.counters.http_requests.fetch_add(1, Relaxed);
    match request_deadline(request.headers(), SystemTime::now()) {
        Ok(Some(deadline)) if deadline <= SystemTime::now() => {
            arrival.counters.deadline_exceeded.fetch_add(1, Relaxed);
            debug!(%pod, "request arrived after its deadline; answered without the app");
            let reply = agent_reply(
                StatusCode::GATEWAY_TIMEOUT,
                "the request's deadline had passed",
            );
            return (reply, flags::DEADLINE_EXCEEDED);
        }
        Ok(_) => {}
        Err(err) => {
            let reply = agent_reply(StatusCode::BAD_REQUEST, &err.to_string());
            return (reply, flags::BAD_REQUEST);
        }
    }
    // A protocol switch (WebSocket from a client outside the mesh): once the app agrees, both
    // connections are handed over and spliced.
    let client_side = request
        .headers()
        .contains_key(header::UPGRADE)
        .then(|| hyper::upgrade::on(&mut request));
    let mut response = match app.send(request).await {
        Ok(mut response) => {
            match client_side {
                Some(client_side) if response.status() == StatusCode::SWITCHING_PROTOCOLS => {
                    splice_upgraded(ctx, client_side, hyper::upgrade::on(&mut response));
                }
                _ => strip_hop_by_hop(response.headers_mut()),
            }
            response.map(|body| body.boxed())
        }
        Err(err) if err.is_closed() || err.is_canceled() => {
            debug!(%pod, error = %err, "the app connection had closed; request not delivered");
            let mut reply = agent_reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "the connection to the app had closed",
            );
            reply
                .headers_mut()
                .insert(UNDELIVERED, HeaderValue::from_static("1"));
            return (reply, flags::UPSTREAM_CONNECT_FAILURE);
        }
        Err(err) => {
            debug!(%pod, error = %err, "the app failed before answering");
            let reply = agent_reply(StatusCode::BAD_GATEWAY, "the app failed before answering");
            return (reply, flags::UPSTREAM_RESET);
        }
    };
    let gave_up = trace.is_some_and(|trace| ctx.exhausted.contains(trace, Instant::now()));
    if gave_up && is_failure(response.status(), response.headers()) {
        response
            .headers_mut()
            .insert(RETRIES_EXHAUSTED, HeaderValue::from_static("1"));
    }
    (response, flags::NONE)
}

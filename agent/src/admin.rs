//! Node-local admin endpoint: `/stats` (JSON counters), `/ready`, `/healthz`.
use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use anyhow::{Context, Result};
use http_body_util::Full;
use hyper::{
    body::Bytes, header, server::conn::http1, service::service_fn, Method, Request, Response,
    StatusCode,
};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::{
    datapath::Datapath, enrollment::PodStatusTable, identity::CertificateStore, lock,
    proxy::ProxyContext, stats::Stats,
};

pub struct AdminState {
    pub datapath: Arc<Datapath>,
    /// The mesh state in force (services and their endpoints).
    pub proxy: Arc<ProxyContext>,
    pub stats: Arc<Stats>,
    pub pods: PodStatusTable,
    pub certs: Option<Arc<CertificateStore>>,
}

pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on admin address {addr}"))
}

pub async fn serve(listener: TcpListener, state: Arc<AdminState>, stop: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(err) => {
                // Usually fd exhaustion: back off instead of spinning.
                debug!(error = %err, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let state = Arc::clone(&state);
                async move { Ok::<_, Infallible>(route(&state, &req)) }
            });
            if let Err(err) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(error = %err, "admin connection error");
            }
        });
    }
}

fn route<B>(state: &AdminState, req: &Request<B>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
    }
    match req.uri().path() {
        "/healthz" | "/ready" => text(StatusCode::OK, "ok\n"),
        "/stats" => {
            let ebpf: serde_json::Map<_, _> = state
                .datapath
                .counters()
                .into_iter()
                .map(|(name, value)| (name.to_owned(), value.into()))
                .collect();
            let (connecting, established) = state.datapath.tracked_connections();
            let body = json!({
                "ebpf": ebpf,
                "tracked_connections": { "connecting": connecting, "established": established },
                "unknown_origin": state.stats.unknown_origin.load(std::sync::atomic::Ordering::Relaxed),
                "pods": &*lock(&state.pods),
                "flows": state.stats.snapshot(),
                "inbound": state.stats.inbound_snapshot(),
                "tunnels": &state.stats.tunnels,
                "services": state.stats.services_snapshot(),
                "endpoints": state.proxy.state.get().services.endpoint_snapshot(std::time::Instant::now()),
                "certificates": state.certs.as_ref().map(|certs| certs.snapshot()),
            });
            let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/json"),
            );
            response
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response
}

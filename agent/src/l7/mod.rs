//! L7: connections from enrolled pods to a service's virtual address. The first bytes tell
//! HTTP from anything else (`detect`); HTTP is proxied request by request (`http`), routed by
//! the service's routes (`route`, `service`), balanced across endpoints (`balance`), retried
//! within budgets (`retry`) and deadlines (`deadline`) over pooled connections (`pool`);
//! anything else is balanced per connection and relayed as opaque TCP.
pub mod balance;
pub mod body;
pub mod deadline;
pub mod deliver;
pub mod detect;
pub mod http;
pub mod observe;
pub mod pool;
pub mod retry;
pub mod route;
pub mod service;
pub mod trace;

use std::{
    net::SocketAddrV4,
    sync::{atomic::Ordering::Relaxed, Arc},
    time::Instant,
};

use bytes::Bytes;
use tokio::net::TcpStream;
use tracing::warn;

use self::{
    detect::{detect, Prefixed, Protocol},
    service::ServicePortEntry,
};
use crate::{
    config::AppProtocol,
    proxy::{open_upstream, refuse, relay, Destination, PodProxy, ProxyContext},
    stats::Transport,
};

/// How many endpoints an opaque connection tries before the client is refused.
const OPAQUE_CONNECT_TRIES: usize = 3;

/// Serves a connection an enrolled pod made to a service's virtual address `vip`.
pub async fn serve_service(
    ctx: Arc<ProxyContext>,
    pod: Arc<PodProxy>,
    mut client: TcpStream,
    vip: SocketAddrV4,
    entry: Arc<ServicePortEntry>,
) {
    let _ = client.set_nodelay(true);
    let declared = entry.backend.protocol;
    let (protocol, prefix) = if declared == Some(AppProtocol::Tcp)
        || (declared.is_none() && ctx.opaque_ports.contains(&vip.port()))
    {
        (Protocol::Opaque, Bytes::new())
    } else if matches!(declared, Some(AppProtocol::Http2 | AppProtocol::Grpc)) {
        (Protocol::Http2, Bytes::new())
    } else {
        match detect(&mut client, ctx.protocol_detection_timeout).await {
            // A port declared HTTP is HTTP/1 unless the client opens with the HTTP/2 preface.
            Ok((Protocol::Opaque, prefix)) if declared == Some(AppProtocol::Http) => {
                (Protocol::Http1, prefix)
            }
            Ok(detected) => detected,
            Err(err) => {
                warn!(pod = %pod.id, service = %entry.backend.id, error = %err, "connection failed during protocol detection");
                return;
            }
        }
    };
    if protocol == Protocol::Opaque {
        relay_opaque(&ctx, &pod, client, prefix, vip, &entry).await;
    } else {
        let client_address = client.peer_addr().ok();
        http::serve(
            ctx,
            pod,
            Prefixed::new(prefix, client),
            client_address,
            protocol,
            vip,
            &entry,
        )
        .await;
    }
}

/// Balances an opaque connection: tries endpoints until one accepts, then relays bytes.
async fn relay_opaque(
    ctx: &ProxyContext,
    pod: &PodProxy,
    client: TcpStream,
    prefix: Bytes,
    vip: SocketAddrV4,
    entry: &ServicePortEntry,
) {
    let backend = &entry.backend;
    let counters = &backend.counters;
    counters.connections.fetch_add(1, Relaxed);
    let mut avoid = Vec::new();
    // Without any endpoint to blame, a refusal is counted against the service's address.
    let mut refused = (
        Destination {
            address: vip,
            transport: Transport::Plaintext,
            service: Some(&backend.host),
        },
        String::new(),
    );
    for _ in 0..OPAQUE_CONNECT_TRIES {
        let pick = match backend.balancer.pick(&avoid, Instant::now()) {
            Ok(pick) => pick,
            Err(err) => {
                counters.no_endpoint.fetch_add(1, Relaxed);
                refused.1 = format!("{}: {err}", backend.id);
                break;
            }
        };
        let endpoint = pick.endpoint();
        let started = Instant::now();
        match open_upstream(ctx, pod, endpoint, None).await {
            Ok((upstream, transport)) => {
                pick.success(started.elapsed(), Instant::now());
                let to = Destination {
                    address: endpoint,
                    transport,
                    service: Some(&backend.host),
                };
                relay(ctx, pod, client, &to, upstream, prefix).await;
                return;
            }
            Err(err) => {
                pick.failure(started.elapsed(), Instant::now());
                counters.connect_failures.fetch_add(1, Relaxed);
                avoid.push(endpoint);
                refused = (
                    Destination {
                        address: endpoint,
                        transport: err.transport,
                        service: Some(&backend.host),
                    },
                    format!("{}: {err}", backend.id),
                );
            }
        }
    }
    let (to, reason) = refused;
    refuse(ctx, pod, &to, &client, reason);
}

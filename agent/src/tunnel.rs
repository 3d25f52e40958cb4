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
    io,
    net::{Ipv4Addr, SocketAddrV4},
    sync::{atomic::Ordering::Relaxed, Arc, Mutex},
    time::Duration,
};

use anyhow::{anyhow, bail, Context, Result};
use http_body_util::Empty;
use hyper::{
    body::Bytes, client::conn::http2, header::HeaderValue, upgrade::Upgraded, Method, Request,
    StatusCode,
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use tokio::net::TcpSocket;
use tokio_rustls::TlsConnector;
use tracing::{debug, info};

use crate::{
    identity::{CertificateStore, Identity, WorkloadCertificate},
    lock,
    state::Workload,
    stats::Stats,
};

/// The header carrying the client pod's address, so the destination can deliver with it as source.
pub const FORWARDED: &str = "forwarded";
/// HTTP/2 windows large enough for bulk transfers over one stream.
pub const STREAM_WINDOW_BYTES: u32 = 4 * 1024 * 1024;
pub const CONNECTION_WINDOW_BYTES: u32 = 16 * 1024 * 1024;

#[derive(Clone, PartialEq, Eq, Hash)]
struct PoolKey {
    source: Identity,
    node: String,
    destination: Identity,
}

struct PooledConnection {
    sender: http2::SendRequest<Empty<Bytes>>,
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

    /// Closes the pooled connections of source identities no longer on this node (their open
    /// streams finish first).
    pub fn retain_sources(&self, keep: &std::collections::HashSet<Identity>) {
        lock(&self.slots).retain(|key, _| keep.contains(&key.source));
    }

    /// Opens a stream from `source` (a pod at `client_ip`) to `target` on `destination`.
    pub async fn open_stream(
        &self,
        source: &Identity,
        client_ip: Ipv4Addr,
        destination: &Workload,
        target: SocketAddrV4,
    ) -> Result<TokioIo<Upgraded>> {
        let mut sender = self.sender(source, destination).await?;
        let request = Request::builder()
            .method(Method::CONNECT)
            .uri(target.to_string())
            .header(
                FORWARDED,
                HeaderValue::from_str(&format!("for={client_ip}"))?,
            )
            .body(Empty::<Bytes>::new())
            .context("building the CONNECT request")?;
        let response = sender
            .send_request(request)
            .await
            .context("sending CONNECT over the tunnel")?;
        if response.status() != StatusCode::OK {
            bail!(
                "the destination agent refused the stream: {}",
                response.status()
            );
        }
        let upgraded = hyper::upgrade::on(response)
            .await
            .context("the tunnel stream did not open")?;
        Ok(TokioIo::new(upgraded))
    }

    /// A sender on a live pooled connection whose client certificate is current, dialling one
    /// if needed. Concurrent callers for the same key wait for a single dial.
    async fn sender(
        &self,
        source: &Identity,
        destination: &Workload,
    ) -> Result<http2::SendRequest<Empty<Bytes>>> {
        let key = PoolKey {
            source: source.clone(),
            node: destination.node.clone(),
            destination: destination.identity.clone(),
        };
        let slot = Arc::clone(lock(&self.slots).entry(key).or_default());
        let mut slot = slot.lock().await;
        let current = self.certs.certificate(source)?;
        if let Some(pooled) = slot.as_ref() {
            if !pooled.sender.is_closed() && Arc::ptr_eq(&pooled.certificate, &current) {
                return Ok(pooled.sender.clone());
            }
        }
        let pooled = self.dial(source, destination).await?;
        let sender = pooled.sender.clone();
        *slot = Some(pooled);
        Ok(sender)
    }

    async fn dial(&self, source: &Identity, destination: &Workload) -> Result<PooledConnection> {
        let address = SocketAddrV4::new(destination.ip, self.tunnel_port);
        let (tls_config, certificate) = self.certs.client_config(source, &destination.identity)?;
        // Opened in the agent's own namespace: the connection is shared by all local pods of
        // `source`; each stream names its pod in the `forwarded` header.
        let socket = TcpSocket::new_v4().context("creating a tunnel socket")?;
        socket2::SockRef::from(&socket)
            .set_mark(self.socket_mark)
            .context("marking a tunnel socket")?;
        socket.set_nodelay(true)?;
        let tcp = tokio::time::timeout(self.connect_timeout, socket.connect(address.into()))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))
            .and_then(|connected| connected)
            .with_context(|| format!("connecting to the tunnel port {address}"))?;
        let tls = tokio::time::timeout(
            self.connect_timeout,
            TlsConnector::from(tls_config)
                .connect(ServerName::IpAddress(destination.ip.into()), tcp),
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
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .initial_stream_window_size(STREAM_WINDOW_BYTES)
            .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
            .handshake(TokioIo::new(tls))
            .await
            .with_context(|| format!("HTTP/2 handshake with {address}"))?;
        info!(%source, destination = %destination.identity, node = %destination.node, %address, "tunnel connection opened");
        let stats = Arc::clone(&self.stats);
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                stats.tunnels.connection_errors.fetch_add(1, Relaxed);
                debug!(%address, error = %err, "tunnel connection ended with an error");
            }
        });
        Ok(PooledConnection {
            sender,
            certificate,
        })
    }
}

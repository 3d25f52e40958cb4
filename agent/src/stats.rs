//! In-memory L4 counters: outbound per (source pod, original destination, transport), inbound per
//! destination pod, and the tunnels' own. Counters are shared with the connection tasks and move
//! while a connection is open, not only when it closes.
use std::{
    collections::HashMap,
    net::SocketAddrV4,
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc, Mutex,
    },
};

use serde::Serialize;

use crate::{config::PodId, lock};

#[derive(Default)]
pub struct FlowCounters {
    pub opened: AtomicU64,
    pub closed: AtomicU64,
    pub failed: AtomicU64,
    /// Bytes from the pod towards the destination.
    pub bytes_sent: AtomicU64,
    /// Bytes from the destination back to the pod.
    pub bytes_received: AtomicU64,
}

/// How an outbound connection left the pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    /// Through an mTLS tunnel to a meshed workload.
    Mtls,
    /// As plain TCP: the destination is not in the mesh (or weft runs without identities).
    Plaintext,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct FlowSnapshot {
    pub source_pod: PodId,
    pub destination: SocketAddrV4,
    pub transport: Transport,
    pub opened: u64,
    pub closed: u64,
    pub failed: u64,
    pub active: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

/// Connections arriving at one local pod.
#[derive(Default, Serialize)]
pub struct InboundCounters {
    /// Tunnel streams delivered to the app.
    pub mtls: AtomicU64,
    /// Plaintext connections delivered (PERMISSIVE).
    pub plaintext: AtomicU64,
    /// Plaintext connections refused (STRICT).
    pub plaintext_rejected: AtomicU64,
    /// Connections refused by an authorization policy.
    pub denied: AtomicU64,
    /// The app could not be reached.
    pub failed: AtomicU64,
    pub bytes_to_app: AtomicU64,
    pub bytes_from_app: AtomicU64,
    /// HTTP requests served from tunnel streams that carry HTTP.
    pub http_requests: AtomicU64,
    /// Requests answered 504 on arrival: their deadline had passed.
    pub deadline_exceeded: AtomicU64,
}

/// The tunnels between agents.
#[derive(Default, Serialize)]
pub struct TunnelCounters {
    /// TLS handshakes this agent made as a client (one per pooled connection).
    pub client_handshakes: AtomicU64,
    /// TLS handshakes this agent accepted as a server.
    pub server_handshakes: AtomicU64,
    /// Handshakes refused: bad or missing client certificate, another CA, garbage, timeouts.
    pub rejected_handshakes: AtomicU64,
    /// Streams refused before reaching any app: not CONNECT, bad or non-local target, a source
    /// address that does not belong to the peer's identity.
    pub rejected_streams: AtomicU64,
    /// Tunnel connections that ended with a protocol error.
    pub connection_errors: AtomicU64,
}

/// Traffic to one service port, as the client side sees it.
#[derive(Default, Serialize)]
pub struct ServiceCounters {
    /// HTTP requests from pods.
    pub requests: AtomicU64,
    /// Opaque TCP connections from pods.
    pub connections: AtomicU64,
    pub responses_1xx: AtomicU64,
    pub responses_2xx: AtomicU64,
    pub responses_3xx: AtomicU64,
    pub responses_4xx: AtomicU64,
    pub responses_5xx: AtomicU64,
    /// Answers made by the agent (no endpoint, deadline, timeouts, failed connects).
    pub local_replies: AtomicU64,
    pub retries: AtomicU64,
    /// Retries the policy allowed but the retry budget refused.
    pub retries_suppressed: AtomicU64,
    /// Requests answered 504 because their deadline passed (on arrival or between tries).
    pub deadline_exceeded: AtomicU64,
    /// Requests or connections refused because no endpoint could take them.
    pub no_endpoint: AtomicU64,
    /// Endpoints of an opaque connection that refused it.
    pub connect_failures: AtomicU64,
    pub mirrored: AtomicU64,
    /// Copies not sent because the shadow already had as many in flight as allowed.
    pub mirrors_skipped: AtomicU64,
}

impl ServiceCounters {
    pub fn count_response(&self, status: http::StatusCode) {
        let class = match status.as_u16() / 100 {
            1 => &self.responses_1xx,
            2 => &self.responses_2xx,
            3 => &self.responses_3xx,
            4 => &self.responses_4xx,
            _ => &self.responses_5xx,
        };
        class.fetch_add(1, Relaxed);
    }
}

#[derive(Default)]
pub struct Stats {
    flows: Mutex<HashMap<(PodId, SocketAddrV4, Transport), Arc<FlowCounters>>>,
    services: Mutex<HashMap<String, Arc<ServiceCounters>>>,
    inbound: Mutex<HashMap<PodId, Arc<InboundCounters>>>,
    pub tunnels: TunnelCounters,
    /// Connections accepted on a pod listener that the eBPF programs did not redirect.
    pub unknown_origin: AtomicU64,
}

impl Stats {
    pub fn flow(
        &self,
        pod: &PodId,
        destination: SocketAddrV4,
        transport: Transport,
    ) -> Arc<FlowCounters> {
        let mut flows = lock(&self.flows);
        Arc::clone(
            flows
                .entry((pod.clone(), destination, transport))
                .or_default(),
        )
    }

    /// Counters of the service port `id` (`namespace/name:port`).
    pub fn service(&self, id: &str) -> Arc<ServiceCounters> {
        let mut services = lock(&self.services);
        if let Some(counters) = services.get(id) {
            return Arc::clone(counters);
        }
        Arc::clone(services.entry(id.to_owned()).or_default())
    }

    pub fn services_snapshot(&self) -> serde_json::Value {
        by_name(&lock(&self.services))
    }

    pub fn inbound(&self, pod: &PodId) -> Arc<InboundCounters> {
        Arc::clone(lock(&self.inbound).entry(pod.clone()).or_default())
    }

    /// Inbound counters by destination pod, serialisable as they are (atomics serialise as numbers).
    pub fn inbound_snapshot(&self) -> serde_json::Value {
        by_name(&lock(&self.inbound))
    }

    pub fn snapshot(&self) -> Vec<FlowSnapshot> {
        let flows = lock(&self.flows);
        let mut snapshot: Vec<FlowSnapshot> = flows
            .iter()
            .map(|((pod, destination, transport), c)| {
                let (opened, closed, failed) = (
                    c.opened.load(Relaxed),
                    c.closed.load(Relaxed),
                    c.failed.load(Relaxed),
                );
                FlowSnapshot {
                    source_pod: pod.clone(),
                    destination: *destination,
                    transport: *transport,
                    opened,
                    closed,
                    failed,
                    active: opened.saturating_sub(closed + failed),
                    bytes_sent: c.bytes_sent.load(Relaxed),
                    bytes_received: c.bytes_received.load(Relaxed),
                }
            })
            .collect();
        snapshot.sort_by(|a, b| {
            (&a.source_pod, a.destination, a.transport).cmp(&(
                &b.source_pod,
                b.destination,
                b.transport,
            ))
        });
        snapshot
    }
}

/// Counters keyed by name, sorted, as JSON (atomics serialise as numbers).
fn by_name<K: ToString, C: Serialize>(counters: &HashMap<K, Arc<C>>) -> serde_json::Value {
    let sorted: std::collections::BTreeMap<String, &C> = counters
        .iter()
        .map(|(name, counters)| (name.to_string(), counters.as_ref()))
        .collect();
    serde_json::to_value(sorted).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flows_are_counted_per_pod_and_destination() {
        let stats = Stats::default();
        let (web, db) = (PodId::new("default", "web"), PodId::new("default", "db"));
        let dst: SocketAddrV4 = "10.0.0.1:80".parse().unwrap();
        stats
            .flow(&web, dst, Transport::Mtls)
            .opened
            .fetch_add(1, Relaxed);
        stats
            .flow(&web, dst, Transport::Mtls)
            .opened
            .fetch_add(1, Relaxed);
        stats
            .flow(&web, dst, Transport::Mtls)
            .closed
            .fetch_add(1, Relaxed);
        stats
            .flow(&web, dst, Transport::Mtls)
            .bytes_sent
            .fetch_add(10, Relaxed);
        stats
            .flow(&db, dst, Transport::Plaintext)
            .failed
            .fetch_add(1, Relaxed);
        let snapshot = stats.snapshot();
        assert_eq!(snapshot.len(), 2);
        let web_flow = snapshot.iter().find(|f| f.source_pod == web).unwrap();
        assert_eq!(
            (
                web_flow.opened,
                web_flow.closed,
                web_flow.active,
                web_flow.bytes_sent
            ),
            (2, 1, 1, 10)
        );
        let db_flow = snapshot.iter().find(|f| f.source_pod == db).unwrap();
        assert_eq!((db_flow.failed, db_flow.active), (1, 0));
    }
}

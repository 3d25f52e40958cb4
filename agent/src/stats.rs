//! In-memory counters: connections and bytes per (source pod, original destination,
//! transport) and per (source, destination pod) on arrival, HTTP requests per label set, each
//! service port's and the tunnels' own. Counters are shared with the connection tasks and move
//! while a connection is open, not only when it closes. `metrics` renders them for Prometheus.
use std::{
    collections::{HashMap, HashSet},
    hash::Hash,
    net::SocketAddrV4,
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use serde::Serialize;

use crate::{
    config::{PodId, PodSpec},
    lock,
    state::MeshState,
};

/// The value of a label nobody knows, as Istio writes it.
pub const UNKNOWN: &str = "unknown";

/// One end of a connection or request, as metrics and the access log name it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Peer {
    /// The workload (owner) name.
    pub workload: Arc<str>,
    pub namespace: Arc<str>,
    /// The SPIFFE identity, when the mesh knows it.
    pub principal: Arc<str>,
}

impl Peer {
    pub fn new(workload: &str, namespace: &str, principal: Option<String>) -> Self {
        Self {
            workload: workload.into(),
            namespace: namespace.into(),
            principal: principal.as_deref().unwrap_or(UNKNOWN).into(),
        }
    }

    /// A peer outside the mesh (or one the agent cannot name).
    pub fn unknown() -> Self {
        Self::new(UNKNOWN, UNKNOWN, None)
    }

    pub fn is_unknown(&self) -> bool {
        &*self.workload == UNKNOWN
    }

    /// `namespace/workload`, or `unknown`.
    pub fn id(&self) -> String {
        if self.is_unknown() {
            UNKNOWN.to_owned()
        } else {
            format!("{}/{}", self.namespace, self.workload)
        }
    }
}

/// Connections between one client and one destination.
#[derive(Default)]
pub struct FlowCounters {
    /// Connections relayed (established upstream).
    pub opened: AtomicU64,
    /// Relayed connections that have ended.
    pub closed: AtomicU64,
    /// Connections whose destination could not be reached.
    pub failed: AtomicU64,
    /// Bytes from the client towards the destination.
    pub bytes_sent: AtomicU64,
    /// Bytes from the destination back to the client.
    pub bytes_received: AtomicU64,
}

impl FlowCounters {
    /// The meters of one connection of this flow: (bytes from the client, bytes from the
    /// destination), counted into the flow and into `connection`.
    pub fn meters<'a>(&'a self, connection: &'a ConnectionBytes) -> (ByteMeter<'a>, ByteMeter<'a>) {
        (
            ByteMeter {
                flow: &self.bytes_sent,
                connection: &connection.sent,
            },
            ByteMeter {
                flow: &self.bytes_received,
                connection: &connection.received,
            },
        )
    }

    pub fn totals(&self) -> FlowTotals {
        FlowTotals {
            opened: self.opened.load(Relaxed),
            closed: self.closed.load(Relaxed),
            failed: self.failed.load(Relaxed),
            bytes_sent: self.bytes_sent.load(Relaxed),
            bytes_received: self.bytes_received.load(Relaxed),
        }
    }

    fn add(&self, other: &FlowCounters) {
        for (total, part) in [
            (&self.opened, &other.opened),
            (&self.closed, &other.closed),
            (&self.failed, &other.failed),
            (&self.bytes_sent, &other.bytes_sent),
            (&self.bytes_received, &other.bytes_received),
        ] {
            total.fetch_add(part.load(Relaxed), Relaxed);
        }
    }

    fn activity(&self) -> (u64, bool) {
        let opened = self.opened.load(Relaxed);
        let closed = self.closed.load(Relaxed);
        let total = opened
            + closed
            + self.failed.load(Relaxed)
            + self.bytes_sent.load(Relaxed)
            + self.bytes_received.load(Relaxed);
        (total, opened > closed)
    }
}

/// Counts the bytes read from one side of a connection twice: into its flow's total, which
/// moves while the connection is open, and into the connection's own count, for its log line.
#[derive(Clone, Copy)]
pub struct ByteMeter<'a> {
    pub flow: &'a AtomicU64,
    pub connection: &'a AtomicU64,
}

/// One connection's own byte counts, beside its flow's.
#[derive(Default)]
pub struct ConnectionBytes {
    /// From the client.
    pub sent: AtomicU64,
    /// From the destination.
    pub received: AtomicU64,
}

impl ConnectionBytes {
    /// (sent, received) so far.
    pub fn get(&self) -> (u64, u64) {
        (self.sent.load(Relaxed), self.received.load(Relaxed))
    }
}

impl ByteMeter<'_> {
    pub fn add(&self, bytes: u64) {
        self.flow.fetch_add(bytes, Relaxed);
        self.connection.fetch_add(bytes, Relaxed);
    }
}

/// [`FlowCounters`] read at one moment.
#[derive(Clone, Copy, Debug, Default)]
pub struct FlowTotals {
    pub opened: u64,
    pub closed: u64,
    pub failed: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

/// A flow's counters and the labels of its two ends, fixed when the flow is first seen.
pub struct Flow {
    pub counters: FlowCounters,
    pub source: Peer,
    pub destination: Peer,
    /// `name.namespace.svc.<cluster domain>` of the service the client asked for, or else the one
    /// the destination serves, if any.
    pub service: Option<Arc<str>>,
    pub transport: Transport,
}

impl std::ops::Deref for Flow {
    type Target = FlowCounters;
    fn deref(&self) -> &FlowCounters {
        &self.counters
    }
}

/// How a connection travelled between the nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    /// Through an mTLS tunnel to a meshed workload.
    Mtls,
    /// As plain TCP: the destination is not in the mesh (or weft runs without identities).
    Plaintext,
}

impl Transport {
    /// Istio's `connection_security_policy` label.
    pub fn security_policy(self) -> &'static str {
        match self {
            Self::Mtls => "mutual_tls",
            Self::Plaintext => "none",
        }
    }
}

/// Which agent counted: the client's (`source`) or the server's (`destination`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Reporter {
    Source,
    Destination,
}

impl Reporter {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Source => "source",
            Self::Destination => "destination",
        }
    }
}

/// The labels of one HTTP request series.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RequestKey {
    pub reporter: Reporter,
    pub source: Peer,
    pub destination: Peer,
    pub service: Arc<str>,
    /// `http` or `grpc`.
    pub protocol: &'static str,
    pub response_code: u16,
    /// `grpc-status` of gRPC answers, else empty.
    pub grpc_status: &'static str,
    /// Envoy-style response flags (see `metrics`), `-` when none.
    pub response_flags: &'static str,
    pub transport: Transport,
}

/// Bucket bounds of request durations (ms), as Istio's.
pub const DURATION_BUCKETS_MS: &[f64] = &[
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];
/// Bucket bounds of request and response sizes (bytes), as Istio's.
pub const SIZE_BUCKETS_BYTES: &[f64] = &[
    1.0,
    10.0,
    100.0,
    1000.0,
    10000.0,
    100000.0,
    1000000.0,
    10000000.0,
    100000000.0,
];

/// A histogram of fixed buckets; the sum is kept in integer `unit`s so it stays exact.
pub struct Histogram {
    pub bounds: &'static [f64],
    /// Observations per bucket (not cumulative); the last one is above every bound.
    counts: Box<[AtomicU64]>,
    sum_units: AtomicU64,
    /// Units per observed value: 1000 for milliseconds kept in microseconds, 1 for bytes.
    units_per_value: f64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64], units_per_value: f64) -> Self {
        Self {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_units: AtomicU64::new(0),
            units_per_value,
        }
    }

    pub fn observe(&self, value: f64) {
        let bucket = self.bounds.partition_point(|bound| *bound < value);
        self.counts[bucket].fetch_add(1, Relaxed);
        self.sum_units
            .fetch_add((value * self.units_per_value).round() as u64, Relaxed);
    }

    /// Cumulative counts per bound (the last entry is the total), and the sum.
    pub fn snapshot(&self) -> (Vec<u64>, f64) {
        let mut total = 0;
        let cumulative = self
            .counts
            .iter()
            .map(|count| {
                total += count.load(Relaxed);
                total
            })
            .collect();
        let sum = self.sum_units.load(Relaxed) as f64 / self.units_per_value;
        (cumulative, sum)
    }
}

/// One HTTP request series: its count, durations and body sizes.
pub struct RequestSeries {
    pub requests: AtomicU64,
    pub duration_ms: Histogram,
    pub request_bytes: Histogram,
    pub response_bytes: Histogram,
}

impl Default for RequestSeries {
    fn default() -> Self {
        Self {
            requests: AtomicU64::new(0),
            duration_ms: Histogram::new(DURATION_BUCKETS_MS, 1000.0),
            request_bytes: Histogram::new(SIZE_BUCKETS_BYTES, 1.0),
            response_bytes: Histogram::new(SIZE_BUCKETS_BYTES, 1.0),
        }
    }
}

impl RequestSeries {
    pub fn record(&self, duration: Duration, request_bytes: u64, response_bytes: u64) {
        self.requests.fetch_add(1, Relaxed);
        self.duration_ms.observe(duration.as_secs_f64() * 1000.0);
        self.request_bytes.observe(request_bytes as f64);
        self.response_bytes.observe(response_bytes as f64);
    }
}

/// Connections a policy refused, per destination workload and policy.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct DenialKey {
    pub destination: Peer,
    pub policy: Arc<str>,
}

/// Series that came and went: each entry remembers when its counters last moved, so series
/// of workloads that left can be dropped once quiet (see [`Stats::expire`]).
pub struct SeriesMap<K, V> {
    entries: Mutex<HashMap<K, Entry<V>>>,
}

struct Entry<V> {
    value: Arc<V>,
    /// The counters' total at the last sweep, and since when it has not changed.
    last_total: u64,
    quiet_since: Instant,
}

impl<K, V> Default for SeriesMap<K, V> {
    fn default() -> Self {
        Self {
            entries: Mutex::default(),
        }
    }
}

impl<K: Eq + Hash + Clone, V> SeriesMap<K, V> {
    pub fn get_or_insert_with(&self, key: &K, make: impl FnOnce() -> V) -> Arc<V> {
        let mut entries = lock(&self.entries);
        if let Some(entry) = entries.get(key) {
            return Arc::clone(&entry.value);
        }
        let value = Arc::new(make());
        entries.insert(
            key.clone(),
            Entry {
                value: Arc::clone(&value),
                last_total: 0,
                quiet_since: Instant::now(),
            },
        );
        value
    }

    /// Every series, in no particular order.
    pub fn entries(&self) -> Vec<(K, Arc<V>)> {
        lock(&self.entries)
            .iter()
            .map(|(key, entry)| (key.clone(), Arc::clone(&entry.value)))
            .collect()
    }

    /// How many series there are.
    pub fn count(&self) -> usize {
        lock(&self.entries).len()
    }

    /// Drops the series that `stale` says belong to workloads gone from the mesh and whose
    /// counters have not moved (and that had nothing open) for `idle`. `activity` gives a
    /// series' total and whether something is still open in it.
    fn expire(
        &self,
        now: Instant,
        idle: Duration,
        stale: impl Fn(&K, &V) -> bool,
        activity: impl Fn(&V) -> (u64, bool),
    ) -> usize {
        self.expire_into(now, idle, stale, activity, |_, _| {})
    }

    /// [`expire`](Self::expire), handing each dropped series to `dropped`.
    fn expire_into(
        &self,
        now: Instant,
        idle: Duration,
        stale: impl Fn(&K, &V) -> bool,
        activity: impl Fn(&V) -> (u64, bool),
        mut dropped: impl FnMut(&K, &V),
    ) -> usize {
        let mut entries = lock(&self.entries);
        let before = entries.len();
        entries.retain(|key, entry| {
            let (total, open) = activity(&entry.value);
            if total != entry.last_total || open {
                entry.last_total = total;
                entry.quiet_since = now;
                return true;
            }
            let keep = !(stale(key, &entry.value) && now.duration_since(entry.quiet_since) >= idle);
            if !keep {
                dropped(key, &entry.value);
            }
            keep
        });
        before - entries.len()
    }
}

/// Where an outbound flow went: the client pod, the original destination (or the endpoint a
/// service connection was sent to), how, and the service asked for.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub pod: PodId,
    pub destination: SocketAddrV4,
    pub transport: Transport,
    pub service: Option<Arc<str>>,
}

/// The labels a flow is counted under in the Istio TCP families.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct FlowLabels {
    pub reporter: Reporter,
    pub source: Peer,
    pub destination: Peer,
    pub service: Option<Arc<str>>,
    pub transport: Transport,
}

impl FlowLabels {
    pub fn of(reporter: Reporter, flow: &Flow) -> Self {
        Self {
            reporter,
            source: flow.source.clone(),
            destination: flow.destination.clone(),
            service: flow.service.clone(),
            transport: flow.transport,
        }
    }
}

/// Connections arriving at a local pod from one source.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct InboundFlowKey {
    pub pod: PodId,
    pub source: Peer,
    pub transport: Transport,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct FlowSnapshot {
    pub source_pod: PodId,
    pub destination: SocketAddrV4,
    pub transport: Transport,
    pub service: Option<String>,
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
    /// HTTP requests served from tunnel streams that carry HTTP.
    pub http_requests: AtomicU64,
    /// Requests answered 504 on arrival: their deadline had passed.
    pub deadline_exceeded: AtomicU64,
}

impl InboundCounters {
    fn total(&self) -> u64 {
        [
            &self.mtls,
            &self.plaintext,
            &self.plaintext_rejected,
            &self.denied,
            &self.failed,
            &self.http_requests,
            &self.deadline_exceeded,
        ]
        .iter()
        .map(|counter| counter.load(Relaxed))
        .sum()
    }
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
    /// Incoming tunnel connections closed before their handshake because too many handshakes
    /// were in progress.
    pub shed_handshakes: AtomicU64,
    /// Incoming tunnel connections closed after carrying no stream for the idle timeout.
    pub idle_closed: AtomicU64,
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
    /// Outbound connections, as the client's agent sees them.
    pub flows: SeriesMap<FlowKey, Flow>,
    /// Connections arriving at local pods, by source.
    pub inbound_flows: SeriesMap<InboundFlowKey, Flow>,
    /// HTTP requests, as either agent sees them.
    pub requests: SeriesMap<RequestKey, RequestSeries>,
    pub denials: SeriesMap<DenialKey, AtomicU64>,
    /// Totals of flows dropped once quiet, by the labels they were counted under: what
    /// `/metrics` reports for a label set must not go down while other flows of it remain.
    pub retired_flows: SeriesMap<FlowLabels, FlowCounters>,
    services: Mutex<HashMap<String, Arc<ServiceCounters>>>,
    inbound: SeriesMap<PodId, InboundCounters>,
    pub tunnels: TunnelCounters,
    /// Connections accepted on a pod listener that the eBPF programs did not redirect.
    pub unknown_origin: AtomicU64,
}

impl Stats {
    /// The counters of an outbound flow; `labels` names its ends and service the first time
    /// it is seen.
    pub fn flow(
        &self,
        key: &FlowKey,
        labels: impl FnOnce() -> (Peer, Peer, Option<Arc<str>>),
    ) -> Arc<Flow> {
        self.flows.get_or_insert_with(key, || {
            let (source, destination, service) = labels();
            Flow {
                counters: FlowCounters::default(),
                source,
                destination,
                service,
                transport: key.transport,
            }
        })
    }

    /// The counters of connections from `key.source` delivered to a local pod (`destination`,
    /// an endpoint of `service`).
    pub fn inbound_flow(
        &self,
        key: &InboundFlowKey,
        destination: &Peer,
        service: impl FnOnce() -> Option<Arc<str>>,
    ) -> Arc<Flow> {
        self.inbound_flows.get_or_insert_with(key, || Flow {
            counters: FlowCounters::default(),
            source: key.source.clone(),
            destination: destination.clone(),
            service: service(),
            transport: key.transport,
        })
    }

    pub fn request(&self, key: &RequestKey) -> Arc<RequestSeries> {
        self.requests
            .get_or_insert_with(key, RequestSeries::default)
    }

    pub fn count_denial(&self, destination: &Peer, policy: &str) {
        let key = DenialKey {
            destination: destination.clone(),
            policy: policy.into(),
        };
        self.denials
            .get_or_insert_with(&key, AtomicU64::default)
            .fetch_add(1, Relaxed);
    }

    /// Drops the series of workloads and pods no longer in `mesh` that have been quiet for
    /// `idle`, and the counters of services it no longer has; returns how many series went.
    pub fn expire(&self, now: Instant, idle: Duration, mesh: &MeshState) -> usize {
        let config = &mesh.config;
        let workloads: HashSet<(&str, &str)> = config
            .pods
            .iter()
            .map(|pod| (pod.namespace.as_str(), pod.workload_name()))
            .chain(
                config
                    .peers
                    .iter()
                    .map(|peer| (peer.namespace.as_str(), peer.workload_name())),
            )
            .collect();
        let pods: HashSet<PodId> = config.pods.iter().map(PodSpec::id).collect();
        let gone = |peer: &Peer| {
            !peer.is_unknown() && !workloads.contains(&(&*peer.namespace, &*peer.workload))
        };
        lock(&self.services).retain(|id, _| mesh.services.has_port(id));
        // Flows (one per pod and address) go once quiet, whoever they belong to; their totals
        // live on per label set until a workload of it leaves.
        let flow_activity = |flow: &Flow| flow.counters.activity();
        self.flows.expire_into(
            now,
            idle,
            |_, _| true,
            flow_activity,
            |_, flow| self.retire(Reporter::Source, flow),
        ) + self.inbound_flows.expire_into(
            now,
            idle,
            |_, _| true,
            flow_activity,
            |_, flow| self.retire(Reporter::Destination, flow),
        ) + self.retired_flows.expire(
            now,
            idle,
            |labels, _| gone(&labels.source) || gone(&labels.destination),
            |_| (0, false),
        ) + self.requests.expire(
            now,
            idle,
            |key, _| gone(&key.source) || gone(&key.destination),
            |series| (series.requests.load(Relaxed), false),
        ) + self.denials.expire(
            now,
            idle,
            |key, _| gone(&key.destination),
            |count| (count.load(Relaxed), false),
        ) + self.inbound.expire(
            now,
            idle,
            |pod, _| !pods.contains(pod),
            |counters| (counters.total(), false),
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

    /// Every flow's totals under the labels the Istio TCP families count it by: the live flows
    /// of both reporters, and the totals of those retired.
    pub fn tcp_series(&self) -> Vec<(FlowLabels, FlowTotals)> {
        let outbound = self.flows.entries().into_iter();
        let inbound = self.inbound_flows.entries().into_iter();
        let live = outbound
            .map(|(_, flow)| (Reporter::Source, flow))
            .chain(inbound.map(|(_, flow)| (Reporter::Destination, flow)))
            .map(|(reporter, flow)| (FlowLabels::of(reporter, &flow), flow.counters.totals()));
        let retired = self.retired_flows.entries().into_iter();
        live.chain(retired.map(|(labels, totals)| (labels, totals.totals())))
            .collect()
    }

    /// Keeps the totals of a flow being dropped under its labels.
    fn retire(&self, reporter: Reporter, flow: &Flow) {
        let labels = FlowLabels::of(reporter, flow);
        self.retired_flows
            .get_or_insert_with(&labels, FlowCounters::default)
            .add(&flow.counters);
    }

    pub fn services_snapshot(&self) -> serde_json::Value {
        by_name(&lock(&self.services))
    }

    pub fn inbound(&self, pod: &PodId) -> Arc<InboundCounters> {
        self.inbound
            .get_or_insert_with(pod, InboundCounters::default)
    }

    /// Inbound counters by destination pod, serialisable as they are (atomics serialise as numbers).
    pub fn inbound_snapshot(&self) -> serde_json::Value {
        by_name(&self.inbound.entries().into_iter().collect())
    }

    pub fn inbound_counters(&self) -> Vec<(PodId, Arc<InboundCounters>)> {
        self.inbound.entries()
    }

    /// Every service port's counters, by `namespace/name:port`.
    pub fn service_counters(&self) -> Vec<(String, Arc<ServiceCounters>)> {
        lock(&self.services)
            .iter()
            .map(|(id, counters)| (id.clone(), Arc::clone(counters)))
            .collect()
    }

    pub fn snapshot(&self) -> Vec<FlowSnapshot> {
        let mut snapshot: Vec<FlowSnapshot> = self
            .flows
            .entries()
            .into_iter()
            .map(|(key, flow)| {
                let (opened, closed, failed) = (
                    flow.opened.load(Relaxed),
                    flow.closed.load(Relaxed),
                    flow.failed.load(Relaxed),
                );
                FlowSnapshot {
                    source_pod: key.pod,
                    destination: key.destination,
                    transport: key.transport,
                    service: key.service.as_deref().map(str::to_owned),
                    opened,
                    closed,
                    failed,
                    active: opened.saturating_sub(closed),
                    bytes_sent: flow.bytes_sent.load(Relaxed),
                    bytes_received: flow.bytes_received.load(Relaxed),
                }
            })
            .collect();
        snapshot.sort_by(|a, b| {
            (&a.source_pod, a.destination, a.transport, &a.service).cmp(&(
                &b.source_pod,
                b.destination,
                b.transport,
                &b.service,
            ))
        });
        snapshot
    }
}

/// Counters keyed by name, sorted, as JSON (atomics serialise as numbers).
fn by_name<K: ToString + Eq + Hash, C: Serialize>(
    counters: &HashMap<K, Arc<C>>,
) -> serde_json::Value {
    let sorted: std::collections::BTreeMap<String, &C> = counters
        .iter()
        .map(|(name, counters)| (name.to_string(), counters.as_ref()))
        .collect();
    serde_json::to_value(sorted).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{config::Config, state::MeshState};

    fn flow_key(pod: &PodId, transport: Transport) -> FlowKey {
        FlowKey {
            pod: pod.clone(),
            destination: "10.0.0.1:80".parse().unwrap(),
            transport,
            service: None,
        }
    }

    fn peer(workload: &str) -> Peer {
        Peer::new(workload, "default", None)
    }

    #[test]
    fn flows_are_counted_per_pod_and_destination() {
        let stats = Stats::default();
        let (web, db) = (PodId::new("default", "web"), PodId::new("default", "db"));
        let labels = || (peer("web"), Peer::unknown(), None);
        let web_flow = stats.flow(&flow_key(&web, Transport::Mtls), labels);
        web_flow.opened.fetch_add(2, Relaxed);
        web_flow.closed.fetch_add(1, Relaxed);
        let again = stats.flow(&flow_key(&web, Transport::Mtls), labels);
        again.bytes_sent.fetch_add(10, Relaxed);
        stats
            .flow(&flow_key(&db, Transport::Plaintext), labels)
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

    #[test]
    fn series_of_departed_workloads_expire_once_quiet() {
        let config = Config::parse(
            "pods:\n  - {name: web-1, workload: web, netns: /run/netns/web, ip: 10.0.0.1}\n",
        )
        .unwrap();
        let mesh = MeshState::from_config(&config, &Default::default(), &Stats::default());
        let stats = Stats::default();
        let pod = PodId::new("default", "web-1");
        let present = stats.flow(&flow_key(&pod, Transport::Plaintext), || {
            (peer("web"), Peer::unknown(), None)
        });
        let departed = stats.flow(&flow_key(&pod, Transport::Mtls), || {
            (peer("web"), peer("gone"), None)
        });
        let open = stats.flow(
            &FlowKey {
                service: Some("x".into()),
                ..flow_key(&pod, Transport::Mtls)
            },
            || (peer("gone"), peer("web"), None),
        );
        open.opened.fetch_add(1, Relaxed);
        present.opened.fetch_add(1, Relaxed);
        present.closed.fetch_add(1, Relaxed);
        departed.opened.fetch_add(1, Relaxed);
        departed.closed.fetch_add(1, Relaxed);
        let idle = Duration::from_secs(60);
        let start = Instant::now();
        // The first sweep sees the counts move; nothing goes.
        assert_eq!(stats.expire(start, idle, &mesh), 0);
        assert_eq!(stats.expire(start + idle / 2, idle, &mesh), 0);
        // Quiet for `idle`: both finished flows go, their totals kept per label set; the
        // connection still open stays.
        assert_eq!(stats.expire(start + idle, idle, &mesh), 2);
        assert_eq!(stats.flows.count(), 1);
        let retired = stats.retired_flows.entries();
        assert_eq!(retired.len(), 2);
        assert!(retired.iter().all(
            |(labels, totals)| labels.source == peer("web") && totals.opened.load(Relaxed) == 1
        ));
        // The totals of the departed workload go once quiet; those of the one still in the
        // mesh (calling outside it) stay. Traffic on the open connection keeps it.
        open.closed.fetch_add(1, Relaxed);
        assert_eq!(stats.expire(start + idle * 2, idle, &mesh), 1);
        let retired = stats.retired_flows.entries();
        assert_eq!(retired.len(), 1);
        assert_eq!(retired[0].0.destination, Peer::unknown());
        // The last flow goes, and with it (its source having left) its totals.
        assert_eq!(stats.expire(start + idle * 3, idle, &mesh), 2);
        assert_eq!(stats.flows.count(), 0);
        assert_eq!(stats.retired_flows.count(), 1);
    }
}

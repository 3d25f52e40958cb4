//! `GET /graph`: who talks to whom through this node, live. Edges come from the metric series
//! (requests and TCP flows), as rates over the last [`WINDOW`]: the totals now minus the totals
//! of a sample taken about that long ago. The HTML page at `/` draws it.
use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    sync::{atomic::Ordering::Relaxed, Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::{
    identity::rfc3339,
    lock,
    proxy::ProxyContext,
    stats::{Peer, Reporter, Stats, Transport, DURATION_BUCKETS_MS, UNKNOWN},
};

/// The page served at `/`.
pub const PAGE: &str = include_str!("graph.html");
/// Rates are averaged over about this long.
pub const WINDOW: Duration = Duration::from_secs(30);
const SAMPLE_INTERVAL: Duration = Duration::from_secs(5);

/// Samples of the edge totals, oldest first, spanning a little more than [`WINDOW`].
#[derive(Default)]
pub struct GraphHistory {
    samples: Mutex<VecDeque<Sample>>,
}

struct Sample {
    at: Instant,
    edges: HashMap<EdgeKey, Totals>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct EdgeKey {
    source: Peer,
    destination: Peer,
    protocol: &'static str,
    service: Arc<str>,
    mtls: bool,
}

#[derive(Clone, Default)]
struct Totals {
    requests: u64,
    errors: u64,
    /// Requests per duration bucket (not cumulative), the last above every bound.
    duration_buckets: Vec<u64>,
    connections: u64,
    bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct Graph {
    pub node: String,
    pub generated_at: String,
    pub window_seconds: f64,
    pub workloads: Vec<GraphWorkload>,
    pub edges: Vec<GraphEdge>,
}

#[derive(Debug, Serialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct GraphWorkload {
    pub id: String,
    pub name: String,
    pub namespace: String,
    pub local: bool,
}

#[derive(Debug, Serialize)]
pub struct GraphEdge {
    pub source: String,
    pub destination: String,
    pub protocol: &'static str,
    pub destination_service: String,
    pub request_rate: f64,
    pub error_rate: f64,
    pub p99_ms: Option<f64>,
    pub connection_rate: f64,
    pub bytes_rate: f64,
    pub mtls: bool,
}

impl GraphHistory {
    /// Samples the totals every few seconds until `stop`.
    pub async fn sample_until(&self, ctx: &ProxyContext, stop: CancellationToken) {
        let mut tick = tokio::time::interval(SAMPLE_INTERVAL);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let local = local_workloads(ctx);
            self.record(Sample {
                at: Instant::now(),
                edges: totals(&ctx.stats, &local),
            });
        }
    }

    fn record(&self, sample: Sample) {
        let mut samples = lock(&self.samples);
        samples.push_back(sample);
        // Keep the newest sample at least WINDOW old, as the base of the rates.
        while samples.len() > 1 && samples[1].at.elapsed() >= WINDOW {
            samples.pop_front();
        }
    }

    /// The graph now: rates since the oldest sample kept.
    pub fn graph(&self, ctx: &ProxyContext) -> Graph {
        let local = local_workloads(ctx);
        let now = totals(&ctx.stats, &local);
        let samples = lock(&self.samples);
        let (base, elapsed) = match samples.front() {
            Some(sample) => (Some(&sample.edges), sample.at.elapsed()),
            None => (None, Duration::ZERO),
        };
        let seconds = elapsed.as_secs_f64();
        let per_second = |count: u64| {
            if seconds > 0.0 {
                count as f64 / seconds
            } else {
                0.0
            }
        };
        let mut workloads: BTreeMap<String, GraphWorkload> = local
            .iter()
            .map(|(id, peer)| (id.clone(), graph_workload(peer, true)))
            .collect();
        let mut edges = Vec::new();
        for (key, totals) in &now {
            let before = base.and_then(|b| b.get(key)).cloned().unwrap_or_default();
            let requests = totals.requests.saturating_sub(before.requests);
            let connections = totals.connections.saturating_sub(before.connections);
            let bytes = totals.bytes.saturating_sub(before.bytes);
            if requests == 0 && connections == 0 && bytes == 0 {
                continue;
            }
            for peer in [&key.source, &key.destination] {
                let id = peer.id();
                let local = local.contains_key(&id);
                workloads
                    .entry(id)
                    .or_insert_with(|| graph_workload(peer, local));
            }
            let errors = totals.errors.saturating_sub(before.errors);
            let window_buckets: Vec<u64> = totals
                .duration_buckets
                .iter()
                .enumerate()
                .map(|(i, count)| {
                    count.saturating_sub(before.duration_buckets.get(i).copied().unwrap_or(0))
                })
                .collect();
            edges.push(GraphEdge {
                source: key.source.id(),
                destination: key.destination.id(),
                protocol: key.protocol,
                destination_service: key.service.to_string(),
                request_rate: per_second(requests),
                error_rate: if requests > 0 {
                    errors as f64 / requests as f64
                } else {
                    0.0
                },
                p99_ms: quantile(0.99, &window_buckets, DURATION_BUCKETS_MS),
                connection_rate: per_second(connections),
                bytes_rate: per_second(bytes),
                mtls: key.mtls,
            });
        }
        edges.sort_by(|a, b| {
            (
                &a.source,
                &a.destination,
                a.protocol,
                &a.destination_service,
            )
                .cmp(&(
                    &b.source,
                    &b.destination,
                    b.protocol,
                    &b.destination_service,
                ))
        });
        Graph {
            node: ctx.state.get().node_name.clone(),
            generated_at: rfc3339(SystemTime::now()),
            window_seconds: seconds,
            workloads: workloads.into_values().collect(),
            edges,
        }
    }
}

fn graph_workload(peer: &Peer, local: bool) -> GraphWorkload {
    if peer.is_unknown() {
        return GraphWorkload {
            id: UNKNOWN.to_owned(),
            name: UNKNOWN.to_owned(),
            namespace: String::new(),
            local: false,
        };
    }
    GraphWorkload {
        id: peer.id(),
        name: peer.workload.to_string(),
        namespace: peer.namespace.to_string(),
        local,
    }
}

/// The workloads of the pods on this node, by id: a caller's principal depends on how it
/// called (plaintext ones are `unknown`), so whole peers would not match.
fn local_workloads(ctx: &ProxyContext) -> HashMap<String, Peer> {
    crate::read(&ctx.local_pods)
        .values()
        .map(|pod| (pod.peer.id(), pod.peer.clone()))
        .collect()
}

/// gRPC statuses that mean the server failed (UNKNOWN, DEADLINE_EXCEEDED, INTERNAL,
/// UNAVAILABLE), not that the caller asked for something it may not have.
fn grpc_failed(status: &str) -> bool {
    matches!(status, "2" | "4" | "13" | "14")
}

/// Every edge's totals so far. A request between two local pods is counted by both ends;
/// the destination's count is used only for callers from elsewhere.
fn totals(stats: &Stats, local: &HashMap<String, Peer>) -> HashMap<EdgeKey, Totals> {
    let mut edges: HashMap<EdgeKey, Totals> = HashMap::new();
    let counted_here = |reporter: Reporter, source: &Peer| {
        reporter == Reporter::Source || !local.contains_key(&source.id())
    };
    for (key, series) in stats.requests.entries() {
        if !counted_here(key.reporter, &key.source) {
            continue;
        }
        let edge = EdgeKey {
            source: key.source.clone(),
            destination: key.destination.clone(),
            protocol: "http",
            service: Arc::clone(&key.service),
            mtls: key.transport == Transport::Mtls,
        };
        let totals = edges.entry(edge).or_default();
        let requests = series.requests.load(Relaxed);
        totals.requests += requests;
        if key.response_code >= 500 || grpc_failed(key.grpc_status) {
            totals.errors += requests;
        }
        let (cumulative, _) = series.duration_ms.snapshot();
        totals.duration_buckets.resize(cumulative.len(), 0);
        let mut below = 0;
        for (slot, count) in totals.duration_buckets.iter_mut().zip(&cumulative) {
            *slot += count - below;
            below = *count;
        }
    }
    // Flows dropped once quiet live on as totals per label set: counted too, so rates do not
    // dip when a flow is retired.
    for (labels, flow) in stats.tcp_series() {
        if !counted_here(labels.reporter, &labels.source) {
            continue;
        }
        let edge = EdgeKey {
            source: labels.source,
            destination: labels.destination,
            protocol: "tcp",
            service: labels.service.unwrap_or_else(|| UNKNOWN.into()),
            mtls: labels.transport == Transport::Mtls,
        };
        let totals = edges.entry(edge).or_default();
        totals.connections += flow.opened + flow.failed;
        totals.bytes += flow.bytes_sent + flow.bytes_received;
    }
    edges
}

/// The `q` quantile of observations in `buckets` (per-bucket counts, the last above every bound),
/// interpolated within its bucket as Prometheus' `histogram_quantile` does.
fn quantile(q: f64, buckets: &[u64], bounds: &[f64]) -> Option<f64> {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let mut below = 0u64;
    for (i, count) in buckets.iter().enumerate() {
        let through = below + count;
        if through as f64 >= rank && *count > 0 {
            let Some(upper) = bounds.get(i) else {
                // Above the last bound: that bound is all that is known.
                return bounds.last().copied();
            };
            let lower = if i == 0 { 0.0 } else { bounds[i - 1] };
            let within = (rank - below as f64) / *count as f64;
            return Some(lower + (upper - lower) * within);
        }
        below = through;
    }
    bounds.last().copied()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::RequestKey;

    fn request(
        reporter: Reporter,
        source: &Peer,
        code: u16,
        grpc_status: &'static str,
    ) -> RequestKey {
        RequestKey {
            reporter,
            source: source.clone(),
            destination: Peer::new("api", "lab", Some("spiffe://td/ns/lab/sa/api".to_owned())),
            service: "api.lab.svc.cluster.local".into(),
            protocol: if grpc_status.is_empty() {
                "http"
            } else {
                "grpc"
            },
            response_code: code,
            response_flags: "-",
            transport: Transport::Plaintext,
            grpc_status,
        }
    }

    #[test]
    fn local_plaintext_callers_are_counted_once_and_grpc_failures_are_errors() {
        let web = Peer::new("web", "lab", Some("spiffe://td/ns/lab/sa/web".to_owned()));
        let plaintext_web = Peer {
            principal: UNKNOWN.into(),
            ..web.clone()
        };
        let local = HashMap::from([(web.id(), web.clone())]);
        let stats = Stats::default();
        let keys = [
            request(Reporter::Source, &plaintext_web, 200, "14"),
            request(Reporter::Source, &plaintext_web, 200, "5"),
            request(Reporter::Source, &plaintext_web, 503, ""),
            // The same requests as the destination saw them: already counted by the source.
            request(Reporter::Destination, &plaintext_web, 200, "14"),
            request(Reporter::Destination, &plaintext_web, 503, ""),
        ];
        for key in &keys {
            stats.request(key).requests.fetch_add(1, Relaxed);
        }
        let edges = totals(&stats, &local);
        assert_eq!(edges.len(), 1);
        let totals = edges.values().next().unwrap();
        assert_eq!((totals.requests, totals.errors), (3, 2));
    }

    #[test]
    fn quantiles_interpolate_within_the_bucket() {
        let bounds = [10.0, 20.0, 40.0];
        // 100 observations: 50 below 10, 49 in (10, 20], 1 in (20, 40].
        assert_eq!(quantile(0.5, &[50, 49, 1, 0], &bounds), Some(10.0));
        let p99 = quantile(0.99, &[50, 49, 1, 0], &bounds).unwrap();
        assert!((p99 - 20.0).abs() < 1e-9, "{p99}");
        let p999 = quantile(0.999, &[50, 49, 1, 0], &bounds).unwrap();
        assert!(p999 > 20.0 && p999 <= 40.0, "{p999}");
        assert_eq!(quantile(0.99, &[0, 0, 0, 5], &bounds), Some(40.0));
        assert_eq!(quantile(0.99, &[0, 0, 0, 0], &bounds), None);
    }

    #[test]
    fn retired_flows_keep_counting_in_the_graph() {
        use crate::{
            config::{Config, PodId},
            state::MeshState,
            stats::FlowKey,
        };
        let config =
            Config::parse("pods:\n  - {name: web, netns: /run/netns/web, ip: 10.0.0.1}\n").unwrap();
        let mesh = MeshState::from_config(&config, &Default::default(), &Stats::default());
        let stats = Stats::default();
        let web = Peer::new("web", "default", None);
        let key = FlowKey {
            pod: PodId::new("default", "web"),
            destination: "10.9.9.9:5432".parse().unwrap(),
            transport: Transport::Plaintext,
            service: None,
        };
        let flow = stats.flow(&key, || (web.clone(), Peer::unknown(), None));
        flow.opened.fetch_add(2, Relaxed);
        flow.closed.fetch_add(2, Relaxed);
        flow.bytes_sent.fetch_add(100, Relaxed);
        let local = HashMap::from([(web.id(), web.clone())]);
        let before = totals(&stats, &local);
        let start = Instant::now();
        let idle = Duration::from_secs(60);
        stats.expire(start, idle, &mesh);
        assert_eq!(
            stats.expire(start + idle, idle, &mesh),
            1,
            "the flow was not retired"
        );
        let after = totals(&stats, &local);
        let edge = |t: &HashMap<EdgeKey, Totals>| {
            t.values()
                .map(|t| (t.connections, t.bytes))
                .collect::<Vec<_>>()
        };
        assert_eq!(edge(&before), vec![(2, 100)]);
        assert_eq!(edge(&after), edge(&before));
    }
}

//! `GET /metrics`: the counters of `stats` in Prometheus' text format. Istio's standard families
//! (so existing dashboards and Kiali work unchanged) come from the request series and the
//! connection flows, summed per label set; weft's own (`weft_…`) from the eBPF maps, the
//! tunnels, the services and the certificates.
use std::{
    collections::BTreeMap,
    sync::atomic::{AtomicU64, Ordering::Relaxed},
    time::{Duration, Instant},
};

use prometheus::{
    proto::{Bucket, Counter, Gauge, Histogram, LabelPair, Metric, MetricFamily, MetricType},
    TextEncoder,
};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::{
    enrollment::{PodStatus, PodStatusTable},
    identity::CertificateStore,
    lock,
    proxy::ProxyContext,
    stats::{
        Histogram as Buckets, Peer, Reporter, RequestKey, ServiceCounters, Stats, Transport,
        UNKNOWN,
    },
};

/// The content type of the text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// The cluster name Istio uses when none is configured.
const CLUSTER: &str = "Kubernetes";
/// How often series of workloads that left are looked for.
const EXPIRY_INTERVAL: Duration = Duration::from_secs(30);

/// What besides the proxy's counters the endpoint reports.
pub struct Sources<'a> {
    pub ctx: &'a ProxyContext,
    pub pods: &'a PodStatusTable,
    pub certs: Option<&'a CertificateStore>,
}

/// The whole metrics page.
pub fn render(sources: &Sources) -> String {
    let mut families = istio_families(&sources.ctx.stats);
    families.extend(weft_families(sources));
    encode(families)
}

fn encode(mut families: Vec<MetricFamily>) -> String {
    // The text format has no empty families.
    families.retain(|family| !family.get_metric().is_empty());
    let mut text = String::new();
    if let Err(err) = TextEncoder::new().encode_utf8(&families, &mut text) {
        // Only invalid names fail, and the names here are fixed.
        debug!(error = %err, "encoding metrics failed");
    }
    text
}

/// Drops series of workloads that left the mesh once they have been quiet for `idle`.
pub async fn expire_series(ctx: &ProxyContext, idle: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(EXPIRY_INTERVAL);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let dropped = ctx.stats.expire(Instant::now(), idle, &ctx.state.get());
        if dropped > 0 {
            debug!(dropped, "metric series of departed workloads expired");
        }
    }
}

/// The labels Istio puts on a request or connection series, in its order.
fn istio_labels(
    reporter: Reporter,
    source: &Peer,
    destination: &Peer,
    service: Option<&str>,
    protocol: &str,
    transport: Transport,
) -> Vec<(&'static str, String)> {
    let service = service.unwrap_or(UNKNOWN);
    // `name.namespace.svc.cluster.local`
    let mut parts = service.splitn(3, '.');
    let (service_name, service_namespace) = match (parts.next(), parts.next()) {
        (Some(name), Some(namespace)) => (name, namespace),
        _ => (UNKNOWN, UNKNOWN),
    };
    // Kiali groups by canonical service and cluster: without Kubernetes' canonical-name
    // labels the workload stands for its service, at Istio's default revision and cluster.
    let revision = |peer: &Peer| if peer.is_unknown() { UNKNOWN } else { "latest" };
    let cluster = |peer: &Peer| if peer.is_unknown() { UNKNOWN } else { CLUSTER };
    vec![
        ("reporter", reporter.as_str().to_owned()),
        ("source_workload", source.workload.to_string()),
        ("source_workload_namespace", source.namespace.to_string()),
        ("source_principal", source.principal.to_string()),
        ("source_canonical_service", source.workload.to_string()),
        ("source_canonical_revision", revision(source).to_owned()),
        ("source_cluster", cluster(source).to_owned()),
        ("destination_workload", destination.workload.to_string()),
        (
            "destination_workload_namespace",
            destination.namespace.to_string(),
        ),
        ("destination_principal", destination.principal.to_string()),
        (
            "destination_canonical_service",
            destination.workload.to_string(),
        ),
        (
            "destination_canonical_revision",
            revision(destination).to_owned(),
        ),
        ("destination_cluster", cluster(destination).to_owned()),
        ("destination_service", service.to_owned()),
        ("destination_service_name", service_name.to_owned()),
        (
            "destination_service_namespace",
            service_namespace.to_owned(),
        ),
        ("request_protocol", protocol.to_owned()),
        (
            "connection_security_policy",
            transport.security_policy().to_owned(),
        ),
    ]
}

fn istio_families(stats: &Stats) -> Vec<MetricFamily> {
    let mut requests = Family::counter(
        "istio_requests_total",
        "Requests, by the agent of either end.",
    );
    let mut durations = Family::histogram(
        "istio_request_duration_milliseconds",
        "Time from a request's arrival until its response was sent, in milliseconds.",
    );
    let mut request_sizes = Family::histogram("istio_request_bytes", "Request body sizes.");
    let mut response_sizes = Family::histogram("istio_response_bytes", "Response body sizes.");
    let mut series: Vec<(RequestKey, _)> = stats.requests.entries();
    series.sort_by_cached_key(|(key, _)| request_labels(key));
    for (key, counts) in series {
        let labels = request_labels(&key);
        requests.counter_value(&labels, counts.requests.load(Relaxed));
        durations.histogram_value(&labels, &counts.duration_ms);
        request_sizes.histogram_value(&labels, &counts.request_bytes);
        response_sizes.histogram_value(&labels, &counts.response_bytes);
    }

    // Several flows (pods of one workload, endpoints of one service) share a label set.
    let mut tcp: BTreeMap<Vec<(&'static str, String)>, [u64; 4]> = BTreeMap::new();
    for (labels, flow) in stats.tcp_series() {
        let base = istio_labels(
            labels.reporter,
            &labels.source,
            &labels.destination,
            labels.service.as_deref(),
            "tcp",
            labels.transport,
        );
        let mut relayed = base.clone();
        relayed.push(("response_flags", "-".to_owned()));
        let sums = tcp.entry(relayed).or_default();
        sums[0] += flow.opened;
        sums[1] += flow.closed;
        // Istio's direction: "sent" is what the destination sent back, "received" what the
        // client sent.
        sums[2] += flow.bytes_received;
        sums[3] += flow.bytes_sent;
        if flow.failed > 0 {
            let mut refused = base;
            refused.push(("response_flags", "UF".to_owned()));
            let sums = tcp.entry(refused).or_default();
            sums[0] += flow.failed;
            sums[1] += flow.failed;
        }
    }
    let mut opened = Family::counter(
        "istio_tcp_connections_opened_total",
        "TCP connections opened.",
    );
    let mut closed = Family::counter(
        "istio_tcp_connections_closed_total",
        "TCP connections closed.",
    );
    let mut sent = Family::counter(
        "istio_tcp_sent_bytes_total",
        "Bytes the destination sent back on TCP connections, counted as they flow.",
    );
    let mut received = Family::counter(
        "istio_tcp_received_bytes_total",
        "Bytes the client sent on TCP connections, counted as they flow.",
    );
    for (labels, [o, c, s, r]) in &tcp {
        opened.counter_value(labels, *o);
        closed.counter_value(labels, *c);
        sent.counter_value(labels, *s);
        received.counter_value(labels, *r);
    }
    [
        requests,
        durations,
        request_sizes,
        response_sizes,
        opened,
        closed,
        sent,
        received,
    ]
    .into_iter()
    .map(Family::finish)
    .collect()
}

fn request_labels(key: &RequestKey) -> Vec<(&'static str, String)> {
    let mut labels = istio_labels(
        key.reporter,
        &key.source,
        &key.destination,
        Some(&key.service),
        key.protocol,
        key.transport,
    );
    labels.push(("response_code", key.response_code.to_string()));
    labels.push(("grpc_response_status", key.grpc_status.to_owned()));
    labels.push(("response_flags", key.response_flags.to_owned()));
    labels
}

fn weft_families(sources: &Sources) -> Vec<MetricFamily> {
    let ctx = sources.ctx;
    let stats = &ctx.stats;
    let mut families = Vec::new();

    let mut build = Family::gauge("weft_build_info", "The running agent's version.");
    build.gauge_value(&[("version", env!("CARGO_PKG_VERSION").to_owned())], 1.0);
    families.push(build);

    let mut ebpf = Family::counter(
        "weft_ebpf_events_total",
        "Socket events of the eBPF programs: connects redirected to the agent, connects left alone (not_enrolled, excluded, agent_socket, ipv6_passthrough), connects that could not be redirected (tracking_full), plaintext steered inbound.",
    );
    for (event, count) in ctx.datapath.counters() {
        ebpf.counter_value(&[("event", event.to_owned())], count);
    }
    families.push(ebpf);
    let mut unredirected = Family::counter(
        "weft_unredirected_connections_total",
        "Connections accepted on a pod's outbound listener without an original destination (reset).",
    );
    unredirected.counter_value(&[], stats.unknown_origin.load(Relaxed));
    families.push(unredirected);
    let (connecting, established) = ctx.datapath.tracked_connections();
    let mut tracked = Family::gauge(
        "weft_tracked_connections",
        "Redirected connections in the eBPF tracking maps.",
    );
    tracked.gauge_value(&[("state", "connecting".to_owned())], connecting as f64);
    tracked.gauge_value(&[("state", "established".to_owned())], established as f64);
    families.push(tracked);

    let mut by_state: BTreeMap<(&str, &str), u32> = BTreeMap::from([(("enrolled", ""), 0)]);
    for status in lock(sources.pods).values() {
        let key = match status {
            PodStatus::Enrolled { .. } => ("enrolled", ""),
            PodStatus::Failed { reason, .. } => ("failed", *reason),
        };
        *by_state.entry(key).or_default() += 1;
    }
    let mut pods = Family::gauge(
        "weft_pods",
        "Pods to enroll on this node, by enrollment state and, for failures, reason (retried; /config_dump has each pod's error).",
    );
    for ((state, reason), count) in by_state {
        let mut labels = vec![("state", state.to_owned())];
        if !reason.is_empty() {
            labels.push(("reason", reason.to_owned()));
        }
        pods.gauge_value(&labels, f64::from(count));
    }
    families.push(pods);

    let tunnels = &stats.tunnels;
    let mut pool = Family::gauge(
        "weft_tunnel_pool_connections",
        "Pooled mTLS tunnel connections to other agents.",
    );
    let open = ctx
        .tunnels
        .as_ref()
        .map_or(0, |pool| pool.open_connections());
    pool.gauge_value(&[], open as f64);
    families.push(pool);
    let mut handshakes = Family::counter(
        "weft_tunnel_handshakes_total",
        "Tunnel TLS handshakes, by this agent's role and result.",
    );
    for (role, result, counter) in [
        ("client", "ok", &tunnels.client_handshakes),
        ("server", "ok", &tunnels.server_handshakes),
        ("server", "rejected", &tunnels.rejected_handshakes),
        ("server", "shed", &tunnels.shed_handshakes),
    ] {
        let labels = [("role", role.to_owned()), ("result", result.to_owned())];
        handshakes.counter_value(&labels, counter.load(Relaxed));
    }
    families.push(handshakes);
    families.push(single_counter(
        "weft_tunnel_streams_rejected_total",
        "Tunnel streams refused before reaching an app (bad target, forged source).",
        &tunnels.rejected_streams,
    ));
    families.push(single_counter(
        "weft_tunnel_connection_errors_total",
        "Tunnel connections that ended on a protocol error.",
        &tunnels.connection_errors,
    ));
    families.push(single_counter(
        "weft_tunnel_idle_closed_total",
        "Incoming tunnel connections closed after carrying no stream for the idle timeout.",
        &tunnels.idle_closed,
    ));

    let mut inbound = Family::counter(
        "weft_inbound_total",
        "Connections and requests arriving at local pods, by outcome: mtls and plaintext delivered, plaintext_rejected (STRICT), denied (policy), failed (app unreachable), http_requests, deadline_exceeded (answered 504 on arrival).",
    );
    let mut arrivals = stats.inbound_counters();
    arrivals.sort_by(|a, b| a.0.cmp(&b.0));
    for (pod, counters) in &arrivals {
        for (outcome, counter) in [
            ("mtls", &counters.mtls),
            ("plaintext", &counters.plaintext),
            ("plaintext_rejected", &counters.plaintext_rejected),
            ("denied", &counters.denied),
            ("failed", &counters.failed),
            ("http_requests", &counters.http_requests),
            ("deadline_exceeded", &counters.deadline_exceeded),
        ] {
            let labels = [("pod", pod.to_string()), ("outcome", outcome.to_owned())];
            inbound.counter_value(&labels, counter.load(Relaxed));
        }
    }
    families.push(inbound);

    let mut denials = Family::counter(
        "weft_policy_denials_total",
        "Connections refused by an authorization policy, by destination workload and policy.",
    );
    let mut denied = stats.denials.entries();
    denied.sort_by(|a, b| {
        (&a.0.destination.id(), &a.0.policy).cmp(&(&b.0.destination.id(), &b.0.policy))
    });
    for (key, count) in denied {
        let labels = [
            ("destination_workload", key.destination.workload.to_string()),
            (
                "destination_workload_namespace",
                key.destination.namespace.to_string(),
            ),
            ("policy", key.policy.to_string()),
        ];
        denials.counter_value(&labels, count.load(Relaxed));
    }
    families.push(denials);

    families.extend(service_families(ctx));

    if let Some(certs) = sources.certs {
        let mut expiry = Family::gauge(
            "weft_certificate_expiry_timestamp_seconds",
            "When each workload certificate held on this node expires (Unix time).",
        );
        for info in certs.snapshot() {
            expiry.gauge_value(
                &[("identity", info.identity.to_string())],
                info.not_after_unix as f64,
            );
        }
        families.push(expiry);
    }

    let mut log_lines = Family::counter(
        "weft_access_log_lines_total",
        "Access-log lines written, and dropped because the writer fell behind.",
    );
    for (outcome, count) in [
        ("written", ctx.access_log.written()),
        ("dropped", ctx.access_log.dropped()),
    ] {
        log_lines.counter_value(&[("outcome", outcome.to_owned())], count);
    }
    families.push(log_lines);

    let mut series = Family::gauge(
        "weft_metric_series",
        "Series held for the Istio families, by kind (see metrics_idle_expiry_s).",
    );
    for (kind, count) in [
        ("requests", stats.requests.count()),
        ("outbound_flows", stats.flows.count()),
        ("inbound_flows", stats.inbound_flows.count()),
    ] {
        series.gauge_value(&[("kind", kind.to_owned())], count as f64);
    }
    families.push(series);
    families.into_iter().map(Family::finish).collect()
}

/// Per service port: what the client side's retries, budgets, deadlines and balancer did.
fn service_families(ctx: &ProxyContext) -> Vec<Family> {
    let mut ports = ctx.stats.service_counters();
    ports.sort_by(|a, b| a.0.cmp(&b.0));
    let state = ctx.state.get();
    let ejections: BTreeMap<String, u64> = state.services.ejections();
    type Counter = fn(&ServiceCounters) -> &AtomicU64;
    let mut families: Vec<(Family, Counter)> = vec![
        (
            Family::counter("weft_retries_total", "Retries sent, per service port."),
            |c| &c.retries,
        ),
        (
            Family::counter(
                "weft_retries_suppressed_total",
                "Retries the route allowed but the service's retry budget refused.",
            ),
            |c| &c.retries_suppressed,
        ),
        (
            Family::counter(
                "weft_deadline_exceeded_total",
                "Requests answered 504 by the client's agent because their deadline passed.",
            ),
            |c| &c.deadline_exceeded,
        ),
        (
            Family::counter(
                "weft_no_endpoint_total",
                "Requests and connections refused because no endpoint could take them.",
            ),
            |c| &c.no_endpoint,
        ),
        (
            Family::counter(
                "weft_mirrored_requests_total",
                "Copies of requests sent to a mirror service.",
            ),
            |c| &c.mirrored,
        ),
    ];
    let mut ejected = Family::counter(
        "weft_endpoint_ejections_total",
        "Endpoints ejected by outlier detection, per service port.",
    );
    for (id, counters) in &ports {
        let labels = [("service_port", id.clone())];
        for (family, counter) in &mut families {
            family.counter_value(&labels, counter(counters).load(Relaxed));
        }
        ejected.counter_value(&labels, ejections.get(id).copied().unwrap_or(0));
    }
    families
        .into_iter()
        .map(|(family, _)| family)
        .chain([ejected])
        .collect()
}

fn single_counter(name: &'static str, help: &'static str, counter: &AtomicU64) -> Family {
    let mut family = Family::counter(name, help);
    family.counter_value(&[], counter.load(Relaxed));
    family
}

/// A metric family being filled in.
struct Family(MetricFamily);

impl Family {
    fn new(name: &str, help: &str, kind: MetricType) -> Self {
        let mut family = MetricFamily::default();
        family.set_name(name.to_owned());
        family.set_help(help.to_owned());
        family.set_field_type(kind);
        Self(family)
    }

    fn counter(name: &str, help: &str) -> Self {
        Self::new(name, help, MetricType::COUNTER)
    }

    fn gauge(name: &str, help: &str) -> Self {
        Self::new(name, help, MetricType::GAUGE)
    }

    fn histogram(name: &str, help: &str) -> Self {
        Self::new(name, help, MetricType::HISTOGRAM)
    }

    fn counter_value(&mut self, labels: &[(&str, String)], value: u64) {
        let mut counter = Counter::default();
        counter.set_value(value as f64);
        let mut metric = metric(labels);
        metric.set_counter(counter);
        self.0.mut_metric().push(metric);
    }

    fn gauge_value(&mut self, labels: &[(&str, String)], value: f64) {
        let mut gauge = Gauge::default();
        gauge.set_value(value);
        let mut metric = metric(labels);
        metric.set_gauge(gauge);
        self.0.mut_metric().push(metric);
    }

    fn histogram_value(&mut self, labels: &[(&str, String)], buckets: &Buckets) {
        let (cumulative, sum) = buckets.snapshot();
        let mut histogram = Histogram::default();
        histogram.set_sample_count(cumulative.last().copied().unwrap_or(0));
        histogram.set_sample_sum(sum);
        histogram.set_bucket(
            buckets
                .bounds
                .iter()
                .zip(&cumulative)
                .map(|(bound, count)| {
                    let mut bucket = Bucket::default();
                    bucket.set_upper_bound(*bound);
                    bucket.set_cumulative_count(*count);
                    bucket
                })
                .collect(),
        );
        let mut metric = metric(labels);
        metric.set_histogram(histogram);
        self.0.mut_metric().push(metric);
    }

    fn finish(self) -> MetricFamily {
        self.0
    }
}

fn metric(labels: &[(&str, String)]) -> Metric {
    Metric::from_label(
        labels
            .iter()
            .map(|(name, value)| {
                let mut pair = LabelPair::default();
                pair.set_name((*name).to_owned());
                pair.set_value(value.clone());
                pair
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use std::{sync::Arc, time::Duration};

    use super::*;
    use crate::{
        config::PodId,
        stats::{FlowKey, InboundFlowKey},
    };

    fn peer(workload: &str) -> Peer {
        Peer::new(
            workload,
            "shop",
            Some(format!("spiffe://cluster.local/ns/shop/sa/{workload}")),
        )
    }

    fn value(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
        let matching: Vec<_> = scrape
            .samples
            .iter()
            .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .collect();
        assert_eq!(matching.len(), 1, "{name} {labels:?}: {matching:?}");
        match matching[0].value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            ref other => panic!("{name}: unexpected {other:?}"),
        }
    }

    #[test]
    fn istio_families_parse_and_sum_flows_per_label_set() {
        let stats = Stats::default();
        let key = RequestKey {
            reporter: Reporter::Source,
            source: peer("web"),
            destination: peer("api"),
            service: "api.shop.svc.cluster.local".into(),
            protocol: "http",
            response_code: 200,
            grpc_status: "",
            response_flags: "-",
            transport: Transport::Mtls,
        };
        for size in [10, 20, 30] {
            stats
                .request(&key)
                .record(Duration::from_millis(7), size, 2 * size);
        }
        // Two endpoints of one workload: one label set.
        for (ip, sent, received) in [("10.0.0.1:80", 100, 1000), ("10.0.0.2:80", 5, 50)] {
            let flow_key = FlowKey {
                pod: PodId::new("shop", "web-1"),
                destination: ip.parse().unwrap(),
                transport: Transport::Mtls,
                service: None,
            };
            let flow = stats.flow(&flow_key, || (peer("web"), peer("api"), None));
            flow.opened.fetch_add(1, Relaxed);
            flow.bytes_sent.fetch_add(sent, Relaxed);
            flow.bytes_received.fetch_add(received, Relaxed);
        }
        let inbound = stats.inbound_flow(
            &InboundFlowKey {
                pod: PodId::new("shop", "api-1"),
                source: Peer::unknown(),
                transport: Transport::Plaintext,
            },
            &peer("api"),
            || Some(Arc::from("api.shop.svc.cluster.local")),
        );
        inbound.failed.fetch_add(2, Relaxed);

        let text = encode(istio_families(&stats));
        let lines = text.lines().map(|l| Ok(l.to_owned()));
        let scrape = prometheus_parse::Scrape::parse(lines).unwrap();
        let request = [
            ("reporter", "source"),
            ("source_workload", "web"),
            ("destination_workload", "api"),
            ("destination_service_name", "api"),
            ("destination_service_namespace", "shop"),
            ("response_code", "200"),
            ("connection_security_policy", "mutual_tls"),
            ("source_principal", "spiffe://cluster.local/ns/shop/sa/web"),
        ];
        assert_eq!(value(&scrape, "istio_requests_total", &request), 3.0);
        let sizes = scrape
            .samples
            .iter()
            .find(|s| s.metric == "istio_request_bytes")
            .unwrap();
        match &sizes.value {
            prometheus_parse::Value::Histogram(buckets) => {
                let le_100 = buckets.iter().find(|b| b.less_than == 100.0).unwrap();
                assert_eq!(le_100.count, 3.0);
            }
            other => panic!("not a histogram: {other:?}"),
        }
        assert_eq!(value(&scrape, "istio_request_bytes_sum", &request), 60.0);
        assert_eq!(value(&scrape, "istio_response_bytes_sum", &request), 120.0);
        assert_eq!(
            value(
                &scrape,
                "istio_request_duration_milliseconds_count",
                &request
            ),
            3.0
        );
        let tcp = [("reporter", "source"), ("response_flags", "-")];
        assert_eq!(
            value(&scrape, "istio_tcp_connections_opened_total", &tcp),
            2.0
        );
        // Istio's "received" is what the client sent.
        assert_eq!(
            value(&scrape, "istio_tcp_received_bytes_total", &tcp),
            105.0
        );
        assert_eq!(value(&scrape, "istio_tcp_sent_bytes_total", &tcp), 1050.0);
        let refused = [("reporter", "destination"), ("response_flags", "UF")];
        assert_eq!(
            value(&scrape, "istio_tcp_connections_opened_total", &refused),
            2.0
        );
    }
}

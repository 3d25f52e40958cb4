//! Services at run time: which virtual address belongs to which service port, the endpoints
//! behind each, and the compiled routes. Rebuilt from each accepted config; the state that
//! must outlive a reload (endpoint latency estimates and ejections, retry budgets) is carried
//! over from the previous build.
use std::{
    collections::{HashMap, HashSet},
    net::{Ipv4Addr, SocketAddrV4},
    sync::Arc,
    time::{Duration, Instant},
};

use http::{HeaderMap, Method};
use tracing::warn;

use super::{
    balance::{Balancer, OutlierSettings},
    retry::{BudgetSettings, RetryBudget, RetryOn, RetryPolicy},
    route::{
        compile_retry, compile_timeouts, matches, specificity, HttpRoute, RouteMatch,
        ServicePortKey, Timeouts,
    },
};
use crate::{
    config::{AppProtocol, Config, ServiceSpec, WhenAllEjected},
    stats::{ServiceCounters, Stats},
};

/// Enough for a shadow a few times slower than the primary at thousands of requests a second;
/// each copy in flight holds a connection.
const MAX_MIRRORS_IN_FLIGHT: usize = 256;

/// One port of a service and its endpoints.
pub struct ServiceBackend {
    /// `namespace/name:port`, for logs and counters.
    pub id: String,
    /// `name.namespace.svc.<cluster domain>`, as Istio's `destination_service` label names it.
    pub host: Arc<str>,
    pub target_port: u16,
    pub protocol: Option<AppProtocol>,
    pub balancer: Balancer,
    /// `None` when the service's budget is switched off.
    pub budget: Option<RetryBudget>,
    /// This service port's counters, held here so requests need no lookup.
    pub counters: Arc<ServiceCounters>,
    /// Mirrored requests in flight to this service at most.
    pub mirror_slots: Arc<tokio::sync::Semaphore>,
    budget_settings: Option<BudgetSettings>,
}

/// A route rule, ready to serve requests.
pub struct CompiledRule {
    /// `namespace/name` of the route, or `default` for a service port without routes.
    pub route: String,
    /// Backends with their weights; the weights are not all 0.
    backends: Vec<(Arc<ServiceBackend>, u32)>,
    pub mirror: Option<Arc<ServiceBackend>>,
    pub timeouts: Timeouts,
    pub retry: RetryPolicy,
}

impl CompiledRule {
    /// A backend chosen at random by weight.
    pub fn pick_backend(&self) -> &Arc<ServiceBackend> {
        let total: u64 = self.backends.iter().map(|(_, w)| u64::from(*w)).sum();
        let mut ticket = fastrand::u64(0..total.max(1));
        for (backend, weight) in &self.backends {
            if ticket < u64::from(*weight) {
                return backend;
            }
            ticket -= u64::from(*weight);
        }
        // Unreachable with validated weights; the first backend is a safe answer anyway.
        &self.backends[0].0
    }
}

/// What a virtual address and port lead to.
pub struct ServicePortEntry {
    pub backend: Arc<ServiceBackend>,
    rules: Vec<CompiledRule>,
    /// Every match of every rule with its rule's index, most specific first.
    matches: Vec<(RouteMatch, usize)>,
    /// Routes attach to this port: a request no rule matches gets a 404.
    routed: bool,
}

impl ServicePortEntry {
    /// The rule serving a request, `None` when routes attach but none matches.
    pub fn select(
        &self,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
    ) -> Option<&CompiledRule> {
        if !self.routed {
            return self.rules.first();
        }
        self.matches
            .iter()
            .find(|(matched, _)| matches(matched, method, path, headers))
            .and_then(|(_, rule)| self.rules.get(*rule))
    }
}

#[derive(Default)]
pub struct Services {
    by_address: HashMap<SocketAddrV4, Arc<ServicePortEntry>>,
    backends: HashMap<ServicePortKey, Arc<ServiceBackend>>,
    /// The service an endpoint address serves (the first in the config when several do).
    by_endpoint: HashMap<SocketAddrV4, Arc<str>>,
}

/// A service's name as Istio's `destination_service` label gives it.
pub fn service_host(namespace: &str, name: &str, cluster_domain: &str) -> Arc<str> {
    format!("{name}.{namespace}.svc.{cluster_domain}").into()
}

/// Without a route, a service retries what is safe to retry: connections that failed, and
/// idempotent requests that were reset or got a 503, twice, within the retry budget.
pub fn default_retry_policy() -> RetryPolicy {
    RetryPolicy {
        attempts: 3,
        on: RetryOn {
            connect_failure: true,
            reset: true,
            unavailable: true,
            ..RetryOn::default()
        },
        ..RetryPolicy::default()
    }
}

impl Services {
    /// Builds from a validated config, keeping the run-time state of service ports that
    /// `previous` already had; counters come from `stats`.
    pub fn build(config: &Config, previous: &Services, stats: &Stats) -> Self {
        let mut backends = HashMap::new();
        for service in &config.services {
            let endpoint_ips = endpoint_ips(config, service);
            for port in &service.ports {
                let key = ServicePortKey {
                    namespace: service.namespace.clone(),
                    name: service.name.clone(),
                    port: port.port,
                };
                let endpoints: Vec<SocketAddrV4> = endpoint_ips
                    .iter()
                    .map(|ip| SocketAddrV4::new(*ip, port.target_port()))
                    .collect();
                let outlier = outlier_settings(service);
                let budget_settings = service.retry_budget.as_ref().map(|b| BudgetSettings {
                    ratio: b.ratio,
                    min_per_second: b.min_per_second,
                    window: Duration::from_millis(b.window_ms),
                });
                let reusable = previous.backends.get(&key).filter(|old| {
                    old.target_port == port.target_port()
                        && old.protocol == port.protocol
                        && old.budget_settings == budget_settings
                });
                let backend = match reusable {
                    Some(old) => {
                        old.balancer.update(endpoints, outlier);
                        Arc::clone(old)
                    }
                    None => {
                        let id = format!("{}/{}:{}", key.namespace, key.name, key.port);
                        Arc::new(ServiceBackend {
                            counters: stats.service(&id),
                            host: service_host(
                                &key.namespace,
                                &key.name,
                                &config.agent.cluster_domain,
                            ),
                            id,
                            target_port: port.target_port(),
                            protocol: port.protocol,
                            balancer: Balancer::new(endpoints, outlier),
                            budget: budget_settings.clone().map(RetryBudget::new),
                            mirror_slots: Arc::new(tokio::sync::Semaphore::new(
                                MAX_MIRRORS_IN_FLIGHT,
                            )),
                            budget_settings,
                        })
                    }
                };
                backends.insert(key, backend);
            }
        }
        let mut by_address = HashMap::new();
        let mut by_endpoint = HashMap::new();
        for service in &config.services {
            for port in &service.ports {
                let key = ServicePortKey {
                    namespace: service.namespace.clone(),
                    name: service.name.clone(),
                    port: port.port,
                };
                let Some(backend) = backends.get(&key) else {
                    continue;
                };
                for endpoint in backend.balancer.endpoints() {
                    by_endpoint
                        .entry(endpoint.addr)
                        .or_insert_with(|| Arc::clone(&backend.host));
                }
                let entry = Arc::new(compile_port(&key, backend, &config.routes, &backends));
                for vip in &service.vips {
                    by_address.insert(SocketAddrV4::new(*vip, port.port), Arc::clone(&entry));
                }
            }
        }
        Self {
            by_address,
            backends,
            by_endpoint,
        }
    }

    /// The address of every endpoint of every service port.
    pub fn endpoint_addresses(&self) -> HashSet<SocketAddrV4> {
        self.backends
            .values()
            .flat_map(|backend| backend.balancer.endpoints())
            .map(|endpoint| endpoint.addr)
            .collect()
    }

    /// Every service port's endpoints as the balancer sees them, for the admin endpoint.
    pub fn endpoint_snapshot(&self, now: Instant) -> serde_json::Value {
        let by_id: std::collections::BTreeMap<&str, serde_json::Value> = self
            .backends
            .values()
            .map(|backend| {
                let endpoints: Vec<serde_json::Value> = backend
                    .balancer
                    .endpoints()
                    .iter()
                    .map(|e| {
                        serde_json::json!({
                            "address": e.addr,
                            "latency_ms": e.ewma_latency.as_secs_f64() * 1000.0,
                            "in_flight": e.in_flight,
                            "ejected": e.ejected_until.is_some_and(|until| until > now),
                            "ejections": e.ejections,
                            "consecutive_failures": e.consecutive_failures,
                        })
                    })
                    .collect();
                let summary = serde_json::json!({
                    "ejections": backend.balancer.ejections_total(),
                    "endpoints": endpoints,
                });
                (backend.id.as_str(), summary)
            })
            .collect();
        serde_json::to_value(by_id).unwrap_or_default()
    }

    /// Endpoint ejections so far, by service port (`namespace/name:port`).
    pub fn ejections(&self) -> std::collections::BTreeMap<String, u64> {
        self.backends
            .values()
            .map(|backend| (backend.id.clone(), backend.balancer.ejections_total()))
            .collect()
    }

    /// Whether the service port `namespace/name:port` exists.
    pub fn has_port(&self, id: &str) -> bool {
        self.backends.values().any(|backend| backend.id == id)
    }

    /// The service whose endpoint `address` is, for naming what a delivered request was for.
    pub fn serving(&self, address: SocketAddrV4) -> Option<&Arc<str>> {
        self.by_endpoint.get(&address)
    }

    /// The service port answering at `address`, if it is a service's virtual address.
    pub fn at(&self, address: SocketAddrV4) -> Option<&Arc<ServicePortEntry>> {
        self.by_address.get(&address)
    }
}

/// The addresses of the workloads a service selects, plus its listed endpoints.
fn endpoint_ips(config: &Config, service: &ServiceSpec) -> Vec<Ipv4Addr> {
    let selects = |namespace: &str, labels: &std::collections::BTreeMap<String, String>| {
        !service.selector.is_empty()
            && namespace == service.namespace
            && service
                .selector
                .iter()
                .all(|(key, value)| labels.get(key) == Some(value))
    };
    let mut ips: Vec<Ipv4Addr> = config
        .pods
        .iter()
        .filter(|pod| selects(&pod.namespace, &pod.labels))
        .map(|pod| pod.ip)
        .chain(
            config
                .peers
                .iter()
                .filter(|peer| selects(&peer.namespace, &peer.labels))
                .map(|peer| peer.ip),
        )
        .chain(service.endpoints.iter().copied())
        .collect();
    ips.sort_unstable();
    ips.dedup();
    ips
}

fn outlier_settings(service: &ServiceSpec) -> OutlierSettings {
    let spec = &service.outlier_detection;
    OutlierSettings {
        consecutive_failures: spec.consecutive_failures,
        base_ejection: Duration::from_millis(spec.base_ejection_ms),
        max_ejection: Duration::from_millis(spec.max_ejection_ms),
        fail_open: spec.when_all_ejected == WhenAllEjected::FailOpen,
    }
}

/// The rules of every route attached to `key`, or the default rule when none is.
fn compile_port(
    key: &ServicePortKey,
    backend: &Arc<ServiceBackend>,
    routes: &[HttpRoute],
    backends: &HashMap<ServicePortKey, Arc<ServiceBackend>>,
) -> ServicePortEntry {
    let attached =
        routes.iter().filter(|route| {
            route.metadata.namespace == key.namespace
                && route.spec.parent_refs.iter().any(|parent| {
                    parent.name == key.name && parent.port.is_none_or(|p| p == key.port)
                })
        });
    let resolve = |name: &str, port: Option<u16>| {
        backends
            .get(&ServicePortKey {
                namespace: key.namespace.clone(),
                name: name.to_owned(),
                port: port.unwrap_or(key.port),
            })
            .cloned()
    };
    let mut rules = Vec::new();
    let mut all_matches = Vec::new();
    let mut routed = false;
    for route in attached {
        routed = true;
        let route_id = format!("{}/{}", route.metadata.namespace, route.metadata.name);
        for rule in &route.spec.rules {
            // Validation checked every reference and value; a failure here means the config
            // changed shape under us, so the rule is skipped with a log rather than guessed at.
            let compiled = (|| {
                let timeouts = rule
                    .timeouts
                    .as_ref()
                    .map(compile_timeouts)
                    .transpose()?
                    .unwrap_or_default();
                let retry = match &rule.retry {
                    Some(spec) => compile_retry(spec, timeouts.per_try)?,
                    None => RetryPolicy {
                        per_try_timeout: timeouts.per_try,
                        ..default_retry_policy()
                    },
                };
                let backends = if rule.backend_refs.is_empty() {
                    vec![(Arc::clone(backend), 1)]
                } else {
                    rule.backend_refs
                        .iter()
                        .map(|b| {
                            resolve(&b.name, b.port)
                                .map(|found| (found, b.weight))
                                .ok_or_else(|| anyhow::anyhow!("backend {} not found", b.name))
                        })
                        .collect::<anyhow::Result<Vec<_>>>()?
                };
                let mirror = rule
                    .filters
                    .iter()
                    .filter_map(|f| f.request_mirror.as_ref())
                    .next()
                    .map(|m| {
                        resolve(&m.backend_ref.name, m.backend_ref.port).ok_or_else(|| {
                            anyhow::anyhow!("mirror {} not found", m.backend_ref.name)
                        })
                    })
                    .transpose()?;
                anyhow::Ok(CompiledRule {
                    route: route_id.clone(),
                    backends,
                    mirror,
                    timeouts,
                    retry,
                })
            })();
            match compiled {
                Ok(compiled) => {
                    let index = rules.len();
                    rules.push(compiled);
                    if rule.matches.is_empty() {
                        all_matches.push((RouteMatch::default(), index));
                    }
                    all_matches.extend(rule.matches.iter().map(|m| (m.clone(), index)));
                }
                Err(err) => warn!(route = %route_id, error = %err, "route rule skipped"),
            }
        }
    }
    if !routed {
        rules.push(CompiledRule {
            route: "default".to_owned(),
            backends: vec![(Arc::clone(backend), 1)],
            mirror: None,
            timeouts: Timeouts::default(),
            retry: default_retry_policy(),
        });
    }
    // Stable: equally specific matches keep config order.
    all_matches.sort_by_key(|(matched, _)| std::cmp::Reverse(specificity(matched)));
    ServicePortEntry {
        backend: Arc::clone(backend),
        rules,
        matches: all_matches,
        routed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config::parse(
            "pods:\n  - {name: a, netns: /a, ip: 10.0.0.1, labels: {app: echo, track: stable}}\n  - {name: b, netns: /b, ip: 10.0.0.2, labels: {app: echo, track: canary}}\n  - {name: c, namespace: other, netns: /c, ip: 10.0.0.3, labels: {app: echo}}\npeers:\n  - {name: d, ip: 10.0.1.1, node: n2, labels: {app: echo, track: stable}}\nservices:\n  - {name: echo, vips: [10.96.0.1], ports: [{port: 80, target_port: 8080}], selector: {app: echo}}\n  - {name: echo-canary, vips: [10.96.0.2], ports: [{port: 80, target_port: 8080}], selector: {track: canary}}\n  - {name: external, vips: [10.96.0.3], ports: [{port: 443, protocol: tcp}], endpoints: [192.0.2.7]}\nroutes:\n  - metadata: {name: split, namespace: default}\n    spec:\n      parentRefs: [{name: echo}]\n      rules:\n        - matches: [{headers: [{name: x-tenant, value: blue}]}]\n          backendRefs: [{name: echo-canary}]\n        - matches: [{path: {type: PathPrefix, value: /}}]\n          backendRefs: [{name: echo, weight: 90}, {name: echo-canary, weight: 10}]\n",
        )
        .unwrap()
    }

    fn endpoints(entry: &ServicePortEntry) -> Vec<String> {
        let mut addrs: Vec<String> = entry
            .backend
            .balancer
            .endpoints()
            .iter()
            .map(|e| e.addr.to_string())
            .collect();
        addrs.sort();
        addrs
    }

    #[test]
    fn selectors_pick_workloads_of_the_namespace_on_any_node() {
        let services = Services::build(&config(), &Services::default(), &Stats::default());
        let echo = services.at("10.96.0.1:80".parse().unwrap()).unwrap();
        assert_eq!(
            endpoints(echo),
            ["10.0.0.1:8080", "10.0.0.2:8080", "10.0.1.1:8080"]
        );
        assert_eq!(&*echo.backend.host, "echo.default.svc.cluster.local");
        let external = services.at("10.96.0.3:443".parse().unwrap()).unwrap();
        assert_eq!(endpoints(external), ["192.0.2.7:443"]);
        assert_eq!(external.backend.protocol, Some(AppProtocol::Tcp));
        assert!(services.at("10.96.0.1:81".parse().unwrap()).is_none());
        assert!(services.at("10.0.0.1:8080".parse().unwrap()).is_none());
    }

    #[test]
    fn service_names_carry_the_configured_cluster_domain() {
        let mut config = config();
        config.agent.cluster_domain = "corp.example".to_owned();
        let services = Services::build(&config, &Services::default(), &Stats::default());
        let echo = services.at("10.96.0.1:80".parse().unwrap()).unwrap();
        assert_eq!(&*echo.backend.host, "echo.default.svc.corp.example");
    }

    #[test]
    fn header_rules_win_over_the_weighted_default() {
        let services = Services::build(&config(), &Services::default(), &Stats::default());
        let echo = services.at("10.96.0.1:80".parse().unwrap()).unwrap();
        let mut headers = HeaderMap::new();
        headers.insert("x-tenant", "blue".parse().unwrap());
        let rule = echo.select(&Method::GET, "/", &headers).unwrap();
        for _ in 0..100 {
            assert_eq!(rule.pick_backend().id, "default/echo-canary:80");
        }
        let rule = echo.select(&Method::GET, "/", &HeaderMap::new()).unwrap();
        let canary = (0..10_000)
            .filter(|_| rule.pick_backend().id == "default/echo-canary:80")
            .count();
        assert!((800..=1200).contains(&canary), "{canary} of 10000");
        // A port no route attaches to serves everything with its default rule.
        let canary_port = services.at("10.96.0.2:80".parse().unwrap()).unwrap();
        let rule = canary_port
            .select(&Method::GET, "/", &HeaderMap::new())
            .unwrap();
        assert_eq!(rule.route, "default");
        assert_eq!(rule.retry, default_retry_policy());
    }

    #[test]
    fn a_request_no_attached_rule_matches_finds_no_rule() {
        let mut config = config();
        config.routes[0].spec.rules.truncate(1);
        let services = Services::build(&config, &Services::default(), &Stats::default());
        let echo = services.at("10.96.0.1:80".parse().unwrap()).unwrap();
        assert!(echo.select(&Method::GET, "/", &HeaderMap::new()).is_none());
    }

    #[test]
    fn a_reload_keeps_the_state_of_unchanged_service_ports() {
        let first = Services::build(&config(), &Services::default(), &Stats::default());
        let second = Services::build(&config(), &first, &Stats::default());
        let (a, b) = (
            first.at("10.96.0.1:80".parse().unwrap()).unwrap(),
            second.at("10.96.0.1:80".parse().unwrap()).unwrap(),
        );
        assert!(Arc::ptr_eq(&a.backend, &b.backend));
        let mut changed = config();
        changed.services[0].ports[0].target_port = Some(9090);
        let third = Services::build(&changed, &second, &Stats::default());
        let c = third.at("10.96.0.1:80".parse().unwrap()).unwrap();
        assert!(!Arc::ptr_eq(&b.backend, &c.backend));
        assert_eq!(endpoints(c)[0], "10.0.0.1:9090");
    }
}

//! The local configuration file: agent settings and the enrolled pods. Parsing is strict (unknown
//! keys are errors) and a rejected file never changes the running state.
use std::{
    collections::{BTreeMap, HashSet},
    fmt,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use weft_common::{MAX_EXCLUDED_CIDRS, MAX_EXCLUDED_PORTS};

use crate::{
    l7::route::{validate_routes, HttpRoute, ServicePortKey},
    policy::{validate_policies, AuthorizationPolicy},
};

pub const EMBEDDED_DEFAULT: &str = include_str!("../default-config.yaml");

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub agent: AgentSettings,
    /// Workload identities and the mesh CA. Without it weft proxies plain L4 only: no tunnels,
    /// no inbound capture.
    #[serde(default)]
    pub identity: Option<IdentitySettings>,
    /// Pods on this node that weft captures.
    #[serde(default)]
    pub pods: Vec<PodSpec>,
    /// Meshed workloads on other nodes: where tunnels go and which identity to expect there.
    #[serde(default)]
    pub peers: Vec<PeerSpec>,
    /// L4 authorization, shaped like a Kubernetes custom resource.
    #[serde(default)]
    pub policies: Vec<AuthorizationPolicy>,
    /// Services: virtual IPs whose connections the agent balances across endpoints.
    #[serde(default)]
    pub services: Vec<ServiceSpec>,
    /// HTTP routing for services, shaped like Gateway API's HTTPRoute.
    #[serde(default)]
    pub routes: Vec<HttpRoute>,
    /// Kubernetes as a second source of pods, peers, services, policies and routes, merged with
    /// the ones above (which win on conflict).
    #[serde(default)]
    pub kubernetes: KubernetesSettings,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct KubernetesSettings {
    pub enabled: bool,
    /// Without it: the in-cluster service account, or `KUBECONFIG`.
    pub kubeconfig: Option<PathBuf>,
    /// Where the CNI plugin reaches the agent (`cni.sock`) and finds the namespaces last known
    /// enrolled (`enrolled-namespaces.json`).
    pub cni_dir: PathBuf,
    /// The node's /proc: pods given by UID are found there, and the pods' sysctls are set through
    /// it. In a container, mount the node's /proc elsewhere (e.g. /host/proc): the container's
    /// own /proc/sys is read-only.
    pub proc_root: PathBuf,
}

impl Default for KubernetesSettings {
    fn default() -> Self {
        Self {
            enabled: false,
            kubeconfig: None,
            cni_dir: PathBuf::from("/var/run/weft"),
            proc_root: PathBuf::from("/proc"),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct IdentitySettings {
    pub trust_domain: String,
    /// PEM files of the mesh CA (e.g. a mounted Secret); the agent issues workload certificates
    /// from them.
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    #[serde(default = "default_cert_lifetime_s")]
    pub cert_lifetime_s: u64,
    /// Fraction of the lifetime after which a certificate is renewed.
    #[serde(default = "default_renew_fraction")]
    pub renew_fraction: f64,
}

fn default_cert_lifetime_s() -> u64 {
    24 * 3600
}

fn default_renew_fraction() -> f64 {
    0.5
}

impl IdentitySettings {
    pub fn cert_lifetime(&self) -> Duration {
        Duration::from_secs(self.cert_lifetime_s)
    }
}

/// How an enrolled pod treats plaintext connections arriving from outside the mesh.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "UPPERCASE")]
pub enum InboundMode {
    /// Plaintext is rejected (reset) and counted.
    Strict,
    /// Plaintext is delivered, counted as plaintext.
    #[default]
    Permissive,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AgentSettings {
    pub cgroup_path: PathBuf,
    pub outbound_port: u16,
    pub admin_addr: SocketAddr,
    pub socket_mark: u32,
    pub exclude_ports: Vec<u16>,
    pub exclude_cidrs: Vec<Ipv4Net>,
    pub connect_timeout_ms: u64,
    /// A tunnel connection another agent opened here is closed (GOAWAY) once it has carried no
    /// stream for this long; the other agent opens a new one when it needs it.
    pub tunnel_idle_timeout_ms: u64,
    pub drain_timeout_ms: u64,
    /// This node's name, as peers' `node` refer to it.
    pub node_name: String,
    /// The mTLS tunnel listener inside each enrolled pod.
    pub inbound_port: u16,
    /// The listener on 127.0.0.1 inside each enrolled pod that receives captured plaintext.
    pub inbound_plaintext_port: u16,
    /// SO_MARK of the sockets delivering inbound traffic to the app; replies to them are routed
    /// back to the agent by this mark.
    pub delivery_mark: u32,
    /// STRICT pods still accept plaintext from the node itself (a source address of the node's
    /// own network namespace): that is where the kubelet's health probes come from. Another pod
    /// would have to spoof the node's address to pass.
    pub strict_allows_node: bool,
    /// How long a connection to a service port without a declared protocol may take to send
    /// its first bytes before it is treated as opaque TCP (server-speaks-first protocols send
    /// nothing, so they wait this long once per connection).
    pub protocol_detection_timeout_ms: u64,
    /// Service ports never inspected for HTTP: server-speaks-first protocols (SMTP, MySQL,
    /// PostgreSQL, Redis, memcached, ...).
    pub opaque_ports: Vec<u16>,
    /// Request bodies up to this size are kept for replay by retries and mirroring; larger ones
    /// stream through and are never retried.
    pub retry_body_limit_bytes: usize,
    /// The Prometheus endpoint (`/metrics`), for a scraper on the node.
    pub metrics_addr: SocketAddr,
    /// Metric series of a workload that is no longer in the mesh are dropped once they have not
    /// moved for this long (bounds the series of pods that come and go).
    pub metrics_idle_expiry_s: u64,
    /// The cluster's DNS domain: services are named `<name>.<namespace>.svc.<cluster_domain>`
    /// in metrics (`destination_service`) and logs, as the cluster's DNS names them.
    pub cluster_domain: String,
    /// One JSON line per connection and per HTTP request, on stdout.
    pub access_log: AccessLogSettings,
    /// Lets a new agent take over from a running one without losing a connection (a rolling
    /// upgrade): the eBPF maps are pinned and shared, listeners join the old agent's. Off when
    /// absent: the maps then go with the agent.
    pub handover: Option<HandoverSettings>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HandoverSettings {
    /// A directory on a bpf filesystem where the maps are pinned.
    pub bpf_pin_dir: PathBuf,
    /// Where the agent in charge records its PID, so the one it replaced knows to leave the
    /// shared state alone when it stops.
    pub state_dir: PathBuf,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AccessLogSettings {
    pub enabled: bool,
    /// Fraction of allowed connections and requests logged; denials are always logged.
    pub sample_rate: f64,
}

impl Default for AccessLogSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            sample_rate: 1.0,
        }
    }
}

impl Default for AgentSettings {
    fn default() -> Self {
        Self {
            cgroup_path: PathBuf::from("/sys/fs/cgroup"),
            outbound_port: 15001,
            admin_addr: SocketAddr::from(([127, 0, 0, 1], 15000)),
            socket_mark: 0x5746,
            exclude_ports: Vec::new(),
            exclude_cidrs: Vec::new(),
            connect_timeout_ms: 5000,
            tunnel_idle_timeout_ms: 300_000,
            drain_timeout_ms: 10_000,
            node_name: "local".to_owned(),
            inbound_port: 15008,
            inbound_plaintext_port: 15006,
            delivery_mark: 0x5747,
            protocol_detection_timeout_ms: 100,
            opaque_ports: vec![25, 587, 3306, 4444, 5432, 6379, 9300, 11211],
            retry_body_limit_bytes: 64 * 1024,
            strict_allows_node: true,
            metrics_addr: SocketAddr::from(([0, 0, 0, 0], 15020)),
            metrics_idle_expiry_s: 600,
            cluster_domain: "cluster.local".to_owned(),
            access_log: AccessLogSettings::default(),
            handover: None,
        }
    }
}

/// A lowercase DNS domain: labels of 1 to 63 letters, digits and inner dashes, 253 at most.
fn is_dns_domain(domain: &str) -> bool {
    domain.len() <= 253
        && domain.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

impl AgentSettings {
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    pub fn tunnel_idle_timeout(&self) -> Duration {
        Duration::from_millis(self.tunnel_idle_timeout_ms)
    }

    pub fn drain_timeout(&self) -> Duration {
        Duration::from_millis(self.drain_timeout_ms)
    }

    pub fn protocol_detection_timeout(&self) -> Duration {
        Duration::from_millis(self.protocol_detection_timeout_ms)
    }

    pub fn metrics_idle_expiry(&self) -> Duration {
        Duration::from_secs(self.metrics_idle_expiry_s)
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(deny_unknown_fields)]
pub struct PodSpec {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// A path that refers to the pod's network namespace (e.g. /var/run/netns/x or /proc/PID/ns/net).
    #[serde(default)]
    pub netns: Option<PathBuf>,
    /// The Kubernetes pod UID: without `netns`, the pod's network namespace is found from the
    /// processes in the pod's cgroup (the agent then needs the node's PIDs, e.g. hostPID).
    #[serde(default)]
    pub uid: Option<String>,
    pub ip: Ipv4Addr,
    #[serde(default = "default_service_account")]
    pub service_account: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub inbound_mode: InboundMode,
    /// The workload (e.g. Deployment) the pod belongs to, as metrics name it; defaults to the
    /// pod's name.
    #[serde(default)]
    pub workload: Option<String>,
}

/// A meshed workload on another node.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(deny_unknown_fields)]
pub struct PeerSpec {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    pub ip: Ipv4Addr,
    #[serde(default = "default_service_account")]
    pub service_account: String,
    pub node: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// As for pods: defaults to the name.
    #[serde(default)]
    pub workload: Option<String>,
}

/// A service: virtual IPs and ports in front of a set of endpoints, like a Kubernetes Service.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// Addresses clients connect to; they need not exist anywhere, as the agent answers for them.
    pub vips: Vec<Ipv4Addr>,
    pub ports: Vec<ServicePort>,
    /// Endpoints: the pods and peers of the service's namespace carrying all these labels...
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    /// ...and these addresses (workloads the config does not list, e.g. outside the mesh).
    #[serde(default)]
    pub endpoints: Vec<Ipv4Addr>,
    #[serde(default)]
    pub outlier_detection: OutlierSpec,
    /// `null` switches the budget off: retries are then limited by attempts only.
    #[serde(default = "default_retry_budget")]
    pub retry_budget: Option<RetryBudgetSpec>,
}

fn default_retry_budget() -> Option<RetryBudgetSpec> {
    Some(RetryBudgetSpec::default())
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServicePort {
    pub port: u16,
    /// The endpoints' port; defaults to `port`.
    #[serde(default)]
    pub target_port: Option<u16>,
    /// Skips protocol detection when given.
    #[serde(default)]
    pub protocol: Option<AppProtocol>,
}

impl ServicePort {
    pub fn target_port(&self) -> u16 {
        self.target_port.unwrap_or(self.port)
    }
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum AppProtocol {
    /// HTTP/1.1 (or HTTP/2 with prior knowledge; the first bytes tell which).
    Http,
    /// HTTP/2 with prior knowledge (h2c).
    Http2,
    /// gRPC: HTTP/2 judged by `grpc-status`.
    Grpc,
    /// Opaque TCP: balanced per connection, never inspected.
    Tcp,
}

/// Circuit breaking: endpoints failing in a row are ejected for a while.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OutlierSpec {
    pub consecutive_failures: u32,
    pub base_ejection_ms: u64,
    pub max_ejection_ms: u64,
    /// With every endpoint ejected: `fail_open` keeps sending to them, `fail_closed` answers 503
    /// (refuses opaque TCP).
    pub when_all_ejected: WhenAllEjected,
}

impl Default for OutlierSpec {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            base_ejection_ms: 1000,
            max_ejection_ms: 60_000,
            when_all_ejected: WhenAllEjected::FailOpen,
        }
    }
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum WhenAllEjected {
    FailOpen,
    FailClosed,
}

/// Retries to a service may add at most `ratio` of its recent requests, plus a floor.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RetryBudgetSpec {
    pub ratio: f64,
    pub min_per_second: u32,
    pub window_ms: u64,
}

impl Default for RetryBudgetSpec {
    fn default() -> Self {
        Self {
            ratio: 0.2,
            min_per_second: 10,
            window_ms: 10_000,
        }
    }
}

fn default_service_account() -> String {
    "default".to_owned()
}

fn default_namespace() -> String {
    "default".to_owned()
}

/// `namespace/name`: how pods are named in logs, stats and errors.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct PodId(String);

impl PodId {
    pub fn new(namespace: &str, name: &str) -> Self {
        Self(format!("{namespace}/{name}"))
    }
}

impl fmt::Display for PodId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl PodSpec {
    pub fn id(&self) -> PodId {
        PodId::new(&self.namespace, &self.name)
    }

    /// Where the pod's network namespace comes from, as logs and the admin endpoint show it.
    pub fn netns_source(&self) -> String {
        match (&self.netns, &self.uid) {
            (Some(path), _) => path.display().to_string(),
            (None, Some(uid)) => format!("pod uid {uid}"),
            (None, None) => "no netns".to_owned(),
        }
    }

    pub fn workload_name(&self) -> &str {
        self.workload.as_deref().unwrap_or(&self.name)
    }
}

impl PeerSpec {
    pub fn workload_name(&self) -> &str {
        self.workload.as_deref().unwrap_or(&self.name)
    }
}

impl Config {
    pub fn parse(text: &str) -> Result<Self> {
        // An empty document would parse as "no pods": a file caught mid-write must not release
        // every pod.
        if text.trim().is_empty() {
            bail!("the configuration is empty");
        }
        let config: Config = serde_yaml::from_str(text).context("invalid configuration")?;
        config.validate()?;
        Ok(config)
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("config file {}", path.display()))
    }

    pub fn embedded_default() -> Result<Self> {
        Self::parse(EMBEDDED_DEFAULT).context("embedded default configuration")
    }

    pub(crate) fn validate(&self) -> Result<()> {
        let agent = &self.agent;
        if !agent.cgroup_path.is_absolute() {
            bail!(
                "agent.cgroup_path must be absolute, got {}",
                agent.cgroup_path.display()
            );
        }
        if agent.socket_mark == 0 {
            bail!("agent.socket_mark must not be 0 (unmarked sockets would count as the agent's)");
        }
        if agent.exclude_ports.contains(&0) {
            bail!("agent.exclude_ports: port 0 is not a port");
        }
        if agent.exclude_ports.len() > MAX_EXCLUDED_PORTS as usize {
            bail!("agent.exclude_ports: at most {MAX_EXCLUDED_PORTS} ports");
        }
        if agent.exclude_cidrs.len() > MAX_EXCLUDED_CIDRS as usize {
            bail!("agent.exclude_cidrs: at most {MAX_EXCLUDED_CIDRS} CIDRs");
        }
        if agent.connect_timeout_ms == 0 {
            bail!("agent.connect_timeout_ms must be greater than 0");
        }
        if agent.tunnel_idle_timeout_ms == 0 {
            bail!("agent.tunnel_idle_timeout_ms must be greater than 0");
        }
        if !(1..=10_000).contains(&agent.protocol_detection_timeout_ms) {
            bail!("agent.protocol_detection_timeout_ms must be between 1 and 10000");
        }
        if agent.retry_body_limit_bytes > 16 * 1024 * 1024 {
            bail!(
                "agent.retry_body_limit_bytes must be at most 16 MiB (bodies are held in memory)"
            );
        }
        let ports = [
            ("outbound_port", agent.outbound_port),
            ("inbound_port", agent.inbound_port),
            ("inbound_plaintext_port", agent.inbound_plaintext_port),
        ];
        for (i, (name, port)) in ports.iter().enumerate() {
            if *port == 0 {
                bail!("agent.{name} must not be 0");
            }
            if let Some((other, _)) = ports[..i].iter().find(|(_, p)| p == port) {
                bail!("agent.{name} and agent.{other} must differ (both {port})");
            }
        }
        if agent.delivery_mark == 0 || agent.delivery_mark == agent.socket_mark {
            bail!("agent.delivery_mark must be non-zero and differ from agent.socket_mark");
        }
        if !agent.admin_addr.ip().is_loopback() {
            bail!(
                "agent.admin_addr must be a loopback address (the admin endpoints change the agent and must not be reachable from pods), got {}",
                agent.admin_addr
            );
        }
        if agent.metrics_addr == agent.admin_addr {
            bail!("agent.metrics_addr and agent.admin_addr must differ");
        }
        if agent.metrics_idle_expiry_s == 0 {
            bail!("agent.metrics_idle_expiry_s must be greater than 0");
        }
        if !is_dns_domain(&agent.cluster_domain) {
            bail!(
                "agent.cluster_domain must be a DNS domain such as cluster.local (lowercase letters, digits and '-' in dot-separated labels), got {:?}",
                agent.cluster_domain
            );
        }
        if !(0.0..=1.0).contains(&agent.access_log.sample_rate) {
            bail!(
                "agent.access_log.sample_rate must be between 0 and 1, got {}",
                agent.access_log.sample_rate
            );
        }
        if !is_dns_subdomain(&agent.node_name) {
            bail!(
                "agent.node_name {:?} is not a valid node name (DNS subdomain)",
                agent.node_name
            );
        }
        if let Some(identity) = &self.identity {
            identity.validate()?;
        }
        let handover = agent.handover.as_ref();
        let paths = [
            ("kubernetes.cni_dir", Some(&self.kubernetes.cni_dir)),
            ("kubernetes.proc_root", Some(&self.kubernetes.proc_root)),
            (
                "agent.handover.bpf_pin_dir",
                handover.map(|h| &h.bpf_pin_dir),
            ),
            ("agent.handover.state_dir", handover.map(|h| &h.state_dir)),
        ];
        for (name, path) in paths {
            if let Some(path) = path.filter(|path| !path.is_absolute()) {
                bail!("{name} must be an absolute path, got {path:?}");
            }
        }
        let mut seen_ids = HashSet::new();
        let mut seen_netns = HashSet::new();
        let mut seen_ips = HashSet::new();
        for (index, pod) in self.pods.iter().enumerate() {
            let entry = format!("pods[{index}] ({})", pod.id());
            check_workload(&entry, &pod.name, &pod.namespace, &pod.service_account)?;
            check_workload_name(&entry, pod.workload.as_deref())?;
            if !seen_ips.insert(pod.ip) {
                bail!("{entry}: ip {} is already used by another workload", pod.ip);
            }
            match (&pod.netns, &pod.uid) {
                (Some(netns), _) if !netns.is_absolute() => {
                    bail!("{entry}: netns must be an absolute path, got {netns:?}")
                }
                (None, None) => {
                    bail!("{entry}: needs netns (a path) or uid (the Kubernetes pod UID)")
                }
                _ => {}
            }
            if !seen_ids.insert(pod.id()) {
                bail!("{entry}: the pod is listed twice");
            }
            if !seen_netns.insert(pod.netns_source()) {
                bail!(
                    "{entry}: {} is already used by another pod",
                    pod.netns_source()
                );
            }
        }
        for (index, peer) in self.peers.iter().enumerate() {
            let entry = format!("peers[{index}] ({}/{})", peer.namespace, peer.name);
            check_workload(&entry, &peer.name, &peer.namespace, &peer.service_account)?;
            check_workload_name(&entry, peer.workload.as_deref())?;
            if !is_dns_subdomain(&peer.node) {
                bail!("{entry}: node {:?} is not a valid node name", peer.node);
            }
            if peer.node == agent.node_name {
                bail!(
                    "{entry}: node {:?} is this node; list local workloads under pods",
                    peer.node
                );
            }
            if !seen_ips.insert(peer.ip) {
                bail!(
                    "{entry}: ip {} is already used by another workload",
                    peer.ip
                );
            }
        }
        validate_policies(&self.policies)?;
        let service_ports = self.validate_services(&seen_ips)?;
        validate_routes(&self.routes, &service_ports)
    }

    /// Returns every (namespace, name, port) defined, for checking routes.
    fn validate_services(
        &self,
        workload_ips: &HashSet<Ipv4Addr>,
    ) -> Result<HashSet<ServicePortKey>> {
        let mut ports = HashSet::new();
        let mut seen_names = HashSet::new();
        let mut seen_vips = HashSet::new();
        for (index, service) in self.services.iter().enumerate() {
            let (namespace, name) = (&service.namespace, &service.name);
            let entry = format!("services[{index}] ({namespace}/{name})");
            if !is_dns_label(name) {
                bail!("{entry}: name {name:?} is not a valid service name (DNS label)");
            }
            if !is_dns_label(namespace) {
                bail!("{entry}: namespace {namespace:?} is not a DNS label");
            }
            if !seen_names.insert((namespace, name)) {
                bail!("{entry}: the service is listed twice");
            }
            if service.vips.is_empty() {
                bail!("{entry}: vips is empty; clients would have no address to connect to");
            }
            for vip in &service.vips {
                if !seen_vips.insert(*vip) {
                    bail!("{entry}: vip {vip} is already used by another service");
                }
                if workload_ips.contains(vip) {
                    bail!("{entry}: vip {vip} is a workload's address");
                }
            }
            if service.ports.is_empty() {
                bail!("{entry}: ports is empty");
            }
            for (p, port) in service.ports.iter().enumerate() {
                if port.port == 0 || port.target_port == Some(0) {
                    bail!("{entry}: ports[{p}]: port 0 is not a port");
                }
                let key = ServicePortKey {
                    namespace: namespace.clone(),
                    name: name.clone(),
                    port: port.port,
                };
                if !ports.insert(key) {
                    bail!("{entry}: ports[{p}]: port {} is listed twice", port.port);
                }
            }
            if service.selector.is_empty() && service.endpoints.is_empty() {
                bail!("{entry}: neither selector nor endpoints: the service could never have an endpoint");
            }
            let outlier = &service.outlier_detection;
            if outlier.consecutive_failures == 0 {
                bail!("{entry}: outlier_detection.consecutive_failures must be at least 1");
            }
            if outlier.base_ejection_ms == 0 || outlier.max_ejection_ms < outlier.base_ejection_ms {
                bail!("{entry}: outlier_detection needs 0 < base_ejection_ms <= max_ejection_ms");
            }
            if let Some(budget) = &service.retry_budget {
                if !(0.0..=1.0).contains(&budget.ratio) {
                    bail!("{entry}: retry_budget.ratio must be between 0 and 1");
                }
                if budget.window_ms < 1000 {
                    bail!("{entry}: retry_budget.window_ms must be at least 1000");
                }
            }
        }
        Ok(ports)
    }
}

impl IdentitySettings {
    fn validate(&self) -> Result<()> {
        if !is_dns_subdomain(&self.trust_domain) {
            bail!(
                "identity.trust_domain {:?} is not a valid trust domain (DNS name)",
                self.trust_domain
            );
        }
        if self.cert_lifetime_s == 0 {
            bail!("identity.cert_lifetime_s must be greater than 0");
        }
        if !(self.renew_fraction > 0.0 && self.renew_fraction < 1.0) {
            bail!(
                "identity.renew_fraction must be between 0 and 1 (exclusive), got {}",
                self.renew_fraction
            );
        }
        Ok(())
    }
}

fn check_workload(entry: &str, name: &str, namespace: &str, service_account: &str) -> Result<()> {
    if !is_dns_subdomain(name) {
        bail!("{entry}: name {name:?} is not a valid pod name (DNS subdomain)");
    }
    if !is_dns_label(namespace) {
        bail!("{entry}: namespace {namespace:?} is not a DNS label");
    }
    if !is_dns_subdomain(service_account) {
        bail!("{entry}: service_account {service_account:?} is not a valid name (DNS subdomain)");
    }
    Ok(())
}

fn check_workload_name(entry: &str, workload: Option<&str>) -> Result<()> {
    match workload {
        Some(name) if !is_dns_subdomain(name) => {
            bail!("{entry}: workload {name:?} is not a valid workload name (DNS subdomain)")
        }
        _ => Ok(()),
    }
}

/// Kubernetes object names: dot-separated DNS labels, at most 253 characters.
pub(crate) fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

pub(crate) fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_parses_with_no_pods() {
        let config = Config::embedded_default().unwrap();
        assert!(config.pods.is_empty());
        assert_eq!(config.agent, AgentSettings::default());
        assert_eq!(config.kubernetes, KubernetesSettings::default());
    }

    #[test]
    fn pods_and_exclusions_parse() {
        let config = Config::parse(
            "agent:\n  cgroup_path: /sys/fs/cgroup/unified/lab\n  exclude_ports: [22]\n  exclude_cidrs: [10.96.0.0/12]\npods:\n  - name: web\n    netns: /var/run/netns/web\n    ip: 10.0.0.1\n  - name: db\n    namespace: prod\n    netns: /proc/42/ns/net\n    ip: 10.0.0.2\n",
        )
        .unwrap();
        assert_eq!(config.pods.len(), 2);
        assert_eq!(config.pods[0].id().to_string(), "default/web");
        assert_eq!(config.pods[1].id().to_string(), "prod/db");
        assert_eq!(config.agent.exclude_ports, vec![22]);
        assert_eq!(config.agent.exclude_cidrs[0].to_string(), "10.96.0.0/12");
        assert_eq!(config.agent.outbound_port, 15001);
    }

    fn error_of(text: &str) -> String {
        format!("{:#}", Config::parse(text).unwrap_err())
    }

    #[test]
    fn unknown_key_names_the_entry() {
        let err = error_of(
            "pods:\n  - name: web\n    netns: /x\n    ip: 10.0.0.3\n  - name: db\n    netnz: /y\n",
        );
        assert!(err.contains("pods[1]") && err.contains("netnz"), "{err}");
    }

    #[test]
    fn invalid_entries_are_rejected_with_their_index() {
        let err = error_of("pods:\n  - name: web\n    netns: relative/path\n    ip: 10.0.0.4\n");
        assert!(
            err.contains("pods[0] (default/web)") && err.contains("absolute"),
            "{err}"
        );
        let err = error_of("pods:\n  - name: a\n    netns: /x\n    ip: 10.0.0.5\n  - name: a\n    netns: /y\n    ip: 10.0.0.6\n");
        assert!(err.contains("pods[1]") && err.contains("twice"), "{err}");
        let err = error_of("pods:\n  - name: a\n    netns: /x\n    ip: 10.0.0.7\n  - name: b\n    netns: /x\n    ip: 10.0.0.8\n");
        assert!(
            err.contains("pods[1]") && err.contains("already used"),
            "{err}"
        );
        let err = error_of("pods:\n  - name: Not_A_Label\n    netns: /x\n    ip: 10.0.0.9\n");
        assert!(err.contains("valid pod name"), "{err}");
        let err = error_of(
            "pods:\n  - name: web\n    namespace: a.b\n    netns: /x\n    ip: 10.0.0.10\n",
        );
        assert!(err.contains("DNS label"), "{err}");
        let dotted =
            Config::parse("pods:\n  - name: web-0.shard-1\n    netns: /x\n    ip: 10.0.0.11\n")
                .unwrap();
        assert_eq!(dotted.pods[0].id().to_string(), "default/web-0.shard-1");
    }

    #[test]
    fn garbage_and_bad_settings_are_rejected() {
        assert!(error_of("\u{0}\u{1}: [").contains("invalid configuration"));
        assert!(error_of("agent:\n  outbound_port: 0\n").contains("outbound_port"));
        assert!(error_of("agent:\n  outbound_port: 70000\n").contains("outbound_port"));
        assert!(error_of("agent:\n  exclude_cidrs: [10.0.0.0/40]\n").contains("exclude_cidrs"));
        assert!(error_of("agent:\n  cgroup_path: rel\n").contains("cgroup_path"));
        assert!(error_of("agnet: {}\n").contains("agnet"));
        assert!(error_of("").contains("empty"));
        assert!(error_of("  \n").contains("empty"));
        assert!(error_of("agent:\n  connect_timeout_ms: 0\n").contains("connect_timeout_ms"));
        assert!(
            error_of("agent:\n  tunnel_idle_timeout_ms: 0\n").contains("tunnel_idle_timeout_ms")
        );
        for domain in [
            "",
            "Cluster.Local",
            "cluster..local",
            "-cluster.local",
            "cluster.local.",
        ] {
            let err = error_of(&format!("agent:\n  cluster_domain: {domain:?}\n"));
            assert!(err.contains("cluster_domain"), "{domain:?}: {err}");
        }
        let many_ports: Vec<String> = (1..=1025).map(|p| p.to_string()).collect();
        let text = format!("agent:\n  exclude_ports: [{}]\n", many_ports.join(","));
        assert!(error_of(&text).contains("at most 1024 ports"));
    }

    #[test]
    fn the_deploy_example_parses_with_identities_peers_and_policies() {
        let config = Config::parse(include_str!("../../deploy/config.example.yaml")).unwrap();
        let identity = config.identity.unwrap();
        assert_eq!(identity.cert_lifetime(), Duration::from_secs(86_400));
        assert_eq!(identity.renew_fraction, 0.5);
        assert_eq!(config.pods[1].inbound_mode, InboundMode::Strict);
        assert_eq!(config.pods[0].inbound_mode, InboundMode::Permissive);
        assert_eq!(config.pods[0].labels["app"], "web");
        assert_eq!(config.peers[0].node, "node-2");
        assert_eq!(config.policies.len(), 1);
        assert_eq!(config.services.len(), 3);
        assert_eq!(config.services[2].ports[0].protocol, Some(AppProtocol::Tcp));
        assert_eq!(config.routes[0].spec.rules.len(), 2);
    }

    #[test]
    fn mesh_settings_are_validated() {
        let identity = "identity:\n  trust_domain: cluster.local\n  ca_cert: /c\n  ca_key: /k\n";
        let pod = "pods:\n  - {name: web, netns: /x, ip: 10.0.0.1}\n";
        assert!(Config::parse(&format!("{identity}{pod}")).is_ok());
        let err =
            error_of("identity:\n  trust_domain: Not A Domain\n  ca_cert: /c\n  ca_key: /k\n");
        assert!(err.contains("trust_domain"), "{err}");
        let err = error_of(&format!("{identity}  cert_lifetime_s: 0\n"));
        assert!(err.contains("cert_lifetime_s"), "{err}");
        let err = error_of(&format!("{identity}  renew_fraction: 1.5\n"));
        assert!(err.contains("renew_fraction"), "{err}");
        let err = error_of(&format!(
            "{pod}peers:\n  - {{name: db, ip: 10.0.0.1, node: n2}}\n"
        ));
        assert!(
            err.contains("peers[0]") && err.contains("already used"),
            "{err}"
        );
        let err =
            error_of("agent:\n  node_name: n1\npeers:\n  - {name: db, ip: 10.0.0.2, node: n1}\n");
        assert!(err.contains("is this node"), "{err}");
        let err = error_of("agent:\n  inbound_port: 15001\n");
        assert!(err.contains("must differ"), "{err}");
        let err = error_of("agent:\n  delivery_mark: 0x5746\n");
        assert!(err.contains("delivery_mark"), "{err}");
        let err =
            error_of("pods:\n  - {name: web, netns: /x, ip: 10.0.0.1, inbound_mode: LOOSE}\n");
        assert!(err.contains("LOOSE"), "{err}");
        let err = error_of("pods:\n  - {name: web, netns: /x}\n");
        assert!(err.contains("missing field `ip`"), "{err}");
        let err = error_of(
            "policies:\n  - metadata: {name: p, namespace: Bad_NS}\n    spec: {action: DENY}\n",
        );
        assert!(err.contains("policies[0]"), "{err}");
    }

    #[test]
    fn services_are_validated() {
        let pod = "pods:\n  - {name: web, netns: /x, ip: 10.0.0.1, labels: {app: web}}\n";
        let service = |body: &str| format!("{pod}services:\n  - {body}\n");
        let good =
            service("{name: web, vips: [10.96.0.1], ports: [{port: 80}], selector: {app: web}}");
        let config = Config::parse(&good).unwrap();
        assert_eq!(config.services[0].ports[0].target_port(), 80);
        assert!(config.services[0].retry_budget.is_some());
        let no_budget = service(
            "{name: web, vips: [10.96.0.1], ports: [{port: 80}], selector: {app: web}, retry_budget: null}",
        );
        assert!(Config::parse(&no_budget).unwrap().services[0]
            .retry_budget
            .is_none());
        let cases = [
            ("{name: web, vips: [], ports: [{port: 80}], selector: {app: web}}", "vips is empty"),
            ("{name: web, vips: [10.0.0.1], ports: [{port: 80}], selector: {app: web}}", "a workload's address"),
            ("{name: web, vips: [10.96.0.1], ports: [], selector: {app: web}}", "ports is empty"),
            ("{name: web, vips: [10.96.0.1], ports: [{port: 80}, {port: 80}], selector: {app: web}}", "listed twice"),
            ("{name: web, vips: [10.96.0.1], ports: [{port: 80, target_port: 0}], selector: {app: web}}", "not a port"),
            ("{name: web, vips: [10.96.0.1], ports: [{port: 80}]}", "never have an endpoint"),
            ("{name: Web, vips: [10.96.0.1], ports: [{port: 80}], selector: {app: web}}", "DNS label"),
            ("{name: web, vips: [10.96.0.1], ports: [{port: 80, protocol: quic}], selector: {app: web}}", "quic"),
            ("{name: web, vips: [10.96.0.1], ports: [{port: 80}], selector: {app: web}, outlier_detection: {consecutive_failures: 0}}", "at least 1"),
            ("{name: web, vips: [10.96.0.1], ports: [{port: 80}], selector: {app: web}, retry_budget: {ratio: 2.0}}", "ratio"),
        ];
        for (body, expected) in cases {
            let err = error_of(&service(body));
            assert!(
                err.contains(expected) && err.contains("services[0]"),
                "{body}: {err}"
            );
        }
        let twice = format!(
            "{pod}services:\n  - {{name: a, vips: [10.96.0.1], ports: [{{port: 80}}], endpoints: [10.0.0.9]}}\n  - {{name: b, vips: [10.96.0.1], ports: [{{port: 80}}], endpoints: [10.0.0.9]}}\n"
        );
        assert!(error_of(&twice).contains("already used by another service"));
        let route = format!(
            "{good}routes:\n  - metadata: {{name: r, namespace: default}}\n    spec: {{parentRefs: [{{name: nope}}], rules: [{{}}]}}\n"
        );
        assert!(error_of(&route).contains("no service default/nope"));
    }
}

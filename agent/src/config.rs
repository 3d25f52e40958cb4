//! The local configuration file: agent settings and the enrolled pods. Parsing is strict (unknown
//! keys are errors) and a rejected file never changes the running state.
use std::{
    collections::HashSet,
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use weft_common::{MAX_EXCLUDED_CIDRS, MAX_EXCLUDED_PORTS};

pub const EMBEDDED_DEFAULT: &str = include_str!("../default-config.yaml");

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub agent: AgentSettings,
    #[serde(default)]
    pub pods: Vec<PodSpec>,
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
    pub drain_timeout_ms: u64,
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
            drain_timeout_ms: 10_000,
        }
    }
}

impl AgentSettings {
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    pub fn drain_timeout(&self) -> Duration {
        Duration::from_millis(self.drain_timeout_ms)
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(deny_unknown_fields)]
pub struct PodSpec {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// A path that refers to the pod's network namespace (e.g. /var/run/netns/x or /proc/PID/ns/net).
    pub netns: PathBuf,
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

    fn validate(&self) -> Result<()> {
        let agent = &self.agent;
        if !agent.cgroup_path.is_absolute() {
            bail!(
                "agent.cgroup_path must be absolute, got {}",
                agent.cgroup_path.display()
            );
        }
        if agent.outbound_port == 0 {
            bail!("agent.outbound_port must not be 0");
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
        let mut seen_ids = HashSet::new();
        let mut seen_netns = HashSet::new();
        for (index, pod) in self.pods.iter().enumerate() {
            let entry = format!("pods[{index}] ({})", pod.id());
            if !is_dns_subdomain(&pod.name) {
                bail!(
                    "{entry}: name {:?} is not a valid pod name (DNS subdomain)",
                    pod.name
                );
            }
            if !is_dns_label(&pod.namespace) {
                bail!("{entry}: namespace {:?} is not a DNS label", pod.namespace);
            }
            if !pod.netns.is_absolute() {
                bail!(
                    "{entry}: netns must be an absolute path, got {:?}",
                    pod.netns
                );
            }
            if !seen_ids.insert(pod.id()) {
                bail!("{entry}: the pod is listed twice");
            }
            if !seen_netns.insert(&pod.netns) {
                bail!(
                    "{entry}: netns {} is already used by another pod",
                    pod.netns.display()
                );
            }
        }
        Ok(())
    }
}

/// Kubernetes object names: dot-separated DNS labels, at most 253 characters.
fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

fn is_dns_label(s: &str) -> bool {
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
    }

    #[test]
    fn pods_and_exclusions_parse() {
        let config = Config::parse(
            "agent:\n  cgroup_path: /sys/fs/cgroup/unified/lab\n  exclude_ports: [22]\n  exclude_cidrs: [10.96.0.0/12]\npods:\n  - name: web\n    netns: /var/run/netns/web\n  - name: db\n    namespace: prod\n    netns: /proc/42/ns/net\n",
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
        let err = error_of("pods:\n  - name: web\n    netns: /x\n  - name: db\n    netnz: /y\n");
        assert!(err.contains("pods[1]") && err.contains("netnz"), "{err}");
    }

    #[test]
    fn invalid_entries_are_rejected_with_their_index() {
        let err = error_of("pods:\n  - name: web\n    netns: relative/path\n");
        assert!(
            err.contains("pods[0] (default/web)") && err.contains("absolute"),
            "{err}"
        );
        let err = error_of("pods:\n  - name: a\n    netns: /x\n  - name: a\n    netns: /y\n");
        assert!(err.contains("pods[1]") && err.contains("twice"), "{err}");
        let err = error_of("pods:\n  - name: a\n    netns: /x\n  - name: b\n    netns: /x\n");
        assert!(
            err.contains("pods[1]") && err.contains("already used"),
            "{err}"
        );
        let err = error_of("pods:\n  - name: Not_A_Label\n    netns: /x\n");
        assert!(err.contains("valid pod name"), "{err}");
        let err = error_of("pods:\n  - name: web\n    namespace: a.b\n    netns: /x\n");
        assert!(err.contains("DNS label"), "{err}");
        let dotted = Config::parse("pods:\n  - name: web-0.shard-1\n    netns: /x\n").unwrap();
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
        let many_ports: Vec<String> = (1..=1025).map(|p| p.to_string()).collect();
        let text = format!("agent:\n  exclude_ports: [{}]\n", many_ports.join(","));
        assert!(error_of(&text).contains("at most 1024 ports"));
    }
}

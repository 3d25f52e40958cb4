//! Running a weft agent on a lab node, as the demo, the tests and the benchmark do.
use std::{
    fs::{self, File},
    path::{Path, PathBuf},
    process::{Child, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::lab::{write_atomically, Lab, Node, Pod};

pub const ADMIN_ADDR: &str = "127.0.0.1:15000";
/// What the agent logs once it has applied a changed config.
const RELOADED: &str = "configuration reloaded";

/// The weft binary under test: $WEFT_BIN, else the workspace's release build.
pub fn weft_binary() -> PathBuf {
    std::env::var_os("WEFT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::workspace_root().join("target/release/weft"))
}

/// The YAML config of `node`'s agent with `enrolled` pods.
pub fn config_yaml(node: &Node, enrolled: &[&Pod], extra_agent_settings: &str) -> String {
    let mut yaml = format!(
        "agent:\n  cgroup_path: {}\n  admin_addr: {ADMIN_ADDR}\n  drain_timeout_ms: 3000\n{extra_agent_settings}pods:\n",
        node.pods_cgroup.display()
    );
    for pod in enrolled {
        yaml.push_str(&format!(
            "  - name: {}\n    namespace: lab\n    netns: {}\n    ip: {}\n",
            pod.name,
            pod.netns_path().display(),
            pod.ip
        ));
    }
    yaml
}

/// A lab pod as a meshed workload.
#[derive(Clone, Debug)]
pub struct MeshWorkload {
    pub pod: Pod,
    /// Name of the node the pod runs on.
    pub node: String,
    pub service_account: String,
    /// `STRICT` or `PERMISSIVE`.
    pub inbound_mode: &'static str,
    /// Labels as a YAML flow mapping, e.g. `{app: web}`.
    pub labels: &'static str,
}

/// What every agent of a meshed lab is told: the CA, the workloads on all nodes, the policies.
#[derive(Clone, Debug)]
pub struct Mesh {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    /// Extra lines of the `identity:` section, e.g. `  cert_lifetime_s: 4\n`.
    pub identity_extra: String,
    /// Extra lines of the `agent:` section, e.g. `  metrics_addr: 0.0.0.0:15090\n`.
    pub agent_extra: String,
    pub workloads: Vec<MeshWorkload>,
    /// The `policies:` list as YAML items (`  - metadata: ...`), or empty.
    pub policies: String,
    /// The `services:` list as YAML items, or empty.
    pub services: String,
    /// The `routes:` list as YAML items, or empty.
    pub routes: String,
}

impl Mesh {
    /// Every pod of `lab` as a workload with service account `sa-<pod>`, PERMISSIVE, no labels.
    pub fn new(lab: &Lab, ca_cert: PathBuf, ca_key: PathBuf) -> Self {
        let workloads = lab
            .nodes
            .iter()
            .flat_map(|node| {
                node.pods.iter().map(|pod| MeshWorkload {
                    pod: pod.clone(),
                    node: node.name.clone(),
                    service_account: format!("sa-{}", pod.name),
                    inbound_mode: "PERMISSIVE",
                    labels: "{}",
                })
            })
            .collect();
        Self {
            ca_cert,
            ca_key,
            identity_extra: String::new(),
            agent_extra: String::new(),
            workloads,
            policies: String::new(),
            services: String::new(),
            routes: String::new(),
        }
    }

    pub fn workload_mut(&mut self, pod: &str) -> Result<&mut MeshWorkload> {
        self.workloads
            .iter_mut()
            .find(|w| w.pod.name == pod)
            .with_context(|| format!("no workload {pod} in the mesh"))
    }

    /// The config of `node`'s agent: `enrolled` of its pods, every other node's workloads as
    /// peers. Workloads of this node that are not enrolled are not meshed.
    pub fn config_yaml(&self, node: &Node, enrolled: &[&Pod]) -> String {
        let pods: Vec<String> = self
            .workloads
            .iter()
            .filter(|w| w.node == node.name && enrolled.iter().any(|p| p.name == w.pod.name))
            .map(|w| {
                format!(
                    "  - {{name: {}, namespace: lab, netns: {}, ip: {}, service_account: {}, inbound_mode: {}, labels: {}}}\n",
                    w.pod.name,
                    w.pod.netns_path().display(),
                    w.pod.ip,
                    w.service_account,
                    w.inbound_mode,
                    w.labels
                )
            })
            .collect();
        let peers: Vec<String> = self
            .workloads
            .iter()
            .filter(|w| w.node != node.name)
            .map(|w| {
                format!(
                    "  - {{name: {}, namespace: lab, ip: {}, service_account: {}, node: {}, labels: {}}}\n",
                    w.pod.name, w.pod.ip, w.service_account, w.node, w.labels
                )
            })
            .collect();
        format!(
            "agent:\n  cgroup_path: {}\n  admin_addr: {ADMIN_ADDR}\n  drain_timeout_ms: 3000\n  node_name: {}\n{}\
             identity:\n  trust_domain: {TRUST_DOMAIN}\n  ca_cert: {}\n  ca_key: {}\n{}\
             pods:{}\npeers:{}\npolicies:{}\nservices:{}\nroutes:{}\n",
            node.pods_cgroup.display(),
            node.name,
            self.agent_extra,
            self.ca_cert.display(),
            self.ca_key.display(),
            self.identity_extra,
            yaml_list(&pods.concat()),
            yaml_list(&peers.concat()),
            yaml_list(&self.policies),
            yaml_list(&self.services),
            yaml_list(&self.routes),
        )
    }
}

/// A block list after its key: a YAML key with nothing under it would be null, not empty.
fn yaml_list(items: &str) -> String {
    if items.is_empty() {
        " []".to_owned()
    } else {
        format!("\n{}", items.trim_end_matches('\n'))
    }
}

/// The trust domain of lab meshes.
pub const TRUST_DOMAIN: &str = "cluster.local";

/// Rewrites several agents' configs together, the way a cluster change reaches every node's
/// agent at once, then waits for each as [`Agent::rewrite_config`] does.
pub fn rewrite_configs(changes: &mut [(&mut Agent, &str, &[&Pod])]) -> Result<()> {
    let mut before = Vec::with_capacity(changes.len());
    for (agent, yaml, _) in changes.iter() {
        before.push(agent.reloads());
        write_atomically(&agent.config_path, yaml)?;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for ((agent, _, enrolled), before) in changes.iter_mut().zip(before) {
        while agent.reloads() == before {
            if Instant::now() > deadline {
                bail!(
                    "the agent on node {} did not reload its config",
                    agent.node.name
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
        agent.wait_enrolled(enrolled)?;
    }
    Ok(())
}

pub struct Agent {
    pub node: Node,
    config_path: PathBuf,
    log_path: PathBuf,
    child: Option<Child>,
}

impl Agent {
    /// Starts weft on `node` with `enrolled` pods and waits until it serves them.
    pub fn start(lab: &Lab, node: &Node, enrolled: &[&Pod]) -> Result<Agent> {
        Self::start_with(lab, node, &config_yaml(node, enrolled, ""), enrolled)
    }

    /// Starts weft with the given config text; `expect_enrolled` are waited for.
    pub fn start_with(
        lab: &Lab,
        node: &Node,
        config: &str,
        expect_enrolled: &[&Pod],
    ) -> Result<Agent> {
        let node_dir = lab.dir.join(format!("node-{}", node.name));
        fs::create_dir_all(&node_dir)?;
        let config_path = node_dir.join("weft.yaml");
        write_atomically(&config_path, config)?;
        let log_path = node_dir.join("weft.log");
        let log = File::options().create(true).append(true).open(&log_path)?;
        let binary = weft_binary();
        if !binary.exists() {
            bail!(
                "{} does not exist: build it with `cargo xtask build`",
                binary.display()
            );
        }
        let child = crate::lab::command_in(&node.netns, Some(&node.agent_cgroup), &binary)?
            .args(["run", "--config", &config_path.to_string_lossy()])
            .env(
                "WEFT_LOG",
                std::env::var("WEFT_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let mut agent = Agent {
            node: node.clone(),
            config_path,
            log_path,
            child: Some(child),
        };
        agent.wait_enrolled(expect_enrolled)?;
        Ok(agent)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Rewrites the config with `enrolled` pods and waits until exactly those are enrolled.
    pub fn set_enrolled(&mut self, enrolled: &[&Pod]) -> Result<()> {
        write_atomically(&self.config_path, &config_yaml(&self.node, enrolled, ""))?;
        self.wait_enrolled(enrolled)
    }

    /// Rewrites the config with `yaml` and waits until the agent has applied it and exactly
    /// `enrolled` are enrolled.
    pub fn rewrite_config(&mut self, yaml: &str, enrolled: &[&Pod]) -> Result<()> {
        rewrite_configs(&mut [(self, yaml, enrolled)])
    }

    fn reloads(&self) -> usize {
        self.log().matches(RELOADED).count()
    }

    /// `GET /stats` from the agent's admin endpoint (in the node's namespace).
    pub fn stats(&self) -> Result<Value> {
        let out = self
            .node
            .command("curl")?
            .args([
                "-sf",
                "--max-time",
                "5",
                &format!("http://{ADMIN_ADDR}/stats"),
            ])
            .output()
            .context("running curl for agent stats")?;
        if !out.status.success() {
            bail!("agent on node {} did not answer /stats", self.node.name);
        }
        serde_json::from_slice(&out.stdout).context("agent /stats is not JSON")
    }

    /// Names of pods the agent reports as enrolled.
    pub fn enrolled_pods(&self) -> Result<Vec<String>> {
        let stats = self.stats()?;
        let pods = stats["pods"].as_object().cloned().unwrap_or_default();
        Ok(pods
            .iter()
            .filter(|(_, status)| status["state"] == "enrolled")
            .map(|(id, _)| id.trim_start_matches("lab/").to_owned())
            .collect())
    }

    pub fn wait_enrolled(&mut self, pods: &[&Pod]) -> Result<()> {
        let mut wanted: Vec<String> = pods.iter().map(|p| p.name.clone()).collect();
        wanted.sort();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!("weft exited with {status}; log:\n{}", self.log());
            }
            if let Ok(mut enrolled) = self.enrolled_pods() {
                enrolled.sort();
                if enrolled == wanted {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "agent on node {} did not enroll {wanted:?} in time; log:\n{}",
                    self.node.name,
                    self.log()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends `signal` and waits (bounded) for the process to exit; returns its exit status code.
    pub fn stop_with(&mut self, signal: i32, timeout: Duration) -> Result<Option<i32>> {
        let Some(mut child) = self.child.take() else {
            bail!("agent already stopped")
        };
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(child.id() as i32, signal) };
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status.code());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("agent did not exit within {timeout:?} of signal {signal}");
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

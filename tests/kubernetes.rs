//! Lab tests of the agent following a Kubernetes API server (the fake one, reached over the lab's
//! wire; need root): labelling a namespace enrolls its pods and unlabelling releases them, under
//! live traffic and without restarting anything; and the watches ride out API-server trouble
//! (dropped watches, 410 Gone, a restart) without releasing a pod, then catch up.
//!
//! Every lab pod that is a Pod object gets a "sandbox": a process in the pod's network namespace
//! and in a cgroup laid out as the kubelet's systemd driver makes them, below the node's pods
//! cgroup, so the agent finds the pod's namespace from its UID as it does on a real node.
use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, ensure, Context, Result};
use prometheus_parse::Scrape;
use serde_json::{json, Value};
use weft_lab_tests::{
    cgroup_program_ids,
    fake_apiserver::{self, ResourceKind, Verb},
    fetch, metric, start_fake_api_server, TestLab,
};
use xtask::{
    agent::{Agent, ADMIN_ADDR, TRUST_DOMAIN},
    lab::{command_in, Lab, Node, Pod},
    pki::{spiffe_id, TestCa},
};

const APP: &str = env!("CARGO_BIN_EXE_weft-testapp");
const API_PORT: u16 = 6443;
const MESH: (&str, &str) = ("weft.dev/mesh", "enabled");
/// Watches per agent: namespaces, this node's pods, all pods, services, endpointslices,
/// authorizationpolicies, httproutes.
const WATCHES_PER_AGENT: usize = 7;

/// A lab pod as a Kubernetes pod: its UID and the container cgroup its processes run in.
struct Sandbox {
    uid: String,
    /// `<pods_cgroup>/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid>.slice/cri-containerd-<id>.scope`
    scope: PathBuf,
    pod: Pod,
    node: String,
    /// The sandbox's own process (the pause container's role).
    child: Child,
}

impl Sandbox {
    fn start(node: &Node, pod: &Pod) -> Result<Self> {
        let n = u32::from(pod.ip);
        let uid = sandbox_uid(pod);
        let scope = node
            .pods_cgroup
            .join("kubepods.slice/kubepods-besteffort.slice")
            .join(format!(
                "kubepods-besteffort-pod{}.slice",
                uid.replace('-', "_")
            ))
            .join(format!("cri-containerd-{n:064x}.scope"));
        fs::create_dir_all(&scope).with_context(|| format!("creating {}", scope.display()))?;
        let child = command_in(&pod.netns, Some(&scope), "sleep")?
            .arg("600")
            .stdin(Stdio::null())
            .spawn()
            .context("starting a sandbox process")?;
        Ok(Self {
            uid,
            scope,
            pod: pod.clone(),
            node: node.name.clone(),
            child,
        })
    }

    /// Moves every process of the lab pod's own cgroup (nginx, say) into the container cgroup.
    fn adopt_pod_processes(&self) -> Result<()> {
        let procs = fs::read_to_string(self.pod.cgroup.join("cgroup.procs"))?;
        for pid in procs.lines().filter(|l| !l.trim().is_empty()) {
            fs::write(self.scope.join("cgroup.procs"), pid)
                .with_context(|| format!("moving pid {pid} to {}", self.scope.display()))?;
        }
        Ok(())
    }

    fn object(&self, namespace: &str) -> Value {
        pod_object(namespace, &self.pod, &self.node, &self.uid)
    }

    /// `program` run in the pod: its network namespace and its container cgroup.
    fn command(&self, program: &str) -> Result<std::process::Command> {
        command_in(&self.pod.netns, Some(&self.scope), program)
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The UID of the Pod object of a lab pod.
fn sandbox_uid(pod: &Pod) -> String {
    format!("5eed0000-0000-4000-8000-{:012x}", u32::from(pod.ip))
}

/// The Pod object of a lab pod: running on `node` with the lab pod's IP, service account
/// `sa-<pod>`.
fn pod_object(namespace: &str, pod: &Pod, node: &str, uid: &str) -> Value {
    let service_account = format!("sa-{}", pod.name);
    let mut object = fake_apiserver::pod(
        namespace,
        &pod.name,
        node,
        Some(pod.ip),
        &service_account,
        &[("app", &pod.name)],
    );
    object["metadata"]["uid"] = json!(uid);
    object
}

/// Kills a process when dropped.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Identity on, Kubernetes on, no pods or peers of its own: everything comes from the cluster.
fn agent_config(lab: &Lab, node: &Node, ca: &(PathBuf, PathBuf), kubeconfig: &Path) -> String {
    format!(
        "agent:\n  cgroup_path: {}\n  admin_addr: {ADMIN_ADDR}\n  drain_timeout_ms: 3000\n  node_name: {}\n  access_log: {{enabled: false}}\n\
         identity:\n  trust_domain: {TRUST_DOMAIN}\n  ca_cert: {}\n  ca_key: {}\n\
         kubernetes:\n  enabled: true\n  kubeconfig: {}\n  cni_dir: {}\n  proc_root: /proc\n",
        node.pods_cgroup.display(),
        node.name,
        ca.0.display(),
        ca.1.display(),
        kubeconfig.display(),
        lab.dir.join(format!("node-{}/cni", node.name)).display(),
    )
}

/// The agent of `node`, once it has applied the cluster's state.
fn start_agent(
    lab: &Lab,
    node: &Node,
    ca: &(PathBuf, PathBuf),
    kubeconfig: &Path,
) -> Result<Agent> {
    let agent = Agent::start_with(lab, node, &agent_config(lab, node, ca, kubeconfig), &[])?;
    wait_for(
        &format!("the agent on node {} to apply the cluster state", node.name),
        Duration::from_secs(15),
        || Ok(agent.log().contains("cluster state applied").then_some(())),
    )
    .with_context(|| agent.log())?;
    Ok(agent)
}

/// An agent on node a and on node b.
fn start_agents(lab: &Lab, ca: &(PathBuf, PathBuf), kubeconfig: &Path) -> Result<[Agent; 2]> {
    Ok([
        start_agent(lab, lab.node("a")?, ca, kubeconfig)?,
        start_agent(lab, lab.node("b")?, ca, kubeconfig)?,
    ])
}

/// Polls `check` every 100 ms until it yields a value; fails after `timeout` (or on its error).
fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check()? {
            return Ok(value);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// `GET path` from the agent's admin endpoint, as JSON.
fn admin(agent: &Agent, path: &str) -> Result<Value> {
    let out = agent
        .node
        .command("curl")?
        .args([
            "-sf",
            "--max-time",
            "5",
            &format!("http://{ADMIN_ADDR}{path}"),
        ])
        .output()
        .context("running curl for the admin endpoint")?;
    ensure!(
        out.status.success(),
        "the agent on node {} did not answer {path}",
        agent.node.name
    );
    serde_json::from_slice(&out.stdout).with_context(|| format!("{path} is not JSON"))
}

/// The enrollment state of every pod the agent reports (`/config_dump` `pods`), by
/// `namespace/name`.
fn pod_states(agent: &Agent) -> Result<BTreeMap<String, String>> {
    let dump = admin(agent, "/config_dump")?;
    Ok(dump["pods"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(id, status)| {
            let state = status["state"].as_str().unwrap_or("?");
            let detail = match status["error"].as_str() {
                Some(error) => format!("{state}: {error}"),
                None => state.to_owned(),
            };
            (id.clone(), detail)
        })
        .collect())
}

/// `ids` all enrolled, and nothing else reported.
fn enrolled(ids: &[&str]) -> BTreeMap<String, String> {
    ids.iter()
        .map(|id| ((*id).to_owned(), "enrolled".to_owned()))
        .collect()
}

fn wait_pod_states(agent: &Agent, want: &BTreeMap<String, String>) -> Result<()> {
    let mut last = BTreeMap::new();
    wait_for(
        &format!("pods {want:?} on node {}", agent.node.name),
        Duration::from_secs(15),
        || {
            last = pod_states(agent)?;
            Ok((last == *want).then_some(()))
        },
    )
    .with_context(|| format!("last seen: {last:?}; log:\n{}", agent.log()))
}

/// `weft_pods{state="enrolled"}` of the agent's `/metrics` (default address, in the node).
fn enrolled_gauge(agent: &Agent) -> Result<f64> {
    pods_gauge(agent, &[("state", "enrolled")])
}

/// The sum of the `weft_pods` samples carrying `labels`.
fn pods_gauge(agent: &Agent, labels: &[(&str, &str)]) -> Result<f64> {
    let out = agent
        .node
        .command("curl")?
        .args(["-sf", "--max-time", "5", "http://127.0.0.1:15020/metrics"])
        .output()
        .context("running curl for /metrics")?;
    ensure!(
        out.status.success(),
        "the agent on node {} did not answer /metrics",
        agent.node.name
    );
    let text = String::from_utf8(out.stdout).context("/metrics is not UTF-8")?;
    let scrape =
        Scrape::parse(text.lines().map(|line| Ok(line.to_owned()))).context("parsing /metrics")?;
    Ok(metric(&scrape, "weft_pods", labels))
}

/// Connections from `source` (`namespace/name`) to `destination` the agent relayed through an
/// mTLS tunnel, and through any transport.
fn relayed(agent: &Agent, source: &str, destination: &str) -> Result<(u64, u64)> {
    let stats = agent.stats()?;
    let mut mtls = 0;
    let mut all = 0;
    for flow in stats["flows"].as_array().into_iter().flatten() {
        if flow["source_pod"] == source && flow["destination"] == destination {
            let opened = flow["opened"].as_u64().unwrap_or(0);
            all += opened;
            if flow["transport"] == "mtls" {
                mtls += opened;
            }
        }
    }
    Ok((mtls, all))
}

/// Tunnel streams the agent delivered to its pod `id`.
fn delivered_mtls(agent: &Agent, id: &str) -> Result<u64> {
    Ok(agent.stats()?["inbound"][id]["mtls"].as_u64().unwrap_or(0))
}

/// The watches' state in `/config_dump`, by name: (synced, error, errors_total).
/// Per watch: (synced, last error, errors so far).
type WatchTable = BTreeMap<String, (bool, Option<String>, u64)>;

fn watches(agent: &Agent) -> Result<WatchTable> {
    let dump = admin(agent, "/config_dump")?;
    let table = dump["kubernetes"]["watches"]
        .as_object()
        .context("no kubernetes.watches in /config_dump")?;
    Ok(table
        .iter()
        .map(|(name, w)| {
            (
                name.clone(),
                (
                    w["synced"].as_bool().unwrap_or(false),
                    w["last_error"].as_str().map(str::to_owned),
                    w["errors_total"].as_u64().unwrap_or(0),
                ),
            )
        })
        .collect())
}

/// The workload `id` as the agent's mesh state has it (`/config_dump` `workloads`).
fn workload(agent: &Agent, id: &str) -> Result<Option<Value>> {
    let dump = admin(agent, "/config_dump")?;
    Ok(dump["workloads"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|w| w["id"] == id)
        .cloned())
}

fn lines_with(agent: &Agent, needle: &str) -> Vec<String> {
    agent
        .log()
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_owned)
        .collect()
}

/// The agent's warnings, errors and enrollment changes, for failure messages.
fn notable(agent: &Agent) -> String {
    agent
        .log()
        .lines()
        .filter(|l| {
            [
                " WARN ",
                " ERROR ",
                "pod enrolled",
                "pod released",
                "cluster state",
            ]
            .iter()
            .any(|needle| l.contains(needle))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// What shows an agent process was never replaced: it still runs with the same PID, it started
/// once, and the programs attached to the node's pods cgroup are the ones it attached.
struct Incarnation {
    pid: u32,
    programs: Vec<u64>,
}

impl Incarnation {
    fn of(agent: &Agent) -> Result<Self> {
        Ok(Self {
            pid: agent.pid().context("agent not running")?,
            programs: cgroup_program_ids(&agent.node.pods_cgroup)?,
        })
    }

    fn check_same(&self, agent: &Agent) -> Result<()> {
        let node = &agent.node.name;
        ensure!(
            agent.pid() == Some(self.pid),
            "node {node}: agent PID changed"
        );
        let exe = fs::read_link(format!("/proc/{}/exe", self.pid))
            .with_context(|| format!("node {node}: agent {} is gone", self.pid))?;
        ensure!(
            exe.to_string_lossy().contains("weft"),
            "node {node}: PID {} is now {}",
            self.pid,
            exe.display()
        );
        let started = lines_with(agent, "weft is running").len();
        ensure!(
            started == 1,
            "node {node}: the agent started {started} times"
        );
        let programs = cgroup_program_ids(&agent.node.pods_cgroup)?;
        ensure!(
            programs == self.programs && !programs.is_empty(),
            "node {node}: programs attached changed from {:?} to {programs:?}",
            self.programs
        );
        Ok(())
    }
}

/// Steady HTTP load from a pod: back-to-back `weft-testapp load` runs of 100 requests at 50/s,
/// each on a new connection, until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<Vec<Value>>>>,
}

/// Requests sent and requests that did not get a 2xx answer.
struct LoadResult {
    requests: u64,
    failed: u64,
    failures: Vec<Value>,
}

impl Load {
    fn start(client: &Sandbox, url: &str) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        // Built here so a setup error shows at once; each run needs a command of its own.
        client.command(APP)?;
        let (netns, scope, url) = (
            client.pod.netns.clone(),
            client.scope.clone(),
            url.to_owned(),
        );
        let thread = {
            let stop = Arc::clone(&stop);
            thread::spawn(move || -> Result<Vec<Value>> {
                let mut summaries = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    let out = command_in(&netns, Some(&scope), APP)?
                        .args(["load", "--url", &url, "--requests", "100"])
                        .args(["--concurrency", "4", "--rate", "50", "--new-connections"])
                        .args(["--timeout-ms", "5000"])
                        .stdin(Stdio::null())
                        .output()
                        .context("running weft-testapp load")?;
                    ensure!(
                        out.status.success(),
                        "load failed: {}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                    let mut summary: Value = serde_json::from_slice(&out.stdout)
                        .context("load printed no JSON summary")?;
                    summary["stderr"] = json!(String::from_utf8_lossy(&out.stderr));
                    summaries.push(summary);
                }
                Ok(summaries)
            })
        };
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    fn finish(mut self) -> Result<LoadResult> {
        self.stop.store(true, Ordering::SeqCst);
        let summaries = self
            .thread
            .take()
            .context("load already finished")?
            .join()
            .map_err(|_| anyhow!("load thread panicked"))??;
        let mut result = LoadResult {
            requests: 0,
            failed: 0,
            failures: Vec::new(),
        };
        for summary in summaries {
            let requests = summary["requests"].as_u64().unwrap_or(0);
            let ok = summary["ok"].as_u64().unwrap_or(0);
            result.requests += requests;
            result.failed += requests - ok.min(requests);
            if ok < requests {
                result.failures.push(summary);
            }
        }
        Ok(result)
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn nginx_requests(pod: &Pod) -> Result<usize> {
    Ok(pod.nginx_clients()?.len())
}

/// Starts nginx in the server's pod and moves it into the pod's container cgroup.
fn start_nginx(server: &Sandbox) -> Result<Guard> {
    let nginx = Guard(server.pod.start_nginx()?);
    server.adopt_pod_processes()?;
    Ok(nginx)
}

#[test]
fn labelling_a_namespace_enrolls_its_pods_and_unlabelling_releases_them_under_load() -> Result<()> {
    let started = Instant::now();
    let lab = TestLab::up("kube", 2, 1)?;
    let ca = TestCa::new("weft lab mesh CA")?;
    let ca_files = ca.write(&lab.dir.join("ca"))?;
    let (server, kubeconfig) = start_fake_api_server(&lab, lab.node("a")?, API_PORT)?;
    let (node_a, node_b) = (lab.node("a")?, lab.node("b")?);
    let (a1, b1) = (lab.pod("a1")?, lab.pod("b1")?);
    let client = Sandbox::start(node_a, a1)?;
    let backend = Sandbox::start(node_b, b1)?;
    server.apply(fake_apiserver::namespace("shop", &[]));
    server.apply(client.object("shop"));
    server.apply(backend.object("shop"));
    let _nginx = start_nginx(&backend)?;

    let [agent_a, agent_b] = start_agents(&lab, &ca_files, &kubeconfig)?;
    let incarnations = [Incarnation::of(&agent_a)?, Incarnation::of(&agent_b)?];
    for agent in [&agent_a, &agent_b] {
        ensure!(
            pod_states(agent)?.is_empty(),
            "node {}: pods enrolled before the namespace is labelled",
            agent.node.name
        );
    }

    let url = format!("http://{}/", b1.ip);
    let destination = format!("{}:80", b1.ip);
    let load = Load::start(&client, &url)?;
    // Unlabelled: the requests go straight to nginx, no agent sees them.
    wait_for("requests to reach nginx", Duration::from_secs(10), || {
        Ok((nginx_requests(b1)? >= 25).then_some(()))
    })?;
    ensure!(
        relayed(&agent_a, "shop/a1", &destination)? == (0, 0),
        "the agent relayed traffic of a pod of an unlabelled namespace"
    );

    // Labelled: both pods are enrolled, found by UID, and the traffic goes through the tunnel.
    let label_at = Instant::now();
    server.apply(fake_apiserver::namespace("shop", &[MESH]));
    wait_pod_states(&agent_a, &enrolled(&["shop/a1"]))?;
    wait_pod_states(&agent_b, &enrolled(&["shop/b1"]))?;
    eprintln!("enrolled {:?} after labelling", label_at.elapsed());
    for agent in [&agent_a, &agent_b] {
        let gauge = enrolled_gauge(agent)?;
        ensure!(
            gauge == 1.0,
            "node {}: weft_pods{{state=\"enrolled\"}} {gauge}",
            agent.node.name
        );
    }
    for (agent, sandbox) in [(&agent_a, &client), (&agent_b, &backend)] {
        let dump = admin(agent, "/config_dump")?;
        let id = format!("shop/{}", sandbox.pod.name);
        let netns = dump["pods"][&id]["netns"].as_str().unwrap_or_default();
        ensure!(
            netns == format!("/proc/{}/ns/net", sandbox.child.id()),
            "node {}: {id} enrolled from {netns:?}, not its sandbox's namespace",
            agent.node.name
        );
    }
    let peer = workload(&agent_a, "shop/b1")?.context("agent a does not know b1")?;
    ensure!(
        peer["node"] == "b" && peer["identity"] == spiffe_id(TRUST_DOMAIN, "shop", "sa-b1"),
        "b1 as agent a sees it: {peer}"
    );
    let (mtls_before, _) = relayed(&agent_a, "shop/a1", &destination)?;
    let delivered_before = delivered_mtls(&agent_b, "shop/b1")?;
    wait_for(
        "requests through the mTLS tunnel",
        Duration::from_secs(10),
        || {
            let (mtls, all) = relayed(&agent_a, "shop/a1", &destination)?;
            ensure!(mtls == all, "a1's connections left without the tunnel");
            let delivered = delivered_mtls(&agent_b, "shop/b1")?;
            Ok((mtls >= mtls_before + 25 && delivered >= delivered_before + 25).then_some(()))
        },
    )?;

    // Unlabelled again: both released, and the traffic goes direct.
    let unlabel_at = Instant::now();
    server.apply(fake_apiserver::namespace("shop", &[]));
    wait_pod_states(&agent_a, &BTreeMap::new())?;
    wait_pod_states(&agent_b, &BTreeMap::new())?;
    eprintln!("released {:?} after unlabelling", unlabel_at.elapsed());
    for agent in [&agent_a, &agent_b] {
        let gauge = enrolled_gauge(agent)?;
        ensure!(
            gauge == 0.0,
            "node {}: weft_pods{{state=\"enrolled\"}} {gauge}",
            agent.node.name
        );
    }
    for agent in [&agent_a, &agent_b] {
        ensure!(
            lines_with(agent, "pod released").len() == 1,
            "node {}: no single release logged:\n{}",
            agent.node.name,
            agent.log()
        );
    }
    ensure!(
        workload(&agent_a, "shop/b1")?.is_none(),
        "agent a still meshes b1"
    );
    // Connections redirected before the release finish through the tunnel; then none.
    thread::sleep(Duration::from_secs(1));
    let tunnelled = (
        relayed(&agent_a, "shop/a1", &destination)?,
        delivered_mtls(&agent_b, "shop/b1")?,
    );
    let served = nginx_requests(b1)?;
    thread::sleep(Duration::from_secs(2));
    ensure!(
        nginx_requests(b1)? >= served + 50,
        "the load did not go on after the release"
    );
    let after = (
        relayed(&agent_a, "shop/a1", &destination)?,
        delivered_mtls(&agent_b, "shop/b1")?,
    );
    ensure!(
        after == tunnelled,
        "traffic still went through the agents after the release: {tunnelled:?} -> {after:?}"
    );

    let result = load.finish()?;
    ensure!(
        result.failed == 0,
        "{} of {} requests failed: {}\nagent a:\n{}\nagent b:\n{}",
        result.failed,
        result.requests,
        serde_json::to_string_pretty(&result.failures)?,
        notable(&agent_a),
        notable(&agent_b)
    );
    let clients = b1.nginx_clients()?;
    ensure!(
        clients.len() as u64 == result.requests && clients.iter().all(|c| *c == a1.ip.to_string()),
        "nginx saw {} requests (load sent {}), clients {:?}",
        clients.len(),
        result.requests,
        clients.iter().collect::<std::collections::BTreeSet<_>>()
    );
    for (incarnation, agent) in incarnations.iter().zip([&agent_a, &agent_b]) {
        incarnation.check_same(agent)?;
    }
    eprintln!(
        "{} requests, none failed; test took {:?}",
        result.requests,
        started.elapsed()
    );
    Ok(())
}

/// Pods `ids` stay enrolled on `agent` and nothing was released: checked on every poll.
fn still_serving(agent: &Agent, ids: &[&str]) -> Result<()> {
    let states = pod_states(agent)?;
    ensure!(
        states == enrolled(ids),
        "node {}: pods changed while the API server was in trouble: {states:?}",
        agent.node.name
    );
    let gauge = enrolled_gauge(agent)?;
    ensure!(
        gauge == ids.len() as f64,
        "node {}: weft_pods{{state=\"enrolled\"}} {gauge} while the API server was in trouble",
        agent.node.name
    );
    let released = lines_with(agent, "pod released");
    ensure!(
        released.is_empty(),
        "node {}: a pod was released: {released:?}",
        agent.node.name
    );
    Ok(())
}

#[test]
fn enrolled_pods_survive_api_server_trouble_and_the_watches_catch_up() -> Result<()> {
    let started = Instant::now();
    let lab = TestLab::up("kube2", 2, 2)?;
    let ca = TestCa::new("weft lab mesh CA")?;
    let ca_files = ca.write(&lab.dir.join("ca"))?;
    let (server, kubeconfig) = start_fake_api_server(&lab, lab.node("a")?, API_PORT)?;
    let (node_a, node_b) = (lab.node("a")?, lab.node("b")?);
    let (a1, a2, b1) = (lab.pod("a1")?, lab.pod("a2")?, lab.pod("b1")?);
    let client = Sandbox::start(node_a, a1)?;
    let latecomer = Sandbox::start(node_a, a2)?;
    let backend = Sandbox::start(node_b, b1)?;
    server.apply(fake_apiserver::namespace("shop", &[MESH]));
    server.apply(fake_apiserver::namespace("cart", &[]));
    server.apply(client.object("shop"));
    server.apply(backend.object("shop"));
    server.apply(latecomer.object("cart"));
    let _nginx = start_nginx(&backend)?;

    let [agent_a, agent_b] = start_agents(&lab, &ca_files, &kubeconfig)?;
    let agents = [(&agent_a, ["shop/a1"]), (&agent_b, ["shop/b1"])];
    for (agent, ids) in agents {
        wait_pod_states(agent, &enrolled(&ids))?;
    }
    let incarnations = [Incarnation::of(&agent_a)?, Incarnation::of(&agent_b)?];
    let url = format!("http://{}/", b1.ip);
    let destination = format!("{}:80", b1.ip);
    let load = Load::start(&client, &url)?;
    // Traffic through the tunnel goes on whatever the API server does: checked at every step.
    let mut tunnelled = 0;
    let mut tunnel_moves = |what: &str| -> Result<()> {
        let floor = tunnelled + 10;
        wait_for(
            &format!("requests through the tunnel ({what})"),
            Duration::from_secs(10),
            || {
                let (mtls, all) = relayed(&agent_a, "shop/a1", &destination)?;
                ensure!(mtls == all, "a1's connections left without the tunnel");
                Ok((mtls >= floor).then_some(mtls))
            },
        )
        .map(|mtls| tunnelled = mtls)
    };
    tunnel_moves("enrolled")?;
    let all_watches = 2 * WATCHES_PER_AGENT;
    let count = |verb: Verb, since: usize| {
        server.requests()[since..]
            .iter()
            .filter(|r| r.verb == verb)
            .count()
    };

    // (a) Every watch connection is cut: the watches start again, the pods stay.
    let mark = server.requests().len();
    server.drop_watches();
    wait_for(
        "every watch to be opened again",
        Duration::from_secs(15),
        || {
            for (agent, ids) in agents {
                still_serving(agent, &ids)?;
            }
            Ok((count(Verb::Watch, mark) >= all_watches).then_some(()))
        },
    )?;
    tunnel_moves("after the watches were dropped")?;

    // (b) The history is compacted, then the watches cut: resuming gets 410 Gone, so each
    // watch lists again, and the store swaps the new list in without losing a pod.
    let mark = server.requests().len();
    server.compact();
    server.drop_watches();
    wait_for(
        "every watch to list again after 410 Gone",
        Duration::from_secs(15),
        || {
            for (agent, ids) in agents {
                still_serving(agent, &ids)?;
            }
            Ok((count(Verb::List, mark) >= all_watches).then_some(()))
        },
    )?;
    let relisted: Vec<String> = server.requests()[mark..]
        .iter()
        .filter(|r| r.verb == Verb::List)
        .map(|r| r.path.clone())
        .collect();
    for resource in ResourceKind::ALL {
        let path = resource.path();
        let lists = relisted.iter().filter(|p| **p == path).count();
        let per_agent = if resource == ResourceKind::Pods { 2 } else { 1 };
        ensure!(
            lists >= 2 * per_agent,
            "{path} listed {lists} times after the compaction: {relisted:?}"
        );
    }
    for (agent, ids) in agents {
        wait_for(
            &format!("node {}'s watches to be healthy", agent.node.name),
            Duration::from_secs(15),
            || {
                still_serving(agent, &ids)?;
                Ok(watches(agent)?
                    .values()
                    .all(|(synced, error, _)| *synced && error.is_none())
                    .then_some(()))
            },
        )?;
    }
    tunnel_moves("after the re-list")?;

    // (c) The API server goes away for a while. The pods stay enrolled and their traffic keeps
    // flowing; a change made meanwhile (namespace cart labelled) is picked up after it is back.
    let logged = |needle: &str| [&agent_a, &agent_b].map(|agent| lines_with(agent, needle).len());
    let (failed_before, recovered_before) = (logged("watch failed"), logged("watch recovered"));
    server.pause();
    let paused_at = Instant::now();
    let mut changed = false;
    while paused_at.elapsed() < Duration::from_secs(6) {
        for (agent, ids) in agents {
            still_serving(agent, &ids)?;
        }
        if !changed && paused_at.elapsed() >= Duration::from_secs(2) {
            server.apply(fake_apiserver::namespace("cart", &[MESH]));
            changed = true;
        }
        thread::sleep(Duration::from_millis(200));
    }
    for (i, agent) in [&agent_a, &agent_b].into_iter().enumerate() {
        let table = watches(agent)?;
        ensure!(
            table.len() == WATCHES_PER_AGENT && table.values().all(|(_, error, _)| error.is_some()),
            "node {}: not every watch reports the API server's absence: {table:#?}",
            agent.node.name
        );
        ensure!(
            logged("watch failed")[i] > failed_before[i],
            "node {}: the outage was not logged:\n{}",
            agent.node.name,
            agent.log()
        );
    }
    ensure!(
        !pod_states(&agent_a)?.contains_key("cart/a2"),
        "a2 enrolled while the API server was away"
    );
    tunnel_moves("while the API server is away")?;
    let resumed_at = Instant::now();
    server.resume().context("resuming the fake API server")?;
    wait_for(
        "a2, of the namespace labelled during the outage, to be enrolled",
        Duration::from_secs(40),
        || {
            still_serving(&agent_b, &["shop/b1"])?;
            let states = pod_states(&agent_a)?;
            ensure!(
                states.get("shop/a1").map(String::as_str) == Some("enrolled"),
                "a1 left: {states:?}"
            );
            Ok((states == enrolled(&["cart/a2", "shop/a1"])).then_some(()))
        },
    )
    .with_context(|| agent_a.log())?;
    eprintln!("a2 enrolled {:?} after the resume", resumed_at.elapsed());
    wait_for(
        "agent b to mesh a2 as a peer",
        Duration::from_secs(40),
        || Ok(workload(&agent_b, "cart/a2")?.filter(|w| w["node"] == "a")),
    )
    .with_context(|| agent_b.log())?;
    // The namespaces watch brought the change: it is healthy again, and said so.
    for (i, agent) in [&agent_a, &agent_b].into_iter().enumerate() {
        let table = watches(agent)?;
        ensure!(
            matches!(table.get("namespaces"), Some((true, None, errors)) if *errors > 0),
            "node {}: the namespaces watch did not recover: {table:#?}",
            agent.node.name
        );
        ensure!(
            logged("watch recovered")[i] > recovered_before[i],
            "node {}: the recovery was not logged:\n{}",
            agent.node.name,
            agent.log()
        );
    }
    still_serving(&agent_b, &["shop/b1"])?;
    still_serving(&agent_a, &["cart/a2", "shop/a1"])?;
    tunnel_moves("after the API server is back")?;
    // a2 is meshed now: its request to b1 goes through the tunnel.
    ensure!(fetch(a2, &url)? == "hello from b1\n");
    ensure!(
        relayed(&agent_a, "cart/a2", &destination)? == (1, 1),
        "a2's request did not go through the tunnel"
    );

    let result = load.finish()?;
    ensure!(
        result.failed == 0,
        "{} of {} requests failed: {}\nagent a:\n{}\nagent b:\n{}",
        result.failed,
        result.requests,
        serde_json::to_string_pretty(&result.failures)?,
        notable(&agent_a),
        notable(&agent_b)
    );
    for (incarnation, agent) in incarnations.iter().zip([&agent_a, &agent_b]) {
        incarnation.check_same(agent)?;
    }
    eprintln!(
        "{} requests, none failed; test took {:?}",
        result.requests,
        started.elapsed()
    );
    Ok(())
}

/// A pod the API server lists before the agent can find it on the node (its sandbox is not
/// there yet): reported as failed, with the reason, in `/config_dump` and `/metrics`, retried,
/// and enrolled from its sandbox's namespace once that appears, by the same agent process.
#[test]
fn a_pod_not_found_on_the_node_is_reported_and_enrolled_once_its_sandbox_appears() -> Result<()> {
    let lab = TestLab::up("kubnf", 1, 1)?;
    let ca = TestCa::new("weft lab mesh CA")?;
    let ca_files = ca.write(&lab.dir.join("ca"))?;
    let node = lab.node("a")?;
    let (server, kubeconfig) = start_fake_api_server(&lab, node, API_PORT)?;
    let a1 = lab.pod("a1")?;
    server.apply(fake_apiserver::namespace("shop", &[MESH]));
    let uid = sandbox_uid(a1);
    server.apply(pod_object("shop", a1, &node.name, &uid));

    let agent = start_agent(&lab, node, &ca_files, &kubeconfig)?;
    let pid = agent.pid().context("agent not running")?;
    let failed = wait_for("a1 reported as failed", Duration::from_secs(15), || {
        Ok(pod_states(&agent)?
            .remove("shop/a1")
            .filter(|state| state.starts_with("failed")))
    })
    .with_context(|| agent.log())?;
    ensure!(
        failed.contains(&uid),
        "the error does not name the pod's UID: {failed}"
    );
    let not_found = [("state", "failed"), ("reason", "netns_not_found")];
    ensure!(
        pods_gauge(&agent, &not_found)? == 1.0,
        "weft_pods{{state=\"failed\",reason=\"netns_not_found\"}} is not 1"
    );
    ensure!(enrolled_gauge(&agent)? == 0.0, "a1 counted as enrolled");

    let sandbox = Sandbox::start(node, a1)?;
    let appeared = Instant::now();
    wait_pod_states(&agent, &enrolled(&["shop/a1"]))?;
    eprintln!(
        "enrolled {:?} after the sandbox appeared",
        appeared.elapsed()
    );
    let dump = admin(&agent, "/config_dump")?;
    let netns = dump["pods"]["shop/a1"]["netns"]
        .as_str()
        .unwrap_or_default();
    ensure!(
        netns == format!("/proc/{}/ns/net", sandbox.child.id()),
        "a1 enrolled from {netns:?}, not its sandbox's namespace"
    );
    let cgroup = dump["pods"]["shop/a1"]["cgroup"]
        .as_str()
        .unwrap_or_default();
    let pod_cgroup = sandbox
        .scope
        .parent()
        .context("sandbox scope has no parent")?;
    ensure!(
        !cgroup.is_empty() && pod_cgroup.ends_with(cgroup.trim_start_matches('/')),
        "a1's cgroup is reported as {cgroup:?}, its sandbox's pod cgroup is {}",
        pod_cgroup.display()
    );
    ensure!(
        pods_gauge(&agent, &not_found)? == 0.0 && enrolled_gauge(&agent)? == 1.0,
        "weft_pods does not show a1 enrolled and nothing failed"
    );
    ensure!(
        agent.pid() == Some(pid) && lines_with(&agent, "weft is running").len() == 1,
        "the agent was restarted"
    );
    Ok(())
}

//! Lab test of weft-cni against the real agent (needs root, Debian's containernetworking-plugins
//! and the release build of weft and weft-cni): a container runtime (cni_runtime.rs, as libcni
//! runs a conflist) sets up a new pod on a lab node with Debian's `bridge` + `host-local`,
//! chained with weft-cni; the node's agent follows a fake Kubernetes API server and enrolls the
//! pod during the ADD, so the pod's very first process, started the moment ADD returns, is
//! already captured. A pod of a namespace that is not meshed is not, and after DEL the pod is
//! released. A pod whose Pod object gets its IP after the ADD (the kubelet's status update)
//! keeps the runtime's network namespace and is not enrolled again.
#[allow(dead_code)]
mod cni_runtime;

use std::{
    fs,
    io::Write as _,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use cni_runtime::{compact, Attachment, ChainRun, Invocation, Runtime};
use serde_json::{json, Value};
use weft_lab_tests::{
    counter,
    fake_apiserver::{self, ResourceKind},
    listen_in, start_fake_api_server, weft_cni_binary, TestLab,
};
use xtask::{
    agent::{Agent, ADMIN_ADDR},
    lab::{command_in, Lab, Node, Pod},
};

/// Where Debian's containernetworking-plugins installs bridge and host-local.
const SYSTEM_CNI_DIR: &str = "/usr/lib/cni";
/// The pod network's bridge, in the node's namespace.
const BRIDGE: &str = "weftcnie0";
/// The new pods' subnet: used by nothing else on a machine running weft's labs. The bridge is
/// the gateway, at `.1`.
const SUBNET: &str = "10.204.0.0/24";
const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 204, 0, 1);
/// Nothing listens there, and it is not excluded from capture: a direct connect is refused at
/// once, a captured one is accepted by the agent's listener in the pod.
const NOWHERE_PORT: u16 = 9;
const API_PORT: u16 = 6443;
const MESH: (&str, &str) = ("weft.dev/mesh", "enabled");
/// The meshed namespace and its new pod.
const MESHED: (&str, &str, &str) = ("shop", "fresh", "c0ffee00-0000-4000-8000-00000000f4e5");
/// A namespace without the label, and its new pod.
const PLAIN: (&str, &str, &str) = ("plain", "other", "c0ffee00-0000-4000-8000-0000000a11ce");
/// A second pod of the meshed namespace, whose Pod object gets its IP after the ADD.
const STEADY: (&str, &str, &str) = ("shop", "steady", "c0ffee00-0000-4000-8000-000000057ead");
/// Where the lab pod a1 serves greetings.
const SERVER_PORT: u16 = 7070;

/// The node's agent: capture at the node's pods cgroup, no identity (plain L4 capture shows
/// enrollment), no pods of its own, everything from the cluster and the CNI plugin.
fn agent_config(node: &Node, kubeconfig: &Path, cni_dir: &Path) -> String {
    format!(
        "agent:\n  cgroup_path: {}\n  admin_addr: {ADMIN_ADDR}\n  drain_timeout_ms: 3000\n  node_name: {}\n\
         kubernetes:\n  enabled: true\n  kubeconfig: {}\n  cni_dir: {}\n  proc_root: /proc\n",
        node.pods_cgroup.display(),
        node.name,
        kubeconfig.display(),
        cni_dir.display(),
    )
}

/// A Pod object as the API server has it before the CNI runs: scheduled on `node`, Pending,
/// no IP.
fn pod_object((namespace, name, uid): (&str, &str, &str), node: &Node) -> Value {
    let mut pod = fake_apiserver::pod(
        namespace,
        name,
        &node.name,
        None,
        "default",
        &[("app", name)],
    );
    pod["metadata"]["uid"] = json!(uid);
    pod
}

/// Polls `check` every 50 ms until it yields a value; fails after `timeout` (or on its error).
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
        thread::sleep(Duration::from_millis(50));
    }
}

/// The pod network on the node: its bridge and host-local's state, removed when dropped.
struct PodNetwork {
    node_netns: String,
    ipam_dir: PathBuf,
}

impl PodNetwork {
    fn new(lab: &Lab, node: &Node) -> Result<Self> {
        ensure!(
            Path::new(SYSTEM_CNI_DIR).join("bridge").exists()
                && Path::new(SYSTEM_CNI_DIR).join("host-local").exists(),
            "{SYSTEM_CNI_DIR}/bridge is missing: install containernetworking-plugins (cargo xtask setup)"
        );
        Ok(Self {
            node_netns: node.netns.clone(),
            ipam_dir: lab.dir.join("cni-ipam"),
        })
    }

    /// The node's runtime of the conflist: bridge (the gateway, host-local addresses), then
    /// weft-cni with `weft` (its entry's JSON members).
    fn runtime(&self, weft: Value) -> Result<Runtime> {
        let mut weft_entry = json!({"type": "weft-cni"});
        for (key, value) in weft.as_object().context("weft-cni settings")? {
            weft_entry[key] = value.clone();
        }
        let conflist = json!({
            "cniVersion": "1.0.0",
            "name": "weftcnie",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": BRIDGE,
                    "isDefaultGateway": true,
                    "ipam": {
                        "type": "host-local",
                        "subnet": SUBNET,
                        "gateway": GATEWAY.to_string(),
                        "dataDir": self.ipam_dir,
                    },
                },
                weft_entry,
            ],
        });
        let weft_cni_dir = weft_cni_binary()?
            .parent()
            .context("weft-cni has no directory")?
            .to_owned();
        Ok(Runtime::new(
            &serde_json::to_string_pretty(&conflist)?,
            vec![PathBuf::from(SYSTEM_CNI_DIR), weft_cni_dir],
        )?
        .run_in(&self.node_netns))
    }
}

impl Drop for PodNetwork {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["-n", &self.node_netns, "link", "del", BRIDGE])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = fs::remove_dir_all(&self.ipam_dir);
    }
}

/// A new pod as the runtime makes it: its network namespace (named so that `cargo xtask lab
/// down` removes it too) and its container cgroup below the node's pods cgroup, laid out as the
/// kubelet's systemd driver does. Both are removed when dropped, the processes in them killed.
struct NewPod {
    namespace: String,
    name: String,
    uid: String,
    netns: String,
    /// `<pods_cgroup>/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid>.slice`
    pod_cgroup: PathBuf,
    /// The container's cgroup, below `pod_cgroup`.
    scope: PathBuf,
}

impl NewPod {
    fn create(lab: &Lab, node: &Node, (namespace, name, uid): (&str, &str, &str)) -> Result<Self> {
        let pod_cgroup = node
            .pods_cgroup
            .join("kubepods.slice/kubepods-besteffort.slice")
            .join(format!(
                "kubepods-besteffort-pod{}.slice",
                uid.replace('-', "_")
            ));
        let pod = Self {
            namespace: namespace.into(),
            name: name.into(),
            uid: uid.into(),
            netns: format!("weftlab-{}-{name}", lab.name),
            scope: pod_cgroup.join(format!("cri-containerd-{:064x}.scope", fastrand::u128(..))),
            pod_cgroup,
        };
        // Made after `pod` exists, so its Drop removes whatever was made before a failure.
        run(Command::new("ip").args(["netns", "add", &pod.netns]))?;
        run(Command::new("ip").args(["-n", &pod.netns, "link", "set", "lo", "up"]))?;
        fs::create_dir_all(&pod.scope)
            .with_context(|| format!("creating {}", pod.scope.display()))?;
        Ok(pod)
    }

    fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The sandbox as containerd's CRI plugin attaches it.
    fn sandbox(&self) -> Attachment {
        Attachment::pod(
            &format!("{:064x}", fastrand::u128(..)),
            &Path::new("/var/run/netns").join(&self.netns),
            &self.namespace,
            &self.name,
            &self.uid,
        )
    }

    /// A process of the pod (its network namespace and container cgroup, entered before it
    /// execs) that connects once to `addr` and reads what it is sent until the end.
    fn connect_once(&self, addr: SocketAddr) -> Result<Connect> {
        let out = command_in(&self.netns, Some(&self.scope), "timeout")?
            .args(["10", "bash", "-c"])
            .arg(format!(
                "exec 3<>/dev/tcp/{}/{} || exit 1; echo connected; exec cat <&3",
                addr.ip(),
                addr.port()
            ))
            .stdin(Stdio::null())
            .output()
            .context("running a connect in the pod")?;
        Ok(Connect::of(out))
    }

    /// Kills what runs in the pod's cgroup; true once none is left.
    fn kill_processes(&self) -> bool {
        let procs = fs::read_to_string(self.scope.join("cgroup.procs")).unwrap_or_default();
        let pids: Vec<i32> = procs
            .lines()
            .filter_map(|p| p.trim().parse().ok())
            .collect();
        for pid in &pids {
            // SAFETY: kill(2) with a pid read from the pod's cgroup; ESRCH (gone) is fine.
            unsafe { libc::kill(*pid, libc::SIGKILL) };
        }
        pids.is_empty()
    }
}

impl Drop for NewPod {
    fn drop(&mut self) {
        for _ in 0..50 {
            if self.kill_processes() {
                break;
            }
            thread::sleep(Duration::from_millis(50));
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .stderr(Stdio::null())
            .status();
        let _ = fs::remove_dir(&self.scope);
        let _ = fs::remove_dir(&self.pod_cgroup);
    }
}

/// What one connect of a pod's process came to.
#[derive(Debug)]
struct Connect {
    connected: bool,
    /// What it read after connecting.
    received: String,
    /// Why it did not connect (or could not read).
    error: String,
}

impl Connect {
    fn of(out: Output) -> Self {
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let (first, rest) = stdout.split_once('\n').unwrap_or((&stdout, ""));
        Self {
            connected: first == "connected",
            received: rest.to_owned(),
            error: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        }
    }
}

/// A server in the lab pod `pod` on `port`: greets each client with its own address and tells
/// the test who connected.
fn serve_greetings(pod: &Pod, port: u16) -> Result<mpsc::Receiver<SocketAddr>> {
    let listener = listen_in(pod, SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)))?;
    let (seen, clients) = mpsc::channel();
    thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            if let Ok(peer) = stream.peer_addr() {
                let _ = writeln!(stream, "hello {}", peer.ip());
                let _ = seen.send(peer);
            }
        }
    });
    Ok(clients)
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn invocation<'a>(run: &'a ChainRun, plugin: &str) -> Result<&'a Invocation> {
    run.invocation(plugin)
        .with_context(|| format!("{plugin} did not run: {run:#?}"))
}

fn ensure_succeeded(run: &ChainRun, what: &str) -> Result<()> {
    if let Some(failed) = run.failure() {
        bail!(
            "{what} failed in {}: {}\n{}",
            failed.plugin,
            failed.stdout,
            failed.stderr
        );
    }
    Ok(())
}

/// The pod's address in an ADD's result.
fn result_ip(result: &str) -> Result<Ipv4Addr> {
    let result: Value = serde_json::from_str(result)?;
    let address = result["ips"][0]["address"]
        .as_str()
        .context("result without ips")?;
    Ok(address
        .split_once('/')
        .context("address without prefix")?
        .0
        .parse()?)
}

/// Connections from `source` to `destination` the agent took: (opened, failed).
fn flow_counts(stats: &Value, source: &str, destination: SocketAddr) -> (u64, u64) {
    let destination = destination.to_string();
    stats["flows"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|f| f["source_pod"] == source && f["destination"] == destination.as_str())
        .fold((0, 0), |(opened, failed), f| {
            (
                opened + f["opened"].as_u64().unwrap_or(0),
                failed + f["failed"].as_u64().unwrap_or(0),
            )
        })
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
    ensure!(out.status.success(), "the agent did not answer {path}");
    serde_json::from_slice(&out.stdout).with_context(|| format!("{path} is not JSON"))
}

/// Log lines of the agent that say `what` about the pod `id`.
fn log_lines(agent: &Agent, what: &str, id: &str) -> Vec<String> {
    agent
        .log()
        .lines()
        .filter(|line| line.contains(what) && line.contains(id))
        .map(str::to_owned)
        .collect()
}

#[test]
fn a_pod_added_through_the_cni_chain_is_captured_from_its_first_connect() -> Result<()> {
    let lab = TestLab::up("cnie", 1, 1)?;
    let node = lab.node("a")?;
    let server = lab.pod("a1")?;
    let greeted = serve_greetings(server, SERVER_PORT)?;
    let greeting_server = SocketAddr::from((server.ip, SERVER_PORT));
    let nowhere = SocketAddr::from((GATEWAY, NOWHERE_PORT));
    let (api, kubeconfig) = start_fake_api_server(&lab, node, API_PORT)?;
    api.apply(fake_apiserver::namespace(MESHED.0, &[MESH]));
    api.apply(fake_apiserver::namespace(PLAIN.0, &[]));
    for pod in [MESHED, PLAIN, STEADY] {
        api.apply(pod_object(pod, node));
    }

    let cni_dir = lab.dir.join("node-a/cni");
    let agent = Agent::start_with(&lab, node, &agent_config(node, &kubeconfig, &cni_dir), &[])?;
    wait_for(
        "the agent to apply the cluster state",
        Duration::from_secs(15),
        || Ok(agent.log().contains("cluster state applied").then_some(())),
    )
    .with_context(|| agent.log())?;
    let written: Value = serde_json::from_str(&fs::read_to_string(
        cni_dir.join("enrolled-namespaces.json"),
    )?)?;
    ensure!(
        written == json!({"namespaces": [MESHED.0]}),
        "enrolled-namespaces.json: {written}"
    );
    ensure!(
        agent.stats()?["pods"] == json!({}),
        "pods without a sandbox are not enrolled yet: {:#}",
        agent.stats()?["pods"]
    );

    let network = PodNetwork::new(&lab, node)?;
    let mut runtime = network.runtime(json!({
        "agent_socket": weft::cni::socket_path(&cni_dir),
        "cni_dir": cni_dir,
        "timeout_ms": 10000,
    }))?;

    // The meshed pod: ADD, and its first process the moment ADD returns.
    let fresh = NewPod::create(&lab, node, MESHED)?;
    let sandbox = fresh.sandbox();
    let started = Instant::now();
    let add = runtime.add(&sandbox)?;
    let add_took = started.elapsed();
    let log_at_add = agent.log();
    let first = fresh.connect_once(nowhere)?;
    ensure_succeeded(&add, "ADD of the meshed pod")?;
    let (bridge, weft) = (invocation(&add, "bridge")?, invocation(&add, "weft-cni")?);
    ensure!(
        weft.stdout == compact(&bridge.stdout) && add.result.as_deref() == Some(&*weft.stdout),
        "weft-cni changed the result:\nbridge:   {}\nweft-cni: {}",
        bridge.stdout,
        weft.stdout
    );
    // Captured: the agent's listener in the pod accepts; the agent's own connect is refused and
    // it closes the connection. Direct, the connect itself would be refused.
    ensure!(
        first.connected && first.received.is_empty(),
        "the pod's first connect to {nowhere} was not captured: {first:?}\nweft-cni: {}\nagent log:\n{}",
        weft.stderr,
        agent.log()
    );
    let ip = result_ip(&bridge.stdout)?;
    ensure!(
        ip.octets()[..3] == [10, 204, 0] && ip != GATEWAY,
        "host-local gave {ip} outside {SUBNET}"
    );
    let enrolled_line = log_at_add
        .lines()
        .find(|l| l.contains("pod enrolled") && l.contains(&fresh.id()))
        .with_context(|| {
            format!("the agent had not enrolled the pod when ADD returned:\n{log_at_add}")
        })?;
    ensure!(
        enrolled_line.contains(&format!("netns={} ", sandbox.netns.display()))
            && enrolled_line.contains(&format!("ip={ip} ")),
        "enrolled with another netns or address than the runtime's: {enrolled_line}"
    );
    eprintln!("ADD took {add_took:?}; {enrolled_line}");
    let stats = wait_for(
        "the agent to count the connection",
        Duration::from_secs(10),
        || {
            let stats = agent.stats()?;
            Ok((flow_counts(&stats, &fresh.id(), nowhere).1 == 1).then_some(stats))
        },
    )
    .with_context(|| format!("stats: {:#}", agent.stats().unwrap_or_default()))?;
    ensure!(
        flow_counts(&stats, &fresh.id(), nowhere) == (0, 1),
        "one connection taken, refused upstream: {:#}",
        stats["flows"]
    );
    ensure!(counter(&stats, "redirected") == 1, "{:#}", stats["ebpf"]);
    ensure!(
        stats["pods"][fresh.id()]["state"] == "enrolled"
            && stats["pods"][fresh.id()]["netns"] == sandbox.netns.to_string_lossy().as_ref(),
        "{:#}",
        stats["pods"]
    );
    // A server the pod reaches through the agent sees the pod's own address.
    let hello = fresh.connect_once(greeting_server)?;
    ensure!(
        hello.connected && hello.received == format!("hello {ip}\n"),
        "{hello:?}"
    );
    let client = greeted.recv_timeout(Duration::from_secs(5))?;
    ensure!(client.ip() == ip, "the server saw {client}");
    let stats = agent.stats()?;
    ensure!(
        counter(&stats, "redirected") == 2
            && flow_counts(&stats, &fresh.id(), greeting_server) == (1, 0),
        "the connect to a1 was not captured: {stats:#}"
    );

    // A pod of a namespace that is not meshed starts too, and its connects go direct.
    let plain = NewPod::create(&lab, node, PLAIN)?;
    let plain_sandbox = plain.sandbox();
    let before = counter(&agent.stats()?, "not_enrolled");
    let add = runtime.add(&plain_sandbox)?;
    let direct = plain.connect_once(nowhere)?;
    ensure_succeeded(&add, "ADD of the pod that is not meshed")?;
    ensure!(
        add.result == Some(compact(&invocation(&add, "bridge")?.stdout)),
        "{add:#?}"
    );
    ensure!(
        !direct.connected && direct.error.contains("Connection refused"),
        "the unmeshed pod's connect to {nowhere} did not go direct: {direct:?}"
    );
    let stats = agent.stats()?;
    ensure!(
        counter(&stats, "redirected") == 2 && counter(&stats, "not_enrolled") > before,
        "{:#}",
        stats["ebpf"]
    );
    ensure!(
        stats["pods"].get(plain.id()).is_none()
            && flow_counts(&stats, &plain.id(), nowhere) == (0, 0),
        "the agent took up the unmeshed pod: {stats:#}"
    );

    // DEL, as the runtime tears the sandbox down: the agent releases the meshed pod.
    let del = runtime.del(&sandbox)?;
    ensure_succeeded(&del, "DEL of the meshed pod")?;
    let order: Vec<&str> = del.invocations.iter().map(|i| i.plugin.as_str()).collect();
    ensure!(order == ["weft-cni", "bridge"], "DEL order {order:?}");
    let released = log_lines(&agent, "pod released", &fresh.id());
    ensure!(
        released.len() == 1,
        "the agent did not release the pod at DEL: {released:?}\n{}",
        agent.log()
    );
    let stats = agent.stats()?;
    ensure!(
        stats["pods"].get(fresh.id()).is_none(),
        "still reported after DEL: {:#}",
        stats["pods"]
    );
    // The sandbox's namespace is still there (the runtime removes it after DEL), without its
    // interface now: a connect from it goes direct and finds no route.
    let after = fresh.connect_once(nowhere)?;
    ensure!(
        !after.connected && after.error.contains("Network is unreachable"),
        "a connect after DEL: {after:?}"
    );
    ensure!(
        counter(&agent.stats()?, "redirected") == 2,
        "a connect after DEL was captured: {:#}",
        agent.stats()?["ebpf"]
    );
    ensure_succeeded(
        &runtime.del(&plain_sandbox)?,
        "DEL of the pod that is not meshed",
    )?;

    // A pod whose Pod object gets its IP after the ADD, as the kubelet reports it, keeps the
    // runtime's namespace and stays enrolled throughout; forcibly deleted from the API server,
    // it is released at DEL.
    let steady = NewPod::create(&lab, node, STEADY)?;
    let steady_sandbox = steady.sandbox();
    let add = runtime.add(&steady_sandbox)?;
    ensure_succeeded(&add, "ADD of the second meshed pod")?;
    let steady_ip = result_ip(add.result.as_deref().unwrap_or_default())?;
    // The kubelet's status update, with a label to show when the agent has it.
    let mut object = fake_apiserver::pod(
        STEADY.0,
        STEADY.1,
        &node.name,
        Some(steady_ip),
        "default",
        &[("app", STEADY.1), ("seen", "listed")],
    );
    object["metadata"]["uid"] = json!(STEADY.2);
    api.apply(object);
    wait_for(
        "the agent to see the pod's update",
        Duration::from_secs(10),
        || {
            let dump = admin(&agent, "/config_dump")?;
            let listed = dump["config"]["pods"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|p| p["uid"] == STEADY.2 && p["labels"]["seen"] == "listed");
            Ok(listed.then_some(()))
        },
    )
    .with_context(|| format!("{:#}", admin(&agent, "/config_dump").unwrap_or_default()))?;
    let hello = steady.connect_once(greeting_server)?;
    ensure!(
        hello.received == format!("hello {steady_ip}\n"),
        "{hello:?}"
    );
    let stats = agent.stats()?;
    ensure!(
        flow_counts(&stats, &steady.id(), greeting_server) == (1, 0)
            && stats["pods"][steady.id()]["netns"]
                == steady_sandbox.netns.to_string_lossy().as_ref(),
        "the listed pod left the runtime's namespace: {stats:#}"
    );
    api.delete(ResourceKind::Pods, STEADY.0, STEADY.1);
    thread::sleep(Duration::from_secs(1));
    ensure!(
        agent.stats()?["pods"][steady.id()]["state"] == "enrolled",
        "released before its sandbox is torn down: {:#}",
        agent.stats()?["pods"]
    );
    ensure_succeeded(
        &runtime.del(&steady_sandbox)?,
        "DEL of the second meshed pod",
    )?;
    ensure!(
        agent.stats()?["pods"] == json!({}),
        "{:#}",
        agent.stats()?["pods"]
    );
    for pod in [&fresh, &steady] {
        let enrolled = log_lines(&agent, "pod enrolled", &pod.id());
        let released = log_lines(&agent, "pod released", &pod.id());
        ensure!(
            enrolled.len() == 1 && released.len() == 1,
            "{} enrolled {enrolled:#?}, released {released:#?}",
            pod.id()
        );
    }
    ensure!(
        !agent.log().contains("ERROR"),
        "the agent logged errors:\n{}",
        agent.log()
    );
    Ok(())
}

//! Lab tests of L7 for services: protocol detection, per-request balancing, retries, budgets,
//! deadlines, circuit breaking and traffic shifting, with real servers and clients in pods
//! (`weft-testapp`) and agents on two nodes (need root).
use std::{
    process::{Child, Stdio},
    time::Duration,
};

use anyhow::{ensure, Context, Result};
use serde_json::Value;
use weft_lab_tests::TestLab;
use xtask::{
    agent::{Agent, Mesh},
    lab::{wait_for_tcp, Lab, Node, Pod},
    pki::TestCa,
};

const APP: &str = env!("CARGO_BIN_EXE_weft-testapp");
/// Where every test server listens in its pod, and where it serves its counters.
const APP_PORT: u16 = 8080;
const STATS_PORT: u16 = 9090;

/// A testapp process in a pod, killed when dropped.
struct App {
    child: Child,
    pod: Pod,
}

impl App {
    /// `weft-testapp serve` in `pod` on APP_PORT (counters on STATS_PORT) with `args`.
    fn serve(pod: &Pod, name: &str, args: &[&str]) -> Result<Self> {
        let listen = format!("0.0.0.0:{APP_PORT}");
        let stats = format!("127.0.0.1:{STATS_PORT}");
        let mut all = vec!["serve", "--listen", &listen, "--name", name, "--stats-listen", &stats];
        all.extend_from_slice(args);
        Self::start(pod, &all, APP_PORT)
    }

    fn start(pod: &Pod, args: &[&str], port: u16) -> Result<Self> {
        let child = pod
            .command(APP)?
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("starting weft-testapp in {}", pod.name))?;
        let app = Self {
            child,
            pod: pod.clone(),
        };
        wait_for_tcp(pod, port, Duration::from_secs(10))?;
        Ok(app)
    }

    /// The server's counters (`/_stats`, read inside the pod, never through the mesh).
    fn stats(&self) -> Result<Value> {
        let out = self
            .pod
            .command("curl")?
            .args(["-sS", "--max-time", "5"])
            .arg(format!("http://127.0.0.1:{STATS_PORT}/_stats"))
            .output()?;
        serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "stats of the app in {}: {}",
                self.pod.name,
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    fn requests(&self) -> Result<u64> {
        self.stats()?["requests"]
            .as_u64()
            .context("stats without requests")
    }
}

impl Drop for App {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `weft-testapp load` from `pod` with `args`; its JSON summary.
fn load(pod: &Pod, args: &[&str]) -> Result<Value> {
    let out = pod
        .command(APP)?
        .arg("load")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running weft-testapp load")?;
    ensure!(
        out.status.success(),
        "load failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "load printed no JSON: {} {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn status_count(summary: &Value, status: u16) -> u64 {
    summary["status"][status.to_string()].as_u64().unwrap_or(0)
}

/// A two-node meshed lab; every pod a workload with labels `{app: <pod>}`.
fn l7_lab(name: &str, pods_per_node: usize) -> Result<(TestLab, Mesh)> {
    let lab = TestLab::up(name, 2, pods_per_node)?;
    let ca = TestCa::new("weft lab mesh CA")?;
    let (cert, key) = ca.write(&lab.dir.join("ca"))?;
    let mut mesh = Mesh::new(&lab, cert, key);
    for workload in &mut mesh.workloads {
        workload.labels = Box::leak(format!("{{app: {}}}", workload.pod.name).into_boxed_str());
    }
    Ok((lab, mesh))
}

/// Agents on nodes a and b, every pod enrolled.
fn start_agents(lab: &Lab, mesh: &Mesh) -> Result<Vec<Agent>> {
    lab.nodes
        .iter()
        .map(|node: &Node| {
            let pods: Vec<&Pod> = node.pods.iter().collect();
            Agent::start_with(lab, node, &mesh.config_yaml(node, &pods), &pods)
        })
        .collect()
}

/// A service `name` at `vip`:80 in front of APP_PORT of the pods labelled `app: <app>`;
/// `extra` adds YAML lines to its entry.
fn service(name: &str, vip: &str, app: &str, extra: &str) -> String {
    format!(
        "  - name: {name}\n    namespace: lab\n    vips: [{vip}]\n    ports: [{{port: 80, target_port: {APP_PORT}}}]\n    selector: {{app: {app}}}\n{extra}"
    )
}

#[test]
fn http_requests_to_a_service_are_balanced_across_its_endpoints() -> Result<()> {
    let (lab, mut mesh) = l7_lab("l7bal", 3)?;
    let (a1, b1, b2) = (lab.pod("a1")?, lab.pod("b1")?, lab.pod("b2")?);
    for pod in ["b1", "b2"] {
        mesh.workload_mut(pod)?.labels = "{app: echo}";
    }
    mesh.services = service("echo", "10.96.0.10", "echo", "");
    let agents = start_agents(&lab, &mesh)?;
    let (one, two) = (App::serve(b1, "one", &[])?, App::serve(b2, "two", &[])?);
    let summary = load(
        a1,
        &["--url", "http://10.96.0.10/", "--requests", "400", "--concurrency", "4"],
    )?;
    ensure!(status_count(&summary, 200) == 400, "{summary}");
    let (n1, n2) = (one.requests()?, two.requests()?);
    ensure!(n1 + n2 == 400, "endpoints saw {n1} + {n2} requests");
    ensure!(n1 >= 50 && n2 >= 50, "unbalanced: {n1} / {n2}");
    let counters = &agents[0].stats()?["services"]["lab/echo:80"];
    ensure!(
        counters["requests"] == 400 && counters["responses_2xx"] == 400,
        "the client's agent counted {counters}"
    );
    Ok(())
}

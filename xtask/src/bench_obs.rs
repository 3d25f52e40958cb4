//! `cargo xtask bench --observability`: what metrics and the access log cost. On a lab of two
//! nodes with 50 pods each, every pod enrolled:
//!
//! - access log on vs off: HTTP GETs at a fixed rate (keep-alive) from a1 to a service whose
//!   endpoint is nginx in b1, through both agents; the agents' CPU time per 1,000 requests,
//!   rounds alternating between the agents started with and without the access log;
//! - scrape size and time: each of the 50 pods of node a calls each of 10 services (one nginx
//!   pod of node b each) once — 50 workloads × 10 destinations — then `/metrics` of both agents
//!   is fetched repeatedly: its size, series and time to answer.
use std::{
    fmt::Write as _,
    fs,
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
};

use anyhow::{ensure, Context, Result};
use serde::Deserialize;

use crate::{
    agent::{Agent, Mesh},
    bench::{build_tools, cpu_seconds, date, load_command, load_report, machine, median, Server},
    lab::{Lab, LabSpec, Node, Pod},
    pki::TestCa,
    workspace_root,
};

const LAB_NAME: &str = "bobs";
const PODS_PER_NODE: usize = 50;
const SERVICES: u8 = 10;
const METRICS_PORT: u16 = 15020;
const LOAD_RATE: u32 = 2000;
const LOAD_SECONDS: u64 = 10;
const LOAD_CONNECTIONS: u32 = 8;
/// Rounds per access-log setting; the settings take turns.
const ROUNDS: u32 = 3;
const SCRAPES: usize = 20;

/// What the load client reports that this benchmark uses.
#[derive(Deserialize)]
struct LoadSummary {
    sent_total: u64,
    errors_total: u64,
    p50_us: u64,
    p99_us: u64,
}

struct LogRun {
    logging: bool,
    /// CPU seconds per 1,000 requests: client's agent, server's agent.
    cpu_per_1k: [f64; 2],
    p50_us: u64,
    p99_us: u64,
}

struct ScrapeResult {
    node: String,
    bytes: usize,
    series: usize,
    request_series: usize,
    median_ms: f64,
    max_ms: f64,
}

pub fn run() -> Result<()> {
    let tools = build_tools()?;
    let measured = Lab::up(&LabSpec {
        name: LAB_NAME.into(),
        nodes: 2,
        pods_per_node: PODS_PER_NODE,
    })
    .and_then(|lab| measure(&lab, &tools));
    let down = Lab::down(LAB_NAME);
    let (runs, scrapes) = measured?;
    down?;
    let report = render(&runs, &scrapes)?;
    println!("\n{report}");
    let path = workspace_root().join("bench/OBSERVABILITY.md");
    fs::write(&path, report).with_context(|| format!("writing {}", path.display()))?;
    println!("written to bench/OBSERVABILITY.md");
    Ok(())
}

fn service_vip(index: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 96, 1, index)
}

fn measure(lab: &Lab, tools: &Path) -> Result<(Vec<LogRun>, Vec<ScrapeResult>)> {
    let ca = TestCa::new("weft bench mesh CA")?;
    let (cert, key) = ca.write(&lab.dir.join("ca"))?;
    let mut mesh = Mesh::new(lab, cert, key);
    let mut services = String::new();
    for index in 1..=SERVICES {
        let workload = mesh.workload_mut(&format!("b{index}"))?;
        workload.labels = Box::leak(format!("{{app: s{index}}}").into_boxed_str());
        writeln!(
            services,
            "  - name: s{index}\n    namespace: lab\n    vips: [{}]\n    ports: [{{port: 80, protocol: http}}]\n    selector: {{app: s{index}}}",
            service_vip(index)
        )?;
    }
    mesh.services = services;
    let (node_a, node_b) = (lab.node("a")?, lab.node("b")?);
    let _nginx = (1..=SERVICES)
        .map(|index| Ok(Server(lab.pod(&format!("b{index}"))?.start_nginx()?)))
        .collect::<Result<Vec<_>>>()?;

    let mut runs = Vec::new();
    for round in 0..ROUNDS * 2 {
        let logging = round % 2 == 0;
        mesh.agent_extra = format!("  access_log: {{enabled: {logging}}}\n");
        let agents = start_agents(lab, &mesh, [node_a, node_b])?;
        let run = log_run(tools, lab.pod("a1")?, &agents, logging)?;
        println!(
            "round {round} access log {:<3}  CPU per 1k requests: client's agent {:.4} s, server's agent {:.4} s  p50 {} us  p99 {} us",
            if logging { "on" } else { "off" },
            run.cpu_per_1k[0],
            run.cpu_per_1k[1],
            run.p50_us,
            run.p99_us
        );
        runs.push(run);
    }

    mesh.agent_extra = String::new();
    let agents = start_agents(lab, &mesh, [node_a, node_b])?;
    for pod in &node_a.pods {
        call_every_service(pod)?;
    }
    let scrapes = [node_a, node_b]
        .iter()
        .map(|node| scrape_timing(node))
        .collect::<Result<Vec<_>>>()?;
    drop(agents);
    Ok((runs, scrapes))
}

/// An agent on each node with every pod of the node enrolled.
fn start_agents(lab: &Lab, mesh: &Mesh, nodes: [&Node; 2]) -> Result<Vec<Agent>> {
    nodes
        .iter()
        .map(|node| {
            let pods: Vec<&Pod> = node.pods.iter().collect();
            Agent::start_with(lab, node, &mesh.config_yaml(node, &pods), &pods)
        })
        .collect()
}

fn log_run(tools: &Path, client: &Pod, agents: &[Agent], logging: bool) -> Result<LogRun> {
    let pids = agents
        .iter()
        .map(|agent| agent.pid().context("an agent has no process"))
        .collect::<Result<Vec<_>>>()?;
    let request_lines = || {
        agents[1]
            .log()
            .lines()
            .filter(|line| line.starts_with("{\"kind\":\"request\""))
            .count() as u64
    };
    let lines_before = request_lines();
    let before = pids
        .iter()
        .map(|&pid| cpu_seconds(pid))
        .collect::<Result<Vec<_>>>()?;
    let mut command = load_command(tools, client, "http", SocketAddrV4::new(service_vip(1), 80))?;
    command
        .args(["--path", "/"])
        .args(["--size", &"hello from b1\n".len().to_string()])
        .args(["--seconds", &LOAD_SECONDS.to_string()])
        .args(["--rate", &LOAD_RATE.to_string()])
        .args(["--connections", &LOAD_CONNECTIONS.to_string()]);
    let summary: LoadSummary = load_report(command, client)?;
    ensure!(
        summary.errors_total == 0 && summary.sent_total > 0,
        "{} of {} requests failed",
        summary.errors_total,
        summary.sent_total
    );
    let thousands = summary.sent_total as f64 / 1000.0;
    let mut cpu_per_1k = [0.0; 2];
    for (slot, (&pid, before)) in cpu_per_1k.iter_mut().zip(pids.iter().zip(before)) {
        *slot = (cpu_seconds(pid)? - before) / thousands;
    }
    if logging {
        // The log's writer batches lines: give it a moment to catch up.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
        while request_lines() - lines_before < summary.sent_total
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let lines = request_lines() - lines_before;
        ensure!(
            lines >= summary.sent_total,
            "the server's agent logged {lines} of {} requests",
            summary.sent_total
        );
    }
    Ok(LogRun {
        logging,
        cpu_per_1k,
        p50_us: summary.p50_us,
        p99_us: summary.p99_us,
    })
}

/// One GET from `pod` to each service.
fn call_every_service(pod: &Pod) -> Result<()> {
    let mut command = pod.command("curl")?;
    command.args(["-sSf", "--max-time", "5"]);
    for index in 1..=SERVICES {
        command
            .args(["-o", "/dev/null"])
            .arg(format!("http://{}/", service_vip(index)));
    }
    let out = command.output().context("running curl")?;
    ensure!(
        out.status.success(),
        "calls from {} failed: {}",
        pod.name,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Fetches `/metrics` of `node`'s agent SCRAPES times from the node (curl's own start-up is not
/// timed: curl reports the time from connect to the last byte).
fn scrape_timing(node: &Node) -> Result<ScrapeResult> {
    let url = format!("http://{}:{METRICS_PORT}/metrics", node.ip);
    let body_path = std::env::temp_dir().join(format!("weft-bench-metrics-{}", node.name));
    let mut times = Vec::new();
    for _ in 0..SCRAPES {
        let out = node
            .command("curl")?
            .args(["-sSf", "--max-time", "10", "-w", "%{time_total}"])
            .arg("-o")
            .arg(&body_path)
            .arg(&url)
            .output()
            .context("running curl for /metrics")?;
        ensure!(
            out.status.success(),
            "/metrics of node {}: {}",
            node.name,
            String::from_utf8_lossy(&out.stderr)
        );
        let seconds: f64 = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .context("curl's time_total")?;
        times.push(seconds * 1000.0);
    }
    let text = fs::read_to_string(&body_path).context("reading the scraped metrics")?;
    let _ = fs::remove_file(&body_path);
    let samples = text.lines().filter(|line| !line.starts_with('#'));
    let request_series = text
        .lines()
        .filter(|line| line.starts_with("istio_requests_total{"))
        .count();
    ensure!(
        request_series >= PODS_PER_NODE * usize::from(SERVICES),
        "node {}: only {request_series} request series",
        node.name
    );
    let max_ms = times.iter().copied().fold(0.0, f64::max);
    Ok(ScrapeResult {
        node: node.name.clone(),
        bytes: text.len(),
        series: samples.count(),
        request_series,
        median_ms: median(times),
        max_ms,
    })
}

fn render(runs: &[LogRun], scrapes: &[ScrapeResult]) -> Result<String> {
    let mut out = String::new();
    writeln!(out, "# weft observability benchmark\n")?;
    writeln!(
        out,
        "Command: `cargo xtask bench --observability` — {} — {}\n",
        date()?,
        machine()?
    )?;
    writeln!(
        out,
        "## Access log on vs off\n\n{LOAD_RATE} GETs/s for {LOAD_SECONDS} s over {LOAD_CONNECTIONS} keep-alive connections, a1 → service (VIP) → mTLS tunnel → nginx in b1; {ROUNDS} rounds per setting, alternating. Medians:\n"
    )?;
    writeln!(
        out,
        "| access log | client's agent CPU-s / 1k req | server's agent CPU-s / 1k req | p50 | p99 |"
    )?;
    writeln!(out, "|---|---|---|---|---|")?;
    let mut medians = Vec::new();
    for logging in [true, false] {
        let of = |f: &dyn Fn(&LogRun) -> f64| {
            median(
                runs.iter()
                    .filter(|r| r.logging == logging)
                    .map(f)
                    .collect(),
            )
        };
        let client = of(&|r| r.cpu_per_1k[0]);
        let server = of(&|r| r.cpu_per_1k[1]);
        writeln!(
            out,
            "| {} | {client:.4} | {server:.4} | {:.0} µs | {:.0} µs |",
            if logging { "on" } else { "off" },
            of(&|r| r.p50_us as f64),
            of(&|r| r.p99_us as f64)
        )?;
        medians.push(client + server);
    }
    if let [on, off] = medians[..] {
        writeln!(
            out,
            "\nBoth agents together: {:.4} CPU-s per 1,000 requests with the access log, {:.4} without ({:+.0}%).",
            on,
            off,
            (on / off - 1.0) * 100.0
        )?;
    }
    writeln!(
        out,
        "\n## /metrics at {PODS_PER_NODE} workloads × {SERVICES} destinations\n\nEach of node a's {PODS_PER_NODE} pods called each of {SERVICES} services (one nginx pod of node b each) once; {SCRAPES} scrapes per agent (curl's time from connect to last byte):\n"
    )?;
    writeln!(
        out,
        "| agent | size | samples | istio_requests_total series | median | max |"
    )?;
    writeln!(out, "|---|---|---|---|---|---|")?;
    for s in scrapes {
        writeln!(
            out,
            "| node {} | {:.0} KiB | {} | {} | {:.1} ms | {:.1} ms |",
            s.node,
            s.bytes as f64 / 1024.0,
            s.series,
            s.request_series,
            s.median_ms,
            s.max_ms
        )?;
    }
    Ok(out)
}

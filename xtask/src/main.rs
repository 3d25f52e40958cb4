use std::{process::Command, time::Duration};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use xtask::{
    agent::{weft_binary, Agent, Mesh},
    bench::{self, BenchArgs, EchoArgs, LoadArgs},
    lab::{Lab, LabSpec, Pod, DEFAULT_NAME},
    pki::TestCa,
    require_root, run, setup, workspace_root,
};

/// Build, lab, demo, test and benchmark automation for weft.
#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the toolchain and lab tools this project needs (idempotent).
    Setup,
    /// Set up, then build the release `weft` binary with its eBPF programs embedded.
    Build,
    /// Create or remove the lab of simulated nodes and pods.
    Lab {
        #[command(subcommand)]
        action: LabAction,
    },
    /// Run the demo: a 2-node lab, traffic through the agents, counters shown.
    Demo {
        /// Leave the lab and agents up afterwards.
        #[arg(long)]
        keep: bool,
    },
    /// Set up, build, and run every test (unit and lab tests; needs root).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Set up, build, and measure latency, throughput and agent cost of weft against direct
    /// pod-to-pod traffic (needs root); writes bench/RESULTS.md.
    Bench(BenchArgs),
    /// The benchmark's echo server, run inside a pod.
    #[command(hide = true)]
    BenchEcho(EchoArgs),
    /// The benchmark's fixed-rate load client, run inside a pod.
    #[command(hide = true)]
    BenchLoad(LoadArgs),
}

#[derive(Subcommand)]
enum LabAction {
    Up {
        #[arg(long, default_value_t = 2)]
        nodes: usize,
        #[arg(long, default_value_t = 2)]
        pods: usize,
        #[arg(long, default_value = DEFAULT_NAME)]
        name: String,
    },
    Down {
        #[arg(long, default_value = DEFAULT_NAME)]
        name: String,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Task::Setup => setup::ensure(),
        Task::Build => build(),
        Task::Lab {
            action: LabAction::Up { nodes, pods, name },
        } => {
            require_root("the lab")?;
            let lab = Lab::up(&LabSpec {
                name,
                nodes,
                pods_per_node: pods,
            })?;
            for node in &lab.nodes {
                println!(
                    "node {} netns {} ip {} pods cgroup {}",
                    node.name,
                    node.netns,
                    node.ip,
                    node.pods_cgroup.display()
                );
                for pod in &node.pods {
                    println!(
                        "  pod {} netns {} ip {} cgroup {}",
                        pod.name,
                        pod.netns,
                        pod.ip,
                        pod.cgroup.display()
                    );
                }
            }
            Ok(())
        }
        Task::Lab {
            action: LabAction::Down { name },
        } => {
            require_root("the lab")?;
            Lab::down(&name)
        }
        Task::Demo { keep } => demo(keep),
        Task::Test { args } => test(&args),
        Task::Bench(args) => {
            require_root("the benchmark")?;
            build()?;
            bench::run(&args)
        }
        Task::BenchEcho(args) => bench::echo(&args),
        Task::BenchLoad(args) => bench::load(&args),
    }
}

fn build() -> Result<()> {
    setup::ensure()?;
    run(Command::new("cargo").current_dir(workspace_root()).args([
        "build",
        "--release",
        "-p",
        "weft",
    ]))
}

fn test(args: &[String]) -> Result<()> {
    require_root("the test suite")?;
    build()?;
    // Lab tests share the machine's namespaces and cgroups, so tests run one at a time.
    run(Command::new("cargo")
        .current_dir(workspace_root())
        .args(["test", "--workspace", "--exclude", "weft-ebpf"])
        .args(args)
        .args(["--", "--test-threads=1"])
        .env("WEFT_BIN", weft_binary()))
}

/// The virtual IP of the demo's service: nothing answers it but the agents.
const DEMO_VIP: &str = "10.96.0.80";

fn demo(keep: bool) -> Result<()> {
    require_root("the demo")?;
    build()?;
    let lab = Lab::up(&LabSpec {
        name: "demo".into(),
        nodes: 2,
        pods_per_node: 2,
    })?;
    let result = run_demo(&lab);
    if keep && result.is_ok() {
        // Leave the agent and nginx running for exploring; `lab down` stops them.
        std::mem::forget(result);
        println!(
            "\nlab 'demo' left up with its agent; remove it with: cargo xtask lab down --name demo"
        );
        return Ok(());
    }
    // Stop the processes before their namespaces go.
    let outcome = result.map(drop);
    Lab::down(&lab.name)?;
    outcome
}

/// Runs the demo; returns the agents and nginx, still running.
fn run_demo(lab: &Lab) -> Result<((Agent, Agent), std::process::Child)> {
    let (a1, a2, b1) = (lab.pod("a1")?, lab.pod("a2")?, lab.pod("b1")?);
    let nginx = b1.start_nginx()?;
    println!(
        "lab: node a ({}) pods a1 {} a2 {}; node b ({}) pod b1 {} runs nginx",
        lab.nodes[0].ip, a1.ip, a2.ip, lab.nodes[1].ip, b1.ip
    );
    let ca = TestCa::new("weft demo mesh CA")?;
    let (ca_cert, ca_key) = ca.write(&lab.dir.join("ca"))?;
    let mut mesh = Mesh::new(lab, ca_cert, ca_key);
    mesh.workloads.retain(|w| w.pod.name != "a2");
    mesh.workload_mut("b1")?.inbound_mode = "STRICT";
    mesh.workload_mut("b1")?.labels = "{app: web}";
    mesh.services = format!(
        "  - {{name: web, namespace: lab, vips: [{DEMO_VIP}], ports: [{{port: 80}}], selector: {{app: web}}}}\n"
    );
    let start = |node: &str, pods: &[&Pod]| -> Result<Agent> {
        let node = lab.node(node)?;
        Agent::start_with(lab, node, &mesh.config_yaml(node, pods), pods)
    };
    let agents = (start("a", &[a1])?, start("b", &[b1])?);
    println!(
        "weft runs on both nodes: a1 (identity sa-a1) and b1 (sa-b1, STRICT) are meshed, a2 is not\n"
    );
    for (pod, requests) in [(a1, 5), (a2, 2)] {
        let mut ok = 0;
        for _ in 0..requests {
            let out = pod
                .command("curl")?
                .args(["-sS", "--max-time", "5", &format!("http://{}/", b1.ip)])
                .output()
                .context("running curl in a pod")?;
            ok += usize::from(out.status.success());
        }
        println!(
            "{} -> http://{}/ x{requests}: {ok} answered",
            pod.name, b1.ip
        );
    }
    anyhow::ensure!(
        b1.nginx_clients()?.len() == 5,
        "a1's requests did not all arrive"
    );
    let out = a1
        .command("curl")?
        .args(["-sS", "--max-time", "5", "-w", "%{http_code} "])
        .args((0..5).flat_map(|_| {
            [
                "-o".to_owned(),
                "/dev/null".to_owned(),
                format!("http://{DEMO_VIP}/"),
            ]
        }))
        .output()
        .context("running curl in a pod")?;
    println!(
        "a1 -> service web at http://{DEMO_VIP}/ x5, balanced by weft per request: statuses {}",
        String::from_utf8_lossy(&out.stdout).trim()
    );
    std::thread::sleep(Duration::from_millis(200));
    let client = agents.0.stats()?;
    println!("\nweft on node a, flows (source pod -> destination, transport):");
    for flow in client["flows"].as_array().into_iter().flatten() {
        println!(
            "  {} -> {} [{}]: opened {} closed {} failed {} bytes sent {} received {}",
            flow["source_pod"].as_str().unwrap_or("?"),
            flow["destination"].as_str().unwrap_or("?"),
            flow["transport"].as_str().unwrap_or("?"),
            flow["opened"],
            flow["closed"],
            flow["failed"],
            flow["bytes_sent"],
            flow["bytes_received"]
        );
    }
    println!("weft on node a, tunnels: {}", client["tunnels"]);
    println!(
        "weft on node a, service web: {}",
        client["services"]["lab/web:80"]
    );
    println!(
        "weft on node a, its endpoints: {}",
        client["endpoints"]["lab/web:80"]
    );
    let metrics = lab
        .node("a")?
        .command("curl")?
        .args(["-sS", "--max-time", "5"])
        .arg(format!("http://{}:15020/metrics", lab.node("a")?.ip))
        .output()
        .context("running curl for /metrics")?;
    println!("weft on node a, /metrics (istio_requests_total):");
    for line in String::from_utf8_lossy(&metrics.stdout)
        .lines()
        .filter(|line| line.starts_with("istio_requests_total{"))
    {
        println!("  {line}");
    }
    let server = agents.1.stats()?;
    println!("weft on node b, inbound per pod: {}", server["inbound"]);
    println!("weft on node b, certificates: {}", server["certificates"]);
    println!(
        "\nnginx in b1 saw these client addresses: {:?}",
        b1.nginx_clients()?
    );
    println!(
        "(a1's requests crossed the wire in an mTLS tunnel and still carry a1's address {}; \
         a2's plaintext was refused because b1 is STRICT)",
        a1.ip
    );
    Ok((agents, nginx))
}

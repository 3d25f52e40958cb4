use std::{process::Command, time::Duration};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use xtask::{
    agent::{weft_binary, Agent},
    bench::{self, BenchArgs, EchoArgs, LoadArgs},
    lab::{Lab, LabSpec, DEFAULT_NAME},
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

/// Runs the demo; returns the agent and nginx, still running.
fn run_demo(lab: &Lab) -> Result<(Agent, std::process::Child)> {
    let (a1, a2, b1) = (lab.pod("a1")?, lab.pod("a2")?, lab.pod("b1")?);
    let nginx = b1.start_nginx()?;
    println!(
        "lab: node a ({}) pods a1 {} a2 {}; node b ({}) pod b1 {} runs nginx",
        lab.nodes[0].ip, a1.ip, a2.ip, lab.nodes[1].ip, b1.ip
    );
    let agent = Agent::start(lab, lab.node("a")?, &[a1])?;
    println!("weft runs on node a with pod a1 enrolled; a2 is not enrolled\n");
    for (pod, requests) in [(a1, 5), (a2, 2)] {
        for _ in 0..requests {
            let out = pod
                .command("curl")?
                .args(["-sS", "--max-time", "5", &format!("http://{}/", b1.ip)])
                .output()
                .context("running curl in a pod")?;
            anyhow::ensure!(
                out.status.success(),
                "curl from {} failed: {}",
                pod.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        println!("{} -> http://{}/ x{requests}: ok", pod.name, b1.ip);
    }
    std::thread::sleep(Duration::from_millis(200));
    let stats = agent.stats()?;
    println!("\nweft on node a, eBPF counters: {}", stats["ebpf"]);
    println!("weft on node a, flows (source pod -> destination):");
    for flow in stats["flows"].as_array().into_iter().flatten() {
        println!(
            "  {} -> {}: opened {} closed {} failed {} bytes sent {} received {}",
            flow["source_pod"].as_str().unwrap_or("?"),
            flow["destination"].as_str().unwrap_or("?"),
            flow["opened"],
            flow["closed"],
            flow["failed"],
            flow["bytes_sent"],
            flow["bytes_received"]
        );
    }
    println!(
        "\nnginx in b1 saw these client addresses: {:?}",
        b1.nginx_clients()?
    );
    println!(
        "(a1's requests went through weft and still carry a1's address {}; a2's went direct)",
        a1.ip
    );
    Ok((agent, nginx))
}

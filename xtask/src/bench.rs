//! `cargo xtask bench`: what weft costs a pod, measured side by side with the same traffic that
//! does not go through it. Pod a2 (not enrolled) talks to b1 directly; pod a1 (enrolled in the
//! agent on node a) talks to b1 through weft. For both it measures the latency of fixed-size
//! request/response exchanges at a fixed rate and the bulk throughput of one iperf3 stream, and
//! for weft the agent's CPU time and memory.
//!
//! The echo server and the load client are hidden subcommands of this binary (`bench-echo`,
//! `bench-load`), run inside the pods.
use std::{
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use clap::Args;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

use crate::{
    agent::Agent,
    lab::{wait_for_tcp, Lab, LabSpec, Pod},
    workspace_root,
};

const LAB_NAME: &str = "bench";
const ECHO_PORT: u16 = 7000;
const IPERF_PORT: u16 = 5201;
/// Exchanges in the first second of a latency run warm up connections and caches; not recorded.
const WARMUP_SECONDS: u64 = 1;
/// One exchange taking longer than this means something is broken, not slow.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(5);
/// Stage targets: weft's median latency at most this multiple of direct...
const TARGET_P50_RATIO: f64 = 2.0;
/// ...and its throughput at least this fraction of direct.
const TARGET_THROUGHPUT_RATIO: f64 = 0.5;

#[derive(Args, Clone, Debug)]
pub struct BenchArgs {
    /// Seconds of each fixed-rate latency run (after a 1 s warm-up).
    #[arg(long, default_value_t = 12, value_parser = clap::value_parser!(u64).range(1..))]
    pub seconds: u64,
    /// Requests per second of the latency runs, spread over all connections.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u32).range(1..))]
    pub rate: u32,
    /// Persistent connections of the latency runs.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    pub connections: u32,
    /// Bytes of each request and of each response.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub size: u32,
    /// Seconds of each iperf3 throughput run (after a 1 s slow-start period iperf3 leaves out).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..))]
    pub throughput_seconds: u64,
    /// Rounds of direct and weft runs; the order alternates every round and each case reports
    /// the median of its runs.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub rounds: u32,
}

impl BenchArgs {
    fn command_line(&self) -> String {
        format!(
            "cargo xtask bench --seconds {} --rate {} --connections {} --size {} \
             --throughput-seconds {} --rounds {}",
            self.seconds,
            self.rate,
            self.connections,
            self.size,
            self.throughput_seconds,
            self.rounds
        )
    }
}

/// Serves `size`-byte requests on `port` by sending each one back.
#[derive(Args, Clone, Debug)]
pub struct EchoArgs {
    #[arg(long)]
    port: u16,
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    size: u32,
}

/// Sends `size`-byte requests to `target` at a fixed rate and prints a [`LoadReport`] as JSON.
#[derive(Args, Clone, Debug)]
pub struct LoadArgs {
    #[arg(long)]
    target: SocketAddr,
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    rate: u32,
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    connections: u32,
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    size: u32,
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    seconds: u64,
    #[arg(long, default_value_t = 0)]
    warmup_seconds: u64,
}

/// What one latency run measured; the load client's output.
#[derive(Serialize, Deserialize, Clone, Debug)]
struct LoadReport {
    requests: u64,
    /// Exchanges whose connection was still busy with an earlier one at their scheduled time.
    late: u64,
    p50_us: u64,
    p99_us: u64,
    p999_us: u64,
    max_us: u64,
}

impl LoadReport {
    fn summary(&self) -> String {
        format!(
            "p50 {} us  p99 {} us  p99.9 {} us  max {} us  ({} requests, {} late)",
            self.p50_us, self.p99_us, self.p999_us, self.max_us, self.requests, self.late
        )
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Case {
    Direct,
    Weft,
}

impl Case {
    fn label(self) -> &'static str {
        match self {
            Case::Direct => "direct (a2 -> b1)",
            Case::Weft => "weft (a1 -> b1)",
        }
    }
}

struct LatencyRun {
    case: Case,
    round: u32,
    report: LoadReport,
    agent_cpu: f64,
    wall: f64,
}

struct ThroughputRun {
    case: Case,
    round: u32,
    bits_per_second: f64,
    agent_cpu: f64,
    wall: f64,
}

struct Memory {
    rss_kib: u64,
    peak_kib: u64,
}

struct Measured {
    latency: Vec<LatencyRun>,
    throughput: Vec<ThroughputRun>,
    memory_start: Memory,
    memory_end: Memory,
}

/// Runs the benchmark in its own lab, prints the results and writes them to bench/RESULTS.md.
/// Expects root and a built agent.
pub fn run(args: &BenchArgs) -> Result<()> {
    let tools = build_tools()?;
    let measured = Lab::up(&LabSpec {
        name: LAB_NAME.into(),
        nodes: 2,
        pods_per_node: 2,
    })
    .and_then(|lab| measure(&lab, args, &tools));
    let down = Lab::down(LAB_NAME);
    let measured = measured?;
    down?;
    let report = render(args, &measured)?;
    println!("\n{report}");
    let dir = workspace_root().join("bench");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("RESULTS.md");
    fs::write(&path, report).with_context(|| format!("writing {}", path.display()))?;
    println!("written to bench/RESULTS.md");
    Ok(())
}

/// The echo server and load client run from an optimized build of this crate, so that the
/// client's own overhead does not blur the latencies it measures.
fn build_tools() -> Result<PathBuf> {
    crate::run(Command::new("cargo").current_dir(workspace_root()).args([
        "build",
        "--release",
        "-p",
        "xtask",
    ]))?;
    Ok(workspace_root().join("target/release/xtask"))
}

/// A server process in a pod, stopped when the benchmark is done with it.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn measure(lab: &Lab, args: &BenchArgs, tools: &Path) -> Result<Measured> {
    let (a1, a2, b1) = (lab.pod("a1")?, lab.pod("a2")?, lab.pod("b1")?);
    let _echo = Server(
        b1.command(tools)?
            .args([
                "bench-echo",
                "--port",
                &ECHO_PORT.to_string(),
                "--size",
                &args.size.to_string(),
            ])
            .stdin(Stdio::null())
            .spawn()
            .context("starting the echo server in b1")?,
    );
    let _iperf = Server(
        b1.command("iperf3")?
            .args(["-s", "-p", &IPERF_PORT.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .context("starting iperf3 in b1 (is iperf3 installed? run `cargo xtask setup`)")?,
    );
    wait_for_tcp(b1, ECHO_PORT, Duration::from_secs(10))?;
    wait_for_tcp(b1, IPERF_PORT, Duration::from_secs(10))?;
    let agent = Agent::start(lab, lab.node("a")?, &[a1])?;
    let pid = agent.pid().context("the agent has no process")?;
    let memory_start = memory(pid)?;
    println!(
        "bench: weft on node a with a1 enrolled; direct = a2 -> b1 ({}), weft = a1 -> b1; \
         rounds: {}, order alternating",
        b1.ip, args.rounds
    );

    let mut latency = Vec::new();
    let mut throughput = Vec::new();
    for round in 1..=args.rounds {
        // Alternating which case goes first cancels slow drifts of the shared machine.
        let order = if round % 2 == 1 {
            [Case::Direct, Case::Weft]
        } else {
            [Case::Weft, Case::Direct]
        };
        for case in order {
            let client = if case == Case::Weft { a1 } else { a2 };
            let (cpu, started) = (cpu_seconds(pid)?, Instant::now());
            let report = latency_run(tools, client, b1, args)?;
            let (agent_cpu, wall) = (cpu_seconds(pid)? - cpu, started.elapsed().as_secs_f64());
            println!(
                "round {round} latency    {:<18} {}  agent CPU {agent_cpu:.2} s",
                case.label(),
                report.summary()
            );
            latency.push(LatencyRun {
                case,
                round,
                report,
                agent_cpu,
                wall,
            });
        }
        for case in order {
            let client = if case == Case::Weft { a1 } else { a2 };
            let (cpu, started) = (cpu_seconds(pid)?, Instant::now());
            let bits_per_second = throughput_run(client, b1, args.throughput_seconds)?;
            let (agent_cpu, wall) = (cpu_seconds(pid)? - cpu, started.elapsed().as_secs_f64());
            println!(
                "round {round} throughput {:<18} {:.2} Gbit/s  agent CPU {agent_cpu:.2} s",
                case.label(),
                bits_per_second / 1e9
            );
            throughput.push(ThroughputRun {
                case,
                round,
                bits_per_second,
                agent_cpu,
                wall,
            });
        }
    }
    let memory_end = memory(pid)?;
    check_paths(&agent.stats()?, b1, args)?;
    Ok(Measured {
        latency,
        throughput,
        memory_start,
        memory_end,
    })
}

fn latency_run(tools: &Path, client: &Pod, server: &Pod, args: &BenchArgs) -> Result<LoadReport> {
    let out = client
        .command(tools)?
        .args([
            "bench-load",
            "--target",
            &format!("{}:{ECHO_PORT}", server.ip),
        ])
        .args([
            "--rate",
            &args.rate.to_string(),
            "--connections",
            &args.connections.to_string(),
        ])
        .args([
            "--size",
            &args.size.to_string(),
            "--seconds",
            &args.seconds.to_string(),
        ])
        .args(["--warmup-seconds", &WARMUP_SECONDS.to_string()])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running the load client in {}", client.name))?;
    ensure!(
        out.status.success(),
        "load client in {} failed ({}): {}",
        client.name,
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    serde_json::from_slice(&out.stdout)
        .with_context(|| format!("load client in {} printed no report", client.name))
}

/// Bits per second the server received from one iperf3 stream from `client`.
fn throughput_run(client: &Pod, server: &Pod, seconds: u64) -> Result<f64> {
    let out = client
        .command("iperf3")?
        .args([
            "-c",
            &server.ip.to_string(),
            "-p",
            &IPERF_PORT.to_string(),
            "-J",
        ])
        .args([
            "-t",
            &seconds.to_string(),
            "-O",
            "1",
            "--connect-timeout",
            "5000",
        ])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running iperf3 in {}", client.name))?;
    let json: Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "iperf3 in {} printed no JSON: {}",
            client.name,
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    if let Some(error) = json["error"].as_str() {
        bail!("iperf3 in {}: {error}", client.name);
    }
    ensure!(
        out.status.success(),
        "iperf3 in {} failed with {}",
        client.name,
        out.status
    );
    json["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 JSON has no end.sum_received.bits_per_second")
}

/// Fails unless the agent carried a1's connections and none of a2's, so that the two cases
/// measure what they claim to.
fn check_paths(stats: &Value, b1: &Pod, args: &BenchArgs) -> Result<()> {
    let flows = stats["flows"]
        .as_array()
        .context("agent stats have no flows")?;
    let echo = format!("{}:{ECHO_PORT}", b1.ip);
    let proxied: u64 = flows
        .iter()
        .filter(|f| f["destination"].as_str() == Some(echo.as_str()))
        .filter_map(|f| f["opened"].as_u64())
        .sum();
    let expected = u64::from(args.connections) * u64::from(args.rounds);
    ensure!(
        proxied >= expected,
        "weft proxied {proxied} connections to {echo}, expected at least {expected} from a1"
    );
    if let Some(flow) = flows
        .iter()
        .find(|f| f["source_pod"].as_str().is_some_and(|p| p.ends_with("a2")))
    {
        bail!("a2 is not enrolled but weft proxied its traffic: {flow}");
    }
    Ok(())
}

/// CPU seconds (user + system, all threads) process `pid` has used so far.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let stat = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // The command name (field 2) may hold spaces and parentheses; the fields after its last ')'
    // start at field 3, so utime and stime (fields 14 and 15) are the 12th and 13th of those.
    let (_, rest) = stat
        .rsplit_once(')')
        .with_context(|| format!("unexpected format of {path}"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |index: usize| -> Result<u64> {
        let field = fields
            .get(index)
            .with_context(|| format!("{path} is too short"))?;
        field
            .parse()
            .with_context(|| format!("field {} of {path} is not a number", index + 3))
    };
    let total = ticks(11)? + ticks(12)?;
    // SAFETY: sysconf has no preconditions.
    let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    ensure!(ticks_per_second > 0, "sysconf(_SC_CLK_TCK) failed");
    Ok(total as f64 / ticks_per_second as f64)
}

/// Resident memory of process `pid`: now and its peak.
fn memory(pid: u32) -> Result<Memory> {
    let path = format!("/proc/{pid}/status");
    let status = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let kib = |key: &str| -> Result<u64> {
        let line = status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .with_context(|| format!("{path} has no {key}"))?;
        let value = line
            .split_whitespace()
            .next()
            .with_context(|| format!("{path}: {key} is empty"))?;
        value
            .parse()
            .with_context(|| format!("{path}: {key} {value} is not a number"))
    };
    Ok(Memory {
        rss_kib: kib("VmRSS:")?,
        peak_kib: kib("VmHWM:")?,
    })
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => values[n / 2],
        _ => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// One number of a latency run's report.
type Metric = fn(&LoadReport) -> u64;

fn latency_median(runs: &[LatencyRun], case: Case, metric: Metric) -> f64 {
    median(
        runs.iter()
            .filter(|r| r.case == case)
            .map(|r| metric(&r.report) as f64)
            .collect(),
    )
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn verdict(pass: bool) -> &'static str {
    if pass {
        "PASS"
    } else {
        "MISS"
    }
}

/// The results as Markdown, for the terminal and bench/RESULTS.md alike.
fn render(args: &BenchArgs, m: &Measured) -> Result<String> {
    let mut out = String::from("# weft benchmark\n\n");
    out.push_str(
        "Written by `cargo xtask bench` (needs root); run it again to reproduce or refresh.\n\n",
    );
    out.push_str(&format!("- command: `{}`\n", args.command_line()));
    out.push_str(&format!("- date: {}\n", date()?));
    out.push_str(&format!("- machine: {}\n", machine()?));
    out.push_str(
        "- lab: 2 nodes x 2 pods, network namespaces and cgroups on one machine; weft (release \
         build) runs on node a with pod a1 enrolled\n\
         - direct: a2 -> b1, a2 not enrolled; weft: a1 -> b1, redirected by eBPF to the agent, \
         which proxies it (L4)\n",
    );
    out.push_str(&format!(
        "- latency: {size}-byte requests, each answered with {size} bytes by an echo server in b1, \
         at a fixed {rate} requests/s over {conns} persistent connections (one exchange in flight \
         per connection), {secs} s per run after a {WARMUP_SECONDS} s warm-up. Sends follow a \
         fixed schedule (open loop): when a connection is still busy at an exchange's scheduled \
         time, its latency counts from that time, so stalls are not hidden (no coordinated \
         omission)\n",
        size = args.size,
        rate = args.rate,
        conns = args.connections,
        secs = args.seconds
    ));
    out.push_str(&format!(
        "- throughput: one iperf3 TCP stream, {} s per run after 1 s left out for slow start, \
         as received by b1\n",
        args.throughput_seconds
    ));
    out.push_str(&format!(
        "- noise: the cases alternate (rounds: {}; direct then weft, then weft then direct, ...); \
         each number below is the median of a case's runs\n\n",
        args.rounds
    ));

    let direct = |metric| latency_median(&m.latency, Case::Direct, metric);
    let weft = |metric| latency_median(&m.latency, Case::Weft, metric);
    let bps = |case| {
        median(
            m.throughput
                .iter()
                .filter(|r| r.case == case)
                .map(|r| r.bits_per_second)
                .collect(),
        )
    };
    let (direct_bps, weft_bps) = (bps(Case::Direct), bps(Case::Weft));
    let p50_ratio = weft(|r| r.p50_us) / direct(|r| r.p50_us);
    let throughput_ratio = weft_bps / direct_bps;

    out.push_str("| metric | direct | weft | weft/direct | stage target |\n");
    out.push_str("| --- | ---: | ---: | ---: | --- |\n");
    let rows: [(&str, Metric); 4] = [
        ("latency p50", |r| r.p50_us),
        ("latency p99", |r| r.p99_us),
        ("latency p99.9", |r| r.p999_us),
        ("latency max", |r| r.max_us),
    ];
    for (name, metric) in rows {
        let (d, w) = (direct(metric), weft(metric));
        let target = if name == "latency p50" {
            format!(
                "<= {TARGET_P50_RATIO}x: {}",
                verdict(p50_ratio <= TARGET_P50_RATIO)
            )
        } else {
            String::new()
        };
        out.push_str(&format!(
            "| {name} | {d:.0} µs | {w:.0} µs | {:.2}x | {target} |\n",
            w / d
        ));
    }
    out.push_str(&format!(
        "| throughput | {:.2} Gbit/s | {:.2} Gbit/s | {:.0}% | >= {:.0}%: {} |\n\n",
        direct_bps / 1e9,
        weft_bps / 1e9,
        throughput_ratio * 100.0,
        TARGET_THROUGHPUT_RATIO * 100.0,
        verdict(throughput_ratio >= TARGET_THROUGHPUT_RATIO)
    ));

    let core_share = |cpu: f64, wall: f64| 100.0 * cpu / wall;
    let weft_latency: Vec<&LatencyRun> =
        m.latency.iter().filter(|r| r.case == Case::Weft).collect();
    let weft_throughput: Vec<&ThroughputRun> = m
        .throughput
        .iter()
        .filter(|r| r.case == Case::Weft)
        .collect();
    let direct_cpu: f64 = m
        .latency
        .iter()
        .filter(|r| r.case == Case::Direct)
        .map(|r| r.agent_cpu)
        .sum::<f64>()
        + m.throughput
            .iter()
            .filter(|r| r.case == Case::Direct)
            .map(|r| r.agent_cpu)
            .sum::<f64>();
    // The warm-up's exchanges cost the agent too.
    let exchanges = f64::from(args.rate) * (args.seconds + WARMUP_SECONDS) as f64;
    out.push_str("Agent on node a (utime + stime from /proc, median per weft run):\n\n");
    out.push_str(&format!(
        "- CPU during a latency run: {:.2} s ({:.1}% of one core; {:.0} µs per exchange)\n",
        median(weft_latency.iter().map(|r| r.agent_cpu).collect()),
        median(
            weft_latency
                .iter()
                .map(|r| core_share(r.agent_cpu, r.wall))
                .collect()
        ),
        median(weft_latency.iter().map(|r| r.agent_cpu).collect()) * 1e6 / exchanges,
    ));
    out.push_str(&format!(
        "- CPU during a throughput run: {:.2} s ({:.1}% of one core)\n",
        median(weft_throughput.iter().map(|r| r.agent_cpu).collect()),
        median(
            weft_throughput
                .iter()
                .map(|r| core_share(r.agent_cpu, r.wall))
                .collect()
        ),
    ));
    out.push_str(&format!(
        "- CPU during all direct runs together: {direct_cpu:.2} s (a2 is not enrolled)\n"
    ));
    out.push_str(&format!(
        "- memory (VmRSS, peak VmHWM): {:.1} MiB after start-up (peak {:.1} MiB), {:.1} MiB at \
         the end (peak {:.1} MiB)\n\n",
        mib(m.memory_start.rss_kib),
        mib(m.memory_start.peak_kib),
        mib(m.memory_end.rss_kib),
        mib(m.memory_end.peak_kib)
    ));

    out.push_str("Every run, in the order run:\n\n");
    out.push_str("| round | case | p50 | p99 | p99.9 | max | requests | late | agent CPU |\n");
    out.push_str("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n");
    for r in &m.latency {
        let l = &r.report;
        out.push_str(&format!(
            "| {} | {} | {} µs | {} µs | {} µs | {} µs | {} | {} | {:.2} s |\n",
            r.round,
            r.case.label(),
            l.p50_us,
            l.p99_us,
            l.p999_us,
            l.max_us,
            l.requests,
            l.late,
            r.agent_cpu
        ));
    }
    out.push_str("\n| round | case | throughput | agent CPU |\n| ---: | --- | ---: | ---: |\n");
    for r in &m.throughput {
        out.push_str(&format!(
            "| {} | {} | {:.2} Gbit/s | {:.2} s |\n",
            r.round,
            r.case.label(),
            r.bits_per_second / 1e9,
            r.agent_cpu
        ));
    }
    Ok(out)
}

fn date() -> Result<String> {
    let out = Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .context("running date")?;
    ensure!(out.status.success(), "date failed with {}", out.status);
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn machine() -> Result<String> {
    let cpus = std::thread::available_parallelism().context("counting CPUs")?;
    let kernel =
        fs::read_to_string("/proc/sys/kernel/osrelease").context("reading the kernel release")?;
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .and_then(|rest| rest.split_once(':'))
        })
        .map_or("unknown CPU model", |(_, name)| name.trim());
    Ok(format!("{cpus} CPUs ({model}), Linux {}", kernel.trim()))
}

/// A single-threaded runtime: one core is plenty for the echo server and the load client at the
/// rates used, and it leaves the other core to the system under test.
fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")
}

/// `bench-echo`: runs until killed.
pub fn echo(args: &EchoArgs) -> Result<()> {
    let size = args.size as usize;
    runtime()?.block_on(async {
        let listener = TcpListener::bind(("0.0.0.0", args.port))
            .await
            .with_context(|| format!("listening on port {}", args.port))?;
        loop {
            let (stream, _) = listener.accept().await.context("accepting a connection")?;
            // A client that goes away ends its own connection, not the server.
            tokio::spawn(serve_echo(stream, size));
        }
    })
}

async fn serve_echo(mut stream: TcpStream, size: usize) -> Result<()> {
    stream.set_nodelay(true)?;
    let mut buffer = vec![0; size];
    loop {
        match stream.read_exact(&mut buffer).await {
            Ok(_) => stream.write_all(&buffer).await?,
            Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(err) => return Err(err.into()),
        }
    }
}

/// `bench-load`: prints one [`LoadReport`] as a JSON line.
pub fn load(args: &LoadArgs) -> Result<()> {
    let report = runtime()?.block_on(drive_load(args))?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// The fixed send schedule shared by all connections of a load run.
#[derive(Clone, Copy)]
struct Schedule {
    start: tokio::time::Instant,
    record_from: tokio::time::Instant,
    end: tokio::time::Instant,
    rate: u32,
    connections: u32,
    size: usize,
}

impl Schedule {
    /// When exchange `n` of connection `connection` is due: the connections take turns, so the
    /// whole run sends at an even `rate`.
    fn due(&self, connection: u32, n: u64) -> tokio::time::Instant {
        let slot = u64::from(connection) + n * u64::from(self.connections);
        self.start + Duration::from_secs_f64(slot as f64 / f64::from(self.rate))
    }
}

fn new_histogram() -> Result<Histogram<u64>> {
    // 1 µs to 60 s at 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000, 3).context("creating a histogram")
}

async fn drive_load(args: &LoadArgs) -> Result<LoadReport> {
    // Connecting first keeps connection set-up out of the measured exchanges.
    let mut streams = Vec::new();
    for _ in 0..args.connections {
        let stream = tokio::time::timeout(EXCHANGE_TIMEOUT, TcpStream::connect(args.target))
            .await
            .with_context(|| format!("connecting to {} timed out", args.target))?
            .with_context(|| format!("connecting to {}", args.target))?;
        stream.set_nodelay(true)?;
        streams.push(stream);
    }
    let start = tokio::time::Instant::now();
    let record_from = start + Duration::from_secs(args.warmup_seconds);
    let schedule = Schedule {
        start,
        record_from,
        end: record_from + Duration::from_secs(args.seconds),
        rate: args.rate,
        connections: args.connections,
        size: args.size as usize,
    };
    let tasks: Vec<_> = streams
        .into_iter()
        .zip(0..)
        .map(|(stream, index)| tokio::spawn(drive_connection(stream, index, schedule)))
        .collect();
    let mut total = new_histogram()?;
    let mut late = 0;
    for task in tasks {
        let (histogram, task_late) = task.await.context("a load connection task panicked")??;
        total.add(&histogram).context("merging histograms")?;
        late += task_late;
    }
    Ok(LoadReport {
        requests: total.len(),
        late,
        p50_us: total.value_at_quantile(0.5),
        p99_us: total.value_at_quantile(0.99),
        p999_us: total.value_at_quantile(0.999),
        max_us: total.max(),
    })
}

/// Runs one connection's share of the schedule; returns its latencies (µs) and late count.
async fn drive_connection(
    mut stream: TcpStream,
    index: u32,
    schedule: Schedule,
) -> Result<(Histogram<u64>, u64)> {
    let mut histogram = new_histogram()?;
    let mut late = 0;
    let request = vec![b'q'; schedule.size];
    let mut response = vec![0; schedule.size];
    for n in 0.. {
        let due = schedule.due(index, n);
        if due >= schedule.end {
            break;
        }
        let begin = if tokio::time::Instant::now() > due {
            // The previous exchange ran past this one's slot: the wait is the system's doing.
            if due >= schedule.record_from {
                late += 1;
            }
            due
        } else {
            // The timer wakes up to a millisecond late; that delay is the client's, so the
            // latency counts from the actual send.
            tokio::time::sleep_until(due).await;
            tokio::time::Instant::now()
        };
        tokio::time::timeout(EXCHANGE_TIMEOUT, async {
            stream.write_all(&request).await?;
            stream.read_exact(&mut response).await?;
            Ok::<_, std::io::Error>(())
        })
        .await
        .context("no response in time")?
        .context("request/response exchange")?;
        if due >= schedule.record_from {
            let micros = u64::try_from(begin.elapsed().as_micros()).unwrap_or(u64::MAX);
            histogram.saturating_record(micros.max(1));
        }
    }
    Ok((histogram, late))
}

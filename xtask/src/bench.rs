//! `cargo xtask bench`: what weft costs a pod, measured side by side with the same traffic going
//! direct and through a conventional proxy pair. Four cases, each on its own pair of lab nodes
//! (all on one machine, so every path crosses the same kinds of veths and bridge):
//!
//! - direct: a2 -> b1, nothing in the way (a2 is not enrolled in node a's agent);
//! - weft L4: a1 -> b1, a1 enrolled in the agent on node a, which has no identity settings;
//! - weft mTLS: c1 -> d1, agents on nodes c and d, both pods enrolled, d1 in STRICT mode, so the
//!   connection has to go through the agents' mTLS tunnel;
//! - HAProxy mTLS pair: a2 -> HAProxy on node a -> mutual TLS 1.3 -> HAProxy on node b -> b1.
//!
//! For each it measures the latency of fixed-size request/response exchanges at a fixed rate, the
//! bulk throughput of one iperf3 stream, the rate of new connections (connect, one exchange,
//! close), and the CPU time and memory of the case's proxies. HTTP request rates, with weft's L7
//! for services against an HAProxy pair in HTTP mode, are measured in `bench_http`.
//!
//! The echo server and the load client are hidden subcommands of this binary (`bench-echo`,
//! `bench-load`), run inside the pods.
use std::{
    fs::{self, File},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use clap::{Args, Subcommand};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

use crate::{
    agent::{Agent, ADMIN_ADDR},
    bench_http::{self, HttpBenchArgs, HttpLoadArgs, HttpRun},
    lab::{wait_for_tcp, Lab, LabSpec, Node, Pod},
    pki::{spiffe_id, write_private, TestCa},
    workspace_root,
};

const LAB_NAME: &str = "bench";
const ECHO_PORT: u16 = 7000;
const IPERF_PORT: u16 = 5201;
/// Where the server-side HAProxy accepts the TLS legs for the echo and iperf3 ports.
const HAPROXY_TLS_ECHO_PORT: u16 = 17000;
const HAPROXY_TLS_IPERF_PORT: u16 = 15201;
/// Host name in the server-side HAProxy's certificate, checked by the client side (`verifyhost`).
pub(crate) const HAPROXY_SERVER_NAME: &str = "haproxy-b.lab";
/// Matches the agent's default worker threads on the 2-core machines this runs on.
pub(crate) const HAPROXY_THREADS: u32 = 2;
const TRUST_DOMAIN: &str = "cluster.local";
pub(crate) const NAMESPACE: &str = "lab";
/// Exchanges (and new connections) in the first second of a run warm up connections and caches;
/// not recorded.
pub(crate) const WARMUP_SECONDS: u64 = 1;
/// One exchange taking longer than this means something is broken, not slow.
pub(crate) const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(5);
/// Stage targets: weft L4's median latency at most this multiple of direct...
const TARGET_L4_P50_RATIO: f64 = 2.0;
/// ...and its throughput at least this fraction of direct;
const TARGET_L4_THROUGHPUT_RATIO: f64 = 0.5;
/// weft mTLS's p50 and p99 latency at most this multiple of the HAProxy pair's...
const TARGET_MTLS_LATENCY_RATIO: f64 = 0.8;
/// ...and its throughput at least this multiple of the HAProxy pair's.
const TARGET_MTLS_THROUGHPUT_RATIO: f64 = 1.2;

#[derive(Args, Clone, Debug)]
pub struct BenchArgs {
    /// Seconds of each fixed-rate latency run (after a 1 s warm-up).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..))]
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
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    pub throughput_seconds: u64,
    /// Seconds of each new-connection run (after a 1 s warm-up).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..))]
    pub connect_seconds: u64,
    /// Concurrent workers of the new-connection runs, each opening its next connection as soon
    /// as the previous one is closed.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
    pub connect_workers: u32,
    /// Rounds of runs of every case; the order reverses every round and each case reports the
    /// median of its runs.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub rounds: u32,
    /// Skip the TCP runs (latency, throughput and new connections of direct, weft L4, weft mTLS
    /// and the HAProxy mTLS pair); only the HTTP runs are made.
    #[arg(long)]
    pub skip_l4: bool,
    #[command(flatten)]
    pub http: HttpBenchArgs,
    /// Only measure what metrics and the access log cost (its own lab; writes
    /// bench/OBSERVABILITY.md).
    #[arg(long)]
    pub observability: bool,
}

impl BenchArgs {
    fn command_line(&self) -> String {
        let mut line = format!(
            "cargo xtask bench --seconds {} --rate {} --connections {} --size {} \
             --throughput-seconds {} --connect-seconds {} --connect-workers {} --rounds {}",
            self.seconds,
            self.rate,
            self.connections,
            self.size,
            self.throughput_seconds,
            self.connect_seconds,
            self.connect_workers,
            self.rounds
        );
        if self.skip_l4 {
            line.push_str(" --skip-l4");
        }
        line.push_str(&self.http.command_line());
        line
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

/// Drives `size`-byte exchanges against `target` and prints a JSON report.
#[derive(Args, Clone, Debug)]
pub struct LoadArgs {
    #[command(subcommand)]
    mode: LoadMode,
}

#[derive(Subcommand, Clone, Debug)]
enum LoadMode {
    /// Exchanges at a fixed rate over persistent connections; prints a latency report.
    Latency(LatencyArgs),
    /// New connections in a closed loop, one exchange each; prints a connection-rate report.
    Connect(ConnectArgs),
    /// HTTP GETs at a fixed rate, with keep-alive or a new connection each; prints an HTTP
    /// report.
    Http(HttpLoadArgs),
}

#[derive(Args, Clone, Debug)]
pub(crate) struct TargetArgs {
    #[arg(long)]
    pub(crate) target: SocketAddr,
    /// Bytes of each request and response (HTTP: of each response body).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) size: u32,
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) seconds: u64,
    #[arg(long, default_value_t = 0)]
    pub(crate) warmup_seconds: u64,
}

#[derive(Args, Clone, Debug)]
struct LatencyArgs {
    #[command(flatten)]
    target: TargetArgs,
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    rate: u32,
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    connections: u32,
}

#[derive(Args, Clone, Debug)]
struct ConnectArgs {
    #[command(flatten)]
    target: TargetArgs,
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    workers: u32,
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

/// What one new-connection run measured.
#[derive(Serialize, Deserialize, Clone, Debug)]
struct ConnectReport {
    /// Connections begun in the measured window that completed their exchange.
    completed: u64,
    /// Connections begun in the measured window that failed or timed out.
    failed: u64,
    /// All connections made, warm-up included: what the proxies' CPU time was spent on.
    total: u64,
    per_second: f64,
    /// Connect + exchange + close, per connection.
    p50_us: u64,
    p99_us: u64,
    first_error: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Case {
    Direct,
    WeftL4,
    WeftMtls,
    Haproxy,
}

impl Case {
    const ALL: [Case; 4] = [Case::Direct, Case::WeftL4, Case::WeftMtls, Case::Haproxy];

    fn label(self) -> &'static str {
        match self {
            Case::Direct => "direct",
            Case::WeftL4 => "weft L4",
            Case::WeftMtls => "weft mTLS",
            Case::Haproxy => "HAProxy mTLS pair",
        }
    }
}

/// One case as set up in the lab: who sends, where to, and which processes carry it.
struct Subject<'a> {
    case: Case,
    client: &'a Pod,
    echo: SocketAddrV4,
    iperf: SocketAddrV4,
    /// The proxies whose CPU time and memory the case costs (none for direct).
    pids: Vec<u32>,
}

/// One run of one case: its result and what the case's proxies spent on it.
struct Run<T> {
    case: Case,
    round: u32,
    result: T,
    cpu: f64,
    wall: f64,
}

#[derive(Clone, Copy, Default)]
struct Memory {
    rss_kib: u64,
    peak_kib: u64,
}

struct Measured {
    latency: Vec<Run<LoadReport>>,
    /// Bits per second.
    throughput: Vec<Run<f64>>,
    connect: Vec<Run<ConnectReport>>,
    /// Per case: its proxies' memory after start-up and at the end.
    memory: Vec<(Case, Memory, Memory)>,
    http: Vec<HttpRun>,
}

/// Runs the benchmark in its own lab, prints the results and writes them to bench/RESULTS.md.
/// Expects root and a built agent.
pub fn run(args: &BenchArgs) -> Result<()> {
    if args.observability {
        return crate::bench_obs::run();
    }
    ensure!(
        !(args.skip_l4 && args.http.skip_http),
        "--skip-l4 and --skip-http together leave nothing to measure"
    );
    let tools = build_tools()?;
    let measured = Lab::up(&LabSpec {
        name: LAB_NAME.into(),
        nodes: 4,
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
pub(crate) fn build_tools() -> Result<PathBuf> {
    crate::run(Command::new("cargo").current_dir(workspace_root()).args([
        "build",
        "--release",
        "-p",
        "xtask",
    ]))?;
    Ok(workspace_root().join("target/release/xtask"))
}

/// A server process in the lab, stopped when the benchmark is done with it.
pub(crate) struct Server(pub(crate) Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_servers(tools: &Path, pod: &Pod, size: u32) -> Result<[Server; 2]> {
    let echo = Server(
        pod.command(tools)?
            .args(["bench-echo", "--port", &ECHO_PORT.to_string()])
            .args(["--size", &size.to_string()])
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("starting the echo server in {}", pod.name))?,
    );
    let iperf = Server(
        pod.command("iperf3")?
            .args(["-s", "-p", &IPERF_PORT.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .context("starting iperf3 (is iperf3 installed? run `cargo xtask setup`)")?,
    );
    wait_for_tcp(pod, ECHO_PORT, Duration::from_secs(10))?;
    wait_for_tcp(pod, IPERF_PORT, Duration::from_secs(10))?;
    Ok([echo, iperf])
}

/// The new-connection runs close tens of thousands of connections in seconds; the closing side
/// keeps each in TIME_WAIT for 60 s, which would exhaust the ephemeral ports of the client pod
/// (and of the proxies' namespaces). Reusing TIME_WAIT ports after 1 s, as busy hosts are
/// commonly configured, keeps connect() from failing; it changes nothing else.
fn allow_time_wait_reuse(lab: &Lab) -> Result<()> {
    let namespaces = lab
        .nodes
        .iter()
        .map(|n| &n.netns)
        .chain(lab.pods().map(|p| &p.netns));
    for netns in namespaces {
        crate::run(Command::new("ip").args([
            "netns",
            "exec",
            netns,
            "sysctl",
            "-qw",
            "net.ipv4.tcp_tw_reuse=1",
        ]))?;
    }
    Ok(())
}

fn measure(lab: &Lab, args: &BenchArgs, tools: &Path) -> Result<Measured> {
    let (a1, a2, b1) = (lab.pod("a1")?, lab.pod("a2")?, lab.pod("b1")?);
    let (c1, d1) = (lab.pod("c1")?, lab.pod("d1")?);
    let (node_a, node_b) = (lab.node("a")?, lab.node("b")?);
    let (node_c, node_d) = (lab.node("c")?, lab.node("d")?);
    allow_time_wait_reuse(lab)?;
    let _servers = [
        start_servers(tools, b1, args.size)?,
        start_servers(tools, d1, args.size)?,
    ];

    let ca = TestCa::new("weft bench CA")?;
    let (ca_cert, ca_key) = ca.write(&lab.dir.join("pki"))?;
    let client = Workload {
        pod: c1,
        node: node_c,
        service_account: "bench-client",
        strict: false,
    };
    let server = Workload {
        pod: d1,
        node: node_d,
        service_account: "bench-server",
        // Plaintext into d1 would be reset: the mTLS case cannot silently bypass the tunnel.
        strict: true,
    };
    let identity = Some((ca_cert.as_path(), ca_key.as_path()));
    let l4_pod = Workload {
        pod: a1,
        node: node_a,
        service_account: "default",
        strict: false,
    };
    let l4_agent = Agent::start_with(lab, node_a, &weft_yaml(node_a, &l4_pod, None, None), &[a1])?;
    // The server side first, so that the client's first tunnel finds it ready.
    let server_agent = Agent::start_with(
        lab,
        node_d,
        &weft_yaml(node_d, &server, identity, Some(&client)),
        &[d1],
    )?;
    // The HTTP service is the client's: only its agent balances requests to the VIP.
    let client_agent = Agent::start_with(
        lab,
        node_c,
        &(weft_yaml(node_c, &client, identity, Some(&server))
            + &bench_http::service_yaml(server.service_account)),
        &[c1],
    )?;
    let gateway = pod_gateway(a2);
    let haproxy_files = haproxy_files(lab, &ca, &ca_cert)?;
    let haproxy = start_haproxy_pair(&haproxy_files, (node_a, gateway), node_b, b1)?;
    let http = if args.http.skip_http {
        None
    } else {
        Some(bench_http::HttpLab::start(
            lab,
            &haproxy_files,
            [&client_agent, &server_agent],
        )?)
    };

    let pid = |agent: &Agent| agent.pid().context("an agent has no process");
    let subjects = [
        Subject {
            case: Case::Direct,
            client: a2,
            echo: SocketAddrV4::new(b1.ip, ECHO_PORT),
            iperf: SocketAddrV4::new(b1.ip, IPERF_PORT),
            pids: Vec::new(),
        },
        Subject {
            case: Case::WeftL4,
            client: a1,
            echo: SocketAddrV4::new(b1.ip, ECHO_PORT),
            iperf: SocketAddrV4::new(b1.ip, IPERF_PORT),
            pids: vec![pid(&l4_agent)?],
        },
        Subject {
            case: Case::WeftMtls,
            client: c1,
            echo: SocketAddrV4::new(d1.ip, ECHO_PORT),
            iperf: SocketAddrV4::new(d1.ip, IPERF_PORT),
            pids: vec![pid(&client_agent)?, pid(&server_agent)?],
        },
        Subject {
            case: Case::Haproxy,
            client: a2,
            echo: SocketAddrV4::new(gateway, ECHO_PORT),
            iperf: SocketAddrV4::new(gateway, IPERF_PORT),
            pids: haproxy.iter().map(|s| s.0.id()).collect(),
        },
    ];
    let memory_start = subjects
        .iter()
        .map(|s| memory_total(&s.pids))
        .collect::<Result<Vec<_>>>()?;
    println!(
        "bench: direct = a2 -> b1; weft L4 = a1 -> b1 (agent on a); weft mTLS = c1 -> d1 \
         (agents on c and d); HAProxy = a2 -> {gateway} (HAProxy on a) -> TLS -> HAProxy on b \
         -> b1; rounds: {}, order reversing every round",
        args.rounds
    );

    let mut latency = Vec::new();
    let mut throughput = Vec::new();
    let mut connect = Vec::new();
    let mut http_runs = Vec::new();
    for round in 1..=args.rounds {
        if let Some(http) = &http {
            http.run_round(tools, &args.http, round, &mut http_runs)?;
        }
        if args.skip_l4 {
            continue;
        }
        // Reversing the order every round cancels slow drifts of the shared machine.
        let order: Vec<&Subject> = if round % 2 == 1 {
            subjects.iter().collect()
        } else {
            subjects.iter().rev().collect()
        };
        for s in &order {
            let run = timed(s, round, || latency_run(tools, s.client, s.echo, args))?;
            println!(
                "round {round} latency    {:<18} {}  proxy CPU {:.2} s",
                s.case.label(),
                run.result.summary(),
                run.cpu
            );
            latency.push(run);
        }
        for s in &order {
            let run = timed(s, round, || {
                throughput_run(s.client, s.iperf, args.throughput_seconds)
            })?;
            println!(
                "round {round} throughput {:<18} {:.2} Gbit/s  proxy CPU {:.2} s",
                s.case.label(),
                run.result / 1e9,
                run.cpu
            );
            throughput.push(run);
        }
        for s in &order {
            let run = timed(s, round, || connect_run(tools, s.client, s.echo, args))?;
            println!(
                "round {round} connect    {:<18} {:.0} conn/s  ({} failed)  proxy CPU {:.2} s",
                s.case.label(),
                run.result.per_second,
                run.result.failed,
                run.cpu
            );
            connect.push(run);
        }
    }
    let mut memory = Vec::new();
    for (s, start) in subjects.iter().zip(memory_start) {
        memory.push((s.case, start, memory_total(&s.pids)?));
    }

    if let Some(http) = &http {
        http.check(&http_runs)?;
    }
    // a2 sends the direct and HAProxy cases of both parts.
    check_bystander(&l4_agent.stats()?, a2)?;
    if !args.skip_l4 {
        // Every latency run opens `connections` connections; the new-connection runs add more.
        let expected = u64::from(args.connections) * u64::from(args.rounds);
        check_proxied(
            &l4_agent.stats()?,
            SocketAddrV4::new(b1.ip, ECHO_PORT),
            "plaintext",
            expected,
        )?;
        check_proxied(
            &client_agent.stats()?,
            SocketAddrV4::new(d1.ip, ECHO_PORT),
            "mtls",
            expected,
        )?;
    }
    Ok(Measured {
        latency,
        throughput,
        connect,
        memory,
        http: http_runs,
    })
}

/// Runs `f` for `subject`, recording its proxies' CPU time and the wall time.
fn timed<T>(subject: &Subject, round: u32, f: impl FnOnce() -> Result<T>) -> Result<Run<T>> {
    let (cpu, started) = (cpu_total(&subject.pids)?, Instant::now());
    let result = f().with_context(|| format!("case {}, round {round}", subject.case.label()))?;
    Ok(Run {
        case: subject.case,
        round,
        result,
        cpu: cpu_total(&subject.pids)? - cpu,
        wall: started.elapsed().as_secs_f64(),
    })
}

/// A pod in an agent's config: local (under `pods`) or on another node (under `peers`).
struct Workload<'a> {
    pod: &'a Pod,
    node: &'a Node,
    service_account: &'a str,
    strict: bool,
}

/// The config of `node`'s agent with `local` enrolled; with `identity` (CA cert and key) and
/// `peer`, connections to the peer go through an mTLS tunnel.
fn weft_yaml(
    node: &Node,
    local: &Workload,
    identity: Option<(&Path, &Path)>,
    peer: Option<&Workload>,
) -> String {
    let mut yaml = format!(
        "agent:\n  cgroup_path: {}\n  admin_addr: {ADMIN_ADDR}\n  drain_timeout_ms: 3000\n  \
         node_name: {}\n",
        node.pods_cgroup.display(),
        node.name
    );
    if let Some((cert, key)) = identity {
        yaml.push_str(&format!(
            "identity:\n  trust_domain: {TRUST_DOMAIN}\n  ca_cert: {}\n  ca_key: {}\n",
            cert.display(),
            key.display()
        ));
    }
    yaml.push_str(&format!(
        "pods:\n  - name: {}\n    namespace: {NAMESPACE}\n    netns: {}\n    ip: {}\n    \
         service_account: {}\n    inbound_mode: {}\n",
        local.pod.name,
        local.pod.netns_path().display(),
        local.pod.ip,
        local.service_account,
        if local.strict { "STRICT" } else { "PERMISSIVE" }
    ));
    if let Some(peer) = peer {
        // The label is what the HTTP service selects its endpoints by.
        yaml.push_str(&format!(
            "peers:\n  - name: {}\n    namespace: {NAMESPACE}\n    ip: {}\n    \
             service_account: {}\n    node: {}\n    labels: {{app: {}}}\n",
            peer.pod.name, peer.pod.ip, peer.service_account, peer.node.name, peer.service_account
        ));
    }
    yaml
}

/// The address a pod's node owns as the pod's gateway (x.y.z.1 of the pod's /24).
pub(crate) fn pod_gateway(pod: &Pod) -> Ipv4Addr {
    let [a, b, c, _] = pod.ip.octets();
    Ipv4Addr::new(a, b, c, 1)
}

/// The files of the HAProxy pairs: their directory, the mesh CA and each side's certificate and
/// key (one PEM file each).
pub(crate) struct HaproxyFiles {
    pub(crate) dir: PathBuf,
    pub(crate) ca_cert: PathBuf,
    pub(crate) client_pem: PathBuf,
    pub(crate) server_pem: PathBuf,
}

/// Issues the HAProxy pairs' certificates from the mesh CA: the client side's with a SPIFFE ID
/// only, the server side's also with the host name the client side checks.
fn haproxy_files(lab: &Lab, ca: &TestCa, ca_cert: &Path) -> Result<HaproxyFiles> {
    let dir = lab.dir.join("haproxy");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let now = time::OffsetDateTime::now_utc();
    let (not_before, not_after) = (
        now - time::Duration::hours(1),
        now + time::Duration::days(1),
    );
    let identity = |name| spiffe_id(TRUST_DOMAIN, NAMESPACE, name);
    let (cert, key) = ca.issue(&identity("haproxy-a"), not_before, not_after)?;
    let client_pem = dir.join("client.pem");
    write_private(&client_pem, &format!("{cert}{key}"))?;
    let (cert, key) = ca.issue_with_dns(
        &identity("haproxy-b"),
        &[HAPROXY_SERVER_NAME],
        not_before,
        not_after,
    )?;
    let server_pem = dir.join("server.pem");
    write_private(&server_pem, &format!("{cert}{key}"))?;
    Ok(HaproxyFiles {
        dir,
        ca_cert: ca_cert.to_owned(),
        client_pem,
        server_pem,
    })
}

/// Starts HAProxy on `server_node` (mutual TLS in, plain TCP to `server`'s echo and iperf3 ports)
/// and on `client_node` (plain TCP in on `gateway`, the client pods' gateway address, the same
/// ports; mutual TLS out). Both are as a fair opponent would configure them: TCP mode, TLS 1.3
/// only, both sides verify the peer's chain against the mesh CA and the client checks the
/// server's name, logs off, `nbthread` as the agent's worker threads, everything else HAProxy's
/// defaults (TLS session resumption included).
fn start_haproxy_pair(
    files: &HaproxyFiles,
    (client_node, gateway): (&Node, Ipv4Addr),
    server_node: &Node,
    server: &Pod,
) -> Result<[Server; 2]> {
    let HaproxyFiles {
        dir,
        ca_cert,
        client_pem,
        server_pem,
    } = files;
    let ca_cert = ca_cert.display();
    let legs = [
        ("echo", ECHO_PORT, HAPROXY_TLS_ECHO_PORT),
        ("iperf", IPERF_PORT, HAPROXY_TLS_IPERF_PORT),
    ];
    let mut server_conf = haproxy_global("tcp");
    let mut client_conf = haproxy_global("tcp");
    for (name, port, tls_port) in legs {
        server_conf.push_str(&format!(
            "listen {name}\n    bind {}:{tls_port} ssl crt {} ca-file {ca_cert} verify required \
             ssl-min-ver TLSv1.3\n    server app {}:{port}\n",
            server_node.ip,
            server_pem.display(),
            server.ip
        ));
        client_conf.push_str(&format!(
            "listen {name}\n    bind {}:{port}\n    server haproxy-b {}:{tls_port} ssl crt {} \
             ca-file {ca_cert} verify required verifyhost {HAPROXY_SERVER_NAME} \
             ssl-min-ver TLSv1.3\n",
            gateway,
            server_node.ip,
            client_pem.display()
        ));
    }
    let back = start_haproxy(server_node, dir, "server", &server_conf, &legs.map(|l| l.2))?;
    let front = start_haproxy(client_node, dir, "client", &client_conf, &legs.map(|l| l.1))?;
    Ok([front, back])
}

/// The `global` and `defaults` sections of an HAProxy config in `mode` (`tcp` or `http`).
pub(crate) fn haproxy_global(mode: &str) -> String {
    // No `log` lines: logging is off, as it is for the agents at the default level. maxconn
    // 8000 needs ~16,000 file descriptors (two per connection; HAProxy refuses to start above
    // the hard limit, 20,000 on the development VM) and is far above the concurrency used here.
    format!(
        "global\n    nbthread {HAPROXY_THREADS}\n    maxconn 8000\n\
         defaults\n    mode {mode}\n    maxconn 8000\n    timeout connect 5s\n    \
         timeout client 60s\n    timeout server 60s\n"
    )
}

/// Runs HAProxy with config `conf` in `node`'s namespace until something listens on `ports`.
pub(crate) fn start_haproxy(
    node: &Node,
    dir: &Path,
    role: &str,
    conf: &str,
    ports: &[u16],
) -> Result<Server> {
    let conf_path = dir.join(format!("{role}.cfg"));
    fs::write(&conf_path, conf).with_context(|| format!("writing {}", conf_path.display()))?;
    let log_path = dir.join(format!("{role}.log"));
    let log =
        File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    // -db: stay in the foreground as one process, so its pid is the one to measure.
    let mut server = Server(
        node.command("haproxy")?
            .args(["-db", "-f", &conf_path.to_string_lossy()])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting haproxy (is it installed? run `cargo xtask setup`)")?,
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let log = || fs::read_to_string(&log_path).unwrap_or_default();
    for &port in ports {
        loop {
            if let Some(status) = server.0.try_wait()? {
                bail!(
                    "{role} HAProxy on node {} exited with {status}:\n{}",
                    node.name,
                    log()
                );
            }
            let ss = node
                .command("ss")?
                .args(["-Htln", &format!("sport = :{port}")])
                .output()
                .context("running ss")?;
            if !String::from_utf8_lossy(&ss.stdout).trim().is_empty() {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "{role} HAProxy on node {} does not listen on port {port}:\n{}",
                    node.name,
                    log()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(server)
}

pub(crate) fn load_command(
    tools: &Path,
    client: &Pod,
    mode: &str,
    target: SocketAddrV4,
) -> Result<Command> {
    let mut command = client.command(tools)?;
    command
        .args(["bench-load", mode, "--target", &target.to_string()])
        .args(["--warmup-seconds", &WARMUP_SECONDS.to_string()])
        .stdin(Stdio::null());
    Ok(command)
}

/// Runs a prepared load client and parses the report it prints.
pub(crate) fn load_report<T: serde::de::DeserializeOwned>(
    mut command: Command,
    client: &Pod,
) -> Result<T> {
    let out = command
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

fn latency_run(
    tools: &Path,
    client: &Pod,
    target: SocketAddrV4,
    args: &BenchArgs,
) -> Result<LoadReport> {
    let mut command = load_command(tools, client, "latency", target)?;
    command
        .args(["--size", &args.size.to_string()])
        .args(["--seconds", &args.seconds.to_string()])
        .args(["--rate", &args.rate.to_string()])
        .args(["--connections", &args.connections.to_string()]);
    load_report(command, client)
}

fn connect_run(
    tools: &Path,
    client: &Pod,
    target: SocketAddrV4,
    args: &BenchArgs,
) -> Result<ConnectReport> {
    let mut command = load_command(tools, client, "connect", target)?;
    command
        .args(["--size", &args.size.to_string()])
        .args(["--seconds", &args.connect_seconds.to_string()])
        .args(["--workers", &args.connect_workers.to_string()]);
    load_report(command, client)
}

/// Bits per second the server received from one iperf3 stream from `client` to `target`.
fn throughput_run(client: &Pod, target: SocketAddrV4, seconds: u64) -> Result<f64> {
    let out = client
        .command("iperf3")?
        .args(["-c", &target.ip().to_string()])
        .args(["-p", &target.port().to_string(), "-J"])
        .args(["-t", &seconds.to_string(), "-O", "1"])
        .args(["--connect-timeout", "5000"])
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

/// Fails unless the agent carried at least `expected` connections to `destination` over
/// `transport`, so that a case measures what it claims to.
fn check_proxied(
    stats: &Value,
    destination: SocketAddrV4,
    transport: &str,
    expected: u64,
) -> Result<()> {
    let flows = stats["flows"]
        .as_array()
        .context("agent stats have no flows")?;
    let destination = destination.to_string();
    let proxied: u64 = flows
        .iter()
        .filter(|f| f["destination"].as_str() == Some(destination.as_str()))
        .filter(|f| f["transport"].as_str() == Some(transport))
        .filter_map(|f| f["opened"].as_u64())
        .sum();
    ensure!(
        proxied >= expected,
        "weft proxied {proxied} connections to {destination} over {transport}, expected at \
         least {expected}"
    );
    Ok(())
}

/// Fails if the agent carried anything of `pod`, which is not enrolled: the direct and HAProxy
/// cases must not go through weft.
fn check_bystander(stats: &Value, pod: &Pod) -> Result<()> {
    let flows = stats["flows"]
        .as_array()
        .context("agent stats have no flows")?;
    let id = format!("{NAMESPACE}/{}", pod.name);
    if let Some(flow) = flows
        .iter()
        .find(|f| f["source_pod"].as_str() == Some(id.as_str()))
    {
        bail!(
            "{} is not enrolled but weft proxied its traffic: {flow}",
            pod.name
        );
    }
    Ok(())
}

/// CPU seconds (user + system, all threads) process `pid` has used so far.
pub(crate) fn cpu_seconds(pid: u32) -> Result<f64> {
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

fn cpu_total(pids: &[u32]) -> Result<f64> {
    pids.iter().map(|&pid| cpu_seconds(pid)).sum()
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

/// Memory summed over `pids` (each process's own peak, so the peak is an upper bound).
fn memory_total(pids: &[u32]) -> Result<Memory> {
    let mut total = Memory::default();
    for &pid in pids {
        let m = memory(pid)?;
        total.rss_kib += m.rss_kib;
        total.peak_kib += m.peak_kib;
    }
    Ok(total)
}

pub(crate) fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => values[n / 2],
        _ => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// The median over `case`'s runs of `metric`.
fn case_median<T>(runs: &[Run<T>], case: Case, metric: impl Fn(&Run<T>) -> f64) -> f64 {
    median(runs.iter().filter(|r| r.case == case).map(metric).collect())
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

pub(crate) fn verdict(pass: bool) -> &'static str {
    if pass {
        "PASS"
    } else {
        "MISS"
    }
}

/// A row of the main table: every case's value, the proxies' with their ratio to direct, and
/// weft mTLS over the HAProxy pair.
fn comparison_row(name: &str, values: [f64; 4], show: impl Fn(f64) -> String) -> String {
    let [direct, .., weft_mtls, haproxy] = values;
    let mut row = format!("| {name} | {} |", show(direct));
    for value in &values[1..] {
        row.push_str(&format!(" {} ({:.2}x) |", show(*value), value / direct));
    }
    row.push_str(&format!(" {:.2}x |\n", weft_mtls / haproxy));
    row
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
    out.push_str(&format!("- HAProxy: {}\n", haproxy_version()?));
    out.push_str(
        "- lab: 4 nodes x 2 pods, network namespaces and cgroups on one machine; every case \
         crosses node to node the same way (pod veth, node, bridge, node, pod veth); weft is the \
         release build\n",
    );
    if !args.skip_l4 {
        render_l4(args, m, &mut out);
    }
    if !args.http.skip_http {
        out.push_str(&bench_http::render(&args.http, args.rounds, &m.http));
    }
    Ok(out)
}

/// The TCP cases' part of the results.
fn render_l4(args: &BenchArgs, m: &Measured, out: &mut String) {
    out.push_str(
        "- direct: a2 -> b1; a2 is not enrolled in the agent on node a\n\
         - weft L4: a1 -> b1, redirected by eBPF to the agent on node a (no identity settings), \
         which proxies it as plain TCP\n\
         - weft mTLS: c1 -> d1, agents on nodes c and d with the mesh CA, both pods enrolled, d1 \
         STRICT; c's agent carries the connection through an mTLS tunnel to d's agent, which \
         delivers it to d1\n",
    );
    out.push_str(&format!(
        "- HAProxy mTLS pair: a2 -> HAProxy on node a (a2's gateway address) -> TLS 1.3 with \
         client certificates -> HAProxy on node b -> b1. `mode tcp`, nbthread {HAPROXY_THREADS} \
         (the agent's default worker threads on 2 cores), logs off, both sides verify the peer's \
         chain against the same CA (ECDSA P-256 keys, as weft's) and the client side checks the \
         server's host name; otherwise defaults, so TLS sessions are resumed across connections\n"
    ));
    out.push_str(&format!(
        "- latency: {size}-byte requests, each answered with {size} bytes by an echo server in the \
         server pod, at a fixed {rate} requests/s over {conns} persistent connections (one \
         exchange in flight per connection), {secs} s per run after a {WARMUP_SECONDS} s warm-up. \
         Sends follow a fixed schedule (open loop): when a connection is still busy at an \
         exchange's scheduled time, its latency counts from that time, so stalls are not hidden \
         (no coordinated omission)\n",
        size = args.size,
        rate = args.rate,
        conns = args.connections,
        secs = args.seconds
    ));
    out.push_str(&format!(
        "- throughput: one iperf3 TCP stream, {} s per run after 1 s left out for slow start, \
         as received by the server pod\n",
        args.throughput_seconds
    ));
    out.push_str(&format!(
        "- new connections: {} workers in a closed loop, each connecting, exchanging one \
         {}-byte request and response, and closing, {} s per run after a {WARMUP_SECONDS} s \
         warm-up (TIME_WAIT reuse on in the lab's namespaces, see `allow_time_wait_reuse`)\n",
        args.connect_workers, args.size, args.connect_seconds
    ));
    out.push_str(&format!(
        "- noise: every round runs each case once, in an order that reverses every round \
         (rounds: {}); each number below is the median of a case's runs; proxy CPU is utime + \
         stime from /proc summed over the case's proxies (weft mTLS: both agents; HAProxy: both \
         instances)\n\n",
        args.rounds
    ));

    let latency = |case, metric: fn(&LoadReport) -> u64| {
        case_median(&m.latency, case, |r| metric(&r.result) as f64)
    };
    let per_case = |f: &dyn Fn(Case) -> f64| Case::ALL.map(f);
    let p50 = per_case(&|c| latency(c, |r| r.p50_us));
    let p99 = per_case(&|c| latency(c, |r| r.p99_us));
    let bps = per_case(&|c| case_median(&m.throughput, c, |r| r.result));
    let conn_rate = per_case(&|c| case_median(&m.connect, c, |r| r.result.per_second));

    out.push_str(
        "| metric | direct | weft L4 (/direct) | weft mTLS (/direct) | HAProxy mTLS pair \
         (/direct) | weft mTLS / HAProxy |\n| --- | ---: | ---: | ---: | ---: | ---: |\n",
    );
    let micros = |v: f64| format!("{v:.0} µs");
    out.push_str(&comparison_row("latency p50", p50, micros));
    out.push_str(&comparison_row("latency p99", p99, micros));
    out.push_str(&comparison_row(
        "latency p99.9",
        per_case(&|c| latency(c, |r| r.p999_us)),
        micros,
    ));
    out.push_str(&comparison_row(
        "latency max",
        per_case(&|c| latency(c, |r| r.max_us)),
        micros,
    ));
    out.push_str(&comparison_row("throughput", bps, |v| {
        format!("{:.2} Gbit/s", v / 1e9)
    }));
    out.push_str(&comparison_row("new connections", conn_rate, |v| {
        format!("{v:.0}/s")
    }));
    out.push('\n');

    // Indices into the per-case arrays, in Case::ALL order.
    let (direct, l4, mtls, haproxy) = (0, 1, 2, 3);
    let targets = [
        (
            format!("weft L4 p50 <= {TARGET_L4_P50_RATIO}x direct"),
            p50[l4] / p50[direct],
            p50[l4] / p50[direct] <= TARGET_L4_P50_RATIO,
        ),
        (
            format!("weft L4 throughput >= {TARGET_L4_THROUGHPUT_RATIO}x direct"),
            bps[l4] / bps[direct],
            bps[l4] / bps[direct] >= TARGET_L4_THROUGHPUT_RATIO,
        ),
        (
            format!("weft mTLS p50 <= {TARGET_MTLS_LATENCY_RATIO}x HAProxy pair"),
            p50[mtls] / p50[haproxy],
            p50[mtls] / p50[haproxy] <= TARGET_MTLS_LATENCY_RATIO,
        ),
        (
            format!("weft mTLS p99 <= {TARGET_MTLS_LATENCY_RATIO}x HAProxy pair"),
            p99[mtls] / p99[haproxy],
            p99[mtls] / p99[haproxy] <= TARGET_MTLS_LATENCY_RATIO,
        ),
        (
            format!("weft mTLS throughput >= {TARGET_MTLS_THROUGHPUT_RATIO}x HAProxy pair"),
            bps[mtls] / bps[haproxy],
            bps[mtls] / bps[haproxy] >= TARGET_MTLS_THROUGHPUT_RATIO,
        ),
    ];
    out.push_str("| target | measured | |\n| --- | ---: | --- |\n");
    for (name, ratio, pass) in targets {
        out.push_str(&format!("| {name} | {ratio:.2}x | {} |\n", verdict(pass)));
    }
    out.push('\n');

    // The warm-up's exchanges cost the proxies too.
    let exchanges = f64::from(args.rate) * (args.seconds + WARMUP_SECONDS) as f64;
    let proxied = [Case::WeftL4, Case::WeftMtls, Case::Haproxy];
    out.push_str(
        "Proxy cost (median per run):\n\n\
         | | weft L4 (1 agent) | weft mTLS (2 agents) | HAProxy mTLS pair (2 instances) |\n\
         | --- | ---: | ---: | ---: |\n",
    );
    let cost_row = |name: &str, value: &dyn Fn(Case) -> String| {
        let mut row = format!("| {name} |");
        for case in proxied {
            row.push_str(&format!(" {} |", value(case)));
        }
        row + "\n"
    };
    out.push_str(&cost_row("CPU per latency exchange", &|c| {
        format!(
            "{:.0} µs",
            case_median(&m.latency, c, |r| r.cpu) * 1e6 / exchanges
        )
    }));
    out.push_str(&cost_row("CPU during a latency run", &|c| {
        format!(
            "{:.1}% of a core",
            case_median(&m.latency, c, |r| 100.0 * r.cpu / r.wall)
        )
    }));
    out.push_str(&cost_row("CPU during a throughput run", &|c| {
        format!(
            "{:.1}% of a core",
            case_median(&m.throughput, c, |r| 100.0 * r.cpu / r.wall)
        )
    }));
    out.push_str(&cost_row("CPU per new connection", &|c| {
        format!(
            "{:.0} µs",
            case_median(&m.connect, c, |r| r.cpu * 1e6
                / r.result.total.max(1) as f64)
        )
    }));
    let memory_of = |case: Case| {
        m.memory
            .iter()
            .find(|(c, ..)| *c == case)
            .map(|&(_, start, end)| (start, end))
            .unwrap_or_default()
    };
    out.push_str(&cost_row("RSS after start-up (peak)", &|c| {
        let (start, _) = memory_of(c);
        format!("{:.1} MiB ({:.1})", mib(start.rss_kib), mib(start.peak_kib))
    }));
    out.push_str(&cost_row("RSS at the end (peak)", &|c| {
        let (_, end) = memory_of(c);
        format!("{:.1} MiB ({:.1})", mib(end.rss_kib), mib(end.peak_kib))
    }));
    out.push('\n');

    out.push_str("Every run, in the order run:\n\n");
    out.push_str("| round | case | p50 | p99 | p99.9 | max | requests | late | proxy CPU |\n");
    out.push_str("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n");
    for r in &m.latency {
        let l = &r.result;
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
            r.cpu
        ));
    }
    out.push_str("\n| round | case | throughput | proxy CPU |\n| ---: | --- | ---: | ---: |\n");
    for r in &m.throughput {
        out.push_str(&format!(
            "| {} | {} | {:.2} Gbit/s | {:.2} s |\n",
            r.round,
            r.case.label(),
            r.result / 1e9,
            r.cpu
        ));
    }
    out.push_str(
        "\n| round | case | new connections | failed | p50 | p99 | proxy CPU |\n\
         | ---: | --- | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for r in &m.connect {
        let c = &r.result;
        out.push_str(&format!(
            "| {} | {} | {:.0}/s | {} | {} µs | {} µs | {:.2} s |\n",
            r.round,
            r.case.label(),
            c.per_second,
            c.failed,
            c.p50_us,
            c.p99_us,
            r.cpu
        ));
    }
    let errors: Vec<String> = m
        .connect
        .iter()
        .filter_map(|r| {
            let error = r.result.first_error.as_ref()?;
            Some(format!("- round {} {}: {error}\n", r.round, r.case.label()))
        })
        .collect();
    if !errors.is_empty() {
        out.push_str("\nFirst error of each new-connection run that had failures:\n\n");
        out.push_str(&errors.concat());
    }
}

pub(crate) fn date() -> Result<String> {
    let out = Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .context("running date")?;
    ensure!(out.status.success(), "date failed with {}", out.status);
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

pub(crate) fn machine() -> Result<String> {
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

/// HAProxy's version line and the OpenSSL it runs with.
fn haproxy_version() -> Result<String> {
    let out = Command::new("haproxy")
        .arg("-vv")
        .output()
        .context("running haproxy -vv")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let version = text.lines().next().map_or("unknown version", |l| {
        l.trim_end_matches(" - https://haproxy.org/")
    });
    let openssl = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Running on OpenSSL version : "))
        .unwrap_or("unknown OpenSSL");
    Ok(format!("{version}, {openssl}"))
}

/// A single-threaded runtime: one core is plenty for the echo server and the load client at the
/// rates used, and it leaves the other core to the system under test.
pub(crate) fn runtime() -> Result<tokio::runtime::Runtime> {
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

/// `bench-load`: prints one report as a JSON line.
pub fn load(args: &LoadArgs) -> Result<()> {
    let report = match &args.mode {
        LoadMode::Latency(latency) => {
            serde_json::to_string(&runtime()?.block_on(drive_load(latency))?)?
        }
        LoadMode::Connect(connect) => {
            serde_json::to_string(&runtime()?.block_on(drive_connects(connect))?)?
        }
        LoadMode::Http(http) => {
            serde_json::to_string(&runtime()?.block_on(bench_http::drive_http(http))?)?
        }
    };
    println!("{report}");
    Ok(())
}

/// The fixed send schedule shared by all connections of a load run.
#[derive(Clone, Copy)]
pub(crate) struct Schedule {
    pub(crate) start: tokio::time::Instant,
    pub(crate) record_from: tokio::time::Instant,
    pub(crate) end: tokio::time::Instant,
    pub(crate) rate: u32,
    pub(crate) connections: u32,
    pub(crate) size: usize,
}

impl Schedule {
    /// A schedule starting now: `target`'s warm-up, then its recorded seconds, at `rate` over
    /// `connections` connections.
    pub(crate) fn starting_now(target: &TargetArgs, rate: u32, connections: u32) -> Self {
        let start = tokio::time::Instant::now();
        let record_from = start + Duration::from_secs(target.warmup_seconds);
        Self {
            start,
            record_from,
            end: record_from + Duration::from_secs(target.seconds),
            rate,
            connections,
            size: target.size as usize,
        }
    }

    /// When exchange `n` of connection `connection` is due: the connections take turns, so the
    /// whole run sends at an even `rate`.
    pub(crate) fn due(&self, connection: u32, n: u64) -> tokio::time::Instant {
        let slot = u64::from(connection) + n * u64::from(self.connections);
        self.start + Duration::from_secs_f64(slot as f64 / f64::from(self.rate))
    }
}

pub(crate) fn new_histogram() -> Result<Histogram<u64>> {
    // 1 µs to 60 s at 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000, 3).context("creating a histogram")
}

pub(crate) fn record(histogram: &mut Histogram<u64>, since: tokio::time::Instant) {
    let micros = u64::try_from(since.elapsed().as_micros()).unwrap_or(u64::MAX);
    histogram.saturating_record(micros.max(1));
}

async fn drive_load(args: &LatencyArgs) -> Result<LoadReport> {
    let target = args.target.target;
    // Connecting first keeps connection set-up out of the measured exchanges.
    let mut streams = Vec::new();
    for _ in 0..args.connections {
        let stream = tokio::time::timeout(EXCHANGE_TIMEOUT, TcpStream::connect(target))
            .await
            .with_context(|| format!("connecting to {target} timed out"))?
            .with_context(|| format!("connecting to {target}"))?;
        stream.set_nodelay(true)?;
        streams.push(stream);
    }
    let schedule = Schedule::starting_now(&args.target, args.rate, args.connections);
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
            record(&mut histogram, begin);
        }
    }
    Ok((histogram, late))
}

/// What one new-connection worker saw.
struct ConnectTally {
    histogram: Histogram<u64>,
    failed: u64,
    total: u64,
    first_error: Option<String>,
}

async fn drive_connects(args: &ConnectArgs) -> Result<ConnectReport> {
    let start = tokio::time::Instant::now();
    let record_from = start + Duration::from_secs(args.target.warmup_seconds);
    let end = record_from + Duration::from_secs(args.target.seconds);
    let tasks: Vec<_> = (0..args.workers)
        .map(|_| {
            tokio::spawn(connect_worker(
                args.target.target,
                args.target.size as usize,
                record_from,
                end,
            ))
        })
        .collect();
    let mut histogram = new_histogram()?;
    let (mut failed, mut total, mut first_error) = (0, 0, None);
    for task in tasks {
        let tally = task.await.context("a connection worker panicked")??;
        histogram
            .add(&tally.histogram)
            .context("merging histograms")?;
        failed += tally.failed;
        total += tally.total;
        first_error = first_error.or(tally.first_error);
    }
    if histogram.is_empty() {
        bail!(
            "no connection to {} succeeded: {}",
            args.target.target,
            first_error.as_deref().unwrap_or("no connection was made")
        );
    }
    Ok(ConnectReport {
        completed: histogram.len(),
        failed,
        total,
        per_second: histogram.len() as f64 / args.target.seconds as f64,
        p50_us: histogram.value_at_quantile(0.5),
        p99_us: histogram.value_at_quantile(0.99),
        first_error,
    })
}

/// Connects, exchanges one request and response, closes; again until `end`. Counts the
/// connections begun from `record_from` on.
async fn connect_worker(
    target: SocketAddr,
    size: usize,
    record_from: tokio::time::Instant,
    end: tokio::time::Instant,
) -> Result<ConnectTally> {
    let mut tally = ConnectTally {
        histogram: new_histogram()?,
        failed: 0,
        total: 0,
        first_error: None,
    };
    let request = vec![b'q'; size];
    let mut response = vec![0; size];
    loop {
        let begin = tokio::time::Instant::now();
        if begin >= end {
            return Ok(tally);
        }
        let outcome = tokio::time::timeout(EXCHANGE_TIMEOUT, async {
            let mut stream = TcpStream::connect(target).await?;
            stream.set_nodelay(true)?;
            stream.write_all(&request).await?;
            stream.read_exact(&mut response).await?;
            // Dropping the stream closes it (FIN), as a short-lived client would.
            Ok::<_, std::io::Error>(())
        })
        .await;
        tally.total += 1;
        let error = match outcome {
            Ok(Ok(())) => None,
            Ok(Err(err)) => Some(err.to_string()),
            Err(_) => Some(format!("no response within {EXCHANGE_TIMEOUT:?}")),
        };
        match error {
            None if begin >= record_from => record(&mut tally.histogram, begin),
            None => {}
            Some(error) => {
                if begin >= record_from {
                    tally.failed += 1;
                }
                tally.first_error.get_or_insert(error);
                // A refused connect fails at once: don't spin on it.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        load: LoadArgs,
    }

    /// An echo server on an ephemeral loopback port, served by the current runtime.
    async fn local_echo(size: usize) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                tokio::spawn(serve_echo(stream, size));
            }
        });
        addr
    }

    fn parse(args: &str) -> LoadMode {
        Cli::try_parse_from(format!("load {args}").split_whitespace())
            .unwrap()
            .load
            .mode
    }

    #[test]
    fn both_load_modes_measure_an_echo_server() {
        runtime().unwrap().block_on(async {
            let target = local_echo(64).await;
            let LoadMode::Latency(latency) = parse(&format!(
                "latency --target {target} --size 64 --seconds 1 --rate 200 --connections 4"
            )) else {
                panic!("not the latency mode")
            };
            let report = drive_load(&latency).await.unwrap();
            assert!(report.requests >= 150, "{report:?}");
            assert!(report.p50_us > 0 && report.p50_us <= report.max_us);

            let LoadMode::Connect(connect) = parse(&format!(
                "connect --target {target} --size 64 --seconds 1 --workers 2"
            )) else {
                panic!("not the connect mode")
            };
            let report = drive_connects(&connect).await.unwrap();
            assert!(report.completed > 0 && report.failed == 0, "{report:?}");
            assert!(report.total >= report.completed);
            assert_eq!(report.per_second, report.completed as f64);
        });
        assert!(Cli::try_parse_from(["load", "connect", "--target", "127.0.0.1:1"]).is_err());
    }
}

//! The HTTP part of `cargo xtask bench`: GETs of a 1 KiB file from nginx at fixed request rates,
//! over persistent connections (keep-alive) and over a new connection per request, in three
//! cases on the benchmark's lab:
//!
//! - direct: a2 -> nginx in b1, nothing in the way;
//! - weft HTTP: c1 -> a service VIP whose one endpoint is d1 (STRICT). c's agent serves the
//!   connection as HTTP, picks an endpoint for every request and sends it over a pooled HTTP/1.1
//!   stream of its mTLS tunnel to d's agent, which hands the stream's requests to nginx in d1;
//! - HAProxy HTTP pair: a2 -> HAProxy on node a (`mode http`) -> mutual TLS 1.3 -> HAProxy on
//!   node b -> nginx in b1.
//!
//! For each it measures latency percentiles, the requests answered, failed and not sent, and the
//! CPU time every proxy process spends per 1,000 requests. The load client is `bench-load http`.
use std::{
    fs,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::Path,
    process::Stdio,
    sync::Arc,
    time::Duration,
};

use anyhow::{anyhow, ensure, Context, Result};
use clap::Args;
use http_body_util::{BodyExt, Empty};
use hyper::{
    body::Bytes,
    client::conn::http1::{self, SendRequest},
    header::{CONNECTION, HOST},
    Request, StatusCode,
};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;

use crate::{
    agent::Agent,
    bench::{
        cpu_seconds, haproxy_global, load_command, load_report, median, new_histogram, pod_gateway,
        record, start_haproxy, verdict, HaproxyFiles, Schedule, Server, TargetArgs,
        EXCHANGE_TIMEOUT, HAPROXY_SERVER_NAME, HAPROXY_THREADS, NAMESPACE, WARMUP_SECONDS,
    },
    lab::{wait_for_tcp, Lab, Node, Pod},
};

/// Where nginx listens in the server pods and the client-side HAProxy on the gateway address.
const HTTP_PORT: u16 = 80;
/// The file every request gets.
const BODY_FILE: &str = "1k.bin";
const BODY_BYTES: u32 = 1024;
/// The HTTP service: its name and virtual address (no interface has it; c's agent answers for
/// it).
const SERVICE_NAME: &str = "bench-http";
const SERVICE_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 80);
/// Where the server-side HAProxy of the HTTP pair accepts TLS.
const HAPROXY_TLS_HTTP_PORT: u16 = 18080;
/// Stage target: CPU seconds each agent may spend per 1,000 requests.
const TARGET_CPU_PER_1K: f64 = 0.03;

#[derive(Args, Clone, Debug)]
pub struct HttpBenchArgs {
    /// Seconds of each HTTP run (after a 1 s warm-up).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    pub http_seconds: u64,
    /// Request rates of the HTTP runs (comma-separated); each is run with keep-alive and with a
    /// new connection per request.
    #[arg(
        long,
        value_delimiter = ',',
        default_values_t = [1000, 10000],
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub http_rates: Vec<u32>,
    /// Lanes of the HTTP runs, taking turns on the schedule: with keep-alive, one persistent
    /// connection each; with a new connection per request, at most one request each in flight.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    pub http_connections: u32,
    /// Skip the HTTP runs.
    #[arg(long)]
    pub skip_http: bool,
}

impl HttpBenchArgs {
    /// These flags as they are on the command line, each with a leading space.
    pub(crate) fn command_line(&self) -> String {
        if self.skip_http {
            return " --skip-http".to_owned();
        }
        let rates: Vec<String> = self.http_rates.iter().map(u32::to_string).collect();
        format!(
            " --http-seconds {} --http-rates {} --http-connections {}",
            self.http_seconds,
            rates.join(","),
            self.http_connections
        )
    }

    /// Every load of a round: each rate with keep-alive, then with new connections.
    fn loads(&self) -> Vec<Load> {
        self.http_rates
            .iter()
            .flat_map(|&rate| {
                [false, true].map(|new_connections| Load {
                    rate,
                    new_connections,
                })
            })
            .collect()
    }
}

/// `bench-load http`: GETs `path` from `target` at a fixed rate; the response must be 200 with a
/// body of `size` bytes.
#[derive(Args, Clone, Debug)]
pub struct HttpLoadArgs {
    #[command(flatten)]
    target: TargetArgs,
    #[arg(long)]
    path: String,
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    rate: u32,
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    connections: u32,
    /// A new connection for every request (`Connection: close`) instead of keep-alive.
    #[arg(long)]
    new_connections: bool,
}

/// What one HTTP run measured; the load client's output. Counts without `_total` are of the
/// requests scheduled in the measured window.
#[derive(Serialize, Deserialize, Clone, Debug, Default)]
pub(crate) struct HttpReport {
    scheduled: u64,
    /// Answered with 200 and the whole body.
    answered: u64,
    /// No connection, a broken one, another status, a short body, or no answer in time.
    errors: u64,
    /// Never sent: their lane was still busy when the window closed.
    unsent: u64,
    /// Sent after their scheduled time because their lane was still busy.
    late: u64,
    /// Requests sent, warm-up included: what the proxies' CPU time was spent on.
    sent_total: u64,
    errors_total: u64,
    /// Answered per second of the measured window.
    per_second: f64,
    p50_us: u64,
    p99_us: u64,
    p999_us: u64,
    max_us: u64,
    first_error: Option<String>,
}

/// A rate and a connection mode: what one HTTP run sends.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Load {
    rate: u32,
    new_connections: bool,
}

impl Load {
    fn label(self, lanes: u32) -> String {
        if self.new_connections {
            format!(
                "{} requests/s, a new connection per request ({lanes} lanes)",
                self.rate
            )
        } else {
            format!("{} requests/s, keep-alive ({lanes} connections)", self.rate)
        }
    }

    fn short(self) -> String {
        let mode = if self.new_connections {
            "new conn"
        } else {
            "keep-alive"
        };
        format!("{}/s {mode}", self.rate)
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum HttpCase {
    Direct,
    Weft,
    Haproxy,
}

impl HttpCase {
    const ALL: [HttpCase; 3] = [HttpCase::Direct, HttpCase::Weft, HttpCase::Haproxy];

    fn label(self) -> &'static str {
        match self {
            HttpCase::Direct => "direct",
            HttpCase::Weft => "weft HTTP",
            HttpCase::Haproxy => "HAProxy HTTP pair",
        }
    }

    /// The case's proxy processes, in the order of their pids in [`HttpSubject`].
    fn proxies(self) -> &'static [&'static str] {
        match self {
            HttpCase::Direct => &[],
            HttpCase::Weft => &["agent c", "agent d"],
            HttpCase::Haproxy => &["HAProxy a", "HAProxy b"],
        }
    }
}

/// One HTTP run of one case: the load client's report and each proxy's CPU seconds.
pub(crate) struct HttpRun {
    case: HttpCase,
    load: Load,
    round: u32,
    report: HttpReport,
    cpu: Vec<f64>,
}

impl HttpRun {
    /// CPU seconds per 1,000 requests sent, per proxy.
    fn cpu_per_1k(&self) -> Vec<f64> {
        let sent = self.report.sent_total.max(1) as f64;
        self.cpu.iter().map(|cpu| cpu * 1000.0 / sent).collect()
    }
}

struct HttpSubject<'a> {
    case: HttpCase,
    client: &'a Pod,
    target: SocketAddrV4,
    pids: Vec<u32>,
}

/// The HTTP cases set up in the lab: nginx in b1 and d1, the HAProxy HTTP pair, and the agents
/// of nodes c and d (whose client side carries the HTTP service).
pub(crate) struct HttpLab<'a> {
    subjects: Vec<HttpSubject<'a>>,
    agents: [&'a Agent; 2],
    _servers: Vec<Server>,
}

/// The `services:` section of the client agent's config: the VIP in front of the pods labelled
/// `app: <app>` (the bench labels every peer with its service account).
pub(crate) fn service_yaml(app: &str) -> String {
    format!(
        "services:\n  - name: {SERVICE_NAME}\n    namespace: {NAMESPACE}\n    \
         vips: [{SERVICE_VIP}]\n    ports: [{{port: {HTTP_PORT}, protocol: http}}]\n    \
         selector: {{app: {app}}}\n"
    )
}

impl<'a> HttpLab<'a> {
    /// `agents`: the client's (node c, with [`service_yaml`]) and the server's (node d).
    pub(crate) fn start(
        lab: &'a Lab,
        files: &HaproxyFiles,
        agents: [&'a Agent; 2],
    ) -> Result<Self> {
        let (a2, b1, c1, d1) = (
            lab.pod("a2")?,
            lab.pod("b1")?,
            lab.pod("c1")?,
            lab.pod("d1")?,
        );
        let (node_a, node_b) = (lab.node("a")?, lab.node("b")?);
        let mut servers = vec![start_nginx(b1)?, start_nginx(d1)?];
        let gateway = pod_gateway(a2);
        let (back, front) = start_haproxy_http_pair(files, (node_a, gateway), node_b, b1)?;
        let haproxy_pids = vec![front.0.id(), back.0.id()];
        servers.extend([front, back]);
        let agent_pids = agents
            .iter()
            .map(|agent| agent.pid().context("an agent has no process"))
            .collect::<Result<Vec<_>>>()?;
        println!(
            "bench HTTP: direct = a2 -> nginx in b1; weft HTTP = c1 -> {SERVICE_VIP}:{HTTP_PORT} \
             (agent on c) -> mTLS -> agent on d -> nginx in d1; HAProxy HTTP = a2 -> \
             {gateway}:{HTTP_PORT} (HAProxy on a) -> TLS -> HAProxy on b -> nginx in b1"
        );
        Ok(Self {
            subjects: vec![
                HttpSubject {
                    case: HttpCase::Direct,
                    client: a2,
                    target: SocketAddrV4::new(b1.ip, HTTP_PORT),
                    pids: Vec::new(),
                },
                HttpSubject {
                    case: HttpCase::Weft,
                    client: c1,
                    target: SocketAddrV4::new(SERVICE_VIP, HTTP_PORT),
                    pids: agent_pids,
                },
                HttpSubject {
                    case: HttpCase::Haproxy,
                    client: a2,
                    target: SocketAddrV4::new(gateway, HTTP_PORT),
                    pids: haproxy_pids,
                },
            ],
            agents,
            _servers: servers,
        })
    }

    /// Runs every load once for every case, the cases in an order that reverses every round.
    pub(crate) fn run_round(
        &self,
        tools: &Path,
        args: &HttpBenchArgs,
        round: u32,
        runs: &mut Vec<HttpRun>,
    ) -> Result<()> {
        let order: Vec<&HttpSubject> = if round % 2 == 1 {
            self.subjects.iter().collect()
        } else {
            self.subjects.iter().rev().collect()
        };
        for load in args.loads() {
            for s in &order {
                let before = s
                    .pids
                    .iter()
                    .map(|&pid| cpu_seconds(pid))
                    .collect::<Result<Vec<_>>>()?;
                let report = http_run(tools, s, load, args).with_context(|| {
                    format!(
                        "HTTP case {}, {}, round {round}",
                        s.case.label(),
                        load.short()
                    )
                })?;
                let cpu = s
                    .pids
                    .iter()
                    .zip(before)
                    .map(|(&pid, before)| Ok(cpu_seconds(pid)? - before))
                    .collect::<Result<Vec<_>>>()?;
                let run = HttpRun {
                    case: s.case,
                    load,
                    round,
                    report,
                    cpu,
                };
                let r = &run.report;
                println!(
                    "round {round} http {:<16} {:<17} p50 {} us  p99 {} us  p99.9 {} us  max {} \
                     us  {:.0}/s  ({} errors, {} late, {} not sent)  CPU per 1k requests {}",
                    load.short(),
                    s.case.label(),
                    r.p50_us,
                    r.p99_us,
                    r.p999_us,
                    r.max_us,
                    r.per_second,
                    r.errors,
                    r.late,
                    r.unsent,
                    proxy_cpu(s.case, &run.cpu_per_1k())
                );
                runs.push(run);
            }
        }
        Ok(())
    }

    /// Fails unless the agents carried at least the requests weft HTTP had answered: the case
    /// must go through the service and the tunnel, not around them.
    pub(crate) fn check(&self, runs: &[HttpRun]) -> Result<()> {
        let answered: u64 = runs
            .iter()
            .filter(|r| r.case == HttpCase::Weft)
            .map(|r| r.report.sent_total - r.report.errors_total)
            .sum();
        let [client, server] = self.agents;
        let service = format!("{NAMESPACE}/{SERVICE_NAME}:{HTTP_PORT}");
        let requests = client.stats()?["services"][&service]["requests"]
            .as_u64()
            .unwrap_or(0);
        ensure!(
            requests >= answered,
            "the client's agent counted {requests} requests to {service}, the load client had \
             {answered} answered"
        );
        let d1 = format!("{NAMESPACE}/d1");
        let delivered = server.stats()?["inbound"][&d1]["http_requests"]
            .as_u64()
            .unwrap_or(0);
        ensure!(
            delivered >= answered,
            "the server's agent delivered {delivered} HTTP requests to d1, the load client had \
             {answered} answered"
        );
        Ok(())
    }
}

/// nginx in `pod` on HTTP_PORT serving BODY_FILE: one worker (as the echo server has one
/// thread), no access log (the proxies log nothing per request either) and the file kept open,
/// so that the server is no bottleneck and costs every case the same.
fn start_nginx(pod: &Pod) -> Result<Server> {
    let dir = pod.dir.join("bench-nginx");
    let www = dir.join("www");
    fs::create_dir_all(&www).with_context(|| format!("creating {}", www.display()))?;
    fs::write(www.join(BODY_FILE), vec![b'x'; BODY_BYTES as usize])
        .with_context(|| format!("writing {BODY_FILE} in {}", www.display()))?;
    let d = dir.display();
    let conf = format!(
        "worker_processes 1;\ndaemon off;\nuser root;\npid {d}/nginx.pid;\n\
         error_log {d}/error.log;\nevents {{ worker_connections 8192; }}\n\
         http {{\n  access_log off;\n  keepalive_requests 1000000;\n  open_file_cache max=16;\n  \
         client_body_temp_path {d}/tmp-body; proxy_temp_path {d}/tmp-proxy;\n  \
         fastcgi_temp_path {d}/tmp-fcgi; uwsgi_temp_path {d}/tmp-uwsgi;\n  \
         scgi_temp_path {d}/tmp-scgi;\n  \
         server {{ listen {HTTP_PORT} backlog=8192; root {www}; }}\n}}\n",
        www = www.display()
    );
    let conf_path = dir.join("nginx.conf");
    fs::write(&conf_path, conf).with_context(|| format!("writing {}", conf_path.display()))?;
    let server = Server(
        pod.command("nginx")?
            .args(["-c", &conf_path.to_string_lossy()])
            .args(["-e", &dir.join("error.log").to_string_lossy()])
            .stdin(Stdio::null())
            .spawn()
            .context("starting nginx (is it installed? run `cargo xtask setup`)")?,
    );
    wait_for_tcp(pod, HTTP_PORT, Duration::from_secs(10))?;
    Ok(server)
}

/// The HAProxy pair in HTTP mode, otherwise configured as the TCP pair (same certificates and
/// checks, TLS 1.3, nbthread, logs off). `http-reuse always` lets each hop's connections serve
/// the requests of any client connection, as weft's pool does; with the default (`safe`) the
/// first request of every client connection would open a new TLS connection to the other side.
/// Returns the server side and the client side.
fn start_haproxy_http_pair(
    files: &HaproxyFiles,
    (client_node, gateway): (&Node, Ipv4Addr),
    server_node: &Node,
    server: &Pod,
) -> Result<(Server, Server)> {
    let http = "    option http-keep-alive\n    http-reuse always\n";
    let ca_cert = files.ca_cert.display();
    let server_conf = format!(
        "{}listen http\n{http}    bind {}:{HAPROXY_TLS_HTTP_PORT} ssl crt {} ca-file {ca_cert} \
         verify required ssl-min-ver TLSv1.3\n    server app {}:{HTTP_PORT}\n",
        haproxy_global("http"),
        server_node.ip,
        files.server_pem.display(),
        server.ip
    );
    let client_conf = format!(
        "{}listen http\n{http}    bind {gateway}:{HTTP_PORT}\n    server haproxy-b \
         {}:{HAPROXY_TLS_HTTP_PORT} ssl crt {} ca-file {ca_cert} verify required verifyhost \
         {HAPROXY_SERVER_NAME} ssl-min-ver TLSv1.3\n",
        haproxy_global("http"),
        server_node.ip,
        files.client_pem.display()
    );
    let back = start_haproxy(
        server_node,
        &files.dir,
        "http-server",
        &server_conf,
        &[HAPROXY_TLS_HTTP_PORT],
    )?;
    let front = start_haproxy(
        client_node,
        &files.dir,
        "http-client",
        &client_conf,
        &[HTTP_PORT],
    )?;
    Ok((back, front))
}

fn http_run(tools: &Path, s: &HttpSubject, load: Load, args: &HttpBenchArgs) -> Result<HttpReport> {
    let mut command = load_command(tools, s.client, "http", s.target)?;
    command
        .args(["--path", &format!("/{BODY_FILE}")])
        .args(["--size", &BODY_BYTES.to_string()])
        .args(["--seconds", &args.http_seconds.to_string()])
        .args(["--rate", &load.rate.to_string()])
        .args(["--connections", &args.http_connections.to_string()]);
    if load.new_connections {
        command.arg("--new-connections");
    }
    load_report(command, s.client)
}

/// What the load client sends: the same GET every time.
struct RequestSpec {
    target: SocketAddr,
    host: String,
    path: String,
    close: bool,
    size: usize,
}

type Sender = SendRequest<Empty<Bytes>>;

/// What one lane saw.
struct LaneTally {
    histogram: hdrhistogram::Histogram<u64>,
    scheduled: u64,
    errors: u64,
    unsent: u64,
    late: u64,
    sent_total: u64,
    errors_total: u64,
    first_error: Option<String>,
}

pub(crate) async fn drive_http(args: &HttpLoadArgs) -> Result<HttpReport> {
    let target = args.target.target;
    let spec = Arc::new(RequestSpec {
        target,
        host: target.to_string(),
        path: args.path.clone(),
        close: args.new_connections,
        size: args.target.size as usize,
    });
    let mut senders = Vec::new();
    for _ in 0..args.connections {
        // With keep-alive, connecting first keeps connection set-up out of the measured requests.
        senders.push(if args.new_connections {
            None
        } else {
            Some(
                tokio::time::timeout(EXCHANGE_TIMEOUT, open(target))
                    .await
                    .with_context(|| format!("connecting to {target} timed out"))??,
            )
        });
    }
    let schedule = Schedule::starting_now(&args.target, args.rate, args.connections);
    let tasks: Vec<_> = senders
        .into_iter()
        .zip(0..)
        .map(|(sender, lane)| tokio::spawn(http_lane(sender, lane, schedule, Arc::clone(&spec))))
        .collect();
    let mut histogram = new_histogram()?;
    let mut report = HttpReport::default();
    for task in tasks {
        let tally = task.await.context("an HTTP lane panicked")??;
        histogram
            .add(&tally.histogram)
            .context("merging histograms")?;
        report.scheduled += tally.scheduled;
        report.errors += tally.errors;
        report.unsent += tally.unsent;
        report.late += tally.late;
        report.sent_total += tally.sent_total;
        report.errors_total += tally.errors_total;
        report.first_error = report.first_error.or(tally.first_error);
    }
    report.answered = histogram.len();
    report.per_second = histogram.len() as f64 / args.target.seconds as f64;
    report.p50_us = histogram.value_at_quantile(0.5);
    report.p99_us = histogram.value_at_quantile(0.99);
    report.p999_us = histogram.value_at_quantile(0.999);
    report.max_us = histogram.max();
    Ok(report)
}

/// Runs one lane's share of the schedule. A request due while the lane is still busy counts from
/// its due time (no coordinated omission); once the window has closed, a lane that fell behind
/// sends nothing more, so an overloaded case cannot stretch the run, and what it still owed is
/// reported as not sent.
async fn http_lane(
    mut sender: Option<Sender>,
    lane: u32,
    schedule: Schedule,
    spec: Arc<RequestSpec>,
) -> Result<LaneTally> {
    let mut tally = LaneTally {
        histogram: new_histogram()?,
        scheduled: 0,
        errors: 0,
        unsent: 0,
        late: 0,
        sent_total: 0,
        errors_total: 0,
        first_error: None,
    };
    for n in 0.. {
        let due = schedule.due(lane, n);
        if due >= schedule.end {
            break;
        }
        let measured = due >= schedule.record_from;
        tally.scheduled += u64::from(measured);
        let now = tokio::time::Instant::now();
        if now >= schedule.end {
            tally.unsent += u64::from(measured);
            continue;
        }
        let begin = if now > due {
            tally.late += u64::from(measured);
            due
        } else {
            // The timer wakes up to a millisecond late; that delay is the client's, so the
            // latency counts from the actual send.
            tokio::time::sleep_until(due).await;
            tokio::time::Instant::now()
        };
        tally.sent_total += 1;
        let outcome = tokio::time::timeout(EXCHANGE_TIMEOUT, get(&mut sender, &spec))
            .await
            .unwrap_or_else(|_| Err(anyhow!("no response within {EXCHANGE_TIMEOUT:?}")));
        match outcome {
            Ok(()) if measured => record(&mut tally.histogram, begin),
            Ok(()) => {}
            Err(err) => {
                tally.errors_total += 1;
                tally.errors += u64::from(measured);
                tally.first_error.get_or_insert(format!("{err:#}"));
            }
        }
    }
    Ok(tally)
}

/// One GET on the lane's connection (a new one if it has none); keeps the connection for the
/// next request only with keep-alive and only if this one succeeded.
async fn get(sender: &mut Option<Sender>, spec: &RequestSpec) -> Result<()> {
    let mut connection = match sender.take() {
        Some(connection) => connection,
        None => open(spec.target).await?,
    };
    connection
        .ready()
        .await
        .context("the connection was closed")?;
    let mut request = Request::get(spec.path.as_str()).header(HOST, spec.host.as_str());
    if spec.close {
        request = request.header(CONNECTION, "close");
    }
    let request = request.body(Empty::new()).context("building the request")?;
    let response = connection
        .send_request(request)
        .await
        .context("sending the request")?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .context("reading the response body")?
        .to_bytes();
    ensure!(status == StatusCode::OK, "status {status}");
    ensure!(
        body.len() == spec.size,
        "a body of {} bytes, expected {}",
        body.len(),
        spec.size
    );
    if !spec.close {
        *sender = Some(connection);
    }
    Ok(())
}

async fn open(target: SocketAddr) -> Result<Sender> {
    let stream = TcpStream::connect(target)
        .await
        .with_context(|| format!("connecting to {target}"))?;
    stream.set_nodelay(true)?;
    let (sender, connection) = http1::handshake(TokioIo::new(stream))
        .await
        .context("starting HTTP/1.1")?;
    // The connection's I/O runs beside the requests and ends with the sender or the peer; its
    // errors reach the requests.
    tokio::spawn(connection);
    Ok(sender)
}

/// "agent c 0.021 s, agent d 0.018 s" (or "-" for no proxy).
fn proxy_cpu(case: HttpCase, values: &[f64]) -> String {
    if values.is_empty() {
        return "-".to_owned();
    }
    let parts: Vec<String> = case
        .proxies()
        .iter()
        .zip(values)
        .map(|(name, v)| format!("{name} {v:.3} s"))
        .collect();
    parts.join(", ")
}

/// The median over the runs of `case` under `load` of `metric`.
fn median_of(
    runs: &[HttpRun],
    case: HttpCase,
    load: Load,
    metric: impl Fn(&HttpRun) -> f64,
) -> f64 {
    median(
        runs.iter()
            .filter(|r| r.case == case && r.load == load)
            .map(metric)
            .collect(),
    )
}

fn sum_of(
    runs: &[HttpRun],
    case: HttpCase,
    load: Load,
    metric: impl Fn(&HttpReport) -> u64,
) -> u64 {
    runs.iter()
        .filter(|r| r.case == case && r.load == load)
        .map(|r| metric(&r.report))
        .sum()
}

/// The HTTP results as Markdown.
pub(crate) fn render(args: &HttpBenchArgs, rounds: u32, runs: &[HttpRun]) -> String {
    let lanes = args.http_connections;
    let mut out = String::from("\n## HTTP\n\n");
    out.push_str(&format!(
        "- server: nginx in the server pod (1 worker, access log off, the file kept open), every \
         request `GET /{BODY_FILE}` answered 200 with a {BODY_BYTES}-byte body. Requests carry \
         no body: a 1 KB request body would add the same bytes to every case and nothing a proxy \
         does per request\n\
         - direct: a2 -> nginx in b1\n\
         - weft HTTP: c1 -> service `{SERVICE_NAME}` at {SERVICE_VIP}:{HTTP_PORT} (`protocol: \
         http`, its selector matches d1 only) -> c's agent, which parses every request, picks \
         the endpoint and sends the request over a pooled HTTP/1.1 stream of its mTLS tunnel -> \
         d's agent, which hands the stream's requests to nginx in d1 (STRICT) over a connection \
         of the stream's own\n\
         - HAProxy HTTP pair: a2 -> HAProxy on node a -> TLS 1.3 with client certificates -> \
         HAProxy on node b -> b1; as the mTLS pair (same certificates and checks, nbthread \
         {HAPROXY_THREADS}, logs off) but `mode http`, `option http-keep-alive` and `http-reuse \
         always`, so both hops keep their connections across client connections as weft's \
         pool does\n\
         - load: one client thread, {lanes} lanes taking turns on a fixed schedule (open loop: \
         a request whose lane is still busy at its scheduled time counts from that time, so \
         stalls are not hidden); keep-alive: each lane one persistent connection; new \
         connection: every request connects, sends `Connection: close`, reads the response and \
         closes. Latency runs to the last body byte, connecting included; {secs} s per run \
         after a {WARMUP_SECONDS} s warm-up. answered/s: 200s with the whole body per second of \
         the window; errors: failed requests; late: sent after their scheduled time; not sent: \
         still owed by a lane when the window closed\n\
         - CPU per 1,000 requests: utime + stime from /proc of each proxy process over the run, \
         per 1,000 requests sent (warm-up included); weft: each agent and their sum; HAProxy: \
         each instance and their sum\n\
         - agents c and d carry both weft mTLS and weft HTTP: the RSS at the end reported for \
         weft mTLS includes the HTTP runs\n\
         - noise: every round runs each load once per case, the cases in an order that reverses \
         every round (rounds: {rounds}); latencies, answered/s and CPU are medians of a case's \
         runs; errors, late and not sent are summed over its runs\n",
        secs = args.http_seconds,
    ));

    let loads = args.loads();
    let (weft, haproxy) = (HttpCase::Weft, HttpCase::Haproxy);
    let cpu_median = |case: HttpCase, load: Load, proxy: usize| {
        median_of(runs, case, load, |r| {
            r.cpu_per_1k().get(proxy).copied().unwrap_or(f64::NAN)
        })
    };
    let cpu_sum =
        |case: HttpCase, load: Load| median_of(runs, case, load, |r| r.cpu_per_1k().iter().sum());
    for &load in &loads {
        out.push_str(&format!("\n### {}\n\n", load.label(lanes)));
        out.push_str(
            "| metric | direct | weft HTTP (/direct) | HAProxy HTTP pair (/direct) | weft / \
             HAProxy |\n| --- | ---: | ---: | ---: | ---: |\n",
        );
        let ratio_row = |name: &str,
                         metric: fn(&HttpReport) -> f64,
                         show: &dyn Fn(f64) -> String| {
            let [d, w, h] = HttpCase::ALL.map(|c| median_of(runs, c, load, |r| metric(&r.report)));
            format!(
                "| {name} | {} | {} ({:.2}x) | {} ({:.2}x) | {:.2}x |\n",
                show(d),
                show(w),
                w / d,
                show(h),
                h / d,
                w / h
            )
        };
        let micros = |v: f64| format!("{v:.0} µs");
        out.push_str(&ratio_row("latency p50", |r| r.p50_us as f64, &micros));
        out.push_str(&ratio_row("latency p99", |r| r.p99_us as f64, &micros));
        out.push_str(&ratio_row("latency p99.9", |r| r.p999_us as f64, &micros));
        out.push_str(&ratio_row("latency max", |r| r.max_us as f64, &micros));
        out.push_str(&ratio_row(
            &format!("answered/s (of {})", load.rate),
            |r| r.per_second,
            &|v| format!("{v:.0}/s"),
        ));
        let count_row = |name: &str, metric: fn(&HttpReport) -> u64| {
            let [d, w, h] = HttpCase::ALL.map(|c| sum_of(runs, c, load, metric));
            format!("| {name} | {d} | {w} | {h} | |\n")
        };
        out.push_str(&count_row("errors", |r| r.errors));
        out.push_str(&count_row("late", |r| r.late));
        out.push_str(&count_row("not sent", |r| r.unsent));
        let (w, h) = (cpu_sum(weft, load), cpu_sum(haproxy, load));
        out.push_str(&format!(
            "| proxy CPU per 1,000 requests | - | {w:.3} s (c {:.3} + d {:.3}) | {h:.3} s (a \
             {:.3} + b {:.3}) | {:.2}x |\n",
            cpu_median(weft, load, 0),
            cpu_median(weft, load, 1),
            cpu_median(haproxy, load, 0),
            cpu_median(haproxy, load, 1),
            w / h
        ));
    }

    out.push_str(&format!(
        "\n| target: CPU per 1,000 requests per agent <= {TARGET_CPU_PER_1K} s | agent c \
         (client) | agent d (server) | |\n| --- | ---: | ---: | --- |\n"
    ));
    for &load in &loads {
        let (c, d) = (cpu_median(weft, load, 0), cpu_median(weft, load, 1));
        out.push_str(&format!(
            "| weft HTTP, {} | {c:.3} s | {d:.3} s | {} |\n",
            load.short(),
            verdict(c <= TARGET_CPU_PER_1K && d <= TARGET_CPU_PER_1K)
        ));
    }

    out.push_str(
        "\nEvery HTTP run, in the order run:\n\n\
         | round | load | case | p50 | p99 | p99.9 | max | answered (of scheduled) | errors | late \
         | not sent | CPU per 1,000 requests |\n\
         | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |\n",
    );
    for run in runs {
        let r = &run.report;
        out.push_str(&format!(
            "| {} | {} | {} | {} µs | {} µs | {} µs | {} µs | {} of {} ({:.0}/s) | {} | {} \
             | {} | {} |\n",
            run.round,
            run.load.short(),
            run.case.label(),
            r.p50_us,
            r.p99_us,
            r.p999_us,
            r.max_us,
            r.answered,
            r.scheduled,
            r.per_second,
            r.errors,
            r.late,
            r.unsent,
            proxy_cpu(run.case, &run.cpu_per_1k())
        ));
    }
    let errors: Vec<String> = runs
        .iter()
        .filter_map(|r| {
            let error = r.report.first_error.as_ref()?;
            Some(format!(
                "- round {} {} {}: {} of {} requests failed (warm-up included), first: {error}\n",
                r.round,
                r.load.short(),
                r.case.label(),
                r.report.errors_total,
                r.report.sent_total
            ))
        })
        .collect();
    if !errors.is_empty() {
        out.push_str("\nHTTP runs with failed requests:\n\n");
        out.push_str(&errors.concat());
    }
    out
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use clap::Parser;
    use http_body_util::Full;
    use hyper::{server::conn::http1 as server, service::service_fn, Response};
    use tokio::net::TcpListener;

    use super::*;
    use crate::bench::runtime;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        load: HttpLoadArgs,
    }

    /// An HTTP/1.1 server on an ephemeral loopback port answering every request with `size`
    /// bytes, served by the current runtime.
    async fn local_http(size: usize) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let service = service_fn(move |_| async move {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(vec![b'x'; size]))))
                });
                tokio::spawn(
                    server::Builder::new().serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        addr
    }

    fn parse(args: &str) -> HttpLoadArgs {
        Cli::try_parse_from(format!("load {args}").split_whitespace())
            .unwrap()
            .load
    }

    #[test]
    fn the_http_load_measures_keep_alive_and_new_connections() {
        runtime().unwrap().block_on(async {
            let target = local_http(64).await;
            let base =
                format!("--target {target} --path /x --seconds 1 --rate 200 --connections 4");
            for mode in ["", "--new-connections"] {
                let report = drive_http(&parse(&format!("{base} --size 64 {mode}")))
                    .await
                    .unwrap();
                assert!(report.answered >= 150, "{mode}: {report:?}");
                assert_eq!(report.errors, 0, "{mode}: {report:?}");
                assert_eq!(report.answered + report.unsent, report.scheduled);
                assert!(report.p50_us > 0 && report.p50_us <= report.max_us);
                assert_eq!(report.per_second, report.answered as f64);
            }
            // A body of the wrong size is an error, not an answer.
            let report = drive_http(&parse(&format!("{base} --size 65")))
                .await
                .unwrap();
            assert_eq!(report.answered, 0, "{report:?}");
            assert_eq!(report.errors, report.scheduled);
            assert!(report.first_error.unwrap().contains("64 bytes"));
        });
    }
}

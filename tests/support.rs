//! Helpers shared by the lab tests: a lab that removes itself, the agent's admin endpoint, sums of
//! scraped metrics, curl in a pod, tiny servers inside a pod's network namespace, and bpftool
//! queries.
use std::{
    fs::File,
    io::{BufRead, BufReader, Lines, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    ops::Deref,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Child, ChildStdout, Command, Stdio},
    thread,
    time::Duration,
};

pub mod fake_apiserver;

use anyhow::{bail, ensure, Context, Result};
use prometheus_parse::{Scrape, Value as PromValue};
use serde_json::Value;
use xtask::{
    agent::{Agent, Mesh, ADMIN_ADDR},
    lab::{wait_for_tcp, Lab, LabSpec, Node, Pod},
};

/// A lab that is taken down when the test ends, pass or fail.
pub struct TestLab(Lab);

impl TestLab {
    pub fn up(name: &str, nodes: usize, pods_per_node: usize) -> Result<Self> {
        xtask::require_root("lab tests")?;
        Ok(Self(Lab::up(&LabSpec {
            name: name.into(),
            nodes,
            pods_per_node,
        })?))
    }
}

impl Deref for TestLab {
    type Target = Lab;
    fn deref(&self) -> &Lab {
        &self.0
    }
}

impl Drop for TestLab {
    fn drop(&mut self) {
        if let Err(err) = Lab::down(&self.0.name) {
            eprintln!("lab {} teardown failed: {err:#}", self.0.name);
        }
    }
}

/// An answer of the agent's admin endpoint: the status, and the body without its final newline.
#[derive(Debug)]
pub struct AdminAnswer {
    pub status: u16,
    pub body: String,
}

/// `method path` on the admin endpoint of `node`'s agent, from the node's namespace.
pub fn admin(node: &Node, method: &str, path: &str) -> Result<AdminAnswer> {
    let out = node
        .command("curl")?
        // -g: directives contain brackets, which curl would otherwise expand.
        .args([
            "-gsS",
            "--max-time",
            "5",
            "-X",
            method,
            "-w",
            "\n%{http_code}",
        ])
        .arg(format!("http://{ADMIN_ADDR}{path}"))
        .output()
        .context("running curl on the node")?;
    ensure!(
        out.status.success(),
        "curl {method} {path} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).context("admin answer is not UTF-8")?;
    let (body, status) = text
        .rsplit_once('\n')
        .with_context(|| format!("no status in {text:?}"))?;
    Ok(AdminAnswer {
        status: status
            .parse()
            .with_context(|| format!("status {status:?}"))?,
        body: body.trim_end_matches('\n').to_owned(),
    })
}

/// The sum of the samples of `metric` carrying `labels` (0 when there are none).
pub fn metric(scrape: &Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == metric && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            PromValue::Counter(v) | PromValue::Gauge(v) | PromValue::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

#[derive(Debug)]
pub struct CurlResult {
    pub exit_code: Option<i32>,
    pub body: String,
    pub stderr: String,
}

/// `curl URL` from inside `pod`, bounded to 5 s.
pub fn curl(pod: &Pod, url: &str) -> Result<CurlResult> {
    let out = pod
        .command("curl")?
        .args(["-sS", "--max-time", "5", url])
        .output()
        .context("running curl in a pod")?;
    Ok(CurlResult {
        exit_code: out.status.code(),
        body: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// `curl URL` from `pod` that must succeed; returns the body.
pub fn fetch(pod: &Pod, url: &str) -> Result<String> {
    let result = curl(pod, url)?;
    if result.exit_code != Some(0) {
        bail!(
            "curl {url} from {} failed ({:?}): {}",
            pod.name,
            result.exit_code,
            result.stderr
        );
    }
    Ok(result.body)
}

/// Starts curl in `pod` requesting `url` `count` times back to back (a `[1-count]` query glob),
/// a new connection each; it prints one HTTP status per line on its piped stdout.
pub fn requests_back_to_back(pod: &Pod, url: &str, count: usize) -> Result<Child> {
    pod.command("curl")?
        .args(["-sS", "-H", "Connection: close", "--max-time", "60"])
        .args(["-o", "/dev/null", "-w", "%{http_code}\\n"])
        .arg(format!("{url}?n=[1-{count}]"))
        .stdout(Stdio::piped())
        .spawn()
        .context("starting curl")
}

/// `count` connections from a pod to one target, all open at once, held by the tests'
/// `held-connections` program (`program`: its path, `env!("CARGO_BIN_EXE_held-connections")`).
pub struct HeldConnections {
    client: Child,
    lines: Lines<BufReader<ChildStdout>>,
    count: usize,
}

impl HeldConnections {
    /// Opens the connections and waits until the program says they all are.
    pub fn open(pod: &Pod, program: &str, target: &str, count: usize) -> Result<Self> {
        let mut client = pod
            .command(program)?
            .args([target.to_owned(), count.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let mut lines = BufReader::new(client.stdout.take().context("stdout")?).lines();
        let first = lines.next().transpose()?.unwrap_or_default();
        ensure!(
            first == format!("connected {count}"),
            "client said {first:?}"
        );
        Ok(Self {
            client,
            lines,
            count,
        })
    }

    /// Has every connection exchange its request and close; fails unless all succeeded.
    pub fn finish(mut self) -> Result<()> {
        writeln!(self.client.stdin.take().context("stdin")?)?;
        let last = self.lines.next().transpose()?.unwrap_or_default();
        let status = self.client.wait()?;
        ensure!(
            status.success() && last == format!("ok {}", self.count),
            "held connections failed: {status} {last:?}"
        );
        Ok(())
    }
}

/// The flow entry of `/stats` for (pod, destination), if the agent has one.
pub fn flow<'a>(stats: &'a Value, pod: &Pod, destination: &str) -> Option<&'a Value> {
    let source = format!("lab/{}", pod.name);
    stats["flows"]
        .as_array()?
        .iter()
        .find(|f| f["source_pod"] == source.as_str() && f["destination"] == destination)
}

pub fn counter(stats: &Value, name: &str) -> u64 {
    stats["ebpf"][name].as_u64().unwrap_or(0)
}

/// A TCP listener bound inside `pod`'s network namespace (created by a thread that enters it).
pub fn listen_in(pod: &Pod, addr: SocketAddr) -> Result<TcpListener> {
    listen_in_netns(&pod.netns_path(), addr)
}

/// A TCP listener bound inside `node`'s network namespace.
pub fn listen_on_node(node: &Node, addr: SocketAddr) -> Result<TcpListener> {
    listen_in_netns(&Path::new("/var/run/netns").join(&node.netns), addr)
}

fn listen_in_netns(netns_path: &Path, addr: SocketAddr) -> Result<TcpListener> {
    let netns = File::open(netns_path)
        .with_context(|| format!("opening netns {}", netns_path.display()))?;
    thread::spawn(move || -> Result<TcpListener> {
        // SAFETY: setns on this short-lived thread only; the fd is valid.
        if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error()).context("setns");
        }
        TcpListener::bind(addr).with_context(|| format!("binding {addr} in the namespace"))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("listener thread panicked"))?
}

/// A fake API server on `node`'s address at `port`, inside the node's network namespace (where
/// its agent runs; other nodes reach it over the wire), and a kubeconfig file naming it.
pub fn start_fake_api_server(
    lab: &Lab,
    node: &Node,
    port: u16,
) -> Result<(fake_apiserver::FakeApiServer, PathBuf)> {
    let listener = listen_on_node(node, SocketAddr::from((node.ip, port)))?;
    let server =
        fake_apiserver::FakeApiServer::start(listener).context("starting the fake API server")?;
    let kubeconfig = lab.dir.join("kubeconfig");
    std::fs::write(&kubeconfig, server.kubeconfig())?;
    Ok((server, kubeconfig))
}

/// The built weft-cni: next to `WEFT_BIN` when that is set (`cargo xtask test`), else the newer
/// of the release and debug builds.
pub fn weft_cni_binary() -> Result<PathBuf> {
    let candidates: Vec<PathBuf> = match std::env::var_os("WEFT_BIN") {
        Some(weft) => vec![Path::new(&weft).with_file_name("weft-cni")],
        None => {
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| xtask::workspace_root().join("target"));
            ["release", "debug"]
                .iter()
                .map(|profile| target.join(profile).join("weft-cni"))
                .collect()
        }
    };
    candidates
        .iter()
        .filter_map(|path| Some((std::fs::metadata(path).ok()?.modified().ok()?, path)))
        .max()
        .map(|(_, path)| path.clone())
        .with_context(|| {
            format!("weft-cni is not built (looked for {candidates:?}): run `cargo xtask build`")
        })
}

/// Serves `pod` at `addr`: each connection gets `response` after its request head, then closes.
pub fn serve_http_in(pod: &Pod, addr: SocketAddr, response_body: &'static str) -> Result<()> {
    let listener = listen_in(pod, addr)?;
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let _ = answer_http(stream, response_body);
        }
    });
    Ok(())
}

fn answer_http(mut stream: TcpStream, body: &str) -> std::io::Result<()> {
    read_request_head(&mut stream)?;
    write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

fn read_request_head(stream: &mut TcpStream) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte)? == 1 {
        head.push(byte[0]);
    }
    Ok(())
}

/// Serves `pod` at `addr`: reads each connection to its end, then answers with the byte count.
pub fn serve_count_in(pod: &Pod, addr: SocketAddr) -> Result<()> {
    let listener = listen_in(pod, addr)?;
    thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let mut received = Vec::new();
            if stream.read_to_end(&mut received).is_ok() {
                let _ = write!(stream, "received {} bytes", received.len());
            }
        }
    });
    Ok(())
}

/// Serves `pod` at `addr` with a server that reads the request and then resets the connection.
pub fn serve_reset_in(pod: &Pod, addr: SocketAddr) -> Result<()> {
    let listener = listen_in(pod, addr)?;
    thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let _ = read_request_head(&mut stream);
            let linger = libc::linger {
                l_onoff: 1,
                l_linger: 0,
            };
            // SAFETY: valid fd and a properly sized linger struct; closing then sends RST.
            unsafe {
                libc::setsockopt(
                    stream.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_LINGER,
                    (&linger as *const libc::linger).cast(),
                    std::mem::size_of::<libc::linger>() as libc::socklen_t,
                );
            }
        }
    });
    Ok(())
}

/// Ids of the BPF programs attached to `cgroup` (any attach type).
pub fn cgroup_program_ids(cgroup: &std::path::Path) -> Result<Vec<u64>> {
    let out = Command::new("bpftool")
        .args(["-j", "cgroup", "show"])
        .arg(cgroup)
        .output()
        .context("running bpftool (installed by `cargo xtask setup`)")?;
    if !out.status.success() {
        bail!(
            "bpftool cgroup show failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    let json: Value = serde_json::from_str(&text).context("bpftool output is not JSON")?;
    Ok(json
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["id"].as_u64())
        .collect())
}

/// Whether a BPF program with `id` is still loaded in the kernel.
pub fn program_loaded(id: u64) -> Result<bool> {
    let status = Command::new("bpftool")
        .args(["prog", "show", "id", &id.to_string()])
        .output()
        .context("running bpftool")?;
    Ok(status.status.success())
}

/// Where `weft-testapp serve` listens in its pod, and where it serves its counters (`/_stats`).
pub const APP_PORT: u16 = 8080;
pub const APP_STATS_PORT: u16 = 9090;

/// A `weft-testapp` process in a pod, killed when dropped. `binary` is the test's
/// `env!("CARGO_BIN_EXE_weft-testapp")`.
pub struct App {
    child: std::process::Child,
    pod: Pod,
}

impl App {
    /// `weft-testapp serve --name NAME` on APP_PORT (counters on APP_STATS_PORT) with `args`.
    pub fn serve(binary: &str, pod: &Pod, name: &str, args: &[&str]) -> Result<Self> {
        let listen = format!("0.0.0.0:{APP_PORT}");
        let stats = format!("127.0.0.1:{APP_STATS_PORT}");
        let mut all = vec![
            "serve",
            "--listen",
            &listen,
            "--name",
            name,
            "--stats-listen",
            &stats,
        ];
        all.extend_from_slice(args);
        Self::start(binary, pod, &all, APP_PORT)
    }

    /// Any `weft-testapp` subcommand that listens on `port`, once it does.
    pub fn start(binary: &str, pod: &Pod, args: &[&str], port: u16) -> Result<Self> {
        let child = pod
            .command(binary)?
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .spawn()
            .with_context(|| format!("starting weft-testapp in {}", pod.name))?;
        let app = Self {
            child,
            pod: pod.clone(),
        };
        wait_for_tcp(pod, port, Duration::from_secs(10))?;
        Ok(app)
    }

    /// The server's counters, read inside its pod (never through the mesh).
    pub fn stats(&self) -> Result<Value> {
        let out = self
            .pod
            .command("curl")?
            .args(["-sS", "--max-time", "5"])
            .arg(format!("http://127.0.0.1:{APP_STATS_PORT}/_stats"))
            .output()?;
        serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "stats of the app in {}: {}",
                self.pod.name,
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    /// One of the server's counters (`requests`, `failed`, `late`, ...).
    pub fn counter(&self, name: &str) -> Result<u64> {
        self.stats()?[name]
            .as_u64()
            .with_context(|| format!("stats of the app in {} without {name}", self.pod.name))
    }
}

impl Drop for App {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `weft-testapp load` from `pod` with `args`; its JSON summary.
pub fn load(binary: &str, pod: &Pod, args: &[&str]) -> Result<Value> {
    let out = pod
        .command(binary)?
        .arg("load")
        .args(args)
        .stdin(std::process::Stdio::null())
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

/// `requests` GETs of `url` from `pod`, `concurrency` at a time, with `extra` load arguments
/// (see [`load`]); the load summary.
pub fn load_url(
    binary: &str,
    pod: &Pod,
    url: &str,
    requests: u64,
    concurrency: u64,
    extra: &[&str],
) -> Result<Value> {
    let (requests, concurrency) = (requests.to_string(), concurrency.to_string());
    let mut args = vec![
        "--url",
        url,
        "--requests",
        &requests,
        "--concurrency",
        &concurrency,
    ];
    args.extend_from_slice(extra);
    load(binary, pod, &args)
}

/// An agent on every node of `lab` configured from `mesh`, with every pod enrolled.
pub fn start_meshed_agents(lab: &Lab, mesh: &Mesh) -> Result<Vec<Agent>> {
    lab.nodes
        .iter()
        .map(|node| {
            let pods: Vec<&Pod> = node.pods.iter().collect();
            Agent::start_with(lab, node, &mesh.config_yaml(node, &pods), &pods)
        })
        .collect()
}

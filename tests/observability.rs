//! Lab tests of observability: `/metrics` counting requests, connections and bytes exactly for
//! both reporters (and bytes while a connection is open), the graph page in headless Chromium,
//! audit lines of policy denials; the admin endpoint reachable on the node's loopback only,
//! `/config_dump` without key material, `/logging` changing the log filter at run time, and
//! `/ready` while draining (need root).
use std::{
    fs,
    io::{Read, Write},
    net::SocketAddr,
    process::Stdio,
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{ensure, Context, Result};
use prometheus_parse::Scrape;
use serde_json::Value;
use weft_lab_tests::{
    admin, curl, fetch, flow, listen_in, listen_on_node, load_url, metric, start_meshed_agents,
    App, HeldConnections, TestLab, APP_PORT,
};
use xtask::{
    agent::{Agent, Mesh, ADMIN_ADDR, TRUST_DOMAIN},
    chromium,
    lab::{Node, Pod},
    pki::{spiffe_id, TestCa},
};

/// A two-node lab with a mesh CA and an agent on each node enrolling every pod.
fn meshed_lab(name: &str) -> Result<(TestLab, Mesh, Vec<Agent>)> {
    let lab = TestLab::up(name, 2, 1)?;
    let ca = TestCa::new("weft lab mesh CA")?;
    let (cert, key) = ca.write(&lab.dir.join("ca"))?;
    let mesh = Mesh::new(&lab, cert, key);
    let agents = start_meshed_agents(&lab, &mesh)?;
    Ok((lab, mesh, agents))
}

/// A TCP listener in `node`'s network namespace (bound by a thread that enters it) answering
/// every connection with `hello`: shows what pods can reach on the node.
fn serve_hello_on(node: &Node, addr: SocketAddr) -> Result<()> {
    let listener = listen_on_node(node, addr)?;
    thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let _ = stream.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 6\r\n\r\nhello\n");
        }
    });
    Ok(())
}

#[test]
fn admin_endpoints_are_unreachable_from_pods() -> Result<()> {
    let lab = TestLab::up("obsnet", 1, 2)?;
    let (a1, a2) = (lab.pod("a1")?, lab.pod("a2")?);
    let node = lab.node("a")?;
    // a1 enrolled (its connects go through the agent), a2 not.
    let _agent = Agent::start(&lab, node, &[a1])?;
    let control_port = 15099;
    serve_hello_on(node, SocketAddr::from((node.ip, control_port)))?;

    let ready = admin(node, "GET", "/ready")?;
    ensure!(
        ready.status == 200,
        "/ready from the node: {}",
        ready.status
    );
    for pod in [a1, a2] {
        // The node's address is reachable from the pod, so a refusal below is the admin
        // endpoint's own doing.
        ensure!(
            fetch(pod, &format!("http://{}:{control_port}/", node.ip))? == "hello\n",
            "the node is not reachable from {}",
            pod.name
        );
        for url in [
            "http://127.0.0.1:15000/ready".to_owned(),
            format!("http://{}:15000/ready", node.ip),
            format!("http://{}:15000/config_dump", node.ip),
        ] {
            let result = curl(pod, &url)?;
            ensure!(
                result.exit_code != Some(0) && result.body.is_empty(),
                "{url} answered from {}: {result:?}",
                pod.name
            );
        }
    }
    Ok(())
}

#[test]
fn config_dump_shows_workloads_and_certificates_but_no_private_key() -> Result<()> {
    let (lab, mesh, agents) = meshed_lab("obsdmp")?;
    let (a1, b1) = (lab.pod("a1")?, lab.pod("b1")?);
    let _nginx = b1.start_nginx()?;
    // A meshed request: agent a issues a1's certificate, agent b b1's.
    ensure!(fetch(a1, &format!("http://{}/", b1.ip))? == "hello from b1\n");
    let node = &agents[0].node;

    let answer = admin(node, "GET", "/config_dump")?;
    ensure!(answer.status == 200, "/config_dump: {}", answer.status);
    for pem in ["PRIVATE KEY", "BEGIN", "-----"] {
        ensure!(
            !answer.body.contains(pem),
            "{pem} in /config_dump: {}",
            answer.body
        );
    }
    let ca_key = fs::read_to_string(&mesh.ca_key)?;
    for line in ca_key.lines().filter(|l| !l.starts_with("-----")) {
        ensure!(
            !answer.body.contains(line),
            "CA key material in /config_dump"
        );
    }
    let dump: Value = serde_json::from_str(&answer.body).context("/config_dump is not JSON")?;

    ensure!(dump["config"]["identity"]["ca_key"] == mesh.ca_key.display().to_string());
    ensure!(dump["config"]["agent"]["node_name"] == "a");
    let workload = |pod: &Pod| {
        dump["workloads"]
            .as_array()
            .and_then(|all| {
                all.iter()
                    .find(|w| w["id"] == format!("lab/{}", pod.name).as_str())
            })
            .cloned()
            .with_context(|| format!("no workload {} in {}", pod.name, dump["workloads"]))
    };
    let identity = |pod: &Pod| spiffe_id(TRUST_DOMAIN, "lab", &format!("sa-{}", pod.name));
    let (local, peer) = (workload(a1)?, workload(b1)?);
    ensure!(
        local["identity"] == identity(a1).as_str()
            && local["node"] == "a"
            && local["ip"] == a1.ip.to_string().as_str()
            && local["inbound_mode"] == "PERMISSIVE",
        "{local}"
    );
    ensure!(
        peer["identity"] == identity(b1).as_str() && peer["node"] == "b",
        "{peer}"
    );
    ensure!(
        dump["pods"]["lab/a1"]["state"] == "enrolled",
        "{}",
        dump["pods"]
    );

    let certificates = dump["certificates"].as_array().context("no certificates")?;
    let held = certificates
        .iter()
        .find(|c| c["identity"] == identity(a1).as_str())
        .with_context(|| format!("no certificate of a1: {}", dump["certificates"]))?;
    let not_after = held["not_after"].as_str().context("no expiry")?;
    // The agent writes UTC as `YYYY-MM-DDTHH:MM:SSZ`, which sorts as it reads.
    let now = time::OffsetDateTime::now_utc();
    let now = format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second()
    );
    ensure!(
        not_after.len() == now.len() && not_after > now.as_str(),
        "expiry {not_after} is not after {now}: {held}"
    );
    ensure!(held["serial"].as_str().is_some_and(|s| !s.is_empty()));
    Ok(())
}

/// Lines the agent's own code logged at DEBUG (e.g. each proxied connection's end).
fn debug_lines(agent: &Agent) -> usize {
    agent
        .log()
        .lines()
        .filter(|l| l.contains(" DEBUG weft::"))
        .count()
}

#[test]
fn logging_changes_the_filter_at_run_time() -> Result<()> {
    let (lab, _mesh, agents) = meshed_lab("obslog")?;
    let (a1, b1) = (lab.pod("a1")?, lab.pod("b1")?);
    let _nginx = b1.start_nginx()?;
    let agent = &agents[0];
    let node = &agent.node;
    let url = format!("http://{}/", b1.ip);

    let set = admin(node, "POST", "/logging?level=info")?;
    ensure!(
        set.status == 200 && set.body == "info",
        "{} {}",
        set.status,
        set.body
    );
    let before = debug_lines(agent);
    for _ in 0..3 {
        fetch(a1, &url)?;
    }
    // Give the agent time to log the requests' ends.
    thread::sleep(Duration::from_millis(500));
    ensure!(
        debug_lines(agent) == before,
        "debug lines at info:\n{}",
        agent.log()
    );

    let set = admin(node, "POST", "/logging?level=debug")?;
    ensure!(
        set.status == 200 && set.body == "debug",
        "{} {}",
        set.status,
        set.body
    );
    ensure!(admin(node, "GET", "/logging")?.body == "debug");
    fetch(a1, &url)?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while debug_lines(agent) == before {
        ensure!(
            Instant::now() < deadline,
            "no debug lines after level=debug:\n{}",
            agent.log()
        );
        thread::sleep(Duration::from_millis(50));
    }
    ensure!(
        agent.log().contains("log filter changed"),
        "{}",
        agent.log()
    );

    // Invalid directives are refused with the parse error and change nothing.
    for invalid in ["weft=loud", "weft[{=debug", "weft=debug%2Ch2=info", ""] {
        let refused = admin(node, "POST", &format!("/logging?level={invalid}"))?;
        ensure!(
            refused.status == 400 && !refused.body.is_empty(),
            "level={invalid}: {} {}",
            refused.status,
            refused.body
        );
    }
    let refused = admin(node, "POST", "/logging?level=weft=loud")?;
    ensure!(
        refused.body.contains("invalid log filter"),
        "{}",
        refused.body
    );
    ensure!(admin(node, "GET", "/logging")?.body == "debug");
    let set = admin(node, "POST", "/logging?level=weft=debug,h2=info")?;
    ensure!(set.status == 200, "{} {}", set.status, set.body);
    let mut directives: Vec<String> = admin(node, "GET", "/logging")?
        .body
        .split(',')
        .map(str::to_owned)
        .collect();
    directives.sort();
    ensure!(directives == ["h2=info", "weft=debug"], "{directives:?}");

    // GET serves everything, POST only changes the filter.
    for path in ["/stats", "/ready", "/healthz", "/config_dump"] {
        let refused = admin(node, "POST", path)?;
        ensure!(refused.status == 405, "POST {path}: {}", refused.status);
    }
    ensure!(admin(node, "DELETE", "/logging")?.status == 405);
    ensure!(admin(node, "GET", "/nothing")?.status == 404);
    ensure!(admin(node, "GET", "/healthz")?.status == 200);
    Ok(())
}

#[test]
fn ready_is_503_while_draining() -> Result<()> {
    const HELD: usize = 2;
    let lab = TestLab::up("obsrdy", 2, 1)?;
    let (a1, b1) = (lab.pod("a1")?, lab.pod("b1")?);
    let _nginx = b1.start_nginx()?;
    for n in 1..=HELD {
        fs::write(b1.dir.join(format!("www/{n}")), format!("page {n}\n"))?;
    }
    let mut agent = Agent::start(&lab, lab.node("a")?, &[a1])?;
    let node = agent.node.clone();

    let held_connections = HeldConnections::open(
        a1,
        env!("CARGO_BIN_EXE_held-connections"),
        &format!("{}:80", b1.ip),
        HELD,
    )?;
    let destination = format!("{}:80", b1.ip);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !flow(&agent.stats()?, a1, &destination).is_some_and(|f| f["active"] == HELD) {
        ensure!(Instant::now() < deadline, "the connections are not proxied");
        thread::sleep(Duration::from_millis(50));
    }
    let ready = admin(&node, "GET", "/ready")?;
    ensure!(
        ready.status == 200,
        "/ready before SIGTERM: {} {}",
        ready.status,
        ready.body
    );

    let pid = agent.pid().context("agent not running")?;
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(2);
    let draining = loop {
        let answer = admin(&node, "GET", "/ready")?;
        if answer.status != 200 {
            break answer;
        }
        ensure!(Instant::now() < deadline, "/ready still 200 after SIGTERM");
        thread::sleep(Duration::from_millis(20));
    };
    let draining_body = format!("draining (agent pid {pid})");
    ensure!(
        draining.status == 503 && draining.body == draining_body,
        "/ready after SIGTERM: {} {:?}",
        draining.status,
        draining.body
    );
    // Still draining a second later (the lab's drain period is 3 s): the held connections keep
    // the agent, and its admin endpoint, up.
    thread::sleep(Duration::from_secs(1));
    let still = admin(&node, "GET", "/ready")?;
    ensure!(
        still.status == 503 && still.body == draining_body,
        "{} {}",
        still.status,
        still.body
    );
    ensure!(admin(&node, "GET", "/healthz")?.status == 200);

    // The held connections still work, and once they end the agent stops.
    held_connections
        .finish()
        .context("the held connections while draining")?;
    let code = agent.stop_with(libc::SIGTERM, Duration::from_secs(10))?;
    ensure!(
        code == Some(0),
        "agent exited with {code:?}:\n{}",
        agent.log()
    );
    ensure!(
        !agent
            .log()
            .contains("closing connections still open after the drain period"),
        "the drain did not end with the connections:\n{}",
        agent.log()
    );
    Ok(())
}

const APP: &str = env!("CARGO_BIN_EXE_weft-testapp");
/// Where the lab agents serve `/metrics` (configured: not the default port).
const METRICS_PORT: u16 = 15090;
const API_VIP: &str = "10.96.0.30";

/// A two-node mesh: a1 on node a calls the service `api` (VIP `API_VIP`:80 → APP_PORT) whose
/// one endpoint is b1 on node b; metrics on METRICS_PORT.
fn metrics_lab(name: &str) -> Result<(TestLab, Mesh)> {
    let lab = TestLab::up(name, 2, 1)?;
    let ca = TestCa::new("weft lab mesh CA")?;
    let (cert, key) = ca.write(&lab.dir.join("ca"))?;
    let mut mesh = Mesh::new(&lab, cert, key);
    mesh.agent_extra = format!("  metrics_addr: 0.0.0.0:{METRICS_PORT}\n");
    mesh.workload_mut("b1")?.labels = "{app: api}";
    mesh.services = format!(
        "  - name: api\n    namespace: lab\n    vips: [{API_VIP}]\n    ports: [{{port: 80, target_port: {APP_PORT}}}]\n    selector: {{app: api}}\n"
    );
    Ok((lab, mesh))
}

/// `GET /metrics` of `node`'s agent at the node's address, asking for gzip and parsed as a
/// scraper would. The body is unzipped here, not by curl: a plain-text answer fails.
fn scrape(node: &Node) -> Result<Scrape> {
    let out = node
        .command("curl")?
        .args(["-sSf", "--max-time", "5", "-H", "Accept-Encoding: gzip"])
        .arg(format!("http://{}:{METRICS_PORT}/metrics", node.ip))
        .output()
        .context("running curl for /metrics")?;
    ensure!(
        out.status.success(),
        "/metrics of node {}: {}",
        node.name,
        String::from_utf8_lossy(&out.stderr)
    );
    let mut text = String::new();
    flate2::read::GzDecoder::new(&out.stdout[..])
        .read_to_string(&mut text)
        .context("/metrics is not gzipped UTF-8 text")?;
    Scrape::parse(text.lines().map(|line| Ok(line.to_owned()))).context("parsing /metrics")
}

/// Polls `check` on fresh scrapes of `node` until it holds (the agents record a request once
/// its response has been sent, which may be a moment after the client has read it).
fn wait_for_metrics(node: &Node, what: &str, check: impl Fn(&Scrape) -> bool) -> Result<Scrape> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let scraped = scrape(node)?;
        if check(&scraped) {
            return Ok(scraped);
        }
        ensure!(
            Instant::now() < deadline,
            "{what}: not seen on node {}",
            node.name
        );
        thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn metrics_count_requests_and_bytes_exactly_for_both_reporters() -> Result<()> {
    const REQUESTS: usize = 7;
    const BODY_BYTES: usize = 1234;
    let (lab, mesh) = metrics_lab("obsmet")?;
    let (a1, b1) = (lab.pod("a1")?, lab.pod("b1")?);
    let (node_a, node_b) = (lab.node("a")?, lab.node("b")?);
    let agents = start_meshed_agents(&lab, &mesh)?;
    let _api = App::serve(APP, b1, "api-answer", &[])?;
    let echo_port = 7300;
    let _echo = App::start(
        APP,
        b1,
        &["echo", "--listen", &format!("0.0.0.0:{echo_port}")],
        echo_port,
    )?;

    let body = lab.dir.join("body.bin");
    fs::write(&body, vec![b'x'; BODY_BYTES])?;
    let mut response_bytes = 0;
    for _ in 0..REQUESTS {
        let out = a1
            .command("curl")?
            .args([
                "-sS",
                "--max-time",
                "5",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code} %{size_download}",
            ])
            .arg("--data-binary")
            .arg(format!("@{}", body.display()))
            .arg(format!("http://{API_VIP}/items"))
            .output()?;
        let written = String::from_utf8_lossy(&out.stdout).into_owned();
        let (code, size) = written.split_once(' ').context("curl -w output")?;
        ensure!(code == "200", "request answered {written}");
        response_bytes += size.parse::<u64>()?;
    }
    // An L4 connection straight to the pod, echoed: as many bytes back as sent.
    let raw = load_raw(a1, &format!("{}:{echo_port}", b1.ip), 50_000)?;
    ensure!(raw["equal"] == true, "echo: {raw}");

    let request = |reporter: &'static str| {
        vec![
            ("reporter", reporter),
            ("source_workload", "a1"),
            ("source_workload_namespace", "lab"),
            ("destination_workload", "b1"),
            ("destination_service", "api.lab.svc.cluster.local"),
            ("request_protocol", "http"),
            ("response_code", "200"),
            ("response_flags", "-"),
            ("connection_security_policy", "mutual_tls"),
        ]
    };
    let tcp = |reporter: &'static str| {
        vec![
            ("reporter", reporter),
            ("source_workload", "a1"),
            ("destination_workload", "b1"),
            ("request_protocol", "tcp"),
            ("response_flags", "-"),
            ("connection_security_policy", "mutual_tls"),
        ]
    };
    let principal_a1 = spiffe_id(TRUST_DOMAIN, "lab", "sa-a1");
    for (node, reporter) in [(node_a, "source"), (node_b, "destination")] {
        let labels = request(reporter);
        let scraped = wait_for_metrics(node, "all requests and the closed connection", |s| {
            metric(s, "istio_requests_total", &labels) >= REQUESTS as f64
                && metric(s, "istio_tcp_connections_closed_total", &tcp(reporter)) >= 1.0
        })?;
        let count = |name: &str| metric(&scraped, name, &labels);
        ensure!(
            count("istio_requests_total") == REQUESTS as f64,
            "{reporter}: {} requests",
            count("istio_requests_total")
        );
        ensure!(
            metric(
                &scraped,
                "istio_requests_total",
                &[("source_principal", &principal_a1), ("reporter", reporter)]
            ) == REQUESTS as f64,
            "{reporter}: source_principal is not a1's identity"
        );
        ensure!(count("istio_request_duration_milliseconds_count") == REQUESTS as f64);
        ensure!(
            count("istio_request_bytes_sum") == (REQUESTS * BODY_BYTES) as f64,
            "{reporter}: request bytes {}",
            count("istio_request_bytes_sum")
        );
        ensure!(
            count("istio_response_bytes_sum") == response_bytes as f64,
            "{reporter}: response bytes {} != {response_bytes}",
            count("istio_response_bytes_sum")
        );
        let tcp = tcp(reporter);
        let flows = |name: &str| metric(&scraped, name, &tcp);
        ensure!(
            flows("istio_tcp_connections_opened_total") == 1.0,
            "{reporter}: opened"
        );
        ensure!(
            flows("istio_tcp_connections_closed_total") == 1.0,
            "{reporter}: closed"
        );
        ensure!(
            flows("istio_tcp_received_bytes_total") == 50_000.0
                && flows("istio_tcp_sent_bytes_total") == 50_000.0,
            "{reporter}: tcp bytes received {} sent {}",
            flows("istio_tcp_received_bytes_total"),
            flows("istio_tcp_sent_bytes_total")
        );
        ensure!(
            metric(&scraped, "weft_build_info", &[]) == 1.0
                && metric(&scraped, "weft_pods", &[("state", "enrolled")]) == 1.0,
            "{reporter}: weft families missing"
        );
    }
    let client = scrape(node_a)?;
    ensure!(
        metric(
            &client,
            "weft_ebpf_events_total",
            &[("event", "redirected")]
        ) >= (REQUESTS + 1) as f64,
        "eBPF redirects not counted"
    );
    ensure!(
        metric(
            &client,
            "weft_tunnel_handshakes_total",
            &[("role", "client"), ("result", "ok")]
        ) >= 1.0
            && metric(&client, "weft_tunnel_pool_connections", &[]) >= 1.0,
        "tunnel families missing"
    );
    ensure!(
        metric(
            &client,
            "weft_certificate_expiry_timestamp_seconds",
            &[("identity", &principal_a1)]
        ) > (SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() as f64),
        "a1's certificate expiry missing or in the past"
    );

    // The server's agent logged every request, with the trace it was given.
    let logged = access_lines(&agents[1], |line| {
        line["kind"] == "request" && line["destination_service"] == "api.lab.svc.cluster.local"
    });
    ensure!(logged.len() == REQUESTS, "{} request lines", logged.len());
    for line in &logged {
        ensure!(
            line["status"] == 200
                && line["bytes_received"] == BODY_BYTES
                && line["source"]["principal"] == principal_a1.as_str()
                && line["trace_id"].as_str().is_some_and(|t| t.len() == 32),
            "access line {line}"
        );
    }
    Ok(())
}

/// `weft-testapp raw` from `pod`: `bytes` sent to `addr` and read back.
fn load_raw(pod: &Pod, addr: &str, bytes: usize) -> Result<Value> {
    let out = pod
        .command(APP)?
        .args(["raw", "--addr", addr, "--bytes", &bytes.to_string()])
        .output()
        .context("running weft-testapp raw")?;
    serde_json::from_slice(&out.stdout).context("raw printed no JSON")
}

/// The access-log lines (JSON on the agent's stdout) that `keep` selects.
fn access_lines(agent: &Agent, keep: impl Fn(&Value) -> bool) -> Vec<Value> {
    agent
        .log()
        .lines()
        .filter(|line| line.starts_with('{'))
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|line| keep(line))
        .collect()
}

#[test]
fn tcp_byte_counters_move_while_a_long_connection_is_open() -> Result<()> {
    const STREAM_SECONDS: u64 = 66;
    const SCRAPE_EVERY: Duration = Duration::from_secs(10);
    let (lab, mesh) = metrics_lab("obsstr")?;
    let (a1, b1) = (lab.pod("a1")?, lab.pod("b1")?);
    let node_a = lab.node("a")?;
    let _agents = start_meshed_agents(&lab, &mesh)?;
    let port = 7400;
    // A server that streams 1 KiB every 100 ms for a minute and more, then closes.
    let listener = listen_in(b1, SocketAddr::from(([0, 0, 0, 0], port)))?;
    thread::spawn(move || {
        if let Ok((mut stream, _)) = listener.accept() {
            let end = Instant::now() + Duration::from_secs(STREAM_SECONDS);
            while Instant::now() < end && stream.write_all(&[b'z'; 1024]).is_ok() {
                thread::sleep(Duration::from_millis(100));
            }
        }
    });
    let mut reader = a1
        .command("bash")?
        .args([
            "-c",
            &format!("exec 3<>/dev/tcp/{}/{port}; cat <&3 >/dev/null", b1.ip),
        ])
        .stdin(Stdio::null())
        .spawn()
        .context("starting the reader in a1")?;
    let labels = [
        ("reporter", "source"),
        ("source_workload", "a1"),
        ("destination_workload", "b1"),
        ("response_flags", "-"),
    ];
    let mut seen = Vec::new();
    let started = Instant::now();
    // Six scrapes a minute into the stream, all before the server ends it.
    while started.elapsed() + SCRAPE_EVERY < Duration::from_secs(STREAM_SECONDS - 3) {
        thread::sleep(SCRAPE_EVERY);
        let scraped = scrape(node_a)?;
        let open = metric(&scraped, "istio_tcp_connections_opened_total", &labels)
            - metric(&scraped, "istio_tcp_connections_closed_total", &labels);
        let sent = metric(&scraped, "istio_tcp_sent_bytes_total", &labels);
        ensure!(
            open == 1.0,
            "the connection is not open at {:?}",
            started.elapsed()
        );
        seen.push(sent);
    }
    let _ = reader.kill();
    let _ = reader.wait();
    ensure!(seen.len() >= 5, "only {} scrapes", seen.len());
    ensure!(
        seen.windows(2).all(|w| w[1] > w[0]) && seen[0] > 0.0,
        "sent bytes did not grow while open: {seen:?}"
    );
    Ok(())
}

#[test]
fn graph_page_renders_the_lab_workloads_in_chromium() -> Result<()> {
    let (lab, mesh) = metrics_lab("obsgra")?;
    let (a1, b1) = (lab.pod("a1")?, lab.pod("b1")?);
    let node_a = lab.node("a")?;
    let _agents = start_meshed_agents(&lab, &mesh)?;
    let _api = App::serve(APP, b1, "api", &[])?;
    let summary = load_url(APP, a1, &format!("http://{API_VIP}/"), 200, 4, &[])?;
    ensure!(summary["status"]["200"] == 200, "{summary}");

    let graph: Value = serde_json::from_str(&admin(node_a, "GET", "/graph")?.body)?;
    let edge = graph["edges"]
        .as_array()
        .and_then(|edges| {
            edges
                .iter()
                .find(|e| e["source"] == "lab/a1" && e["destination"] == "lab/b1")
        })
        .with_context(|| format!("no a1 -> b1 edge in {graph}"))?;
    ensure!(
        edge["protocol"] == "http"
            && edge["mtls"] == true
            && edge["request_rate"].as_f64() > Some(0.0)
            && edge["p99_ms"].as_f64().is_some(),
        "edge {edge}"
    );

    let chromium = chromium::find()?;
    let url = format!("http://{ADMIN_ADDR}/");
    let dom = chromium::dump_dom(node_a.command(&chromium)?, &url)?;
    for hook in [
        r#"data-id="lab/a1""#,
        r#"data-id="lab/b1""#,
        r#"data-source="lab/a1" data-destination="lab/b1" data-protocol="http" data-mtls="true""#,
    ] {
        ensure!(dom.contains(hook), "the rendered page lacks {hook}:\n{dom}");
    }
    ensure!(
        dom.contains(r#"<span id="error" role="alert"></span>"#),
        "the page shows a fetch error:\n{dom}"
    );
    let artefacts = xtask::workspace_root().join("target/test-artifacts");
    fs::create_dir_all(&artefacts)?;
    let shot = artefacts.join("graph.png");
    chromium::screenshot(node_a.command(&chromium)?, &url, &shot, (1280, 800))?;
    ensure!(fs::metadata(&shot)?.len() > 1000, "empty screenshot");
    Ok(())
}

#[test]
fn a_policy_denial_is_audited_with_both_identities_and_the_policy() -> Result<()> {
    let (lab, mut mesh) = metrics_lab("obsaud")?;
    let (a1, b1) = (lab.pod("a1")?, lab.pod("b1")?);
    mesh.policies = format!(
        "  - metadata: {{name: no-a1, namespace: lab}}\n    spec:\n      selector: {{matchLabels: {{app: api}}}}\n      action: DENY\n      rules:\n        - from: [{{source: {{principals: [\"{}\"]}}}}]\n",
        spiffe_id(TRUST_DOMAIN, "lab", "sa-a1")
    );
    let agents = start_meshed_agents(&lab, &mesh)?;
    let _api = App::serve(APP, b1, "api", &[])?;
    let denied = curl(a1, &format!("http://{}:{APP_PORT}/", b1.ip))?;
    ensure!(denied.exit_code != Some(0), "a1 was not denied: {denied:?}");
    let deadline = Instant::now() + Duration::from_secs(5);
    let audit = loop {
        let lines = access_lines(&agents[1], |line| line["policy"]["decision"] == "deny");
        if let Some(line) = lines.into_iter().next() {
            break line;
        }
        ensure!(
            Instant::now() < deadline,
            "no audit line; log:\n{}",
            agents[1].log()
        );
        thread::sleep(Duration::from_millis(100));
    };
    ensure!(
        audit["policy"]["policy"] == "lab/no-a1"
            && audit["source"]["principal"] == spiffe_id(TRUST_DOMAIN, "lab", "sa-a1").as_str()
            && audit["destination"]["principal"]
                == spiffe_id(TRUST_DOMAIN, "lab", "sa-b1").as_str()
            && audit["destination"]["workload"] == "b1"
            && audit["reporter"] == "destination",
        "audit line {audit}"
    );
    let scraped = scrape(lab.node("b")?)?;
    ensure!(
        metric(
            &scraped,
            "weft_policy_denials_total",
            &[("destination_workload", "b1"), ("policy", "lab/no-a1")]
        ) == 1.0,
        "denial not counted"
    );
    Ok(())
}

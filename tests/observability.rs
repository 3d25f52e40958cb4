//! Lab tests of the admin endpoint: reachable on the node's loopback only, `/config_dump` without
//! key material, `/logging` changing the log filter at run time, and `/ready` while draining
//! (need root).
use std::{
    fs::{self, File},
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener},
    os::fd::AsRawFd,
    process::Stdio,
    thread,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use serde_json::Value;
use weft_lab_tests::{curl, fetch, flow, start_meshed_agents, TestLab};
use xtask::{
    agent::{Agent, Mesh, ADMIN_ADDR, TRUST_DOMAIN},
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

struct Answer {
    status: u16,
    body: String,
}

/// `method path` on the admin endpoint of `node`'s agent, from the node's namespace.
fn admin(node: &Node, method: &str, path: &str) -> Result<Answer> {
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
    Ok(Answer {
        status: status
            .parse()
            .with_context(|| format!("status {status:?}"))?,
        body: body.trim_end_matches('\n').to_owned(),
    })
}

/// A TCP listener in `node`'s network namespace (bound by a thread that enters it) answering
/// every connection with `hello`: shows what pods can reach on the node.
fn serve_hello_on(node: &Node, addr: SocketAddr) -> Result<()> {
    let netns = File::open(format!("/var/run/netns/{}", node.netns)).context("node netns")?;
    let listener = thread::spawn(move || -> Result<TcpListener> {
        // SAFETY: setns on this short-lived thread only; the fd is valid.
        if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error()).context("setns into the node");
        }
        TcpListener::bind(addr).with_context(|| format!("binding {addr} on the node"))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("listener thread panicked"))??;
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

    let mut client = a1
        .command(env!("CARGO_BIN_EXE_held-connections"))?
        .args([format!("{}:80", b1.ip), HELD.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut lines = BufReader::new(client.stdout.take().context("stdout")?).lines();
    let first = lines.next().transpose()?.unwrap_or_default();
    ensure!(
        first == format!("connected {HELD}"),
        "client said {first:?}"
    );
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
    ensure!(
        draining.status == 503 && draining.body == "draining",
        "/ready after SIGTERM: {} {:?}",
        draining.status,
        draining.body
    );
    // Still draining a second later (the lab's drain period is 3 s): the held connections keep
    // the agent, and its admin endpoint, up.
    thread::sleep(Duration::from_secs(1));
    let still = admin(&node, "GET", "/ready")?;
    ensure!(
        still.status == 503 && still.body == "draining",
        "{} {}",
        still.status,
        still.body
    );
    ensure!(admin(&node, "GET", "/healthz")?.status == 200);

    // The held connections still work, and once they end the agent stops.
    writeln!(client.stdin.take().context("stdin")?)?;
    let last = lines.next().transpose()?.unwrap_or_default();
    let status = client.wait()?;
    ensure!(
        status.success() && last == format!("ok {HELD}"),
        "held connections failed while draining: {status} {last:?}"
    );
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

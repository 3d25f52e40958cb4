//! Lab tests of the mesh: mTLS tunnels between agents, workload identities and their rotation,
//! inbound capture (STRICT/PERMISSIVE) and authorization policies (need root).
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use serde_json::Value;
use time::OffsetDateTime;
use weft_lab_tests::{curl, fetch, flow, requests_back_to_back, HeldConnections, TestLab};
use xtask::{
    agent::{rewrite_configs, Agent, Mesh, TRUST_DOMAIN},
    lab::{Lab, Node, Pod},
    pki::{spiffe_id, TestCa},
};

const TUNNEL_PORT: u16 = 15008;

/// A two-node lab with a mesh CA; every pod a PERMISSIVE workload with service account `sa-<pod>`.
fn mesh_lab(name: &str, pods_per_node: usize) -> Result<(TestLab, TestCa, Mesh)> {
    let lab = TestLab::up(name, 2, pods_per_node)?;
    let ca = TestCa::new("weft lab mesh CA")?;
    let (cert, key) = ca.write(&lab.dir.join("ca"))?;
    let mesh = Mesh::new(&lab, cert, key);
    Ok((lab, ca, mesh))
}

/// Starts an agent on node a and on node b with the `enrolled` pods of each.
fn start_agents(lab: &Lab, mesh: &Mesh, enrolled: &[&Pod]) -> Result<(Agent, Agent)> {
    let start = |node: &Node| {
        let local: Vec<&Pod> = enrolled
            .iter()
            .copied()
            .filter(|p| node.pods.iter().any(|n| n.name == p.name))
            .collect();
        Agent::start_with(lab, node, &mesh.config_yaml(node, &local), &local)
    };
    Ok((start(lab.node("a")?)?, start(lab.node("b")?)?))
}

fn identity(pod: &Pod) -> String {
    spiffe_id(TRUST_DOMAIN, "lab", &format!("sa-{}", pod.name))
}

/// The agent's stats once `settled` holds for them (a connection counts as closed only after both
/// directions ended, a moment after the client is done), or the last stats after 5 s.
fn stats_when(agent: &Agent, settled: impl Fn(&Value) -> bool) -> Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let stats = agent.stats()?;
        if settled(&stats) || Instant::now() > deadline {
            return Ok(stats);
        }
        thread::sleep(Duration::from_millis(50));
    }
}

fn closed(stats: &Value, pod: &Pod, destination: &str) -> u64 {
    flow(stats, pod, destination)
        .and_then(|f| f["closed"].as_u64())
        .unwrap_or(0)
}

fn tunnels(stats: &Value, name: &str) -> u64 {
    stats["tunnels"][name].as_u64().unwrap_or(0)
}

fn inbound(stats: &Value, pod: &Pod, name: &str) -> u64 {
    stats["inbound"][format!("lab/{}", pod.name)][name]
        .as_u64()
        .unwrap_or(0)
}

/// Serves a page with a marker no other traffic contains.
fn secret_page(pod: &Pod, marker: &str) -> Result<()> {
    fs::write(pod.dir.join("www/secret.html"), format!("{marker}\n"))?;
    Ok(())
}

fn probe(from: &Node, args: &[&str]) -> Result<String> {
    let out = from
        .command(env!("CARGO_BIN_EXE_tunnel-probe"))?
        .args(args)
        .output()
        .context("running tunnel-probe")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("outcome: "))
        .map(str::to_owned)
        .with_context(|| {
            format!(
                "tunnel-probe printed no outcome: {stdout} {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
}

/// Writes a leaf certificate for `spiffe` valid over [not_before, not_after] into `dir`.
fn leaf(
    ca: &TestCa,
    dir: &Path,
    spiffe: &str,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<(PathBuf, PathBuf)> {
    fs::create_dir_all(dir)?;
    let (cert, key) = ca.issue(spiffe, not_before, not_after)?;
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    fs::write(&cert_path, cert)?;
    fs::write(&key_path, key)?;
    Ok((cert_path, key_path))
}

fn log_lines_with(agent: &Agent, needle: &str) -> usize {
    agent.log().lines().filter(|l| l.contains(needle)).count()
}

struct Capture(Child, PathBuf);

impl Capture {
    /// Records every TCP packet between `node` and the wire.
    fn start(lab: &Lab, node: &Node) -> Result<Self> {
        let file = lab.dir.join("wire.pcap");
        let child = lab
            .wire_command("tcpdump")?
            .args([
                "-i",
                &node.wire_port(),
                "--immediate-mode",
                "-U",
                "-s",
                "0",
                "-w",
            ])
            .arg(&file)
            .arg("tcp")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting tcpdump (run `cargo xtask setup`)")?;
        // tcpdump creates the file once it listens; immediate mode writes packets as they come,
        // not when a ring-buffer block times out (a stop would lose the last block).
        let deadline = Instant::now() + Duration::from_secs(10);
        while !file.exists() {
            ensure!(Instant::now() < deadline, "tcpdump did not start");
            thread::sleep(Duration::from_millis(50));
        }
        thread::sleep(Duration::from_millis(300));
        Ok(Self(child, file))
    }

    /// Stops the capture and returns the raw bytes captured.
    fn stop(mut self) -> Result<Vec<u8>> {
        thread::sleep(Duration::from_millis(300));
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGINT) };
        self.0.wait()?;
        Ok(fs::read(&self.1)?)
    }
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

#[test]
fn tunnels_carry_traffic_encrypted_and_apps_see_the_client() -> Result<()> {
    let (lab, _ca, mut mesh) = mesh_lab("mtls", 2)?;
    let (a1, a2, b1, b2) = (
        lab.pod("a1")?,
        lab.pod("a2")?,
        lab.pod("b1")?,
        lab.pod("b2")?,
    );
    let _nginx = (b1.start_nginx()?, b2.start_nginx()?);
    secret_page(b1, "RESPONSE-MARKER-7f3a")?;
    // a2 and b2 stay out of the mesh: a2's plaintext request is the capture's positive control,
    // b2 a destination outside the mesh.
    mesh.workloads
        .retain(|w| w.pod.name != "a2" && w.pod.name != "b2");
    let (client_agent, server_agent) = start_agents(&lab, &mesh, &[a1, b1])?;

    let capture = Capture::start(&lab, lab.node("b")?)?;
    let body = fetch(
        a1,
        &format!("http://{}/secret.html?q=REQUEST-MARKER-91c2", b1.ip),
    )?;
    let plain = fetch(
        a2,
        &format!("http://{}/secret.html?q=PLAINTEXT-MARKER-44d0", b1.ip),
    )?;
    let wire = capture.stop()?;
    // A meshed pod reaches a workload outside the mesh as plain TCP.
    ensure!(fetch(a1, &format!("http://{}/", b2.ip))? == "hello from b2\n");

    ensure!(body == "RESPONSE-MARKER-7f3a\n", "body mangled: {body:?}");
    ensure!(plain == body, "plaintext client got {plain:?}");
    ensure!(
        contains(&wire, "PLAINTEXT-MARKER-44d0"),
        "the capture missed the plaintext request: it proves nothing"
    );
    ensure!(
        !contains(&wire, "REQUEST-MARKER-91c2"),
        "the meshed request crossed the wire in clear"
    );
    // The response marker went by in clear once, to the plaintext client: count it.
    let clear_responses = wire
        .windows(b"RESPONSE-MARKER-7f3a".len())
        .filter(|w| *w == b"RESPONSE-MARKER-7f3a")
        .count();
    ensure!(
        clear_responses == 1,
        "the response crossed in clear {clear_responses} times"
    );
    let tunnel_bytes = lab
        .wire_command("tcpdump")?
        .args(["-nn", "-r"])
        .arg(lab.dir.join("wire.pcap"))
        .arg(format!("tcp port {TUNNEL_PORT}"))
        .output()?;
    ensure!(
        !tunnel_bytes.stdout.is_empty(),
        "no packets on the tunnel port"
    );

    let clients = b1.nginx_clients()?;
    ensure!(
        clients == vec![a1.ip.to_string(), a2.ip.to_string()],
        "nginx saw {clients:?}"
    );
    let (to_b1, to_b2) = (format!("{}:80", b1.ip), format!("{}:80", b2.ip));
    let stats = stats_when(&client_agent, |s| {
        closed(s, a1, &to_b1) == 1 && closed(s, a1, &to_b2) == 1
    })?;
    let f = flow(&stats, a1, &to_b1).context("no flow a1 -> b1")?;
    ensure!(f["transport"] == "mtls" && f["closed"] == 1, "flow: {f}");
    let f = flow(&stats, a1, &to_b2).context("no flow a1 -> b2")?;
    ensure!(
        f["transport"] == "plaintext" && f["closed"] == 1,
        "flow: {f}"
    );
    ensure!(
        tunnels(&stats, "client_handshakes") == 1,
        "{}",
        stats["tunnels"]
    );
    let stats = server_agent.stats()?;
    ensure!(inbound(&stats, b1, "mtls") == 1, "{}", stats["inbound"]);
    ensure!(
        inbound(&stats, b1, "plaintext") == 1,
        "{}",
        stats["inbound"]
    );
    Ok(())
}

#[test]
fn a_missing_or_invalid_mesh_ca_stops_start_up() -> Result<()> {
    let (lab, ca, mut mesh) = mesh_lab("badca", 1)?;
    let node = lab.node("a")?;
    let a1 = lab.pod("a1")?;
    mesh.ca_cert = lab.dir.join("nowhere/ca.pem");
    let err = Agent::start_with(&lab, node, &mesh.config_yaml(node, &[a1]), &[a1])
        .err()
        .context("the agent started without its CA")?;
    ensure!(format!("{err:#}").contains("nowhere/ca.pem"), "{err:#}");
    // A workload certificate is not a CA.
    let now = OffsetDateTime::now_utc();
    let (leaf_cert, leaf_key) = leaf(
        &ca,
        &lab.dir.join("leaf"),
        &identity(a1),
        now,
        now + time::Duration::hours(1),
    )?;
    (mesh.ca_cert, mesh.ca_key) = (leaf_cert, leaf_key);
    let err = Agent::start_with(&lab, node, &mesh.config_yaml(node, &[a1]), &[a1])
        .err()
        .context("the agent started with a leaf as its CA")?;
    ensure!(format!("{err:#}").contains("not a CA"), "{err:#}");
    Ok(())
}

#[test]
fn strict_rejects_plaintext_and_permissive_delivers_it() -> Result<()> {
    let (lab, _ca, mut mesh) = mesh_lab("strict", 2)?;
    let (a1, a2, b1, b2) = (
        lab.pod("a1")?,
        lab.pod("a2")?,
        lab.pod("b1")?,
        lab.pod("b2")?,
    );
    let _nginx = (b1.start_nginx()?, b2.start_nginx()?);
    mesh.workload_mut("b1")?.inbound_mode = "STRICT";
    let (_client_agent, server_agent) = start_agents(&lab, &mesh, &[a1, b1, b2])?;

    let rejected = curl(a2, &format!("http://{}/", b1.ip))?;
    ensure!(
        rejected.exit_code != Some(0),
        "STRICT let plaintext through: {}",
        rejected.body
    );
    ensure!(
        b1.nginx_clients()?.is_empty(),
        "the STRICT app saw a plaintext client"
    );
    ensure!(fetch(a2, &format!("http://{}/", b2.ip))? == "hello from b2\n");
    ensure!(b2.nginx_clients()? == vec![a2.ip.to_string()]);
    // The meshed client still reaches the STRICT workload, through the tunnel.
    ensure!(fetch(a1, &format!("http://{}/", b1.ip))? == "hello from b1\n");
    ensure!(b1.nginx_clients()? == vec![a1.ip.to_string()]);
    // The node itself (the kubelet's probes) is let through in plaintext.
    let node_b = lab.node("b")?;
    let from_node = node_b
        .command("curl")?
        .args(["-sS", "--max-time", "5", &format!("http://{}/", b1.ip)])
        .output()?;
    ensure!(
        String::from_utf8_lossy(&from_node.stdout) == "hello from b1\n",
        "the node's plaintext probe of a STRICT pod failed: {}",
        String::from_utf8_lossy(&from_node.stderr)
    );
    let clients = b1.nginx_clients()?;
    ensure!(
        clients.len() == 2 && clients[1] != a2.ip.to_string() && clients[1] != a1.ip.to_string(),
        "the probe did not come from the node: {clients:?}"
    );

    let stats = server_agent.stats()?;
    ensure!(
        inbound(&stats, b1, "plaintext_rejected") == 1,
        "{}",
        stats["inbound"]
    );
    ensure!(inbound(&stats, b1, "mtls") == 1, "{}", stats["inbound"]);
    ensure!(
        inbound(&stats, b1, "plaintext") == 1,
        "{}",
        stats["inbound"]
    );
    ensure!(
        inbound(&stats, b2, "plaintext") == 1,
        "{}",
        stats["inbound"]
    );
    ensure!(
        stats["ebpf"]["inbound_steered"].as_u64() >= Some(2),
        "{}",
        stats["ebpf"]
    );
    ensure!(log_lines_with(&server_agent, "plaintext connection rejected (STRICT)") == 1);
    Ok(())
}

#[test]
fn untrusted_certificates_and_wrong_identities_are_rejected() -> Result<()> {
    let (lab, ca, mut mesh) = mesh_lab("certs", 2)?;
    let (a1, b1) = (lab.pod("a1")?, lab.pod("b1")?);
    let _nginx = b1.start_nginx()?;
    let (mut client_agent, server_agent) = start_agents(&lab, &mesh, &[a1, b1])?;
    let node_a = lab.node("a")?;
    let tunnel = format!("{}:{TUNNEL_PORT}", b1.ip);
    let target = format!("{}:80", b1.ip);
    let now = OffsetDateTime::now_utc();
    let hour = time::Duration::hours(1);
    let certs = lab.dir.join("probe-certs");

    let connect = |dir: &str, cert: &(PathBuf, PathBuf), extra: &[&str]| -> Result<String> {
        let (c, k) = (cert.0.to_string_lossy(), cert.1.to_string_lossy());
        let mut args = vec![
            tunnel.as_str(),
            "connect",
            target.as_str(),
            "--cert",
            &c,
            "--key",
            &k,
        ];
        args.extend_from_slice(extra);
        probe(node_a, &args).with_context(|| format!("probe with {dir}"))
    };

    // Control: a valid certificate for a1's identity, speaking for a1, reaches the app.
    let valid = leaf(
        &ca,
        &certs.join("valid"),
        &identity(a1),
        now - hour,
        now + hour,
    )?;
    let outcome = connect("valid", &valid, &["--forwarded", &a1.ip.to_string()])?;
    ensure!(
        outcome.starts_with("reached the app: HTTP/1.1 200"),
        "control: {outcome}"
    );

    let other_ca = TestCa::new("another CA")?;
    let foreign = leaf(
        &other_ca,
        &certs.join("foreign"),
        &identity(a1),
        now - hour,
        now + hour,
    )?;
    let outcome = connect("another CA", &foreign, &[])?;
    ensure!(outcome.contains("failed"), "another CA: {outcome}");

    let expired = leaf(
        &ca,
        &certs.join("expired"),
        &identity(a1),
        now - hour * 2,
        now - hour,
    )?;
    let outcome = connect("expired", &expired, &[])?;
    ensure!(outcome.contains("failed"), "expired: {outcome}");

    // A valid identity speaking for a pod of another identity (a2) is refused per stream.
    let outcome = connect(
        "forged source",
        &valid,
        &["--forwarded", &lab.pod("a2")?.ip.to_string()],
    )?;
    ensure!(outcome == "status 403", "forged source: {outcome}");

    ensure!(
        b1.nginx_clients()? == vec![a1.ip.to_string()],
        "only the control request may reach the app: {:?}",
        b1.nginx_clients()?
    );
    let stats = server_agent.stats()?;
    ensure!(
        tunnels(&stats, "rejected_handshakes") == 2,
        "{}",
        stats["tunnels"]
    );
    ensure!(
        tunnels(&stats, "rejected_streams") == 1,
        "{}",
        stats["tunnels"]
    );
    ensure!(log_lines_with(&server_agent, "tunnel handshake rejected") == 2);

    // The client side: b1 is not who node a's agent expects at that address.
    mesh.workload_mut("b1")?.service_account = "sa-impostor".into();
    client_agent.rewrite_config(&mesh.config_yaml(node_a, &[a1]), &[a1])?;
    let refused = curl(a1, &format!("http://{}/", b1.ip))?;
    ensure!(
        refused.exit_code != Some(0),
        "a wrong server identity was accepted"
    );
    let expected = spiffe_id(TRUST_DOMAIN, "lab", "sa-impostor");
    ensure!(
        log_lines_with(&client_agent, &expected) >= 1,
        "the client agent did not log the identity mismatch:\n{}",
        client_agent.log()
    );
    ensure!(
        b1.nginx_clients()?.len() == 1,
        "the impostor case reached the app"
    );
    Ok(())
}

#[test]
fn a_deny_policy_blocks_exactly_the_selected_identity() -> Result<()> {
    let (lab, _ca, mut mesh) = mesh_lab("deny", 2)?;
    let (a1, a2, b1) = (lab.pod("a1")?, lab.pod("a2")?, lab.pod("b1")?);
    let _nginx = b1.start_nginx()?;
    mesh.workload_mut("b1")?.labels = "{app: web}";
    mesh.policies = format!(
        "  - metadata: {{name: no-a1, namespace: lab}}\n    spec:\n      selector: {{matchLabels: {{app: web}}}}\n      action: DENY\n      rules:\n        - from: [{{source: {{principals: [\"{}\"]}}}}]\n",
        identity(a1)
    );
    let (_client_agent, server_agent) = start_agents(&lab, &mesh, &[a1, a2, b1])?;

    let denied = curl(a1, &format!("http://{}/", b1.ip))?;
    ensure!(
        denied.exit_code != Some(0),
        "the denied identity got through"
    );
    ensure!(fetch(a2, &format!("http://{}/", b1.ip))? == "hello from b1\n");
    ensure!(b1.nginx_clients()? == vec![a2.ip.to_string()]);
    let stats = server_agent.stats()?;
    ensure!(inbound(&stats, b1, "denied") == 1, "{}", stats["inbound"]);
    ensure!(inbound(&stats, b1, "mtls") == 1, "{}", stats["inbound"]);
    let log = server_agent.log();
    ensure!(
        log.lines().any(|l| l.contains("denied by policy")
            && l.contains(&identity(a1))
            && l.contains(&identity(b1))
            && l.contains("lab/no-a1")),
        "no denial log line with both identities:\n{log}"
    );
    Ok(())
}

fn serials(stats: &Value) -> Vec<(String, u64)> {
    stats["certificates"]
        .as_array()
        .map(|certs| {
            certs
                .iter()
                .map(|c| {
                    (
                        c["identity"].as_str().unwrap_or_default().to_owned(),
                        c["issued"].as_u64().unwrap_or(0),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn certificates_rotate_under_traffic_without_failed_requests() -> Result<()> {
    let (lab, _ca, mut mesh) = mesh_lab("rotate", 1)?;
    let (a1, b1) = (lab.pod("a1")?, lab.pod("b1")?);
    let _nginx = b1.start_nginx()?;
    mesh.identity_extra = "  cert_lifetime_s: 4\n  renew_fraction: 0.5\n".into();
    let (client_agent, server_agent) = start_agents(&lab, &mesh, &[a1, b1])?;

    let url = format!("http://{}/", b1.ip);
    let deadline = Instant::now() + Duration::from_secs(9);
    let mut requests = 0;
    while Instant::now() < deadline {
        let result = curl(a1, &url)?;
        ensure!(
            result.exit_code == Some(0) && result.body == "hello from b1\n",
            "request {requests} failed during rotation: {:?} {}",
            result.exit_code,
            result.stderr
        );
        requests += 1;
    }
    let to_b1 = format!("{}:80", b1.ip);
    let client = stats_when(&client_agent, |s| closed(s, a1, &to_b1) == requests)?;
    let server = server_agent.stats()?;
    // 9 s at a renewal every 2 s: at least 4 certificates per identity.
    for (stats, pod) in [(&client, a1), (&server, b1)] {
        let issued = serials(stats)
            .into_iter()
            .find(|(id, _)| *id == identity(pod))
            .map(|(_, issued)| issued);
        ensure!(issued >= Some(4), "{}: issued {issued:?}", pod.name);
    }
    // New certificates were used: connections opened with them, not only issued.
    ensure!(
        tunnels(&client, "client_handshakes") >= 3,
        "{}",
        client["tunnels"]
    );
    let f = flow(&client, a1, &format!("{}:80", b1.ip)).context("no flow")?;
    ensure!(
        f["failed"] == 0 && f["closed"] == requests,
        "flow {f} after {requests}"
    );
    Ok(())
}

#[test]
fn a_thousand_streams_share_one_tunnel_connection() -> Result<()> {
    const STREAMS: usize = 1000;
    let (lab, _ca, mesh) = mesh_lab("pool", 1)?;
    let (a1, b1) = (lab.pod("a1")?, lab.pod("b1")?);
    let _nginx = b1.start_nginx()?;
    let (client_agent, server_agent) = start_agents(&lab, &mesh, &[a1, b1])?;
    for n in 1..=STREAMS {
        fs::write(b1.dir.join(format!("www/{n}")), format!("page {n}\n"))?;
    }
    let held_connections = HeldConnections::open(
        a1,
        env!("CARGO_BIN_EXE_held-connections"),
        &format!("{}:80", b1.ip),
        STREAMS,
    )?;
    // All connections are open at once: as many streams are open on the tunnel.
    let to_b1 = format!("{}:80", b1.ip);
    let held = stats_when(&client_agent, |s| {
        flow(s, a1, &to_b1).and_then(|f| f["active"].as_u64()) == Some(STREAMS as u64)
    })?;
    let f = flow(&held, a1, &to_b1).context("no flow")?;
    ensure!(f["active"] == STREAMS, "not all streams open at once: {f}");
    held_connections.finish()?;
    let client = client_agent.stats()?;
    let f = flow(&client, a1, &format!("{}:80", b1.ip)).context("no flow")?;
    ensure!(f["opened"] == STREAMS && f["failed"] == 0, "flow {f}");
    ensure!(
        tunnels(&client, "client_handshakes") == 1,
        "{}",
        client["tunnels"]
    );
    let server = server_agent.stats()?;
    ensure!(
        tunnels(&server, "server_handshakes") == 1,
        "{}",
        server["tunnels"]
    );
    ensure!(inbound(&server, b1, "mtls") == STREAMS as u64);
    Ok(())
}

#[test]
fn the_tunnel_port_survives_hostile_clients() -> Result<()> {
    let (lab, ca, mesh) = mesh_lab("rogue", 1)?;
    let (a1, b1) = (lab.pod("a1")?, lab.pod("b1")?);
    let _nginx = b1.start_nginx()?;
    let (_client_agent, server_agent) = start_agents(&lab, &mesh, &[a1, b1])?;
    let node_a = lab.node("a")?;
    let tunnel = format!("{}:{TUNNEL_PORT}", b1.ip);
    let now = OffsetDateTime::now_utc();
    let hour = time::Duration::hours(1);
    let valid = leaf(
        &ca,
        &lab.dir.join("probe"),
        &identity(a1),
        now - hour,
        now + hour,
    )?;
    let (cert, key) = (valid.0.to_string_lossy(), valid.1.to_string_lossy());

    let garbage = probe(node_a, &[&tunnel, "garbage"])?;
    ensure!(garbage.starts_with("closed"), "garbage: {garbage}");
    let truncated = probe(node_a, &[&tunnel, "truncated-hello"])?;
    ensure!(
        truncated.starts_with("closed"),
        "truncated hello: {truncated}"
    );
    // a1 lives on node a: not a workload the agent on node b may deliver to.
    let elsewhere = format!("{}:80", a1.ip);
    let outcome = probe(
        node_a,
        &[
            &tunnel, "connect", &elsewhere, "--cert", &cert, "--key", &key,
        ],
    )?;
    ensure!(
        outcome == "status 404",
        "CONNECT to a non-local address: {outcome}"
    );
    let target = format!("{}:80", b1.ip);
    let outcome = probe(
        node_a,
        &[
            &tunnel,
            "connect",
            &target,
            "--cert",
            &cert,
            "--key",
            &key,
            "--header-bytes",
            "65536",
        ],
    )?;
    ensure!(
        !outcome.starts_with("reached the app"),
        "oversized header: {outcome}"
    );

    ensure!(
        b1.nginx_clients()?.is_empty(),
        "a hostile client reached the app"
    );
    ensure!(log_lines_with(&server_agent, "tunnel handshake rejected") == 2);
    ensure!(log_lines_with(&server_agent, "not a workload on this node") == 1);
    ensure!(
        log_lines_with(&server_agent, "oversized")
            + log_lines_with(&server_agent, "protocol error")
            >= 1,
        "no log line for the oversized header:\n{}",
        server_agent.log()
    );
    // And the agent still serves.
    ensure!(fetch(a1, &format!("http://{}/", b1.ip))? == "hello from b1\n");
    Ok(())
}

#[test]
fn a_workload_leaving_and_joining_the_mesh_under_traffic_loses_no_request() -> Result<()> {
    // More than the switches take: the traffic is stopped once they are done.
    const REQUESTS: usize = 1_000_000;
    let (lab, _ca, mesh) = mesh_lab("mflip", 2)?;
    let (node_a, node_b) = (lab.node("a")?, lab.node("b")?);
    let (a1, a2, b1) = (lab.pod("a1")?, lab.pod("a2")?, lab.pod("b1")?);
    let _nginx = b1.start_nginx()?;
    let mut without_b1 = mesh.clone();
    without_b1.workloads.retain(|w| w.pod.name != b1.name);
    let (mut agent_a, mut agent_b) = start_agents(&lab, &mesh, &[a1, b1])?;

    // A meshed client (tunnel while b1 is meshed, plaintext while not) and an unmeshed one
    // (steered to b's agent while b1 is meshed), each one new connection per request.
    let url = format!("http://{}/", b1.ip);
    let traffic: Vec<Child> = [a1, a2]
        .iter()
        .map(|client| requests_back_to_back(client, &url, REQUESTS))
        .collect::<Result<_>>()?;
    // Each switch reaches both agents together: connections redirected or steered a moment
    // before one agent lets b1 go still arrive at the other's listeners.
    for _ in 0..4 {
        for (mesh, b_enrolled) in [(&without_b1, &[][..]), (&mesh, &[b1][..])] {
            rewrite_configs(&mut [
                (&mut agent_a, &mesh.config_yaml(node_a, &[a1]), &[a1]),
                (
                    &mut agent_b,
                    &mesh.config_yaml(node_b, b_enrolled),
                    b_enrolled,
                ),
            ])?;
            thread::sleep(Duration::from_millis(150));
        }
    }
    for (client, mut curl) in [a1, a2].iter().zip(traffic) {
        ensure!(
            curl.try_wait()?.is_none(),
            "{}: the traffic ended before the switches did",
            client.name
        );
        // SAFETY: signalling our own child; the request in flight then is not reported.
        unsafe { libc::kill(curl.id() as i32, libc::SIGTERM) };
        let out = curl.wait_with_output()?;
        let codes = String::from_utf8_lossy(&out.stdout);
        let failed: Vec<&str> = codes.lines().filter(|code| *code != "200").collect();
        ensure!(
            codes.lines().count() >= 500 && failed.is_empty(),
            "{}: {} of {} requests failed ({failed:?}): {}\nagent a:\n{}\nagent b:\n{}",
            client.name,
            failed.len(),
            codes.lines().count(),
            String::from_utf8_lossy(&out.stderr),
            agent_a.log(),
            agent_b.log()
        );
    }
    let stats = agent_b.stats()?;
    ensure!(
        inbound(&stats, b1, "mtls") > 0 && inbound(&stats, b1, "plaintext") > 0,
        "b1 was not reached both through the tunnel and steered: {}",
        stats["inbound"]
    );
    Ok(())
}

#[test]
fn idle_tunnels_are_closed_and_handshake_floods_are_shed() -> Result<()> {
    const FLOOD: usize = 600;
    let (lab, _ca, mut mesh) = mesh_lab("idle", 1)?;
    mesh.agent_extra = "  tunnel_idle_timeout_ms: 2000\n".to_owned();
    let (a1, b1) = (lab.pod("a1")?, lab.pod("b1")?);
    let _nginx = b1.start_nginx()?;
    let (client_agent, server_agent) = start_agents(&lab, &mesh, &[a1, b1])?;
    let url = format!("http://{}/", b1.ip);
    let tunnel_counter = |agent: &Agent, name: &str| -> Result<u64> {
        Ok(agent.stats()?["tunnels"][name].as_u64().unwrap_or(0))
    };

    // Idle: the server closes the connection; the client agent opens a new one when it needs it.
    ensure!(fetch(a1, &url)? == "hello from b1\n");
    let deadline = Instant::now() + Duration::from_secs(10);
    while tunnel_counter(&server_agent, "idle_closed")? == 0 {
        ensure!(
            Instant::now() < deadline,
            "the idle tunnel connection was not closed"
        );
        thread::sleep(Duration::from_millis(100));
    }
    ensure!(fetch(a1, &url)? == "hello from b1\n");
    ensure!(
        tunnel_counter(&client_agent, "client_handshakes")? == 2,
        "no new tunnel connection after the idle close: {}",
        client_agent.stats()?["tunnels"]
    );

    // A flood of connections that never say hello: past the cap they are closed at once, and
    // the pooled connection goes on serving.
    let mut flood = lab
        .node("a")?
        .command("bash")?
        .arg("-c")
        .arg(format!(
            "for i in $(seq {FLOOD}); do exec {{fd}}<>/dev/tcp/{}/{TUNNEL_PORT} || exit 1; done; sleep 30",
            b1.ip
        ))
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let wanted = (FLOOD - 512) as u64;
    let result = (|| -> Result<()> {
        while tunnel_counter(&server_agent, "shed_handshakes")? < wanted {
            ensure!(
                Instant::now() < deadline,
                "handshakes shed: {}",
                server_agent.stats()?["tunnels"]
            );
            ensure!(fetch(a1, &url)? == "hello from b1\n");
            thread::sleep(Duration::from_millis(100));
        }
        ensure!(fetch(a1, &url)? == "hello from b1\n");
        ensure!(
            tunnel_counter(&client_agent, "client_handshakes")? == 2,
            "the pooled tunnel connection did not carry the requests during the flood"
        );
        Ok(())
    })();
    let _ = flood.kill();
    let _ = flood.wait();
    result
}

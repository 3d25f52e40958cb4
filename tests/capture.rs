//! Lab tests of outbound capture and the L4 proxy (need root: namespaces, cgroups, eBPF).
use std::{
    collections::HashMap,
    fs,
    os::unix::fs::PermissionsExt,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use weft_lab_tests::{
    cgroup_program_ids, counter, curl, fetch, flow, program_loaded, requests_back_to_back,
    serve_count_in, serve_http_in, serve_reset_in, TestLab,
};
use xtask::{
    agent::{config_yaml, Agent},
    lab::{write_atomically, Lab, LabSpec, Pod},
};

/// Our four hooks: connect4, connect6, sockops, sock_release.
const ATTACHED_PROGRAMS: usize = 4;

fn url(pod: &Pod) -> String {
    format!("http://{}/", pod.ip)
}

/// Polls `check` until it holds or 10 s pass; an error (say, a stats read that failed) counts as
/// "not yet" and is reported if time runs out.
fn eventually(what: &str, mut check: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let last = match check() {
            Ok(true) => return Ok(()),
            Ok(false) => String::new(),
            Err(err) => format!(" (last error: {err:#})"),
        };
        ensure!(
            Instant::now() < deadline,
            "timed out waiting for {what}{last}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// The client addresses nginx logged, once it has logged `count` requests (it writes the line
/// after sending the response, so a test can get ahead of it).
fn nginx_clients(server: &Pod, count: usize) -> Result<Vec<String>> {
    eventually("nginx to log the requests", || {
        Ok(server.nginx_clients()?.len() >= count)
    })?;
    server.nginx_clients()
}

#[test]
fn cross_node_fetch_goes_through_the_agent_and_keeps_the_pod_ip() -> Result<()> {
    let lab = TestLab::up("tcross", 2, 2)?;
    let (a1, a2, b1) = (lab.pod("a1")?, lab.pod("a2")?, lab.pod("b1")?);
    let _nginx = b1.start_nginx()?;
    let agent = Agent::start(&lab, lab.node("a")?, &[a1])?;

    assert_eq!(fetch(a1, &url(b1))?, "hello from b1\n");
    let destination = format!("{}:80", b1.ip);
    eventually("the flow to close", || {
        Ok(flow(&agent.stats()?, a1, &destination).is_some_and(|f| f["closed"] == 1))
    })?;
    let stats = agent.stats()?;
    let a1_flow = flow(&stats, a1, &destination).context("no flow for a1 -> b1")?;
    assert_eq!(a1_flow["opened"], 1);
    assert_eq!(a1_flow["failed"], 0);
    assert!(
        a1_flow["bytes_sent"].as_u64() > Some(50),
        "request bytes counted: {a1_flow}"
    );
    assert!(
        a1_flow["bytes_received"].as_u64() > Some(100),
        "response bytes counted: {a1_flow}"
    );
    assert_eq!(counter(&stats, "redirected"), 1);
    assert_eq!(
        nginx_clients(b1, 1)?,
        vec![a1.ip.to_string()],
        "nginx must see the pod's own IP"
    );

    // A pod that is not enrolled reaches the same server directly; the agent sees nothing of it.
    assert_eq!(fetch(a2, &url(b1))?, "hello from b1\n");
    let stats = agent.stats()?;
    assert!(flow(&stats, a2, &destination).is_none());
    assert_eq!(counter(&stats, "redirected"), 1);
    assert!(counter(&stats, "not_enrolled") >= 1);
    assert_eq!(
        nginx_clients(b1, 2)?,
        vec![a1.ip.to_string(), a2.ip.to_string()]
    );
    Ok(())
}

#[test]
fn enrolling_and_releasing_a_running_pod_switches_capture_without_restarts() -> Result<()> {
    let lab = TestLab::up("tenrol", 2, 1)?;
    let (a1, b1) = (lab.pod("a1")?, lab.pod("b1")?);
    let _nginx = b1.start_nginx()?;
    let mut agent = Agent::start(&lab, lab.node("a")?, &[])?;
    let destination = format!("{}:80", b1.ip);
    let opened = |agent: &Agent| -> Result<u64> {
        Ok(flow(&agent.stats()?, a1, &destination)
            .and_then(|f| f["opened"].as_u64())
            .unwrap_or(0))
    };

    fetch(a1, &url(b1))?;
    assert_eq!(opened(&agent)?, 0, "not enrolled yet: direct");
    agent.set_enrolled(&[a1])?;
    fetch(a1, &url(b1))?;
    assert_eq!(opened(&agent)?, 1, "enrolled: captured");
    agent.set_enrolled(&[])?;
    fetch(a1, &url(b1))?;
    assert_eq!(opened(&agent)?, 1, "released: direct again");
    agent.set_enrolled(&[a1])?;
    fetch(a1, &url(b1))?;
    assert_eq!(opened(&agent)?, 2, "enrolled again: captured");
    let starts = agent.log().matches("eBPF programs attached").count();
    assert_eq!(starts, 1, "the agent was not restarted");
    assert_eq!(nginx_clients(b1, 4)?.len(), 4);
    Ok(())
}

#[test]
fn a_thousand_concurrent_connections_reach_the_right_destinations() -> Result<()> {
    const PER_PAIR: usize = 170;
    let lab = TestLab::up("tconc", 2, 3)?;
    let clients = [lab.pod("a1")?, lab.pod("a2")?, lab.pod("a3")?];
    let servers = [lab.pod("b1")?, lab.pod("b2")?, lab.pod("b3")?];
    let _nginx: Vec<_> = servers
        .iter()
        .map(|s| s.start_nginx())
        .collect::<Result<_>>()?;
    let agent = Agent::start(&lab, lab.node("a")?, &clients)?;

    // One curl process per (client pod, server pod), each with PER_PAIR parallel transfers on their
    // own connections: 1,530 connections from three pods to three servers, many at once.
    let mut batches = Vec::new();
    for client in clients {
        for server in servers {
            let out_dir = lab.dir.join(format!("out-{}-{}", client.name, server.name));
            fs::create_dir_all(&out_dir)?;
            let child = client
                .command("curl")?
                .args([
                    "-sS",
                    "--no-progress-meter",
                    "--parallel",
                    "--parallel-immediate",
                ])
                .args(["--parallel-max", &PER_PAIR.to_string()])
                .args(["-H", "Connection: close", "--max-time", "30"])
                .arg(format!("http://{}/?n=[1-{PER_PAIR}]", server.ip))
                .args(["-o", &format!("{}/#1", out_dir.display())])
                .stdout(Stdio::null())
                .spawn()?;
            batches.push((child, out_dir, server));
        }
    }
    for (mut child, out_dir, server) in batches {
        ensure!(child.wait()?.success(), "a curl batch failed");
        let bodies: Vec<String> = fs::read_dir(&out_dir)?
            .map(|entry| fs::read_to_string(entry?.path()).map_err(anyhow::Error::from))
            .collect::<Result<_>>()?;
        assert_eq!(bodies.len(), PER_PAIR);
        let expected = format!("hello from {}\n", server.name);
        assert!(
            bodies.iter().all(|b| *b == expected),
            "a response came from the wrong server"
        );
    }

    eventually("all flows to close and the maps to empty", || {
        let stats = agent.stats()?;
        let tracked = &stats["tracked_connections"];
        let all_closed = clients.iter().all(|client| {
            servers.iter().all(|server| {
                flow(&stats, client, &format!("{}:80", server.ip))
                    .is_some_and(|f| f["opened"] == PER_PAIR && f["closed"] == PER_PAIR)
            })
        });
        Ok(all_closed && tracked["connecting"] == 0 && tracked["established"] == 0)
    })?;
    let stats = agent.stats()?;
    assert_eq!(
        counter(&stats, "redirected"),
        (clients.len() * servers.len() * PER_PAIR) as u64
    );
    assert_eq!(counter(&stats, "tracking_full"), 0);
    for server in servers {
        let mut per_client: HashMap<String, usize> = HashMap::new();
        for ip in nginx_clients(server, clients.len() * PER_PAIR)? {
            *per_client.entry(ip).or_default() += 1;
        }
        for client in clients {
            let count = per_client.get(&client.ip.to_string());
            assert_eq!(count, Some(&PER_PAIR), "{per_client:?}");
        }
    }
    Ok(())
}

#[test]
fn sigkill_and_restart_attach_once_and_sigterm_leaves_nothing() -> Result<()> {
    let lab = TestLab::up("tlife", 2, 1)?;
    let (a1, b1) = (lab.pod("a1")?, lab.pod("b1")?);
    let _nginx = b1.start_nginx()?;
    let node = lab.node("a")?;
    assert!(cgroup_program_ids(&node.pods_cgroup)?.is_empty());

    let mut agent = Agent::start(&lab, node, &[a1])?;
    assert_eq!(
        cgroup_program_ids(&node.pods_cgroup)?.len(),
        ATTACHED_PROGRAMS
    );
    fetch(a1, &url(b1))?;
    agent.stop_with(libc::SIGKILL, Duration::from_secs(5))?;
    // The links are file descriptors: the kernel detaches them when the process dies.
    eventually("the killed agent's programs to detach", || {
        Ok(cgroup_program_ids(&node.pods_cgroup)?.is_empty())
    })?;
    assert_eq!(
        fetch(a1, &url(b1))?,
        "hello from b1\n",
        "without an agent the pod goes direct"
    );

    let mut agent = Agent::start(&lab, node, &[a1])?;
    let ids = cgroup_program_ids(&node.pods_cgroup)?;
    assert_eq!(ids.len(), ATTACHED_PROGRAMS, "attached once, not twice");
    fetch(a1, &url(b1))?;
    assert_eq!(
        counter(&agent.stats()?, "redirected"),
        1,
        "the restarted agent captures again"
    );

    let exit = agent.stop_with(libc::SIGTERM, Duration::from_secs(10))?;
    assert_eq!(
        exit,
        Some(0),
        "SIGTERM is a clean exit; log:\n{}",
        agent.log()
    );
    assert!(cgroup_program_ids(&node.pods_cgroup)?.is_empty());
    for id in ids {
        assert!(
            !program_loaded(id)?,
            "program {id} still loaded after SIGTERM"
        );
    }
    assert_eq!(fetch(a1, &url(b1))?, "hello from b1\n");
    Ok(())
}

#[test]
fn sigterm_drains_open_connections_within_the_grace_period() -> Result<()> {
    let lab = TestLab::up("tdrain", 2, 1)?;
    let (a1, b1) = (lab.pod("a1")?, lab.pod("b1")?);
    let _nginx = b1.start_nginx()?;
    let big = b1.dir.join("www/big");
    // Far larger than socket buffers can hold, so the proxy is still copying at SIGTERM.
    fs::write(&big, vec![b'x'; 64 * 1024 * 1024])?;
    let mut agent = Agent::start(&lab, lab.node("a")?, &[a1])?;

    // A slow download (1 MB/s) is in flight when the agent is told to stop.
    let download = a1
        .command("curl")?
        .args([
            "-sS",
            "--limit-rate",
            "1M",
            "--max-time",
            "30",
            "-o",
            "/dev/null",
            "-w",
            "%{size_download}",
        ])
        .arg(format!("http://{}/big", b1.ip))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let destination = format!("{}:80", b1.ip);
    eventually("the download to be flowing through the agent", || {
        let stats = agent.stats()?;
        Ok(flow(&stats, a1, &destination)
            .is_some_and(|f| f["active"] == 1 && f["bytes_received"].as_u64() > Some(0)))
    })?;
    let started = Instant::now();
    agent.stop_with(libc::SIGTERM, Duration::from_secs(10))?;
    let stopped_after = started.elapsed();
    let out = download.wait_with_output()?;
    // The drain period in the lab config is 3 s: the download (about a minute) is cut at its end.
    assert!(
        stopped_after >= Duration::from_millis(2500),
        "agent exited before draining: {stopped_after:?}, curl: {out:?}, log:\n{}",
        agent.log()
    );
    assert!(
        stopped_after < Duration::from_secs(6),
        "drain was not bounded: {stopped_after:?}"
    );
    let downloaded: u64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    assert!(
        downloaded > 2 * 1024 * 1024,
        "the connection kept flowing while draining: {downloaded}"
    );
    assert!(
        downloaded < 64 * 1024 * 1024,
        "the connection was cut when the drain period ended"
    );
    // Cut by a reset, not a clean end: curl reports "Recv failure: Connection reset by peer".
    assert_eq!(
        out.status.code(),
        Some(56),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        agent
            .log()
            .contains("closing connections still open after the drain period"),
        "{}",
        agent.log()
    );
    Ok(())
}

#[test]
fn bad_config_missing_netns_and_failing_upstreams_leave_everything_else_serving() -> Result<()> {
    let lab = TestLab::up("tbad", 2, 2)?;
    let (a1, a2, b1, b2) = (
        lab.pod("a1")?,
        lab.pod("a2")?,
        lab.pod("b1")?,
        lab.pod("b2")?,
    );
    let _nginx = b1.start_nginx()?;
    let node = lab.node("a")?;
    let ghost_netns = format!("weftlab-{}-ghost", lab.name);
    let good = config_yaml(node, &[a1], "");
    let with_ghost = format!(
        "{good}  - name: ghost\n    namespace: lab\n    netns: /var/run/netns/{ghost_netns}\n    ip: 10.201.9.9\n"
    );
    let mut agent = Agent::start_with(&lab, node, &with_ghost, &[a1])?;

    // A pod whose netns does not exist is reported with the reason; the others are served.
    let stats = agent.stats()?;
    let ghost = &stats["pods"]["lab/ghost"];
    assert_eq!(ghost["state"], "failed", "{stats}");
    assert!(
        ghost["error"]
            .as_str()
            .unwrap_or("")
            .contains("cannot open network namespace"),
        "{ghost}"
    );
    fetch(a1, &url(b1))?;
    // Once the namespace appears, the agent retries and enrolls it.
    xtask::run(Command::new("ip").args(["netns", "add", &ghost_netns]))?;
    eventually("the ghost pod to be enrolled on retry", || {
        Ok(agent.stats()?["pods"]["lab/ghost"]["state"] == "enrolled")
    })?;

    // Garbage and a misspelt key are rejected with the entry named; nothing changes.
    write_atomically(agent.config_path(), "pods: [ {{{ not yaml")?;
    write_atomically(
        agent.config_path(),
        &good.replace("    netns:", "    netnz:"),
    )?;
    eventually("the rejection to be logged", || {
        Ok(agent.log().contains("pods[0]: unknown field `netnz`"))
    })?;
    assert!(agent
        .log()
        .contains("config rejected; the running state is unchanged"));
    let enrolled = agent.enrolled_pods()?;
    assert!(
        enrolled.contains(&"a1".to_owned()) && enrolled.contains(&"ghost".to_owned()),
        "{enrolled:?}"
    );
    fetch(a1, &url(b1))?;

    // An enrolled pod whose netns is deleted can still be released, and the others keep going.
    agent.set_enrolled(&[a1, a2])?;
    xtask::run(Command::new("ip").args(["netns", "del", &a2.netns]))?;
    fetch(a1, &url(b1))?;
    agent.set_enrolled(&[a1])?;
    fetch(a1, &url(b1))?;

    // Refused upstream: the client sees a failure at once, the agent counts it and carries on.
    let refused = curl(a1, &format!("http://{}:81/", b1.ip))?;
    assert!(
        refused.exit_code == Some(7) || refused.exit_code == Some(56),
        "curl: {:?} {}",
        refused.exit_code,
        refused.stderr
    );
    let stats = agent.stats()?;
    assert_eq!(
        flow(&stats, a1, &format!("{}:81", b1.ip)).map(|f| f["failed"].clone()),
        Some(1.into())
    );
    assert!(agent.log().contains("upstream connect failed"));

    // Upstream reset mid-request: passed on to the client as a reset.
    serve_reset_in(b2, "0.0.0.0:9000".parse()?)?;
    let reset = curl(a1, &format!("http://{}:9000/", b2.ip))?;
    assert_eq!(
        reset.exit_code,
        Some(56),
        "curl should see a reset: {}",
        reset.stderr
    );
    assert_eq!(fetch(a1, &url(b1))?, "hello from b1\n");
    xtask::run(Command::new("ip").args(["netns", "del", &ghost_netns]))?;
    Ok(())
}

#[test]
fn loopback_ipv6_and_v4_mapped_connects_behave() -> Result<()> {
    let lab = TestLab::up("tv6", 2, 1)?;
    let (a1, b1) = (lab.pod("a1")?, lab.pod("b1")?);
    let _nginx = b1.start_nginx()?;
    let agent = Agent::start(&lab, lab.node("a")?, &[a1])?;
    serve_http_in(a1, "127.0.0.1:8080".parse()?, "v4 loopback")?;
    serve_http_in(a1, "[::1]:8080".parse()?, "v6 loopback")?;

    assert_eq!(fetch(a1, "http://127.0.0.1:8080/")?, "v4 loopback");
    assert_eq!(fetch(a1, "http://[::1]:8080/")?, "v6 loopback");
    let stats = agent.stats()?;
    assert_eq!(
        counter(&stats, "redirected"),
        0,
        "loopback is never captured"
    );
    assert!(counter(&stats, "excluded") >= 1);
    assert!(counter(&stats, "ipv6_passthrough") >= 1);

    // A dual-stack socket reaching an IPv4 peer through a v4-mapped address is captured too.
    assert_eq!(
        fetch(a1, &format!("http://[::ffff:{}]/", b1.ip))?,
        "hello from b1\n"
    );
    let stats = agent.stats()?;
    assert_eq!(counter(&stats, "redirected"), 1);
    assert!(flow(&stats, a1, &format!("{}:80", b1.ip)).is_some());
    assert_eq!(nginx_clients(b1, 1)?, vec![a1.ip.to_string()]);
    Ok(())
}

#[test]
fn excluded_ports_and_cidrs_are_not_captured() -> Result<()> {
    let lab = TestLab::up("texcl", 2, 2)?;
    let (a1, b1, b2) = (lab.pod("a1")?, lab.pod("b1")?, lab.pod("b2")?);
    let _servers = (b1.start_nginx()?, b2.start_nginx()?);
    serve_http_in(b1, "0.0.0.0:8443".parse()?, "excluded port")?;
    let node = lab.node("a")?;
    let settings = format!("  exclude_ports: [8443]\n  exclude_cidrs: [{}/32]\n", b2.ip);
    let agent = Agent::start_with(&lab, node, &config_yaml(node, &[a1], &settings), &[a1])?;

    assert_eq!(
        fetch(a1, &format!("http://{}:8443/", b1.ip))?,
        "excluded port"
    );
    assert_eq!(fetch(a1, &url(b2))?, "hello from b2\n");
    assert_eq!(counter(&agent.stats()?, "redirected"), 0);
    assert_eq!(counter(&agent.stats()?, "excluded"), 2);
    fetch(a1, &url(b1))?;
    assert_eq!(
        counter(&agent.stats()?, "redirected"),
        1,
        "other destinations are still captured"
    );
    Ok(())
}

#[test]
fn startup_fails_fast_with_a_clear_message() -> Result<()> {
    let lab = TestLab::up("tstart", 1, 1)?;
    let binary = xtask::agent::weft_binary();
    let run_with = |config: &str| -> Result<(bool, String)> {
        let path = lab.dir.join("startup.yaml");
        fs::write(&path, config)?;
        let out = Command::new(&binary)
            .args(["run", "--config", &path.to_string_lossy()])
            .output()?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    };
    let (ok, err) = run_with("agent:\n  cgroup_path: /nonexistent/cgroup\n")?;
    assert!(
        !ok && err.contains("cgroup path /nonexistent/cgroup does not exist"),
        "{err}"
    );
    let (ok, err) = run_with("agent:\n  cgroup_path: /proc\n")?;
    assert!(
        !ok && err.contains("not on a cgroup v2 filesystem"),
        "{err}"
    );
    let (ok, err) = run_with("pods: 42\n")?;
    assert!(!ok && err.contains("invalid configuration"), "{err}");

    // Not root: refused before touching anything. The copy sits where an unprivileged user can
    // execute it, wherever the checkout is.
    let unprivileged_copy = lab.dir.join("weft-unprivileged");
    fs::copy(&binary, &unprivileged_copy)?;
    fs::set_permissions(&lab.dir, fs::Permissions::from_mode(0o755))?;
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&unprivileged_copy)
        .arg("run")
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("must run as root"),
        "{err}"
    );
    Ok(())
}

#[test]
fn half_close_passes_through_the_proxy() -> Result<()> {
    const BYTES: usize = 3 * 1024 * 1024;
    let lab = TestLab::up("thalf", 2, 1)?;
    let (a1, b1) = (lab.pod("a1")?, lab.pod("b1")?);
    serve_count_in(b1, "0.0.0.0:7000".parse()?)?;
    let agent = Agent::start(&lab, lab.node("a")?, &[a1])?;

    // The server answers only after it sees the client's end of stream, which must cross the proxy
    // while the other direction stays open for the reply.
    let out = a1
        .command(env!("CARGO_BIN_EXE_half-close-client"))?
        .args([format!("{}:7000", b1.ip), BYTES.to_string()])
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("received {BYTES} bytes")
    );
    let stats = agent.stats()?;
    let half = flow(&stats, a1, &format!("{}:7000", b1.ip)).context("flow not counted")?;
    assert_eq!(half["bytes_sent"], BYTES);
    Ok(())
}

#[test]
fn lab_down_removes_everything_after_a_crash() -> Result<()> {
    xtask::require_root("lab tests")?;
    let spec = LabSpec {
        name: "tcrash".into(),
        nodes: 2,
        pods_per_node: 2,
    };
    let lab = Lab::up(&spec)?;
    let b1 = lab.pod("b1")?;
    // Leave processes running as a crashed run would: nothing is stopped before `down`.
    let nginx = b1.start_nginx()?;
    let agent = Agent::start(&lab, lab.node("a")?, &[lab.pod("a1")?])?;
    let pids = [nginx.id(), agent.pid().context("agent has no pid")?];
    std::mem::forget(agent);

    Lab::down(&spec.name)?;
    let leftovers: Vec<String> = fs::read_dir("/var/run/netns")?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .filter(|name| name.starts_with("weftlab-tcrash-"))
        .collect();
    assert!(leftovers.is_empty(), "namespaces left: {leftovers:?}");
    assert!(!lab.cgroup_root.exists(), "cgroup tree left");
    assert!(!lab.dir.exists(), "lab files left");
    for pid in pids {
        let state = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        assert!(
            state.is_empty() || state.contains(") Z"),
            "process {pid} survived: {state}"
        );
    }
    // Tearing down what is already gone is fine.
    Lab::down(&spec.name)?;
    Ok(())
}

#[test]
fn toggling_enrollment_under_continuous_traffic_loses_no_request() -> Result<()> {
    const REQUESTS: usize = 3000;
    let lab = TestLab::up("tflip", 2, 1)?;
    let (a1, b1) = (lab.pod("a1")?, lab.pod("b1")?);
    let _nginx = b1.start_nginx()?;
    let mut agent = Agent::start(&lab, lab.node("a")?, &[a1])?;

    // One new connection per request, back to back, while capture is switched on and off.
    let traffic = requests_back_to_back(a1, &format!("http://{}/", b1.ip), REQUESTS)?;
    for _ in 0..4 {
        agent.set_enrolled(&[])?;
        thread::sleep(Duration::from_millis(100));
        agent.set_enrolled(&[a1])?;
        thread::sleep(Duration::from_millis(100));
    }
    let out = traffic.wait_with_output()?;
    let codes = String::from_utf8_lossy(&out.stdout);
    let failed: Vec<&str> = codes.lines().filter(|code| *code != "200").collect();
    assert_eq!(codes.lines().count(), REQUESTS);
    assert!(
        failed.is_empty(),
        "{} requests failed: {failed:?}",
        failed.len()
    );
    let proxied = flow(&agent.stats()?, a1, &format!("{}:80", b1.ip))
        .and_then(|f| f["opened"].as_u64())
        .unwrap_or(0);
    assert!(
        proxied > 0 && proxied < REQUESTS as u64,
        "both paths were used: {proxied}"
    );
    Ok(())
}

//! Upgrading the agent under traffic (needs root): on each node a second agent starts while the
//! first runs, takes over the pinned eBPF maps and the pods' listeners, and the first is stopped,
//! as a DaemonSet rolling update with surge does. Not one request may fail, and `/ready` (which
//! both agents answer on the shared admin port) never reports the old agent ready once its
//! successor has announced itself.
use std::{
    fs::{self, File},
    path::{Path, PathBuf},
    process::{Child, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;
use weft_lab_tests::{admin, TestLab};
use xtask::{
    agent::{weft_binary, Agent, Mesh},
    lab::{command_in, Lab, Node, Pod},
    pki::TestCa,
};

const APP: &str = env!("CARGO_BIN_EXE_weft-testapp");

/// `node`'s config from `mesh`, with the handover settings (per node: the lab's nodes share one
/// machine's bpf filesystem).
fn config(lab: &Lab, mesh: &Mesh, node: &Node, bpf_fs: &Path) -> String {
    let pods: Vec<&Pod> = node.pods.iter().collect();
    let handover = format!(
        "agent:\n  handover: {{bpf_pin_dir: {}, state_dir: {}}}\n",
        bpf_fs.join(&node.name).display(),
        lab.dir.join(format!("state-{}", node.name)).display()
    );
    mesh.config_yaml(node, &pods)
        .replacen("agent:\n", &handover, 1)
}

/// Starts the replacement agent of `node` (its own log) and waits until it says it took over.
fn start_successor(lab: &Lab, node: &Node, old: &Agent) -> Result<Child> {
    let log_path = lab
        .dir
        .join(format!("node-{}/weft-successor.log", node.name));
    let log = File::create(&log_path)?;
    let mut child = command_in(&node.netns, Some(&node.agent_cgroup), weft_binary())?
        .args(["run", "--config", &old.config_path().to_string_lossy()])
        .env("WEFT_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting the successor agent")?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = fs::read_to_string(&log_path).unwrap_or_default();
        if text.contains("took over from the running agent") {
            return Ok(child);
        }
        if let Some(status) = child.try_wait()? {
            bail!("the successor agent exited ({status}):\n{text}");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("the successor agent did not take over:\n{text}");
        }
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn replacing_the_agents_under_traffic_loses_no_request() -> Result<()> {
    let lab = TestLab::up("upgr", 2, 1)?;
    let _keep = KeepLogs(lab.dir.clone());
    let ca = TestCa::new("weft lab mesh CA")?;
    let (cert, key) = ca.write(&lab.dir.join("ca"))?;
    let mesh = Mesh::new(&lab, cert, key);
    let (node_a, node_b) = (&lab.nodes[0], &lab.nodes[1]);
    let bpf_fs = lab.mount_bpf_fs()?;
    let (client, server) = (&node_a.pods[0], &node_b.pods[0]);
    let mut old_agents = Vec::new();
    for node in [node_a, node_b] {
        let pods: Vec<&Pod> = node.pods.iter().collect();
        old_agents.push(Agent::start_with(
            &lab,
            node,
            &config(&lab, &mesh, node, &bpf_fs),
            &pods,
        )?);
    }
    let _nginx = ServerGuard(server.start_nginx()?);
    xtask::lab::wait_for_tcp(server, 80, Duration::from_secs(5))?;

    // A new connection per request, so every phase of the upgrade sees connects: ~25 s of load.
    let url = format!("http://{}/", server.ip);
    let load = client
        .command(APP)?
        .args([
            "load",
            "--url",
            &url,
            "--requests",
            "5000",
            "--concurrency",
            "4",
        ])
        .args(["--rate", "200", "--new-connections", "--timeout-ms", "5000"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting the load")?;
    let mut successors = Vec::new();
    for (node, old) in [node_a, node_b].into_iter().zip(old_agents.iter_mut()) {
        thread::sleep(Duration::from_secs(3));
        let old_pid = old.pid().context("the old agent is not running")?;
        let state_dir = lab.dir.join(format!("state-{}", node.name));
        let prober = ReadyProber::start(node, state_dir, old_pid)?;
        let successor = ServerGuard(start_successor(&lab, node, old)?);
        let new_pid = successor.0.id();
        let during = prober.stop()?;
        check_ready_during_takeover(&during, old_pid)?;
        check_ready_after_takeover(node, old_pid, new_pid)?;
        let status = old.stop_with(libc::SIGTERM, Duration::from_secs(15))?;
        ensure!(
            status == Some(0),
            "the replaced agent exited with {status:?}:\n{}",
            old.log()
        );
        ensure!(
            old.log().contains("newer agent took over"),
            "the replaced agent did not see it was superseded:\n{}",
            old.log()
        );
        successors.push(successor);
    }
    let out = load.wait_with_output().context("waiting for the load")?;
    ensure!(
        out.status.success(),
        "load failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: Value = serde_json::from_slice(&out.stdout).context("load summary")?;
    ensure!(
        summary["ok"].as_u64() == Some(5000),
        "requests failed during the upgrade: {summary}"
    );
    // The successors serve the pods: traffic still goes through a tunnel after both upgrades.
    let after = weft_lab_tests::fetch(client, &url)?;
    ensure!(after.contains("hello from"), "after the upgrade: {after}");
    let log_a = fs::read_to_string(
        lab.dir
            .join(format!("node-{}/weft-successor.log", node_a.name)),
    )?;
    ensure!(
        log_a.contains("pod enrolled"),
        "the successor did not enroll the pods:\n{log_a}"
    );
    // The last agent stopping unpins the maps: nothing stays behind on the node.
    for (node, mut successor) in [node_a, node_b].into_iter().zip(successors) {
        let pid = i32::try_from(successor.0.id())?;
        // SAFETY: kill only sends a signal to our own child.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let status = successor.0.wait()?;
        ensure!(status.success(), "the successor exited with {status}");
        let left: Vec<_> = walk(&bpf_fs.join(&node.name));
        ensure!(
            left.is_empty(),
            "maps still pinned after the last agent stopped: {left:?}"
        );
    }
    Ok(())
}

/// `GET /ready` on `node`'s admin port, shared by both agents during the upgrade, as the
/// kubelet's probe sends it: the status and the body, which names the agent that answered.
fn probe_ready(node: &Node) -> Result<(u16, String)> {
    let answer = admin(node, "GET", "/ready")?;
    Ok((answer.status, answer.body))
}

/// One `/ready` answer while a successor starts, and whether another agent had announced
/// itself (or taken charge) in the node's hand-over state before the probe was sent.
struct ReadyAnswer {
    after_announcement: bool,
    status: u16,
    body: String,
}

/// Probes `/ready` in the background, as a kubelet does, until stopped.
struct ReadyProber {
    stop: Arc<AtomicBool>,
    thread: thread::JoinHandle<Result<Vec<ReadyAnswer>>>,
}

impl ReadyProber {
    /// The first answer is taken before returning, so before any successor starts.
    fn start(node: &Node, state_dir: PathBuf, old_pid: u32) -> Result<Self> {
        let (status, body) = probe_ready(node)?;
        let mut answers = vec![ReadyAnswer {
            after_announcement: false,
            status,
            body,
        }];
        let stop = Arc::new(AtomicBool::new(false));
        let node = node.clone();
        let stopped = Arc::clone(&stop);
        let thread = thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                let after_announcement = ["successor.pid", "agent.pid"].iter().any(|file| {
                    fs::read_to_string(state_dir.join(file))
                        .is_ok_and(|pid| pid.trim() != old_pid.to_string())
                });
                let (status, body) = probe_ready(&node)?;
                answers.push(ReadyAnswer {
                    after_announcement,
                    status,
                    body,
                });
                thread::sleep(Duration::from_millis(20));
            }
            Ok(answers)
        });
        Ok(Self { stop, thread })
    }

    fn stop(self) -> Result<Vec<ReadyAnswer>> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("the /ready prober panicked"))?
    }
}

/// From the moment a successor announces itself the old agent no longer reports ready: were it
/// to, the kubelet could declare the new pod ready (both share the port) and the old one would be
/// stopped before the new one serves.
fn check_ready_during_takeover(answers: &[ReadyAnswer], old_pid: u32) -> Result<()> {
    let old_ready = format!("ready (agent pid {old_pid})");
    ensure!(
        answers
            .iter()
            .any(|a| !a.after_announcement && a.body == old_ready),
        "the old agent was not ready before the upgrade: {:?}",
        answers.iter().map(|a| &a.body).collect::<Vec<_>>()
    );
    let during: Vec<&ReadyAnswer> = answers.iter().filter(|a| a.after_announcement).collect();
    ensure!(
        !during.is_empty(),
        "no /ready probe while the successor started"
    );
    for answer in during {
        ensure!(
            answer.body != old_ready,
            "the old agent reported ready while its successor started: {} {}",
            answer.status,
            answer.body
        );
    }
    Ok(())
}

/// Once the successor is in charge, it answers ready and the old agent does not.
fn check_ready_after_takeover(node: &Node, old_pid: u32, new_pid: u32) -> Result<()> {
    let (new_ready, old_not_ready) = (
        format!("ready (agent pid {new_pid})"),
        format!("agent {new_pid} is in charge (agent pid {old_pid})"),
    );
    let (mut seen_new, mut seen_old) = (false, false);
    // The port is shared: each probe reaches one of the two agents, so ask until both answered.
    for _ in 0..40 {
        let (status, body) = probe_ready(node)?;
        if status == 200 {
            ensure!(body == new_ready, "after the takeover, ready from: {body}");
            seen_new = true;
        } else {
            ensure!(
                status == 503 && body == old_not_ready,
                "after the takeover: {status} {body}"
            );
            seen_old = true;
        }
        if seen_new && seen_old {
            return Ok(());
        }
    }
    bail!(
        "40 probes after the takeover did not reach both agents (new: {seen_new}, old: {seen_old})"
    )
}

/// Files below `dir` (none if it does not exist).
fn walk(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .flat_map(|entry| {
            let path = entry.path();
            if path.is_dir() {
                walk(&path)
            } else {
                vec![path]
            }
        })
        .collect()
}

/// Kills a process when dropped.
struct ServerGuard(Child);

impl Drop for ServerGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Copies the lab's agent logs aside when the test ends, for a failure's post-mortem.
struct KeepLogs(PathBuf);

impl Drop for KeepLogs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("cp")
            .args(["-r"])
            .arg(&self.0)
            .arg("/tmp/upgr-logs")
            .status();
    }
}

//! Lab tests of weft-cni, weft's chained CNI plugin (need root and Debian's
//! containernetworking-plugins). Debian's bridge and host-local plugins make a real pod network
//! between two namespaces of the test's own — a "node", where the plugins run and the bridge
//! `weftcni0` is made, and a "pod" — and weft-cni, chained after them, asks a fake agent: a socket
//! in this process answered by `weft::cni::serve`. The chain runs as containerd would run it
//! (cni_runtime.rs).
mod cni_runtime;

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use cni_runtime::{compact, Attachment, ChainRun, Invocation, Runtime};
use serde_json::Value;
use weft::cni::{CniCommand, CniRequest, CniResponse};
use weft_lab_tests::weft_cni_binary;

/// Where Debian's containernetworking-plugins installs bridge and host-local.
const SYSTEM_CNI_DIR: &str = "/usr/lib/cni";
/// The bridge the bridge plugin makes in the node namespace.
const BRIDGE: &str = "weftcni0";
/// The pods' subnet: used by nothing else on a machine running weft's labs.
const SUBNET: &str = "10.203.0.0/24";
const NAMESPACE: &str = "shop";
const POD: &str = "web-0";

/// The fake agent: the requests it saw and the answer it gives.
struct FakeAgent {
    seen: Arc<Mutex<Vec<CniRequest>>>,
    answer: Arc<Mutex<CniResponse>>,
    task: tokio::task::JoinHandle<()>,
}

/// A pod network of one test: its namespaces, files and fake agent, all removed when dropped.
struct PodNetwork {
    /// `weftcni-<pid>-<n>`: the prefix of the namespaces, and the working directory's name.
    name: String,
    dir: PathBuf,
    node: String,
    pod: String,
    plugin_dir: PathBuf,
    tokio: tokio::runtime::Runtime,
    agent: Option<FakeAgent>,
}

impl PodNetwork {
    fn new() -> Result<Self> {
        xtask::require_root("the CNI tests")?;
        ensure!(
            Path::new(SYSTEM_CNI_DIR).join("bridge").exists(),
            "{SYSTEM_CNI_DIR}/bridge is missing: install containernetworking-plugins (cargo xtask setup)"
        );
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "weftcni-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let plugin_dir = weft_cni_binary()?
            .parent()
            .context("weft-cni has no directory")?
            .to_owned();
        let net = Self {
            dir: Path::new("/run").join(&name),
            node: format!("{name}-node"),
            pod: format!("{name}-pod"),
            name,
            plugin_dir,
            tokio: tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()?,
            agent: None,
        };
        // Made after `net` exists, so its Drop removes whatever was made before a failure.
        fs::create_dir_all(net.agent_dir())?;
        for netns in [&net.node, &net.pod] {
            xtask::run(Command::new("ip").args(["netns", "add", netns]))?;
            xtask::run(Command::new("ip").args(["-n", netns, "link", "set", "lo", "up"]))?;
        }
        Ok(net)
    }

    /// The agent's directory: its socket and the enrolled-namespaces file.
    fn agent_dir(&self) -> PathBuf {
        self.dir.join("agent")
    }

    /// The pod network's plugin: a bridge in the node, addresses from host-local.
    fn bridge_entry(&self) -> String {
        serde_json::json!({
            "type": "bridge",
            "bridge": BRIDGE,
            "ipam": {
                "type": "host-local",
                "subnet": SUBNET,
                "dataDir": self.dir.join("ipam"),
            },
        })
        .to_string()
    }

    /// weft-cni talking to the fake agent, with `settings` (JSON members, each led by a comma).
    fn weft_entry(&self, settings: &str) -> String {
        format!(
            r#"{{"type": "weft-cni", "agent_socket": {socket:?}, "cni_dir": {dir:?}, "timeout_ms": 2000{settings}}}"#,
            socket = weft::cni::socket_path(&self.agent_dir()),
            dir = self.agent_dir(),
        )
    }

    /// The runtime of the usual chain (bridge, weft-cni with `settings`), run in the node.
    fn runtime(&self, settings: &str) -> Result<Runtime> {
        self.runtime_of(&conflist(
            "1.0.0",
            &[self.bridge_entry(), self.weft_entry(settings)],
        ))
    }

    fn runtime_of(&self, conflist: &str) -> Result<Runtime> {
        Ok(Runtime::new(
            conflist,
            vec![PathBuf::from(SYSTEM_CNI_DIR), self.plugin_dir.clone()],
        )?
        .run_in(&self.node))
    }

    /// The test's pod sandbox, as containerd attaches it.
    fn sandbox(&self) -> Attachment {
        Attachment::pod(
            &format!("{}-sandbox", self.name),
            &Path::new("/var/run/netns").join(&self.pod),
            NAMESPACE,
            POD,
            &format!("uid-{}", self.name),
        )
    }

    fn start_agent(&mut self, answer: CniResponse) -> Result<()> {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let answer = Arc::new(Mutex::new(answer));
        let (recorded, answers) = (Arc::clone(&seen), Arc::clone(&answer));
        let listener = {
            let _runtime = self.tokio.enter();
            weft::cni::bind(&self.agent_dir())?
        };
        let task = self
            .tokio
            .spawn(weft::cni::serve(listener, move |request: CniRequest| {
                recorded.lock().unwrap().push(request);
                let answer = answers.lock().unwrap().clone();
                async move { answer }
            }));
        self.agent = Some(FakeAgent { seen, answer, task });
        Ok(())
    }

    /// The agent dies: its socket file stays, nothing listens on it.
    fn stop_agent(&mut self) {
        if let Some(agent) = self.agent.take() {
            agent.task.abort();
            let _ = self.tokio.block_on(agent.task);
        }
    }

    fn agent(&self) -> &FakeAgent {
        self.agent.as_ref().expect("the fake agent is running")
    }

    fn agent_answers(&self, answer: CniResponse) {
        *self.agent().answer.lock().unwrap() = answer;
    }

    fn requests(&self) -> Vec<CniRequest> {
        self.agent().seen.lock().unwrap().clone()
    }

    /// The enrolled-namespaces file as the agent last wrote it.
    fn agent_wrote_namespaces(&self, namespaces: &[&str]) -> Result<()> {
        let set: BTreeSet<String> = namespaces.iter().map(|n| n.to_string()).collect();
        weft::cni::write_enrolled_namespaces(&self.agent_dir(), &set)
    }

    /// The pod's IPv4 addresses on eth0, as `ip` shows them.
    fn pod_addresses(&self) -> Result<String> {
        let out = Command::new("ip")
            .args(["-n", &self.pod, "-4", "-o", "addr", "show"])
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// A conflist of `plugins` (their JSON), laid out as a pod network's installer would.
fn conflist(cni_version: &str, plugins: &[String]) -> String {
    format!(
        "{{\n  \"cniVersion\": \"{cni_version}\",\n  \"name\": \"weftcni\",\n  \"plugins\": [\n    {}\n  ]\n}}\n",
        plugins.join(",\n    ")
    )
}

impl Drop for PodNetwork {
    fn drop(&mut self) {
        self.stop_agent();
        let quiet = |args: &[&str]| {
            let _ = Command::new("ip")
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        };
        quiet(&["-n", &self.node, "link", "del", BRIDGE]);
        quiet(&["netns", "del", &self.pod]);
        quiet(&["netns", "del", &self.node]);
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn invocation<'a>(run: &'a ChainRun, plugin: &str) -> Result<&'a Invocation> {
    run.invocation(plugin)
        .with_context(|| format!("{plugin} did not run: {run:#?}"))
}

fn ensure_succeeded(run: &ChainRun, what: &str) -> Result<()> {
    if let Some(failed) = run.failure() {
        bail!(
            "{what} failed in {}: {}\n{}",
            failed.plugin,
            failed.stdout,
            failed.stderr
        );
    }
    Ok(())
}

/// The CNI error that stopped `run`: which plugin, its JSON.
fn cni_error(run: &ChainRun) -> Result<(String, Value)> {
    let failed = run
        .failure()
        .with_context(|| format!("expected a failure: {run:#?}"))?;
    let error = failed.error().with_context(|| {
        format!(
            "{} failed without CNI error JSON: {:?} {:?}",
            failed.plugin, failed.stdout, failed.stderr
        )
    })?;
    Ok((failed.plugin.clone(), error))
}

/// The first IPv4 address of a CNI result.
fn result_ip(result: &str) -> Result<String> {
    let result: Value = serde_json::from_str(result)?;
    let address = result["ips"][0]["address"]
        .as_str()
        .context("result without ips")?;
    Ok(address
        .split_once('/')
        .context("address without prefix")?
        .0
        .to_owned())
}

#[test]
fn add_passes_the_bridge_result_through_and_tells_the_agent() -> Result<()> {
    let mut net = PodNetwork::new()?;
    net.start_agent(CniResponse::Enrolled)?;
    let mut runtime = net.runtime("")?;
    let sandbox = net.sandbox();

    let add = runtime.add(&sandbox)?;
    ensure_succeeded(&add, "ADD")?;
    let bridge = invocation(&add, "bridge")?;
    let weft = invocation(&add, "weft-cni")?;
    // What the runtime gets is exactly what the bridge produced, as libcni passed it on.
    ensure!(
        weft.stdout == compact(&bridge.stdout),
        "weft-cni changed the result:\nbridge:   {}\nweft-cni: {}",
        bridge.stdout,
        weft.stdout
    );
    ensure!(weft
        .stdin
        .contains(&format!("\"prevResult\":{}", weft.stdout)));
    ensure!(add.result.as_deref() == Some(weft.stdout.as_str()));
    let ip = result_ip(&bridge.stdout)?;
    ensure!(
        ip.starts_with("10.203.0."),
        "host-local gave {ip} outside {SUBNET}"
    );
    ensure!(net.pod_addresses()?.contains(&format!("{ip}/24")));

    let requests = net.requests();
    ensure!(requests.len() == 1, "{requests:#?}");
    let request = &requests[0];
    ensure!(request.command == CniCommand::Add);
    ensure!(request.container_id == sandbox.container_id);
    ensure!(Path::new(&request.netns) == sandbox.netns);
    ensure!(request.ifname == "eth0");
    ensure!(
        (
            request.pod_namespace.as_str(),
            request.pod_name.as_str(),
            request.pod_uid.as_str()
        ) == (NAMESPACE, POD, format!("uid-{}", net.name).as_str()),
        "{request:?}"
    );
    ensure!(
        request
            .ips
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            == [ip.clone()],
        "{request:?}"
    );

    let check = runtime.check(&sandbox)?;
    ensure_succeeded(&check, "CHECK")?;
    ensure!(
        check.invocations.len() == 2,
        "both plugins check: {check:#?}"
    );
    let checked = net.requests().pop().context("no CHECK request")?;
    ensure!(checked.command == CniCommand::Check && checked.ips == request.ips);

    let del = runtime.del(&sandbox)?;
    ensure_succeeded(&del, "DEL")?;
    let order: Vec<&str> = del.invocations.iter().map(|i| i.plugin.as_str()).collect();
    ensure!(order == ["weft-cni", "bridge"], "DEL order {order:?}");
    ensure!(del.invocations.iter().all(|i| i.stdout.is_empty()));
    let deleted = net.requests().pop().context("no DEL request")?;
    ensure!(deleted.command == CniCommand::Del && deleted.container_id == sandbox.container_id);
    ensure!(
        !net.pod_addresses()?.contains(&ip),
        "DEL left the pod's address"
    );
    Ok(())
}

#[test]
fn the_agents_answer_decides_whether_the_pod_starts() -> Result<()> {
    let mut net = PodNetwork::new()?;
    net.start_agent(CniResponse::Error {
        error: "no certificate for service account web".into(),
    })?;
    let mut runtime = net.runtime("")?;
    let sandbox = net.sandbox();

    let add = runtime.add(&sandbox)?;
    let (plugin, error) = cni_error(&add)?;
    ensure!(plugin == "weft-cni", "{add:#?}");
    ensure!(error["cniVersion"] == "1.0.0", "{error}");
    ensure!(error["code"] == 101, "{error}");
    ensure!(
        error["msg"]
            .as_str()
            .is_some_and(|m| m.contains("could not enroll pod shop/web-0")),
        "{error}"
    );
    ensure!(error["details"] == "no certificate for service account web");
    ensure!(add.result.is_none());
    // As containerd does after a failed ADD: DEL tears it down, whatever the agent says.
    ensure_succeeded(&runtime.del(&sandbox)?, "DEL after a failed ADD")?;

    net.agent_answers(CniResponse::NotMeshed {
        reason: "namespace shop is not meshed".into(),
    });
    let add = runtime.add(&sandbox)?;
    ensure_succeeded(&add, "ADD of a pod that is not meshed")?;
    ensure!(add.result == Some(compact(&invocation(&add, "bridge")?.stdout)));
    ensure_succeeded(&runtime.del(&sandbox)?, "DEL")?;
    let commands: Vec<CniCommand> = net.requests().iter().map(|r| r.command).collect();
    ensure!(
        commands
            == [
                CniCommand::Add,
                CniCommand::Del,
                CniCommand::Add,
                CniCommand::Del
            ],
        "{commands:?}"
    );
    Ok(())
}

#[test]
fn agent_down_fails_closed_for_a_meshed_namespace() -> Result<()> {
    let net = PodNetwork::new()?;
    net.agent_wrote_namespaces(&["bank", NAMESPACE])?;
    let sandbox = net.sandbox();

    let mut runtime = net.runtime("")?;
    let add = runtime.add(&sandbox)?;
    let (plugin, error) = cni_error(&add)?;
    ensure!(plugin == "weft-cni" && error["code"] == 11, "{error}");
    ensure!(
        error["msg"]
            .as_str()
            .is_some_and(|m| m.starts_with("try again later")),
        "{error}"
    );
    ensure_succeeded(&runtime.del(&sandbox)?, "DEL with the agent down")?;

    // The same pod starts when the config says to fail open, with a warning.
    let mut runtime = net.runtime(r#", "fail_closed": false"#)?;
    let add = runtime.add(&sandbox)?;
    ensure_succeeded(&add, "ADD failing open")?;
    let weft = invocation(&add, "weft-cni")?;
    ensure!(weft.stderr.contains("warning"), "{}", weft.stderr);
    ensure_succeeded(&runtime.del(&sandbox)?, "DEL")?;
    Ok(())
}

#[test]
fn agent_down_lets_pods_of_other_namespaces_start() -> Result<()> {
    let net = PodNetwork::new()?;
    let sandbox = net.sandbox();
    let mut runtime = net.runtime("")?;
    // The agent never ran on this node (no namespaces file), then it did and left a list
    // without the pod's namespace.
    for namespaces in [None, Some(["bank"])] {
        if let Some(namespaces) = namespaces {
            net.agent_wrote_namespaces(&namespaces)?;
        }
        let add = runtime.add(&sandbox)?;
        ensure_succeeded(&add, "ADD with the agent down")?;
        let weft = invocation(&add, "weft-cni")?;
        ensure!(weft.stdout == compact(&invocation(&add, "bridge")?.stdout));
        ensure!(
            weft.stderr.contains("warning") && weft.stderr.contains("shop/web-0"),
            "{}",
            weft.stderr
        );
        ensure_succeeded(&runtime.del(&sandbox)?, "DEL with the agent down")?;
    }
    Ok(())
}

#[test]
fn del_succeeds_with_the_agent_gone() -> Result<()> {
    let mut net = PodNetwork::new()?;
    net.start_agent(CniResponse::Enrolled)?;
    let mut runtime = net.runtime("")?;
    let sandbox = net.sandbox();
    ensure_succeeded(&runtime.add(&sandbox)?, "ADD")?;
    net.stop_agent();

    let started = Instant::now();
    let del = runtime.del(&sandbox)?;
    ensure_succeeded(&del, "DEL with the agent gone")?;
    let weft = invocation(&del, "weft-cni")?;
    ensure!(weft.stdout.is_empty() && weft.stderr.contains("warning"));
    ensure!(started.elapsed() < Duration::from_secs(5));
    // A repeated DEL, now without a cached result, succeeds too.
    ensure_succeeded(&runtime.del(&sandbox)?, "second DEL")?;
    Ok(())
}

#[test]
fn check_fails_for_a_meshed_pod_that_is_not_enrolled() -> Result<()> {
    let mut net = PodNetwork::new()?;
    net.start_agent(CniResponse::Enrolled)?;
    let mut runtime = net.runtime("")?;
    let sandbox = net.sandbox();
    ensure_succeeded(&runtime.add(&sandbox)?, "ADD")?;

    net.agent_answers(CniResponse::Error {
        error: "pod shop/web-0 is meshed but not enrolled".into(),
    });
    let (plugin, error) = cni_error(&runtime.check(&sandbox)?)?;
    ensure!(plugin == "weft-cni" && error["code"] == 101, "{error}");
    ensure!(error["details"] == "pod shop/web-0 is meshed but not enrolled");

    net.stop_agent();
    net.agent_wrote_namespaces(&[NAMESPACE])?;
    let (_, error) = cni_error(&runtime.check(&sandbox)?)?;
    ensure!(error["code"] == 11, "{error}");
    net.agent_wrote_namespaces(&["bank"])?;
    ensure_succeeded(&runtime.check(&sandbox)?, "CHECK, agent down, not meshed")?;
    ensure_succeeded(&runtime.del(&sandbox)?, "DEL")?;
    Ok(())
}

#[test]
fn version_status_and_a_missing_chain() -> Result<()> {
    let mut net = PodNetwork::new()?;
    let runtime = net.runtime("")?;
    let version = runtime.version("weft-cni")?;
    ensure!(version.status.success(), "{version:?}");
    let reported: Value = serde_json::from_str(&version.stdout)?;
    ensure!(
        reported
            == serde_json::json!({"cniVersion": "1.1.0",
                "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]}),
        "{reported}"
    );

    // STATUS is CNI 1.1; the bridge of this Debian release speaks 1.0, so weft-cni alone.
    let alone = net.runtime_of(&conflist("1.1.0", &[net.weft_entry("")]))?;
    let (_, error) = cni_error(&alone.status()?)?;
    ensure!(error["code"] == 50, "{error}");
    net.start_agent(CniResponse::Enrolled)?;
    ensure_succeeded(&alone.status()?, "STATUS with the agent up")?;
    ensure!(net.requests().is_empty(), "STATUS sends no request");

    // weft-cni is a chained plugin: first in a list, it has no result to pass on.
    let mut unchained = net.runtime_of(&conflist("1.0.0", &[net.weft_entry("")]))?;
    let (_, error) = cni_error(&unchained.add(&net.sandbox())?)?;
    ensure!(error["code"] == 100, "{error}");
    ensure!(net.requests().is_empty());
    Ok(())
}

/// `weft-cni` with `args`, run to its end; fails unless it succeeds.
fn weft_cni(args: &[&str]) -> Result<()> {
    let out = Command::new(weft_cni_binary()?).args(args).output()?;
    ensure!(
        out.status.success(),
        "weft-cni {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn plugin_types(path: &Path) -> Result<Vec<String>> {
    let list: Value = serde_json::from_str(&fs::read_to_string(path)?)?;
    Ok(list["plugins"]
        .as_array()
        .context("no plugins")?
        .iter()
        .filter_map(|p| p["type"].as_str().map(str::to_owned))
        .collect())
}

fn wait_until(timeout: Duration, mut condition: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !condition()? {
        if Instant::now() > deadline {
            bail!("condition not met within {timeout:?}");
        }
        thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// The installer as a DaemonSet runs it, killed if the test fails first.
struct Watch(Child);

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn installer_chains_weft_cni_and_keeps_it_chained() -> Result<()> {
    let net = PodNetwork::new()?;
    let (bin, conf_dir) = (net.dir.join("bin"), net.dir.join("net.d"));
    fs::create_dir_all(&conf_dir)?;
    let config = conf_dir.join("10-weftcni.conflist");
    // The pod network's own config, as its installer writes it.
    let primary = conflist("1.0.0", &[net.bridge_entry()]);
    fs::write(&config, &primary)?;
    fs::write(conf_dir.join("20-later.conflist"), &primary)?;
    let (bin_arg, conf_arg) = (bin.to_string_lossy(), conf_dir.to_string_lossy());
    let dirs = ["--cni-bin-dir", &*bin_arg, "--cni-conf-dir", &*conf_arg];

    weft_cni(&[&["install"], &dirs[..]].concat())?;
    ensure!(fs::read(bin.join("weft-cni"))? == fs::read(weft_cni_binary()?)?);
    let chained = fs::read_to_string(&config)?;
    ensure!(
        plugin_types(&config)? == ["bridge", "weft-cni"],
        "{chained}"
    );
    ensure!(
        fs::read_to_string(conf_dir.join("20-later.conflist"))? == primary,
        "only the first conflist is the runtime's"
    );
    weft_cni(&[&["install"], &dirs[..]].concat())?;
    ensure!(
        fs::read_to_string(&config)? == chained,
        "a second install changed the file"
    );

    let log = net.dir.join("watch.log");
    let mut watch = Watch(
        Command::new(weft_cni_binary()?)
            .args([&["install", "--watch"], &dirs[..]].concat())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log)?)
            .spawn()?,
    );
    let watch_log = || fs::read_to_string(&log).unwrap_or_default();
    // The pod network rewrites its config, once by rename and once in place.
    let replacement = conf_dir.join(".primary.tmp");
    fs::write(&replacement, &primary)?;
    fs::rename(&replacement, &config)?;
    wait_until(Duration::from_secs(15), || {
        Ok(plugin_types(&config).unwrap_or_default() == ["bridge", "weft-cni"])
    })
    .with_context(|| format!("weft-cni not chained again; its log:\n{}", watch_log()))?;
    fs::write(&config, &primary)?;
    wait_until(Duration::from_secs(15), || {
        Ok(plugin_types(&config).unwrap_or_default() == ["bridge", "weft-cni"])
    })
    .with_context(|| format!("weft-cni not chained again; its log:\n{}", watch_log()))?;

    // SIGTERM ends the watch and leaves weft-cni in place for the next version of the installer.
    // SAFETY: kill(2) on the pid of our own child, which has not been waited for yet.
    unsafe { libc::kill(watch.0.id() as libc::pid_t, libc::SIGTERM) };
    let mut exited = None;
    wait_until(Duration::from_secs(10), || {
        exited = watch.0.try_wait()?;
        Ok(exited.is_some())
    })?;
    ensure!(
        exited.is_some_and(|s| s.success()),
        "watch exited with {exited:?}: {}",
        watch_log()
    );
    ensure!(bin.join("weft-cni").exists());
    ensure!(plugin_types(&config)? == ["bridge", "weft-cni"]);

    weft_cni(&[&["uninstall"], &dirs[..]].concat())?;
    ensure!(
        fs::read_to_string(&config)? == primary,
        "uninstall left changes"
    );
    ensure!(!bin.join("weft-cni").exists());
    Ok(())
}

//! The lab: simulated nodes and pods on one machine. Every node is a network namespace joined to
//! the others through a bridge in a "wire" namespace; every pod is a network namespace (veth to its
//! node, routed, not bridged) plus its own cgroup under the node's cgroup, which is where the node's
//! agent attaches. Nothing touches the host's own network namespace.
//!
//! Addresses: node i is 10.200.0.(i+1) on the wire; its pods are 10.201.i.(j+2)/32, routed via the
//! node, which owns 10.201.i.1 as their gateway.
use std::{
    fs::{self, File},
    io::Write as _,
    net::Ipv4Addr,
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::run;

pub const DEFAULT_NAME: &str = "weft";
const NETNS_DIR: &str = "/var/run/netns";
/// Every lab namespace is named `weftlab-<lab>-…`, so `down` never touches anyone else's.
const NETNS_PREFIX: &str = "weftlab-";

#[derive(Clone, Debug)]
pub struct LabSpec {
    /// Short prefix of every namespace, cgroup and file of this lab (at most 6 characters).
    pub name: String,
    pub nodes: usize,
    pub pods_per_node: usize,
}

#[derive(Clone, Debug)]
pub struct Lab {
    pub name: String,
    /// Working files: configs, logs, web roots.
    pub dir: PathBuf,
    pub cgroup_root: PathBuf,
    pub nodes: Vec<Node>,
}

#[derive(Clone, Debug)]
pub struct Node {
    pub name: String,
    pub netns: String,
    pub ip: Ipv4Addr,
    /// The agent attaches here; every pod cgroup of the node is below it.
    pub pods_cgroup: PathBuf,
    /// Where the node's agent runs: inside `pods_cgroup`, as on Kubernetes where the agent is a
    /// pod too, so the hooks see its sockets and must recognise them by their mark.
    pub agent_cgroup: PathBuf,
    pub pods: Vec<Pod>,
}

#[derive(Clone, Debug)]
pub struct Pod {
    pub name: String,
    pub netns: String,
    pub ip: Ipv4Addr,
    pub cgroup: PathBuf,
    pub dir: PathBuf,
}

impl Pod {
    pub fn netns_path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.netns)
    }

    /// `program` run inside this pod: its network namespace and its cgroup.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Result<Command> {
        command_in(&self.netns, Some(&self.cgroup), program)
    }

    /// Starts nginx in the pod on port 80, serving `index.html` = "hello from <pod>" and logging the
    /// client address of every request to `access.log` in the pod's directory.
    pub fn start_nginx(&self) -> Result<Child> {
        let www = self.dir.join("www");
        fs::create_dir_all(&www)?;
        fs::write(
            www.join("index.html"),
            format!("hello from {}\n", self.name),
        )?;
        let dir = self.dir.display();
        let conf = format!(
            "worker_processes 1;\ndaemon off;\nuser root;\npid {dir}/nginx.pid;\nerror_log {dir}/error.log;\n\
             events {{ worker_connections 8192; }}\n\
             http {{\n  log_format peer '$remote_addr $request_uri $status';\n  access_log {dir}/access.log peer;\n\
             client_body_temp_path {dir}/tmp-body; proxy_temp_path {dir}/tmp-proxy;\n\
             fastcgi_temp_path {dir}/tmp-fcgi; uwsgi_temp_path {dir}/tmp-uwsgi; scgi_temp_path {dir}/tmp-scgi;\n\
             keepalive_requests 100000;\n  server {{ listen 80 reuseport backlog=8192; root {www}; }}\n}}\n",
            www = www.display()
        );
        let conf_path = self.dir.join("nginx.conf");
        fs::write(&conf_path, conf)?;
        let _ = fs::remove_file(self.dir.join("access.log"));
        let child = self
            .command("nginx")?
            .args([
                "-c",
                &conf_path.to_string_lossy(),
                "-e",
                &self.dir.join("error.log").to_string_lossy(),
            ])
            .stdin(Stdio::null())
            .spawn()
            .context("starting nginx (is nginx installed? run `cargo xtask setup`)")?;
        wait_for_tcp(self, 80, Duration::from_secs(10))?;
        Ok(child)
    }

    /// Client addresses nginx logged, one per request.
    pub fn nginx_clients(&self) -> Result<Vec<String>> {
        let log = fs::read_to_string(self.dir.join("access.log")).unwrap_or_default();
        Ok(log
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_owned)
            .collect())
    }
}

impl Node {
    /// The node's port on the wire bridge, in the wire namespace: where its traffic is watched.
    pub fn wire_port(&self) -> String {
        format!("n{}", self.name)
    }

    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Result<Command> {
        command_in(&self.netns, None, program)
    }
}

/// A command whose process enters `netns` (and `cgroup`, if any) before it execs.
pub fn command_in(
    netns: &str,
    cgroup: Option<&Path>,
    program: impl AsRef<std::ffi::OsStr>,
) -> Result<Command> {
    let netns_file = File::open(Path::new(NETNS_DIR).join(netns))
        .with_context(|| format!("lab namespace {netns} does not exist (is the lab up?)"))?;
    let procs = match cgroup {
        Some(cgroup) => Some(
            File::options()
                .write(true)
                .open(cgroup.join("cgroup.procs"))
                .with_context(|| format!("opening {}/cgroup.procs", cgroup.display()))?,
        ),
        None => None,
    };
    let mut cmd = Command::new(program);
    // SAFETY: between fork and exec only setns(2) and write(2) are called, both async-signal-safe;
    // the files are owned by the closure and stay open until the command is dropped.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(netns_file.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(procs) = &procs {
                // "0" moves the writing process itself.
                if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    Ok(cmd)
}

/// Waits until something listens on `port` inside the pod.
pub fn wait_for_tcp(pod: &Pod, port: u16, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let ss = pod
            .command("ss")?
            .args(["-Htln", &format!("sport = :{port}")])
            .output()?;
        if !String::from_utf8_lossy(&ss.stdout).trim().is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "nothing listens on port {port} in pod {} after {timeout:?}",
                pod.name
            );
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// The cgroup v2 mount: /sys/fs/cgroup on unified hosts, elsewhere (hybrid) wherever it is.
pub fn cgroup2_root() -> Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    let roots: Vec<PathBuf> = mounts
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(fields[1]))
        })
        .collect();
    roots
        .iter()
        .find(|r| r.as_path() == Path::new("/sys/fs/cgroup"))
        .or(roots.first())
        .cloned()
        .context("no cgroup2 filesystem is mounted")
}

fn node_letter(index: usize) -> char {
    (b'a' + index as u8) as char
}

impl Lab {
    /// The lab `spec` describes, without creating anything.
    pub fn describe(spec: &LabSpec) -> Result<Lab> {
        if spec.name.is_empty()
            || spec.name.len() > 6
            || !spec.name.bytes().all(|b| b.is_ascii_alphanumeric())
        {
            bail!(
                "lab name must be 1-6 ASCII letters or digits, got {:?}",
                spec.name
            );
        }
        if spec.nodes == 0 || spec.nodes > 26 || spec.pods_per_node == 0 || spec.pods_per_node > 200
        {
            bail!("a lab has 1-26 nodes of 1-200 pods");
        }
        let dir = PathBuf::from("/run/weft-lab").join(&spec.name);
        let cgroup_root = cgroup2_root()?.join(format!("weft-lab-{}", spec.name));
        let nodes = (0..spec.nodes)
            .map(|i| {
                let letter = node_letter(i);
                let pods_cgroup = cgroup_root.join(format!("node-{letter}"));
                let pods = (0..spec.pods_per_node)
                    .map(|j| {
                        let name = format!("{letter}{}", j + 1);
                        Pod {
                            netns: format!("{NETNS_PREFIX}{}-{name}", spec.name),
                            ip: Ipv4Addr::new(10, 201, i as u8, (j + 2) as u8),
                            cgroup: pods_cgroup.join(format!("pod-{name}")),
                            dir: dir.join(&name),
                            name,
                        }
                    })
                    .collect();
                Node {
                    name: letter.to_string(),
                    netns: format!("{NETNS_PREFIX}{}-{letter}", spec.name),
                    ip: Ipv4Addr::new(10, 200, 0, (i + 1) as u8),
                    agent_cgroup: pods_cgroup.join("weft-agent"),
                    pods_cgroup,
                    pods,
                }
            })
            .collect();
        Ok(Lab {
            name: spec.name.clone(),
            dir,
            cgroup_root,
            nodes,
        })
    }

    /// Creates the lab, first removing any leftover of a lab with the same name.
    pub fn up(spec: &LabSpec) -> Result<Lab> {
        let lab = Lab::describe(spec)?;
        Lab::down(&spec.name)?;
        lab.create()
            .with_context(|| format!("creating lab {}", lab.name))?;
        Ok(lab)
    }

    fn create(&self) -> Result<()> {
        fs::create_dir_all(&self.dir)?;
        let wire = format!("{NETNS_PREFIX}{}-wire", self.name);
        ip(&["netns", "add", &wire])?;
        ip_in(&wire, &["link", "set", "lo", "up"])?;
        ip_in(&wire, &["link", "add", "br0", "type", "bridge"])?;
        ip_in(&wire, &["link", "set", "br0", "up"])?;
        for node in &self.nodes {
            ip(&["netns", "add", &node.netns])?;
            ip_in(&node.netns, &["link", "set", "lo", "up"])?;
            let port = node.wire_port();
            ip(&[
                "link",
                "add",
                "eth0",
                "netns",
                &node.netns,
                "type",
                "veth",
                "peer",
                "name",
                &port,
                "netns",
                &wire,
            ])?;
            ip_in(&wire, &["link", "set", &port, "master", "br0", "up"])?;
            ip_in(
                &node.netns,
                &["addr", "add", &format!("{}/24", node.ip), "dev", "eth0"],
            )?;
            ip_in(&node.netns, &["link", "set", "eth0", "up"])?;
            let gateway = self.pod_gateway(node);
            ip_in(
                &node.netns,
                &["addr", "add", &format!("{gateway}/32"), "dev", "lo"],
            )?;
            sysctl_in(&node.netns, "net.ipv4.ip_forward=1")?;
            fs::create_dir_all(&node.pods_cgroup)?;
            fs::create_dir_all(&node.agent_cgroup)?;
            for (j, pod) in node.pods.iter().enumerate() {
                self.create_pod(node, j, pod, gateway)?;
            }
            for other in self.nodes.iter().filter(|o| o.name != node.name) {
                let [a, b, c, _] = other.pods[0].ip.octets();
                let cidr = format!("{a}.{b}.{c}.0/24");
                ip_in(
                    &node.netns,
                    &["route", "add", &cidr, "via", &other.ip.to_string()],
                )?;
            }
        }
        Ok(())
    }

    fn pod_gateway(&self, node: &Node) -> Ipv4Addr {
        let [a, b, c, _] = node.pods[0].ip.octets();
        Ipv4Addr::new(a, b, c, 1)
    }

    fn create_pod(&self, node: &Node, index: usize, pod: &Pod, gateway: Ipv4Addr) -> Result<()> {
        ip(&["netns", "add", &pod.netns])?;
        ip_in(&pod.netns, &["link", "set", "lo", "up"])?;
        let node_side = format!("p{}", index + 1);
        ip(&[
            "link",
            "add",
            "eth0",
            "netns",
            &pod.netns,
            "type",
            "veth",
            "peer",
            "name",
            &node_side,
            "netns",
            &node.netns,
        ])?;
        ip_in(
            &pod.netns,
            &["addr", "add", &format!("{}/32", pod.ip), "dev", "eth0"],
        )?;
        ip_in(&pod.netns, &["link", "set", "eth0", "up"])?;
        ip_in(
            &pod.netns,
            &[
                "route",
                "add",
                "default",
                "via",
                &gateway.to_string(),
                "dev",
                "eth0",
                "onlink",
            ],
        )?;
        ip_in(&node.netns, &["link", "set", &node_side, "up"])?;
        ip_in(
            &node.netns,
            &["route", "add", &format!("{}/32", pod.ip), "dev", &node_side],
        )?;
        fs::create_dir_all(&pod.cgroup)?;
        fs::create_dir_all(&pod.dir)?;
        Ok(())
    }

    /// Removes everything a lab called `name` made, also after a crash: its processes, namespaces,
    /// cgroups and files. Succeeds when there is nothing to remove.
    pub fn down(name: &str) -> Result<()> {
        let cgroup_root = cgroup2_root()?.join(format!("weft-lab-{name}"));
        let prefix = format!("{NETNS_PREFIX}{name}-");
        let namespaces: Vec<String> = fs::read_dir(NETNS_DIR)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with(&prefix))
                    .collect()
            })
            .unwrap_or_default();
        for _ in 0..50 {
            let mut pids = cgroup_pids(&cgroup_root);
            for ns in &namespaces {
                pids.extend(netns_pids(ns));
            }
            if pids.is_empty() {
                break;
            }
            for pid in pids {
                // SAFETY: kill(2) with a pid read from the kernel; errors (already gone) are fine.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            thread::sleep(Duration::from_millis(100));
        }
        for ns in &namespaces {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        remove_cgroup_tree(&cgroup_root)?;
        let lab_dir = PathBuf::from("/run/weft-lab").join(name);
        // A bpf filesystem a test mounted for pinned maps (see `Lab::mount_bpf_fs`).
        let _ = Command::new("umount")
            .arg(lab_dir.join("bpf"))
            .stderr(Stdio::null())
            .status();
        let _ = fs::remove_dir_all(lab_dir);
        Ok(())
    }

    /// A bpf filesystem of this lab's own at `<dir>/bpf`, for agents that pin maps (hand-over);
    /// `down` unmounts it, pins and all.
    pub fn mount_bpf_fs(&self) -> Result<PathBuf> {
        let dir = self.dir.join("bpf");
        fs::create_dir_all(&dir)?;
        run(Command::new("mount").args(["-t", "bpf", "bpf"]).arg(&dir))?;
        Ok(dir)
    }

    /// `program` run in the namespace of the bridge joining the nodes: where the wire is watched.
    pub fn wire_command(&self, program: impl AsRef<std::ffi::OsStr>) -> Result<Command> {
        command_in(&format!("{NETNS_PREFIX}{}-wire", self.name), None, program)
    }

    pub fn pods(&self) -> impl Iterator<Item = &Pod> {
        self.nodes.iter().flat_map(|n| n.pods.iter())
    }

    pub fn pod(&self, name: &str) -> Result<&Pod> {
        self.pods()
            .find(|p| p.name == name)
            .with_context(|| format!("lab has no pod {name}"))
    }

    pub fn node(&self, name: &str) -> Result<&Node> {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .with_context(|| format!("lab has no node {name}"))
    }
}

fn ip(args: &[&str]) -> Result<()> {
    run(Command::new("ip").args(args))
}

fn ip_in(netns: &str, args: &[&str]) -> Result<()> {
    run(Command::new("ip").args(["-n", netns]).args(args))
}

fn sysctl_in(netns: &str, setting: &str) -> Result<()> {
    run(Command::new("ip").args(["netns", "exec", netns, "sysctl", "-qw", setting]))
}

fn netns_pids(netns: &str) -> Vec<i32> {
    Command::new("ip")
        .args(["netns", "pids", netns])
        .output()
        .map(|out| {
            String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn cgroup_pids(dir: &Path) -> Vec<i32> {
    let mut pids: Vec<i32> = fs::read_to_string(dir.join("cgroup.procs"))
        .map(|text| text.lines().filter_map(|p| p.parse().ok()).collect())
        .unwrap_or_default();
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                pids.extend(cgroup_pids(&entry.path()));
            }
        }
    }
    pids
}

fn remove_cgroup_tree(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    for entry in fs::read_dir(dir)?.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_cgroup_tree(&entry.path())?;
        }
    }
    // A cgroup dir can only be removed once its last process has been reaped.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(err) if Instant::now() < deadline && err.raw_os_error() == Some(libc::EBUSY) => {
                thread::sleep(Duration::from_millis(50));
            }
            Err(err) => {
                return Err(err).with_context(|| format!("removing cgroup {}", dir.display()))
            }
        }
    }
}

/// Writes `text` to `path` atomically (write then rename), as a config manager would.
pub fn write_atomically(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut file = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

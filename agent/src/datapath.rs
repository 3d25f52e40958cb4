//! Loads weft's eBPF programs, attaches them to the pods' parent cgroup and owns their maps.
use std::{
    collections::HashSet,
    fs::File,
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::AsRawFd,
    path::Path,
    sync::{Arc, Mutex},
};

use anyhow::{anyhow, bail, Context, Result};
use aya::{
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, MapData, MapError, PerCpuArray, SockHash},
    programs::{
        sk_lookup::SkLookupLinkId, CgroupAttachMode, CgroupSock, CgroupSockAddr, SkLookup, SockOps,
    },
    Ebpf, EbpfLoader,
};
use ipnet::Ipv4Net;
use weft_common::{maps, ClientKey, Counter, DeliveryKey, OrigDst, Settings};

use crate::lock;

static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/weft"));

/// The attached programs and the maps the agent reads and writes. Dropping it (or calling
/// [`Datapath::detach`]) detaches everything: the links are file descriptors owned here, so even a
/// killed agent leaves nothing attached.
pub struct Datapath {
    programs: Mutex<Option<Ebpf>>,
    enrolled: Mutex<HashMap<MapData, u64, u8>>,
    excluded_ports: Mutex<HashMap<MapData, u16, u8>>,
    excluded_cidrs: Mutex<LpmTrie<MapData, u32, u8>>,
    orig_dst: HashMap<MapData, ClientKey, OrigDst>,
    pending_connects: HashMap<MapData, u64, OrigDst>,
    counters: PerCpuArray<MapData, u64>,
    inbound_listeners: Mutex<SockHash<MapData, u32>>,
    deliveries: Mutex<HashMap<MapData, DeliveryKey, u8>>,
}

/// Removes its delivery's map entry when dropped, also when the connect is abandoned midway.
pub struct DeliveryGuard {
    datapath: Arc<Datapath>,
    key: DeliveryKey,
}

impl Drop for DeliveryGuard {
    fn drop(&mut self) {
        // Not found is fine; any other failure leaves one stale entry that lets through only a
        // connection with this exact source and destination.
        let _ = lock(&self.datapath.deliveries).remove(&self.key);
    }
}

/// Inbound capture of one pod: undone by [`Datapath::release_inbound`].
pub struct InboundCapture {
    pod_ip: Ipv4Addr,
    link: SkLookupLinkId,
}

const INBOUND_PROGRAM: &str = "weft_inbound";

/// Fails unless `path` is a directory on a cgroup v2 filesystem.
pub fn check_cgroup2_dir(path: &Path) -> Result<()> {
    let meta = std::fs::metadata(path)
        .with_context(|| format!("cgroup path {} does not exist", path.display()))?;
    if !meta.is_dir() {
        bail!("cgroup path {} is not a directory", path.display());
    }
    let stat =
        nix::sys::statfs::statfs(path).with_context(|| format!("statfs {}", path.display()))?;
    if stat.filesystem_type() != nix::sys::statfs::CGROUP2_SUPER_MAGIC {
        bail!(
            "cgroup path {} is not on a cgroup v2 filesystem (find it with `mount -t cgroup2`)",
            path.display()
        );
    }
    Ok(())
}

/// Where this build pins its maps under `base`: a directory named after the maps' layout, so an
/// agent whose maps differ (another key or value type, another size) never opens the old ones.
pub fn pin_dir(base: &Path) -> std::path::PathBuf {
    let layout = format!(
        "{}/{}/{}/{}/{}/{}/{}/{}/{}",
        size_of::<ClientKey>(),
        size_of::<OrigDst>(),
        size_of::<DeliveryKey>(),
        size_of::<Settings>(),
        weft_common::MAX_TRACKED_CONNECTIONS,
        weft_common::MAX_ENROLLED_PODS,
        weft_common::MAX_EXCLUDED_PORTS,
        weft_common::MAX_EXCLUDED_CIDRS,
        weft_common::COUNTER_SLOTS,
    );
    // FNV-1a: stable across builds and Rust versions, unlike std's hasher.
    let hash = layout
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
        });
    base.join(format!("maps-{hash:016x}"))
}

/// Creates `dir` if needed; fails unless it is on a bpf filesystem (pinning needs one).
fn check_bpf_fs_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let stat =
        nix::sys::statfs::statfs(dir).with_context(|| format!("statfs {}", dir.display()))?;
    if stat.filesystem_type() != nix::sys::statfs::BPF_FS_MAGIC {
        bail!(
            "{} is not on a bpf filesystem (mount one: mount -t bpf bpf /sys/fs/bpf)",
            dir.display()
        );
    }
    Ok(())
}

/// Removes the maps pinned in `dir` (the last agent stopping): the next one starts afresh.
pub fn unpin_maps(dir: &Path) -> Result<()> {
    for name in maps::ALL {
        match std::fs::remove_file(dir.join(name)) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => {
                return Err(err).with_context(|| format!("unpinning {}", dir.join(name).display()))
            }
        }
    }
    Ok(())
}

fn take_map(ebpf: &mut Ebpf, name: &str) -> Result<aya::maps::Map> {
    ebpf.take_map(name)
        .ok_or_else(|| anyhow!("eBPF object has no map {name}"))
}

impl Datapath {
    /// Loads the programs, writes `settings`, and attaches to `cgroup_path`. With `pin_dir`, the
    /// maps are the ones pinned there by an agent still running (created and pinned if there are
    /// none), so connections redirected by its programs are found by this agent's and vice versa.
    pub fn attach(cgroup_path: &Path, settings: Settings, pin_dir: Option<&Path>) -> Result<Self> {
        check_cgroup2_dir(cgroup_path)?;
        raise_memlock_limit();
        let mut loader = EbpfLoader::new();
        if let Some(dir) = pin_dir {
            check_bpf_fs_dir(dir)?;
            for name in maps::ALL {
                loader.map_pin_path(name, dir.join(name));
            }
        }
        let mut ebpf = loader.load(EBPF_OBJECT).context(
            "loading weft's eBPF maps failed: the agent needs CAP_BPF (or CAP_SYS_ADMIN)",
        )?;
        let mut settings_map: Array<_, Settings> =
            Array::try_from(take_map(&mut ebpf, maps::SETTINGS)?)?;
        settings_map
            .set(0, settings, 0)
            .context("writing agent settings into the eBPF map")?;
        let datapath_maps = (
            HashMap::try_from(take_map(&mut ebpf, maps::ENROLLED_NETNS)?)?,
            HashMap::try_from(take_map(&mut ebpf, maps::EXCLUDED_PORTS)?)?,
            LpmTrie::try_from(take_map(&mut ebpf, maps::EXCLUDED_CIDRS)?)?,
            HashMap::try_from(take_map(&mut ebpf, maps::ORIG_DST_BY_CLIENT)?)?,
            HashMap::try_from(take_map(&mut ebpf, maps::ORIG_DST_BY_COOKIE)?)?,
            PerCpuArray::try_from(take_map(&mut ebpf, maps::COUNTERS)?)?,
            SockHash::try_from(take_map(&mut ebpf, maps::INBOUND_LISTENERS)?)?,
            HashMap::try_from(take_map(&mut ebpf, maps::DELIVERIES)?)?,
        );
        let cgroup = File::open(cgroup_path)
            .with_context(|| format!("opening cgroup {}", cgroup_path.display()))?;
        // Attached as bpf_links (Linux >= 5.7): they run alongside other multi-attach programs on
        // the cgroup (a CNI's, say) and take no attach flags, so the default mode passes none.
        let mode = CgroupAttachMode::default();
        for name in ["weft_connect4", "weft_connect6"] {
            let program: &mut CgroupSockAddr = program(&mut ebpf, name)?.try_into()?;
            program.load().with_context(|| kernel_feature_error(name))?;
            program
                .attach(&cgroup, mode)
                .with_context(|| attach_error(name, cgroup_path))?;
        }
        let sockops: &mut SockOps = program(&mut ebpf, "weft_sockops")?.try_into()?;
        sockops
            .load()
            .with_context(|| kernel_feature_error("weft_sockops"))?;
        sockops
            .attach(&cgroup, mode)
            .with_context(|| attach_error("weft_sockops", cgroup_path))?;
        let release: &mut CgroupSock = program(&mut ebpf, "weft_sock_release")?.try_into()?;
        release
            .load()
            .with_context(|| kernel_feature_error("weft_sock_release"))?;
        release
            .attach(&cgroup, mode)
            .with_context(|| attach_error("weft_sock_release", cgroup_path))?;
        // Loaded now so a kernel without sk_lookup fails at start-up; attached per pod.
        let inbound: &mut SkLookup = program(&mut ebpf, INBOUND_PROGRAM)?.try_into()?;
        inbound.load().context(
            "the kernel refused the sk_lookup program weft_inbound (needs Linux >= 5.9)",
        )?;

        let (
            enrolled,
            excluded_ports,
            excluded_cidrs,
            orig_dst,
            pending_connects,
            counters,
            inbound_listeners,
            deliveries,
        ) = datapath_maps;
        Ok(Self {
            programs: Mutex::new(Some(ebpf)),
            enrolled: Mutex::new(enrolled),
            excluded_ports: Mutex::new(excluded_ports),
            excluded_cidrs: Mutex::new(excluded_cidrs),
            orig_dst,
            pending_connects,
            counters,
            inbound_listeners: Mutex::new(inbound_listeners),
            deliveries: Mutex::new(deliveries),
        })
    }

    /// Lets the connection the agent is opening from `source` to an app at `target` through to
    /// the app instead of steering it back to the agent, until the returned guard is dropped
    /// (once connected, the kernel no longer looks for a listener).
    pub fn begin_delivery(
        self: &Arc<Self>,
        source: SocketAddrV4,
        target: SocketAddrV4,
    ) -> Result<DeliveryGuard> {
        let key = DeliveryKey {
            source_ip: u32::from_ne_bytes(source.ip().octets()),
            destination_ip: u32::from_ne_bytes(target.ip().octets()),
            source_port: source.port(),
            destination_port: target.port(),
        };
        lock(&self.deliveries)
            .insert(key, 1, 0)
            .with_context(|| format!("registering the delivery {source} -> {target}"))?;
        Ok(DeliveryGuard {
            datapath: Arc::clone(self),
            key,
        })
    }

    /// Steers connections that arrive at `pod_ip` from outside the pod (except on the tunnel
    /// port) to `listener`, a listening socket inside the pod's namespace `netns`.
    pub fn capture_inbound(
        &self,
        netns: &File,
        pod_ip: Ipv4Addr,
        listener: &impl AsRawFd,
    ) -> Result<InboundCapture> {
        let key = u32::from_ne_bytes(pod_ip.octets());
        lock(&self.inbound_listeners)
            .insert(key, listener.as_raw_fd(), 0)
            .with_context(|| {
                format!("adding the inbound listener of {pod_ip} to the socket map")
            })?;
        let mut programs = lock(&self.programs);
        let attached = programs
            .as_mut()
            .ok_or_else(|| anyhow!("the eBPF programs are detached"))
            .and_then(|ebpf| {
                let inbound: &mut SkLookup = program(ebpf, INBOUND_PROGRAM)?.try_into()?;
                Ok(inbound.attach(netns)?)
            });
        match attached {
            Ok(link) => Ok(InboundCapture { pod_ip, link }),
            Err(err) => {
                let _ = lock(&self.inbound_listeners).remove(&key);
                Err(err).context("attaching the sk_lookup program to the pod's network namespace")
            }
        }
    }

    /// Stops steering the pod's inbound connections; they reach its sockets directly again.
    pub fn release_inbound(&self, capture: InboundCapture) -> Result<()> {
        if let Some(ebpf) = lock(&self.programs).as_mut() {
            let inbound: &mut SkLookup = program(ebpf, INBOUND_PROGRAM)?.try_into()?;
            inbound
                .detach(capture.link)
                .context("detaching the sk_lookup program")?;
        }
        let key = u32::from_ne_bytes(capture.pod_ip.octets());
        match lock(&self.inbound_listeners).remove(&key) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(err) => Err(err).context("removing the inbound listener from the socket map"),
        }
    }

    /// Detaches and unloads all programs; new connects are no longer captured.
    pub fn detach(&self) {
        drop(lock(&self.programs).take());
    }

    pub fn enroll(&self, netns_cookie: u64) -> Result<()> {
        lock(&self.enrolled)
            .insert(netns_cookie, 1, 0)
            .with_context(|| format!("adding netns cookie {netns_cookie} to the enrollment map"))
    }

    /// Removes enrolled namespaces other than `keep`: left in shared maps by an agent that was
    /// killed, or by the agent this one replaced, for pods this one does not serve.
    pub fn retain_enrolled(&self, keep: &HashSet<u64>) -> Result<usize> {
        let mut enrolled = lock(&self.enrolled);
        let stale: Vec<u64> = enrolled
            .keys()
            .filter_map(Result::ok)
            .filter(|cookie| !keep.contains(cookie))
            .collect();
        for cookie in &stale {
            match enrolled.remove(cookie) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(err) => return Err(err).context("removing a stale enrolled namespace"),
            }
        }
        Ok(stale.len())
    }

    pub fn unenroll(&self, netns_cookie: u64) -> Result<()> {
        match lock(&self.enrolled).remove(&netns_cookie) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(err) => Err(err).with_context(|| {
                format!("removing netns cookie {netns_cookie} from the enrollment map")
            }),
        }
    }

    /// Replaces the excluded ports and CIDRs with the given sets.
    pub fn set_exclusions(&self, ports: &[u16], cidrs: &[Ipv4Net]) -> Result<()> {
        let mut port_map = lock(&self.excluded_ports);
        let stale: Vec<u16> = port_map.keys().filter_map(Result::ok).collect();
        for port in stale.iter().filter(|port| !ports.contains(port)) {
            port_map.remove(port).context("removing an excluded port")?;
        }
        for port in ports {
            port_map
                .insert(port, 1, 0)
                .with_context(|| format!("excluding port {port}"))?;
        }
        let mut cidr_map = lock(&self.excluded_cidrs);
        let wanted: Vec<(u32, u32)> = cidrs
            .iter()
            .map(|net| {
                (
                    u32::from(net.prefix_len()),
                    u32::from_ne_bytes(net.network().octets()),
                )
            })
            .collect();
        let stale: Vec<Key<u32>> = cidr_map.keys().filter_map(Result::ok).collect();
        for key in stale {
            if !wanted.contains(&(key.prefix_len(), key.data())) {
                cidr_map.remove(&key).context("removing an excluded CIDR")?;
            }
        }
        for (net, (prefix_len, ip)) in cidrs.iter().zip(wanted) {
            cidr_map
                .insert(&Key::new(prefix_len, ip), 1, 0)
                .with_context(|| format!("excluding CIDR {net}"))?;
        }
        Ok(())
    }

    /// Where the connection from `client` (as accepted in the pod with `netns_cookie`) was going.
    pub fn original_destination(
        &self,
        netns_cookie: u64,
        client: SocketAddrV4,
    ) -> Option<SocketAddrV4> {
        let key = ClientKey {
            netns_cookie,
            ip: u32::from_ne_bytes(client.ip().octets()),
            port: client.port(),
            _pad: 0,
        };
        let orig = self.orig_dst.get(&key, 0).ok()?;
        Some(SocketAddrV4::new(
            Ipv4Addr::from(orig.ip.to_ne_bytes()),
            orig.port,
        ))
    }

    /// Redirected connections the kernel tracks: (connecting, established).
    pub fn tracked_connections(&self) -> (usize, usize) {
        (
            self.pending_connects.keys().count(),
            self.orig_dst.keys().count(),
        )
    }

    /// The per-CPU counters summed over CPUs, by name.
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        Counter::ALL
            .iter()
            .map(|counter| {
                let total = self
                    .counters
                    .get(&(*counter as u32), 0)
                    .map(|per_cpu| per_cpu.iter().sum())
                    .unwrap_or(0);
                (counter.name(), total)
            })
            .collect()
    }
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut aya::programs::Program> {
    ebpf.program_mut(name)
        .ok_or_else(|| anyhow!("eBPF object has no program {name}"))
}

fn kernel_feature_error(name: &str) -> String {
    format!(
        "the kernel refused eBPF program {name}: it needs cgroup sock_addr, sockops and \
         sock_release hooks with netns and socket cookies (Linux >= 5.15)"
    )
}

fn attach_error(name: &str, cgroup: &Path) -> String {
    format!("attaching {name} to cgroup {}", cgroup.display())
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; newer ones ignore it.
fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads a valid, initialised struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        tracing::debug!("could not raise RLIMIT_MEMLOCK; fine on Linux >= 5.11");
    }
}

//! Finds the network namespace of a pod that is already running from its UID alone, so it can be
//! enrolled without a restart. The agent runs with hostPID: it reads every process's
//! `/proc/<pid>/cgroup`, keeps the processes whose cgroup belongs to a pod, and uses
//! `/proc/<pid>/ns/net` of one of them.
//!
//! Use, once per enrollment pass and then per pod:
//!
//! ```ignore
//! let index = ProcIndex::scan(Path::new(DEFAULT_PROC_ROOT), Path::new(OWN_NETNS))?; // one read of every cgroup file
//! for problem in index.read_errors() { /* warn: not fatal */ }
//! let uid: PodUid = uid_from_the_api.parse()?;
//! let found = index.netns_of(&uid)?; // found.path, found.pid, found.inode
//! ```
//!
//! `found.path` is `<proc_root>/<pid>/ns/net` of the pod's lowest PID outside the node's network
//! namespace (usually the sandbox's pause process). `found.inode` identifies the namespace: a new
//! inode for the same pod means its sandbox was recreated. The process can exit and its PID be
//! reused between the scan and opening the path, so compare the inode of the namespace actually
//! opened with `found.inode` before trusting it.
//!
//! Recognised cgroup layouts, in cgroup v2 (`0::/path`) and v1 (`N:controllers:/path`) lines:
//! - systemd driver (containerd, CRI-O, cri-dockerd):
//!   `/kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid with _>.slice/<container>.scope`,
//!   Guaranteed pods without the QoS level, and renamed cgroup roots such as kind's
//!   `/kubelet.slice/kubelet-kubepods.slice/…`;
//! - cgroupfs driver: `/kubepods[/<qos>]/pod<uid>/<container>` under any parent;
//! - either seen from inside a cgroup namespace (`/../../kubepods-besteffort.slice/…`,
//!   `/../../pod<uid>/…`), where the parents above the namespace's root are `..` or missing.
//!
//! A process in the pod's own cgroup (no container level) counts; anything outside a pod's cgroup
//! (kubelet, `/system.slice`, `/user.slice`) does not.
use std::{
    collections::HashMap,
    fmt, fs, io,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    str::FromStr,
};

/// Where the node's processes are, for an agent running with hostPID.
pub const DEFAULT_PROC_ROOT: &str = "/proc";
/// The agent's own network namespace: the node's, for an agent on the host network.
pub const OWN_NETNS: &str = "/proc/self/ns/net";

/// A pod's UID in the Kubernetes form: a UUID, lowercase, with dashes.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PodUid(String);

impl FromStr for PodUid {
    type Err = Error;

    /// Accepts the Kubernetes form (case-insensitively) and nothing else.
    fn from_str(s: &str) -> Result<Self, Error> {
        parse_uuid(s, b'-').ok_or_else(|| Error::InvalidUid(s.to_string()))
    }
}

impl fmt::Display for PodUid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A UUID whose four separators are `separator`, normalised to the Kubernetes form.
fn parse_uuid(s: &str, separator: u8) -> Option<PodUid> {
    let bytes = s.as_bytes();
    if bytes.len() != 36 {
        return None;
    }
    let mut uid = String::with_capacity(36);
    for (i, &byte) in bytes.iter().enumerate() {
        if matches!(i, 8 | 13 | 18 | 23) {
            if byte != separator {
                return None;
            }
            uid.push('-');
        } else if byte.is_ascii_hexdigit() {
            uid.push(char::from(byte.to_ascii_lowercase()));
        } else {
            return None;
        }
    }
    Some(PodUid(uid))
}

/// The pod a process belongs to and that pod's cgroup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodCgroup {
    pub uid: PodUid,
    /// The pod-level cgroup, as the process's `/proc/<pid>/cgroup` names it (the cgroup v2 line
    /// when there is one; relative to a cgroup namespace's root if the process is in one).
    pub path: String,
}

/// The pod a process belongs to, from the content of its `/proc/<pid>/cgroup`. A process whose
/// lines name two different pods is nobody's: it cannot be in both, so neither is trusted.
pub fn pod_of_process(content: &str) -> Option<PodCgroup> {
    let mut found: Option<PodCgroup> = None;
    for line in content.lines() {
        // `hierarchy-id:controllers:path`; the path itself may contain ':'.
        let mut fields = line.splitn(3, ':');
        let (Some(hierarchy), Some(path)) = (fields.next(), fields.nth(1)) else {
            continue;
        };
        let Some(pod) = pod_cgroup_of_path(path) else {
            continue;
        };
        match &found {
            Some(seen) if seen.uid != pod.uid => return None,
            // The unified (v2) hierarchy's path names the pod's cgroup best.
            Some(_) if hierarchy != "0" => {}
            _ => found = Some(pod),
        }
    }
    found
}

fn pod_cgroup_of_path(path: &str) -> Option<PodCgroup> {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    segments.iter().enumerate().find_map(|(i, segment)| {
        let uid = systemd_pod_slice(segment).or_else(|| cgroupfs_pod(segment, &segments[..i]))?;
        Some(PodCgroup {
            uid,
            path: format!("/{}", segments[..=i].join("/")),
        })
    })
}

/// `kubepods-pod<uid>.slice` or `kubepods-<qos>-pod<uid>.slice`, possibly prefixed by a renamed
/// cgroup root (kind: `kubelet-kubepods-…`). The slice name alone identifies a pod: systemd spells
/// every parent into it, and writes the UID's dashes as `_` because a dash separates parents.
fn systemd_pod_slice(segment: &str) -> Option<PodUid> {
    let (parents, uid) = segment.strip_suffix(".slice")?.rsplit_once("-pod")?;
    let mut parents = parents.rsplit('-');
    let in_kubepods = match parents.next()? {
        "kubepods" => true,
        "burstable" | "besteffort" => parents.next() == Some("kubepods"),
        _ => false,
    };
    if in_kubepods {
        parse_uuid(uid, b'_')
    } else {
        None
    }
}

/// `pod<uid>` directly under `kubepods` or `kubepods/<qos>`. Seen from inside a cgroup namespace
/// the parents above the namespace's root read as `..` or are missing, so there a pod segment
/// preceded only by `..` and at most a QoS class counts too.
fn cgroupfs_pod(segment: &str, parents: &[&str]) -> Option<PodUid> {
    let uid = parse_uuid(segment.strip_prefix("pod")?, b'-')?;
    let above_qos = match parents.split_last() {
        Some((&("burstable" | "besteffort"), rest)) => rest,
        _ => parents,
    };
    let under_kubepods = above_qos.last() == Some(&"kubepods");
    let namespace_relative = above_qos.iter().all(|parent| *parent == "..");
    (under_kubepods || namespace_relative).then_some(uid)
}

/// Identity of a network namespace: its nsfs inode (and device, so that files of a fake proc
/// tree on another filesystem never compare equal to a real namespace).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct NetnsId {
    dev: u64,
    inode: u64,
}

/// Follows the `/proc/<pid>/ns/net` magic link to the namespace itself.
fn netns_id(path: &Path) -> io::Result<NetnsId> {
    let meta = fs::metadata(path)?;
    Ok(NetnsId {
        dev: meta.dev(),
        inode: meta.ino(),
    })
}

/// The process exited while we looked: normal on a busy node. A process that has exited but is
/// not reaped yet answers ESRCH instead of ENOENT.
fn vanished(err: &io::Error) -> bool {
    err.kind() == io::ErrorKind::NotFound || err.raw_os_error() == Some(libc::ESRCH)
}

/// An entry of the proc root that could not be read for a reason other than its process exiting.
#[derive(Debug)]
pub struct ReadError {
    pub path: PathBuf,
    pub error: io::Error,
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.error)
    }
}

/// A pod's network namespace, as found by [`ProcIndex::netns_of`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FoundNetns {
    /// `<proc_root>/<pid>/ns/net`, to open (see the module's note on PID reuse).
    pub path: PathBuf,
    pub pid: u32,
    /// The namespace's inode (`net:[inode]`): changes when the pod's sandbox is recreated.
    pub inode: u64,
    /// The pod's cgroup, by which it was found (see [`PodCgroup::path`]).
    pub cgroup: String,
}

/// What went wrong finding a pod's network namespace, worded for the operator.
#[derive(Debug)]
pub enum Error {
    InvalidUid(String),
    ProcUnreadable {
        proc_root: PathBuf,
        source: io::Error,
    },
    HostNetnsUnreadable {
        path: PathBuf,
        source: io::Error,
    },
    NoProcess {
        uid: PodUid,
        proc_root: PathBuf,
        /// Entries of the proc root the scan could not read: the pod's may be among them.
        unreadable: usize,
    },
    /// The scan saw processes of the pod, but all have exited since.
    Exited {
        uid: PodUid,
        processes: usize,
    },
    HostNetwork {
        uid: PodUid,
        processes: usize,
    },
    NetnsUnreadable {
        uid: PodUid,
        path: PathBuf,
        source: io::Error,
    },
    /// Each namespace with the lowest PID in it, in PID order.
    SplitNetns {
        uid: PodUid,
        namespaces: Vec<FoundNetns>,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::InvalidUid(uid) => write!(
                f,
                "{uid:?} is not a pod UID (expected a UUID such as \
                 0a1b2c3d-4e5f-4789-8abc-def012345678)"
            ),
            Self::ProcUnreadable { proc_root, source } => {
                write!(
                    f,
                    "cannot list the processes in {}: {source}",
                    proc_root.display()
                )
            }
            Self::HostNetnsUnreadable { path, source } => write!(
                f,
                "cannot read the node's network namespace {}: {source} (the agent needs hostPID \
                 and CAP_SYS_PTRACE)",
                path.display()
            ),
            Self::NoProcess {
                uid,
                proc_root,
                unreadable,
            } => {
                write!(
                    f,
                    "no process of pod {uid} found under {} (is the agent running with hostPID? \
                     is the pod's sandbox running?)",
                    proc_root.display()
                )?;
                if *unreadable > 0 {
                    write!(f, "; {unreadable} process entries could not be read")?;
                }
                Ok(())
            }
            Self::Exited { uid, processes } => write!(
                f,
                "the {processes} processes of pod {uid} exited after the scan (the pod is \
                 terminating or its sandbox is being recreated; the next scan will tell)"
            ),
            Self::HostNetwork { uid, processes } => write!(
                f,
                "pod {uid} runs in the host network namespace (all {processes} of its processes \
                 do): hostNetwork pods are not enrolled"
            ),
            Self::NetnsUnreadable { uid, path, source } => write!(
                f,
                "cannot read the network namespace of a process of pod {uid}, {}: {source} \
                 (does the agent have CAP_SYS_PTRACE?)",
                path.display()
            ),
            Self::SplitNetns { uid, namespaces } => {
                write!(
                    f,
                    "processes of pod {uid} are in {} different network namespaces (",
                    namespaces.len()
                )?;
                for (i, netns) in namespaces.iter().enumerate() {
                    let separator = if i == 0 { "" } else { ", " };
                    write!(f, "{separator}pid {}: net:[{}]", netns.pid, netns.inode)?;
                }
                write!(
                    f,
                    "); a container made a namespace of its own and the pod's cannot be told apart"
                )
            }
        }
    }
}

impl std::error::Error for Error {}

/// The node's pods and their processes, from one scan of a proc root.
#[derive(Debug)]
pub struct ProcIndex {
    proc_root: PathBuf,
    host_netns: NetnsId,
    /// Each pod's PIDs, ascending, and its cgroup.
    pods: HashMap<PodUid, (Vec<u32>, String)>,
    read_errors: Vec<ReadError>,
}

impl ProcIndex {
    /// Reads the cgroup of every process under `proc_root` (normally [`DEFAULT_PROC_ROOT`]).
    /// `node_netns` is the node's network namespace, whose processes are no pod's: the agent's
    /// own ([`OWN_NETNS`]), as it runs in the node's network (hostNetwork). Fails only when the
    /// proc root cannot be listed or that namespace cannot be read; unreadable processes are
    /// skipped and listed in [`read_errors`](Self::read_errors).
    pub fn scan(proc_root: &Path, node_netns: &Path) -> Result<Self, Error> {
        let host_netns = node_netns;
        let entries = fs::read_dir(proc_root).map_err(|source| Error::ProcUnreadable {
            proc_root: proc_root.to_path_buf(),
            source,
        })?;
        let host_netns = netns_id(host_netns).map_err(|source| Error::HostNetnsUnreadable {
            path: host_netns.to_path_buf(),
            source,
        })?;
        let mut pods: HashMap<PodUid, (Vec<u32>, String)> = HashMap::new();
        let mut read_errors = Vec::new();
        for entry in entries {
            let entry = match entry {
                Ok(entry) => entry,
                Err(error) => {
                    read_errors.push(ReadError {
                        path: proc_root.to_path_buf(),
                        error,
                    });
                    continue;
                }
            };
            // Processes are the numeric entries; the rest (self, sys, …) is not.
            let name = entry.file_name();
            let Some(pid) = name.to_str().and_then(|name| name.parse::<u32>().ok()) else {
                continue;
            };
            let path = entry.path().join("cgroup");
            match fs::read(&path) {
                Ok(content) => {
                    // Lossy: only non-UTF-8 names of cgroups that are no pod's are damaged.
                    if let Some(pod) = pod_of_process(&String::from_utf8_lossy(&content)) {
                        pods.entry(pod.uid)
                            .or_insert_with(|| (Vec::new(), pod.path))
                            .0
                            .push(pid);
                    }
                }
                Err(error) if vanished(&error) => {}
                Err(error) => read_errors.push(ReadError { path, error }),
            }
        }
        for (pids, _) in pods.values_mut() {
            pids.sort_unstable();
        }
        Ok(Self {
            proc_root: proc_root.to_path_buf(),
            host_netns,
            pods,
            read_errors,
        })
    }

    /// Entries the scan could not read (not counting processes that exited meanwhile).
    pub fn read_errors(&self) -> &[ReadError] {
        &self.read_errors
    }

    /// The network namespace of pod `uid`: the one its processes outside the node's namespace
    /// share (CRI-O's conmon, for one, sits in the pod's cgroup but in the node's namespace).
    pub fn netns_of(&self, uid: &PodUid) -> Result<FoundNetns, Error> {
        let Some((pids, cgroup)) = self.pods.get(uid) else {
            return Err(Error::NoProcess {
                uid: uid.clone(),
                proc_root: self.proc_root.clone(),
                unreadable: self.read_errors.len(),
            });
        };
        let mut in_host = 0;
        // One entry per namespace, holding its lowest PID since `pids` is ascending.
        let mut namespaces: Vec<(NetnsId, FoundNetns)> = Vec::new();
        for &pid in pids {
            let path = self.proc_root.join(pid.to_string()).join("ns/net");
            match netns_id(&path) {
                Ok(id) if id == self.host_netns => in_host += 1,
                Ok(id) => {
                    if !namespaces.iter().any(|(seen, _)| *seen == id) {
                        let found = FoundNetns {
                            path,
                            pid,
                            inode: id.inode,
                            cgroup: cgroup.clone(),
                        };
                        namespaces.push((id, found));
                    }
                }
                Err(error) if vanished(&error) => {}
                // Not skipped: the unread process might be in another namespace, and enrolling
                // the wrong namespace is worse than failing this pass.
                Err(source) => {
                    return Err(Error::NetnsUnreadable {
                        uid: uid.clone(),
                        path,
                        source,
                    })
                }
            }
        }
        let mut namespaces: Vec<FoundNetns> = namespaces.into_iter().map(|(_, n)| n).collect();
        match namespaces.len() {
            1 => Ok(namespaces.remove(0)),
            0 if in_host > 0 => Err(Error::HostNetwork {
                uid: uid.clone(),
                processes: in_host,
            }),
            0 => Err(Error::Exited {
                uid: uid.clone(),
                processes: pids.len(),
            }),
            _ => Err(Error::SplitNetns {
                uid: uid.clone(),
                namespaces,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "6f2c5b1e-8d3a-4c7e-9b0f-1a2b3c4d5e6f";
    const UID_SYSTEMD: &str = "6f2c5b1e_8d3a_4c7e_9b0f_1a2b3c4d5e6f";
    const CONTAINER: &str = "3f1d2e0c9b8a7f6e5d4c3b2a1f0e9d8c7b6a5f4e3d2c1b0a9f8e7d6c5b4a3f2e";

    fn uid() -> PodUid {
        PodUid(UID.to_string())
    }

    fn parsed(content: &str) -> Option<String> {
        pod_of_process(content).map(|pod| pod.uid.to_string())
    }

    #[test]
    fn systemd_driver_layouts_of_every_runtime_and_qos_class() {
        let pod = |qos: &str| match qos {
            "" => format!("/kubepods.slice/kubepods-pod{UID_SYSTEMD}.slice"),
            qos => format!(
                "/kubepods.slice/kubepods-{qos}.slice/kubepods-{qos}-pod{UID_SYSTEMD}.slice"
            ),
        };
        for qos in ["", "burstable", "besteffort"] {
            let pod = pod(qos);
            for container in [
                format!("cri-containerd-{CONTAINER}.scope"),
                format!("crio-{CONTAINER}.scope"),
                format!("crio-conmon-{CONTAINER}.scope"),
                format!("docker-{CONTAINER}.scope"),
            ] {
                let v2 = format!("0::{pod}/{container}\n");
                assert_eq!(parsed(&v2).as_deref(), Some(UID), "{v2}");
                assert_eq!(pod_of_process(&v2).map(|p| p.path), Some(pod.clone()));
                // A cgroup v1 (or hybrid) host lists every hierarchy, the unified one last.
                let v1 = format!(
                    "12:pids:{pod}/{container}\n\
                     11:cpu,cpuacct:{pod}/{container}\n\
                     4:memory:{pod}/{container}\n\
                     1:name=systemd:{pod}/{container}\n\
                     0::/\n"
                );
                assert_eq!(parsed(&v1).as_deref(), Some(UID), "{v1}");
                assert_eq!(pod_of_process(&v1).map(|p| p.path), Some(pod.clone()));
            }
            // A process in the pod's own cgroup.
            assert_eq!(
                parsed(&format!("0::{pod}\n")).as_deref(),
                Some(UID),
                "{pod}"
            );
        }
    }

    #[test]
    fn the_pod_cgroup_is_read_from_the_unified_hierarchy_when_it_names_the_pod() {
        let content = format!(
            "4:memory:/kubepods/burstable/pod{UID}/{CONTAINER}\n\
             0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_SYSTEMD}.slice/cri-containerd-{CONTAINER}.scope\n"
        );
        assert_eq!(
            pod_of_process(&content),
            Some(PodCgroup {
                uid: uid(),
                path: format!(
                    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_SYSTEMD}.slice"
                ),
            })
        );
        // Seen from inside a cgroup namespace, the path stays relative to its root.
        assert_eq!(
            pod_of_process(&format!("0::/../../pod{UID}/{CONTAINER}\n")).map(|p| p.path),
            Some(format!("/../../pod{UID}"))
        );
    }

    #[test]
    fn cgroupfs_driver_layouts_of_every_runtime_and_qos_class() {
        for pod in [
            format!("/kubepods/pod{UID}"),
            format!("/kubepods/burstable/pod{UID}"),
            format!("/kubepods/besteffort/pod{UID}"),
        ] {
            for container in [
                CONTAINER.to_string(),
                format!("crio-{CONTAINER}"),
                format!("crio-conmon-{CONTAINER}"),
            ] {
                let v2 = format!("0::{pod}/{container}\n");
                assert_eq!(parsed(&v2).as_deref(), Some(UID), "{v2}");
                let v1 = format!(
                    "11:devices:{pod}/{container}\n\
                     3:cpu,cpuacct:{pod}/{container}\n\
                     1:name=systemd:{pod}/{container}\n"
                );
                assert_eq!(parsed(&v1).as_deref(), Some(UID), "{v1}");
            }
            assert_eq!(
                parsed(&format!("0::{pod}\n")).as_deref(),
                Some(UID),
                "{pod}"
            );
        }
    }

    #[test]
    fn renamed_cgroup_roots_such_as_kind_nodes() {
        for path in [
            format!(
                "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/\
                 kubelet-kubepods-besteffort-pod{UID_SYSTEMD}.slice/cri-containerd-{CONTAINER}.scope"
            ),
            format!(
                "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-pod{UID_SYSTEMD}.slice/\
                 cri-containerd-{CONTAINER}.scope"
            ),
            format!("/kubelet/kubepods/burstable/pod{UID}/{CONTAINER}"),
        ] {
            assert_eq!(parsed(&format!("0::{path}\n")).as_deref(), Some(UID), "{path}");
        }
    }

    #[test]
    fn paths_seen_from_inside_a_cgroup_namespace() {
        for path in [
            format!(
                "/../../../kubepods-besteffort.slice/kubepods-besteffort-pod{UID_SYSTEMD}.slice/\
                 cri-containerd-{CONTAINER}.scope"
            ),
            format!("/../../kubepods-pod{UID_SYSTEMD}.slice/crio-{CONTAINER}.scope"),
            format!("/../../pod{UID}/{CONTAINER}"),
            format!("/../../../besteffort/pod{UID}/{CONTAINER}"),
            format!("/../../pod{UID}"),
            // A namespace rooted above the pods: the parents are simply missing.
            format!("/pod{UID}/{CONTAINER}"),
            format!("/burstable/pod{UID}/{CONTAINER}"),
            format!("../../pod{UID}/{CONTAINER}"),
        ] {
            assert_eq!(
                parsed(&format!("0::{path}\n")).as_deref(),
                Some(UID),
                "{path}"
            );
        }
    }

    #[test]
    fn uids_are_normalised_to_the_kubernetes_form() {
        let upper = UID.to_uppercase();
        let upper_systemd = UID_SYSTEMD.to_uppercase();
        assert_eq!(
            parsed(&format!("0::/kubepods/burstable/pod{upper}/{CONTAINER}")).as_deref(),
            Some(UID)
        );
        assert_eq!(
            parsed(&format!(
                "0::/kubepods.slice/kubepods-pod{upper_systemd}.slice"
            ))
            .as_deref(),
            Some(UID)
        );
        assert_eq!(upper.parse::<PodUid>().unwrap(), uid());
        assert_eq!(UID.parse::<PodUid>().unwrap().to_string(), UID);
    }

    #[test]
    fn processes_outside_pods_belong_to_none() {
        for content in [
            "",
            "garbage\n",
            "0::/\n",
            "0::/init.scope\n",
            "0::/system.slice/kubelet.service\n",
            "0::/system.slice/containerd.service\n",
            "0::/user.slice/user-0.slice/session-3.scope\n",
            "0::/kubepods.slice\n",
            "0::/kubepods.slice/kubepods-burstable.slice\n",
            "0::/kubepods\n",
            "0::/kubepods/besteffort\n",
            "0::/machine.slice/libpod-3f1d2e0c9b8a.scope\n",
            "4:memory:/process_api/13913b0a890b48e2852c6eed3dad8492\n0::/\n",
        ] {
            assert_eq!(parsed(content), None, "{content}");
        }
        // A pod-shaped segment outside kubepods is not a pod.
        for path in [
            format!("/system.slice/pod{UID}"),
            format!("/system.slice/burstable/pod{UID}/{CONTAINER}"),
            format!("/kubepods/guaranteed/pod{UID}/{CONTAINER}"),
            format!("/system.slice/foo-pod{UID_SYSTEMD}.slice"),
            format!("/kubepods.slice/kubepods-guaranteed-pod{UID_SYSTEMD}.slice"),
            format!("/kubepods.slice/kubepods-burstable.slice/pod{UID_SYSTEMD}.slice"),
        ] {
            assert_eq!(parsed(&format!("0::{path}\n")), None, "{path}");
        }
    }

    #[test]
    fn malformed_uids_are_rejected() {
        let malformed = [
            "6f2c5b1e-8d3a-4c7e-9b0f-1a2b3c4d5e6",   // short
            "6f2c5b1e-8d3a-4c7e-9b0f-1a2b3c4d5e6f0", // long
            "6f2c5b1g-8d3a-4c7e-9b0f-1a2b3c4d5e6f",  // not hex
            "6f2c5b1e8-d3a-4c7e-9b0f-1a2b3c4d5e6f",  // separator misplaced
            "6f2c5b1e8d3a4c7e9b0f1a2b3c4d5e6f",      // no separators
            "",
        ];
        for uid in malformed {
            assert_eq!(
                parsed(&format!("0::/kubepods/pod{uid}/{CONTAINER}")),
                None,
                "{uid}"
            );
            let systemd = uid.replace('-', "_");
            let path =
                format!("/kubepods.slice/kubepods-pod{systemd}.slice/crio-{CONTAINER}.scope");
            assert_eq!(parsed(&format!("0::{path}")), None, "{path}");
            assert!(uid.parse::<PodUid>().is_err(), "{uid}");
        }
        // Each layout has its own separator, used throughout.
        let mixed = "6f2c5b1e_8d3a-4c7e_9b0f_1a2b3c4d5e6f";
        assert_eq!(
            parsed(&format!("0::/kubepods/pod{mixed}/{CONTAINER}")),
            None
        );
        assert_eq!(
            parsed(&format!("0::/kubepods.slice/kubepods-pod{mixed}.slice")),
            None
        );
        assert_eq!(
            parsed(&format!("0::/kubepods/pod{UID_SYSTEMD}/{CONTAINER}")),
            None
        );
        assert_eq!(
            parsed(&format!("0::/kubepods.slice/kubepods-pod{UID}.slice")),
            None
        );
        let err = UID_SYSTEMD.parse::<PodUid>().unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "\"{UID_SYSTEMD}\" is not a pod UID (expected a UUID such as \
                 0a1b2c3d-4e5f-4789-8abc-def012345678)"
            )
        );
    }

    #[test]
    fn a_process_naming_two_pods_belongs_to_neither() {
        let other = "0a1b2c3d-4e5f-4789-8abc-def012345678";
        let content = format!("4:memory:/kubepods/pod{other}/{CONTAINER}\n0::/kubepods/pod{UID}\n");
        assert_eq!(parsed(&content), None);
        // The same pod twice is fine.
        let content = format!(
            "4:memory:/kubepods/pod{UID}/{CONTAINER}\n\
             0::/kubepods.slice/kubepods-pod{UID_SYSTEMD}.slice\n"
        );
        assert_eq!(parsed(&content).as_deref(), Some(UID));
    }

    #[test]
    fn exited_processes_are_told_apart_from_errors() {
        assert!(vanished(&io::Error::from_raw_os_error(libc::ENOENT)));
        assert!(vanished(&io::Error::from_raw_os_error(libc::ESRCH)));
        assert!(!vanished(&io::Error::from_raw_os_error(libc::EACCES)));
        assert!(!vanished(&io::Error::from_raw_os_error(libc::EISDIR)));
    }

    /// A proc tree in a temporary directory. Namespaces are plain files: hard links of one file
    /// share its inode like processes share a namespace.
    struct FakeProc {
        dir: tempfile::TempDir,
    }

    impl FakeProc {
        /// With init (PID 1) in the node's namespace.
        fn new() -> Self {
            let fake = Self {
                dir: tempfile::tempdir().unwrap(),
            };
            fake.process(1, "0::/init.scope\n");
            fake.own_netns(1);
            fs::create_dir(fake.root().join("self")).unwrap();
            fs::write(fake.root().join("uptime"), "1.0 1.0\n").unwrap();
            fake
        }

        fn root(&self) -> &Path {
            self.dir.path()
        }

        fn process(&self, pid: u32, cgroup: &str) {
            let dir = self.root().join(pid.to_string());
            fs::create_dir_all(dir.join("ns")).unwrap();
            fs::write(dir.join("cgroup"), cgroup).unwrap();
        }

        fn pod_process(&self, pid: u32, uid: &str) {
            self.process(
                pid,
                &format!("0::/kubepods/burstable/pod{uid}/{CONTAINER}\n"),
            );
        }

        fn own_netns(&self, pid: u32) {
            fs::write(self.root().join(format!("{pid}/ns/net")), "").unwrap();
        }

        fn netns_of(&self, pid: u32, same_as: u32) {
            let root = self.root();
            fs::hard_link(
                root.join(format!("{same_as}/ns/net")),
                root.join(format!("{pid}/ns/net")),
            )
            .unwrap();
        }

        fn inode(&self, pid: u32) -> u64 {
            fs::metadata(self.root().join(format!("{pid}/ns/net")))
                .unwrap()
                .ino()
        }
    }

    #[test]
    fn the_lowest_pid_outside_the_node_namespace_is_chosen() {
        let fake = FakeProc::new();
        // conmon-like: in the pod's cgroup, in the node's namespace.
        fake.process(
            90,
            &format!("0::/kubepods/burstable/pod{UID}/crio-conmon-{CONTAINER}\n"),
        );
        fake.netns_of(90, 1);
        fake.pod_process(205, UID);
        fake.own_netns(205);
        fake.process(100, &format!("0::/kubepods/burstable/pod{UID}\n"));
        fake.netns_of(100, 205);
        // Another pod, and a host process.
        fake.pod_process(300, "0a1b2c3d-4e5f-4789-8abc-def012345678");
        fake.own_netns(300);
        fake.process(400, "0::/system.slice/kubelet.service\n");
        fake.netns_of(400, 1);

        let index = ProcIndex::scan(fake.root(), &fake.root().join("1/ns/net")).unwrap();
        assert!(index.read_errors().is_empty(), "{:?}", index.read_errors());
        let found = index.netns_of(&uid()).unwrap();
        assert_eq!(
            found,
            FoundNetns {
                path: fake.root().join("100/ns/net"),
                pid: 100,
                inode: fake.inode(205),
                cgroup: format!("/kubepods/burstable/pod{UID}"),
            }
        );
        let other = "0a1b2c3d-4e5f-4789-8abc-def012345678".parse().unwrap();
        assert_eq!(index.netns_of(&other).unwrap().pid, 300);
    }

    #[test]
    fn host_network_pods_are_refused() {
        let fake = FakeProc::new();
        for pid in [10, 11] {
            fake.pod_process(pid, UID);
            fake.netns_of(pid, 1);
        }
        let err = ProcIndex::scan(fake.root(), &fake.root().join("1/ns/net"))
            .unwrap()
            .netns_of(&uid())
            .unwrap_err();
        assert!(
            matches!(err, Error::HostNetwork { processes: 2, .. }),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            format!(
                "pod {UID} runs in the host network namespace (all 2 of its processes do): \
                 hostNetwork pods are not enrolled"
            )
        );
    }

    #[test]
    fn a_pod_split_over_namespaces_is_refused() {
        let fake = FakeProc::new();
        for pid in [20, 21, 22] {
            fake.pod_process(pid, UID);
        }
        fake.own_netns(20);
        fake.own_netns(21);
        fake.netns_of(22, 20);
        let err = ProcIndex::scan(fake.root(), &fake.root().join("1/ns/net"))
            .unwrap()
            .netns_of(&uid())
            .unwrap_err();
        let Error::SplitNetns { namespaces, .. } = &err else {
            panic!("{err:?}");
        };
        let pids: Vec<u32> = namespaces.iter().map(|n| n.pid).collect();
        assert_eq!(pids, [20, 21]);
        assert!(
            err.to_string().starts_with(&format!(
                "processes of pod {UID} are in 2 different network namespaces (pid 20: net:[{}], \
                 pid 21: net:[{}]);",
                fake.inode(20),
                fake.inode(21)
            )),
            "{err}"
        );
    }

    #[test]
    fn a_pod_without_processes_names_the_likely_causes() {
        let fake = FakeProc::new();
        // Exited during the scan: its directory is still there, its files are gone.
        fs::create_dir(fake.root().join("50")).unwrap();
        // Not readable for another reason: counted, not fatal.
        fs::create_dir_all(fake.root().join("60/cgroup")).unwrap();
        let index = ProcIndex::scan(fake.root(), &fake.root().join("1/ns/net")).unwrap();
        let errors = index.read_errors();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].path, fake.root().join("60/cgroup"));
        assert_eq!(errors[0].error.raw_os_error(), Some(libc::EISDIR));
        let err = index.netns_of(&uid()).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "no process of pod {UID} found under {} (is the agent running with hostPID? is \
                 the pod's sandbox running?); 1 process entries could not be read",
                fake.root().display()
            )
        );
    }

    #[test]
    fn processes_exiting_after_the_scan_are_skipped() {
        let fake = FakeProc::new();
        for pid in [30, 31] {
            fake.pod_process(pid, UID);
        }
        fake.own_netns(31);
        // PID 30 exits between the scan and the lookup: its ns/net never existed here.
        let index = ProcIndex::scan(fake.root(), &fake.root().join("1/ns/net")).unwrap();
        assert_eq!(index.netns_of(&uid()).unwrap().pid, 31);
        fs::remove_file(fake.root().join("31/ns/net")).unwrap();
        let err = index.netns_of(&uid()).unwrap_err();
        assert!(matches!(err, Error::Exited { processes: 2, .. }), "{err:?}");
        assert!(err
            .to_string()
            .starts_with(&format!("the 2 processes of pod {UID} exited")));
    }

    #[test]
    fn an_unreadable_namespace_fails_the_pod() {
        let fake = FakeProc::new();
        for pid in [40, 41] {
            fake.pod_process(pid, UID);
        }
        fake.own_netns(40);
        // `ns` is a file, so `ns/net` gives ENOTDIR: neither an exit nor a namespace.
        let ns = fake.root().join("41/ns");
        fs::remove_dir(&ns).unwrap();
        fs::write(&ns, "").unwrap();
        let err = ProcIndex::scan(fake.root(), &fake.root().join("1/ns/net"))
            .unwrap()
            .netns_of(&uid())
            .unwrap_err();
        assert!(matches!(err, Error::NetnsUnreadable { .. }), "{err:?}");
        assert!(
            err.to_string().starts_with(&format!(
                "cannot read the network namespace of a process of pod {UID}, {}/41/ns/net:",
                fake.root().display()
            )),
            "{err}"
        );
    }

    #[test]
    fn scanning_fails_without_the_proc_root_or_init() {
        let missing = Path::new("/nonexistent/proc");
        let err = ProcIndex::scan(missing, &missing.join("1/ns/net")).unwrap_err();
        assert!(matches!(err, Error::ProcUnreadable { .. }), "{err:?}");
        assert!(err
            .to_string()
            .starts_with("cannot list the processes in /nonexistent/proc: "));

        let dir = tempfile::tempdir().unwrap();
        let err = ProcIndex::scan(dir.path(), &dir.path().join("1/ns/net")).unwrap_err();
        assert!(matches!(err, Error::HostNetnsUnreadable { .. }), "{err:?}");
        assert!(err
            .to_string()
            .contains("(the agent needs hostPID and CAP_SYS_PTRACE)"));
        // The errors carry into anyhow like any other.
        let err = anyhow::Error::from(err).context("enrollment pass");
        assert!(format!("{err:#}").starts_with("enrollment pass: cannot read the node's"));
    }

    /// Real cgroups under the machine's cgroup2 mount, and the processes put in them; all removed
    /// on drop, failed test or not.
    struct RealCgroups {
        /// In creation order, so removal goes leaf first.
        dirs: Vec<PathBuf>,
        children: Vec<std::process::Child>,
    }

    impl RealCgroups {
        /// A fresh top cgroup per test: like a custom kubelet cgroup root, and it keeps a real
        /// node's `kubepods` and parallel tests out of each other's way.
        fn new(cgroup2: &Path) -> Self {
            let top = cgroup2.join(format!(
                "weft-test-{}-{:016x}",
                std::process::id(),
                fastrand::u64(..)
            ));
            let mut cgroups = Self {
                dirs: Vec::new(),
                children: Vec::new(),
            };
            fs::create_dir(&top).unwrap();
            cgroups.dirs.push(top);
            cgroups
        }

        /// Creates `relative` (slash-separated) under the top cgroup, level by level.
        fn create(&mut self, relative: &str) -> PathBuf {
            let mut dir = self.dirs[0].clone();
            for segment in relative.split('/') {
                dir.push(segment);
                if !dir.exists() {
                    fs::create_dir(&dir).unwrap();
                    self.dirs.push(dir.clone());
                }
            }
            dir
        }

        /// Starts `command` and moves it into `cgroup`; with `own_netns` it runs in a new network
        /// namespace, returned once the process is in it.
        fn start_in(&mut self, cgroup: &Path, own_netns: bool) -> (u32, Option<u64>) {
            let mut command = if own_netns {
                let mut command = std::process::Command::new("unshare");
                command.args(["--net", "sleep", "30"]);
                command
            } else {
                let mut command = std::process::Command::new("sleep");
                command.arg("30");
                command
            };
            let child = command.spawn().unwrap();
            let pid = child.id();
            self.children.push(child);
            fs::write(cgroup.join("cgroup.procs"), pid.to_string()).unwrap();
            if !own_netns {
                return (pid, None);
            }
            // unshare enters its namespace some time after the spawn returns.
            let ours = netns_id(Path::new("/proc/self/ns/net")).unwrap();
            for _ in 0..500 {
                let theirs = netns_id(Path::new(&format!("/proc/{pid}/ns/net"))).unwrap();
                if theirs != ours {
                    return (pid, Some(theirs.inode));
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            panic!("`unshare --net` (pid {pid}) never left the test's network namespace");
        }
    }

    impl Drop for RealCgroups {
        fn drop(&mut self) {
            for child in &mut self.children {
                let _ = child.kill();
                let _ = child.wait();
            }
            for dir in self.dirs.iter().rev() {
                // An exited process can keep its cgroup busy for a moment.
                for _ in 0..100 {
                    match fs::remove_dir(dir) {
                        Err(err) if err.raw_os_error() == Some(libc::EBUSY) => {
                            std::thread::sleep(std::time::Duration::from_millis(10));
                        }
                        Err(err) => {
                            eprintln!("cannot remove test cgroup {}: {err}", dir.display());
                            break;
                        }
                        Ok(()) => break,
                    }
                }
            }
        }
    }

    /// The first cgroup2 mount in /proc/self/mountinfo.
    fn cgroup2_mount() -> Option<PathBuf> {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
        mountinfo.lines().find_map(|line| {
            // `id parent major:minor root mount-point options… - fstype source super-options`
            let (fields, filesystem) = line.split_once(" - ")?;
            if filesystem.split(' ').next()? != "cgroup2" {
                return None;
            }
            Some(PathBuf::from(unescape_mountinfo(fields.split(' ').nth(4)?)))
        })
    }

    /// mountinfo writes space, tab, newline and backslash as `\` and three octal digits.
    fn unescape_mountinfo(field: &str) -> String {
        let mut out = String::new();
        let mut rest = field;
        while let Some(at) = rest.find('\\') {
            out.push_str(&rest[..at]);
            let code = rest
                .get(at + 1..at + 4)
                .and_then(|o| u8::from_str_radix(o, 8).ok());
            match code {
                Some(byte) => {
                    out.push(char::from(byte));
                    rest = &rest[at + 4..];
                }
                None => {
                    out.push('\\');
                    rest = &rest[at + 1..];
                }
            }
        }
        out.push_str(rest);
        out
    }

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape_mountinfo("/sys/fs/cgroup"), "/sys/fs/cgroup");
        assert_eq!(unescape_mountinfo("/mnt/a\\040b\\134c"), "/mnt/a b\\c");
    }

    /// Scans the real /proc, as the agent does.
    fn scan_real_proc() -> ProcIndex {
        ProcIndex::scan(Path::new(DEFAULT_PROC_ROOT), Path::new(OWN_NETNS)).unwrap()
    }

    fn random_uid() -> String {
        let hex = format!("{:032x}", fastrand::u128(..));
        format!(
            "{}-{}-{}-{}-{}",
            &hex[..8],
            &hex[8..12],
            &hex[12..16],
            &hex[16..20],
            &hex[20..]
        )
    }

    fn random_container_id() -> String {
        format!("{:032x}{:032x}", fastrand::u128(..), fastrand::u128(..))
    }

    #[test]
    fn real_pod_in_the_systemd_layout_is_found() {
        let Some(cgroup2) = cgroup2_mount() else {
            eprintln!("skipped: no cgroup2 mounted on this machine");
            return;
        };
        let uid = random_uid();
        let mut cgroups = RealCgroups::new(&cgroup2);
        let container = cgroups.create(&format!(
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/\
             cri-containerd-{}.scope",
            uid.replace('-', "_"),
            random_container_id()
        ));
        let (pid, inode) = cgroups.start_in(&container, true);

        let found = scan_real_proc().netns_of(&uid.parse().unwrap()).unwrap();
        assert_eq!(found.pid, pid);
        assert_eq!(Some(found.inode), inode);
        assert_eq!(found.path, PathBuf::from(format!("/proc/{pid}/ns/net")));
    }

    #[test]
    fn real_pod_in_the_cgroupfs_layout_is_found_and_host_network_pods_refused() {
        let Some(cgroup2) = cgroup2_mount() else {
            eprintln!("skipped: no cgroup2 mounted on this machine");
            return;
        };
        let (meshed, host_network) = (random_uid(), random_uid());
        let mut cgroups = RealCgroups::new(&cgroup2);
        let pod = cgroups.create(&format!("kubepods/burstable/pod{meshed}"));
        let container = cgroups.create(&format!(
            "kubepods/burstable/pod{meshed}/{}",
            random_container_id()
        ));
        // Started first, so with the lower PID (barring wrap-around): a conmon-like process in the
        // pod's own cgroup but the node's namespace, which must be passed over.
        cgroups.start_in(&pod, false);
        let (pid, inode) = cgroups.start_in(&container, true);
        let host_pod = cgroups.create(&format!(
            "kubepods/besteffort/pod{host_network}/{}",
            random_container_id()
        ));
        cgroups.start_in(&host_pod, false);

        let index = scan_real_proc();
        let found = index.netns_of(&meshed.parse().unwrap()).unwrap();
        assert_eq!((found.pid, Some(found.inode)), (pid, inode));
        let err = index.netns_of(&host_network.parse().unwrap()).unwrap_err();
        assert!(
            matches!(err, Error::HostNetwork { processes: 1, .. }),
            "{err:?}"
        );
        let err = index.netns_of(&random_uid().parse().unwrap()).unwrap_err();
        assert!(matches!(err, Error::NoProcess { .. }), "{err:?}");
    }
}

//! Sockets inside a pod's network namespace. Each enrolled pod gets one small thread that enters the
//! pod's netns once and then creates sockets on request: a socket belongs to the namespace it was
//! created in, so the agent's listener and upstream sockets live in the pod (source IP = pod IP)
//! while the agent itself stays in the node's namespace.
use std::{
    fs::File,
    io,
    net::{SocketAddr, SocketAddrV4, TcpListener},
    os::{fd::AsRawFd, unix::fs::OpenOptionsExt},
    path::Path,
    sync::mpsc,
};

use anyhow::{Context, Result};
use nix::sched::{setns, CloneFlags};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::sync::oneshot;

const WORKER_STACK_BYTES: usize = 128 * 1024;

type Job = Box<dyn FnOnce() + Send>;

/// A thread living in one pod's network namespace.
pub struct PodNetns {
    jobs: mpsc::Sender<Job>,
    cookie: u64,
    /// Kept open: eBPF programs attach to the namespace through it.
    file: File,
}

impl PodNetns {
    /// Enters the namespace at `path` on a new thread. Fails if the path is not a network namespace.
    pub fn enter(path: &Path, thread_name: String) -> Result<Self> {
        // O_NONBLOCK: a path naming a FIFO must fail (setns rejects it), not block the agent.
        let netns = File::options()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .with_context(|| format!("cannot open network namespace {}", path.display()))?;
        let file = netns
            .try_clone()
            .context("duplicating the network namespace descriptor")?;
        let (jobs, job_rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::sync_channel::<io::Result<u64>>(1);
        std::thread::Builder::new()
            .name(thread_name)
            .stack_size(WORKER_STACK_BYTES)
            .spawn(move || {
                let entered = setns(&netns, CloneFlags::CLONE_NEWNET)
                    .map_err(io::Error::from)
                    .and_then(|()| current_netns_cookie());
                let ok = entered.is_ok();
                if ready_tx.send(entered).is_err() || !ok {
                    return;
                }
                drop(netns);
                // Runs until the PodNetns (the only sender) is dropped.
                for job in job_rx {
                    job();
                }
            })
            .context("spawning a network-namespace worker thread")?;
        let cookie = ready_rx
            .recv()
            .context("network-namespace worker exited during start-up")?
            .with_context(|| format!("cannot enter network namespace {}", path.display()))?;
        Ok(Self { jobs, cookie, file })
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// The kernel's cookie for this namespace: what the eBPF programs key pods by.
    pub fn cookie(&self) -> u64 {
        self.cookie
    }

    async fn run<T: Send + 'static>(
        &self,
        job: impl FnOnce() -> io::Result<T> + Send + 'static,
    ) -> io::Result<T> {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(job());
        });
        self.jobs
            .send(job)
            .map_err(|_| io::Error::other("network-namespace worker has stopped"))?;
        rx.await
            .map_err(|_| io::Error::other("network-namespace worker dropped the request"))?
    }

    /// A listening TCP socket bound to `addr` inside the pod.
    pub async fn listen(&self, addr: SocketAddr) -> io::Result<tokio::net::TcpListener> {
        let std_listener = self
            .run(move || {
                let socket =
                    Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
                socket.set_reuse_address(true)?;
                // A re-enrolled pod's new listener can bind while the previous one still empties
                // its accept queue (see `enrollment::LISTENER_LINGER`).
                socket.set_reuse_port(true)?;
                socket.set_nonblocking(true)?;
                socket.bind(&addr.into())?;
                socket.listen(4096)?;
                Ok(TcpListener::from(socket))
            })
            .await?;
        tokio::net::TcpListener::from_std(std_listener)
    }

    /// Sets `net.ipv4.tcp_migrate_req` in the pod's namespace: connections queued on a closing
    /// listener move to another listener of its SO_REUSEPORT group (Linux >= 5.14). The file is
    /// opened from a thread inside the namespace, so it is that namespace's sysctl.
    pub async fn enable_request_migration(&self, proc_root: &Path) -> io::Result<()> {
        let sysctl = proc_root.join("sys/net/ipv4/tcp_migrate_req");
        self.run(move || std::fs::write(sysctl, "1")).await
    }

    /// An unconnected IPv4 TCP socket inside the pod, carrying `mark` so the hooks skip it.
    pub async fn upstream_socket(&self, mark: u32) -> io::Result<tokio::net::TcpSocket> {
        let socket = self
            .run(move || {
                let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
                socket.set_mark(mark)?;
                socket.set_nonblocking(true)?;
                socket.set_nodelay(true)?;
                Ok(socket)
            })
            .await?;
        Ok(tokio::net::TcpSocket::from_std_stream(socket.into()))
    }
}

impl PodNetns {
    /// An unconnected socket inside the pod for delivering inbound traffic to an app. With
    /// `transparent_source` (the client's address) it is bound to the client's IP
    /// (IP_TRANSPARENT), so the app sees who called, on a port other than the client's: a
    /// plaintext client connected to the same app port would otherwise share the app's 4-tuple.
    pub async fn delivery_socket(
        &self,
        mark: u32,
        transparent_source: Option<SocketAddrV4>,
    ) -> io::Result<tokio::net::TcpSocket> {
        let socket = self
            .run(move || delivery_socket(mark, transparent_source))
            .await?;
        Ok(tokio::net::TcpSocket::from_std_stream(socket.into()))
    }

    /// Routes the replies of the app's connections from transparently bound delivery sockets back
    /// to the agent: those connections carry `mark` (the pod's kernel copies an incoming SYN's
    /// mark to the accepted socket with `tcp_fwmark_accept`, and the kernel's own replies such as
    /// the reset of a closed port carry the mark of what they answer with `fwmark_reflect`), and
    /// marked packets are routed to loopback. Without `fwmark_reflect` a delivery to a port the
    /// app no longer listens on would wait for its connect timeout instead of being refused.
    /// Everything the app does otherwise is unmarked and untouched.
    /// `proc_root` is a procfs whose `sys` is writable (a container's own /proc/sys is usually
    /// read-only; the node's /proc mounted elsewhere is not).
    pub async fn route_marked_replies_locally(
        &self,
        mark: u32,
        proc_root: &Path,
    ) -> io::Result<()> {
        let ipv4 = proc_root.join("sys/net/ipv4");
        self.run(move || {
            // /proc/sys/net shows the namespace of the thread that opens it: this one's.
            std::fs::write(ipv4.join("tcp_fwmark_accept"), "1")?;
            std::fs::write(ipv4.join("fwmark_reflect"), "1")?;
            let table = mark.to_string();
            let mark = format!("{mark:#x}");
            let rules = ip_command(&["rule", "show", "fwmark", &mark])?;
            if rules.trim().is_empty() {
                ip_command(&["rule", "add", "fwmark", &mark, "lookup", &table])?;
            }
            ip_command(&[
                "route",
                "replace",
                "local",
                "0.0.0.0/0",
                "dev",
                "lo",
                "table",
                &table,
            ])?;
            Ok(())
        })
        .await
    }
}

/// Runs `ip` from the calling thread: a forked child starts in that thread's network namespace.
fn ip_command(args: &[&str]) -> io::Result<String> {
    let output = std::process::Command::new("ip").args(args).output()?;
    if !output.status.success() {
        return Err(io::Error::other(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn delivery_socket(mark: u32, transparent_source: Option<SocketAddrV4>) -> io::Result<Socket> {
    // The kernel picks the source port at bind; a second pick differs from a clashing first one.
    for _ in 0..3 {
        let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
        socket.set_mark(mark)?;
        socket.set_nonblocking(true)?;
        socket.set_nodelay(true)?;
        let Some(source) = transparent_source else {
            return Ok(socket);
        };
        socket.set_ip_transparent(true)?;
        socket.bind(&SocketAddr::from((*source.ip(), 0)).into())?;
        let port = socket.local_addr()?.as_socket().map(|a| a.port());
        if port != Some(source.port()) {
            return Ok(socket);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AddrInUse,
        "no free source port distinct from the client's",
    ))
}

/// Cookie of the network namespace the calling thread is in.
pub fn current_netns_cookie() -> io::Result<u64> {
    let probe = Socket::new(Domain::IPV4, Type::DGRAM, None)?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` and `len` are valid for writes of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            probe.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_namespace_is_a_clear_error() {
        let err = PodNetns::enter(Path::new("/nonexistent/netns"), "t".into())
            .err()
            .unwrap();
        assert!(format!("{err:#}").contains("cannot open network namespace /nonexistent/netns"));
    }

    #[test]
    fn a_file_that_is_not_a_namespace_is_rejected() {
        let file = tempfile::NamedTempFile::new().unwrap();
        let err = PodNetns::enter(file.path(), "t".into()).err().unwrap();
        assert!(
            format!("{err:#}").contains("cannot enter network namespace"),
            "{err:#}"
        );
    }

    #[tokio::test]
    async fn own_namespace_listener_works_and_cookie_matches() {
        let netns = PodNetns::enter(Path::new("/proc/self/ns/net"), "t".into()).unwrap();
        assert_eq!(netns.cookie(), current_netns_cookie().unwrap());
        let listener = netns.listen("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let socket = netns.upstream_socket(0x1234).await.unwrap();
        let (client, accepted) = tokio::join!(socket.connect(addr), listener.accept());
        assert_eq!(client.unwrap().peer_addr().unwrap(), addr);
        assert!(accepted.is_ok());
    }
}

//! Headless Chromium for checking the agent's admin page as a person would see it: the DOM after
//! its scripts ran, or a screenshot. The caller builds the `Command`, so the browser can run inside
//! a lab node's network namespace, where the agent's admin port is.
use std::{
    env, fs,
    os::unix::{fs::PermissionsExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

/// Names the browser goes by; Debian's package installs `chromium`.
const BINARIES: &[&str] = &["chromium", "chromium-browser", "google-chrome"];

/// How long the page's timers may run, in virtual time, which stands still while a fetch is in
/// flight: the first `GET graph` plus one 3 s refresh. Chromium stops at the budget even though
/// the page keeps scheduling refreshes.
const VIRTUAL_TIME_MS: u32 = 4_000;

/// Chromium sometimes hangs in containers; a run taking longer than this is killed.
const TIMEOUT: Duration = Duration::from_secs(60);

/// The Chromium binary in `PATH`.
pub fn find() -> Result<PathBuf> {
    let path = env::var_os("PATH").unwrap_or_default();
    env::split_paths(&path)
        .flat_map(|dir| BINARIES.iter().map(move |name| dir.join(name)))
        .find(|candidate| {
            fs::metadata(candidate)
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
        .with_context(|| {
            format!("no Chromium in PATH (looked for {BINARIES:?}); run `cargo xtask setup`")
        })
}

/// The DOM of `url` after its scripts ran for 4 s of virtual time: for the admin page, its first
/// fetch of `graph` and one refresh, so `document.body.dataset.rendered` is "2" when both worked.
///
/// `command` runs the browser (see [`find`]) and has no arguments yet, e.g. `node.command(path)?`
/// to run it inside a lab node's network namespace.
pub fn dump_dom(command: Command, url: &str) -> Result<String> {
    let scratch = Scratch::new()?;
    let stdout = render(command, url, &scratch, &["--dump-dom".into()])?;
    if stdout.trim().is_empty() {
        bail!("chromium printed no DOM for {url}");
    }
    Ok(stdout)
}

/// Writes to `path` a PNG of `url` in a `width`×`height` window, taken when its scripts ran as in
/// [`dump_dom`]; `command` is as there.
pub fn screenshot(
    command: Command,
    url: &str,
    path: &Path,
    (width, height): (u32, u32),
) -> Result<()> {
    let scratch = Scratch::new()?;
    let shot = scratch.0.join("screenshot.png");
    render(
        command,
        url,
        &scratch,
        &[
            format!("--screenshot={}", shot.display()),
            format!("--window-size={width},{height}"),
        ],
    )?;
    fs::copy(&shot, path).with_context(|| {
        format!(
            "chromium left no screenshot of {url} to copy to {}",
            path.display()
        )
    })?;
    Ok(())
}

/// Runs the browser on `url` with `extra` arguments; returns its standard output.
fn render(mut command: Command, url: &str, scratch: &Scratch, extra: &[String]) -> Result<String> {
    let host = url_host(url)?;
    let stdout_path = scratch.0.join("stdout");
    let stderr_path = scratch.0.join("stderr");
    command
        .args([
            "--headless",
            // Its sandbox cannot start as root, which the lab runs as.
            "--no-sandbox",
            "--disable-gpu",
            // Containers often have a small /dev/shm, which crashes the renderer.
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--hide-scrollbars",
            // Chromium phones home (updates, time, dictionaries) even headless: every host but the
            // page's and loopback goes to a closed local port instead.
            "--proxy-server=127.0.0.1:9",
        ])
        .arg(format!("--proxy-bypass-list={host}"))
        .arg(format!(
            "--user-data-dir={}",
            scratch.0.join("profile").display()
        ))
        .arg(format!("--virtual-time-budget={VIRTUAL_TIME_MS}"))
        .args(extra)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(fs::File::create(&stdout_path).context("creating chromium's stdout file")?)
        .stderr(fs::File::create(&stderr_path).context("creating chromium's stderr file")?)
        // Its own group, so the renderer and helpers can be killed with it.
        .process_group(0);
    let mut child = command.spawn().with_context(|| {
        format!("starting {command:?} (is Chromium installed? run `cargo xtask setup`)")
    })?;
    let status = wait_bounded(&mut child, TIMEOUT)?;
    let stderr = fs::read_to_string(&stderr_path).unwrap_or_default();
    let Some(status) = status else {
        bail!(
            "chromium did not finish rendering {url} within {TIMEOUT:?}; its stderr:\n{}",
            stderr_tail(&stderr)
        );
    };
    // A page that fails to load still exits 0.
    if !status.success() || stderr.contains("Page load failed") {
        bail!(
            "chromium failed rendering {url} ({status}); its stderr:\n{}",
            stderr_tail(&stderr)
        );
    }
    fs::read_to_string(&stdout_path).context("reading chromium's output")
}

/// Waits for `child` up to `timeout` (None if it did not exit by then), then kills its process
/// group either way, so no helper process outlives the run.
fn wait_bounded(child: &mut Child, timeout: Duration) -> Result<Option<ExitStatus>> {
    let pid = libc::pid_t::try_from(child.id()).context("chromium's pid out of range")?;
    let deadline = Instant::now() + timeout;
    let exited = loop {
        // SAFETY: siginfo_t is plain data, valid all zeroes.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // WNOWAIT keeps the exited leader a zombie, so its pid, the group's id, cannot be reused
        // before the group is killed below.
        // SAFETY: waitid on our own child, writing only into `info`.
        let rc = unsafe {
            libc::waitid(
                libc::P_PID,
                child.id(),
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            )
        };
        if rc != 0 {
            break Err(std::io::Error::last_os_error());
        }
        // SAFETY: waitid succeeded, so si_pid is set: 0 while the child runs (WNOHANG).
        if unsafe { info.si_pid() } != 0 {
            break Ok(true);
        }
        if Instant::now() >= deadline {
            break Ok(false);
        }
        thread::sleep(Duration::from_millis(50));
    };
    // SAFETY: signals only the process group this run created.
    unsafe { libc::kill(-pid, libc::SIGKILL) };
    let status = child.wait().context("waiting for chromium")?;
    let exited = exited.context("waiting for chromium")?;
    Ok(exited.then_some(status))
}

/// The end of chromium's stderr, without the D-Bus complaints every run in a container makes.
fn stderr_tail(stderr: &str) -> String {
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.contains("dbus")).collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// The host (name or address, IPv6 in brackets) of an http(s) URL.
fn url_host(url: &str) -> Result<&str> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .with_context(|| format!("{url} is not an http(s) URL"))?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6
            .find(']')
            .map(|end| &authority[..end + 2])
            .with_context(|| format!("unclosed IPv6 address in {url}"))?,
        None => authority.split(':').next().unwrap_or_default(),
    };
    if host.is_empty() {
        bail!("{url} has no host");
    }
    Ok(host)
}

/// A fresh directory for one run's profile and output, removed afterwards.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Result<Self> {
        static RUNS: AtomicU32 = AtomicU32::new(0);
        let dir = env::temp_dir().join(format!(
            "weft-chromium-{}-{}",
            std::process::id(),
            RUNS.fetch_add(1, Ordering::Relaxed)
        ));
        // Left over by an earlier process that had the same pid.
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read, Write},
        net::{TcpListener, TcpStream},
        process::Command,
        thread,
    };

    use anyhow::Result;

    use super::{dump_dom, find, url_host};

    const PAGE: &str = include_str!("../../agent/src/graph.html");

    const GRAPH: &str = r#"{
      "node": "node-a", "generated_at": "2026-11-22T10:00:00.123Z", "window_seconds": 30,
      "workloads": [
        {"id": "lab/web", "name": "web", "namespace": "lab", "local": true},
        {"id": "lab/api", "name": "api", "namespace": "lab", "local": false},
        {"id": "lab/<img src=x onerror=alert(1)>\"", "name": "x", "namespace": "lab", "local": false},
        {"id": "unknown", "name": "unknown", "namespace": "", "local": false}
      ],
      "edges": [
        {"source": "lab/web", "destination": "lab/api", "protocol": "http",
         "destination_service": "api.lab.svc.cluster.local", "request_rate": 12.5,
         "error_rate": 0.02, "p99_ms": 35.0, "connection_rate": 0.0, "bytes_rate": 0.0, "mtls": true},
        {"source": "unknown", "destination": "lab/web", "protocol": "http",
         "destination_service": "web.lab.svc.cluster.local", "request_rate": 1.0,
         "error_rate": 0.0, "p99_ms": null, "connection_rate": 0.0, "bytes_rate": 0.0, "mtls": false},
        {"source": "lab/api", "destination": "lab/<img src=x onerror=alert(1)>\"", "protocol": "tcp",
         "destination_service": "unknown", "request_rate": 0.0, "error_rate": 0.0, "p99_ms": null,
         "connection_rate": 0.5, "bytes_rate": 2048.0, "mtls": false}
      ]
    }"#;

    /// Serves the page at `/` and `GET graph`'s answer on loopback, as the agent's admin port does.
    fn serve() -> Result<String> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let url = format!("http://{}/", listener.local_addr()?);
        thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                // One thread each: the browser may hold an idle connection open while using another.
                thread::spawn(move || answer(stream));
            }
        });
        Ok(url)
    }

    fn answer(mut stream: TcpStream) -> std::io::Result<()> {
        let mut request = Vec::new();
        let mut buf = [0; 1024];
        while !request.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = stream.read(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            request.extend_from_slice(&buf[..n]);
        }
        let head = String::from_utf8_lossy(&request);
        let (status, kind, body) = match head.split_whitespace().nth(1) {
            Some("/") => ("200 OK", "text/html", PAGE),
            Some("/graph") => ("200 OK", "application/json", GRAPH),
            _ => ("404 Not Found", "text/plain", "not found\n"),
        };
        write!(
            stream,
            "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    }

    #[test]
    fn page_renders_the_graph_with_its_test_hooks() -> Result<()> {
        let dom = dump_dom(Command::new(find()?), &serve()?)?;
        // The first fetch and one 3 s refresh both rendered, and the run still ended.
        assert!(dom.contains(r#"data-rendered="2""#), "{dom}");
        assert!(
            dom.contains(r#"data-workloads="4" data-edges="3""#),
            "{dom}"
        );
        assert!(dom.contains(r#"<g class="workload local" data-id="lab/web""#));
        assert!(dom.contains(r#"<g class="workload outside" data-id="unknown""#));
        assert!(dom.contains(
            r#"data-source="lab/web" data-destination="lab/api" data-protocol="http" data-mtls="true""#
        ));
        assert!(dom.contains(r#"data-source="unknown" data-destination="lab/web" data-protocol="http" data-mtls="false""#));
        // Few edges: each is labelled with its numbers, errors included.
        assert!(dom.contains("12.5 req/s"));
        assert!(dom.contains(r#"<tspan class="err">2% err</tspan>"#));
        assert!(dom.contains("0.5 conn/s"));
        assert!(dom.contains("2.05 kB/s"));
        // Names are text, never markup.
        assert!(dom.contains("lab/&lt;img src=x onerror=alert(1)&gt;\"</text>"));
        assert!(!dom.contains("<img src=\"x\""));
        assert!(dom.contains(r#"<span id="error" role="alert"></span>"#));
        Ok(())
    }

    #[test]
    fn a_page_that_does_not_load_is_an_error_with_chromium_s_reason() -> Result<()> {
        // Bound and dropped at once: nothing listens on the port.
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let err = dump_dom(Command::new(find()?), &format!("http://127.0.0.1:{port}/"))
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default();
        assert!(err.contains("ERR_CONNECTION_REFUSED"), "{err}");
        Ok(())
    }

    #[test]
    fn url_host_is_what_the_proxy_must_bypass() -> Result<()> {
        assert_eq!(url_host("http://127.0.0.1:15000/")?, "127.0.0.1");
        assert_eq!(url_host("https://node-a/graph?x#y")?, "node-a");
        assert_eq!(url_host("http://[::1]:15000/")?, "[::1]");
        assert!(url_host("file:///tmp/x.html").is_err());
        assert!(url_host("http:///").is_err());
        Ok(())
    }
}

//! Lab tests of L7 for services: protocol detection, per-request balancing, retries, budgets,
//! deadlines, circuit breaking and traffic shifting, with real servers and clients in pods
//! (`weft-testapp`) and agents on two nodes (need root).
use std::{
    process::Stdio,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use serde_json::Value;
use weft_lab_tests::{curl, fetch, start_meshed_agents, App, TestLab, APP_PORT};
use xtask::{
    agent::{Agent, Mesh},
    lab::Pod,
    pki::TestCa,
};

const APP: &str = env!("CARGO_BIN_EXE_weft-testapp");

/// `weft-testapp serve` in `pod` named `name`, with `args`.
fn serve(pod: &Pod, name: &str, args: &[&str]) -> Result<App> {
    App::serve(APP, pod, name, args)
}

/// `weft-testapp load` from `pod` with `args`; its JSON summary.
fn load(pod: &Pod, args: &[&str]) -> Result<Value> {
    weft_lab_tests::load(APP, pod, args)
}

/// `requests` GETs of `url` from `pod`, `concurrency` at a time, with `extra` load arguments.
fn call(pod: &Pod, url: &str, requests: u64, concurrency: u64, extra: &[&str]) -> Result<Value> {
    weft_lab_tests::load_url(APP, pod, url, requests, concurrency, extra)
}

fn status_count(summary: &Value, status: u16) -> u64 {
    summary["status"][status.to_string()].as_u64().unwrap_or(0)
}

/// A two-node meshed lab; every pod a workload with labels `{app: <pod>}`.
fn l7_lab(name: &str, pods_per_node: usize) -> Result<(TestLab, Mesh)> {
    let lab = TestLab::up(name, 2, pods_per_node)?;
    let ca = TestCa::new("weft lab mesh CA")?;
    let (cert, key) = ca.write(&lab.dir.join("ca"))?;
    let mut mesh = Mesh::new(&lab, cert, key);
    for workload in &mut mesh.workloads {
        workload.labels = Box::leak(format!("{{app: {}}}", workload.pod.name).into_boxed_str());
    }
    Ok((lab, mesh))
}

/// A service `name` at `vip`:80 in front of APP_PORT of the pods labelled `app: <app>`;
/// `extra` adds YAML lines to its entry.
fn service(name: &str, vip: &str, app: &str, extra: &str) -> String {
    format!(
        "  - name: {name}\n    namespace: lab\n    vips: [{vip}]\n    ports: [{{port: 80, target_port: {APP_PORT}}}]\n    selector: {{app: {app}}}\n{extra}"
    )
}

#[test]
fn http_requests_to_a_service_are_balanced_across_its_endpoints() -> Result<()> {
    let (lab, mut mesh) = l7_lab("l7bal", 3)?;
    let (a1, b1, b2) = (lab.pod("a1")?, lab.pod("b1")?, lab.pod("b2")?);
    for pod in ["b1", "b2"] {
        mesh.workload_mut(pod)?.labels = "{app: echo}";
    }
    mesh.services = service("echo", "10.96.0.10", "echo", "");
    let agents = start_meshed_agents(&lab, &mesh)?;
    let (one, two) = (serve(b1, "one", &[])?, serve(b2, "two", &[])?);
    let summary = call(a1, "http://10.96.0.10/", 400, 4, &[])?;
    ensure!(status_count(&summary, 200) == 400, "{summary}");
    let (n1, n2) = (one.counter("requests")?, two.counter("requests")?);
    ensure!(n1 + n2 == 400, "endpoints saw {n1} + {n2} requests");
    ensure!(n1 >= 50 && n2 >= 50, "unbalanced: {n1} / {n2}");
    let counters = &agents[0].stats()?["services"]["lab/echo:80"];
    ensure!(
        counters["requests"] == 400 && counters["responses_2xx"] == 400,
        "the client's agent counted {counters}"
    );
    Ok(())
}

/// A `services:` entry with its own `ports` (a YAML flow sequence) and `selector` (a YAML flow
/// mapping).
fn service_entry(name: &str, vip: &str, ports: &str, selector: &str) -> String {
    format!(
        "  - name: {name}\n    namespace: lab\n    vips: [{vip}]\n    ports: {ports}\n    selector: {selector}\n"
    )
}

/// A `routes:` entry attached to port 80 of `parent` with one rule, `rule` being its fields as
/// YAML flow text (e.g. `retry: {attempts: 1}`).
fn route(name: &str, parent: &str, rule: &str) -> String {
    format!(
        "  - metadata: {{name: {name}, namespace: lab}}\n    spec:\n      parentRefs: [{{name: {parent}, port: 80}}]\n      rules:\n        - {rule}\n"
    )
}

/// Sets the labels of `pod`'s workload (a YAML flow mapping).
fn label(mesh: &mut Mesh, pod: &str, labels: &str) -> Result<()> {
    mesh.workload_mut(pod)?.labels = Box::leak(labels.to_owned().into_boxed_str());
    Ok(())
}

/// A raw TCP client run by perl inside a pod (so the pod's capture applies), bounded to 5 s.
/// `banner ADDR`: times the first line the server sends after connecting, then sends a line
/// and reads its echo. `send ADDR`: writes stdin to the connection and prints everything read
/// until the peer closes it.
const RAW_CLIENT: &str = r#"
use strict; use warnings; use IO::Socket::INET; use Time::HiRes qw(time);
my ($mode, $addr) = @ARGV;
$| = 1;
$SIG{ALRM} = sub { print "\nerror=timeout\n"; exit 0 };
$SIG{PIPE} = 'IGNORE';
alarm 5;
my $s = IO::Socket::INET->new(PeerAddr => $addr, Proto => 'tcp')
    or do { print "error=connect $!\n"; exit 0 };
binmode $s;
if ($mode eq 'banner') {
    my $t0 = time;
    my $line = <$s> // '';
    my $ms = (time - $t0) * 1000;
    print $s "ping\r\n";
    my $echo = <$s> // '';
    s/\r?\n\z// for $line, $echo;
    printf "ms=%.1f\nbanner=%s\necho=%s\n", $ms, $line, $echo;
} else {
    binmode STDIN;
    my $payload = do { local $/; <STDIN> };
    syswrite($s, $payload);
    my ($response, $buf) = ('', '');
    while (1) {
        my $n = sysread($s, $buf, 65536);
        if (!defined $n) { print $response, "\nerror=$!\n"; exit 0 }
        last if $n == 0;
        $response .= $buf;
    }
    print $response;
}
"#;

/// Runs RAW_CLIENT in `pod`; its stdout.
fn raw_client(pod: &Pod, mode: &str, addr: &str, stdin: &[u8]) -> Result<String> {
    use std::io::Write as _;
    let mut child = pod
        .command("perl")?
        .args(["-e", RAW_CLIENT, mode, addr])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running perl in a pod")?;
    let mut input = child.stdin.take().context("perl stdin")?;
    // A client that stops reading early must not block the test: a write error is fine.
    let _ = input.write_all(stdin);
    drop(input);
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "raw client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `key=value` lines of RAW_CLIENT's banner mode.
fn field<'a>(output: &'a str, key: &str) -> Option<&'a str> {
    output
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
}

/// Connects to a banner server at `addr` from `pod` `tries` times; the shortest wait for the
/// banner in ms. Every connection must get the banner and its echo.
fn banner_wait_ms(pod: &Pod, addr: &str, text: &str, tries: usize) -> Result<f64> {
    let mut shortest = f64::MAX;
    for _ in 0..tries {
        let out = raw_client(pod, "banner", addr, b"")?;
        ensure!(
            field(&out, "banner") == Some(text) && field(&out, "echo") == Some("ping"),
            "banner server via {addr}: {out}"
        );
        let ms: f64 = field(&out, "ms")
            .context("no time")?
            .parse()
            .with_context(|| format!("time in {out}"))?;
        shortest = shortest.min(ms);
    }
    Ok(shortest)
}

/// `weft-testapp` client subcommands that print one JSON line (grpc-call, raw).
fn testapp_json(pod: &Pod, args: &[&str]) -> Result<Value> {
    let out = pod
        .command(APP)?
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running weft-testapp")?;
    serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "weft-testapp {args:?} printed no JSON: {} {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn service_counter(agent: &Agent, service: &str, name: &str) -> Result<u64> {
    Ok(agent.stats()?["services"][service][name]
        .as_u64()
        .unwrap_or(0))
}

#[test]
fn http_h2c_grpc_and_opaque_protocols_are_detected_through_a_service() -> Result<()> {
    let (lab, mut mesh) = l7_lab("l7det", 2)?;
    let (a1, a2, b1, b2) = (
        lab.pod("a1")?,
        lab.pod("a2")?,
        lab.pod("b1")?,
        lab.pod("b2")?,
    );
    label(&mut mesh, "b1", "{app: web}")?;
    label(&mut mesh, "b2", "{app: banner}")?;
    label(&mut mesh, "a2", "{app: echo}")?;
    mesh.services = [
        service_entry(
            "web",
            "10.96.0.10",
            "[{port: 80, target_port: 8080}, {port: 81, target_port: 8080, protocol: grpc}]",
            "{app: web}",
        ),
        // One server-speaks-first server behind a port declared tcp, a port of the default
        // opaque_ports and a port with neither, which waits out detection.
        service_entry(
            "banner",
            "10.96.0.20",
            "[{port: 7000, protocol: tcp}, {port: 6379, target_port: 7000}, {port: 7001, target_port: 7000}]",
            "{app: banner}",
        ),
        service_entry("echo", "10.96.0.30", "[{port: 9000}]", "{app: echo}"),
    ]
    .concat();
    let agents = start_meshed_agents(&lab, &mesh)?;
    let _web = serve(b1, "web", &["--grpc"])?;
    let _banner = App::start(
        APP,
        b2,
        &[
            "banner",
            "--listen",
            "0.0.0.0:7000",
            "--text",
            "hello banner",
        ],
        7000,
    )?;
    let _echo = App::start(APP, a2, &["echo", "--listen", "0.0.0.0:9000"], 9000)?;

    let http1 = call(a1, "http://10.96.0.10/", 50, 1, &[])?;
    ensure!(
        status_count(&http1, 200) == 50 && http1["bodies"]["web"] == 50,
        "HTTP/1.1: {http1}"
    );
    let h2c = call(a1, "http://10.96.0.10/", 50, 4, &["--h2c"])?;
    ensure!(
        status_count(&h2c, 200) == 50 && h2c["bodies"]["web"] == 50,
        "h2c: {h2c}"
    );
    for url in ["http://10.96.0.10:80", "http://10.96.0.10:81"] {
        let call = testapp_json(a1, &["grpc-call", "--url", url, "--message", "hi there"])?;
        ensure!(
            call["http_status"] == 200 && call["grpc_status"] == 0 && call["message"] == "hi there",
            "gRPC via {url}: {call}"
        );
    }
    let web = &agents[0].stats()?["services"];
    ensure!(
        web["lab/web:80"]["requests"] == 101 && web["lab/web:80"]["responses_2xx"] == 101,
        "web:80 as the client's agent counted it: {}",
        web["lab/web:80"]
    );
    ensure!(
        web["lab/web:81"]["responses_2xx"] == 1,
        "web:81: {}",
        web["lab/web:81"]
    );

    // Declared or well-known opaque ports relay at once; the port with neither waits for the
    // detection timeout (100 ms by default) because the client says nothing, then relays.
    let declared = banner_wait_ms(a1, "10.96.0.20:7000", "hello banner", 3)?;
    let well_known = banner_wait_ms(a1, "10.96.0.20:6379", "hello banner", 3)?;
    let detected = banner_wait_ms(a1, "10.96.0.20:7001", "hello banner", 3)?;
    ensure!(
        declared < 60.0 && well_known < 60.0,
        "an opaque port waited for detection: declared tcp {declared} ms, opaque_ports {well_known} ms"
    );
    ensure!(
        (95.0..600.0).contains(&detected),
        "the banner behind a port left to detection came after {detected} ms, expected ~100 ms"
    );
    for port in [7000, 6379, 7001] {
        let connections =
            service_counter(&agents[0], &format!("lab/banner:{port}"), "connections")?;
        ensure!(
            connections == 3,
            "banner:{port} counted {connections} connections"
        );
    }

    let raw = testapp_json(
        a1,
        &["raw", "--addr", "10.96.0.30:9000", "--bytes", "1000000"],
    )?;
    ensure!(
        raw["equal"] == true && raw["received"] == 1_000_000 && raw["error"].is_null(),
        "binary through the echo service: {raw}"
    );
    let stats = &agents[0].stats()?["services"]["lab/echo:9000"];
    ensure!(
        stats["connections"] == 1 && stats["requests"] == 0,
        "the binary stream should have been relayed as one opaque connection: {stats}"
    );
    Ok(())
}

#[test]
fn malformed_and_oversized_requests_get_400_and_431() -> Result<()> {
    let (lab, mut mesh) = l7_lab("l7mal", 2)?;
    let (a1, b1) = (lab.pod("a1")?, lab.pod("b1")?);
    label(&mut mesh, "b1", "{app: web}")?;
    mesh.services = service("web", "10.96.0.10", "web", "");
    let agents = start_meshed_agents(&lab, &mesh)?;
    let web = serve(b1, "web", &[])?;
    let served = |expected: u64| -> Result<()> {
        let summary = call(a1, "http://10.96.0.10/", 10, 1, &[])?;
        ensure!(
            status_count(&summary, 200) == 10,
            "after a bad request: {summary}"
        );
        let seen = web.counter("requests")?;
        ensure!(
            seen == expected,
            "the app saw {seen} requests, expected {expected}"
        );
        Ok(())
    };
    // The agent logs once it is done with the connection, which may be after the client has
    // read the answer.
    let logged = |reason: &str| {
        wait_until(Duration::from_secs(5), || {
            Ok(agents[0]
                .log()
                .lines()
                .filter(|l| l.contains("HTTP connection from the pod ended with an error"))
                .any(|l| l.contains(reason)))
        })
    };
    served(10)?;

    // The request line makes it HTTP/1; the broken header line after it is the agent's to refuse.
    let malformed = raw_client(
        a1,
        "send",
        "10.96.0.10:80",
        b"GET /x HTTP/1.1\r\nHost: a\r\nbad header line\r\n\r\n",
    )?;
    ensure!(
        malformed.starts_with("HTTP/1.1 400 "),
        "a malformed header got: {malformed:?}"
    );
    ensure!(
        logged("invalid HTTP header")?,
        "no log line for the malformed request:\n{}",
        agents[0].log()
    );
    served(20)?;

    let mut oversized = b"GET /x HTTP/1.1\r\nHost: a\r\nX-Big: ".to_vec();
    oversized.resize(oversized.len() + 100_000, b'a');
    oversized.extend_from_slice(b"\r\n\r\n");
    let answer = raw_client(a1, "send", "10.96.0.10:80", &oversized)?;
    ensure!(
        answer.starts_with("HTTP/1.1 431 "),
        "a 100 KB header got: {answer:?}"
    );
    ensure!(
        logged("too large")?,
        "no log line for the oversized request:\n{}",
        agents[0].log()
    );
    // Neither bad request reached the app.
    served(30)?;
    Ok(())
}

#[test]
fn a_route_splits_requests_by_weight() -> Result<()> {
    let (lab, mut mesh) = l7_lab("l7spl", 2)?;
    let (a1, b1, b2) = (lab.pod("a1")?, lab.pod("b1")?, lab.pod("b2")?);
    label(&mut mesh, "b1", "{app: echo, track: v1}")?;
    label(&mut mesh, "b2", "{app: echo, track: v2}")?;
    mesh.services = [
        service("echo", "10.96.0.10", "echo", ""),
        service_entry(
            "echo-v1",
            "10.96.0.11",
            "[{port: 80, target_port: 8080}]",
            "{track: v1}",
        ),
        service_entry(
            "echo-v2",
            "10.96.0.12",
            "[{port: 80, target_port: 8080}]",
            "{track: v2}",
        ),
    ]
    .concat();
    mesh.routes = route(
        "split",
        "echo",
        "backendRefs: [{name: echo-v1, weight: 90}, {name: echo-v2, weight: 10}]",
    );
    let agents = start_meshed_agents(&lab, &mesh)?;
    let (v1, v2) = (serve(b1, "v1", &[])?, serve(b2, "v2", &[])?);
    let summary = call(a1, "http://10.96.0.10/", 10000, 16, &[])?;
    ensure!(status_count(&summary, 200) == 10_000, "{summary}");
    let (n1, n2) = (v1.counter("requests")?, v2.counter("requests")?);
    let (body1, body2) = (
        summary["bodies"]["v1"].as_u64().unwrap_or(0),
        summary["bodies"]["v2"].as_u64().unwrap_or(0),
    );
    ensure!(
        (n1, n2) == (body1, body2) && n1 + n2 == 10_000,
        "the apps counted {n1} / {n2}, the client {body1} / {body2}"
    );
    // 10,000 draws at 90/10: one standard deviation is 0.3%, so ±2% never fails by chance.
    ensure!(
        (8_800..=9_200).contains(&n1),
        "v1 got {n1} of 10000 requests, weight 90%"
    );
    let counters = &agents[0].stats()?["services"]["lab/echo:80"];
    ensure!(
        counters["requests"] == 10_000 && counters["responses_2xx"] == 10_000,
        "{counters}"
    );
    Ok(())
}

#[test]
fn mirrored_requests_reach_a_failing_shadow_without_touching_the_caller() -> Result<()> {
    let (lab, mut mesh) = l7_lab("l7mir", 2)?;
    let (a1, b1, b2) = (lab.pod("a1")?, lab.pod("b1")?, lab.pod("b2")?);
    label(&mut mesh, "b1", "{app: echo}")?;
    label(&mut mesh, "b2", "{app: shadow}")?;
    mesh.services = [
        service("echo", "10.96.0.10", "echo", ""),
        service("shadow", "10.96.0.11", "shadow", ""),
    ]
    .concat();
    mesh.routes = route(
        "mirror",
        "echo",
        "filters: [{type: RequestMirror, requestMirror: {backendRef: {name: shadow}}}]",
    );
    let agents = start_meshed_agents(&lab, &mesh)?;
    let echo = serve(b1, "echo", &[])?;
    let shadow = serve(
        b2,
        "shadow",
        &["--fail-percent", "100", "--delay-ms", "200"],
    )?;
    const REQUESTS: u64 = 3000;
    let summary = call(a1, "http://10.96.0.10/", REQUESTS, 16, &["--rate", "1000"])?;
    ensure!(
        status_count(&summary, 200) == REQUESTS && summary["bodies"]["echo"] == REQUESTS,
        "the caller must see the primary's 200s only: {summary}"
    );
    // Waiting on the shadow's 200 ms (or its 503s) even for 1% of requests would show here.
    let p99_us = summary["latency_us"]["p99"].as_u64().unwrap_or(u64::MAX);
    ensure!(p99_us < 50_000, "caller p99 {p99_us} us: {summary}");
    ensure!(
        echo.counter("requests")? == REQUESTS,
        "primary: {}",
        echo.stats()?
    );
    // Mirrored requests finish in the background, 200 ms after the caller's; the shadow counts
    // a failure once it answers.
    wait_until(Duration::from_secs(10), || {
        Ok(shadow.stats()?["failed"].as_u64() >= Some(REQUESTS))
    })?;
    let seen = shadow.stats()?;
    ensure!(
        seen["requests"] == REQUESTS && seen["failed"] == REQUESTS,
        "the shadow should have received and failed every request: {seen}"
    );
    let counters = &agents[0].stats()?["services"]["lab/echo:80"];
    ensure!(
        counters["mirrored"] == REQUESTS
            && counters["responses_2xx"] == REQUESTS
            && counters["responses_5xx"] == 0,
        "{counters}"
    );
    Ok(())
}

#[test]
fn retries_hide_an_endpoint_failing_half_the_time() -> Result<()> {
    let (lab, mut mesh) = l7_lab("l7ret", 1)?;
    let (a1, b1) = (lab.pod("a1")?, lab.pod("b1")?);
    label(&mut mesh, "b1", "{app: flaky}")?;
    // A budget as large as the traffic: here every request may need a retry.
    let budget = "    retry_budget: {ratio: 1.0, min_per_second: 10, window_ms: 10000}\n";
    mesh.services = [
        service("flaky", "10.96.0.10", "flaky", budget),
        service("noretry", "10.96.0.11", "flaky", budget),
    ]
    .concat();
    // Short backoffs keep the run short; they do not change which tries fail.
    let retry = |attempts: u32| {
        format!("retry: {{attempts: {attempts}, on: [5xx], backoff: 5ms, maxBackoff: 20ms}}")
    };
    mesh.routes = [
        route("retry", "flaky", &retry(3)),
        route("once", "noretry", &retry(0)),
    ]
    .concat();
    let agents = start_meshed_agents(&lab, &mesh)?;
    let flaky = serve(b1, "flaky", &["--fail-percent", "50"])?;
    // The app fails every other request it receives, so the retry of a lone caller's failed
    // try lands on a success. Concurrent callers' tries interleave: a retry can land on a
    // failing turn too, and a few percent of requests could fail all four tries.
    let retried = call(a1, "http://10.96.0.10/", 1000, 1, &[])?;
    let ok = status_count(&retried, 200);
    ensure!(
        ok >= 990,
        "with retries only {ok} of 1000 succeeded: {retried}"
    );
    let counters = agents[0].stats()?["services"]["lab/flaky:80"].clone();
    let retries = counters["retries"].as_u64().unwrap_or(0);
    ensure!(
        retries >= 400 && counters["retries_suppressed"] == 0,
        "the agent should have retried about every other request: {counters}"
    );
    let seen = flaky.counter("requests")?;
    ensure!(
        seen == 1000 + retries,
        "the app saw {seen} requests for 1000 calls and {retries} retries"
    );

    let control = call(a1, "http://10.96.0.11/", 1000, 1, &[])?;
    let failed = 1000 - status_count(&control, 200);
    ensure!(
        (450..=550).contains(&failed) && status_count(&control, 503) == failed,
        "without retries about half should fail with the app's 503: {control}"
    );
    let counters = &agents[0].stats()?["services"]["lab/noretry:80"];
    ensure!(counters["retries"] == 0, "{counters}");
    Ok(())
}

/// Load batches run back to back from `pod` until stopped: when each started, and its summary.
struct BackgroundLoad {
    stop: Arc<AtomicBool>,
    batches: Arc<Mutex<Vec<(Instant, Value)>>>,
    thread: Option<thread::JoinHandle<Result<()>>>,
}

impl BackgroundLoad {
    fn start(pod: &Pod, args: &[&str]) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let batches = Arc::new(Mutex::new(Vec::new()));
        let (pod, args): (Pod, Vec<String>) =
            (pod.clone(), args.iter().map(|a| a.to_string()).collect());
        let thread = {
            let (stop, batches) = (Arc::clone(&stop), Arc::clone(&batches));
            thread::spawn(move || -> Result<()> {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                while !stop.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    let summary = load(&pod, &args)?;
                    batches.lock().unwrap().push((started, summary));
                }
                Ok(())
            })
        };
        Self {
            stop,
            batches,
            thread: Some(thread),
        }
    }

    fn completed(&self) -> usize {
        self.batches.lock().unwrap().len()
    }

    fn finish(mut self) -> Result<Vec<(Instant, Value)>> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            thread
                .join()
                .map_err(|_| anyhow::anyhow!("load thread panicked"))??;
        }
        Ok(std::mem::take(&mut *self.batches.lock().unwrap()))
    }
}

impl Drop for BackgroundLoad {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn wait_until(timeout: Duration, mut done: impl FnMut() -> Result<bool>) -> Result<bool> {
    let deadline = Instant::now() + timeout;
    loop {
        if done()? {
            return Ok(true);
        }
        if Instant::now() > deadline {
            return Ok(false);
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Requests of a load summary that did not get a 2xx.
fn failures(summary: &Value) -> u64 {
    summary["requests"].as_u64().unwrap_or(0) - summary["ok"].as_u64().unwrap_or(0)
}

#[test]
fn a_dead_endpoint_is_ejected_and_probed_back_in() -> Result<()> {
    let (lab, mut mesh) = l7_lab("l7ej", 3)?;
    let (a1, a2, b1, b2) = (
        lab.pod("a1")?,
        lab.pod("a2")?,
        lab.pod("b1")?,
        lab.pod("b2")?,
    );
    for pod in ["a2", "b1", "b2"] {
        label(&mut mesh, pod, "{app: echo}")?;
    }
    // Five failures in a row eject (the default); short ejections bound how long a restarted
    // app waits for its probe.
    mesh.services = service(
        "echo",
        "10.96.0.10",
        "echo",
        "    outlier_detection: {max_ejection_ms: 2000}\n",
    );
    let agents = start_meshed_agents(&lab, &mesh)?;
    let _one = serve(a2, "one", &[])?;
    let two = serve(b1, "two", &[])?;
    let _three = serve(b2, "three", &[])?;
    let background = BackgroundLoad::start(
        a1,
        &[
            "--url",
            "http://10.96.0.10/",
            "--requests",
            "200",
            "--rate",
            "400",
            "--concurrency",
            "8",
        ],
    );
    ensure!(
        wait_until(Duration::from_secs(10), || Ok(background.completed() >= 3))?,
        "the load did not run"
    );
    ensure!(
        two.counter("requests")? > 0,
        "the endpoint to kill got no traffic"
    );
    drop(two);

    let dead = format!("{}:{APP_PORT}", b1.ip);
    let ejections = || {
        agents[0]
            .log()
            .lines()
            .filter(|l| l.contains("endpoint ejected") && l.contains(&dead))
            .count()
    };
    ensure!(
        wait_until(Duration::from_secs(5), || Ok(ejections() > 0))?,
        "{dead} was not ejected within 5 s of its app dying; the client's agent: {} {}",
        agents[0].stats()?["endpoints"],
        agents[0].stats()?["services"]
    );
    let ejected_at = Instant::now();
    // Dead for a while: probes fail and must not reach callers.
    thread::sleep(Duration::from_secs(3));
    let two = serve(b1, "two", &[])?;
    let back = wait_until(Duration::from_secs(5), || Ok(two.counter("requests")? > 0))?;
    thread::sleep(Duration::from_secs(1));
    let batches = background.finish()?;

    let total_failed: u64 = batches.iter().map(|(_, s)| failures(s)).sum();
    let after: Vec<&Value> = batches
        .iter()
        .filter(|(start, _)| *start >= ejected_at)
        .map(|(_, s)| s)
        .collect();
    let (after_requests, after_failed) = after.iter().fold((0, 0), |(n, f), s| {
        (n + s["requests"].as_u64().unwrap_or(0), f + failures(s))
    });
    let statuses: Vec<String> = batches
        .iter()
        .filter(|(_, s)| failures(s) > 0)
        .map(|(_, s)| format!("{} {}", s["status"], s["errors"]))
        .collect();
    let outcome = format!(
        "{total_failed} requests failed, {after_failed} of {after_requests} after the ejection; \
         the restarted app got requests within 5 s: {back}; ejections logged: {}; \
         batches with failures: {statuses:?}",
        ejections()
    );
    ensure!(total_failed <= 10, "{outcome}");
    ensure!(
        after_requests >= 1000 && after_failed * 1000 < after_requests,
        "{outcome}"
    );
    ensure!(back, "{outcome}");
    Ok(())
}

#[test]
fn a_restarted_app_behind_a_service_is_served_again() -> Result<()> {
    let (lab, mut mesh) = l7_lab("l7rst", 1)?;
    let (a1, b1) = (lab.pod("a1")?, lab.pod("b1")?);
    label(&mut mesh, "b1", "{app: echo}")?;
    mesh.services = service("echo", "10.96.0.10", "echo", "");
    let agents = start_meshed_agents(&lab, &mesh)?;
    let app = serve(b1, "echo", &[])?;
    let before = call(a1, "http://10.96.0.10/", 20, 1, &[])?;
    ensure!(status_count(&before, 200) == 20, "{before}");
    // The agent's pooled connection to the endpoint outlives the app process.
    drop(app);
    // Meanwhile a connection to the closed port is refused at once, not left to time out.
    let started = Instant::now();
    let refused = curl(a1, &format!("http://{}:{APP_PORT}/", b1.ip))?;
    ensure!(
        refused.exit_code != Some(0) && started.elapsed() < Duration::from_secs(2),
        "a connection to the dead app took {:?}: {refused:?}",
        started.elapsed()
    );
    let app = serve(b1, "echo", &[])?;
    let after = call(a1, "http://10.96.0.10/", 20, 1, &[])?;
    ensure!(
        status_count(&after, 200) == 20,
        "after the app restarted: {after}; the app saw {} requests; client agent: {}",
        app.counter("requests")?,
        agents[0].stats()?["services"]["lab/echo:80"]
    );
    Ok(())
}

#[test]
fn a_service_without_endpoints_fails_fast() -> Result<()> {
    let (lab, mut mesh) = l7_lab("l7emp", 1)?;
    let a1 = lab.pod("a1")?;
    mesh.services = "  - {name: empty, namespace: lab, vips: [10.96.0.30], ports: [{port: 80}, {port: 81, protocol: tcp}, {port: 82, protocol: grpc}], selector: {app: nobody}}\n".into();
    let agents = start_meshed_agents(&lab, &mesh)?;
    let started = Instant::now();
    let out = a1
        .command("curl")?
        .args(["-sS", "-i", "--max-time", "5", "http://10.96.0.30/"])
        .output()?;
    let answer = String::from_utf8_lossy(&out.stdout);
    ensure!(
        answer.starts_with("HTTP/1.1 503") && answer.contains("x-weft-local-reply: 1"),
        "{answer}"
    );
    let opaque = curl(a1, "http://10.96.0.30:81/")?;
    ensure!(
        // curl's "could not connect" (7) or "reset on receive" (56), as with a closed port.
        matches!(opaque.exit_code, Some(7 | 56)),
        "an opaque connection without endpoints must be refused: {opaque:?}"
    );
    ensure!(
        started.elapsed() < Duration::from_secs(2),
        "failing took {:?}",
        started.elapsed()
    );
    // gRPC callers get the gRPC form: UNAVAILABLE.
    let call = testapp_json(
        a1,
        &[
            "grpc-call",
            "--url",
            "http://10.96.0.30:82",
            "--message",
            "hi",
        ],
    )?;
    ensure!(call["grpc_status"] == 14, "{call}");
    let stats = agents[0].stats()?;
    for port in [80, 81, 82] {
        let counters = &stats["services"][format!("lab/empty:{port}")];
        ensure!(counters["no_endpoint"] == 1, "port {port}: {counters}");
    }
    Ok(())
}

#[test]
fn sigterm_closes_idle_keep_alive_connections_without_waiting_out_the_drain() -> Result<()> {
    let (lab, mut mesh) = l7_lab("l7drn", 1)?;
    let (a1, b1) = (lab.pod("a1")?, lab.pod("b1")?);
    label(&mut mesh, "b1", "{app: echo}")?;
    mesh.services = service("echo", "10.96.0.10", "echo", "");
    let mut agents = start_meshed_agents(&lab, &mesh)?;
    let app = serve(b1, "echo", &[])?;
    // One request on a keep-alive connection, which then stays open and idle until the server
    // side closes it.
    let client = a1
        .command("bash")?
        .args([
            "-c",
            "exec 3<>/dev/tcp/10.96.0.10/80; printf 'GET / HTTP/1.1\\r\\nHost: echo\\r\\n\\r\\n' >&3; timeout 20 cat <&3",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .context("starting bash in a1")?;
    // The answer has arrived once the app counted the request.
    ensure!(
        wait_until(Duration::from_secs(5), || Ok(app.counter("requests")? == 1))?,
        "the request did not arrive"
    );
    thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    let exit = agents[0].stop_with(libc::SIGTERM, Duration::from_secs(10))?;
    let stopped_after = started.elapsed();
    let out = client.wait_with_output()?;
    let answer = String::from_utf8_lossy(&out.stdout);
    ensure!(
        answer.starts_with("HTTP/1.1 200") && answer.ends_with("echo"),
        "the client got {answer:?}"
    );
    // timeout(1) exits 124 when it has to stop cat: the agent never closed the connection.
    ensure!(
        out.status.code() == Some(0),
        "the idle connection stayed open: {:?}",
        out.status
    );
    ensure!(exit == Some(0), "the agent exited with {exit:?}");
    // The lab's drain period is 3 s: an idle connection must not hold it.
    ensure!(
        stopped_after < Duration::from_millis(2500),
        "the agent took {stopped_after:?} to stop"
    );
    Ok(())
}

#[test]
fn plaintext_http_arriving_at_a_meshed_pod_is_served_request_by_request() -> Result<()> {
    let (lab, mesh) = l7_lab("l7pin", 2)?;
    let (a1, b1) = (lab.pod("a1")?, lab.pod("b1")?);
    // Only node b runs an agent: a1 is a client outside the mesh, b1 is PERMISSIVE.
    let node_b = lab.node("b")?;
    let agent = Agent::start_with(&lab, node_b, &mesh.config_yaml(node_b, &[b1]), &[b1])?;
    let app = serve(b1, "echo", &[])?;
    let _banner = App::start(
        APP,
        b1,
        &[
            "banner",
            "--listen",
            "0.0.0.0:7000",
            "--text",
            "hello banner",
        ],
        7000,
    )?;
    let url = format!("http://{}:{APP_PORT}/", b1.ip);
    ensure!(fetch(a1, &url)? == "echo", "a plain request");
    let past = format!("x-weft-deadline: {}", unix_ms_now()?);
    let out = a1
        .command("curl")?
        .args(["-sS", "-i", "--max-time", "5", "-H", &past, &url])
        .output()?;
    let answer = String::from_utf8_lossy(&out.stdout);
    ensure!(
        answer.starts_with("HTTP/1.1 504") && answer.contains("x-weft-local-reply: 1"),
        "a request past its deadline: {answer}"
    );
    ensure!(
        app.counter("requests")? == 1,
        "the expired request reached the app"
    );
    let inbound = &agent.stats()?["inbound"]["lab/b1"];
    ensure!(
        inbound["plaintext"] == 2
            && inbound["http_requests"] == 2
            && inbound["deadline_exceeded"] == 1,
        "{inbound}"
    );
    // A server-speaks-first protocol still works, after the detection timeout.
    let waited = banner_wait_ms(a1, &format!("{}:7000", b1.ip), "hello banner", 1)?;
    ensure!(
        waited >= 95.0,
        "the banner came after {waited} ms, before detection gave up"
    );
    Ok(())
}

fn unix_ms_now() -> Result<String> {
    Ok(std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis()
        .to_string())
}

/// Asks `addr` to switch to the testapp's `echo` protocol, then sends a line over the switched
/// connection; what came back: the status line and the echoed line.
fn switch_and_echo(pod: &Pod, addr: &str) -> Result<String> {
    let (host, port) = addr.split_once(':').context("address without port")?;
    let script = format!(
        "exec 3<>/dev/tcp/{host}/{port}
printf 'GET /switch HTTP/1.1\\r\\nHost: echo\\r\\nConnection: upgrade\\r\\nUpgrade: echo\\r\\n\\r\\n' >&3
IFS= read -r status <&3
while IFS= read -r line <&3; do [ \"$line\" = $'\\r' ] && break; done
printf 'ping over the switched connection\\n' >&3
IFS= read -r reply <&3
printf '%s|%s' \"${{status%$'\\r'}}\" \"$reply\""
    );
    let out = pod
        .command("timeout")?
        .args(["5", "bash", "-c", &script])
        .output()
        .context("running bash in a pod")?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn switched_protocols_pass_through_a_service_and_into_a_meshed_pod() -> Result<()> {
    let (lab, mut mesh) = l7_lab("l7upg", 2)?;
    let (a1, b1) = (lab.pod("a1")?, lab.pod("b1")?);
    label(&mut mesh, "b1", "{app: echo}")?;
    mesh.services = service("echo", "10.96.0.10", "echo", "");
    // a2 stays outside the mesh: its connection to b1 arrives as plaintext (PERMISSIVE).
    mesh.workloads.retain(|w| w.pod.name != "a2");
    let node_a = lab.node("a")?;
    let node_b = lab.node("b")?;
    let _client_agent = Agent::start_with(&lab, node_a, &mesh.config_yaml(node_a, &[a1]), &[a1])?;
    let _server_agent = Agent::start_with(&lab, node_b, &mesh.config_yaml(node_b, &[b1]), &[b1])?;
    let _app = serve(b1, "echo", &[])?;
    let expected = "HTTP/1.1 101 Switching Protocols|ping over the switched connection";
    let through_service = switch_and_echo(a1, "10.96.0.10:80")?;
    ensure!(
        through_service == expected,
        "through the service: {through_service:?}"
    );
    let from_outside = switch_and_echo(lab.pod("a2")?, &format!("{}:{APP_PORT}", b1.ip))?;
    ensure!(
        from_outside == expected,
        "from outside the mesh: {from_outside:?}"
    );
    Ok(())
}

#[test]
fn grpc_calls_are_retried_on_their_grpc_status() -> Result<()> {
    let (lab, mut mesh) = l7_lab("l7grr", 1)?;
    let (a1, b1) = (lab.pod("a1")?, lab.pod("b1")?);
    label(&mut mesh, "b1", "{app: grpc}")?;
    mesh.services = [
        service_entry(
            "grpc",
            "10.96.0.40",
            "[{port: 80, target_port: 8080, protocol: grpc}]",
            "{app: grpc}",
        ),
        "    retry_budget: {ratio: 1.0}\n".to_owned(),
        service_entry(
            "plain",
            "10.96.0.41",
            "[{port: 80, target_port: 8080, protocol: grpc}]",
            "{app: grpc}",
        ),
    ]
    .concat();
    // gRPC calls are POSTs: retrying them is the route's explicit choice.
    mesh.routes = route(
        "grpc",
        "grpc",
        "retry: {attempts: 3, on: [unavailable], nonIdempotent: true}",
    );
    let _agents = start_meshed_agents(&lab, &mesh)?;
    // Every other call fails with UNAVAILABLE in a trailers-only answer.
    let _app = serve(b1, "grpc", &["--grpc", "--fail-percent", "50"])?;
    let statuses = |url: &str| -> Result<Vec<u64>> {
        (0..20)
            .map(|_| {
                let call = testapp_json(a1, &["grpc-call", "--url", url, "--message", "hi"])?;
                call["grpc_status"]
                    .as_u64()
                    .with_context(|| format!("no grpc status: {call}"))
            })
            .collect()
    };
    let retried = statuses("http://10.96.0.40")?;
    ensure!(retried.iter().all(|s| *s == 0), "with retries: {retried:?}");
    // The control: the same endpoint through a service without the route fails half the calls.
    let plain = statuses("http://10.96.0.41")?;
    let failed = plain.iter().filter(|s| **s == 14).count();
    ensure!((8..=12).contains(&failed), "without retries: {plain:?}");
    Ok(())
}

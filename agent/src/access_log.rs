//! The access log: one JSON line per proxied connection and per HTTP request, for operators and
//! auditors ("who did what, and when"), on stdout (tracing's own logs go to stderr).
//!
//! The data path only decides whether to log ([`AccessLog::wants`]) and moves the entry into a
//! bounded queue; a thread of the log's own serialises and writes it. The agent's runtime is
//! single-threaded, so neither a slow reader of stdout nor JSON encoding may run on it: when the
//! writer falls behind, lines are dropped and counted instead.
//!
//! `enabled: false` turns the log off entirely, denials included. With the log enabled, denials
//! are always logged whatever the sample rate: an auditor wants every one of them.
use std::{
    fmt,
    io::{self, Write},
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        mpsc::{self, Receiver, SyncSender},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant, SystemTime},
};

use serde::{Serialize, Serializer};
use tracing::warn;

use crate::{
    config::AccessLogSettings,
    stats::{Peer, Reporter, Transport},
};

/// Lines waiting for the writer at most; past it new lines are dropped.
const QUEUE_CAPACITY: usize = 8192;
/// Bytes gathered before one write, when lines keep coming: batches writes under load without
/// holding lines back under light load (a batch is written as soon as the queue is empty).
const BATCH_BYTES: usize = 64 * 1024;
/// Once it has caught up, the writer rests this long, so lines queued meanwhile do not wake it
/// one by one: a wake-up per line cost the agent more CPU than the request it logs.
const WRITE_PAUSE: Duration = Duration::from_millis(50);
/// `WouldBlock` errors one batch may meet before the log gives up on its output.
const MAX_BLOCKED_WRITES: u32 = 5;
/// The wait before writing again after `WouldBlock`.
const RETRY_PAUSE: Duration = Duration::from_millis(10);
/// How long dropping the log waits for the writer to write what is queued: bounded, so that a
/// stdout nobody reads cannot hang the agent's shutdown.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// One line of the access log.
#[derive(Debug, Clone, Serialize)]
pub struct AccessEntry {
    pub kind: EntryKind,
    pub reporter: Reporter,
    /// When the connection or request started; RFC 3339, UTC, milliseconds.
    #[serde(rename = "time", serialize_with = "rfc3339_millis")]
    pub start_time: SystemTime,
    pub duration_ms: f64,
    pub source: Party,
    pub destination: Party,
    /// The service addressed, e.g. `api.lab.svc.cluster.local`.
    #[serde(serialize_with = "opt_str")]
    pub destination_service: Option<Arc<str>>,
    /// `tcp`, `http/1.1`, `http/2` or `grpc`.
    pub protocol: &'static str,
    /// Requests only.
    pub method: Option<String>,
    /// Requests only: path and query as received.
    pub path: Option<String>,
    pub authority: Option<String>,
    /// HTTP status; `None` for connections.
    pub status: Option<u16>,
    /// Envoy-style response flags, `-` when none.
    pub response_flags: &'static str,
    /// Bytes from the client (request direction).
    pub bytes_received: u64,
    /// Bytes to the client (response direction).
    pub bytes_sent: u64,
    pub retries: u32,
    pub policy: Policy,
    /// `mutual_tls` or `none`.
    pub connection_security_policy: &'static str,
    /// 32 lowercase hex digits, as in `traceparent`.
    #[serde(serialize_with = "trace_id_hex")]
    pub trace_id: Option<u128>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    Connection,
    Request,
}

/// One end of a connection or request; fields the reporter does not know are `None`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Party {
    #[serde(serialize_with = "opt_str")]
    pub workload: Option<Arc<str>>,
    #[serde(serialize_with = "opt_str")]
    pub namespace: Option<Arc<str>>,
    /// SPIFFE URI of the party's identity.
    #[serde(serialize_with = "opt_str")]
    pub principal: Option<Arc<str>>,
    pub address: Option<SocketAddr>,
}

impl Party {
    /// `peer` as the log names it: what metrics call `unknown` is left out.
    pub fn of(peer: &Peer, address: Option<SocketAddr>) -> Self {
        let known =
            |value: &Arc<str>| (&**value != crate::stats::UNKNOWN).then(|| Arc::clone(value));
        Self {
            workload: known(&peer.workload),
            namespace: known(&peer.namespace),
            principal: known(&peer.principal),
            address,
        }
    }
}

impl AccessEntry {
    /// The line of an allowed TCP connection that was relayed without trouble; callers change
    /// what differs.
    pub fn connection(
        reporter: Reporter,
        source: Party,
        destination: Party,
        transport: Transport,
        started: SystemTime,
        duration: Duration,
    ) -> Self {
        Self {
            kind: EntryKind::Connection,
            reporter,
            start_time: started,
            duration_ms: duration.as_secs_f64() * 1000.0,
            source,
            destination,
            destination_service: None,
            protocol: "tcp",
            method: None,
            path: None,
            authority: None,
            status: None,
            response_flags: "-",
            bytes_received: 0,
            bytes_sent: 0,
            retries: 0,
            policy: Policy::allowed(),
            connection_security_policy: transport.security_policy(),
            trace_id: None,
        }
    }
}

/// The authorization decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Policy {
    pub decision: Verdict,
    /// `namespace/name` of the policy that decided, when one did.
    pub policy: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Allow,
    Deny,
}

impl Policy {
    pub fn allowed() -> Self {
        Self {
            decision: Verdict::Allow,
            policy: None,
        }
    }

    pub fn denied(by: &str) -> Self {
        Self {
            decision: Verdict::Deny,
            policy: Some(by.to_owned()),
        }
    }
}

fn opt_str<S: Serializer>(value: &Option<Arc<str>>, serializer: S) -> Result<S::Ok, S::Error> {
    value.as_deref().serialize(serializer)
}

fn trace_id_hex<S: Serializer>(id: &Option<u128>, serializer: S) -> Result<S::Ok, S::Error> {
    match id {
        Some(id) => serializer.collect_str(&format_args!("{id:032x}")),
        None => serializer.serialize_none(),
    }
}

fn rfc3339_millis<S: Serializer>(time: &SystemTime, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_str(&Rfc3339Millis(*time))
}

/// `2024-05-06T07:08:09.123Z`: fixed width, unlike `time`'s RFC 3339 formatting, which trims
/// the fraction; lines then sort and align as text.
struct Rfc3339Millis(SystemTime);

impl fmt::Display for Rfc3339Millis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let nanos = match self.0.duration_since(SystemTime::UNIX_EPOCH) {
            Ok(after) => i128::try_from(after.as_nanos()),
            Err(before) => i128::try_from(before.duration().as_nanos()).map(|n| -n),
        };
        let time = nanos
            .ok()
            .and_then(|nanos| time::OffsetDateTime::from_unix_timestamp_nanos(nanos).ok())
            // Only a clock set tens of millennia away gets here; the line is still worth having.
            .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
        write!(
            f,
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
            time.year(),
            u8::from(time.month()),
            time.day(),
            time.hour(),
            time.minute(),
            time.second(),
            time.millisecond()
        )
    }
}

#[derive(Default)]
struct Counters {
    written: AtomicU64,
    dropped: AtomicU64,
}

pub struct AccessLog {
    sample_rate: f64,
    /// `None` when the log is disabled. Boxed entries keep the preallocated queue small.
    queue: Option<SyncSender<Box<AccessEntry>>>,
    counters: Arc<Counters>,
    writer: Option<JoinHandle<()>>,
}

impl AccessLog {
    /// Writes to stdout from a thread of its own.
    pub fn stdout(settings: &AccessLogSettings) -> Self {
        Self::to_writer(settings, std::io::stdout())
    }

    /// Same, to any writer (tests).
    fn to_writer(settings: &AccessLogSettings, writer: impl Write + Send + 'static) -> Self {
        let counters = Arc::new(Counters::default());
        if !settings.enabled {
            return Self {
                sample_rate: settings.sample_rate,
                queue: None,
                counters,
                writer: None,
            };
        }
        let (queue, lines) = mpsc::sync_channel(QUEUE_CAPACITY);
        let thread_counters = Arc::clone(&counters);
        let handle = std::thread::Builder::new()
            .name("weft-access-log".to_owned())
            .spawn(move || write_lines(&lines, writer, &thread_counters));
        // Without its thread the queue has no receiver, so every line is counted as dropped: the
        // agent keeps running, and `dropped` shows what was lost.
        let writer = handle
            .inspect_err(|err| {
                warn!(error = %err, "cannot start the access log's writer thread; its lines will be dropped");
            })
            .ok();
        Self {
            sample_rate: settings.sample_rate,
            queue: Some(queue),
            counters,
            writer,
        }
    }

    /// Whether the caller should build an entry at all: logging is on and this one is sampled
    /// (`always`: denials, which are never sampled away). Cheap; call before building the entry.
    pub fn wants(&self, always: bool) -> bool {
        self.queue.is_some()
            && (always || self.sample_rate >= 1.0 || fastrand::f64() < self.sample_rate)
    }

    /// Queues the line; never blocks: a full queue drops it and counts the drop. A disabled log
    /// ignores it.
    pub fn log(&self, entry: AccessEntry) {
        let Some(queue) = &self.queue else {
            return;
        };
        // Full, or disconnected when the writer thread could not be started.
        if queue.try_send(Box::new(entry)).is_err() {
            self.counters.dropped.fetch_add(1, Relaxed);
        }
    }

    /// Lines dropped because the writer fell behind or failed.
    pub fn dropped(&self) -> u64 {
        self.counters.dropped.load(Relaxed)
    }

    /// Lines written out.
    pub fn written(&self) -> u64 {
        self.counters.written.load(Relaxed)
    }
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        // Closing the queue ends the writer once it has written what was queued.
        self.queue = None;
        let Some(writer) = self.writer.take() else {
            return;
        };
        // JoinHandle has no timed join; shutdown is the only caller, so polling is fine.
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        while !writer.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        if !writer.is_finished() {
            warn!(
                timeout = ?DRAIN_TIMEOUT,
                "the access log's writer did not finish writing its queued lines; leaving it behind"
            );
        } else if writer.join().is_err() {
            warn!("the access log's writer thread panicked");
        }
    }
}

/// The writer thread: runs until every sender is gone and the queue is empty.
fn write_lines(lines: &Receiver<Box<AccessEntry>>, mut out: impl Write, counters: &Counters) {
    let mut batch = Vec::with_capacity(BATCH_BYTES);
    let mut failed = false;
    while let Ok(entry) = lines.recv() {
        if failed {
            // Keep receiving so that every line is accounted for, not left in a dead queue.
            counters.dropped.fetch_add(1, Relaxed);
            continue;
        }
        let mut count = 0;
        let mut next = Some(entry);
        while let Some(entry) = next {
            let start = batch.len();
            let encoded = serde_json::to_writer(&mut batch, &*entry);
            match encoded {
                Ok(()) => {
                    batch.push(b'\n');
                    count += 1;
                }
                // Not expected: encoding into a Vec fails only on types an entry does not hold.
                Err(err) => {
                    // Leave no half line behind: it would break every later line's parsing.
                    batch.truncate(start);
                    counters.dropped.fetch_add(1, Relaxed);
                    warn!(error = %err, "cannot encode an access log line; dropping it");
                }
            }
            next = if batch.len() < BATCH_BYTES {
                lines.try_recv().ok()
            } else {
                None
            };
        }
        if batch.is_empty() {
            continue;
        }
        match write_batch(&mut out, &batch) {
            Ok(()) => {
                counters.written.fetch_add(count, Relaxed);
            }
            Err(err) => {
                // Part of the batch may have gone out; it is counted as dropped all the same.
                counters.dropped.fetch_add(count, Relaxed);
                failed = true;
                warn!(error = %err, "cannot write the access log; dropping its lines from now on");
            }
        }
        // A full batch means more is waiting: write on. Otherwise the queue was empty.
        let caught_up = batch.len() < BATCH_BYTES;
        batch.clear();
        if caught_up {
            std::thread::sleep(WRITE_PAUSE);
        }
    }
}

/// Writes and flushes `batch`, riding out transient errors: `Interrupted` is tried again at
/// once, `WouldBlock` (a non-blocking stdout whose reader is behind) after a pause, a few times.
/// Only what is left is written again, so no line is cut or doubled.
fn write_batch(out: &mut impl Write, mut batch: &[u8]) -> io::Result<()> {
    let mut blocked = 0;
    loop {
        let result = if batch.is_empty() {
            out.flush().map(|()| 0)
        } else {
            out.write(batch)
        };
        match result {
            Ok(0) if batch.is_empty() => return Ok(()),
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(written) => batch = &batch[written..],
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) if err.kind() == io::ErrorKind::WouldBlock && blocked < MAX_BLOCKED_WRITES => {
                blocked += 1;
                std::thread::sleep(RETRY_PAUSE);
            }
            Err(err) => return Err(err),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        net::{Ipv4Addr, SocketAddrV4},
        sync::{atomic::AtomicBool, Condvar, Mutex},
    };

    use serde_json::{json, Value};

    use super::*;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            crate::lock(&self.0).extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Shared {
        fn lines(&self) -> Vec<Value> {
            let bytes = crate::lock(&self.0).clone();
            let text = String::from_utf8(bytes).unwrap();
            text.lines()
                .map(|line| serde_json::from_str(line).unwrap())
                .collect()
        }
    }

    /// Blocks every write until opened.
    #[derive(Clone, Default)]
    struct Gate {
        open: Arc<(Mutex<bool>, Condvar)>,
        out: Shared,
    }

    impl Gate {
        fn open(&self) {
            *crate::lock(&self.open.0) = true;
            self.open.1.notify_all();
        }
    }

    impl Write for Gate {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let mut open = crate::lock(&self.open.0);
            while !*open {
                open = self.open.1.wait(open).unwrap();
            }
            drop(open);
            self.out.write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// Fails every write, counting the attempts.
    #[derive(Clone, Default)]
    struct Broken(Arc<AtomicU64>);

    impl Write for Broken {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            self.0.fetch_add(1, Relaxed);
            Err(io::Error::from(io::ErrorKind::BrokenPipe))
        }
        fn flush(&mut self) -> io::Result<()> {
            Err(io::Error::from(io::ErrorKind::BrokenPipe))
        }
    }

    /// Fails its first write with `Interrupted`, then writes to `out`.
    #[derive(Clone, Default)]
    struct Interrupted {
        failed: Arc<AtomicBool>,
        out: Shared,
    }

    impl Write for Interrupted {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if !self.failed.swap(true, Relaxed) {
                return Err(io::Error::from(io::ErrorKind::Interrupted));
            }
            self.out.write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn settings(enabled: bool, sample_rate: f64) -> AccessLogSettings {
        AccessLogSettings {
            enabled,
            sample_rate,
        }
    }

    fn request() -> AccessEntry {
        AccessEntry {
            kind: EntryKind::Request,
            reporter: Reporter::Destination,
            // 2024-05-06T07:08:09.123456789Z
            start_time: SystemTime::UNIX_EPOCH + Duration::new(1_714_979_289, 123_456_789),
            duration_ms: 12.5,
            source: Party {
                workload: Some("web".into()),
                namespace: Some("lab".into()),
                principal: Some("spiffe://cluster.local/ns/lab/sa/web".into()),
                address: Some(SocketAddr::V4(SocketAddrV4::new(
                    Ipv4Addr::new(10, 0, 0, 1),
                    40_000,
                ))),
            },
            destination: Party {
                workload: Some("api".into()),
                namespace: Some("lab".into()),
                principal: None,
                address: Some("10.0.0.2:8080".parse().unwrap()),
            },
            destination_service: Some("api.lab.svc.cluster.local".into()),
            protocol: "http/1.1",
            method: Some("GET".to_owned()),
            path: Some("/items?id=7".to_owned()),
            authority: Some("api.lab".to_owned()),
            status: Some(503),
            response_flags: "UF",
            bytes_received: 120,
            bytes_sent: 4096,
            retries: 2,
            policy: Policy::denied("lab/deny-web"),
            connection_security_policy: "mutual_tls",
            trace_id: Some(0x0af7_6519_16cd_43dd_8448_eb21_1c80_319c),
        }
    }

    fn connection() -> AccessEntry {
        AccessEntry {
            kind: EntryKind::Connection,
            reporter: Reporter::Source,
            start_time: SystemTime::UNIX_EPOCH,
            duration_ms: 0.0,
            source: Party::default(),
            destination: Party::default(),
            destination_service: None,
            protocol: "tcp",
            method: None,
            path: None,
            authority: None,
            status: None,
            response_flags: "-",
            bytes_received: 0,
            bytes_sent: 0,
            retries: 0,
            policy: Policy::allowed(),
            connection_security_policy: "none",
            trace_id: None,
        }
    }

    /// Logs `entries`, drops the log (draining it) and returns the parsed lines.
    fn logged(entries: Vec<AccessEntry>) -> Vec<Value> {
        let out = Shared::default();
        let log = AccessLog::to_writer(&settings(true, 1.0), out.clone());
        for entry in entries {
            log.log(entry);
        }
        drop(log);
        out.lines()
    }

    #[test]
    fn lines_are_json_with_the_documented_fields() {
        let lines = logged(vec![request(), connection()]);
        assert_eq!(lines.len(), 2);
        assert_eq!(
            lines[0],
            json!({
                "kind": "request",
                "reporter": "destination",
                "time": "2024-05-06T07:08:09.123Z",
                "duration_ms": 12.5,
                "source": {
                    "workload": "web",
                    "namespace": "lab",
                    "principal": "spiffe://cluster.local/ns/lab/sa/web",
                    "address": "10.0.0.1:40000",
                },
                "destination": {
                    "workload": "api",
                    "namespace": "lab",
                    "principal": null,
                    "address": "10.0.0.2:8080",
                },
                "destination_service": "api.lab.svc.cluster.local",
                "protocol": "http/1.1",
                "method": "GET",
                "path": "/items?id=7",
                "authority": "api.lab",
                "status": 503,
                "response_flags": "UF",
                "bytes_received": 120,
                "bytes_sent": 4096,
                "retries": 2,
                "policy": { "decision": "deny", "policy": "lab/deny-web" },
                "connection_security_policy": "mutual_tls",
                "trace_id": "0af7651916cd43dd8448eb211c80319c",
            })
        );
        let connection = &lines[1];
        assert_eq!(connection["kind"], "connection");
        assert_eq!(connection["reporter"], "source");
        assert_eq!(connection["time"], "1970-01-01T00:00:00.000Z");
        assert_eq!(connection["status"], Value::Null);
        assert_eq!(connection["method"], Value::Null);
        assert_eq!(connection["trace_id"], Value::Null);
        assert_eq!(connection["source"]["address"], Value::Null);
        assert_eq!(
            connection["policy"],
            json!({ "decision": "allow", "policy": null })
        );
    }

    #[test]
    fn reporter_names_match_the_json() {
        for reporter in [Reporter::Source, Reporter::Destination] {
            assert_eq!(serde_json::to_value(reporter).unwrap(), reporter.as_str());
        }
        assert_eq!(Reporter::Source.as_str(), "source");
        assert_eq!(Reporter::Destination.as_str(), "destination");
    }

    #[test]
    fn trace_ids_are_32_lowercase_hex_digits() {
        let with = |trace_id| AccessEntry {
            trace_id,
            ..connection()
        };
        let lines = logged(vec![with(Some(1)), with(Some(u128::MAX)), with(None)]);
        assert_eq!(lines[0]["trace_id"], "00000000000000000000000000000001");
        assert_eq!(lines[1]["trace_id"], "ffffffffffffffffffffffffffffffff");
        assert_eq!(lines[2]["trace_id"], Value::Null);
    }

    #[test]
    fn times_have_fixed_width_milliseconds() {
        let at = |secs, nanos| SystemTime::UNIX_EPOCH + Duration::new(secs, nanos);
        let cases = [
            (at(0, 999_999_999), "1970-01-01T00:00:00.999Z"),
            (at(951_782_400, 1_000_000), "2000-02-29T00:00:00.001Z"),
            (
                SystemTime::UNIX_EPOCH - Duration::from_millis(1),
                "1969-12-31T23:59:59.999Z",
            ),
        ];
        for (time, expected) in cases {
            assert_eq!(Rfc3339Millis(time).to_string(), expected);
        }
    }

    #[test]
    fn sample_rate_zero_logs_only_what_is_always_wanted() {
        let out = Shared::default();
        let log = AccessLog::to_writer(&settings(true, 0.0), out.clone());
        for i in 0..1000 {
            let denied = i % 10 == 0;
            if log.wants(denied) {
                log.log(connection());
            }
        }
        drop(log);
        assert_eq!(out.lines().len(), 100);
    }

    #[test]
    fn sample_rate_half_logs_about_half() {
        let log = AccessLog::to_writer(&settings(true, 0.5), Shared::default());
        let wanted = (0..10_000).filter(|_| log.wants(false)).count();
        assert!((4000..=6000).contains(&wanted), "{wanted} of 10000 sampled");
        assert!((0..100).all(|_| log.wants(true)));
    }

    #[test]
    fn full_rate_wants_everything() {
        let log = AccessLog::to_writer(&settings(true, 1.0), Shared::default());
        assert!((0..10_000).all(|_| log.wants(false)));
    }

    #[test]
    fn disabled_log_starts_nothing_and_logs_nothing() {
        let out = Shared::default();
        let log = AccessLog::to_writer(&settings(false, 1.0), out.clone());
        assert!(log.writer.is_none());
        assert!(!log.wants(false));
        assert!(!log.wants(true));
        log.log(request());
        assert_eq!((log.written(), log.dropped()), (0, 0));
        drop(log);
        assert!(crate::lock(&out.0).is_empty());
    }

    #[test]
    fn a_blocked_writer_does_not_block_logging() {
        const TOTAL: u64 = 20_000;
        let gate = Gate::default();
        let log = AccessLog::to_writer(&settings(true, 1.0), gate.clone());
        // On a thread of its own, so that a blocking `log` fails the test instead of hanging it.
        let (done, finished) = mpsc::channel();
        let logger = std::thread::spawn(move || {
            for _ in 0..TOTAL {
                log.log(request());
            }
            let _ = done.send(());
            log
        });
        finished
            .recv_timeout(Duration::from_secs(10))
            .expect("log() blocked on a blocked writer");
        let log = logger.join().unwrap();
        // The queue holds QUEUE_CAPACITY lines and the writer a batch of less than BATCH_BYTES.
        let dropped = log.dropped();
        assert!(
            dropped >= TOTAL - QUEUE_CAPACITY as u64 - BATCH_BYTES as u64 / 100,
            "only {dropped} dropped"
        );
        assert_eq!(log.written(), 0);
        gate.open();
        drop(log);
        let lines = gate.out.lines().len() as u64;
        assert_eq!(lines + dropped, TOTAL);
    }

    #[test]
    fn a_failing_writer_drops_and_counts_lines() {
        let broken = Broken::default();
        let log = AccessLog::to_writer(&settings(true, 1.0), broken.clone());
        for _ in 0..100 {
            log.log(connection());
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while log.dropped() < 100 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!((log.written(), log.dropped()), (0, 100));
        // Lines after the failure are still taken, and counted.
        log.log(connection());
        while log.dropped() < 101 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!((log.written(), log.dropped()), (0, 101));
        // A broken output is not tried again (nor warned about) for every later line.
        assert_eq!(broken.0.load(Relaxed), 1);
    }

    #[test]
    fn an_interrupted_write_is_tried_again() {
        let writer = Interrupted::default();
        let log = AccessLog::to_writer(&settings(true, 1.0), writer.clone());
        for _ in 0..10 {
            log.log(connection());
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while log.written() + log.dropped() < 10 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(writer.failed.load(Relaxed));
        assert_eq!((log.written(), log.dropped()), (10, 0));
        assert_eq!(writer.out.lines().len(), 10);
    }

    #[test]
    fn dropping_the_log_writes_what_is_queued() {
        let gate = Gate::default();
        let log = AccessLog::to_writer(&settings(true, 1.0), gate.clone());
        for _ in 0..5000 {
            log.log(request());
        }
        let opener = {
            let gate = gate.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                gate.open();
            })
        };
        // Waits for the writer, which the gate holds back until after the drop has begun.
        let started = Instant::now();
        drop(log);
        assert!(started.elapsed() < DRAIN_TIMEOUT, "the writer did not exit");
        opener.join().unwrap();
        assert_eq!(gate.out.lines().len(), 5000);
        // The writer thread has ended: it owned the other handle of the gate.
        assert_eq!(Arc::strong_count(&gate.open), 1);
    }

    #[test]
    fn written_counts_lines() {
        let out = Shared::default();
        let log = AccessLog::to_writer(&settings(true, 1.0), out.clone());
        for _ in 0..10 {
            log.log(connection());
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while log.written() < 10 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!((log.written(), log.dropped()), (10, 0));
        assert_eq!(out.lines().len(), 10);
    }
}

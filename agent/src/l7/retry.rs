//! L7 retries: which failures a route retries ([`RetryOn`], [`RetryPolicy::should_retry`]), how
//! long to wait before each retry ([`RetryPolicy::backoff`]), and a per-service retry budget
//! ([`RetryBudget`]) that keeps retries from multiplying the load on a failing upstream.
//!
//! A request is retried when all of these hold: the policy says the outcome is retriable, tries
//! are left (`attempts`), and the service's budget grants a retry. The budget is what protects an
//! overloaded upstream; the backoff only spreads the retries out.
use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

use http::{header::CONTENT_TYPE, HeaderMap, Method, StatusCode};

use crate::lock;

/// Which failures a route retries.
///
/// Each condition name sets exactly one field: unlike Envoy, where "5xx" and "gateway-error" also
/// retry resets and connect failures, here "reset" and "connect-failure" must be listed
/// explicitly, so a policy retries what it names and nothing more.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RetryOn {
    /// "5xx": any 5xx response, and a per-try timeout.
    pub server_errors: bool,
    /// "gateway-error": 502, 503 and 504 responses, and a per-try timeout.
    pub gateway_errors: bool,
    /// "503": 503 responses.
    pub unavailable: bool,
    /// Other numeric names ("502", "409", ...): responses with exactly these statuses.
    pub status_codes: Vec<u16>,
    /// "connect-failure" (alias "refused-stream"): the upstream could not be connected to or
    /// refused the stream, so the request was certainly not sent to the app.
    pub connect_failure: bool,
    /// "reset": the connection was reset or closed after the request was sent and before any
    /// response byte.
    pub reset: bool,
    /// gRPC status codes of gRPC responses: "cancelled" (1), "deadline-exceeded" (4),
    /// "resource-exhausted" (8), "internal" (13), "unavailable" (14).
    pub grpc_codes: Vec<u32>,
}

impl RetryOn {
    /// Parses Envoy/Istio-style condition names. An entry may itself be a comma-separated list
    /// (Istio's `retryOn: "5xx,reset"`); names are case-insensitive and surrounding spaces and
    /// empty entries are ignored. Numbers must be HTTP statuses (100-599): "503" sets
    /// `unavailable`, any other goes to `status_codes`. Fails on the first unknown name.
    pub fn parse(names: &[String]) -> anyhow::Result<Self> {
        let mut on = RetryOn::default();
        for name in names.iter().flat_map(|entry| entry.split(',')) {
            let name = name.trim().to_ascii_lowercase();
            match name.as_str() {
                "" => {}
                "5xx" => on.server_errors = true,
                "gateway-error" => on.gateway_errors = true,
                "503" => on.unavailable = true,
                "connect-failure" | "refused-stream" => on.connect_failure = true,
                "reset" => on.reset = true,
                "cancelled" => push_unique(&mut on.grpc_codes, GRPC_CANCELLED),
                "deadline-exceeded" => push_unique(&mut on.grpc_codes, GRPC_DEADLINE_EXCEEDED),
                "resource-exhausted" => push_unique(&mut on.grpc_codes, GRPC_RESOURCE_EXHAUSTED),
                "internal" => push_unique(&mut on.grpc_codes, GRPC_INTERNAL),
                "unavailable" => push_unique(&mut on.grpc_codes, GRPC_UNAVAILABLE),
                number if !number.is_empty() && number.bytes().all(|b| b.is_ascii_digit()) => {
                    match number.parse::<u16>() {
                        Ok(code @ 100..=599) => push_unique(&mut on.status_codes, code),
                        _ => anyhow::bail!("retry condition {name:?} is not an HTTP status code"),
                    }
                }
                _ => anyhow::bail!("unknown retry condition {name:?}"),
            }
        }
        Ok(on)
    }
}

fn push_unique<T: PartialEq>(list: &mut Vec<T>, item: T) {
    if !list.contains(&item) {
        list.push(item);
    }
}

const GRPC_CANCELLED: u32 = 1;
const GRPC_UNKNOWN: u32 = 2;
const GRPC_DEADLINE_EXCEEDED: u32 = 4;
const GRPC_PERMISSION_DENIED: u32 = 7;
const GRPC_RESOURCE_EXHAUSTED: u32 = 8;
const GRPC_UNIMPLEMENTED: u32 = 12;
const GRPC_INTERNAL: u32 = 13;
const GRPC_UNAVAILABLE: u32 = 14;
const GRPC_UNAUTHENTICATED: u32 = 16;

/// A route's retry policy.
#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    /// Total tries including the first; 1 means no retry.
    pub attempts: u32,
    /// Limit on each try; `None`: only the request's overall deadline applies.
    pub per_try_timeout: Option<Duration>,
    /// Backoff cap before the first retry; doubles with each further retry.
    pub backoff_base: Duration,
    /// Largest backoff cap.
    pub backoff_max: Duration,
    /// Which failures are retried.
    pub on: RetryOn,
    /// Also retry non-idempotent methods (POST, PATCH, ...) after they may have reached the app.
    /// gRPC calls are POSTs, so a policy retrying gRPC status codes needs this.
    pub non_idempotent: bool,
}

impl Default for RetryPolicy {
    /// No retries; backoff 25 ms doubling up to 250 ms (Envoy's defaults) once retries are on.
    fn default() -> Self {
        RetryPolicy {
            attempts: 1,
            per_try_timeout: None,
            backoff_base: Duration::from_millis(25),
            backoff_max: Duration::from_millis(250),
            on: RetryOn::default(),
            non_idempotent: false,
        }
    }
}

/// What one try ended with.
#[derive(Clone, Copy, Debug)]
pub enum Outcome<'a> {
    /// The upstream could not be connected to or refused the stream: the request was certainly
    /// not sent to the app.
    ConnectFailure,
    /// The request was sent, but the connection failed before the response headers.
    ResetBeforeResponse,
    /// The try exceeded the policy's `per_try_timeout`.
    PerTryTimeout,
    /// Response headers arrived (for gRPC, possibly a trailers-only response).
    Response {
        status: StatusCode,
        headers: &'a HeaderMap,
    },
}

/// Response header, value "1", set by an agent on a response it passes on after using up its
/// retries. Another agent seeing it does not retry again: retries nested across hops would
/// multiply (3 attempts at each of 3 hops is 27 tries at the last one).
pub const RETRIES_EXHAUSTED: &str = "x-weft-retries-exhausted";

impl RetryPolicy {
    /// Whether `outcome` of a request with `method` may be retried under this policy, ignoring
    /// the attempts left and the budget. In order:
    /// - a response carrying [`RETRIES_EXHAUSTED`] is never retried;
    /// - a connect failure is retried for any method when `connect_failure` is on, as the request
    ///   never left;
    /// - anything else is retried only for idempotent methods (RFC 9110: GET, HEAD, OPTIONS,
    ///   TRACE, PUT, DELETE) unless `non_idempotent` is set, since the app may have acted on it;
    /// - a reset before the response when `reset` is on;
    /// - a per-try timeout when `server_errors` or `gateway_errors` is on: Envoy answers a
    ///   per-try timeout with a 504, which both classes retry;
    /// - a gRPC response (content type `application/grpc*`) by its gRPC status against
    ///   `grpc_codes`, never by HTTP status class: the `grpc-status` header of a trailers-only
    ///   response, or, without one, the status gRPC clients derive from a non-200 HTTP status.
    ///   A 200 without `grpc-status` carries its status in trailers, too late to retry;
    /// - any other response by its HTTP status against `server_errors`, `gateway_errors`,
    ///   `unavailable` and `status_codes`.
    pub fn should_retry(&self, method: &Method, outcome: &Outcome<'_>) -> bool {
        match outcome {
            Outcome::Response { headers, .. } if headers.contains_key(RETRIES_EXHAUSTED) => false,
            Outcome::ConnectFailure => self.on.connect_failure,
            _ if !self.non_idempotent && !is_idempotent(method) => false,
            Outcome::ResetBeforeResponse => self.on.reset,
            Outcome::PerTryTimeout => self.on.server_errors || self.on.gateway_errors,
            Outcome::Response { status, headers } if is_grpc(headers) => {
                grpc_status(*status, headers).is_some_and(|code| self.on.grpc_codes.contains(&code))
            }
            Outcome::Response { status, .. } => {
                let code = status.as_u16();
                (self.on.server_errors && status.is_server_error())
                    || (self.on.gateway_errors && matches!(code, 502..=504))
                    || (self.on.unavailable && code == 503)
                    || self.on.status_codes.contains(&code)
            }
        }
    }

    /// Delay before retry number `retry` (1 = the first retry): uniform in `[0, cap]` ("full
    /// jitter"), where the cap is `backoff_base × 2^(retry-1)`, at most `backoff_max`.
    ///
    /// Full rather than equal jitter (`[cap/2, cap]`): it spreads the retries of requests that
    /// failed together (one upstream going down fails many at once) over the whole interval, and
    /// it is Envoy's choice too. The short delays it sometimes picks are harmless because the
    /// budget, not the delay, limits the load retries add.
    pub fn backoff(&self, retry: u32) -> Duration {
        let cap = u64::try_from(self.backoff_cap(retry).as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(fastrand::u64(0..=cap))
    }

    fn backoff_cap(&self, retry: u32) -> Duration {
        // 2^31 × any base already exceeds any sensible maximum; the bound keeps the shift valid.
        let doublings = retry.saturating_sub(1).min(31);
        self.backoff_base
            .saturating_mul(1 << doublings)
            .min(self.backoff_max)
    }
}

fn is_idempotent(method: &Method) -> bool {
    [
        Method::GET,
        Method::HEAD,
        Method::OPTIONS,
        Method::TRACE,
        Method::PUT,
        Method::DELETE,
    ]
    .contains(method)
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| {
            value
                .get(.."application/grpc".len())
                .is_some_and(|prefix| prefix.eq_ignore_ascii_case("application/grpc"))
        })
}

/// The gRPC status of a gRPC response's headers, if they tell it.
fn grpc_status(status: StatusCode, headers: &HeaderMap) -> Option<u32> {
    if let Some(value) = headers.get("grpc-status") {
        return value.to_str().ok()?.trim().parse().ok();
    }
    // gRPC's HTTP-to-gRPC status mapping (doc/http-grpc-status-mapping.md), as clients apply it.
    match status.as_u16() {
        200 => None,
        400 => Some(GRPC_INTERNAL),
        401 => Some(GRPC_UNAUTHENTICATED),
        403 => Some(GRPC_PERMISSION_DENIED),
        404 => Some(GRPC_UNIMPLEMENTED),
        429 | 502..=504 => Some(GRPC_UNAVAILABLE),
        _ => Some(GRPC_UNKNOWN),
    }
}

/// Retry budget settings (Linkerd's model).
#[derive(Clone, Debug, PartialEq)]
pub struct BudgetSettings {
    /// Retries allowed per original request in the window.
    pub ratio: f64,
    /// Retries per second allowed regardless of traffic, so low-traffic services can retry.
    pub min_per_second: u32,
    /// How far back requests and retries count.
    pub window: Duration,
}

impl Default for BudgetSettings {
    /// 20% extra load, 10 retries per second, over 10 seconds (Linkerd's defaults).
    fn default() -> Self {
        BudgetSettings {
            ratio: 0.2,
            min_per_second: 10,
            window: Duration::from_secs(10),
        }
    }
}

/// A retry budget shared by all requests to one service: a retry is granted only while retries
/// in the window stay within `ratio × requests in the window + min_per_second × window seconds`.
/// With every try failing, the upstream therefore sees in the long run at most `1 + ratio` times
/// the original request rate, plus `min_per_second`, however many attempts the policy allows.
///
/// The window slides in steps of a tenth: it is made of the last ten buckets of `window / 10`
/// each, the current one included, so traffic expires a bucket at a time. The bound holds at
/// every moment over that window; credit from a burst of requests can still be spent just
/// before the burst expires, as with any sliding window.
#[derive(Debug)]
pub struct RetryBudget {
    ratio: f64,
    floor: f64,
    bucket_nanos: u128,
    state: Mutex<BudgetState>,
}

/// Buckets making up the budget's window.
const BUCKETS: usize = 10;

#[derive(Debug, Default)]
struct BudgetState {
    /// The first `now` seen: bucket numbers count from it.
    origin: Option<Instant>,
    /// The highest bucket number seen.
    latest: u64,
    buckets: [Bucket; BUCKETS],
}

#[derive(Clone, Copy, Debug, Default)]
struct Bucket {
    /// Which bucket number the counts belong to; a slot is reused every `BUCKETS` buckets.
    number: u64,
    requests: u64,
    retries: u64,
}

impl RetryBudget {
    /// A budget with no traffic recorded. A negative or NaN ratio counts as 0.
    pub fn new(settings: BudgetSettings) -> Self {
        RetryBudget {
            ratio: settings.ratio.max(0.0),
            floor: f64::from(settings.min_per_second) * settings.window.as_secs_f64(),
            // At least 1 ns so a zero window still divides time into buckets.
            bucket_nanos: (settings.window.as_nanos() / BUCKETS as u128).max(1),
            state: Mutex::new(BudgetState::default()),
        }
    }

    /// Counts an original (first-try) request.
    pub fn record_request(&self, now: Instant) {
        let mut state = lock(&self.state);
        let bucket = self.current_bucket(&mut state, now);
        bucket.requests += 1;
    }

    /// Takes one retry if the budget allows; false means the retry is suppressed.
    pub fn try_retry(&self, now: Instant) -> bool {
        let mut state = lock(&self.state);
        let current = self.current_bucket(&mut state, now).number;
        let (requests, retries) = state
            .buckets
            .iter()
            // Slots not written for a window or more hold expired buckets.
            .filter(|bucket| current - bucket.number < BUCKETS as u64)
            .fold((0u64, 0u64), |(requests, retries), bucket| {
                (requests + bucket.requests, retries + bucket.retries)
            });
        // No requests: skip the product, as an infinite ratio times 0 is NaN.
        let credit = if requests == 0 {
            0.0
        } else {
            self.ratio * requests as f64
        };
        if (retries + 1) as f64 > credit + self.floor {
            return false;
        }
        state.buckets[(current % BUCKETS as u64) as usize].retries += 1;
        true
    }

    /// The bucket `now` falls in, emptied first if its slot still holds an expired bucket.
    fn current_bucket<'s>(&self, state: &'s mut BudgetState, now: Instant) -> &'s mut Bucket {
        let origin = *state.origin.get_or_insert(now);
        let number = now.saturating_duration_since(origin).as_nanos() / self.bucket_nanos;
        // Callers take `now` before waiting for the lock, so it can be slightly older than a
        // `now` already seen; counting it in the latest bucket never erases newer counts.
        let number = u64::try_from(number).unwrap_or(u64::MAX).max(state.latest);
        state.latest = number;
        let bucket = &mut state.buckets[(number % BUCKETS as u64) as usize];
        if bucket.number != number {
            *bucket = Bucket {
                number,
                ..Bucket::default()
            };
        }
        bucket
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|name| name.to_string()).collect()
    }

    #[test]
    fn parses_every_name() {
        let on = RetryOn::parse(&names(&[
            "5xx",
            "gateway-error",
            "503",
            "connect-failure",
            "reset",
            "502",
            "409",
            "cancelled",
            "deadline-exceeded",
            "resource-exhausted",
            "internal",
            "unavailable",
        ]))
        .unwrap();
        assert_eq!(
            on,
            RetryOn {
                server_errors: true,
                gateway_errors: true,
                unavailable: true,
                status_codes: vec![502, 409],
                connect_failure: true,
                reset: true,
                grpc_codes: vec![1, 4, 8, 13, 14],
            }
        );
    }

    #[test]
    fn parses_lists_aliases_and_case() {
        let on = RetryOn::parse(&names(&[
            " Reset, refused-stream ,",
            "502,502",
            "UNAVAILABLE",
        ]))
        .unwrap();
        assert_eq!(
            on,
            RetryOn {
                reset: true,
                connect_failure: true,
                status_codes: vec![502],
                grpc_codes: vec![14],
                ..RetryOn::default()
            }
        );
        assert_eq!(RetryOn::parse(&[]).unwrap(), RetryOn::default());
    }

    #[test]
    fn rejects_unknown_names() {
        for bad in [
            "5xx-ish",
            "retriable-4xx",
            "99",
            "600",
            "70000",
            "5 03",
            "-503",
        ] {
            let err = RetryOn::parse(&names(&["reset", bad])).unwrap_err();
            assert!(
                err.to_string().contains(&bad.to_ascii_lowercase()),
                "{bad}: {err}"
            );
        }
    }

    fn policy(on: RetryOn, non_idempotent: bool) -> RetryPolicy {
        RetryPolicy {
            attempts: 3,
            on,
            non_idempotent,
            ..RetryPolicy::default()
        }
    }

    fn all_http() -> RetryOn {
        RetryOn {
            server_errors: true,
            connect_failure: true,
            reset: true,
            ..RetryOn::default()
        }
    }

    fn response(status: u16, headers: &HeaderMap) -> Outcome<'_> {
        Outcome::Response {
            status: StatusCode::from_u16(status).unwrap(),
            headers,
        }
    }

    #[test]
    fn idempotency_gates_all_but_connect_failures() {
        let empty = HeaderMap::new();
        let idempotent = ["GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"];
        let other = ["POST", "PATCH", "CONNECT", "PURGE"];
        let after_sending = [
            Outcome::ResetBeforeResponse,
            Outcome::PerTryTimeout,
            response(500, &empty),
        ];
        for non_idempotent in [false, true] {
            let policy = policy(all_http(), non_idempotent);
            for method in idempotent.iter().chain(&other) {
                let method = Method::from_bytes(method.as_bytes()).unwrap();
                assert!(policy.should_retry(&method, &Outcome::ConnectFailure));
                for outcome in &after_sending {
                    let expected = non_idempotent || idempotent.contains(&method.as_str());
                    assert_eq!(
                        policy.should_retry(&method, outcome),
                        expected,
                        "{method} {outcome:?} non_idempotent={non_idempotent}"
                    );
                }
            }
        }
    }

    #[test]
    fn each_flag_retries_only_its_outcomes() {
        let empty = HeaderMap::new();
        let outcomes = [
            ("connect", Outcome::ConnectFailure),
            ("reset", Outcome::ResetBeforeResponse),
            ("timeout", Outcome::PerTryTimeout),
            ("500", response(500, &empty)),
            ("502", response(502, &empty)),
            ("503", response(503, &empty)),
            ("504", response(504, &empty)),
            ("409", response(409, &empty)),
            ("200", response(200, &empty)),
        ];
        let cases: [(&str, &[&str]); 8] = [
            ("", &[]),
            ("5xx", &["timeout", "500", "502", "503", "504"]),
            ("gateway-error", &["timeout", "502", "503", "504"]),
            ("503", &["503"]),
            ("409,504", &["409", "504"]),
            ("connect-failure", &["connect"]),
            ("reset", &["reset"]),
            // gRPC codes never apply to plain HTTP responses.
            ("unavailable,internal", &[]),
        ];
        for (on, retried) in cases {
            let policy = policy(RetryOn::parse(&names(&[on])).unwrap(), false);
            for (name, outcome) in &outcomes {
                assert_eq!(
                    policy.should_retry(&Method::GET, outcome),
                    retried.contains(name),
                    "retry on {on:?}, outcome {name}"
                );
            }
        }
    }

    #[test]
    fn exhausted_responses_are_never_retried() {
        let mut headers = HeaderMap::new();
        headers.insert(RETRIES_EXHAUSTED, HeaderValue::from_static("1"));
        let everything = RetryOn {
            server_errors: true,
            gateway_errors: true,
            unavailable: true,
            status_codes: vec![503],
            grpc_codes: vec![14],
            ..all_http()
        };
        let policy = policy(everything, true);
        assert!(policy.should_retry(&Method::GET, &response(503, &HeaderMap::new())));
        assert!(!policy.should_retry(&Method::GET, &response(503, &headers)));
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        headers.insert("grpc-status", HeaderValue::from_static("14"));
        assert!(!policy.should_retry(&Method::POST, &response(200, &headers)));
    }

    fn grpc_headers(content_type: &str, status: Option<&str>) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_str(content_type).unwrap());
        if let Some(status) = status {
            headers.insert("grpc-status", HeaderValue::from_str(status).unwrap());
        }
        headers
    }

    #[test]
    fn grpc_responses_are_judged_by_grpc_status() {
        let on = RetryOn {
            server_errors: true,
            gateway_errors: true,
            ..RetryOn::parse(&names(&["unavailable", "resource-exhausted"])).unwrap()
        };
        let grpc = policy(on, true);
        let cases = [
            ("application/grpc", Some("14"), 200, true),
            ("application/grpc+proto", Some("8"), 200, true),
            ("Application/GRPC-Web", Some("14"), 200, true),
            ("application/grpc", Some("13"), 200, false),
            ("application/grpc", Some("0"), 200, false),
            // HTTP status classes don't apply to gRPC responses.
            ("application/grpc", Some("13"), 503, false),
            ("application/grpc", Some("junk"), 200, false),
            // Status in trailers: not known from the headers.
            ("application/grpc", None, 200, false),
            // No grpc-status: the status clients derive from the HTTP status.
            ("application/grpc", None, 503, true),
            ("application/grpc", None, 429, true),
            ("application/grpc", None, 500, false),
            ("application/grpc", None, 404, false),
            // Not gRPC: HTTP rules.
            ("application/json", Some("13"), 500, true),
            ("application/json", Some("14"), 200, false),
        ];
        for (content_type, status, http_status, expected) in cases {
            let headers = grpc_headers(content_type, status);
            assert_eq!(
                grpc.should_retry(&Method::POST, &response(http_status, &headers)),
                expected,
                "{content_type} grpc-status {status:?} HTTP {http_status}"
            );
        }
        // gRPC calls are POSTs: without non_idempotent they are not retried after sending.
        let headers = grpc_headers("application/grpc", Some("14"));
        let strict = policy(grpc.on.clone(), false);
        assert!(!strict.should_retry(&Method::POST, &response(200, &headers)));
    }

    #[test]
    fn backoff_caps_grow_and_stop_at_max() {
        let policy = RetryPolicy::default();
        let caps: Vec<u64> = (0..=8)
            .map(|retry| policy.backoff_cap(retry).as_millis() as u64)
            .collect();
        assert_eq!(caps, [25, 25, 50, 100, 200, 250, 250, 250, 250]);
        assert_eq!(
            policy.backoff_cap(u32::MAX),
            Duration::from_millis(250),
            "no overflow"
        );
        let huge = RetryPolicy {
            backoff_base: Duration::MAX,
            backoff_max: Duration::MAX,
            ..RetryPolicy::default()
        };
        assert_eq!(huge.backoff_cap(40), Duration::MAX);
        let _ = huge.backoff(40);
    }

    #[test]
    fn backoff_is_jittered_within_the_cap() {
        fastrand::seed(7);
        let policy = RetryPolicy::default();
        for retry in 1..=6 {
            let cap = policy.backoff_cap(retry);
            let samples: Vec<Duration> = (0..2000).map(|_| policy.backoff(retry)).collect();
            assert!(samples.iter().all(|delay| *delay <= cap), "retry {retry}");
            // Full jitter: the samples cover the whole range, not just its top half.
            assert!(
                samples.iter().any(|delay| *delay < cap / 10),
                "retry {retry}"
            );
            assert!(
                samples.iter().any(|delay| *delay > cap * 9 / 10),
                "retry {retry}"
            );
        }
    }

    fn budget() -> RetryBudget {
        RetryBudget::new(BudgetSettings::default())
    }

    fn retries_granted(budget: &RetryBudget, now: Instant, tries: u32) -> u32 {
        (0..tries).filter(|_| budget.try_retry(now)).count() as u32
    }

    #[test]
    fn budget_allows_ratio_of_requests_plus_floor() {
        let budget = budget();
        let t0 = Instant::now();
        for _ in 0..1000 {
            budget.record_request(t0);
        }
        // 0.2 × 1000 + 10/s × 10 s.
        assert_eq!(
            retries_granted(&budget, t0 + Duration::from_secs(5), 10_000),
            300
        );
        // More requests buy more retries.
        for _ in 0..10 {
            budget.record_request(t0 + Duration::from_secs(6));
        }
        assert_eq!(
            retries_granted(&budget, t0 + Duration::from_secs(6), 100),
            2
        );
    }

    #[test]
    fn budget_floor_alone() {
        let budget = budget();
        let t0 = Instant::now();
        assert_eq!(retries_granted(&budget, t0, 1000), 100);
        let budget = RetryBudget::new(BudgetSettings {
            min_per_second: 0,
            ..BudgetSettings::default()
        });
        assert_eq!(retries_granted(&budget, t0, 10), 0);
    }

    #[test]
    fn budget_traffic_expires_after_the_window() {
        let budget = budget();
        let t0 = Instant::now();
        for _ in 0..1000 {
            budget.record_request(t0);
        }
        assert_eq!(retries_granted(&budget, t0, 10_000), 300);
        // Still within the window (the last bucket of it): nothing left.
        let late = t0 + Duration::from_millis(9_999);
        assert_eq!(retries_granted(&budget, late, 10), 0);
        // The requests and retries have expired: the floor alone again, including when the
        // expired bucket's slot has not been reused yet.
        let after = t0 + Duration::from_secs(15);
        assert_eq!(retries_granted(&budget, after, 10_000), 100);
        // Those retries count for a window in turn.
        let late = t0 + Duration::from_millis(24_999);
        assert_eq!(retries_granted(&budget, late, 10), 0);
        let after = t0 + Duration::from_secs(25);
        assert_eq!(retries_granted(&budget, after, 10_000), 100);
        // Much later, with slots reused many times over.
        let later = t0 + Duration::from_secs(3605);
        assert_eq!(retries_granted(&budget, later, 10_000), 100);
    }

    #[test]
    fn budget_expires_a_bucket_at_a_time() {
        let budget = budget();
        let t0 = Instant::now();
        for second in 0..10 {
            for _ in 0..100 {
                budget.record_request(t0 + Duration::from_secs(second));
            }
        }
        // Requests from seconds 1-9 are in the window at 10.5 s: 0.2 × 900 + 100.
        let now = t0 + Duration::from_millis(10_500);
        assert_eq!(retries_granted(&budget, now, 10_000), 280);
    }

    #[test]
    fn budget_ignores_stale_now() {
        let budget = budget();
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_secs(30);
        budget.record_request(t0);
        for _ in 0..1000 {
            budget.record_request(t1);
        }
        // An earlier `now` lands in the latest bucket rather than clearing it.
        budget.record_request(t0 + Duration::from_secs(20));
        assert_eq!(retries_granted(&budget, t1, 10_000), 300);
    }

    /// 100 requests per second to an upstream failing every try, 5 attempts each: over every
    /// window the budget measures, retries stay within 0.2 × requests + floor, and in the long
    /// run the upstream sees about 1.2 × the requests plus 10 retries per second.
    #[test]
    fn budget_bounds_a_failing_upstream() {
        let settings = BudgetSettings::default();
        let budget = RetryBudget::new(settings.clone());
        let t0 = Instant::now();
        let step = Duration::from_millis(10);
        let seconds = 60;
        // Per second, the length of the budget's buckets.
        let mut requests = vec![0u64; seconds];
        let mut retries = vec![0u64; seconds];
        for i in 0..(seconds as u32 * 100) {
            let now = t0 + step * i;
            let bucket = (i / 100) as usize;
            budget.record_request(now);
            requests[bucket] += 1;
            for _ in 1..5 {
                if !budget.try_retry(now) {
                    break;
                }
                retries[bucket] += 1;
            }
        }
        let floor = f64::from(settings.min_per_second) * settings.window.as_secs_f64();
        for end in BUCKETS..=requests.len() {
            let window = end - BUCKETS..end;
            let requests: u64 = requests[window.clone()].iter().sum();
            let retries: u64 = retries[window].iter().sum();
            assert!(
                retries as f64 <= settings.ratio * requests as f64 + floor,
                "window ending at bucket {end}: {retries} retries for {requests} requests"
            );
        }
        let total_requests: u64 = requests.iter().sum();
        let total_retries: u64 = retries.iter().sum();
        let bound = settings.ratio * total_requests as f64 + 10.0 * seconds as f64;
        assert!(total_retries as f64 <= bound, "{total_retries} > {bound}");
        assert!(
            total_retries as f64 >= 0.9 * bound,
            "{total_retries} ≪ {bound}"
        );
    }

    #[test]
    fn budget_is_shareable() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<RetryBudget>();
        let budget = std::sync::Arc::new(budget());
        let t0 = Instant::now();
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let budget = budget.clone();
                std::thread::spawn(move || {
                    for _ in 0..250 {
                        budget.record_request(t0);
                    }
                    retries_granted(&budget, t0, 1000)
                })
            })
            .collect();
        let granted: u32 = threads.into_iter().map(|t| t.join().unwrap()).sum();
        // Requests and retries interleave across threads, so early retries see less credit.
        assert!((100..=300).contains(&granted), "{granted}");
    }
}

//! Deadline propagation. A request's deadline travels in two forms:
//! - [`DEADLINE_HEADER`], an absolute time that apps forward from the requests they receive to
//!   the requests they make, like trace headers, so every hop of a call chain shares one deadline;
//! - gRPC's `grpc-timeout`, relative to when the request is sent, rewritten at every hop.
//!
//! An absolute deadline assumes the nodes' clocks agree (NTP): a node whose clock is ahead by
//! some skew sees the budget shortened by that skew, one behind sees it lengthened.
use std::{
    fmt,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use http::{HeaderMap, HeaderValue};

/// Request header holding the absolute deadline: Unix time in milliseconds, a decimal integer.
pub const DEADLINE_HEADER: &str = "x-weft-deadline";

const GRPC_TIMEOUT: &str = "grpc-timeout";

/// Largest value `grpc-timeout` can carry: the spec allows at most 8 digits.
const GRPC_TIMEOUT_MAX_VALUE: u128 = 99_999_999;

/// gRPC timeout units, finest first, with their length in nanoseconds.
const GRPC_UNITS: [(char, u128); 6] = [
    ('n', 1),
    ('u', 1_000),
    ('m', 1_000_000),
    ('S', 1_000_000_000),
    ('M', 60_000_000_000),
    ('H', 3_600_000_000_000),
];

/// Why a request's deadline could not be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeadlineError {
    /// [`DEADLINE_HEADER`] is not a decimal integer of milliseconds in range: answer 400.
    InvalidDeadline,
    /// `grpc-timeout` does not follow the gRPC wire format. gRPC servers reject such a call
    /// (grpc-go fails it with INTERNAL), so the caller answers it with a gRPC error rather than
    /// forwarding a call the app would refuse; clients see HTTP 400 as INTERNAL too.
    InvalidGrpcTimeout,
}

impl fmt::Display for DeadlineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeadlineError::InvalidDeadline => write!(f, "malformed {DEADLINE_HEADER} header"),
            DeadlineError::InvalidGrpcTimeout => write!(f, "malformed {GRPC_TIMEOUT} header"),
        }
    }
}

impl std::error::Error for DeadlineError {}

/// The earliest deadline `headers` carry: [`DEADLINE_HEADER`] (absolute) and `grpc-timeout`
/// (relative to `now`). Either may have several values (several field lines, or comma-separated
/// for [`DEADLINE_HEADER`]); the earliest counts. `Ok(None)` when there is neither, or when the
/// only one lies beyond what `SystemTime` can hold.
pub fn request_deadline(
    headers: &HeaderMap,
    now: SystemTime,
) -> Result<Option<SystemTime>, DeadlineError> {
    let mut earliest: Option<SystemTime> = None;
    let mut consider = |deadline: SystemTime| {
        earliest = Some(earliest.map_or(deadline, |current| current.min(deadline)));
    };
    for value in headers.get_all(DEADLINE_HEADER) {
        let value = value.to_str().map_err(|_| DeadlineError::InvalidDeadline)?;
        for element in value.split(',') {
            consider(parse_unix_millis(element.trim_matches([' ', '\t']))?);
        }
    }
    for value in headers.get_all(GRPC_TIMEOUT) {
        let timeout = value
            .to_str()
            .ok()
            .and_then(parse_grpc_timeout)
            .ok_or(DeadlineError::InvalidGrpcTimeout)?;
        // Up to 99,999,999 hours can exceed what SystemTime holds: no deadline in practice.
        if let Some(deadline) = now.checked_add(timeout) {
            consider(deadline);
        }
    }
    Ok(earliest)
}

fn parse_unix_millis(value: &str) -> Result<SystemTime, DeadlineError> {
    // Digits only: `u64::from_str` would also take a leading '+'.
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(DeadlineError::InvalidDeadline);
    }
    let millis: u64 = value.parse().map_err(|_| DeadlineError::InvalidDeadline)?;
    UNIX_EPOCH
        .checked_add(Duration::from_millis(millis))
        .ok_or(DeadlineError::InvalidDeadline)
}

/// Writes `deadline` into a request's headers: sets [`DEADLINE_HEADER`] (milliseconds rounded
/// down, so a hop never sees a later deadline), and if the request has `grpc-timeout` (a gRPC
/// call), rewrites it to the time left from `now`, rounded up to the unit chosen. The caller
/// fails requests whose deadline has passed before sending them; a passed deadline still
/// written here gives the smallest timeout gRPC can express (1 ns), which expires at once.
pub fn set_deadline(headers: &mut HeaderMap, deadline: SystemTime, now: SystemTime) {
    let millis = deadline.duration_since(UNIX_EPOCH).map_or(0, |since| {
        u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
    });
    headers.insert(DEADLINE_HEADER, HeaderValue::from(millis));
    if headers.contains_key(GRPC_TIMEOUT) {
        let remaining = deadline.duration_since(now).unwrap_or(Duration::ZERO);
        let value = format_grpc_timeout(remaining);
        // Digits and a unit letter always make a valid value; were it not, the shortest timeout
        // errs on the safe side.
        let value = HeaderValue::from_str(&value).unwrap_or(HeaderValue::from_static("1n"));
        headers.insert(GRPC_TIMEOUT, value);
    }
}

/// Parses a `grpc-timeout` value: 1 to 8 ASCII digits followed by a unit, `H` (hours), `M`
/// (minutes), `S` (seconds), `m` (milliseconds), `u` (microseconds) or `n` (nanoseconds). The
/// spec asks for a positive value; 0 is accepted as an already expired timeout.
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let unit = value.chars().last()?;
    let digits = &value[..value.len() - unit.len_utf8()];
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (_, unit_nanos) = GRPC_UNITS.iter().find(|(name, _)| *name == unit)?;
    let nanos = digits.parse::<u128>().ok()? * unit_nanos;
    // At most 99,999,999 hours: about 3.6e20 ns, within a Duration's u64 seconds.
    Some(Duration::new(
        u64::try_from(nanos / 1_000_000_000).ok()?,
        (nanos % 1_000_000_000) as u32,
    ))
}

/// Formats a `grpc-timeout` value: the finest unit whose count fits in 8 digits, rounded up so a
/// little time left never becomes an expired timeout. The excess is at most one unit, under a
/// hundred-thousandth of `timeout` since a coarser unit is only chosen once the count passes 8
/// digits. Beyond 99,999,999 hours it is capped there; zero becomes 1 ns, the spec requiring a
/// positive value.
pub fn format_grpc_timeout(timeout: Duration) -> String {
    let nanos = timeout.as_nanos().max(1);
    for (unit, unit_nanos) in GRPC_UNITS {
        let count = nanos.div_ceil(unit_nanos);
        if count <= GRPC_TIMEOUT_MAX_VALUE {
            return format!("{count}{unit}");
        }
    }
    format!("{GRPC_TIMEOUT_MAX_VALUE}H")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        headers
    }

    fn at_millis(millis: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(millis)
    }

    const NOW_MS: u64 = 1_700_000_000_000;

    #[test]
    fn no_deadline() {
        let now = at_millis(NOW_MS);
        assert_eq!(request_deadline(&HeaderMap::new(), now), Ok(None));
        let unrelated = headers(&[("x-request-id", "1700000000500")]);
        assert_eq!(request_deadline(&unrelated, now), Ok(None));
    }

    #[test]
    fn parses_the_deadline_header() {
        let now = at_millis(NOW_MS);
        let h = headers(&[(DEADLINE_HEADER, "1700000000123")]);
        assert_eq!(
            request_deadline(&h, now),
            Ok(Some(at_millis(1_700_000_000_123)))
        );
        // A deadline already passed is still returned: the caller decides what to do.
        let h = headers(&[(DEADLINE_HEADER, "5")]);
        assert_eq!(request_deadline(&h, now), Ok(Some(at_millis(5))));
        // Several values, as field lines or a list: the earliest.
        let h = headers(&[
            (DEADLINE_HEADER, "1700000009000, 1700000003000"),
            (DEADLINE_HEADER, "1700000005000"),
        ]);
        assert_eq!(
            request_deadline(&h, now),
            Ok(Some(at_millis(1_700_000_003_000)))
        );
    }

    #[test]
    fn rejects_malformed_deadline_headers() {
        let now = at_millis(NOW_MS);
        for bad in [
            "",
            " ",
            "abc",
            "-5",
            "+5",
            "1.5",
            "1e12",
            "0x10",
            "1700000000000ms",
            "1700000000000,",
            "18446744073709551616",
        ] {
            let h = headers(&[(DEADLINE_HEADER, bad)]);
            assert_eq!(
                request_deadline(&h, now),
                Err(DeadlineError::InvalidDeadline),
                "{bad:?}"
            );
        }
        let mut h = HeaderMap::new();
        h.insert(DEADLINE_HEADER, HeaderValue::from_bytes(b"17\xff").unwrap());
        assert_eq!(
            request_deadline(&h, now),
            Err(DeadlineError::InvalidDeadline)
        );
        // One bad value spoils the request even next to a good one.
        let h = headers(&[(DEADLINE_HEADER, "1700000000000"), (DEADLINE_HEADER, "x")]);
        assert_eq!(
            request_deadline(&h, now),
            Err(DeadlineError::InvalidDeadline)
        );
    }

    #[test]
    fn parses_every_grpc_unit() {
        let cases = [
            ("2H", Duration::from_secs(7200)),
            ("3M", Duration::from_secs(180)),
            ("4S", Duration::from_secs(4)),
            ("5m", Duration::from_millis(5)),
            ("6u", Duration::from_micros(6)),
            ("7n", Duration::from_nanos(7)),
            ("0m", Duration::ZERO),
            ("00000012S", Duration::from_secs(12)),
            ("99999999n", Duration::from_nanos(99_999_999)),
            ("99999999H", Duration::from_secs(99_999_999 * 3600)),
        ];
        for (value, expected) in cases {
            assert_eq!(parse_grpc_timeout(value), Some(expected), "{value}");
        }
        let now = at_millis(NOW_MS);
        for (value, expected) in cases {
            let h = headers(&[(GRPC_TIMEOUT, value)]);
            assert_eq!(
                request_deadline(&h, now),
                Ok(Some(now + expected)),
                "{value}"
            );
        }
    }

    #[test]
    fn rejects_malformed_grpc_timeouts() {
        for bad in [
            "",
            "S",
            "1",
            "12",
            "123456789S",
            "1s",
            "1h",
            "1x",
            "-1S",
            "+1S",
            " 1S",
            "1S ",
            "1 S",
            "1.5S",
            "1SS",
            "1é",
            "é",
        ] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
        let now = at_millis(NOW_MS);
        let h = headers(&[(GRPC_TIMEOUT, "10x")]);
        assert_eq!(
            request_deadline(&h, now),
            Err(DeadlineError::InvalidGrpcTimeout)
        );
        let h = headers(&[(DEADLINE_HEADER, "1700000000123"), (GRPC_TIMEOUT, "1s")]);
        assert_eq!(
            request_deadline(&h, now),
            Err(DeadlineError::InvalidGrpcTimeout)
        );
    }

    #[test]
    fn takes_the_earlier_of_both() {
        let now = at_millis(NOW_MS);
        let h = headers(&[(DEADLINE_HEADER, "1700000002000"), (GRPC_TIMEOUT, "3S")]);
        assert_eq!(
            request_deadline(&h, now),
            Ok(Some(at_millis(NOW_MS + 2000)))
        );
        let h = headers(&[(DEADLINE_HEADER, "1700000002000"), (GRPC_TIMEOUT, "1500m")]);
        assert_eq!(
            request_deadline(&h, now),
            Ok(Some(at_millis(NOW_MS + 1500)))
        );
        // A timeout SystemTime cannot hold leaves the header's deadline.
        let far = UNIX_EPOCH + Duration::from_secs(i64::MAX as u64 - 3600);
        let h = headers(&[
            (DEADLINE_HEADER, "1700000002000"),
            (GRPC_TIMEOUT, "99999999H"),
        ]);
        assert_eq!(
            request_deadline(&h, far),
            Ok(Some(at_millis(NOW_MS + 2000)))
        );
    }

    #[test]
    fn set_deadline_round_trips() {
        let now = at_millis(NOW_MS);
        let deadline = now + Duration::from_millis(1234);
        let mut h = headers(&[(GRPC_TIMEOUT, "10S"), (DEADLINE_HEADER, "1")]);
        set_deadline(&mut h, deadline, now);
        assert_eq!(h.get_all(DEADLINE_HEADER).iter().count(), 1);
        assert_eq!(h[DEADLINE_HEADER], "1700000001234");
        assert_eq!(h[GRPC_TIMEOUT], "1234000u");
        assert_eq!(request_deadline(&h, now), Ok(Some(deadline)));

        // Not a gRPC request: no grpc-timeout is added.
        let mut h = HeaderMap::new();
        set_deadline(&mut h, deadline, now);
        assert!(!h.contains_key(GRPC_TIMEOUT));
        assert_eq!(request_deadline(&h, now), Ok(Some(deadline)));
    }

    #[test]
    fn set_deadline_rounds_towards_the_earlier() {
        let now = at_millis(NOW_MS) + Duration::from_nanos(300);
        let deadline = at_millis(NOW_MS + 1000) + Duration::from_nanos(999_999);
        let mut h = headers(&[(GRPC_TIMEOUT, "1H")]);
        set_deadline(&mut h, deadline, now);
        assert_eq!(h[DEADLINE_HEADER], "1700000001000");
        let from_timeout = now + parse_grpc_timeout(h[GRPC_TIMEOUT].to_str().unwrap()).unwrap();
        assert!(from_timeout >= deadline);
        assert!(from_timeout.duration_since(deadline).unwrap() < Duration::from_micros(1));
        let read = request_deadline(&h, now).unwrap().unwrap();
        assert!(deadline.duration_since(read).unwrap() < Duration::from_millis(1));
    }

    #[test]
    fn set_deadline_in_the_past() {
        let now = at_millis(NOW_MS);
        let mut h = headers(&[(GRPC_TIMEOUT, "1S")]);
        set_deadline(&mut h, now - Duration::from_secs(1), now);
        assert_eq!(h[GRPC_TIMEOUT], "1n");
        assert_eq!(h[DEADLINE_HEADER], "1699999999000");
        set_deadline(&mut h, UNIX_EPOCH - Duration::from_secs(1), now);
        assert_eq!(h[DEADLINE_HEADER], "0");
    }

    #[test]
    fn formats_with_the_finest_unit_that_fits() {
        let cases = [
            (Duration::ZERO, "1n"),
            (Duration::from_nanos(1), "1n"),
            (Duration::from_nanos(99_999_999), "99999999n"),
            (Duration::from_nanos(100_000_000), "100000u"),
            (Duration::from_nanos(100_000_001), "100001u"),
            (Duration::from_secs(1), "1000000u"),
            (Duration::from_secs(3600), "3600000m"),
            (Duration::from_millis(99_999_999), "99999999m"),
            (Duration::from_secs(100_000), "100000S"),
            (Duration::from_secs(99_999_999 * 60), "99999999M"),
            (Duration::from_secs(99_999_999 * 60 + 1), "1666667H"),
            (Duration::from_secs(99_999_999 * 3600), "99999999H"),
            (Duration::MAX, "99999999H"),
        ];
        for (timeout, expected) in cases {
            assert_eq!(format_grpc_timeout(timeout), expected, "{timeout:?}");
        }
    }

    #[test]
    fn formatted_timeouts_parse_back_slightly_longer() {
        let mut timeout = Duration::from_nanos(1);
        while timeout < Duration::from_secs(99_999_999 * 3600) {
            let formatted = format_grpc_timeout(timeout);
            assert!(formatted.len() <= 9, "{formatted}");
            let parsed = parse_grpc_timeout(&formatted).unwrap();
            assert!(parsed >= timeout, "{timeout:?} -> {formatted}");
            // A coarser unit is only chosen once the count reaches 100,000 (units are at most
            // 1000 times apart), so rounding adds at most a hundred-thousandth.
            assert!(
                (parsed - timeout).as_secs_f64() <= timeout.as_secs_f64() * 1e-5 + 1e-9,
                "{timeout:?} -> {formatted}"
            );
            timeout = timeout * 3 + Duration::from_nanos(7);
        }
    }
}

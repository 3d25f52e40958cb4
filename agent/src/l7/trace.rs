//! W3C trace context, and what it lets the agent stop: retries multiplying hop by hop.
//!
//! Requests without a `traceparent` get one, so the hops of one request share a trace id as
//! apps forward it. When this agent gives up on a request (its retries exhausted or refused by
//! the budget, or the failure came marked from further down), the trace id is remembered for a
//! while; the failing response that the pod which made that request then sends back to its own
//! caller is marked as exhausted on its way out through this agent, so the caller's agent does
//! not retry it again. Retries then happen at the hop nearest the failure only.
use std::{
    collections::HashSet,
    sync::Mutex,
    time::{Duration, Instant},
};

use http::{HeaderMap, HeaderValue};

use crate::lock;

pub const TRACEPARENT: &str = "traceparent";
/// How long a trace stays marked: far longer than an app takes to turn its callee's failure
/// into its own answer.
const EXHAUSTED_TTL: Duration = Duration::from_secs(10);
/// Traces remembered per generation at most; past it a generation ends early, bounding memory.
const MAX_TRACES_PER_GENERATION: usize = 100_000;

/// The trace id of a valid `traceparent` (version 00 layout), if any.
pub fn trace_id(headers: &HeaderMap) -> Option<u128> {
    let value = headers.get(TRACEPARENT)?.to_str().ok()?;
    let mut fields = value.split('-');
    let (version, trace, parent, flags) = (
        fields.next()?,
        fields.next()?,
        fields.next()?,
        fields.next()?,
    );
    let hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    };
    if !hex(version, 2) || version == "ff" || !hex(parent, 16) || !hex(flags, 2) || !hex(trace, 32)
    {
        return None;
    }
    // Version 00 has exactly four fields; later versions may append more.
    if version == "00" && fields.next().is_some() {
        return None;
    }
    let id = u128::from_str_radix(trace, 16).ok()?;
    let parent = u64::from_str_radix(parent, 16).ok()?;
    (id != 0 && parent != 0).then_some(id)
}

/// The request's trace id, starting a trace (unsampled: nothing records spans yet) when the
/// request has no valid `traceparent`.
pub fn ensure_trace(headers: &mut HeaderMap) -> u128 {
    if let Some(id) = trace_id(headers) {
        return id;
    }
    let id = fastrand::u128(1..);
    let parent = fastrand::u64(1..);
    let value = format!("00-{id:032x}-{parent:016x}-00");
    if let Ok(value) = HeaderValue::from_str(&value) {
        headers.insert(TRACEPARENT, value);
    }
    id
}

/// Traces this agent gave up retrying, remembered for [`EXHAUSTED_TTL`] to 2× that.
pub struct ExhaustedTraces {
    generations: Mutex<Generations>,
}

struct Generations {
    current: HashSet<u128>,
    previous: HashSet<u128>,
    started: Instant,
}

impl Default for ExhaustedTraces {
    fn default() -> Self {
        Self {
            generations: Mutex::new(Generations {
                current: HashSet::new(),
                previous: HashSet::new(),
                started: Instant::now(),
            }),
        }
    }
}

impl ExhaustedTraces {
    pub fn record(&self, trace: u128, now: Instant) {
        let mut generations = lock(&self.generations);
        generations.rotate(now);
        if generations.current.len() >= MAX_TRACES_PER_GENERATION {
            generations.shift(now);
        }
        generations.current.insert(trace);
    }

    pub fn contains(&self, trace: u128, now: Instant) -> bool {
        let mut generations = lock(&self.generations);
        generations.rotate(now);
        generations.current.contains(&trace) || generations.previous.contains(&trace)
    }
}

impl Generations {
    fn rotate(&mut self, now: Instant) {
        let age = now.saturating_duration_since(self.started);
        if age >= EXHAUSTED_TTL * 2 {
            self.previous.clear();
            self.current.clear();
            self.started = now;
        } else if age >= EXHAUSTED_TTL {
            self.shift(now);
        }
    }

    fn shift(&mut self, now: Instant) {
        self.previous = std::mem::take(&mut self.current);
        self.started = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(traceparent: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(TRACEPARENT, traceparent.parse().unwrap());
        headers
    }

    #[test]
    fn valid_traceparents_are_kept_and_invalid_ones_replaced() {
        let valid = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let mut kept = headers(valid);
        assert_eq!(ensure_trace(&mut kept), 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert_eq!(kept[TRACEPARENT], valid);
        for invalid in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "garbage",
        ] {
            let mut replaced = headers(invalid);
            let id = ensure_trace(&mut replaced);
            let value = replaced[TRACEPARENT].to_str().unwrap().to_owned();
            assert_ne!(value, invalid);
            assert_eq!(trace_id(&replaced), Some(id), "{value}");
        }
        let mut started = HeaderMap::new();
        let id = ensure_trace(&mut started);
        assert_eq!(trace_id(&started), Some(id));
        assert!(started[TRACEPARENT].to_str().unwrap().ends_with("-00"));
        // A future version may carry more fields.
        let future = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-more";
        assert!(trace_id(&headers(future)).is_some());
    }

    #[test]
    fn exhausted_traces_are_remembered_for_a_while_only() {
        let traces = ExhaustedTraces::default();
        let start = Instant::now();
        traces.record(7, start);
        assert!(traces.contains(7, start + Duration::from_secs(1)));
        assert!(!traces.contains(8, start + Duration::from_secs(1)));
        assert!(traces.contains(7, start + EXHAUSTED_TTL + Duration::from_secs(1)));
        assert!(!traces.contains(7, start + EXHAUSTED_TTL * 3));
    }

    #[test]
    fn memory_stays_bounded() {
        let traces = ExhaustedTraces::default();
        let now = Instant::now();
        for id in 0..(MAX_TRACES_PER_GENERATION as u128 * 3) {
            traces.record(id, now);
        }
        let generations = lock(&traces.generations);
        assert!(
            generations.current.len() + generations.previous.len() <= 2 * MAX_TRACES_PER_GENERATION
        );
        // The latest are still known.
        assert!(generations
            .current
            .contains(&(MAX_TRACES_PER_GENERATION as u128 * 3 - 1)));
    }
}

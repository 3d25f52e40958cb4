//! Endpoint selection for a service's L7 traffic (HTTP requests and opaque TCP connections):
//! power of two choices (P2C) over a peak-EWMA latency estimate, with outlier ejection.
//!
//! A pick draws two eligible endpoints at random and takes the cheaper, where cost is the latency
//! estimate times one more than the endpoint's requests in flight. Comparing two random endpoints
//! rather than taking the cheapest of all keeps concurrent picks from all landing on the same
//! endpoint before its in-flight count catches up.
//!
//! An endpoint failing `consecutive_failures` times in a row is ejected for an exponentially
//! growing, jittered time. When that time is up it gets a single probe request: success puts it
//! back in rotation, failure ejects it again for longer. When no endpoint is eligible,
//! `fail_open` decides between using the ejected ones anyway and refusing.
//!
//! One mutex guards a service's endpoints: a pick scans them (without allocating) and claims its
//! endpoint in the same critical section, so "one probe at a time" needs no re-check. A [`Pick`]
//! holds no lock while the request runs; it locks again, briefly, to report.
use std::{
    collections::{HashMap, HashSet},
    error::Error,
    fmt,
    net::SocketAddrV4,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tracing::{info, warn};

use crate::lock;

/// Time constant of the latency estimate. A sample below the estimate moves it by
/// `1 - exp(-elapsed / DECAY)`, so an endpoint that got faster is believed within tens of seconds
/// whatever its request rate. Between responses the estimate used for picking also decays, toward
/// zero, so an endpoint left unpicked after a slow spike is eventually tried again.
const DECAY: Duration = Duration::from_secs(10);

/// Estimate of an endpoint that has not answered yet when no other endpoint has an estimate to
/// borrow (a new balancer). Every endpoint then starts equal, so until the first responses only
/// in-flight counts tell them apart, and the first response replaces it whatever its value.
const DEFAULT_RTT: Duration = Duration::from_millis(1);

// Failures leave the latency estimate alone. Counted at their own latency, fast failures
// (refused, reset, an immediate 503) would make a failing endpoint look like the fastest and
// draw traffic; counted as slow, P2C would stop picking it after one failure, so the consecutive
// failures that eject it would come only as the estimate decays (tens of seconds) and a dead
// endpoint would be neither ejected nor probed back in promptly. Ejection handles failures;
// the estimate follows answers.

/// Floor of the estimate: keeps in-flight counts meaningful (a zero estimate would make every
/// cost zero) after zero-latency samples or a long idle decay.
const MIN_ESTIMATE: Duration = Duration::from_micros(1);

/// Ceiling of the estimate: keeps repeated failure penalties finite, and the recovery from them
/// (about `DECAY × ln(MAX_ESTIMATE / real latency)`) bounded.
const MAX_ESTIMATE: Duration = Duration::from_secs(10);

/// An ejection lasts its backoff shortened by a random fraction of up to this, so the endpoints
/// ejected together (by one upstream outage) are not all probed at the same instant.
const EJECTION_JITTER: f64 = 0.25;

/// Outlier ejection (circuit breaking) settings.
#[derive(Clone, Debug, PartialEq)]
pub struct OutlierSettings {
    /// Consecutive failures that eject an endpoint; 0 disables ejection.
    pub consecutive_failures: u32,
    /// Length of a first ejection; each further one doubles it, up to `max_ejection`.
    pub base_ejection: Duration,
    /// Longest ejection. An endpoint that stays healthy this long after its last ejection starts
    /// over from `base_ejection`.
    pub max_ejection: Duration,
    /// When every endpoint is ejected: true = pick among them anyway (fail open), false = refuse
    /// (caller answers 503).
    pub fail_open: bool,
}

impl Default for OutlierSettings {
    fn default() -> Self {
        OutlierSettings {
            consecutive_failures: 5,
            base_ejection: Duration::from_secs(1),
            max_ejection: Duration::from_secs(60),
            fail_open: true,
        }
    }
}

/// Why [`Balancer::pick`] found no endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoEndpoint {
    /// The service has no endpoints.
    Empty,
    /// Every endpoint is ejected (or has its probe in flight) and `fail_open` is off.
    AllEjected,
}

impl fmt::Display for NoEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NoEndpoint::Empty => "the service has no endpoints",
            NoEndpoint::AllEjected => "every endpoint of the service is ejected",
        })
    }
}

impl Error for NoEndpoint {}

/// A snapshot of one endpoint, for the admin endpoint and metrics.
#[derive(Clone, Debug, PartialEq)]
pub struct EndpointView {
    /// The endpoint's address.
    pub addr: SocketAddrV4,
    /// Latency estimate as of the endpoint's last response (picks also decay it with idle time).
    pub ewma_latency: Duration,
    /// Picks not yet reported or dropped.
    pub in_flight: u32,
    /// Set while the endpoint is ejected. A past instant means the ejection is over and the
    /// endpoint awaits the outcome of a probe (or a pick to become one).
    pub ejected_until: Option<Instant>,
    /// Times this endpoint was ejected.
    pub ejections: u64,
    /// Failures in a row since its last success (reset on ejection).
    pub consecutive_failures: u32,
}

/// Chooses endpoints for one service. Shared by every task proxying to the service.
pub struct Balancer {
    state: Arc<Mutex<State>>,
}

impl Balancer {
    /// A balancer over `endpoints` (duplicates are ignored), none of them measured or ejected.
    pub fn new(endpoints: Vec<SocketAddrV4>, settings: OutlierSettings) -> Self {
        let mut state = State {
            settings,
            endpoints: Vec::new(),
            next_id: 0,
            ejections_total: 0,
        };
        state.set_endpoints(endpoints);
        Balancer {
            state: Arc::new(Mutex::new(state)),
        }
    }

    /// Replace the endpoint set (config reload / discovery); endpoints present before and after
    /// keep their latency estimate, in-flight count and ejection state. A new endpoint starts
    /// with the median estimate of the kept ones: a default could make it look much faster than
    /// them, drawing a burst of requests before its first response, or much slower, starving it.
    /// Picks of removed endpoints still report, to no effect. Settings apply at once, also to
    /// the outcomes of picks in flight; turning ejection off reinstates the ejected endpoints.
    pub fn update(&self, endpoints: Vec<SocketAddrV4>, settings: OutlierSettings) {
        let mut state = lock(&self.state);
        state.set_endpoints(endpoints);
        if settings.consecutive_failures == 0 {
            for endpoint in &mut state.endpoints {
                endpoint.reinstate();
            }
        }
        state.settings = settings;
    }

    /// Choose an endpoint, avoiding those in `avoid` when any other eligible one exists (retries
    /// go elsewhere). Eligible: healthy, or ejected with the ejection over and no probe in
    /// flight, in which case the pick is its probe. When no endpoint is eligible, `fail_open`
    /// picks among all of them by cost (still avoiding `avoid` if possible), none as a probe.
    pub fn pick(&self, avoid: &[SocketAddrV4], now: Instant) -> Result<Pick, NoEndpoint> {
        let mut guard = lock(&self.state);
        let state = &mut *guard;
        let endpoints = &state.endpoints;
        if endpoints.is_empty() {
            return Err(NoEndpoint::Empty);
        }
        let wanted = |endpoint: &Endpoint| !avoid.contains(&endpoint.addr);
        let slot = p2c(endpoints, now, |e| e.eligible(now) && wanted(e))
            .or_else(|| p2c(endpoints, now, |e| e.eligible(now)))
            .or_else(|| {
                if !state.settings.fail_open {
                    return None;
                }
                p2c(endpoints, now, wanted).or_else(|| p2c(endpoints, now, |_| true))
            })
            .ok_or(NoEndpoint::AllEjected)?;
        let endpoint = &mut state.endpoints[slot];
        let probe = endpoint.claim(now);
        Ok(Pick {
            state: Arc::clone(&self.state),
            addr: endpoint.addr,
            id: endpoint.id,
            slot,
            epoch: endpoint.epoch,
            probe,
            done: false,
        })
    }

    /// A snapshot of every endpoint, in the order of the last update.
    pub fn endpoints(&self) -> Vec<EndpointView> {
        lock(&self.state)
            .endpoints
            .iter()
            .map(Endpoint::view)
            .collect()
    }

    /// Ejections since the balancer was created, including those of since-removed endpoints.
    pub fn ejections_total(&self) -> u64 {
        lock(&self.state).ejections_total
    }
}

/// An in-flight use of an endpoint; reports its outcome once. Dropping it unreported counts as
/// neither success nor failure (a cancelled request) but releases the in-flight slot.
pub struct Pick {
    state: Arc<Mutex<State>>,
    addr: SocketAddrV4,
    /// The endpoint entry picked: a removed and re-added address is a new entry, which this
    /// pick's report must not touch.
    id: u64,
    /// Where the entry was when picked; where to look first when reporting.
    slot: usize,
    /// The entry's health epoch when picked.
    epoch: u64,
    probe: bool,
    done: bool,
}

impl Pick {
    /// The endpoint to connect to.
    pub fn endpoint(&self) -> SocketAddrV4 {
        self.addr
    }

    /// True when this pick is the single probe request of an endpoint whose ejection has
    /// expired.
    pub fn is_probe(&self) -> bool {
        self.probe
    }

    /// The request succeeded after `latency`.
    pub fn success(mut self, latency: Duration, now: Instant) {
        self.finish(Some((Outcome::Success, latency, now)));
    }

    /// The request failed after `latency`.
    pub fn failure(mut self, latency: Duration, now: Instant) {
        self.finish(Some((Outcome::Failure, latency, now)));
    }

    fn finish(&mut self, outcome: Option<(Outcome, Duration, Instant)>) {
        self.done = true;
        // Logged after the lock is released.
        let transition = lock(&self.state).report(self, outcome);
        match transition {
            Some(Transition::Ejected {
                addr,
                duration,
                probe,
            }) => {
                if probe {
                    warn!(endpoint = %addr, ?duration, "endpoint ejected again: its probe failed");
                } else {
                    warn!(endpoint = %addr, ?duration, "endpoint ejected after consecutive failures");
                }
            }
            Some(Transition::Restored { addr }) => {
                info!(endpoint = %addr, "endpoint back in rotation: its probe succeeded");
            }
            None => {}
        }
    }
}

impl Drop for Pick {
    fn drop(&mut self) {
        if !self.done {
            self.finish(None);
        }
    }
}

impl fmt::Debug for Pick {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pick")
            .field("endpoint", &self.addr)
            .field("probe", &self.probe)
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Outcome {
    Success,
    Failure,
}

/// A health change, reported to the log.
enum Transition {
    Ejected {
        addr: SocketAddrV4,
        duration: Duration,
        probe: bool,
    },
    Restored {
        addr: SocketAddrV4,
    },
}

struct State {
    settings: OutlierSettings,
    endpoints: Vec<Endpoint>,
    next_id: u64,
    ejections_total: u64,
}

impl State {
    fn set_endpoints(&mut self, endpoints: Vec<SocketAddrV4>) {
        let mut seen = HashSet::new();
        let addrs: Vec<SocketAddrV4> = endpoints
            .into_iter()
            .filter(|addr| seen.insert(*addr))
            .collect();
        let mut old: HashMap<SocketAddrV4, Endpoint> = std::mem::take(&mut self.endpoints)
            .into_iter()
            .map(|endpoint| (endpoint.addr, endpoint))
            .collect();
        // New endpoints copy the median kept estimate with its time of update, so they also
        // decay like it: a copied estimate without a time could never decay, and an endpoint
        // never picked would never get a sample to correct it.
        let mut kept: Vec<PeakEwma> = addrs
            .iter()
            .filter_map(|addr| old.get(addr))
            .map(|endpoint| endpoint.rtt)
            .collect();
        kept.sort_by(|a, b| a.estimate_ns.total_cmp(&b.estimate_ns));
        let seed = kept.get(kept.len() / 2).copied().unwrap_or(PeakEwma {
            estimate_ns: nanos(DEFAULT_RTT),
            updated: None,
        });
        for addr in addrs {
            let endpoint = old.remove(&addr).unwrap_or_else(|| {
                self.next_id += 1;
                Endpoint::new(addr, self.next_id, seed)
            });
            self.endpoints.push(endpoint);
        }
    }

    fn report(
        &mut self,
        pick: &Pick,
        outcome: Option<(Outcome, Duration, Instant)>,
    ) -> Option<Transition> {
        let endpoint = find(&mut self.endpoints, pick.id, pick.slot)?;
        endpoint.in_flight = endpoint.in_flight.saturating_sub(1);
        // Picks made before the endpoint's last ejection or restoration say nothing about its
        // current state: the requests still in flight when it was ejected must not count against
        // it once its probe has put it back.
        let current = pick.epoch == endpoint.epoch;
        if pick.probe && current {
            // Reported or dropped, the probe is over; if dropped, the next pick probes again.
            if let Health::Ejected {
                probe_in_flight, ..
            } = &mut endpoint.health
            {
                *probe_in_flight = false;
            }
        }
        let (outcome, latency, now) = outcome?;
        if outcome == Outcome::Success {
            endpoint.rtt.observe(nanos(latency), now);
        }
        if !current {
            return None;
        }
        let addr = endpoint.addr;
        let healthy = matches!(endpoint.health, Health::Healthy);
        let settings = &self.settings;
        match (healthy, pick.probe, outcome) {
            (true, _, Outcome::Success) => {
                endpoint.consecutive_failures = 0;
                None
            }
            (true, _, Outcome::Failure) => {
                endpoint.consecutive_failures = endpoint.consecutive_failures.saturating_add(1);
                if settings.consecutive_failures == 0
                    || endpoint.consecutive_failures < settings.consecutive_failures
                {
                    return None;
                }
                self.ejections_total += 1;
                let duration = endpoint.eject(settings, now);
                Some(Transition::Ejected {
                    addr,
                    duration,
                    probe: false,
                })
            }
            // A fail-open pick of an ejected endpoint: only its probe decides its health.
            (false, false, _) => None,
            (false, true, Outcome::Success) => {
                endpoint.restore(now);
                Some(Transition::Restored { addr })
            }
            (false, true, Outcome::Failure) => {
                self.ejections_total += 1;
                let duration = endpoint.eject(settings, now);
                Some(Transition::Ejected {
                    addr,
                    duration,
                    probe: true,
                })
            }
        }
    }
}

/// The entry `id`, normally still at `slot` unless an update reordered the endpoints; None once
/// removed.
fn find(endpoints: &mut [Endpoint], id: u64, slot: usize) -> Option<&mut Endpoint> {
    let slot = if endpoints.get(slot).is_some_and(|e| e.id == id) {
        slot
    } else {
        endpoints.iter().position(|e| e.id == id)?
    };
    endpoints.get_mut(slot)
}

/// Power of two choices among the endpoints `candidate` accepts: two distinct ones drawn
/// uniformly at random, the better of them kept. None when there are no candidates.
fn p2c(
    endpoints: &[Endpoint],
    now: Instant,
    candidate: impl Fn(&Endpoint) -> bool,
) -> Option<usize> {
    let count = endpoints.iter().filter(|e| candidate(e)).count();
    let mut slots = endpoints
        .iter()
        .enumerate()
        .filter(|(_, e)| candidate(e))
        .map(|(slot, _)| slot);
    if count < 2 {
        return slots.next();
    }
    let first = fastrand::usize(..count);
    let second = (first + 1 + fastrand::usize(..count - 1)) % count;
    let (low, high) = (first.min(second), first.max(second));
    let low_slot = slots.nth(low)?;
    let high_slot = slots.nth(high - low - 1)?;
    let (x, y) = if first < second {
        (low_slot, high_slot)
    } else {
        (high_slot, low_slot)
    };
    Some(better(endpoints, x, y, now))
}

/// The better of two endpoints. One awaiting its probe wins: a single request settles its
/// health, which its estimate, inflated by the failures that ejected it, could otherwise leave
/// unknown for long. Otherwise the cheaper wins, `x` on a tie (x is the first random draw, so ties
/// break randomly).
fn better(endpoints: &[Endpoint], x: usize, y: usize, now: Instant) -> usize {
    let (ex, ey) = (&endpoints[x], &endpoints[y]);
    match (ex.probe_ready(now), ey.probe_ready(now)) {
        (true, false) => x,
        (false, true) => y,
        _ if ey.cost(now) < ex.cost(now) => y,
        _ => x,
    }
}

/// How long an ejection lasts: `base × 2^exponent` capped at `max_ejection`, minus up to
/// [`EJECTION_JITTER`] of it. Jitter only shortens, so the cap holds, and below the cap each
/// ejection stays longer than the previous one (0.75 × 2d > d).
fn ejection_duration(settings: &OutlierSettings, exponent: u32) -> Duration {
    let full = settings
        .base_ejection
        .saturating_mul(2u32.saturating_pow(exponent))
        .min(settings.max_ejection);
    full.saturating_sub(full.mul_f64(EJECTION_JITTER * fastrand::f64()))
}

fn nanos(duration: Duration) -> f64 {
    duration.as_nanos() as f64
}

/// Peak-EWMA round-trip estimate (as in Finagle and Linkerd).
#[derive(Clone, Copy)]
struct PeakEwma {
    estimate_ns: f64,
    /// Time of the last sample (or of the endpoint the estimate was copied from); None for the
    /// default estimate.
    updated: Option<Instant>,
}

impl PeakEwma {
    fn observe(&mut self, sample_ns: f64, now: Instant) {
        self.estimate_ns = match self.updated {
            Some(updated) if sample_ns < self.estimate_ns => {
                let weight = decay_weight(now.saturating_duration_since(updated));
                self.estimate_ns * weight + sample_ns * (1.0 - weight)
            }
            // Peak: a slower sample replaces the estimate at once. So does any sample replacing
            // the default, which has no time to weigh it against.
            _ => sample_ns,
        }
        .clamp(nanos(MIN_ESTIMATE), nanos(MAX_ESTIMATE));
        // Concurrent reports may arrive slightly out of order.
        self.updated = Some(self.updated.map_or(now, |updated| updated.max(now)));
    }

    /// The estimate decayed toward zero by the time since the last sample.
    fn at(&self, now: Instant) -> f64 {
        let Some(updated) = self.updated else {
            return self.estimate_ns;
        };
        let decayed = self.estimate_ns * decay_weight(now.saturating_duration_since(updated));
        decayed.max(nanos(MIN_ESTIMATE))
    }
}

fn decay_weight(elapsed: Duration) -> f64 {
    (-(elapsed.as_secs_f64() / DECAY.as_secs_f64())).exp()
}

enum Health {
    Healthy,
    /// Out of rotation until `until`; after it, one probe request at a time.
    Ejected {
        until: Instant,
        probe_in_flight: bool,
    },
}

struct Endpoint {
    addr: SocketAddrV4,
    id: u64,
    rtt: PeakEwma,
    in_flight: u32,
    consecutive_failures: u32,
    health: Health,
    /// Bumped by every ejection and restoration (see [`State::report`]).
    epoch: u64,
    ejections: u64,
    /// Exponent of the next ejection's backoff.
    backoff_exponent: u32,
    /// When the endpoint last came back from an ejection; cleared by the next ejection.
    restored_at: Option<Instant>,
}

impl Endpoint {
    fn new(addr: SocketAddrV4, id: u64, rtt: PeakEwma) -> Self {
        Endpoint {
            addr,
            id,
            rtt,
            in_flight: 0,
            consecutive_failures: 0,
            health: Health::Healthy,
            epoch: 0,
            ejections: 0,
            backoff_exponent: 0,
            restored_at: None,
        }
    }

    fn eligible(&self, now: Instant) -> bool {
        matches!(self.health, Health::Healthy) || self.probe_ready(now)
    }

    /// Ejection over and no probe in flight: the next pick of it is its probe.
    fn probe_ready(&self, now: Instant) -> bool {
        matches!(self.health, Health::Ejected { until, probe_in_flight: false } if now >= until)
    }

    fn cost(&self, now: Instant) -> f64 {
        self.rtt.at(now) * (f64::from(self.in_flight) + 1.0)
    }

    /// Takes an in-flight slot, and the probe when one is due; returns whether it did.
    fn claim(&mut self, now: Instant) -> bool {
        self.in_flight = self.in_flight.saturating_add(1);
        let probe = self.probe_ready(now);
        if let Health::Ejected {
            probe_in_flight, ..
        } = &mut self.health
        {
            *probe_in_flight |= probe;
        }
        probe
    }

    fn eject(&mut self, settings: &OutlierSettings, now: Instant) -> Duration {
        // The backoff restarts once the endpoint has stayed healthy as long as the longest
        // ejection; an endpoint that keeps failing soon after coming back keeps backing off.
        if self
            .restored_at
            .take()
            .is_some_and(|at| now.saturating_duration_since(at) >= settings.max_ejection)
        {
            self.backoff_exponent = 0;
        }
        let duration = ejection_duration(settings, self.backoff_exponent);
        self.backoff_exponent = self.backoff_exponent.saturating_add(1);
        // Only an absurd max_ejection overflows Instant; the endpoint then stays behind its
        // one-probe-at-a-time gate instead of the agent panicking.
        let until = now.checked_add(duration).unwrap_or(now);
        self.health = Health::Ejected {
            until,
            probe_in_flight: false,
        };
        self.consecutive_failures = 0;
        self.ejections += 1;
        self.epoch += 1;
        duration
    }

    fn restore(&mut self, now: Instant) {
        self.health = Health::Healthy;
        self.consecutive_failures = 0;
        self.restored_at = Some(now);
        self.epoch += 1;
    }

    /// Back in rotation without a probe, because ejection was turned off.
    fn reinstate(&mut self) {
        if let Health::Ejected { .. } = self.health {
            self.health = Health::Healthy;
            self.consecutive_failures = 0;
            self.backoff_exponent = 0;
            self.restored_at = None;
            self.epoch += 1;
        }
    }

    fn view(&self) -> EndpointView {
        EndpointView {
            addr: self.addr,
            // The estimate is clamped to MAX_ESTIMATE, so the cast is exact enough and in range.
            ewma_latency: Duration::from_nanos(self.rtt.estimate_ns as u64),
            in_flight: self.in_flight,
            ejected_until: match self.health {
                Health::Healthy => None,
                Health::Ejected { until, .. } => Some(until),
            },
            ejections: self.ejections,
            consecutive_failures: self.consecutive_failures,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{collections::VecDeque, net::Ipv4Addr};

    fn ep(port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 1), port)
    }

    fn ms(millis: u64) -> Duration {
        Duration::from_millis(millis)
    }

    fn secs(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    fn ejecting_after(failures: u32) -> OutlierSettings {
        OutlierSettings {
            consecutive_failures: failures,
            ..OutlierSettings::default()
        }
    }

    fn view(balancer: &Balancer, addr: SocketAddrV4) -> EndpointView {
        balancer
            .endpoints()
            .into_iter()
            .find(|view| view.addr == addr)
            .expect("endpoint present")
    }

    /// Picks `target` by avoiding every other endpoint.
    fn pick_only(balancer: &Balancer, target: SocketAddrV4, now: Instant) -> Pick {
        let others: Vec<SocketAddrV4> = balancer
            .endpoints()
            .iter()
            .map(|view| view.addr)
            .filter(|addr| *addr != target)
            .collect();
        let pick = balancer.pick(&others, now).expect("an endpoint");
        assert_eq!(pick.endpoint(), target);
        pick
    }

    fn fail(balancer: &Balancer, target: SocketAddrV4, now: Instant, times: u32) {
        for _ in 0..times {
            pick_only(balancer, target, now).failure(ms(1), now);
        }
    }

    /// Picks `times` times at `now`, dropping each pick, and counts those of `target`.
    fn count_picks(balancer: &Balancer, target: SocketAddrV4, now: Instant, times: u32) -> u32 {
        (0..times)
            .map(|_| balancer.pick(&[], now).expect("an endpoint"))
            .filter(|pick| pick.endpoint() == target)
            .count() as u32
    }

    fn ejected_for(balancer: &Balancer, addr: SocketAddrV4, now: Instant) -> Duration {
        view(balancer, addr)
            .ejected_until
            .expect("ejected")
            .duration_since(now)
    }

    fn assert_within(duration: Duration, low: Duration, high: Duration) {
        assert!(
            low <= duration && duration <= high,
            "{duration:?} not in [{low:?}, {high:?}]"
        );
    }

    #[test]
    fn balancer_and_pick_are_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Balancer>();
        check::<Pick>();
    }

    #[test]
    fn p2c_prefers_the_faster_endpoint() {
        fastrand::seed(7);
        let (fast, slow) = (ep(1), ep(2));
        let balancer = Balancer::new(vec![fast, slow], OutlierSettings::default());
        let mut now = Instant::now();
        let mut outstanding = VecDeque::new();
        let mut fast_picks = 0;
        for _ in 0..10_000 {
            now += Duration::from_micros(200);
            let pick = balancer.pick(&[], now).expect("an endpoint");
            if pick.endpoint() == fast {
                fast_picks += 1;
            }
            outstanding.push_back(pick);
            // Sixteen requests in flight: the oldest completes.
            if outstanding.len() > 16 {
                let done: Pick = outstanding.pop_front().expect("outstanding pick");
                let latency = if done.endpoint() == fast {
                    ms(1)
                } else {
                    ms(10)
                };
                done.success(latency, now);
            }
        }
        assert!(fast_picks > 8_000, "fast endpoint got {fast_picks} picks");
        assert!(
            fast_picks < 10_000,
            "the slow endpoint takes load once the fast one is busy enough"
        );
    }

    #[test]
    fn in_flight_spreads_picks() {
        let (a, b) = (ep(1), ep(2));
        let balancer = Balancer::new(vec![a, b], OutlierSettings::default());
        let now = Instant::now();
        pick_only(&balancer, a, now).success(ms(1), now);
        pick_only(&balancer, b, now).success(ms(1), now);
        let held: Vec<Pick> = (0..100)
            .map(|_| balancer.pick(&[], now).expect("an endpoint"))
            .collect();
        let to_a = held.iter().filter(|pick| pick.endpoint() == a).count();
        assert_eq!(
            to_a, 50,
            "equal estimates: picks alternate by in-flight count"
        );
        assert_eq!(view(&balancer, a).in_flight, 50);
        drop(held);
        assert_eq!(view(&balancer, a).in_flight, 0);
        assert_eq!(view(&balancer, b).in_flight, 0);

        // Twice the latency: half the in-flight requests.
        pick_only(&balancer, b, now).success(ms(2), now);
        let held: Vec<Pick> = (0..30)
            .map(|_| balancer.pick(&[], now).expect("an endpoint"))
            .collect();
        let to_a = held.iter().filter(|pick| pick.endpoint() == a).count();
        assert!((19..=21).contains(&to_a), "{to_a} of 30 to the faster");
    }

    #[test]
    fn a_slow_sample_jumps_the_estimate_then_decays() {
        let a = ep(1);
        let balancer = Balancer::new(vec![a], OutlierSettings::default());
        let t0 = Instant::now();
        pick_only(&balancer, a, t0).success(ms(10), t0);
        assert_eq!(view(&balancer, a).ewma_latency, ms(10));
        pick_only(&balancer, a, t0).success(ms(100), t0 + secs(1));
        assert_eq!(view(&balancer, a).ewma_latency, ms(100), "peak");
        // Ten seconds later (one DECAY) a fast sample weighs 1 - 1/e.
        pick_only(&balancer, a, t0).success(ms(10), t0 + secs(11));
        let expected = 100.0 / std::f64::consts::E + 10.0 * (1.0 - 1.0 / std::f64::consts::E);
        let estimate = view(&balancer, a).ewma_latency.as_secs_f64() * 1000.0;
        assert!((estimate - expected).abs() < 0.01, "{estimate} ms");
        // A fast sample right after barely moves it: the decay goes by time, not by count.
        pick_only(&balancer, a, t0).success(ms(10), t0 + secs(11) + ms(10));
        let estimate = view(&balancer, a).ewma_latency.as_secs_f64() * 1000.0;
        assert!(
            estimate > expected - 0.1 && estimate < expected,
            "{estimate} ms"
        );
    }

    #[test]
    fn an_unpicked_endpoint_is_tried_again_once_its_estimate_decays() {
        let (fast, slow) = (ep(1), ep(2));
        let balancer = Balancer::new(vec![fast, slow], OutlierSettings::default());
        let t0 = Instant::now();
        pick_only(&balancer, fast, t0).success(ms(1), t0);
        pick_only(&balancer, slow, t0).success(secs(1), t0);
        // The fast endpoint, sampled every second, is picked at 1 ms × exp(-1 s / 10 s); the
        // slow one's 1 s × exp(-t / 10 s) falls below that after 70.1 s.
        let first_slow = (1..=120)
            .find(|second| {
                let now = t0 + secs(*second);
                let pick = balancer.pick(&[], now).expect("an endpoint");
                let is_slow = pick.endpoint() == slow;
                pick.success(ms(1), now);
                is_slow
            })
            .expect("the slow endpoint is picked again");
        assert_eq!(first_slow, 71);
    }

    #[test]
    fn failures_leave_the_latency_estimate_alone() {
        let (a, b) = (ep(1), ep(2));
        let balancer = Balancer::new(vec![a, b], OutlierSettings::default());
        let now = Instant::now();
        pick_only(&balancer, a, now).success(ms(10), now);
        pick_only(&balancer, b, now).success(ms(10), now);
        pick_only(&balancer, a, now).failure(Duration::from_micros(50), now);
        assert_eq!(view(&balancer, a).ewma_latency, ms(10), "a fast failure");
        pick_only(&balancer, b, now).failure(ms(500), now);
        assert_eq!(view(&balancer, b).ewma_latency, ms(10), "a slow failure");
        // So a failing endpoint keeps its share of picks until it is ejected.
        let picks = count_picks(&balancer, a, now, 1000);
        assert!((350..=650).contains(&picks), "{picks} of 1000");
    }

    #[test]
    fn ejects_after_exactly_n_consecutive_failures() {
        let (a, b) = (ep(1), ep(2));
        let balancer = Balancer::new(vec![a, b], ejecting_after(3));
        let now = Instant::now();
        fail(&balancer, a, now, 2);
        pick_only(&balancer, a, now).success(ms(1), now);
        fail(&balancer, a, now, 2);
        assert_eq!(view(&balancer, a).ejected_until, None);
        assert_eq!(view(&balancer, a).consecutive_failures, 2);
        fail(&balancer, a, now, 1);
        let a_view = view(&balancer, a);
        assert_within(ejected_for(&balancer, a, now), ms(750), secs(1));
        assert_eq!(a_view.ejections, 1);
        assert_eq!(a_view.consecutive_failures, 0);
        assert_eq!(balancer.ejections_total(), 1);
        assert_eq!(count_picks(&balancer, a, now, 100), 0);
        assert_eq!(count_picks(&balancer, a, now + ms(700), 100), 0);
    }

    #[test]
    fn ejection_backoff_doubles_and_caps_with_jitter() {
        fastrand::seed(11);
        let settings = OutlierSettings {
            base_ejection: secs(1),
            max_ejection: secs(5),
            ..OutlierSettings::default()
        };
        for (exponent, full) in [(0, 1), (1, 2), (2, 4), (3, 5), (10, 5), (u32::MAX, 5)] {
            let full = secs(full);
            let durations: Vec<Duration> = (0..1000)
                .map(|_| ejection_duration(&settings, exponent))
                .collect();
            for duration in &durations {
                assert_within(*duration, full.mul_f64(0.75), full);
            }
            let shortest = durations.iter().min().expect("durations");
            let longest = durations.iter().max().expect("durations");
            assert!(
                *longest - *shortest > full.mul_f64(0.2),
                "jitter spreads the ejections"
            );
        }
    }

    #[test]
    fn exactly_one_probe_after_expiry_and_success_restores() {
        let (a, b) = (ep(1), ep(2));
        let balancer = Balancer::new(vec![a, b], ejecting_after(1));
        let now = Instant::now();
        fail(&balancer, a, now, 1);
        let until = view(&balancer, a).ejected_until.expect("ejected");
        assert_eq!(count_picks(&balancer, a, until - ms(1), 100), 0);

        let probe = balancer.pick(&[], until).expect("an endpoint");
        assert_eq!(probe.endpoint(), a, "the probe wins its comparison");
        assert!(probe.is_probe());
        for _ in 0..100 {
            let pick = balancer.pick(&[], until).expect("an endpoint");
            assert_eq!(pick.endpoint(), b, "one probe at a time");
            assert!(!pick.is_probe());
        }

        probe.success(ms(1), until);
        let a_view = view(&balancer, a);
        assert_eq!(a_view.ejected_until, None);
        assert_eq!(a_view.consecutive_failures, 0);
        assert_eq!(a_view.in_flight, 0);
        // Back in rotation, though its estimate (inflated by the failure) starts it slowly:
        // it takes requests once the other endpoint has some in flight.
        let held: Vec<Pick> = (0..10)
            .map(|_| balancer.pick(&[], until).expect("an endpoint"))
            .collect();
        assert!(held.iter().any(|pick| pick.endpoint() == a));
        assert!(held.iter().all(|pick| !pick.is_probe()));
        drop(held);
    }

    #[test]
    fn probe_failure_ejects_again_for_longer() {
        let a = ep(1);
        let balancer = Balancer::new(vec![a], ejecting_after(1));
        let mut now = Instant::now();
        fail(&balancer, a, now, 1);
        let mut previous = ejected_for(&balancer, a, now);
        assert_within(previous, ms(750), secs(1));
        for (round, full) in [(2, 2), (3, 4), (4, 8)] {
            now = view(&balancer, a).ejected_until.expect("ejected");
            let probe = balancer.pick(&[], now).expect("an endpoint");
            assert!(probe.is_probe());
            probe.failure(ms(1), now);
            let ejection = ejected_for(&balancer, a, now);
            assert_within(ejection, secs(full).mul_f64(0.75), secs(full));
            assert!(ejection > previous);
            previous = ejection;
            assert_eq!(view(&balancer, a).ejections, round);
        }
        assert_eq!(balancer.ejections_total(), 4);
    }

    #[test]
    fn backoff_restarts_only_after_staying_healthy() {
        let a = ep(1);
        let settings = OutlierSettings {
            max_ejection: secs(30),
            ..ejecting_after(1)
        };
        let balancer = Balancer::new(vec![a], settings);
        let now = Instant::now();
        fail(&balancer, a, now, 1);
        let restored = view(&balancer, a).ejected_until.expect("ejected");
        pick_only(&balancer, a, restored).success(ms(1), restored);
        // Failing again soon: the backoff goes on.
        fail(&balancer, a, restored, 1);
        assert_within(ejected_for(&balancer, a, restored), ms(1500), secs(2));

        let restored = view(&balancer, a).ejected_until.expect("ejected");
        pick_only(&balancer, a, restored).success(ms(1), restored);
        // Healthy for max_ejection: it starts over.
        let later = restored + secs(30);
        fail(&balancer, a, later, 1);
        assert_within(ejected_for(&balancer, a, later), ms(750), secs(1));
    }

    #[test]
    fn a_dropped_probe_lets_the_next_pick_probe() {
        let a = ep(1);
        let balancer = Balancer::new(vec![a], ejecting_after(1));
        let now = Instant::now();
        fail(&balancer, a, now, 1);
        let until = view(&balancer, a).ejected_until.expect("ejected");
        let probe = balancer.pick(&[], until).expect("an endpoint");
        assert!(probe.is_probe());
        drop(probe);
        assert_eq!(
            view(&balancer, a).ejected_until,
            Some(until),
            "still ejected"
        );
        assert_eq!(view(&balancer, a).ejections, 1);
        assert_eq!(view(&balancer, a).in_flight, 0);
        assert!(balancer.pick(&[], until).expect("an endpoint").is_probe());
    }

    #[test]
    fn picks_in_flight_at_ejection_do_not_eject_again() {
        let a = ep(1);
        let balancer = Balancer::new(vec![a], ejecting_after(2));
        let now = Instant::now();
        let mut held: Vec<Pick> = (0..6)
            .map(|_| balancer.pick(&[], now).expect("an endpoint"))
            .collect();
        for pick in held.drain(..2) {
            pick.failure(ms(1), now);
        }
        let until = view(&balancer, a).ejected_until.expect("ejected");
        // While it is ejected...
        for pick in held.drain(..2) {
            pick.failure(ms(1), now + ms(1));
        }
        assert_eq!(view(&balancer, a).ejected_until, Some(until));
        // ... and once its probe has put it back.
        let probe = balancer.pick(&[], until).expect("an endpoint");
        assert!(probe.is_probe());
        probe.success(ms(1), until);
        for pick in held.drain(..) {
            pick.failure(ms(1), until);
        }
        let a_view = view(&balancer, a);
        assert_eq!(a_view.ejected_until, None);
        assert_eq!(a_view.consecutive_failures, 0);
        assert_eq!(a_view.ejections, 1);
        assert_eq!(a_view.in_flight, 0);
    }

    #[test]
    fn avoid_is_honoured_when_possible_and_ignored_otherwise() {
        let (a, b, c) = (ep(1), ep(2), ep(3));
        let balancer = Balancer::new(vec![a, b, c], ejecting_after(1));
        let now = Instant::now();
        for _ in 0..100 {
            assert_eq!(balancer.pick(&[a, b], now).expect("pick").endpoint(), c);
        }
        for _ in 0..100 {
            assert!(balancer.pick(&[a, b, c], now).is_ok());
        }
        // A healthy avoided endpoint beats an ejected one.
        fail(&balancer, c, now, 1);
        for _ in 0..100 {
            let pick = balancer.pick(&[a, b], now).expect("pick");
            assert_ne!(pick.endpoint(), c);
        }
    }

    #[test]
    fn all_ejected_fails_open_or_closed() {
        let (a, b) = (ep(1), ep(2));
        let balancer = Balancer::new(vec![a, b], ejecting_after(1));
        let now = Instant::now();
        fail(&balancer, a, now, 1);
        fail(&balancer, b, now, 1);

        let pick = balancer.pick(&[], now).expect("fail open");
        assert!(!pick.is_probe());
        // A fail-open pick's outcome does not restore the endpoint.
        pick.success(ms(1), now);
        assert!(view(&balancer, a).ejected_until.is_some());
        assert!(view(&balancer, b).ejected_until.is_some());
        for _ in 0..100 {
            assert_eq!(balancer.pick(&[a], now).expect("fail open").endpoint(), b);
        }

        let closed = OutlierSettings {
            fail_open: false,
            ..ejecting_after(1)
        };
        balancer.update(vec![a, b], closed.clone());
        let err = balancer.pick(&[], now).expect_err("fail closed");
        assert_eq!(err, NoEndpoint::AllEjected);
        assert_eq!(err.to_string(), "every endpoint of the service is ejected");

        // One endpoint, its probe in flight: nothing else is eligible.
        let balancer = Balancer::new(vec![a], closed);
        fail(&balancer, a, now, 1);
        let until = view(&balancer, a).ejected_until.expect("ejected");
        let probe = balancer.pick(&[], until).expect("probe");
        assert!(probe.is_probe());
        assert_eq!(
            balancer.pick(&[], until).err(),
            Some(NoEndpoint::AllEjected)
        );
        balancer.update(vec![a], ejecting_after(1));
        let pick = balancer.pick(&[], until).expect("fail open");
        assert!(!pick.is_probe());

        let empty = Balancer::new(Vec::new(), OutlierSettings::default());
        assert_eq!(empty.pick(&[], now).err(), Some(NoEndpoint::Empty));
    }

    #[test]
    fn update_keeps_the_state_of_kept_endpoints() {
        let (a, b, c, d, e) = (ep(1), ep(2), ep(3), ep(4), ep(5));
        let balancer = Balancer::new(vec![a, b, c, e], ejecting_after(1));
        let now = Instant::now();
        pick_only(&balancer, a, now).success(ms(20), now);
        pick_only(&balancer, b, now).success(ms(5), now);
        pick_only(&balancer, c, now).success(ms(100), now);
        fail(&balancer, a, now, 1);
        let a_before = view(&balancer, a);
        assert_eq!(a_before.ewma_latency, ms(20));
        let held_b = pick_only(&balancer, b, now);
        let held_e = pick_only(&balancer, e, now);

        balancer.update(vec![b, a, c, d, d], ejecting_after(1));
        let addrs: Vec<SocketAddrV4> = balancer.endpoints().iter().map(|v| v.addr).collect();
        assert_eq!(addrs, [b, a, c, d]);
        assert_eq!(view(&balancer, a), a_before);
        assert_eq!(view(&balancer, b).ewma_latency, ms(5));
        assert_eq!(view(&balancer, b).in_flight, 1);
        assert_eq!(
            view(&balancer, d).ewma_latency,
            ms(20),
            "median of 5, 20, 100"
        );
        assert_eq!(view(&balancer, d).ejected_until, None);

        // Reports after the update: b moved, e is gone.
        held_b.failure(ms(1), now);
        assert_eq!(view(&balancer, b).in_flight, 0);
        assert_eq!(view(&balancer, b).ejections, 1);
        held_e.failure(ms(1), now);
        assert_eq!(balancer.ejections_total(), 2);

        // Removed and added again: a new endpoint.
        let held_c = pick_only(&balancer, c, now);
        balancer.update(vec![a, b], ejecting_after(1));
        balancer.update(vec![a, b, c], ejecting_after(1));
        held_c.success(ms(1), now);
        assert_eq!(view(&balancer, c).in_flight, 0);
        assert_eq!(view(&balancer, c).ewma_latency, ms(20), "median of a and b");
    }

    #[test]
    fn zero_consecutive_failures_disables_ejection() {
        let (a, b) = (ep(1), ep(2));
        let balancer = Balancer::new(vec![a, b], ejecting_after(1));
        let now = Instant::now();
        fail(&balancer, a, now, 1);
        assert!(view(&balancer, a).ejected_until.is_some());
        balancer.update(vec![a, b], ejecting_after(0));
        assert_eq!(view(&balancer, a).ejected_until, None, "reinstated");
        fail(&balancer, b, now, 50);
        assert_eq!(view(&balancer, b).ejected_until, None);
        assert_eq!(view(&balancer, b).consecutive_failures, 50);
        assert_eq!(balancer.ejections_total(), 1);
    }

    #[test]
    fn concurrent_picks_keep_in_flight_consistent() {
        let balancer = Balancer::new((1..=5).map(ep).collect(), ejecting_after(3));
        let t0 = Instant::now();
        std::thread::scope(|scope| {
            for thread in 0..8u64 {
                let balancer = &balancer;
                scope.spawn(move || {
                    let mut rng = fastrand::Rng::with_seed(thread);
                    let mut held = Vec::new();
                    for i in 0..5_000u64 {
                        let now = t0 + Duration::from_micros(i * 200);
                        let pick = balancer.pick(&[ep(1)], now).expect("fails open");
                        held.push(pick);
                        if held.len() < 4 {
                            continue;
                        }
                        let pick = held.swap_remove(rng.usize(..held.len()));
                        let latency = Duration::from_micros(rng.u64(100..5_000));
                        match rng.u8(..10) {
                            0..=2 => pick.failure(latency, now),
                            3 => drop(pick),
                            _ => pick.success(latency, now),
                        }
                    }
                });
            }
            scope.spawn(|| {
                for round in 0..500 {
                    let mut endpoints: Vec<SocketAddrV4> = (1..=5).map(ep).collect();
                    if round % 2 == 0 {
                        endpoints.push(ep(6));
                    }
                    balancer.update(endpoints, ejecting_after(3));
                    std::thread::yield_now();
                }
            });
        });
        let views = balancer.endpoints();
        assert_eq!(views.len(), 5);
        for view in &views {
            assert_eq!(view.in_flight, 0, "{view:?}");
        }
        let ejections: u64 = views.iter().map(|view| view.ejections).sum();
        assert!(ejections > 0);
        assert!(balancer.ejections_total() >= ejections);
    }
}

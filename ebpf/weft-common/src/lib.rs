//! Types shared by the eBPF programs and the agent. Layouts are `repr(C)` with explicit padding so
//! both sides agree byte for byte.
#![no_std]

/// Map names, as declared in the eBPF object.
pub mod maps {
    pub const ENROLLED_NETNS: &str = "ENROLLED_NETNS";
    pub const ORIG_DST_BY_COOKIE: &str = "ORIG_DST_BY_COOKIE";
    pub const ORIG_DST_BY_CLIENT: &str = "ORIG_DST_BY_CLIENT";
    pub const EXCLUDED_PORTS: &str = "EXCLUDED_PORTS";
    pub const EXCLUDED_CIDRS: &str = "EXCLUDED_CIDRS";
    pub const SETTINGS: &str = "SETTINGS";
    pub const COUNTERS: &str = "COUNTERS";
    pub const INBOUND_LISTENERS: &str = "INBOUND_LISTENERS";
    pub const DELIVERIES: &str = "DELIVERIES";
    /// Every map: all are shared with the next agent on an upgrade.
    pub const ALL: [&str; 9] = [
        ENROLLED_NETNS,
        ORIG_DST_BY_COOKIE,
        ORIG_DST_BY_CLIENT,
        EXCLUDED_PORTS,
        EXCLUDED_CIDRS,
        SETTINGS,
        COUNTERS,
        INBOUND_LISTENERS,
        DELIVERIES,
    ];
}

/// Capacity of the original-destination maps: the most redirected connections that can be in
/// flight (connecting or open) at once on a node. A connect beyond it is not redirected.
pub const MAX_TRACKED_CONNECTIONS: u32 = 262_144;
pub const MAX_ENROLLED_PODS: u32 = 16_384;
pub const MAX_EXCLUDED_PORTS: u32 = 1_024;
pub const MAX_EXCLUDED_CIDRS: u32 = 1_024;

/// Global knobs the agent writes once at start-up (index 0 of the `SETTINGS` array).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// `SO_MARK` the agent puts on its own sockets; those are never redirected.
    pub agent_mark: u32,
    /// `SO_MARK` of the agent's sockets delivering inbound traffic to an app; never redirected.
    pub delivery_mark: u32,
    /// Port of the agent's outbound listener on 127.0.0.1 inside every enrolled pod (host order).
    pub outbound_port: u16,
    /// Port of the agent's mTLS tunnel listener in every enrolled pod: never steered (host order).
    pub inbound_port: u16,
}

/// Where a redirected connection was going. `ip` is in network byte order as the kernel stores it,
/// `port` in host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    pub ip: u32,
    pub port: u16,
    pub _pad: u16,
}

/// Identifies a redirected connection as the agent's listener sees it: the pod's network namespace
/// plus the client end (address in network order, port in host order). Every redirected connection
/// goes to the same 127.0.0.1 listener port, so two live ones never share a client end.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ClientKey {
    pub netns_cookie: u64,
    pub ip: u32,
    pub port: u16,
    pub _pad: u16,
}

/// A connection the agent is opening to an app inside a pod, from the client's address: such a
/// connection must reach the app, not be steered back to the agent. Addresses in network order,
/// ports in host order. The destination is part of the key so an entry lets through exactly one
/// connection, to one pod and port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DeliveryKey {
    pub source_ip: u32,
    pub destination_ip: u32,
    pub source_port: u16,
    pub destination_port: u16,
}

/// Indexes into the per-CPU `COUNTERS` array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// TCP connects from enrolled pods sent to the agent.
    Redirected = 0,
    /// TCP connects from pods that are not enrolled (left alone).
    NotEnrolled = 1,
    /// Connects from enrolled pods to loopback, excluded ports or excluded CIDRs.
    Excluded = 2,
    /// The agent's own upstream sockets (recognised by mark).
    AgentSocket = 3,
    /// Enrolled connects that could not be redirected because the tracking map was full.
    TrackingFull = 4,
    /// IPv6 (not v4-mapped) connects from enrolled pods, passed through untouched.
    Ipv6Passthrough = 5,
    /// Connections arriving at an enrolled pod from outside the mesh, steered to the agent.
    InboundSteered = 6,
}

impl Counter {
    pub const ALL: [Counter; 7] = [
        Counter::Redirected,
        Counter::NotEnrolled,
        Counter::Excluded,
        Counter::AgentSocket,
        Counter::TrackingFull,
        Counter::Ipv6Passthrough,
        Counter::InboundSteered,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Counter::Redirected => "redirected",
            Counter::NotEnrolled => "not_enrolled",
            Counter::Excluded => "excluded",
            Counter::AgentSocket => "agent_socket",
            Counter::TrackingFull => "tracking_full",
            Counter::Ipv6Passthrough => "ipv6_passthrough",
            Counter::InboundSteered => "inbound_steered",
        }
    }
}

pub const COUNTER_SLOTS: u32 = Counter::ALL.len() as u32;

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain repr(C) data with explicit padding, valid for any bit pattern.
    unsafe impl aya::Pod for super::Settings {}
    unsafe impl aya::Pod for super::OrigDst {}
    unsafe impl aya::Pod for super::ClientKey {}
    unsafe impl aya::Pod for super::DeliveryKey {}
}

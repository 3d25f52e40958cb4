//! weft's socket hooks. Attached to the cgroup that parents the pods' cgroups:
//!
//! * `weft_connect4` / `weft_connect6` (cgroup/connect4, connect6): a TCP connect from an enrolled
//!   pod is rewritten to the agent's listener on 127.0.0.1 inside that pod's network namespace, and
//!   the original destination is remembered under the socket's cookie.
//! * `weft_sockops` (sockops): once such a connect is established its client port is known, so the
//!   record moves to a key the agent can compute from the accepted socket (netns, client ip, port);
//!   it is deleted when the client socket reaches TCP_CLOSE.
//! * `weft_sock_release` (cgroup/sock_release): drops the cookie record of sockets closed before
//!   they ever connected, so no map only grows.
//! * `weft_inbound` (sk_lookup, attached to each enrolled pod's network namespace): a TCP
//!   connection arriving from outside the pod for any port but the tunnel port is handed to the
//!   agent's plaintext listener in that pod; the accepted socket's local address is the original
//!   destination.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod programs {
    use aya_ebpf::{
        bindings::{
            BPF_ANY, BPF_F_NO_PREALLOC, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB,
            BPF_SOCK_OPS_STATE_CB_FLAG, BPF_TCP_CLOSE,
        },
        helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie},
        macros::{cgroup_sock, cgroup_sock_addr, map, sk_lookup, sock_ops},
        maps::{lpm_trie::Key, Array, HashMap, LpmTrie, PerCpuArray, SockHash},
        programs::{SkLookupContext, SockAddrContext, SockContext, SockOpsContext},
        EbpfContext,
    };
    use weft_common::{
        ClientKey, Counter, DeliveryKey, OrigDst, Settings, COUNTER_SLOTS, MAX_ENROLLED_PODS,
        MAX_EXCLUDED_CIDRS, MAX_EXCLUDED_PORTS, MAX_TRACKED_CONNECTIONS,
    };

    const AF_INET: u32 = 2;
    const AF_INET6: u32 = 10;
    const SOCK_STREAM: u32 = 1;
    const IPPROTO_TCP: u32 = 6;
    const ALLOW: i32 = 1;
    const SK_PASS: u32 = 1;
    const LOOPBACK_AGENT_IP: u32 = u32::from_be_bytes([127, 0, 0, 1]).to_be();
    const V4_MAPPED_MARKER: u32 = 0x0000_ffff_u32.to_be();

    /// Enrolled pods, keyed by network-namespace cookie. The cookie is the right key: a pod is
    /// exactly one netns (all its containers share it), the kernel never reuses a cookie while the
    /// host runs, it is stable for the pod's life, and `bpf_get_netns_cookie` gives it in every hook
    /// without trusting anything the pod controls. Cgroup ids would need one entry per container,
    /// IP addresses can be reused or spoofed.
    #[map]
    static ENROLLED_NETNS: HashMap<u64, u8> = HashMap::with_max_entries(MAX_ENROLLED_PODS, 0);

    /// Original destination of a redirected socket, from connect until it is established.
    /// Not preallocated: kernel memory follows the connections in flight, not the capacity.
    #[map]
    static ORIG_DST_BY_COOKIE: HashMap<u64, OrigDst> =
        HashMap::with_max_entries(MAX_TRACKED_CONNECTIONS, BPF_F_NO_PREALLOC);

    /// Original destination of an established redirected connection, keyed as the agent sees it.
    #[map]
    static ORIG_DST_BY_CLIENT: HashMap<ClientKey, OrigDst> =
        HashMap::with_max_entries(MAX_TRACKED_CONNECTIONS, BPF_F_NO_PREALLOC);

    #[map]
    static EXCLUDED_PORTS: HashMap<u16, u8> = HashMap::with_max_entries(MAX_EXCLUDED_PORTS, 0);

    /// Excluded IPv4 CIDRs, addresses in network byte order as LPM tries need.
    #[map]
    static EXCLUDED_CIDRS: LpmTrie<u32, u8> =
        LpmTrie::with_max_entries(MAX_EXCLUDED_CIDRS, BPF_F_NO_PREALLOC);

    #[map]
    static SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);

    #[map]
    static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

    /// The agent's plaintext inbound listener of each enrolled pod, keyed by the pod's IPv4
    /// address (network order): the destination address is what an arriving connection carries.
    #[map]
    static INBOUND_LISTENERS: SockHash<u32> = SockHash::with_max_entries(MAX_ENROLLED_PODS, 0);

    /// Connections the agent is opening to apps, present from bind until connected.
    #[map]
    static DELIVERIES: HashMap<DeliveryKey, u8> =
        HashMap::with_max_entries(MAX_TRACKED_CONNECTIONS, BPF_F_NO_PREALLOC);

    #[inline(always)]
    fn count(counter: Counter) {
        if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
            // Per-CPU slot: no other writer can race this increment.
            unsafe { *slot += 1 };
        }
    }

    /// What a connect from an enrolled pod to `ip:port` (network order) should do.
    enum Verdict {
        Redirect(Settings),
        Skip,
    }

    /// Only TCP is proxied: SCTP and MPTCP stream sockets would break on the agent's TCP listener.
    #[inline(always)]
    fn is_plain_tcp(addr: &aya_ebpf::bindings::bpf_sock_addr) -> bool {
        addr.type_ == SOCK_STREAM && addr.protocol == IPPROTO_TCP
    }

    #[inline(always)]
    fn decide_v4(ctx: &SockAddrContext, ip: u32, port: u16) -> Verdict {
        let addr = unsafe { &*ctx.sock_addr };
        if !is_plain_tcp(addr) {
            return Verdict::Skip;
        }
        let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
        if unsafe { ENROLLED_NETNS.get(netns) }.is_none() {
            count(Counter::NotEnrolled);
            return Verdict::Skip;
        }
        let Some(settings) = SETTINGS.get(0) else {
            return Verdict::Skip;
        };
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        let sk = unsafe { addr.__bindgen_anon_1.sk };
        let (mark, bound_dev_if) = if sk.is_null() {
            (0, 0)
        } else {
            unsafe { ((*sk).mark, (*sk).bound_dev_if) }
        };
        // During an agent upgrade the old and the new agent's programs both run on each connect:
        // the second sees the first one's redirect and must leave its record in place.
        if ip == LOOPBACK_AGENT_IP && port == settings.outbound_port.to_be() {
            return Verdict::Skip;
        }
        let first_octet = u32::from_be(ip) >> 24;
        // 0.0.0.0/8 connects are local on Linux, like 127/8. Sockets bound to a device (VRF,
        // SO_BINDTODEVICE) could not reach the agent's loopback listener.
        let local = first_octet == 127 || first_octet == 0;
        let skip = if mark == settings.agent_mark || mark == settings.delivery_mark {
            Some(Counter::AgentSocket)
        } else if local
            || bound_dev_if != 0
            || unsafe { EXCLUDED_PORTS.get(u16::from_be(port)) }.is_some()
            || EXCLUDED_CIDRS.get(Key::new(32, ip)).is_some()
        {
            Some(Counter::Excluded)
        } else {
            None
        };
        if let Some(counter) = skip {
            count(counter);
            // A socket redirected on an earlier, failed connect must not keep that record.
            let _ = ORIG_DST_BY_COOKIE.remove(cookie);
            return Verdict::Skip;
        }
        let orig = OrigDst {
            ip,
            port: u16::from_be(port),
            _pad: 0,
        };
        // BPF_ANY: a socket that connects again after a failed attempt replaces its record.
        if ORIG_DST_BY_COOKIE
            .insert(cookie, orig, BPF_ANY as u64)
            .is_err()
        {
            count(Counter::TrackingFull);
            return Verdict::Skip;
        }
        count(Counter::Redirected);
        Verdict::Redirect(*settings)
    }

    #[cgroup_sock_addr(connect4)]
    pub fn weft_connect4(ctx: SockAddrContext) -> i32 {
        let addr = unsafe { &mut *ctx.sock_addr };
        let port = addr.user_port as u16;
        if let Verdict::Redirect(settings) = decide_v4(&ctx, addr.user_ip4, port) {
            addr.user_ip4 = LOOPBACK_AGENT_IP;
            addr.user_port = u32::from(settings.outbound_port.to_be());
        }
        ALLOW
    }

    /// Dual-stack sockets reach IPv4 peers through v4-mapped addresses; those are captured like
    /// connect4 (the agent's IPv4 listener accepts them). Native IPv6 passes through, counted.
    #[cgroup_sock_addr(connect6)]
    pub fn weft_connect6(ctx: SockAddrContext) -> i32 {
        let addr = unsafe { &mut *ctx.sock_addr };
        let ip6 = addr.user_ip6;
        let v4_mapped = ip6[0] == 0 && ip6[1] == 0 && ip6[2] == V4_MAPPED_MARKER;
        if !v4_mapped {
            if is_plain_tcp(addr)
                && unsafe { ENROLLED_NETNS.get(bpf_get_netns_cookie(ctx.as_ptr())) }.is_some()
            {
                count(Counter::Ipv6Passthrough);
            }
            return ALLOW;
        }
        let port = addr.user_port as u16;
        if let Verdict::Redirect(settings) = decide_v4(&ctx, ip6[3], port) {
            addr.user_ip6[3] = LOOPBACK_AGENT_IP;
            addr.user_port = u32::from(settings.outbound_port.to_be());
        }
        ALLOW
    }

    #[inline(always)]
    fn client_key(ctx: &SockOpsContext) -> Option<ClientKey> {
        // Both ctx fields are loaded unconditionally (volatile, so at constant offsets): the
        // verifier rejects the single variable-offset load LLVM would otherwise turn a match into.
        let ops = ctx.ops;
        let ip4 = unsafe { core::ptr::read_volatile(&(*ops).local_ip4) };
        let mapped_ip4 = unsafe { core::ptr::read_volatile(&(*ops).local_ip6[3]) };
        let ip = match ctx.family() {
            AF_INET => ip4,
            AF_INET6 => mapped_ip4,
            _ => return None,
        };
        Some(ClientKey {
            netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
            ip,
            port: ctx.local_port() as u16,
            _pad: 0,
        })
    }

    #[sock_ops]
    pub fn weft_sockops(ctx: SockOpsContext) -> u32 {
        match ctx.op() {
            BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
                let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
                let Some(orig) = (unsafe { ORIG_DST_BY_COOKIE.get(cookie) }).copied() else {
                    return 1;
                };
                if let Some(key) = client_key(&ctx) {
                    // BPF_ANY: the live connection owns this client address; any older entry
                    // under it is stale.
                    if ORIG_DST_BY_CLIENT.insert(key, orig, BPF_ANY as u64).is_ok() {
                        // Ask for the state callback so the record goes when the socket closes.
                        // The kernel replaces the flags: keep those other programs set.
                        let flags = ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG;
                        let _ = ctx.set_cb_flags(flags as i32);
                    } else {
                        count(Counter::TrackingFull);
                    }
                }
                let _ = ORIG_DST_BY_COOKIE.remove(cookie);
            }
            BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => {
                if let Some(key) = client_key(&ctx) {
                    let _ = ORIG_DST_BY_CLIENT.remove(key);
                }
            }
            _ => {}
        }
        1
    }

    #[cgroup_sock(sock_release)]
    pub fn weft_sock_release(ctx: SockContext) -> i32 {
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        let _ = ORIG_DST_BY_COOKIE.remove(cookie);
        ALLOW
    }

    #[sk_lookup]
    pub fn weft_inbound(ctx: SkLookupContext) -> u32 {
        let lookup = ctx.lookup;
        let (family, protocol, remote_ip, remote_port, local_ip, local_port) = unsafe {
            (
                core::ptr::read_volatile(&(*lookup).family),
                core::ptr::read_volatile(&(*lookup).protocol),
                core::ptr::read_volatile(&(*lookup).remote_ip4),
                core::ptr::read_volatile(&(*lookup).remote_port),
                core::ptr::read_volatile(&(*lookup).local_ip4),
                core::ptr::read_volatile(&(*lookup).local_port),
            )
        };
        if family != AF_INET || protocol != IPPROTO_TCP {
            return SK_PASS;
        }
        // The pod calling its own address (its source is then that address). The ingress
        // interface cannot tell: local traffic reports the device owning the address.
        if remote_ip == local_ip {
            return SK_PASS;
        }
        let delivery = DeliveryKey {
            source_ip: remote_ip,
            destination_ip: local_ip,
            source_port: u16::from_be(remote_port),
            destination_port: local_port as u16,
        };
        if unsafe { DELIVERIES.get(delivery) }.is_some() {
            return SK_PASS;
        }
        let Some(settings) = SETTINGS.get(0) else {
            return SK_PASS;
        };
        if local_port == u32::from(settings.inbound_port) {
            return SK_PASS;
        }
        // No listener for this address (not a pod IP the agent serves): normal lookup.
        if INBOUND_LISTENERS
            .redirect_sk_lookup(&ctx, local_ip, 0)
            .is_ok()
        {
            count(Counter::InboundSteered);
        }
        SK_PASS
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}

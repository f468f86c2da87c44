//! The load-balancing decisions, in pipeline order: is_service_port, ct_lookup (ct_reuse),
//! lookup_service (ct_recheck), select_backend, ct_create (with SNAT port allocation for
//! remote backends in SNAT mode), and reply_lookup for the way back.
//!
//! One CONNTRACK entry per flow, keyed by the client (address, port, protocol) the node that
//! holds the flow sees: a request finds it by its source, a reply by its destination, so a
//! new flow is one map insert. The entry names its frontend; a request to another frontend
//! from the same client tuple is another flow, which this node cannot hold at the same time
//! (it goes to the kernel, `pass_flow_collision`) unless the old one is over.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns},
};
use lb_common::{
    hash::{client_hash, flow_hash},
    port_be, port_host, AffinityEntry, AffinityKey, Backend, Config, CtEntry, CtKey, FlowKey,
    Frontend, FrontendKey, LocalEndpoint, PeerNode, Reason, RevNatEntry, BE_ACTIVE, BE_LOCAL,
    BE_TERMINATING, BE_TUNNEL, CFG_PEERS, CT_CLOSING, CT_SNAT, CT_TUNNEL, FE_AFFINITY, PEER_SNAT,
    PROTO_TCP, PROTO_UDP, REV_CLOSING, REV_SNAT, SNAT_TIME_WAIT_S, UDP_IDLE_S,
};

use crate::{
    maps::{
        AFFINITY, BACKENDS, CONNTRACK, FRONTENDS, LOCAL_ENDPOINTS, MAGLEV, PEERS, REVNAT,
        SERVICE_PORTS,
    },
    parse::Parsed,
};

/// How many SNAT ports a new remote flow tries before giving up (bounded for the verifier).
const SNAT_PROBES: u32 = 8;
const NS_PER_S: u64 = 1_000_000_000;

/// The backend a packet goes to (its `BACKENDS` entry, read in place), and the SNAT source
/// port when it is SNATed.
pub struct Flow {
    pub backend: &'static Backend,
    pub snat_port: u16,
}

#[inline(always)]
fn is_node_addr(cfg: &Config, addr: u32) -> bool {
    addr != 0
        && (cfg.node_addrs[0] == addr
            || cfg.node_addrs[1] == addr
            || cfg.node_addrs[2] == addr
            || cfg.node_addrs[3] == addr)
}

/// The CONNTRACK key of a request: its source is the client.
#[inline(always)]
pub fn request_key(p: &Parsed) -> FlowKey {
    FlowKey {
        client: p.key.saddr,
        client_port: p.key.sport,
        proto: p.key.proto,
        _pad: 0,
    }
}

/// The CONNTRACK key of a reply: its destination is the client.
#[inline(always)]
pub fn reply_flow_key(p: &Parsed) -> FlowKey {
    FlowKey {
        client: p.key.daddr,
        client_port: p.key.dport,
        proto: p.key.proto,
        _pad: 0,
    }
}

/// Is this a reply to a flow we SNATed towards a remote backend? Only packets addressed to
/// the SNAT address and port range are looked up.
#[inline(always)]
pub fn snat_reply_lookup(cfg: &Config, p: &Parsed) -> Option<*mut RevNatEntry> {
    if cfg.snat_addr == 0 || p.key.daddr != cfg.snat_addr {
        return None;
    }
    let port = port_host(p.key.dport);
    if port < cfg.snat_port_min || port > cfg.snat_port_max {
        return None;
    }
    let rev = REVNAT.get_ptr_mut(&p.key)?;
    let flags = unsafe { (*rev).flags };
    if flags & REV_SNAT == 0 {
        return None;
    }
    if flags & REV_CLOSING != 0
        && (p.is_syn() || closed_for(unsafe { (*rev).stamp_s }) > cfg.close_grace_s)
    {
        // The entry stays (its port taken) until SNAT_TIME_WAIT_S; snat_alloc ages it.
        return None;
    }
    if p.is_fin_or_rst() && flags & REV_CLOSING == 0 {
        let now_s = now_s();
        revnat_closing(rev, now_s);
        let r = unsafe { &*rev };
        let fkey = FlowKey {
            client: r.client_addr,
            client_port: r.client_port,
            proto: p.key.proto,
            _pad: 0,
        };
        if let Some(ct) = CONNTRACK.get_ptr_mut(&fkey) {
            ct_closing(ct, now_s);
        }
    }
    Some(rev)
}

/// A request another node's lbx load-balanced and SNATed to one of our pods: the packet
/// comes from a peer's SNAT address (`PEERS`) to a local endpoint. Returns the peer entry
/// and where the pod is. That node chose the backend and holds the flow's state; here it is
/// one redirect, like any hop of a routed VPC.
#[inline(always)]
pub fn peer_request_lookup(cfg: &Config, p: &Parsed) -> Option<(*mut PeerNode, LocalEndpoint)> {
    if cfg.flags & CFG_PEERS == 0 {
        return None;
    }
    let peer = PEERS.get_ptr_mut(&p.key.saddr)?;
    if unsafe { (*peer).flags } & PEER_SNAT == 0 {
        return None;
    }
    let ep = unsafe { LOCAL_ENDPOINTS.get(&p.key.daddr) }?;
    Some((peer, *ep))
}

/// Remembers how the peer's requests arrive (interface, its MAC, ours), which is how its
/// replies leave. Written only when something changed: every forwarded request reads it.
#[inline(always)]
pub fn peer_learn(peer: *mut PeerNode, ifindex: u32, peer_mac: [u8; 6], node_mac: [u8; 6]) {
    let peer = unsafe { &mut *peer };
    if peer.ifindex != ifindex
        || !mac_eq(&peer.mac, &peer_mac)
        || !mac_eq(&peer.node_mac, &node_mac)
    {
        peer.ifindex = ifindex;
        peer.mac = peer_mac;
        peer.node_mac = node_mac;
    }
}

/// Byte by byte: `==` on arrays can become a `bcmp` call, which BPF does not have.
#[inline(always)]
pub fn mac_eq(a: &[u8; 6], b: &[u8; 6]) -> bool {
    a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3] && a[4] == b[4] && a[5] == b[5]
}

/// A local pod's reply to a peer's SNAT address: the peer entry, once a request of that
/// peer taught us where it is (`ifindex != 0`).
#[inline(always)]
pub fn peer_reply_lookup(cfg: &Config, daddr: u32) -> Option<PeerNode> {
    if cfg.flags & CFG_PEERS == 0 {
        return None;
    }
    let peer = unsafe { PEERS.get(&daddr) }?;
    if peer.ifindex == 0 || peer.flags & PEER_SNAT == 0 {
        return None;
    }
    Some(*peer)
}

/// Does any frontend use the packet's destination port (protocol and port)? A clear bit
/// in `SERVICE_PORTS` sends non-service traffic on its way without a hash lookup.
#[inline(always)]
pub fn is_service_port(p: &Parsed) -> bool {
    let port = port_host(p.key.dport) as u32;
    let Some(word) = lb_common::service_port_word(p.key.proto, port as u16) else {
        return false;
    };
    match SERVICE_PORTS.get(word) {
        Some(bits) => *bits & (1u64 << (port % 64)) != 0,
        None => false,
    }
}

/// Frontend for the destination: node addresses match NodePort wildcard entries first, then
/// exact entries (LoadBalancer ingress IPs and externalIPs). Only for packets that passed
/// [`is_service_port`].
#[inline(always)]
pub fn lookup_service(cfg: &Config, p: &Parsed) -> Option<Frontend> {
    let mut key = FrontendKey {
        addr: 0,
        port: p.key.dport,
        proto: p.key.proto,
        _pad: 0,
    };
    if is_node_addr(cfg, p.key.daddr) {
        if let Some(fe) = unsafe { FRONTENDS.get(&key) } {
            return Some(*fe);
        }
    }
    key.addr = p.key.daddr;
    unsafe { FRONTENDS.get(&key) }.copied()
}

#[inline(always)]
pub fn backend(id: u32) -> Option<&'static Backend> {
    let be = BACKENDS.get(id)?;
    if be.flags & BE_ACTIVE == 0 {
        return None;
    }
    Some(be)
}

/// The conntrack entry of the packet's client, as `ct_lookup` found it.
pub enum CtLookup {
    /// No entry: a new flow.
    Miss,
    /// Stamped with the current `Config::frontend_epoch`: the packet's frontend still
    /// belongs to the entry's service, no frontend lookup needed.
    Current(*mut CtEntry),
    /// From before the last frontend change: valid only if `lookup_service` still finds a
    /// frontend of the entry's service (see [`ct_recheck`]).
    Unchecked(*mut CtEntry),
    /// The client's entry is for another frontend: another flow of the same client tuple
    /// (see [`ct_take_over`]).
    Other(*mut CtEntry),
}

/// Looks up the flow before the frontend (an established flow is the common case, and one
/// hash lookup cheaper this way). Sound because of the epoch: what `lookup_service` returns
/// for a 5-tuple depends only on the FRONTENDS keys, their service slots and the node
/// addresses, and userspace moves `Config::frontend_epoch` on after every change to any of
/// them. An entry stamped with the epoch the packet read *before* its frontend lookup (see
/// `frontend_epoch`) was checked against frontends that have not changed since, so the
/// old per-packet check "the frontend's service_id equals the entry's" still holds; any
/// other entry goes through [`ct_recheck`] after `lookup_service`. A deleted service whose
/// slot was reused, a removed frontend, a new NodePort wildcard shadowing an exact frontend:
/// each moves the epoch, so none of them can leave a flow forwarded on a stale entry.
#[inline(always)]
pub fn ct_lookup(p: &Parsed, epoch: u32) -> CtLookup {
    match CONNTRACK.get_ptr_mut(&request_key(p)) {
        None => CtLookup::Miss,
        Some(ct) => {
            let e = unsafe { &*ct };
            if e.frontend_addr != p.key.daddr || e.frontend_port != p.key.dport {
                CtLookup::Other(ct)
            } else if e.frontend_epoch == epoch {
                CtLookup::Current(ct)
            } else {
                CtLookup::Unchecked(ct)
            }
        }
    }
}

/// `Config::frontend_epoch`, read once per packet and before any frontend lookup: an entry
/// stamped later with this value was checked against frontends at least this new. (A second
/// read after the lookup could see a bump that the lookup did not.)
#[inline(always)]
pub fn frontend_epoch(cfg: &Config) -> u32 {
    unsafe { core::ptr::read_volatile(&cfg.frontend_epoch) }
}

/// An entry from an older epoch, after `lookup_service` found `fe`: the old stale-entry
/// check (service deleted and its slot reused, frontend moved), then the entry counts as
/// current again until the next frontend change.
#[inline(always)]
pub fn ct_recheck(
    cfg: &Config,
    p: &Parsed,
    ct: *mut CtEntry,
    fe: &Frontend,
    epoch: u32,
) -> Option<Flow> {
    let entry = unsafe { &mut *ct };
    if entry.service_id != fe.service_id {
        return None;
    }
    entry.frontend_epoch = epoch;
    ct_reuse(cfg, p, ct)
}

/// May a new flow (`p` opens one) take the client tuple of `other`, a flow to another
/// frontend? Yes when that flow is over: closed (FIN/RST) and this is a SYN or its grace
/// passed, or a UDP flow idle for `UDP_IDLE_S`. Otherwise the two cannot share the entry.
#[inline(always)]
pub fn ct_take_over(cfg: &Config, p: &Parsed, other: *mut CtEntry) -> bool {
    let e = unsafe { &*other };
    if e.flags & CT_CLOSING != 0 {
        return p.is_syn() || closed_for(e.stamp_s) > cfg.close_grace_s;
    }
    p.key.proto == PROTO_UDP && closed_for(e.stamp_s) > UDP_IDLE_S
}

/// Established flow: reuse its backend while it exists, so backend-set changes do not break
/// it. A terminating backend keeps its flows, but a new SYN on the same tuple reselects. A
/// TCP flow that saw FIN or RST keeps its backend for `close_grace_s`, then (or on a new
/// SYN) the tuple is a new flow. A UDP flow's stamp follows its requests (once a second).
#[inline(always)]
pub fn ct_reuse(cfg: &Config, p: &Parsed, ct: *mut CtEntry) -> Option<Flow> {
    let ct = unsafe { &mut *ct };
    if ct.flags & CT_CLOSING != 0 && (p.is_syn() || closed_for(ct.stamp_s) > cfg.close_grace_s) {
        return None;
    }
    let be = backend(ct.backend_id)?;
    if be.flags & BE_TERMINATING != 0 && p.is_syn() {
        return None;
    }
    if p.key.proto == PROTO_UDP {
        let now_s = now_s();
        if ct.stamp_s != now_s {
            ct.stamp_s = now_s;
        }
    } else if p.is_fin_or_rst() && ct.flags & CT_CLOSING == 0 {
        let now_s = now_s();
        ct_closing(ct, now_s);
        if ct.flags & CT_SNAT != 0 {
            let rkey = reply_key(be, cfg.snat_addr, ct.snat_port, p.key.proto);
            if let Some(rev) = REVNAT.get_ptr_mut(&rkey) {
                revnat_closing(rev, now_s);
            }
        }
    }
    Some(Flow {
        backend: be,
        snat_port: ct.snat_port,
    })
}

#[inline(always)]
pub fn now_s() -> u32 {
    (unsafe { bpf_ktime_get_ns() } / NS_PER_S) as u32
}

/// Seconds since `since_s`.
#[inline(always)]
pub fn closed_for(since_s: u32) -> u32 {
    now_s().wrapping_sub(since_s)
}

/// The 5-tuple a backend's reply to `dst:dport` arrives with.
#[inline(always)]
fn reply_key(be: &Backend, dst: u32, dport: u16, proto: u8) -> CtKey {
    CtKey {
        saddr: be.addr[0],
        daddr: dst,
        sport: be.port,
        dport,
        proto,
        _pad0: 0,
        _pad1: 0,
    }
}

#[inline(always)]
fn revnat_closing(rev: *mut RevNatEntry, now_s: u32) {
    unsafe {
        if (*rev).flags & REV_CLOSING == 0 {
            (*rev).flags |= REV_CLOSING;
            (*rev).stamp_s = now_s;
        }
    }
}

#[inline(always)]
fn ct_closing(ct: *mut CtEntry, now_s: u32) {
    unsafe {
        if (*ct).flags & CT_CLOSING == 0 {
            (*ct).flags |= CT_CLOSING;
            (*ct).stamp_s = now_s;
        }
    }
}

/// A reply from `p`'s source to a client of ours: the flow's entry (by the reply's
/// destination) when its backend is that source and its delivery is `delivery` (0 for a
/// local pod, `CT_TUNNEL` for a reply back through the tunnel). None when the flow closed
/// more than `close_grace_s` ago, or closed at all and this is a SYN-ACK: the tuple then
/// belongs to some other connection (a flow a peer node tunnelled here, the kernel's, the
/// client talking to the pod directly), and the closed flow's grace ends at once, so the
/// new connection's later replies are not caught by it either. (A new connection through
/// this node would have renewed the entry at its SYN.) A FIN or RST in the reply marks the
/// flow closing.
#[inline(always)]
pub fn reply_lookup(cfg: &Config, p: &Parsed, delivery: u8) -> Option<*mut CtEntry> {
    let ct = CONNTRACK.get_ptr_mut(&reply_flow_key(p))?;
    let e = unsafe { &mut *ct };
    if e.flags & (CT_SNAT | CT_TUNNEL) != delivery {
        return None;
    }
    let be = backend(e.backend_id)?;
    if be.addr[0] != p.key.saddr || be.port != p.key.sport {
        return None;
    }
    if e.flags & CT_CLOSING != 0 {
        if p.is_syn() {
            ct_expire(cfg, e);
            return None;
        }
        if closed_for(e.stamp_s) > cfg.close_grace_s {
            return None;
        }
    }
    if p.is_fin_or_rst() {
        ct_closing(ct, now_s());
    }
    Some(ct)
}

/// A UDP flow a peer node tunnels to local pod `p.key.daddr` now owns the pod's tuple
/// (client address and port -> pod): this node's own entry for the same client tuple and pod
/// (an older flow that entered through this node) would otherwise catch the pod's replies
/// first ([`reply_lookup`]) and send them to the client from this node's frontend, which the
/// client drops: it is marked closed beyond the grace, the latest flow wins. One CONNTRACK
/// lookup per tunnelled datagram. TCP needs none: a new connection's SYN-ACK ends the old
/// entry's grace in [`reply_lookup`], and a live connection on the same tuple keeps the pod.
/// Entries to another pod, or of flows this node tunnels or SNATs, are untouched.
#[inline(always)]
pub fn ct_supersede_local(cfg: &Config, p: &Parsed) {
    let key = FlowKey {
        client: p.key.saddr,
        client_port: p.key.sport,
        proto: p.key.proto,
        _pad: 0,
    };
    let Some(ct) = CONNTRACK.get_ptr_mut(&key) else {
        return;
    };
    let e = unsafe { &mut *ct };
    if e.flags & (CT_SNAT | CT_TUNNEL) != 0 {
        return;
    }
    let Some(be) = backend(e.backend_id) else {
        return;
    };
    if be.addr[0] == p.key.daddr && be.port == p.key.dport {
        ct_expire(cfg, e);
    }
}

/// Marks a flow's entry closed longer ago than the grace: it no longer matches anything.
#[inline(always)]
fn ct_expire(cfg: &Config, e: &mut CtEntry) {
    e.flags |= CT_CLOSING;
    e.stamp_s = now_s().wrapping_sub(cfg.close_grace_s).wrapping_sub(1);
}

/// The packet's flow hash: its Maglev slot and its first SNAT port probe. Computed once per
/// new flow and passed to both.
#[inline(always)]
pub fn packet_hash(p: &Parsed) -> u32 {
    flow_hash(
        &[p.key.saddr, 0, 0, 0],
        &[p.key.daddr, 0, 0, 0],
        p.key.sport,
        p.key.dport,
        p.key.proto,
    )
}

/// New flow: sessionAffinity first (if on and fresh), else the service's Maglev ring at
/// `hash` ([`packet_hash`]; affinity uses the client's hash instead). Returns the backend id
/// and the backend.
#[inline(always)]
pub fn select_backend(
    cfg: &Config,
    p: &Parsed,
    fe: &Frontend,
    hash: u32,
) -> Result<(u32, &'static Backend), Reason> {
    if fe.backend_count == 0 {
        return Err(Reason::PassNoBackend);
    }
    let affinity = fe.flags & FE_AFFINITY != 0;
    let saddr = [p.key.saddr, 0, 0, 0];
    let akey = AffinityKey {
        client: p.key.saddr,
        service_id: fe.service_id,
    };
    // Reading the clock is a helper call: only affinity needs it.
    let now = if affinity { unsafe { bpf_ktime_get_ns() } } else { 0 };
    if affinity {
        if let Some(a) = AFFINITY.get_ptr_mut(&akey) {
            let a = unsafe { &mut *a };
            let fresh = now.wrapping_sub(a.last_used_ns) <= fe.affinity_timeout_s as u64 * NS_PER_S;
            if fresh {
                if let Some(be) = backend(a.backend_id) {
                    if be.flags & BE_TERMINATING == 0 {
                        a.last_used_ns = now;
                        return Ok((a.backend_id, be));
                    }
                }
            }
        }
    }

    let m = cfg.maglev_size;
    if m == 0 {
        return Err(Reason::PassInternal);
    }
    let hash = if affinity { client_hash(&saddr) } else { hash };
    let slot = fe.service_id.wrapping_mul(m).wrapping_add(hash % m);
    let pair = MAGLEV.get(slot / 2).ok_or(Reason::PassBackendMissing)?;
    let id = if slot & 1 == 0 { pair[0] } else { pair[1] };
    let be = backend(id).ok_or(Reason::PassBackendMissing)?;

    if affinity {
        let entry = AffinityEntry {
            backend_id: id,
            _pad: 0,
            last_used_ns: now,
        };
        // Best effort: without the entry the client hash still picks the same backend.
        let _ = AFFINITY.insert(&akey, &entry, 0);
    }
    Ok((id, be))
}

/// Records the new flow: one CONNTRACK entry (both directions find it). A backend reached by
/// SNAT also gets its SNAT port and the REVNAT entry its replies are found by.
#[inline(always)]
pub fn ct_create(
    cfg: &Config,
    p: &Parsed,
    fe: &Frontend,
    id: u32,
    be: &'static Backend,
    client_mac: [u8; 6],
    node_mac: [u8; 6],
    ingress_ifindex: u32,
    epoch: u32,
    hash: u32,
) -> Result<Flow, Reason> {
    let now_s = now_s();
    let mut ct = CtEntry {
        frontend_addr: p.key.daddr,
        frontend_port: p.key.dport,
        snat_port: 0,
        backend_id: id,
        service_id: fe.service_id,
        frontend_epoch: epoch,
        stamp_s: now_s,
        ifindex: ingress_ifindex,
        client_mac,
        node_mac,
        flags: 0,
        _pad0: 0,
        _pad1: 0,
    };
    if be.flags & BE_LOCAL == 0 {
        if be.flags & BE_TUNNEL != 0 {
            ct.flags = CT_TUNNEL;
        } else {
            let mut rev = RevNatEntry {
                frontend_addr: p.key.daddr,
                client_addr: p.key.saddr,
                frontend_port: p.key.dport,
                client_port: p.key.sport,
                ifindex: ingress_ifindex,
                client_mac,
                node_mac,
                flags: REV_SNAT,
                _pad0: 0,
                _pad1: 0,
                stamp_s: now_s,
            };
            ct.snat_port = snat_alloc(cfg, p, be, &mut rev, hash, now_s)?;
            ct.flags = CT_SNAT;
        }
    }
    CONNTRACK
        .insert(&request_key(p), &ct, 0)
        .map_err(|_| Reason::PassCtFull)?;
    Ok(Flow {
        backend: be,
        snat_port: ct.snat_port,
    })
}

/// Picks a free SNAT port for (snat_addr -> backend): the flow hash as start, a few probes, and a
/// port idle (no reply) for longer than `snat_idle_s` counts as free.
#[inline(always)]
fn snat_alloc(
    cfg: &Config,
    p: &Parsed,
    be: &Backend,
    rev: &mut RevNatEntry,
    start: u32,
    now_s: u32,
) -> Result<u16, Reason> {
    if cfg.snat_addr == 0 || cfg.snat_port_max < cfg.snat_port_min {
        return Err(Reason::PassSnatExhausted);
    }
    let range = (cfg.snat_port_max - cfg.snat_port_min) as u32 + 1;
    let mut i = 0;
    while i < SNAT_PROBES {
        // The first probe is the tuple's hash (predictable); the others are random: a client
        // reusing its source port within the 120 s a closed flow holds its SNAT port would
        // otherwise walk the same fixed sequence every time and run out after 8 reuses.
        let off = if i == 0 { 0 } else { unsafe { bpf_get_prandom_u32() } };
        let port = cfg.snat_port_min + (start.wrapping_add(off) % range) as u16;
        let rkey = reply_key(be, cfg.snat_addr, port_be(port), p.key.proto);
        if REVNAT.insert(&rkey, &*rev, BPF_NOEXIST as u64).is_ok() {
            return Ok(port_be(port));
        }
        if let Some(old) = unsafe { REVNAT.get(&rkey) } {
            let age = now_s.wrapping_sub(old.stamp_s);
            let free = age > cfg.snat_idle_s || (old.flags & REV_CLOSING != 0 && age > SNAT_TIME_WAIT_S);
            if free && REVNAT.insert(&rkey, &*rev, 0).is_ok() {
                return Ok(port_be(port));
            }
        }
        i += 1;
    }
    Err(Reason::PassSnatExhausted)
}

/// Refreshes a SNAT entry's idle stamp when a reply uses it (written only once a second;
/// a closing entry keeps the time it started closing).
#[inline(always)]
pub fn snat_touch(rev: *mut RevNatEntry) {
    let now_s = now_s();
    unsafe {
        if (*rev).flags & REV_CLOSING == 0 && (*rev).stamp_s != now_s {
            (*rev).stamp_s = now_s;
        }
    }
}

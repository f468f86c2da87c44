//! The data plane's kernel side. Two programs share the maps in `maps`:
//! - `lb_ingress` (XDP, on the node NIC): service traffic in; tunnelled requests for local
//!   pods and tunnelled replies of flows held here; replies to SNATed flows; ICMP errors of
//!   NATed flows;
//! - `lb_reply` (TC ingress, on local pods' host-side veths): the pods' replies (and ICMP
//!   errors) reverse-NATed, or sent back through the tunnel, or to a peer's SNAT address.
//!
//! A flow whose backend is on another node keeps the client's address: the receiving node
//! (which holds the flow) DNATs and encapsulates it to the owning node, which decapsulates
//! it into the pod and sends the pod's replies back through the tunnel; the holding node
//! reverse-NATs them to the client. No netfilter on either node, one map insert per new flow
//! on each. SNAT to the receiving node stays a mode (`BE_TUNNEL` off).
//!
//! The request path reads top to bottom: parse, the service-port bitmap, ct_lookup (an
//! established flow whose entry is current goes straight to dnat: one hash lookup),
//! lookup_service, select_backend (TCP without an entry: only for a SYN), ct_create, dnat
//! (rewrite), deliver (redirect, encapsulate or SNAT). Why skipping the frontend lookup for
//! established flows is sound: `lb::ct_lookup`. Every packet ends in exactly one counted
//! `Reason`.
#![no_std]
#![no_main]

mod icmp;
mod lb;
mod maps;
mod nat;
mod parse;
mod reference;
mod stats;
mod tunnel;

use aya_ebpf::{
    bindings::{xdp_action, TC_ACT_OK, TC_ACT_REDIRECT},
    helpers::bpf_redirect,
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use lb_common::{
    hash::tunnel_entropy, Config, CtEntry, CtKey, Reason, ReturnEntry, BE_LOCAL, BE_TUNNEL, CFG_TUNNEL, CT_SNAT,
    CT_TUNNEL, FOU_OVERHEAD, IPIP_OVERHEAD, PEER_TUNNEL, PROTO_TCP, PROTO_UDP, RET_FOU, REV_SNAT,
};

use crate::{
    icmp::{IcmpError, IcmpRewrite},
    lb::{CtLookup, Flow},
    maps::{CONFIG, CONNTRACK, LOCAL_ENDPOINTS, PEERS, RETURNS, REVNAT},
    nat::Rewrite,
    parse::{
        ipv4_at, parse, parse_eth, parse_ipv4_at, ptr_at, EthHdr, Ip, Ipv4Hdr, Parsed, ETH_HLEN,
        IPV4_HLEN, PROTO_ICMP, PROTO_IPIP,
    },
    tunnel::Encap,
};

#[xdp]
pub fn lb_ingress(ctx: XdpContext) -> u32 {
    ingress(&ctx)
}

/// `lb_ingress`'s whole work, also what the benchmark harness (`reference::lb_bench_harness`)
/// runs after restoring its packet: both call the one `try_lb_ingress` subprogram.
#[inline(always)]
fn ingress(ctx: &XdpContext) -> u32 {
    let (verdict, reason) = match try_lb_ingress(ctx) {
        Ok(done) => done,
        // Anything we do not accelerate is the kernel's (and kube-proxy's) to handle.
        Err(reason) => (xdp_action::XDP_PASS, reason),
    };
    stats::count(reason);
    verdict
}

/// Never inlined (it never was: LLVM kept it a BPF-to-BPF subprogram of `lb_ingress`), so
/// the benchmark harness calls exactly the code the attached program runs.
#[inline(never)]
fn try_lb_ingress(ctx: &XdpContext) -> Result<(u32, Reason), Reason> {
    let p = match parse(ctx) {
        Ok(p) => p,
        // IP-in-IP from a peer, ICMP errors: not TCP/UDP, and rare.
        Err(Reason::PassUnknownProto) => return other_ip(ctx),
        Err(reason) => return Err(reason),
    };
    let cfg = CONFIG.get(0).ok_or(Reason::PassInternal)?;
    let ingress = ctx.ingress_ifindex() as u32;

    // A reply to a flow we SNATed to another node: undo SNAT and DNAT, back to the client.
    if let Some(rev) = lb::snat_reply_lookup(cfg, &p) {
        if p.ttl <= 1 {
            return Err(Reason::PassTtl);
        }
        lb::snat_touch(rev);
        let rev = unsafe { &*rev };
        let r = Rewrite {
            saddr: rev.frontend_addr,
            daddr: rev.client_addr,
            sport: rev.frontend_port,
            dport: rev.client_port,
            dmac: &rev.client_mac,
            smac: &rev.node_mac,
        };
        nat::rewrite_xdp(ctx, &p, &r, cfg.flags)?;
        return Ok((xmit(rev.ifindex), Reason::RevNatRemote));
    }

    // A packet tunnelled over UDP (FOU) by a peer node.
    if p.key.proto == PROTO_UDP && cfg.flags & CFG_TUNNEL != 0 && p.key.dport == cfg.tunnel_port {
        return tunnel_in(ctx, cfg, p.l3_off, p.key.saddr, FOU_OVERHEAD as usize);
    }

    // A request another node's lbx SNATed to one of our pods: into the pod, no NAT here.
    if let Some((peer, ep)) = lb::peer_request_lookup(cfg, &p) {
        if p.ttl <= 1 {
            return Err(Reason::PassTtl);
        }
        let (peer_mac, node_mac) = frame_macs(ctx)?;
        lb::peer_learn(peer, ingress, peer_mac, node_mac);
        nat::forward_xdp(ctx, &p, &ep.mac, &ep.node_mac, cfg.flags)?;
        return Ok((xmit(ep.ifindex), Reason::FwdPeer));
    }

    if !lb::is_service_port(&p) {
        return Err(Reason::PassNonService);
    }
    // Established flow first: an entry checked against the current frontends is enough.
    let epoch = lb::frontend_epoch(cfg);
    let ct = lb::ct_lookup(&p, epoch);
    if let CtLookup::Current(entry) = ct {
        if p.ttl <= 1 {
            return Err(Reason::PassTtl);
        }
        if let Some(flow) = lb::ct_reuse(cfg, &p, entry) {
            return dnat_and_deliver(ctx, cfg, &p, &flow, ingress);
        }
    }

    let fe = lb::lookup_service(cfg, &p).ok_or(Reason::PassNonService)?;
    if p.ttl <= 1 {
        return Err(Reason::PassTtl);
    }
    if let CtLookup::Unchecked(entry) = ct {
        if let Some(flow) = lb::ct_recheck(cfg, &p, entry, &fe, epoch) {
            return dnat_and_deliver(ctx, cfg, &p, &flow, ingress);
        }
    }

    // New flow (or one whose entry no longer holds): choose a backend and remember it. A TCP
    // flow we hold no entry for starts only at its SYN: a mid-stream packet without one
    // belongs to a connection the kernel (kube-proxy) carries, because its SYN was passed
    // (no SNAT port, TTL, full tables) or it predates lbx, and taking it over would send it
    // to some other pod. A flow with an entry is ours (the kernel knows nothing of it): when
    // its backend is gone or its entry stale, it is balanced again here. The client's entry
    // may belong to a flow to another frontend: a new flow takes it over only once that one
    // is over.
    match ct {
        CtLookup::Miss if !p.opens_flow() => return Err(Reason::PassMidStream),
        CtLookup::Other(_) if !p.opens_flow() => return Err(Reason::PassMidStream),
        CtLookup::Other(other) if !lb::ct_take_over(cfg, &p, other) => {
            return Err(Reason::PassFlowCollision)
        }
        _ => {}
    }
    let hash = lb::packet_hash(&p);
    let (id, be) = lb::select_backend(cfg, &p, &fe, hash)?;
    let (client_mac, node_mac) = frame_macs(ctx)?;
    let flow = lb::ct_create(cfg, &p, &fe, id, be, client_mac, node_mac, ingress, epoch, hash)?;
    dnat_and_deliver(ctx, cfg, &p, &flow, ingress)
}

/// The frame's (source, destination) MACs.
#[inline(always)]
fn frame_macs(ctx: &XdpContext) -> Result<([u8; 6], [u8; 6]), Reason> {
    let eth: *const EthHdr = ptr_at(ctx, 0).ok_or(Reason::PassInternal)?;
    Ok(unsafe {
        (
            parse::read_mac(core::ptr::addr_of!((*eth).src)),
            parse::read_mac(core::ptr::addr_of!((*eth).dst)),
        )
    })
}

/// The packet's IPv4 TOS byte (the outer header of an encapsulation copies it).
#[inline(always)]
fn tos_of<C: parse::PacketBuf>(ctx: &C, l3_off: usize) -> Result<u8, Reason> {
    let ip: *const Ipv4Hdr = ptr_at(ctx, l3_off).ok_or(Reason::PassInternal)?;
    Ok(unsafe { (*ip).tos })
}

#[inline(always)]
fn dnat_and_deliver(
    ctx: &XdpContext,
    cfg: &Config,
    p: &Parsed,
    flow: &Flow,
    ingress: u32,
) -> Result<(u32, Reason), Reason> {
    let be = flow.backend;
    if be.flags & BE_TUNNEL != 0 && be.flags & BE_LOCAL == 0 {
        return dnat_and_encap(ctx, cfg, p, be, ingress);
    }
    let (saddr, sport, reason) = if be.flags & BE_LOCAL != 0 {
        // One hop, client address kept: straight into the pod's veth.
        (p.key.saddr, p.key.sport, Reason::FwdLocal)
    } else {
        // SNAT mode, pod on another node: SNAT so the reply comes back here.
        (cfg.snat_addr, flow.snat_port, Reason::FwdRemote)
    };
    let r = Rewrite {
        saddr,
        daddr: be.addr[0],
        sport,
        dport: be.port,
        dmac: &be.dmac,
        smac: &be.smac,
    };
    nat::rewrite_xdp(ctx, p, &r, cfg.flags)?;
    Ok((xmit(be.ifindex), reason))
}

/// A request for a pod on another node: DNAT (the client's address kept), then into the
/// tunnel to that node. A packet the tunnel cannot carry with DF set is answered with ICMP
/// fragmentation-needed; without DF it is the kernel's (lbx does not fragment). A packet
/// with TTL 2 would run out on the owning node (one more router), whose XDP program cannot
/// answer for this node's flow: it is answered here with a time-exceeded, from this node's
/// own address (so a traceroute shows this node at that hop too, where kube-proxy's path
/// shows the owning node; no node sends with another node's address).
#[inline(always)]
fn dnat_and_encap(
    ctx: &XdpContext,
    cfg: &Config,
    p: &Parsed,
    be: &lb_common::Backend,
    ingress: u32,
) -> Result<(u32, Reason), Reason> {
    let k = &p.key;
    let e = Encap::of(cfg, be.node_addr, tunnel_entropy(k.saddr, k.daddr, k.sport, k.dport));
    let overhead = e.overhead() as u16;
    let answer = if p.ttl <= 2 {
        Some((cfg.tunnel_addr, icmp::time_exceeded(), Reason::IcmpTimeExceeded))
    } else if cfg.tunnel_mtu != 0 && p.tot_len.saturating_add(overhead) > cfg.tunnel_mtu {
        if !p.df {
            return Err(Reason::PassTooBig);
        }
        let mtu = cfg.tunnel_mtu - overhead;
        Some((p.key.daddr, icmp::frag_needed(mtu), Reason::IcmpTooBig))
    } else {
        None
    };
    if let Some((saddr, h, reason)) = answer {
        icmp::error_xdp(ctx, p, saddr, h)?;
        return Ok((xmit(ingress), reason));
    }
    if p.is_syn() && cfg.tunnel_mtu != 0 {
        tunnel::clamp_mss_xdp(ctx, p, cfg.tunnel_mss())?;
    }
    let tos = tos_of(ctx, p.l3_off)?;
    let r = Rewrite {
        saddr: p.key.saddr,
        daddr: be.addr[0],
        sport: p.key.sport,
        dport: be.port,
        dmac: &be.dmac,
        smac: &be.smac,
    };
    nat::rewrite_xdp(ctx, p, &r, cfg.flags)?;
    tunnel::encap_xdp(ctx, p.l3_off, p.tot_len, tos, &e, &be.dmac, &be.smac)?;
    Ok((xmit(be.ifindex), Reason::FwdTunnel))
}

/// What `lb_ingress` does with IPv4 that is neither TCP nor UDP: IP-in-IP from a peer, ICMP
/// errors of NATed flows; anything else is the kernel's.
#[inline(always)]
fn other_ip(ctx: &XdpContext) -> Result<(u32, Reason), Reason> {
    let l3_off = parse_eth(ctx)?;
    let ip = ipv4_at(ctx, l3_off)?;
    let cfg = CONFIG.get(0).ok_or(Reason::PassInternal)?;
    match ip.proto {
        PROTO_IPIP if cfg.flags & CFG_TUNNEL != 0 => {
            tunnel_in(ctx, cfg, l3_off, ip.saddr, IPIP_OVERHEAD as usize)
        }
        PROTO_ICMP => icmp_in(ctx, cfg, &ip),
        _ => Err(Reason::PassUnknownProto),
    }
}

/// A packet a peer node tunnelled to us (outer IPv4 header at `l3_off`, `overhead` bytes of
/// outer headers): a request for one of our pods (into its veth; where its replies go back
/// is remembered), or a reply of a flow we hold (reverse-NATed to the client). Only known
/// peers' packets are taken.
#[inline(always)]
fn tunnel_in(
    ctx: &XdpContext,
    cfg: &Config,
    l3_off: usize,
    outer_saddr: u32,
    overhead: usize,
) -> Result<(u32, Reason), Reason> {
    match unsafe { PEERS.get(&outer_saddr) } {
        Some(peer) if peer.flags & PEER_TUNNEL != 0 => {}
        _ => return Err(Reason::PassTunnelPeer),
    }
    let inner_off = l3_off + overhead;
    let inner_ip = ipv4_at(ctx, inner_off).map_err(|_| Reason::PassTunnelInner)?;
    let outer: *const Ipv4Hdr = ptr_at(ctx, l3_off).ok_or(Reason::PassInternal)?;
    let outer_len = u16::from_be(unsafe { (*outer).tot_len }) as usize;
    if inner_ip.proto == PROTO_ICMP {
        return tunnel_in_icmp(ctx, cfg, l3_off, overhead, &inner_ip);
    }
    let inner = parse_ipv4_at(ctx, inner_off).map_err(|_| Reason::PassTunnelInner)?;
    if outer_len != overhead + inner.tot_len as usize {
        return Err(Reason::PassTunnelInner);
    }
    if inner.ttl <= 1 {
        return Err(Reason::PassTtl);
    }
    let (peer_mac, node_mac) = frame_macs(ctx)?;
    let ingress = ctx.ingress_ifindex() as u32;

    // A request for one of our pods: remember where its replies go, then into the pod.
    if let Some(ep) = unsafe { LOCAL_ENDPOINTS.get(&inner.key.daddr) } {
        let ep = *ep;
        record_return(&inner, outer_saddr, ingress, peer_mac, node_mac, overhead);
        if inner.key.proto == PROTO_UDP {
            lb::ct_supersede_local(cfg, &inner);
        }
        tunnel::decap_xdp(ctx, l3_off, overhead, &ep.mac, &ep.node_mac)?;
        nat::dec_ttl(ctx, &at_eth(&inner), cfg.flags)?;
        return Ok((xmit(ep.ifindex), Reason::TunnelIn));
    }

    // A reply of a flow we hold: back to the client as the frontend.
    let ct = lb::reply_lookup(cfg, &inner, CT_TUNNEL).ok_or(Reason::PassTunnelInner)?;
    let ct = unsafe { &*ct };
    tunnel::decap_xdp(ctx, l3_off, overhead, &ct.client_mac, &ct.node_mac)?;
    let r = Rewrite {
        saddr: ct.frontend_addr,
        daddr: inner.key.daddr,
        sport: ct.frontend_port,
        dport: inner.key.dport,
        dmac: &ct.client_mac,
        smac: &ct.node_mac,
    };
    nat::rewrite_xdp(ctx, &at_eth(&inner), &r, cfg.flags)?;
    Ok((xmit(ct.ifindex), Reason::RevNatTunnel))
}

/// `inner` as it sits after decapsulation, right behind a plain Ethernet header.
#[inline(always)]
fn at_eth(inner: &Parsed) -> Parsed {
    Parsed {
        l3_off: ETH_HLEN,
        l4_off: ETH_HLEN + IPV4_HLEN,
        key: inner.key,
        ttl: inner.ttl,
        tcp_flags: inner.tcp_flags,
        tot_len: inner.tot_len,
        df: inner.df,
    }
}

/// Remembers the node that holds a tunnelled flow, for the pod's replies: on the flow's
/// first request, again after the entry was evicted, and when a new flow on the same tuple
/// comes from another node.
#[inline(always)]
fn record_return(
    inner: &Parsed,
    peer: u32,
    ifindex: u32,
    peer_mac: [u8; 6],
    node_mac: [u8; 6],
    overhead: usize,
) {
    // A TCP SYN always writes (a new connection; the tuple may have come back through
    // another peer, and a retransmitted SYN only refreshes it): no lookup first on the TCP
    // new-flow path. Otherwise only what is missing or names another peer for a UDP
    // datagram (every one of which may open a flow) is written.
    let syn = inner.key.proto == PROTO_TCP && inner.opens_flow();
    if !syn {
        if let Some(old) = unsafe { RETURNS.get(&inner.key) } {
            if old.peer == peer || !inner.opens_flow() {
                return;
            }
        }
    }
    let entry = ReturnEntry {
        peer,
        ifindex,
        peer_mac,
        node_mac,
        flags: if overhead == FOU_OVERHEAD as usize { RET_FOU } else { 0 },
        _pad0: 0,
        _pad1: 0,
        stamp_s: lb::now_s(),
    };
    // Best effort: without it the pod's replies go to the kernel (counted there).
    let _ = RETURNS.insert(&inner.key, &entry, 0);
}

/// A tunnelled ICMP error: one from the path for one of our pods (a reply of its flow did
/// not fit or expired; the holding node already translated it), or one a pod on the owning
/// node sent about a flow we hold (translated back to the client).
#[inline(always)]
fn tunnel_in_icmp(
    ctx: &XdpContext,
    cfg: &Config,
    l3_off: usize,
    overhead: usize,
    inner_ip: &Ip,
) -> Result<(u32, Reason), Reason> {
    let e = icmp::parse_error(ctx, inner_ip).map_err(|_| Reason::PassTunnelInner)?;
    if e.ttl <= 1 {
        return Err(Reason::PassTtl);
    }
    if let Some(ep) = unsafe { LOCAL_ENDPOINTS.get(&e.daddr) } {
        let ep = *ep;
        tunnel::decap_xdp(ctx, l3_off, overhead, &ep.mac, &ep.node_mac)?;
        let e = shifted(&e, ETH_HLEN);
        let keep = IcmpRewrite {
            saddr: e.saddr,
            daddr: e.daddr,
            quoted: e.quoted,
        };
        icmp::rewrite(ctx, &e, &keep, cfg.flags & lb_common::CFG_DEC_TTL != 0)?;
        return Ok((xmit(ep.ifindex), Reason::TunnelIn));
    }
    let (ct, r) = icmp_from_backend(&e, CT_TUNNEL).ok_or(Reason::PassTunnelInner)?;
    tunnel::decap_xdp(ctx, l3_off, overhead, &ct.client_mac, &ct.node_mac)?;
    icmp::rewrite(ctx, &shifted(&e, ETH_HLEN), &r, cfg.flags & lb_common::CFG_DEC_TTL != 0)?;
    Ok((xmit(ct.ifindex), Reason::IcmpRevNat))
}

/// `e` with its IPv4 header moved to `l3_off` (after decapsulation).
#[inline(always)]
fn shifted(e: &IcmpError, l3_off: usize) -> IcmpError {
    IcmpError {
        l3_off,
        saddr: e.saddr,
        daddr: e.daddr,
        ttl: e.ttl,
        quoted: e.quoted,
        quote_off: l3_off + e.quote_off - e.l3_off,
        tot_len: e.tot_len,
    }
}

/// An ICMP error a backend sent about a request of a flow we hold (the quote is the request
/// as the backend got it: client -> pod), delivered `delivery`: the flow's entry and what the
/// error becomes for the client (from the frontend, quoting client -> frontend).
#[inline(always)]
fn icmp_from_backend(e: &IcmpError, delivery: u8) -> Option<(CtEntry, IcmpRewrite)> {
    let q = &e.quoted;
    let key = lb_common::FlowKey {
        client: q.saddr,
        client_port: q.sport,
        proto: q.proto,
        _pad: 0,
    };
    let ct = *unsafe { CONNTRACK.get(&key) }?;
    if ct.flags & (CT_SNAT | CT_TUNNEL) != delivery {
        return None;
    }
    let be = lb::backend(ct.backend_id)?;
    if be.addr[0] != q.daddr || be.port != q.dport || e.saddr != q.daddr {
        return None;
    }
    let r = IcmpRewrite {
        saddr: ct.frontend_addr,
        daddr: e.daddr,
        quoted: CtKey {
            daddr: ct.frontend_addr,
            dport: ct.frontend_port,
            ..*q
        },
    };
    Some((ct, r))
}

/// An ICMP error arriving on the NIC: from a remote pod about a request we SNATed to it
/// (back to the client), or from the path about a reply of a flow we hold (on to its pod,
/// as if the pod's own reply had caused it). Anything else is the kernel's.
#[inline(always)]
fn icmp_in(ctx: &XdpContext, cfg: &Config, ip: &Ip) -> Result<(u32, Reason), Reason> {
    let e = icmp::parse_error(ctx, ip)?;
    if e.ttl <= 1 {
        return Err(Reason::PassTtl);
    }
    let dec_ttl = cfg.flags & lb_common::CFG_DEC_TTL != 0;
    let q = e.quoted;
    if cfg.snat_addr != 0 && e.daddr == cfg.snat_addr && q.saddr == cfg.snat_addr {
        let rkey = CtKey {
            saddr: q.daddr,
            daddr: q.saddr,
            sport: q.dport,
            dport: q.sport,
            ..q
        };
        if let Some(rev) = unsafe { REVNAT.get(&rkey) } {
            if rev.flags & REV_SNAT != 0 {
                let rev = *rev;
                let r = IcmpRewrite {
                    saddr: rev.frontend_addr,
                    daddr: rev.client_addr,
                    quoted: CtKey {
                        saddr: rev.client_addr,
                        sport: rev.client_port,
                        daddr: rev.frontend_addr,
                        dport: rev.frontend_port,
                        ..q
                    },
                };
                icmp::rewrite(ctx, &e, &r, dec_ttl)?;
                set_macs(ctx, &rev.client_mac, &rev.node_mac)?;
                return Ok((xmit(rev.ifindex), Reason::IcmpRevNat));
            }
        }
    }

    // About a reply of ours: the quote is frontend -> client.
    let key = lb_common::FlowKey {
        client: q.daddr,
        client_port: q.dport,
        proto: q.proto,
        _pad: 0,
    };
    let ct = *unsafe { CONNTRACK.get(&key) }.ok_or(Reason::PassNonService)?;
    if ct.frontend_addr != q.saddr || ct.frontend_port != q.sport || e.daddr != q.saddr {
        return Err(Reason::PassNonService);
    }
    let be = lb::backend(ct.backend_id).ok_or(Reason::PassNonService)?;
    let (qs, qsport) = if ct.flags & CT_SNAT != 0 {
        (cfg.snat_addr, ct.snat_port)
    } else {
        (q.daddr, q.dport)
    };
    // The pod's reply went pod -> client (or -> the SNAT address and port).
    let r = IcmpRewrite {
        saddr: e.saddr,
        daddr: be.addr[0],
        quoted: CtKey {
            saddr: be.addr[0],
            sport: be.port,
            daddr: qs,
            dport: qsport,
            ..q
        },
    };
    icmp::rewrite(ctx, &e, &r, dec_ttl)?;
    if be.flags & BE_TUNNEL != 0 && be.flags & BE_LOCAL == 0 {
        let tot_len: *const Ipv4Hdr = ptr_at(ctx, e.l3_off).ok_or(Reason::PassInternal)?;
        let (len, tos) = unsafe { (u16::from_be((*tot_len).tot_len), (*tot_len).tos) };
        let enc = Encap::of(cfg, be.node_addr, (q.sport as u32 ^ q.daddr) as u16);
        tunnel::encap_xdp(ctx, e.l3_off, len, tos, &enc, &be.dmac, &be.smac)?;
    } else {
        set_macs(ctx, &be.dmac, &be.smac)?;
    }
    Ok((xmit(be.ifindex), Reason::IcmpToBackend))
}

#[inline(always)]
fn set_macs<C: parse::PacketBuf>(ctx: &C, dmac: &[u8; 6], smac: &[u8; 6]) -> Result<(), Reason> {
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(Reason::PassInternal)?;
    unsafe {
        parse::copy_mac(core::ptr::addr_of_mut!((*eth).dst), dmac);
        parse::copy_mac(core::ptr::addr_of_mut!((*eth).src), smac);
    }
    Ok(())
}

/// Sends the frame out of `ifindex`. Also for the interface it came in on: XDP_TX there
/// leaves frames queued on a veth until the peer's next poll (seconds in the lab), while
/// a redirect to self flushes at once; on physical NICs redirect-to-self costs a little more
/// than XDP_TX.
#[inline(always)]
fn xmit(ifindex: u32) -> u32 {
    unsafe { bpf_redirect(ifindex, 0) as u32 }
}

/// XDP_PASS and nothing else. For the peer of a veth that `lb_ingress` redirects into (veth
/// accepts redirected frames only when its peer runs XDP or has GRO on), and the benchmark's
/// measure of what running any XDP program costs.
#[xdp]
pub fn lb_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[classifier]
pub fn lb_reply(mut ctx: TcContext) -> i32 {
    let (verdict, reason) = match try_lb_reply(&mut ctx) {
        Ok(done) => done,
        Err(reason) => (TC_ACT_OK, reason),
    };
    stats::count(reason);
    verdict
}

fn try_lb_reply(ctx: &mut TcContext) -> Result<(i32, Reason), Reason> {
    let p = match parse(ctx) {
        Ok(p) => p,
        Err(Reason::PassUnknownProto) => return reply_other(ctx),
        Err(_) => {
            // Headers may sit in a non-linear skb: pull them in once and parse again.
            let len = core::cmp::min(ctx.len(), 64);
            ctx.pull_data(len).map_err(|_| Reason::PassTruncL4)?;
            parse(ctx)?
        }
    };
    let cfg = CONFIG.get(0).ok_or(Reason::PassInternal)?;

    // A reply of a flow this node holds, from the local pod that serves it.
    if let Some(ct) = lb::reply_lookup(cfg, &p, 0) {
        if p.ttl <= 1 {
            return Err(Reason::PassTtl);
        }
        let ct = unsafe { &*ct };
        let r = Rewrite {
            saddr: ct.frontend_addr,
            daddr: p.key.daddr,
            sport: ct.frontend_port,
            dport: p.key.dport,
            dmac: &ct.client_mac,
            smac: &ct.node_mac,
        };
        nat::rev_nat_tc(ctx, &p, &r, cfg.flags)?;
        return redirect_tc(ct.ifindex, Reason::RevNatLocal);
    }

    // A reply of a flow another node holds and tunnelled to this pod: back through the tunnel.
    if cfg.flags & CFG_TUNNEL != 0 {
        if let Some(ret) = unsafe { RETURNS.get(&returns_key(&p.key)) } {
            let ret = *ret;
            return tunnel_reply(ctx, cfg, &p, &ret);
        }
    }
    reply_to_peer(ctx, cfg, &p)
}

/// The RETURNS key of a pod's reply: the request's inner 5-tuple (client -> pod).
#[inline(always)]
fn returns_key(reply: &CtKey) -> CtKey {
    CtKey {
        saddr: reply.daddr,
        daddr: reply.saddr,
        sport: reply.dport,
        dport: reply.sport,
        ..*reply
    }
}

#[inline(always)]
fn redirect_tc(ifindex: u32, reason: Reason) -> Result<(i32, Reason), Reason> {
    let verdict = unsafe { bpf_redirect(ifindex, 0) } as i32;
    if verdict != TC_ACT_REDIRECT {
        return Ok((verdict, Reason::DropRedirectFailed));
    }
    Ok((verdict, reason))
}

/// A local pod's reply to a tunnelled flow: encapsulated back to the node that holds it.
/// The SYN-ACK's MSS is clamped so the client's segments fit the tunnel; a reply that does
/// not fit with DF set gets an ICMP fragmentation-needed back into the pod (GSO packets are
/// segmented to fit by the kernel).
#[inline(always)]
fn tunnel_reply(
    ctx: &mut TcContext,
    cfg: &Config,
    p: &Parsed,
    ret: &ReturnEntry,
) -> Result<(i32, Reason), Reason> {
    if p.ttl <= 1 {
        return Err(Reason::PassTtl);
    }
    let e = Encap {
        fou: ret.flags & RET_FOU != 0,
        saddr: cfg.tunnel_addr,
        daddr: ret.peer,
        port: cfg.tunnel_port,
        entropy: tunnel_entropy(p.key.saddr, p.key.daddr, p.key.sport, p.key.dport),
    };
    let overhead = e.overhead() as u16;
    let gso = unsafe { (*ctx.skb.skb).gso_size };
    if cfg.tunnel_mtu != 0 && gso == 0 && p.tot_len.saturating_add(overhead) > cfg.tunnel_mtu {
        if !p.df {
            return Err(Reason::PassTooBig);
        }
        icmp::too_big_tc(ctx, p, cfg.tunnel_addr, cfg.tunnel_mtu - overhead)?;
        let ifindex = unsafe { (*ctx.skb.skb).ifindex };
        return redirect_tc(ifindex, Reason::IcmpTooBig);
    }
    if p.is_syn() && cfg.tunnel_mtu != 0 {
        tunnel::clamp_mss_tc(ctx, p, cfg.tunnel_mss())?;
    }
    nat::dec_ttl_tc(ctx, p, cfg.flags)?;
    let tos = {
        let t: u8 = ctx.load(p.l3_off + 1).map_err(|_| Reason::PassInternal)?;
        t
    };
    tunnel::encap_tc(ctx, p.tot_len, tos, &e, &ret.peer_mac, &ret.node_mac)?;
    redirect_tc(ret.ifindex, Reason::TunnelReply)
}

/// A local pod's reply to a flow a peer node forwarded (its SNAT address is the
/// destination): straight back out of the interface the peer's requests came in on. The
/// peer's XDP program undoes its NAT.
#[inline(always)]
fn reply_to_peer(
    ctx: &mut TcContext,
    cfg: &Config,
    p: &Parsed,
) -> Result<(i32, Reason), Reason> {
    let peer = lb::peer_reply_lookup(cfg, p.key.daddr).ok_or(Reason::PassNotReply)?;
    if p.ttl <= 1 {
        return Err(Reason::PassTtl);
    }
    nat::forward_tc(ctx, p, &peer.mac, &peer.node_mac, cfg.flags)?;
    redirect_tc(peer.ifindex, Reason::ReplyPeer)
}

/// An ICMP error from a local pod about a flow's request (a UDP port unreachable, say):
/// translated back to the client for a flow this node holds, or sent back through the
/// tunnel (or to the peer) for a flow another node holds.
#[inline(always)]
fn reply_other(ctx: &mut TcContext) -> Result<(i32, Reason), Reason> {
    // ICMP errors are short: their headers and quote fit in the linear part once pulled.
    let len = core::cmp::min(ctx.len(), 128);
    ctx.pull_data(len).map_err(|_| Reason::PassTruncL4)?;
    let l3_off = parse_eth(ctx)?;
    let ip = ipv4_at(ctx, l3_off)?;
    if ip.proto != PROTO_ICMP {
        return Err(Reason::PassUnknownProto);
    }
    let cfg = CONFIG.get(0).ok_or(Reason::PassInternal)?;
    let e = icmp::parse_error(ctx, &ip)?;
    if e.ttl <= 1 {
        return Err(Reason::PassTtl);
    }
    if let Some((ct, r)) = icmp_from_backend(&e, 0) {
        icmp::rewrite(ctx, &e, &r, cfg.flags & lb_common::CFG_DEC_TTL != 0)?;
        set_macs(ctx, &ct.client_mac, &ct.node_mac)?;
        return redirect_tc(ct.ifindex, Reason::IcmpRevNat);
    }
    if cfg.flags & CFG_TUNNEL != 0 {
        if let Some(ret) = unsafe { RETURNS.get(&e.quoted) } {
            let ret = *ret;
            let enc = Encap {
                fou: ret.flags & RET_FOU != 0,
                saddr: cfg.tunnel_addr,
                daddr: ret.peer,
                port: cfg.tunnel_port,
                entropy: e.quoted.sport,
            };
            let tot_len = e.tot_len;
            let tos = {
                let t: u8 = ctx.load(l3_off + 1).map_err(|_| Reason::PassInternal)?;
                t
            };
            tunnel::encap_tc(ctx, tot_len, tos, &enc, &ret.peer_mac, &ret.node_mac)?;
            return redirect_tc(ret.ifindex, Reason::TunnelReply);
        }
    }
    let peer = lb::peer_reply_lookup(cfg, e.daddr).ok_or(Reason::PassNotReply)?;
    set_macs(ctx, &peer.mac, &peer.node_mac)?;
    redirect_tc(peer.ifindex, Reason::ReplyPeer)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

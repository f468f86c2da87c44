//! The data plane's kernel side. Two programs share the maps in `maps`:
//! - `lb_ingress` (XDP, on the node NIC): service traffic in, reverse-NAT of replies to
//!   SNATed flows;
//! - `lb_reply` (TC ingress, on local pods' host-side veths): reverse-NAT of pod replies.
//!
//! A flow whose backend is on another node crosses both nodes without netfilter: the
//! receiving node SNATs and forwards it; the owning node sees it come from a peer's SNAT
//! address (`PEERS`) to a local endpoint and redirects it into the pod, and `lb_reply`
//! sends the pod's replies to that address straight back out.
//!
//! The request path reads top to bottom: parse, the service-port bitmap, ct_lookup (an
//! established flow whose entry is current goes straight to dnat: one hash lookup),
//! lookup_service, select_backend (TCP without an entry: only for a SYN), ct_create, dnat (rewrite),
//! redirect. Why skipping the frontend lookup for established flows is sound:
//! `lb::ct_lookup`. Every packet ends in exactly one counted `Reason`.
#![no_std]
#![no_main]

mod lb;
mod maps;
mod nat;
mod parse;
mod reference;
mod stats;

use aya_ebpf::{
    bindings::{xdp_action, TC_ACT_OK, TC_ACT_REDIRECT},
    helpers::bpf_redirect,
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use lb_common::{Reason, BE_LOCAL, REV_SNAT};

use crate::{
    lb::{CtLookup, Flow},
    maps::CONFIG,
    nat::Rewrite,
    parse::{parse, ptr_at, EthHdr},
};

#[xdp]
pub fn lb_ingress(ctx: XdpContext) -> u32 {
    let (verdict, reason) = match try_lb_ingress(&ctx) {
        Ok(done) => done,
        // Anything we do not accelerate is the kernel's (and kube-proxy's) to handle.
        Err(reason) => (xdp_action::XDP_PASS, reason),
    };
    stats::count(reason);
    verdict
}

fn try_lb_ingress(ctx: &XdpContext) -> Result<(u32, Reason), Reason> {
    let p = parse(ctx)?;
    let cfg = CONFIG.get(0).ok_or(Reason::PassInternal)?;
    let ingress = ctx.ingress_ifindex() as u32;

    // A reply to a flow we forwarded to another node: undo SNAT and DNAT, back to the client.
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

    // A request another node's lbx sent to one of our pods: into the pod, no NAT here.
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
            return dnat_and_deliver(ctx, cfg, &p, &flow);
        }
    }

    let fe = lb::lookup_service(cfg, &p).ok_or(Reason::PassNonService)?;
    if p.ttl <= 1 {
        return Err(Reason::PassTtl);
    }
    if let CtLookup::Unchecked(entry) = ct {
        if let Some(flow) = lb::ct_recheck(cfg, &p, entry, &fe, epoch) {
            return dnat_and_deliver(ctx, cfg, &p, &flow);
        }
    }

    // New flow (or one whose entry no longer holds): choose a backend and remember it. A TCP
    // flow we hold no entry for starts only at its SYN: a mid-stream packet without one
    // belongs to a connection the kernel (kube-proxy) carries, because its SYN was passed
    // (no SNAT port, TTL, full tables) or it predates lbx, and taking it over would send it
    // to some other pod. A flow with an entry is ours (the kernel knows nothing of it): when
    // its backend is gone or its entry stale, it is balanced again here.
    if matches!(ct, CtLookup::Miss) && !p.opens_flow() {
        return Err(Reason::PassMidStream);
    }
    let hash = lb::packet_hash(&p);
    let (id, be) = lb::select_backend(cfg, &p, &fe, hash)?;
    let (client_mac, node_mac) = frame_macs(ctx)?;
    let flow = lb::ct_create(cfg, &p, &fe, id, be, client_mac, node_mac, ingress, epoch, hash)?;
    dnat_and_deliver(ctx, cfg, &p, &flow)
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

#[inline(always)]
fn dnat_and_deliver(
    ctx: &XdpContext,
    cfg: &lb_common::Config,
    p: &parse::Parsed,
    flow: &Flow,
) -> Result<(u32, Reason), Reason> {
    let be = flow.backend;
    let (saddr, sport, reason) = if be.flags & BE_LOCAL != 0 {
        // One hop, client address kept: straight into the pod's veth.
        (p.key.saddr, p.key.sport, Reason::FwdLocal)
    } else {
        // externalTrafficPolicy Cluster, pod on another node: SNAT so the reply comes back here.
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
        Err(_) => {
            // Headers may sit in a non-linear skb: pull them in once and parse again.
            let len = core::cmp::min(ctx.len(), 64);
            ctx.pull_data(len).map_err(|_| Reason::PassTruncL4)?;
            parse(ctx)?
        }
    };
    let cfg = CONFIG.get(0).ok_or(Reason::PassInternal)?;
    let rev = match lb::revnat_lookup(cfg, &p, lb::ct_key(&p)) {
        Some(rev) if unsafe { (*rev).flags } & REV_SNAT == 0 => unsafe { *rev },
        _ => return reply_to_peer(ctx, cfg, &p),
    };
    if p.ttl <= 1 {
        return Err(Reason::PassTtl);
    }
    let r = Rewrite {
        saddr: rev.frontend_addr,
        daddr: p.key.daddr,
        sport: rev.frontend_port,
        dport: p.key.dport,
        dmac: &rev.client_mac,
        smac: &rev.node_mac,
    };
    nat::rev_nat_tc(ctx, &p, &r, cfg.flags)?;
    let verdict = unsafe { bpf_redirect(rev.ifindex, 0) } as i32;
    if verdict != TC_ACT_REDIRECT {
        return Ok((verdict, Reason::DropRedirectFailed));
    }
    Ok((verdict, Reason::RevNatLocal))
}

/// A local pod's reply to a flow a peer node forwarded (its SNAT address is the
/// destination): straight back out of the interface the peer's requests came in on. The
/// peer's XDP program undoes its NAT.
#[inline(always)]
fn reply_to_peer(
    ctx: &mut TcContext,
    cfg: &lb_common::Config,
    p: &parse::Parsed,
) -> Result<(i32, Reason), Reason> {
    let peer = lb::peer_reply_lookup(cfg, p).ok_or(Reason::PassNotReply)?;
    if p.ttl <= 1 {
        return Err(Reason::PassTtl);
    }
    nat::forward_tc(ctx, p, &peer.mac, &peer.node_mac, cfg.flags)?;
    let verdict = unsafe { bpf_redirect(peer.ifindex, 0) } as i32;
    if verdict != TC_ACT_REDIRECT {
        return Ok((verdict, Reason::DropRedirectFailed));
    }
    Ok((verdict, Reason::ReplyPeer))
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

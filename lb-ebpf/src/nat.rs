//! Header rewrites: DNAT/SNAT/reverse-NAT with incremental checksums and a router's TTL
//! decrement. XDP rewrites the packet in place (checksums on the wire are complete); TC uses
//! the kernel's checksum helpers, which also handle CHECKSUM_PARTIAL skbs from local pods.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::{TcContext, XdpContext},
};
use lb_common::{csum, Reason, CFG_DEC_TTL, PROTO_UDP};

use core::ptr::addr_of_mut;

use crate::parse::{
    copy_mac, ptr_at, EthHdr, Ipv4Hdr, Ipv4TcpHead, Ipv4UdpHead, PacketBuf, Parsed, Ports,
};

/// What the packet's headers become. The MACs are borrowed from the map value (or its copy)
/// that holds them, so they go into the packet without a detour over the stack.
pub struct Rewrite<'a> {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub dmac: &'a [u8; 6],
    pub smac: &'a [u8; 6],
}

/// Offset of the TTL/protocol 16-bit word inside the IPv4 header.
const IP_TTL_OFF: usize = 8;
const IP_CSUM_OFF: usize = 10;
const IP_SADDR_OFF: usize = 12;
const ETH_SRC_OFF: usize = 6;

#[inline(always)]
fn ttl_word(ttl: u8, proto: u8) -> u16 {
    u16::from_ne_bytes([ttl, proto])
}

/// Rewrites an XDP packet in place.
#[inline(always)]
pub fn rewrite_xdp(ctx: &XdpContext, p: &Parsed, r: &Rewrite, cfg_flags: u32) -> Result<(), Reason> {
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(Reason::PassInternal)?;
    // IPv4 and L4 headers behind one bounds check (`parse` took only IHL 5: L4 follows at 20).
    let udp = p.key.proto == PROTO_UDP;
    let (ip, ports, l4_csum): (*mut Ipv4Hdr, *mut Ports, *mut u16) = unsafe {
        if udp {
            let h: *mut Ipv4UdpHead = ptr_at(ctx, p.l3_off).ok_or(Reason::PassInternal)?;
            (addr_of_mut!((*h).ip), addr_of_mut!((*h).ports), addr_of_mut!((*h).check))
        } else {
            let h: *mut Ipv4TcpHead = ptr_at(ctx, p.l3_off).ok_or(Reason::PassInternal)?;
            (addr_of_mut!((*h).ip), addr_of_mut!((*h).ports), addr_of_mut!((*h).check))
        }
    };
    unsafe {
        copy_mac(addr_of_mut!((*eth).dst), r.dmac);
        copy_mac(addr_of_mut!((*eth).src), r.smac);

        // One summed change per checksum: the addresses are in both (the L4 one through
        // its pseudo-header), the ports only in L4, the TTL only in IPv4. A DNAT to a
        // local pod keeps the source: its terms are skipped.
        let mut addrs = csum::diff4(p.key.daddr, r.daddr);
        let mut ports_diff = csum::diff2(p.key.dport, r.dport);
        if r.saddr != p.key.saddr || r.sport != p.key.sport {
            addrs += csum::diff4(p.key.saddr, r.saddr);
            ports_diff += csum::diff2(p.key.sport, r.sport);
        }
        let ip = &mut *ip;
        let mut ip_diff = addrs;
        if cfg_flags & CFG_DEC_TTL != 0 {
            let new_ttl = p.ttl - 1;
            ip_diff += csum::diff2(ttl_word(p.ttl, p.key.proto), ttl_word(new_ttl, p.key.proto));
            ip.ttl = new_ttl;
        }
        ip.check = csum::apply(ip.check, ip_diff);
        ip.saddr = r.saddr;
        ip.daddr = r.daddr;

        let l4_diff = addrs + ports_diff;
        *l4_csum = if udp {
            csum::udp_apply(*l4_csum, l4_diff)
        } else {
            csum::apply(*l4_csum, l4_diff)
        };
        (*ports).sport = r.sport;
        (*ports).dport = r.dport;
    }
    Ok(())
}

/// The router's TTL decrement of the IPv4 header at `p.l3_off` (its checksum follows; the L4
/// checksum does not cover the TTL), for direct packet access (XDP; TC after a pull).
#[inline(always)]
pub fn dec_ttl<C: PacketBuf>(ctx: &C, p: &Parsed, cfg_flags: u32) -> Result<(), Reason> {
    if cfg_flags & CFG_DEC_TTL == 0 {
        return Ok(());
    }
    let ip: *mut Ipv4Hdr = ptr_at(ctx, p.l3_off).ok_or(Reason::PassInternal)?;
    unsafe {
        let ip = &mut *ip;
        let new_ttl = p.ttl - 1;
        ip.check = csum::replace2(ip.check, ttl_word(p.ttl, p.key.proto), ttl_word(new_ttl, p.key.proto));
        ip.ttl = new_ttl;
    }
    Ok(())
}

/// The TTL decrement for TC, through the kernel's checksum helper.
#[inline(always)]
pub fn dec_ttl_tc(ctx: &mut TcContext, p: &Parsed, cfg_flags: u32) -> Result<(), Reason> {
    if cfg_flags & CFG_DEC_TTL == 0 {
        return Ok(());
    }
    let e = |_| Reason::PassInternal;
    let new_ttl = p.ttl - 1;
    ctx.l3_csum_replace(
        p.l3_off + IP_CSUM_OFF,
        ttl_word(p.ttl, p.key.proto) as u64,
        ttl_word(new_ttl, p.key.proto) as u64,
        2,
    )
    .map_err(e)?;
    ctx.store(p.l3_off + IP_TTL_OFF, &new_ttl, 0).map_err(e)
}

/// Forwards an XDP packet as a router would, addresses and ports untouched: new MACs and
/// the TTL decrement (the IPv4 checksum follows; the L4 checksum does not cover the TTL).
#[inline(always)]
pub fn forward_xdp(
    ctx: &XdpContext,
    p: &Parsed,
    dmac: &[u8; 6],
    smac: &[u8; 6],
    cfg_flags: u32,
) -> Result<(), Reason> {
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(Reason::PassInternal)?;
    unsafe {
        copy_mac(addr_of_mut!((*eth).dst), dmac);
        copy_mac(addr_of_mut!((*eth).src), smac);
    }
    dec_ttl(ctx, p, cfg_flags)
}

/// [`forward_xdp`] for TC (a local pod's reply to a peer node): MACs and TTL only.
#[inline(always)]
pub fn forward_tc(
    ctx: &mut TcContext,
    p: &Parsed,
    dmac: &[u8; 6],
    smac: &[u8; 6],
    cfg_flags: u32,
) -> Result<(), Reason> {
    let e = |_| Reason::PassInternal;
    dec_ttl_tc(ctx, p, cfg_flags)?;
    ctx.store(0, dmac, 0).map_err(e)?;
    ctx.store(ETH_SRC_OFF, smac, 0).map_err(e)?;
    Ok(())
}

/// Reverse NAT of a reply from a local pod (TC): the source becomes the frontend again.
/// Only the source address/port, TTL and MACs change; the destination is the client already.
#[inline(always)]
pub fn rev_nat_tc(ctx: &mut TcContext, p: &Parsed, r: &Rewrite, cfg_flags: u32) -> Result<(), Reason> {
    let l4_csum_off = p.l4_csum_off();
    let mangled0 = if p.key.proto == PROTO_UDP { BPF_F_MARK_MANGLED_0 as u64 } else { 0 };
    let ip_csum_off = p.l3_off + IP_CSUM_OFF;
    let e = |_| Reason::PassInternal;

    ctx.l4_csum_replace(l4_csum_off, p.key.saddr as u64, r.saddr as u64, BPF_F_PSEUDO_HDR as u64 | mangled0 | 4)
        .map_err(e)?;
    ctx.l4_csum_replace(l4_csum_off, p.key.sport as u64, r.sport as u64, mangled0 | 2)
        .map_err(e)?;
    ctx.l3_csum_replace(ip_csum_off, p.key.saddr as u64, r.saddr as u64, 4)
        .map_err(e)?;
    ctx.store(p.l3_off + IP_SADDR_OFF, &r.saddr, 0).map_err(e)?;
    ctx.store(p.l4_off, &r.sport, 0).map_err(e)?;
    // The router's part (TTL, MACs) is the same as for a forwarded reply.
    forward_tc(ctx, p, r.dmac, r.smac, cfg_flags)
}

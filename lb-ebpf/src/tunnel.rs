//! The tunnel to the node that owns a remote backend: IP-in-IP (IP protocol 4) by default,
//! FOU (IPv4 in UDP to `Config::tunnel_port`) for networks that drop protocol 4. The node
//! that holds a flow encapsulates its requests (XDP), the owning node decapsulates them into
//! the pod (XDP) and encapsulates the pod's replies back (TC); the holding node decapsulates
//! and reverse-NATs those. Outer headers carry each node's own address only, so nothing
//! leaves a node with another node's source. Encapsulation adds bytes: TCP SYNs and SYN-ACKs
//! get their MSS clamped to what fits, and a DF packet that does not fit is answered with an
//! ICMP fragmentation-needed (`icmp`).

use aya_ebpf::{
    bindings::{BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L4_UDP},
    bindings::bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    helpers::bpf_xdp_adjust_head,
    programs::{TcContext, XdpContext},
    EbpfContext,
};
use lb_common::{csum, Config, Reason, CFG_TUNNEL_FOU, PROTO_TCP, PROTO_UDP};

use crate::parse::{
    copy_mac, ptr_at, EthHdr, Ipv4Hdr, PacketBuf, Parsed, ETH_HLEN, ETH_P_8021Q, ETH_P_IP,
    IPV4_HLEN, IP_DF, PROTO_IPIP, TCP_HLEN, UDP_HLEN, VLAN_HLEN,
};

/// The outer headers of an encapsulation, written in one piece.
#[repr(C)]
struct OuterFou {
    ip: Ipv4Hdr,
    sport: u16,
    dport: u16,
    len: u16,
    check: u16,
}

/// How a packet is tunnelled: which encapsulation, between which node addresses.
pub struct Encap {
    pub fou: bool,
    pub saddr: u32,
    pub daddr: u32,
    /// FOU's destination port (network order).
    pub port: u16,
    /// Spreads flows over ECMP paths: FOU's source port (the outer IPv4 ID otherwise).
    pub entropy: u16,
}

impl Encap {
    #[inline(always)]
    pub fn of(cfg: &Config, daddr: u32, entropy: u16) -> Encap {
        Encap {
            fou: cfg.flags & CFG_TUNNEL_FOU != 0,
            saddr: cfg.tunnel_addr,
            daddr,
            port: cfg.tunnel_port,
            entropy,
        }
    }

    #[inline(always)]
    pub fn overhead(&self) -> usize {
        if self.fou {
            IPV4_HLEN + UDP_HLEN
        } else {
            IPV4_HLEN
        }
    }
}

/// The outer IPv4 header (and UDP header for FOU) around an inner packet of `inner_len`
/// bytes with TOS `tos`. DF set: the path's MTU shows instead of fragmenting.
#[inline(always)]
fn outer(e: &Encap, inner_len: u16, tos: u8) -> OuterFou {
    let tot_len = inner_len.wrapping_add(e.overhead() as u16);
    let mut ip = Ipv4Hdr {
        ver_ihl: 0x45,
        tos,
        tot_len: tot_len.to_be(),
        id: if e.fou { 0 } else { e.entropy },
        frag_off: IP_DF,
        ttl: 64,
        proto: if e.fou { PROTO_UDP } else { PROTO_IPIP },
        check: 0,
        saddr: e.saddr,
        daddr: e.daddr,
    };
    ip.check = ipv4_checksum(&ip);
    OuterFou {
        ip,
        // An ephemeral-range port per flow: ECMP paths and receive queues spread flows.
        sport: (0xc000 | e.entropy).to_be(),
        dport: e.port,
        len: (inner_len.wrapping_add(UDP_HLEN as u16)).to_be(),
        // IPv4 UDP may go without a checksum (RFC 768); FOU leaves it to the inner one.
        check: 0,
    }
}

/// The checksum of an IPv4 header without options (its `check` field zero).
#[inline(always)]
pub fn ipv4_checksum(ip: &Ipv4Hdr) -> u16 {
    let w = |a: u8, b: u8| u16::from_ne_bytes([a, b]) as u32;
    let mut sum = w(ip.ver_ihl, ip.tos)
        + ip.tot_len as u32
        + ip.id as u32
        + ip.frag_off as u32
        + w(ip.ttl, ip.proto)
        + (ip.saddr & 0xffff)
        + (ip.saddr >> 16)
        + (ip.daddr & 0xffff)
        + (ip.daddr >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Encapsulates the packet at `l3_off` (its IPv4 header already rewritten: `inner_len`
/// bytes, TOS `tos`) for `e`, with new MACs; the frame keeps its 802.1Q tag, if any.
#[inline(always)]
pub fn encap_xdp(
    ctx: &XdpContext,
    l3_off: usize,
    inner_len: u16,
    tos: u8,
    e: &Encap,
    dmac: &[u8; 6],
    smac: &[u8; 6],
) -> Result<(), Reason> {
    let vlan: Option<u16> = if l3_off == ETH_HLEN + VLAN_HLEN {
        let tci: *const u16 = ptr_at(ctx, ETH_HLEN).ok_or(Reason::PassInternal)?;
        Some(unsafe { *tci })
    } else {
        None
    };
    let overhead = e.overhead();
    if unsafe { bpf_xdp_adjust_head(ctx.as_ptr() as *mut _, -(overhead as i32)) } != 0 {
        return Err(Reason::PassInternal);
    }
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(Reason::PassInternal)?;
    unsafe {
        copy_mac(core::ptr::addr_of_mut!((*eth).dst), dmac);
        copy_mac(core::ptr::addr_of_mut!((*eth).src), smac);
    }
    let o = outer(e, inner_len, tos);
    match vlan {
        Some(tci) => {
            let tag: *mut [u16; 2] = ptr_at(ctx, ETH_HLEN).ok_or(Reason::PassInternal)?;
            unsafe {
                (*eth).proto = ETH_P_8021Q;
                *tag = [tci, ETH_P_IP];
            }
            write_outer(ctx, ETH_HLEN + VLAN_HLEN, &o, e.fou)
        }
        None => {
            unsafe { (*eth).proto = ETH_P_IP };
            write_outer(ctx, ETH_HLEN, &o, e.fou)
        }
    }
}

#[inline(always)]
fn write_outer<C: PacketBuf>(ctx: &C, off: usize, o: &OuterFou, fou: bool) -> Result<(), Reason> {
    if fou {
        let dst: *mut OuterFou = ptr_at(ctx, off).ok_or(Reason::PassInternal)?;
        unsafe { core::ptr::write_unaligned(dst, core::ptr::read(o)) };
    } else {
        let dst: *mut Ipv4Hdr = ptr_at(ctx, off).ok_or(Reason::PassInternal)?;
        unsafe { core::ptr::write_unaligned(dst, core::ptr::read(&o.ip)) };
    }
    Ok(())
}

/// Strips the outer headers (`overhead` bytes after the IPv4 header at `l3_off`) and gives
/// the inner packet a plain Ethernet header with these MACs (pods are not VLAN-tagged).
#[inline(always)]
pub fn decap_xdp(
    ctx: &XdpContext,
    l3_off: usize,
    overhead: usize,
    dmac: &[u8; 6],
    smac: &[u8; 6],
) -> Result<(), Reason> {
    // The inner IPv4 header sits at l3_off + overhead; afterwards it must sit at ETH_HLEN.
    let delta = (l3_off + overhead - ETH_HLEN) as i32;
    if unsafe { bpf_xdp_adjust_head(ctx.as_ptr() as *mut _, delta) } != 0 {
        return Err(Reason::PassInternal);
    }
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(Reason::PassInternal)?;
    unsafe {
        copy_mac(core::ptr::addr_of_mut!((*eth).dst), dmac);
        copy_mac(core::ptr::addr_of_mut!((*eth).src), smac);
        (*eth).proto = ETH_P_IP;
    }
    Ok(())
}

/// Encapsulates an skb from a local pod (plain Ethernet + IPv4, `inner_len` bytes) for `e`,
/// with new MACs. GSO packets stay GSO: the kernel segments the inner packet and repeats
/// the outer headers (the encap flags tell it how).
#[inline(always)]
pub fn encap_tc(
    ctx: &mut TcContext,
    inner_len: u16,
    tos: u8,
    e: &Encap,
    dmac: &[u8; 6],
    smac: &[u8; 6],
) -> Result<(), Reason> {
    let mut flags = BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 as u64;
    if e.fou {
        flags |= BPF_F_ADJ_ROOM_ENCAP_L4_UDP as u64;
    }
    ctx.adjust_room(e.overhead() as i32, BPF_ADJ_ROOM_MAC, flags)
        .map_err(|_| Reason::PassInternal)?;
    let o = outer(e, inner_len, tos);
    let err = |_| Reason::PassInternal;
    if e.fou {
        ctx.store(ETH_HLEN, &o, 0).map_err(err)?;
    } else {
        ctx.store(ETH_HLEN, &o.ip, 0).map_err(err)?;
    }
    ctx.store(0, dmac, 0).map_err(err)?;
    ctx.store(6, smac, 0).map_err(err)?;
    Ok(())
}

/// The TCP header's MSS option of a SYN or SYN-ACK: the offset of its value (from the
/// frame's start) and the value (host order). Only an MSS option in the first place counts:
/// where Linux, Windows and the BSDs (macOS) put it in every SYN and SYN-ACK. A walk over
/// options in any order multiplies the verifier's states on every path that reaches it (the
/// object no longer loads); a segment whose MSS sits elsewhere keeps it, and the tunnel's
/// fragmentation-needed answer (DF) still makes its sender shrink what does not fit.
#[inline(always)]
pub fn find_mss<C: PacketBuf>(ctx: &C, p: &Parsed) -> Option<(usize, u16)> {
    if p.key.proto != PROTO_TCP {
        return None;
    }
    let doff: *const u8 = ptr_at(ctx, p.l4_off + 12)?;
    let hlen = ((unsafe { *doff } >> 4) as usize) * 4;
    if hlen < TCP_HLEN + 4 {
        return None;
    }
    let opt: *const [u8; 4] = ptr_at(ctx, p.l4_off + TCP_HLEN)?;
    let [kind, len, hi, lo] = unsafe { *opt };
    if kind != 2 || len != 4 {
        return None;
    }
    Some((p.l4_off + TCP_HLEN + 2, u16::from_be_bytes([hi, lo])))
}

/// Clamps the MSS option of a SYN or SYN-ACK to `mss` (XDP: the checksum is complete on the
/// wire and updated in place).
#[inline(always)]
pub fn clamp_mss_xdp(ctx: &XdpContext, p: &Parsed, mss: u16) -> Result<(), Reason> {
    let Some((off, old)) = find_mss(ctx, p) else {
        return Ok(());
    };
    if old <= mss {
        return Ok(());
    }
    let v: *mut [u8; 2] = ptr_at(ctx, off).ok_or(Reason::PassInternal)?;
    let check: *mut u16 = ptr_at(ctx, p.l4_off + 16).ok_or(Reason::PassInternal)?;
    // The value sits at an even offset of the header: one checksum word.
    let (o, n) = (old.to_be(), mss.to_be());
    unsafe {
        *v = mss.to_be_bytes();
        *check = csum::apply(*check, csum::diff2(o, n));
    }
    Ok(())
}

/// [`clamp_mss_xdp`] for TC: the kernel's helper keeps CHECKSUM_PARTIAL skbs right.
#[inline(always)]
pub fn clamp_mss_tc(ctx: &mut TcContext, p: &Parsed, mss: u16) -> Result<(), Reason> {
    let Some((off, old)) = find_mss(ctx, p) else {
        return Ok(());
    };
    if old <= mss {
        return Ok(());
    }
    // The value sits at an even offset of the header: one checksum word.
    let (o, n) = (old.to_be(), mss.to_be());
    let e = |_| Reason::PassInternal;
    ctx.l4_csum_replace(p.l4_off + 16, o as u64, n as u64, 2)
        .map_err(e)?;
    ctx.store(off, &mss.to_be_bytes(), 0).map_err(e)?;
    Ok(())
}

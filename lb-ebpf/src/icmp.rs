//! ICMP errors of NATed flows, and the one lbx builds itself.
//!
//! An error about a NATed flow quotes the packet as the error's sender saw it, so it must be
//! translated like the flow's other packets: one a backend sends about a request (a UDP port
//! unreachable) goes to the client as if the frontend had sent it, and one from the path about
//! a reply (fragmentation needed, TTL exceeded) goes to the backend as if its own reply had
//! caused it. Both the outer and the quoted headers change, with every checksum: the outer
//! IPv4 one, the quoted IPv4 one, the quoted TCP/UDP one where the quote holds it, and the
//! ICMP one over all of that.
//!
//! A request too large for the tunnel with DF set gets an ICMP fragmentation-needed with the
//! tunnel's MTU, built in place from the request (`error_xdp` with `frag_needed`) or, for a
//! pod's reply on the owning node, `too_big_tc`; a tunnelled request whose TTL would run out
//! on the owning node gets a time-exceeded the same way (`error_xdp` with `time_exceeded`).

use aya_ebpf::{
    bindings::bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    helpers::{bpf_skb_change_tail, bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::{TcContext, XdpContext},
    EbpfContext,
};
use lb_common::{csum, CtKey, Reason, PROTO_TCP, PROTO_UDP};

use crate::{
    parse::{
        copy_mac, ptr_at, read_mac, EthHdr, Ip, Ipv4Hdr, PacketBuf, Parsed, ETH_HLEN, IPV4_HLEN,
        PROTO_ICMP,
    },
    tunnel::ipv4_checksum,
};

const ICMP_HLEN: usize = 8;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
const ICMP_TIME_EXCEEDED: u8 = 11;
/// What an ICMP error quotes at least (RFC 792): the IPv4 header and 8 bytes of L4.
const QUOTE_MIN: usize = IPV4_HLEN + 8;

#[repr(C)]
pub struct IcmpHdr {
    pub ty: u8,
    pub code: u8,
    pub check: u16,
    pub rest: u32,
}

/// An ICMP error (destination unreachable, time exceeded) quoting an IPv4 TCP/UDP packet.
pub struct IcmpError {
    /// The error's own IPv4 header.
    pub l3_off: usize,
    pub saddr: u32,
    pub daddr: u32,
    pub ttl: u8,
    /// The quoted packet's 5-tuple as it was sent (wire order).
    pub quoted: CtKey,
    /// Where the quoted IPv4 header starts.
    pub quote_off: usize,
    /// The error's IPv4 total length (host order).
    pub tot_len: u16,
}

impl IcmpError {
    #[inline(always)]
    fn quote_l4(&self) -> usize {
        self.quote_off + IPV4_HLEN
    }
}

/// The ICMP error at `ip` (a plain ICMP packet, not a fragment): other ICMP (echo, ...) and
/// quotes lbx cannot read are `PassUnknownProto`.
#[inline(always)]
pub fn parse_error<C: PacketBuf>(ctx: &C, ip: &Ip) -> Result<IcmpError, Reason> {
    let icmp: *const IcmpHdr =
        ptr_at(ctx, ip.l3_off + IPV4_HLEN).ok_or(Reason::PassTruncL4)?;
    let ty = unsafe { (*icmp).ty };
    if ty != ICMP_DEST_UNREACH && ty != ICMP_TIME_EXCEEDED {
        return Err(Reason::PassUnknownProto);
    }
    let quote_off = ip.l3_off + IPV4_HLEN + ICMP_HLEN;
    let q: *const Ipv4Hdr = ptr_at(ctx, quote_off).ok_or(Reason::PassTruncL4)?;
    let ports: *const [u16; 4] = ptr_at(ctx, quote_off + IPV4_HLEN).ok_or(Reason::PassTruncL4)?;
    let q = unsafe { &*q };
    if q.ver_ihl != 0x45 || (q.proto != PROTO_TCP && q.proto != PROTO_UDP) {
        return Err(Reason::PassUnknownProto);
    }
    let outer: *const Ipv4Hdr = ptr_at(ctx, ip.l3_off).ok_or(Reason::PassTruncIp)?;
    let tot_len = u16::from_be(unsafe { (*outer).tot_len }) as usize;
    if tot_len < IPV4_HLEN + ICMP_HLEN + QUOTE_MIN || ip.l3_off + tot_len > ctx.frame_len() {
        return Err(Reason::PassBadLen);
    }
    let ports = unsafe { &*ports };
    Ok(IcmpError {
        l3_off: ip.l3_off,
        saddr: ip.saddr,
        daddr: ip.daddr,
        ttl: ip.ttl,
        quoted: CtKey {
            saddr: q.saddr,
            daddr: q.daddr,
            sport: ports[0],
            dport: ports[1],
            proto: q.proto,
            _pad0: 0,
            _pad1: 0,
        },
        quote_off,
        tot_len: tot_len as u16,
    })
}

/// What an ICMP error's addresses become: the outer source and destination, and the quoted
/// packet's 5-tuple (its protocol stays).
pub struct IcmpRewrite {
    pub saddr: u32,
    pub daddr: u32,
    pub quoted: CtKey,
}

/// Rewrites an ICMP error in place (direct packet access: XDP, or TC after pulling the
/// headers in), every checksum following; with `dec_ttl`, the outer TTL drops by one.
#[inline(always)]
pub fn rewrite<C: PacketBuf>(
    ctx: &C,
    e: &IcmpError,
    r: &IcmpRewrite,
    dec_ttl: bool,
) -> Result<(), Reason> {
    let err = Reason::PassInternal;
    let outer: *mut Ipv4Hdr = ptr_at(ctx, e.l3_off).ok_or(err)?;
    let icmp: *mut IcmpHdr = ptr_at(ctx, e.l3_off + IPV4_HLEN).ok_or(err)?;
    let q: *mut Ipv4Hdr = ptr_at(ctx, e.quote_off).ok_or(err)?;
    let ports: *mut [u16; 4] = ptr_at(ctx, e.quote_l4()).ok_or(err)?;
    let old = &e.quoted;
    let new = &r.quoted;
    unsafe {
        // The quote: its addresses and their IPv4 checksum, its ports and, where the quote
        // holds it, its L4 checksum (the addresses are in its pseudo-header).
        let q_addrs = csum::diff4(old.saddr, new.saddr) + csum::diff4(old.daddr, new.daddr);
        let q_ports = csum::diff2(old.sport, new.sport) + csum::diff2(old.dport, new.dport);
        let q = &mut *q;
        let q_check = q.check;
        q.check = csum::apply(q_check, q_addrs);
        q.saddr = new.saddr;
        q.daddr = new.daddr;
        let mut icmp_diff = q_addrs + q_ports + csum::diff2(q_check, q.check);
        (*ports)[0] = new.sport;
        (*ports)[1] = new.dport;
        let l4 = q_addrs + q_ports;
        if old.proto == PROTO_UDP {
            let c = (*ports)[3];
            let n = csum::udp_apply(c, l4);
            (*ports)[3] = n;
            icmp_diff += csum::diff2(c, n);
        } else if e.quote_l4() + 18 <= e.l3_off + e.tot_len as usize {
            // A TCP quote of 8 bytes ends before the checksum; a longer one holds it.
            if let Some(c) = ptr_at::<u16, C>(ctx, e.quote_l4() + 16) {
                let old_c = *c;
                *c = csum::apply(old_c, l4);
                icmp_diff += csum::diff2(old_c, *c);
            }
        }
        let icmp = &mut *icmp;
        icmp.check = csum::apply(icmp.check, icmp_diff);

        let o = &mut *outer;
        let mut o_diff = csum::diff4(e.saddr, r.saddr) + csum::diff4(e.daddr, r.daddr);
        if dec_ttl {
            let w = |ttl: u8| u16::from_ne_bytes([ttl, PROTO_ICMP]);
            o_diff += csum::diff2(w(e.ttl), w(e.ttl - 1));
            o.ttl = e.ttl - 1;
        }
        o.check = csum::apply(o.check, o_diff);
        o.saddr = r.saddr;
        o.daddr = r.daddr;
    }
    Ok(())
}

/// The ICMP checksum of an error with header `icmp` quoting `QUOTE_MIN` bytes at `quote`.
#[inline(always)]
fn error_checksum(icmp: &IcmpHdr, quote: &[u16; QUOTE_MIN / 2]) -> u16 {
    let w = |a: u8, b: u8| u16::from_ne_bytes([a, b]) as u32;
    let mut sum = w(icmp.ty, icmp.code) + (icmp.rest & 0xffff) + (icmp.rest >> 16);
    let mut i = 0;
    while i < QUOTE_MIN / 2 {
        sum += quote[i] as u32;
        i += 1;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// The fragmentation-needed header announcing `mtu`.
#[inline(always)]
pub fn frag_needed(mtu: u16) -> IcmpHdr {
    let m = mtu.to_be_bytes();
    IcmpHdr {
        ty: ICMP_DEST_UNREACH,
        code: ICMP_FRAG_NEEDED,
        check: 0,
        rest: u32::from_ne_bytes([0, 0, m[0], m[1]]),
    }
}

/// The time-exceeded (TTL exceeded in transit) header.
#[inline(always)]
pub fn time_exceeded() -> IcmpHdr {
    IcmpHdr {
        ty: ICMP_TIME_EXCEEDED,
        code: 0,
        check: 0,
        rest: 0,
    }
}

/// The IPv4 header of an ICMP error from `saddr` to `daddr`.
#[inline(always)]
fn error_ip(saddr: u32, daddr: u32) -> Ipv4Hdr {
    let mut ip = Ipv4Hdr {
        ver_ihl: 0x45,
        // Internetwork control, as the kernel's own ICMP errors.
        tos: 0xc0,
        tot_len: ((IPV4_HLEN + ICMP_HLEN + QUOTE_MIN) as u16).to_be(),
        id: 0,
        frag_off: 0,
        ttl: 64,
        proto: PROTO_ICMP,
        check: 0,
        saddr,
        daddr,
    };
    ip.check = ipv4_checksum(&ip);
    ip
}

/// Turns the request `p` into the ICMP error `h` (its checksum still zero) from `saddr` back
/// to the request's source, quoting the request as that source sent it (so its stack finds
/// the socket): a fragmentation-needed (`frag_needed`, from the frontend: the sender lowers
/// its path MTU and sends smaller) or a time-exceeded (`time_exceeded`). The frame goes back
/// out of the interface it came in on.
#[inline(always)]
pub fn error_xdp(ctx: &XdpContext, p: &Parsed, saddr: u32, h: IcmpHdr) -> Result<(), Reason> {
    let err = Reason::PassInternal;
    let eth: *const EthHdr = ptr_at(ctx, 0).ok_or(err)?;
    let (src, dst) = unsafe {
        (
            read_mac(core::ptr::addr_of!((*eth).src)),
            read_mac(core::ptr::addr_of!((*eth).dst)),
        )
    };
    let room = (IPV4_HLEN + ICMP_HLEN) as i32;
    let frame = (ctx.data_end() - ctx.data()) as i32;
    let want = (p.l3_off + IPV4_HLEN + ICMP_HLEN + QUOTE_MIN) as i32;
    // The request's IPv4 header then sits where the quote goes, right after the new headers.
    if unsafe { bpf_xdp_adjust_head(ctx.as_ptr() as *mut _, -room) } != 0 {
        return Err(err);
    }
    if unsafe { bpf_xdp_adjust_tail(ctx.as_ptr() as *mut _, want - frame - room) } != 0 {
        return Err(err);
    }
    // The L2 header moved along with the request: the VLAN tag, if any, is copied back.
    if p.l3_off > ETH_HLEN {
        let tag: *const [u16; 2] = ptr_at(ctx, room as usize + ETH_HLEN).ok_or(err)?;
        let to: *mut [u16; 2] = ptr_at(ctx, ETH_HLEN).ok_or(err)?;
        unsafe { *to = *tag };
    }
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(err)?;
    let proto: *const u16 = ptr_at(ctx, room as usize + 12).ok_or(err)?;
    unsafe {
        copy_mac(core::ptr::addr_of_mut!((*eth).dst), &src);
        copy_mac(core::ptr::addr_of_mut!((*eth).src), &dst);
        (*eth).proto = *proto;
    }
    write_error(ctx, p.l3_off, saddr, p.key.saddr, h)
}

/// The ICMP error's IPv4 and ICMP headers at `l3_off`, its quote already in place after them.
#[inline(always)]
fn write_error<C: PacketBuf>(
    ctx: &C,
    l3_off: usize,
    saddr: u32,
    daddr: u32,
    mut h: IcmpHdr,
) -> Result<(), Reason> {
    let err = Reason::PassInternal;
    let ip: *mut Ipv4Hdr = ptr_at(ctx, l3_off).ok_or(err)?;
    let icmp: *mut IcmpHdr = ptr_at(ctx, l3_off + IPV4_HLEN).ok_or(err)?;
    let quote: *const [u16; QUOTE_MIN / 2] =
        ptr_at(ctx, l3_off + IPV4_HLEN + ICMP_HLEN).ok_or(err)?;
    h.check = error_checksum(&h, unsafe { &*quote });
    unsafe {
        core::ptr::write_unaligned(ip, error_ip(saddr, daddr));
        core::ptr::write_unaligned(icmp, h);
    }
    Ok(())
}

/// [`error_xdp`]'s fragmentation-needed for a local pod's reply on the owning node (TC): the error comes from
/// this node (`node_addr`) and goes back into the pod's veth.
#[inline(always)]
pub fn too_big_tc(ctx: &mut TcContext, p: &Parsed, node_addr: u32, mtu: u16) -> Result<(), Reason> {
    let err = |_| Reason::PassInternal;
    let src: [u8; 6] = ctx.load(6).map_err(err)?;
    let dst: [u8; 6] = ctx.load(0).map_err(err)?;
    let room = (IPV4_HLEN + ICMP_HLEN) as i32;
    ctx.adjust_room(room, BPF_ADJ_ROOM_MAC, 0).map_err(err)?;
    let want = (ETH_HLEN + IPV4_HLEN + ICMP_HLEN + QUOTE_MIN) as u32;
    if unsafe { bpf_skb_change_tail(ctx.as_ptr() as *mut _, want, 0) } != 0 {
        return Err(Reason::PassInternal);
    }
    ctx.pull_data(want).map_err(err)?;
    ctx.store(0, &src, 0).map_err(err)?;
    ctx.store(6, &dst, 0).map_err(err)?;
    write_error(ctx, ETH_HLEN, node_addr, p.key.saddr, frag_needed(mtu))
}

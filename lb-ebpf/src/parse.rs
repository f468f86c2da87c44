//! Header parsing shared by the XDP (request) and TC (reply) programs: Ethernet (+ one
//! 802.1Q tag), IPv4 without options, TCP/UDP. Anything else is a `Reason`, never a crash.

use aya_ebpf::programs::{TcContext, XdpContext};
use core::mem::size_of;
use lb_common::{CtKey, Reason, PROTO_TCP, PROTO_UDP};

/// Raw packet bounds of either program type.
pub trait PacketBuf {
    fn data(&self) -> usize;
    /// End of the directly accessible (linear) bytes.
    fn data_end(&self) -> usize;
    /// Length of the whole frame. For an skb this includes paged data beyond `data_end`:
    /// a large segment from a local pod is usually not linear past its headers.
    fn frame_len(&self) -> usize;
}

impl PacketBuf for XdpContext {
    #[inline(always)]
    fn data(&self) -> usize {
        XdpContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        XdpContext::data_end(self)
    }
    #[inline(always)]
    fn frame_len(&self) -> usize {
        XdpContext::data_end(self) - XdpContext::data(self)
    }
}

impl PacketBuf for TcContext {
    #[inline(always)]
    fn data(&self) -> usize {
        TcContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        TcContext::data_end(self)
    }
    #[inline(always)]
    fn frame_len(&self) -> usize {
        TcContext::len(self) as usize
    }
}

/// Reads a MAC address byte by byte. A plain `[u8; 6]` copy from the packet compiles to a
/// call into a memmove subprogram (unaligned source), which costs more than the copy.
#[inline(always)]
pub fn read_mac(src: *const [u8; 6]) -> [u8; 6] {
    let s = src as *const u8;
    unsafe {
        [
            core::ptr::read_volatile(s),
            core::ptr::read_volatile(s.add(1)),
            core::ptr::read_volatile(s.add(2)),
            core::ptr::read_volatile(s.add(3)),
            core::ptr::read_volatile(s.add(4)),
            core::ptr::read_volatile(s.add(5)),
        ]
    }
}

/// Copies a MAC address into the packet as three 16-bit words: 6 instructions, where a
/// byte-wise copy takes 12 and a `[u8; 6]` assignment becomes a memmove call. Both ends are
/// 2-aligned: `src` is a field of a map value or of a copy of one (even offsets in 4-aligned
/// structs, asserted in lb-common), and `dst` is in the Ethernet header, which drivers and
/// BPF_PROG_TEST_RUN place at an even address. (Cilium keeps its MACs in a 4-aligned
/// `union macaddr` for the same reason: so the copy into the packet need not go byte by byte.)
#[inline(always)]
pub fn copy_mac(dst: *mut [u8; 6], src: &[u8; 6]) {
    let d = dst as *mut u16;
    let s = src.as_ptr() as *const u16;
    let mut i = 0;
    while i < 3 {
        unsafe { core::ptr::write_volatile(d.add(i), s.add(i).read()) };
        i += 1;
    }
}

/// The one checked accessor: every header access goes through it.
#[inline(always)]
pub fn ptr_at<T, C: PacketBuf>(ctx: &C, off: usize) -> Option<*mut T> {
    let start = ctx.data();
    if start + off + size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((start + off) as *mut T)
}

#[repr(C)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    /// Network byte order.
    pub proto: u16,
}

#[repr(C)]
pub struct VlanHdr {
    pub tci: u16,
    pub proto: u16,
}

#[repr(C)]
pub struct Ipv4Hdr {
    pub ver_ihl: u8,
    pub tos: u8,
    pub tot_len: u16,
    pub id: u16,
    pub frag_off: u16,
    pub ttl: u8,
    pub proto: u8,
    pub check: u16,
    pub saddr: u32,
    pub daddr: u32,
}

/// The part of TCP and UDP headers the data plane touches: ports come first in both.
#[repr(C)]
pub struct Ports {
    pub sport: u16,
    pub dport: u16,
}

/// An IPv4 header without options and the 20-byte TCP header (what `parse` requires): a
/// NAT rewrite's fields behind one bounds check.
#[repr(C)]
pub struct Ipv4TcpHead {
    pub ip: Ipv4Hdr,
    pub ports: Ports,
    pub _seq_to_window: [u8; 12],
    pub check: u16,
    pub _urg: u16,
}
const _: () = assert!(size_of::<Ipv4TcpHead>() == IPV4_HLEN + TCP_HLEN);

/// [`Ipv4TcpHead`] for UDP: the IPv4 header and the whole UDP header.
#[repr(C)]
pub struct Ipv4UdpHead {
    pub ip: Ipv4Hdr,
    pub ports: Ports,
    pub _len: u16,
    pub check: u16,
}
const _: () = assert!(size_of::<Ipv4UdpHead>() == IPV4_HLEN + UDP_HLEN);

pub const ETH_HLEN: usize = 14;
pub const VLAN_HLEN: usize = 4;
pub const IPV4_HLEN: usize = 20;
pub const TCP_HLEN: usize = 20;
pub const UDP_HLEN: usize = 8;
pub const ETH_P_IP: u16 = u16::from_ne_bytes(0x0800u16.to_be_bytes());
pub const ETH_P_8021Q: u16 = u16::from_ne_bytes(0x8100u16.to_be_bytes());
/// MF flag and fragment offset, network byte order.
const IP_MF_OFFSET: u16 = u16::from_ne_bytes(0x3fffu16.to_be_bytes());
/// The DF flag, network byte order.
pub const IP_DF: u16 = u16::from_ne_bytes(0x4000u16.to_be_bytes());
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_IPIP: u8 = 4;
pub const TCP_FLAG_FIN: u8 = 0x01;
pub const TCP_FLAG_SYN: u8 = 0x02;
pub const TCP_FLAG_RST: u8 = 0x04;
pub const TCP_FLAG_ACK: u8 = 0x10;

/// Offsets of a TCP/UDP checksum inside its header.
pub const TCP_CSUM_OFF: usize = 16;
pub const UDP_CSUM_OFF: usize = 6;

/// A parsed IPv4 TCP/UDP packet: offsets and the fields the pipeline needs (wire order).
/// The 5-tuple is kept as the key it is looked up with, so the packet's fields sit on the
/// stack once, already in the shape the map helpers take.
pub struct Parsed {
    pub l3_off: usize,
    pub l4_off: usize,
    pub key: CtKey,
    pub ttl: u8,
    pub tcp_flags: u8,
    /// IPv4 total length (host order).
    pub tot_len: u16,
    /// The IPv4 header's DF bit.
    pub df: bool,
}

impl Parsed {
    #[inline(always)]
    pub fn is_syn(&self) -> bool {
        self.key.proto == PROTO_TCP && self.tcp_flags & TCP_FLAG_SYN != 0
    }

    /// May this packet start a flow? UDP: any packet. TCP: a SYN without ACK, the first
    /// packet of a connection; anything else without state belongs to a connection that
    /// began elsewhere (the kernel took its SYN, or it predates lbx).
    #[inline(always)]
    pub fn opens_flow(&self) -> bool {
        self.key.proto != PROTO_TCP || self.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN
    }

    /// TCP FIN or RST: the connection is closing.
    #[inline(always)]
    pub fn is_fin_or_rst(&self) -> bool {
        self.key.proto == PROTO_TCP && self.tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST) != 0
    }

    #[inline(always)]
    pub fn l4_csum_off(&self) -> usize {
        self.l4_off + if self.key.proto == PROTO_TCP { TCP_CSUM_OFF } else { UDP_CSUM_OFF }
    }
}

/// An IPv4 header lbx may handle: version 4, no options, not a fragment.
pub struct Ip {
    pub l3_off: usize,
    pub proto: u8,
    pub ttl: u8,
    pub saddr: u32,
    pub daddr: u32,
}

/// Ethernet and one optional 802.1Q tag: the offset of the IPv4 header.
#[inline(always)]
pub fn parse_eth<C: PacketBuf>(ctx: &C) -> Result<usize, Reason> {
    let eth: *const EthHdr = ptr_at(ctx, 0).ok_or(Reason::PassTruncEth)?;
    let mut ethertype = unsafe { (*eth).proto };
    let mut l3_off = ETH_HLEN;
    if ethertype == ETH_P_8021Q {
        let vlan: *const VlanHdr = ptr_at(ctx, ETH_HLEN).ok_or(Reason::PassTruncVlan)?;
        ethertype = unsafe { (*vlan).proto };
        l3_off += VLAN_HLEN;
    }
    if ethertype != ETH_P_IP {
        return Err(Reason::PassNotIpv4);
    }
    Ok(l3_off)
}

/// The IPv4 header at `l3_off`, when it is one lbx may handle.
#[inline(always)]
pub fn ipv4_at<C: PacketBuf>(ctx: &C, l3_off: usize) -> Result<Ip, Reason> {
    let ip: *const Ipv4Hdr = ptr_at(ctx, l3_off).ok_or(Reason::PassTruncIp)?;
    let ip = unsafe { &*ip };
    // Version 4 and IHL 5 only: options would make every later offset variable.
    if ip.ver_ihl != 0x45 {
        return Err(Reason::PassIpOptions);
    }
    if ip.frag_off & IP_MF_OFFSET != 0 {
        return Err(Reason::PassFragment);
    }
    Ok(Ip {
        l3_off,
        proto: ip.proto,
        ttl: ip.ttl,
        saddr: ip.saddr,
        daddr: ip.daddr,
    })
}

/// An Ethernet frame carrying IPv4 TCP/UDP. Other IP protocols are `PassUnknownProto`.
#[inline(always)]
pub fn parse<C: PacketBuf>(ctx: &C) -> Result<Parsed, Reason> {
    let l3_off = parse_eth(ctx)?;
    parse_ipv4_at(ctx, l3_off)
}

/// IPv4 TCP/UDP at `l3_off` (a frame's, or a tunnelled packet's inner header).
#[inline(always)]
pub fn parse_ipv4_at<C: PacketBuf>(ctx: &C, l3_off: usize) -> Result<Parsed, Reason> {
    let ip: *const Ipv4Hdr = ptr_at(ctx, l3_off).ok_or(Reason::PassTruncIp)?;
    let ip = unsafe { &*ip };
    // Version 4 and IHL 5 only: options would make every later offset variable.
    if ip.ver_ihl != 0x45 {
        return Err(Reason::PassIpOptions);
    }
    if ip.frag_off & IP_MF_OFFSET != 0 {
        return Err(Reason::PassFragment);
    }

    // The L4 bounds checks come before the total-length checks on purpose: otherwise LLVM
    // proves them redundant from `tot_len` and drops them, and the verifier (which does not
    // follow that reasoning) rejects the program.
    let l4_off = l3_off + IPV4_HLEN;
    let mut tcp_flags = 0;
    let l4_min = match ip.proto {
        PROTO_TCP => {
            let tcp: *const [u8; TCP_HLEN] = ptr_at(ctx, l4_off).ok_or(Reason::PassTruncL4)?;
            tcp_flags = unsafe { (*tcp)[13] };
            TCP_HLEN
        }
        PROTO_UDP => {
            let _: *const [u8; UDP_HLEN] = ptr_at(ctx, l4_off).ok_or(Reason::PassTruncL4)?;
            UDP_HLEN
        }
        _ => return Err(Reason::PassUnknownProto),
    };

    let tot_len = u16::from_be(ip.tot_len) as usize;
    // Shorter frames than the IP length are cut; longer ones are Ethernet padding.
    if tot_len < IPV4_HLEN || l3_off + tot_len > ctx.frame_len() {
        return Err(Reason::PassBadLen);
    }
    if tot_len - IPV4_HLEN < l4_min {
        return Err(Reason::PassTruncL4);
    }
    let ports: *const Ports = ptr_at(ctx, l4_off).ok_or(Reason::PassTruncL4)?;
    let ports = unsafe { &*ports };

    Ok(Parsed {
        l3_off,
        l4_off,
        key: CtKey {
            saddr: ip.saddr,
            daddr: ip.daddr,
            sport: ports.sport,
            dport: ports.dport,
            proto: ip.proto,
            _pad0: 0,
            _pad1: 0,
        },
        ttl: ip.ttl,
        tcp_flags,
        tot_len: tot_len as u16,
        df: ip.frag_off & IP_DF != 0,
    })
}

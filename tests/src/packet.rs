//! Packet builder and parser for BPF_PROG_TEST_RUN fixture tables (Katran style: each row is
//! an input packet, an expected verdict and the expected output bytes).
//!
//! The builder writes every byte itself and computes checksums from scratch with
//! [`crate::inet_csum`], never with the code the XDP program uses, so a wrong incremental
//! update in the program shows up as a byte difference or a [`ChecksumError`].
//!
//! Every field can be overridden so malformed packets (bad lengths, IP options, fragments,
//! wrong checksums, truncation) can be written as rows too. Changing addresses, ports, TTL or
//! MACs on a clone keeps every other setting, so a row's expected output is its input plus the
//! changes the program should make:
//!
//! ```
//! # use std::net::Ipv4Addr;
//! # use lb_tests::packet::Packet;
//! # let (client_mac, node_mac, pod_mac) = ([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2], [2, 0, 0, 0, 0, 3]);
//! # let (client, node, pod) = (Ipv4Addr::new(10, 0, 0, 9), Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 1, 0, 5));
//! let input = Packet::eth(client_mac, node_mac).ipv4(client, node).tcp(40000, 30080).syn();
//! let expect = input.clone().macs(node_mac, pod_mac).ip_dst(pod).ttl(63).dport(8080);
//! assert_ne!(input.build(), expect.build());
//! ```
//!
//! Misusing the builder (`.ttl()` before `.ipv4()`, a VLAN id above 4095, ...) panics at the
//! call site: that is a bug in the table, not a condition a test should handle.

use std::fmt::Write as _;
use std::net::Ipv4Addr;

use thiserror::Error;

use crate::inet_csum;

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_IPV6: u16 = 0x86dd;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_IPIP: u8 = 4;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;
pub const TCP_URG: u8 = 0x20;

pub const ETH_HLEN: usize = 14;
pub const VLAN_HLEN: usize = 4;
pub const IPV4_MIN_HLEN: usize = 20;
pub const TCP_MIN_HLEN: usize = 20;
pub const UDP_HLEN: usize = 8;

/// IPv4 options and TCP options are limited to 40 bytes by their 4-bit length fields.
const MAX_OPTIONS: usize = 40;
const IP_DF: u16 = 0x4000;
const IP_MF: u16 = 0x2000;
const IP_OFFSET_MASK: u16 = 0x1fff;

/// Builder defaults, public so rows and tests can refer to them instead of repeating numbers.
pub const DEFAULT_TTL: u8 = 64;
pub const DEFAULT_IP_ID: u16 = 0x1234;
pub const DEFAULT_TCP_SEQ: u32 = 0x0a0b_0c0d;
pub const DEFAULT_TCP_WINDOW: u16 = 64240;

/// A packet description; [`Packet::build`] turns it into bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packet {
    eth_src: [u8; 6],
    eth_dst: [u8; 6],
    vlan: Option<u16>,
    /// Override of the (inner, after any VLAN tag) ethertype; default IPv4.
    ethertype: Option<u16>,
    ip: Option<Ipv4Spec>,
    l4: Option<L4Spec>,
    payload: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Ipv4Spec {
    src: Ipv4Addr,
    dst: Ipv4Addr,
    tos: u8,
    ttl: u8,
    id: u16,
    dont_fragment: bool,
    more_fragments: bool,
    /// In 8-byte units, as in the header.
    frag_offset: u16,
    /// Already padded to a multiple of 4.
    options: Vec<u8>,
    ihl: Option<u8>,
    tot_len: Option<u16>,
    proto: Option<u8>,
    checksum: Option<u16>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum L4Spec {
    Tcp(TcpSpec),
    Udp(UdpSpec),
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct TcpSpec {
    sport: u16,
    dport: u16,
    seq: u32,
    ack_seq: u32,
    flags: u8,
    window: u16,
    urg_ptr: u16,
    /// Already padded to a multiple of 4.
    options: Vec<u8>,
    data_offset: Option<u8>,
    checksum: Option<u16>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct UdpSpec {
    sport: u16,
    dport: u16,
    len: Option<u16>,
    /// `Some(0)` is "no checksum".
    checksum: Option<u16>,
}

impl Packet {
    /// An Ethernet frame from `src_mac` to `dst_mac` (on the wire dst comes first). Without
    /// anything else it builds a bare header with ethertype IPv4.
    pub fn eth(src_mac: [u8; 6], dst_mac: [u8; 6]) -> Self {
        Packet {
            eth_src: src_mac,
            eth_dst: dst_mac,
            vlan: None,
            ethertype: None,
            ip: None,
            l4: None,
            payload: Vec::new(),
        }
    }

    /// Replace both MAC addresses (what a forwarding program rewrites).
    #[must_use]
    pub fn macs(mut self, src_mac: [u8; 6], dst_mac: [u8; 6]) -> Self {
        self.eth_src = src_mac;
        self.eth_dst = dst_mac;
        self
    }

    /// Add (or change) an 802.1Q tag, TPID 0x8100, priority 0.
    #[must_use]
    #[track_caller]
    pub fn vlan(mut self, vid: u16) -> Self {
        assert!(
            vid <= 0x0fff,
            "VLAN id {vid} does not fit in 12 bits: use 0..=4095"
        );
        self.vlan = Some(vid);
        self
    }

    /// Remove the 802.1Q tag (what a program popping the tag should produce).
    #[must_use]
    pub fn no_vlan(mut self) -> Self {
        self.vlan = None;
        self
    }

    /// Override the ethertype (the inner one when tagged). The IPv4 header, if any, is still
    /// written after it, so `.ipv4(..).ethertype(ETH_P_IPV6)` makes a mislabelled frame.
    #[must_use]
    pub fn ethertype(mut self, ethertype: u16) -> Self {
        self.ethertype = Some(ethertype);
        self
    }

    /// Add an IPv4 header (TTL 64, id 0x1234, DF set), or, if there is one, change only its
    /// addresses and keep everything else.
    #[must_use]
    pub fn ipv4(mut self, src: Ipv4Addr, dst: Ipv4Addr) -> Self {
        match &mut self.ip {
            Some(ip) => {
                ip.src = src;
                ip.dst = dst;
            }
            None => {
                self.ip = Some(Ipv4Spec {
                    src,
                    dst,
                    tos: 0,
                    ttl: DEFAULT_TTL,
                    id: DEFAULT_IP_ID,
                    dont_fragment: true,
                    more_fragments: false,
                    frag_offset: 0,
                    options: Vec::new(),
                    ihl: None,
                    tot_len: None,
                    proto: None,
                    checksum: None,
                })
            }
        }
        self
    }

    /// Change the IPv4 source address only (SNAT, reverse NAT).
    #[must_use]
    #[track_caller]
    pub fn ip_src(mut self, src: Ipv4Addr) -> Self {
        self.ip_mut("ip_src").src = src;
        self
    }

    /// Change the IPv4 destination address only (DNAT).
    #[must_use]
    #[track_caller]
    pub fn ip_dst(mut self, dst: Ipv4Addr) -> Self {
        self.ip_mut("ip_dst").dst = dst;
        self
    }

    #[must_use]
    #[track_caller]
    pub fn tos(mut self, tos: u8) -> Self {
        self.ip_mut("tos").tos = tos;
        self
    }

    #[must_use]
    #[track_caller]
    pub fn ttl(mut self, ttl: u8) -> Self {
        self.ip_mut("ttl").ttl = ttl;
        self
    }

    #[must_use]
    #[track_caller]
    pub fn ip_id(mut self, id: u16) -> Self {
        self.ip_mut("ip_id").id = id;
        self
    }

    /// Set or clear the Don't Fragment bit (set by default).
    #[must_use]
    #[track_caller]
    pub fn dont_fragment(mut self, df: bool) -> Self {
        self.ip_mut("dont_fragment").dont_fragment = df;
        self
    }

    /// Make this a fragment: `more` is the MF bit, `offset` the fragment offset field in
    /// 8-byte units (0..=8191). DF is left as it is.
    #[must_use]
    #[track_caller]
    pub fn frag(mut self, more: bool, offset: u16) -> Self {
        assert!(
            offset <= IP_OFFSET_MASK,
            "fragment offset {offset} does not fit in 13 bits: it counts 8-byte units, use 0..=8191"
        );
        let ip = self.ip_mut("frag");
        ip.more_fragments = more;
        ip.frag_offset = offset;
        self
    }

    /// IPv4 options, zero-padded (EOL) to a multiple of 4 bytes; IHL grows to match.
    #[must_use]
    #[track_caller]
    pub fn ip_options(mut self, options: &[u8]) -> Self {
        assert!(
            options.len() <= MAX_OPTIONS,
            "{} bytes of IPv4 options exceed the 40 IHL can describe; use .ihl() to lie instead",
            options.len()
        );
        self.ip_mut("ip_options").options = pad4(options);
        self
    }

    /// Override the IHL field (in 32-bit words) without changing what is written.
    #[must_use]
    #[track_caller]
    pub fn ihl(mut self, ihl: u8) -> Self {
        assert!(ihl <= 0x0f, "IHL {ihl} does not fit in 4 bits: use 0..=15");
        self.ip_mut("ihl").ihl = Some(ihl);
        self
    }

    /// Override the IPv4 total length field (default: the real length).
    #[must_use]
    #[track_caller]
    pub fn tot_len(mut self, tot_len: u16) -> Self {
        self.ip_mut("tot_len").tot_len = Some(tot_len);
        self
    }

    /// Override the IPv4 protocol field (default: TCP or UDP as built, else 255). The TCP/UDP
    /// checksum is still computed for the header actually written.
    #[must_use]
    #[track_caller]
    pub fn ip_proto(mut self, proto: u8) -> Self {
        self.ip_mut("ip_proto").proto = Some(proto);
        self
    }

    /// Write this value as the IPv4 header checksum instead of computing it.
    #[must_use]
    #[track_caller]
    pub fn ip_checksum(mut self, checksum: u16) -> Self {
        self.ip_mut("ip_checksum").checksum = Some(checksum);
        self
    }

    /// Add a TCP header (no flags, seq 0x0a0b0c0d, window 64240), or, if there is one,
    /// change only its ports. Replaces a UDP header.
    #[must_use]
    #[track_caller]
    pub fn tcp(mut self, sport: u16, dport: u16) -> Self {
        self.ip_mut("tcp");
        match &mut self.l4 {
            Some(L4Spec::Tcp(tcp)) => {
                tcp.sport = sport;
                tcp.dport = dport;
            }
            _ => {
                self.l4 = Some(L4Spec::Tcp(TcpSpec {
                    sport,
                    dport,
                    seq: DEFAULT_TCP_SEQ,
                    ack_seq: 0,
                    flags: 0,
                    window: DEFAULT_TCP_WINDOW,
                    urg_ptr: 0,
                    options: Vec::new(),
                    data_offset: None,
                    checksum: None,
                }))
            }
        }
        self
    }

    /// Add a UDP header, or, if there is one, change only its ports. Replaces a TCP header.
    #[must_use]
    #[track_caller]
    pub fn udp(mut self, sport: u16, dport: u16) -> Self {
        self.ip_mut("udp");
        match &mut self.l4 {
            Some(L4Spec::Udp(udp)) => {
                udp.sport = sport;
                udp.dport = dport;
            }
            _ => {
                self.l4 = Some(L4Spec::Udp(UdpSpec {
                    sport,
                    dport,
                    len: None,
                    checksum: None,
                }))
            }
        }
        self
    }

    /// Change the TCP/UDP source port only.
    #[must_use]
    #[track_caller]
    pub fn sport(mut self, port: u16) -> Self {
        match self.l4_mut("sport") {
            L4Spec::Tcp(t) => t.sport = port,
            L4Spec::Udp(u) => u.sport = port,
        }
        self
    }

    /// Change the TCP/UDP destination port only.
    #[must_use]
    #[track_caller]
    pub fn dport(mut self, port: u16) -> Self {
        match self.l4_mut("dport") {
            L4Spec::Tcp(t) => t.dport = port,
            L4Spec::Udp(u) => u.dport = port,
        }
        self
    }

    /// Add the SYN flag to those already set.
    #[must_use]
    #[track_caller]
    pub fn syn(mut self) -> Self {
        self.tcp_mut("syn").flags |= TCP_SYN;
        self
    }

    #[must_use]
    #[track_caller]
    pub fn ack(mut self) -> Self {
        self.tcp_mut("ack").flags |= TCP_ACK;
        self
    }

    #[must_use]
    #[track_caller]
    pub fn fin(mut self) -> Self {
        self.tcp_mut("fin").flags |= TCP_FIN;
        self
    }

    #[must_use]
    #[track_caller]
    pub fn rst(mut self) -> Self {
        self.tcp_mut("rst").flags |= TCP_RST;
        self
    }

    #[must_use]
    #[track_caller]
    pub fn psh(mut self) -> Self {
        self.tcp_mut("psh").flags |= TCP_PSH;
        self
    }

    /// Replace all TCP flags (the `TCP_*` constants or-ed together).
    #[must_use]
    #[track_caller]
    pub fn tcp_flags(mut self, flags: u8) -> Self {
        self.tcp_mut("tcp_flags").flags = flags;
        self
    }

    #[must_use]
    #[track_caller]
    pub fn seq(mut self, seq: u32) -> Self {
        self.tcp_mut("seq").seq = seq;
        self
    }

    #[must_use]
    #[track_caller]
    pub fn ack_seq(mut self, ack_seq: u32) -> Self {
        self.tcp_mut("ack_seq").ack_seq = ack_seq;
        self
    }

    #[must_use]
    #[track_caller]
    pub fn window(mut self, window: u16) -> Self {
        self.tcp_mut("window").window = window;
        self
    }

    /// TCP options, zero-padded (EOL) to a multiple of 4 bytes; the data offset grows.
    #[must_use]
    #[track_caller]
    pub fn tcp_options(mut self, options: &[u8]) -> Self {
        assert!(
            options.len() <= MAX_OPTIONS,
            "{} bytes of TCP options exceed the 40 the data offset can describe; use \
             .tcp_data_offset() to lie instead",
            options.len()
        );
        self.tcp_mut("tcp_options").options = pad4(options);
        self
    }

    /// Override the TCP data offset field (in 32-bit words) without changing what is written.
    #[must_use]
    #[track_caller]
    pub fn tcp_data_offset(mut self, words: u8) -> Self {
        assert!(
            words <= 0x0f,
            "TCP data offset {words} does not fit in 4 bits: use 0..=15"
        );
        self.tcp_mut("tcp_data_offset").data_offset = Some(words);
        self
    }

    /// Override the UDP length field (default: header + payload).
    #[must_use]
    #[track_caller]
    pub fn udp_len(mut self, len: u16) -> Self {
        self.udp_mut("udp_len").len = Some(len);
        self
    }

    /// Send UDP without a checksum (the field is 0, which receivers accept).
    #[must_use]
    #[track_caller]
    pub fn udp_checksum_zero(mut self) -> Self {
        self.udp_mut("udp_checksum_zero").checksum = Some(0);
        self
    }

    /// Write this value as the TCP or UDP checksum instead of computing it.
    #[must_use]
    #[track_caller]
    pub fn l4_checksum(mut self, checksum: u16) -> Self {
        match self.l4_mut("l4_checksum") {
            L4Spec::Tcp(t) => t.checksum = Some(checksum),
            L4Spec::Udp(u) => u.checksum = Some(checksum),
        }
        self
    }

    /// Drop the IPv4 and TCP/UDP checksum overrides (including `udp_checksum_zero`), so
    /// both are computed again. Overrides otherwise survive address and port changes.
    #[must_use]
    pub fn recompute_checksums(mut self) -> Self {
        if let Some(ip) = &mut self.ip {
            ip.checksum = None;
        }
        match &mut self.l4 {
            Some(L4Spec::Tcp(t)) => t.checksum = None,
            Some(L4Spec::Udp(u)) => u.checksum = None,
            None => {}
        }
        self
    }

    /// The bytes after the last header (replaces any earlier payload).
    #[must_use]
    pub fn payload(mut self, payload: &[u8]) -> Self {
        self.payload = payload.to_vec();
        self
    }

    /// The frame's bytes, with lengths and checksums computed unless overridden.
    ///
    /// # Panics
    /// If the IPv4 datagram would exceed 65535 bytes.
    #[track_caller]
    pub fn build(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(ETH_HLEN + VLAN_HLEN + 60 + self.payload.len());
        out.extend_from_slice(&self.eth_dst);
        out.extend_from_slice(&self.eth_src);
        if let Some(vid) = self.vlan {
            out.extend_from_slice(&ETH_P_8021Q.to_be_bytes());
            out.extend_from_slice(&vid.to_be_bytes());
        }
        out.extend_from_slice(&self.ethertype.unwrap_or(ETH_P_IP).to_be_bytes());
        match &self.ip {
            Some(ip) => {
                let segment = self.build_l4(ip);
                out.extend_from_slice(&self.build_ipv4_header(ip, segment.len()));
                out.extend_from_slice(&segment);
            }
            None => out.extend_from_slice(&self.payload),
        }
        out
    }

    /// Build, then keep only the first `len` bytes (a packet cut short on the wire).
    ///
    /// # Panics
    /// If `len` is longer than the packet: such a row would not be truncated at all.
    #[track_caller]
    pub fn truncate_to(&self, len: usize) -> Vec<u8> {
        let mut bytes = self.build();
        assert!(
            len <= bytes.len(),
            "truncate_to({len}) on a {}-byte packet: pick a length below the full size",
            bytes.len()
        );
        bytes.truncate(len);
        bytes
    }

    /// L4 header + payload (or just the payload when there is no L4 header).
    fn build_l4(&self, ip: &Ipv4Spec) -> Vec<u8> {
        match &self.l4 {
            None => self.payload.clone(),
            Some(L4Spec::Tcp(t)) => {
                let hlen = TCP_MIN_HLEN + t.options.len();
                let mut seg = Vec::with_capacity(hlen + self.payload.len());
                seg.extend_from_slice(&t.sport.to_be_bytes());
                seg.extend_from_slice(&t.dport.to_be_bytes());
                seg.extend_from_slice(&t.seq.to_be_bytes());
                seg.extend_from_slice(&t.ack_seq.to_be_bytes());
                let words = t.data_offset.unwrap_or((hlen / 4) as u8);
                seg.push(words << 4);
                seg.push(t.flags);
                seg.extend_from_slice(&t.window.to_be_bytes());
                seg.extend_from_slice(&[0, 0]); // checksum, filled below
                seg.extend_from_slice(&t.urg_ptr.to_be_bytes());
                seg.extend_from_slice(&t.options);
                seg.extend_from_slice(&self.payload);
                let csum = t
                    .checksum
                    .unwrap_or_else(|| inet_csum::l4_checksum(ip.src, ip.dst, IPPROTO_TCP, &seg));
                seg[16..18].copy_from_slice(&csum.to_be_bytes());
                seg
            }
            Some(L4Spec::Udp(u)) => {
                let real_len = UDP_HLEN + self.payload.len();
                let len = u.len.unwrap_or_else(|| {
                    u16::try_from(real_len)
                        .unwrap_or_else(|_| panic!("a {real_len}-byte UDP datagram is too long"))
                });
                let mut seg = Vec::with_capacity(real_len);
                seg.extend_from_slice(&u.sport.to_be_bytes());
                seg.extend_from_slice(&u.dport.to_be_bytes());
                seg.extend_from_slice(&len.to_be_bytes());
                seg.extend_from_slice(&[0, 0]); // checksum, filled below
                seg.extend_from_slice(&self.payload);
                let csum = u
                    .checksum
                    .unwrap_or_else(|| inet_csum::l4_checksum(ip.src, ip.dst, IPPROTO_UDP, &seg));
                seg[6..8].copy_from_slice(&csum.to_be_bytes());
                seg
            }
        }
    }

    #[track_caller]
    fn build_ipv4_header(&self, ip: &Ipv4Spec, segment_len: usize) -> Vec<u8> {
        let hlen = IPV4_MIN_HLEN + ip.options.len();
        let real_tot = hlen + segment_len;
        let tot_len = ip.tot_len.unwrap_or_else(|| {
            u16::try_from(real_tot).unwrap_or_else(|_| {
                panic!("a {real_tot}-byte IPv4 datagram exceeds 65535: shorten the payload")
            })
        });
        let proto = ip.proto.unwrap_or(match self.l4 {
            Some(L4Spec::Tcp(_)) => IPPROTO_TCP,
            Some(L4Spec::Udp(_)) => IPPROTO_UDP,
            // IANA "reserved": no program should treat it as anything it knows.
            None => 255,
        });
        let mut frag = ip.frag_offset;
        if ip.dont_fragment {
            frag |= IP_DF;
        }
        if ip.more_fragments {
            frag |= IP_MF;
        }
        let mut h = Vec::with_capacity(hlen);
        h.push(0x40 | ip.ihl.unwrap_or((hlen / 4) as u8));
        h.push(ip.tos);
        h.extend_from_slice(&tot_len.to_be_bytes());
        h.extend_from_slice(&ip.id.to_be_bytes());
        h.extend_from_slice(&frag.to_be_bytes());
        h.push(ip.ttl);
        h.push(proto);
        h.extend_from_slice(&[0, 0]); // checksum, filled below
        h.extend_from_slice(&ip.src.octets());
        h.extend_from_slice(&ip.dst.octets());
        h.extend_from_slice(&ip.options);
        let csum = ip
            .checksum
            .unwrap_or_else(|| inet_csum::ipv4_header_checksum(&h));
        h[10..12].copy_from_slice(&csum.to_be_bytes());
        h
    }

    #[track_caller]
    fn ip_mut(&mut self, what: &str) -> &mut Ipv4Spec {
        match &mut self.ip {
            Some(ip) => ip,
            None => panic!("call .ipv4(src, dst) before .{what}()"),
        }
    }

    #[track_caller]
    fn l4_mut(&mut self, what: &str) -> &mut L4Spec {
        match &mut self.l4 {
            Some(l4) => l4,
            None => panic!("call .tcp(sport, dport) or .udp(sport, dport) before .{what}()"),
        }
    }

    #[track_caller]
    fn tcp_mut(&mut self, what: &str) -> &mut TcpSpec {
        match &mut self.l4 {
            Some(L4Spec::Tcp(t)) => t,
            _ => panic!(".{what}() needs a TCP header: call .tcp(sport, dport) first"),
        }
    }

    #[track_caller]
    fn udp_mut(&mut self, what: &str) -> &mut UdpSpec {
        match &mut self.l4 {
            Some(L4Spec::Udp(u)) => u,
            _ => panic!(".{what}() needs a UDP header: call .udp(sport, dport) first"),
        }
    }
}

fn pad4(bytes: &[u8]) -> Vec<u8> {
    let mut v = bytes.to_vec();
    v.resize(bytes.len().next_multiple_of(4), 0);
    v
}

/// A frame taken apart, for assertions on a program's output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parsed {
    pub eth_dst: [u8; 6],
    pub eth_src: [u8; 6],
    /// VLAN id of an 802.1Q tag.
    pub vlan: Option<u16>,
    /// The ethertype after any VLAN tag.
    pub ethertype: u16,
    /// Where the L3 header starts (14, or 18 with a VLAN tag).
    pub l3_offset: usize,
    /// Present when the ethertype is IPv4.
    pub ip: Option<Ipv4Info>,
    pub l4_offset: Option<usize>,
    /// Present for TCP and UDP, except in non-first fragments.
    pub l4: Option<L4Info>,
    pub payload_offset: usize,
    /// The bytes after the last header parsed, up to the end of the IP datagram (or frame).
    pub payload: Vec<u8>,
    /// Bytes after the IP datagram's total length (Ethernet padding).
    pub trailer: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ipv4Info {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub tos: u8,
    pub ttl: u8,
    pub proto: u8,
    pub tot_len: u16,
    pub id: u16,
    /// Header length in 32-bit words.
    pub ihl: u8,
    pub dont_fragment: bool,
    pub more_fragments: bool,
    /// In 8-byte units.
    pub frag_offset: u16,
    pub checksum: u16,
    pub options: Vec<u8>,
}

impl Ipv4Info {
    /// Part of a fragmented datagram (MF set or a non-zero offset).
    pub fn is_fragment(&self) -> bool {
        self.more_fragments || self.frag_offset != 0
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum L4Info {
    Tcp(TcpInfo),
    Udp(UdpInfo),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpInfo {
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub ack_seq: u32,
    /// In 32-bit words.
    pub data_offset: u8,
    pub flags: u8,
    pub window: u16,
    pub checksum: u16,
    pub urg_ptr: u16,
    pub options: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UdpInfo {
    pub sport: u16,
    pub dport: u16,
    pub len: u16,
    pub checksum: u16,
}

impl L4Info {
    pub fn sport(&self) -> u16 {
        match self {
            L4Info::Tcp(t) => t.sport,
            L4Info::Udp(u) => u.sport,
        }
    }

    pub fn dport(&self) -> u16 {
        match self {
            L4Info::Tcp(t) => t.dport,
            L4Info::Udp(u) => u.dport,
        }
    }

    pub fn checksum(&self) -> u16 {
        match self {
            L4Info::Tcp(t) => t.checksum,
            L4Info::Udp(u) => u.checksum,
        }
    }

    /// TCP flags; `None` for UDP.
    pub fn tcp_flags(&self) -> Option<u8> {
        match self {
            L4Info::Tcp(t) => Some(t.flags),
            L4Info::Udp(_) => None,
        }
    }
}

/// Why [`parse`] could not take a frame apart.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ParseError {
    #[error(
        "frame truncated in the {layer} header: it needs {need} bytes at offset {offset} but \
         only {have} remain; a truncated output means the program cut or shrank the frame"
    )]
    Truncated {
        layer: &'static str,
        offset: usize,
        need: usize,
        have: usize,
    },
    #[error(
        "ethertype is IPv4 but the version nibble at offset {offset} is {version}; check the \
         L3 offset the program used (VLAN tag?)"
    )]
    BadIpVersion { offset: usize, version: u8 },
    #[error("IPv4 IHL is {ihl} words, below the minimum of 5; the header is malformed")]
    BadIhl { ihl: u8 },
    #[error(
        "IPv4 total length {tot_len} does not fit: the header alone is {header_len} bytes and \
         the frame holds {available} bytes from the IP header on; check length rewrites"
    )]
    BadTotLen {
        tot_len: u16,
        header_len: usize,
        available: usize,
    },
    #[error(
        "TCP data offset is {data_offset} words but must be 5 or more and fit in the \
         {segment_len}-byte segment"
    )]
    BadTcpDataOffset { data_offset: u8, segment_len: usize },
    #[error(
        "UDP length {udp_len} disagrees with the {segment_len} bytes the IPv4 total length \
         leaves for it"
    )]
    BadUdpLen { udp_len: u16, segment_len: usize },
}

/// Take a frame apart. Lengths must be consistent (IPv4 total length within the frame, TCP
/// data offset and UDP length within the datagram); bytes past the IPv4 total length are
/// kept as `trailer`.
pub fn parse(bytes: &[u8]) -> Result<Parsed, ParseError> {
    let need = |layer: &'static str, offset: usize, need: usize| {
        if bytes.len() < offset + need {
            Err(ParseError::Truncated {
                layer,
                offset,
                need,
                have: bytes.len().saturating_sub(offset),
            })
        } else {
            Ok(())
        }
    };
    need("ethernet", 0, ETH_HLEN)?;
    let mut eth_dst = [0; 6];
    let mut eth_src = [0; 6];
    eth_dst.copy_from_slice(&bytes[0..6]);
    eth_src.copy_from_slice(&bytes[6..12]);
    let mut ethertype = be16(bytes, 12);
    let mut l3 = ETH_HLEN;
    let mut vlan = None;
    if ethertype == ETH_P_8021Q {
        need("802.1Q", 12, VLAN_HLEN + 2)?;
        vlan = Some(be16(bytes, 14) & 0x0fff);
        ethertype = be16(bytes, 16);
        l3 += VLAN_HLEN;
    }
    let mut parsed = Parsed {
        eth_dst,
        eth_src,
        vlan,
        ethertype,
        l3_offset: l3,
        ip: None,
        l4_offset: None,
        l4: None,
        payload_offset: l3,
        payload: bytes[l3..].to_vec(),
        trailer: Vec::new(),
    };
    if ethertype != ETH_P_IP {
        return Ok(parsed);
    }

    need("IPv4", l3, IPV4_MIN_HLEN)?;
    let version = bytes[l3] >> 4;
    if version != 4 {
        return Err(ParseError::BadIpVersion {
            offset: l3,
            version,
        });
    }
    let ihl = bytes[l3] & 0x0f;
    if ihl < 5 {
        return Err(ParseError::BadIhl { ihl });
    }
    let hlen = usize::from(ihl) * 4;
    need("IPv4 options", l3, hlen)?;
    let tot_len = be16(bytes, l3 + 2);
    let available = bytes.len() - l3;
    if usize::from(tot_len) < hlen || usize::from(tot_len) > available {
        return Err(ParseError::BadTotLen {
            tot_len,
            header_len: hlen,
            available,
        });
    }
    let frag = be16(bytes, l3 + 6);
    let ip = Ipv4Info {
        src: ipv4_at(bytes, l3 + 12),
        dst: ipv4_at(bytes, l3 + 16),
        tos: bytes[l3 + 1],
        ttl: bytes[l3 + 8],
        proto: bytes[l3 + 9],
        tot_len,
        id: be16(bytes, l3 + 4),
        ihl,
        dont_fragment: frag & IP_DF != 0,
        more_fragments: frag & IP_MF != 0,
        frag_offset: frag & IP_OFFSET_MASK,
        checksum: be16(bytes, l3 + 10),
        options: bytes[l3 + IPV4_MIN_HLEN..l3 + hlen].to_vec(),
    };
    let l4 = l3 + hlen;
    let end = l3 + usize::from(tot_len);
    let segment = &bytes[l4..end];
    parsed.trailer = bytes[end..].to_vec();
    parsed.payload_offset = l4;
    parsed.payload = segment.to_vec();

    // A non-first fragment carries data only; a first fragment (MF) has the L4 header but
    // its lengths describe the whole datagram, so they are not checked against this frame.
    let later_fragment = ip.frag_offset != 0;
    let partial = ip.more_fragments;
    let proto = ip.proto;
    parsed.ip = Some(ip);
    if later_fragment {
        return Ok(parsed);
    }
    let (info, hdr_len) = match proto {
        IPPROTO_TCP => {
            need_in(segment, "TCP", l4, TCP_MIN_HLEN)?;
            let data_offset = segment[12] >> 4;
            let thlen = usize::from(data_offset) * 4;
            if data_offset < 5 || thlen > segment.len() {
                return Err(ParseError::BadTcpDataOffset {
                    data_offset,
                    segment_len: segment.len(),
                });
            }
            let info = L4Info::Tcp(TcpInfo {
                sport: be16(segment, 0),
                dport: be16(segment, 2),
                seq: be32(segment, 4),
                ack_seq: be32(segment, 8),
                data_offset,
                flags: segment[13],
                window: be16(segment, 14),
                checksum: be16(segment, 16),
                urg_ptr: be16(segment, 18),
                options: segment[TCP_MIN_HLEN..thlen].to_vec(),
            });
            (info, thlen)
        }
        IPPROTO_UDP => {
            need_in(segment, "UDP", l4, UDP_HLEN)?;
            let len = be16(segment, 4);
            let fits = if partial {
                usize::from(len) >= UDP_HLEN
            } else {
                usize::from(len) == segment.len()
            };
            if !fits {
                return Err(ParseError::BadUdpLen {
                    udp_len: len,
                    segment_len: segment.len(),
                });
            }
            let info = L4Info::Udp(UdpInfo {
                sport: be16(segment, 0),
                dport: be16(segment, 2),
                len,
                checksum: be16(segment, 6),
            });
            (info, UDP_HLEN)
        }
        _ => return Ok(parsed),
    };
    parsed.l4_offset = Some(l4);
    parsed.l4 = Some(info);
    parsed.payload_offset = l4 + hdr_len;
    parsed.payload = segment[hdr_len..].to_vec();
    Ok(parsed)
}

/// Truncation check inside the IP datagram (bounded by its total length, not the frame).
fn need_in(
    segment: &[u8],
    layer: &'static str,
    offset: usize,
    need: usize,
) -> Result<(), ParseError> {
    if segment.len() < need {
        return Err(ParseError::Truncated {
            layer,
            offset,
            need,
            have: segment.len(),
        });
    }
    Ok(())
}

/// A checksum in a frame that does not match its from-scratch value.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ChecksumError {
    #[error("cannot verify checksums of a frame that does not parse: {source}")]
    Parse {
        #[from]
        source: ParseError,
    },
    #[error(
        "ethertype 0x{ethertype:04x} is not IPv4, so there is no checksum to verify; only \
         verify rows whose output is IPv4"
    )]
    NotIpv4 { ethertype: u16 },
    #[error(
        "IPv4 header checksum is 0x{found:04x} but the header sums to 0x{expected:04x}: a \
         header field changed without a matching checksum update"
    )]
    Ipv4Header { found: u16, expected: u16 },
    #[error(
        "TCP checksum is 0x{found:04x} but pseudo-header and segment sum to 0x{expected:04x}: \
         an address or port changed without a matching checksum update"
    )]
    Tcp { found: u16, expected: u16 },
    #[error(
        "UDP checksum is 0x{found:04x} but pseudo-header and datagram sum to 0x{expected:04x}: \
         an address or port changed without a matching checksum update"
    )]
    Udp { found: u16, expected: u16 },
    #[error("ICMP checksum is 0x{found:04x} but the message sums to 0x{expected:04x}")]
    Icmp { found: u16, expected: u16 },
    #[error(
        "the ICMP error's quoted IPv4 header checksum is 0x{found:04x}, its header sums to \
         0x{expected:04x}: the quote was rewritten without a matching update"
    )]
    QuotedIpv4Header { found: u16, expected: u16 },
}

/// The IPv4 datagram a frame carries: the bytes after the Ethernet header (and any VLAN
/// tag), up to the datagram's total length. What an encapsulation or an ICMP quote holds.
///
/// # Panics
/// If the frame does not parse as IPv4 (a bug in the table).
#[track_caller]
pub fn datagram(frame: &[u8]) -> Vec<u8> {
    let parsed = parse(frame).unwrap_or_else(|e| panic!("datagram(): {e}"));
    let ip = parsed
        .ip
        .as_ref()
        .expect("datagram() of a frame without IPv4");
    frame[parsed.l3_offset..parsed.l3_offset + usize::from(ip.tot_len)].to_vec()
}

/// An ICMP message of `ty` and `code` whose second word is `rest` (for a
/// fragmentation-needed: the next-hop MTU in its low 16 bits) and whose data is `quote`
/// (the leading bytes of the datagram it is about). The checksum is computed here.
pub fn icmp_message(ty: u8, code: u8, rest: u32, quote: &[u8]) -> Vec<u8> {
    let mut m = vec![ty, code, 0, 0];
    m.extend_from_slice(&rest.to_be_bytes());
    m.extend_from_slice(quote);
    let csum = inet_csum::checksum(&m);
    m[2..4].copy_from_slice(&csum.to_be_bytes());
    m
}

/// A frame's Ethernet header followed by the datagram `overhead` bytes into its IPv4
/// payload: what decapsulating an IP-in-IP (20) or FOU (28) frame leaves.
#[track_caller]
pub fn inner_frame(frame: &[u8], overhead: usize) -> Vec<u8> {
    let parsed = parse(frame).unwrap_or_else(|e| panic!("inner_frame(): {e}"));
    let mut out = frame[..ETH_HLEN].to_vec();
    out[12..14].copy_from_slice(&ETH_P_IP.to_be_bytes());
    out.extend_from_slice(&frame[parsed.l3_offset + overhead..]);
    out
}

/// Recompute the IPv4 header checksum and the TCP/UDP checksum from scratch and compare them
/// with what the frame carries. A UDP checksum of 0 means "none" and is accepted; 0x0000 and
/// 0xffff count as the same value (both are zero in one's complement, and a correct
/// incremental update may produce either). L4 checksums of fragments are not checked: they
/// cover the whole datagram, which one fragment does not hold.
pub fn verify_checksums(bytes: &[u8]) -> Result<(), ChecksumError> {
    let parsed = parse(bytes)?;
    let Some(ip) = &parsed.ip else {
        return Err(ChecksumError::NotIpv4 {
            ethertype: parsed.ethertype,
        });
    };
    let l3 = parsed.l3_offset;
    let header = &bytes[l3..l3 + usize::from(ip.ihl) * 4];
    let expected = inet_csum::ipv4_header_checksum(header);
    if !inet_csum::same_checksum(ip.checksum, expected) {
        return Err(ChecksumError::Ipv4Header {
            found: ip.checksum,
            expected,
        });
    }
    if ip.is_fragment() {
        return Ok(());
    }
    let ip_payload = l3 + usize::from(ip.ihl) * 4;
    let end = (l3 + usize::from(ip.tot_len)).min(bytes.len());
    if ip.proto == IPPROTO_IPIP {
        // The inner datagram, checked as a frame of its own.
        return verify_checksums(&inner_frame(&bytes[..end], usize::from(ip.ihl) * 4));
    }
    if ip.proto == IPPROTO_ICMP && end >= ip_payload + 8 {
        let message = &bytes[ip_payload..end];
        let found = be16(message, 2);
        let mut zeroed = message.to_vec();
        zeroed[2..4].fill(0);
        let expected = inet_csum::checksum(&zeroed);
        if !inet_csum::same_checksum(found, expected) {
            return Err(ChecksumError::Icmp { found, expected });
        }
        // The quoted IPv4 header (an error's quote) must be a valid header too.
        let quote = &message[8..];
        if quote.len() >= IPV4_MIN_HLEN && quote[0] >> 4 == 4 {
            let qlen = usize::from(quote[0] & 0x0f) * 4;
            if quote.len() >= qlen {
                let found = be16(quote, 10);
                let mut h = quote[..qlen].to_vec();
                h[10..12].fill(0);
                let expected = inet_csum::ipv4_header_checksum(&h);
                if !inet_csum::same_checksum(found, expected) {
                    return Err(ChecksumError::QuotedIpv4Header { found, expected });
                }
            }
        }
        return Ok(());
    }
    let (Some(l4), Some(l4_off)) = (&parsed.l4, parsed.l4_offset) else {
        return Ok(());
    };
    let end = l3 + usize::from(ip.tot_len);
    let segment = &bytes[l4_off..end];
    match l4 {
        L4Info::Tcp(t) => {
            let expected = inet_csum::l4_checksum(ip.src, ip.dst, IPPROTO_TCP, segment);
            if !inet_csum::same_checksum(t.checksum, expected) {
                return Err(ChecksumError::Tcp {
                    found: t.checksum,
                    expected,
                });
            }
        }
        L4Info::Udp(u) => {
            if u.checksum == 0 {
                return Ok(());
            }
            let expected = inet_csum::l4_checksum(ip.src, ip.dst, IPPROTO_UDP, segment);
            if !inet_csum::same_checksum(u.checksum, expected) {
                return Err(ChecksumError::Udp {
                    found: u.checksum,
                    expected,
                });
            }
        }
    }
    Ok(())
}

/// A byte diff for assertion messages: a summary naming the header fields that differ, then
/// only the 16-byte rows that differ, expected (`-`) above actual (`+`), `^^` under each
/// differing byte. Bytes past the end of the shorter frame show as `--`.
pub fn hexdiff(expected: &[u8], actual: &[u8]) -> String {
    const ROW: usize = 16;
    let max = expected.len().max(actual.len());
    let differs = |i: usize| expected.get(i) != actual.get(i);
    let diffs: Vec<usize> = (0..max).filter(|&i| differs(i)).collect();
    let mut s = String::new();
    let _ = writeln!(
        s,
        "expected {} bytes, actual {} bytes, {} bytes differ",
        expected.len(),
        actual.len(),
        diffs.len()
    );
    if diffs.is_empty() {
        return s;
    }

    let mut fields: Vec<String> = Vec::new();
    let mut last = "";
    for &i in &diffs {
        // Name offsets by the frame that has them, the expected one first.
        let frame = if i < expected.len() { expected } else { actual };
        let name = field_at(frame, i);
        if name != last {
            fields.push(format!("{name}@0x{i:x}"));
            last = name;
        }
    }
    let _ = writeln!(s, "differing fields: {}", fields.join(", "));

    let hex_row = |frame: &[u8], start: usize| -> String {
        (start..(start + ROW).min(max))
            .map(|i| {
                frame
                    .get(i)
                    .map_or("--".to_string(), |b| format!("{b:02x}"))
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut skipped = 0;
    for start in (0..max).step_by(ROW) {
        if !(start..(start + ROW).min(max)).any(differs) {
            skipped += 1;
            continue;
        }
        if skipped > 0 {
            let _ = writeln!(s, "        ({skipped} identical rows)");
            skipped = 0;
        }
        let _ = writeln!(s, "{start:04x} - {}", hex_row(expected, start));
        let _ = writeln!(s, "{start:04x} + {}", hex_row(actual, start));
        let marks: String = (start..(start + ROW).min(max))
            .map(|i| if differs(i) { "^^" } else { "  " })
            .collect::<Vec<_>>()
            .join(" ");
        let _ = writeln!(s, "       {}", marks.trim_end());
    }
    if skipped > 0 {
        let _ = writeln!(s, "        ({skipped} identical rows)");
    }
    s
}

/// Name of the header field at `off`, read leniently from the frame's own headers (no length
/// checks beyond the bytes needed), so truncated or malformed frames get names too.
/// `off` must be inside `frame`.
fn field_at(frame: &[u8], off: usize) -> &'static str {
    if off < 6 {
        return "eth.dst";
    }
    if off < 12 {
        return "eth.src";
    }
    let mut l3 = 12;
    let mut ethertype = be16_opt(frame, 12);
    if ethertype == Some(ETH_P_8021Q) {
        if off < 14 {
            return "vlan.tpid";
        }
        if off < 16 {
            return "vlan.tci";
        }
        l3 = 16;
        ethertype = be16_opt(frame, 16);
    }
    if off < l3 + 2 {
        return "eth.type";
    }
    l3 += 2;
    if ethertype != Some(ETH_P_IP) {
        return "l3.payload";
    }
    let rel = off - l3;
    let fixed = match rel {
        0 => Some("ip.version_ihl"),
        1 => Some("ip.tos"),
        2..=3 => Some("ip.tot_len"),
        4..=5 => Some("ip.id"),
        6..=7 => Some("ip.frag_off"),
        8 => Some("ip.ttl"),
        9 => Some("ip.proto"),
        10..=11 => Some("ip.checksum"),
        12..=15 => Some("ip.src"),
        16..=19 => Some("ip.dst"),
        _ => None,
    };
    if let Some(name) = fixed {
        return name;
    }
    // From here on off >= l3 + 20, so the whole fixed IPv4 header is in the frame.
    let hlen = (usize::from(frame[l3] & 0x0f) * 4).max(IPV4_MIN_HLEN);
    if rel < hlen {
        return "ip.options";
    }
    if rel >= usize::from(be16(frame, l3 + 2)) {
        return "trailer";
    }
    if be16(frame, l3 + 6) & IP_OFFSET_MASK != 0 {
        return "ip.payload";
    }
    let l4rel = rel - hlen;
    match frame[l3 + 9] {
        IPPROTO_TCP => match l4rel {
            0..=1 => "tcp.sport",
            2..=3 => "tcp.dport",
            4..=7 => "tcp.seq",
            8..=11 => "tcp.ack_seq",
            12 => "tcp.data_offset",
            13 => "tcp.flags",
            14..=15 => "tcp.window",
            16..=17 => "tcp.checksum",
            18..=19 => "tcp.urg_ptr",
            // off > l4 + 12, so the data offset byte is in the frame.
            _ if l4rel < usize::from(frame[l3 + hlen + 12] >> 4) * 4 => "tcp.options",
            _ => "payload",
        },
        IPPROTO_UDP => match l4rel {
            0..=1 => "udp.sport",
            2..=3 => "udp.dport",
            4..=5 => "udp.len",
            6..=7 => "udp.checksum",
            _ => "payload",
        },
        _ => "ip.payload",
    }
}

fn be16(b: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([b[off], b[off + 1]])
}

fn be16_opt(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(off)?, *b.get(off + 1)?]))
}

fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

fn ipv4_at(b: &[u8], off: usize) -> Ipv4Addr {
    Ipv4Addr::new(b[off], b[off + 1], b[off + 2], b[off + 3])
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC_A: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
    const MAC_B: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
    const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 9);
    const NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 10);
    const POD: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 5);

    fn syn() -> Packet {
        Packet::eth(MAC_A, MAC_B)
            .ipv4(CLIENT, NODE)
            .tcp(40000, 30080)
            .syn()
    }

    fn parse_ok(bytes: &[u8]) -> Parsed {
        parse(bytes).unwrap_or_else(|e| panic!("parse failed: {e}\n{}", hexdiff(&[], bytes)))
    }

    fn tcp_of(p: &Parsed) -> &TcpInfo {
        match p.l4.as_ref().expect("no L4 header parsed") {
            L4Info::Tcp(t) => t,
            other => panic!("expected TCP, got {other:?}"),
        }
    }

    fn udp_of(p: &Parsed) -> &UdpInfo {
        match p.l4.as_ref().expect("no L4 header parsed") {
            L4Info::Udp(u) => u,
            other => panic!("expected UDP, got {other:?}"),
        }
    }

    /// A UDP datagram Linux 6.18 sent with checksum offload off, captured by tcpdump on the
    /// peer veth (10.99.0.1:40001 -> 10.99.0.2:53, "hello lbx\n"). The builder must produce
    /// the identical frame.
    const KERNEL_UDP: [u8; 52] = [
        0x02, 0x00, 0x00, 0x00, 0x00, 0x02, 0x02, 0x00, 0x00, 0x00, 0x00, 0x01, 0x08, 0x00, 0x45,
        0x00, 0x00, 0x26, 0x7b, 0x4e, 0x40, 0x00, 0x40, 0x11, 0xaa, 0xb0, 0x0a, 0x63, 0x00, 0x01,
        0x0a, 0x63, 0x00, 0x02, 0x9c, 0x41, 0x00, 0x35, 0x00, 0x12, 0x26, 0x2c, 0x68, 0x65, 0x6c,
        0x6c, 0x6f, 0x20, 0x6c, 0x62, 0x78, 0x0a,
    ];

    /// A TCP SYN from the same capture (10.99.0.1:40000 -> 10.99.0.2:8080, with options).
    const KERNEL_SYN: [u8; 74] = [
        0x02, 0x00, 0x00, 0x00, 0x00, 0x02, 0x02, 0x00, 0x00, 0x00, 0x00, 0x01, 0x08, 0x00, 0x45,
        0x00, 0x00, 0x3c, 0x43, 0xee, 0x40, 0x00, 0x40, 0x06, 0xe2, 0x05, 0x0a, 0x63, 0x00, 0x01,
        0x0a, 0x63, 0x00, 0x02, 0x9c, 0x40, 0x1f, 0x90, 0x92, 0x8a, 0x93, 0x2e, 0x00, 0x00, 0x00,
        0x00, 0xa0, 0x02, 0xfa, 0xf0, 0x2f, 0xa0, 0x00, 0x00, 0x02, 0x04, 0x05, 0xb4, 0x04, 0x02,
        0x08, 0x0a, 0xc9, 0x08, 0x5e, 0x11, 0x00, 0x00, 0x00, 0x00, 0x01, 0x03, 0x03, 0x0a,
    ];
    const KERNEL_SRC: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
    const KERNEL_DST: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);

    #[test]
    fn builder_reproduces_kernel_udp_frame() {
        let built = Packet::eth(MAC_A, MAC_B)
            .ipv4(KERNEL_SRC, KERNEL_DST)
            .ip_id(0x7b4e)
            .udp(40001, 53)
            .payload(b"hello lbx\n")
            .build();
        assert_eq!(built, KERNEL_UDP, "{}", hexdiff(&KERNEL_UDP, &built));
        verify_checksums(&KERNEL_UDP).unwrap();
    }

    #[test]
    fn builder_reproduces_kernel_tcp_syn() {
        let options = [
            0x02, 0x04, 0x05, 0xb4, 0x04, 0x02, 0x08, 0x0a, 0xc9, 0x08, 0x5e, 0x11, 0x00, 0x00,
            0x00, 0x00, 0x01, 0x03, 0x03, 0x0a,
        ];
        let built = Packet::eth(MAC_A, MAC_B)
            .ipv4(KERNEL_SRC, KERNEL_DST)
            .ip_id(0x43ee)
            .tcp(40000, 8080)
            .syn()
            .seq(0x928a_932e)
            .window(64240)
            .tcp_options(&options)
            .build();
        assert_eq!(built, KERNEL_SYN, "{}", hexdiff(&KERNEL_SYN, &built));
        verify_checksums(&KERNEL_SYN).unwrap();
        let p = parse_ok(&KERNEL_SYN);
        assert_eq!(tcp_of(&p).options, options);
        assert_eq!(tcp_of(&p).data_offset, 10);
    }

    #[test]
    fn defaults_round_trip_through_parse() {
        let bytes = syn().payload(b"abc").build();
        assert_eq!(bytes.len(), ETH_HLEN + IPV4_MIN_HLEN + TCP_MIN_HLEN + 3);
        let p = parse_ok(&bytes);
        assert_eq!((p.eth_src, p.eth_dst), (MAC_A, MAC_B));
        assert_eq!(
            &bytes[0..6],
            &MAC_B,
            "destination MAC comes first on the wire"
        );
        assert_eq!(
            (p.vlan, p.ethertype, p.l3_offset),
            (None, ETH_P_IP, ETH_HLEN)
        );
        let ip = p.ip.as_ref().unwrap();
        assert_eq!((ip.src, ip.dst), (CLIENT, NODE));
        assert_eq!(
            (ip.ttl, ip.id, ip.ihl, ip.proto),
            (64, 0x1234, 5, IPPROTO_TCP)
        );
        assert!(ip.dont_fragment && !ip.is_fragment());
        assert_eq!(usize::from(ip.tot_len), bytes.len() - ETH_HLEN);
        let tcp = tcp_of(&p);
        assert_eq!((tcp.sport, tcp.dport), (40000, 30080));
        assert_eq!(
            (tcp.flags, tcp.seq, tcp.ack_seq),
            (TCP_SYN, DEFAULT_TCP_SEQ, 0)
        );
        assert_eq!((tcp.window, tcp.data_offset), (DEFAULT_TCP_WINDOW, 5));
        assert_eq!(p.l4_offset, Some(34));
        assert_eq!(p.payload_offset, 54);
        assert_eq!(p.payload, b"abc");
        assert!(p.trailer.is_empty());
        verify_checksums(&bytes).unwrap();
    }

    #[test]
    fn udp_round_trip_and_zero_checksum() {
        let pkt = Packet::eth(MAC_A, MAC_B)
            .ipv4(CLIENT, NODE)
            .udp(5353, 30053)
            .payload(&[1, 2, 3, 4, 5]);
        let bytes = pkt.build();
        let p = parse_ok(&bytes);
        let udp = udp_of(&p);
        assert_eq!((udp.sport, udp.dport, udp.len), (5353, 30053, 13));
        assert_ne!(udp.checksum, 0);
        assert_eq!(p.payload, [1, 2, 3, 4, 5]);
        verify_checksums(&bytes).unwrap();

        let zero = pkt.clone().udp_checksum_zero().build();
        assert_eq!(udp_of(&parse_ok(&zero)).checksum, 0);
        verify_checksums(&zero).expect("UDP checksum 0 means none and must be accepted");
        // Anything else wrong is caught.
        let wrong = pkt.l4_checksum(0x0001).build();
        assert_eq!(
            verify_checksums(&wrong),
            Err(ChecksumError::Udp {
                found: 0x0001,
                expected: udp.checksum
            })
        );
    }

    /// Flipping any bit of the IPv4 header that parsing does not depend on is caught as an IPv4
    /// header error carrying both values; a flipped checksum field reports the true value.
    #[test]
    fn verify_catches_flip_in_ipv4_header() {
        let bytes = syn().payload(b"xyz").build();
        let good = parse_ok(&bytes).ip.unwrap().checksum;
        // 0 = version/IHL and 2..4 = total length change how the frame parses.
        for rel in [1, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19] {
            let mut bad = bytes.clone();
            bad[ETH_HLEN + rel] ^= 0x01;
            match verify_checksums(&bad) {
                Err(ChecksumError::Ipv4Header { found, expected }) => {
                    assert_ne!(found, expected, "byte {rel}");
                    if rel == 10 || rel == 11 {
                        assert_eq!(expected, good);
                    } else {
                        assert_eq!(found, good);
                    }
                }
                other => panic!("flip at IPv4 byte {rel}: got {other:?}"),
            }
        }
    }

    #[test]
    fn verify_catches_flip_in_tcp_segment() {
        let bytes = syn().payload(b"payload!").build();
        let l4 = ETH_HLEN + IPV4_MIN_HLEN;
        // Byte 12 holds the data offset (parse would fail); its low bit is safe to flip.
        for off in l4..bytes.len() {
            let mut bad = bytes.clone();
            bad[off] ^= 0x01;
            assert!(
                matches!(verify_checksums(&bad), Err(ChecksumError::Tcp { .. })),
                "flip at {off} ({}) not caught as a TCP error",
                field_at(&bytes, off)
            );
        }
    }

    #[test]
    fn verify_catches_flip_in_udp_datagram() {
        let bytes = Packet::eth(MAC_A, MAC_B)
            .ipv4(CLIENT, NODE)
            .udp(1000, 2000)
            .payload(b"dns?")
            .build();
        let l4 = ETH_HLEN + IPV4_MIN_HLEN;
        for off in (l4..bytes.len()).filter(|o| !(l4 + 4..l4 + 6).contains(o)) {
            let mut bad = bytes.clone();
            bad[off] ^= 0x01;
            assert!(
                matches!(verify_checksums(&bad), Err(ChecksumError::Udp { .. })),
                "flip at {off} ({}) not caught as a UDP error",
                field_at(&bytes, off)
            );
        }
    }

    /// The bug this exists to catch: DNAT that fixes the IPv4 checksum but not the TCP one
    /// (the pseudo-header covers the addresses).
    #[test]
    fn verify_catches_dnat_without_l4_update() {
        let mut bytes = syn().build();
        let ip = ETH_HLEN;
        bytes[ip + 16..ip + 20].copy_from_slice(&POD.octets());
        let csum = inet_csum::ipv4_header_checksum(&bytes[ip..ip + 20]);
        bytes[ip + 10..ip + 12].copy_from_slice(&csum.to_be_bytes());
        let right = syn().ipv4(CLIENT, POD).build();
        let expected = tcp_of(&parse_ok(&right)).checksum;
        let found = tcp_of(&parse_ok(&bytes)).checksum;
        assert_eq!(
            verify_checksums(&bytes),
            Err(ChecksumError::Tcp { found, expected })
        );
    }

    /// 0x0000 and 0xffff are the same one's-complement value: both are accepted where the
    /// from-scratch sum is zero, and nothing else is.
    #[test]
    fn verify_accepts_negative_zero_tcp_checksum() {
        let probe = syn().payload(&[0, 0]).build();
        let c = tcp_of(&parse_ok(&probe)).checksum;
        // Payload word equal to the checksum drives the sum to 0xffff, the checksum to 0.
        let base = syn().payload(&c.to_be_bytes());
        let zero = base.build();
        assert_eq!(tcp_of(&parse_ok(&zero)).checksum, 0);
        verify_checksums(&zero).unwrap();
        verify_checksums(&base.clone().l4_checksum(0xffff).build()).unwrap();
        assert!(verify_checksums(&base.l4_checksum(0x0001).build()).is_err());
    }

    #[test]
    fn vlan_shifts_everything_by_four() {
        let plain = syn().payload(b"hi").build();
        let tagged_pkt = syn().payload(b"hi").vlan(100);
        let tagged = tagged_pkt.build();
        assert_eq!(tagged.len(), plain.len() + VLAN_HLEN);
        assert_eq!(&tagged[12..18], &[0x81, 0x00, 0x00, 0x64, 0x08, 0x00]);
        assert_eq!(
            &tagged[18..],
            &plain[14..],
            "IP and TCP must be identical after the tag"
        );
        let p = parse_ok(&tagged);
        assert_eq!((p.vlan, p.ethertype), (Some(100), ETH_P_IP));
        assert_eq!(
            (p.l3_offset, p.l4_offset, p.payload_offset),
            (18, Some(38), 58)
        );
        verify_checksums(&tagged).unwrap();
        assert_eq!(tagged_pkt.no_vlan().build(), plain);
        assert_eq!(parse_ok(&syn().vlan(4095).build()).vlan, Some(4095));
    }

    #[test]
    fn ip_options_grow_ihl_and_lengths() {
        let plain = syn().build();
        // Three NOPs, padded with one EOL.
        let opt = syn().ip_options(&[1, 1, 1]).build();
        assert_eq!(opt.len(), plain.len() + 4);
        let p = parse_ok(&opt);
        let ip = p.ip.as_ref().unwrap();
        assert_eq!((ip.ihl, ip.options.as_slice()), (6, &[1u8, 1, 1, 0][..]));
        assert_eq!(usize::from(ip.tot_len), opt.len() - ETH_HLEN);
        assert_eq!(p.l4_offset, Some(ETH_HLEN + 24));
        assert_eq!(tcp_of(&p).dport, 30080);
        verify_checksums(&opt).unwrap();
        // The options are covered by the header checksum.
        let mut bad = opt.clone();
        bad[ETH_HLEN + 21] ^= 0x80;
        assert!(matches!(
            verify_checksums(&bad),
            Err(ChecksumError::Ipv4Header { .. })
        ));
        // The largest IHL can express.
        let full = syn().ip_options(&[1; 40]).build();
        assert_eq!(parse_ok(&full).ip.unwrap().ihl, 15);
        verify_checksums(&full).unwrap();
    }

    #[test]
    #[should_panic(expected = "exceed the 40 IHL can describe")]
    fn ip_options_over_40_bytes_panic() {
        let _ = syn().ip_options(&[1; 41]);
    }

    #[test]
    fn truncate_to_cuts_the_built_frame() {
        let pkt = syn().payload(b"0123456789");
        let full = pkt.build();
        let cut = pkt.truncate_to(40);
        assert_eq!(cut.len(), 40);
        assert_eq!(cut, full[..40]);
        assert_eq!(
            parse(&pkt.truncate_to(10)),
            Err(ParseError::Truncated {
                layer: "ethernet",
                offset: 0,
                need: 14,
                have: 10
            })
        );
        assert_eq!(
            parse(&pkt.truncate_to(30)),
            Err(ParseError::Truncated {
                layer: "IPv4",
                offset: 14,
                need: 20,
                have: 16
            })
        );
        // Cut inside TCP: the IPv4 total length no longer fits the frame.
        assert!(matches!(
            parse(&cut),
            Err(ParseError::BadTotLen { available: 26, .. })
        ));
        assert_eq!(pkt.truncate_to(full.len()), full);
    }

    #[test]
    #[should_panic(expected = "truncate_to(100) on a 54-byte packet")]
    fn truncate_beyond_length_panics() {
        let _ = syn().truncate_to(100);
    }

    /// A row's expected output derived from its input keeps flags, seq, payload and ids;
    /// exactly the fields the NAT changes differ.
    #[test]
    fn derived_expectation_changes_only_what_was_asked() {
        let input = syn().seq(77).ip_id(0x4242).payload(b"GET /");
        let expect = input
            .clone()
            .macs(MAC_B, [0x02, 0, 0, 0, 0, 0x03])
            .ipv4(CLIENT, POD)
            .ttl(63)
            .tcp(40000, 8080);
        let p = parse_ok(&expect.build());
        let ip = p.ip.as_ref().unwrap();
        assert_eq!((ip.src, ip.dst, ip.ttl, ip.id), (CLIENT, POD, 63, 0x4242));
        let tcp = tcp_of(&p);
        assert_eq!(
            (tcp.sport, tcp.dport, tcp.flags, tcp.seq),
            (40000, 8080, TCP_SYN, 77)
        );
        assert_eq!(p.payload, b"GET /");
        verify_checksums(&expect.build()).unwrap();

        let diff = hexdiff(&input.build(), &expect.build());
        assert!(
            diff.contains(
                "differing fields: eth.dst@0x5, eth.src@0xb, ip.ttl@0x16, ip.checksum@0x18, \
                 ip.dst@0x1e, tcp.dport@0x24, tcp.checksum@0x32"
            ),
            "{diff}"
        );
        // Port-only and address-only changes keep everything else too.
        let p2 = parse_ok(&input.clone().dport(8443).ip_dst(POD).build());
        assert_eq!((tcp_of(&p2).sport, tcp_of(&p2).dport), (40000, 8443));
        assert_eq!(p2.ip.as_ref().unwrap().src, CLIENT);
    }

    #[test]
    fn switching_l4_protocol_starts_fresh() {
        let udp = syn().seq(5).udp(53, 53).build();
        let p = parse_ok(&udp);
        assert_eq!(p.ip.as_ref().unwrap().proto, IPPROTO_UDP);
        assert_eq!(udp_of(&p).len, 8);
        let back = parse_ok(&syn().seq(5).udp(53, 53).tcp(1, 2).build());
        assert_eq!(
            (tcp_of(&back).flags, tcp_of(&back).seq),
            (0, DEFAULT_TCP_SEQ)
        );
        let same = parse_ok(&syn().seq(5).tcp(1, 2).build());
        assert_eq!((tcp_of(&same).flags, tcp_of(&same).seq), (TCP_SYN, 5));
    }

    #[test]
    fn flags_accumulate_and_can_be_replaced() {
        let p = parse_ok(&syn().ack().psh().fin().rst().ack_seq(9).build());
        let t = tcp_of(&p);
        assert_eq!(t.flags, TCP_SYN | TCP_ACK | TCP_PSH | TCP_FIN | TCP_RST);
        assert_eq!(t.ack_seq, 9);
        let p = parse_ok(&syn().tcp_flags(TCP_ACK).build());
        assert_eq!(p.l4.unwrap().tcp_flags(), Some(TCP_ACK));
    }

    #[test]
    fn overrides_write_malformed_fields() {
        // A wrong IPv4 checksum is written as given and reported with both values.
        let good = parse_ok(&syn().build()).ip.unwrap().checksum;
        let bad = syn().ip_checksum(0xdead).build();
        assert_eq!(
            verify_checksums(&bad),
            Err(ChecksumError::Ipv4Header {
                found: 0xdead,
                expected: good
            })
        );
        assert_eq!(
            syn().ip_checksum(0xdead).recompute_checksums().build(),
            syn().build()
        );

        assert_eq!(
            parse(&syn().ihl(4).build()),
            Err(ParseError::BadIhl { ihl: 4 })
        );
        assert!(matches!(
            parse(&syn().tot_len(1000).build()),
            Err(ParseError::BadTotLen { tot_len: 1000, .. })
        ));
        assert_eq!(
            parse(&syn().tcp_data_offset(4).build()),
            Err(ParseError::BadTcpDataOffset {
                data_offset: 4,
                segment_len: 20
            })
        );
        let udp = Packet::eth(MAC_A, MAC_B).ipv4(CLIENT, NODE).udp(1, 2);
        assert_eq!(
            parse(&udp.udp_len(9).build()),
            Err(ParseError::BadUdpLen {
                udp_len: 9,
                segment_len: 8
            })
        );
        // Unknown protocol: no L4 header is parsed, the bytes are the payload.
        let gre = parse_ok(&syn().ip_proto(47).build());
        assert_eq!(gre.ip.as_ref().unwrap().proto, 47);
        assert!(gre.l4.is_none());
        assert_eq!(gre.payload.len(), TCP_MIN_HLEN);
        // Mislabelled ethertype: IPv4 bytes follow, but nothing parses them as IPv4.
        let v6 = syn().ethertype(ETH_P_IPV6).build();
        let p = parse_ok(&v6);
        assert!(p.ip.is_none());
        assert_eq!(p.payload[0], 0x45);
        assert_eq!(
            verify_checksums(&v6),
            Err(ChecksumError::NotIpv4 {
                ethertype: ETH_P_IPV6
            })
        );
        // A bad version nibble under an IPv4 ethertype.
        let mut v5 = syn().build();
        v5[ETH_HLEN] = 0x55;
        assert_eq!(
            parse(&v5),
            Err(ParseError::BadIpVersion {
                offset: 14,
                version: 5
            })
        );
    }

    #[test]
    fn fragments() {
        let first = syn().dont_fragment(false).frag(true, 0).build();
        let p = parse_ok(&first);
        let ip = p.ip.as_ref().unwrap();
        assert!(ip.more_fragments && !ip.dont_fragment && ip.is_fragment());
        assert_eq!(&first[ETH_HLEN + 6..ETH_HLEN + 8], &[0x20, 0x00]);
        assert!(p.l4.is_some(), "a first fragment carries the L4 header");

        let later = syn().frag(false, 185).payload(b"tail").build();
        assert_eq!(&later[ETH_HLEN + 6..ETH_HLEN + 8], &[0x40, 185]);
        let p = parse_ok(&later);
        assert_eq!(p.ip.as_ref().unwrap().frag_offset, 185);
        assert!(p.l4.is_none(), "a later fragment has no L4 header");
        assert_eq!(p.payload.len(), TCP_MIN_HLEN + 4);
        verify_checksums(&later).unwrap();
    }

    #[test]
    fn non_ip_frames() {
        let arp_body = [0x11u8; 28];
        let arp = Packet::eth(MAC_A, [0xff; 6])
            .ethertype(ETH_P_ARP)
            .payload(&arp_body)
            .build();
        assert_eq!(arp.len(), ETH_HLEN + 28);
        let p = parse_ok(&arp);
        assert_eq!((p.ethertype, p.eth_dst), (ETH_P_ARP, [0xff; 6]));
        assert_eq!(p.payload, arp_body);
        assert!(p.ip.is_none() && p.l4.is_none());
    }

    #[test]
    fn ethernet_padding_is_trailer() {
        let mut frame = Packet::eth(MAC_A, MAC_B)
            .ipv4(CLIENT, NODE)
            .udp(1, 2)
            .build();
        frame.resize(60, 0);
        let p = parse_ok(&frame);
        assert_eq!(p.trailer, vec![0; 60 - 42]);
        assert!(p.payload.is_empty());
        verify_checksums(&frame).unwrap();
    }

    #[test]
    #[should_panic(expected = "call .ipv4(src, dst) before .ttl()")]
    fn ip_setter_without_ip_panics() {
        let _ = Packet::eth(MAC_A, MAC_B).ttl(3);
    }

    #[test]
    #[should_panic(expected = ".syn() needs a TCP header")]
    fn tcp_flag_on_udp_panics() {
        let _ = Packet::eth(MAC_A, MAC_B).ipv4(CLIENT, NODE).udp(1, 2).syn();
    }

    #[test]
    #[should_panic(expected = "VLAN id 4096 does not fit")]
    fn vlan_id_over_12_bits_panics() {
        let _ = syn().vlan(4096);
    }

    #[test]
    fn hexdiff_shows_only_differing_rows() {
        let a = syn().payload(&[0u8; 64]).build();
        assert_eq!(
            hexdiff(&a, &a),
            "expected 118 bytes, actual 118 bytes, 0 bytes differ\n"
        );
        let mut b = a.clone();
        b[100] = 0xee;
        let d = hexdiff(&a, &b);
        let expected = "expected 118 bytes, actual 118 bytes, 1 bytes differ\n\
                        differing fields: payload@0x64\n        (6 identical rows)\n\
                        0060 - 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00\n\
                        0060 + 00 00 00 00 ee 00 00 00 00 00 00 00 00 00 00 00\n\
                        \x20                  ^^\n        (1 identical rows)\n";
        assert_eq!(d, expected, "\n{d}");
    }

    #[test]
    fn hexdiff_marks_missing_bytes() {
        let a = syn().build();
        let b = &a[..50];
        let d = hexdiff(&a, b);
        assert!(
            d.starts_with("expected 54 bytes, actual 50 bytes, 4 bytes differ\n"),
            "{d}"
        );
        assert!(
            d.contains("differing fields: tcp.checksum@0x32, tcp.urg_ptr@0x34"),
            "{d}"
        );
        assert!(d.contains("0030 + fa f0 -- -- -- --"), "{d}");
        assert!(d.contains("             ^^ ^^ ^^ ^^"), "{d}");
        // Extra bytes in the actual frame are named from the actual frame.
        let mut longer = a.clone();
        longer.extend_from_slice(&[1, 2]);
        assert!(hexdiff(&a, &longer).contains("differing fields: trailer@0x36"));
    }

    #[test]
    fn hexdiff_names_vlan_and_option_fields() {
        let a = syn()
            .vlan(7)
            .ip_options(&[1, 1, 1, 1])
            .tcp_options(&[1, 1, 1, 1])
            .build();
        let mut b = a.clone();
        b[15] ^= 1; // VLAN TCI
        b[18 + 21] ^= 1; // IPv4 option
        b[18 + 24 + 21] ^= 1; // TCP option
        let d = hexdiff(&a, &b);
        assert!(
            d.contains("differing fields: vlan.tci@0xf, ip.options@0x27, tcp.options@0x3f"),
            "{d}"
        );
    }
}

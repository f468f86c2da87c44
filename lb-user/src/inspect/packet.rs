//! Frames for `explain`: built from the command line's addresses (Ethernet, IPv4, TCP or
//! UDP, correct checksums) and decoded for the report (the input and what the program made
//! of it, checksums verified from scratch).

use std::fmt;
use std::net::{Ipv4Addr, SocketAddrV4};

use lb_common::{CtKey, PROTO_TCP, PROTO_UDP};

const PROTO_ICMP: u8 = 1;
const PROTO_IPIP: u8 = 4;
use serde::Serialize;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_8021Q: u16 = 0x8100;
const IPV4_HLEN: usize = 20;
const TCP_HLEN: usize = 20;
const UDP_HLEN: usize = 8;

/// What to send: a TCP segment (with `tcp_flags`) or a UDP datagram.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probe {
    pub from: SocketAddrV4,
    pub to: SocketAddrV4,
    /// `PROTO_TCP` or `PROTO_UDP`.
    pub proto: u8,
    /// TCP flags (SYN, ACK, ...); ignored for UDP.
    pub tcp_flags: u8,
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub ttl: u8,
}

impl Probe {
    /// An Ethernet frame carrying the probe, checksums filled in.
    pub fn frame(&self) -> Vec<u8> {
        let l4_len = if self.proto == PROTO_TCP {
            TCP_HLEN
        } else {
            UDP_HLEN
        };
        let mut f = Vec::with_capacity(ETH_HLEN + IPV4_HLEN + l4_len);
        f.extend_from_slice(&self.dst_mac);
        f.extend_from_slice(&self.src_mac);
        f.extend_from_slice(&ETH_P_IP.to_be_bytes());
        let ip = f.len();
        f.extend_from_slice(&[0x45, 0]);
        f.extend_from_slice(&((IPV4_HLEN + l4_len) as u16).to_be_bytes());
        f.extend_from_slice(&[0, 1, 0x40, 0, self.ttl, self.proto, 0, 0]);
        f.extend_from_slice(&self.from.ip().octets());
        f.extend_from_slice(&self.to.ip().octets());
        let l4 = f.len();
        f.extend_from_slice(&self.from.port().to_be_bytes());
        f.extend_from_slice(&self.to.port().to_be_bytes());
        if self.proto == PROTO_TCP {
            f.extend_from_slice(&[0, 0, 0x10, 0, 0, 0, 0, 0]); // seq, ack
            f.extend_from_slice(&[0x50, self.tcp_flags, 0xfa, 0xf0, 0, 0, 0, 0]);
        } else {
            f.extend_from_slice(&(UDP_HLEN as u16).to_be_bytes());
            f.extend_from_slice(&[0, 0]);
        }
        let sum = checksum(&f[ip..l4], 0);
        f[ip + 10..ip + 12].copy_from_slice(&sum.to_be_bytes());
        let csum_off = l4 + if self.proto == PROTO_TCP { 16 } else { 6 };
        let mut l4sum = checksum(&f[l4..], pseudo_header(&f[ip..l4], f.len() - l4));
        if self.proto == PROTO_UDP && l4sum == 0 {
            l4sum = 0xffff;
        }
        f[csum_off..csum_off + 2].copy_from_slice(&l4sum.to_be_bytes());
        f
    }
}

/// A frame as `explain` reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Decoded {
    pub src_mac: String,
    pub dst_mac: String,
    pub vlan: Option<u16>,
    /// The (outermost) TCP or UDP segment.
    pub l4: Option<Segment>,
    /// An ICMP error, with the packet it quotes.
    pub icmp: Option<Icmp>,
    /// An encapsulated packet: the tunnel's outer addresses and the inner packet.
    pub tunnel: Option<Tunnel>,
    /// What else there is to say (not IPv4, truncated, fragment, a wrong checksum).
    pub note: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Segment {
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub proto: String,
    pub ttl: u8,
    /// TCP flags as letters (S, A, F, R, P), empty for UDP.
    pub flags: String,
    /// The TCP MSS option, when the segment carries one.
    pub mss: Option<u16>,
    pub payload_len: usize,
    /// Both the IPv4 and the TCP/UDP checksum are right (computed from scratch).
    pub checksums_ok: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Icmp {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub ty: u8,
    pub code: u8,
    /// The next-hop MTU of a fragmentation-needed error.
    pub mtu: Option<u16>,
    /// The quoted packet's addresses and ports.
    pub quote: Option<(SocketAddrV4, SocketAddrV4, String)>,
    /// The IPv4 checksum, the ICMP checksum and the quote's IPv4 checksum are right.
    pub checksums_ok: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Tunnel {
    /// "ipip" or "fou".
    pub encap: &'static str,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub inner: Box<Decoded>,
}

/// The keys a frame's packets are looked up by (wire order, as the maps hold them).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FrameKeys {
    /// The outer IPv4 source and destination.
    pub saddr: u32,
    pub daddr: u32,
    /// The TCP/UDP 5-tuple.
    pub l4: Option<CtKey>,
    /// The 5-tuple an ICMP error quotes.
    pub quote: Option<CtKey>,
    /// The inner packet of an encapsulation.
    pub inner: Option<Box<FrameKeys>>,
}

impl Decoded {
    /// The 5-tuple as the maps key it (wire order), when the frame is IPv4 TCP/UDP.
    pub fn key(frame: &[u8]) -> Option<CtKey> {
        Self::keys(frame, None).l4
    }

    /// Every key the frame's packets are looked up by; UDP to `fou_port` (host order) is a
    /// FOU encapsulation.
    pub fn keys(frame: &[u8], fou_port: Option<u16>) -> FrameKeys {
        match l3_start(frame) {
            Ok(ip) => ip_keys(&frame[ip..], fou_port),
            Err(_) => FrameKeys::default(),
        }
    }

    pub fn decode(frame: &[u8]) -> Decoded {
        Self::decode_with(frame, None)
    }

    /// [`Decoded::decode`], UDP to `fou_port` (host order) decoded as FOU.
    pub fn decode_with(frame: &[u8], fou_port: Option<u16>) -> Decoded {
        let mut d = Decoded {
            src_mac: frame.get(6..12).map(mac_text).unwrap_or_default(),
            dst_mac: frame.get(0..6).map(mac_text).unwrap_or_default(),
            ..Decoded::default()
        };
        if frame.len() >= 18 && u16::from_be_bytes([frame[12], frame[13]]) == ETH_P_8021Q {
            d.vlan = Some(u16::from_be_bytes([frame[14], frame[15]]) & 0x0fff);
        }
        match l3_start(frame) {
            Ok(ip) => decode_ip(&frame[ip..], fou_port, &mut d),
            Err(why) => d.note = Some(why),
        }
        d
    }
}

fn mac_text(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The offset of the IPv4 header after Ethernet and an optional 802.1Q tag.
fn l3_start(frame: &[u8]) -> Result<usize, String> {
    if frame.len() < ETH_HLEN {
        return Err(format!(
            "{} bytes: shorter than an Ethernet header",
            frame.len()
        ));
    }
    let mut ip = ETH_HLEN;
    let mut ethertype = u16::from_be_bytes([frame[12], frame[13]]);
    if ethertype == ETH_P_8021Q {
        if frame.len() < ETH_HLEN + 4 {
            return Err("802.1Q tag cut short".into());
        }
        ethertype = u16::from_be_bytes([frame[16], frame[17]]);
        ip += 4;
    }
    if ethertype != ETH_P_IP {
        return Err(format!("not IPv4 (ethertype {ethertype:#06x})"));
    }
    Ok(ip)
}

/// An IPv4 header lbx reads: its total length (within `ip`), or why not.
fn ipv4_len(ip: &[u8]) -> Result<usize, String> {
    let h = ip.get(..IPV4_HLEN).ok_or("IPv4 header cut short")?;
    if h[0] != 0x45 {
        return Err(format!(
            "IPv4 version/IHL byte {:#04x}: options or not IPv4",
            h[0]
        ));
    }
    if u16::from_be_bytes([h[6], h[7]]) & 0x3fff != 0 {
        return Err("IPv4 fragment".into());
    }
    let tot_len = u16::from_be_bytes([h[2], h[3]]) as usize;
    if tot_len < IPV4_HLEN || tot_len > ip.len() {
        return Err("IPv4 total length and frame disagree".into());
    }
    Ok(tot_len)
}

fn addr_at(h: &[u8], o: usize) -> Ipv4Addr {
    Ipv4Addr::new(h[o], h[o + 1], h[o + 2], h[o + 3])
}

fn u32_at(h: &[u8], o: usize) -> u32 {
    u32::from_ne_bytes([h[o], h[o + 1], h[o + 2], h[o + 3]])
}

fn ports_key(ip: &[u8]) -> Option<CtKey> {
    let l4 = ip.get(IPV4_HLEN..IPV4_HLEN + 4)?;
    Some(CtKey {
        saddr: u32_at(ip, 12),
        daddr: u32_at(ip, 16),
        sport: u16::from_ne_bytes([l4[0], l4[1]]),
        dport: u16::from_ne_bytes([l4[2], l4[3]]),
        proto: ip[9],
        ..Default::default()
    })
}

/// The payload of a FOU packet (UDP to `fou_port`): the inner IPv4 packet.
fn fou_inner(ip: &[u8], fou_port: Option<u16>) -> Option<&[u8]> {
    let dport = u16::from_be_bytes([*ip.get(IPV4_HLEN + 2)?, *ip.get(IPV4_HLEN + 3)?]);
    (ip[9] == PROTO_UDP && Some(dport) == fou_port).then(|| &ip[IPV4_HLEN + UDP_HLEN..])
}

fn ip_keys(ip: &[u8], fou_port: Option<u16>) -> FrameKeys {
    let Ok(tot_len) = ipv4_len(ip) else {
        return FrameKeys::default();
    };
    let ip = &ip[..tot_len];
    let mut k = FrameKeys {
        saddr: u32_at(ip, 12),
        daddr: u32_at(ip, 16),
        ..FrameKeys::default()
    };
    match ip[9] {
        PROTO_TCP | PROTO_UDP => {
            k.l4 = ports_key(ip);
            if let Some(inner) = fou_inner(ip, fou_port) {
                k.inner = Some(Box::new(ip_keys(inner, None)));
            }
        }
        PROTO_ICMP => {
            if let Some(quote) = ip.get(IPV4_HLEN + 8..) {
                if quote.len() >= IPV4_HLEN + 4 && quote[0] == 0x45 {
                    k.quote = ports_key(quote);
                }
            }
        }
        PROTO_IPIP => k.inner = Some(Box::new(ip_keys(&ip[IPV4_HLEN..], None))),
        _ => {}
    }
    k
}

/// Fills `d` from the IPv4 packet at the start of `ip`.
fn decode_ip(ip: &[u8], fou_port: Option<u16>, d: &mut Decoded) {
    let tot_len = match ipv4_len(ip) {
        Ok(n) => n,
        Err(why) => {
            d.note = Some(why);
            return;
        }
    };
    let h = &ip[..tot_len];
    let ip_ok = checksum(&h[..IPV4_HLEN], 0) == 0;
    let body = &h[IPV4_HLEN..];
    match h[9] {
        PROTO_TCP | PROTO_UDP => decode_segment(h, fou_port, ip_ok, d),
        PROTO_ICMP if body.len() >= 8 => {
            let ty = body[0];
            let quote = body
                .get(8..)
                .filter(|q| q.len() >= IPV4_HLEN + 4 && q[0] == 0x45);
            d.icmp = Some(Icmp {
                src: addr_at(h, 12),
                dst: addr_at(h, 16),
                ty,
                code: body[1],
                mtu: (ty == 3 && body[1] == 4).then(|| u16::from_be_bytes([body[6], body[7]])),
                quote: quote.map(|q| {
                    let port = |o: usize| u16::from_be_bytes([q[o], q[o + 1]]);
                    (
                        SocketAddrV4::new(addr_at(q, 12), port(IPV4_HLEN)),
                        SocketAddrV4::new(addr_at(q, 16), port(IPV4_HLEN + 2)),
                        lb_common::ProtoName(q[9]).to_string(),
                    )
                }),
                checksums_ok: ip_ok
                    && checksum(body, 0) == 0
                    && quote.is_none_or(|q| checksum(&q[..IPV4_HLEN], 0) == 0),
            });
        }
        PROTO_IPIP => {
            let mut inner = Decoded::default();
            decode_ip(body, None, &mut inner);
            d.tunnel = Some(Tunnel {
                encap: "ipip",
                src: addr_at(h, 12),
                dst: addr_at(h, 16),
                inner: Box::new(inner),
            });
            if !ip_ok {
                d.note = Some("wrong checksum: outer IPv4".into());
            }
        }
        p => d.note = Some(format!("IP protocol {p}: neither TCP nor UDP")),
    }
}

fn decode_segment(h: &[u8], fou_port: Option<u16>, ip_ok: bool, d: &mut Decoded) {
    let proto = h[9];
    let l4 = &h[IPV4_HLEN..];
    let need = if proto == PROTO_TCP {
        TCP_HLEN
    } else {
        UDP_HLEN
    };
    if l4.len() < need {
        d.note = Some("L4 header cut short".into());
        return;
    }
    let udp_no_sum = proto == PROTO_UDP && l4[6..8] == [0, 0];
    let l4_ok = udp_no_sum || checksum(l4, pseudo_header(&h[..IPV4_HLEN], l4.len())) == 0;
    let (flags, hlen, mss) = if proto == PROTO_TCP {
        let f = l4[13];
        let flags = [
            (TCP_SYN, 'S'),
            (TCP_ACK, 'A'),
            (TCP_FIN, 'F'),
            (TCP_RST, 'R'),
            (TCP_PSH, 'P'),
        ]
        .iter()
        .filter(|(bit, _)| f & bit != 0)
        .map(|(_, c)| *c)
        .collect();
        let hlen = ((l4[12] >> 4) as usize * 4).clamp(TCP_HLEN, l4.len());
        (flags, hlen, tcp_mss(&l4[TCP_HLEN..hlen]))
    } else {
        (String::new(), UDP_HLEN, None)
    };
    let port = |o: usize| u16::from_be_bytes([l4[o], l4[o + 1]]);
    d.l4 = Some(Segment {
        src: SocketAddrV4::new(addr_at(h, 12), port(0)),
        dst: SocketAddrV4::new(addr_at(h, 16), port(2)),
        proto: lb_common::ProtoName(proto).to_string(),
        ttl: h[8],
        flags,
        mss,
        payload_len: l4.len().saturating_sub(hlen),
        checksums_ok: ip_ok && l4_ok,
    });
    if !(ip_ok && l4_ok) {
        d.note = Some(format!(
            "wrong checksum: {}",
            match (ip_ok, l4_ok) {
                (false, false) => "IPv4 and L4",
                (false, true) => "IPv4",
                _ => "L4",
            }
        ));
    }
    if let Some(inner_ip) = fou_inner(h, fou_port) {
        let mut inner = Decoded::default();
        decode_ip(inner_ip, None, &mut inner);
        d.tunnel = Some(Tunnel {
            encap: "fou",
            src: addr_at(h, 12),
            dst: addr_at(h, 16),
            inner: Box::new(inner),
        });
    }
}

/// The MSS option among TCP options.
fn tcp_mss(mut opts: &[u8]) -> Option<u16> {
    while let Some(&kind) = opts.first() {
        match kind {
            0 => return None,
            1 => opts = &opts[1..],
            _ => {
                let len = *opts.get(1)? as usize;
                if len < 2 || len > opts.len() {
                    return None;
                }
                if kind == 2 && len == 4 {
                    return Some(u16::from_be_bytes([opts[2], opts[3]]));
                }
                opts = &opts[len..];
            }
        }
    }
    None
}

impl fmt::Display for Decoded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.src_mac.is_empty() {
            write!(f, "{} -> {}", self.src_mac, self.dst_mac)?;
            if let Some(v) = self.vlan {
                write!(f, " vlan {v}")?;
            }
            f.write_str(", ")?;
        }
        if let Some(t) = &self.tunnel {
            write!(f, "{} {} -> {} [", t.encap, t.src, t.dst)?;
            return write!(f, "{}]", t.inner);
        }
        if let Some(s) = &self.l4 {
            write!(f, "{} {} -> {} ttl {}", s.proto, s.src, s.dst, s.ttl)?;
            if !s.flags.is_empty() {
                write!(f, " [{}]", s.flags)?;
            }
            if let Some(mss) = s.mss {
                write!(f, " mss {mss}")?;
            }
            if s.payload_len > 0 {
                write!(f, " +{} bytes", s.payload_len)?;
            }
            if s.checksums_ok {
                f.write_str(", checksums ok")?;
            }
        }
        if let Some(i) = &self.icmp {
            write!(
                f,
                "ICMP {} -> {} type {} code {}",
                i.src, i.dst, i.ty, i.code
            )?;
            if let Some(mtu) = i.mtu {
                write!(f, " mtu {mtu}")?;
            }
            if let Some((s, d, p)) = &i.quote {
                write!(f, " quoting {p} {s} -> {d}")?;
            }
            if i.checksums_ok {
                f.write_str(", checksums ok")?;
            }
        }
        if let Some(note) = &self.note {
            write!(f, ", {note}")?;
        }
        Ok(())
    }
}

/// The pseudo-header's sum for an L4 checksum over `len` bytes.
fn pseudo_header(ip: &[u8], len: usize) -> u32 {
    let word = |o: usize| u16::from_be_bytes([ip[o], ip[o + 1]]) as u32;
    word(12) + word(14) + word(16) + word(18) + ip[9] as u32 + len as u32
}

/// The Internet checksum of `data` plus `initial` (RFC 1071), as stored on the wire; 0 when
/// `data` already holds a correct checksum.
fn checksum(data: &[u8], initial: u32) -> u16 {
    let mut sum = initial as u64;
    for chunk in data.chunks(2) {
        let hi = chunk[0] as u64;
        let lo = chunk.get(1).copied().unwrap_or(0) as u64;
        sum += (hi << 8) | lo;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(proto: u8) -> Probe {
        Probe {
            from: "10.0.0.9:40000".parse().unwrap(),
            to: "192.168.1.10:30080".parse().unwrap(),
            proto,
            tcp_flags: TCP_SYN,
            src_mac: [2, 0, 0, 0, 0, 1],
            dst_mac: [2, 0, 0, 0, 0, 2],
            ttl: 64,
        }
    }

    #[test]
    fn built_frames_decode_with_correct_checksums() {
        for proto in [PROTO_TCP, PROTO_UDP] {
            let frame = probe(proto).frame();
            let d = Decoded::decode(&frame);
            let s = d.l4.clone().expect("decodes");
            assert!(s.checksums_ok, "{d}");
            assert_eq!(s.src, probe(proto).from);
            assert_eq!(s.dst, probe(proto).to);
            assert_eq!(s.ttl, 64);
            assert_eq!(d.note, None);
            let key = Decoded::key(&frame).unwrap();
            assert_eq!(key.proto, proto);
            assert_eq!(key.dport, lb_common::port_be(30080));
        }
        assert_eq!(
            Decoded::decode(&probe(PROTO_TCP).frame()).l4.unwrap().flags,
            "S"
        );
    }

    #[test]
    fn a_flipped_byte_is_a_wrong_checksum_and_odd_frames_are_named() {
        let mut frame = probe(PROTO_TCP).frame();
        let last = frame.len() - 1;
        frame[last] ^= 0xff;
        let d = Decoded::decode(&frame);
        assert!(!d.l4.as_ref().unwrap().checksums_ok);
        assert_eq!(d.note.as_deref(), Some("wrong checksum: L4"));

        let mut arp = probe(PROTO_TCP).frame();
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        assert_eq!(
            Decoded::decode(&arp).note.as_deref(),
            Some("not IPv4 (ethertype 0x0806)")
        );
        assert_eq!(Decoded::key(&arp), None);
        assert!(Decoded::decode(&[0u8; 10])
            .note
            .unwrap()
            .contains("shorter"));
    }
}

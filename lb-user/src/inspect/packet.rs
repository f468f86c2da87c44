//! Frames for `explain`: built from the command line's addresses (Ethernet, IPv4, TCP or
//! UDP, correct checksums) and decoded for the report (the input and what the program made
//! of it, checksums verified from scratch).

use std::fmt;
use std::net::{Ipv4Addr, SocketAddrV4};

use lb_common::{CtKey, PROTO_TCP, PROTO_UDP};
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
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Decoded {
    pub src_mac: String,
    pub dst_mac: String,
    pub vlan: Option<u16>,
    /// None when the frame is not IPv4 TCP/UDP without options (then `note` says what).
    pub l4: Option<Segment>,
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
    pub payload_len: usize,
    /// Both the IPv4 and the TCP/UDP checksum are right (computed from scratch).
    pub checksums_ok: bool,
}

impl Decoded {
    /// The 5-tuple as the maps key it (wire order), when the frame is IPv4 TCP/UDP.
    pub fn key(frame: &[u8]) -> Option<CtKey> {
        let (ip, l4) = headers(frame).ok()?;
        let h = &frame[ip..];
        Some(CtKey {
            saddr: u32::from_ne_bytes(h[12..16].try_into().ok()?),
            daddr: u32::from_ne_bytes(h[16..20].try_into().ok()?),
            sport: u16::from_ne_bytes(frame[l4..l4 + 2].try_into().ok()?),
            dport: u16::from_ne_bytes(frame[l4 + 2..l4 + 4].try_into().ok()?),
            proto: h[9],
            ..Default::default()
        })
    }

    pub fn decode(frame: &[u8]) -> Decoded {
        let mac = |b: &[u8]| {
            b.iter()
                .map(|x| format!("{x:02x}"))
                .collect::<Vec<_>>()
                .join(":")
        };
        let mut d = Decoded {
            src_mac: frame.get(6..12).map(mac).unwrap_or_default(),
            dst_mac: frame.get(0..6).map(mac).unwrap_or_default(),
            vlan: None,
            l4: None,
            note: None,
        };
        if frame.len() >= 18 && u16::from_be_bytes([frame[12], frame[13]]) == ETH_P_8021Q {
            d.vlan = Some(u16::from_be_bytes([frame[14], frame[15]]) & 0x0fff);
        }
        let (ip, l4) = match headers(frame) {
            Ok(offsets) => offsets,
            Err(why) => {
                d.note = Some(why);
                return d;
            }
        };
        let h = &frame[ip..];
        let tot_len = u16::from_be_bytes([h[2], h[3]]) as usize;
        let proto = h[9];
        let end = (ip + tot_len).min(frame.len());
        let ip_ok = checksum(&h[..IPV4_HLEN], 0) == 0;
        let l4_bytes = &frame[l4..end];
        let udp_no_sum = proto == PROTO_UDP && l4_bytes[6..8] == [0, 0];
        let l4_ok =
            udp_no_sum || checksum(l4_bytes, pseudo_header(&h[..IPV4_HLEN], l4_bytes.len())) == 0;
        let flags = if proto == PROTO_TCP {
            let f = frame[l4 + 13];
            [
                (TCP_SYN, 'S'),
                (TCP_ACK, 'A'),
                (TCP_FIN, 'F'),
                (TCP_RST, 'R'),
                (TCP_PSH, 'P'),
            ]
            .iter()
            .filter(|(bit, _)| f & bit != 0)
            .map(|(_, c)| *c)
            .collect()
        } else {
            String::new()
        };
        let hlen = if proto == PROTO_TCP {
            ((frame[l4 + 12] >> 4) as usize) * 4
        } else {
            UDP_HLEN
        };
        let port = |o: usize| u16::from_be_bytes([frame[o], frame[o + 1]]);
        let addr = |o: usize| Ipv4Addr::new(h[o], h[o + 1], h[o + 2], h[o + 3]);
        d.l4 = Some(Segment {
            src: SocketAddrV4::new(addr(12), port(l4)),
            dst: SocketAddrV4::new(addr(16), port(l4 + 2)),
            proto: lb_common::ProtoName(proto).to_string(),
            ttl: h[8],
            flags,
            payload_len: l4_bytes.len().saturating_sub(hlen),
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
        d
    }
}

impl fmt::Display for Decoded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} -> {}", self.src_mac, self.dst_mac)?;
        if let Some(v) = self.vlan {
            write!(f, " vlan {v}")?;
        }
        if let Some(s) = &self.l4 {
            write!(f, ", {} {} -> {} ttl {}", s.proto, s.src, s.dst, s.ttl)?;
            if !s.flags.is_empty() {
                write!(f, " [{}]", s.flags)?;
            }
            if s.payload_len > 0 {
                write!(f, " +{} bytes", s.payload_len)?;
            }
            if s.checksums_ok {
                f.write_str(", checksums ok")?;
            }
        }
        if let Some(note) = &self.note {
            write!(f, ", {note}")?;
        }
        Ok(())
    }
}

/// Offsets of the IPv4 and the TCP/UDP header, or why the frame has none we decode.
fn headers(frame: &[u8]) -> Result<(usize, usize), String> {
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
    let h = frame
        .get(ip..ip + IPV4_HLEN)
        .ok_or("IPv4 header cut short")?;
    if h[0] != 0x45 {
        return Err(format!(
            "IPv4 version/IHL byte {:#04x}: options or not IPv4",
            h[0]
        ));
    }
    if u16::from_be_bytes([h[6], h[7]]) & 0x3fff != 0 {
        return Err("IPv4 fragment".into());
    }
    let l4 = ip + IPV4_HLEN;
    let need = match h[9] {
        PROTO_TCP => TCP_HLEN,
        PROTO_UDP => UDP_HLEN,
        p => return Err(format!("IP protocol {p}: neither TCP nor UDP")),
    };
    let tot_len = u16::from_be_bytes([h[2], h[3]]) as usize;
    if frame.len() < l4 + need || tot_len < IPV4_HLEN + need || ip + tot_len > frame.len() {
        return Err("IPv4 total length and frame disagree, or L4 header cut short".into());
    }
    Ok((ip, l4))
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

//! Internet checksums computed from scratch (RFC 1071) over whole headers and pseudo-headers.
//!
//! Deliberately independent of `lb_common::csum`: the XDP program updates checksums
//! incrementally with that code, and a test that validated it with the same code could not
//! catch its mistakes. Everything here is a plain sum over every byte, nothing incremental.

use std::net::Ipv4Addr;

/// IANA protocol number of TCP (its checksum field sits at offset 16).
const PROTO_TCP: u8 = 6;
/// IANA protocol number of UDP (its checksum field sits at offset 6).
const PROTO_UDP: u8 = 17;

/// Offset of the checksum field in an IPv4 header.
const IPV4_CSUM_OFF: usize = 10;

/// One's-complement sum of `data` as big-endian 16-bit words, folded to 16 bits, not
/// complemented. An odd trailing byte is the high byte of a last word padded with zero.
pub fn ones_complement_sum(data: &[u8]) -> u16 {
    fold(sum_words(data))
}

/// RFC 1071 checksum of `data`: the complement of its one's-complement sum. The value is
/// the number whose big-endian bytes go on the wire. Summing data that already holds its
/// correct checksum gives 0.
pub fn checksum(data: &[u8]) -> u16 {
    !ones_complement_sum(data)
}

/// The checksum an IPv4 header must carry. `hdr` is the whole header including options
/// (IHL * 4 bytes); its current checksum field (bytes 10..12) is treated as zero, so the
/// result can be compared with what is stored there.
///
/// # Panics
/// If `hdr` is shorter than 12 bytes (it could not hold a checksum field).
pub fn ipv4_header_checksum(hdr: &[u8]) -> u16 {
    assert!(
        hdr.len() >= IPV4_CSUM_OFF + 2,
        "ipv4_header_checksum needs at least 12 header bytes, got {}: pass the whole header",
        hdr.len()
    );
    let sum = sum_words(&hdr[..IPV4_CSUM_OFF]) + sum_words(&hdr[IPV4_CSUM_OFF + 2..]);
    !fold(sum)
}

/// The checksum a TCP or UDP segment must carry: RFC 1071 over the IPv4 pseudo-header
/// (src, dst, zero, proto, segment length) followed by `segment` (L4 header + data).
///
/// For TCP and UDP the segment's own checksum field is treated as zero, so the result can
/// be compared with what is stored. For UDP a computed 0 is returned as 0xffff, because 0 on
/// the wire means "no checksum" (RFC 768). For any other `proto` the segment is summed as
/// given.
///
/// # Panics
/// If `segment` is longer than 65535 bytes (no IPv4 packet can carry it) or too short to hold
/// the TCP/UDP checksum field.
pub fn l4_checksum(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, segment: &[u8]) -> u16 {
    let len = u16::try_from(segment.len()).unwrap_or_else(|_| {
        panic!(
            "l4_checksum: a {}-byte segment does not fit in IPv4",
            segment.len()
        )
    });
    let mut pseudo = [0u8; 12];
    pseudo[0..4].copy_from_slice(&src.octets());
    pseudo[4..8].copy_from_slice(&dst.octets());
    pseudo[9] = proto;
    pseudo[10..12].copy_from_slice(&len.to_be_bytes());

    let csum_off = match proto {
        PROTO_TCP => Some(16),
        PROTO_UDP => Some(6),
        _ => None,
    };
    let body = match csum_off {
        Some(off) => {
            assert!(
                segment.len() >= off + 2,
                "l4_checksum: a {}-byte segment is too short for the protocol {proto} checksum \
                 field at offset {off}",
                segment.len()
            );
            // Both halves start at even offsets, so summing them apart keeps word alignment.
            sum_words(&segment[..off]) + sum_words(&segment[off + 2..])
        }
        None => sum_words(segment),
    };
    let csum = !fold(sum_words(&pseudo) + body);
    if proto == PROTO_UDP && csum == 0 {
        0xffff
    } else {
        csum
    }
}

/// Whether two checksum values are the same one's-complement number: 0x0000 and 0xffff are
/// both zero, and a correct incremental update (RFC 1624) may produce either.
pub fn same_checksum(a: u16, b: u16) -> bool {
    a == b || (a == 0 && b == 0xffff) || (a == 0xffff && b == 0)
}

/// Sum of big-endian 16-bit words, wide enough that no carry is lost for any IPv4 packet.
fn sum_words(data: &[u8]) -> u64 {
    let mut chunks = data.chunks_exact(2);
    let mut sum: u64 = chunks
        .by_ref()
        .map(|w| u64::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    if let [last] = chunks.remainder() {
        sum += u64::from(*last) << 8;
    }
    sum
}

/// Fold the carries back in (end-around carry) until 16 bits remain.
fn fold(mut sum: u64) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 1071 section 3, the worked example: these bytes sum to 0xddf2.
    #[test]
    fn rfc1071_example() {
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(ones_complement_sum(&data), 0xddf2);
        assert_eq!(checksum(&data), 0x220d);
    }

    /// A real captured header (Wikipedia's IPv4 checksum example); the stored value is 0xb861.
    #[test]
    fn captured_ipv4_header() {
        let hdr = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(ipv4_header_checksum(&hdr), 0xb861);
        // The stored field is ignored, whatever it holds.
        let mut zeroed = hdr;
        zeroed[10] = 0x12;
        zeroed[11] = 0x34;
        assert_eq!(ipv4_header_checksum(&zeroed), 0xb861);
        // Receiver's view: summing a correct header including its checksum gives 0.
        assert_eq!(checksum(&hdr), 0);
    }

    /// Odd-length data: the last byte is the high half of a zero-padded word.
    #[test]
    fn odd_length_pads_low_byte() {
        assert_eq!(ones_complement_sum(&[0xab]), 0xab00);
        assert_eq!(ones_complement_sum(&[0x12, 0x34, 0xab]), 0x1234 + 0xab00);
        assert_eq!(checksum(&[]), 0xffff);
    }

    /// Carries wrap around (end-around carry), more than once if needed.
    #[test]
    fn end_around_carry() {
        // 0xffff + 0x0001 = 0x1_0000 -> 0x0001.
        assert_eq!(ones_complement_sum(&[0xff, 0xff, 0x00, 0x01]), 0x0001);
        // Many 0xffff words stay 0xffff (negative zero), never 0.
        assert_eq!(ones_complement_sum(&[0xff; 4000]), 0xffff);
    }

    /// UDP vector from smoltcp's wire/udp.rs tests: 192.168.1.1 -> 192.168.1.2, 48896 -> 53.
    #[test]
    fn smoltcp_udp_vector() {
        let seg = [
            0xbf, 0x00, 0x00, 0x35, 0x00, 0x0c, 0x12, 0x4d, 0xaa, 0x00, 0x00, 0xff,
        ];
        let (src, dst) = (Ipv4Addr::new(192, 168, 1, 1), Ipv4Addr::new(192, 168, 1, 2));
        assert_eq!(l4_checksum(src, dst, PROTO_UDP, &seg), 0x124d);
    }

    /// UDP datagram sent by Linux 6.18 with checksum offload off, captured with tcpdump
    /// (10.99.0.1:40001 -> 10.99.0.2:53, payload "hello lbx\n").
    #[test]
    fn kernel_udp_vector() {
        let seg = [
            0x9c, 0x41, 0x00, 0x35, 0x00, 0x12, 0x26, 0x2c, 0x68, 0x65, 0x6c, 0x6c, 0x6f, 0x20,
            0x6c, 0x62, 0x78, 0x0a,
        ];
        let (src, dst) = (Ipv4Addr::new(10, 99, 0, 1), Ipv4Addr::new(10, 99, 0, 2));
        assert_eq!(l4_checksum(src, dst, PROTO_UDP, &seg), 0x262c);
    }

    /// TCP SYN with options from the same capture (10.99.0.1:40000 -> 10.99.0.2:8080).
    #[test]
    fn kernel_tcp_syn_vector() {
        let seg = [
            0x9c, 0x40, 0x1f, 0x90, 0x92, 0x8a, 0x93, 0x2e, 0x00, 0x00, 0x00, 0x00, 0xa0, 0x02,
            0xfa, 0xf0, 0x2f, 0xa0, 0x00, 0x00, 0x02, 0x04, 0x05, 0xb4, 0x04, 0x02, 0x08, 0x0a,
            0xc9, 0x08, 0x5e, 0x11, 0x00, 0x00, 0x00, 0x00, 0x01, 0x03, 0x03, 0x0a,
        ];
        let (src, dst) = (Ipv4Addr::new(10, 99, 0, 1), Ipv4Addr::new(10, 99, 0, 2));
        assert_eq!(l4_checksum(src, dst, PROTO_TCP, &seg), 0x2fa0);
        // Any change to a covered byte, or to the pseudo-header, changes the result.
        let mut bad = seg;
        bad[1] ^= 0x01;
        assert_ne!(l4_checksum(src, dst, PROTO_TCP, &bad), 0x2fa0);
        assert_ne!(
            l4_checksum(src, Ipv4Addr::new(10, 99, 0, 3), PROTO_TCP, &seg),
            0x2fa0
        );
    }

    /// A UDP segment whose sum is exactly 0xffff must carry 0xffff, not 0 ("no checksum").
    #[test]
    fn udp_zero_result_is_sent_as_ffff() {
        let (src, dst) = (Ipv4Addr::new(0, 0, 0, 0), Ipv4Addr::new(0, 0, 0, 0));
        // Pseudo-header sums to 17 (proto) + 10 (length); pick a data word completing 0xffff.
        let rest = 0xffff - 17 - 10 - 10; // the UDP length field (10) is summed as well
        let mut seg = [0u8; 10];
        seg[4..6].copy_from_slice(&10u16.to_be_bytes());
        seg[8..10].copy_from_slice(&(rest as u16).to_be_bytes());
        assert_eq!(ones_complement_sum(&seg) as u32 + 17 + 10, 0xffff);
        assert_eq!(l4_checksum(src, dst, PROTO_UDP, &seg), 0xffff);
        // TCP has no such rule: the same arithmetic result stays 0.
        let mut tcp = [0u8; 20];
        tcp[18..20].copy_from_slice(&((0xffff - 6 - 20) as u16).to_be_bytes());
        assert_eq!(l4_checksum(src, dst, PROTO_TCP, &tcp), 0);
    }

    #[test]
    fn same_checksum_treats_both_zeros_alike() {
        assert!(same_checksum(0, 0xffff));
        assert!(same_checksum(0xffff, 0));
        assert!(same_checksum(0x1234, 0x1234));
        assert!(!same_checksum(0x1234, 0x1235));
        assert!(!same_checksum(0, 1));
    }
}

//! The flow hash both sides agree on: the XDP program uses it to pick a Maglev slot, and
//! userspace (tests, `explain`) uses it to predict the same choice.

/// murmur3's 32-bit finaliser: cheap, and every input bit reaches every output bit.
#[inline(always)]
pub const fn fmix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

#[inline(always)]
const fn mix(h: u32, k: u32) -> u32 {
    let k = k
        .wrapping_mul(0xcc9e_2d51)
        .rotate_left(15)
        .wrapping_mul(0x1b87_3593);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

/// Hash of a flow as seen on the wire (addresses and ports in the maps' byte order).
#[inline(always)]
pub const fn flow_hash(
    saddr: &[u32; 4],
    daddr: &[u32; 4],
    sport: u16,
    dport: u16,
    proto: u8,
) -> u32 {
    let mut h = 0x9747_b28c_u32 ^ proto as u32;
    h = mix(h, saddr[0]);
    h = mix(h, saddr[1]);
    h = mix(h, saddr[2]);
    h = mix(h, saddr[3]);
    h = mix(h, daddr[0]);
    h = mix(h, daddr[1]);
    h = mix(h, daddr[2]);
    h = mix(h, daddr[3]);
    h = mix(h, ((sport as u32) << 16) | dport as u32);
    fmix32(h)
}

/// A tunnelled flow's entropy (FOU's outer source port, the outer IPv4 ID otherwise): the
/// same for every packet of one direction of a flow, spread over flows for ECMP paths and
/// receive queues. No Maglev slot depends on it, so one finaliser does instead of
/// [`flow_hash`]'s ten rounds (every tunnelled packet pays it, established ones too).
#[inline(always)]
pub const fn tunnel_entropy(saddr: u32, daddr: u32, sport: u16, dport: u16) -> u16 {
    fmix32(saddr ^ daddr.rotate_left(16) ^ (((sport as u32) << 16) | dport as u32)) as u16
}

/// Hash of a client address alone (sessionAffinity ClientIP picks by client, not by flow).
#[inline(always)]
pub const fn client_hash(saddr: &[u32; 4]) -> u32 {
    let mut h = 0x2f69_3a1b_u32;
    h = mix(h, saddr[0]);
    h = mix(h, saddr[1]);
    h = mix(h, saddr[2]);
    h = mix(h, saddr[3]);
    fmix32(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flow_hash_depends_on_every_field() {
        let a = [1, 0, 0, 0];
        let b = [2, 0, 0, 0];
        let base = flow_hash(&a, &b, 1, 2, 6);
        assert_ne!(base, flow_hash(&b, &a, 1, 2, 6));
        assert_ne!(base, flow_hash(&a, &b, 2, 1, 6));
        assert_ne!(base, flow_hash(&a, &b, 1, 2, 17));
        assert_ne!(base, flow_hash(&a, &[2, 0, 0, 1], 1, 2, 6));
        assert_eq!(base, flow_hash(&a, &b, 1, 2, 6));
    }

    #[test]
    fn tunnel_entropy_is_per_flow_and_spreads_client_ports() {
        let (c, f) = (0x0a4d_0066_u32.to_be(), 0x0a4d_0002_u32.to_be());
        assert_eq!(
            tunnel_entropy(c, f, 40000, 80),
            tunnel_entropy(c, f, 40000, 80)
        );
        // One client, 4 096 consecutive source ports to one frontend: the 14 low bits FOU
        // puts in its source port (0xc000 | entropy) and the 4 a receive queue might use.
        let mut seen = [0u64; 256];
        let mut queues = [0u32; 16];
        for port in 40000u16..44096 {
            let e = tunnel_entropy(c, f, port.to_be(), 80u16.to_be()) & 0x3fff;
            seen[(e >> 6) as usize] |= 1 << (e & 63);
            queues[(e & 15) as usize] += 1;
        }
        let distinct: u32 = seen.iter().map(|w| w.count_ones()).sum();
        assert!(
            distinct > 3500,
            "{distinct} distinct FOU source ports of 4096"
        );
        assert!(
            queues.iter().all(|&n| (192..=320).contains(&n)),
            "{queues:?}"
        );
        assert_ne!(tunnel_entropy(c, f, 1, 2), tunnel_entropy(f, c, 1, 2));
    }
}

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
}

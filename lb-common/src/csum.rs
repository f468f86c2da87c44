//! Incremental Internet checksum updates (RFC 1624, eqn. 3: HC' = ~(~HC + ~m + m')).
//!
//! Values are taken exactly as they sit in the packet, loaded as native integers: the
//! one's-complement sum is byte-order independent, so no swapping is needed as long as the
//! result is stored back the same way. Userspace tests check these against a checksum
//! computed from scratch by an independent implementation.

#[inline(always)]
pub const fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// Checksum after one 16-bit word changed from `old` to `new`.
#[inline(always)]
pub const fn replace2(check: u16, old: u16, new: u16) -> u16 {
    let sum = (!check) as u32 + (!old) as u32 + new as u32;
    !fold(sum)
}

/// Checksum after one 32-bit field changed from `old` to `new` (e.g. an IPv4 address).
#[inline(always)]
pub const fn replace4(check: u16, old: u32, new: u32) -> u16 {
    let sum = (!check) as u32 + ((!old) & 0xffff) + ((!old) >> 16) + (new & 0xffff) + (new >> 16);
    !fold(sum)
}

/// UDP: a zero checksum means "none" and must stay zero; a computed zero is sent as 0xffff.
#[inline(always)]
pub const fn udp_replace4(check: u16, old: u32, new: u32) -> u16 {
    if check == 0 {
        return 0;
    }
    let c = replace4(check, old, new);
    if c == 0 {
        0xffff
    } else {
        c
    }
}

/// UDP counterpart of [`replace2`].
#[inline(always)]
pub const fn udp_replace2(check: u16, old: u16, new: u16) -> u16 {
    if check == 0 {
        return 0;
    }
    let c = replace2(check, old, new);
    if c == 0 {
        0xffff
    } else {
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// From-scratch checksum over 16-bit native words, for comparison only.
    fn full(words: &[u16]) -> u16 {
        let mut s: u32 = 0;
        for w in words {
            s += *w as u32;
        }
        !fold(s)
    }

    #[test]
    fn replace4_matches_recompute() {
        let mut words = [
            0x4500u16, 0x0054, 0x1c46, 0x4000, 0x4006, 0, 0xac10, 0x0a63, 0xac10, 0x0a0c,
        ];
        let before = full(&words);
        let old = (words[8] as u32) | ((words[9] as u32) << 16);
        words[8] = 0x0a00;
        words[9] = 0x0105;
        let new = (words[8] as u32) | ((words[9] as u32) << 16);
        assert_eq!(replace4(before, old, new), full(&words));
    }

    #[test]
    fn replace2_matches_recompute_for_many_values() {
        let mut x: u32 = 12345;
        for _ in 0..10_000 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            let mut words = [
                (x >> 3) as u16,
                (x >> 7) as u16,
                0xffff,
                0,
                (x >> 16) as u16,
            ];
            let before = full(&words);
            let old = words[1];
            words[1] = (x >> 11) as u16;
            assert_eq!(replace2(before, old, words[1]), full(&words), "x={x}");
        }
    }

    #[test]
    fn udp_zero_checksum_stays_zero() {
        assert_eq!(udp_replace4(0, 1, 2), 0);
        assert_eq!(udp_replace2(0, 1, 2), 0);
    }
}

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

/// The one's-complement change of a 16-bit word going from `old` to `new`. Changes add up
/// (several fields, several headers sharing fields like the pseudo-header addresses) and are
/// applied once with [`apply`]: one fold per checksum instead of one per field.
#[inline(always)]
pub const fn diff2(old: u16, new: u16) -> u32 {
    (!old) as u32 + new as u32
}

/// [`diff2`] for a 32-bit field (e.g. an IPv4 address) as two 16-bit words.
#[inline(always)]
pub const fn diff4(old: u32, new: u32) -> u32 {
    ((!old) & 0xffff) + ((!old) >> 16) + (new & 0xffff) + (new >> 16)
}

/// Checksum after the changes summed in `diff` (at most 0x10000 [`diff2`] terms, so the
/// sum cannot overflow 32 bits).
#[inline(always)]
pub const fn apply(check: u16, diff: u32) -> u16 {
    !fold((!check) as u32 + diff)
}

/// Checksum after one 16-bit word changed from `old` to `new`.
#[inline(always)]
pub const fn replace2(check: u16, old: u16, new: u16) -> u16 {
    apply(check, diff2(old, new))
}

/// UDP counterpart of [`apply`]: a zero checksum means "none" and stays zero; a computed
/// zero is sent as 0xffff.
#[inline(always)]
pub const fn udp_apply(check: u16, diff: u32) -> u16 {
    if check == 0 {
        return 0;
    }
    let c = apply(check, diff);
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
    fn diff4_matches_recompute() {
        let mut words = [
            0x4500u16, 0x0054, 0x1c46, 0x4000, 0x4006, 0, 0xac10, 0x0a63, 0xac10, 0x0a0c,
        ];
        let before = full(&words);
        let old = (words[8] as u32) | ((words[9] as u32) << 16);
        words[8] = 0x0a00;
        words[9] = 0x0105;
        let new = (words[8] as u32) | ((words[9] as u32) << 16);
        assert_eq!(apply(before, diff4(old, new)), full(&words));
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

    /// Several fields changed at once, applied as one summed diff, against a recompute and
    /// against one apply per field.
    #[test]
    fn summed_diffs_match_recompute_and_per_field_replaces() {
        let mut x: u32 = 777;
        for _ in 0..10_000 {
            let mut next = || {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                x
            };
            let mut words: [u16; 8] = core::array::from_fn(|_| (next() >> 9) as u16);
            let before = full(&words);
            let (old_a, old_b, old_p) = (
                words[0] as u32 | (words[1] as u32) << 16,
                words[2] as u32 | (words[3] as u32) << 16,
                words[4],
            );
            let (new_a, new_b, new_p) = (next(), next(), (next() >> 7) as u16);
            words[0] = new_a as u16;
            words[1] = (new_a >> 16) as u16;
            words[2] = new_b as u16;
            words[3] = (new_b >> 16) as u16;
            words[4] = new_p;
            let summed = apply(
                before,
                diff4(old_a, new_a) + diff4(old_b, new_b) + diff2(old_p, new_p),
            );
            let stepwise = replace2(
                apply(apply(before, diff4(old_a, new_a)), diff4(old_b, new_b)),
                old_p,
                new_p,
            );
            // 0x0000 and 0xffff are the same one's-complement value.
            let canon = |c: u16| if c == 0xffff { 0 } else { c };
            assert_eq!(canon(summed), canon(full(&words)), "x={x}");
            assert_eq!(canon(summed), canon(stepwise), "x={x}");
        }
    }

    #[test]
    fn udp_zero_checksum_stays_zero() {
        assert_eq!(udp_apply(0, 12345), 0);
        assert_eq!(udp_apply(0, diff4(1, 2)), 0);
        // A sum that comes out as zero is sent as 0xffff (zero would mean "no checksum").
        assert_eq!(apply(0x0001, diff2(0, 1)), 0);
        assert_eq!(udp_apply(0x0001, diff2(0, 1)), 0xffff);
    }
}

//! Maglev consistent hashing (Eisenbud et al., NSDI'16): turns a service's backend set into
//! the lookup ring the XDP program indexes with `flow_hash % m`.
//!
//! Why Maglev: every backend owns `floor(m/n)` or `ceil(m/n)` slots (even load), and adding
//! or removing one backend moves little more than that backend's own share of flows, so the
//! flows that have no conntrack entry yet (e.g. after an agent restart on another node) mostly
//! keep their backend.
//!
//! Everything here is deterministic: the table depends only on the set of (key, id) pairs and
//! `m`, never on input order, process, host or architecture. Two agents on two nodes therefore
//! build identical rings, and a rebuild after a restart changes nothing that did not change.

use std::sync::{Arc, Mutex, PoisonError};

use lb_common::BACKEND_ID_NONE;

/// A backend as Maglev sees it: `key` is its stable identity (so tables do not depend on id
/// allocation or input order), `id` is what the ring stores (a BACKENDS index, never 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaglevBackend {
    pub id: u32,
    pub key: u64,
}

/// Why a Maglev table could not be built.
#[derive(Debug, thiserror::Error)]
pub enum MaglevError {
    #[error(
        "Maglev table size {m} is above the maximum {max}: use a prime such as 16381 or 65521"
    )]
    TooLarge { m: u32, max: u32 },
    #[error("Maglev table size {m} is not prime: use a prime size such as 16381 or 65521")]
    NotPrime { m: u32 },
    #[error(
        "Maglev table size {m} is smaller than the {backends} backends it must hold: \
         use a prime size of at least 100x the largest backend count"
    )]
    TooSmall { m: u32, backends: usize },
    #[error(
        "backends {first_id} and {second_id} have the same Maglev key {key:#018x}: \
         each (address, port) must appear once per service, deduplicate the endpoints"
    )]
    DuplicateKey {
        key: u64,
        first_id: u32,
        second_id: u32,
    },
    #[error(
        "backend with Maglev key {key:#018x} has id 0, which the ring reserves for \
         \"no backend\": allocate backend ids from 1"
    )]
    ReservedId { key: u64 },
    #[error(
        "backend id {id} is given to two keys ({first_key:#018x} and {second_key:#018x}): \
         every backend needs its own BACKENDS slot, check the id allocator"
    )]
    DuplicateId {
        id: u32,
        first_key: u64,
        second_key: u64,
    },
}

/// splitmix64's finaliser (Stafford's variant 13): a fixed, seedless bijection on u64 whose
/// output bits all depend on all input bits. Fixed so tables match across processes and hosts.
#[inline(always)]
const fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// splitmix64's increment (2^64 / golden ratio).
const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// Stable identity of a backend from its address (lb_common shared form) and port (network order).
///
/// IPv4 addresses (words 1..3 zero) are packed losslessly as `address << 16 | port` (host
/// order numbers, so the key is the same on any architecture): two IPv4 backends never
/// collide. Other addresses are hashed over their wire bytes into keys with the top bit set,
/// which the IPv4 keys (48 bits) never have.
pub fn backend_key(addr: [u32; 4], port_be: u16) -> u64 {
    let port = u16::from_be_bytes(port_be.to_ne_bytes()) as u64;
    let word = |w: u32| u32::from_be_bytes(w.to_ne_bytes()) as u64;
    if addr[1] == 0 && addr[2] == 0 && addr[3] == 0 {
        return (word(addr[0]) << 16) | port;
    }
    let mut h = GOLDEN;
    for w in addr {
        h = mix64(h ^ word(w)).wrapping_add(GOLDEN);
    }
    mix64(h ^ port) | (1 << 63)
}

/// Whether `n` is prime (deterministic trial division by 6k±1; at most ~11k steps for u32).
pub fn is_prime(n: u32) -> bool {
    if n < 4 {
        return n >= 2;
    }
    if n.is_multiple_of(2) || n.is_multiple_of(3) {
        return false;
    }
    let n = n as u64;
    let mut d = 5u64;
    while d * d <= n {
        if n.is_multiple_of(d) || n.is_multiple_of(d + 2) {
            return false;
        }
        d += 6;
    }
    true
}

/// Largest table `build` accepts: far above any useful ring (Cilium caps at 131071), low
/// enough that a mistyped size fails clearly instead of allocating gigabytes.
pub const MAX_TABLE_SIZE: u32 = 1 << 24;

/// A backend's walk through the ring: step `j` visits slot `(scramble[x0 + j * skip] + shift)
/// % m`, with `x` the current `x0 + j * skip` kept incrementally.
struct Walk {
    x: u32,
    skip: u32,
    shift: u32,
    id: u32,
}

/// `(a + b) % m` for `a, b < m`, without overflow or a division.
#[inline(always)]
fn add_mod(a: u32, b: u32, m: u32) -> u32 {
    if a >= m - b {
        a - (m - b)
    } else {
        a + b
    }
}

/// A fixed pseudo-random permutation of `[0, m)` (Fisher-Yates driven by splitmix64 from a
/// constant seed), cached for the last `m` since an agent uses one size for every service.
///
/// Why: the paper's preference lists `(offset + j * skip) % m` are arithmetic progressions,
/// and two backends with related skips (equal, opposite, one twice the other, ...) walk the
/// ring in lockstep. Measured over 10 000 single-backend removals (m=16381, n=10) that moved
/// up to 6.1% of slots beyond the removed backend's own share (1.7% of cases above 0.9%).
/// Looking the progression up in a random permutation and shifting the result by a per-backend
/// amount breaks that structure: worst case 0.85%, the same as independent random
/// permutations, for one extra table load per step.
fn scramble(m: u32) -> Arc<[u32]> {
    static CACHE: Mutex<Option<Arc<[u32]>>> = Mutex::new(None);
    let mut cache = CACHE.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(p) = cache.as_ref().filter(|p| p.len() == m as usize) {
        return Arc::clone(p);
    }
    let mut perm: Vec<u32> = (0..m).collect();
    let mut state = 0x6c62_272e_07bb_0142_u64;
    for i in (1..perm.len()).rev() {
        state = state.wrapping_add(GOLDEN);
        // Multiply-shift maps the 64-bit output onto [0, i] (Lemire), no modulo needed.
        let j = ((mix64(state) as u128 * (i as u128 + 1)) >> 64) as usize;
        perm.swap(i, j);
    }
    let perm: Arc<[u32]> = perm.into();
    *cache = Some(Arc::clone(&perm));
    perm
}

/// Builds the lookup table of size `m` (must be prime, >= number of backends, else MaglevError).
/// Empty `backends` gives a table of all lb_common::BACKEND_ID_NONE (0). Deterministic: same set
/// of (key,id) in any order -> identical table. Duplicate keys -> error.
///
/// Population is the paper's: backends take turns (in key order, so input order does not
/// matter) claiming their next free preferred slot until the table is full, which gives every
/// backend `floor(m/n)` or `ceil(m/n)` slots. Preference lists come from the first three
/// splitmix64 outputs seeded with the key: `x0 = h1 % m`, `skip = h2 % (m - 1) + 1`,
/// `shift = h3 % m`, slot `j` = `(scramble[(x0 + j * skip) % m] + shift) % m`. `m` prime makes
/// every skip generate all of `[0, m)`, so each list is a permutation of the slots (see
/// [`scramble`] for why the progression is not used directly).
pub fn build(backends: &[MaglevBackend], m: u32) -> Result<Vec<u32>, MaglevError> {
    if m > MAX_TABLE_SIZE {
        return Err(MaglevError::TooLarge {
            m,
            max: MAX_TABLE_SIZE,
        });
    }
    if !is_prime(m) {
        return Err(MaglevError::NotPrime { m });
    }
    if (m as usize) < backends.len() {
        return Err(MaglevError::TooSmall {
            m,
            backends: backends.len(),
        });
    }
    let mut sorted = backends.to_vec();
    sorted.sort_unstable_by_key(|b| b.key);
    for pair in sorted.windows(2) {
        if pair[0].key == pair[1].key {
            return Err(MaglevError::DuplicateKey {
                key: pair[0].key,
                first_id: pair[0].id,
                second_id: pair[1].id,
            });
        }
    }
    if let Some(b) = sorted.iter().find(|b| b.id == BACKEND_ID_NONE) {
        return Err(MaglevError::ReservedId { key: b.key });
    }
    let mut by_id: Vec<&MaglevBackend> = sorted.iter().collect();
    by_id.sort_unstable_by_key(|b| (b.id, b.key));
    for pair in by_id.windows(2) {
        if pair[0].id == pair[1].id {
            return Err(MaglevError::DuplicateId {
                id: pair[0].id,
                first_key: pair[0].key,
                second_key: pair[1].key,
            });
        }
    }

    // BACKEND_ID_NONE doubles as the "free" marker: no backend may use it (checked above).
    let mut table = vec![BACKEND_ID_NONE; m as usize];
    if sorted.is_empty() {
        return Ok(table);
    }
    let scramble = scramble(m);
    let m64 = m as u64;
    let mut walks: Vec<Walk> = sorted
        .iter()
        .map(|b| {
            let h = |k: u64| mix64(b.key.wrapping_add(GOLDEN.wrapping_mul(k)));
            Walk {
                x: (h(1) % m64) as u32,
                // m >= 2 (prime), so m - 1 >= 1.
                skip: (h(2) % (m64 - 1)) as u32 + 1,
                shift: (h(3) % m64) as u32,
                id: b.id,
            }
        })
        .collect();

    let mut free = m;
    loop {
        for w in walks.iter_mut() {
            // Terminates: the walk visits every slot within m steps and one is still free.
            loop {
                let slot = add_mod(scramble[w.x as usize], w.shift, m);
                w.x = add_mod(w.x, w.skip, m);
                let slot = &mut table[slot as usize];
                if *slot == BACKEND_ID_NONE {
                    *slot = w.id;
                    break;
                }
            }
            free -= 1;
            if free == 0 {
                return Ok(table);
            }
        }
    }
}

/// Ring positions whose backend changed, as (position, new id), ascending position.
///
/// Compares position by position over `new`; positions past the end of `old` (the ring grew)
/// count as changed, so writing the result turns a map holding `old` into `new`.
pub fn changed_slots(old: &[u32], new: &[u32]) -> Vec<(u32, u32)> {
    new.iter()
        .enumerate()
        .filter(|&(p, &id)| old.get(p) != Some(&id))
        .map(|(p, &id)| (p as u32, id))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::hash::flow_hash;
    use lb_common::{port_be, v4, DEFAULT_MAGLEV_SIZE, PROTO_TCP};

    const M: u32 = DEFAULT_MAGLEV_SIZE;

    /// `n` backends on consecutive pod IPs 10.244.x.y:8080, ids from `first_id`.
    fn pods(n: u32, first_id: u32) -> Vec<MaglevBackend> {
        (0..n)
            .map(|i| {
                let host = i + 1;
                let addr = v4([10, 244, (host >> 8) as u8, host as u8]);
                MaglevBackend {
                    id: first_id + i,
                    key: backend_key(addr, port_be(8080)),
                }
            })
            .collect()
    }

    fn counts(table: &[u32]) -> std::collections::BTreeMap<u32, usize> {
        let mut c = std::collections::BTreeMap::new();
        for &id in table {
            *c.entry(id).or_insert(0) += 1;
        }
        c
    }

    /// Deterministic Fisher-Yates with a splitmix64 stream (no rand crate in this workspace).
    fn shuffle<T>(v: &mut [T], mut seed: u64) {
        for i in (1..v.len()).rev() {
            seed = seed.wrapping_add(GOLDEN);
            let j = (mix64(seed) % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
    }

    /// Slots of 100 000 synthetic flows: clients 172.16.0.0/16-ish, varied source ports.
    fn flow_slots(m: u32) -> Vec<usize> {
        let frontend = v4([192, 168, 1, 10]);
        (0..100_000u32)
            .map(|i| {
                let client = v4([172, 16 + (i % 7) as u8, (i >> 8) as u8, i as u8]);
                let sport = port_be(32768 + (i.wrapping_mul(7919) % 28000) as u16);
                (flow_hash(&client, &frontend, sport, port_be(30080), PROTO_TCP) % m) as usize
            })
            .collect()
    }

    fn moved(slots: &[usize], old: &[u32], new: &[u32]) -> usize {
        slots.iter().filter(|&&s| old[s] != new[s]).count()
    }

    #[test]
    fn maglev_is_prime_matches_a_sieve() {
        let limit = 20_000usize;
        let mut sieve = vec![true; limit];
        sieve[0] = false;
        sieve[1] = false;
        for i in 2..limit {
            if sieve[i] {
                for j in (i * i..limit).step_by(i) {
                    sieve[j] = false;
                }
            }
        }
        for (n, &p) in sieve.iter().enumerate() {
            assert_eq!(is_prime(n as u32), p, "is_prime({n})");
        }
        assert!(is_prime(65521));
        assert!(is_prime(4_294_967_291)); // largest u32 prime
        assert!(!is_prime(4_294_967_295));
        assert!(!is_prime(65521 * 65537)); // composite of two large primes
        assert!(!is_prime(65521 * 65519)); // two primes just below 2^16
    }

    #[test]
    fn maglev_backend_key_is_injective_for_ipv4_and_separates_families() {
        let a = backend_key(v4([10, 0, 0, 1]), port_be(80));
        assert_eq!(a, (0x0a00_0001u64 << 16) | 80);
        assert_ne!(a, backend_key(v4([10, 0, 0, 1]), port_be(81)));
        assert_ne!(a, backend_key(v4([10, 0, 0, 2]), port_be(80)));
        // The same bytes in another word are another (non-IPv4) backend.
        let w = v4([10, 0, 0, 1])[0];
        let v6 = backend_key([0, w, 0, 0], port_be(80));
        assert_ne!(v6, a);
        assert_ne!(v6 >> 63, 0);
        assert_ne!(v6, backend_key([0, 0, w, 0], port_be(80)));
        assert_eq!(v6, backend_key([0, w, 0, 0], port_be(80)));
    }

    #[test]
    fn maglev_balance_n10_within_one_slot() {
        let t = build(&pods(10, 1), M).unwrap();
        assert_eq!(t.len(), M as usize);
        let c = counts(&t);
        assert_eq!(
            c.keys().copied().collect::<Vec<_>>(),
            (1..=10).collect::<Vec<_>>()
        );
        let (lo, hi) = ((M / 10) as usize, M.div_ceil(10) as usize);
        for (id, n) in c {
            assert!(
                n == lo || n == hi,
                "backend {id} owns {n} slots, want {lo} or {hi}"
            );
        }
    }

    #[test]
    fn maglev_balance_n3_and_n100_within_one_percent() {
        for n in [3u32, 100] {
            let t = build(&pods(n, 1), M).unwrap();
            let c = counts(&t);
            assert_eq!(c.len(), n as usize, "every backend owns slots (n={n})");
            assert!(!c.contains_key(&BACKEND_ID_NONE), "no empty slot (n={n})");
            let fair = M as f64 / n as f64;
            for (id, k) in c {
                let dev = (k as f64 - fair).abs() / fair;
                assert!(
                    dev <= 0.01,
                    "n={n}: backend {id} owns {k} slots, fair {fair:.1}"
                );
            }
        }
    }

    #[test]
    fn maglev_balance_when_m_equals_n() {
        let t = build(&pods(7, 1), 7).unwrap();
        let mut ids = t.clone();
        ids.sort_unstable();
        assert_eq!(ids, (1..=7).collect::<Vec<_>>());
    }

    #[test]
    fn maglev_empty_backends_gives_all_none() {
        let t = build(&[], M).unwrap();
        assert_eq!(t.len(), M as usize);
        assert!(t.iter().all(|&id| id == BACKEND_ID_NONE));
    }

    #[test]
    fn maglev_disruption_remove_and_add_one_of_ten() {
        let slots = flow_slots(M);
        let all = pods(11, 1);
        let ten = &all[..10];
        let full = build(ten, M).unwrap();
        let bound = 100_000 * 11 / 100; // 1/10 + 1% of all flows
        for gone in 0..10 {
            let rest: Vec<_> = ten
                .iter()
                .copied()
                .filter(|b| b.id != ten[gone].id)
                .collect();
            let smaller = build(&rest, M).unwrap();
            let n = moved(&slots, &full, &smaller);
            assert!(
                n <= bound,
                "removing backend {gone}: {n} flows moved, bound {bound}"
            );
            // Every flow of the removed backend moves, to a remaining backend.
            for &s in &slots {
                if full[s] == ten[gone].id {
                    assert_ne!(smaller[s], ten[gone].id);
                    assert_ne!(smaller[s], BACKEND_ID_NONE);
                }
            }
            // Adding it back restores the original table, moving the same flows back.
            let again = build(&[rest.as_slice(), &[ten[gone]]].concat(), M).unwrap();
            assert_eq!(again, full, "re-adding backend {gone}");
            assert_eq!(moved(&slots, &smaller, &again), n);
        }
        // Adding a new, 11th backend: at most its share (1/11) + 1% of flows move.
        let grown = build(&all, M).unwrap();
        let n = moved(&slots, &full, &grown);
        let bound = 100_000 / 11 + 1_000;
        assert!(
            n <= bound,
            "adding an 11th backend: {n} flows moved, bound {bound}"
        );
    }

    /// Slot-level churn over many backend sets: this is what catches correlated preference
    /// lists (the plain offset/skip progression fails it, see `scramble`).
    #[test]
    fn maglev_disruption_many_sets_extra_churn_below_one_percent() {
        let m = M as usize;
        for set in 0..30u64 {
            let ten: Vec<_> = pods(10, 1)
                .into_iter()
                .map(|b| MaglevBackend {
                    id: b.id,
                    key: mix64(b.key ^ (set << 40)),
                })
                .collect();
            let full = build(&ten, M).unwrap();
            for gone in &ten {
                let rest: Vec<_> = ten.iter().copied().filter(|b| b.id != gone.id).collect();
                let smaller = build(&rest, M).unwrap();
                let own = full.iter().filter(|&&id| id == gone.id).count();
                let moved = full.iter().zip(&smaller).filter(|(a, b)| a != b).count();
                assert!(
                    moved >= own,
                    "set {set}: all of backend {}'s slots move",
                    gone.id
                );
                assert!(
                    (moved - own) * 100 <= m,
                    "set {set}, removing {}: {} slots moved beyond its own {own}",
                    gone.id,
                    moved - own
                );
            }
        }
    }

    #[test]
    fn maglev_scramble_is_a_permutation_and_cache_follows_m() {
        for m in [2u32, 101, 16381] {
            let mut p = scramble(m).to_vec();
            assert_ne!(p, (0..m).collect::<Vec<_>>(), "m={m} must be shuffled");
            p.sort_unstable();
            assert_eq!(p, (0..m).collect::<Vec<_>>(), "m={m}");
        }
        // Switching sizes back and forth must not leak one size's scramble into another.
        let b = pods(5, 1);
        let small = build(&b, 101).unwrap();
        let big = build(&b, M).unwrap();
        assert_eq!(build(&b, 101).unwrap(), small);
        assert_eq!(build(&b, M).unwrap(), big);
    }

    #[test]
    fn maglev_is_deterministic_across_input_order() {
        let base = pods(25, 100);
        let t = build(&base, M).unwrap();
        assert_eq!(t, build(&base, M).unwrap());
        for seed in 1..6 {
            let mut shuffled = base.clone();
            shuffle(&mut shuffled, seed);
            assert_ne!(
                shuffled, base,
                "the shuffle must change the order (seed {seed})"
            );
            assert_eq!(build(&shuffled, M).unwrap(), t, "seed {seed}");
        }
        let mut rev = base.clone();
        rev.reverse();
        assert_eq!(build(&rev, M).unwrap(), t);
    }

    #[test]
    fn maglev_table_depends_on_keys_not_on_id_allocation() {
        // Same keys, ids shifted: the ring is the same up to renaming.
        let a = pods(10, 1);
        let b: Vec<_> = a
            .iter()
            .map(|x| MaglevBackend {
                id: x.id + 40,
                key: x.key,
            })
            .collect();
        let ta = build(&a, M).unwrap();
        let tb = build(&b, M).unwrap();
        assert!(ta.iter().zip(&tb).all(|(x, y)| x + 40 == *y));
    }

    #[test]
    fn maglev_errors() {
        let b = pods(10, 1);
        assert!(matches!(
            build(&b, 16380),
            Err(MaglevError::NotPrime { m: 16380 })
        ));
        assert!(matches!(build(&b, 0), Err(MaglevError::NotPrime { m: 0 })));
        assert!(matches!(build(&b, 1), Err(MaglevError::NotPrime { m: 1 })));
        assert!(matches!(
            build(&b, 7),
            Err(MaglevError::TooSmall { m: 7, backends: 10 })
        ));
        assert!(build(&b, 11).is_ok());
        assert!(matches!(
            build(&b, 4_294_967_291),
            Err(MaglevError::TooLarge {
                m: 4_294_967_291,
                max: MAX_TABLE_SIZE
            })
        ));

        let mut dup = b.clone();
        dup.push(MaglevBackend {
            id: 99,
            key: b[3].key,
        });
        match build(&dup, M) {
            Err(MaglevError::DuplicateKey {
                key,
                first_id,
                second_id,
            }) => {
                assert_eq!(key, b[3].key);
                let mut ids = [first_id, second_id];
                ids.sort_unstable();
                assert_eq!(ids, [b[3].id, 99]);
            }
            other => panic!("want DuplicateKey, got {other:?}"),
        }

        let mut zero = b.clone();
        zero[5].id = BACKEND_ID_NONE;
        assert!(matches!(build(&zero, M), Err(MaglevError::ReservedId { key }) if key == b[5].key));

        let mut same_id = b.clone();
        same_id[7].id = same_id[2].id;
        assert!(matches!(
            build(&same_id, M),
            Err(MaglevError::DuplicateId { id, .. }) if id == b[2].id
        ));

        // Messages tell the operator what to do.
        let msg = build(&b, 16380).unwrap_err().to_string();
        assert!(msg.contains("16380") && msg.contains("prime"), "{msg}");
    }

    #[test]
    fn maglev_changed_slots_small_case() {
        assert_eq!(
            changed_slots(&[1, 2, 3, 4], &[1, 5, 3, 6]),
            vec![(1, 5), (3, 6)]
        );
        assert_eq!(changed_slots(&[1, 2, 3], &[1, 2, 3]), vec![]);
        assert_eq!(changed_slots(&[], &[0, 7]), vec![(0, 0), (1, 7)]);
        assert_eq!(changed_slots(&[1, 2], &[1, 9, 4]), vec![(1, 9), (2, 4)]);
        // Applying the diff to the old ring gives the new one.
        let old = build(&pods(10, 1), 101).unwrap();
        let new = build(&pods(9, 1), 101).unwrap();
        let diff = changed_slots(&old, &new);
        assert!(
            diff.windows(2).all(|w| w[0].0 < w[1].0),
            "ascending positions"
        );
        assert!(diff.iter().all(|&(p, id)| old[p as usize] != id));
        let mut patched = old.clone();
        for (p, id) in diff {
            patched[p as usize] = id;
        }
        assert_eq!(patched, new);
    }
}

//! Shared copies of names that repeat across thousands of objects. A node's name appears in
//! every endpoint of every EndpointSlice on it and in every backend the agent derives from
//! them: at 10 000 Services of 10 endpoints that is 100 000 equal strings per copy (each a
//! 24-byte `String` plus a 32-byte heap chunk). Interned, each endpoint holds a 16-byte
//! pointer to one shared allocation per distinct name.

use std::collections::HashSet;
use std::sync::{Arc, LazyLock, Mutex};

/// The interned names, and the size at which unused ones are dropped next.
struct Table {
    names: HashSet<Arc<str>>,
    prune_at: usize,
}

static TABLE: LazyLock<Mutex<Table>> = LazyLock::new(|| {
    Mutex::new(Table {
        names: HashSet::new(),
        prune_at: PRUNE_MIN,
    })
});

/// The table is pruned (names nobody holds any more removed) when it reaches this many
/// names, and after that at twice what a prune kept: amortised O(1) per call, and the table
/// stays within twice the number of names in use (a cluster's node names, a few thousand).
const PRUNE_MIN: usize = 64;

/// The shared copy of `name`.
pub fn intern(name: &str) -> Arc<str> {
    // A poisoned lock only means another thread panicked mid-insert; the set is still valid.
    let mut t = TABLE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(shared) = t.names.get(name) {
        return shared.clone();
    }
    if t.names.len() >= t.prune_at {
        t.names.retain(|n| Arc::strong_count(n) > 1);
        t.prune_at = (t.names.len() * 2).max(PRUNE_MIN);
    }
    let shared: Arc<str> = Arc::from(name);
    t.names.insert(shared.clone());
    shared
}

/// How many names the table holds (in use or not yet pruned), for tests.
#[cfg(test)]
fn table_len() -> usize {
    TABLE.lock().unwrap_or_else(|e| e.into_inner()).names.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intern_returns_one_shared_copy_per_name() {
        let a = intern("intern-test-node-a");
        let b = intern(&String::from("intern-test-node-a"));
        assert!(Arc::ptr_eq(&a, &b), "equal names share one allocation");
        let c = intern("intern-test-node-b");
        assert!(!Arc::ptr_eq(&a, &c));
        assert_eq!(&*c, "intern-test-node-b");
    }

    #[test]
    fn intern_drops_names_nobody_holds() {
        // Other tests intern concurrently, so bound the table rather than expect a number.
        let kept: Vec<Arc<str>> = (0..10)
            .map(|i| intern(&format!("intern-kept-{i}")))
            .collect();
        for i in 0..10 * PRUNE_MIN {
            drop(intern(&format!("intern-dropped-{i}")));
        }
        assert!(
            table_len() <= 2 * (PRUNE_MIN + 64),
            "{} names held after {} unused ones",
            table_len(),
            10 * PRUNE_MIN
        );
        for (i, k) in kept.iter().enumerate() {
            assert!(
                Arc::ptr_eq(k, &intern(&format!("intern-kept-{i}"))),
                "names in use survive a prune"
            );
        }
    }
}

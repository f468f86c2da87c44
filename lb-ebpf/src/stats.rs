//! Counting verdict reasons.

use lb_common::Reason;

use crate::maps::STATS;

/// One increment per packet, per CPU (no atomics needed).
#[inline(always)]
pub fn count(reason: Reason) {
    if let Some(slot) = STATS.get_ptr_mut(reason as u32) {
        unsafe { *slot += 1 };
    }
}

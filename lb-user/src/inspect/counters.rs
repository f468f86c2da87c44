//! `lb-user counters`: the per-reason packet counters, summed over CPUs.

use lb_common::Reason;
use serde::Serialize;

use super::{
    view::{serialize_reason, MapsView},
    InspectError,
};

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Counter {
    #[serde(serialize_with = "serialize_reason")]
    pub reason: Reason,
    pub count: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CountersReport {
    /// Every reason, in index order, zeros included.
    pub counters: Vec<Counter>,
    pub total: u64,
}

pub fn counters(view: &dyn MapsView) -> Result<CountersReport, InspectError> {
    let counters: Vec<Counter> = view
        .stats()?
        .into_iter()
        .map(|(reason, count)| Counter { reason, count })
        .collect();
    let total = counters
        .iter()
        .map(|c| c.count)
        .fold(0u64, u64::saturating_add);
    Ok(CountersReport { counters, total })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inspect::view::test_world::snapshot;

    #[test]
    fn counters_sum_every_reason() {
        let mut s = snapshot();
        s.stats[Reason::FwdLocal as usize] = 5;
        s.stats[Reason::PassNonService as usize] = 7;
        let c = counters(&s).unwrap();
        assert_eq!(c.counters.len(), Reason::ALL.len());
        assert_eq!(c.total, 12);
        assert_eq!(
            c.counters[0],
            Counter {
                reason: Reason::FwdLocal,
                count: 5
            }
        );
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(json["counters"][0]["reason"], "fwd_local");
    }
}

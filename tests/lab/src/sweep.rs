//! The Service sweep: new connections/s and p99 per path at each number of Services, in
//! rounds in which the paths take turns.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Result;

use crate::cli::CompareArgs;
use crate::cluster::Cluster;
use crate::loadgen::{LoadSpec, Mode};
use crate::machine::wait_quiet;
use crate::paths::path_sources;
use crate::progress::Progress;
use crate::report::{median, SweepPoint};

impl Cluster {
    /// One sweep point: new-connection load on each of `order`'s paths, `--sweep-rounds`
    /// times. The paths take turns within a round, each round starting one path later (xdp,
    /// instance, ip; then instance, ip, xdp; ...), so a slow stretch of the machine (a
    /// kube-proxy resync, the agents applying) does not land on one path every time; the
    /// point is each path's median round. Every load starts once the machine is quiet
    /// ([`wait_quiet`]).
    pub(crate) fn sweep_point(
        &self,
        services: usize,
        order: &[&str],
        c: &CompareArgs,
        progress: &Progress,
    ) -> Result<Vec<SweepPoint>> {
        let mut out: Vec<SweepPoint> = order
            .iter()
            .map(|p| SweepPoint {
                services,
                path: (*p).into(),
                ..SweepPoint::default()
            })
            .collect();
        let mut accelerated = None;
        for round in 0..c.sweep_rounds {
            for k in 0..order.len() {
                let i = (round + k) % order.len();
                let path = order[i];
                let want = path != "instance";
                // ip mode does not care; leave the Service as it is.
                if path != "ip" && accelerated != Some(want) {
                    self.set_accelerated(want)?;
                    accelerated = Some(want);
                }
                let waited = wait_quiet()?;
                let reasons0 = self.xdp_reasons()?;
                let res = self.load(LoadSpec {
                    sources: path_sources(path, self.lab.node_count()),
                    targets: self.targets_of(path)?,
                    mode: Mode::NewConnection,
                    connections: c.connections,
                    warmup: Duration::from_secs_f64(c.warmup.min(0.5)),
                    duration: Duration::from_secs_f64(c.sweep_duration),
                    timeout: Duration::from_secs(2),
                })?;
                progress.step(format!(
                    "sweep {services} Services, round {}/{}, {path}: {:.0} conn/s, p99 {:.0}us, \
                     {} errors (after {:.1}s waiting for a quiet machine)",
                    round + 1,
                    c.sweep_rounds,
                    res.rps(),
                    res.percentile_us(99.0),
                    res.errors,
                    waited.as_secs_f64()
                ));
                let point = &mut out[i];
                point.rounds_rps.push(res.rps());
                point.rounds_p99_us.push(res.percentile_us(99.0));
                point.errors += res.errors;
                for e in &res.first_errors {
                    let e = format!("round {}: {e}", round + 1);
                    progress.step(format!("           {path} sweep error: {e}"));
                    point.first_errors.push(e);
                }
                for (k, v) in reason_delta(&reasons0, self.xdp_reasons()?) {
                    *point.xdp_reasons.entry(k).or_default() += v;
                }
            }
        }
        for point in &mut out {
            point.new_conn_rps = median(&point.rounds_rps);
            point.p99_us = median(&point.rounds_p99_us);
        }
        self.set_accelerated(true)?;
        Ok(out)
    }
}

/// Counters that grew from `before` to `after`, by how much.
fn reason_delta(
    before: &BTreeMap<String, u64>,
    after: BTreeMap<String, u64>,
) -> BTreeMap<String, u64> {
    after
        .into_iter()
        .map(|(k, v)| {
            let d = v.saturating_sub(before.get(&k).copied().unwrap_or(0));
            (k, d)
        })
        .filter(|(_, v)| *v > 0)
        .collect()
}

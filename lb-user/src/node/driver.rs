//! Applies desired states through the reconciler (full, or scoped to the service ports
//! that changed), attaches the TC reply program to new local veths before their backends
//! enter a ring, and logs what each apply changed and what it could not do.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::Instant;

use log::{debug, error, info, warn};

use super::resolve::{NetResolver, ResolveCache};
use crate::bpf::{dataplane::Dataplane, netdev::ifname};
use crate::control::reconcile::Resolver as _;
use crate::control::{
    model::{DesiredState, ServicePortId},
    reconcile::{ApplyReport, Capacity, ReconcileError, Reconciler, Scope},
};

/// One line for the log; identical lines mean nothing changed.
fn summary(r: &ApplyReport) -> String {
    format!(
        "applied: {} map writes (frontends +{} -{} ~{}, backends +{} -{} ~{}, ring slots {}), \
         service slots +{} -{}, unresolved {}, skipped for capacity {}, frontend conflicts {}",
        r.writes(),
        r.frontends_added,
        r.frontends_removed,
        r.frontends_updated,
        r.backends_added,
        r.backends_removed,
        r.backends_updated,
        r.ring_slots_written,
        r.services_added,
        r.services_removed,
        r.unresolved.len(),
        r.skipped_capacity.len(),
        r.frontend_conflicts.len()
    )
}

/// The problems of an apply, one line each (logged when they change).
fn problems(r: &ApplyReport) -> Vec<String> {
    let mut out = Vec::new();
    for u in &r.unresolved {
        out.push(format!(
            "{}: backend {}:{} unresolved: {}",
            u.service, u.addr, u.port, u.reason
        ));
    }
    for c in &r.skipped_capacity {
        let what = match c.backend {
            Some((a, p)) => format!("backend {a}:{p}"),
            None => "the whole service port".to_string(),
        };
        out.push(format!(
            "{}: {what} left out, out of {:?} (raise {})",
            c.service,
            c.resource,
            match c.resource {
                Capacity::ServiceSlots => "--max-services",
                Capacity::BackendIds => "--max-backends",
                Capacity::RingSize => "--maglev-size",
            }
        ));
    }
    for c in &r.frontend_conflicts {
        out.push(format!(
            "frontend {}:{}/{} wanted by {} and {}; {} keeps it",
            c.frontend.0,
            c.frontend.1,
            crate::control::model::proto_name(c.frontend.2),
            c.owner,
            c.loser,
            c.owner
        ));
    }
    out
}

/// Applies desired states, attaches TC to new local veths, logs what changed.
pub(crate) struct Driver {
    pub(crate) node_name: String,
    pub(crate) reconciler: Reconciler,
    pub(crate) desired: DesiredState,
    pub(crate) node_ips: BTreeMap<String, Ipv4Addr>,
    /// Local pod veths seen by the last apply, and the ones the TC program is attached to.
    pub(crate) local_ifindexes: BTreeSet<u32>,
    pub(crate) tc_attached: BTreeSet<u32>,
    pub(crate) last_problems: Vec<String>,
    /// The last apply left backends unresolved: apply their service ports again next tick.
    pub(crate) retry: bool,
    /// The last apply failed: the next one must look at everything.
    pub(crate) failed: bool,
    /// When the last full apply ran.
    pub(crate) last_full: Instant,
    /// Remote endpoints of known nodes are reached through the tunnel.
    pub(crate) tunnel: bool,
    /// Backend resolutions reused by scoped applies.
    pub(crate) resolved: RefCell<ResolveCache>,
}

impl Driver {
    /// A full apply: every service port, every backend resolved.
    pub(crate) fn apply(&mut self, dp: &mut Dataplane) -> Result<ApplyReport, ReconcileError> {
        self.apply_in(dp, None)
    }

    /// An apply of the `changed` service ports (plus those with problems), or a full one when
    /// `changed` is None or the last apply failed.
    pub(crate) fn apply_in(
        &mut self,
        dp: &mut Dataplane,
        changed: Option<&BTreeSet<ServicePortId>>,
    ) -> Result<ApplyReport, ReconcileError> {
        let scope = match changed {
            Some(c) if !self.failed => Scope::Changed(c),
            _ => Scope::All,
        };
        if matches!(scope, Scope::All) {
            self.resolved.borrow_mut().entries.clear();
        }
        let started = Instant::now();
        // The reply path before the request path: a new local pod's veth gets the TC reply
        // program before its backend enters a ring, or the replies of the first flows sent
        // to it would leave through the kernel without reverse NAT.
        let local = {
            let resolver =
                NetResolver::new(&self.node_name, &self.node_ips, &self.resolved, self.tunnel);
            let ports = match scope {
                Scope::All => None,
                Scope::Changed(c) => Some(c),
            };
            let states = crate::control::reconcile::scoped(&self.desired, ports).map(|(_, st)| st);
            for b in states.flat_map(|st| st.backends.iter()).filter(|b| b.local) {
                // Failures are the apply's to report.
                let _ = resolver.resolve(b);
            }
            resolver.local_ifindexes.into_inner()
        };
        self.local_ifindexes.extend(local);
        self.attach_tc(dp);
        let resolver =
            NetResolver::new(&self.node_name, &self.node_ips, &self.resolved, self.tunnel);
        let res = self
            .reconciler
            .apply_scoped(&self.desired, scope, &resolver, dp);
        let found = resolver.local_ifindexes.into_inner();
        match scope {
            Scope::All => {
                self.local_ifindexes = found;
                self.last_full = Instant::now();
            }
            // The others' veths are as the last apply found them.
            Scope::Changed(_) => self.local_ifindexes.extend(found),
        }
        self.failed = res.is_err();
        match &res {
            Ok(report) => {
                self.retry = !report.unresolved.is_empty();
                let problems = problems(report);
                let changed = problems != self.last_problems;
                let how = match scope {
                    Scope::All => "full".to_string(),
                    Scope::Changed(c) => format!("{} service ports", c.len()),
                };
                let took = started.elapsed().as_secs_f64() * 1e3;
                if report.writes() > 0 || changed {
                    info!("{} ({how}, {took:.1} ms)", summary(report));
                } else {
                    debug!("{} ({how}, {took:.1} ms)", summary(report));
                }
                if changed {
                    for p in &problems {
                        warn!("{p}");
                    }
                    self.last_problems = problems;
                }
            }
            Err(e) => {
                self.retry = true;
                error!("apply failed: {e}");
            }
        }
        res
    }

    /// Attaches the TC reply program to local veths that do not have it yet; failures are
    /// retried on the next tick.
    pub(crate) fn attach_tc(&mut self, dp: &mut Dataplane) {
        // Interfaces that disappeared took their attachment with them.
        self.tc_attached.retain(|i| ifname(*i).is_some());
        let mut gone = Vec::new();
        for &ifindex in &self.local_ifindexes {
            if self.tc_attached.contains(&ifindex) {
                continue;
            }
            let Some(name) = ifname(ifindex) else {
                // Its pod is gone; a pod that comes back gets a new veth, resolved when its
                // endpoint is applied.
                info!("local backend interface ifindex {ifindex} is gone");
                gone.push(ifindex);
                continue;
            };
            match dp.attach_tc_reply(&name) {
                Ok(()) => {
                    info!("attached the TC reply program to {name} (ifindex {ifindex})");
                    self.tc_attached.insert(ifindex);
                }
                Err(e) => warn!("{e}; retrying next period"),
            }
        }
        for ifindex in gone {
            self.local_ifindexes.remove(&ifindex);
        }
    }

    pub(crate) fn tc_pending(&self) -> bool {
        self.local_ifindexes
            .iter()
            .any(|i| !self.tc_attached.contains(i))
    }

    pub(crate) fn backends_in_use(&self) -> usize {
        let max_backends = self.reconciler.config().max_backends as usize;
        (max_backends - 1).saturating_sub(self.reconciler.free().1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_and_problems_name_what_happened() {
        use crate::control::model::ServicePortId;
        use crate::control::reconcile::Unresolved;
        let mut r = ApplyReport {
            frontends_added: 2,
            backends_added: 3,
            ring_slots_written: 14,
            services_added: 1,
            ..Default::default()
        };
        assert!(summary(&r).starts_with("applied: 19 map writes (frontends +2 -0 ~0, backends +3"));
        assert!(problems(&r).is_empty());
        r.unresolved.push(Unresolved {
            service: ServicePortId::new("ns", "web", "", lb_common::PROTO_TCP),
            addr: "10.244.1.5".parse().unwrap(),
            port: 8080,
            reason: "no route".into(),
        });
        assert_eq!(
            problems(&r),
            ["ns/web/TCP: backend 10.244.1.5:8080 unresolved: no route"]
        );
        assert!(summary(&r).contains("unresolved 1"));
        // A capacity problem names the flag that raises that capacity.
        r.skipped_capacity
            .push(crate::control::reconcile::CapacitySkip {
                service: r.unresolved[0].service.clone(),
                backend: Some(("10.244.1.6".parse().unwrap(), 8080)),
                resource: Capacity::BackendIds,
            });
        let p = problems(&r);
        assert!(
            p[1].contains("backend 10.244.1.6:8080 left out")
                && p[1].ends_with("(raise --max-backends)"),
            "{p:?}"
        );
    }
}

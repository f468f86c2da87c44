//! Desired state -> map writes. Keeps a shadow copy of what the maps hold, diffs the desired
//! state against it, and writes only the difference, in an order that keeps the data plane
//! consistent after every single write (make-before-break):
//!
//! 1. new and changed backends (BACKENDS),
//! 2. changed ring positions only (MAGLEV, Katran style),
//! 3. new and changed frontends (FRONTENDS), `backend_count` = backends in the ring,
//! 4. removed frontends, then rings that became empty while a frontend still counted
//!    backends on them are zeroed (a frontend with count 0 or no frontend reads nothing),
//! 5. backends that no ring and no kept (terminating) set references any more are cleared,
//!    and their ids and service slots freed.
//!
//! So a frontend never points at a ring slot holding a cleared or never-written backend, and a
//! Service whose backends change from A to B always has every ring slot on a live backend.
//!
//! Backend ids are per service port: the same (address, port) behind two Service ports gets
//! two ids. That keeps ownership simple (a service port's ids live and die with it, no
//! reference counts) and lets each copy carry its own flags (one slice may already say
//! terminating while another does not); the cost is more BACKENDS slots, which are cheap.
//!
//! An apply looks at every service port ([`Scope::All`]) or only at the ones that changed
//! ([`Scope::Changed`], the agent's EndpointSlice updates): out-of-scope service ports keep
//! what the shadow says they have, so a scoped apply ends exactly where a full one would
//! (tested against a full apply from the same start on a random walk), planning, resolving
//! and building Maglev tables only for the changed ones (what remains linear in the number of
//! Services is a scan or two of the frontend shadow, well under a millisecond at 10 000).
//!
//! The reconciler assumes it starts with empty maps (all-zero rings). Taking over maps pinned
//! by a previous agent is a resync: apply the desired state to maps cleared first.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::Ipv4Addr;

use lb_common::{
    ip4, port_be, v4, Backend, Frontend, FrontendKey, BE_ACTIVE, BE_LOCAL, BE_TERMINATING,
    BE_TUNNEL, FE_AFFINITY, FE_LOCAL_ONLY,
};

pub use super::report::{
    ApplyReport, Capacity, CapacitySkip, FrontendConflict, ReconcileError, Step, Unresolved,
};
pub use super::writer::{Delivery, MapWriter, Resolver, WriteError};
use crate::control::maglev::{self, MaglevBackend};
use crate::control::model::{DesiredState, FrontendAddr, ServicePortId, ServicePortState};

/// Sizes of the maps, as loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReconcileConfig {
    /// Service slots (rings): service_id in `[0, max_services)`.
    pub max_services: u32,
    /// BACKENDS entries: ids in `[1, max_backends)` (0 is reserved).
    pub max_backends: u32,
    /// Positions per ring (prime).
    pub maglev_size: u32,
}

/// (address, host-order port, protocol): a frontend as the model names it.
type FrontendTuple = (FrontendAddr, u16, u8);
/// (address, host-order port): a backend within one service port.
type BackendAddr = (Ipv4Addr, u16);

fn frontend_key(f: &FrontendTuple) -> FrontendKey {
    FrontendKey {
        addr: match f.0 {
            FrontendAddr::Wildcard => 0,
            FrontendAddr::Ip(ip) => ip4(ip.octets()),
        },
        port: port_be(f.1),
        proto: f.2,
        _pad: 0,
    }
}

fn maglev_key(b: &BackendAddr) -> u64 {
    maglev::backend_key(v4(b.0.octets()), port_be(b.1))
}

#[derive(Clone, Debug)]
struct ShadowService {
    service_id: u32,
    /// Backends written for this service port.
    backends: BTreeMap<BackendAddr, (u32, Backend)>,
}

/// What a ring slot holds.
#[derive(Clone, Debug, PartialEq, Eq)]
enum SlotRing {
    /// Exactly `maglev::build(source)`; `source` sorted by key (empty: all zero).
    Known(Vec<MaglevBackend>),
    /// A ring write failed midway: rewrite every position next time.
    Unknown,
}

#[derive(Clone, Debug)]
struct Shadow {
    services: BTreeMap<ServicePortId, ShadowService>,
    frontends: BTreeMap<FrontendTuple, (ServicePortId, Frontend)>,
    /// Indexed by service_id. Free slots keep their last contents so reuse writes a diff.
    rings: Vec<SlotRing>,
    /// FIFO, so a freed id or slot is reused as late as possible (stale conntrack entries
    /// referring to it have time to expire).
    free_services: VecDeque<u32>,
    free_backends: VecDeque<u32>,
}

/// One service port's target for this apply.
struct ServicePlan {
    service_id: u32,
    /// Every backend to hold in BACKENDS, with its value.
    backends: BTreeMap<BackendAddr, Backend>,
    /// The ones that take new flows.
    ring: BTreeSet<BackendAddr>,
    flags: u32,
    affinity_timeout_s: u32,
}

/// Passes per apply: a second one uses what the first freed; more cannot help (a pass that
/// frees nothing ends the loop, and the second pass frees only what the first left waiting).
const MAX_PASSES: usize = 2;

/// Which service ports an apply looks at.
#[derive(Clone, Copy, Debug)]
pub enum Scope<'a> {
    /// Every service port: the desired state is the whole truth (start-up, resync, retries
    /// after a failed write, periodic re-resolution of every backend).
    All,
    /// Only these service ports changed (added, changed or removed) since the last apply;
    /// every other one is taken to be as the shadow holds it. This is what makes an
    /// EndpointSlice update cost the same at 1 and at 10 000 Services.
    Changed(&'a BTreeSet<ServicePortId>),
}

/// What one service port was left without in the last apply that looked at it. Kept between
/// applies so a scoped apply still reports the complete set of problems, and so every
/// service port with a problem is looked at again by the next apply (a removal may have
/// freed the room it waits for, or the frontend it lost).
#[derive(Clone, Debug, Default)]
struct Issues {
    unresolved: Vec<Unresolved>,
    skipped_capacity: Vec<CapacitySkip>,
    frontend_conflicts: Vec<FrontendConflict>,
}

/// Turns desired states into map writes, remembering what it wrote.
#[derive(Clone, Debug)]
pub struct Reconciler {
    config: ReconcileConfig,
    shadow: Shadow,
    /// Per service port (the loser, for conflicts).
    issues: BTreeMap<ServicePortId, Issues>,
}

impl Reconciler {
    /// A reconciler for freshly created (all-zero) maps of these sizes.
    pub fn new(config: ReconcileConfig) -> Result<Self, ReconcileError> {
        let invalid = |reason: String| Err(ReconcileError::InvalidConfig { reason });
        if config.max_services == 0 {
            return invalid("max_services is 0: allow at least one service slot".into());
        }
        if config.max_backends < 2 {
            return invalid(format!(
                "max_backends {} leaves no usable id (0 is reserved): use at least 2",
                config.max_backends
            ));
        }
        if let Err(e) = maglev::build(&[], config.maglev_size) {
            return invalid(format!("maglev_size: {e}"));
        }
        Ok(Reconciler {
            config,
            shadow: Shadow {
                services: BTreeMap::new(),
                frontends: BTreeMap::new(),
                rings: vec![SlotRing::Known(Vec::new()); config.max_services as usize],
                free_services: (0..config.max_services).collect(),
                free_backends: (1..config.max_backends).collect(),
            },
            issues: BTreeMap::new(),
        })
    }

    pub fn config(&self) -> &ReconcileConfig {
        &self.config
    }

    /// The service slot (ring) of a service port, if it has one.
    pub fn service_id(&self, service: &ServicePortId) -> Option<u32> {
        self.shadow.services.get(service).map(|s| s.service_id)
    }

    /// The BACKENDS id of one backend of a service port, if written.
    pub fn backend_id(&self, service: &ServicePortId, addr: Ipv4Addr, port: u16) -> Option<u32> {
        let s = self.shadow.services.get(service)?;
        s.backends.get(&(addr, port)).map(|(id, _)| *id)
    }

    /// Free service slots and backend ids.
    pub fn free(&self) -> (usize, usize) {
        (
            self.shadow.free_services.len(),
            self.shadow.free_backends.len(),
        )
    }

    /// Brings the maps to `desired` (see the module doc for the order). On a write error the
    /// shadow reflects every write that succeeded, so calling `apply` again converges.
    ///
    /// Ids and slots are freed only at the end of a pass (make-before-break), so when the maps
    /// are full, backends or services may wait for what this pass freed: then a second pass
    /// runs at once. In that corner a service whose every backend was replaced can briefly
    /// have backend_count 0, which the XDP program passes to the kernel (kube-proxy), never
    /// to a dead backend.
    pub fn apply(
        &mut self,
        desired: &DesiredState,
        resolver: &dyn Resolver,
        w: &mut dyn MapWriter,
    ) -> Result<ApplyReport, ReconcileError> {
        self.apply_scoped(desired, Scope::All, resolver, w)
    }

    /// [`Reconciler::apply`] looking only at the service ports `scope` names, plus every
    /// service port that has a problem (unresolved, skipped for capacity, lost a frontend).
    /// With `Scope::Changed` the caller promises that no other service port's desired state
    /// changed since the last apply; backends it does not look at are not resolved again
    /// (a periodic `Scope::All` apply does that). The report lists every current problem,
    /// not only those of the scope. After an error, apply with `Scope::All`: the failed
    /// apply may have left service ports half-done that the next scope does not name.
    pub fn apply_scoped(
        &mut self,
        desired: &DesiredState,
        scope: Scope<'_>,
        resolver: &dyn Resolver,
        w: &mut dyn MapWriter,
    ) -> Result<ApplyReport, ReconcileError> {
        let scope: Option<BTreeSet<ServicePortId>> = match scope {
            Scope::All => None,
            Scope::Changed(changed) => {
                let mut s = changed.clone();
                s.extend(self.issues.keys().cloned());
                Some(s)
            }
        };
        let scope = scope.as_ref();
        let mut total = ApplyReport::default();
        for _ in 0..MAX_PASSES {
            let pass = self.apply_pass(desired, scope, resolver, w)?;
            let waiting = !pass.skipped_capacity.is_empty();
            let freed = pass.backends_removed > 0 || pass.services_removed > 0;
            total.frontends_added += pass.frontends_added;
            total.frontends_removed += pass.frontends_removed;
            total.frontends_updated += pass.frontends_updated;
            total.backends_added += pass.backends_added;
            total.backends_updated += pass.backends_updated;
            total.backends_removed += pass.backends_removed;
            total.ring_slots_written += pass.ring_slots_written;
            total.services_added += pass.services_added;
            total.services_removed += pass.services_removed;
            total.unresolved = pass.unresolved;
            total.skipped_capacity = pass.skipped_capacity;
            total.frontend_conflicts = pass.frontend_conflicts;
            if !(waiting && freed) {
                break;
            }
        }
        self.record_issues(scope, &mut total);
        Ok(total)
    }

    /// Replaces the recorded problems of the service ports this apply looked at with what it
    /// found, and puts the complete record into the report (in service port order, as a
    /// full apply finds them).
    fn record_issues(&mut self, scope: Option<&BTreeSet<ServicePortId>>, report: &mut ApplyReport) {
        match scope {
            None => self.issues.clear(),
            Some(scope) => {
                for s in scope {
                    self.issues.remove(s);
                }
            }
        }
        for u in report.unresolved.drain(..) {
            let e = self.issues.entry(u.service.clone()).or_default();
            e.unresolved.push(u);
        }
        for c in report.skipped_capacity.drain(..) {
            let e = self.issues.entry(c.service.clone()).or_default();
            e.skipped_capacity.push(c);
        }
        for c in report.frontend_conflicts.drain(..) {
            let e = self.issues.entry(c.loser.clone()).or_default();
            e.frontend_conflicts.push(c);
        }
        for i in self.issues.values() {
            report.unresolved.extend(i.unresolved.iter().cloned());
            report
                .skipped_capacity
                .extend(i.skipped_capacity.iter().cloned());
            report
                .frontend_conflicts
                .extend(i.frontend_conflicts.iter().cloned());
        }
    }

    fn apply_pass(
        &mut self,
        desired: &DesiredState,
        scope: Option<&BTreeSet<ServicePortId>>,
        resolver: &dyn Resolver,
        w: &mut dyn MapWriter,
    ) -> Result<ApplyReport, ReconcileError> {
        let mut report = ApplyReport::default();
        let plans = self.plan(desired, scope, resolver, &mut report);
        let frontends = self.assign_frontends(desired, scope, &plans, &mut report);

        self.write_backends(&plans, w, &mut report)?;
        let deferred = self.write_rings(&plans, w, &mut report)?;
        self.set_frontends(&frontends, &plans, w, &mut report)?;
        self.remove_frontends(&frontends, scope, w, &mut report)?;
        // Now no frontend counts backends on these rings any more.
        for service in &deferred {
            let plan = &plans[service];
            self.write_ring(service, plan.service_id, Vec::new(), w, &mut report)
                .map_err(|e| e.at(Step::ZeroRings))?;
        }
        self.clear_backends(&plans, scope, w, &mut report)?;
        Ok(report)
    }

    /// Decides, without writing, what each service port gets: a slot, backends with values,
    /// the ring members. Allocates service slots (kept even if a later write fails).
    fn plan(
        &mut self,
        desired: &DesiredState,
        scope: Option<&BTreeSet<ServicePortId>>,
        resolver: &dyn Resolver,
        report: &mut ApplyReport,
    ) -> BTreeMap<ServicePortId, ServicePlan> {
        let mut plans = BTreeMap::new();
        let mut ids_left = self.shadow.free_backends.len();
        for (service, state) in scoped(desired, scope) {
            let service_id = match self.shadow.services.get(service) {
                Some(s) => s.service_id,
                None => match self.shadow.free_services.pop_front() {
                    Some(id) => {
                        report.services_added += 1;
                        self.shadow.services.insert(
                            service.clone(),
                            ShadowService {
                                service_id: id,
                                backends: BTreeMap::new(),
                            },
                        );
                        id
                    }
                    None => {
                        report.skipped_capacity.push(CapacitySkip {
                            service: service.clone(),
                            backend: None,
                            resource: Capacity::ServiceSlots,
                        });
                        continue;
                    }
                },
            };
            let shadow = &self.shadow.services[service];
            let ring_candidates: BTreeSet<BackendAddr> =
                state.ring_backends().map(|b| (b.addr, b.port)).collect();

            let mut backends = BTreeMap::new();
            let mut ring = BTreeSet::new();
            for spec in &state.backends {
                let addr = (spec.addr, spec.port);
                if backends.contains_key(&addr) {
                    continue; // duplicate in the input: the first one counts
                }
                let in_ring = ring_candidates.contains(&addr);
                let known = shadow.backends.contains_key(&addr);
                // Outside the ring a backend only serves flows it already has: keep it if it
                // was written, never write it fresh.
                if !in_ring && !known {
                    continue;
                }
                let delivery = match resolver.resolve(spec) {
                    Ok(d) => d,
                    Err(reason) => {
                        report.unresolved.push(Unresolved {
                            service: service.clone(),
                            addr: spec.addr,
                            port: spec.port,
                            reason,
                        });
                        continue;
                    }
                };
                if in_ring && ring.len() >= self.config.maglev_size as usize {
                    report.skipped_capacity.push(CapacitySkip {
                        service: service.clone(),
                        backend: Some(addr),
                        resource: Capacity::RingSize,
                    });
                    continue;
                }
                if !known {
                    if ids_left == 0 {
                        report.skipped_capacity.push(CapacitySkip {
                            service: service.clone(),
                            backend: Some(addr),
                            resource: Capacity::BackendIds,
                        });
                        continue;
                    }
                    ids_left -= 1;
                }
                let mut flags = BE_ACTIVE;
                if spec.local {
                    flags |= BE_LOCAL;
                } else if delivery.tunnel_to.is_some() {
                    flags |= BE_TUNNEL;
                }
                // Terminating, or kept outside the ring: no new flows, not even by affinity.
                if spec.terminating || !in_ring {
                    flags |= BE_TERMINATING;
                }
                let value = Backend {
                    addr: v4(spec.addr.octets()),
                    port: port_be(spec.port),
                    flags,
                    _pad0: 0,
                    ifindex: delivery.ifindex,
                    dmac: delivery.dmac,
                    smac: delivery.smac,
                    node_addr: delivery.tunnel_to.map_or(0, |a| ip4(a.octets())),
                };
                backends.insert(addr, value);
                if in_ring {
                    ring.insert(addr);
                }
            }
            let mut flags = 0;
            if state.affinity_timeout_s.is_some() {
                flags |= FE_AFFINITY;
            }
            if state.local_only {
                flags |= FE_LOCAL_ONLY;
            }
            plans.insert(
                service.clone(),
                ServicePlan {
                    service_id,
                    backends,
                    ring,
                    flags,
                    affinity_timeout_s: state.affinity_timeout_s.unwrap_or(0),
                },
            );
        }
        plans
    }

    /// Which service port owns each desired frontend: the current owner if it still wants
    /// it (stability), else the first claimant in order.
    /// In a scoped apply, frontends of service ports outside the scope stay theirs (they
    /// still want them: their desired state did not change) and are not returned.
    fn assign_frontends(
        &self,
        desired: &DesiredState,
        scope: Option<&BTreeSet<ServicePortId>>,
        plans: &BTreeMap<ServicePortId, ServicePlan>,
        report: &mut ApplyReport,
    ) -> BTreeMap<FrontendTuple, ServicePortId> {
        let mut owners: BTreeMap<FrontendTuple, ServicePortId> = BTreeMap::new();
        let wanted = |service: &ServicePortId, f: &FrontendTuple| {
            plans.contains_key(service) && desired.services[service].frontends.contains(f)
        };
        for (f, (owner, _)) in &self.shadow.frontends {
            if in_scope(scope, owner) && wanted(owner, f) {
                owners.insert(*f, owner.clone());
            }
        }
        for (service, state) in scoped(desired, scope) {
            if !plans.contains_key(service) {
                continue;
            }
            for f in &state.frontends {
                let kept_outside = || {
                    self.shadow
                        .frontends
                        .get(f)
                        .map(|(o, _)| o)
                        .filter(|o| !in_scope(scope, o))
                };
                match owners.get(f).or_else(kept_outside) {
                    None => {
                        owners.insert(*f, service.clone());
                    }
                    Some(owner) if owner == service => {}
                    Some(owner) => report.frontend_conflicts.push(FrontendConflict {
                        frontend: *f,
                        owner: owner.clone(),
                        loser: service.clone(),
                    }),
                }
            }
        }
        owners
    }

    fn write_backends(
        &mut self,
        plans: &BTreeMap<ServicePortId, ServicePlan>,
        w: &mut dyn MapWriter,
        report: &mut ApplyReport,
    ) -> Result<(), ReconcileError> {
        for (service, plan) in plans {
            for (addr, value) in &plan.backends {
                let shadow = self
                    .shadow
                    .services
                    .get_mut(service)
                    .expect("planned services have a shadow");
                match shadow.backends.get_mut(addr) {
                    Some((_, old)) if old == value => {}
                    Some((id, old)) => {
                        w.set_backend(*id, value)
                            .map_err(|e| write_err(Step::WriteBackends, e))?;
                        *old = *value;
                        report.backends_updated += 1;
                    }
                    None => {
                        let id = self
                            .shadow
                            .free_backends
                            .pop_front()
                            .expect("plan() reserved an id for every new backend");
                        if let Err(e) = w.set_backend(id, value) {
                            self.shadow.free_backends.push_front(id);
                            return Err(write_err(Step::WriteBackends, e));
                        }
                        shadow.backends.insert(*addr, (id, *value));
                        report.backends_added += 1;
                    }
                }
            }
        }
        Ok(())
    }

    /// Writes every changed ring except those that become empty while a frontend still
    /// counts backends on them: those are returned, to be zeroed after the frontends changed.
    fn write_rings(
        &mut self,
        plans: &BTreeMap<ServicePortId, ServicePlan>,
        w: &mut dyn MapWriter,
        report: &mut ApplyReport,
    ) -> Result<Vec<ServicePortId>, ReconcileError> {
        let mut deferred = Vec::new();
        for (service, plan) in plans {
            let shadow = &self.shadow.services[service];
            let mut source: Vec<MaglevBackend> = plan
                .ring
                .iter()
                .map(|addr| MaglevBackend {
                    id: shadow.backends[addr].0,
                    key: maglev_key(addr),
                })
                .collect();
            source.sort_by_key(|b| (b.key, b.id));
            if self.shadow.rings[plan.service_id as usize] == SlotRing::Known(source.clone()) {
                continue;
            }
            // (A scan of every frontend: only for rings that empty.)
            let counted = || {
                self.shadow
                    .frontends
                    .values()
                    .any(|(_, fe)| fe.service_id == plan.service_id && fe.backend_count > 0)
            };
            if source.is_empty() && counted() {
                deferred.push(service.clone());
                continue;
            }
            self.write_ring(service, plan.service_id, source, w, report)
                .map_err(|e| e.at(Step::WriteRings))?;
        }
        Ok(deferred)
    }

    /// Writes the positions of ring `service_id` that differ from `source`'s table.
    fn write_ring(
        &mut self,
        service: &ServicePortId,
        service_id: u32,
        source: Vec<MaglevBackend>,
        w: &mut dyn MapWriter,
        report: &mut ApplyReport,
    ) -> Result<(), StepError> {
        let m = self.config.maglev_size;
        let maglev_err = |source| {
            StepError::Maglev(ReconcileError::Maglev {
                service: service.clone(),
                source,
            })
        };
        let table = maglev::build(&source, m).map_err(maglev_err)?;
        let slot = &mut self.shadow.rings[service_id as usize];
        let changes = match slot {
            SlotRing::Known(old) => {
                let old_table = maglev::build(old, m).map_err(maglev_err)?;
                maglev::changed_slots(&old_table, &table)
            }
            SlotRing::Unknown => table
                .iter()
                .enumerate()
                .map(|(pos, id)| (pos as u32, *id))
                .collect(),
        };
        if !changes.is_empty() {
            *slot = SlotRing::Unknown;
            w.write_ring(service_id, &changes)
                .map_err(StepError::Write)?;
            report.ring_slots_written += changes.len();
        }
        self.shadow.rings[service_id as usize] = SlotRing::Known(source);
        Ok(())
    }

    fn set_frontends(
        &mut self,
        frontends: &BTreeMap<FrontendTuple, ServicePortId>,
        plans: &BTreeMap<ServicePortId, ServicePlan>,
        w: &mut dyn MapWriter,
        report: &mut ApplyReport,
    ) -> Result<(), ReconcileError> {
        for (f, owner) in frontends {
            let plan = &plans[owner];
            let value = Frontend {
                service_id: plan.service_id,
                backend_count: plan.ring.len() as u32,
                flags: plan.flags,
                affinity_timeout_s: plan.affinity_timeout_s,
            };
            let existed = match self.shadow.frontends.get(f) {
                Some((o, v)) if o == owner && *v == value => continue,
                Some(_) => true,
                None => false,
            };
            w.set_frontend(&frontend_key(f), &value)
                .map_err(|e| write_err(Step::SetFrontends, e))?;
            self.shadow.frontends.insert(*f, (owner.clone(), value));
            if existed {
                report.frontends_updated += 1;
            } else {
                report.frontends_added += 1;
            }
        }
        Ok(())
    }

    fn remove_frontends(
        &mut self,
        frontends: &BTreeMap<FrontendTuple, ServicePortId>,
        scope: Option<&BTreeSet<ServicePortId>>,
        w: &mut dyn MapWriter,
        report: &mut ApplyReport,
    ) -> Result<(), ReconcileError> {
        let gone: Vec<FrontendTuple> = self
            .shadow
            .frontends
            .iter()
            .filter(|(f, (owner, _))| in_scope(scope, owner) && !frontends.contains_key(f))
            .map(|(f, _)| *f)
            .collect();
        for f in gone {
            w.remove_frontend(&frontend_key(&f))
                .map_err(|e| write_err(Step::RemoveFrontends, e))?;
            self.shadow.frontends.remove(&f);
            report.frontends_removed += 1;
        }
        Ok(())
    }

    /// Clears backends no plan keeps, and frees the slots of service ports no longer desired
    /// (their frontends are gone by now, so nothing reads their rings).
    fn clear_backends(
        &mut self,
        plans: &BTreeMap<ServicePortId, ServicePlan>,
        scope: Option<&BTreeSet<ServicePortId>>,
        w: &mut dyn MapWriter,
        report: &mut ApplyReport,
    ) -> Result<(), ReconcileError> {
        let services: Vec<ServicePortId> = match scope {
            None => self.shadow.services.keys().cloned().collect(),
            Some(scope) => scope
                .iter()
                .filter(|s| self.shadow.services.contains_key(*s))
                .cloned()
                .collect(),
        };
        for service in services {
            let plan = plans.get(&service);
            let shadow = self
                .shadow
                .services
                .get_mut(&service)
                .expect("listed above");
            let gone: Vec<(BackendAddr, u32)> = shadow
                .backends
                .iter()
                .filter(|(addr, _)| plan.is_none_or(|p| !p.backends.contains_key(addr)))
                .map(|(addr, (id, _))| (*addr, *id))
                .collect();
            for (addr, id) in gone {
                w.clear_backend(id)
                    .map_err(|e| write_err(Step::ClearBackends, e))?;
                shadow.backends.remove(&addr);
                self.shadow.free_backends.push_back(id);
                report.backends_removed += 1;
            }
            if plan.is_none() {
                let service_id = shadow.service_id;
                debug_assert!(self.shadow.frontends.values().all(|(o, _)| *o != service));
                self.shadow.services.remove(&service);
                self.shadow.free_services.push_back(service_id);
                report.services_removed += 1;
            }
        }
        Ok(())
    }
}

fn in_scope(scope: Option<&BTreeSet<ServicePortId>>, service: &ServicePortId) -> bool {
    scope.is_none_or(|s| s.contains(service))
}

/// The desired service ports an apply looks at (None: all), in order.
pub(crate) fn scoped<'a>(
    desired: &'a DesiredState,
    scope: Option<&'a BTreeSet<ServicePortId>>,
) -> Box<dyn Iterator<Item = (&'a ServicePortId, &'a ServicePortState)> + 'a> {
    match scope {
        None => Box::new(desired.services.iter()),
        Some(scope) => Box::new(
            scope
                .iter()
                .filter_map(|s| desired.services.get_key_value(s)),
        ),
    }
}

fn write_err(step: Step, source: WriteError) -> ReconcileError {
    ReconcileError::Write { step, source }
}

/// A ring write's failure before the caller knows which step it belongs to.
enum StepError {
    Write(WriteError),
    Maglev(ReconcileError),
}

impl StepError {
    fn at(self, step: Step) -> ReconcileError {
        match self {
            StepError::Write(source) => ReconcileError::Write { step, source },
            StepError::Maglev(e) => e,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::model::{BackendSpec, ServicePortState};
    use lb_common::{port_host, v4_octets, PROTO_TCP, PROTO_UDP};
    use std::collections::{HashMap, HashSet};

    #[derive(Clone, Debug, PartialEq, Eq)]
    enum Op {
        SetBackend(u32),
        ClearBackend(u32),
        Ring(u32, usize),
        SetFrontend(FrontendKey),
        RemoveFrontend(FrontendKey),
    }

    /// The maps as the XDP program sees them, checking after every write (and after every
    /// position of a ring write, as the mmap'ed writer stores them one by one) that every
    /// frontend reads only live backends.
    #[derive(Clone)]
    struct FakeMaps {
        m: u32,
        max_services: u32,
        backends: Vec<Backend>,
        rings: Vec<u32>,
        frontends: HashMap<FrontendKey, Frontend>,
        log: Vec<Op>,
        /// Index (over this fake's life) of the write call that fails. A failing ring write
        /// stores half of its positions first.
        fail_at: Option<usize>,
        calls: usize,
        /// Frontends that must keep backend_count > 0 and a full ring of live backends.
        keep_serving: Vec<FrontendKey>,
    }

    impl FakeMaps {
        fn new(c: ReconcileConfig) -> Self {
            FakeMaps {
                m: c.maglev_size,
                max_services: c.max_services,
                backends: vec![Backend::default(); c.max_backends as usize],
                rings: vec![0; (c.max_services * c.maglev_size) as usize],
                frontends: HashMap::new(),
                log: Vec::new(),
                fail_at: None,
                calls: 0,
                keep_serving: Vec::new(),
            }
        }

        fn ring(&self, service_id: u32) -> &[u32] {
            let m = self.m as usize;
            &self.rings[service_id as usize * m..(service_id as usize + 1) * m]
        }

        fn live(&self, id: u32) -> bool {
            id != 0
                && self
                    .backends
                    .get(id as usize)
                    .is_some_and(|b| b.flags & BE_ACTIVE != 0)
        }

        fn check(&self, what: &str) {
            for (key, fe) in &self.frontends {
                assert!(
                    fe.service_id < self.max_services,
                    "after {what}: {key:?} -> bad slot {fe:?}"
                );
                for (pos, &id) in self.ring(fe.service_id).iter().enumerate() {
                    assert!(
                        id == 0 || self.live(id),
                        "after {what}: frontend {key:?} ({fe:?}) reads ring position {pos} = \
                         backend {id}, which is not live; log {:?}",
                        self.log
                    );
                    assert!(
                        fe.backend_count == 0 || id != 0,
                        "after {what}: frontend {key:?} counts {} backends but ring position {pos} is \
                         empty; log {:?}",
                        fe.backend_count,
                        self.log
                    );
                }
            }
            for key in &self.keep_serving {
                let fe = self.frontends.get(key);
                assert!(
                    fe.is_some_and(|fe| fe.backend_count > 0),
                    "after {what}: frontend {key:?} must keep serving, but is {fe:?}; log {:?}",
                    self.log
                );
            }
        }

        fn call(&mut self) -> Result<(), WriteError> {
            let n = self.calls;
            self.calls += 1;
            if self.fail_at == Some(n) {
                return Err(WriteError::with_source(
                    format!("injected failure of write {n}"),
                    std::io::Error::from_raw_os_error(libc::ENOSPC),
                ));
            }
            Ok(())
        }
    }

    impl MapWriter for FakeMaps {
        fn set_backend(&mut self, id: u32, backend: &Backend) -> Result<(), WriteError> {
            assert!(
                id != 0 && (id as usize) < self.backends.len(),
                "set_backend({id}) out of range"
            );
            assert!(
                backend.flags & BE_ACTIVE != 0,
                "set_backend({id}) without BE_ACTIVE"
            );
            self.call()?;
            self.backends[id as usize] = *backend;
            self.log.push(Op::SetBackend(id));
            self.check(&format!("set_backend({id})"));
            Ok(())
        }

        fn clear_backend(&mut self, id: u32) -> Result<(), WriteError> {
            assert!(
                self.live(id),
                "clear_backend({id}) of a backend that is not live"
            );
            self.call()?;
            self.backends[id as usize] = Backend::default();
            self.log.push(Op::ClearBackend(id));
            self.check(&format!("clear_backend({id})"));
            Ok(())
        }

        fn write_ring(
            &mut self,
            service_id: u32,
            changes: &[(u32, u32)],
        ) -> Result<(), WriteError> {
            assert!(service_id < self.max_services);
            assert!(!changes.is_empty(), "empty ring write");
            let fail = self.call();
            let n = if fail.is_err() {
                changes.len() / 2
            } else {
                changes.len()
            };
            let base = (service_id * self.m) as usize;
            for &(pos, id) in &changes[..n] {
                assert!(pos < self.m, "ring position {pos} out of range");
                self.rings[base + pos as usize] = id;
                self.check(&format!("ring {service_id} position {pos} = {id}"));
            }
            fail?;
            self.log.push(Op::Ring(service_id, changes.len()));
            Ok(())
        }

        fn set_frontend(
            &mut self,
            key: &FrontendKey,
            frontend: &Frontend,
        ) -> Result<(), WriteError> {
            self.call()?;
            self.frontends.insert(*key, *frontend);
            self.log.push(Op::SetFrontend(*key));
            self.check(&format!("set_frontend({key:?})"));
            Ok(())
        }

        fn remove_frontend(&mut self, key: &FrontendKey) -> Result<(), WriteError> {
            assert!(
                self.frontends.contains_key(key),
                "remove of absent frontend {key:?}"
            );
            self.call()?;
            self.frontends.remove(key);
            self.log.push(Op::RemoveFrontend(*key));
            self.check(&format!("remove_frontend({key:?})"));
            Ok(())
        }
    }

    /// Every backend is reachable unless listed; delivery derived from the address.
    #[derive(Default)]
    struct FakeResolver {
        unreachable: HashSet<Ipv4Addr>,
    }

    impl Resolver for FakeResolver {
        fn resolve(&self, b: &BackendSpec) -> Result<Delivery, String> {
            if self.unreachable.contains(&b.addr) {
                return Err(format!("no route to {}", b.addr));
            }
            let o = b.addr.octets();
            Ok(Delivery {
                ifindex: if b.local { 100 + o[3] as u32 } else { 2 },
                dmac: [2, 0, o[0], o[1], o[2], o[3]],
                smac: [2, 0xff, 0, 0, 0, 1],
                tunnel_to: None,
            })
        }
    }

    fn sp(name: &str) -> ServicePortId {
        ServicePortId::new("default", name, "http", PROTO_TCP)
    }

    fn ready(last: u8) -> BackendSpec {
        BackendSpec {
            addr: Ipv4Addr::new(10, 0, 0, last),
            port: 8080,
            node_name: Some(
                if last.is_multiple_of(2) {
                    "me"
                } else {
                    "other"
                }
                .into(),
            ),
            local: last.is_multiple_of(2),
            ready: true,
            serving: true,
            terminating: false,
        }
    }

    fn terminating(last: u8, serving: bool) -> BackendSpec {
        BackendSpec {
            ready: false,
            serving,
            terminating: true,
            ..ready(last)
        }
    }

    fn port(node_port: u16, ip: Option<[u8; 4]>, backends: Vec<BackendSpec>) -> ServicePortState {
        let mut frontends = vec![(FrontendAddr::Wildcard, node_port, PROTO_TCP)];
        if let Some(ip) = ip {
            frontends.push((FrontendAddr::Ip(Ipv4Addr::from(ip)), 80, PROTO_TCP));
        }
        ServicePortState {
            frontends,
            backends,
            affinity_timeout_s: None,
            local_only: false,
        }
    }

    fn desired(list: Vec<(ServicePortId, ServicePortState)>) -> DesiredState {
        DesiredState {
            services: list.into_iter().collect(),
        }
    }

    fn nodeport(p: u16) -> FrontendKey {
        frontend_key(&(FrontendAddr::Wildcard, p, PROTO_TCP))
    }

    fn config(max_services: u32, max_backends: u32, maglev_size: u32) -> ReconcileConfig {
        ReconcileConfig {
            max_services,
            max_backends,
            maglev_size,
        }
    }

    struct Harness {
        r: Reconciler,
        maps: FakeMaps,
        resolver: FakeResolver,
    }

    impl Harness {
        fn new(c: ReconcileConfig) -> Self {
            Harness {
                r: Reconciler::new(c).unwrap(),
                maps: FakeMaps::new(c),
                resolver: FakeResolver::default(),
            }
        }

        /// Applies, checks the maps match `d`, and checks a second apply writes nothing.
        fn apply(&mut self, d: &DesiredState) -> ApplyReport {
            self.maps.log.clear();
            let report = self
                .r
                .apply(d, &self.resolver, &mut self.maps)
                .expect("apply");
            assert_eq!(
                report.writes(),
                self.write_count(),
                "report counts every write: {report:?}"
            );
            self.assert_converged(d, &report);
            let log = std::mem::take(&mut self.maps.log);
            let again = self
                .r
                .apply(d, &self.resolver, &mut self.maps)
                .expect("second apply");
            assert_eq!(self.maps.log, vec![], "second apply must write nothing");
            assert_eq!(again.writes(), 0);
            self.maps.log = log;
            report
        }

        /// A scoped apply of `changed`: checks it leaves the maps and the problem list
        /// exactly as a full apply from the same start would, that the maps match `d`, and
        /// that a full apply afterwards writes nothing.
        fn apply_changed(
            &mut self,
            d: &DesiredState,
            changed: &BTreeSet<ServicePortId>,
        ) -> ApplyReport {
            self.maps.log.clear();
            let (mut full_r, mut full_maps) = (self.r.clone(), self.maps.clone());
            let full = full_r
                .apply(d, &self.resolver, &mut full_maps)
                .expect("full apply");
            let report = self
                .r
                .apply_scoped(d, Scope::Changed(changed), &self.resolver, &mut self.maps)
                .expect("scoped apply");
            assert_eq!(report.writes(), self.write_count(), "{report:?}");
            self.assert_converged(d, &report);
            assert_eq!(
                (
                    &full.unresolved,
                    &full.skipped_capacity,
                    &full.frontend_conflicts
                ),
                (
                    &report.unresolved,
                    &report.skipped_capacity,
                    &report.frontend_conflicts
                ),
                "a scoped apply reports every current problem, as a full one does"
            );
            assert_eq!(
                self.maps.backends, full_maps.backends,
                "BACKENDS as after a full apply"
            );
            assert_eq!(
                self.maps.rings, full_maps.rings,
                "MAGLEV as after a full apply"
            );
            assert_eq!(
                self.maps.frontends, full_maps.frontends,
                "FRONTENDS as after a full apply"
            );
            let log = std::mem::take(&mut self.maps.log);
            self.r
                .apply(d, &self.resolver, &mut self.maps)
                .expect("full apply");
            assert_eq!(
                self.maps.log,
                vec![],
                "a full apply after a scoped one must write nothing"
            );
            self.maps.log = log;
            report
        }

        fn write_count(&self) -> usize {
            self.maps
                .log
                .iter()
                .map(|op| match op {
                    Op::Ring(_, n) => *n,
                    _ => 1,
                })
                .sum()
        }

        /// Independent check of the final maps against the desired state: frontends,
        /// exact Maglev rings, backend values, nothing extra.
        fn assert_converged(&self, d: &DesiredState, report: &ApplyReport) {
            let skipped = |s: &ServicePortId, addr: Option<BackendAddr>| {
                report
                    .skipped_capacity
                    .iter()
                    .any(|c| &c.service == s && (c.backend.is_none() || c.backend == addr))
            };
            let mut expect_frontends = HashMap::new();
            let mut live_ids = HashSet::new();
            for (s, state) in &d.services {
                if skipped(s, None) {
                    assert_eq!(self.r.service_id(s), None);
                    continue;
                }
                let sid = self.r.service_id(s).expect("programmed service has a slot");
                let ring_specs: Vec<&BackendSpec> = state
                    .ring_backends()
                    .filter(|b| !self.resolver.unreachable.contains(&b.addr))
                    .filter(|b| !skipped(s, Some((b.addr, b.port))))
                    .collect();
                let mut flags = 0;
                if state.affinity_timeout_s.is_some() {
                    flags |= FE_AFFINITY;
                }
                if state.local_only {
                    flags |= FE_LOCAL_ONLY;
                }
                for f in &state.frontends {
                    let lost = report
                        .frontend_conflicts
                        .iter()
                        .any(|c| &c.loser == s && c.frontend == *f);
                    if !lost {
                        let fe = Frontend {
                            service_id: sid,
                            backend_count: ring_specs.len() as u32,
                            flags,
                            affinity_timeout_s: state.affinity_timeout_s.unwrap_or(0),
                        };
                        expect_frontends.insert(frontend_key(f), fe);
                    }
                }
                // The ring is exactly Maglev over the ring backends' ids.
                let source: Vec<MaglevBackend> = ring_specs
                    .iter()
                    .map(|b| MaglevBackend {
                        id: self
                            .r
                            .backend_id(s, b.addr, b.port)
                            .expect("ring backend has an id"),
                        key: maglev_key(&(b.addr, b.port)),
                    })
                    .collect();
                let table = maglev::build(&source, self.maps.m).unwrap();
                assert_eq!(self.maps.ring(sid), &table[..], "ring of {s}");
                // Every written backend is one of the desired ones, with the right value.
                for b in &state.backends {
                    let Some(id) = self.r.backend_id(s, b.addr, b.port) else {
                        continue;
                    };
                    let in_ring = ring_specs
                        .iter()
                        .any(|r| r.addr == b.addr && r.port == b.port);
                    let v = self.maps.backends[id as usize];
                    assert_eq!(v4_octets(v.addr), b.addr.octets());
                    assert_eq!(port_host(v.port), b.port);
                    assert_eq!(v.flags & BE_LOCAL != 0, b.local, "{s} {b:?}");
                    assert_eq!(
                        v.flags & BE_TERMINATING != 0,
                        b.terminating || !in_ring,
                        "{s} {b:?}"
                    );
                    assert_eq!(Ok(v.ifindex), self.resolver.resolve(b).map(|d| d.ifindex));
                    assert!(live_ids.insert(id), "backend id {id} used twice");
                }
            }
            assert_eq!(self.maps.frontends, expect_frontends);
            let active: HashSet<u32> = (0..self.maps.backends.len() as u32)
                .filter(|id| self.maps.live(*id))
                .collect();
            assert_eq!(
                active, live_ids,
                "BACKENDS holds exactly the desired backends"
            );
            let (free_services, free_ids) = self.r.free();
            let used_services = d.services.keys().filter(|s| !skipped(s, None)).count();
            assert_eq!(
                free_services + used_services,
                self.maps.max_services as usize
            );
            assert_eq!(free_ids + live_ids.len(), self.maps.backends.len() - 1);
        }
    }

    #[test]
    fn reconcile_first_apply_programs_everything_and_second_writes_nothing() {
        let mut h = Harness::new(config(4, 64, 31));
        let mut web = port(
            30080,
            Some([192, 0, 2, 7]),
            vec![ready(1), ready(2), ready(3)],
        );
        web.affinity_timeout_s = Some(600);
        let dns = ServicePortState {
            frontends: vec![(FrontendAddr::Wildcard, 30053, PROTO_UDP)],
            backends: vec![ready(4)],
            affinity_timeout_s: None,
            local_only: true,
        };
        let d = desired(vec![(sp("web"), web), (sp("dns"), dns)]);
        let report = h.apply(&d);
        assert_eq!(report.frontends_added, 3);
        assert_eq!(report.backends_added, 4);
        assert_eq!(report.ring_slots_written, 62);
        assert_eq!(
            (
                report.frontends_updated,
                report.frontends_removed,
                report.backends_removed
            ),
            (0, 0, 0)
        );
        // Order: all backends, then rings, then frontends.
        let kinds: Vec<u8> = h
            .maps
            .log
            .iter()
            .map(|op| match op {
                Op::SetBackend(_) => 1,
                Op::Ring(..) => 2,
                Op::SetFrontend(_) => 3,
                _ => 9,
            })
            .collect();
        assert!(kinds.windows(2).all(|w| w[0] <= w[1]), "{:?}", h.maps.log);
        let fe = h.maps.frontends[&nodeport(30080)];
        assert_eq!(
            (fe.flags, fe.affinity_timeout_s, fe.backend_count),
            (FE_AFFINITY, 600, 3)
        );
        assert_eq!(
            h.maps.frontends[&frontend_key(&(FrontendAddr::Wildcard, 30053, PROTO_UDP))].flags,
            FE_LOCAL_ONLY
        );
        assert_eq!(
            h.maps.frontends[&nodeport(30080)].service_id,
            h.r.service_id(&sp("web")).unwrap()
        );
    }

    #[test]
    fn reconcile_scale_up_and_down_writes_only_changed_slots_and_keeps_serving() {
        let m = 251;
        let mut h = Harness::new(config(2, 32, m));
        let five: Vec<BackendSpec> = (1..=5).map(ready).collect();
        h.apply(&desired(vec![(
            sp("web"),
            port(30080, None, five[..3].to_vec()),
        )]));
        let id1 = h.r.backend_id(&sp("web"), ready(1).addr, 8080).unwrap();
        h.maps.keep_serving = vec![nodeport(30080)];

        let up = h.apply(&desired(vec![(sp("web"), port(30080, None, five.clone()))]));
        assert_eq!(
            (up.backends_added, up.backends_removed, up.frontends_updated),
            (2, 0, 1)
        );
        // Maglev: two of five backends new -> about 2/5 of the slots move, not all.
        assert!(
            up.ring_slots_written > 0 && up.ring_slots_written < (m as usize * 3) / 5,
            "{up:?}"
        );
        assert_eq!(
            h.r.backend_id(&sp("web"), ready(1).addr, 8080),
            Some(id1),
            "ids are stable"
        );

        let down = h.apply(&desired(vec![(
            sp("web"),
            port(30080, None, five[3..].to_vec()),
        )]));
        assert_eq!((down.backends_added, down.backends_removed), (0, 3));
        // The cleared backends go last, after the ring stopped using them.
        let first_clear = h
            .maps
            .log
            .iter()
            .position(|op| matches!(op, Op::ClearBackend(_)))
            .unwrap();
        assert!(
            h.maps.log[first_clear..]
                .iter()
                .all(|op| matches!(op, Op::ClearBackend(_))),
            "{:?}",
            h.maps.log
        );
    }

    #[test]
    fn reconcile_replacing_every_backend_is_never_observed_empty() {
        let mut h = Harness::new(config(2, 16, 31));
        let a: Vec<BackendSpec> = (1..=3).map(ready).collect();
        let b: Vec<BackendSpec> = (11..=14).map(ready).collect();
        h.apply(&desired(vec![(
            sp("web"),
            port(30080, Some([192, 0, 2, 7]), a.clone()),
        )]));
        h.maps.keep_serving = vec![
            nodeport(30080),
            frontend_key(&(FrontendAddr::Ip(Ipv4Addr::new(192, 0, 2, 7)), 80, PROTO_TCP)),
        ];
        let r = h.apply(&desired(vec![(
            sp("web"),
            port(30080, Some([192, 0, 2, 7]), b),
        )]));
        assert_eq!(
            (r.backends_added, r.backends_removed, r.frontends_updated),
            (4, 3, 2)
        );
        h.apply(&desired(vec![(
            sp("web"),
            port(30080, Some([192, 0, 2, 7]), a),
        )]));
    }

    #[test]
    fn reconcile_terminating_backend_stays_for_established_flows_then_goes() {
        let mut h = Harness::new(config(2, 16, 31));
        h.apply(&desired(vec![(
            sp("web"),
            port(30080, None, vec![ready(1), ready(2), ready(3)]),
        )]));
        let id2 = h.r.backend_id(&sp("web"), ready(2).addr, 8080).unwrap();
        h.maps.keep_serving = vec![nodeport(30080)];

        let r = h.apply(&desired(vec![(
            sp("web"),
            port(30080, None, vec![ready(1), terminating(2, true), ready(3)]),
        )]));
        assert_eq!((r.backends_updated, r.backends_removed), (1, 0));
        assert_eq!(h.r.backend_id(&sp("web"), ready(2).addr, 8080), Some(id2));
        assert!(h.maps.backends[id2 as usize].flags & BE_TERMINATING != 0);
        assert!(!h
            .maps
            .ring(h.r.service_id(&sp("web")).unwrap())
            .contains(&id2));
        assert_eq!(h.maps.frontends[&nodeport(30080)].backend_count, 2);

        // A terminating endpoint never seen before gets no id: no flow can use it.
        let r = h.apply(&desired(vec![(
            sp("web"),
            port(
                30080,
                None,
                vec![
                    ready(1),
                    terminating(2, true),
                    ready(3),
                    terminating(9, true),
                ],
            ),
        )]));
        assert_eq!(r.writes(), 0);
        assert_eq!(h.r.backend_id(&sp("web"), ready(9).addr, 8080), None);

        let r = h.apply(&desired(vec![(
            sp("web"),
            port(30080, None, vec![ready(1), ready(3)]),
        )]));
        assert_eq!(
            (
                r.backends_removed,
                r.ring_slots_written,
                r.frontends_updated
            ),
            (1, 0, 0)
        );
        assert!(!h.maps.live(id2));
    }

    #[test]
    fn reconcile_falls_back_to_serving_terminating_when_nothing_is_ready() {
        let mut h = Harness::new(config(2, 16, 31));
        h.apply(&desired(vec![(
            sp("web"),
            port(30080, None, vec![ready(1), ready(2)]),
        )]));
        h.maps.keep_serving = vec![nodeport(30080)];
        // Rolling update of the last pods: both terminating, one still serving.
        h.apply(&desired(vec![(
            sp("web"),
            port(
                30080,
                None,
                vec![terminating(1, true), terminating(2, false)],
            ),
        )]));
        let sid = h.r.service_id(&sp("web")).unwrap();
        let id1 = h.r.backend_id(&sp("web"), ready(1).addr, 8080).unwrap();
        assert!(h.maps.ring(sid).iter().all(|&id| id == id1));
        assert_eq!(h.maps.frontends[&nodeport(30080)].backend_count, 1);
    }

    #[test]
    fn reconcile_drain_to_zero_and_back() {
        let mut h = Harness::new(config(2, 16, 31));
        h.apply(&desired(vec![(
            sp("web"),
            port(30080, None, vec![ready(1), ready(2)]),
        )]));
        // The fake asserts after every write that a frontend counting backends never reads an
        // empty position: the count must drop to 0 before the ring is zeroed.
        let r = h.apply(&desired(vec![(sp("web"), port(30080, None, vec![]))]));
        assert_eq!(
            (
                r.frontends_updated,
                r.ring_slots_written,
                r.backends_removed
            ),
            (1, 31, 2)
        );
        assert_eq!(
            h.maps.log[0],
            Op::SetFrontend(nodeport(30080)),
            "{:?}",
            h.maps.log
        );
        assert_eq!(h.maps.frontends[&nodeport(30080)].backend_count, 0);
        h.apply(&desired(vec![(
            sp("web"),
            port(30080, None, vec![ready(3)]),
        )]));

        // Empty and renumbered at once: the old frontend goes, the ring is zeroed after it.
        h.apply(&desired(vec![(sp("web"), port(30099, None, vec![]))]));
    }

    #[test]
    fn reconcile_remove_all_clears_the_maps_and_slots_are_reused() {
        let mut h = Harness::new(config(2, 16, 31));
        let d = desired(vec![
            (
                sp("a"),
                port(30001, Some([192, 0, 2, 1]), vec![ready(1), ready(2)]),
            ),
            (
                sp("b"),
                port(30002, None, vec![ready(3), terminating(4, true)]),
            ),
        ]);
        h.apply(&d);
        let r = h.apply(&DesiredState::default());
        assert_eq!((r.frontends_removed, r.backends_removed), (3, 3));
        assert!(h.maps.frontends.is_empty());
        assert_eq!(h.r.free(), (2, 15));
        // New services land on the old slots, whose rings still hold stale ids: the rings must
        // be rewritten before any frontend points at them.
        let d2 = desired(vec![
            (sp("c"), port(30003, None, vec![ready(5)])),
            (
                sp("d"),
                port(30004, None, vec![ready(1), ready(2), ready(7)]),
            ),
            (sp("e"), port(30005, None, vec![])),
        ]);
        let r = h.apply(&d2);
        assert_eq!(r.skipped_capacity.len(), 1, "{r:?}");
        assert_eq!(r.skipped_capacity[0].resource, Capacity::ServiceSlots);
        assert_eq!(r.skipped_capacity[0].service, sp("e"));
    }

    #[test]
    fn reconcile_backend_ids_run_out_then_converge() {
        // ids 1..=5 only.
        let mut h = Harness::new(config(3, 6, 31));
        h.apply(&desired(vec![(
            sp("a"),
            port(30001, None, (1..=3).map(ready).collect()),
        )]));
        let d = desired(vec![
            (sp("a"), port(30001, None, (1..=3).map(ready).collect())),
            (sp("b"), port(30002, None, (11..=14).map(ready).collect())),
        ]);
        let r = h.apply(&d);
        let ids: Vec<_> = r
            .skipped_capacity
            .iter()
            .map(|c| (c.backend, c.resource))
            .collect();
        assert_eq!(
            ids,
            vec![
                (
                    Some((Ipv4Addr::new(10, 0, 0, 13), 8080)),
                    Capacity::BackendIds
                ),
                (
                    Some((Ipv4Addr::new(10, 0, 0, 14), 8080)),
                    Capacity::BackendIds
                )
            ]
        );
        assert_eq!(h.maps.frontends[&nodeport(30002)].backend_count, 2);

        // a shrinks: its ids come free at the end of the first pass, b gets them in the second.
        h.maps.keep_serving = vec![nodeport(30001), nodeport(30002)];
        let d = desired(vec![
            (sp("a"), port(30001, None, vec![ready(1)])),
            (sp("b"), port(30002, None, (11..=14).map(ready).collect())),
        ]);
        let r = h.apply(&d);
        assert!(r.skipped_capacity.is_empty(), "{r:?}");
        assert_eq!((r.backends_added, r.backends_removed), (2, 2));
        assert_eq!(h.maps.frontends[&nodeport(30002)].backend_count, 4);
        assert_eq!(h.r.free().1, 0);

        // Every backend of b replaced with no id free: b drains (count 0: the kernel path
        // serves it), then refills in the second pass. a keeps serving throughout.
        h.maps.keep_serving = vec![nodeport(30001)];
        let d = desired(vec![
            (sp("a"), port(30001, None, vec![ready(1)])),
            (sp("b"), port(30002, None, (21..=24).map(ready).collect())),
        ]);
        let r = h.apply(&d);
        assert!(r.skipped_capacity.is_empty(), "{r:?}");
        assert_eq!(
            (r.backends_added, r.backends_removed, r.frontends_updated),
            (4, 4, 2)
        );

        // More backends than ids at all: reported on every apply, the rest served.
        let d = desired(vec![
            (sp("a"), port(30001, None, vec![ready(1)])),
            (sp("b"), port(30002, None, (21..=26).map(ready).collect())),
        ]);
        let r = h.apply(&d);
        assert_eq!(r.skipped_capacity.len(), 2);
        assert_eq!(h.maps.frontends[&nodeport(30002)].backend_count, 4);
    }

    #[test]
    fn reconcile_ring_holds_at_most_maglev_size_backends() {
        let mut h = Harness::new(config(1, 32, 13));
        let r = h.apply(&desired(vec![(
            sp("a"),
            port(30001, None, (1..=15).map(ready).collect()),
        )]));
        let skipped: Vec<_> = r
            .skipped_capacity
            .iter()
            .map(|c| (c.backend.unwrap().0, c.resource))
            .collect();
        assert_eq!(
            skipped,
            vec![
                (Ipv4Addr::new(10, 0, 0, 14), Capacity::RingSize),
                (Ipv4Addr::new(10, 0, 0, 15), Capacity::RingSize)
            ]
        );
        assert_eq!(h.maps.frontends[&nodeport(30001)].backend_count, 13);
    }

    #[test]
    fn reconcile_service_slot_freed_by_a_removal_is_used_in_the_same_apply() {
        let mut h = Harness::new(config(1, 16, 13));
        h.apply(&desired(vec![(sp("a"), port(30001, None, vec![ready(1)]))]));
        let r = h.apply(&desired(vec![(sp("b"), port(30002, None, vec![ready(2)]))]));
        assert!(r.skipped_capacity.is_empty(), "{r:?}");
        assert_eq!((r.services_added, r.services_removed), (1, 1));
        assert_eq!(h.r.service_id(&sp("b")), Some(0));
    }

    #[test]
    fn reconcile_unresolved_backends_are_left_out_and_retried() {
        let mut h = Harness::new(config(2, 16, 31));
        h.resolver.unreachable.insert(ready(2).addr);
        let d = desired(vec![(
            sp("web"),
            port(30080, None, vec![ready(1), ready(2)]),
        )]);
        let r = h.apply(&d);
        assert_eq!(r.unresolved.len(), 1);
        assert_eq!(
            (r.unresolved[0].addr, r.unresolved[0].reason.as_str()),
            (ready(2).addr, "no route to 10.0.0.2")
        );
        assert_eq!(h.maps.frontends[&nodeport(30080)].backend_count, 1);
        h.resolver.unreachable.clear();
        h.maps.keep_serving = vec![nodeport(30080)];
        let r = h.apply(&d);
        assert!(r.unresolved.is_empty());
        assert_eq!(r.backends_added, 1);
        // Everything unreachable: count drops to 0 before the ring empties.
        h.maps.keep_serving.clear();
        h.resolver
            .unreachable
            .extend([ready(1).addr, ready(2).addr]);
        let r = h.apply(&d);
        assert_eq!((r.unresolved.len(), r.backends_removed), (2, 2));
    }

    #[test]
    fn reconcile_frontend_conflict_keeps_the_current_owner() {
        let mut h = Harness::new(config(4, 16, 31));
        let shared = Some([192, 0, 2, 50]);
        h.apply(&desired(vec![(
            sp("z"),
            port(30001, shared, vec![ready(1)]),
        )]));
        // "a" sorts first but "z" had the IP.
        let d = desired(vec![
            (sp("a"), port(30002, shared, vec![ready(2)])),
            (sp("z"), port(30001, shared, vec![ready(1)])),
        ]);
        let r = h.apply(&d);
        assert_eq!(r.frontend_conflicts.len(), 1);
        assert_eq!(
            (
                r.frontend_conflicts[0].owner.clone(),
                r.frontend_conflicts[0].loser.clone()
            ),
            (sp("z"), sp("a"))
        );
        // "z" lets go: "a" takes the IP over, in place.
        let d = desired(vec![
            (sp("a"), port(30002, shared, vec![ready(2)])),
            (sp("z"), port(30001, None, vec![ready(1)])),
        ]);
        let r = h.apply(&d);
        assert!(r.frontend_conflicts.is_empty());
        assert_eq!((r.frontends_updated, r.frontends_removed), (1, 0));
    }

    #[test]
    fn reconcile_frontend_settings_and_ports_follow_the_service() {
        let mut h = Harness::new(config(2, 16, 31));
        let mut s = port(30080, None, vec![ready(1), ready(2)]);
        h.apply(&desired(vec![(sp("web"), s.clone())]));
        s.affinity_timeout_s = Some(10800);
        s.local_only = true;
        let r = h.apply(&desired(vec![(sp("web"), s.clone())]));
        assert_eq!(
            (
                r.frontends_updated,
                r.ring_slots_written,
                r.backends_updated
            ),
            (1, 0, 0)
        );
        s.frontends = vec![(FrontendAddr::Wildcard, 30081, PROTO_TCP)];
        let r = h.apply(&desired(vec![(sp("web"), s.clone())]));
        assert_eq!((r.frontends_added, r.frontends_removed), (1, 1));
        // A pod moving node: same address, new delivery, updated in place.
        s.backends[0].local = !s.backends[0].local;
        let r = h.apply(&desired(vec![(sp("web"), s)]));
        assert_eq!((r.backends_updated, r.ring_slots_written), (1, 0));
    }

    /// The transitions of the other tests in one, for failure injection.
    fn busy_transition() -> (DesiredState, DesiredState, Vec<FrontendKey>) {
        let before = desired(vec![
            (
                sp("a"),
                port(30001, Some([192, 0, 2, 1]), (1..=4).map(ready).collect()),
            ),
            (sp("b"), port(30002, None, vec![ready(5), ready(6)])),
            (sp("c"), port(30003, None, vec![ready(7)])),
            (
                sp("gone"),
                port(30009, Some([192, 0, 2, 9]), vec![ready(8)]),
            ),
        ]);
        let after = desired(vec![
            // a: two replaced, one terminating.
            (
                sp("a"),
                port(
                    30001,
                    Some([192, 0, 2, 1]),
                    vec![ready(1), terminating(2, true), ready(20), ready(21)],
                ),
            ),
            // b: drained to zero.
            (sp("b"), port(30002, None, vec![])),
            // c: every backend replaced, nodePort moved.
            (sp("c"), port(30033, None, vec![ready(30), ready(31)])),
            // new service on a new slot.
            (
                sp("new"),
                port(30010, Some([192, 0, 2, 10]), vec![ready(40), ready(41)]),
            ),
        ]);
        let keep = vec![
            nodeport(30001),
            frontend_key(&(FrontendAddr::Ip(Ipv4Addr::new(192, 0, 2, 1)), 80, PROTO_TCP)),
        ];
        (before, after, keep)
    }

    #[test]
    fn reconcile_failed_write_at_any_point_keeps_invariants_and_converges() {
        let c = config(5, 32, 13);
        let (before, after, keep) = busy_transition();
        // How many write calls the transition makes without failures.
        let total = {
            let mut h = Harness::new(c);
            h.apply(&before);
            let calls = h.maps.calls;
            h.apply(&after);
            h.maps.calls - calls
        };
        assert!(total > 15, "{total}");
        for n in 0..total {
            let mut h = Harness::new(c);
            h.apply(&before);
            h.maps.keep_serving = keep.clone();
            h.maps.fail_at = Some(h.maps.calls + n);
            let err =
                h.r.apply(&after, &h.resolver, &mut h.maps)
                    .expect_err("injected failure");
            let text = err.to_string();
            assert!(
                text.contains(&format!(
                    "injected failure of write {}",
                    h.maps.fail_at.unwrap()
                )),
                "{text}"
            );
            assert!(matches!(err, ReconcileError::Write { .. }));
            h.maps.fail_at = None;
            // Converges (checked inside), and a further apply writes nothing.
            h.apply(&after);
            // And back, failing again somewhere on the way.
            h.maps.fail_at = Some(h.maps.calls + n / 2);
            let _ = h.r.apply(&before, &h.resolver, &mut h.maps);
            h.maps.fail_at = None;
            h.apply(&before);
        }
    }

    /// splitmix64: a tiny deterministic generator for the random walk below.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    fn random_state(rng: &mut Rng) -> DesiredState {
        let mut services = Vec::new();
        for i in 0..rng.below(6) as u8 {
            let port = 30000 + rng.below(4) as u16 * 10 + i as u16;
            services.push((sp(&format!("s{i}")), random_service(rng, port)));
        }
        desired(services)
    }

    fn random_service(rng: &mut Rng, port_number: u16) -> ServicePortState {
        {
            let mut backends = Vec::new();
            for last in 1..=12u8 {
                match rng.below(6) {
                    0 | 1 => backends.push(ready(last)),
                    2 => backends.push(terminating(last, rng.below(2) == 0)),
                    // Not ready, not terminating (translate drops these, the model allows
                    // them): kept only if already written, never in the ring.
                    3 if rng.below(2) == 0 => backends.push(BackendSpec {
                        ready: false,
                        serving: false,
                        ..ready(last)
                    }),
                    _ => {}
                }
            }
            let ip = if rng.below(2) == 0 {
                Some([192, 0, 2, rng.below(3) as u8])
            } else {
                None
            };
            let mut s = port(port_number, ip, backends);
            if rng.below(4) == 0 {
                s.affinity_timeout_s = Some(60);
            }
            s
        }
    }

    #[test]
    fn reconcile_random_walk_with_failures_and_tight_capacity() {
        let c = config(4, 24, 13);
        let mut rng = Rng(7);
        let mut h = Harness::new(c);
        let (mut failures, mut capacity, mut unresolved, mut drains) = (0, 0, 0, 0);
        for _ in 0..1000 {
            let d = random_state(&mut rng);
            for b in 1..=12u8 {
                if rng.below(20) == 0 {
                    h.resolver.unreachable.insert(ready(b).addr);
                } else {
                    h.resolver.unreachable.remove(&ready(b).addr);
                }
            }
            if rng.below(3) == 0 {
                // Fail on the way to another state, so the retry aims elsewhere than the
                // half-done writes did.
                let other = if rng.below(2) == 0 {
                    random_state(&mut rng)
                } else {
                    d.clone()
                };
                h.maps.fail_at = Some(h.maps.calls + rng.below(20) as usize);
                if h.r.apply(&other, &h.resolver, &mut h.maps).is_err() {
                    failures += 1;
                }
                h.maps.fail_at = None;
            }
            let r = h.apply(&d);
            capacity += r.skipped_capacity.len();
            unresolved += r.unresolved.len();
            drains += h
                .maps
                .log
                .iter()
                .filter(|op| matches!(op, Op::Ring(_, 13)))
                .count();
        }
        // The walk really went through the hard cases.
        assert!(
            failures > 100 && capacity > 100 && unresolved > 100 && drains > 100,
            "{failures} {capacity} {unresolved} {drains}"
        );
    }

    #[test]
    fn reconcile_scoped_applies_reach_what_a_full_apply_would() {
        // One or two service ports change per step (ports drawn from three numbers, so
        // frontends collide often), backends become unreachable and reachable again (their
        // service ports are then in the scope, as the agent's periodic full apply would
        // cover them), writes fail (then a full apply follows, as the runtime does), maps
        // are tight. After every scoped apply the maps must be exactly what the desired
        // state says and a full apply must find nothing to write.
        let c = config(4, 24, 13);
        let mut rng = Rng(11);
        let mut h = Harness::new(c);
        let mut prev = DesiredState::default();
        let (mut conflicts, mut capacity, mut unresolved, mut removals, mut failures) =
            (0, 0, 0, 0, 0);
        for _ in 0..1500 {
            let mut d = prev.clone();
            let mut changed = BTreeSet::new();
            for _ in 0..1 + rng.below(2) {
                let id = sp(&format!("s{}", rng.below(6)));
                if rng.below(4) == 0 {
                    removals += d.services.remove(&id).is_some() as usize;
                } else {
                    let port = 30000 + rng.below(3) as u16;
                    d.services
                        .insert(id.clone(), random_service(&mut rng, port));
                }
                changed.insert(id);
            }
            if rng.below(5) == 0 {
                let b = ready(1 + rng.below(12) as u8).addr;
                if !h.resolver.unreachable.remove(&b) {
                    h.resolver.unreachable.insert(b);
                }
                for (id, st) in &d.services {
                    if st.backends.iter().any(|x| x.addr == b) {
                        changed.insert(id.clone());
                    }
                }
            }
            if rng.below(10) == 0 {
                h.maps.fail_at = Some(h.maps.calls + rng.below(20) as usize);
                let res =
                    h.r.apply_scoped(&d, Scope::Changed(&changed), &h.resolver, &mut h.maps);
                h.maps.fail_at = None;
                if res.is_err() {
                    failures += 1;
                    h.apply(&d);
                    prev = d;
                    continue;
                }
            }
            let r = h.apply_changed(&d, &changed);
            conflicts += r.frontend_conflicts.len();
            capacity += r.skipped_capacity.len();
            unresolved += r.unresolved.len();
            prev = d;
        }
        assert!(
            conflicts > 100
                && capacity > 100
                && unresolved > 100
                && removals > 100
                && failures > 30,
            "{conflicts} {capacity} {unresolved} {removals} {failures}"
        );
    }

    #[test]
    fn reconcile_scoped_apply_touches_only_the_changed_service() {
        // The point of scoping: other service ports are not planned, their backends not
        // even resolved again.
        let mut h = Harness::new(config(8, 64, 13));
        let services: Vec<_> = (0..5u8)
            .map(|i| {
                (
                    sp(&format!("s{i}")),
                    port(30000 + i as u16, None, vec![ready(1 + i)]),
                )
            })
            .collect();
        let mut d = desired(services);
        h.apply(&d);
        d.services
            .get_mut(&sp("s2"))
            .unwrap()
            .backends
            .push(ready(9));
        // The other services' backends would now fail to resolve: a full apply would drop
        // them, a scoped one does not look.
        for i in [1u8, 2, 4, 5] {
            h.resolver.unreachable.insert(ready(i).addr);
        }
        h.maps.log.clear();
        let changed = BTreeSet::from([sp("s2")]);
        let r =
            h.r.apply_scoped(&d, Scope::Changed(&changed), &h.resolver, &mut h.maps)
                .unwrap();
        assert!(r.unresolved.is_empty(), "{r:?}");
        let sid = h.r.service_id(&sp("s2")).unwrap();
        let id9 = h.r.backend_id(&sp("s2"), ready(9).addr, 8080).unwrap();
        let mut log = h.maps.log.clone();
        log.sort_by_key(|op| format!("{op:?}"));
        assert_eq!(log.len(), 3, "{log:?}");
        assert!(log.contains(&Op::SetBackend(id9)), "{log:?}");
        assert!(log.contains(&Op::SetFrontend(nodeport(30002))), "{log:?}");
        assert!(
            log.iter()
                .any(|op| matches!(op, Op::Ring(s, n) if *s == sid && *n > 0)),
            "{log:?}"
        );
        let full = h.r.apply(&d, &h.resolver, &mut h.maps).unwrap();
        assert_eq!(full.unresolved.len(), 4, "{full:?}");
    }

    #[test]
    #[should_panic(expected = "which is not live")]
    fn reconcile_fake_maps_catch_a_break_before_make() {
        // The checks are real: clearing a backend a served ring still uses is caught.
        let c = config(1, 4, 13);
        let mut maps = FakeMaps::new(c);
        let be = Backend {
            flags: BE_ACTIVE,
            ..Backend::default()
        };
        maps.set_backend(1, &be).unwrap();
        let ring: Vec<(u32, u32)> = (0..13).map(|p| (p, 1)).collect();
        maps.write_ring(0, &ring).unwrap();
        maps.set_frontend(
            &nodeport(30001),
            &Frontend {
                service_id: 0,
                backend_count: 1,
                flags: 0,
                affinity_timeout_s: 0,
            },
        )
        .unwrap();
        let _ = maps.clear_backend(1);
    }

    #[test]
    fn reconcile_rejects_unusable_config() {
        for (c, want) in [
            (config(0, 16, 13), "max_services is 0"),
            (config(1, 1, 13), "max_backends 1"),
            (config(1, 16, 12), "not prime"),
        ] {
            let err = Reconciler::new(c).unwrap_err().to_string();
            assert!(err.contains(want), "{err}");
        }
    }
}

//! One sync pass: observe, [`compute_actions`], and dispatch each action to its effect.

use super::Worker;
use crate::model::actions::{compute_actions, Action};
use crate::model::observed::{
    ObservedContainer, ObservedPod, ObservedSandbox, ProbeResult, RuntimeState, StartFailure,
};
use crate::model::probe::ProbeType;
use crate::model::status;
use crate::sys::runtime;

impl Worker {
    pub(super) fn observed(&self) -> ObservedPod {
        let containers: Vec<ObservedContainer> = self
            .insts
            .values()
            .map(|i| {
                let mut o = runtime::observed_from(&i.meta, i.state.as_ref(), i.message.clone());
                if let Some(ws) = self.probes.get(&i.meta.id) {
                    for w in ws {
                        let r = Some(w.result());
                        match w.kind {
                            ProbeType::Startup => o.probes.startup = r,
                            ProbeType::Liveness => o.probes.liveness = r,
                            ProbeType::Readiness => o.probes.readiness = r,
                        }
                    }
                } else if o.state == RuntimeState::Running {
                    // No probe workers (yet): configured probes count as not passed.
                    if let Some(c) = self.container_spec(&i.meta.name) {
                        if c.startup_probe.is_some() {
                            o.probes.startup = Some(ProbeResult::Unknown);
                        }
                        if c.readiness_probe.is_some() {
                            o.probes.readiness = Some(ProbeResult::Failure);
                        }
                    }
                }
                o
            })
            .collect();
        ObservedPod {
            sandbox: self.sandbox.as_ref().map(|s| ObservedSandbox {
                id: s.id.clone(),
                attempt: s.attempt,
                ready: s.ready,
                ips: s.ips.clone(),
            }),
            containers,
            start_failures: self.start_failures.clone(),
            host_ip: self.cfg.host_ip.clone(),
            start_time: self.start_time,
        }
    }

    /// Admission of what only the node can judge, before anything of a new pod runs (the
    /// kubelet's sysctl admit handler): a refused pod is Failed with the kubelet's reason and
    /// a Warning event, and is never started. A source that admits pods itself (the apiserver
    /// source) refuses them before they reach a worker; this holds for every source.
    fn refused(&mut self) -> bool {
        if self.sandbox.is_some() || !self.insts.is_empty() {
            return false;
        }
        let pressure = self.pressure.get().unwrap_or_default();
        let admitted = self.cfg.sysctls.admit(&self.pod).and_then(|()| {
            crate::model::admit::admit_pressure(
                &self.pod,
                pressure,
                self.pressure.static_pods_protected(),
            )
        });
        match admitted {
            Ok(()) => false,
            Err(r) => {
                let msg = r.message.clone();
                self.event("Warning", &r.reason.clone(), &msg);
                self.rejected = Some(r);
                true
            }
        }
    }

    /// One pass of planning and acting; true when something changed that may allow the next
    /// step right away.
    pub(super) async fn sync_once(&mut self) -> bool {
        if self.rejected.is_some() || self.refused() {
            return false;
        }
        if self.evicted.is_some() {
            // Evicted: make sure nothing runs and the sandbox is gone, then release the
            // volumes (emptyDir space is what a disk eviction reclaims; the kubelet's
            // SyncTerminatedPod unmounts them too) and just report.
            if self.sandbox.as_ref().is_some_and(|s| s.ready || s.present) || self.any_running() {
                return self.kill_pod().await;
            }
            if !self.volumes_released {
                let vols = self.fx.volumes.clone();
                let uid = self.uid.clone();
                match super::blocking(move || vols.teardown(&uid)).await {
                    Some(Ok(())) => {
                        self.volumes_released = true;
                        self.volumes = None;
                    }
                    Some(Err(e)) => {
                        tracing::warn!(uid = %self.uid, "volume teardown of an evicted pod: {e} (retried)")
                    }
                    None => {}
                }
            }
            return false;
        }
        let now = self.fx.clock.now();
        let obs = self.observed();
        let st = status::compute_status(&self.pod, &obs, None, now);
        let phase = st.phase.unwrap_or_default();
        if st.reason.as_deref() == Some(status::DEADLINE_REASON) && !self.deadline_noted {
            self.deadline_noted = true;
            self.event("Warning", status::DEADLINE_REASON, status::DEADLINE_MESSAGE);
        }
        if phase == "Succeeded" || phase == "Failed" {
            // Done: make sure nothing runs and the sandbox is gone, then just report.
            if self.sandbox.as_ref().is_some_and(|s| s.ready || s.present) || self.any_running() {
                // No progress while the sandbox cannot be torn down: retried after a wait.
                return self.kill_pod().await;
            }
            return false;
        }
        if !self.ensure_volumes().await {
            return false;
        }
        self.cni_check().await;
        let obs = self.observed();
        let plan = compute_actions(&self.pod, &obs, now, &self.restart_backoff);
        // Ephemeral containers are started once the sandbox stands (kubelet
        // computePodActions: not while the sandbox is being (re)made or the pod killed).
        let pod_level = plan
            .iter()
            .any(|a| matches!(a, Action::KillPod | Action::CreateSandbox { .. }));
        let mut progress = false;
        for a in plan {
            match a {
                Action::KillPod => {
                    if self.sandbox.as_ref().is_some_and(|s| s.ready || s.present)
                        || self.any_running()
                    {
                        progress = self.kill_pod().await;
                    }
                }
                Action::CreateSandbox { attempt } => {
                    if !self.create_sandbox(attempt).await {
                        return false;
                    }
                    progress = true;
                }
                Action::KillContainer { name, message, .. } => {
                    self.event("Normal", "Killing", &message);
                    let unknown = self
                        .observed()
                        .latest(&name)
                        .filter(|c| c.state == RuntimeState::Unknown)
                        .map(|c| c.id.clone());
                    if let Some(id) = unknown {
                        self.kill_unknown(&id).await;
                        progress = true;
                    } else if let Some(id) = self.latest_running(&name) {
                        let grace = self.grace();
                        self.stop_many(vec![id], grace).await;
                        progress = true;
                    }
                }
                Action::StartInitContainer { name, .. } | Action::StartContainer { name } => {
                    if self.start_container(&name).await {
                        progress = true;
                    }
                }
                Action::BackOff { name, message } => {
                    let c = self.container_spec(&name);
                    let image = c.and_then(|c| c.image).unwrap_or_default();
                    let _ = image;
                    self.event(
                        "Warning",
                        "BackOff",
                        &format!(
                            "Back-off restarting failed container {name} in pod {}",
                            self.ns_name().1
                        ),
                    );
                    self.start_failures.insert(
                        name,
                        StartFailure {
                            reason: "CrashLoopBackOff".into(),
                            message,
                        },
                    );
                }
            }
        }
        if !pod_level && self.sandbox.as_ref().is_some_and(|s| s.ready) {
            progress |= self.start_ephemeral().await;
        }
        progress
    }

    /// Starts each ephemeral container that has never had an instance: they are never
    /// restarted (an exited one stays exited), and one whose start failed is retried on the
    /// next pass, as the kubelet does while it has no status for it.
    async fn start_ephemeral(&mut self) -> bool {
        let names: Vec<String> = super::ephemeral_containers(&self.pod)
            .into_iter()
            .map(|(c, _)| c.name)
            .filter(|n| !self.insts.values().any(|i| &i.meta.name == n))
            .collect();
        let mut progress = false;
        for name in names {
            if self.deleting || *self.deletion.borrow() {
                break;
            }
            progress |= self.start_container(&name).await;
        }
        progress
    }
}

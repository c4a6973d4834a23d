//! Probe scheduling: one probe worker per configured probe, each run in a task of its own, its
//! result fed back to the pod's worker.

use super::{ProbeDone, Worker};
use crate::model::observed::ProbeResult;
use crate::model::probe::{ProbeOutcome, ProbeSpec, ProbeTarget, ProbeType, ProbeWorker};
use k8s_openapi::chrono::{DateTime, Utc};

impl Worker {
    pub(super) fn setup_probes(&mut self, id: &str, started: DateTime<Utc>) {
        let Some(i) = self.insts.get(id) else { return };
        let Some(c) = self.container_spec(&i.meta.name) else {
            return;
        };
        let mut ws = Vec::new();
        for (kind, p) in [
            (ProbeType::Startup, &c.startup_probe),
            (ProbeType::Liveness, &c.liveness_probe),
            (ProbeType::Readiness, &c.readiness_probe),
        ] {
            let Some(p) = p else { continue };
            match ProbeSpec::from_probe(p, &c) {
                Ok(s) => {
                    let mut w = ProbeWorker::new(kind, s);
                    w.container_started(started);
                    ws.push(w);
                }
                Err(e) => {
                    let msg = format!("{kind:?} probe: {e}");
                    self.event("Warning", "Unhealthy", &msg);
                }
            }
        }
        if !ws.is_empty() {
            self.probes.insert(id.to_string(), ws);
        }
    }

    /// Starts every probe that is due and not already running, each in a task of its own.
    pub(super) async fn run_probes(&mut self) {
        let now = self.fx.clock.now();
        let pod_ip = self
            .sandbox
            .as_ref()
            .and_then(|s| s.ips.first().cloned())
            .unwrap_or_default();
        for (id, ws) in &self.probes {
            let running = self.insts.get(id).is_some_and(|i| {
                i.state
                    .as_ref()
                    .is_some_and(|s| s.status == hako_shim::state::Status::Running)
            });
            let startup_done = ws
                .iter()
                .find(|w| w.kind == ProbeType::Startup)
                .is_none_or(|w| w.result() == ProbeResult::Success);
            for (idx, w) in ws.iter().enumerate() {
                if !w.due(now, running, startup_done)
                    || !self.probes_in_flight.insert((id.clone(), idx))
                {
                    continue;
                }
                let prober = self.fx.prober.clone();
                let target = ProbeTarget {
                    pod_ip: pod_ip.clone(),
                    container_id: id.clone(),
                };
                let action = w.spec.action.clone();
                let timeout = w.spec.timeout;
                let id = id.clone();
                let tx = self.probe_tx.clone();
                tokio::spawn(async move {
                    let out =
                        tokio::task::spawn_blocking(move || prober.run(&target, &action, timeout))
                            .await
                            .ok();
                    // The worker may be gone (the pod was removed): nothing to report to.
                    let _ = tx.send(ProbeDone { id, idx, out });
                });
            }
        }
    }

    /// A probe finished: its result goes to its worker (events, metrics, status).
    pub(super) fn probe_done(&mut self, done: ProbeDone) {
        let ProbeDone { id, idx, out } = done;
        self.probes_in_flight.remove(&(id.clone(), idx));
        let Some(out) = out else { return };
        let Some(w) = self.probes.get_mut(&id).and_then(|ws| ws.get_mut(idx)) else {
            return;
        };
        let kind = w.kind;
        let changed = w.record(self.fx.clock.now(), &out);
        let k = match kind {
            ProbeType::Startup => "Startup",
            ProbeType::Liveness => "Liveness",
            ProbeType::Readiness => "Readiness",
        };
        self.metrics.probe_result(
            k,
            match out {
                ProbeOutcome::Success => "successful",
                ProbeOutcome::Failure(_) => "failed",
            },
        );
        if let ProbeOutcome::Failure(msg) = &out {
            self.event("Warning", "Unhealthy", &format!("{k} probe failed: {msg}"));
        }
        if changed.is_some() {
            self.dirty = true;
        }
    }
}

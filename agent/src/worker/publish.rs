//! What the worker tells the world: status (record on disk, pod list, status channel), events
//! and metrics.

use super::{Phases, Worker};
use crate::model::observed::{ObservedPod, RuntimeState};
use crate::model::status;
use k8s_openapi::api::core::v1::PodStatus;
use std::time::Duration;

impl Worker {
    /// One pod start phase took `d`: the `hako_agent_pod_start_phase_seconds` histogram and a
    /// debug line on the `hako_agent::startup` target (what `scripts/bench-agent` tabulates).
    pub(super) fn phase(&self, phase: &'static str, d: Duration) {
        self.metrics.observe_start_phase(phase, d);
        tracing::debug!(
            target: "hako_agent::startup",
            uid = %self.uid,
            phase,
            ms = d.as_secs_f64() * 1e3,
            "pod start phase"
        );
    }

    pub(super) fn phases(&self, p: &Phases) {
        for (phase, d) in &p.0 {
            self.phase(phase, *d);
        }
    }

    pub(super) fn event(&mut self, type_: &str, reason: &str, message: &str) {
        let (ns, name) = self.ns_name();
        if type_ == "Warning" {
            tracing::warn!(pod = %format!("{ns}/{name}"), reason, "{message}");
        } else {
            tracing::info!(pod = %format!("{ns}/{name}"), reason, "{message}");
        }
        self.record
            .add_event(type_, reason, message, self.fx.clock.now());
        self.dirty = true;
    }

    pub(super) fn publish(&mut self, observed: &ObservedPod) {
        let prev = self.record.pod.status.clone();
        let st = match &self.rejected {
            // As the kubelet's rejectPod: phase Failed with the reason and message only.
            Some(r) => PodStatus {
                phase: Some("Failed".into()),
                reason: Some(r.reason.clone()),
                message: Some(r.message.clone()),
                host_ip: observed.host_ip.clone(),
                start_time: observed
                    .start_time
                    .map(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time),
                ..Default::default()
            },
            None => {
                let mut st =
                    status::compute_status(&self.pod, observed, prev.as_ref(), self.fx.clock.now());
                if let Some(e) = &self.evicted {
                    evicted_status(&mut st, e, prev.as_ref(), self.fx.clock.now());
                }
                st
            }
        };
        self.report_metrics(observed, &st);
        if prev.as_ref() == Some(&st) && !self.dirty {
            return;
        }
        self.dirty = false;
        let mut pod = self.pod.clone();
        pod.status = Some(st);
        self.record.pod = pod;
        let t = std::time::Instant::now();
        self.fx.sink.publish(&self.record);
        self.phase("status_write", t.elapsed());
    }

    /// Feeds the pod gauges and, once, the pod start latency (first seen → every regular
    /// container running).
    pub(super) fn report_metrics(&mut self, observed: &ObservedPod, st: &PodStatus) {
        let mut g = crate::api::healthz::PodGauge {
            sandbox_running: observed.sandbox.as_ref().is_some_and(|s| s.ready),
            ..Default::default()
        };
        for c in &observed.containers {
            let i = match c.state {
                RuntimeState::Created => 0,
                RuntimeState::Running => 1,
                RuntimeState::Exited => 2,
                RuntimeState::Unknown => 3,
            };
            g.containers[i] += 1;
        }
        g.restarts = st
            .container_statuses
            .iter()
            .flatten()
            .chain(st.init_container_statuses.iter().flatten())
            .map(|c| u64::try_from(c.restart_count).unwrap_or(0))
            .sum();
        self.metrics.set_pod(&self.uid, g);
        if !self.start_observed {
            let all_running = st.container_statuses.as_ref().is_some_and(|cs| {
                !cs.is_empty()
                    && cs
                        .iter()
                        .all(|c| c.state.as_ref().is_some_and(|s| s.running.is_some()))
            });
            if all_running {
                self.start_observed = true;
                let d = self.seen_at.elapsed();
                self.metrics.observe_pod_start(d);
                tracing::debug!(
                    target: "hako_agent::startup",
                    uid = %self.uid,
                    phase = "total",
                    ms = d.as_secs_f64() * 1e3,
                    "pod started"
                );
            }
        }
    }
}

/// The status of an evicted pod, as the kubelet's eviction manager leaves it: phase `Failed`,
/// reason `Evicted`, its message, and a `DisruptionTarget` condition (reason
/// `TerminationByKubelet`); the containers' own states stay as observed.
fn evicted_status(
    st: &mut PodStatus,
    e: &super::Evicted,
    prev: Option<&PodStatus>,
    now: k8s_openapi::chrono::DateTime<k8s_openapi::chrono::Utc>,
) {
    use k8s_openapi::api::core::v1::PodCondition;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    st.phase = Some("Failed".into());
    st.reason = Some(crate::eviction::REASON.into());
    st.message = Some(e.message.clone());
    let since = prev
        .and_then(|p| p.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "DisruptionTarget"))
        .and_then(|c| c.last_transition_time.clone())
        .unwrap_or(Time(now));
    let conds = st.conditions.get_or_insert_with(Vec::new);
    conds.retain(|c| c.type_ != "DisruptionTarget");
    for c in conds.iter_mut() {
        if matches!(c.type_.as_str(), "Ready" | "ContainersReady") && c.status == "True" {
            c.status = "False".into();
            c.reason = Some("PodCompleted".into());
            c.last_transition_time = Some(Time(now));
        }
    }
    conds.push(PodCondition {
        type_: "DisruptionTarget".into(),
        status: "True".into(),
        reason: Some("TerminationByKubelet".into()),
        message: Some(e.message.clone()),
        last_transition_time: Some(since),
        ..Default::default()
    });
}

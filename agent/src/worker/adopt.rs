//! Re-adoption after an agent restart: the pod record, the sandbox, every container with its
//! shim state, and the saved restart back-off; stale sandboxes of this pod are torn down.

use super::{blocking, Inst, SandboxInfo, SandboxRecord, Worker};
use crate::sys::runtime::{self, ContainerMeta};
use crate::sys::sandbox::{self, SandboxOwner, SandboxPaths};
use crate::sys::state;
use k8s_openapi::chrono::{DateTime, Utc};

impl Worker {
    /// Re-adopts what the node has for this UID: the previous record (events, start time),
    /// the sandbox and every container with its shim state.
    pub(super) async fn adopt(&mut self) {
        let root = self.cfg.root_dir.clone();
        let uid = self.uid.clone();
        let rt = self.fx.runtime.clone();
        let net = self.fx.network.clone();
        let run_dir = self.cfg.run_dir.clone();
        let found = blocking(move || {
            let prev = state::read_record(&root, &uid).unwrap_or_else(|e| {
                tracing::warn!(%uid, "pod record not adopted: {e}");
                None
            });
            let sb: Option<SandboxRecord> =
                std::fs::read(root.join("pods").join(&uid).join("sandbox.json"))
                    .ok()
                    .and_then(|b| serde_json::from_slice(&b).ok());
            // This pod's sandboxes that its record does not name: left by a start that a
            // crash interrupted (before the record was written) or by an earlier attempt.
            // Its ids start with the UID's prefix: only those owner records are read.
            let prefix = format!("{}-s", sandbox::id_prefix(&uid));
            let stale: Vec<(SandboxPaths, Option<SandboxOwner>)> = net
                .list()
                .into_iter()
                .filter(|p| p.id().starts_with(&prefix))
                .map(|p| {
                    let o = p.owner();
                    (p, o)
                })
                .filter(|(p, o)| {
                    SandboxOwner::owned_by(o.as_ref(), &p.id(), &uid)
                        && sb.as_ref().is_none_or(|s| s.id != p.id())
                })
                .collect();
            let sb = sb.map(|s| {
                let paths = SandboxPaths::new(&run_dir, &s.id);
                let ok = net.exists(&paths);
                (s, paths, ok)
            });
            let metas = runtime::read_metas(&root, &uid);
            let insts: Vec<(ContainerMeta, Option<hako_shim::state::State>)> = metas
                .into_iter()
                .map(|m| {
                    let st = rt.state(&m.id);
                    (m, st)
                })
                .collect();
            (prev, sb, insts, stale)
        })
        .await;
        let Some((prev, sb, insts, stale)) = found else {
            return;
        };
        for (paths, owner) in stale {
            let id = paths.id();
            let host_network = owner.map_or_else(|| self.host_network(), |o| o.host_network);
            let a = self.attachment(&id, paths.net());
            let net = self.fx.network.clone();
            match blocking(move || net.teardown(&paths, &a, host_network)).await {
                Some(Ok(())) => {
                    tracing::info!(uid = %self.uid, sandbox = %id, "removed a sandbox left by an interrupted start")
                }
                Some(Err(e)) => {
                    self.metrics.cni_error();
                    tracing::warn!(uid = %self.uid, sandbox = %id, "could not remove a sandbox left by an interrupted start (retried once the pod is gone): {e}")
                }
                None => {}
            }
        }
        if let Some(saved) = std::fs::read(self.pod_dir().join("backoff.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
        {
            self.restart_backoff.restore(saved);
        }
        if let Some(prev) = prev {
            // An evicted pod stays evicted across agent restarts.
            if let Some(st) = prev.pod.status.as_ref().filter(|s| {
                s.phase.as_deref() == Some("Failed")
                    && s.reason.as_deref() == Some(crate::eviction::REASON)
            }) {
                self.evicted = Some(super::Evicted {
                    message: st.message.clone().unwrap_or_default(),
                    grace: crate::eviction::IMMEDIATE_GRACE,
                });
            }
            self.record.events = prev.events;
            self.start_time = prev
                .pod
                .status
                .as_ref()
                .and_then(|s| s.start_time.as_ref())
                .map(|t| t.0);
        }
        if let Some((s, paths, ok)) = sb {
            self.sandbox = Some(SandboxInfo {
                present: true,
                id: s.id,
                attempt: s.attempt,
                ready: ok,
                ips: s.ips,
                paths,
            });
        }
        // An instance that a killed agent created but never started (shim state `Created`,
        // or a meta record with no shim container) never ran: it is deleted, not kept as the
        // previous instance, and the container is started afresh (the kubelet's GC removes
        // such created-only containers the same way).
        let (insts, unstarted): (Vec<_>, Vec<_>) = insts.into_iter().partition(|(_, st)| {
            st.as_ref()
                .is_some_and(|s| s.status != hako_shim::state::Status::Created)
        });
        for (m, _) in unstarted {
            tracing::info!(uid = %self.uid, container = %m.name, id = %m.id, "removing a container instance created but never started before a restart");
            let rt = self.fx.runtime.clone();
            let root = self.cfg.root_dir.clone();
            let uid = self.uid.clone();
            blocking(move || {
                let _ = rt.force_delete(&m.id);
                runtime::remove_meta(&root, &uid, &m.id);
            })
            .await;
        }
        let n = insts.len();
        for (m, st) in insts {
            let exited = st
                .as_ref()
                .is_some_and(|s| s.status == hako_shim::state::Status::Stopped);
            let id = m.id.clone();
            self.insts.insert(
                id.clone(),
                Inst {
                    meta: m,
                    state: st,
                    message: String::new(),
                    message_read: false,
                    watching: false,
                },
            );
            if exited {
                self.read_message(&id);
            }
        }
        if n > 0 {
            tracing::info!(uid = %self.uid, containers = n, "re-adopted pod");
        }
        let now = self.fx.clock.now();
        let running: Vec<String> = self
            .insts
            .iter()
            .filter(|(_, i)| {
                i.state
                    .as_ref()
                    .is_some_and(|s| s.status == hako_shim::state::Status::Running)
            })
            .map(|(id, _)| id.clone())
            .collect();
        if !running.is_empty() {
            self.start_observed = true;
        }
        for id in running {
            let started = self.insts[&id]
                .state
                .as_ref()
                .and_then(|s| s.started_at.as_deref())
                .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
                .map(|t| t.with_timezone(&Utc))
                .unwrap_or(now);
            self.setup_probes(&id, started);
            self.watch(&id);
        }
    }

    /// Keeps the restart back-off in the pod's state dir, so that an agent restart does not
    /// restart a crash-looping container at once.
    pub(super) fn save_backoff(&self) {
        let path = self.pod_dir().join("backoff.json");
        let body = serde_json::to_vec(&self.restart_backoff.save()).unwrap_or_default();
        if let Err(e) = hako_shim::durable::write_file(&path, &body, 0o644) {
            tracing::warn!(uid = %self.uid, error = %e, "could not save the restart back-off");
        }
    }
}

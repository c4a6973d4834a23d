//! The pod sandbox (effectful): namespaces + CNI ADD on creation, CNI DEL + namespace removal
//! on teardown (the one `PodNetwork::teardown` path), and the periodic CNI CHECK.

use super::effects::NetworkError;
use super::{blocking, Phases, SandboxInfo, SandboxRecord, Worker};
use crate::model::dns;
use crate::sys::cni::Attachment;
use crate::sys::sandbox::{self, SandboxOwner, SandboxPaths};
use std::path::PathBuf;

/// Why a sandbox could not be created, naming the sandbox.
#[derive(Debug, thiserror::Error)]
pub(super) enum SandboxCreateError {
    /// The same id is left by a failed attempt and could not be torn down.
    #[error("could not remove the previous sandbox {0:?}: {1}")]
    Previous(String, Box<NetworkError>),
    /// The namespaces could not be made.
    #[error(transparent)]
    Namespaces(Box<NetworkError>),
    /// CNI ADD failed (and with it, maybe, the cleanup DEL).
    #[error("failed to setup network for sandbox {sandbox:?}: {add}{}", cleanup_note(.cleanup.as_deref()))]
    Network {
        /// Sandbox id.
        sandbox: String,
        /// The ADD's failure.
        add: Box<NetworkError>,
        /// The cleanup's failure, if it failed too.
        cleanup: Option<Box<NetworkError>>,
    },
    /// The blocking task ended without an answer.
    #[error("sandbox task failed")]
    Task,
}

fn cleanup_note(e: Option<&NetworkError>) -> String {
    e.map(|d| format!(" (and the cleanup failed: {d})"))
        .unwrap_or_default()
}

/// The CNI attachment of a sandbox known only by its directory (and owner record, if any).
pub(super) fn orphan_attachment(paths: &SandboxPaths, owner: &SandboxOwner) -> Attachment {
    Attachment {
        container_id: paths.id(),
        netns: paths.net(),
        ifname: "eth0".into(),
        pod_namespace: owner.namespace.clone(),
        pod_name: owner.name.clone(),
        pod_uid: owner.uid.clone(),
    }
}

impl Worker {
    pub(super) fn attachment(&self, sb_id: &str, netns: PathBuf) -> Attachment {
        let (ns, name) = self.ns_name();
        Attachment {
            container_id: sb_id.to_string(),
            netns,
            ifname: "eth0".into(),
            pod_namespace: ns,
            pod_name: name,
            pod_uid: self.uid.clone(),
        }
    }

    pub(super) async fn cni_check(&mut self) {
        let due = self
            .last_cni_check
            .is_none_or(|t| t.elapsed() >= self.cfg.cni_check_period);
        let Some(sb) = self.sandbox.as_ref().filter(|s| s.ready) else {
            return;
        };
        if !due {
            return;
        }
        self.last_cni_check = Some(std::time::Instant::now());
        let a = self.attachment(&sb.id, sb.paths.net());
        let net = self.fx.network.clone();
        let netns_ok = net.exists(&sb.paths);
        let r = blocking(move || net.check(&a)).await;
        let failed = match r {
            Some(Ok(())) if netns_ok => None,
            Some(Ok(())) => Some("network namespace is gone".to_string()),
            Some(Err(e)) => Some(e.to_string()),
            None => None,
        };
        if let Some(e) = failed {
            self.metrics.cni_error();
            self.event(
                "Warning",
                "SandboxChanged",
                &format!("Pod sandbox changed, it will be killed and re-created: CNI CHECK: {e}"),
            );
            if let Some(s) = self.sandbox.as_mut() {
                s.ready = false;
            }
        }
    }

    pub(super) async fn create_sandbox(&mut self, attempt: u32) -> bool {
        // The previous sandbox goes first (its addresses, veth and netns).
        if !self.teardown_sandbox().await {
            return false;
        }
        let id = format!("{}-s{attempt}", sandbox::id_prefix(&self.uid));
        let paths = SandboxPaths::new(&self.cfg.run_dir, &id);
        let hostname = dns::pod_hostname(&self.pod);
        let a = self.attachment(&id, paths.net());
        let net = self.fx.network.clone();
        let p2 = paths.clone();
        let host_network = self.host_network();
        let sysctls = crate::model::admit::pod_sysctls(&self.pod);
        let host_ip = self.cfg.host_ip.clone();
        let (namespace, name) = self.ns_name();
        let owner = SandboxOwner {
            uid: self.uid.clone(),
            namespace,
            name,
            host_network,
            host_ipc: self
                .pod
                .spec
                .as_ref()
                .and_then(|s| s.host_ipc)
                .unwrap_or(false),
        };
        // What undoing a creation that the pod's deletion overtook needs.
        let undo = (net.clone(), paths.clone(), a.clone());
        let t = std::time::Instant::now();
        let slot = tokio::select! {
            s = self.sandbox_slots.clone().acquire_owned() => s.ok(),
            () = self.deleted() => return false,
        };
        self.phase("sandbox_slot", t.elapsed());
        let spawned = std::time::Instant::now();
        let mut task = tokio::task::spawn_blocking(move || {
            let _slot = slot;
            let mut phases = Phases::default();
            phases.add("blocking_queue", spawned.elapsed());
            let res = (|| -> Result<Vec<String>, SandboxCreateError> {
                if net.present(&p2) {
                    // Same id from a failed attempt whose DEL did not go through.
                    net.teardown(&p2, &a, host_network).map_err(|e| {
                        SandboxCreateError::Previous(a.container_id.clone(), Box::new(e))
                    })?;
                }
                let t = std::time::Instant::now();
                net.create(&p2, &hostname, host_network, &owner, &sysctls)
                    .map_err(|e| SandboxCreateError::Namespaces(Box::new(e)))?;
                phases.add("sandbox_netns", t.elapsed());
                if host_network {
                    return Ok(host_ip.into_iter().collect());
                }
                let t = std::time::Instant::now();
                match net.add(&a) {
                    Ok(ips) => {
                        phases.add("cni_add", t.elapsed());
                        Ok(ips)
                    }
                    Err(e) => {
                        // Undo the whole chain at once (containerd's DEL after a failed ADD);
                        // if DEL fails too, the sandbox stays for the next attempt to DEL.
                        let cleanup = net.teardown(&p2, &a, false).err().map(Box::new);
                        Err(SandboxCreateError::Network {
                            sandbox: a.container_id.clone(),
                            add: Box::new(e),
                            cleanup,
                        })
                    }
                }
            })();
            (res, phases)
        });
        let (res, phases) = tokio::select! {
            r = &mut task => r.unwrap_or_else(|_| (Err(SandboxCreateError::Task), Phases::default())),
            () = self.deleted() => {
                // The pod is being deleted: do not wait for the CNI chain. Its thread goes on
                // (bounded by --cni-timeout) and what it made is torn down when it returns.
                let (ns, name) = self.ns_name();
                tracing::info!(pod = %format!("{ns}/{name}"), sandbox = %id, "pod deleted during sandbox creation: not waiting for it");
                let (net, paths, a) = undo;
                tokio::spawn(async move {
                    if let Ok((Ok(_), _)) = task.await {
                        let id = paths.id();
                        match tokio::task::spawn_blocking(move || net.teardown(&paths, &a, host_network)).await {
                            Ok(Ok(())) => tracing::info!(sandbox = %id, "removed a sandbox whose pod was deleted during its creation"),
                            Ok(Err(e)) => tracing::warn!(sandbox = %id, "could not remove a sandbox whose pod was deleted during its creation (the sandbox GC retries): {e}"),
                            Err(_) => {}
                        }
                    }
                });
                return false;
            }
        };
        self.phases(&phases);
        match res {
            Ok(ips) => {
                let t = std::time::Instant::now();
                if attempt > 0 {
                    self.event(
                        "Normal",
                        "SandboxChanged",
                        "Pod sandbox changed, it will be killed and re-created.",
                    );
                }
                let rec = SandboxRecord {
                    id: id.clone(),
                    attempt,
                    ips: ips.clone(),
                };
                let dir = self.pod_dir();
                let _ = std::fs::create_dir_all(&dir);
                // Adoption after an agent restart reads it: durable, and a failure is logged.
                if let Err(e) = hako_shim::durable::write_file(
                    &dir.join("sandbox.json"),
                    &serde_json::to_vec(&rec).unwrap_or_default(),
                    0o644,
                ) {
                    tracing::error!(uid = %self.uid, sandbox = %id, error = %e, "could not record the sandbox");
                }
                // hosts, resolv.conf, hostname files shared by the pod's containers.
                let hosts = if self.host_network() {
                    // The node's file as the kubelet takes it (an unreadable one counts as empty).
                    let node_hosts = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
                    dns::host_network_hosts_file(&self.pod, &node_hosts)
                } else {
                    dns::pod_hosts_file(&self.pod, &ips, &self.cfg.dns.cluster_domain)
                };
                let resolv = dns::pod_resolv_conf(&self.pod, &self.cfg.dns).render();
                let _ = std::fs::write(dir.join("etc-hosts"), hosts);
                let _ = std::fs::write(dir.join("resolv.conf"), resolv);
                let _ = std::fs::write(
                    dir.join("hostname"),
                    format!("{}\n", dns::pod_hostname(&self.pod)),
                );
                self.phase("sandbox_files", t.elapsed());
                self.sandbox = Some(SandboxInfo {
                    present: true,
                    id,
                    attempt,
                    ready: true,
                    ips,
                    paths,
                });
                self.last_cni_check = Some(std::time::Instant::now());
                true
            }
            Err(e) => {
                self.metrics.sync_error("FailedCreatePodSandBox");
                self.metrics.cni_error();
                self.event(
                    "Warning",
                    "FailedCreatePodSandBox",
                    &format!("Failed to create pod sandbox: {e}"),
                );
                false
            }
        }
    }

    /// Tears the pod's sandbox down (see [`teardown`]); true when nothing of it is left.
    pub(super) async fn teardown_sandbox(&mut self) -> bool {
        let host_network = self.host_network();
        let Some(sb) = self.sandbox.as_mut() else {
            return true;
        };
        sb.ready = false;
        if !sb.present {
            return true;
        }
        let (id, paths) = (sb.id.clone(), sb.paths.clone());
        let a = self.attachment(&id, paths.net());
        let net = self.fx.network.clone();
        let r = blocking(move || net.teardown(&paths, &a, host_network)).await;
        match r {
            Some(Ok(())) => {
                if let Some(sb) = self.sandbox.as_mut() {
                    sb.present = false;
                }
                true
            }
            Some(Err(e)) => {
                self.metrics.cni_error();
                self.metrics.sync_error("FailedKillPod");
                self.event(
                    "Warning",
                    "FailedKillPod",
                    &format!(
                        "error killing pod: failed to destroy network for sandbox {id:?}: {e}"
                    ),
                );
                false
            }
            None => false,
        }
    }
}

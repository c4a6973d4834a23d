//! Containers (effectful): start (env, mounts and OCI spec building, shim create/start), stop
//! (preStop, SIGTERM, SIGKILL through the shim socket), kill of unknown instances, exit watches
//! and the GC of old instances.

use super::hooks::hook_action;
use super::{blocking, Inst, Objects, Phases, Worker};
use crate::model::actions::{self, termination_order};
use crate::model::observed::{RuntimeState, StartFailure};
use crate::model::probe::{ProbeOutcome, ProbeTarget, Prober};
use crate::model::{backoff, env, qos, status};
use crate::sys::prober::RealProber;
use crate::sys::runtime::{self, ContainerMeta};
use k8s_openapi::api::core::v1::Container;
use k8s_openapi::chrono::{DateTime, Utc};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// One request to a container's shim over its socket, answered asynchronously: a wait or a
/// stop holds no thread while the container takes its time (a blocking-pool thread per
/// stopping container made the pool, and the process's memory, grow with every mass deletion).
pub(super) async fn shim_request(
    sock: &std::path::Path,
    req: &hako_shim::protocol::Request,
) -> Result<hako_shim::protocol::Response, String> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let mut s = tokio::net::UnixStream::connect(sock)
        .await
        .map_err(|e| format!("{}: {e}", sock.display()))?;
    let mut data = serde_json::to_vec(req).map_err(|e| e.to_string())?;
    data.push(b'\n');
    s.write_all(&data)
        .await
        .map_err(|e| format!("{}: {e}", sock.display()))?;
    let mut line = String::new();
    tokio::io::BufReader::new(s)
        .read_line(&mut line)
        .await
        .map_err(|e| format!("{}: {e}", sock.display()))?;
    let resp: hako_shim::protocol::Response =
        serde_json::from_str(&line).map_err(|e| format!("bad shim response {line:?}: {e}"))?;
    match resp.error {
        Some(e) => Err(e),
        None => Ok(resp),
    }
}

/// Waits for a container's exit on its shim socket (async, no polling).
pub(super) async fn wait_exit(sock: PathBuf) {
    let wait = hako_shim::protocol::Request::Wait { timeout_ms: None };
    let _ = shim_request(&sock, &wait).await;
}

/// SIGTERM, SIGKILL after `grace` (the shim does both and answers at the exit); SIGKILL when
/// the stop itself fails.
pub(super) async fn stop_container(sock: PathBuf, grace: Duration) {
    use hako_shim::protocol::Request;
    let grace_ms = u64::try_from(grace.as_millis()).unwrap_or(u64::MAX);
    // The shim answers at the exit, at the latest right after its SIGKILL at `grace`; a shim
    // that does not answer by then is not waited for longer.
    let stop = Request::Stop { grace_ms };
    match tokio::time::timeout(grace + SHIM_ANSWER, shim_request(&sock, &stop)).await {
        Ok(Ok(_)) => {}
        _ => {
            let kill = Request::Kill { signal: 9 };
            let _ = tokio::time::timeout(SHIM_ANSWER, shim_request(&sock, &kill)).await;
        }
    }
}

/// How long a shim may take to answer beyond what the request itself waits for.
pub(super) const SHIM_ANSWER: Duration = Duration::from_secs(10);

impl Worker {
    pub(super) fn read_message(&mut self, id: &str) {
        let policy = self
            .container_spec(&self.insts[id].meta.name.clone())
            .and_then(|c| c.termination_message_policy);
        if let Some(i) = self.insts.get_mut(id) {
            if i.message_read {
                return;
            }
            let failed = i.state.as_ref().and_then(|s| s.exit_code).unwrap_or(0) != 0;
            i.message = runtime::termination_message(&i.meta, policy.as_deref(), failed);
            i.message_read = true;
        }
    }

    pub(super) fn watch(&mut self, id: &str) {
        let Some(i) = self.insts.get_mut(id) else {
            return;
        };
        if i.watching {
            return;
        }
        i.watching = true;
        let sock = self.cfg.shim.dir(id).join(hako_shim::state::SOCKET);
        let tx = self.exit_tx.clone();
        let id = id.to_string();
        tokio::spawn(async move {
            wait_exit(sock).await;
            let _ = tx.send(id);
        });
    }

    pub(super) async fn refresh(&mut self, id: &str) {
        let shim = self.cfg.shim.clone();
        let cid = id.to_string();
        let st = blocking(move || runtime::shim_state(&shim, &cid))
            .await
            .flatten();
        let exited = st
            .as_ref()
            .is_some_and(|s| s.status == hako_shim::state::Status::Stopped);
        if let Some(i) = self.insts.get_mut(id) {
            i.state = st;
            i.watching = i.watching && !exited;
        }
        if exited {
            self.read_message(id);
            self.probes.remove(id);
        }
        self.dirty = true;
    }

    pub(super) fn any_running(&self) -> bool {
        self.insts.values().any(|i| {
            i.state
                .as_ref()
                .is_some_and(|s| s.status != hako_shim::state::Status::Stopped)
        })
    }

    pub(super) fn latest_running(&self, name: &str) -> Option<String> {
        self.observed()
            .latest(name)
            .filter(|c| c.state == RuntimeState::Running || c.state == RuntimeState::Created)
            .map(|c| c.id.clone())
    }

    /// A container whose shim is gone: SIGKILL what its record names, remove its state, and
    /// keep it as exited (137) so restart policy and back-off apply.
    pub(super) async fn kill_unknown(&mut self, id: &str) {
        let shim = self.cfg.shim.clone();
        let cid = id.to_string();
        let rec = blocking(move || {
            let r = shim.client(&cid).recorded_state().ok();
            if let Err(e) = shim.force_delete(&cid) {
                tracing::warn!(container = %cid, "removing container without shim: {e}");
            }
            r
        })
        .await
        .flatten();
        if let (Some(i), Some(mut st)) = (self.insts.get_mut(id), rec) {
            st.status = hako_shim::state::Status::Stopped;
            st.exit_code = Some(137);
            st.reason = Some("Error".into());
            st.finished_at =
                Some(Utc::now().to_rfc3339_opts(k8s_openapi::chrono::SecondsFormat::Nanos, true));
            i.state = Some(st);
            i.message_read = true;
            i.watching = false;
        }
        self.probes.remove(id);
        self.dirty = true;
    }

    /// Stops every container (in termination order) and tears the sandbox down; true when the
    /// sandbox is gone.
    pub(super) async fn kill_pod(&mut self) -> bool {
        let spec = self.pod.spec.clone().unwrap_or_default();
        let obs = self.observed();
        let grace = self.grace();
        let deadline = tokio::time::Instant::now() + grace;
        for wave in termination_order(&spec, &obs) {
            let ids: Vec<String> = wave
                .iter()
                .filter_map(|n| obs.latest(n).map(|c| c.id.clone()))
                .collect();
            for n in &wave {
                self.event("Normal", "Killing", &format!("Stopping container {n}"));
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            self.stop_many(ids, left).await;
        }
        // Created-but-never-started instances.
        let created: Vec<String> = self
            .insts
            .iter()
            .filter(|(_, i)| {
                i.state
                    .as_ref()
                    .is_some_and(|s| s.status == hako_shim::state::Status::Created)
            })
            .map(|(id, _)| id.clone())
            .collect();
        if !created.is_empty() {
            self.stop_many(created, Duration::ZERO).await;
        }
        self.teardown_sandbox().await
    }

    /// preStop hooks, then SIGTERM and SIGKILL when `grace` (counting preStop) runs out; the
    /// containers in `ids` are stopped in parallel.
    pub(super) async fn stop_many(&mut self, ids: Vec<String>, grace: Duration) {
        let mut set = tokio::task::JoinSet::new();
        let pod_ip = self
            .sandbox
            .as_ref()
            .and_then(|s| s.ips.first().cloned())
            .unwrap_or_default();
        for id in &ids {
            let Some(i) = self.insts.get(id) else {
                continue;
            };
            let c = self.container_spec(&i.meta.name);
            let pre_sleep =
                crate::source::manifest::lifecycle_sleep(&self.pod, &i.meta.name, "preStop");
            let pre = c
                .as_ref()
                .and_then(|c| c.lifecycle.as_ref())
                .and_then(|l| l.pre_stop.clone())
                .filter(|_| pre_sleep.is_none())
                .map(|h| c.as_ref().map(|c| hook_action(&h, c)));
            let shim = self.cfg.shim.clone();
            let id = id.clone();
            let name = i.meta.name.clone();
            let pod_ip = pod_ip.clone();
            let running = i
                .state
                .as_ref()
                .is_some_and(|s| s.status == hako_shim::state::Status::Running);
            set.spawn(async move {
                let start = tokio::time::Instant::now();
                let mut hook_err = None;
                if let (Some(secs), true) = (pre_sleep, running) {
                    // The sleep handler, cut short by the grace period.
                    let want = Duration::from_secs(secs);
                    tokio::time::sleep(want.min(grace)).await;
                    if want > grace {
                        hook_err = Some(format!(
                            "container terminated before the sleep hook finished ({secs}s > grace period {grace:?})"
                        ));
                    }
                }
                if let (Some(Some(action)), true) = (pre, running) {
                    match action {
                        Ok(action) => {
                            let shim2 = shim.clone();
                            let id2 = id.clone();
                            let r = tokio::time::timeout(
                                grace,
                                tokio::task::spawn_blocking(move || {
                                    RealProber { shim: shim2 }.run(
                                        &ProbeTarget {
                                            pod_ip,
                                            container_id: id2,
                                        },
                                        &action,
                                        k8s_openapi::chrono::Duration::from_std(grace)
                                            .unwrap_or_default(),
                                    )
                                }),
                            )
                            .await;
                            match r {
                                Ok(Ok(ProbeOutcome::Success)) => {}
                                Ok(Ok(ProbeOutcome::Failure(e))) => hook_err = Some(e),
                                Ok(Err(e)) => hook_err = Some(e.to_string()),
                                Err(_) => {
                                    hook_err =
                                        Some(format!("PreStopHook timed out after {grace:?}"))
                                }
                            }
                        }
                        Err(e) => hook_err = Some(e),
                    }
                }
                // kubelet: at least 2 s after preStop.
                let mut left = grace.saturating_sub(start.elapsed());
                if grace > Duration::ZERO
                    && left < Duration::from_secs(2)
                    && start.elapsed() > Duration::ZERO
                    && hook_err.is_none()
                    && grace >= Duration::from_secs(2)
                {
                    left = left.max(Duration::from_secs(2).min(grace));
                }
                stop_container(shim.dir(&id).join(hako_shim::state::SOCKET), left).await;
                (id, name, hook_err)
            });
        }
        while let Some(r) = set.join_next().await {
            if let Ok((id, name, err)) = r {
                if let Some(e) = err {
                    self.event(
                        "Warning",
                        "FailedPreStopHook",
                        &format!("PreStopHook failed for container {name}: {e}"),
                    );
                }
                self.refresh(&id).await;
            }
        }
    }

    pub(super) fn resolve_env(
        &self,
        c: &Container,
    ) -> Result<Vec<(String, String)>, env::EnvError> {
        let ns = self.ns_name().0;
        let guard = self.objects.read();
        let empty = Objects::default();
        let o = guard.as_deref().unwrap_or(&empty);
        let ctx = env::EnvContext {
            config_maps: o
                .config_maps
                .iter()
                .filter(|(k, _)| k.0 == ns)
                .map(|(k, v)| (k.1.clone(), v))
                .collect(),
            secrets: o
                .secrets
                .iter()
                .filter(|(k, _)| k.0 == ns)
                .map(|(k, v)| (k.1.clone(), v))
                .collect(),
            pod_ips: self
                .sandbox
                .as_ref()
                .map(|s| s.ips.clone())
                .unwrap_or_default(),
            host_ips: self.cfg.host_ip.iter().cloned().collect(),
            node_allocatable: BTreeMap::from([
                ("memory".to_string(), self.cfg.memory_capacity.to_string()),
                (
                    "cpu".to_string(),
                    std::thread::available_parallelism()
                        .map(|n| n.get())
                        .unwrap_or(1)
                        .to_string(),
                ),
            ]),
        };
        let mut pod = self.pod.clone();
        let obs = self.observed();
        pod.status = Some(status::compute_status(&self.pod, &obs, None, Utc::now()));
        env::resolve_env(&pod, c, &ctx)
    }

    pub(super) fn config_error(&mut self, name: &str, msg: String) {
        self.metrics.sync_error("CreateContainerConfigError");
        self.event("Warning", "Failed", &format!("Error: {msg}"));
        self.start_failures.insert(
            name.to_string(),
            StartFailure {
                reason: "CreateContainerConfigError".into(),
                message: msg,
            },
        );
    }

    /// Pull, create, start, postStart; true when the container runs.
    pub(super) async fn start_container(&mut self, name: &str) -> bool {
        let Some(c) = self.container_spec(name) else {
            return false;
        };
        let Some(sb) = self.sandbox.as_ref().filter(|s| s.ready) else {
            return false;
        };
        let sb_paths = sb.paths.clone();
        let pod_ip = sb.ips.first().cloned().unwrap_or_default();
        let now = Utc::now();
        let obs = self.observed();
        let prev = obs.latest(name).cloned();
        let key = backoff::key(&self.uid, name);
        if let Some(p) = prev.as_ref().filter(|p| p.state == RuntimeState::Exited) {
            if let Some(fin) = p.finished_at {
                if self.restart_backoff.in_backoff_since(&key, fin, now) {
                    return false;
                }
            }
        }
        let t = std::time::Instant::now();
        let Some(image) = self.pull(&c).await else {
            return false;
        };
        self.phase("image", t.elapsed());
        let t_spec = std::time::Instant::now();
        let vars = match self.resolve_env(&c) {
            Ok(v) => v,
            Err(e) => {
                self.config_error(name, e.to_string());
                return false;
            }
        };
        let attempt = prev.as_ref().map(|p| p.attempt + 1).unwrap_or(0);
        let id = runtime::container_id(&self.uid, name, attempt);
        let (ns, pod_name) = self.ns_name();
        let log_path = self
            .cfg
            .pod_log_dir
            .join(format!("{ns}_{pod_name}_{}", self.uid))
            .join(name)
            .join(format!("{attempt}.log"));
        let pod_dir = self.pod_dir();
        let term_dir = pod_dir.join("termination").join(&id);
        let _ = std::fs::create_dir_all(&term_dir);
        let term_log = term_dir.join("termination-log");
        let _ = std::fs::write(&term_log, b"");
        let term_path = c
            .termination_message_path
            .clone()
            .unwrap_or_else(|| "/dev/termination-log".into());
        let mut mounts = vec![
            runtime::bind(&pod_dir.join("etc-hosts"), "/etc/hosts", false),
            runtime::bind(&pod_dir.join("resolv.conf"), "/etc/resolv.conf", false),
            runtime::bind(&pod_dir.join("hostname"), "/etc/hostname", false),
        ];
        mounts.push(runtime::bind(&term_log, &term_path, false));
        if let Some(vols) = &self.volumes {
            match crate::sys::volumes::mounts_for_container(vols, &c) {
                Ok(ms) => mounts.extend(ms.into_iter().map(|m| hako_shim::spec::Mount {
                    options: m.oci_options(),
                    destination: m.destination,
                    source: m.source.display().to_string(),
                    kind: None,
                })),
                Err(e) => {
                    self.config_error(name, e.to_string());
                    return false;
                }
            }
        }
        let spec = self.pod.spec.clone().unwrap_or_default();
        let wanted = qos::container_oom_score_adj(&spec, &c, self.cfg.memory_capacity);
        let layers = self.cfg.images.layer_dirs(&image);
        let command = env::expand_command(c.command.as_deref().unwrap_or(&[]), &vars);
        let args = env::expand_command(c.args.as_deref().unwrap_or(&[]), &vars);
        let cs = runtime::build_spec(
            &self.pod,
            &c,
            runtime::SpecInputs {
                id: &id,
                env: &vars,
                command,
                args,
                image: &image,
                layers,
                sandbox: &sb_paths,
                mounts,
                oom_score_adj: wanted,
                cgroup_root: self.cfg.cgroup_root.clone(),
                cgroup_parent: &self.cfg.cgroup_parent,
                log_path: log_path.clone(),
                log_max_size: self.cfg.container_log_max_size,
                log_max_files: self.cfg.container_log_max_files,
                seccomp_profile_root: &self.cfg.seccomp_profile_root,
            },
        );
        let cs = match cs {
            Ok(s) => s,
            Err(e) => {
                self.config_error(name, e);
                return false;
            }
        };
        let meta = ContainerMeta {
            id: id.clone(),
            pod_uid: self.uid.clone(),
            name: name.to_string(),
            attempt,
            spec_hash: actions::container_hash(&c),
            image: c.image.clone().unwrap_or_default(),
            image_id: image.id.clone(),
            termination_log: term_log,
            log_path,
        };
        if let Some(p) = prev.as_ref().filter(|p| p.state == RuntimeState::Exited) {
            if let Some(fin) = p.finished_at {
                self.restart_backoff.next(&key, fin, now);
                self.save_backoff();
            }
        }
        let shim = self.cfg.shim.clone();
        let root = self.cfg.root_dir.clone();
        let m2 = meta.clone();
        self.phase("spec", t_spec.elapsed());
        let spawned = std::time::Instant::now();
        let (created, phases) = blocking(move || {
            let mut phases = Phases::default();
            phases.add("blocking_queue", spawned.elapsed());
            let r = (|| -> Result<hako_shim::state::State, String> {
                runtime::write_meta(&root, &m2).map_err(|e| e.to_string())?;
                let _ = shim.force_delete(&m2.id);
                let t = std::time::Instant::now();
                let cl = shim.create(&cs).map_err(|e| e.to_string())?;
                phases.add("shim_create", t.elapsed());
                let t = std::time::Instant::now();
                let st = cl.start().map_err(|e| e.to_string())?;
                phases.add("shim_start", t.elapsed());
                Ok(st)
            })();
            (r, phases)
        })
        .await
        .unwrap_or_else(|| (Err("create task failed".into()), Phases::default()));
        self.phases(&phases);
        match created {
            Ok(st) => {
                self.start_failures.remove(name);
                let is_init = self
                    .pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.init_containers.as_ref())
                    .is_some_and(|ic| ic.iter().any(|c| c.name == name));
                self.metrics.container_started_as(
                    if is_init {
                        "init_container"
                    } else {
                        "container"
                    },
                    attempt > 0,
                );
                if st.oom_score_adj_clamped && !self.clamp_logged {
                    self.clamp_logged = true;
                    self.event(
                        "Normal",
                        "OOMScoreAdjClamped",
                        &format!(
                            "oom_score_adj {wanted} for container {name} raised to {} (no CAP_SYS_RESOURCE; the parent's value is the lowest allowed)",
                            st.oom_score_adj.unwrap_or_default()
                        ),
                    );
                }
                self.event("Normal", "Created", &format!("Created container {name}"));
                self.event("Normal", "Started", &format!("Started container {name}"));
                let started = st
                    .started_at
                    .as_deref()
                    .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
                    .map(|t| t.with_timezone(&Utc))
                    .unwrap_or_else(Utc::now);
                self.insts.insert(
                    id.clone(),
                    Inst {
                        meta,
                        state: Some(st),
                        message: String::new(),
                        message_read: false,
                        watching: false,
                    },
                );
                self.watch(&id);
                self.gc_instances(name).await;
                // postStart: the container is not Running until it returns.
                let post_sleep =
                    crate::source::manifest::lifecycle_sleep(&self.pod, name, "postStart");
                let post = c.lifecycle.as_ref().and_then(|l| l.post_start.clone());
                // A deletion of the pod does not wait for the hook: the container is stopped
                // next, and the hook's process with it.
                if let Some(secs) = post_sleep {
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_secs(secs)) => {}
                        () = self.deleted() => return true,
                    }
                } else if let Some(h) = post {
                    let r = match hook_action(&h, &c) {
                        Ok(action) => {
                            let shim = self.cfg.shim.clone();
                            let target = ProbeTarget {
                                pod_ip,
                                container_id: id.clone(),
                            };
                            let hook = blocking(move || {
                                RealProber { shim }.run(
                                    &target,
                                    &action,
                                    k8s_openapi::chrono::Duration::seconds(30),
                                )
                            });
                            tokio::select! {
                                r = hook => r.unwrap_or(ProbeOutcome::Failure("hook task failed".into())),
                                () = self.deleted() => {
                                    tracing::info!(uid = %self.uid, container = %name, "pod deleted during postStart: not waiting for the hook");
                                    return true;
                                }
                            }
                        }
                        Err(e) => ProbeOutcome::Failure(e),
                    };
                    if let ProbeOutcome::Failure(e) = r {
                        self.event(
                            "Warning",
                            "FailedPostStartHook",
                            &format!("PostStartHook failed: {e}"),
                        );
                        self.event(
                            "Normal",
                            "Killing",
                            &format!("FailedPostStartHook: stopping container {name}"),
                        );
                        self.stop_many(vec![id.clone()], self.grace()).await;
                        return true;
                    }
                }
                self.setup_probes(&id, started);
                true
            }
            Err(e) => {
                self.metrics.shim_error();
                self.metrics.sync_error("CreateContainerError");
                runtime::remove_meta(&self.cfg.root_dir, &self.uid, &id);
                self.event("Warning", "Failed", &format!("Error: {e}"));
                self.start_failures.insert(
                    name.to_string(),
                    StartFailure {
                        reason: "CreateContainerError".into(),
                        message: e,
                    },
                );
                false
            }
        }
    }

    /// Keeps the two newest instances of a container (current and previous, for lastState
    /// and `logs --previous`); older exited ones are deleted.
    pub(super) async fn gc_instances(&mut self, name: &str) {
        let mut of: Vec<(u32, String)> = self
            .insts
            .values()
            .filter(|i| i.meta.name == name)
            .map(|i| (i.meta.attempt, i.meta.id.clone()))
            .collect();
        of.sort();
        while of.len() > 2 {
            let (_, id) = of.remove(0);
            self.insts.remove(&id);
            self.probes.remove(&id);
            runtime::remove_meta(&self.cfg.root_dir, &self.uid, &id);
            let shim = self.cfg.shim.clone();
            let term = self.pod_dir().join("termination").join(&id);
            blocking(move || {
                let _ = shim.force_delete(&id);
                let _ = std::fs::remove_dir_all(term);
            })
            .await;
        }
    }
}

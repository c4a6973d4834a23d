//! Containers: start (env, mounts and OCI spec building, runtime create/start, postStart),
//! stop (preStop, then the runtime's SIGTERM and SIGKILL at the grace period), kill of unknown
//! instances, exit watches and the GC of old instances — all through the worker's effects.

use super::effects::RuntimeError;
use super::hooks::{self, hook_action};
use super::{blocking, Inst, Objects, Phases, Worker};
use crate::model::actions::{self, termination_order};
use crate::model::observed::{RuntimeState, StartFailure};
use crate::model::probe::ProbeTarget;
use crate::model::{backoff, env, qos, status};
use crate::sys::runtime::{self, ContainerMeta};
use k8s_openapi::api::core::v1::Container;
use k8s_openapi::chrono::{DateTime, Utc};
use std::time::Duration;

/// Why a container could not be created and started, naming it.
#[derive(Debug, thiserror::Error)]
pub(super) enum StartError {
    /// Its metadata (for re-adoption) could not be written.
    #[error(transparent)]
    Meta(std::io::Error),
    /// The runtime failed to create or start it.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// The blocking task ended without an answer.
    #[error("create task failed")]
    Task,
}

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
        let exited = self.fx.runtime.wait_exit(id);
        let tx = self.exit_tx.clone();
        let id = id.to_string();
        tokio::spawn(async move {
            exited.await;
            let _ = tx.send(id);
        });
    }

    pub(super) async fn refresh(&mut self, id: &str) {
        let rt = self.fx.runtime.clone();
        let cid = id.to_string();
        let st = blocking(move || rt.state(&cid)).await.flatten();
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
        let rt = self.fx.runtime.clone();
        let cid = id.to_string();
        let rec = blocking(move || {
            let r = rt.recorded_state(&cid);
            if let Err(e) = rt.force_delete(&cid) {
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
            st.finished_at = Some(
                self.fx
                    .clock
                    .now()
                    .to_rfc3339_opts(k8s_openapi::chrono::SecondsFormat::Nanos, true),
            );
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
        let mut waves = termination_order(&spec, &obs);
        // Running ephemeral containers stop with the regular containers.
        let ephemeral: Vec<String> = super::ephemeral_containers(&self.pod)
            .into_iter()
            .map(|(c, _)| c.name)
            .filter(|n| {
                obs.latest(n)
                    .is_some_and(|c| c.state == RuntimeState::Running)
            })
            .collect();
        if !ephemeral.is_empty() {
            match waves.first_mut() {
                Some(first) if spec.containers.iter().any(|c| first.contains(&c.name)) => {
                    first.extend(ephemeral)
                }
                _ => waves.insert(0, ephemeral),
            }
        }
        for wave in waves {
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
                .and_then(|h| c.as_ref().map(|c| hook_action(&h, c)));
            let rt = self.fx.runtime.clone();
            let prober = self.fx.prober.clone();
            let id = id.clone();
            let name = i.meta.name.clone();
            let target = ProbeTarget {
                pod_ip: pod_ip.clone(),
                container_id: id.clone(),
            };
            let running = i
                .state
                .as_ref()
                .is_some_and(|s| s.status == hako_shim::state::Status::Running);
            set.spawn(async move {
                let start = tokio::time::Instant::now();
                let hook_err = if running {
                    hooks::pre_stop(prober, pre_sleep, pre, target, grace).await
                } else {
                    None
                };
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
                rt.stop(&id, left).await;
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
            node_allocatable: self.node_allocatable(),
            services: Some(&o.services),
        };
        let mut pod = self.pod.clone();
        let obs = self.observed();
        pod.status = Some(status::compute_status(
            &self.pod,
            &obs,
            None,
            self.fx.clock.now(),
        ));
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
        let now = self.fx.clock.now();
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
        // Writable by any user the container runs as (the kubelet makes it 0666 too).
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&term_log, std::fs::Permissions::from_mode(0o666));
        }
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
            match crate::sys::volumes::expand_sub_path_exprs(&c, &vars)
                .and_then(|c| self.fx.volumes.mounts_for_container(vols, &c))
            {
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
        // The pod cgroup with the pod's limits, before the container's cgroup below it.
        let pod_cg = runtime::pod_cgroup(&self.cfg.cgroup_parent, &spec, &self.uid);
        if let Err(e) =
            crate::sys::pod_cgroup::ensure(self.cfg.cgroup_root.as_deref(), &pod_cg, &spec)
        {
            tracing::warn!(uid = %self.uid, "pod cgroup {pod_cg}: {e}");
        }
        let wanted = qos::container_oom_score_adj(&spec, &c, self.cfg.memory_capacity);
        let layers = self.fx.runtime.layer_dirs(&image);
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
        let mut cs = match cs {
            Ok(s) => s,
            Err(e) => {
                self.config_error(name, e.to_string());
                return false;
            }
        };
        // Host and shared PID namespaces (the kubelet's namespacesForPod): hostPID joins the
        // node's (the shim's own), shareProcessNamespace the one of a running container of the
        // pod; the first container started gets a new one and is its PID 1.
        let pod_spec = self.pod.spec.as_ref();
        if pod_spec.and_then(|s| s.host_pid).unwrap_or(false) {
            cs.namespaces.pid = Some(std::path::PathBuf::from("/proc/self/ns/pid"));
        } else if pod_spec
            .and_then(|s| s.share_process_namespace)
            .unwrap_or(false)
        {
            cs.namespaces.pid = self.shared_pid_namespace(name);
        }
        if let Some(Some(target)) = self.ephemeral_target(name) {
            // The target container's pid namespace (`kubectl debug --target`).
            match self.pid_namespace_of(&target) {
                Some(ns) => cs.namespaces.pid = Some(ns),
                None => {
                    self.config_error(name, format!("target container {target:?} is not running"));
                    return false;
                }
            }
        }
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
        let rt = self.fx.runtime.clone();
        let root = self.cfg.root_dir.clone();
        let m2 = meta.clone();
        self.phase("spec", t_spec.elapsed());
        let spawned = std::time::Instant::now();
        let (created, phases) = blocking(move || {
            let mut phases = Phases::default();
            phases.add("blocking_queue", spawned.elapsed());
            let r = (|| -> Result<hako_shim::state::State, StartError> {
                runtime::write_meta(&root, &m2).map_err(StartError::Meta)?;
                let _ = rt.force_delete(&m2.id);
                let t = std::time::Instant::now();
                rt.create(&cs)?;
                phases.add("shim_create", t.elapsed());
                let t = std::time::Instant::now();
                let st = rt.start(&m2.id)?;
                phases.add("shim_start", t.elapsed());
                Ok(st)
            })();
            (r, phases)
        })
        .await
        .unwrap_or_else(|| (Err(StartError::Task), Phases::default()));
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
                let kind = if is_init {
                    "init_container"
                } else if self.ephemeral_target(name).is_some() {
                    "ephemeral_container"
                } else {
                    "container"
                };
                self.metrics.container_started_as(kind, attempt > 0);
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
                    .unwrap_or_else(|| self.fx.clock.now());
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
                if !self.post_start(&c, &id, pod_ip).await {
                    return true;
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
                        message: e.to_string(),
                    },
                );
                false
            }
        }
    }

    /// The PID namespace a `shareProcessNamespace` pod's container `name` joins: the one of
    /// the first running container of the pod (init containers, then containers, then
    /// ephemeral ones, in spec order); none when no other container runs.
    fn shared_pid_namespace(&self, name: &str) -> Option<std::path::PathBuf> {
        let spec = self.pod.spec.as_ref()?;
        let names = spec
            .init_containers
            .iter()
            .flatten()
            .chain(spec.containers.iter())
            .map(|c| c.name.clone())
            .chain(
                spec.ephemeral_containers
                    .iter()
                    .flatten()
                    .map(|c| c.name.clone()),
            );
        names
            .filter(|n| n != name)
            .find_map(|n| self.pid_namespace_of(&n))
    }

    /// `/proc/<pid>/ns/pid` of the running instance of container `name`, checked against the
    /// start time the shim recorded (a recycled pid is not that container).
    fn pid_namespace_of(&self, name: &str) -> Option<std::path::PathBuf> {
        let id = self.latest_running(name)?;
        let st = self.insts.get(&id)?.state.as_ref()?;
        if st.status != hako_shim::state::Status::Running || st.pid <= 0 {
            return None;
        }
        let now = hako_shim::pidfd::start_time(st.pid).ok()?;
        if st.pid_start_time.is_some_and(|t| t != now) {
            return None;
        }
        Some(std::path::PathBuf::from(format!("/proc/{}/ns/pid", st.pid)))
    }

    /// Dead-container GC of one container ([`crate::sys::container_gc`]): exited instances
    /// beyond `--maximum-dead-containers-per-container` go, oldest first, with their shim
    /// state (rootfs, writable layer), log files and termination-log file; the current
    /// instance and the previous one (lastState, `logs --previous`) always stay.
    pub(super) async fn gc_instances(&mut self, name: &str) {
        use crate::sys::container_gc;
        let of: Vec<container_gc::Instance> = self
            .insts
            .values()
            .filter(|i| i.meta.name == name)
            .map(|i| container_gc::Instance {
                id: i.meta.id.clone(),
                pod_uid: i.meta.pod_uid.clone(),
                name: i.meta.name.clone(),
                attempt: i.meta.attempt,
                created_at: i
                    .state
                    .as_ref()
                    .and_then(|s| DateTime::parse_from_rfc3339(&s.created_at).ok())
                    .map(|t| t.with_timezone(&Utc)),
                live: i
                    .state
                    .as_ref()
                    .is_none_or(|s| s.status == hako_shim::state::Status::Running),
            })
            .collect();
        let remove = container_gc::select(&of, &self.cfg.container_gc, self.fx.clock.now());
        for id in remove {
            let Some(inst) = self.insts.remove(&id) else {
                continue;
            };
            tracing::debug!(container = %id, "removing dead container");
            self.probes.remove(&id);
            runtime::remove_meta(&self.cfg.root_dir, &self.uid, &id);
            let rt = self.fx.runtime.clone();
            let term = self.pod_dir().join("termination").join(&id);
            blocking(move || {
                let _ = rt.force_delete(&id);
                let _ = std::fs::remove_dir_all(term);
                container_gc::remove_instance_files(
                    &inst.meta.log_path,
                    &inst.meta.termination_log,
                );
            })
            .await;
        }
    }
}

//! Recording fakes of the worker's effects (tests only): an in-memory runtime whose
//! containers run and exit with codes on command, a network whose ADD can fail, volumes that
//! can fail, a prober answering by command, a manual clock and a sink that keeps every
//! published record. Each records the calls it got, in order, as short strings.

use super::effects::{
    BoxFuture, Clock, Effects, NetworkError, PodNetwork, Prober, Runtime, RuntimeError, StatusSink,
    Volumes,
};
use crate::model::probe::{ProbeAction, ProbeOutcome, ProbeTarget};
use crate::model::record::PodRecord;
use crate::sys::cni::Attachment;
use crate::sys::sandbox::{SandboxOwner, SandboxPaths};
use crate::sys::volumes::{MountSpec, PodContext, PodVolumes, VolumeError};
use hako_shim::image::{Image, PullPolicy};
use hako_shim::spec::ContainerSpec;
use hako_shim::state::{State, Status};
use k8s_openapi::api::core::v1::Container;
use k8s_openapi::chrono::{DateTime, Duration as ChronoDuration, SecondsFormat, Utc};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A call log shared by the fakes, so a test sees the order across effects.
pub(super) type Calls = Arc<Mutex<Vec<String>>>;

fn log(calls: &Calls, s: String) {
    calls.lock().unwrap().push(s);
}

/// A clock that moves only when told.
pub(super) struct ManualClock(Mutex<DateTime<Utc>>);

impl ManualClock {
    pub(super) fn new() -> Arc<Self> {
        let t0 = DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        Arc::new(Self(Mutex::new(t0)))
    }

    pub(super) fn advance(&self, secs: i64) {
        *self.0.lock().unwrap() += ChronoDuration::seconds(secs);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.0.lock().unwrap()
    }
}

#[derive(Default)]
struct RtState {
    images: BTreeMap<String, Image>,
    failing_pulls: BTreeSet<String>,
    slow_pulls: BTreeSet<String>,
    failing_creates: BTreeSet<String>,
    containers: BTreeMap<String, State>,
}

/// An in-memory container runtime.
pub(super) struct FakeRuntime {
    calls: Calls,
    clock: Arc<ManualClock>,
    st: Arc<Mutex<RtState>>,
    exits: tokio::sync::watch::Sender<u64>,
}

fn image(reference: &str) -> Image {
    Image {
        reference: reference.to_string(),
        digest: format!("sha256:{reference}"),
        id: format!("sha256:id-{reference}"),
        config: hako_shim::image::ImageConfig {
            cmd: vec!["sh".into()],
            ..Default::default()
        },
        layers: Vec::new(),
        layer_sizes: Vec::new(),
        pulled_at: 0,
        last_used: 0,
    }
}

impl FakeRuntime {
    /// A pull of `reference` fails.
    pub(super) fn fail_pull(&self, reference: &str) {
        self.st
            .lock()
            .unwrap()
            .failing_pulls
            .insert(reference.into());
    }
    /// Pulls of `reference` succeed again.
    pub(super) fn heal_pull(&self, reference: &str) {
        self.st.lock().unwrap().failing_pulls.remove(reference);
    }
    /// A pull of `reference` takes a while (the pod's deletion overtakes it).
    pub(super) fn slow_pull(&self, reference: &str) {
        self.st.lock().unwrap().slow_pulls.insert(reference.into());
    }
    /// Creating the container `id` fails.
    pub(super) fn fail_create(&self, id: &str) {
        self.st.lock().unwrap().failing_creates.insert(id.into());
    }
    /// The ids of the containers the runtime holds, sorted.
    pub(super) fn ids(&self) -> Vec<String> {
        let mut v: Vec<String> = self.st.lock().unwrap().containers.keys().cloned().collect();
        v.sort();
        v
    }
    /// Puts a container `id` in the runtime as a previous agent left it, in `status`
    /// (`Running`: it outlived the agent; `Created`: never started).
    pub(super) fn insert_as(&self, id: &str, status: Status) {
        let now = self.now();
        let started = (status != Status::Created).then(|| now.clone());
        let st = State {
            id: id.into(),
            status,
            shim_pid: 1,
            pid: 2,
            pid_start_time: None,
            shim_start_time: None,
            exit_code: None,
            reason: None,
            created_at: now,
            started_at: started,
            finished_at: None,
            oom_score_adj: None,
            oom_score_adj_clamped: false,
            cgroup_dirs: Vec::new(),
        };
        self.st.lock().unwrap().containers.insert(id.into(), st);
    }
    /// The container `id` exits with `code`.
    pub(super) fn exit(&self, id: &str, code: i32) {
        let now = self.now();
        let mut s = self.st.lock().unwrap();
        let c = s.containers.get_mut(id).expect("no such container");
        c.status = Status::Stopped;
        c.exit_code = Some(code);
        c.reason = Some(if code == 0 { "Completed" } else { "Error" }.into());
        c.finished_at = Some(now);
        drop(s);
        self.exits.send_modify(|n| *n += 1);
    }
    /// The container's status, if the runtime has it.
    pub(super) fn status(&self, id: &str) -> Option<Status> {
        self.st.lock().unwrap().containers.get(id).map(|c| c.status)
    }
    fn now(&self) -> String {
        self.clock.now().to_rfc3339_opts(SecondsFormat::Nanos, true)
    }
}

impl Runtime for FakeRuntime {
    fn image(&self, reference: &str) -> Option<Image> {
        self.st.lock().unwrap().images.get(reference).cloned()
    }

    fn ensure_image(
        &self,
        reference: String,
        policy: PullPolicy,
        _docker_config: Option<String>,
    ) -> BoxFuture<Result<Image, RuntimeError>> {
        log(&self.calls, format!("pull {reference}"));
        let st = self.st.clone();
        Box::pin(async move {
            let slow = st.lock().unwrap().slow_pulls.contains(&reference);
            if slow {
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            let mut s = st.lock().unwrap();
            if policy != PullPolicy::Always {
                if let Some(i) = s.images.get(&reference) {
                    return Ok(i.clone());
                }
            }
            if s.failing_pulls.contains(&reference) || policy == PullPolicy::Never {
                return Err(RuntimeError::Refused {
                    object: reference,
                    reason: "manifest unknown".into(),
                });
            }
            let i = image(&reference);
            s.images.insert(reference, i.clone());
            Ok(i)
        })
    }

    fn layer_dirs(&self, _image: &Image) -> Vec<PathBuf> {
        Vec::new()
    }

    fn create(&self, spec: &ContainerSpec) -> Result<(), RuntimeError> {
        log(&self.calls, format!("create {}", spec.id));
        let now = self.now();
        let mut s = self.st.lock().unwrap();
        if s.failing_creates.contains(&spec.id) {
            return Err(RuntimeError::Refused {
                object: spec.id.clone(),
                reason: "shim create failed".into(),
            });
        }
        let st = State {
            id: spec.id.clone(),
            status: Status::Created,
            shim_pid: 1,
            pid: 2,
            pid_start_time: None,
            shim_start_time: None,
            exit_code: None,
            reason: None,
            created_at: now,
            started_at: None,
            finished_at: None,
            oom_score_adj: None,
            oom_score_adj_clamped: false,
            cgroup_dirs: Vec::new(),
        };
        s.containers.insert(spec.id.clone(), st);
        Ok(())
    }

    fn start(&self, id: &str) -> Result<State, RuntimeError> {
        log(&self.calls, format!("start {id}"));
        let now = self.now();
        let mut s = self.st.lock().unwrap();
        let c = s
            .containers
            .get_mut(id)
            .ok_or_else(|| RuntimeError::Refused {
                object: id.into(),
                reason: "no such container".into(),
            })?;
        c.status = Status::Running;
        c.started_at = Some(now);
        Ok(c.clone())
    }

    fn state(&self, id: &str) -> Option<State> {
        self.st.lock().unwrap().containers.get(id).cloned()
    }

    fn recorded_state(&self, id: &str) -> Option<State> {
        self.state(id)
    }

    fn force_delete(&self, id: &str) -> Result<(), RuntimeError> {
        if self.st.lock().unwrap().containers.remove(id).is_some() {
            log(&self.calls, format!("delete {id}"));
        }
        Ok(())
    }

    fn wait_exit(&self, id: &str) -> BoxFuture<()> {
        let st = self.st.clone();
        let mut rx = self.exits.subscribe();
        let id = id.to_string();
        Box::pin(async move {
            loop {
                let done = st
                    .lock()
                    .unwrap()
                    .containers
                    .get(&id)
                    .is_none_or(|c| c.status == Status::Stopped);
                if done || rx.changed().await.is_err() {
                    return;
                }
            }
        })
    }

    fn stop(&self, id: &str, grace: Duration) -> BoxFuture<()> {
        log(
            &self.calls,
            format!("stop {id} {:.0}s", grace.as_secs_f64()),
        );
        let running = self
            .st
            .lock()
            .unwrap()
            .containers
            .get(id)
            .is_some_and(|c| c.status != Status::Stopped);
        if running {
            self.exit(id, 137);
        }
        Box::pin(async {})
    }
}

#[derive(Default)]
struct NetState {
    sandboxes: BTreeSet<String>,
    failing_adds: u32,
    failing_dels: u32,
    failing_checks: u32,
}

/// Sandboxes in memory; CNI ADD, DEL and CHECK fail a given number of times on command.
pub(super) struct FakeNetwork {
    calls: Calls,
    st: Mutex<NetState>,
}

impl FakeNetwork {
    /// The next `n` ADDs fail.
    pub(super) fn fail_adds(&self, n: u32) {
        self.st.lock().unwrap().failing_adds = n;
    }
    /// The next `n` DELs fail.
    pub(super) fn fail_dels(&self, n: u32) {
        self.st.lock().unwrap().failing_dels = n;
    }
    /// The next `n` CHECKs fail.
    pub(super) fn fail_checks(&self, n: u32) {
        self.st.lock().unwrap().failing_checks = n;
    }
    /// Sandboxes that exist now.
    pub(super) fn sandboxes(&self) -> Vec<String> {
        self.st.lock().unwrap().sandboxes.iter().cloned().collect()
    }
}

fn refused(sandbox: &str, reason: &str) -> NetworkError {
    NetworkError::Refused {
        sandbox: sandbox.into(),
        reason: reason.into(),
    }
}

impl PodNetwork for FakeNetwork {
    fn list(&self) -> Vec<SandboxPaths> {
        Vec::new()
    }

    fn present(&self, paths: &SandboxPaths) -> bool {
        self.st.lock().unwrap().sandboxes.contains(&paths.id())
    }

    fn exists(&self, paths: &SandboxPaths) -> bool {
        self.present(paths)
    }

    fn create(
        &self,
        paths: &SandboxPaths,
        _hostname: &str,
        _host_network: bool,
        _owner: &SandboxOwner,
        sysctls: &[(String, String)],
    ) -> Result<(), NetworkError> {
        log(&self.calls, format!("sandbox {}", paths.id()));
        for (k, v) in sysctls {
            log(&self.calls, format!("sysctl {k}={v}"));
        }
        self.st.lock().unwrap().sandboxes.insert(paths.id());
        Ok(())
    }

    fn add(&self, a: &Attachment) -> Result<Vec<String>, NetworkError> {
        log(&self.calls, format!("cni add {}", a.container_id));
        let mut s = self.st.lock().unwrap();
        if s.failing_adds > 0 {
            s.failing_adds -= 1;
            return Err(refused(&a.container_id, "no IP addresses available"));
        }
        Ok(vec!["10.88.0.7".into()])
    }

    fn check(&self, a: &Attachment) -> Result<(), NetworkError> {
        log(&self.calls, format!("cni check {}", a.container_id));
        let mut s = self.st.lock().unwrap();
        if s.failing_checks > 0 {
            s.failing_checks -= 1;
            return Err(refused(&a.container_id, "eth0 is gone"));
        }
        Ok(())
    }

    fn teardown(
        &self,
        paths: &SandboxPaths,
        _a: &Attachment,
        _host_network: bool,
    ) -> Result<(), NetworkError> {
        log(&self.calls, format!("teardown {}", paths.id()));
        let mut s = self.st.lock().unwrap();
        if s.failing_dels > 0 {
            s.failing_dels -= 1;
            return Err(NetworkError::Del("plugin timed out".into()));
        }
        s.sandboxes.remove(&paths.id());
        Ok(())
    }
}

/// Volumes that are set up in memory, or fail on command.
pub(super) struct FakeVolumes {
    calls: Calls,
    fail: Mutex<bool>,
}

impl FakeVolumes {
    /// Setting volumes up fails (or succeeds again).
    pub(super) fn set_failing(&self, fail: bool) {
        *self.fail.lock().unwrap() = fail;
    }
}

impl Volumes for FakeVolumes {
    fn setup(&self, ctx: &PodContext) -> Result<PodVolumes, VolumeError> {
        log(&self.calls, "volumes setup".into());
        if *self.fail.lock().unwrap() {
            return Err(VolumeError::Mount {
                path: PathBuf::from("/fake/volumes"),
                message: "mount: permission denied".into(),
            });
        }
        Ok(PodVolumes {
            uid: ctx.pod.metadata.uid.clone().unwrap_or_default(),
            root: PathBuf::from("/fake"),
            volumes: BTreeMap::new(),
        })
    }

    fn refresh(&self, _ctx: &PodContext, _vols: &PodVolumes) -> Result<bool, VolumeError> {
        Ok(false)
    }

    fn mounts_for_container(
        &self,
        _vols: &PodVolumes,
        _c: &Container,
    ) -> Result<Vec<MountSpec>, VolumeError> {
        Ok(Vec::new())
    }

    fn teardown(&self, uid: &str) -> Result<(), VolumeError> {
        log(&self.calls, format!("volumes teardown {uid}"));
        Ok(())
    }
}

/// Answers probes and hooks by the first word of their exec command: `fail...` fails,
/// anything else succeeds. A hook (called with the word) may run on each call.
pub(super) struct FakeProber {
    calls: Calls,
    #[allow(clippy::type_complexity)]
    on_run: Mutex<Option<Arc<dyn Fn(&str) + Send + Sync>>>,
}

impl FakeProber {
    /// Runs `f` with the command's first word on each probe or hook.
    pub(super) fn on_run(&self, f: impl Fn(&str) + Send + Sync + 'static) {
        *self.on_run.lock().unwrap() = Some(Arc::new(f));
    }
}

impl Prober for FakeProber {
    fn run(
        &self,
        target: &ProbeTarget,
        action: &ProbeAction,
        _timeout: ChronoDuration,
    ) -> ProbeOutcome {
        let word = match action {
            ProbeAction::Exec { command } => command.first().cloned().unwrap_or_default(),
            other => format!("{other:?}"),
        };
        log(&self.calls, format!("run {} {word}", target.container_id));
        let f = self.on_run.lock().unwrap().clone();
        if let Some(f) = f {
            f(&word);
        }
        if word.starts_with("fail") {
            ProbeOutcome::Failure(format!("{word}: exit code 1"))
        } else {
            ProbeOutcome::Success
        }
    }
}

/// Keeps every published record and every removal.
#[derive(Default)]
pub(super) struct RecordingSink {
    pub(super) published: Mutex<Vec<PodRecord>>,
    pub(super) removed: Mutex<Vec<PodRecord>>,
}

impl StatusSink for RecordingSink {
    fn publish(&self, record: &PodRecord) {
        self.published.lock().unwrap().push(record.clone());
    }

    fn removed(&self, record: &PodRecord) {
        self.removed.lock().unwrap().push(record.clone());
    }
}

/// The fakes, and the [`Effects`] made of them.
pub(super) struct Fakes {
    pub(super) calls: Calls,
    pub(super) clock: Arc<ManualClock>,
    pub(super) runtime: Arc<FakeRuntime>,
    pub(super) network: Arc<FakeNetwork>,
    pub(super) volumes: Arc<FakeVolumes>,
    pub(super) prober: Arc<FakeProber>,
    pub(super) sink: Arc<RecordingSink>,
}

impl Fakes {
    pub(super) fn new() -> Self {
        let calls: Calls = Arc::default();
        let clock = ManualClock::new();
        let (exits, _) = tokio::sync::watch::channel(0);
        Self {
            runtime: Arc::new(FakeRuntime {
                calls: calls.clone(),
                clock: clock.clone(),
                st: Arc::default(),
                exits,
            }),
            network: Arc::new(FakeNetwork {
                calls: calls.clone(),
                st: Mutex::default(),
            }),
            volumes: Arc::new(FakeVolumes {
                calls: calls.clone(),
                fail: Mutex::new(false),
            }),
            prober: Arc::new(FakeProber {
                calls: calls.clone(),
                on_run: Mutex::new(None),
            }),
            sink: Arc::default(),
            clock,
            calls,
        }
    }

    pub(super) fn effects(&self) -> Effects {
        Effects {
            runtime: self.runtime.clone(),
            network: self.network.clone(),
            volumes: self.volumes.clone(),
            prober: self.prober.clone(),
            clock: self.clock.clone(),
            sink: self.sink.clone(),
        }
    }

    /// The calls so far, and forgets them.
    pub(super) fn take_calls(&self) -> Vec<String> {
        std::mem::take(&mut *self.calls.lock().unwrap())
    }
}

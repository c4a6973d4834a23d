//! Table tests of one worker's sync passes against the recording fakes (the kubelet's
//! kuberuntime `TestSyncPod` style): each case builds a pod, drives passes the way the worker's
//! loop does (exits and probe results in, `sync_once`, probes, publish), pokes the fakes
//! (exits, failures, the manual clock) and asserts the recorded calls and the published
//! status, reasons and events.

use super::effects::PodNetwork;
use super::fake::Fakes;
use super::{AgentConfig, PodManager, Worker};
use crate::api::healthz::AgentMetrics;
use crate::model::backoff::BackoffConfig;
use crate::model::record::PodRecord;
use crate::sys::runtime::{self, ContainerMeta};
use hako_shim::state::Status;
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

const UID: &str = "uid1";

fn config(dir: &std::path::Path, cni_check_period: Duration) -> AgentConfig {
    let d = |n: &str| dir.join(n);
    AgentConfig {
        root_dir: d("root"),
        run_dir: d("run"),
        pod_log_dir: d("logs"),
        shim: hako_shim::client::Runtime::new(d("no-shim"), d("run/containers")),
        images: Arc::new(hako_shim::image::ImageStore::open(d("images")).unwrap()),
        cni: crate::sys::cni::CniConfig {
            conf_dir: d("net.d"),
            bin_dirs: vec![d("bin")],
            cache_dir: d("cni"),
            timeout: Duration::from_secs(1),
        },
        cgroup_root: Some(d("cgroup")),
        cgroup_parent: String::new(),
        dns: Default::default(),
        memory_capacity: 8 << 30,
        host_ip: Some("192.0.2.10".into()),
        backoff: BackoffConfig {
            initial: k8s_openapi::chrono::Duration::seconds(10),
            max: k8s_openapi::chrono::Duration::seconds(40),
        },
        sync_period: Duration::from_secs(10),
        cni_check_period,
        seccomp_profile_root: d("seccomp"),
        container_log_max_size: 10 << 20,
        container_log_max_files: 5,
        sysctls: Default::default(),
        eviction: None,
        container_gc: Default::default(),
        reclaim: None,
    }
}

fn pod(spec: Value) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "web", "namespace": "default", "uid": UID},
        "spec": spec,
    }))
    .unwrap()
}

fn c(name: &str) -> Value {
    json!({"name": name, "image": "busybox"})
}

fn id(name: &str, attempt: u32) -> String {
    runtime::container_id(UID, name, attempt)
}

struct Harness {
    fx: Fakes,
    w: Worker,
    deletion: tokio::sync::watch::Sender<bool>,
    _mgr: Arc<PodManager>,
    _tmp: tempfile::TempDir,
}

impl Harness {
    fn new(p: Pod) -> Self {
        Self::with_check_period(p, Duration::from_secs(3600))
    }

    fn with_check_period(p: Pod, cni_check_period: Duration) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let fx = Fakes::new();
        let mgr = PodManager::with_effects(
            config(tmp.path(), cni_check_period),
            AgentMetrics::new(),
            fx.effects(),
        );
        let (deletion, rx) = tokio::sync::watch::channel(false);
        let w = Worker::new(&mgr, p, rx);
        Self {
            fx,
            w,
            deletion,
            _mgr: mgr,
            _tmp: tmp,
        }
    }

    /// One pass of the worker's loop: exits and probe results in, sync, probes, publish.
    async fn step(&mut self) {
        // Let exit watches report (they are tasks, as in the loop).
        tokio::time::sleep(Duration::from_millis(20)).await;
        let mut exited = Vec::new();
        if let Some(rx) = self.w.exit_rx.as_mut() {
            while let Ok(id) = rx.try_recv() {
                exited.push(id);
            }
        }
        for id in exited {
            self.w.refresh(&id).await;
        }
        self.w.sync_once().await;
        self.w.run_probes().await;
        while !self.w.probes_in_flight.is_empty() {
            let Some(rx) = self.w.probe_rx.as_mut() else {
                break;
            };
            match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
                Ok(Some(done)) => self.w.probe_done(done),
                _ => break,
            }
        }
        let obs = self.w.observed();
        self.w.publish(&obs);
    }

    /// Passes until the calls stop changing (bounded).
    async fn settle(&mut self) {
        for _ in 0..4 {
            let before = self.fx.calls.lock().unwrap().len();
            self.step().await;
            if self.fx.calls.lock().unwrap().len() == before {
                return;
            }
        }
    }

    fn calls(&self) -> Vec<String> {
        self.fx.take_calls()
    }

    fn last(&self) -> PodRecord {
        self.fx
            .sink
            .published
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("nothing published")
    }

    fn phase(&self) -> String {
        self.last()
            .pod
            .status
            .and_then(|s| s.phase)
            .unwrap_or_default()
    }

    fn reasons(&self) -> Vec<String> {
        self.last()
            .events
            .iter()
            .map(|e| e.reason.clone())
            .collect()
    }

    fn status_of(&self, name: &str) -> ContainerStatus {
        let st = self.last().pod.status.unwrap_or_default();
        st.init_container_statuses
            .into_iter()
            .flatten()
            .chain(st.container_statuses.into_iter().flatten())
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("no status for {name}"))
    }

    fn waiting_reason(&self, name: &str) -> String {
        self.status_of(name)
            .state
            .and_then(|s| s.waiting)
            .and_then(|w| w.reason)
            .unwrap_or_default()
    }

    fn running(&self, name: &str) -> bool {
        self.status_of(name)
            .state
            .is_some_and(|s| s.running.is_some())
    }

    fn condition(&self, kind: &str) -> String {
        self.last()
            .pod
            .status
            .and_then(|s| s.conditions)
            .into_iter()
            .flatten()
            .find(|c| c.type_ == kind)
            .map(|c| c.status)
            .unwrap_or_default()
    }
}

fn starts(calls: &[String]) -> Vec<String> {
    calls
        .iter()
        .filter(|c| c.starts_with("start "))
        .cloned()
        .collect()
}

#[tokio::test]
async fn fresh_pod_sandbox_then_init_containers_in_order_then_app() {
    let mut h = Harness::new(pod(json!({
        "initContainers": [c("init-a"), c("init-b")],
        "containers": [c("app")],
    })));
    h.step().await;
    assert_eq!(
        h.calls(),
        [
            "sandbox uid1-s0",
            "cni add uid1-s0",
            "pull busybox",
            "create uid1-init-a-0",
            "start uid1-init-a-0"
        ]
    );
    assert_eq!(h.phase(), "Pending");
    assert_eq!(h.waiting_reason("app"), "PodInitializing");
    h.step().await;
    assert!(starts(&h.calls()).is_empty(), "init-b waits for init-a");
    h.fx.runtime.exit(&id("init-a", 0), 0);
    h.step().await;
    assert_eq!(starts(&h.calls()), ["start uid1-init-b-0"]);
    h.fx.runtime.exit(&id("init-b", 0), 0);
    h.step().await;
    assert_eq!(starts(&h.calls()), ["start uid1-app-0"]);
    assert_eq!(h.phase(), "Running");
    assert!(h.running("app"));
    let r = h.reasons();
    for want in ["Pulled", "Created", "Started"] {
        assert!(r.contains(&want.to_string()), "{want} missing in {r:?}");
    }
}

#[tokio::test]
async fn init_container_failure_with_restart_never_fails_the_pod() {
    let mut h = Harness::new(pod(json!({
        "restartPolicy": "Never",
        "initContainers": [c("init")],
        "containers": [c("app")],
    })));
    h.step().await;
    h.calls();
    h.fx.runtime.exit(&id("init", 0), 1);
    h.settle().await;
    let calls = h.calls();
    assert!(starts(&calls).is_empty(), "{calls:?}");
    assert!(calls.contains(&"teardown uid1-s0".to_string()), "{calls:?}");
    assert_eq!(h.phase(), "Failed");
    assert!(h.fx.network.sandboxes().is_empty());
}

#[tokio::test]
async fn pull_failure_is_err_image_pull_then_image_pull_back_off() {
    let mut h = Harness::new(pod(json!({"containers": [c("app")]})));
    h.fx.runtime.fail_pull("busybox");
    h.step().await;
    let calls = h.calls();
    assert!(calls.contains(&"pull busybox".to_string()));
    assert!(starts(&calls).is_empty());
    assert_eq!(h.waiting_reason("app"), "ErrImagePull");
    assert!(h.reasons().contains(&"Failed".to_string()));
    // Within the back-off: no pull, ImagePullBackOff.
    h.fx.clock.advance(5);
    h.step().await;
    assert!(!h.calls().contains(&"pull busybox".to_string()));
    assert_eq!(h.waiting_reason("app"), "ImagePullBackOff");
    assert!(h.reasons().contains(&"BackOff".to_string()));
    // After it, the next pull goes through and the container starts.
    h.fx.runtime.heal_pull("busybox");
    h.fx.clock.advance(6);
    h.step().await;
    let calls = h.calls();
    assert!(calls.contains(&"pull busybox".to_string()), "{calls:?}");
    assert_eq!(starts(&calls), ["start uid1-app-0"]);
    assert!(h.running("app"));
}

#[tokio::test]
async fn cni_add_failure_undoes_the_sandbox_and_is_retried() {
    let mut h = Harness::new(pod(json!({"containers": [c("app")]})));
    h.fx.network.fail_adds(1);
    h.step().await;
    assert_eq!(
        h.calls(),
        ["sandbox uid1-s0", "cni add uid1-s0", "teardown uid1-s0"]
    );
    assert!(h.reasons().contains(&"FailedCreatePodSandBox".to_string()));
    let ev = h.last().events;
    let msg = &ev
        .iter()
        .find(|e| e.reason == "FailedCreatePodSandBox")
        .unwrap()
        .message;
    assert!(
        msg.contains("failed to setup network for sandbox \"uid1-s0\""),
        "{msg}"
    );
    assert!(h.fx.network.sandboxes().is_empty());
    h.step().await;
    let calls = h.calls();
    assert!(calls.contains(&"cni add uid1-s0".to_string()), "{calls:?}");
    assert_eq!(starts(&calls), ["start uid1-app-0"]);
}

#[tokio::test]
async fn post_start_hook_failure_kills_the_container() {
    let mut h = Harness::new(pod(json!({"containers": [{
        "name": "app", "image": "busybox",
        "lifecycle": {"postStart": {"exec": {"command": ["fail-hook"]}}},
    }]})));
    h.step().await;
    let calls = h.calls();
    let pos = |s: &str| calls.iter().position(|c| c.starts_with(s)).unwrap();
    assert!(pos("start uid1-app-0") < pos("run uid1-app-0 fail-hook"));
    assert!(pos("run uid1-app-0 fail-hook") < pos("stop uid1-app-0"));
    let r = h.reasons();
    assert!(r.contains(&"FailedPostStartHook".to_string()), "{r:?}");
    assert!(r.contains(&"Killing".to_string()), "{r:?}");
    assert_eq!(h.fx.runtime.status(&id("app", 0)), Some(Status::Stopped));
}

#[tokio::test]
async fn crash_restart_back_off_doubles_to_the_cap() {
    let mut h = Harness::new(pod(json!({"containers": [c("app")]})));
    h.step().await;
    h.calls();
    // The first restart is immediate; each later one waits 10 s, 20 s, 40 s, 40 s (cap).
    h.fx.runtime.exit(&id("app", 0), 1);
    h.step().await;
    assert_eq!(starts(&h.calls()), ["start uid1-app-1"]);
    let mut attempt = 1;
    for delay in [10, 20, 40, 40] {
        h.fx.runtime.exit(&id("app", attempt), 1);
        h.step().await;
        assert!(starts(&h.calls()).is_empty(), "restarted before {delay}s");
        assert_eq!(h.waiting_reason("app"), "CrashLoopBackOff");
        assert!(h.reasons().contains(&"BackOff".to_string()));
        h.fx.clock.advance(delay - 1);
        h.step().await;
        assert!(starts(&h.calls()).is_empty(), "restarted before {delay}s");
        h.fx.clock.advance(1);
        h.step().await;
        attempt += 1;
        assert_eq!(
            starts(&h.calls()),
            [format!("start {}", id("app", attempt))],
            "not restarted after {delay}s"
        );
    }
    assert_eq!(h.status_of("app").restart_count, 5);
}

#[tokio::test]
async fn deletion_mid_start_starts_nothing_further_and_removes_everything() {
    let mut h = Harness::new(pod(json!({"containers": [
        {"name": "first", "image": "busybox",
         "lifecycle": {"postStart": {"exec": {"command": ["slow-hook"]}}}},
        {"name": "second", "image": "slow-image"},
    ]})));
    h.fx.runtime.slow_pull("slow-image");
    let deletion = h.deletion.clone();
    // The pod is deleted while the first container's postStart hook runs.
    h.fx.prober.on_run(move |word| {
        if word == "slow-hook" {
            deletion.send_replace(true);
            std::thread::sleep(Duration::from_millis(300));
        }
    });
    h.step().await;
    let calls = h.calls();
    assert_eq!(starts(&calls), ["start uid1-first-0"], "{calls:?}");
    assert!(!calls.iter().any(|c| c.contains("second")), "{calls:?}");
    h.w.terminate_and_remove().await;
    let calls = h.calls();
    assert!(
        calls.contains(&"stop uid1-first-0 30s".to_string()),
        "{calls:?}"
    );
    assert!(calls.contains(&"teardown uid1-s0".to_string()), "{calls:?}");
    assert!(
        calls.contains(&"volumes teardown uid1".to_string()),
        "{calls:?}"
    );
    assert!(h.fx.network.sandboxes().is_empty());
    assert_eq!(h.fx.runtime.status(&id("first", 0)), None, "not deleted");
    assert_eq!(h.fx.sink.removed.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn restart_policy_never_completes_and_releases_the_sandbox() {
    let mut h = Harness::new(pod(
        json!({"restartPolicy": "Never", "containers": [c("app")]}),
    ));
    h.step().await;
    h.calls();
    h.fx.runtime.exit(&id("app", 0), 0);
    h.settle().await;
    let calls = h.calls();
    assert!(starts(&calls).is_empty(), "{calls:?}");
    assert!(calls.contains(&"teardown uid1-s0".to_string()), "{calls:?}");
    assert_eq!(h.phase(), "Succeeded");
}

#[tokio::test]
async fn restart_policy_on_failure_restarts_a_failed_container() {
    let mut h = Harness::new(pod(
        json!({"restartPolicy": "OnFailure", "containers": [c("app")]}),
    ));
    h.step().await;
    h.calls();
    h.fx.runtime.exit(&id("app", 0), 2);
    h.step().await;
    assert_eq!(starts(&h.calls()), ["start uid1-app-1"]);
    assert_eq!(h.phase(), "Running");
}

#[tokio::test]
async fn restart_policy_on_failure_keeps_a_completed_container() {
    let mut h = Harness::new(pod(
        json!({"restartPolicy": "OnFailure", "containers": [c("app")]}),
    ));
    h.step().await;
    h.calls();
    h.fx.runtime.exit(&id("app", 0), 0);
    h.settle().await;
    assert!(starts(&h.calls()).is_empty());
    assert_eq!(h.phase(), "Succeeded");
}

#[tokio::test]
async fn native_sidecar_starts_before_the_app_and_is_restarted() {
    let mut h = Harness::new(pod(json!({
        "initContainers": [{"name": "proxy", "image": "busybox", "restartPolicy": "Always"}],
        "containers": [c("app")],
    })));
    h.step().await;
    let calls = h.calls();
    assert_eq!(starts(&calls), ["start uid1-proxy-0"], "{calls:?}");
    h.step().await;
    assert_eq!(starts(&h.calls()), ["start uid1-app-0"]);
    h.fx.runtime.exit(&id("proxy", 0), 1);
    h.step().await;
    assert_eq!(starts(&h.calls()), ["start uid1-proxy-1"]);
    assert!(h.running("app"), "the app keeps running");
    assert_eq!(h.phase(), "Running");
}

#[tokio::test]
async fn readiness_probe_failure_is_not_ready() {
    let mut h = Harness::new(pod(json!({"containers": [{
        "name": "app", "image": "busybox",
        "readinessProbe": {"exec": {"command": ["fail-ready"]}, "periodSeconds": 1, "failureThreshold": 1},
    }]})));
    h.step().await;
    h.fx.clock.advance(1);
    h.step().await;
    let calls = h.calls();
    assert!(
        calls.contains(&"run uid1-app-0 fail-ready".to_string()),
        "{calls:?}"
    );
    assert_eq!(h.condition("Ready"), "False");
    assert!(!calls.iter().any(|c| c.starts_with("stop ")), "{calls:?}");
    assert!(h.reasons().contains(&"Unhealthy".to_string()));
}

#[tokio::test]
async fn readiness_probe_success_is_ready() {
    let mut h = Harness::new(pod(json!({"containers": [{
        "name": "app", "image": "busybox",
        "readinessProbe": {"exec": {"command": ["ok-ready"]}, "periodSeconds": 1},
    }]})));
    h.step().await;
    h.fx.clock.advance(1);
    h.step().await;
    assert!(h.calls().contains(&"run uid1-app-0 ok-ready".to_string()));
    assert_eq!(h.condition("Ready"), "True");
}

#[tokio::test]
async fn liveness_probe_failure_restarts_the_container() {
    let mut h = Harness::new(pod(json!({"containers": [{
        "name": "app", "image": "busybox",
        "livenessProbe": {"exec": {"command": ["fail-live"]}, "periodSeconds": 1, "failureThreshold": 1},
    }]})));
    h.step().await;
    h.fx.clock.advance(1);
    h.step().await;
    h.step().await;
    let calls = h.calls();
    let pos = |s: &str| calls.iter().position(|c| c.starts_with(s));
    let (Some(probe), Some(stop)) = (pos("run uid1-app-0 fail-live"), pos("stop uid1-app-0"))
    else {
        panic!("no probe and stop in {calls:?}");
    };
    assert!(probe < stop);
    h.settle().await;
    let calls = h.calls();
    assert!(
        calls.contains(&"start uid1-app-1".to_string())
            || h.fx.runtime.status(&id("app", 1)).is_some(),
        "not restarted: {calls:?}"
    );
    let killing = h
        .last()
        .events
        .into_iter()
        .find(|e| e.reason == "Killing")
        .map(|e| e.message)
        .unwrap_or_default();
    assert!(killing.contains("liveness"), "{killing}");
}

#[tokio::test]
async fn missing_config_map_key_is_create_container_config_error() {
    let mut h = Harness::new(pod(json!({"containers": [{
        "name": "app", "image": "busybox",
        "env": [{"name": "X", "valueFrom": {"configMapKeyRef": {"name": "absent", "key": "k"}}}],
    }]})));
    h.step().await;
    let calls = h.calls();
    assert!(starts(&calls).is_empty(), "{calls:?}");
    assert!(!calls.iter().any(|c| c.starts_with("create ")), "{calls:?}");
    assert_eq!(h.waiting_reason("app"), "CreateContainerConfigError");
}

#[tokio::test]
async fn volume_failure_starts_no_container() {
    let mut h = Harness::new(pod(json!({
        "volumes": [{"name": "data", "emptyDir": {}}],
        "containers": [c("app")],
    })));
    h.fx.volumes.set_failing(true);
    h.step().await;
    assert_eq!(h.calls(), ["volumes setup"]);
    assert!(h.reasons().contains(&"FailedMount".to_string()));
    h.fx.volumes.set_failing(false);
    h.step().await;
    let calls = h.calls();
    assert_eq!(calls.first().map(String::as_str), Some("volumes setup"));
    assert_eq!(starts(&calls), ["start uid1-app-0"]);
}

#[tokio::test]
async fn shim_create_failure_is_create_container_error() {
    let mut h = Harness::new(pod(json!({"containers": [c("app")]})));
    h.fx.runtime.fail_create(&id("app", 0));
    h.step().await;
    let calls = h.calls();
    assert!(
        calls.contains(&"create uid1-app-0".to_string()),
        "{calls:?}"
    );
    assert!(starts(&calls).is_empty(), "{calls:?}");
    assert_eq!(h.waiting_reason("app"), "CreateContainerError");
}

#[tokio::test]
async fn adoption_of_a_running_container_starts_no_duplicate() {
    let mut h = Harness::new(pod(json!({"containers": [c("app")]})));
    left_by_a_previous_agent(&h, Status::Running);
    h.calls();
    h.w.adopt().await;
    h.step().await;
    h.step().await;
    let calls = h.calls();
    assert!(
        !calls
            .iter()
            .any(|c| c.starts_with("create ") || c.starts_with("sandbox ")),
        "{calls:?}"
    );
    assert!(h.running("app"));
    assert_eq!(h.status_of("app").restart_count, 0);
}

/// An agent killed between the shim's create and start leaves a container that never ran:
/// the next agent deletes it and starts the container once, with no "previous instance".
#[tokio::test]
async fn adoption_of_a_created_only_container_deletes_it_and_starts_one() {
    let mut h = Harness::new(pod(json!({"containers": [c("app")]})));
    left_by_a_previous_agent(&h, Status::Created);
    h.calls();
    h.w.adopt().await;
    h.step().await;
    h.step().await;
    let calls = h.calls();
    assert!(
        calls.contains(&"delete uid1-app-0".to_string()),
        "{calls:?}"
    );
    assert_eq!(starts(&calls), ["start uid1-app-0"], "{calls:?}");
    assert!(h.running("app"));
    assert_eq!(h.status_of("app").restart_count, 0);
    assert_eq!(h.fx.runtime.ids(), [id("app", 0)]);
    assert_eq!(runtime::read_metas(&h.w.cfg.root_dir, UID).len(), 1);
}

/// The sandbox record and one container (meta and shim state in `status`) of `app`, as a
/// previous agent leaves them.
fn left_by_a_previous_agent(h: &Harness, status: Status) {
    let root = h.w.cfg.root_dir.clone();
    let dir = root.join("pods").join(UID);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("sandbox.json"),
        r#"{"id":"uid1-s0","attempt":0,"ips":["10.88.0.7"]}"#,
    )
    .unwrap();
    h.fx.network
        .create(
            &crate::sys::sandbox::SandboxPaths::new(&h.w.cfg.run_dir, "uid1-s0"),
            "web",
            false,
            &Default::default(),
            &[],
        )
        .unwrap();
    let c0 = h.w.container_spec("app").unwrap();
    runtime::write_meta(
        &root,
        &ContainerMeta {
            id: id("app", 0),
            pod_uid: UID.into(),
            name: "app".into(),
            attempt: 0,
            spec_hash: crate::model::actions::container_hash(&c0),
            image: "busybox".into(),
            image_id: "sha256:id-busybox".into(),
            termination_log: dir.join("termination-log"),
            log_path: dir.join("0.log"),
        },
    )
    .unwrap();
    h.fx.runtime.insert_as(&id("app", 0), status);
}

#[tokio::test]
async fn failed_cni_check_recreates_the_sandbox() {
    let mut h = Harness::with_check_period(pod(json!({"containers": [c("app")]})), Duration::ZERO);
    h.step().await;
    h.calls();
    h.fx.network.fail_checks(1);
    h.settle().await;
    let calls = h.calls();
    let pos = |s: &str| calls.iter().position(|c| c == s);
    let (Some(check), Some(down), Some(up)) = (
        pos("cni check uid1-s0"),
        pos("teardown uid1-s0"),
        pos("cni add uid1-s1"),
    ) else {
        panic!("no check, teardown and re-add in {calls:?}");
    };
    assert!(check < down && down < up, "{calls:?}");
    assert!(h.reasons().contains(&"SandboxChanged".to_string()));
    assert_eq!(h.fx.network.sandboxes(), ["uid1-s1"]);
}

#[tokio::test]
async fn failed_cni_del_keeps_the_sandbox_and_is_retried() {
    let mut h = Harness::new(pod(
        json!({"restartPolicy": "Never", "containers": [c("app")]}),
    ));
    h.step().await;
    h.calls();
    h.fx.network.fail_dels(1);
    h.fx.runtime.exit(&id("app", 0), 0);
    h.step().await;
    assert!(h.calls().contains(&"teardown uid1-s0".to_string()));
    assert!(h.reasons().contains(&"FailedKillPod".to_string()));
    assert_eq!(h.fx.network.sandboxes(), ["uid1-s0"], "kept for a retry");
    h.step().await;
    assert_eq!(h.calls(), ["teardown uid1-s0"]);
    assert!(h.fx.network.sandboxes().is_empty());
    assert_eq!(h.phase(), "Succeeded");
}

fn ephemeral_status(h: &Harness, name: &str) -> Option<ContainerStatus> {
    h.last()
        .pod
        .status
        .and_then(|s| s.ephemeral_container_statuses)
        .into_iter()
        .flatten()
        .find(|c| c.name == name)
}

#[tokio::test]
async fn ephemeral_container_added_by_update_starts_once_and_is_never_restarted() {
    let spec = json!({"containers": [c("app")]});
    let mut h = Harness::new(pod(spec.clone()));
    h.settle().await;
    assert!(h.running("app"));
    h.calls();
    // The update adds a debugger (with fields the API forbids for it: they are dropped).
    let mut with_ec = spec.clone();
    with_ec["ephemeralContainers"] = json!([{"name": "debugger", "image": "busybox",
        "targetContainerName": "app", "ports": [{"containerPort": 80}],
        "readinessProbe": {"exec": {"command": ["false"]}}}]);
    h.w.on_msg(super::Msg::Update(Box::new(pod(with_ec))));
    h.step().await;
    let calls = h.calls();
    assert_eq!(starts(&calls), ["start uid1-debugger-0"], "{calls:?}");
    assert!(!calls.iter().any(|c| c.starts_with("sandbox")), "{calls:?}");
    let st = ephemeral_status(&h, "debugger").expect("ephemeral status");
    assert!(st.state.and_then(|s| s.running).is_some());
    assert!(!st.ready);
    // Ephemeral containers have no entry among the regular ones and do not change the phase.
    assert_eq!(h.phase(), "Running");
    assert_eq!(h.condition("Ready"), "True");
    // It exits: it stays terminated (restartPolicy Always does not apply to it).
    h.fx.runtime.exit(&id("debugger", 0), 0);
    h.settle().await;
    h.fx.clock.advance(600);
    h.settle().await;
    let calls = h.calls();
    assert!(starts(&calls).is_empty(), "{calls:?}");
    let st = ephemeral_status(&h, "debugger").expect("ephemeral status");
    assert_eq!(
        st.state.and_then(|s| s.terminated).map(|t| t.exit_code),
        Some(0)
    );
    assert!(h.running("app"));
}

#[tokio::test]
async fn ephemeral_container_waits_for_a_running_target() {
    let mut h = Harness::new(pod(json!({
        "containers": [c("app")],
        "ephemeralContainers": [{"name": "dbg", "image": "busybox", "targetContainerName": "gone"}],
    })));
    h.settle().await;
    let calls = h.calls();
    assert!(
        !starts(&calls).contains(&"start uid1-dbg-0".to_string()),
        "{calls:?}"
    );
    let st = ephemeral_status(&h, "dbg").expect("ephemeral status");
    assert_eq!(
        st.state
            .and_then(|s| s.waiting)
            .and_then(|w| w.reason)
            .as_deref(),
        Some("CreateContainerConfigError")
    );
}

#[tokio::test]
async fn sysctls_reach_the_sandbox_and_unsafe_ones_fail_the_pod() {
    let mut h = Harness::new(pod(json!({
        "securityContext": {"sysctls": [{"name": "kernel.shm_rmid_forced", "value": "1"},
                                        {"name": "net/ipv4/ping_group_range", "value": "0 5"}]},
        "containers": [c("app")],
    })));
    h.step().await;
    let calls = h.calls();
    assert_eq!(
        calls[..3],
        [
            "sandbox uid1-s0",
            "sysctl kernel/shm_rmid_forced=1",
            "sysctl net/ipv4/ping_group_range=0 5"
        ],
        "{calls:?}"
    );
    let mut h = Harness::new(pod(json!({
        "securityContext": {"sysctls": [{"name": "kernel.msgmax", "value": "10000000000"}]},
        "containers": [c("app")],
    })));
    h.step().await;
    h.step().await;
    assert!(h.calls().is_empty(), "nothing of a refused pod runs");
    assert_eq!(h.phase(), "Failed");
    let st = h.last().pod.status.unwrap_or_default();
    assert_eq!(st.reason.as_deref(), Some("SysctlForbidden"));
    assert_eq!(
        st.message.as_deref(),
        Some("Pod was rejected: forbidden sysctl: \"kernel.msgmax\" not allowlisted")
    );
    assert!(h.reasons().contains(&"SysctlForbidden".to_string()));
}

#[tokio::test]
async fn evicted_pod_is_killed_with_the_eviction_grace_and_stays_failed() {
    let mut h = Harness::new(pod(json!({
        "terminationGracePeriodSeconds": 60,
        "containers": [c("app")],
    })));
    h.settle().await;
    assert!(h.running("app"));
    let msg = "The node was low on resource: memory. Threshold quantity: 100Mi, available: 50Mi. ";
    h.w.on_msg(super::Msg::Evict(Box::new(super::Evicted {
        message: msg.into(),
        grace: Duration::from_secs(1),
    })));
    h.settle().await;
    let calls = h.calls();
    assert!(
        calls.iter().any(|c| c == "stop uid1-app-0 1s"),
        "killed with the eviction grace, not the pod's 60s: {calls:?}"
    );
    assert_eq!(h.phase(), "Failed");
    let st = h.last().pod.status.unwrap_or_default();
    assert_eq!(st.reason.as_deref(), Some("Evicted"));
    assert_eq!(st.message.as_deref(), Some(msg));
    assert_eq!(h.condition("DisruptionTarget"), "True");
    assert!(h.reasons().contains(&"Evicted".to_string()));
    // Never restarted, whatever the restart policy.
    h.settle().await;
    let later = h.calls();
    assert!(starts(&later).is_empty(), "{later:?}");
    assert!(!h.running("app"));
}

#[tokio::test]
async fn best_effort_pod_is_refused_under_memory_pressure() {
    let p = pod(json!({"containers": [c("app")]}));
    let mut h = Harness::new(p.clone());
    h.w.pressure.set(crate::model::node_object::Pressure {
        memory: true,
        ..Default::default()
    });
    h.step().await;
    h.step().await;
    assert!(h.calls().is_empty(), "nothing of a refused pod runs");
    let st = h.last().pod.status.unwrap_or_default();
    assert_eq!(st.phase.as_deref(), Some("Failed"));
    assert_eq!(st.reason.as_deref(), Some("Evicted"));
    assert_eq!(
        st.message.as_deref(),
        Some("The node had condition: [MemoryPressure]. ")
    );
    // A Guaranteed pod is admitted under memory pressure.
    let mut h = Harness::new(pod(
        json!({"containers": [{"name": "app", "image": "busybox",
        "resources": {"limits": {"cpu": "100m", "memory": "64Mi"}}}]}),
    ));
    h.w.pressure.set(crate::model::node_object::Pressure {
        memory: true,
        ..Default::default()
    });
    h.settle().await;
    assert!(h.running("app"));
}

//! What the agent observed of a pod on the node: sandbox, container instances and the last
//! start failures; the input of planning and status computation (pure data).

use k8s_openapi::chrono::{DateTime, Utc};
use std::collections::BTreeMap;

/// Runtime state of one container instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum RuntimeState {
    /// Created, not started.
    Created,
    /// Running.
    Running,
    /// Exited.
    Exited,
    /// State could not be determined.
    Unknown,
}

/// A probe's current result as the probe manager holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ProbeResult {
    /// Not run yet (or on hold).
    Unknown,
    /// Passed.
    Success,
    /// Failed past its threshold.
    Failure,
}

/// Probe results of one container instance; `None` = no such probe configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct ProbeView {
    /// Startup probe.
    pub startup: Option<ProbeResult>,
    /// Liveness probe.
    pub liveness: Option<ProbeResult>,
    /// Readiness probe.
    pub readiness: Option<ProbeResult>,
}

impl ProbeView {
    /// kubelet: started = running and (startup probe succeeded, or none configured).
    pub fn started(&self) -> bool {
        matches!(self.startup, None | Some(ProbeResult::Success))
    }
    /// kubelet: ready = started and (readiness succeeded, or none configured).
    pub fn ready(&self) -> bool {
        self.started() && matches!(self.readiness, None | Some(ProbeResult::Success))
    }
}

/// One container instance (one attempt) as the runtime reports it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ObservedContainer {
    /// Container name in the pod spec.
    pub name: String,
    /// Runtime id (`hako://<id>` in status).
    pub id: String,
    /// Attempt number = restart count.
    pub attempt: u32,
    /// Hash of the container spec it was created from.
    pub spec_hash: String,
    /// Image reference.
    pub image: String,
    /// Image id (digest) when known.
    pub image_id: String,
    /// Runtime state.
    pub state: RuntimeState,
    /// Creation time (orders instances).
    pub created_at: DateTime<Utc>,
    /// Start time.
    pub started_at: Option<DateTime<Utc>>,
    /// Finish time.
    pub finished_at: Option<DateTime<Utc>>,
    /// Exit code when exited.
    pub exit_code: i32,
    /// Killed by the OOM killer.
    pub oom_killed: bool,
    /// Termination message read from terminationMessagePath.
    pub message: String,
    /// Probe results for this instance.
    pub probes: ProbeView,
}

impl ObservedContainer {
    /// Terminated reason like containerd reports it: OOMKilled, Completed or Error.
    pub fn terminated_reason(&self) -> &'static str {
        if self.oom_killed {
            "OOMKilled"
        } else if self.exit_code == 0 {
            "Completed"
        } else {
            "Error"
        }
    }
}

/// The pod sandbox (netns + network).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ObservedSandbox {
    /// Sandbox id.
    pub id: String,
    /// Sandbox attempt (0 for the first).
    pub attempt: u32,
    /// Ready: netns present and CNI ADD succeeded.
    pub ready: bool,
    /// Pod IPs from CNI.
    pub ips: Vec<String>,
}

/// Why the last attempt to start a container failed (the kubelet's reason cache).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StartFailure {
    /// CrashLoopBackOff, ErrImagePull, ImagePullBackOff, CreateContainerConfigError, ...
    pub reason: String,
    /// Human message.
    pub message: String,
}

/// Everything observed of one pod.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct ObservedPod {
    /// The newest sandbox, if any.
    pub sandbox: Option<ObservedSandbox>,
    /// Container instances, any order; the newest two per name matter.
    pub containers: Vec<ObservedContainer>,
    /// Last start failure per container name.
    pub start_failures: BTreeMap<String, StartFailure>,
    /// Node IP for status.hostIP.
    pub host_ip: Option<String>,
    /// When the agent first saw the pod (status.startTime).
    pub start_time: Option<DateTime<Utc>>,
}

impl ObservedPod {
    /// The newest instance of `name`.
    pub fn latest(&self, name: &str) -> Option<&ObservedContainer> {
        self.containers
            .iter()
            .filter(|c| c.name == name)
            .max_by_key(|c| (c.created_at, c.attempt))
    }
    /// The two newest instances of `name`, newest first.
    pub fn latest_two(&self, name: &str) -> Vec<&ObservedContainer> {
        let mut v: Vec<_> = self.containers.iter().filter(|c| c.name == name).collect();
        v.sort_by_key(|c| std::cmp::Reverse((c.created_at, c.attempt)));
        v.truncate(2);
        v
    }
}

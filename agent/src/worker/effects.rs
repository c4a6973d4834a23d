//! The seam between the pod worker and the machine (contracts only, pure): the worker reaches
//! the shim, the CNI chain and the namespaces, the volume mounts, probe and hook handlers, the
//! clock and the status/event outlets only through these traits. The real implementations
//! live in [`crate::sys::effects`] and wrap the `sys` modules; the recording fakes the table
//! tests use live in `worker/fake.rs`.
//!
//! Blocking methods are called by the worker on the blocking pool (as before the seam);
//! methods that wait for a container (pull, exit, stop) return a boxed `'static` future, so
//! the worker can spawn them or race them against the pod's deletion.

use crate::model::record::PodRecord;
use crate::sys::cni::Attachment;
use crate::sys::sandbox::{SandboxOwner, SandboxPaths};
use crate::sys::volumes::{MountSpec, PodContext, PodVolumes};
use hako_shim::image::{Image, PullPolicy};
use hako_shim::spec::ContainerSpec;
use hako_shim::state::State;
use k8s_openapi::api::core::v1::Container;
use k8s_openapi::chrono::{DateTime, Utc};
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

pub use crate::model::probe::Prober;

/// A boxed future that owns what it needs (spawnable).
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// A failure of the container runtime, naming the container or image.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The shim client failed (its message names the container).
    #[error(transparent)]
    Shim(#[from] hako_shim::client::ClientError),
    /// The image store failed (its message names the image).
    #[error(transparent)]
    Image(#[from] hako_shim::image::ImageError),
    /// The task that ran the call ended without an answer.
    #[error("{0} task failed")]
    Task(&'static str),
    /// A runtime refused the call for another reason.
    #[error("{object}: {reason}")]
    Refused {
        /// The container id or image reference.
        object: String,
        /// Why.
        reason: String,
    },
}

/// Container runtime (hako-shim and its image store).
pub trait Runtime: Send + Sync {
    /// The image `reference` if the store has it (no pull).
    fn image(&self, reference: &str) -> Option<Image>;
    /// Makes `reference` present per `policy`, with a docker config JSON for credentials.
    fn ensure_image(
        &self,
        reference: String,
        policy: PullPolicy,
        docker_config: Option<String>,
    ) -> BoxFuture<Result<Image, RuntimeError>>;
    /// The unpacked layer directories of `image`, lowest first.
    fn layer_dirs(&self, image: &Image) -> Vec<PathBuf>;
    /// Creates the container (blocking): its shim runs and waits for `start`.
    fn create(&self, spec: &ContainerSpec) -> Result<(), RuntimeError>;
    /// Starts a created container (blocking); its state after the start.
    fn start(&self, id: &str) -> Result<State, RuntimeError>;
    /// The live state, or the recorded one of a stopped container whose shim is gone.
    fn state(&self, id: &str) -> Option<State>;
    /// The recorded state, whether or not the shim answers.
    fn recorded_state(&self, id: &str) -> Option<State>;
    /// Removes a container whatever its shim does (SIGKILL, cgroups, state).
    fn force_delete(&self, id: &str) -> Result<(), RuntimeError>;
    /// Resolves when the container exits (or its shim is gone).
    fn wait_exit(&self, id: &str) -> BoxFuture<()>;
    /// SIGTERM, then SIGKILL after `grace`; resolves at the exit (bounded).
    fn stop(&self, id: &str, grace: Duration) -> BoxFuture<()>;
}

/// A failure of the pod network or the sandbox namespaces, naming the sandbox.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// CNI DEL failed.
    #[error("CNI DEL: {0}")]
    Del(String),
    /// CNI ADD or CHECK failed.
    #[error(transparent)]
    Cni(#[from] crate::sys::cni::CniError),
    /// Creating or removing the namespaces failed.
    #[error(transparent)]
    Sandbox(#[from] crate::sys::sandbox::SandboxError),
    /// A network refused the call for another reason.
    #[error("sandbox {sandbox}: {reason}")]
    Refused {
        /// Sandbox id.
        sandbox: String,
        /// Why.
        reason: String,
    },
}

/// Pod sandboxes: namespaces kept by bind mounts, and the CNI chain.
pub trait PodNetwork: Send + Sync {
    /// Every sandbox directory under the run dir.
    fn list(&self) -> Vec<SandboxPaths>;
    /// Something of the sandbox is on the node (its directory).
    fn present(&self, paths: &SandboxPaths) -> bool;
    /// Its namespaces are mounted.
    fn exists(&self, paths: &SandboxPaths) -> bool;
    /// Creates the namespaces (blocking) with the pod's admitted `sysctls` (paths under
    /// `/proc/sys`, values) set in them, and records the owner.
    fn create(
        &self,
        paths: &SandboxPaths,
        hostname: &str,
        host_network: bool,
        owner: &SandboxOwner,
        sysctls: &[(String, String)],
    ) -> Result<(), NetworkError>;
    /// CNI ADD (blocking); the pod IPs of the result.
    fn add(&self, a: &Attachment) -> Result<Vec<String>, NetworkError>;
    /// CNI CHECK (blocking).
    fn check(&self, a: &Attachment) -> Result<(), NetworkError>;
    /// The one way a sandbox is torn down (blocking): CNI DEL unless host network, then the
    /// namespaces. A failed DEL keeps the sandbox for a later pass.
    fn teardown(
        &self,
        paths: &SandboxPaths,
        a: &Attachment,
        host_network: bool,
    ) -> Result<(), NetworkError>;
}

/// The pod's volumes (all blocking).
pub trait Volumes: Send + Sync {
    /// Sets every volume up (idempotent).
    fn setup(&self, ctx: &PodContext) -> Result<PodVolumes, crate::sys::volumes::VolumeError>;
    /// Rewrites configMap/secret/downwardAPI/projected contents.
    fn refresh(
        &self,
        ctx: &PodContext,
        vols: &PodVolumes,
    ) -> Result<bool, crate::sys::volumes::VolumeError>;
    /// The container's mounts (subPath bind mounts made here).
    fn mounts_for_container(
        &self,
        vols: &PodVolumes,
        c: &Container,
    ) -> Result<Vec<MountSpec>, crate::sys::volumes::VolumeError>;
    /// Unmounts and removes the pod's volumes.
    fn teardown(&self, uid: &str) -> Result<(), crate::sys::volumes::VolumeError>;
}

/// Time source (the system clock, or a manual one in tests).
pub trait Clock: Send + Sync {
    /// Now.
    fn now(&self) -> DateTime<Utc>;
}

/// Where a pod's status and events go: the record on disk, the pod list and the status
/// channel ([`super::PodManager::subscribe`]).
pub trait StatusSink: Send + Sync {
    /// The pod's record (its status and events) changed.
    fn publish(&self, record: &PodRecord);
    /// The pod was stopped and removed; `record` holds its last status.
    fn removed(&self, record: &PodRecord);
}

/// Everything a pod worker reaches the machine through, passed in explicitly.
#[derive(Clone)]
pub struct Effects {
    /// Containers and images.
    pub runtime: Arc<dyn Runtime>,
    /// Sandboxes and CNI.
    pub network: Arc<dyn PodNetwork>,
    /// Volumes.
    pub volumes: Arc<dyn Volumes>,
    /// Probe and hook handlers.
    pub prober: Arc<dyn Prober + Send + Sync>,
    /// Time.
    pub clock: Arc<dyn Clock>,
    /// Status and events.
    pub sink: Arc<dyn StatusSink>,
}

//! The real implementations of the pod worker's effect traits ([`crate::worker::effects`]),
//! wrapping the shim client and image store, the CNI chain and sandbox namespaces, the volume
//! code, the probe handlers, the system clock and the pod record on disk (effectful).

use crate::model::record::PodRecord;
use crate::sys::cni::{self, Attachment, CniConfig};
use crate::sys::prober::RealProber;
use crate::sys::sandbox::{self, SandboxOwner, SandboxPaths};
use crate::sys::volumes::{self, MountSpec, PodContext, PodVolumes, VolumeError, VolumeHost};
use crate::sys::{runtime, state};
use crate::worker::effects::{
    BoxFuture, Clock, Effects, NetworkError, PodNetwork, Runtime, RuntimeError, StatusSink, Volumes,
};
use crate::worker::{AgentConfig, PodStatusEvent};
use hako_shim::client::Runtime as ShimRuntime;
use hako_shim::image::{Image, ImageStore, PullPolicy};
use hako_shim::spec::ContainerSpec;
use hako_shim::state::State;
use k8s_openapi::api::core::v1::{Container, Pod};
use k8s_openapi::chrono::{DateTime, Utc};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::broadcast;

impl Effects {
    /// The real effects for `cfg`; the status sink writes `<root>/pods/<uid>/status.json`,
    /// keeps `pods` and sends on `status_tx`.
    pub fn real(
        cfg: &AgentConfig,
        pods: Arc<Mutex<BTreeMap<String, Pod>>>,
        status_tx: broadcast::Sender<PodStatusEvent>,
    ) -> Self {
        Self {
            runtime: Arc::new(ShimAndImages {
                shim: cfg.shim.clone(),
                images: cfg.images.clone(),
            }),
            network: Arc::new(CniNetwork {
                cni: cfg.cni.clone(),
                run_dir: cfg.run_dir.clone(),
            }),
            volumes: Arc::new(HostVolumes {
                host: VolumeHost::new(cfg.root_dir.clone()),
            }),
            prober: Arc::new(RealProber {
                shim: cfg.shim.clone(),
            }),
            clock: Arc::new(SystemClock),
            sink: Arc::new(RecordSink {
                root_dir: cfg.root_dir.clone(),
                pods,
                status_tx,
            }),
        }
    }
}

/// Containers through `hako-shim`, images through the shim's image store.
pub struct ShimAndImages {
    /// The shim runtime.
    pub shim: ShimRuntime,
    /// The image store.
    pub images: Arc<ImageStore>,
}

/// A failure of one request on a shim socket, naming the socket.
#[derive(Debug, thiserror::Error)]
pub enum ShimRequestError {
    /// Connecting, writing or reading failed.
    #[error("{}: {source}", .path.display())]
    Io {
        /// The socket.
        path: PathBuf,
        /// The failure.
        source: std::io::Error,
    },
    /// The request could not be encoded.
    #[error("{0}")]
    Encode(serde_json::Error),
    /// The answer is not a shim response.
    #[error("bad shim response {0:?}: {1}")]
    BadResponse(String, serde_json::Error),
    /// The shim answered with an error.
    #[error("{0}")]
    Shim(String),
}

/// One request to a container's shim over its socket, answered asynchronously: a wait or a
/// stop holds no thread while the container takes its time (a blocking-pool thread per
/// stopping container made the pool, and the process's memory, grow with every mass deletion).
async fn shim_request(
    sock: &Path,
    req: &hako_shim::protocol::Request,
) -> Result<hako_shim::protocol::Response, ShimRequestError> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let io = |source| ShimRequestError::Io {
        path: sock.to_path_buf(),
        source,
    };
    let mut s = tokio::net::UnixStream::connect(sock).await.map_err(io)?;
    let mut data = serde_json::to_vec(req).map_err(ShimRequestError::Encode)?;
    data.push(b'\n');
    s.write_all(&data).await.map_err(io)?;
    let mut line = String::new();
    tokio::io::BufReader::new(s)
        .read_line(&mut line)
        .await
        .map_err(io)?;
    let resp: hako_shim::protocol::Response =
        serde_json::from_str(&line).map_err(|e| ShimRequestError::BadResponse(line.clone(), e))?;
    match resp.error {
        Some(e) => Err(ShimRequestError::Shim(e)),
        None => Ok(resp),
    }
}

/// How long a shim may take to answer beyond what the request itself waits for.
const SHIM_ANSWER: Duration = Duration::from_secs(10);

impl Runtime for ShimAndImages {
    fn image(&self, reference: &str) -> Option<Image> {
        self.images.get(reference).ok().flatten()
    }

    fn ensure_image(
        &self,
        reference: String,
        policy: PullPolicy,
        docker_config: Option<String>,
    ) -> BoxFuture<Result<Image, RuntimeError>> {
        let images = self.images.clone();
        Box::pin(async move {
            Ok(images
                .ensure(&reference, policy, docker_config.as_deref())
                .await?)
        })
    }

    fn layer_dirs(&self, image: &Image) -> Vec<PathBuf> {
        self.images.layer_dirs(image)
    }

    fn create(&self, spec: &ContainerSpec) -> Result<(), RuntimeError> {
        self.shim.create(spec)?;
        Ok(())
    }

    fn start(&self, id: &str) -> Result<State, RuntimeError> {
        Ok(self.shim.client(id).start()?)
    }

    fn state(&self, id: &str) -> Option<State> {
        runtime::shim_state(&self.shim, id)
    }

    fn recorded_state(&self, id: &str) -> Option<State> {
        self.shim.client(id).recorded_state().ok()
    }

    fn force_delete(&self, id: &str) -> Result<(), RuntimeError> {
        Ok(self.shim.force_delete(id)?)
    }

    /// Waits for the exit on the shim socket (async, no polling).
    fn wait_exit(&self, id: &str) -> BoxFuture<()> {
        let sock = self.shim.dir(id).join(hako_shim::state::SOCKET);
        Box::pin(async move {
            let wait = hako_shim::protocol::Request::Wait { timeout_ms: None };
            let _ = shim_request(&sock, &wait).await;
        })
    }

    /// The shim does both signals and answers at the exit; SIGKILL when the stop itself fails
    /// or the shim does not answer in `grace` + 10 s.
    fn stop(&self, id: &str, grace: Duration) -> BoxFuture<()> {
        use hako_shim::protocol::Request;
        let sock = self.shim.dir(id).join(hako_shim::state::SOCKET);
        Box::pin(async move {
            let grace_ms = u64::try_from(grace.as_millis()).unwrap_or(u64::MAX);
            let stop = Request::Stop { grace_ms };
            match tokio::time::timeout(grace + SHIM_ANSWER, shim_request(&sock, &stop)).await {
                Ok(Ok(_)) => {}
                _ => {
                    let kill = Request::Kill { signal: 9 };
                    let _ = tokio::time::timeout(SHIM_ANSWER, shim_request(&sock, &kill)).await;
                }
            }
        })
    }
}

/// Sandboxes under the run dir, networked by the CNI chain.
pub struct CniNetwork {
    /// CNI configuration.
    pub cni: CniConfig,
    /// Run dir (`sandboxes/` below it).
    pub run_dir: PathBuf,
}

impl PodNetwork for CniNetwork {
    fn list(&self) -> Vec<SandboxPaths> {
        sandbox::list(&self.run_dir)
    }

    fn present(&self, paths: &SandboxPaths) -> bool {
        paths.dir.exists()
    }

    fn exists(&self, paths: &SandboxPaths) -> bool {
        paths.exists()
    }

    fn create(
        &self,
        paths: &SandboxPaths,
        hostname: &str,
        host_network: bool,
        owner: &SandboxOwner,
        sysctls: &[(String, String)],
    ) -> Result<(), NetworkError> {
        Ok(sandbox::create(
            paths,
            hostname,
            host_network,
            owner,
            sysctls,
        )?)
    }

    fn add(&self, a: &Attachment) -> Result<Vec<String>, NetworkError> {
        Ok(cni::result_ips(&self.cni.add(a)?))
    }

    fn check(&self, a: &Attachment) -> Result<(), NetworkError> {
        Ok(self.cni.check(a)?)
    }

    /// CNI DEL (with the cached result and config, or with the current network list when
    /// nothing was cached, as libcni and containerd do), then the namespace mounts, the owner
    /// record and the directory. A failed DEL keeps the sandbox — its netns and owner record —
    /// so that a later pass can DEL again; nothing is dropped half torn down.
    fn teardown(
        &self,
        paths: &SandboxPaths,
        a: &Attachment,
        host_network: bool,
    ) -> Result<(), NetworkError> {
        if !host_network {
            let mut a = a.clone();
            if !paths.exists() {
                // Gone with a reboot or never mounted: DEL still releases addresses and host links.
                a.netns = PathBuf::new();
            }
            self.cni
                .del(&a)
                .map_err(|e| NetworkError::Del(e.to_string()))?;
        }
        Ok(sandbox::remove(paths)?)
    }
}

/// Volumes under the state root.
pub struct HostVolumes {
    /// The volume host (`<root>/pods/<uid>/volumes`).
    pub host: VolumeHost,
}

impl Volumes for HostVolumes {
    fn setup(&self, ctx: &PodContext) -> Result<PodVolumes, VolumeError> {
        volumes::setup_pod_volumes(&self.host, ctx)
    }

    fn refresh(&self, ctx: &PodContext, vols: &PodVolumes) -> Result<bool, VolumeError> {
        volumes::refresh_pod_volumes(&self.host, ctx, vols)
    }

    fn mounts_for_container(
        &self,
        vols: &PodVolumes,
        c: &Container,
    ) -> Result<Vec<MountSpec>, VolumeError> {
        volumes::mounts_for_container(vols, c)
    }

    fn teardown(&self, uid: &str) -> Result<(), VolumeError> {
        volumes::teardown_pod_volumes(&self.host, uid)
    }
}

/// The system clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// The pod record on disk, the manager's pod list and its status channel.
pub struct RecordSink {
    /// State root.
    pub root_dir: PathBuf,
    /// The manager's pods with status.
    pub pods: Arc<Mutex<BTreeMap<String, Pod>>>,
    /// The manager's status channel.
    pub status_tx: broadcast::Sender<PodStatusEvent>,
}

fn event_of(record: &PodRecord, terminated: bool) -> PodStatusEvent {
    let m = &record.pod.metadata;
    PodStatusEvent {
        uid: m.uid.clone().unwrap_or_default(),
        namespace: m.namespace.clone().unwrap_or_else(|| "default".into()),
        name: m.name.clone().unwrap_or_default(),
        status: record.pod.status.clone().unwrap_or_default(),
        terminated,
    }
}

impl StatusSink for RecordSink {
    fn publish(&self, record: &PodRecord) {
        let ev = event_of(record, false);
        if let Err(e) = state::write_record(&self.root_dir, record) {
            tracing::warn!(uid = %ev.uid, "writing status: {e}");
        }
        if let Ok(mut m) = self.pods.lock() {
            m.insert(ev.uid.clone(), record.pod.clone());
        }
        let _ = self.status_tx.send(ev);
    }

    fn removed(&self, record: &PodRecord) {
        let ev = event_of(record, true);
        if let Ok(mut m) = self.pods.lock() {
            m.remove(&ev.uid);
        }
        let _ = self.status_tx.send(ev);
    }
}

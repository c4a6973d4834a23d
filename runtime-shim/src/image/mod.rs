//! Image store: pulls through the OCI distribution API (`oci-client`; HTTP for loopback
//! registries, HTTPS with token auth otherwise), verifies every blob's digest, unpacks each
//! layer once into its own directory (content-addressed by blob digest) for overlayfs, and
//! records complete images only after every layer is in place. Pull policy, per-reference
//! pull de-duplication, disk accounting ([`usage`]) and safe deletion (an image's record goes
//! first, then the layers no other image and no container rootfs holds; a store-wide `flock`
//! keeps deletions out of a pull's window between finding a layer and recording its image). Where a registry is reached (mirrors, private CAs,
//! plain HTTP, `skip_verify`) comes from containerd-style `certs.d/<host>/hosts.toml` files
//! ([`hosts`]). Effectful (network, files).

pub mod hosts;
pub mod reference;
pub mod usage;

use crate::layer;
use hosts::{Endpoint, RegistryHosts, Scheme};
use oci_client::client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use reference::ImageRef;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Default image pull progress deadline (the kubelet's `--image-pull-progress-deadline`):
/// a pull with no bytes for this long is cancelled.
pub const DEFAULT_PROGRESS_DEADLINE: Duration = Duration::from_secs(60);

/// Image store errors, naming the image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The reference is invalid.
    #[error(transparent)]
    Reference(#[from] reference::ReferenceError),
    /// Pull policy Never and the image is not present.
    #[error("image {0} is not present and the pull policy is Never")]
    NotPresent(String),
    /// The registry refused or failed (unknown image, auth, network).
    #[error("pull {0}: {1}")]
    Registry(String, String),
    /// The registry host configuration (hosts.toml) of the image's registry is unusable.
    #[error("pull {0}: {1}")]
    Hosts(String, hosts::HostsError),
    /// A blob's content does not match its digest.
    #[error("pull {image}: blob {digest} does not match its digest (got {got})")]
    Digest {
        /// Image reference.
        image: String,
        /// Expected digest.
        digest: String,
        /// Computed digest.
        got: String,
    },
    /// Media type not supported.
    #[error("pull {0}: unsupported layer media type {1}")]
    MediaType(String, String),
    /// Unpacking a layer failed.
    #[error("pull {0}: {1}")]
    Layer(String, layer::LayerError),
    /// Store I/O failed.
    #[error("image store {0}: {1}")]
    Io(PathBuf, io::Error),
    /// The image config is not valid JSON.
    #[error("image {0}: bad config: {1}")]
    Config(String, ConfigError),
    /// The store lock stayed held for the whole wait: a deletion waiting for pulls (nothing
    /// deleted), or a pull waiting for a deletion (nothing pulled).
    #[error("image store {0}: locked by another pull or deletion for the whole wait, put off")]
    Busy(PathBuf),
    /// No bytes arrived for the progress deadline; the pull was cancelled.
    #[error("cancel pulling image {image} because of no progress for {}s, latest progress: {what} ({bytes} bytes)", .after.as_secs_f64())]
    Stalled {
        /// Image reference.
        image: String,
        /// What was being fetched (manifest and config, or a blob digest).
        what: String,
        /// Bytes of it received before the stall.
        bytes: u64,
        /// The progress deadline.
        after: Duration,
    },
}

/// Kubernetes image pull policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PullPolicy {
    /// Always resolve the reference at the registry.
    Always,
    /// Pull only when not present.
    IfNotPresent,
    /// Never pull.
    Never,
}

/// The parts of an image config a container needs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageConfig {
    /// `Entrypoint`.
    pub entrypoint: Vec<String>,
    /// `Cmd`.
    pub cmd: Vec<String>,
    /// `Env`.
    pub env: Vec<String>,
    /// `WorkingDir`.
    pub working_dir: Option<String>,
    /// `User`.
    pub user: Option<String>,
}

/// A complete image in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Image {
    /// Normalised reference.
    pub reference: String,
    /// Manifest digest.
    pub digest: String,
    /// Config digest (the image id).
    pub id: String,
    /// Config subset.
    pub config: ImageConfig,
    /// Layer blob digests, lowest first.
    pub layers: Vec<String>,
    /// Unpacked size of each layer in bytes.
    pub layer_sizes: Vec<u64>,
    /// Unix seconds of the pull.
    pub pulled_at: u64,
    /// Unix seconds of the last use.
    pub last_used: u64,
}

/// An image config that is not valid JSON of the expected shape.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct ConfigError(#[from] serde_json::Error);

/// Parse the parts of an image config JSON that matter. Pure.
pub fn parse_config(json: &str) -> Result<ImageConfig, ConfigError> {
    #[derive(Deserialize, Default)]
    #[serde(rename_all = "PascalCase", default)]
    struct C {
        entrypoint: Option<Vec<String>>,
        cmd: Option<Vec<String>>,
        env: Option<Vec<String>>,
        working_dir: Option<String>,
        user: Option<String>,
    }
    #[derive(Deserialize, Default)]
    #[serde(default)]
    struct Top {
        config: Option<C>,
    }
    let t: Top = serde_json::from_str(json)?;
    let c = t.config.unwrap_or_default();
    Ok(ImageConfig {
        entrypoint: c.entrypoint.unwrap_or_default(),
        cmd: c.cmd.unwrap_or_default(),
        env: c.env.unwrap_or_default(),
        working_dir: c.working_dir.filter(|w| !w.is_empty()),
        user: c.user.filter(|u| !u.is_empty()),
    })
}

/// The container process of an image under Kubernetes rules: `command` replaces the
/// Entrypoint (and drops Cmd), `args` replaces Cmd; env, working dir and user come from the
/// image config. Pure.
pub fn process_for(
    config: &ImageConfig,
    command: &[String],
    args: &[String],
) -> crate::spec::Process {
    let mut argv: Vec<String> = if command.is_empty() {
        config.entrypoint.clone()
    } else {
        command.to_vec()
    };
    if !args.is_empty() {
        argv.extend(args.iter().cloned());
    } else if command.is_empty() {
        argv.extend(config.cmd.iter().cloned());
    }
    crate::spec::Process {
        args: argv,
        env: config.env.clone(),
        cwd: config.working_dir.clone(),
        user: crate::spec::User {
            spec: config.user.clone().unwrap_or_default(),
            additional_gids: Vec::new(),
        },
        ..Default::default()
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn hex_of(digest: &str) -> Option<&str> {
    let h = digest.strip_prefix("sha256:")?;
    (h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit())).then_some(h)
}

fn dir_size(p: &Path) -> u64 {
    let mut total = 0;
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            if let Ok(m) = e.path().symlink_metadata() {
                total += m.len();
                if m.is_dir() {
                    total += dir_size(&e.path());
                }
            }
        }
    }
    total
}

/// An `oci-client` client for one endpoint: its scheme, its CAs added to the system roots,
/// `skip_verify`. Client certificates are refused: the HTTP client under `oci-client` 0.14 has
/// no way to present one, and pulling without it would only fail later and less clearly.
fn client_for(ep: &Endpoint) -> Result<oci_client::Client, ImageError> {
    let who = || format!("registry host {}", ep.url());
    if let Some((cert, _)) = ep.client.first() {
        return Err(ImageError::Registry(
            who(),
            format!(
                "client certificates (hosts.toml `client`, {}) are not supported yet",
                cert.display()
            ),
        ));
    }
    let mut extra = Vec::new();
    for p in &ep.ca {
        let pem = std::fs::read(p).map_err(|e| {
            ImageError::Hosts(
                who(),
                hosts::HostsError::Certificate {
                    what: "ca",
                    path: p.clone(),
                    host: ep.url(),
                    err: e,
                },
            )
        })?;
        let certs = pem_certificates(&pem);
        if certs.is_empty() {
            return Err(ImageError::Hosts(
                who(),
                hosts::HostsError::Certificate {
                    what: "ca",
                    path: p.clone(),
                    host: ep.url(),
                    err: io::Error::new(io::ErrorKind::InvalidData, "no PEM certificate in it"),
                },
            ));
        }
        extra.extend(certs.into_iter().map(|data| Certificate {
            encoding: CertificateEncoding::Pem,
            data,
        }));
    }
    let protocol = match ep.scheme {
        Scheme::Http => ClientProtocol::Http,
        Scheme::Https => ClientProtocol::Https,
    };
    oci_client::Client::try_from(ClientConfig {
        protocol,
        extra_root_certificates: extra,
        accept_invalid_certificates: ep.skip_verify,
        connect_timeout: Some(Duration::from_secs(30)),
        ..Default::default()
    })
    .map_err(|e| ImageError::Registry(who(), error_chain(&e)))
}

/// Each `CERTIFICATE` block of a PEM bundle on its own (the HTTP client reads one per call).
fn pem_certificates(pem: &[u8]) -> Vec<Vec<u8>> {
    const END: &str = "-----END CERTIFICATE-----";
    let text = String::from_utf8_lossy(pem);
    let mut out = Vec::new();
    let mut rest = text.as_ref();
    while let Some(b) = rest.find("-----BEGIN CERTIFICATE-----") {
        let Some(e) = rest[b..].find(END) else { break };
        out.push(format!("{}\n", &rest[b..b + e + END.len()]).into_bytes());
        rest = &rest[b + e + END.len()..];
    }
    out
}

/// The reference as sent to `ep`: the registry's own name for its default upstream, the
/// endpoint's host otherwise (the original registry then goes along as the `ns` parameter,
/// as containerd sends it to mirrors).
fn reference_for(
    base: &oci_client::Reference,
    ep: &Endpoint,
    registry: &str,
) -> oci_client::Reference {
    let mut r = base.clone();
    if !(ep.upstream && ep.host == hosts::default_upstream(registry).host) {
        r.set_mirror_registry(ep.host.clone());
    }
    r
}

/// An error with its sources (`reqwest` hides the TLS or connection reason in them).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        src = c.source();
    }
    s
}

/// An image error's text without the leading `pull <image>: `.
fn unprefixed(e: &ImageError, name: &str) -> String {
    let s = e.to_string();
    s.strip_prefix(&format!("pull {name}: "))
        .map(str::to_string)
        .unwrap_or(s)
}

/// The content-addressed image store.
pub struct ImageStore {
    root: PathBuf,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    progress_deadline: Duration,
    hosts: RegistryHosts,
}

/// Bytes received and when the last ones came, shared by a writer and its watchdog.
struct Progress {
    state: Mutex<(u64, Instant)>,
}

impl Progress {
    fn new() -> Self {
        Self {
            state: Mutex::new((0, Instant::now())),
        }
    }

    fn add(&self, n: usize) {
        if n > 0 {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            st.0 += n as u64;
            st.1 = Instant::now();
        }
    }

    fn get(&self) -> (u64, Instant) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Resolves once no bytes came for `deadline`, with the bytes received so far.
    async fn stalled(&self, deadline: Duration) -> u64 {
        loop {
            let (bytes, last) = self.get();
            let idle = last.elapsed();
            if idle >= deadline {
                return bytes;
            }
            tokio::time::sleep((deadline - idle).min(Duration::from_secs(1))).await;
        }
    }
}

/// An `AsyncWrite` that counts what goes through it into a [`Progress`].
struct ProgressWriter<'a, W> {
    inner: W,
    progress: &'a Progress,
}

impl<W: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for ProgressWriter<'_, W> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = &r {
            self.progress.add(*n);
        }
        r
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl ImageStore {
    /// `msg` with a pointer to the hosts.toml that would fix an untrusted certificate.
    fn tls_hint(&self, mut msg: String, registry: &str) -> String {
        if msg.contains("UnknownIssuer") || msg.contains("invalid peer certificate") {
            let file = match self.hosts.config_path() {
                Some(d) => d
                    .join(registry)
                    .join(hosts::HOSTS_FILE)
                    .display()
                    .to_string(),
                None => format!("<config_path>/{registry}/{}", hosts::HOSTS_FILE),
            };
            msg.push_str(&format!(
                " (a private CA is trusted with `ca = \"ca.crt\"` in {file}, like containerd's certs.d)"
            ));
        }
        msg
    }

    /// Open (create) a store; removes old leftovers of interrupted pulls.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, ImageError> {
        let root = root.into();
        // Leftovers of interrupted pulls (an hour old: a pull in another process may be
        // using younger ones).
        if let Ok(rd) = std::fs::read_dir(root.join("tmp")) {
            for e in rd.flatten() {
                let old = e
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age.as_secs() > 3600);
                if old {
                    let _ = std::fs::remove_dir_all(e.path());
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        for d in ["images", "layers", "tmp", "locks"] {
            let p = root.join(d);
            std::fs::create_dir_all(&p).map_err(|e| ImageError::Io(p, e))?;
        }
        Ok(Self {
            root,
            locks: Mutex::new(HashMap::new()),
            progress_deadline: DEFAULT_PROGRESS_DEADLINE,
            hosts: RegistryHosts::none(),
        })
    }

    /// The same store reaching registries as the hosts.toml files under `hosts` say
    /// (default: no configuration, each registry is its own upstream).
    pub fn with_registry_hosts(mut self, hosts: RegistryHosts) -> Self {
        self.hosts = hosts;
        self
    }

    /// The same store cancelling pulls that receive no bytes for `deadline` (the kubelet's
    /// `--image-pull-progress-deadline`; default [`DEFAULT_PROGRESS_DEADLINE`]).
    pub fn with_progress_deadline(mut self, deadline: Duration) -> Self {
        self.progress_deadline = deadline;
        self
    }

    fn image_file(&self, reference: &str) -> PathBuf {
        let h = hex::encode(Sha256::digest(reference.as_bytes()));
        self.root.join("images").join(format!("{h}.json"))
    }

    /// Directory of an unpacked layer.
    pub fn layer_dir(&self, digest: &str) -> PathBuf {
        self.root
            .join("layers")
            .join(hex_of(digest).unwrap_or("invalid"))
    }

    /// The layer directories of an image, lowest first (for [`crate::spec::Rootfs::Layers`]).
    pub fn layer_dirs(&self, image: &Image) -> Vec<PathBuf> {
        image.layers.iter().map(|d| self.layer_dir(d)).collect()
    }

    /// A complete image by reference (normalised here).
    pub fn get(&self, reference: &str) -> Result<Option<Image>, ImageError> {
        let r = reference::normalize(reference)?.to_string();
        let f = self.image_file(&r);
        match std::fs::read(&f) {
            Ok(data) => Ok(serde_json::from_slice(&data)
                .ok()
                .filter(|i| self.layers_present(i))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ImageError::Io(f, e)),
        }
    }

    /// Whether every layer of `image` is unpacked in the store: a record whose layers are
    /// gone (a deletion cut short, a hand-removed directory) is not an image.
    fn layers_present(&self, image: &Image) -> bool {
        image.layers.iter().all(|d| self.layer_dir(d).is_dir())
    }

    /// Every record, whole or not (for deletions, which must see every layer holder).
    fn records(&self) -> Result<Vec<Image>, ImageError> {
        let dir = self.root.join("images");
        let rd = std::fs::read_dir(&dir).map_err(|e| ImageError::Io(dir.clone(), e))?;
        Ok(rd
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .filter_map(|e| std::fs::read(e.path()).ok())
            .filter_map(|d| serde_json::from_slice(&d).ok())
            .collect())
    }

    /// Every complete image (its record written and every layer in place).
    pub fn list(&self) -> Result<Vec<Image>, ImageError> {
        let mut out: Vec<Image> = self
            .records()?
            .into_iter()
            .filter(|i| self.layers_present(i))
            .collect();
        out.sort_by(|a, b| a.reference.cmp(&b.reference));
        Ok(out)
    }

    /// Every complete image with its size on disk, the bytes deleting it alone would free
    /// (layers shared with other images excluded) and its last use.
    pub fn usage(&self) -> Result<Vec<usage::ImageUsage>, ImageError> {
        Ok(usage::usage_of(&self.list()?))
    }

    /// The store root (the image filesystem is the filesystem holding it).
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn write_image(&self, img: &Image) -> Result<(), ImageError> {
        let f = self.image_file(&img.reference);
        let data = serde_json::to_vec_pretty(img)
            .map_err(|e| ImageError::Io(f.clone(), io::Error::other(e)))?;
        crate::durable::write_file(&f, &data, 0o644).map_err(|e| ImageError::Io(f, e))
    }

    /// Record a use (for GC ordering): a container is being created from the image. The
    /// record is rewritten at most once a minute per image.
    pub fn mark_used(&self, reference: &str) -> Result<(), ImageError> {
        if let Some(img) = self.get(reference)? {
            self.touch(img)?;
        }
        Ok(())
    }

    fn touch(&self, mut img: Image) -> Result<Image, ImageError> {
        let t = now();
        if t.saturating_sub(img.last_used) >= MARK_USED_GRANULARITY {
            img.last_used = t;
            self.write_image(&img)?;
        }
        Ok(img)
    }

    /// The store-wide lock: shared by a pull from its first layer to its record, exclusive
    /// for a deletion. `wait` bounds how long a deletion waits for running pulls.
    fn store_lock(
        &self,
        exclusive: bool,
        wait: Duration,
    ) -> Result<nix::fcntl::Flock<std::fs::File>, ImageError> {
        store_lock_at(&self.root, exclusive, wait)
    }

    /// Deletes a layer directory: renamed into `tmp/` first (one atomic step, so no
    /// half-deleted layer ever sits under `layers/`), then removed.
    /// Returns whether the layer was there.
    fn delete_layer(&self, digest: &str) -> Result<bool, ImageError> {
        let Some(hex) = hex_of(digest) else {
            return Ok(false);
        };
        self.delete_layer_dir(hex)
    }

    fn delete_layer_dir(&self, hex: &str) -> Result<bool, ImageError> {
        let from = self.root.join("layers").join(hex);
        let to = self
            .root
            .join("tmp")
            .join(format!("del-{hex}-{}", hex::encode(rand_bytes())));
        match std::fs::rename(&from, &to) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(ImageError::Io(from, e)),
        }
        fsync_dir(&self.root.join("layers")).map_err(|e| ImageError::Io(from, e))?;
        std::fs::remove_dir_all(&to).map_err(|e| ImageError::Io(to, e))?;
        Ok(true)
    }

    /// Deletes one image: its record first (durably: from then on it is not an image), then
    /// its layers that no other record holds and that are not in `keep_layers` (layer
    /// digests a container's rootfs uses). Returns the bytes freed (the recorded unpacked
    /// sizes of the deleted layers); 0 when the image is not in the store. Waits up to
    /// `wait` for running pulls ([`ImageError::Busy`] after that).
    pub fn delete_image(
        &self,
        reference: &str,
        keep_layers: &HashSet<String>,
        wait: Duration,
    ) -> Result<u64, ImageError> {
        let r = reference::normalize(reference)?.to_string();
        let _lock = self.store_lock(true, wait)?;
        let all = self.records()?;
        let Some(img) = all.iter().find(|i| i.reference == r).cloned() else {
            return Ok(0);
        };
        let mut tracker = usage::FreeTracker::new(&all, keep_layers);
        tracker.remove(&img);
        let f = self.image_file(&r);
        match std::fs::remove_file(&f) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(ImageError::Io(f, e)),
        }
        fsync_dir(&self.root.join("images")).map_err(|e| ImageError::Io(f, e))?;
        let mut freed = 0;
        for d in tracker.unreferenced(&img) {
            if self.delete_layer(d)? {
                let n = img.layers.iter().position(|l| l == d);
                freed += n.and_then(|n| img.layer_sizes.get(n)).copied().unwrap_or(0);
            }
        }
        tracing::info!(image = %r, freed, "image deleted");
        Ok(freed)
    }

    /// Deletes what deletions or pulls cut short left: layer directories no record holds and
    /// `keep_layers` does not name, and half-deleted layers in `tmp/`. Returns the bytes of
    /// the orphaned layers removed. Skipped (0) while a pull holds the store past `wait`.
    pub fn prune(&self, keep_layers: &HashSet<String>, wait: Duration) -> Result<u64, ImageError> {
        let _lock = match self.store_lock(true, wait) {
            Ok(l) => l,
            Err(ImageError::Busy(_)) => return Ok(0),
            Err(e) => return Err(e),
        };
        let held: HashSet<String> = self
            .records()?
            .iter()
            .flat_map(|i| {
                i.layers
                    .iter()
                    .filter_map(|d| hex_of(d).map(str::to_string))
            })
            .chain(
                keep_layers
                    .iter()
                    .filter_map(|d| hex_of(d).map(str::to_string)),
            )
            .collect();
        let dir = self.root.join("layers");
        let rd = std::fs::read_dir(&dir).map_err(|e| ImageError::Io(dir.clone(), e))?;
        let mut freed = 0;
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if !held.contains(&n) {
                let size = dir_size(&e.path());
                if self.delete_layer_dir(&n).unwrap_or(false) {
                    freed += size;
                }
            }
        }
        let tmp = self.root.join("tmp");
        if let Ok(rd) = std::fs::read_dir(&tmp) {
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().starts_with("del-") {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        Ok(freed)
    }

    /// Make `reference` present according to `policy` and record the use (the agent calls
    /// it for every container it creates); concurrent calls for the same reference do the
    /// work once. `docker_config` is a docker config JSON with credentials.
    pub async fn ensure(
        &self,
        reference: &str,
        policy: PullPolicy,
        docker_config: Option<&str>,
    ) -> Result<Image, ImageError> {
        let r = reference::normalize(reference)?;
        let name = r.to_string();
        if policy != PullPolicy::Always {
            if let Some(img) = self.get(&name)? {
                return self.touch(img);
            }
            if policy == PullPolicy::Never {
                return Err(ImageError::NotPresent(name));
            }
        }
        let lock = {
            let mut m = self.locks.lock().unwrap_or_else(|e| e.into_inner());
            m.entry(name.clone()).or_default().clone()
        };
        let _g = lock.lock().await;
        // Other processes pulling into the same store: an exclusive flock per reference.
        let lock_path = self.root.join("locks").join(format!(
            "{}.lock",
            hex::encode(Sha256::digest(name.as_bytes()))
        ));
        let lp = lock_path.clone();
        let _flock =
            tokio::task::spawn_blocking(move || -> io::Result<nix::fcntl::Flock<std::fs::File>> {
                let f = std::fs::OpenOptions::new()
                    .create(true)
                    .write(true)
                    .truncate(false)
                    .open(&lp)?;
                nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
                    .map_err(|(_, e)| io::Error::from(e))
            })
            .await
            .map_err(|e| ImageError::Io(lock_path.clone(), io::Error::other(e)))?
            .map_err(|e| ImageError::Io(lock_path.clone(), e))?;
        if policy == PullPolicy::IfNotPresent {
            if let Some(img) = self.get(&name)? {
                return self.touch(img);
            }
        }
        // Shared with other pulls, exclusive with deletions: no layer this pull finds in
        // place is deleted before its record is written.
        // Bounded: a deletion holding the lock for longer than that (a stuck `images prune`)
        // fails the pull with `Busy`, to be retried with the pull back-off.
        let store_lock = {
            let root = self.root.clone();
            tokio::task::spawn_blocking(move || store_lock_at(&root, false, PULL_STORE_LOCK_WAIT))
                .await
                .map_err(|e| ImageError::Io(self.root.clone(), io::Error::other(e)))??
        };
        let r = self.pull(&r, docker_config).await;
        drop(store_lock);
        r
    }

    /// [`ImageStore::ensure`] on a private current-thread runtime, for synchronous callers.
    pub fn ensure_blocking(
        &self,
        reference: &str,
        policy: PullPolicy,
        docker_config: Option<&str>,
    ) -> Result<Image, ImageError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| ImageError::Io(self.root.clone(), e))?;
        rt.block_on(self.ensure(reference, policy, docker_config))
    }

    async fn pull(&self, r: &ImageRef, docker_config: Option<&str>) -> Result<Image, ImageError> {
        let name = r.to_string();
        let span = tracing::info_span!("pull", image = %name);
        let _e = span.enter();
        let endpoints = self
            .hosts
            .endpoints(&r.registry)
            .map_err(|e| ImageError::Hosts(name.clone(), e))?;
        let base: oci_client::Reference = name.parse().map_err(|e: oci_client::ParseError| {
            ImageError::Registry(name.clone(), e.to_string())
        })?;
        let candidates: Vec<&Endpoint> = endpoints
            .iter()
            .filter(|e| e.can_fetch(r.digest.is_some()))
            .collect();
        if candidates.is_empty() {
            return Err(ImageError::Registry(
                name.clone(),
                format!(
                    "no host in the registry configuration of {} may {} it",
                    r.registry,
                    if r.digest.is_some() {
                        "pull"
                    } else {
                        "resolve"
                    }
                ),
            ));
        }
        // Mirrors in order, then the upstream (containerd's hosts order): the first that
        // serves the manifest and config is used for the layers too.
        let mut failures: Vec<String> = Vec::new();
        let mut last_err = None;
        let mut chosen = None;
        for ep in &candidates {
            let attempt = async {
                let client = client_for(ep)?;
                let oref = reference_for(&base, ep, &r.registry);
                let creds_host = if ep.upstream { &r.registry } else { &ep.host };
                let auth = match docker_config {
                    Some(c) => match reference::credentials(c, creds_host)? {
                        Some((u, p)) => RegistryAuth::Basic(u, p),
                        None => RegistryAuth::Anonymous,
                    },
                    None => RegistryAuth::Anonymous,
                };
                // Manifest and config are small documents: no progress for the deadline is
                // the same as not done within it.
                let got = tokio::time::timeout(
                    self.progress_deadline,
                    client.pull_manifest_and_config(&oref, &auth),
                )
                .await
                .map_err(|_| ImageError::Stalled {
                    image: name.clone(),
                    what: format!("manifest and config from {}", ep.url()),
                    bytes: 0,
                    after: self.progress_deadline,
                })?
                .map_err(|e| {
                    ImageError::Registry(name.clone(), self.tls_hint(error_chain(&e), &r.registry))
                })?;
                Ok::<_, ImageError>((client, oref, got))
            };
            match attempt.await {
                Ok(x) => {
                    if !ep.upstream {
                        tracing::info!(mirror = %ep.url(), "resolved through a mirror");
                    }
                    chosen = Some(x);
                    break;
                }
                Err(e) => {
                    tracing::warn!(host = %ep.url(), error = %e, "registry host failed");
                    failures.push(format!("{}: {}", ep.url(), unprefixed(&e, &name)));
                    last_err = Some(e);
                }
            }
        }
        let Some((client, oref, (manifest, digest, config))) = chosen else {
            return Err(match last_err {
                Some(e) if candidates.len() == 1 => e,
                _ => ImageError::Registry(
                    name.clone(),
                    format!("every registry host failed: {}", failures.join("; ")),
                ),
            });
        };
        if let Some(want) = &r.digest {
            if want != &digest {
                return Err(ImageError::Digest {
                    image: name.clone(),
                    digest: want.clone(),
                    got: digest,
                });
            }
        }
        let got = format!("sha256:{}", hex::encode(Sha256::digest(config.as_bytes())));
        if got != manifest.config.digest {
            return Err(ImageError::Digest {
                image: name.clone(),
                digest: manifest.config.digest.clone(),
                got,
            });
        }
        let cfg = parse_config(&config).map_err(|e| ImageError::Config(name.clone(), e))?;
        let mut layers = Vec::new();
        let mut sizes = Vec::new();
        for l in &manifest.layers {
            let mt = l.media_type.as_str();
            let ok = mt.ends_with(".tar")
                || mt.ends_with("tar+gzip")
                || mt.ends_with("tar.gzip")
                || mt.ends_with("tar+zstd");
            if !ok || mt.contains("nondistributable") || mt.contains("foreign") {
                return Err(ImageError::MediaType(name.clone(), mt.to_string()));
            }
            let hex = hex_of(&l.digest).ok_or_else(|| ImageError::Digest {
                image: name.clone(),
                digest: l.digest.clone(),
                got: "unsupported digest algorithm".into(),
            })?;
            let dest = self.layer_dir(&l.digest);
            if !dest.exists() {
                let work = self.root.join("tmp").join(hex::encode(rand_bytes()));
                let res = self
                    .fetch_layer(&client, &oref, l, &work, &dest, &name)
                    .await;
                let _ = std::fs::remove_dir_all(&work);
                let _ = std::fs::remove_file(work.with_extension("blob"));
                res?;
            }
            tracing::debug!(layer = %hex, "layer ready");
            sizes.push(dir_size(&dest));
            layers.push(l.digest.clone());
        }
        let img = Image {
            reference: name.clone(),
            digest,
            id: manifest.config.digest.clone(),
            config: cfg,
            layers,
            layer_sizes: sizes,
            pulled_at: now(),
            last_used: now(),
        };
        self.write_image(&img)?;
        tracing::info!(digest = %img.digest, "pulled");
        Ok(img)
    }

    async fn fetch_layer(
        &self,
        client: &oci_client::Client,
        oref: &oci_client::Reference,
        l: &oci_client::manifest::OciDescriptor,
        work: &Path,
        dest: &Path,
        name: &str,
    ) -> Result<(), ImageError> {
        let blob = work.with_extension("blob");
        let f = tokio::fs::File::create(&blob)
            .await
            .map_err(|e| ImageError::Io(blob.clone(), e))?;
        let progress = Progress::new();
        let mut w = ProgressWriter {
            inner: tokio::io::BufWriter::new(f),
            progress: &progress,
        };
        // Cancelled (the download dropped, its connection closed) once no bytes came for the
        // progress deadline.
        tokio::select! {
            r = client.pull_blob(oref, l, &mut w) => {
                r.map_err(|e| ImageError::Registry(name.to_string(), e.to_string()))?;
            }
            bytes = progress.stalled(self.progress_deadline) => {
                return Err(ImageError::Stalled {
                    image: name.to_string(),
                    what: format!("blob {}", l.digest),
                    bytes,
                    after: self.progress_deadline,
                });
            }
        }
        tokio::io::AsyncWriteExt::flush(&mut w)
            .await
            .map_err(|e| ImageError::Io(blob.clone(), e))?;
        drop(w);
        let (blob2, work2, dest2, name2, want) = (
            blob.clone(),
            work.to_path_buf(),
            dest.to_path_buf(),
            name.to_string(),
            l.digest.clone(),
        );
        tokio::task::spawn_blocking(move || -> Result<(), ImageError> {
            let got = {
                let mut f =
                    std::fs::File::open(&blob2).map_err(|e| ImageError::Io(blob2.clone(), e))?;
                let mut h = Sha256::new();
                io::copy(&mut f, &mut h).map_err(|e| ImageError::Io(blob2.clone(), e))?;
                format!("sha256:{}", hex::encode(h.finalize()))
            };
            if got != want {
                return Err(ImageError::Digest {
                    image: name2,
                    digest: want,
                    got,
                });
            }
            std::fs::create_dir_all(&work2).map_err(|e| ImageError::Io(work2.clone(), e))?;
            let f = std::fs::File::open(&blob2).map_err(|e| ImageError::Io(blob2.clone(), e))?;
            layer::unpack(f, &work2).map_err(|e| ImageError::Layer(name2.clone(), e))?;
            match std::fs::rename(&work2, &dest2) {
                Ok(()) => Ok(()),
                // Another pull of an image sharing this layer finished first.
                Err(_) if dest2.exists() => Ok(()),
                Err(e) => Err(ImageError::Io(dest2, e)),
            }
        })
        .await
        .map_err(|e| ImageError::Io(blob.clone(), io::Error::other(e)))?
    }

    /// Remove an image record and the layers no other image uses (waits for running pulls).
    pub fn remove(&self, reference: &str) -> Result<(), ImageError> {
        self.delete_image(reference, &HashSet::new(), Duration::from_secs(600))
            .map(|_| ())
    }

    /// Total bytes of unpacked layers (each counted once).
    pub fn size(&self) -> Result<u64, ImageError> {
        Ok(usage::total_size(&self.list()?))
    }

    /// Remove images not in `in_use` (normalised references or image ids), least recently
    /// used first, until the store is at most `target_bytes`. Returns the removed references.
    pub fn gc(
        &self,
        in_use: &HashSet<String>,
        target_bytes: u64,
    ) -> Result<Vec<String>, ImageError> {
        let mut imgs = self.list()?;
        usage::lru_order(&mut imgs);
        let mut removed = Vec::new();
        for i in imgs {
            if self.size()? <= target_bytes {
                break;
            }
            if in_use.contains(&i.reference) || in_use.contains(&i.id) || in_use.contains(&i.digest)
            {
                continue;
            }
            self.remove(&i.reference)?;
            removed.push(i.reference);
        }
        Ok(removed)
    }
}

/// A present image's record is rewritten for a new use at most this often (seconds).
const MARK_USED_GRANULARITY: u64 = 60;

/// Makes a directory's entries (a rename, a removal) durable.
fn fsync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

fn rand_bytes() -> [u8; 8] {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let seed = format!("{t}-{}-{n}", std::process::id());
    let mut b = [0u8; 8];
    b.copy_from_slice(&Sha256::digest(seed.as_bytes())[..8]);
    b
}

/// How long a pull waits for deletions to release the store lock.
const PULL_STORE_LOCK_WAIT: Duration = Duration::from_secs(120);

/// The store-wide lock of the store at `root` (see [`ImageStore::store_lock`]), waited for at
/// most `wait` ([`ImageError::Busy`] after that).
fn store_lock_at(
    root: &Path,
    exclusive: bool,
    wait: Duration,
) -> Result<nix::fcntl::Flock<std::fs::File>, ImageError> {
    use nix::fcntl::{Flock, FlockArg};
    let p = root.join("locks").join("store.lock");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(&p)
        .map_err(|e| ImageError::Io(p.clone(), e))?;
    let arg = if exclusive {
        FlockArg::LockExclusiveNonblock
    } else {
        FlockArg::LockSharedNonblock
    };
    let deadline = Instant::now() + wait;
    loop {
        match Flock::lock(f, arg) {
            Ok(l) => return Ok(l),
            Err((back, nix::errno::Errno::EWOULDBLOCK)) if Instant::now() < deadline => {
                f = back;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => return Err(ImageError::Busy(p)),
            Err((_, e)) => return Err(ImageError::Io(p, io::Error::from(e))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes keep a download alive; silence for the deadline ends it.
    #[tokio::test]
    async fn progress_deadline_counts_silence_not_total_time() {
        let progress = Progress::new();
        let mut w = ProgressWriter {
            inner: Vec::new(),
            progress: &progress,
        };
        let deadline = Duration::from_millis(300);
        let feed = async {
            // 1 s of steady bytes (longer than the deadline), then silence.
            for _ in 0..10 {
                tokio::io::AsyncWriteExt::write_all(&mut w, b"0123456789")
                    .await
                    .expect("write");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            std::future::pending::<()>().await;
        };
        let t0 = Instant::now();
        let bytes = tokio::select! {
            () = feed => unreachable!("the feed never ends"),
            b = progress.stalled(deadline) => b,
        };
        assert_eq!(bytes, 100);
        assert!(t0.elapsed() >= Duration::from_millis(900 + 300));
    }

    #[test]
    fn config_subset() {
        let c = parse_config(
            r#"{"architecture":"amd64","config":{"Entrypoint":["/bin/sh"],"Cmd":["-c","x"],"Env":["A=1"],"WorkingDir":"/w","User":"app"}}"#,
        )
        .unwrap();
        assert_eq!(c.entrypoint, ["/bin/sh"]);
        assert_eq!(c.user.as_deref(), Some("app"));
        assert_eq!(
            parse_config(r#"{"config":{"WorkingDir":""}}"#).unwrap(),
            ImageConfig::default()
        );
        assert!(parse_config("[").is_err());
    }

    #[test]
    fn kubernetes_command_rules() {
        let c = ImageConfig {
            entrypoint: vec!["ep".into()],
            cmd: vec!["c1".into()],
            user: Some("app".into()),
            ..Default::default()
        };
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        for (cmd, args, want) in [
            (s(&[]), s(&[]), s(&["ep", "c1"])),
            (s(&[]), s(&["a"]), s(&["ep", "a"])),
            (s(&["x"]), s(&[]), s(&["x"])),
            (s(&["x"]), s(&["a"]), s(&["x", "a"])),
        ] {
            assert_eq!(process_for(&c, &cmd, &args).args, want);
        }
        assert_eq!(process_for(&c, &[], &[]).user.spec, "app");
    }

    #[tokio::test]
    async fn policy_never_and_bad_refs() {
        let d = tempfile::tempdir().unwrap();
        let s = ImageStore::open(d.path()).unwrap();
        assert!(matches!(
            s.ensure("busybox", PullPolicy::Never, None).await,
            Err(ImageError::NotPresent(r)) if r == "docker.io/library/busybox:latest"
        ));
        assert!(matches!(
            s.ensure("Bad Ref", PullPolicy::Always, None).await,
            Err(ImageError::Reference(_))
        ));
        assert_eq!(s.list().unwrap(), vec![]);
        assert_eq!(s.gc(&HashSet::new(), 0).unwrap(), Vec::<String>::new());
    }

    fn fake_image(s: &ImageStore, reference: &str, layers: &[(char, usize)]) -> Image {
        let mut img = Image {
            reference: reference::normalize(reference).unwrap().to_string(),
            digest: format!("sha256:{}", "d".repeat(64)),
            id: format!("sha256:{}", "e".repeat(64)),
            config: ImageConfig::default(),
            layers: vec![],
            layer_sizes: vec![],
            pulled_at: 1,
            last_used: 1,
        };
        for (c, size) in layers {
            let d = format!("sha256:{}", c.to_string().repeat(64));
            let dir = s.layer_dir(&d);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("f"), vec![0u8; *size]).unwrap();
            img.layer_sizes.push(dir_size(&dir));
            img.layers.push(d);
        }
        s.write_image(&img).unwrap();
        img
    }

    #[test]
    fn deletion_spares_shared_and_container_layers_and_half_deleted_is_absent() {
        let d = tempfile::tempdir().unwrap();
        let s = ImageStore::open(d.path()).unwrap();
        let a = fake_image(&s, "a", &[('0', 1000), ('1', 10)]);
        let b = fake_image(&s, "b", &[('0', 1000), ('2', 20), ('3', 30)]);
        let u = s.usage().unwrap();
        assert_eq!((u[0].size, u[0].unique_size), (1010, 10));
        assert_eq!((u[1].size, u[1].unique_size), (1050, 50));
        assert_eq!(s.size().unwrap(), 1060);
        // b goes while a container's rootfs holds its layer 2: only layer 3 is freed.
        let keep: HashSet<String> = [b.layers[1].clone()].into();
        let w = Duration::from_secs(1);
        assert_eq!(s.delete_image("b", &keep, w).unwrap(), 30);
        assert!(s.get("b").unwrap().is_none());
        assert!(s.layer_dir(&b.layers[0]).is_dir(), "shared with a");
        assert!(s.layer_dir(&b.layers[1]).is_dir(), "held by a container");
        assert!(!s.layer_dir(&b.layers[2]).exists());
        assert_eq!(s.get("a").unwrap(), Some(a.clone()));
        // Once the container is gone, the orphaned layer is pruned; a's layers stay.
        assert_eq!(s.prune(&HashSet::new(), w).unwrap(), 20);
        assert!(!s.layer_dir(&b.layers[1]).exists());
        assert!(s.layer_dir(&a.layers[1]).is_dir());
        // A record whose layer is gone (a deletion cut short) is not an image.
        std::fs::remove_dir_all(s.layer_dir(&a.layers[1])).unwrap();
        assert!(s.get("a").unwrap().is_none());
        assert!(s.list().unwrap().is_empty());
        // Deleting it frees what is left (its record goes, then the base layer).
        assert_eq!(s.delete_image("a", &HashSet::new(), w).unwrap(), 1000);
        assert!(!s.layer_dir(&a.layers[0]).exists());
        assert_eq!(s.delete_image("a", &HashSet::new(), w).unwrap(), 0);
        assert_eq!(std::fs::read_dir(d.path().join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn deletion_waits_for_pulls_then_gives_up() {
        let d = tempfile::tempdir().unwrap();
        let s = ImageStore::open(d.path()).unwrap();
        fake_image(&s, "a", &[('0', 10)]);
        // A pull holds the store (shared).
        let pull = s.store_lock(false, Duration::ZERO).unwrap();
        assert!(matches!(
            s.delete_image("a", &HashSet::new(), Duration::from_millis(100)),
            Err(ImageError::Busy(_))
        ));
        assert_eq!(s.prune(&HashSet::new(), Duration::ZERO).unwrap(), 0);
        assert!(s.get("a").unwrap().is_some());
        drop(pull);
        assert_eq!(
            s.delete_image("a", &HashSet::new(), Duration::ZERO)
                .unwrap(),
            10
        );
    }

    #[test]
    fn pem_bundles_split_into_certificates() {
        let one = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----";
        let bundle = format!("junk\n{one}\n# comment\n{one}\n");
        let certs = pem_certificates(bundle.as_bytes());
        assert_eq!(certs.len(), 2);
        assert_eq!(certs[0], format!("{one}\n").into_bytes());
        assert!(pem_certificates(b"-----BEGIN CERTIFICATE-----\nno end").is_empty());
        assert!(pem_certificates(b"").is_empty());
    }
}

//! Image GC, as the kubelet's `image_gc_manager.go`: every `period` (5 min) the usage of the
//! image filesystem (the filesystem of `<root>/images`) is measured; at or above
//! `--image-gc-high-threshold` (85 %) unused images are deleted, least recently used first,
//! until usage is at most `--image-gc-low-threshold` (80 %). An image is used when a pod on
//! the node names it (pods waiting to start included) or a container the agent created from it
//! still exists; images pulled less than `--minimum-image-ttl-duration` (2 min) ago stay.
//! Layers a container's rootfs uses are never deleted, even when their image goes.
//! [`ImageGc::reclaim`] is the same deletion for the eviction manager.
//!
//! The planning ([`amount_to_free`], [`plan`]) is pure; [`ImageGc`] is effectful (statvfs,
//! pod records, shim state, the image store, node events).

use crate::model::record::PodRecord;
use crate::sys::{runtime, state};
use hako_shim::image::usage::{lru_order, FreeTracker, ImageUsage};
use hako_shim::image::{Image, ImageError, ImageStore};
use k8s_openapi::chrono::Utc;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Default `--image-gc-high-threshold` (percent of the image filesystem).
pub const DEFAULT_HIGH_THRESHOLD: u8 = 85;
/// Default `--image-gc-low-threshold`.
pub const DEFAULT_LOW_THRESHOLD: u8 = 80;
/// Default `--minimum-image-ttl-duration`.
pub const DEFAULT_MIN_AGE: Duration = Duration::from_secs(120);
/// The kubelet's image GC period.
pub const DEFAULT_PERIOD: Duration = Duration::from_secs(300);
/// How long a deletion waits for running pulls before it is put off to the next run.
const STORE_WAIT: Duration = Duration::from_secs(10);

/// Image GC errors.
#[derive(Debug, thiserror::Error)]
pub enum ImageGcError {
    /// The thresholds are not percentages or low is not below high.
    #[error("invalid image GC policy: {0}")]
    Policy(String),
    /// statvfs of the image filesystem failed.
    #[error("statfs of the image filesystem {0}: {1}")]
    Stats(PathBuf, std::io::Error),
    /// The image filesystem reports no capacity (kubelet: InvalidDiskCapacity).
    #[error("invalid capacity 0 on image filesystem")]
    InvalidCapacity,
    /// Fewer bytes could be freed than the low threshold needs (kubelet's message).
    #[error("Failed to garbage collect required amount of images. Attempted to free {wanted} bytes, but only found {freed} bytes eligible to free.")]
    NotEnough {
        /// Bytes to free.
        wanted: u64,
        /// Bytes freed.
        freed: u64,
    },
    /// The image store failed.
    #[error(transparent)]
    Store(#[from] ImageError),
    /// The GC task ended abnormally.
    #[error("image GC task: {0}")]
    Task(String),
}

/// The image GC policy (kubelet `ImageGCPolicy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageGcPolicy {
    /// GC runs when usage is at or above this percent (`--image-gc-high-threshold`, 85; 100
    /// turns image GC off).
    pub high_threshold_percent: u8,
    /// GC frees down to this percent (`--image-gc-low-threshold`, 80).
    pub low_threshold_percent: u8,
    /// Images pulled less than this ago are kept (`--minimum-image-ttl-duration`, 2m).
    pub min_age: Duration,
    /// How often usage is checked (5 min; shorter in tests).
    pub period: Duration,
}

impl Default for ImageGcPolicy {
    fn default() -> Self {
        Self {
            high_threshold_percent: DEFAULT_HIGH_THRESHOLD,
            low_threshold_percent: DEFAULT_LOW_THRESHOLD,
            min_age: DEFAULT_MIN_AGE,
            period: DEFAULT_PERIOD,
        }
    }
}

impl ImageGcPolicy {
    /// The kubelet's checks: both thresholds 0-100, low below high.
    pub fn validate(&self) -> Result<(), ImageGcError> {
        let (h, l) = (self.high_threshold_percent, self.low_threshold_percent);
        if h > 100 {
            return Err(ImageGcError::Policy(format!(
                "--image-gc-high-threshold {h} must be between 0 and 100"
            )));
        }
        if l > 100 {
            return Err(ImageGcError::Policy(format!(
                "--image-gc-low-threshold {l} must be between 0 and 100"
            )));
        }
        if l >= h {
            return Err(ImageGcError::Policy(format!(
                "--image-gc-low-threshold ({l}) must be less than --image-gc-high-threshold ({h})"
            )));
        }
        Ok(())
    }

    /// Whether image GC is off (high threshold 100, as the kubelet).
    pub fn disabled(&self) -> bool {
        self.high_threshold_percent >= 100
    }
}

/// The bytes to free when usage is at or above the high threshold: down to the low one
/// (kubelet: `usagePercent = 100 - available*100/capacity`; `amountToFree =
/// capacity*(100-low)/100 - available`). Pure.
pub fn amount_to_free(
    capacity: u64,
    available: u64,
    policy: &ImageGcPolicy,
) -> Result<Option<u64>, ImageGcError> {
    if capacity == 0 {
        return Err(ImageGcError::InvalidCapacity);
    }
    let available = available.min(capacity);
    let usage = 100 - u128::from(available) * 100 / u128::from(capacity);
    if usage < u128::from(policy.high_threshold_percent) {
        return Ok(None);
    }
    let target =
        u128::from(capacity) * u128::from(100 - policy.low_threshold_percent.min(100)) / 100;
    let amount = target.saturating_sub(u128::from(available));
    Ok(Some(u64::try_from(amount).unwrap_or(u64::MAX)))
}

/// What the node uses: image references and ids named by pods and containers, and the layer
/// digests container rootfs are made of.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InUse {
    /// Normalised references and image ids (config digests) or manifest digests.
    pub images: HashSet<String>,
    /// Layer digests (`sha256:<hex>`) of container rootfs.
    pub layers: HashSet<String>,
}

impl InUse {
    /// Whether `image` is in use.
    pub fn uses(&self, image: &Image) -> bool {
        self.images.contains(&image.reference)
            || self.images.contains(&image.id)
            || self.images.contains(&image.digest)
    }

    /// Adds a reference as a pod or container names it (normalised; a bad one is skipped).
    pub fn add_reference(&mut self, reference: &str) {
        if reference.is_empty() {
            return;
        }
        if let Ok(r) = hako_shim::image::reference::normalize(reference) {
            self.images.insert(r.to_string());
        }
        // Status image ids may carry a scheme (`docker-pullable://…@sha256:…`).
        if let Some((_, d)) = reference.rsplit_once('@') {
            self.images.insert(d.to_string());
        }
    }
}

/// The images to delete and the bytes that frees. Pure.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// References, in deletion order.
    pub remove: Vec<String>,
    /// Bytes the deletions free (layers shared with kept images or used by containers are
    /// not counted).
    pub freed: u64,
}

/// The images to delete to free `bytes_to_free`: unused ones, least recently used first,
/// none pulled less than `min_age` before `now` (Unix seconds). Stops once enough is freed.
pub fn plan(
    images: &[Image],
    in_use: &InUse,
    now: u64,
    min_age: Duration,
    bytes_to_free: u64,
) -> Plan {
    let mut order = images.to_vec();
    lru_order(&mut order);
    let mut tracker = FreeTracker::new(images, &in_use.layers);
    let mut out = Plan::default();
    for i in &order {
        if out.freed >= bytes_to_free {
            break;
        }
        if in_use.uses(i) {
            continue;
        }
        if now.saturating_sub(i.pulled_at) < min_age.as_secs() {
            tracing::debug!(image = %i.reference, "image is younger than the minimum GC age, skipping");
            continue;
        }
        out.freed += tracker.remove(i);
        out.remove.push(i.reference.clone());
    }
    out
}

/// Capacity and available bytes of a filesystem.
pub trait FsStats: Send + Sync {
    /// `(capacity, available)` in bytes of the filesystem holding `path`.
    fn stats(&self, path: &Path) -> std::io::Result<(u64, u64)>;
}

/// statvfs(2).
pub struct Statvfs;

impl FsStats for Statvfs {
    fn stats(&self, path: &Path) -> std::io::Result<(u64, u64)> {
        let s = nix::sys::statvfs::statvfs(path).map_err(std::io::Error::from)?;
        let frag = s.fragment_size();
        Ok((
            s.blocks().saturating_mul(frag),
            s.blocks_available().saturating_mul(frag),
        ))
    }
}

/// One image deleted by the GC.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Deleted {
    /// Reference.
    pub reference: String,
    /// Bytes freed.
    pub freed: u64,
}

/// The image GC of one node (effectful).
#[derive(Clone)]
pub struct ImageGc {
    store: Arc<ImageStore>,
    policy: ImageGcPolicy,
    root_dir: PathBuf,
    shim_state_root: PathBuf,
    fs: Arc<dyn FsStats>,
    /// One collection at a time (the periodic one, the eviction manager's, the CLI's).
    running: Arc<tokio::sync::Mutex<()>>,
    failed_before: Arc<AtomicBool>,
}

/// The eviction manager's node-level disk reclaim: unused images go first (the kubelet's
/// `DeleteUnusedImages` before it evicts for disk pressure).
impl crate::eviction::NodeReclaim for ImageGc {
    fn reclaim_disk(&self, bytes: u64) -> crate::eviction::ReclaimFuture<'_> {
        Box::pin(async move {
            self.reclaim(bytes)
                .await
                .map_err(|e| crate::eviction::ReclaimError(e.to_string()))
        })
    }
}

impl ImageGc {
    /// The GC of `store` for the pods under `root_dir` (records and container metadata) and
    /// the containers under `shim_state_root` (`<run-dir>/containers`).
    pub fn new(
        store: Arc<ImageStore>,
        policy: ImageGcPolicy,
        root_dir: PathBuf,
        shim_state_root: PathBuf,
    ) -> Self {
        Self {
            store,
            policy,
            root_dir,
            shim_state_root,
            fs: Arc::new(Statvfs),
            running: Arc::default(),
            failed_before: Arc::default(),
        }
    }

    /// The same GC measuring the filesystem through `fs` (tests).
    pub fn with_fs_stats(mut self, fs: Arc<dyn FsStats>) -> Self {
        self.fs = fs;
        self
    }

    /// The policy.
    pub fn policy(&self) -> &ImageGcPolicy {
        &self.policy
    }

    /// The store's images with their disk figures (blocking).
    pub fn usage(&self) -> Result<Vec<ImageUsage>, ImageGcError> {
        Ok(self.store.usage()?)
    }

    /// What the node uses now (effectful, blocking): every pod record's images (spec and
    /// status), the image of every container the agent recorded, and the layers of every
    /// container the shim holds.
    pub fn in_use(&self) -> InUse {
        let mut u = InUse::default();
        let (records, _) = state::read_records(&self.root_dir).unwrap_or_default();
        for r in &records {
            add_pod_images(&mut u, r);
        }
        if let Ok(rd) = std::fs::read_dir(self.root_dir.join("pods")) {
            for e in rd.flatten() {
                let uid = e.file_name().to_string_lossy().into_owned();
                for m in runtime::read_metas(&self.root_dir, &uid) {
                    u.add_reference(&m.image);
                    if !m.image_id.is_empty() {
                        u.images.insert(m.image_id.clone());
                    }
                }
            }
        }
        if let Ok(rd) = std::fs::read_dir(&self.shim_state_root) {
            for e in rd.flatten() {
                let Ok(b) = std::fs::read(e.path().join(hako_shim::state::SPEC_FILE)) else {
                    continue;
                };
                let Ok(spec) = serde_json::from_slice::<hako_shim::spec::ContainerSpec>(&b) else {
                    continue;
                };
                if let hako_shim::spec::Rootfs::Layers(ls) = spec.rootfs {
                    for l in ls {
                        if let Some(n) = l.file_name() {
                            u.layers.insert(format!("sha256:{}", n.to_string_lossy()));
                        }
                    }
                }
            }
        }
        u
    }

    /// Deletes unused images (least recently used first, none younger than the minimum age)
    /// until `bytes_to_free` are freed, then what interrupted deletions left. Returns what was
    /// deleted (effectful, blocking).
    fn free_space_blocking(&self, bytes_to_free: u64) -> Result<Vec<Deleted>, ImageGcError> {
        let in_use = self.in_use();
        let images = self.store.list()?;
        let p = plan(
            &images,
            &in_use,
            unix_now(),
            self.policy.min_age,
            bytes_to_free,
        );
        let mut out = Vec::new();
        let mut freed = 0;
        for r in p.remove {
            if freed >= bytes_to_free {
                break;
            }
            tracing::info!(image = %r, "removing image to free bytes");
            match self.store.delete_image(&r, &in_use.layers, STORE_WAIT) {
                Ok(n) => {
                    freed += n;
                    out.push(Deleted {
                        reference: r,
                        freed: n,
                    });
                }
                Err(e) => tracing::warn!(image = %r, error = %e, "failed to remove image"),
            }
        }
        if let Ok(n) = self.store.prune(&in_use.layers, Duration::ZERO) {
            if n > 0 {
                tracing::info!(freed = n, "removed layers no image holds");
            }
        }
        Ok(out)
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(ImageGc) -> T + Send + 'static,
    ) -> Result<T, ImageGcError> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || f(me))
            .await
            .map_err(|e| ImageGcError::Task(e.to_string()))
    }

    /// Frees at least `bytes_to_free` by deleting unused images when it can (the eviction
    /// manager's reclaim for `imagefs`/`nodefs`); returns the bytes freed.
    pub async fn reclaim(&self, bytes_to_free: u64) -> Result<u64, ImageGcError> {
        let _g = self.running.lock().await;
        let deleted = self
            .blocking(move |me| me.free_space_blocking(bytes_to_free))
            .await??;
        Ok(deleted.iter().map(|d| d.freed).sum())
    }

    /// Deletes every unused image old enough, whatever the thresholds (`hako-agent images
    /// prune`, crictl's `rmi --prune`).
    pub async fn prune_unused(&self) -> Result<Vec<Deleted>, ImageGcError> {
        let _g = self.running.lock().await;
        self.blocking(move |me| me.free_space_blocking(u64::MAX))
            .await?
    }

    /// One GC pass: measures the image filesystem and frees down to the low threshold when
    /// usage is at or above the high one. Returns what was deleted.
    pub async fn garbage_collect(&self) -> Result<Vec<Deleted>, ImageGcError> {
        let _g = self.running.lock().await;
        self.blocking(move |me| me.garbage_collect_blocking())
            .await?
    }

    fn garbage_collect_blocking(&self) -> Result<Vec<Deleted>, ImageGcError> {
        let root = self.store.root().to_path_buf();
        let (capacity, available) = self
            .fs
            .stats(&root)
            .map_err(|e| ImageGcError::Stats(root.clone(), e))?;
        let amount = match amount_to_free(capacity, available, &self.policy) {
            Ok(a) => a,
            Err(e) => {
                self.event("Warning", "InvalidDiskCapacity", &e.to_string());
                return Err(e);
            }
        };
        let Some(amount) = amount else {
            return Ok(Vec::new());
        };
        let usage = 100 - u128::from(available) * 100 / u128::from(capacity);
        tracing::info!(
            usage,
            high_threshold = self.policy.high_threshold_percent,
            amount_to_free = amount,
            low_threshold = self.policy.low_threshold_percent,
            "Disk usage on image filesystem is over the high threshold, trying to free bytes down to the low threshold"
        );
        let deleted = self.free_space_blocking(amount)?;
        let freed: u64 = deleted.iter().map(|d| d.freed).sum();
        if freed < amount {
            let e = ImageGcError::NotEnough {
                wanted: amount,
                freed,
            };
            self.event("Warning", "FreeDiskSpaceFailed", &e.to_string());
            return Err(e);
        }
        Ok(deleted)
    }

    /// Runs [`ImageGc::garbage_collect`] every period until the task is dropped; the first
    /// pass comes one period after the start (pods have their records by then). A failure is
    /// logged; a second one in a row also becomes an `ImageGCFailed` node event, as the
    /// kubelet does.
    pub async fn run(self) {
        if self.policy.disabled() {
            tracing::info!("image garbage collection disabled (--image-gc-high-threshold 100)");
            return;
        }
        let mut tick = tokio::time::interval(self.policy.period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            match self.garbage_collect().await {
                Ok(d) => {
                    self.failed_before.store(false, Ordering::Relaxed);
                    if !d.is_empty() {
                        let freed: u64 = d.iter().map(|x| x.freed).sum();
                        tracing::info!(
                            images = d.len(),
                            freed,
                            "image garbage collection freed space"
                        );
                    }
                }
                Err(e) => {
                    if self.failed_before.swap(true, Ordering::Relaxed) {
                        tracing::error!(error = %e, "Image garbage collection failed multiple times in a row");
                        self.event("Warning", "ImageGCFailed", &e.to_string());
                    } else {
                        tracing::error!(error = %e, "Image garbage collection failed once. Stats initialization may not have completed yet");
                    }
                }
            }
        }
    }

    /// A node event in `<root>/events.json` (`hako-agent get events`).
    fn event(&self, type_: &str, reason: &str, message: &str) {
        let path = crate::standalone::events_path(&self.root_dir);
        let mut rec = PodRecord::new(Default::default());
        rec.events = crate::standalone::read_events(&self.root_dir);
        rec.add_event(type_, reason, message, Utc::now());
        let body = serde_json::to_vec_pretty(&rec.events).unwrap_or_default();
        if let Err(e) = hako_shim::durable::write_file(&path, &body, 0o644) {
            tracing::warn!(error = %e, "could not save the node events");
        }
    }
}

/// Every image a pod names: its containers' (init, regular, ephemeral) and what its status
/// reports.
fn add_pod_images(u: &mut InUse, r: &PodRecord) {
    if let Some(spec) = &r.pod.spec {
        let cs = spec
            .init_containers
            .iter()
            .flatten()
            .chain(spec.containers.iter());
        for c in cs {
            u.add_reference(c.image.as_deref().unwrap_or(""));
        }
        for c in spec.ephemeral_containers.iter().flatten() {
            u.add_reference(c.image.as_deref().unwrap_or(""));
        }
    }
    if let Some(st) = &r.pod.status {
        let all = st
            .container_statuses
            .iter()
            .flatten()
            .chain(st.init_container_statuses.iter().flatten())
            .chain(st.ephemeral_container_statuses.iter().flatten());
        for s in all {
            u.add_reference(&s.image);
            if !s.image_id.is_empty() {
                u.images.insert(s.image_id.clone());
            }
        }
    }
}

/// Bytes as `kubectl`/`crictl` show sizes (`1.5MB`, decimal units). Pure.
pub fn human_size(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1000.0 && u + 1 < UNITS.len() {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{b}B")
    } else {
        format!("{v:.3}")
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_string()
            + UNITS[u]
    }
}

fn age(now: i64, then: u64) -> String {
    let secs = u64::try_from(now).unwrap_or(0).saturating_sub(then);
    crate::model::backoff::go_duration(k8s_openapi::chrono::Duration::seconds(
        i64::try_from(secs).unwrap_or(i64::MAX),
    ))
}

/// The `hako-agent images` table: IMAGE, IMAGE ID, SIZE, UNIQUE, LAST USED, IN USE. Pure.
pub fn render_images(list: &[ImageUsage], in_use: &InUse, now: i64) -> String {
    let mut rows = vec![[
        "IMAGE".to_string(),
        "IMAGE ID".into(),
        "SIZE".into(),
        "UNIQUE".into(),
        "LAST USED".into(),
        "IN USE".into(),
    ]];
    for i in list {
        let used = in_use.images.contains(&i.reference)
            || in_use.images.contains(&i.id)
            || in_use.images.contains(&i.digest);
        let id = i.id.strip_prefix("sha256:").unwrap_or(&i.id);
        rows.push([
            i.reference.clone(),
            id.chars().take(13).collect(),
            human_size(i.size),
            human_size(i.unique_size),
            format!("{} ago", age(now, i.last_used)),
            if used { "yes" } else { "no" }.into(),
        ]);
    }
    let widths: Vec<usize> = (0..6)
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(v, w)| format!("{v:<w$}"))
            .collect();
        out.push_str(line.join("   ").trim_end());
        out.push('\n');
    }
    out
}

/// What `hako-agent images prune` prints. Pure.
pub fn render_deleted(deleted: &[Deleted]) -> String {
    let mut out = String::new();
    for d in deleted {
        out.push_str(&format!(
            "Deleted: {} ({})\n",
            d.reference,
            human_size(d.freed)
        ));
    }
    let total: u64 = deleted.iter().map(|d| d.freed).sum();
    out.push_str(&format!(
        "Total reclaimed space: {} ({} images)\n",
        human_size(total),
        deleted.len()
    ));
    out
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn img(r: &str, layers: &[(&str, u64)], pulled: u64, used: u64) -> Image {
        Image {
            reference: r.into(),
            digest: format!("sha256:m{r}"),
            id: format!("sha256:c{r}"),
            config: Default::default(),
            layers: layers.iter().map(|(d, _)| d.to_string()).collect(),
            layer_sizes: layers.iter().map(|(_, s)| *s).collect(),
            pulled_at: pulled,
            last_used: used,
        }
    }

    fn pol(high: u8, low: u8) -> ImageGcPolicy {
        ImageGcPolicy {
            high_threshold_percent: high,
            low_threshold_percent: low,
            ..Default::default()
        }
    }

    #[test]
    fn thresholds() {
        // (capacity, available, high, low) -> amount to free
        let cases: &[(u64, u64, u8, u8, Option<u64>)] = &[
            // 80 % used, high 85: nothing.
            (1000, 200, 85, 80, None),
            // 85 % used: free down to 80 % (800 used, 200 available): 50 bytes.
            (1000, 150, 85, 80, Some(50)),
            // 95 % used: 150.
            (1000, 50, 85, 80, Some(150)),
            // Full.
            (1000, 0, 85, 80, Some(200)),
            // Usage rounds up like the kubelet's (100 - floor(available%)): 84.1 % -> 85.
            (1000, 159, 85, 80, Some(41)),
            // high 0: always.
            (1000, 1000, 0, 0, Some(0)),
        ];
        for &(cap, avail, h, l, want) in cases {
            assert_eq!(
                amount_to_free(cap, avail, &pol(h, l)).unwrap(),
                want,
                "{cap} {avail} {h} {l}"
            );
        }
        assert!(matches!(
            amount_to_free(0, 0, &pol(85, 80)),
            Err(ImageGcError::InvalidCapacity)
        ));
    }

    #[test]
    fn table_and_sizes() {
        assert_eq!(human_size(999), "999B");
        assert_eq!(human_size(1_500_000), "1.5MB");
        assert_eq!(human_size(2_000_000_000), "2GB");
        let list = usage_list();
        let mut u = InUse::default();
        u.images.insert("r/a:1".into());
        let t = render_images(&list, &u, 1000);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("IMAGE "), "{t}");
        assert!(
            lines[1].starts_with("r/a:1 ") && lines[1].ends_with("yes"),
            "{t}"
        );
        assert!(
            lines[1].contains("4.2kB") && lines[1].contains("15m0s ago"),
            "{t}"
        );
        assert!(lines[2].ends_with("no"), "{t}");
        let d = render_deleted(&[Deleted {
            reference: "r/b:1".into(),
            freed: 2000,
        }]);
        assert_eq!(
            d,
            "Deleted: r/b:1 (2kB)\nTotal reclaimed space: 2kB (1 images)\n"
        );
    }

    fn usage_list() -> Vec<ImageUsage> {
        hako_shim::image::usage::usage_of(&[
            img("r/a:1", &[("l1", 4200)], 0, 100),
            img("r/b:1", &[("l2", 10)], 0, 900),
        ])
    }

    #[test]
    fn policy_checks() {
        assert!(ImageGcPolicy::default().validate().is_ok());
        assert!(pol(101, 80).validate().is_err());
        assert!(pol(80, 80).validate().is_err());
        assert!(pol(70, 80).validate().is_err());
        assert!(pol(100, 0).validate().is_ok());
        assert!(pol(100, 0).disabled());
        assert!(!pol(85, 80).disabled());
    }

    #[test]
    fn lru_unused_old_enough_until_enough_is_freed() {
        let now = 10_000;
        let imgs = vec![
            img("a", &[("la", 100)], 1000, 5000),
            img("b", &[("lb", 200)], 1000, 2000),
            img("c", &[("lc", 300)], 1000, 3000),
            img("used", &[("lu", 400)], 1000, 1000),
            img("young", &[("ly", 500)], now - 60, now - 60),
        ];
        let mut u = InUse::default();
        u.images.insert("sha256:cused".into());
        let min = Duration::from_secs(120);
        // Least recently used first: b, then c; a is not needed.
        let p = plan(&imgs, &u, now, min, 450);
        assert_eq!(p.remove, ["b", "c"]);
        assert_eq!(p.freed, 500);
        // Everything eligible: the used and the young image stay.
        let p = plan(&imgs, &u, now, min, u64::MAX);
        assert_eq!(p.remove, ["b", "c", "a"]);
        assert_eq!(p.freed, 600);
        // No minimum age: the young one goes too (last: most recently used).
        let p = plan(&imgs, &u, now, Duration::ZERO, u64::MAX);
        assert_eq!(p.remove, ["b", "c", "a", "young"]);
        // Nothing to free: nothing deleted.
        assert_eq!(plan(&imgs, &u, now, min, 0), Plan::default());
        // In use by reference (as a pod names it, normalised).
        let mut u2 = InUse::default();
        u2.add_reference("b");
        assert!(u2.images.contains("docker.io/library/b:latest"));
    }

    #[test]
    fn shared_and_container_held_layers_are_not_counted() {
        let imgs = vec![
            img("old", &[("base", 1000), ("o", 10)], 0, 1),
            img("kept", &[("base", 1000), ("k", 20)], 0, 9),
            img("gone", &[("g", 30), ("held", 40)], 0, 2),
        ];
        let mut u = InUse::default();
        u.images.insert("kept".into());
        u.layers.insert("held".into());
        // "old" frees only its own layer (base stays with "kept"); "gone" frees g, not the
        // layer a container's rootfs holds.
        let p = plan(&imgs, &u, 100, Duration::ZERO, u64::MAX);
        assert_eq!(p.remove, ["old", "gone"]);
        assert_eq!(p.freed, 40);
    }
}

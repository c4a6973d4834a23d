//! Standalone mode (effectful): the manifest directory feeds the [`PodManager`]. The directory
//! is re-read when inotify reports a change in it (after a 10 ms window that gathers a burst of
//! writes into one read) and every `file_check_frequency`; each change (pod added, updated = new UID,
//! deleted; ConfigMap/Secret changed) becomes a full `sync`. A document that fails to load is
//! logged once and recorded as a node event (`<root>/events.json`, shown by
//! `hako-agent get events`); every other pod keeps running.

use crate::model::record::PodEvent;
use crate::source::dir::DirSource;
use crate::source::manifest::{ManifestError, StaticPodOptions};
use crate::worker::{AgentConfig, DesiredState, PodManager};
use k8s_openapi::chrono::Utc;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Options of the standalone loop.
pub struct StandaloneOptions {
    /// Manifest directory.
    pub manifest_dir: PathBuf,
    /// Static pod naming.
    pub static_pods: StaticPodOptions,
    /// Re-read period.
    pub file_check_frequency: Duration,
    /// On SIGINT/SIGTERM, terminate every pod gracefully before exiting (default: pods keep
    /// running and are re-adopted by the next agent).
    pub stop_pods_on_exit: bool,
}

/// How long a change reported by inotify waits for the rest of its burst before the
/// directory is read.
const WATCH_SETTLE: Duration = Duration::from_millis(10);

/// Node events file.
pub fn events_path(root: &Path) -> PathBuf {
    root.join("events.json")
}

/// Reads the node events (effectful).
pub fn read_events(root: &Path) -> Vec<PodEvent> {
    std::fs::read(events_path(root))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

fn record_errors(root: &Path, errors: &[ManifestError]) {
    let mut rec = crate::model::record::PodRecord::new(Default::default());
    rec.events = read_events(root);
    for e in errors {
        rec.add_event("Warning", "FailedManifest", &e.to_string(), Utc::now());
    }
    let body = serde_json::to_vec_pretty(&rec.events).unwrap_or_default();
    if let Err(e) = hako_shim::durable::write_file(&events_path(root), &body, 0o644) {
        tracing::warn!(error = %e, "could not save the node events");
    }
}

/// Names, sizes and modification times of the directory's entries: the directory is parsed
/// again only when this changes.
fn fingerprint(dir: &Path) -> Option<Vec<(std::ffi::OsString, u64, std::time::SystemTime)>> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter_map(|e| {
            let m = e.metadata().ok()?;
            Some((e.file_name(), m.len(), m.modified().ok()?))
        })
        .collect();
    v.sort();
    Some(v)
}

fn desired(src: &DirSource) -> DesiredState {
    let s = src.snapshot();
    DesiredState {
        pods: s.pods.values().map(|p| p.pod.clone()).collect(),
        config_maps: s.config_maps.values().cloned().collect(),
        secrets: s.secrets.values().cloned().collect(),
        claims: s.claims.values().cloned().collect(),
        persistent_volumes: s.persistent_volumes.values().cloned().collect(),
        node: None,
    }
}

/// Runs until SIGINT/SIGTERM. Fails only when the signal handlers cannot be installed.
pub async fn run(cfg: AgentConfig, opts: StandaloneOptions) -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let root = cfg.root_dir.clone();
    let mgr: Arc<PodManager> = PodManager::new(cfg);
    let mut src = DirSource::new(opts.manifest_dir.clone(), opts.static_pods.clone());
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut first = true;
    let mut last_fp = None;
    let mut tick = tokio::time::interval(opts.file_check_frequency);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut watch = match crate::source::dirwatch::DirWatch::new(&opts.manifest_dir) {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(dir = %opts.manifest_dir.display(), "no inotify watch ({e}); re-reading every {:?} only", opts.file_check_frequency);
            None
        }
    };
    tracing::info!(dir = %opts.manifest_dir.display(), "watching manifest directory");
    loop {
        let changed = async {
            match &watch {
                Some(w) => w.changed().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tick.tick() => {}
            r = changed => {
                if let Err(e) = r {
                    tracing::warn!("manifest directory watch failed ({e}); re-reading every {:?} only", opts.file_check_frequency);
                    watch = None;
                } else {
                    // Gather the rest of a burst (an editor's write + rename, many files).
                    tokio::time::sleep(WATCH_SETTLE).await;
                    if let Some(w) = &watch {
                        w.drain();
                    }
                }
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
        let fp = fingerprint(&opts.manifest_dir);
        if !first && fp.is_some() && fp == last_fp {
            continue;
        }
        last_fp = fp;
        let poll = match src.poll() {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!("{e}");
                continue;
            }
        };
        for e in &poll.new_errors {
            tracing::error!("manifest rejected: {e}");
        }
        if !poll.new_errors.is_empty() {
            record_errors(&root, &poll.new_errors);
        }
        for ev in &poll.events {
            tracing::info!("manifest change: {}", describe(ev));
        }
        if first || !poll.events.is_empty() {
            first = false;
            mgr.sync(desired(&src));
        }
    }
    if opts.stop_pods_on_exit {
        tracing::info!("stopping every pod before exit");
        mgr.sync(DesiredState::default());
        let mut int2 = signal(SignalKind::interrupt())?;
        while mgr.worker_count() > 0 || !mgr.pods().is_empty() {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                _ = int2.recv() => break,
            }
            mgr.sync(DesiredState::default());
        }
    } else {
        tracing::info!("exiting; pods keep running and are re-adopted by the next start");
    }
    Ok(())
}

fn describe(ev: &crate::source::manifest::SourceEvent) -> String {
    use crate::source::manifest::SourceEvent as E;
    match ev {
        E::PodAdded(p) => format!("pod {} added ({})", name(&p.pod), p.file),
        E::PodUpdated { old, new } => format!(
            "pod {} changed: uid {} -> {} (restarting)",
            name(&new.pod),
            old.uid(),
            new.uid()
        ),
        E::PodDeleted(p) => format!("pod {} deleted (terminating)", name(&p.pod)),
        E::ConfigMapChanged(k) => format!("configmap {}/{} changed", k.0, k.1),
        E::SecretChanged(k) => format!("secret {}/{} changed", k.0, k.1),
        E::ServiceChanged(k) => format!("service {}/{} changed", k.0, k.1),
    }
}

fn name(p: &k8s_openapi::api::core::v1::Pod) -> String {
    format!(
        "{}/{}",
        p.metadata.namespace.as_deref().unwrap_or("default"),
        p.metadata.name.as_deref().unwrap_or("")
    )
}

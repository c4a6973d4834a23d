//! The node network controller (effectful: kube client, netlink through `hako_cni::overlay`):
//! VXLAN device, subnet file and annotations once the pod CIDR is known, then peers from a
//! watch of all Nodes. What it computes comes from the pure [`super::overlay`].

use futures::StreamExt;
use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::{overlay, Backoff, Ctx};

fn overlay_cfg(ctx: &Ctx) -> hako_cni::overlay::OverlayConfig {
    hako_cni::overlay::OverlayConfig {
        dev: ctx.args.overlay_device.clone(),
        vni: ctx.args.overlay_vni,
        port: ctx.args.overlay_port,
        underlay_if: ctx.args.overlay_interface.clone(),
        underlay_ip: ctx.node.node_ip,
        state_dir: ctx.node.root_dir.join("overlay"),
    }
}

fn write_atomic(path: &Path, text: &str) -> std::io::Result<()> {
    hako_shim::durable::write_file(path, text.as_bytes(), 0o644)
}

/// Overlay controller: device, subnet file and own annotations once the pod CIDR is known,
/// then peers converged from a watch of all Nodes (and resynced every minute).
pub(crate) async fn overlay_loop(ctx: Arc<Ctx>, watch_client: Client) {
    use kube::runtime::watcher;
    let nodes_api: Api<Node> = Api::all(watch_client);
    let own: Api<Node> = Api::all(ctx.client.clone());
    let ocfg = overlay_cfg(&ctx);
    let mut backoff = Backoff::new(Duration::from_secs(30));
    let mut known: BTreeMap<String, Node> = BTreeMap::new();
    let mut configured = false;
    let mut stream = watcher(nodes_api.clone(), watcher::Config::default()).boxed();
    let mut resync = tokio::time::interval(Duration::from_secs(60));
    let mut retry = tokio::time::interval(Duration::from_secs(2));
    let mut relist: Option<BTreeMap<String, Node>> = None;
    loop {
        let changed = tokio::select! {
            ev = stream.next() => match ev {
                Some(Ok(watcher::Event::Apply(n))) => {
                    let name = n.metadata.name.clone().unwrap_or_default();
                    known.insert(name, n);
                    true
                }
                Some(Ok(watcher::Event::Delete(n))) => {
                    known.remove(n.metadata.name.as_deref().unwrap_or(""));
                    true
                }
                Some(Ok(watcher::Event::Init)) => {
                    relist = Some(BTreeMap::new());
                    false
                }
                Some(Ok(watcher::Event::InitApply(n))) => {
                    let name = n.metadata.name.clone().unwrap_or_default();
                    relist.get_or_insert_with(BTreeMap::new).insert(name, n);
                    false
                }
                Some(Ok(watcher::Event::InitDone)) => {
                    // A (re)list is complete: it replaces what was known, so nodes deleted
                    // while the watch was down are dropped too.
                    known = relist.take().unwrap_or_default();
                    true
                }
                Some(Err(e)) => {
                    let d = backoff.fail();
                    tracing::warn!("node watch failed (retry in {d:?}): {e}");
                    tokio::time::sleep(d).await;
                    false
                }
                None => {
                    stream = watcher(nodes_api.clone(), watcher::Config::default()).boxed();
                    false
                }
            },
            _ = resync.tick() => true,
            _ = retry.tick(), if !configured => true,
        };
        if !changed {
            continue;
        }
        backoff.reset();
        if !configured {
            match configure(&ctx, &ocfg, &own, known.get(&ctx.cfg.name)).await {
                Ok(true) => {
                    configured = true;
                    ctx.overlay_ready.store(true, Ordering::Relaxed);
                }
                Ok(false) => continue,
                Err(e) => {
                    tracing::warn!("overlay setup failed (retrying): {e}");
                    continue;
                }
            }
        }
        let all: Vec<Node> = known.values().cloned().collect();
        let peers = overlay::peers(&all, &ctx.cfg.name);
        let cfg2 = ocfg.clone();
        match tokio::task::spawn_blocking(move || hako_cni::overlay::sync_peers(&cfg2, &peers))
            .await
        {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!("overlay peer sync failed: {e}"),
            Err(e) => tracing::warn!("overlay peer sync panicked: {e}"),
        }
    }
}

/// Why the overlay could not be set up (retried).
#[derive(Debug, thiserror::Error)]
pub(crate) enum OverlayError {
    /// The blocking task setting the device up failed.
    #[error("overlay device task: {0}")]
    Task(String),
    /// The VXLAN device could not be made.
    #[error("overlay device: {0}")]
    Device(hako_cni::overlay::OverlayError),
    /// The subnet file could not be written.
    #[error("writing {}: {source}", path.display())]
    SubnetFile {
        /// The subnet file.
        path: std::path::PathBuf,
        /// The write error.
        source: std::io::Error,
    },
    /// The node's annotations could not be patched.
    #[error("annotating node: {0}")]
    Annotate(kube::Error),
}

/// Sets the overlay up once the pod CIDR is known: VXLAN device, subnet file, annotations.
/// Ok(false) while the pod CIDR is not known yet.
async fn configure(
    ctx: &Ctx,
    ocfg: &hako_cni::overlay::OverlayConfig,
    own: &Api<Node>,
    me: Option<&Node>,
) -> Result<bool, OverlayError> {
    let from_flag = !ctx.args.pod_cidr.is_empty();
    let cidrs: Vec<IpNet> = if from_flag {
        ctx.args.pod_cidr.clone()
    } else {
        let Some(n) = me else { return Ok(false) };
        let spec_cidrs: Vec<IpNet> = n
            .spec
            .as_ref()
            .map(|s| {
                s.pod_cidrs
                    .clone()
                    .unwrap_or_default()
                    .into_iter()
                    .chain(s.pod_cidr.clone())
                    .filter_map(|c| c.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        let mut v = spec_cidrs;
        v.dedup();
        if v.is_empty() {
            tracing::info!("waiting for spec.podCIDR (or pass --pod-cidr)");
            return Ok(false);
        }
        v
    };
    let c2 = ocfg.clone();
    let dev = tokio::task::spawn_blocking(move || hako_cni::overlay::ensure_device(&c2))
        .await
        .map_err(|e| OverlayError::Task(e.to_string()))?
        .map_err(OverlayError::Device)?;
    let text = overlay::subnet_env(&ctx.args.cluster_cidr, &cidrs, dev.mtu);
    write_atomic(&ctx.args.subnet_file, &text).map_err(|e| OverlayError::SubnetFile {
        path: ctx.args.subnet_file.clone(),
        source: e,
    })?;
    let mut ann = serde_json::Map::new();
    ann.insert(
        overlay::ANN_VTEP_MAC.into(),
        overlay::fmt_mac(&dev.mac).into(),
    );
    ann.insert(
        overlay::ANN_PUBLIC_IP.into(),
        dev.local_ip.to_string().into(),
    );
    if from_flag {
        let list: Vec<String> = cidrs.iter().map(|c| c.trunc().to_string()).collect();
        ann.insert(overlay::ANN_POD_CIDR.into(), list.join(",").into());
    }
    own.patch(
        &ctx.cfg.name,
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"metadata": {"annotations": ann}})),
    )
    .await
    .map_err(OverlayError::Annotate)?;
    tracing::info!(dev = %dev.name, mac = %overlay::fmt_mac(&dev.mac), ip = %dev.local_ip,
        subnet_file = %ctx.args.subnet_file.display(), "overlay configured");
    Ok(true)
}

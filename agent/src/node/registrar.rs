//! Node registration and status (effectful: kube client): creates or patches this machine's
//! Node and keeps its status fresh; the objects come from the pure
//! [`crate::model::node_object`].

use crate::model::node_object;

use k8s_openapi::api::core::v1::{Node, NodeStatus};
use k8s_openapi::chrono::Utc;
use kube::api::{Patch, PatchParams, PostParams};
use kube::Api;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{facts, Backoff, Ctx};

fn current_status(ctx: &Ctx, prev: &[k8s_openapi::api::core::v1::NodeCondition]) -> NodeStatus {
    // The eviction manager's conditions (with their transition period); the bare thresholds
    // only until its first pass.
    let p = ctx.pressure.get().unwrap_or_else(|| {
        node_object::pressure(&ctx.cfg.eviction, &facts::measure(&ctx.node.root_dir))
    });
    let cni = facts::cni_config_present(&ctx.node.cni_conf_dir);
    let not_ready = node_object::network_not_ready_reason(cni);
    let net_unavailable = if ctx.args.overlay {
        (!ctx.overlay_ready.load(Ordering::Relaxed))
            .then(|| "the hako overlay is not configured yet".to_string())
    } else {
        not_ready.clone()
    };
    let conds = node_object::conditions(
        p,
        not_ready.as_deref(),
        net_unavailable.as_deref(),
        Utc::now(),
        prev,
    );
    node_object::node_status(&ctx.cfg, &ctx.facts, conds)
}

/// Creates the Node, or patches labels/annotations of an existing one (taints are only set
/// at creation, as NodeRestriction forbids a node to change them). Returns the Node's UID.
async fn register(ctx: &Ctx, status: &NodeStatus) -> Result<String, kube::Error> {
    let api: Api<Node> = Api::all(ctx.client.clone());
    let want = node_object::registration(&ctx.cfg, &ctx.facts, status.clone());
    match api.create(&PostParams::default(), &want).await {
        Ok(n) => {
            tracing::info!(node = %ctx.cfg.name, "node registered");
            return Ok(n.metadata.uid.unwrap_or_default());
        }
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => return Err(e),
    }
    let patch = serde_json::json!({"metadata": {
        "labels": want.metadata.labels, "annotations": want.metadata.annotations}});
    let n = api
        .patch(
            &ctx.cfg.name,
            &PatchParams::default(),
            &Patch::Strategic(patch),
        )
        .await?;
    tracing::info!(node = %ctx.cfg.name, "node exists; labels updated");
    Ok(n.metadata.uid.unwrap_or_default())
}

async fn send_status(ctx: &Ctx, status: &NodeStatus) -> Result<(), kube::Error> {
    let api: Api<Node> = Api::all(ctx.client.clone());
    let patch = serde_json::json!({ "status": status });
    api.patch_status(
        &ctx.cfg.name,
        &PatchParams::default(),
        &Patch::Strategic(patch),
    )
    .await
    .map(|_| ())
}

pub(crate) async fn status_loop(ctx: Arc<Ctx>) {
    let every = Duration::from_secs(ctx.args.node_status_update_frequency.max(1));
    let report_every = Duration::from_secs(ctx.args.node_status_report_frequency.max(1));
    let mut backoff = Backoff::new(every);
    let mut registered = false;
    let mut last: Option<(NodeStatus, Instant)> = None;
    loop {
        let prev = last
            .as_ref()
            .and_then(|(s, _)| s.conditions.clone())
            .unwrap_or_default();
        let st = current_status(&ctx, &prev);
        if !registered {
            match register(&ctx, &st).await {
                Ok(_) => registered = true,
                Err(e) => {
                    let d = backoff.fail();
                    tracing::warn!("node registration failed (retry in {d:?}): {e}");
                    tokio::time::sleep(d).await;
                    continue;
                }
            }
        }
        let due = match &last {
            None => true,
            Some((s, at)) => node_object::status_changed(s, &st) || at.elapsed() >= report_every,
        };
        if due {
            match send_status(&ctx, &st).await {
                Ok(()) => {
                    backoff.reset();
                    last = Some((st, Instant::now()));
                }
                Err(kube::Error::Api(e)) if e.code == 404 => {
                    tracing::warn!("node object is gone; registering again");
                    registered = false;
                    continue;
                }
                Err(e) => {
                    let d = backoff.fail();
                    tracing::warn!("node status update failed (retry in {d:?}): {e}");
                    tokio::time::sleep(d).await;
                    continue;
                }
            }
        }
        tokio::time::sleep(every).await;
    }
}

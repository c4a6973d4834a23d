//! The node Lease in `kube-node-lease` (effectful: kube client), renewed every
//! `--node-lease-renew-interval` as the kubelet's node lease controller does.

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference};
use k8s_openapi::chrono::Utc;
use kube::api::PostParams;
use kube::Api;
use std::sync::Arc;
use std::time::Duration;

use super::{Backoff, Ctx};

const LEASE_NS: &str = "kube-node-lease";

fn new_lease(ctx: &Ctx, node_uid: Option<&str>) -> Lease {
    let renew = Duration::from_secs(ctx.args.node_lease_renew_interval.max(1));
    let secs = i32::try_from(renew.as_secs().saturating_mul(4)).unwrap_or(40);
    Lease {
        metadata: ObjectMeta {
            name: Some(ctx.cfg.name.clone()),
            namespace: Some(LEASE_NS.into()),
            owner_references: node_uid.filter(|u| !u.is_empty()).map(|uid| {
                vec![OwnerReference {
                    api_version: "v1".into(),
                    kind: "Node".into(),
                    name: ctx.cfg.name.clone(),
                    uid: uid.into(),
                    ..Default::default()
                }]
            }),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(ctx.cfg.name.clone()),
            lease_duration_seconds: Some(secs),
            renew_time: Some(MicroTime(Utc::now())),
            ..Default::default()
        }),
    }
}

/// One renewal: update the cached lease (optimistic concurrency), or fetch/create it.
async fn renew(ctx: &Ctx, cached: &mut Option<Lease>) -> Result<(), kube::Error> {
    let api: Api<Lease> = Api::namespaced(ctx.client.clone(), LEASE_NS);
    if let Some(mut l) = cached.take() {
        if l.metadata.owner_references.is_none() {
            // The lease may predate the Node (both start together): own it once the Node exists,
            // so it is garbage-collected with the Node.
            let nodes: Api<Node> = Api::all(ctx.client.clone());
            if let Some(uid) = nodes
                .get_opt(&ctx.cfg.name)
                .await?
                .and_then(|n| n.metadata.uid)
            {
                l.metadata.owner_references = new_lease(ctx, Some(&uid)).metadata.owner_references;
            }
        }
        let renew_s =
            i32::try_from(ctx.args.node_lease_renew_interval.saturating_mul(4)).unwrap_or(40);
        let spec = l.spec.get_or_insert_with(Default::default);
        spec.renew_time = Some(MicroTime(Utc::now()));
        spec.holder_identity = Some(ctx.cfg.name.clone());
        spec.lease_duration_seconds = Some(renew_s);
        match api.replace(&ctx.cfg.name, &PostParams::default(), &l).await {
            Ok(n) => {
                *cached = Some(n);
                return Ok(());
            }
            // Conflict or gone: fall through to a fresh read.
            Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => {}
            Err(e) => return Err(e),
        }
    }
    match api.get_opt(&ctx.cfg.name).await? {
        Some(mut l) => {
            let spec = l.spec.get_or_insert_with(Default::default);
            spec.renew_time = Some(MicroTime(Utc::now()));
            spec.holder_identity = Some(ctx.cfg.name.clone());
            *cached = Some(
                api.replace(&ctx.cfg.name, &PostParams::default(), &l)
                    .await?,
            );
        }
        None => {
            let nodes: Api<Node> = Api::all(ctx.client.clone());
            let uid = nodes
                .get_opt(&ctx.cfg.name)
                .await?
                .and_then(|n| n.metadata.uid);
            *cached = Some(
                api.create(&PostParams::default(), &new_lease(ctx, uid.as_deref()))
                    .await?,
            );
        }
    }
    Ok(())
}

pub(crate) async fn lease_loop(ctx: Arc<Ctx>) {
    let every = Duration::from_secs(ctx.args.node_lease_renew_interval.max(1));
    let mut backoff = Backoff::new(every);
    let mut cached: Option<Lease> = None;
    let mut failing = false;
    loop {
        match renew(&ctx, &mut cached).await {
            Ok(()) => {
                if failing {
                    tracing::info!("lease renewal recovered");
                }
                failing = false;
                backoff.reset();
                tokio::time::sleep(every).await;
            }
            Err(e) => {
                cached = None;
                let d = backoff.fail();
                if !failing {
                    tracing::warn!("lease renewal failed (retrying with back-off): {e}");
                }
                failing = true;
                tokio::time::sleep(d).await;
            }
        }
    }
}

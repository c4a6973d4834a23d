//! The pod's volumes: set up once, refreshed when the referenced objects or the pod's labels
//! and annotations (downwardAPI files) change.

use super::{blocking, Worker};
use k8s_openapi::api::core::v1::Pod;
use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};

/// What a volume refresh depends on besides the objects: the pod metadata that downwardAPI
/// files show (labels and annotations; name, namespace and uid never change), folded into one
/// number with the objects' generation.
fn refresh_key(objects_generation: u64, pod: &Pod) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    objects_generation.hash(&mut h);
    pod.metadata.labels.hash(&mut h);
    pod.metadata.annotations.hash(&mut h);
    h.finish()
}

impl Worker {
    /// Node allocatable as the Downward API sees it (`resourceFieldRef` of a limit that is
    /// not set, the kubelet's defaultPodLimitsForDownwardAPI): one source for env vars and
    /// volume files.
    pub(super) fn node_allocatable(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("memory".to_string(), self.cfg.memory_capacity.to_string()),
            (
                "cpu".to_string(),
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1)
                    .to_string(),
            ),
        ])
    }

    /// The ConfigMaps, Secrets, PersistentVolumeClaims and PersistentVolumes the pod's volumes
    /// may read, this node (None: standalone), and their generation.
    pub(super) fn volume_objects(
        &self,
    ) -> (
        crate::sys::volumes::MapObjects,
        Option<k8s_openapi::api::core::v1::Node>,
        u64,
    ) {
        let o = self.objects.read();
        match o.as_deref() {
            Ok(o) => (
                crate::sys::volumes::MapObjects {
                    config_maps: o.config_maps.clone(),
                    secrets: o.secrets.clone(),
                    claims: o.claims.clone(),
                    persistent_volumes: o.persistent_volumes.clone(),
                    binds_by_volume_name: o.node.is_none(),
                },
                o.node.clone(),
                o.generation,
            ),
            Err(_) => (Default::default(), None, 0),
        }
    }

    /// Sets up the pod's volumes once (idempotent, also after an agent restart), and refreshes
    /// configMap/secret/downwardAPI/projected contents when the objects changed. False while a
    /// volume cannot be set up (FailedMount).
    pub(super) async fn ensure_volumes(&mut self) -> bool {
        let has = self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.volumes.as_ref())
            .is_some_and(|v| !v.is_empty());
        if !has {
            return true;
        }
        let (generation, objects, node) = {
            let (objects, node, g) = self.volume_objects();
            (refresh_key(g, &self.pod), objects, node)
        };
        if self.volumes.is_some() && generation == self.volumes_generation {
            return true;
        }
        let vols = self.fx.volumes.clone();
        let pod = self.pod.clone();
        let pod_ips = self
            .sandbox
            .as_ref()
            .map(|s| s.ips.clone())
            .unwrap_or_default();
        let host_ips: Vec<String> = self.cfg.host_ip.iter().cloned().collect();
        let allocatable = self.node_allocatable();
        let existing = self.volumes.clone();
        let tokens = self
            .objects
            .read()
            .ok()
            .and_then(|o| o.tokens.get(&self.uid).cloned());
        let t = std::time::Instant::now();
        let r = blocking(move || {
            let mut ctx = crate::sys::volumes::PodContext::new(&pod, &objects);
            ctx.pod_ips = pod_ips;
            ctx.host_ips = host_ips;
            ctx.service_account_tokens = tokens;
            ctx.node_allocatable = allocatable;
            ctx.node = node;
            match existing {
                Some(v) => vols.refresh(&ctx, &v).map(|_| v),
                None => vols.setup(&ctx),
            }
        })
        .await;
        self.phase("volumes", t.elapsed());
        match r {
            Some(Ok(v)) => {
                self.volumes = Some(v);
                self.volumes_generation = generation;
                true
            }
            Some(Err(e)) => {
                self.metrics.sync_error("FailedMount");
                self.event("Warning", "FailedMount", &e.to_string());
                if self.volumes.is_some() {
                    // Refresh failed: old contents stay; try again on the next change.
                    self.volumes_generation = generation;
                    return true;
                }
                false
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_key_follows_labels_and_annotations() {
        let pod = |y: &str| -> Pod { serde_yaml::from_str(y).unwrap() };
        let a = pod("metadata: {name: p, labels: {k: v}, annotations: {builder: bar}}");
        let b = pod("metadata: {name: p, labels: {k: v}, annotations: {builder: foo}}");
        let c = pod("metadata: {name: p, labels: {k: v, k3: v3}, annotations: {builder: bar}}");
        let mut d = a.clone();
        d.spec = Some(Default::default());
        assert_eq!(refresh_key(1, &a), refresh_key(1, &a.clone()));
        assert_eq!(
            refresh_key(1, &a),
            refresh_key(1, &d),
            "spec/status changes do not count"
        );
        assert_ne!(refresh_key(1, &a), refresh_key(1, &b));
        assert_ne!(refresh_key(1, &a), refresh_key(1, &c));
        assert_ne!(refresh_key(1, &a), refresh_key(2, &a));
    }
}

//! Image pulls through the shim's image store, with their own back-off (ErrImagePull →
//! ImagePullBackOff) and the pod's imagePullSecrets.

use super::effects::RuntimeError;
use super::Worker;
use crate::model::backoff;
use crate::model::observed::StartFailure;
use hako_shim::image::PullPolicy;
use k8s_openapi::api::core::v1::Container;

pub(super) fn pull_policy(p: Option<&str>) -> PullPolicy {
    match p {
        Some("Always") => PullPolicy::Always,
        Some("Never") => PullPolicy::Never,
        _ => PullPolicy::IfNotPresent,
    }
}

impl Worker {
    pub(super) async fn pull(&mut self, c: &Container) -> Option<hako_shim::image::Image> {
        let image = c.image.clone().unwrap_or_default();
        let key = backoff::key(&self.uid, &c.name);
        let now = self.fx.clock.now();
        if let Some(t) = self.image_failed_at.get(&c.name) {
            if self.image_backoff.in_backoff_since(&key, *t, now) {
                let msg = format!("Back-off pulling image {image:?}");
                self.event("Normal", "BackOff", &msg);
                self.start_failures.insert(
                    c.name.clone(),
                    StartFailure {
                        reason: "ImagePullBackOff".into(),
                        message: msg,
                    },
                );
                return None;
            }
        }
        let policy = pull_policy(c.image_pull_policy.as_deref());
        let present = policy != PullPolicy::Always && self.fx.runtime.image(&image).is_some();
        let creds = self.pull_secret();
        if !present && policy != PullPolicy::Never {
            self.event("Normal", "Pulling", &format!("Pulling image {image:?}"));
        }
        let t0 = std::time::Instant::now();
        // The pull runs in a task of its own: a deletion of the pod does not wait for it (the
        // kubelet cancels the pull's context); the pull then ends on its own, at the latest at
        // the progress deadline, and what it fetched stays in the store for the next pod.
        let pull = tokio::spawn(self.fx.runtime.ensure_image(image.clone(), policy, creds));
        let result = tokio::select! {
            r = pull => r.unwrap_or(Err(RuntimeError::Task("pull"))),
            () = self.deleted() => {
                let (ns, name) = self.ns_name();
                tracing::info!(pod = %format!("{ns}/{name}"), %image, "pod deleted during the image pull: not waiting for it");
                return None;
            }
        };
        match result {
            Ok(img) => {
                self.metrics
                    .image_pull(if present { "present" } else { "pulled" });
                if present {
                    self.event(
                        "Normal",
                        "Pulled",
                        &format!("Container image {image:?} already present on machine"),
                    );
                } else {
                    self.event(
                        "Normal",
                        "Pulled",
                        &format!(
                            "Successfully pulled image {image:?} in {:.3}s",
                            t0.elapsed().as_secs_f64()
                        ),
                    );
                }
                self.image_failed_at.remove(&c.name);
                self.image_backoff.reset(&key);
                Some(img)
            }
            Err(e) => {
                let (reason, msg) = if policy == PullPolicy::Never {
                    (
                        "ErrImageNeverPull",
                        format!(
                            "Container image {image:?} is not present with pull policy of Never"
                        ),
                    )
                } else {
                    (
                        "ErrImagePull",
                        format!("Failed to pull image {image:?}: {e}"),
                    )
                };
                self.metrics.image_pull("failed");
                self.metrics.sync_error(reason);
                self.event("Warning", "Failed", &msg);
                self.event("Warning", "Failed", &format!("Error: {reason}"));
                self.image_backoff.next(&key, now, now);
                self.image_failed_at
                    .insert(c.name.clone(), self.fx.clock.now());
                // Next pass reports ImagePullBackOff until the back-off expires.
                self.resync_now = true;
                self.start_failures.insert(
                    c.name.clone(),
                    StartFailure {
                        reason: reason.into(),
                        message: msg,
                    },
                );
                None
            }
        }
    }

    pub(super) fn pull_secret(&self) -> Option<String> {
        let ns = self.ns_name().0;
        let names: Vec<String> = self
            .pod
            .spec
            .as_ref()?
            .image_pull_secrets
            .iter()
            .flatten()
            .map(|r| r.name.clone())
            .collect();
        let o = self.objects.read().ok()?;
        // Every referenced Secret's docker config, merged in order (the first entry for a
        // registry wins), so that the one matching the image's registry is found.
        let mut configs: Vec<String> = Vec::new();
        for n in names {
            if let Some(s) = o.secrets.get(&(ns.clone(), n)) {
                for k in [".dockerconfigjson", ".dockercfg"] {
                    if let Some(v) = s.data.as_ref().and_then(|d| d.get(k)) {
                        configs.push(String::from_utf8_lossy(&v.0).into_owned());
                    } else if let Some(v) = s.string_data.as_ref().and_then(|d| d.get(k)) {
                        configs.push(v.clone());
                    }
                }
            }
        }
        hako_shim::image::reference::merge_docker_configs(configs.iter().map(String::as_str))
    }
}

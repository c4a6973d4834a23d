//! Lifecycle hooks: postStart right after a start (the container is not Running until it
//! returns; a failure kills it) and preStop before the stop signal, bounded by the grace
//! period. Handlers run through the worker's [`Prober`]; the `sleep` handler is a timer.

use super::effects::Prober;
use super::Worker;
use crate::model::probe::{ProbeAction, ProbeError, ProbeOutcome, ProbeSpec, ProbeTarget};
use k8s_openapi::api::core::v1::{Container, LifecycleHandler, Probe};
use std::sync::Arc;
use std::time::Duration;

/// A hook handler that cannot be run, naming what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub(super) enum HookError {
    /// The handler is invalid (no action, bad port, ...).
    #[error(transparent)]
    Invalid(#[from] ProbeError),
}

/// The handler of a hook as a probe action.
pub(super) fn hook_action(h: &LifecycleHandler, c: &Container) -> Result<ProbeAction, HookError> {
    let p = Probe {
        exec: h.exec.clone(),
        http_get: h.http_get.clone(),
        tcp_socket: h.tcp_socket.clone(),
        ..Default::default()
    };
    Ok(ProbeSpec::from_probe(&p, c).map(|s| s.action)?)
}

/// Runs a running container's preStop hook — the `sleep` handler (cut short by the grace
/// period) or the handler `pre` — within `grace`; the failure, if any.
pub(super) async fn pre_stop(
    prober: Arc<dyn Prober + Send + Sync>,
    pre_sleep: Option<u64>,
    pre: Option<Result<ProbeAction, HookError>>,
    target: ProbeTarget,
    grace: Duration,
) -> Option<String> {
    let mut hook_err = None;
    if let Some(secs) = pre_sleep {
        // The sleep handler, cut short by the grace period.
        let want = Duration::from_secs(secs);
        tokio::time::sleep(want.min(grace)).await;
        if want > grace {
            hook_err = Some(format!(
                "container terminated before the sleep hook finished ({secs}s > grace period {grace:?})"
            ));
        }
    }
    if let Some(action) = pre {
        match action {
            Ok(action) => {
                let r = tokio::time::timeout(
                    grace,
                    tokio::task::spawn_blocking(move || {
                        prober.run(
                            &target,
                            &action,
                            k8s_openapi::chrono::Duration::from_std(grace).unwrap_or_default(),
                        )
                    }),
                )
                .await;
                match r {
                    Ok(Ok(ProbeOutcome::Success)) => {}
                    Ok(Ok(ProbeOutcome::Failure(e))) => hook_err = Some(e),
                    Ok(Err(e)) => hook_err = Some(e.to_string()),
                    Err(_) => hook_err = Some(format!("PreStopHook timed out after {grace:?}")),
                }
            }
            Err(e) => hook_err = Some(e.to_string()),
        }
    }
    hook_err
}

impl Worker {
    /// Runs the postStart hook of the container `id` just started; false when the container
    /// must not be considered further: the pod was deleted meanwhile (a deletion does not wait
    /// for the hook: the container is stopped next, and the hook's process with it), or the
    /// hook failed and the container was stopped.
    pub(super) async fn post_start(&mut self, c: &Container, id: &str, pod_ip: String) -> bool {
        let name = c.name.as_str();
        let post_sleep = crate::source::manifest::lifecycle_sleep(&self.pod, name, "postStart");
        let post = c.lifecycle.as_ref().and_then(|l| l.post_start.clone());
        if let Some(secs) = post_sleep {
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(secs)) => {}
                () = self.deleted() => return false,
            }
        } else if let Some(h) = post {
            let r = match hook_action(&h, c) {
                Ok(action) => {
                    let prober = self.fx.prober.clone();
                    let target = ProbeTarget {
                        pod_ip,
                        container_id: id.to_string(),
                    };
                    let hook = super::blocking(move || {
                        prober.run(&target, &action, k8s_openapi::chrono::Duration::seconds(30))
                    });
                    tokio::select! {
                        r = hook => r.unwrap_or(ProbeOutcome::Failure("hook task failed".into())),
                        () = self.deleted() => {
                            tracing::info!(uid = %self.uid, container = %name, "pod deleted during postStart: not waiting for the hook");
                            return false;
                        }
                    }
                }
                Err(e) => ProbeOutcome::Failure(e.to_string()),
            };
            if let ProbeOutcome::Failure(e) = r {
                self.event(
                    "Warning",
                    "FailedPostStartHook",
                    &format!("PostStartHook failed: {e}"),
                );
                self.event(
                    "Normal",
                    "Killing",
                    &format!("FailedPostStartHook: stopping container {name}"),
                );
                self.stop_many(vec![id.to_string()], self.grace()).await;
                return false;
            }
        }
        true
    }
}

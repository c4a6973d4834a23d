//! Lifecycle hooks: the postStart/preStop handlers as probe actions.

use crate::model::probe::ProbeSpec;
use k8s_openapi::api::core::v1::{Container, LifecycleHandler, Probe};

pub(super) fn hook_action(
    h: &LifecycleHandler,
    c: &Container,
) -> Result<crate::model::probe::ProbeAction, String> {
    let p = Probe {
        exec: h.exec.clone(),
        http_get: h.http_get.clone(),
        tcp_socket: h.tcp_socket.clone(),
        ..Default::default()
    };
    ProbeSpec::from_probe(&p, c)
        .map(|s| s.action)
        .map_err(|e| e.to_string())
}

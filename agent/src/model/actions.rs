//! `compute_actions`: what a pod worker must do next to move the observed pod towards its spec,
//! after the kubelet's computePodActions (init containers, native sidecars, restart policy,
//! back-off, liveness/startup failures, spec changes) (pure).

use crate::model::backoff::{self, RestartBackoff};
use crate::model::observed::{ObservedPod, ProbeResult, RuntimeState};
use k8s_openapi::api::core::v1::{Container, Pod, PodSpec};
use k8s_openapi::chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};

/// Why a container is killed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KillReason {
    /// Its spec changed.
    SpecChanged,
    /// Liveness probe failed.
    LivenessProbe,
    /// Startup probe failed.
    StartupProbe,
    /// State unknown; killed before being started again.
    Unknown,
}

/// One step for the pod worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Stop every container (main containers first, then sidecars in reverse order, see
    /// [`termination_order`]) and the sandbox.
    KillPod,
    /// Create a new sandbox (netns, CNI ADD, hosts/resolv.conf).
    CreateSandbox {
        /// Attempt number of the new sandbox.
        attempt: u32,
    },
    /// Kill one container.
    KillContainer {
        /// Container name.
        name: String,
        /// Why.
        reason: KillReason,
        /// Message for the Killing event.
        message: String,
    },
    /// Start init container `index`.
    StartInitContainer {
        /// Index in spec.initContainers.
        index: usize,
        /// Its name.
        name: String,
    },
    /// Start a regular container.
    StartContainer {
        /// Its name.
        name: String,
    },
    /// A start is held back by the restart back-off (status reason CrashLoopBackOff).
    BackOff {
        /// Container name.
        name: String,
        /// The kubelet's message.
        message: String,
    },
}

/// Hash of a container spec; a running container whose hash differs is restarted.
pub fn container_hash(c: &Container) -> String {
    let mut h = Sha256::new();
    h.update(serde_json::to_vec(c).unwrap_or_default());
    hex::encode(&h.finalize()[..8])
}

/// True for a native sidecar (init container with restartPolicy Always).
pub fn is_sidecar(c: &Container) -> bool {
    c.restart_policy.as_deref() == Some("Always")
}

fn restart_policy(spec: &PodSpec) -> &str {
    spec.restart_policy.as_deref().unwrap_or("Always")
}

/// kubelet `ShouldContainerBeRestarted` for a regular container.
pub fn should_restart(pod: &Pod, spec: &PodSpec, name: &str, observed: &ObservedPod) -> bool {
    if pod.metadata.deletion_timestamp.is_some() {
        return false;
    }
    let Some(st) = observed.latest(name) else {
        return true;
    };
    match st.state {
        RuntimeState::Running => false,
        RuntimeState::Unknown | RuntimeState::Created => true,
        RuntimeState::Exited => match restart_policy(spec) {
            "Never" => false,
            "OnFailure" => st.exit_code != 0,
            _ => true,
        },
    }
}

fn pod_label(pod: &Pod) -> String {
    format!(
        "{}_{}({})",
        pod.metadata.name.as_deref().unwrap_or(""),
        pod.metadata.namespace.as_deref().unwrap_or("default"),
        pod.metadata.uid.as_deref().unwrap_or("")
    )
}

/// Start or back off: kubelet `doBackOff` checks the finish time of the exited instance.
fn start_or_backoff(
    pod: &Pod,
    name: &str,
    start: Action,
    observed: &ObservedPod,
    backoff: &RestartBackoff,
    now: DateTime<Utc>,
) -> Action {
    let uid = pod.metadata.uid.as_deref().unwrap_or("");
    if let Some(c) = observed
        .latest(name)
        .filter(|c| c.state == RuntimeState::Exited)
    {
        let key = backoff::key(uid, name);
        if let Some(fin) = c.finished_at {
            if backoff.in_backoff_since(&key, fin, now) {
                return Action::BackOff {
                    name: name.to_string(),
                    message: format!(
                        "back-off {} restarting failed container={} pod={}",
                        backoff::go_duration(backoff.get(&key)),
                        name,
                        pod_label(pod)
                    ),
                };
            }
        }
    }
    start
}

/// Plans the next steps for `pod` given what was observed (kubelet `computePodActions`).
/// Starting a container after a crash is subject to `backoff`; the worker calls
/// `RestartBackoff::next` when it actually restarts one.
pub fn compute_actions(
    pod: &Pod,
    observed: &ObservedPod,
    now: DateTime<Utc>,
    backoff: &RestartBackoff,
) -> Vec<Action> {
    let Some(spec) = &pod.spec else { return vec![] };
    let inits = spec.init_containers.as_deref().unwrap_or(&[]);
    let mut out = Vec::new();
    let sandbox_changed = observed.sandbox.as_ref().is_none_or(|s| !s.ready);
    if sandbox_changed {
        let attempt = observed
            .sandbox
            .as_ref()
            .map(|s| s.attempt + 1)
            .unwrap_or(0);
        let has_any = !observed.containers.is_empty();
        if observed.sandbox.is_some() || has_any {
            out.push(Action::KillPod);
        }
        if restart_policy(spec) == "Never" && observed.sandbox.is_some() && has_any {
            return out;
        }
        let to_start: Vec<&Container> = spec
            .containers
            .iter()
            .filter(|c| {
                !(restart_policy(spec) == "OnFailure"
                    && observed
                        .latest(&c.name)
                        .is_some_and(|s| s.state == RuntimeState::Exited && s.exit_code == 0))
            })
            .collect();
        if to_start.is_empty() && inits.is_empty() {
            return out;
        }
        out.push(Action::CreateSandbox { attempt });
        if let Some(first) = inits.first() {
            out.push(Action::StartInitContainer {
                index: 0,
                name: first.name.clone(),
            });
        } else {
            out.extend(to_start.into_iter().map(|c| Action::StartContainer {
                name: c.name.clone(),
            }));
        }
        return out;
    }

    // Init containers, in order; sidecars gate the next one until started.
    let mut initialized = true;
    for (i, c) in inits.iter().enumerate() {
        let start = || Action::StartInitContainer {
            index: i,
            name: c.name.clone(),
        };
        let Some(st) = observed.latest(&c.name) else {
            out.push(start());
            initialized = false;
            break;
        };
        match st.state {
            RuntimeState::Created | RuntimeState::Unknown => {
                if st.state == RuntimeState::Unknown {
                    out.push(Action::KillContainer {
                        name: c.name.clone(),
                        reason: KillReason::Unknown,
                        message: "Container is in unknown state, try killing it before removal"
                            .into(),
                    });
                }
                out.push(start());
                initialized = false;
                break;
            }
            RuntimeState::Running if is_sidecar(c) => {
                if let Some(kill) =
                    probe_kill(c, st.probes.liveness, st.probes.startup, &st.spec_hash)
                {
                    out.push(kill);
                    out.push(start());
                }
                if !st.probes.started() {
                    initialized = false;
                    break;
                }
            }
            RuntimeState::Running => {
                initialized = false;
                break;
            }
            RuntimeState::Exited if is_sidecar(c) => {
                out.push(start_or_backoff(
                    pod,
                    &c.name,
                    start(),
                    observed,
                    backoff,
                    now,
                ));
            }
            RuntimeState::Exited if st.exit_code == 0 => {}
            RuntimeState::Exited => {
                if restart_policy(spec) == "Never" {
                    out.push(Action::KillPod);
                } else {
                    out.push(start_or_backoff(
                        pod,
                        &c.name,
                        start(),
                        observed,
                        backoff,
                        now,
                    ));
                }
                initialized = false;
                break;
            }
        }
    }
    if !initialized || out.contains(&Action::KillPod) {
        return out;
    }

    let mut keep = 0;
    let mut starts = 0;
    for c in &spec.containers {
        let st = observed.latest(&c.name);
        match st {
            Some(s) if s.state == RuntimeState::Running => {
                let restart = restart_policy(spec) != "Never";
                if s.spec_hash != container_hash(c) {
                    out.push(Action::KillContainer {
                        name: c.name.clone(),
                        reason: KillReason::SpecChanged,
                        message: format!(
                            "Container {} definition changed, will be restarted",
                            c.name
                        ),
                    });
                    out.push(Action::StartContainer {
                        name: c.name.clone(),
                    });
                    starts += 1;
                } else if let Some(kill) =
                    probe_kill(c, s.probes.liveness, s.probes.startup, &s.spec_hash)
                {
                    let kill = match kill {
                        Action::KillContainer {
                            name,
                            reason,
                            message,
                        } if restart => Action::KillContainer {
                            name,
                            reason,
                            message: format!("{message}, will be restarted"),
                        },
                        k => k,
                    };
                    out.push(kill);
                    if restart {
                        out.push(Action::StartContainer {
                            name: c.name.clone(),
                        });
                        starts += 1;
                    }
                } else {
                    keep += 1;
                }
            }
            _ => {
                if should_restart(pod, spec, &c.name, observed) {
                    if st.is_some_and(|s| s.state == RuntimeState::Unknown) {
                        out.push(Action::KillContainer {
                            name: c.name.clone(),
                            reason: KillReason::Unknown,
                            message: "Container is in unknown state, try killing it before removal"
                                .into(),
                        });
                    }
                    let a = start_or_backoff(
                        pod,
                        &c.name,
                        Action::StartContainer {
                            name: c.name.clone(),
                        },
                        observed,
                        backoff,
                        now,
                    );
                    if matches!(a, Action::StartContainer { .. }) {
                        starts += 1;
                    } else {
                        keep += 1;
                    }
                    out.push(a);
                }
            }
        }
    }
    if keep == 0 && starts == 0 {
        // every regular container is done: stop the pod (sidecars, then the sandbox, which
        // frees the network) and restart no sidecar, like the kubelet
        out.retain(|a| {
            !matches!(
                a,
                Action::StartInitContainer { .. } | Action::BackOff { .. }
            )
        });
        out.push(Action::KillPod);
    }
    out
}

fn probe_kill(
    c: &Container,
    liveness: Option<ProbeResult>,
    startup: Option<ProbeResult>,
    _hash: &str,
) -> Option<Action> {
    if liveness == Some(ProbeResult::Failure) {
        Some(Action::KillContainer {
            name: c.name.clone(),
            reason: KillReason::LivenessProbe,
            message: format!("Container {} failed liveness probe", c.name),
        })
    } else if startup == Some(ProbeResult::Failure) {
        Some(Action::KillContainer {
            name: c.name.clone(),
            reason: KillReason::StartupProbe,
            message: format!("Container {} failed startup probe", c.name),
        })
    } else {
        None
    }
}

/// The order in which a pod's running containers are stopped: all regular (and running
/// non-sidecar init) containers together first, then each sidecar alone, in reverse order.
pub fn termination_order(spec: &PodSpec, observed: &ObservedPod) -> Vec<Vec<String>> {
    let running = |n: &str| {
        observed
            .latest(n)
            .is_some_and(|c| c.state == RuntimeState::Running)
    };
    let inits = spec.init_containers.as_deref().unwrap_or(&[]);
    let mut first: Vec<String> = spec
        .containers
        .iter()
        .map(|c| c.name.clone())
        .filter(|n| running(n))
        .collect();
    first.extend(
        inits
            .iter()
            .filter(|c| !is_sidecar(c) && running(&c.name))
            .map(|c| c.name.clone()),
    );
    let mut waves = vec![];
    if !first.is_empty() {
        waves.push(first);
    }
    for c in inits
        .iter()
        .rev()
        .filter(|c| is_sidecar(c) && running(&c.name))
    {
        waves.push(vec![c.name.clone()]);
    }
    waves
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::backoff::BackoffConfig;
    use crate::model::observed::{ObservedContainer, ObservedSandbox, ProbeView};
    use k8s_openapi::chrono::TimeZone;

    fn t(s: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_700_000_000 + s, 0).single().unwrap()
    }

    fn ctr(name: &str, sidecar: bool) -> Container {
        Container {
            name: name.into(),
            image: Some("busybox".into()),
            restart_policy: sidecar.then(|| "Always".into()),
            ..Default::default()
        }
    }

    fn pod(policy: &str, inits: Vec<Container>, main: Vec<Container>) -> Pod {
        Pod {
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                name: Some("p".into()),
                namespace: Some("default".into()),
                uid: Some("u1".into()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                restart_policy: Some(policy.into()),
                init_containers: (!inits.is_empty()).then_some(inits),
                containers: main,
                ..Default::default()
            }),
            status: None,
        }
    }

    /// (name, state, exit code, probes) for an observed instance of a container in `p`.
    fn obs(p: &Pod, list: &[(&str, RuntimeState, i32, ProbeView)]) -> ObservedPod {
        let spec = p.spec.as_ref().unwrap();
        let all: Vec<&Container> = spec
            .init_containers
            .iter()
            .flatten()
            .chain(spec.containers.iter())
            .collect();
        ObservedPod {
            sandbox: Some(ObservedSandbox {
                id: "s".into(),
                attempt: 0,
                ready: true,
                ips: vec!["10.0.0.2".into()],
            }),
            containers: list
                .iter()
                .map(|(n, s, code, probes)| ObservedContainer {
                    name: n.to_string(),
                    id: format!("id-{n}"),
                    attempt: 0,
                    spec_hash: all
                        .iter()
                        .find(|c| c.name == *n)
                        .map(|c| container_hash(c))
                        .unwrap_or_default(),
                    image: "busybox".into(),
                    image_id: String::new(),
                    state: *s,
                    created_at: t(0),
                    started_at: Some(t(1)),
                    finished_at: (*s == RuntimeState::Exited).then(|| t(2)),
                    exit_code: *code,
                    oom_killed: false,
                    message: String::new(),
                    probes: *probes,
                })
                .collect(),
            ..Default::default()
        }
    }

    use RuntimeState::{Exited, Running};
    const NP: ProbeView = ProbeView {
        startup: None,
        liveness: None,
        readiness: None,
    };

    fn start(n: &str) -> Action {
        Action::StartContainer { name: n.into() }
    }
    fn init(i: usize, n: &str) -> Action {
        Action::StartInitContainer {
            index: i,
            name: n.into(),
        }
    }

    #[test]
    fn compute_actions_table() {
        let simple = pod("Always", vec![], vec![ctr("a", false), ctr("b", false)]);
        let with_init = pod(
            "Always",
            vec![ctr("i1", false), ctr("sc", true), ctr("i2", false)],
            vec![ctr("a", false)],
        );
        let never = pod("Never", vec![ctr("i1", false)], vec![ctr("a", false)]);
        let onfail = pod("OnFailure", vec![], vec![ctr("a", false)]);
        let unstarted = ProbeView {
            startup: Some(ProbeResult::Unknown),
            ..NP
        };
        let live_fail = ProbeView {
            liveness: Some(ProbeResult::Failure),
            ..NP
        };
        let no_backoff = RestartBackoff::new(BackoffConfig::default());
        let mut in_backoff = RestartBackoff::new(BackoffConfig::default());
        in_backoff.next(&backoff::key("u1", "a"), t(0), t(0));
        let sc_pod = pod("OnFailure", vec![ctr("sc", true)], vec![ctr("a", false)]);
        let table: Vec<(&str, &Pod, ObservedPod, &RestartBackoff, Vec<Action>)> = vec![
            (
                "fresh pod",
                &simple,
                ObservedPod::default(),
                &no_backoff,
                vec![Action::CreateSandbox { attempt: 0 }, start("a"), start("b")],
            ),
            (
                "fresh pod with init",
                &with_init,
                ObservedPod::default(),
                &no_backoff,
                vec![Action::CreateSandbox { attempt: 0 }, init(0, "i1")],
            ),
            (
                "all running",
                &simple,
                obs(&simple, &[("a", Running, 0, NP), ("b", Running, 0, NP)]),
                &no_backoff,
                vec![],
            ),
            (
                "one exited, Always",
                &simple,
                obs(&simple, &[("a", Exited, 1, NP), ("b", Running, 0, NP)]),
                &no_backoff,
                vec![start("a")],
            ),
            (
                "one exited, in back-off",
                &simple,
                obs(&simple, &[("a", Exited, 1, NP), ("b", Running, 0, NP)]),
                &in_backoff,
                vec![Action::BackOff {
                    name: "a".into(),
                    message: "back-off 10s restarting failed container=a pod=p_default(u1)".into(),
                }],
            ),
            (
                "init 1 running",
                &with_init,
                obs(&with_init, &[("i1", Running, 0, NP)]),
                &no_backoff,
                vec![],
            ),
            (
                "init 1 done",
                &with_init,
                obs(&with_init, &[("i1", Exited, 0, NP)]),
                &no_backoff,
                vec![init(1, "sc")],
            ),
            (
                "sidecar not started yet",
                &with_init,
                obs(
                    &with_init,
                    &[("i1", Exited, 0, NP), ("sc", Running, 0, unstarted)],
                ),
                &no_backoff,
                vec![],
            ),
            (
                "sidecar started",
                &with_init,
                obs(&with_init, &[("i1", Exited, 0, NP), ("sc", Running, 0, NP)]),
                &no_backoff,
                vec![init(2, "i2")],
            ),
            (
                "initialized",
                &with_init,
                obs(
                    &with_init,
                    &[
                        ("i1", Exited, 0, NP),
                        ("sc", Running, 0, NP),
                        ("i2", Exited, 0, NP),
                    ],
                ),
                &no_backoff,
                vec![start("a")],
            ),
            (
                "sidecar restarted after exit",
                &with_init,
                obs(
                    &with_init,
                    &[
                        ("i1", Exited, 0, NP),
                        ("sc", Exited, 1, NP),
                        ("i2", Exited, 0, NP),
                        ("a", Running, 0, NP),
                    ],
                ),
                &no_backoff,
                vec![init(1, "sc")],
            ),
            (
                "init failed, Always: retry",
                &with_init,
                obs(&with_init, &[("i1", Exited, 1, NP)]),
                &no_backoff,
                vec![init(0, "i1")],
            ),
            (
                "init failed, Never: kill pod",
                &never,
                obs(&never, &[("i1", Exited, 1, NP)]),
                &no_backoff,
                vec![Action::KillPod],
            ),
            (
                "Never, main exited",
                &never,
                obs(&never, &[("i1", Exited, 0, NP), ("a", Exited, 1, NP)]),
                &no_backoff,
                vec![Action::KillPod],
            ),
            (
                "OnFailure, exit 0 stays",
                &onfail,
                obs(&onfail, &[("a", Exited, 0, NP)]),
                &no_backoff,
                vec![Action::KillPod],
            ),
            (
                "OnFailure, exit 1 restarts",
                &onfail,
                obs(&onfail, &[("a", Exited, 1, NP)]),
                &no_backoff,
                vec![start("a")],
            ),
            (
                "liveness failure restarts",
                &simple,
                obs(
                    &simple,
                    &[("a", Running, 0, live_fail), ("b", Running, 0, NP)],
                ),
                &no_backoff,
                vec![
                    Action::KillContainer {
                        name: "a".into(),
                        reason: KillReason::LivenessProbe,
                        message: "Container a failed liveness probe, will be restarted".into(),
                    },
                    start("a"),
                ],
            ),
            (
                "main done, sidecar still running: kill pod",
                &sc_pod,
                obs(&sc_pod, &[("sc", Running, 0, NP), ("a", Exited, 0, NP)]),
                &no_backoff,
                vec![Action::KillPod],
            ),
        ];
        for (name, p, o, b, want) in table {
            assert_eq!(compute_actions(p, &o, t(5), b), want, "{name}");
        }
    }

    #[test]
    fn sandbox_gone_recreates_or_stops() {
        let simple = pod("Always", vec![], vec![ctr("a", false)]);
        let mut o = obs(&simple, &[("a", Running, 0, NP)]);
        o.sandbox.as_mut().unwrap().ready = false;
        let b = RestartBackoff::default();
        assert_eq!(
            compute_actions(&simple, &o, t(5), &b),
            vec![
                Action::KillPod,
                Action::CreateSandbox { attempt: 1 },
                start("a")
            ]
        );
        let never = pod("Never", vec![], vec![ctr("a", false)]);
        let mut o = obs(&never, &[("a", Exited, 0, NP)]);
        o.sandbox.as_mut().unwrap().ready = false;
        assert_eq!(compute_actions(&never, &o, t(5), &b), vec![Action::KillPod]);
    }

    #[test]
    fn spec_change_restarts() {
        let p = pod("Always", vec![], vec![ctr("a", false)]);
        let mut o = obs(&p, &[("a", Running, 0, NP)]);
        o.containers[0].spec_hash = "old".into();
        let acts = compute_actions(&p, &o, t(5), &RestartBackoff::default());
        assert!(matches!(
            &acts[0],
            Action::KillContainer {
                reason: KillReason::SpecChanged,
                ..
            }
        ));
        assert_eq!(acts[1], start("a"));
    }

    #[test]
    fn termination_order_stops_sidecars_last_in_reverse() {
        let p = pod(
            "Always",
            vec![ctr("s1", true), ctr("s2", true)],
            vec![ctr("a", false), ctr("b", false)],
        );
        let o = obs(
            &p,
            &[
                ("s1", Running, 0, NP),
                ("s2", Running, 0, NP),
                ("a", Running, 0, NP),
                ("b", Running, 0, NP),
            ],
        );
        let spec = p.spec.as_ref().unwrap();
        assert_eq!(
            termination_order(spec, &o),
            vec![
                vec!["a".to_string(), "b".into()],
                vec!["s2".into()],
                vec!["s1".into()]
            ]
        );
    }
}

//! Pod status from observed container states: phase, conditions, container statuses, QoS class,
//! following the kubelet's generateAPIPodStatus/getPhase rules (pure).

use crate::model::actions::{is_sidecar, should_restart};
use crate::model::observed::{ObservedContainer, ObservedPod, RuntimeState};
use crate::model::qos;
use k8s_openapi::api::core::v1::{
    Container, ContainerState, ContainerStateRunning, ContainerStateTerminated,
    ContainerStateWaiting, ContainerStatus, Pod, PodCondition, PodIP, PodSpec, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::chrono::{DateTime, Utc};

fn waiting(reason: &str, message: Option<String>) -> ContainerState {
    ContainerState {
        waiting: Some(ContainerStateWaiting {
            reason: Some(reason.into()),
            message,
        }),
        ..Default::default()
    }
}

fn convert(c: &ObservedContainer) -> ContainerState {
    match c.state {
        RuntimeState::Running => ContainerState {
            running: Some(ContainerStateRunning {
                started_at: c.started_at.map(Time),
            }),
            ..Default::default()
        },
        RuntimeState::Exited => ContainerState {
            terminated: Some(ContainerStateTerminated {
                exit_code: c.exit_code,
                reason: Some(c.terminated_reason().into()),
                message: (!c.message.is_empty()).then(|| c.message.clone()),
                started_at: c.started_at.map(Time),
                finished_at: c.finished_at.map(Time),
                container_id: Some(format!("hako://{}", c.id)),
                signal: None,
            }),
            ..Default::default()
        },
        RuntimeState::Created | RuntimeState::Unknown => ContainerState {
            waiting: Some(ContainerStateWaiting::default()),
            ..Default::default()
        },
    }
}

fn container_statuses(
    pod: &Pod,
    spec: &PodSpec,
    containers: &[Container],
    observed: &ObservedPod,
    is_init: bool,
) -> Vec<ContainerStatus> {
    let has_init = spec.init_containers.as_ref().is_some_and(|i| !i.is_empty());
    let default_reason = if has_init {
        "PodInitializing"
    } else {
        "ContainerCreating"
    };
    let mut out = Vec::new();
    for c in containers {
        let mut st = ContainerStatus {
            name: c.name.clone(),
            image: c.image.clone().unwrap_or_default(),
            state: Some(waiting(default_reason, None)),
            ready: false,
            started: Some(false),
            ..Default::default()
        };
        let insts = observed.latest_two(&c.name);
        if let Some(cur) = insts.first() {
            st.state = Some(convert(cur));
            st.container_id = Some(format!("hako://{}", cur.id));
            st.image = cur.image.clone();
            st.image_id = cur.image_id.clone();
            st.restart_count = i32::try_from(cur.attempt).unwrap_or(i32::MAX);
            let running = cur.state == RuntimeState::Running;
            let started = running && cur.probes.started();
            st.started = Some(started);
            st.ready = if is_init && !is_sidecar(c) {
                cur.state == RuntimeState::Exited && cur.exit_code == 0
            } else {
                started && cur.probes.ready()
            };
        }
        if let Some(prev) = insts.get(1) {
            st.last_state = Some(convert(prev));
        }
        // A container that will be restarted and whose start failed is Waiting with that reason.
        let init_done = is_init
            && !is_sidecar(c)
            && insts
                .first()
                .is_some_and(|s| s.state == RuntimeState::Exited && s.exit_code == 0);
        let restart = if is_init {
            !init_done && pod.metadata.deletion_timestamp.is_none()
        } else {
            should_restart(pod, spec, &c.name, observed)
        };
        if !init_done && restart {
            if let Some(f) = observed.start_failures.get(&c.name) {
                if st.state.as_ref().is_some_and(|s| s.terminated.is_some()) {
                    st.last_state = st.state.take();
                }
                st.state = Some(waiting(&f.reason, Some(f.message.clone())));
            }
        }
        out.push(st);
    }
    if !is_init {
        out.sort_by(|a, b| a.name.cmp(&b.name));
    }
    out
}

fn any_regular_started(spec: &PodSpec, statuses: &[ContainerStatus]) -> bool {
    spec.containers.iter().any(|c| {
        statuses.iter().find(|s| s.name == c.name).is_some_and(|s| {
            let st = s.state.clone().unwrap_or_default();
            st.running.is_some()
                || st.terminated.is_some()
                || (st.waiting.is_some()
                    && s.last_state
                        .as_ref()
                        .is_some_and(|l| l.terminated.is_some()))
        })
    })
}

fn find<'a>(v: &'a [ContainerStatus], name: &str) -> Option<&'a ContainerStatus> {
    v.iter().find(|s| s.name == name)
}

/// kubelet `getPhase`.
pub fn phase(spec: &PodSpec, init: &[ContainerStatus], main: &[ContainerStatus]) -> &'static str {
    let inits = spec.init_containers.as_deref().unwrap_or(&[]);
    let (mut pending_init, mut failed_init) = (0, 0);
    let has_last_term = |s: &ContainerStatus| {
        s.last_state
            .as_ref()
            .is_some_and(|l| l.terminated.is_some())
    };
    let last_exit = |s: &ContainerStatus| {
        s.last_state
            .as_ref()
            .and_then(|l| l.terminated.as_ref())
            .map(|t| t.exit_code)
    };
    for c in inits.iter().filter(|c| !is_sidecar(c)) {
        let Some(s) = find(init, &c.name) else {
            pending_init += 1;
            continue;
        };
        let st = s.state.clone().unwrap_or_default();
        if st.running.is_some() {
            pending_init += 1;
        } else if let Some(t) = &st.terminated {
            if t.exit_code != 0 {
                failed_init += 1;
            }
        } else if st.waiting.is_some() {
            if has_last_term(s) {
                if last_exit(s) != Some(0) {
                    failed_init += 1;
                }
            } else {
                pending_init += 1;
            }
        } else {
            pending_init += 1;
        }
    }
    let (mut unknown, mut running, mut waiting_n, mut stopped, mut succeeded) = (0, 0, 0, 0, 0);
    for c in inits.iter().filter(|c| is_sidecar(c)) {
        let Some(s) = find(init, &c.name) else {
            unknown += 1;
            continue;
        };
        let st = s.state.clone().unwrap_or_default();
        if st.running.is_some() {
            if s.started != Some(true) {
                pending_init += 1;
            }
            running += 1;
        } else if st.terminated.is_some() {
        } else if st.waiting.is_some() {
            if !has_last_term(s) {
                pending_init += 1;
                waiting_n += 1;
            }
        } else {
            unknown += 1;
        }
    }
    for c in &spec.containers {
        let Some(s) = find(main, &c.name) else {
            unknown += 1;
            continue;
        };
        let st = s.state.clone().unwrap_or_default();
        if st.running.is_some() {
            running += 1;
        } else if let Some(t) = &st.terminated {
            stopped += 1;
            if t.exit_code == 0 {
                succeeded += 1;
            }
        } else if st.waiting.is_some() {
            if has_last_term(s) {
                stopped += 1;
            } else {
                waiting_n += 1;
            }
        } else {
            unknown += 1;
        }
    }
    let policy = spec.restart_policy.as_deref().unwrap_or("Always");
    if failed_init > 0 && policy == "Never" {
        return "Failed";
    }
    if (pending_init > 0 && !any_regular_started(spec, main)) || waiting_n > 0 {
        return "Pending";
    }
    if running > 0 && unknown == 0 {
        return "Running";
    }
    if running == 0 && stopped > 0 && unknown == 0 {
        if policy == "Always" {
            return "Running";
        }
        if stopped == succeeded {
            return "Succeeded";
        }
        if policy == "Never" {
            return "Failed";
        }
        return "Running";
    }
    "Pending"
}

fn cond(t: &str, ok: bool, reason: Option<&str>, message: Option<String>) -> PodCondition {
    PodCondition {
        type_: t.into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: reason.map(str::to_string),
        message,
        ..Default::default()
    }
}

fn go_list(v: &[String]) -> String {
    format!("[{}]", v.join(" "))
}

/// The condition types the kubelet owns; every other condition of a pod (readiness gates,
/// `DisruptionTarget`, ...) belongs to whoever set it and is kept as it is.
pub const KUBELET_CONDITIONS: [&str; 5] = [
    "PodReadyToStartContainers",
    "Initialized",
    "Ready",
    "ContainersReady",
    "PodScheduled",
];

/// Why the readiness gates hold the pod back (kubelet `GeneratePodReadyCondition`): a gate whose
/// condition is missing or not "True".
fn readiness_gate_messages(spec: &PodSpec, external: &[PodCondition]) -> Vec<String> {
    let mut out = vec![];
    for g in spec.readiness_gates.iter().flatten() {
        match external.iter().find(|c| c.type_ == g.condition_type) {
            None => out.push(format!(
                "corresponding condition of pod readiness gate {:?} does not exist.",
                g.condition_type
            )),
            Some(c) if c.status != "True" => out.push(format!(
                "the status of pod readiness gate {:?} is not \"True\", but {}",
                g.condition_type, c.status
            )),
            Some(_) => {}
        }
    }
    out
}

/// The pod conditions, in the kubelet's order. `external` holds the pod's conditions that others
/// own (readiness gates are read from them).
pub fn conditions(
    spec: &PodSpec,
    phase: &str,
    sandbox_ready: bool,
    init: &[ContainerStatus],
    main: &[ContainerStatus],
    external: &[PodCondition],
) -> Vec<PodCondition> {
    let inits = spec.init_containers.as_deref().unwrap_or(&[]);
    // Initialized
    let initialized = if inits.is_empty() {
        cond("Initialized", true, None, None)
    } else {
        let (mut unknown, mut incomplete) = (vec![], vec![]);
        for c in inits {
            match find(init, &c.name) {
                None => unknown.push(c.name.clone()),
                Some(s) if is_sidecar(c) => {
                    if s.started != Some(true) {
                        incomplete.push(c.name.clone())
                    }
                }
                Some(s) => {
                    let done = s
                        .state
                        .as_ref()
                        .and_then(|s| s.terminated.as_ref())
                        .is_some_and(|t| t.exit_code == 0);
                    if !done {
                        incomplete.push(c.name.clone())
                    }
                }
            }
        }
        if phase == "Succeeded" && unknown.is_empty() {
            cond("Initialized", true, Some("PodCompleted"), None)
        } else if any_regular_started(spec, main) {
            cond("Initialized", true, None, None)
        } else {
            let mut msgs = vec![];
            if !unknown.is_empty() {
                msgs.push(format!(
                    "containers with unknown status: {}",
                    go_list(&unknown)
                ));
            }
            if !incomplete.is_empty() {
                msgs.push(format!(
                    "containers with incomplete status: {}",
                    go_list(&incomplete)
                ));
            }
            if msgs.is_empty() {
                cond("Initialized", true, None, None)
            } else {
                cond(
                    "Initialized",
                    false,
                    Some("ContainersNotInitialized"),
                    Some(msgs.join(", ")),
                )
            }
        }
    };
    // ContainersReady
    let (mut unknown, mut unready) = (vec![], vec![]);
    let checks = inits
        .iter()
        .filter(|c| is_sidecar(c))
        .map(|c| (c, init))
        .chain(spec.containers.iter().map(|c| (c, main)));
    for (c, list) in checks {
        match find(list, &c.name) {
            None => unknown.push(c.name.clone()),
            Some(s) if !s.ready => unready.push(c.name.clone()),
            Some(_) => {}
        }
    }
    let ready = if phase == "Succeeded" && unknown.is_empty() {
        cond("ContainersReady", false, Some("PodCompleted"), None)
    } else {
        let mut msgs = vec![];
        if !unknown.is_empty() {
            msgs.push(format!(
                "containers with unknown status: {}",
                go_list(&unknown)
            ));
        }
        if !unready.is_empty() {
            msgs.push(format!(
                "containers with unready status: {}",
                go_list(&unready)
            ));
        }
        if msgs.is_empty() {
            cond("ContainersReady", true, None, None)
        } else {
            cond(
                "ContainersReady",
                false,
                Some("ContainersNotReady"),
                Some(msgs.join(", ")),
            )
        }
    };
    let mut pod_ready = ready.clone();
    pod_ready.type_ = "Ready".into();
    if pod_ready.status == "True" {
        let unready = readiness_gate_messages(spec, external);
        if !unready.is_empty() {
            pod_ready = cond(
                "Ready",
                false,
                Some("ReadinessGatesNotReady"),
                Some(unready.join(", ")),
            );
        }
    }
    vec![
        cond("PodReadyToStartContainers", sandbox_ready, None, None),
        initialized,
        pod_ready,
        ready,
        cond("PodScheduled", true, None, None),
    ]
}

/// The kubelet's reason and message for a pod past its `activeDeadlineSeconds`.
pub const DEADLINE_REASON: &str = "DeadlineExceeded";
pub const DEADLINE_MESSAGE: &str = "Pod was active on the node longer than the specified deadline";

/// When the pod's `activeDeadlineSeconds` runs out (counted from status.startTime, as the
/// kubelet's active deadline handler does); None without a deadline or a start time.
pub fn active_deadline(spec: &PodSpec, start: Option<DateTime<Utc>>) -> Option<DateTime<Utc>> {
    let secs = spec.active_deadline_seconds?;
    start?.checked_add_signed(k8s_openapi::chrono::Duration::try_seconds(secs)?)
}

/// Computes the full pod status. `previous` keeps condition transition times stable.
pub fn compute_status(
    pod: &Pod,
    observed: &ObservedPod,
    previous: Option<&PodStatus>,
    now: DateTime<Utc>,
) -> PodStatus {
    let Some(spec) = &pod.spec else {
        return PodStatus::default();
    };
    let inits = spec.init_containers.clone().unwrap_or_default();
    let init = container_statuses(pod, spec, &inits, observed, true);
    let main = container_statuses(pod, spec, &spec.containers, observed, false);
    // Ephemeral containers: reported, never counted for phase or readiness.
    let ephemeral: Vec<Container> = spec
        .ephemeral_containers
        .iter()
        .flatten()
        .map(|e| Container {
            name: e.name.clone(),
            image: e.image.clone(),
            ..Default::default()
        })
        .collect();
    let mut ephemeral_statuses = container_statuses(pod, spec, &ephemeral, observed, false);
    for s in &mut ephemeral_statuses {
        s.ready = false;
    }
    let mut ph = phase(spec, &init, &main);
    // A pod past its active deadline fails (a pod that already finished keeps its phase).
    let deadline = (ph != "Succeeded"
        && ph != "Failed"
        && active_deadline(spec, observed.start_time).is_some_and(|d| d <= now))
        || pod
            .status
            .as_ref()
            .is_some_and(|s| s.reason.as_deref() == Some(DEADLINE_REASON));
    if deadline {
        ph = "Failed";
    }
    let sandbox_ready = observed.sandbox.as_ref().is_some_and(|s| s.ready);
    // Conditions others set (readiness gates, DisruptionTarget) are kept as the kubelet's status
    // manager keeps them.
    let external: Vec<PodCondition> = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
        .filter(|c| !KUBELET_CONDITIONS.contains(&c.type_.as_str()))
        .cloned()
        .collect();
    let mut conds = conditions(spec, ph, sandbox_ready, &init, &main, &external);
    for c in &mut conds {
        let prev = previous
            .and_then(|p| p.conditions.as_ref())
            .and_then(|l| l.iter().find(|p| p.type_ == c.type_));
        c.last_transition_time = match prev {
            Some(p) if p.status == c.status => p.last_transition_time.clone(),
            _ => Some(Time(now)),
        };
        c.last_probe_time = None;
    }
    conds.extend(external);
    let ips: Vec<String> = observed
        .sandbox
        .as_ref()
        .map(|s| s.ips.clone())
        .unwrap_or_default();
    PodStatus {
        phase: Some(ph.into()),
        conditions: Some(conds),
        init_container_statuses: (!inits.is_empty()).then_some(init),
        container_statuses: Some(main),
        ephemeral_container_statuses: (!ephemeral.is_empty()).then_some(ephemeral_statuses),
        qos_class: Some(qos::pod_qos(spec).as_str().into()),
        pod_ip: ips.first().cloned(),
        pod_ips: (!ips.is_empty()).then(|| ips.iter().map(|ip| PodIP { ip: ip.clone() }).collect()),
        host_ip: observed.host_ip.clone(),
        start_time: observed.start_time.map(Time),
        reason: deadline.then(|| DEADLINE_REASON.to_string()),
        message: deadline.then(|| DEADLINE_MESSAGE.to_string()),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::observed::{ObservedSandbox, ProbeResult, ProbeView, StartFailure};
    use k8s_openapi::chrono::TimeZone;

    fn t(s: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_700_000_000 + s, 0).single().unwrap()
    }

    fn pod(policy: &str, init: &[(&str, bool)], main: &[&str]) -> Pod {
        let c = |n: &str, sc: bool| Container {
            name: n.into(),
            image: Some("busybox".into()),
            restart_policy: sc.then(|| "Always".into()),
            ..Default::default()
        };
        Pod {
            spec: Some(PodSpec {
                restart_policy: Some(policy.into()),
                init_containers: (!init.is_empty())
                    .then(|| init.iter().map(|(n, s)| c(n, *s)).collect()),
                containers: main.iter().map(|n| c(n, false)).collect(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    type Inst<'a> = (&'a str, u32, RuntimeState, i32, bool, ProbeView);

    fn obs(list: &[Inst]) -> ObservedPod {
        ObservedPod {
            sandbox: Some(ObservedSandbox {
                id: "s".into(),
                attempt: 0,
                ready: true,
                ips: vec!["10.1.0.2".into()],
            }),
            containers: list
                .iter()
                .map(|(n, attempt, s, code, oom, probes)| ObservedContainer {
                    name: n.to_string(),
                    id: format!("{n}{attempt}"),
                    attempt: *attempt,
                    spec_hash: String::new(),
                    image: "busybox".into(),
                    image_id: String::new(),
                    state: *s,
                    created_at: t(i64::from(*attempt)),
                    started_at: Some(t(1)),
                    finished_at: (*s == RuntimeState::Exited).then(|| t(2)),
                    exit_code: *code,
                    oom_killed: *oom,
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
    const UNREADY: ProbeView = ProbeView {
        startup: None,
        liveness: None,
        readiness: Some(ProbeResult::Failure),
    };

    fn state_reason(s: &ContainerStatus) -> String {
        let st = s.state.clone().unwrap_or_default();
        if let Some(w) = st.waiting {
            format!("waiting:{}", w.reason.unwrap_or_default())
        } else if let Some(t) = st.terminated {
            format!(
                "terminated:{}:{}",
                t.reason.unwrap_or_default(),
                t.exit_code
            )
        } else {
            "running".into()
        }
    }

    #[test]
    fn status_table() {
        // (name, pod, observed, start failure, phase, Ready, first container state, restarts)
        type Row<'a> = (
            &'a str,
            Pod,
            ObservedPod,
            Option<(&'a str, &'a str)>,
            &'a str,
            &'a str,
            &'a str,
            i32,
        );
        let table: Vec<Row> = vec![
            (
                "nothing yet",
                pod("Always", &[], &["a"]),
                ObservedPod::default(),
                None,
                "Pending",
                "False",
                "waiting:ContainerCreating",
                0,
            ),
            (
                "init pending",
                pod("Always", &[("i", false)], &["a"]),
                ObservedPod::default(),
                None,
                "Pending",
                "False",
                "waiting:PodInitializing",
                0,
            ),
            (
                "running ready",
                pod("Always", &[], &["a"]),
                obs(&[("a", 0, Running, 0, false, NP)]),
                None,
                "Running",
                "True",
                "running",
                0,
            ),
            (
                "running unready",
                pod("Always", &[], &["a"]),
                obs(&[("a", 0, Running, 0, false, UNREADY)]),
                None,
                "Running",
                "False",
                "running",
                0,
            ),
            (
                "Never exit 0",
                pod("Never", &[], &["a"]),
                obs(&[("a", 0, Exited, 0, false, NP)]),
                None,
                "Succeeded",
                "False",
                "terminated:Completed:0",
                0,
            ),
            (
                "Never exit 1",
                pod("Never", &[], &["a"]),
                obs(&[("a", 0, Exited, 1, false, NP)]),
                None,
                "Failed",
                "False",
                "terminated:Error:1",
                0,
            ),
            (
                "OnFailure oom restarting",
                pod("OnFailure", &[], &["a"]),
                obs(&[("a", 0, Exited, 137, true, NP)]),
                None,
                "Running",
                "False",
                "terminated:OOMKilled:137",
                0,
            ),
            (
                "OnFailure exit 0",
                pod("OnFailure", &[], &["a"]),
                obs(&[("a", 0, Exited, 0, false, NP)]),
                None,
                "Succeeded",
                "False",
                "terminated:Completed:0",
                0,
            ),
            (
                "crash loop",
                pod("Always", &[], &["a"]),
                obs(&[
                    ("a", 0, Exited, 1, false, NP),
                    ("a", 1, Exited, 1, false, NP),
                ]),
                Some((
                    "CrashLoopBackOff",
                    "back-off 10s restarting failed container=a pod=p",
                )),
                "Running",
                "False",
                "waiting:CrashLoopBackOff",
                1,
            ),
            (
                "image pull",
                pod("Always", &[], &["a"]),
                ObservedPod::default(),
                Some(("ErrImagePull", "not found")),
                "Pending",
                "False",
                "waiting:ErrImagePull",
                0,
            ),
            (
                "init failed Never",
                pod("Never", &[("i", false)], &["a"]),
                obs(&[("i", 0, Exited, 1, false, NP)]),
                None,
                "Failed",
                "False",
                "waiting:PodInitializing",
                0,
            ),
            (
                "init running",
                pod("Always", &[("i", false)], &["a"]),
                obs(&[("i", 0, Running, 0, false, NP)]),
                None,
                "Pending",
                "False",
                "waiting:PodInitializing",
                0,
            ),
            (
                "sidecar and main running",
                pod("Always", &[("sc", true)], &["a"]),
                obs(&[
                    ("sc", 0, Running, 0, false, NP),
                    ("a", 0, Running, 0, false, NP),
                ]),
                None,
                "Running",
                "True",
                "running",
                0,
            ),
            (
                "sidecar unready blocks Ready",
                pod("Always", &[("sc", true)], &["a"]),
                obs(&[
                    ("sc", 0, Running, 0, false, UNREADY),
                    ("a", 0, Running, 0, false, NP),
                ]),
                None,
                "Running",
                "False",
                "running",
                0,
            ),
        ];
        for (name, p, mut o, fail, want_phase, want_ready, want_state, restarts) in table {
            if let Some((r, m)) = fail {
                o.start_failures.insert(
                    "a".into(),
                    StartFailure {
                        reason: r.into(),
                        message: m.into(),
                    },
                );
            }
            let s = compute_status(&p, &o, None, t(10));
            assert_eq!(s.phase.as_deref(), Some(want_phase), "{name}: phase");
            let ready = s
                .conditions
                .as_ref()
                .unwrap()
                .iter()
                .find(|c| c.type_ == "Ready")
                .unwrap();
            assert_eq!(ready.status, want_ready, "{name}: Ready");
            let cs = s
                .container_statuses
                .as_ref()
                .unwrap()
                .iter()
                .find(|c| c.name == "a")
                .unwrap();
            assert_eq!(state_reason(cs), want_state, "{name}: state");
            assert_eq!(cs.restart_count, restarts, "{name}: restarts");
        }
    }

    fn ready_of(s: &PodStatus) -> (String, Option<String>, Option<String>) {
        let c = s
            .conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == "Ready")
            .expect("Ready condition");
        (c.status.clone(), c.reason.clone(), c.message.clone())
    }

    #[test]
    fn readiness_gates_hold_ready_until_their_conditions_are_true() {
        let mut p = pod("Always", &[], &["a"]);
        if let Some(spec) = p.spec.as_mut() {
            spec.readiness_gates = Some(vec![
                k8s_openapi::api::core::v1::PodReadinessGate {
                    condition_type: "k8s.io/test-condition1".into(),
                },
                k8s_openapi::api::core::v1::PodReadinessGate {
                    condition_type: "k8s.io/test-condition2".into(),
                },
            ]);
        }
        let o = obs(&[("a", 0, Running, 0, false, NP)]);
        let external = |a: &str, b: Option<&str>| {
            let mut v = vec![PodCondition {
                type_: "k8s.io/test-condition1".into(),
                status: a.into(),
                ..Default::default()
            }];
            if let Some(b) = b {
                v.push(PodCondition {
                    type_: "k8s.io/test-condition2".into(),
                    status: b.into(),
                    ..Default::default()
                });
            }
            v
        };
        let with = |conds: Vec<PodCondition>| {
            let mut p = p.clone();
            p.status = Some(PodStatus {
                conditions: Some(conds),
                ..Default::default()
            });
            compute_status(&p, &o, None, t(10))
        };
        let s = compute_status(&p, &o, None, t(10));
        assert_eq!(
            ready_of(&s),
            (
                "False".into(),
                Some("ReadinessGatesNotReady".into()),
                Some("corresponding condition of pod readiness gate \"k8s.io/test-condition1\" does not exist., corresponding condition of pod readiness gate \"k8s.io/test-condition2\" does not exist.".into())
            )
        );
        let s = with(external("True", Some("False")));
        assert_eq!(
            ready_of(&s).2.as_deref(),
            Some("the status of pod readiness gate \"k8s.io/test-condition2\" is not \"True\", but False")
        );
        // The conditions others own are kept in the status.
        let types: Vec<String> = s
            .conditions
            .iter()
            .flatten()
            .map(|c| c.type_.clone())
            .collect();
        assert!(
            types.contains(&"k8s.io/test-condition1".to_string()),
            "{types:?}"
        );
        assert_eq!(ready_of(&with(external("True", Some("True")))).0, "True");
        // ContainersReady stays the kubelet's own: the gates only hold Ready.
        let s = with(external("False", None));
        let cr = s
            .conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == "ContainersReady")
            .unwrap();
        assert_eq!(cr.status, "True");
    }

    #[test]
    fn active_deadline_fails_the_pod_with_the_kubelets_reason() {
        let mut p = pod("Always", &[], &["a"]);
        let mut o = obs(&[("a", 0, Running, 0, false, NP)]);
        o.start_time = Some(t(0));
        assert_eq!(
            compute_status(&p, &o, None, t(10)).phase.as_deref(),
            Some("Running")
        );
        if let Some(spec) = p.spec.as_mut() {
            spec.active_deadline_seconds = Some(5);
        }
        let before = compute_status(&p, &o, None, t(4));
        assert_eq!(before.phase.as_deref(), Some("Running"));
        assert_eq!(before.reason, None);
        let after = compute_status(&p, &o, None, t(5));
        assert_eq!(after.phase.as_deref(), Some("Failed"));
        assert_eq!(after.reason.as_deref(), Some(DEADLINE_REASON));
        assert_eq!(after.message.as_deref(), Some(DEADLINE_MESSAGE));
        // A pod that already succeeded keeps its phase.
        let mut done = pod("Never", &[], &["a"]);
        if let Some(spec) = done.spec.as_mut() {
            spec.active_deadline_seconds = Some(5);
        }
        let mut o = obs(&[("a", 0, Exited, 0, false, NP)]);
        o.start_time = Some(t(0));
        assert_eq!(
            compute_status(&done, &o, None, t(50)).phase.as_deref(),
            Some("Succeeded")
        );
    }

    #[test]
    fn crash_loop_keeps_last_state_and_condition_messages() {
        let p = pod("Always", &[("i", false)], &["a", "b"]);
        let mut o = obs(&[
            ("i", 0, Exited, 0, false, NP),
            ("a", 0, Exited, 2, false, NP),
            ("b", 0, Running, 0, false, UNREADY),
        ]);
        o.start_failures.insert(
            "a".into(),
            StartFailure {
                reason: "CrashLoopBackOff".into(),
                message: "m".into(),
            },
        );
        let s = compute_status(&p, &o, None, t(10));
        let a = &s.container_statuses.as_ref().unwrap()[0];
        assert_eq!(
            a.last_state
                .as_ref()
                .unwrap()
                .terminated
                .as_ref()
                .unwrap()
                .exit_code,
            2
        );
        let conds: Vec<(String, String, Option<String>)> = s
            .conditions
            .unwrap()
            .into_iter()
            .map(|c| (c.type_, c.status, c.message))
            .collect();
        let msg = Some("containers with unready status: [a b]".to_string());
        assert_eq!(
            conds,
            vec![
                ("PodReadyToStartContainers".into(), "True".into(), None),
                ("Initialized".into(), "True".into(), None),
                ("Ready".into(), "False".into(), msg.clone()),
                ("ContainersReady".into(), "False".into(), msg),
                ("PodScheduled".into(), "True".into(), None),
            ]
        );
        assert_eq!(s.qos_class.as_deref(), Some("BestEffort"));
        assert_eq!(s.pod_ip.as_deref(), Some("10.1.0.2"));
    }

    #[test]
    fn transition_time_kept_when_status_unchanged() {
        let p = pod("Always", &[], &["a"]);
        let o = obs(&[("a", 0, Running, 0, false, NP)]);
        let first = compute_status(&p, &o, None, t(10));
        let second = compute_status(&p, &o, Some(&first), t(20));
        let tt = |s: &PodStatus| {
            s.conditions.as_ref().unwrap()[2]
                .last_transition_time
                .clone()
        };
        assert_eq!(tt(&first), tt(&second));
    }
}

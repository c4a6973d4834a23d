//! Probe model and scheduling: probe kinds (exec, httpGet, tcpSocket, grpc) with kubelet
//! defaults, a per-container per-type worker state machine (initial delay, period, thresholds,
//! startup gating, hold after a liveness/startup failure), and the `Prober` effect trait (pure).

use crate::model::observed::ProbeResult;
use k8s_openapi::api::core::v1::{Container, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::chrono::{DateTime, Duration, Utc};
use thiserror::Error;

/// Which probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeType {
    /// startupProbe: gates the others; failure restarts the container.
    Startup,
    /// livenessProbe: failure restarts the container.
    Liveness,
    /// readinessProbe: failure only clears Ready.
    Readiness,
}

/// What to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeAction {
    /// Run a command in the container; exit 0 = success.
    Exec {
        /// argv.
        command: Vec<String>,
    },
    /// HTTP GET; 200–399 = success.
    HttpGet {
        /// HTTP or HTTPS.
        scheme: String,
        /// Host (default: pod IP).
        host: Option<String>,
        /// Port.
        port: u16,
        /// Path.
        path: String,
        /// Extra headers.
        headers: Vec<(String, String)>,
    },
    /// TCP connect.
    TcpSocket {
        /// Host (default: pod IP).
        host: Option<String>,
        /// Port.
        port: u16,
    },
    /// gRPC health check.
    Grpc {
        /// Port.
        port: u16,
        /// Service name (empty = server health).
        service: String,
    },
}

/// A probe with defaults applied and named ports resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeSpec {
    /// What to run.
    pub action: ProbeAction,
    /// initialDelaySeconds (default 0).
    pub initial_delay: Duration,
    /// periodSeconds (default 10).
    pub period: Duration,
    /// timeoutSeconds (default 1).
    pub timeout: Duration,
    /// successThreshold (default 1).
    pub success_threshold: u32,
    /// failureThreshold (default 3).
    pub failure_threshold: u32,
}

/// A probe that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ProbeError {
    /// No handler.
    #[error("container {0}: probe has no handler")]
    NoHandler(String),
    /// Named port not found among the container's ports.
    #[error("container {0}: probe port {1:?} not found")]
    Port(String, String),
}

fn port(c: &Container, p: &IntOrString) -> Result<u16, ProbeError> {
    match p {
        IntOrString::Int(n) => {
            u16::try_from(*n).map_err(|_| ProbeError::Port(c.name.clone(), n.to_string()))
        }
        IntOrString::String(name) => c
            .ports
            .iter()
            .flatten()
            .find(|cp| cp.name.as_deref() == Some(name))
            .and_then(|cp| u16::try_from(cp.container_port).ok())
            .or_else(|| name.parse().ok())
            .ok_or_else(|| ProbeError::Port(c.name.clone(), name.clone())),
    }
}

fn secs(v: Option<i32>, default: i64) -> Duration {
    Duration::seconds(v.map(i64::from).unwrap_or(default))
}

impl ProbeSpec {
    /// Builds the spec from a container's probe, with the kubelet defaults.
    pub fn from_probe(p: &Probe, c: &Container) -> Result<Self, ProbeError> {
        let action = if let Some(e) = &p.exec {
            ProbeAction::Exec {
                command: e.command.clone().unwrap_or_default(),
            }
        } else if let Some(h) = &p.http_get {
            ProbeAction::HttpGet {
                scheme: h.scheme.clone().unwrap_or_else(|| "HTTP".into()),
                host: h.host.clone().filter(|h| !h.is_empty()),
                port: port(c, &h.port)?,
                path: h.path.clone().unwrap_or_else(|| "/".into()),
                headers: h
                    .http_headers
                    .iter()
                    .flatten()
                    .map(|h| (h.name.clone(), h.value.clone()))
                    .collect(),
            }
        } else if let Some(t) = &p.tcp_socket {
            ProbeAction::TcpSocket {
                host: t.host.clone().filter(|h| !h.is_empty()),
                port: port(c, &t.port)?,
            }
        } else if let Some(g) = &p.grpc {
            ProbeAction::Grpc {
                port: u16::try_from(g.port)
                    .map_err(|_| ProbeError::Port(c.name.clone(), g.port.to_string()))?,
                service: g.service.clone().unwrap_or_default(),
            }
        } else {
            return Err(ProbeError::NoHandler(c.name.clone()));
        };
        Ok(Self {
            action,
            initial_delay: secs(p.initial_delay_seconds, 0),
            period: secs(p.period_seconds, 10),
            timeout: secs(p.timeout_seconds, 1),
            success_threshold: p
                .success_threshold
                .and_then(|v| u32::try_from(v).ok())
                .unwrap_or(1)
                .max(1),
            failure_threshold: p
                .failure_threshold
                .and_then(|v| u32::try_from(v).ok())
                .unwrap_or(3)
                .max(1),
        })
    }
}

/// Where a probe runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeTarget {
    /// Pod IP (default host of network probes).
    pub pod_ip: String,
    /// Runtime container id (exec probes).
    pub container_id: String,
}

/// One probe execution's outcome; anything but success counts as a failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// Passed.
    Success,
    /// Failed, with the output for the Unhealthy event.
    Failure(String),
}

/// The effect: runs one probe with a timeout (exec through the runtime, network probes from the
/// pod's network namespace or the host). Real implementation with the runtime integration; tests
/// use a scripted fake.
pub trait Prober {
    /// Runs `action` against `target`, giving up after `timeout`.
    fn run(&self, target: &ProbeTarget, action: &ProbeAction, timeout: Duration) -> ProbeOutcome;
}

/// State of one probe of one container instance (kubelet prober worker).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeWorker {
    /// Which probe.
    pub kind: ProbeType,
    /// Its spec.
    pub spec: ProbeSpec,
    result: ProbeResult,
    last: Option<bool>,
    run: u32,
    on_hold: bool,
    next_due: Option<DateTime<Utc>>,
}

fn initial(kind: ProbeType) -> ProbeResult {
    match kind {
        ProbeType::Readiness => ProbeResult::Failure,
        ProbeType::Liveness => ProbeResult::Success,
        ProbeType::Startup => ProbeResult::Unknown,
    }
}

impl ProbeWorker {
    /// A worker with the kubelet's initial result (readiness Failure, liveness Success, startup Unknown).
    pub fn new(kind: ProbeType, spec: ProbeSpec) -> Self {
        Self {
            kind,
            spec,
            result: initial(kind),
            last: None,
            run: 0,
            on_hold: false,
            next_due: None,
        }
    }

    /// The current result.
    pub fn result(&self) -> ProbeResult {
        self.result
    }

    /// A new container instance started: reset, first probe after initialDelaySeconds.
    pub fn container_started(&mut self, started_at: DateTime<Utc>) {
        *self = Self::new(self.kind, self.spec.clone());
        self.next_due = Some(started_at + self.spec.initial_delay);
    }

    /// Whether to probe now. `startup_done` is whether the container's startup probe passed (or
    /// it has none): it gates liveness and readiness, and stops the startup probe.
    pub fn due(&self, now: DateTime<Utc>, running: bool, startup_done: bool) -> bool {
        if self.on_hold || !running {
            return false;
        }
        match self.kind {
            ProbeType::Startup if startup_done => return false,
            ProbeType::Liveness | ProbeType::Readiness if !startup_done => return false,
            _ => {}
        }
        self.next_due.is_some_and(|d| now >= d)
    }

    /// When the next probe is due (for the scheduler's sleep).
    pub fn next_due(&self) -> Option<DateTime<Utc>> {
        (!self.on_hold).then_some(self.next_due).flatten()
    }

    /// Records one execution; returns the new result when it changed. Thresholds must be met
    /// in a row; after a liveness/startup failure the worker holds until the container restarts.
    pub fn record(&mut self, now: DateTime<Utc>, outcome: &ProbeOutcome) -> Option<ProbeResult> {
        self.next_due = Some(now + self.spec.period);
        let ok = *outcome == ProbeOutcome::Success;
        if self.last == Some(ok) {
            self.run += 1;
        } else {
            self.last = Some(ok);
            self.run = 1;
        }
        if (!ok && self.run < self.spec.failure_threshold)
            || (ok && self.run < self.spec.success_threshold)
        {
            return None;
        }
        let new = if ok {
            ProbeResult::Success
        } else {
            ProbeResult::Failure
        };
        if !ok && self.kind != ProbeType::Readiness {
            self.on_hold = true;
            self.run = 0;
        }
        (new != self.result).then(|| {
            self.result = new;
            new
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::chrono::TimeZone;
    use std::cell::RefCell;

    fn t(s: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_700_000_000 + s, 0).single().unwrap()
    }

    fn container(probe_yaml: &str) -> (Container, Probe) {
        let c: Container = serde_yaml::from_str(&format!(
            "name: c\nimage: i\nports: [{{name: http, containerPort: 8080}}]\nlivenessProbe: {probe_yaml}"
        ))
        .unwrap();
        let p = c.liveness_probe.clone().unwrap();
        (c, p)
    }

    #[test]
    fn spec_table() {
        let table: Vec<(&str, Result<ProbeAction, ProbeError>)> = vec![
            (
                "{exec: {command: [cat, /ok]}}",
                Ok(ProbeAction::Exec {
                    command: vec!["cat".into(), "/ok".into()],
                }),
            ),
            (
                "{httpGet: {port: http}}",
                Ok(ProbeAction::HttpGet {
                    scheme: "HTTP".into(),
                    host: None,
                    port: 8080,
                    path: "/".into(),
                    headers: vec![],
                }),
            ),
            (
                "{tcpSocket: {port: 53}}",
                Ok(ProbeAction::TcpSocket {
                    host: None,
                    port: 53,
                }),
            ),
            (
                "{grpc: {port: 9000}}",
                Ok(ProbeAction::Grpc {
                    port: 9000,
                    service: String::new(),
                }),
            ),
            (
                "{tcpSocket: {port: nope}}",
                Err(ProbeError::Port("c".into(), "nope".into())),
            ),
            ("{periodSeconds: 5}", Err(ProbeError::NoHandler("c".into()))),
        ];
        for (y, want) in table {
            let (c, p) = container(y);
            assert_eq!(ProbeSpec::from_probe(&p, &c).map(|s| s.action), want, "{y}");
        }
        let (c, p) = container("{exec: {command: [x]}}");
        let s = ProbeSpec::from_probe(&p, &c).unwrap();
        assert_eq!(
            (
                s.initial_delay.num_seconds(),
                s.period.num_seconds(),
                s.timeout.num_seconds(),
                s.success_threshold,
                s.failure_threshold
            ),
            (0, 10, 1, 1, 3)
        );
    }

    fn spec(delay: i64, period: i64, success: u32, failure: u32) -> ProbeSpec {
        ProbeSpec {
            action: ProbeAction::TcpSocket {
                host: None,
                port: 80,
            },
            initial_delay: Duration::seconds(delay),
            period: Duration::seconds(period),
            timeout: Duration::seconds(1),
            success_threshold: success,
            failure_threshold: failure,
        }
    }

    /// Runs a worker over outcomes (one per period) and returns the result after each.
    fn drive(kind: ProbeType, s: ProbeSpec, outcomes: &[bool]) -> Vec<ProbeResult> {
        let mut w = ProbeWorker::new(kind, s.clone());
        w.container_started(t(0));
        let mut now = t(0) + s.initial_delay;
        let mut seen = vec![];
        for ok in outcomes {
            let startup_done = kind != ProbeType::Startup || w.result() == ProbeResult::Success;
            if w.due(now, true, startup_done) {
                let o = if *ok {
                    ProbeOutcome::Success
                } else {
                    ProbeOutcome::Failure("down".into())
                };
                w.record(now, &o);
            }
            seen.push(w.result());
            now += s.period;
        }
        seen
    }

    use ProbeResult::{Failure as F, Success as S, Unknown as U};

    #[test]
    fn worker_table() {
        type Row<'a> = (&'a str, ProbeType, ProbeSpec, Vec<bool>, Vec<ProbeResult>);
        let table: Vec<Row> = vec![
            (
                "readiness starts failed, 1 success flips",
                ProbeType::Readiness,
                spec(0, 10, 1, 3),
                vec![true, false, false, false],
                vec![S, S, S, F],
            ),
            (
                "readiness success threshold 2",
                ProbeType::Readiness,
                spec(0, 10, 2, 1),
                vec![true, true, false, true, true],
                vec![F, S, F, F, S],
            ),
            (
                "liveness needs 3 failures then holds",
                ProbeType::Liveness,
                spec(0, 10, 1, 3),
                vec![false, false, false, true, true],
                vec![S, S, F, F, F],
            ),
            (
                "liveness failures must be consecutive",
                ProbeType::Liveness,
                spec(0, 10, 1, 3),
                vec![false, false, true, false, false],
                vec![S, S, S, S, S],
            ),
            (
                "startup unknown until success",
                ProbeType::Startup,
                spec(0, 10, 1, 3),
                vec![false, true, true],
                vec![U, S, S],
            ),
        ];
        for (name, kind, s, outcomes, want) in table {
            assert_eq!(drive(kind, s, &outcomes), want, "{name}");
        }
    }

    #[test]
    fn gating_and_initial_delay() {
        let mut w = ProbeWorker::new(ProbeType::Liveness, spec(15, 10, 1, 1));
        w.container_started(t(100));
        assert!(!w.due(t(110), true, true), "before initial delay");
        assert!(w.due(t(115), true, true));
        assert!(
            !w.due(t(115), true, false),
            "startup not done gates liveness"
        );
        assert!(!w.due(t(115), false, true), "not running");
        let mut s = ProbeWorker::new(ProbeType::Startup, spec(0, 10, 1, 1));
        s.container_started(t(0));
        assert!(s.due(t(0), true, false));
        assert!(!s.due(t(0), true, true), "startup stops once done");
        // hold after liveness failure until the container restarts
        w.record(t(115), &ProbeOutcome::Failure("x".into()));
        assert_eq!(w.result(), ProbeResult::Failure);
        assert!(!w.due(t(200), true, true));
        w.container_started(t(300));
        assert_eq!(w.result(), ProbeResult::Success);
        assert!(w.due(t(315), true, true));
    }

    struct Scripted(RefCell<Vec<ProbeOutcome>>);
    impl Prober for Scripted {
        fn run(&self, _: &ProbeTarget, _: &ProbeAction, _: Duration) -> ProbeOutcome {
            self.0
                .borrow_mut()
                .pop()
                .unwrap_or(ProbeOutcome::Failure("no script".into()))
        }
    }

    #[test]
    fn prober_trait_fake() {
        let p = Scripted(RefCell::new(vec![ProbeOutcome::Success]));
        let target = ProbeTarget {
            pod_ip: "10.0.0.2".into(),
            container_id: "c".into(),
        };
        let s = spec(0, 1, 1, 1);
        assert_eq!(p.run(&target, &s.action, s.timeout), ProbeOutcome::Success);
        assert!(matches!(
            p.run(&target, &s.action, s.timeout),
            ProbeOutcome::Failure(_)
        ));
    }
}

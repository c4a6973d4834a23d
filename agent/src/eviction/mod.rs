//! The eviction manager, as the kubelet's `pkg/kubelet/eviction`: every monitoring interval
//! it observes the node's signals (`memory.available`, `nodefs.available`,
//! `nodefs.inodesFree`, `imagefs.available`, `pid.available`), keeps the pressure conditions
//! (MemoryPressure, DiskPressure, PIDPressure) for the node status and the admission of new
//! pods, reclaims node-level resources first for disk ([`NodeReclaim`]), and evicts at most
//! one pod per pass: ranked by [`rank`], killed with the eviction grace period, reported
//! `Failed`/`Evicted` with the kubelet's message.
//!
//! - [`thresholds`] (pure): flags, thresholds met, grace and transition periods;
//! - [`rank`] (pure): ranking, critical pods, messages;
//! - [`manager`] (effectful): measurements, the loop, the hand-off to the pod workers.

pub mod manager;
pub mod rank;
pub mod thresholds;

use std::sync::RwLock;
use std::time::Duration;

use crate::model::node_object::Pressure;

pub use crate::model::node_object::DEFAULT_EVICTION_HARD;
pub use manager::{EvictionManager, EvictionPaths};

/// How long a hard eviction gives the pod (the kubelet's `immediateEvictionGracePeriodSeconds`).
pub const IMMEDIATE_GRACE: Duration = Duration::from_secs(1);

/// The kubelet's eviction reason.
pub const REASON: &str = "Evicted";

/// The eviction flags besides `--eviction-hard` (which is a cluster flag that also sets the
/// node's allocatable); names and defaults are the kubelet's.
#[derive(clap::Args, Debug, Clone)]
pub struct EvictionArgs {
    /// Soft eviction thresholds, `signal<quantity|percent%,...` (each needs a grace period).
    #[arg(long, value_name = "THRESHOLDS", default_value = "")]
    pub eviction_soft: String,
    /// Grace period of each soft threshold, `signal=duration,...` (`memory.available=1m30s`).
    #[arg(long, value_name = "PERIODS", default_value = "")]
    pub eviction_soft_grace_period: String,
    /// Longest termination grace period a soft eviction gives a pod, seconds (the pod's own
    /// terminationGracePeriodSeconds when shorter).
    #[arg(long, value_name = "SECONDS", default_value_t = 0)]
    pub eviction_max_pod_grace_period: i64,
    /// How much more than the threshold must be free again before a met threshold is
    /// released, `signal=quantity|percent%,...`.
    #[arg(long, value_name = "AMOUNTS", default_value = "")]
    pub eviction_minimum_reclaim: String,
    /// How long a pressure condition stays True after the signal was last seen below its
    /// threshold (a Go duration).
    #[arg(long, value_name = "DURATION", default_value = "5m")]
    pub eviction_pressure_transition_period: String,
    /// The eviction manager's monitoring interval (a Go duration; the kubelet's is 10s, its
    /// statistics housekeeping interval).
    #[arg(long, value_name = "DURATION", default_value = "10s")]
    pub housekeeping_interval: String,
}

/// A bad eviction setting.
#[derive(Debug, thiserror::Error)]
pub enum EvictionConfigError {
    /// A threshold flag.
    #[error(transparent)]
    Threshold(#[from] thresholds::ThresholdError),
    /// A duration flag.
    #[error("--{0}: {1}")]
    Duration(&'static str, String),
}

/// The eviction manager's configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct EvictionConfig {
    /// Hard and soft thresholds.
    pub thresholds: Vec<thresholds::Threshold>,
    /// `--eviction-max-pod-grace-period` (seconds).
    pub max_pod_grace_period: i64,
    /// `--eviction-pressure-transition-period`.
    pub pressure_transition_period: Duration,
    /// The monitoring interval.
    pub monitoring_interval: Duration,
    /// Static and mirror pods are never evicted (cluster mode, as the kubelet). Standalone
    /// mode runs only manifest-directory pods: there they are the workload and may be evicted.
    pub static_pods_protected: bool,
}

impl EvictionConfig {
    /// The configuration from the flags.
    pub fn from_flags(
        hard: &str,
        a: &EvictionArgs,
        static_pods_protected: bool,
    ) -> Result<Self, EvictionConfigError> {
        let dur = |name: &'static str, v: &str| {
            hako_proxier::proxy_config::go_duration(v.trim())
                .map_err(|e| EvictionConfigError::Duration(name, e))
        };
        let thresholds = thresholds::parse_thresholds(&thresholds::ThresholdFlags {
            hard: hard.into(),
            soft: a.eviction_soft.clone(),
            soft_grace_period: a.eviction_soft_grace_period.clone(),
            minimum_reclaim: a.eviction_minimum_reclaim.clone(),
        })?;
        let monitoring_interval = dur("housekeeping-interval", &a.housekeeping_interval)?;
        if monitoring_interval.is_zero() {
            return Err(EvictionConfigError::Duration(
                "housekeeping-interval",
                "must be more than 0".into(),
            ));
        }
        Ok(Self {
            thresholds,
            max_pod_grace_period: a.eviction_max_pod_grace_period,
            pressure_transition_period: dur(
                "eviction-pressure-transition-period",
                &a.eviction_pressure_transition_period,
            )?,
            monitoring_interval,
            static_pods_protected,
        })
    }

    /// The grace period of an eviction: [`IMMEDIATE_GRACE`] for a hard threshold; for a soft
    /// one `--eviction-max-pod-grace-period`, or the pod's own when that is shorter (as the
    /// kubelet; with the default 0 a soft eviction is as quick as a hard one).
    pub fn grace(&self, hard: bool, pod_grace: Option<i64>) -> Duration {
        if hard {
            return IMMEDIATE_GRACE;
        }
        let secs = match pod_grace {
            Some(own) => own.min(self.max_pod_grace_period),
            None => self.max_pod_grace_period,
        };
        Duration::from_secs(u64::try_from(secs).unwrap_or(0))
    }
}

/// The node's pressure conditions as the eviction manager last computed them (None until its
/// first pass), shared with the node status and pod admission.
#[derive(Debug, Default)]
pub struct NodePressure {
    now: RwLock<Option<Pressure>>,
    static_pods_protected: std::sync::atomic::AtomicBool,
}

impl NodePressure {
    /// The current conditions (None: not computed yet).
    pub fn get(&self) -> Option<Pressure> {
        self.now.read().map(|p| *p).unwrap_or(None)
    }

    /// Sets the conditions.
    pub fn set(&self, p: Pressure) {
        if let Ok(mut g) = self.now.write() {
            *g = Some(p);
        }
    }

    /// Whether static pods are exempt from eviction and pressure admission (cluster mode).
    pub fn static_pods_protected(&self) -> bool {
        self.static_pods_protected
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Sets [`NodePressure::static_pods_protected`].
    pub fn set_static_pods_protected(&self, v: bool) {
        self.static_pods_protected
            .store(v, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Failure of a node-level reclaim.
#[derive(Debug, thiserror::Error)]
#[error("node reclaim: {0}")]
pub struct ReclaimError(pub String);

/// Node-level reclaim that runs before pods are evicted for disk pressure (the kubelet's
/// image GC `DeleteUnusedImages` and container GC `DeleteAllUnusedContainers`).
pub trait NodeReclaim: Send + Sync {
    /// Frees at least `bytes` if it can (more is fine); resolves to the bytes freed.
    fn reclaim_disk(&self, bytes: u64) -> ReclaimFuture<'_>;
}

/// What [`NodeReclaim::reclaim_disk`] returns.
pub type ReclaimFuture<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<u64, ReclaimError>> + Send + 'a>>;

/// No node-level reclaim (the default until image GC is connected).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoReclaim;

impl NodeReclaim for NoReclaim {
    fn reclaim_disk(&self, _bytes: u64) -> ReclaimFuture<'_> {
        Box::pin(async { Ok(0) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> EvictionArgs {
        EvictionArgs {
            eviction_soft: String::new(),
            eviction_soft_grace_period: String::new(),
            eviction_max_pod_grace_period: 0,
            eviction_minimum_reclaim: String::new(),
            eviction_pressure_transition_period: "5m".into(),
            housekeeping_interval: "10s".into(),
        }
    }

    #[test]
    fn config_from_flags() {
        let c = EvictionConfig::from_flags(DEFAULT_EVICTION_HARD, &args(), true).expect("c");
        assert_eq!(c.pressure_transition_period, Duration::from_secs(300));
        assert_eq!(c.monitoring_interval, Duration::from_secs(10));
        assert_eq!(c.thresholds.len(), 4);
        let bad = EvictionArgs {
            housekeeping_interval: "0s".into(),
            ..args()
        };
        assert!(EvictionConfig::from_flags("", &bad, true).is_err());
        let bad = EvictionArgs {
            eviction_pressure_transition_period: "five".into(),
            ..args()
        };
        assert!(EvictionConfig::from_flags("", &bad, true).is_err());
    }

    #[test]
    fn grace_periods() {
        let mut c = EvictionConfig::from_flags("", &args(), true).expect("c");
        assert_eq!(c.grace(true, Some(300)), IMMEDIATE_GRACE);
        assert_eq!(c.grace(false, Some(45)), Duration::ZERO, "default max 0");
        c.max_pod_grace_period = 10;
        assert_eq!(c.grace(false, Some(45)), Duration::from_secs(10));
        assert_eq!(c.grace(false, Some(5)), Duration::from_secs(5));
        assert_eq!(c.grace(false, None), Duration::from_secs(10));
    }
}

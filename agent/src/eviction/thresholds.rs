//! Eviction thresholds and the manager's bookkeeping between two passes (pure): parsing of
//! `--eviction-hard`/`--eviction-soft`/`--eviction-soft-grace-period`/
//! `--eviction-minimum-reclaim`, which thresholds the observations meet, how long a soft
//! threshold has been met, and which pressure conditions hold within the transition period —
//! the kubelet's `pkg/kubelet/eviction/helpers.go` and `synchronize`.

use std::collections::BTreeMap;
use std::time::Duration;

use thiserror::Error;

use crate::model::node_object::Pressure;
use crate::model::quantity;

/// An eviction signal the kubelet knows and hako measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Signal {
    /// `memory.available`: capacity − working set of the root cgroup.
    MemoryAvailable,
    /// `nodefs.available`: free bytes of the filesystem of the agent's root dir.
    NodeFsAvailable,
    /// `nodefs.inodesFree`: free inodes of that filesystem.
    NodeFsInodesFree,
    /// `imagefs.available`: free bytes of the image store's filesystem.
    ImageFsAvailable,
    /// `pid.available`: pid_max − processes.
    PidAvailable,
}

/// The resource a signal starves (the kubelet's `signalToResource`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    /// `memory`.
    Memory,
    /// `ephemeral-storage`.
    EphemeralStorage,
    /// `inodes`.
    Inodes,
    /// `pids`.
    Pids,
}

impl Resource {
    /// The name in messages ("The node was low on resource: memory.").
    pub fn as_str(self) -> &'static str {
        match self {
            Resource::Memory => "memory",
            Resource::EphemeralStorage => "ephemeral-storage",
            Resource::Inodes => "inodes",
            Resource::Pids => "pids",
        }
    }
}

/// The node condition a signal drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Condition {
    /// `MemoryPressure`.
    Memory,
    /// `DiskPressure`.
    Disk,
    /// `PIDPressure`.
    Pid,
}

impl Condition {
    /// The condition type.
    pub fn as_str(self) -> &'static str {
        match self {
            Condition::Memory => "MemoryPressure",
            Condition::Disk => "DiskPressure",
            Condition::Pid => "PIDPressure",
        }
    }
}

impl Signal {
    /// The kubelet's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Signal::MemoryAvailable => "memory.available",
            Signal::NodeFsAvailable => "nodefs.available",
            Signal::NodeFsInodesFree => "nodefs.inodesFree",
            Signal::ImageFsAvailable => "imagefs.available",
            Signal::PidAvailable => "pid.available",
        }
    }

    fn parse(s: &str) -> Option<Signal> {
        Some(match s {
            "memory.available" => Signal::MemoryAvailable,
            "nodefs.available" => Signal::NodeFsAvailable,
            "nodefs.inodesFree" => Signal::NodeFsInodesFree,
            "imagefs.available" => Signal::ImageFsAvailable,
            "pid.available" => Signal::PidAvailable,
            _ => return None,
        })
    }

    /// The resource to reclaim.
    pub fn resource(self) -> Resource {
        match self {
            Signal::MemoryAvailable => Resource::Memory,
            Signal::NodeFsAvailable | Signal::ImageFsAvailable => Resource::EphemeralStorage,
            Signal::NodeFsInodesFree => Resource::Inodes,
            Signal::PidAvailable => Resource::Pids,
        }
    }

    /// The node condition.
    pub fn condition(self) -> Condition {
        match self {
            Signal::MemoryAvailable => Condition::Memory,
            Signal::PidAvailable => Condition::Pid,
            _ => Condition::Disk,
        }
    }

    /// Eviction order when several thresholds are met: memory first, then disk, then pids
    /// (the kubelet's `byEvictionPriority`).
    fn priority(self) -> u8 {
        match self.resource() {
            Resource::Memory => 0,
            Resource::EphemeralStorage | Resource::Inodes => 1,
            Resource::Pids => 2,
        }
    }
}

/// A threshold's value: an amount or a share of capacity.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value {
    /// Bytes, inodes or pids.
    Quantity(i128),
    /// Fraction of capacity, 0..=1.
    Percentage(f64),
}

impl Value {
    /// The amount for a capacity (the kubelet's `GetThresholdQuantity`).
    pub fn amount(self, capacity: i128) -> i128 {
        match self {
            Value::Quantity(q) => q,
            // Whole units are precise enough for thresholds.
            #[allow(clippy::cast_possible_truncation, clippy::cast_precision_loss)]
            Value::Percentage(p) => (capacity as f64 * p) as i128,
        }
    }
}

/// One threshold: `signal < value`, hard when `grace_period` is zero.
#[derive(Debug, Clone, PartialEq)]
pub struct Threshold {
    /// The signal.
    pub signal: Signal,
    /// The value.
    pub value: Value,
    /// How long a soft threshold must hold before pods are evicted (zero: hard).
    pub grace_period: Duration,
    /// Once met, the threshold holds until `value + min_reclaim` is available again.
    pub min_reclaim: Option<Value>,
}

impl Threshold {
    /// Whether it is a hard threshold.
    pub fn is_hard(&self) -> bool {
        self.grace_period.is_zero()
    }
}

/// A bad eviction flag or config field.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ThresholdError {
    /// An entry is not `signal<value` (or `signal=value` for the maps).
    #[error("invalid {flag} entry {entry:?}: {why}")]
    Entry {
        /// The flag.
        flag: &'static str,
        /// The entry.
        entry: String,
        /// Why.
        why: String,
    },
    /// A soft threshold without a grace period.
    #[error("grace period must be specified for the soft eviction threshold {0}")]
    NoGracePeriod(String),
}

fn entry(flag: &'static str, e: &str, why: impl Into<String>) -> ThresholdError {
    ThresholdError::Entry {
        flag,
        entry: e.to_string(),
        why: why.into(),
    }
}

fn parse_value(flag: &'static str, e: &str, v: &str) -> Result<Value, ThresholdError> {
    let v = v.trim();
    if let Some(p) = v.strip_suffix('%') {
        let p: f64 = p.parse().map_err(|_| entry(flag, e, "not a percentage"))?;
        if !(0.0..=100.0).contains(&p) {
            return Err(entry(flag, e, "percentage must be between 0% and 100%"));
        }
        return Ok(Value::Percentage(p / 100.0));
    }
    let q = quantity::parse(v).map_err(|_| entry(flag, e, "not a quantity"))?;
    if q.value() < 0 {
        return Err(entry(flag, e, "must be positive"));
    }
    Ok(Value::Quantity(q.value()))
}

fn split_list(s: &str) -> impl Iterator<Item = &str> {
    s.split(',').map(str::trim).filter(|p| !p.is_empty())
}

/// Parses `signal<value,...` (`--eviction-hard`, `--eviction-soft`); a zero value disables
/// the signal, as the kubelet's `parseThresholdStatement`.
pub fn parse_statements(
    flag: &'static str,
    s: &str,
) -> Result<BTreeMap<Signal, Value>, ThresholdError> {
    let mut out = BTreeMap::new();
    for e in split_list(s) {
        let (k, v) = e
            .split_once('<')
            .ok_or_else(|| entry(flag, e, "want signal<quantity or signal<percent%"))?;
        let sig = Signal::parse(k.trim()).ok_or_else(|| {
            entry(
                flag,
                e,
                "unsupported signal (memory.available, nodefs.available, nodefs.inodesFree, imagefs.available, pid.available)",
            )
        })?;
        let val = parse_value(flag, e, v)?;
        let zero = match val {
            Value::Quantity(q) => q == 0,
            Value::Percentage(p) => p == 0.0,
        };
        if zero {
            out.remove(&sig);
        } else {
            out.insert(sig, val);
        }
    }
    Ok(out)
}

fn parse_map<T>(
    flag: &'static str,
    s: &str,
    f: impl Fn(&str, &str) -> Result<T, ThresholdError>,
) -> Result<BTreeMap<Signal, T>, ThresholdError> {
    let mut out = BTreeMap::new();
    for e in split_list(s) {
        let (k, v) = e
            .split_once('=')
            .ok_or_else(|| entry(flag, e, "want signal=value"))?;
        let sig = Signal::parse(k.trim()).ok_or_else(|| entry(flag, e, "unsupported signal"))?;
        out.insert(sig, f(e, v)?);
    }
    Ok(out)
}

/// The kubelet's eviction flags, as text.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ThresholdFlags {
    /// `--eviction-hard`.
    pub hard: String,
    /// `--eviction-soft`.
    pub soft: String,
    /// `--eviction-soft-grace-period` (`signal=duration,...`).
    pub soft_grace_period: String,
    /// `--eviction-minimum-reclaim` (`signal=quantity|percent,...`).
    pub minimum_reclaim: String,
}

/// All thresholds from the flags (the kubelet's `ParseThresholdConfig`): hard ones, then soft
/// ones with their grace periods, each with its minimum reclaim.
pub fn parse_thresholds(f: &ThresholdFlags) -> Result<Vec<Threshold>, ThresholdError> {
    let hard = parse_statements("--eviction-hard", &f.hard)?;
    let soft = parse_statements("--eviction-soft", &f.soft)?;
    let grace = parse_map(
        "--eviction-soft-grace-period",
        &f.soft_grace_period,
        |e, v| {
            let d = hako_proxier::proxy_config::go_duration(v.trim())
                .map_err(|why| entry("--eviction-soft-grace-period", e, why))?;
            Ok(d)
        },
    )?;
    let reclaim = parse_map("--eviction-minimum-reclaim", &f.minimum_reclaim, |e, v| {
        parse_value("--eviction-minimum-reclaim", e, v)
    })?;
    let mut out: Vec<Threshold> = hard
        .into_iter()
        .map(|(signal, value)| Threshold {
            signal,
            value,
            grace_period: Duration::ZERO,
            min_reclaim: None,
        })
        .collect();
    for (signal, value) in soft {
        let g = grace
            .get(&signal)
            .copied()
            .ok_or_else(|| ThresholdError::NoGracePeriod(signal.as_str().into()))?;
        if g.is_zero() {
            return Err(ThresholdError::NoGracePeriod(signal.as_str().into()));
        }
        out.push(Threshold {
            signal,
            value,
            grace_period: g,
            min_reclaim: None,
        });
    }
    for t in &mut out {
        t.min_reclaim = reclaim.get(&t.signal).copied();
    }
    Ok(out)
}

/// One observed signal: what is available of what capacity (bytes, inodes, pids).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observation {
    /// Available now.
    pub available: i128,
    /// Capacity.
    pub capacity: i128,
}

/// The observations of one pass.
pub type Observations = BTreeMap<Signal, Observation>;

/// The thresholds whose signal is below the value (plus the minimum reclaim when
/// `enforce_min_reclaim`: a threshold met before stays met until that much is back).
pub fn thresholds_met(
    thresholds: &[Threshold],
    obs: &Observations,
    enforce_min_reclaim: bool,
) -> Vec<Threshold> {
    thresholds
        .iter()
        .filter(|t| {
            let Some(o) = obs.get(&t.signal) else {
                return false;
            };
            let mut want = t.value.amount(o.capacity);
            if enforce_min_reclaim {
                want += t.min_reclaim.map_or(0, |m| m.amount(o.capacity));
            }
            o.available < want
        })
        .cloned()
        .collect()
}

/// What the manager remembers between passes; times are seconds on a monotonic clock.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct State {
    /// When each currently met threshold was first seen met (by its position's identity).
    first_observed: Vec<(Threshold, f64)>,
    /// When each pressure condition was last observed.
    condition_last_observed: BTreeMap<Condition, f64>,
    /// The thresholds that drove eviction last pass (kept until their minimum reclaim).
    met: Vec<Threshold>,
    /// The conditions reported now.
    pub conditions: Vec<Condition>,
}

/// The outcome of a pass.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// Thresholds whose grace period has passed, most urgent first (empty: nothing to do).
    pub to_reclaim: Vec<Threshold>,
}

fn merge(mut a: Vec<Threshold>, b: Vec<Threshold>) -> Vec<Threshold> {
    for t in b {
        if !a.contains(&t) {
            a.push(t);
        }
    }
    a
}

impl State {
    /// One pass of the kubelet's `synchronize` bookkeeping at `now` (seconds): thresholds
    /// met (and those not yet reclaimed to their minimum), when each was first met, the
    /// conditions held for the `transition` period, and the thresholds past their grace
    /// period, sorted memory, disk, pids.
    pub fn observe(
        &mut self,
        thresholds: &[Threshold],
        obs: &Observations,
        now: f64,
        transition: Duration,
    ) -> Decision {
        let mut met = thresholds_met(thresholds, obs, false);
        if !self.met.is_empty() {
            met = merge(met, thresholds_met(&self.met, obs, true));
        }
        let first: Vec<(Threshold, f64)> = met
            .iter()
            .map(|t| {
                let at = self
                    .first_observed
                    .iter()
                    .find(|(p, _)| p == t)
                    .map_or(now, |(_, at)| *at);
                (t.clone(), at)
            })
            .collect();
        for t in &met {
            self.condition_last_observed
                .insert(t.signal.condition(), now);
        }
        let window = transition.as_secs_f64();
        self.condition_last_observed
            .retain(|_, at| now - *at < window || *at == now);
        self.conditions = self.condition_last_observed.keys().copied().collect();
        let mut due: Vec<Threshold> = first
            .iter()
            .filter(|(t, at)| now - at >= t.grace_period.as_secs_f64())
            .map(|(t, _)| t.clone())
            .collect();
        self.first_observed = first;
        self.met = due.clone();
        due.sort_by_key(|t| t.signal.priority());
        Decision { to_reclaim: due }
    }

    /// The pressure conditions as the node reports them.
    pub fn pressure(&self) -> Pressure {
        Pressure {
            memory: self.conditions.contains(&Condition::Memory),
            disk: self.conditions.contains(&Condition::Disk),
            pid: self.conditions.contains(&Condition::Pid),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(hard: &str) -> ThresholdFlags {
        ThresholdFlags {
            hard: hard.into(),
            ..Default::default()
        }
    }

    #[test]
    fn defaults_and_bad_entries() {
        let t = parse_thresholds(&flags(super::super::DEFAULT_EVICTION_HARD)).expect("defaults");
        assert_eq!(t.len(), 4);
        assert_eq!(t[0].signal, Signal::MemoryAvailable);
        assert_eq!(t[0].value, Value::Quantity(100 << 20));
        assert!(t.iter().all(Threshold::is_hard));
        let nodefs = t.iter().find(|t| t.signal == Signal::NodeFsAvailable);
        assert_eq!(nodefs.map(|t| t.value), Some(Value::Percentage(0.1)));
        for bad in [
            "memory.available>1Gi",
            "memory.available<abc",
            "nodefs.available<120%",
            "cpu.available<1",
            "memory.available<-1Gi",
            "memory.available",
        ] {
            assert!(parse_thresholds(&flags(bad)).is_err(), "{bad}");
        }
        // A zero value turns a signal off.
        let t = parse_thresholds(&flags("memory.available<100Mi,memory.available<0")).expect("t");
        assert!(t.is_empty());
    }

    #[test]
    fn soft_thresholds_need_grace_periods() {
        let f = ThresholdFlags {
            hard: "memory.available<100Mi".into(),
            soft: "memory.available<300Mi,nodefs.available<20%".into(),
            soft_grace_period: "memory.available=1m30s,nodefs.available=2m".into(),
            minimum_reclaim: "memory.available=0Mi,nodefs.available=500Mi".into(),
        };
        let t = parse_thresholds(&f).expect("t");
        assert_eq!(t.len(), 3);
        let soft_mem = &t[1];
        assert_eq!(soft_mem.grace_period, Duration::from_secs(90));
        assert!(!soft_mem.is_hard());
        assert_eq!(t[2].min_reclaim, Some(Value::Quantity(500 << 20)));
        let missing = ThresholdFlags {
            soft: "memory.available<300Mi".into(),
            ..Default::default()
        };
        assert_eq!(
            parse_thresholds(&missing),
            Err(ThresholdError::NoGracePeriod("memory.available".into()))
        );
        let bad_grace = ThresholdFlags {
            soft: "memory.available<300Mi".into(),
            soft_grace_period: "memory.available=soon".into(),
            ..Default::default()
        };
        assert!(parse_thresholds(&bad_grace).is_err());
    }

    fn obs(signal: Signal, available: i128, capacity: i128) -> Observations {
        [(
            signal,
            Observation {
                available,
                capacity,
            },
        )]
        .into()
    }

    #[test]
    fn met_percentages_and_min_reclaim() {
        let f = ThresholdFlags {
            hard: "nodefs.available<10%".into(),
            minimum_reclaim: "nodefs.available=5%".into(),
            ..Default::default()
        };
        let t = parse_thresholds(&f).expect("t");
        assert_eq!(
            thresholds_met(&t, &obs(Signal::NodeFsAvailable, 9, 100), false).len(),
            1
        );
        assert!(thresholds_met(&t, &obs(Signal::NodeFsAvailable, 10, 100), false).is_empty());
        // Until 10% + 5% is free again, a met threshold stays met.
        assert_eq!(
            thresholds_met(&t, &obs(Signal::NodeFsAvailable, 12, 100), true).len(),
            1
        );
        let mut st = State::default();
        let tp = Duration::from_secs(30);
        let d = st.observe(&t, &obs(Signal::NodeFsAvailable, 5, 100), 0.0, tp);
        assert_eq!(d.to_reclaim.len(), 1);
        let d = st.observe(&t, &obs(Signal::NodeFsAvailable, 12, 100), 10.0, tp);
        assert_eq!(d.to_reclaim.len(), 1, "min reclaim not reached");
        let d = st.observe(&t, &obs(Signal::NodeFsAvailable, 16, 100), 20.0, tp);
        assert!(d.to_reclaim.is_empty());
    }

    #[test]
    fn soft_grace_and_transition_period() {
        let f = ThresholdFlags {
            soft: "memory.available<1Gi".into(),
            soft_grace_period: "memory.available=30s".into(),
            ..Default::default()
        };
        let t = parse_thresholds(&f).expect("t");
        let tp = Duration::from_secs(60);
        let low = obs(Signal::MemoryAvailable, 512 << 20, 4 << 30);
        let high = obs(Signal::MemoryAvailable, 3 << 30, 4 << 30);
        let mut st = State::default();
        // Met: the condition is reported at once, eviction waits for the grace period.
        assert!(st.observe(&t, &low, 0.0, tp).to_reclaim.is_empty());
        assert!(st.pressure().memory);
        assert!(st.observe(&t, &low, 20.0, tp).to_reclaim.is_empty());
        assert_eq!(st.observe(&t, &low, 30.0, tp).to_reclaim.len(), 1);
        // Relieved: the condition stays for the transition period after the last sighting.
        assert!(st.observe(&t, &high, 40.0, tp).to_reclaim.is_empty());
        assert!(st.pressure().memory);
        st.observe(&t, &high, 89.0, tp);
        assert!(st.pressure().memory);
        st.observe(&t, &high, 90.0, tp);
        assert!(!st.pressure().memory);
        assert_eq!(st.pressure(), Pressure::default());
        // A dip shorter than the grace period starts the count again.
        st.observe(&t, &low, 100.0, tp);
        st.observe(&t, &high, 110.0, tp);
        assert!(st.observe(&t, &low, 131.0, tp).to_reclaim.is_empty());
    }

    #[test]
    fn memory_before_disk_before_pids() {
        let t = parse_thresholds(&flags(
            "pid.available<10,nodefs.available<10%,memory.available<1Gi",
        ))
        .expect("t");
        let o: Observations = [
            (
                Signal::PidAvailable,
                Observation {
                    available: 1,
                    capacity: 100,
                },
            ),
            (
                Signal::NodeFsAvailable,
                Observation {
                    available: 1,
                    capacity: 100,
                },
            ),
            (
                Signal::MemoryAvailable,
                Observation {
                    available: 1,
                    capacity: 100,
                },
            ),
        ]
        .into();
        let mut st = State::default();
        let d = st.observe(&t, &o, 0.0, Duration::from_secs(1));
        let sigs: Vec<Signal> = d.to_reclaim.iter().map(|t| t.signal).collect();
        assert_eq!(
            sigs,
            [
                Signal::MemoryAvailable,
                Signal::NodeFsAvailable,
                Signal::PidAvailable
            ]
        );
        assert_eq!(
            st.pressure(),
            Pressure {
                memory: true,
                disk: true,
                pid: true
            }
        );
    }
}

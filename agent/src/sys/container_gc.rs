//! Dead-container GC, as the kubelet's `kuberuntime_gc.go` (`--maximum-dead-containers-per-container`,
//! `--maximum-dead-containers`, `--minimum-container-ttl-duration`). The selection is pure
//! ([`select`]); the pod worker applies it to its own container after every start (so a
//! restarting container never piles up instances), and with a node-wide limit
//! [`ContainerGc::run`] applies it to every pod's containers once a minute (the kubelet's
//! container GC period). Removing an instance ([`remove_instance_files`], [`ContainerGc`]) is
//! effectful.
//!
//! An evict unit is one container of one pod (pod UID + container name). Its instances that
//! are not running and were created more than the minimum age ago are candidates; the newest
//! `max_per_pod_container` candidates stay, older ones go, oldest first. With
//! `max_containers` ≥ 0 the node as a whole keeps at most that many candidates: first every
//! unit is cut to `max(max_containers / units, 1)`, then the oldest go across units.
//!
//! Unlike the kubelet, the two newest instances of a unit are never removed whatever the
//! limits: the newest is the container's current state and the one before it is its
//! `lastState` and what `logs --previous` reads (the kubelet shows a crash-looping
//! container as Waiting and needs only one; hako reports the newest exited instance as the
//! current state).

use crate::sys::runtime;
use k8s_openapi::chrono::{DateTime, Utc};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The kubelet's container GC period.
pub const PERIOD: Duration = Duration::from_secs(60);

/// Default `--maximum-dead-containers-per-container` (the kubelet's).
pub const DEFAULT_MAX_PER_POD_CONTAINER: i32 = 1;
/// Default `--maximum-dead-containers` (-1: no node-wide limit).
pub const DEFAULT_MAX_CONTAINERS: i32 = -1;

/// The dead-container GC policy (kubelet `GCPolicy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContainerGcPolicy {
    /// Dead instances kept per container (`--maximum-dead-containers-per-container`, 1; < 0: no
    /// limit).
    pub max_per_pod_container: i32,
    /// Dead instances kept on the node (`--maximum-dead-containers`, -1: no limit).
    pub max_containers: i32,
    /// Instances younger than this are never removed (`--minimum-container-ttl-duration`, 0).
    pub min_age: Duration,
}

impl Default for ContainerGcPolicy {
    fn default() -> Self {
        Self {
            max_per_pod_container: DEFAULT_MAX_PER_POD_CONTAINER,
            max_containers: DEFAULT_MAX_CONTAINERS,
            min_age: Duration::ZERO,
        }
    }
}

/// One container instance as the GC sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    /// Runtime id.
    pub id: String,
    /// Pod UID.
    pub pod_uid: String,
    /// Container name.
    pub name: String,
    /// Attempt (restart count when it was created): orders the instances of a unit.
    pub attempt: u32,
    /// Creation time (unknown: treated as old enough).
    pub created_at: Option<DateTime<Utc>>,
    /// Running or in an unknown state: never a candidate (the kubelet prunes out running
    /// containers; an unknown one may still run).
    pub live: bool,
}

/// The ids to remove, oldest first (pure).
pub fn select(
    instances: &[Instance],
    policy: &ContainerGcPolicy,
    now: DateTime<Utc>,
) -> Vec<String> {
    let min_age = k8s_openapi::chrono::Duration::from_std(policy.min_age).unwrap_or_default();
    let newest_gc_time = now - min_age;
    // Units, newest instance first.
    let mut units: BTreeMap<(&str, &str), Vec<&Instance>> = BTreeMap::new();
    for i in instances {
        units
            .entry((i.pod_uid.as_str(), i.name.as_str()))
            .or_default()
            .push(i);
    }
    // Candidates per unit (newest first) and the protected two newest of each unit.
    let mut cands: BTreeMap<(&str, &str), Vec<&Instance>> = BTreeMap::new();
    let mut protected = std::collections::HashSet::new();
    for (k, v) in units.iter_mut() {
        v.sort_by(|a, b| b.attempt.cmp(&a.attempt).then_with(|| b.id.cmp(&a.id)));
        for i in v.iter().take(2) {
            protected.insert(i.id.as_str());
        }
        let c: Vec<&Instance> = v
            .iter()
            .copied()
            .filter(|i| !i.live && i.created_at.is_none_or(|t| t <= newest_gc_time))
            .collect();
        if !c.is_empty() {
            cands.insert(*k, c);
        }
    }
    let mut remove: Vec<&Instance> = Vec::new();
    /// Keeps the `keep` newest candidates of each unit; of the rest only the unprotected go.
    fn cut<'a>(
        cands: &mut BTreeMap<(&'a str, &'a str), Vec<&'a Instance>>,
        keep: usize,
        protected: &std::collections::HashSet<&str>,
        remove: &mut Vec<&'a Instance>,
    ) {
        for v in cands.values_mut() {
            let mut i = keep;
            while i < v.len() {
                if protected.contains(v[i].id.as_str()) {
                    i += 1;
                } else {
                    remove.push(v.remove(i));
                }
            }
        }
    }
    if let Ok(n) = usize::try_from(policy.max_per_pod_container) {
        cut(&mut cands, n, &protected, &mut remove);
    }
    if let Ok(max) = usize::try_from(policy.max_containers) {
        let total = |c: &BTreeMap<_, Vec<&Instance>>| c.values().map(Vec::len).sum::<usize>();
        if total(&cands) > max {
            let per_unit = (max / cands.len().max(1)).max(1);
            cut(&mut cands, per_unit, &protected, &mut remove);
            let left = total(&cands);
            if left > max {
                let mut flat: Vec<&Instance> = cands
                    .values()
                    .flatten()
                    .copied()
                    .filter(|i| !protected.contains(i.id.as_str()))
                    .collect();
                // Oldest first (unknown creation times count as oldest).
                flat.sort_by_key(|i| (i.created_at, i.attempt));
                remove.extend(flat.into_iter().take(left - max));
            }
        }
    }
    remove.sort_by_key(|i| (i.created_at, i.attempt));
    remove.dedup_by(|a, b| a.id == b.id);
    remove.into_iter().map(|i| i.id.clone()).collect()
}

/// Removes what an instance left besides its shim state (effectful, best effort): its CRI log
/// file with the files it rotated into, and its termination-log file.
pub fn remove_instance_files(log_path: &Path, termination_log: &Path) {
    for p in hako_shim::logs::rotated_files(log_path) {
        let _ = std::fs::remove_file(p);
    }
    let _ = std::fs::remove_file(log_path);
    let _ = std::fs::remove_file(termination_log);
}

/// The node-wide pass of the dead-container GC (effectful): every pod's recorded instances
/// (`<root>/pods/<uid>/containers/*.json`) with their recorded shim state.
#[derive(Clone)]
pub struct ContainerGc {
    /// The policy.
    pub policy: ContainerGcPolicy,
    /// The agent's state root.
    pub root_dir: PathBuf,
    /// The shim runtime (`<run-dir>/containers`).
    pub shim: hako_shim::client::Runtime,
    /// How often the node-wide pass runs ([`PERIOD`]; shorter in tests).
    pub period: Duration,
}

impl ContainerGc {
    /// One pass (blocking): removes the selected instances; returns how many. Only instances
    /// whose recorded state is an exit are candidates (a created one may be starting now).
    pub fn collect_blocking(&self, now: DateTime<Utc>) -> usize {
        let mut metas = Vec::new();
        if let Ok(rd) = std::fs::read_dir(self.root_dir.join("pods")) {
            for e in rd.flatten() {
                let uid = e.file_name().to_string_lossy().into_owned();
                metas.extend(runtime::read_metas(&self.root_dir, &uid));
            }
        }
        let instances: Vec<Instance> = metas
            .iter()
            .map(|m| {
                let st = self.shim.client(&m.id).recorded_state().ok();
                Instance {
                    id: m.id.clone(),
                    pod_uid: m.pod_uid.clone(),
                    name: m.name.clone(),
                    attempt: m.attempt,
                    created_at: st
                        .as_ref()
                        .and_then(|s| DateTime::parse_from_rfc3339(&s.created_at).ok())
                        .map(|t| t.with_timezone(&Utc)),
                    live: st
                        .as_ref()
                        .is_none_or(|s| s.status != hako_shim::state::Status::Stopped),
                }
            })
            .collect();
        let remove = select(&instances, &self.policy, now);
        for id in &remove {
            let Some(m) = metas.iter().find(|m| &m.id == id) else {
                continue;
            };
            tracing::info!(container = %id, pod_uid = %m.pod_uid, "removing dead container");
            if let Err(e) = self.shim.force_delete(id) {
                tracing::warn!(container = %id, error = %e, "removing dead container");
                continue;
            }
            runtime::remove_meta(&self.root_dir, &m.pod_uid, id);
            let _ = std::fs::remove_dir_all(
                self.root_dir
                    .join("pods")
                    .join(&m.pod_uid)
                    .join("termination")
                    .join(id),
            );
            remove_instance_files(&m.log_path, &m.termination_log);
        }
        remove.len()
    }

    /// Runs a pass every period while the node-wide limit is set (`--maximum-dead-containers`
    /// ≥ 0; the per-container limit is the pod workers' own work).
    pub async fn run(self) {
        if self.policy.max_containers < 0 {
            return;
        }
        let mut tick = tokio::time::interval(self.period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            let me = self.clone();
            match tokio::task::spawn_blocking(move || me.collect_blocking(Utc::now())).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(removed = n, "container garbage collection"),
                Err(e) => tracing::error!(error = %e, "container garbage collection failed"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::chrono::TimeZone;

    fn t(s: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_700_000_000 + s, 0).unwrap()
    }

    fn inst(uid: &str, name: &str, attempt: u32, created: i64, live: bool) -> Instance {
        Instance {
            id: format!("{uid}-{name}-{attempt}"),
            pod_uid: uid.into(),
            name: name.into(),
            attempt,
            created_at: Some(t(created)),
            live,
        }
    }

    fn policy(per: i32, max: i32, min_age: u64) -> ContainerGcPolicy {
        ContainerGcPolicy {
            max_per_pod_container: per,
            max_containers: max,
            min_age: Duration::from_secs(min_age),
        }
    }

    #[test]
    fn dead_instances_beyond_the_limit_go_oldest_first() {
        // app: attempts 0..=5, the newest running.
        let mut v: Vec<Instance> = (0..5)
            .map(|a| inst("p", "app", a, i64::from(a) * 10, false))
            .collect();
        v.push(inst("p", "app", 5, 50, true));
        let cases: &[(ContainerGcPolicy, &[&str])] = &[
            // Default: the running one and one dead (the previous) stay.
            (
                policy(1, -1, 0),
                &["p-app-0", "p-app-1", "p-app-2", "p-app-3"],
            ),
            (policy(3, -1, 0), &["p-app-0", "p-app-1"]),
            (policy(-1, -1, 0), &[]),
            // 0 would remove every dead one; the previous stays for lastState and logs --previous.
            (
                policy(0, -1, 0),
                &["p-app-0", "p-app-1", "p-app-2", "p-app-3"],
            ),
            // Created less than 26 s before now (t(55)): attempts 4 and 3 are too young.
            (policy(0, -1, 26), &["p-app-0", "p-app-1", "p-app-2"]),
        ];
        for (p, want) in cases {
            assert_eq!(select(&v, p, t(55)), *want, "{p:?}");
        }
    }

    #[test]
    fn a_crash_looping_container_keeps_current_and_previous() {
        // Every instance exited: the newest is the current state, the one before lastState.
        let v: Vec<Instance> = (0..4)
            .map(|a| inst("p", "app", a, i64::from(a), false))
            .collect();
        assert_eq!(
            select(&v, &policy(1, -1, 0), t(100)),
            ["p-app-0", "p-app-1"]
        );
        assert_eq!(select(&v, &policy(3, -1, 0), t(100)), ["p-app-0"]);
        // Unknown state (shim gone without a recorded exit) is never removed.
        let mut v = v;
        v[0].live = true;
        assert_eq!(select(&v, &policy(1, -1, 0), t(100)), ["p-app-1"]);
    }

    #[test]
    fn node_wide_limit_spreads_then_takes_the_oldest() {
        // Three units with 4 dead instances each (a=oldest times, c=newest).
        let mut v = Vec::new();
        for (k, u) in ["a", "b", "c"].iter().enumerate() {
            for a in 0..4u32 {
                v.push(inst(
                    u,
                    "x",
                    a,
                    i64::try_from(k).unwrap() * 100 + i64::from(a),
                    false,
                ));
            }
        }
        // Per unit unlimited, 7 on the node: 7/3 = 2 per unit (all protected) -> 6 left.
        let got = select(&v, &policy(-1, 7, 0), t(1000));
        assert_eq!(got, ["a-x-0", "a-x-1", "b-x-0", "b-x-1", "c-x-0", "c-x-1"]);
        // 12 allowed: nothing goes.
        assert!(select(&v, &policy(-1, 12, 0), t(1000)).is_empty());
        // 10 allowed: 10/3 = 3 per unit -> 9, within the limit.
        assert_eq!(
            select(&v, &policy(-1, 10, 0), t(1000)),
            ["a-x-0", "b-x-0", "c-x-0"]
        );
        // Units of different sizes: 1 unit of 6, limit 4: 4 per unit, then oldest first.
        let w: Vec<Instance> = (0..6)
            .map(|a| inst("q", "y", a, i64::from(a), false))
            .collect();
        assert_eq!(select(&w, &policy(-1, 4, 0), t(1000)), ["q-y-0", "q-y-1"]);
        // A limit the protected instances alone pass keeps them.
        assert_eq!(
            select(&w, &policy(-1, 0, 0), t(1000)),
            ["q-y-0", "q-y-1", "q-y-2", "q-y-3"]
        );
    }
}

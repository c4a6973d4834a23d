//! Restart back-off per container (the kubelet's flowcontrol.Backoff: 10 s doubling to 300 s,
//! forgotten after 2 × max = 10 min without a restart) (pure: time is passed in).

use k8s_openapi::chrono::{DateTime, Duration, Utc};
use std::collections::BTreeMap;

/// Back-off parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffConfig {
    /// First delay (kubelet: 10 s); configurable so tests run fast.
    pub initial: Duration,
    /// Cap (kubelet: 300 s). An entry idle for 2 × max is reset.
    pub max: Duration,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        Self {
            initial: Duration::seconds(10),
            max: Duration::seconds(300),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    backoff: Duration,
    last_update: DateTime<Utc>,
}

/// Back-off state for many keys (pod UID + container name).
#[derive(Debug, Clone, Default)]
pub struct RestartBackoff {
    cfg: BackoffConfig,
    entries: BTreeMap<String, Entry>,
}

/// Stable key of a container's back-off entry.
pub fn key(pod_uid: &str, container: &str) -> String {
    format!("{pod_uid}_{container}")
}

impl RestartBackoff {
    /// Empty state with the given parameters.
    pub fn new(cfg: BackoffConfig) -> Self {
        Self {
            cfg,
            entries: BTreeMap::new(),
        }
    }

    /// The current delay of `key` (zero when unknown).
    pub fn get(&self, key: &str) -> Duration {
        self.entries
            .get(key)
            .map(|e| e.backoff)
            .unwrap_or_else(Duration::zero)
    }

    /// kubelet `IsInBackOffSince`: true while `now - event_time < delay` (event = the container's
    /// finish time). An expired entry (idle longer than 2 × max) never holds back.
    pub fn in_backoff_since(
        &self,
        key: &str,
        event_time: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> bool {
        let Some(e) = self.entries.get(key) else {
            return false;
        };
        if now - e.last_update > self.cfg.max * 2 {
            return false;
        }
        now - event_time < e.backoff
    }

    /// kubelet `Next`: records a restart; doubles the delay up to max, or resets it when the
    /// previous restart is older than 2 × max (the container ran fine for 10 minutes).
    pub fn next(&mut self, key: &str, event_time: DateTime<Utc>, now: DateTime<Utc>) -> Duration {
        let cfg = self.cfg;
        let entry = match self.entries.get(key) {
            Some(e) if event_time - e.last_update <= cfg.max * 2 => Entry {
                backoff: (e.backoff * 2).min(cfg.max),
                last_update: now,
            },
            _ => Entry {
                backoff: cfg.initial,
                last_update: now,
            },
        };
        self.entries.insert(key.to_string(), entry);
        entry.backoff
    }

    /// Drops entries idle for longer than 2 × max (kubelet `GC`).
    pub fn gc(&mut self, now: DateTime<Utc>) {
        let max2 = self.cfg.max * 2;
        self.entries.retain(|_, e| now - e.last_update <= max2);
    }

    /// Forgets a key (pod removed).
    pub fn reset(&mut self, key: &str) {
        self.entries.remove(key);
    }

    /// The entries in a form that survives an agent restart (kept in the pod's state dir).
    pub fn save(&self) -> BTreeMap<String, SavedEntry> {
        self.entries
            .iter()
            .map(|(k, e)| {
                (
                    k.clone(),
                    SavedEntry {
                        backoff_ms: e.backoff.num_milliseconds(),
                        last_update: e.last_update,
                    },
                )
            })
            .collect()
    }

    /// Restores saved entries (a delay above the configured max is capped).
    pub fn restore(&mut self, saved: BTreeMap<String, SavedEntry>) {
        for (k, e) in saved {
            let backoff = Duration::milliseconds(e.backoff_ms.max(0)).min(self.cfg.max);
            self.entries.insert(
                k,
                Entry {
                    backoff,
                    last_update: e.last_update,
                },
            );
        }
    }
}

/// One saved back-off entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SavedEntry {
    /// Current delay in milliseconds.
    pub backoff_ms: i64,
    /// When the delay was last raised.
    pub last_update: DateTime<Utc>,
}

/// Human form of a delay the way Go prints a `time.Duration` ("10s", "5m0s", "2m40s").
pub fn go_duration(d: Duration) -> String {
    let s = d.num_seconds();
    if s >= 60 {
        format!("{}m{}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::chrono::TimeZone;

    fn t(s: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_700_000_000 + s, 0).single().unwrap()
    }

    #[test]
    fn doubling_sequence_caps_at_max() {
        let mut b = RestartBackoff::new(BackoffConfig::default());
        let mut now = 0;
        let mut seen = vec![];
        for _ in 0..8 {
            let d = b.next("k", t(now), t(now));
            seen.push(d.num_seconds());
            now += d.num_seconds() + 1;
        }
        assert_eq!(seen, vec![10, 20, 40, 80, 160, 300, 300, 300]);
    }

    #[test]
    fn in_backoff_table() {
        let mut b = RestartBackoff::new(BackoffConfig::default());
        b.next("k", t(0), t(0));
        // (finished_at, now, want)
        for (fin, now, want) in [
            (0, 5, true),
            (0, 10, false),
            (100, 105, true),
            (0, 700, false),
        ] {
            assert_eq!(b.in_backoff_since("k", t(fin), t(now)), want, "{fin} {now}");
        }
        assert!(!b.in_backoff_since("other", t(0), t(1)));
    }

    #[test]
    fn reset_after_ten_minutes_running() {
        let mut b = RestartBackoff::new(BackoffConfig::default());
        b.next("k", t(0), t(0));
        b.next("k", t(15), t(15));
        assert_eq!(b.get("k").num_seconds(), 20);
        // ran for 601 s after the last restart, then crashed
        assert_eq!(b.next("k", t(15 + 601), t(616)).num_seconds(), 10);
        b.gc(t(616 + 601));
        assert_eq!(b.get("k"), Duration::zero());
    }

    #[test]
    fn configurable_base() {
        let mut b = RestartBackoff::new(BackoffConfig {
            initial: Duration::seconds(1),
            max: Duration::seconds(4),
        });
        let seq: Vec<i64> = (0..4)
            .map(|i| b.next("k", t(i), t(i)).num_seconds())
            .collect();
        assert_eq!(seq, vec![1, 2, 4, 4]);
    }

    #[test]
    fn go_duration_table() {
        for (s, want) in [(10, "10s"), (300, "5m0s"), (160, "2m40s")] {
            assert_eq!(go_duration(Duration::seconds(s)), want);
        }
    }
}

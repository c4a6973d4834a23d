//! Prometheus metrics and the healthz endpoint, served by a tiny blocking HTTP server
//! (one thread per listener; the endpoints are scraped rarely).

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write as _};
use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tracing::warn;

const BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0,
];

/// A cumulative histogram.
#[derive(Debug, Clone, Default)]
pub struct Histogram {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    /// Records one observation (seconds).
    pub fn observe(&mut self, v: f64) {
        if self.counts.is_empty() {
            self.counts = vec![0; BUCKETS.len()];
        }
        for (i, b) in BUCKETS.iter().enumerate() {
            if v <= *b {
                self.counts[i] += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    fn write(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (i, b) in BUCKETS.iter().enumerate() {
            let c = self.counts.get(i).copied().unwrap_or(0);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}", self.sum);
        let _ = writeln!(out, "{name}_count {}", self.count);
    }
}

/// The proxier's metrics.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    /// All syncs.
    pub sync: Histogram,
    /// Full syncs.
    pub full: Histogram,
    /// Partial syncs.
    pub partial: Histogram,
    /// Rules in the last payload.
    pub rules: usize,
    /// Last successful sync, unix seconds.
    pub last_sync: f64,
    /// Failed syncs.
    pub failures: u64,
}

impl Metrics {
    /// Records a successful sync.
    pub fn synced(&mut self, full: bool, took: Duration, rules: usize) {
        let s = took.as_secs_f64();
        self.sync.observe(s);
        if full {
            self.full.observe(s);
        } else {
            self.partial.observe(s);
        }
        self.rules = rules;
        self.last_sync = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or_default();
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut o = String::new();
        self.sync.write(
            &mut o,
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds",
        );
        self.full.write(
            &mut o,
            "kubeproxy_sync_full_proxy_rules_duration_seconds",
            "Full SyncProxyRules latency in seconds",
        );
        self.partial.write(
            &mut o,
            "kubeproxy_sync_partial_proxy_rules_duration_seconds",
            "Partial SyncProxyRules latency in seconds",
        );
        let _ = writeln!(o, "# HELP kubeproxy_sync_proxy_rules_last_timestamp_seconds The last time proxy rules were successfully synced\n# TYPE kubeproxy_sync_proxy_rules_last_timestamp_seconds gauge\nkubeproxy_sync_proxy_rules_last_timestamp_seconds {}", self.last_sync);
        let _ = writeln!(o, "# HELP kubeproxy_sync_proxy_rules_iptables_total Rules written by the last sync\n# TYPE kubeproxy_sync_proxy_rules_iptables_total gauge\nkubeproxy_sync_proxy_rules_iptables_total {}", self.rules);
        let _ = writeln!(o, "# HELP kubeproxy_sync_proxy_rules_failures_total Failed syncs\n# TYPE kubeproxy_sync_proxy_rules_failures_total counter\nkubeproxy_sync_proxy_rules_failures_total {}", self.failures);
        o
    }
}

/// Serves `GET <path>` on `addr` with the body `body()` returns (status, content type,
/// text) on a background thread.
pub fn serve<F>(addr: SocketAddr, body: F) -> std::io::Result<()>
where
    F: Fn(&str) -> (u16, &'static str, String) + Send + 'static,
{
    let l = TcpListener::bind(addr)?;
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut s) = conn else { continue };
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let mut line = String::new();
            let mut r = BufReader::new(match s.try_clone() {
                Ok(c) => c,
                Err(_) => continue,
            });
            if r.read_line(&mut line).is_err() {
                continue;
            }
            // Drain headers.
            let mut h = String::new();
            while r.read_line(&mut h).is_ok_and(|n| n > 2) {
                h.clear();
            }
            let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
            let (code, ctype, text) = body(&path);
            let reason = if code == 200 {
                "OK"
            } else if code == 404 {
                "Not Found"
            } else {
                "Service Unavailable"
            };
            if let Err(e) = write!(s, "HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}", text.len()) {
                warn!(error = %e, "writing HTTP response");
            }
        }
    });
    Ok(())
}

/// Shared metrics handle.
pub type SharedMetrics = Arc<Mutex<Metrics>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_histograms() {
        let mut m = Metrics::default();
        m.synced(true, Duration::from_millis(20), 10);
        m.synced(false, Duration::from_millis(2), 3);
        let t = m.render();
        assert!(t.contains("kubeproxy_sync_full_proxy_rules_duration_seconds_count 1"));
        assert!(t.contains(
            "kubeproxy_sync_partial_proxy_rules_duration_seconds_bucket{le=\"0.005\"} 1"
        ));
        assert!(t.contains("kubeproxy_sync_proxy_rules_iptables_total 3"));
    }
}

//! Prometheus metrics (kube-proxy's names; the text exposition is written here, pure) and
//! the HTTP server of the metrics and healthz endpoints (effectful: hyper on a thread of
//! its own per listener).

use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::CONTENT_TYPE;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tracing::warn;

const BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0,
];

/// kube-proxy's buckets of `network_programming_duration_seconds`: 0.25 s, 0.5 s, then every
/// second to 59 s, every 5 s to 115 s, every 30 s to 300 s.
pub fn network_programming_buckets() -> Vec<f64> {
    let mut b = vec![0.25, 0.5];
    b.extend((1..=59).map(f64::from));
    b.extend((0..12).map(|i| 60.0 + 5.0 * f64::from(i)));
    b.extend((0..7).map(|i| 120.0 + 30.0 * f64::from(i)));
    b
}

/// A cumulative histogram.
#[derive(Debug, Clone, Default)]
pub struct Histogram {
    /// Upper bounds (None: the sync-duration buckets).
    bounds: Option<Vec<f64>>,
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    /// A histogram with these upper bounds (ascending).
    pub fn with_buckets(bounds: Vec<f64>) -> Self {
        Self {
            bounds: Some(bounds),
            ..Self::default()
        }
    }

    fn bounds(&self) -> &[f64] {
        self.bounds.as_deref().unwrap_or(BUCKETS)
    }

    /// Records one observation (seconds).
    pub fn observe(&mut self, v: f64) {
        let n = self.bounds().len();
        if self.counts.len() != n {
            self.counts = vec![0; n];
        }
        for i in 0..n {
            if v <= self.bounds()[i] {
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

    /// Sum of the observations.
    pub fn sum(&self) -> f64 {
        self.sum
    }

    fn write(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (i, b) in self.bounds().iter().enumerate() {
            let c = self.counts.get(i).copied().unwrap_or(0);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}", self.sum);
        let _ = writeln!(out, "{name}_count {}", self.count);
    }
}

/// The proxier's metrics.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// All syncs.
    pub sync: Histogram,
    /// Full syncs.
    pub full: Histogram,
    /// Partial syncs.
    pub partial: Histogram,
    /// From an EndpointSlice change (its `endpoints.kubernetes.io/last-change-trigger-time`)
    /// to the end of the sync that programmed it (kube-proxy's
    /// `network_programming_duration_seconds`).
    pub network_programming: Histogram,
    /// Rules in the last payload.
    pub rules: usize,
    /// Rules per table: owned in the kernel after the last sync (`table`, total), and
    /// written by it (`table`, last); iptables mode only.
    pub tables: Option<crate::proxier::TableRules>,
    /// Last successful sync, unix seconds.
    pub last_sync: f64,
    /// Failed syncs.
    pub failures: u64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            sync: Histogram::default(),
            full: Histogram::default(),
            partial: Histogram::default(),
            network_programming: Histogram::with_buckets(network_programming_buckets()),
            rules: 0,
            tables: None,
            last_sync: 0.0,
            failures: 0,
        }
    }
}

impl Metrics {
    /// Records a successful sync that took `took`, with `rules` in its payload.
    pub fn observe_sync(&mut self, full: bool, took: Duration, rules: usize) {
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

    /// Records a successful sync from its stats (duration, rules, rules per table).
    pub fn synced(&mut self, stats: &crate::proxier::SyncStats, took: Duration) {
        self.observe_sync(stats.full, took, stats.rules);
        if stats.tables.is_some() {
            self.tables = stats.tables;
        }
    }

    /// Records the network programming latency of the changes a sync ending at `now`
    /// programmed: one observation per trigger time (a trigger time in the future counts 0).
    pub fn programmed(&mut self, trigger_times: &[SystemTime], now: SystemTime) {
        for t in trigger_times {
            let d = now.duration_since(*t).unwrap_or_default();
            self.network_programming.observe(d.as_secs_f64());
        }
    }

    /// Prometheus text exposition: these metrics and this process's `process_*` (read
    /// from `/proc/self`; left out when unreadable).
    pub fn render(&self) -> String {
        let mut o = self.render_sync();
        if let Some(p) = crate::process::ProcessStats::read() {
            p.render(&mut o);
        }
        o
    }

    /// The sync metrics alone (pure).
    pub fn render_sync(&self) -> String {
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
        self.network_programming.write(
            &mut o,
            "kubeproxy_network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds",
        );
        let _ = writeln!(o, "# HELP kubeproxy_sync_proxy_rules_last_timestamp_seconds The last time proxy rules were successfully synced\n# TYPE kubeproxy_sync_proxy_rules_last_timestamp_seconds gauge\nkubeproxy_sync_proxy_rules_last_timestamp_seconds {}", self.last_sync);
        match &self.tables {
            Some(t) => {
                let _ = writeln!(o, "# HELP kubeproxy_sync_proxy_rules_iptables_total Total number of iptables rules owned by kube-proxy\n# TYPE kubeproxy_sync_proxy_rules_iptables_total gauge\nkubeproxy_sync_proxy_rules_iptables_total{{table=\"filter\"}} {}\nkubeproxy_sync_proxy_rules_iptables_total{{table=\"nat\"}} {}", t.filter_total, t.nat_total);
                let _ = writeln!(o, "# HELP kubeproxy_sync_proxy_rules_iptables_last Number of iptables rules written by kube-proxy in last sync\n# TYPE kubeproxy_sync_proxy_rules_iptables_last gauge\nkubeproxy_sync_proxy_rules_iptables_last{{table=\"filter\"}} {}\nkubeproxy_sync_proxy_rules_iptables_last{{table=\"nat\"}} {}", t.filter_last, t.nat_last);
            }
            None => {
                let _ = writeln!(o, "# HELP kubeproxy_sync_proxy_rules_iptables_total Rules written by the last sync\n# TYPE kubeproxy_sync_proxy_rules_iptables_total gauge\nkubeproxy_sync_proxy_rules_iptables_total {}", self.rules);
            }
        }
        let _ = writeln!(o, "# HELP kubeproxy_sync_proxy_rules_failures_total Failed syncs\n# TYPE kubeproxy_sync_proxy_rules_failures_total counter\nkubeproxy_sync_proxy_rules_failures_total {}", self.failures);
        o
    }
}

/// How long a client may take to send a request's headers before its connection is
/// closed (the hand-written server this replaced had the same read timeout).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves `GET <path>` on `addr` with the body `body()` returns (status, content type,
/// text) on a background thread. Binding errors are returned at once.
pub fn serve<F>(addr: SocketAddr, body: F) -> std::io::Result<()>
where
    F: Fn(&str) -> (u16, &'static str, String) + Send + 'static,
{
    serve_on(TcpListener::bind(addr)?, body)
}

/// [`serve`] on a bound listener (tests bind port 0 and read the address first).
///
/// hyper's HTTP/1 server on a current-thread tokio runtime of its own thread: every
/// connection is a task, so a client that connects and sends nothing holds only its own
/// connection (closed after [`HEADER_READ_TIMEOUT`]) and never delays another's `/healthz`.
pub fn serve_on<F>(listener: TcpListener, body: F) -> std::io::Result<()>
where
    F: Fn(&str) -> (u16, &'static str, String) + Send + 'static,
{
    listener.set_nonblocking(true)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let body = Arc::new(Mutex::new(body));
    std::thread::Builder::new()
        .name("metrics-http".into())
        .spawn(move || {
            rt.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        warn!(error = %e, "metrics/healthz listener");
                        return;
                    }
                };
                loop {
                    let stream = match listener.accept().await {
                        Ok((s, _)) => s,
                        Err(e) => {
                            // EMFILE and the like: wait instead of spinning.
                            warn!(error = %e, "accepting an HTTP connection");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    };
                    let body = body.clone();
                    tokio::spawn(async move {
                        let svc = service_fn(move |req: Request<Incoming>| {
                            let target = req
                                .uri()
                                .path_and_query()
                                .map_or("/", |p| p.as_str())
                                .to_string();
                            let (code, ctype, text) = match body.lock() {
                                Ok(f) => f(&target),
                                Err(_) => (500, "text/plain", "internal error\n".into()),
                            };
                            let resp = Response::builder()
                                .status(StatusCode::from_u16(code).unwrap_or(StatusCode::OK))
                                .header(CONTENT_TYPE, ctype)
                                .body(Full::new(Bytes::from(text)));
                            async move { resp }
                        });
                        let conn = http1::Builder::new()
                            .timer(TokioTimer::new())
                            .header_read_timeout(HEADER_READ_TIMEOUT)
                            .serve_connection(TokioIo::new(stream), svc);
                        if let Err(e) = conn.await {
                            tracing::debug!(error = %e, "HTTP connection");
                        }
                    });
                }
            });
        })?;
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
        m.observe_sync(true, Duration::from_millis(20), 10);
        m.observe_sync(false, Duration::from_millis(2), 3);
        let t = m.render_sync();
        assert!(t.contains("kubeproxy_sync_full_proxy_rules_duration_seconds_count 1"));
        assert!(t.contains(
            "kubeproxy_sync_partial_proxy_rules_duration_seconds_bucket{le=\"0.005\"} 1"
        ));
        assert!(t.contains("kubeproxy_sync_proxy_rules_iptables_total 3"));
    }

    #[test]
    fn iptables_rules_carry_the_table_label() {
        let mut m = Metrics::default();
        let stats = crate::proxier::SyncStats {
            full: true,
            rules: 12,
            tables: Some(crate::proxier::TableRules {
                filter_total: 4,
                nat_total: 20,
                filter_last: 4,
                nat_last: 8,
            }),
            ..Default::default()
        };
        m.synced(&stats, Duration::from_millis(5));
        let t = m.render_sync();
        for line in [
            "kubeproxy_sync_proxy_rules_iptables_total{table=\"filter\"} 4",
            "kubeproxy_sync_proxy_rules_iptables_total{table=\"nat\"} 20",
            "kubeproxy_sync_proxy_rules_iptables_last{table=\"nat\"} 8",
        ] {
            assert!(t.lines().any(|l| l == line), "{line} missing:\n{t}");
        }
        assert!(!t.contains("kubeproxy_sync_proxy_rules_iptables_total 12"));
    }

    #[test]
    fn network_programming_latency_is_counted_from_the_trigger_time() {
        let mut m = Metrics::default();
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        m.programmed(
            &[
                now - Duration::from_millis(300),
                now - Duration::from_secs(3),
                now + Duration::from_secs(1),
            ],
            now,
        );
        let t = m.render_sync();
        let name = "kubeproxy_network_programming_duration_seconds";
        for (le, n) in [("0.25", 1), ("0.5", 2), ("2", 2), ("3", 3), ("300", 3)] {
            let line = format!("{name}_bucket{{le=\"{le}\"}} {n}");
            assert!(t.lines().any(|l| l == line), "{line} missing:\n{t}");
        }
        assert_eq!(m.network_programming.count(), 3);
        assert!((m.network_programming.sum() - 3.3).abs() < 1e-9);
        assert_eq!(network_programming_buckets().len(), 2 + 59 + 12 + 7);
    }

    fn get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
        use std::io::{Read, Write};
        let mut c = std::net::TcpStream::connect(addr)?;
        // A bound on the wait, so a stalled server fails the test instead of hanging it.
        c.set_read_timeout(Some(Duration::from_secs(4)))?;
        write!(
            c,
            "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
        )?;
        let mut out = String::new();
        c.read_to_string(&mut out)?;
        Ok(out)
    }

    #[test]
    fn an_idle_client_does_not_stall_healthz() {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        serve_on(l, |path| match path {
            "/healthz" => (200, "application/json", "{\"ok\": true}\n".into()),
            _ => (404, "text/plain", "not found\n".into()),
        })
        .expect("serve");
        // Connects and sends nothing (the old server read its request line for 5 s before
        // accepting anyone else).
        let idle = std::net::TcpStream::connect(addr).expect("idle client");
        let mut partial = std::net::TcpStream::connect(addr).expect("slow client");
        std::io::Write::write_all(&mut partial, b"GET /heal").expect("partial request");
        let r = get(addr, "/healthz").expect("healthz answered while two clients stall");
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert!(r.contains("content-type: application/json"), "{r}");
        assert!(r.ends_with("{\"ok\": true}\n"), "{r}");
        let r = get(addr, "/nope").expect("404 answered");
        assert!(r.starts_with("HTTP/1.1 404 Not Found\r\n"), "{r}");
        drop((idle, partial));
    }

    #[test]
    fn binding_a_used_address_is_an_error() {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        assert!(serve(addr, |_| (200, "text/plain", String::new())).is_err());
    }
}

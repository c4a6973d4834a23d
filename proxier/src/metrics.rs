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
        m.synced(true, Duration::from_millis(20), 10);
        m.synced(false, Duration::from_millis(2), 3);
        let t = m.render();
        assert!(t.contains("kubeproxy_sync_full_proxy_rules_duration_seconds_count 1"));
        assert!(t.contains(
            "kubeproxy_sync_partial_proxy_rules_duration_seconds_bucket{le=\"0.005\"} 1"
        ));
        assert!(t.contains("kubeproxy_sync_proxy_rules_iptables_total 3"));
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

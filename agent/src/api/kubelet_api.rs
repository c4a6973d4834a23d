//! The kubelet API on :10250 (effectful): TLS with a serving certificate from flags or a
//! self-signed one kept in the state dir (key 0600); authentication of bearer tokens through
//! TokenReview (anonymous requests get 401; cached, rate-bounded: [`crate::api::auth`]) and of
//! client certificates signed by `--client-ca-file`; authorization through
//! SubjectAccessReview on `nodes/<sub>` of this node (cached; the streaming endpoints are
//! `create`); bounded connections ([`Limits`]: count, TLS handshake and request-head
//! deadlines); `/healthz`, `/pods` and `/containerLogs/{ns}/{pod}/{container}` (tailLines,
//! timestamps, limitBytes, previous, follow) read from the CRI log files; `/exec`, `/attach`
//! and `/portForward` over WebSocket ([`crate::api::stream`]); `/metrics` (the agent's own
//! metrics), `/metrics/resource` and `/stats/summary` (node, pod and container usage from
//! [`crate::api::stats`]).

use crate::api::query::Query;
use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio_rustls::rustls;

type Body = BoxBody<Bytes, Infallible>;

/// Pods known to the agent, by UID (shared with the pod loop).
pub type PodStore = Arc<RwLock<BTreeMap<String, Pod>>>;

/// Kubelet API settings.
#[derive(Debug, Clone)]
pub struct ApiOptions {
    /// Listen address.
    pub addr: SocketAddr,
    /// Serving certificate (PEM) and key; None: self-signed under `pki_dir`.
    pub cert: Option<(PathBuf, PathBuf)>,
    /// Where the self-signed certificate is kept.
    pub pki_dir: PathBuf,
    /// Names and addresses for the self-signed certificate.
    pub sans: Vec<String>,
    /// CRI log root.
    pub pod_log_dir: PathBuf,
    /// Node name (SubjectAccessReview `name`).
    pub node_name: String,
    /// CA bundle (PEM) that signs client certificates; their CN is the user, O the groups.
    pub client_ca: Option<PathBuf>,
    /// State dir (its filesystem is the node filesystem in /stats/summary).
    pub root_dir: PathBuf,
    /// The shim runtime of the pod workers (None: no workers; exec, attach, port-forward and
    /// per-container figures are unavailable).
    pub shim: Option<hako_shim::client::Runtime>,
    /// The pod workers' run dir (sandbox namespaces under `sandboxes/<id>`; None: no workers).
    pub run_dir: Option<PathBuf>,
    /// Review caches, rate and deadlines.
    pub auth: crate::api::auth::AuthOptions,
    /// Connection bounds.
    pub limits: Limits,
}

/// Bounds on the connections of the kubelet API.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Connections served at once; more are closed as soon as they are accepted.
    pub max_connections: usize,
    /// Deadline of the TLS handshake.
    pub tls_handshake_timeout: Duration,
    /// Deadline for a whole request head, from the moment the connection waits for one (so
    /// it is also the idle timeout of a kept-alive connection).
    pub header_read_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 1024,
            tls_handshake_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(10),
        }
    }
}

/// Node usage for /metrics/resource and /stats/summary.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct NodeUsage {
    /// Cumulative CPU seconds of all CPUs (user+nice+system+irq+softirq+steal).
    pub cpu_seconds: f64,
    /// MemTotal − MemAvailable.
    pub memory_working_set: u64,
    /// MemAvailable.
    pub memory_available: u64,
    /// Node filesystem.
    pub fs: crate::model::node_object::Measurements,
    /// Milliseconds since the epoch of the sample.
    pub timestamp_ms: i64,
}

/// Samples the node (effectful: /proc/stat, /proc/meminfo, statvfs).
pub fn node_usage(root: &Path) -> NodeUsage {
    let m = crate::node::facts::measure(root);
    let cpu_seconds = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            let l = s.lines().find(|l| l.starts_with("cpu "))?.to_string();
            let v: Vec<f64> = l
                .split_whitespace()
                .skip(1)
                .filter_map(|x| x.parse().ok())
                .collect();
            // user nice system idle iowait irq softirq steal
            let busy = [0usize, 1, 2, 5, 6, 7]
                .iter()
                .filter_map(|&i| v.get(i))
                .sum::<f64>();
            Some(busy / 100.0)
        })
        .unwrap_or(0.0);
    NodeUsage {
        cpu_seconds,
        memory_working_set: m.memory_capacity.saturating_sub(m.memory_available),
        memory_available: m.memory_available,
        fs: m,
        timestamp_ms: k8s_openapi::chrono::Utc::now().timestamp_millis(),
    }
}

/// The kubelet's `/metrics/resource` (Prometheus text): node, then containers and pods.
pub fn render_resource_metrics(u: &NodeUsage, cs: &[crate::api::stats::ContainerUsage]) -> String {
    let node = format!(
        "# HELP node_cpu_usage_seconds_total [STABLE] Cumulative cpu time consumed by the node in core-seconds\n\
         # TYPE node_cpu_usage_seconds_total counter\n\
         node_cpu_usage_seconds_total {} {}\n\
         # HELP node_memory_working_set_bytes [STABLE] Current working set of the node in bytes\n\
         # TYPE node_memory_working_set_bytes gauge\n\
         node_memory_working_set_bytes {} {}\n\
         # HELP scrape_error [ALPHA] 1 if there was an error while getting container metrics, 0 otherwise\n\
         # TYPE scrape_error gauge\n\
         scrape_error 0\n",
        u.cpu_seconds, u.timestamp_ms, u.memory_working_set, u.timestamp_ms
    );
    node + &crate::api::stats::render_resource(cs, u.timestamp_ms)
}

/// `/stats/summary`: the node section and every pod with its running containers' figures.
pub fn stats_summary(
    node: &str,
    u: &NodeUsage,
    pods: &[Pod],
    cs: &[crate::api::stats::ContainerUsage],
    vols: &[crate::api::stats::VolumeUsage],
) -> serde_json::Value {
    let t = k8s_openapi::chrono::DateTime::from_timestamp_millis(u.timestamp_ms)
        .unwrap_or_default()
        .to_rfc3339();
    #[allow(clippy::cast_possible_truncation)]
    let cpu_ns = (u.cpu_seconds * 1e9) as u64;
    let pods = crate::api::stats::summary_pods(pods, cs, vols, &t);
    serde_json::json!({"node": {"nodeName": node,
        "cpu": {"time": t, "usageCoreNanoSeconds": cpu_ns},
        "memory": {"time": t, "availableBytes": u.memory_available,
                   "usageBytes": u.memory_working_set, "workingSetBytes": u.memory_working_set},
        "fs": {"time": t, "availableBytes": u.fs.nodefs_available, "capacityBytes": u.fs.nodefs_capacity,
               "usedBytes": u.fs.nodefs_capacity.saturating_sub(u.fs.nodefs_available),
               "inodesFree": u.fs.nodefs_inodes_free, "inodes": u.fs.nodefs_inodes}},
        "pods": pods})
}

/// A start-up failure of the kubelet API.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Certificate problems.
    #[error("serving certificate: {0}")]
    Cert(String),
    /// Listen failure.
    #[error("listening on {0}: {1}")]
    Listen(SocketAddr, std::io::Error),
}

/// Makes a key file readable by its owner only (a key written 0644 by an older agent).
fn restrict_key(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let m = std::fs::metadata(path)?;
    if m.permissions().mode() & 0o077 != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        tracing::warn!(key = %path.display(), "serving key was readable by others: now 0600");
    }
    Ok(())
}

fn load_or_make_cert(o: &ApiOptions) -> Result<(Vec<u8>, Vec<u8>), ApiError> {
    let e = |m: String| ApiError::Cert(m);
    if let Some((c, k)) = &o.cert {
        let cert = std::fs::read(c).map_err(|x| e(format!("{}: {x}", c.display())))?;
        let key = std::fs::read(k).map_err(|x| e(format!("{}: {x}", k.display())))?;
        return Ok((cert, key));
    }
    let (cp, kp) = (o.pki_dir.join("kubelet.crt"), o.pki_dir.join("kubelet.key"));
    if let (Ok(c), Ok(k)) = (std::fs::read(&cp), std::fs::read(&kp)) {
        restrict_key(&kp).map_err(|x| e(format!("{}: {x}", kp.display())))?;
        return Ok((c, k));
    }
    let ck = rcgen::generate_simple_self_signed(o.sans.clone()).map_err(|x| e(x.to_string()))?;
    let (cert, key) = (ck.cert.pem(), ck.key_pair.serialize_pem());
    std::fs::create_dir_all(&o.pki_dir).map_err(|x| e(x.to_string()))?;
    hako_shim::durable::write_file(&kp, key.as_bytes(), 0o600)
        .map_err(|x| e(format!("{}: {x}", kp.display())))?;
    hako_shim::durable::write_file(&cp, cert.as_bytes(), 0o644)
        .map_err(|x| e(format!("{}: {x}", cp.display())))?;
    tracing::info!(cert = %cp.display(), "wrote a self-signed kubelet serving certificate");
    Ok((cert.into_bytes(), key.into_bytes()))
}

fn tls_config(
    cert: &[u8],
    key: &[u8],
    client_ca: Option<&Path>,
) -> Result<rustls::ServerConfig, ApiError> {
    let e = |m: String| ApiError::Cert(m);
    let certs: Vec<_> = rustls_pemfile::certs(&mut &cert[..])
        .collect::<Result<_, _>>()
        .map_err(|x| e(x.to_string()))?;
    let key = rustls_pemfile::private_key(&mut &key[..])
        .map_err(|x| e(x.to_string()))?
        .ok_or_else(|| e("no private key in the key file".into()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|x| e(x.to_string()))?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let pem = std::fs::read(ca).map_err(|x| e(format!("{}: {x}", ca.display())))?;
            let mut roots = rustls::RootCertStore::empty();
            for c in rustls_pemfile::certs(&mut &pem[..]) {
                let c = c.map_err(|x| e(format!("{}: {x}", ca.display())))?;
                roots
                    .add(c)
                    .map_err(|x| e(format!("{}: {x}", ca.display())))?;
            }
            // Client certificates are optional: without one, a bearer token is required.
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .allow_unauthenticated()
            .build()
            .map_err(|x| e(x.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    builder
        .with_single_cert(certs, key)
        .map_err(|x| e(x.to_string()))
}

/// The subject's CommonName and Organizations of a DER certificate (the user and groups of a
/// client certificate, as the apiserver and kubelet read them: the last CN, every O in order,
/// values of any string type, lossy UTF-8). None when the structure does not parse or there
/// is no CN.
///
/// The certificate was verified by rustls (webpki) before this reads it, so only the path to
/// the subject is walked: Certificate → TBSCertificate → optional `[0]` version, serial,
/// signature, issuer, validity, subject. Each element is read with asn1-rs's BER `Any`
/// (x509-parser's ASN.1 layer), which also takes long-form lengths; a full
/// `X509Certificate::from_der` would refuse what the reader accepted before (non-minimal
/// lengths, an unchecked public key), which the fuzz target pins.
pub fn subject_identity(cert: &[u8]) -> Option<(String, Vec<String>)> {
    use x509_parser::asn1_rs::{Any, FromBer as _};
    use x509_parser::oid_registry::{OID_X509_COMMON_NAME, OID_X509_ORGANIZATION_NAME};
    /// The elements of a constructed value, each as (tag, content).
    fn elements(mut b: &[u8]) -> Option<Vec<Any<'_>>> {
        let mut v = Vec::new();
        while !b.is_empty() {
            let (rest, a) = Any::from_ber(b).ok()?;
            v.push(a);
            b = rest;
        }
        Some(v)
    }
    let (_, certificate) = Any::from_ber(cert).ok()?;
    let (_, tbs) = Any::from_ber(certificate.data).ok()?;
    let fields = elements(tbs.data)?;
    // [0] version is optional; then serial, signature, issuer, validity, subject.
    let first = fields.first()?;
    let skip = usize::from(first.header.is_contextspecific() && first.tag().0 == 0);
    let subject = fields.get(skip + 4)?;
    let (cn_oid, o_oid) = (OID_X509_COMMON_NAME, OID_X509_ORGANIZATION_NAME);
    let (mut cn, mut orgs) = (None, Vec::new());
    for rdn in elements(subject.data)? {
        for atv in elements(rdn.data)? {
            let (rest, oid) = Any::from_ber(atv.data).ok()?;
            let (_, value) = Any::from_ber(rest).ok()?;
            let value = || String::from_utf8_lossy(value.data).into_owned();
            if oid.data == cn_oid.as_bytes() {
                cn = Some(value());
            } else if oid.data == o_oid.as_bytes() {
                orgs.push(value());
            }
        }
    }
    Some((cn?, orgs))
}

use crate::api::auth::{Auth, AuthError, UserInfo};

struct Server {
    opts: ApiOptions,
    pods: PodStore,
    /// Cached, bounded TokenReview and SubjectAccessReview.
    auth: Auth,
}

/// Starts the kubelet API; returns once listening.
pub async fn start(client: Client, opts: ApiOptions, pods: PodStore) -> Result<(), ApiError> {
    let (cert, key) = load_or_make_cert(&opts)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls_config(
        &cert,
        &key,
        opts.client_ca.as_deref(),
    )?));
    let listener = tokio::net::TcpListener::bind(opts.addr)
        .await
        .map_err(|e| ApiError::Listen(opts.addr, e))?;
    tracing::info!(addr = %opts.addr, "kubelet API listening");
    let limits = opts.limits.clone();
    let srv = Arc::new(Server {
        auth: Auth::new(
            opts.auth.clone(),
            Arc::new(crate::api::auth::ApiReviewer(client)),
        ),
        opts,
        pods,
    });
    let conns = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    tokio::spawn(async move {
        loop {
            let tcp = match listener.accept().await {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    // EMFILE and the like: back off instead of spinning.
                    tracing::debug!(error = %e, "kubelet API accept");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(permit) = conns.clone().try_acquire_owned() else {
                tracing::debug!("kubelet API: connection limit reached, closing a new connection");
                drop(tcp);
                continue;
            };
            let acceptor = acceptor.clone();
            let srv = srv.clone();
            let limits = limits.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let tls =
                    match tokio::time::timeout(limits.tls_handshake_timeout, acceptor.accept(tcp))
                        .await
                    {
                        Ok(Ok(tls)) => tls,
                        _ => return,
                    };
                // A verified client certificate (chain checked against --client-ca-file).
                let cert_id = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(|c| subject_identity(c.as_ref()))
                    .map(|(name, groups)| UserInfo {
                        name,
                        groups,
                        ..Default::default()
                    });
                let svc = hyper::service::service_fn(move |req| {
                    let srv = srv.clone();
                    let cert_id = cert_id.clone();
                    async move { Ok::<_, Infallible>(srv.handle(req, cert_id).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(limits.header_read_timeout)
                    .max_buf_size(64 * 1024)
                    .serve_connection(TokioIo::new(tls), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
    Ok(())
}

/// A JSON answer (`Content-Type: application/json`, as the kubelet's `/pods`).
fn json(code: StatusCode, v: &serde_json::Value) -> Response<Body> {
    let mut r = text(code, v.to_string());
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

/// The kubelet's `/pods` answer: a v1 `PodList` of the pods bound to the node.
pub fn pod_list(items: Vec<Pod>) -> serde_json::Value {
    serde_json::json!({"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items})
}

fn text(code: StatusCode, s: impl Into<String>) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(s.into())).boxed());
    *r.status_mut() = code;
    r
}

/// The UID the pod's containers and logs are kept under: a mirror pod's is its static pod's
/// (the `kubernetes.io/config.mirror` annotation, the static pod's config hash = UID).
pub fn runtime_uid(p: &Pod) -> Option<String> {
    p.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get("kubernetes.io/config.mirror"))
        .filter(|h| !h.is_empty())
        .cloned()
        .or_else(|| p.metadata.uid.clone())
}

/// The `nodes/<subresource>` a path is authorized against (as the kubelet maps them).
pub fn subresource_for(path: &str) -> &'static str {
    let first = path.trim_start_matches('/').split('/').next().unwrap_or("");
    match first {
        "stats" => "stats",
        "metrics" => "metrics",
        "logs" => "log",
        "spec" => "spec",
        "checkpoint" => "checkpoint",
        _ => "proxy",
    }
}

/// Why a `/containerLogs` query was refused (400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LogQueryError {
    /// A numeric parameter (`tailLines`, `sinceSeconds`, `limitBytes`) is not an integer.
    #[error("{0}: {1:?} is not an integer")]
    NotInteger(String, String),
    /// Both `sinceSeconds` and `sinceTime`.
    #[error("at most one of sinceTime or sinceSeconds")]
    BothSince,
    /// `sinceTime` is not an RFC 3339 time.
    #[error("sinceTime: {0:?} is not an RFC 3339 time")]
    SinceTime(String),
}

/// The log options of a `/containerLogs` query (the kubelet's `PodLogOptions`: `tailLines`,
/// `sinceSeconds` or `sinceTime`, `timestamps`, `limitBytes`, `follow`); `now_nanos` is the
/// current time for `sinceSeconds`.
pub fn log_options(
    q: &Query,
    now_nanos: i128,
) -> Result<crate::sys::logs::LogOptions, LogQueryError> {
    let flag = |k: &str| matches!(q.get(k), Some("true" | "1"));
    let num = |k: &str| -> Result<Option<u64>, LogQueryError> {
        q.get(k)
            .map(|v| {
                v.parse::<i64>()
                    .map_err(|_| LogQueryError::NotInteger(k.into(), v.into()))
                    .map(|n| u64::try_from(n.max(0)).unwrap_or(0))
            })
            .transpose()
    };
    let since_nanos = match (num("sinceSeconds")?, q.get("sinceTime")) {
        (Some(_), Some(_)) => return Err(LogQueryError::BothSince),
        (Some(s), None) => Some(now_nanos - i128::from(s) * 1_000_000_000),
        // Decoded once, with the rest of the query.
        (None, Some(t)) => Some(
            hako_shim::logs::parse_rfc3339(t.as_bytes())
                .ok_or_else(|| LogQueryError::SinceTime(t.into()))?,
        ),
        (None, None) => None,
    };
    Ok(crate::sys::logs::LogOptions {
        tail_lines: num("tailLines")?,
        since_nanos,
        timestamps: flag("timestamps"),
        limit_bytes: num("limitBytes")?,
        follow: flag("follow"),
    })
}

#[cfg(test)]
use crate::api::query::decode as percent_decode;

/// The attempt number of a `<attempt>.log` file.
fn log_attempt(p: &Path) -> Option<u32> {
    p.file_name()?.to_str()?.strip_suffix(".log")?.parse().ok()
}

/// A follow's view of the container (its shim) and of the HTTP client (the channel).
struct ApiFollow {
    client: Option<hako_shim::client::ShimClient>,
    tx: tokio::sync::mpsc::Sender<Bytes>,
}

impl crate::sys::logs::FollowCtl for ApiFollow {
    fn running(&mut self) -> bool {
        self.client.as_ref().is_some_and(|c| {
            c.state()
                .is_ok_and(|s| s.status == hako_shim::state::Status::Running)
        })
    }
    fn cancelled(&self) -> bool {
        self.tx.is_closed()
    }
}

fn log_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .filter_map(|e| {
                    let n = e.file_name().to_string_lossy().into_owned();
                    n.strip_suffix(".log")
                        .and_then(|x| x.parse::<u64>().ok())
                        .map(|i| (i, e.path()))
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v.into_iter().map(|(_, p)| p).collect()
}

fn query(q: &str) -> Query {
    Query::parse(q)
}

impl Server {
    /// Node usage, the pods and their running containers' figures (blocking reads off the
    /// async workers).
    async fn usage(&self) -> (NodeUsage, Vec<Pod>, Vec<crate::api::stats::ContainerUsage>) {
        let pods: Vec<Pod> = self
            .pods
            .read()
            .map(|p| p.values().cloned().collect())
            .unwrap_or_default();
        let (root, shim) = (self.opts.root_dir.clone(), self.opts.shim.clone());
        tokio::task::spawn_blocking(move || {
            let m = node_usage(&root);
            let cs = shim
                .map(|s| crate::api::stats::collect(&pods, &root, &s))
                .unwrap_or_default();
            (m, pods, cs)
        })
        .await
        .unwrap_or_else(|_| (NodeUsage::default(), Vec::new(), Vec::new()))
    }

    /// The pods and their volumes' figures (blocking reads off the async workers).
    async fn volume_usage(&self) -> (Vec<Pod>, Vec<crate::api::stats::VolumeUsage>) {
        let pods: Vec<Pod> = self
            .pods
            .read()
            .map(|p| p.values().cloned().collect())
            .unwrap_or_default();
        let root = self.opts.root_dir.clone();
        tokio::task::spawn_blocking(move || {
            let v = crate::api::stats::collect_volumes(&pods, &root);
            (pods, v)
        })
        .await
        .unwrap_or_default()
    }

    async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        cert_id: Option<UserInfo>,
    ) -> Response<Body> {
        let path = req.uri().path().to_string();
        let q = query(req.uri().query().unwrap_or(""));
        let token = req
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_string);
        let user = match (cert_id, token) {
            (Some(id), _) => id,
            (None, Some(t)) => match self.auth.authenticate(&t).await {
                Ok(u) => u,
                Err(AuthError::Throttled) => {
                    let mut r = text(StatusCode::TOO_MANY_REQUESTS, "Too many requests");
                    r.headers_mut().insert(
                        hyper::header::RETRY_AFTER,
                        hyper::header::HeaderValue::from_static("1"),
                    );
                    return r;
                }
                Err(AuthError::Review(e)) => {
                    tracing::warn!("TokenReview failed: {e}");
                    return text(StatusCode::UNAUTHORIZED, "Unauthorized");
                }
                Err(AuthError::Unauthenticated) => {
                    return text(StatusCode::UNAUTHORIZED, "Unauthorized")
                }
            },
            (None, None) => return text(StatusCode::UNAUTHORIZED, "Unauthorized"),
        };
        let verb = crate::api::auth::verb_for(req.method(), &path);
        let sub = subresource_for(&path);
        match self
            .auth
            .authorize(&user, verb, sub, &self.opts.node_name)
            .await
        {
            Ok(true) => {}
            Ok(false) => {
                let name = &user.name;
                return text(
                    StatusCode::FORBIDDEN,
                    format!(
                        "Forbidden (user={name}, verb={verb}, resource=nodes, subresource={sub})"
                    ),
                );
            }
            Err(e) => {
                return text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("authorization: {e}"),
                )
            }
        }
        let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
        let sctx = || crate::api::stream::StreamCtx {
            pods: self.pods.clone(),
            root_dir: self.opts.root_dir.clone(),
            run_dir: self.opts.run_dir.clone(),
            shim: self.opts.shim.clone(),
        };
        let s = |x: &&str| (*x).to_string();
        match segs.as_slice() {
            [op @ ("exec" | "attach"), ns, pod, .., container] if segs.len() <= 5 => {
                crate::api::stream::exec_or_attach(
                    sctx(),
                    req,
                    *op == "attach",
                    s(ns),
                    s(pod),
                    s(container),
                )
                .await
            }
            ["portForward", ns, pod] | ["portForward", ns, pod, _] => {
                crate::api::stream::port_forward(sctx(), req, s(ns), s(pod)).await
            }
            ["metrics"] => {
                let (_, vols) = self.volume_usage().await;
                text(
                    StatusCode::OK,
                    crate::api::stats::render_kubelet_metrics(
                        &self.opts.node_name,
                        &crate::api::healthz::AgentMetrics::shared().render(),
                    ) + &crate::api::stats::render_volume_metrics(&vols),
                )
            }
            ["healthz"] => text(StatusCode::OK, "ok"),
            ["pods"] => {
                let items: Vec<Pod> = self
                    .pods
                    .read()
                    .map(|p| p.values().cloned().collect())
                    .unwrap_or_default();
                json(StatusCode::OK, &pod_list(items))
            }
            ["containerLogs", ns, pod, container] => self.logs(ns, pod, container, &q),
            ["metrics", "resource"] => {
                let (m, _, cs) = self.usage().await;
                text(StatusCode::OK, render_resource_metrics(&m, &cs))
            }
            ["stats", "summary"] => {
                let (m, pods, cs) = self.usage().await;
                let (_, vols) = self.volume_usage().await;
                text(
                    StatusCode::OK,
                    stats_summary(&self.opts.node_name, &m, &pods, &cs, &vols).to_string(),
                )
            }
            _ => text(StatusCode::NOT_FOUND, "404 page not found"),
        }
    }

    fn logs(&self, ns: &str, pod: &str, container: &str, q: &Query) -> Response<Body> {
        let uid = self.pods.read().ok().and_then(|p| {
            p.values()
                .find(|p| {
                    p.metadata.namespace.as_deref() == Some(ns)
                        && p.metadata.name.as_deref() == Some(pod)
                })
                .and_then(runtime_uid)
        });
        let Some(uid) = uid else {
            return text(StatusCode::NOT_FOUND, format!("pod {ns}/{pod} not found"));
        };
        let dir = self
            .opts
            .pod_log_dir
            .join(format!("{ns}_{pod}_{uid}"))
            .join(container);
        let files = log_files(&dir);
        let previous = matches!(q.get("previous"), Some("true" | "1"));
        let file = if previous {
            files.len().checked_sub(2).and_then(|i| files.get(i))
        } else {
            files.last()
        };
        let Some(file) = file.cloned() else {
            return text(
                StatusCode::BAD_REQUEST,
                format!(
                    "container \"{container}\" in pod \"{pod}\" has no {}log",
                    if previous { "previous " } else { "" }
                ),
            );
        };
        let now = i128::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos(),
        )
        .unwrap_or(0);
        let opts = match log_options(q, now) {
            Ok(o) => o,
            Err(e) => return text(StatusCode::BAD_REQUEST, e.to_string()),
        };
        if let Err(e) = std::fs::File::open(&file) {
            return text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("open log {}: {e}", file.display()),
            );
        }
        let client = match (&self.opts.shim, log_attempt(&file)) {
            (Some(shim), Some(attempt)) => {
                Some(shim.client(&crate::sys::runtime::container_id(&uid, container, attempt)))
            }
            _ => None,
        };
        // The reader runs on its own thread (a follow may last as long as the container) and
        // hands bounded chunks to the response through a bounded channel; it stops when the
        // client is gone.
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(16);
        let mut ctl = ApiFollow {
            client,
            tx: tx.clone(),
        };
        let spawned = std::thread::Builder::new()
            .name("container-logs".into())
            .spawn(move || {
                let r = crate::sys::logs::read_logs(&file, &opts, &mut ctl, &mut |b| {
                    tx.blocking_send(Bytes::copy_from_slice(b)).is_ok()
                });
                if let Err(e) = r {
                    tracing::debug!(error = %e, "container log read ended");
                }
            });
        if let Err(e) = spawned {
            return text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
        }
        let stream =
            futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|b| (b, rx)) });
        let body = StreamBody::new(futures::StreamExt::map(stream, |b| {
            Ok::<_, Infallible>(Frame::data(b))
        }));
        Response::new(BodyExt::boxed(body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_log_query() {
        let q = |s: &str| query(s);
        let o = log_options(&q("tailLines=3&timestamps=true&limitBytes=10&follow=1"), 0).unwrap();
        assert_eq!(
            o,
            crate::sys::logs::LogOptions {
                tail_lines: Some(3),
                since_nanos: None,
                timestamps: true,
                limit_bytes: Some(10),
                follow: true,
            }
        );
        let o = log_options(&q("sinceSeconds=2"), 5_000_000_000).unwrap();
        assert_eq!(o.since_nanos, Some(3_000_000_000));
        let o = log_options(&q("sinceTime=1970-01-01T01:00:01%2B01:00"), 0).unwrap();
        assert_eq!(o.since_nanos, Some(1_000_000_000));
        for bad in [
            "tailLines=x",
            "sinceTime=yesterday",
            "sinceSeconds=1&sinceTime=1970-01-01T00:00:00Z",
        ] {
            assert!(log_options(&q(bad), 0).is_err(), "{bad}");
        }
        assert_eq!(log_attempt(Path::new("/x/c/12.log")), Some(12));
        assert_eq!(log_attempt(Path::new("/x/c/0.log.20260101-000000")), None);
        assert_eq!(percent_decode("a%2Bb+c%zz%4"), "a+b c%zz%4");
    }

    #[test]
    fn container_log_query_is_decoded_like_the_streaming_endpoints() {
        // Keys and numbers were read undecoded here (only sinceTime was decoded), while exec
        // and port-forward decoded everything: one parser now.
        let o = log_options(&query("tail%4Cines=%33&follow=%74rue"), 0).unwrap();
        assert_eq!(o.tail_lines, Some(3));
        assert!(o.follow);
        // sinceTime is decoded once: an escaped `%` stays a `%` and is refused.
        assert_eq!(
            log_options(&query("sinceTime=1970-01-01T01:00:01%252B01:00"), 0),
            Err(LogQueryError::SinceTime(
                "1970-01-01T01:00:01%2B01:00".into()
            ))
        );
        assert_eq!(
            log_options(&query("tailLines=x"), 0).map_err(|e| e.to_string()),
            Err("tailLines: \"x\" is not an integer".to_string())
        );
    }

    #[test]
    fn client_certificate_subject() {
        let mut params = rcgen::CertificateParams::new(vec!["x".into()]).expect("params");
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "system:masters");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "kube-apiserver-kubelet-client");
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params.self_signed(&key).expect("cert");
        assert_eq!(
            subject_identity(cert.der()),
            Some((
                "kube-apiserver-kubelet-client".to_string(),
                vec!["system:masters".to_string()]
            ))
        );
        assert_eq!(subject_identity(b"\x30\x03\x02\x01"), None);
    }

    #[test]
    fn client_certificate_subject_cases() {
        // (organization, common name) → identity; no CN is no identity. (rcgen keeps one
        // value per attribute type, so several O are not made here.)
        type Case<'a> = (
            &'a [&'a str],
            &'a [&'a str],
            Option<(&'a str, &'a [&'a str])>,
        );
        let cases: [Case; 4] = [
            (&[], &["alice"], Some(("alice", &[]))),
            (&["g1"], &["bob"], Some(("bob", &["g1"]))),
            (&["system:nodes"], &[], None),
            (&["o"], &["système"], Some(("système", &["o"]))),
        ];
        for (orgs, cns, want) in cases {
            let mut params = rcgen::CertificateParams::new(vec!["x".into()]).expect("params");
            params.distinguished_name = rcgen::DistinguishedName::new();
            for o in orgs {
                params
                    .distinguished_name
                    .push(rcgen::DnType::OrganizationName, *o);
            }
            for c in cns {
                params
                    .distinguished_name
                    .push(rcgen::DnType::CommonName, *c);
            }
            let key = rcgen::KeyPair::generate().expect("key");
            let cert = params.self_signed(&key).expect("cert");
            let want =
                want.map(|(c, gs)| (c.to_string(), gs.iter().map(|g| (*g).to_string()).collect()));
            assert_eq!(subject_identity(cert.der()), want, "{orgs:?} {cns:?}");
        }
        // A truncated certificate is no identity (never a panic).
        let mut params = rcgen::CertificateParams::new(vec!["x".into()]).expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "c");
        let key = rcgen::KeyPair::generate().expect("key");
        let der = params.self_signed(&key).expect("cert").der().to_vec();
        for n in [0, 1, 10, der.len() / 2, der.len() - 1] {
            assert_eq!(subject_identity(&der[..n]), None, "{n}");
        }
    }

    #[test]
    fn resource_metrics_text() {
        let u = NodeUsage {
            cpu_seconds: 12.5,
            memory_working_set: 1024,
            timestamp_ms: 1000,
            ..Default::default()
        };
        let t = render_resource_metrics(&u, &[]);
        assert!(
            t.contains("node_cpu_usage_seconds_total 12.5 1000\n"),
            "{t}"
        );
        assert!(
            t.contains("node_memory_working_set_bytes 1024 1000\n"),
            "{t}"
        );
        let s = stats_summary("n1", &u, &[], &[], &[]);
        assert_eq!(s["node"]["cpu"]["usageCoreNanoSeconds"], 12_500_000_000u64);
        assert_eq!(s["node"]["nodeName"], "n1");
    }

    #[test]
    fn mirror_pods_use_the_static_uid() {
        let mut p = Pod::default();
        p.metadata.uid = Some("api-uid".into());
        assert_eq!(runtime_uid(&p).as_deref(), Some("api-uid"));
        p.metadata.annotations = Some(
            [(
                "kubernetes.io/config.mirror".to_string(),
                "static-uid".to_string(),
            )]
            .into(),
        );
        assert_eq!(runtime_uid(&p).as_deref(), Some("static-uid"));
    }

    #[test]
    fn subresources() {
        assert_eq!(subresource_for("/containerLogs/a/b/c"), "proxy");
        assert_eq!(subresource_for("/stats/summary"), "stats");
        assert_eq!(subresource_for("/metrics/resource"), "metrics");
        assert_eq!(subresource_for("/logs/"), "log");
        assert_eq!(subresource_for("/pods"), "proxy");
    }
}

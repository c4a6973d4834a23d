//! The local OCI registry fixture: Debian's `docker-registry` on 127.0.0.1 with a free port
//! and filesystem storage in a temp dir (process killed and dir removed on drop), a small
//! blocking client for the registry HTTP API (blob upload, manifests, catalog, tags), and
//! the push of the standard test images. Effectful.

use std::fs::File;
use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::images::{self, Blob, Image, ManifestForm, StandardImages};

/// Where Debian installs the registry.
pub const REGISTRY_BIN: &str = "/usr/bin/docker-registry";
/// Repository the standard images are pushed to.
pub const BUSYBOX_REPO: &str = "busybox";

/// Tags of the standard images in [`BUSYBOX_REPO`].
pub mod tags {
    /// OCI manifest of the busybox image (httpd entrypoint, user `app`).
    pub const OCI: &str = "oci";
    /// Docker v2 schema 2 manifest of the same image (same config and layer blobs).
    pub const DOCKER: &str = "docker";
    /// OCI image index with one linux/amd64 entry: the `oci` manifest.
    pub const LATEST: &str = "latest";
    /// Docker manifest list with one linux/amd64 entry: the `docker` manifest.
    pub const DOCKER_LIST: &str = "docker-list";
    /// OCI manifest, Cmd `sh`, root, no Entrypoint.
    pub const PLAIN: &str = "plain";
    /// OCI manifest, Cmd `sleep 3600`, root, no Entrypoint.
    pub const SLEEP: &str = "sleep";
}

/// Errors of the registry fixture and client.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The temp or storage dir could not be made.
    #[error("preparing registry dir {0}: {1}")]
    Dir(PathBuf, std::io::Error),
    /// No free port on 127.0.0.1.
    #[error("finding a free port on 127.0.0.1: {0}")]
    Port(std::io::Error),
    /// Spawning `docker-registry` failed.
    #[error("spawning {REGISTRY_BIN} (is docker-registry installed? run scripts/setup): {0}")]
    Spawn(std::io::Error),
    /// The registry exited or never answered `GET /v2/`.
    #[error("registry on {addr} did not become ready: {reason}; log {log}:\n{tail}")]
    NotReady {
        /// Address it was told to listen on.
        addr: String,
        /// What went wrong.
        reason: String,
        /// Its log file.
        log: PathBuf,
        /// The end of its log.
        tail: String,
    },
    /// An HTTP request failed or answered an unexpected status.
    #[error("{method} {url}: {reason}")]
    Http {
        /// Request method.
        method: String,
        /// Request URL.
        url: String,
        /// Status and body, or the transport error.
        reason: String,
    },
    /// The registry's answer does not match what was sent.
    #[error("{0}")]
    Mismatch(String),
    /// Building an image failed.
    #[error(transparent)]
    Image(#[from] images::ImageError),
}

/// Options of [`Registry::start_with`].
#[derive(Debug, Clone, Default)]
pub struct RegistryOptions {
    /// Port on 127.0.0.1; a free one when `None`.
    pub port: Option<u16>,
    /// Storage and log dir, kept after drop; a temp dir removed on drop when `None`.
    pub dir: Option<PathBuf>,
    /// Require HTTP basic auth (`auth: htpasswd`) with [`AUTH_USER`] / [`AUTH_PASSWORD`].
    /// [`Client`] does not authenticate: push into the storage dir first with auth off, then
    /// start again on the same dir with auth on.
    pub basic_auth: bool,
    /// Serve HTTPS (`http.tls`) with this certificate chain and key (PEM files). [`Client`]
    /// speaks plain HTTP: push into the storage dir first with TLS off, then start again on
    /// the same dir with TLS on, as for `basic_auth`.
    pub tls: Option<TlsFiles>,
}

/// The serving certificate and key of a registry started with [`RegistryOptions::tls`].
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// PEM certificate (chain), naming 127.0.0.1.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

/// User name of a registry started with [`RegistryOptions::basic_auth`].
pub const AUTH_USER: &str = "hako";
/// Its password.
pub const AUTH_PASSWORD: &str = "hako-pull-secret";
/// bcrypt (cost 4, so that the registry's per-request check is cheap) of [`AUTH_PASSWORD`],
/// the only hash format the registry's htpasswd accepts.
const AUTH_BCRYPT: &str = "$2b$04$RcpvO/MGrU1ebHdtxBOXIusbWQRxDbfPV3VlCLdWqCreyEwd.6IhC";

/// A running `docker-registry` on 127.0.0.1. Drop kills it and removes its temp dir.
#[derive(Debug)]
pub struct Registry {
    child: Child,
    addr: String,
    dir: PathBuf,
    _temp: Option<tempfile::TempDir>,
}

fn free_port() -> Result<u16, RegistryError> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(RegistryError::Port)?;
    Ok(l.local_addr().map_err(RegistryError::Port)?.port())
}

fn config_yaml(
    addr: &str,
    storage: &Path,
    htpasswd: Option<&Path>,
    tls: Option<&TlsFiles>,
) -> String {
    let auth = htpasswd
        .map(|p| {
            format!(
                "auth:\n  htpasswd:\n    realm: hako-test\n    path: {}\n",
                p.display()
            )
        })
        .unwrap_or_default();
    let tls = tls
        .map(|t| {
            format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                t.cert.display(),
                t.key.display()
            )
        })
        .unwrap_or_default();
    format!(
        "version: 0.1\n\
         log:\n  level: warn\n  accesslog:\n    disabled: true\n\
         storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
         http:\n  addr: {addr}\n{tls}{auth}",
        storage.display()
    )
}

fn tail(path: &Path, max: usize) -> String {
    let mut s = String::new();
    if let Ok(mut f) = File::open(path) {
        let _ = f.read_to_string(&mut s);
    }
    let start = s.len().saturating_sub(max);
    let start = (start..s.len())
        .find(|i| s.is_char_boundary(*i))
        .unwrap_or(s.len());
    s[start..].to_string()
}

impl Registry {
    /// Starts a registry on a free port with storage in a fresh temp dir and waits until
    /// `GET /v2/` answers.
    pub fn start() -> Result<Registry, RegistryError> {
        Self::start_with(RegistryOptions::default())
    }

    /// Starts a registry with [`RegistryOptions`]. When the port is chosen here and another
    /// process takes it first, a few other ports are tried.
    pub fn start_with(opts: RegistryOptions) -> Result<Registry, RegistryError> {
        let (temp, dir) = match &opts.dir {
            Some(d) => {
                std::fs::create_dir_all(d).map_err(|e| RegistryError::Dir(d.clone(), e))?;
                (None, d.clone())
            }
            None => {
                let t = tempfile::Builder::new()
                    .prefix("hako-registry-")
                    .tempdir()
                    .map_err(|e| RegistryError::Dir(std::env::temp_dir(), e))?;
                let p = t.path().to_path_buf();
                (Some(t), p)
            }
        };
        let attempts = if opts.port.is_some() { 1 } else { 5 };
        let mut temp = temp;
        let mut last = None;
        for _ in 0..attempts {
            let port = match opts.port {
                Some(p) => p,
                None => free_port()?,
            };
            match Self::spawn(&dir, port, opts.basic_auth, opts.tls.as_ref()) {
                Ok(child) => {
                    let mut reg = Registry {
                        child,
                        addr: format!("127.0.0.1:{port}"),
                        dir: dir.clone(),
                        _temp: temp.take(),
                    };
                    match reg.wait_ready(
                        Duration::from_secs(20),
                        opts.basic_auth,
                        opts.tls.is_some(),
                    ) {
                        Ok(()) => return Ok(reg),
                        Err(e) => {
                            // Keep the temp dir for the next attempt; drop kills the child.
                            temp = reg._temp.take();
                            last = Some(e);
                        }
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| RegistryError::Mismatch("no attempt made".into())))
    }

    fn spawn(
        dir: &Path,
        port: u16,
        basic_auth: bool,
        tls: Option<&TlsFiles>,
    ) -> Result<Child, RegistryError> {
        let addr = format!("127.0.0.1:{port}");
        let storage = dir.join("storage");
        std::fs::create_dir_all(&storage).map_err(|e| RegistryError::Dir(storage.clone(), e))?;
        let htpasswd = dir.join("htpasswd");
        if basic_auth {
            std::fs::write(&htpasswd, format!("{AUTH_USER}:{AUTH_BCRYPT}\n"))
                .map_err(|e| RegistryError::Dir(htpasswd.clone(), e))?;
        }
        let config = dir.join("config.yml");
        std::fs::write(
            &config,
            config_yaml(
                &addr,
                &storage,
                basic_auth.then_some(htpasswd.as_path()),
                tls,
            ),
        )
        .map_err(|e| RegistryError::Dir(config.clone(), e))?;
        let log_path = dir.join("registry.log");
        let log = File::create(&log_path).map_err(|e| RegistryError::Dir(log_path.clone(), e))?;
        let log2 = log
            .try_clone()
            .map_err(|e| RegistryError::Dir(log_path.clone(), e))?;
        let mut cmd = Command::new(REGISTRY_BIN);
        cmd.arg("serve").arg(&config);
        // Settings in the environment would override the config file.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("REGISTRY_") {
                cmd.env_remove(k);
            }
        }
        cmd.stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(RegistryError::Spawn)
    }

    fn wait_ready(
        &mut self,
        timeout: Duration,
        basic_auth: bool,
        tls: bool,
    ) -> Result<(), RegistryError> {
        let deadline = Instant::now() + timeout;
        let agent = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(2))
            .build();
        let url = format!("http://{}/v2/", self.addr);
        let mut reason = String::from("timed out");
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                reason = format!("exited with {status}");
                break;
            }
            match agent.get(&url).call() {
                // Go's TLS server answers a plain HTTP request with 400 "Client sent an HTTP
                // request to an HTTPS server": listening, and speaking TLS.
                Err(ureq::Error::Status(400, _)) if tls => return Ok(()),
                Ok(r) if tls => {
                    reason = format!("GET /v2/ over plain HTTP answered {}", r.status())
                }
                Ok(r) if r.status() == 200 && !basic_auth => return Ok(()),
                Ok(r) if r.status() == 200 => reason = "GET /v2/ answered 200 without auth".into(),
                Err(ureq::Error::Status(401, r))
                    if basic_auth
                        && r.header("WWW-Authenticate")
                            .is_some_and(|h| h.starts_with("Basic")) =>
                {
                    return Ok(())
                }
                Ok(r) => reason = format!("GET /v2/ answered {}", r.status()),
                Err(e) => reason = format!("GET /v2/: {e}"),
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(RegistryError::NotReady {
            addr: self.addr.clone(),
            reason,
            log: self.log_path(),
            tail: tail(&self.log_path(), 2000),
        })
    }

    /// `127.0.0.1:<port>`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// `<addr>/<name_tag>`, e.g. `reference("busybox:oci")`.
    pub fn reference(&self, name_tag: &str) -> String {
        format!("{}/{name_tag}", self.addr)
    }

    /// `<addr>/busybox:latest`.
    pub fn busybox(&self) -> String {
        self.reference("busybox:latest")
    }

    /// The dir holding config, storage and log.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The registry's log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("registry.log")
    }

    /// The end of the registry's log, for error messages.
    pub fn log_tail(&self) -> String {
        tail(&self.log_path(), 4000)
    }

    /// The registry process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status when the registry process has ended, `None` while it runs.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// A client for this registry.
    pub fn client(&self) -> Client {
        Client::new(&self.addr)
    }

    /// Starts a registry and pushes the standard images into it.
    pub fn with_standard_images() -> Result<(Registry, Pushed), RegistryError> {
        let reg = Registry::start()?;
        let pushed = push_standard(&reg.client())?;
        Ok((reg, pushed))
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A stall mode in front of a registry: an HTTP/1.1 proxy on 127.0.0.1 (in the network
/// namespace of the thread that starts it) that forwards every request to `upstream`, and
/// while stalling is on answers a blob `GET` of more than [`STALL_MIN_BLOB`] bytes with its
/// headers and the first half of the body, then sends nothing more (the connection stays
/// open) until the client gives up, stalling is turned off, or the proxy is dropped. Pulls
/// through [`StallProxy::reference`] see a registry that stalls mid-blob.
#[derive(Debug)]
pub struct StallProxy {
    addr: String,
    stall: std::sync::Arc<std::sync::atomic::AtomicBool>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    stalled: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    accept: Option<std::thread::JoinHandle<()>>,
}

/// Smallest blob [`StallProxy`] stalls (image configs are smaller, layers larger).
pub const STALL_MIN_BLOB: usize = 4096;

impl StallProxy {
    /// Listens on a free port of 127.0.0.1, forwarding to `upstream` (`host:port`), with
    /// stalling on.
    pub fn start(upstream: &str) -> Result<StallProxy, RegistryError> {
        use std::sync::atomic::{AtomicBool, AtomicUsize};
        use std::sync::Arc;
        let listener = TcpListener::bind("127.0.0.1:0").map_err(RegistryError::Port)?;
        listener
            .set_nonblocking(true)
            .map_err(RegistryError::Port)?;
        let addr = listener
            .local_addr()
            .map_err(RegistryError::Port)?
            .to_string();
        let stall = Arc::new(AtomicBool::new(true));
        let stop = Arc::new(AtomicBool::new(false));
        let stalled = Arc::new(AtomicUsize::new(0));
        let (st, sp, sd, up) = (
            stall.clone(),
            stop.clone(),
            stalled.clone(),
            upstream.to_string(),
        );
        // A thread spawned here shares this thread's network namespace, and so do its own.
        let accept = std::thread::spawn(move || {
            use std::sync::atomic::Ordering;
            while !sp.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let (st, sp, sd, up) = (st.clone(), sp.clone(), sd.clone(), up.clone());
                        std::thread::spawn(move || proxy_conn(conn, &up, &st, &sp, &sd));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Ok(StallProxy {
            addr,
            stall,
            stop,
            stalled,
            accept: Some(accept),
        })
    }

    /// `127.0.0.1:<port>` of the proxy.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// `<proxy addr>/<name_tag>`.
    pub fn reference(&self, name_tag: &str) -> String {
        format!("{}/{name_tag}", self.addr)
    }

    /// Turns stalling on or off (off also ends the stalls under way: their connections close).
    pub fn set_stall(&self, on: bool) {
        self.stall.store(on, std::sync::atomic::Ordering::SeqCst);
    }

    /// How many blob responses were stalled so far.
    pub fn stalled(&self) -> usize {
        self.stalled.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for StallProxy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
    }
}

/// Reads one request head (up to the blank line); None when the client closed or the proxy
/// stops.
fn read_head(
    conn: &mut std::net::TcpStream,
    stop: &std::sync::atomic::AtomicBool,
) -> Option<String> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stop.load(std::sync::atomic::Ordering::SeqCst) || head.len() > 64 << 10 {
            return None;
        }
        match conn.read(&mut b) {
            Ok(0) => return None,
            Ok(_) => head.push(b[0]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return None,
        }
    }
    Some(String::from_utf8_lossy(&head).into_owned())
}

fn proxy_conn(
    mut conn: std::net::TcpStream,
    upstream: &str,
    stall: &std::sync::atomic::AtomicBool,
    stop: &std::sync::atomic::AtomicBool,
    stalled: &std::sync::atomic::AtomicUsize,
) {
    use std::io::Write;
    use std::sync::atomic::Ordering;
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_millis(100)));
    let agent = ureq::AgentBuilder::new()
        .redirects(0)
        .timeout(Duration::from_secs(30))
        .build();
    while let Some(head) = read_head(&mut conn, stop) {
        let mut lines = head.lines();
        let mut first = lines.next().unwrap_or_default().split(' ');
        let (method, path) = (
            first.next().unwrap_or_default().to_string(),
            first.next().unwrap_or_default().to_string(),
        );
        let mut req = agent.request(&method, &format!("http://{upstream}{path}"));
        for l in lines {
            if let Some((k, v)) = l.split_once(':') {
                if ["accept", "authorization"].contains(&k.trim().to_ascii_lowercase().as_str()) {
                    req = req.set(k.trim(), v.trim());
                }
            }
        }
        let resp = match req.call() {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(_) => return,
        };
        let status = resp.status();
        let mut out = format!("HTTP/1.1 {status} {}\r\n", resp.status_text());
        let upstream_len = resp.header("Content-Length").map(str::to_string);
        for name in resp.headers_names() {
            let lower = name.to_ascii_lowercase();
            if ["content-length", "transfer-encoding", "connection"].contains(&lower.as_str()) {
                continue;
            }
            for v in resp.all(&name) {
                out.push_str(&format!("{name}: {v}\r\n"));
            }
        }
        let mut body = Vec::new();
        if method != "HEAD"
            && resp
                .into_reader()
                .take(1 << 30)
                .read_to_end(&mut body)
                .is_err()
        {
            return;
        }
        let len = if method == "HEAD" {
            upstream_len.unwrap_or_else(|| "0".into())
        } else {
            body.len().to_string()
        };
        out.push_str(&format!("Content-Length: {len}\r\n\r\n"));
        let stall_this = method == "GET"
            && path.contains("/blobs/")
            && body.len() > STALL_MIN_BLOB
            && stall.load(Ordering::SeqCst);
        if !stall_this {
            if conn.write_all(out.as_bytes()).is_err() || conn.write_all(&body).is_err() {
                return;
            }
            continue;
        }
        stalled.fetch_add(1, Ordering::SeqCst);
        let _ = conn.write_all(out.as_bytes());
        let _ = conn.write_all(&body[..body.len() / 2]);
        let _ = conn.flush();
        // Hold: nothing more until the client leaves, stalling ends or the proxy stops.
        let mut b = [0u8; 512];
        while stall.load(Ordering::SeqCst) && !stop.load(Ordering::SeqCst) {
            match conn.read(&mut b) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => return,
            }
        }
        return;
    }
}

/// A response body with its content type and `Docker-Content-Digest` header.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// `Content-Type`.
    pub content_type: String,
    /// `Docker-Content-Digest`, when sent.
    pub digest_header: Option<String>,
    /// The body.
    pub bytes: Vec<u8>,
}

/// A blocking client for the registry HTTP API v2 (no auth, plain HTTP).
#[derive(Debug, Clone)]
pub struct Client {
    base: String,
    agent: ureq::Agent,
}

fn http_err(method: &str, url: &str, e: ureq::Error) -> RegistryError {
    let reason = match e {
        ureq::Error::Status(code, r) => {
            let body = r.into_string().unwrap_or_default();
            format!("status {code}: {}", body.trim())
        }
        ureq::Error::Transport(t) => t.to_string(),
    };
    RegistryError::Http {
        method: method.into(),
        url: url.into(),
        reason,
    }
}

fn read_body(method: &str, url: &str, r: ureq::Response) -> Result<Fetched, RegistryError> {
    let content_type = r.header("Content-Type").unwrap_or_default().to_string();
    let digest_header = r.header("Docker-Content-Digest").map(str::to_string);
    let mut bytes = Vec::new();
    r.into_reader()
        .take(512 << 20)
        .read_to_end(&mut bytes)
        .map_err(|e| RegistryError::Http {
            method: method.into(),
            url: url.into(),
            reason: format!("reading body: {e}"),
        })?;
    Ok(Fetched {
        content_type,
        digest_header,
        bytes,
    })
}

/// Every manifest media type, for `Accept`.
pub const ACCEPT_ALL: &[&str] = &[
    images::OCI_INDEX,
    images::OCI_MANIFEST,
    images::DOCKER_MANIFEST_LIST,
    images::DOCKER_MANIFEST,
];

impl Client {
    /// A client for `host:port`.
    pub fn new(addr: &str) -> Self {
        Client {
            base: format!("http://{addr}"),
            agent: ureq::AgentBuilder::new()
                .timeout(Duration::from_secs(60))
                .build(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Whether the blob exists (`HEAD /v2/<repo>/blobs/<digest>`).
    pub fn blob_exists(&self, repo: &str, digest: &str) -> Result<bool, RegistryError> {
        let url = self.url(&format!("/v2/{repo}/blobs/{digest}"));
        match self.agent.head(&url).call() {
            Ok(_) => Ok(true),
            Err(ureq::Error::Status(404, _)) => Ok(false),
            Err(e) => Err(http_err("HEAD", &url, e)),
        }
    }

    /// Uploads a blob unless it exists: `POST /v2/<repo>/blobs/uploads/`, then a
    /// monolithic `PUT <location>&digest=<digest>`. Returns whether it was uploaded.
    pub fn push_blob(&self, repo: &str, blob: &Blob) -> Result<bool, RegistryError> {
        if self.blob_exists(repo, &blob.digest)? {
            return Ok(false);
        }
        let url = self.url(&format!("/v2/{repo}/blobs/uploads/"));
        let r = self
            .agent
            .post(&url)
            .send_bytes(&[])
            .map_err(|e| http_err("POST", &url, e))?;
        let loc = r.header("Location").ok_or_else(|| RegistryError::Http {
            method: "POST".into(),
            url: url.clone(),
            reason: format!("status {} without Location", r.status()),
        })?;
        let loc = if loc.starts_with("http://") || loc.starts_with("https://") {
            loc.to_string()
        } else {
            self.url(loc)
        };
        let sep = if loc.contains('?') { '&' } else { '?' };
        let put = format!("{loc}{sep}digest={}", blob.digest);
        self.agent
            .put(&put)
            .set("Content-Type", "application/octet-stream")
            .send_bytes(&blob.bytes)
            .map_err(|e| http_err("PUT", &put, e))?;
        Ok(true)
    }

    /// `PUT /v2/<repo>/manifests/<reference>` with the blob's media type; checks that the
    /// registry computed the same digest.
    pub fn put_manifest(
        &self,
        repo: &str,
        reference: &str,
        manifest: &Blob,
    ) -> Result<(), RegistryError> {
        let url = self.url(&format!("/v2/{repo}/manifests/{reference}"));
        let r = self
            .agent
            .put(&url)
            .set("Content-Type", &manifest.media_type)
            .send_bytes(&manifest.bytes)
            .map_err(|e| http_err("PUT", &url, e))?;
        match r.header("Docker-Content-Digest") {
            Some(d) if d != manifest.digest => Err(RegistryError::Mismatch(format!(
                "PUT {url}: registry says digest {d}, expected {}",
                manifest.digest
            ))),
            _ => Ok(()),
        }
    }

    /// `GET /v2/<repo>/manifests/<reference>` with the given `Accept` types.
    pub fn get_manifest(
        &self,
        repo: &str,
        reference: &str,
        accept: &[&str],
    ) -> Result<Fetched, RegistryError> {
        let url = self.url(&format!("/v2/{repo}/manifests/{reference}"));
        let r = self
            .agent
            .get(&url)
            .set("Accept", &accept.join(", "))
            .call()
            .map_err(|e| http_err("GET", &url, e))?;
        read_body("GET", &url, r)
    }

    /// `GET /v2/<repo>/blobs/<digest>`.
    pub fn get_blob(&self, repo: &str, digest: &str) -> Result<Vec<u8>, RegistryError> {
        let url = self.url(&format!("/v2/{repo}/blobs/{digest}"));
        let r = self
            .agent
            .get(&url)
            .call()
            .map_err(|e| http_err("GET", &url, e))?;
        Ok(read_body("GET", &url, r)?.bytes)
    }

    fn get_json(&self, path: &str) -> Result<serde_json::Value, RegistryError> {
        let url = self.url(path);
        let r = self
            .agent
            .get(&url)
            .call()
            .map_err(|e| http_err("GET", &url, e))?;
        let body = read_body("GET", &url, r)?;
        serde_json::from_slice(&body.bytes).map_err(|e| RegistryError::Http {
            method: "GET".into(),
            url,
            reason: format!("bad JSON: {e}"),
        })
    }

    fn string_list(v: &serde_json::Value, key: &str) -> Vec<String> {
        v[key]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Repositories from `GET /v2/_catalog`.
    pub fn catalog(&self) -> Result<Vec<String>, RegistryError> {
        let v = self.get_json("/v2/_catalog")?;
        Ok(Self::string_list(&v, "repositories"))
    }

    /// Tags from `GET /v2/<repo>/tags/list`.
    pub fn tags(&self, repo: &str) -> Result<Vec<String>, RegistryError> {
        let v = self.get_json(&format!("/v2/{repo}/tags/list"))?;
        Ok(Self::string_list(&v, "tags"))
    }

    /// Pushes an image's blobs and its manifest in `form` under `tag`; returns the
    /// manifest blob.
    pub fn push_image(
        &self,
        repo: &str,
        tag: &str,
        image: &Image,
        form: ManifestForm,
    ) -> Result<Blob, RegistryError> {
        for b in image.blobs(form) {
            self.push_blob(repo, &b)?;
        }
        let m = image.manifest(form);
        self.put_manifest(repo, tag, &m)?;
        Ok(m)
    }
}

/// Manifests of the standard images as pushed (see [`tags`]).
#[derive(Debug, Clone)]
pub struct Pushed {
    /// `busybox:oci`.
    pub oci: Blob,
    /// `busybox:docker`.
    pub docker: Blob,
    /// `busybox:latest` (OCI index over `oci`).
    pub latest: Blob,
    /// `busybox:docker-list` (Docker manifest list over `docker`).
    pub docker_list: Blob,
    /// `busybox:plain`.
    pub plain: Blob,
    /// `busybox:sleep`.
    pub sleep: Blob,
}

impl Pushed {
    /// `(tag, manifest)` pairs.
    pub fn by_tag(&self) -> Vec<(&'static str, &Blob)> {
        vec![
            (tags::OCI, &self.oci),
            (tags::DOCKER, &self.docker),
            (tags::LATEST, &self.latest),
            (tags::DOCKER_LIST, &self.docker_list),
            (tags::PLAIN, &self.plain),
            (tags::SLEEP, &self.sleep),
        ]
    }
}

/// Builds (once per process) and pushes the standard images to [`BUSYBOX_REPO`].
pub fn push_standard(client: &Client) -> Result<Pushed, RegistryError> {
    let s = StandardImages::get()?;
    let repo = BUSYBOX_REPO;
    let oci = client.push_image(repo, tags::OCI, &s.busybox, ManifestForm::Oci)?;
    let docker = client.push_image(repo, tags::DOCKER, &s.busybox, ManifestForm::Docker)?;
    let latest = images::index(ManifestForm::Oci, std::slice::from_ref(&oci));
    client.put_manifest(repo, tags::LATEST, &latest)?;
    let docker_list = images::index(ManifestForm::Docker, std::slice::from_ref(&docker));
    client.put_manifest(repo, tags::DOCKER_LIST, &docker_list)?;
    let plain = client.push_image(repo, tags::PLAIN, &s.plain, ManifestForm::Oci)?;
    let sleep = client.push_image(repo, tags::SLEEP, &s.sleep, ManifestForm::Oci)?;
    Ok(Pushed {
        oci,
        docker,
        latest,
        docker_list,
        plain,
        sleep,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_listens_on_loopback_with_filesystem_storage() {
        let y = config_yaml("127.0.0.1:5555", Path::new("/x/storage"), None, None);
        for want in [
            "addr: 127.0.0.1:5555",
            "rootdirectory: /x/storage",
            "accesslog:\n    disabled: true",
        ] {
            assert!(y.contains(want), "{want} missing in\n{y}");
        }
        assert!(!y.contains("auth"), "{y}");
        let y = config_yaml(
            "127.0.0.1:5555",
            Path::new("/x/storage"),
            Some(Path::new("/x/htpasswd")),
            None,
        );
        assert!(
            y.ends_with("auth:\n  htpasswd:\n    realm: hako-test\n    path: /x/htpasswd\n"),
            "{y}"
        );
        assert!(!y.contains("tls"), "{y}");
        let tls = TlsFiles {
            cert: "/x/cert.pem".into(),
            key: "/x/key.pem".into(),
        };
        let y = config_yaml("127.0.0.1:5555", Path::new("/x/storage"), None, Some(&tls));
        assert!(
            y.ends_with(
                "http:\n  addr: 127.0.0.1:5555\n  tls:\n    certificate: /x/cert.pem\n    key: /x/key.pem\n"
            ),
            "{y}"
        );
    }

    #[test]
    fn tail_keeps_the_end_on_char_boundaries() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("l");
        std::fs::write(&p, "ééééabc").unwrap();
        assert_eq!(tail(&p, 3), "abc");
        assert_eq!(tail(&p, 4), "abc");
        assert_eq!(tail(&p, 100), "ééééabc");
        assert_eq!(tail(&d.path().join("missing"), 10), "");
    }
}

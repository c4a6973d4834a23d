//! Registry host configuration in containerd's `certs.d` layout (`config_path`): for a registry
//! `HOST[:PORT]`, the file `<config_path>/HOST[:PORT]/hosts.toml` (or
//! `<config_path>/_default/hosts.toml`) names the upstream `server`, the mirrors
//! (`[host."URL"]`, tried in file order, then the upstream), their capabilities, private CAs,
//! client certificates and `skip_verify`; an `http://` URL is plain HTTP for that host.
//! Parsing and endpoint selection are pure; [`RegistryHosts::endpoints`] reads the files.

use serde::Deserialize;
use std::path::{Path, PathBuf};

/// Where the binaries that pull look by default (containerd's `/etc/containerd/certs.d`).
pub const DEFAULT_CONFIG_PATH: &str = "/etc/hako/certs.d";

/// The file name inside a host's directory.
pub const HOSTS_FILE: &str = "hosts.toml";

/// Errors of the registry host configuration, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum HostsError {
    /// The file exists but cannot be read.
    #[error("registry host config {0}: {1}")]
    Read(PathBuf, std::io::Error),
    /// The file is not valid TOML or has fields of the wrong type.
    #[error("registry host config {0}: {1}")]
    Parse(PathBuf, String),
    /// A `server` or `[host."…"]` key is not a usable URL.
    #[error("registry host config {file}: host {url:?}: {reason}")]
    BadHost {
        /// The hosts.toml.
        file: PathBuf,
        /// The URL as written.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A CA or client certificate file named in the config cannot be read.
    #[error("registry host config: {what} {path} for {host}: {err}")]
    Certificate {
        /// `ca` or `client certificate` / `client key`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The endpoint it is for.
        host: String,
        /// The read error.
        err: std::io::Error,
    },
}

/// What a host may be used for (containerd's `capabilities`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Capabilities {
    /// Fetch content by digest (blobs, manifests by digest).
    pub pull: bool,
    /// Resolve a tag to a digest.
    pub resolve: bool,
    /// Push (hako never pushes; parsed for completeness).
    pub push: bool,
}

impl Capabilities {
    /// `pull`, `resolve` and `push`: the default of a host without `capabilities`.
    pub const ALL: Capabilities = Capabilities {
        pull: true,
        resolve: true,
        push: true,
    };
}

/// URL scheme of an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// Plain HTTP.
    Http,
    /// HTTPS.
    Https,
}

/// One place to pull from: a mirror or the upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `http` or `https`.
    pub scheme: Scheme,
    /// `host[:port]` as the HTTP client addresses it.
    pub host: String,
    /// What it may be used for.
    pub capabilities: Capabilities,
    /// PEM CA bundles trusted for this endpoint (besides the system roots).
    pub ca: Vec<PathBuf>,
    /// Client certificate and key files (the key is `None` when the certificate file holds both).
    pub client: Vec<(PathBuf, Option<PathBuf>)>,
    /// Skip TLS verification for this endpoint.
    pub skip_verify: bool,
    /// True for the upstream (`server`, or the registry itself), false for a mirror.
    pub upstream: bool,
}

impl Endpoint {
    /// `scheme://host`, for messages.
    pub fn url(&self) -> String {
        let s = match self.scheme {
            Scheme::Http => "http",
            Scheme::Https => "https",
        };
        format!("{s}://{}", self.host)
    }

    /// Usable to resolve a reference: a tag needs `resolve`, a digest needs `pull`.
    pub fn can_fetch(&self, by_digest: bool) -> bool {
        if by_digest {
            self.capabilities.pull
        } else {
            self.capabilities.resolve
        }
    }
}

/// `"a.pem"` or `["a.pem", "b.pem"]`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// `"both.pem"`, `["both.pem", ["cert.pem", "key.pem"]]`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum ClientSpec {
    One(String),
    Many(Vec<ClientPair>),
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum ClientPair {
    Single(String),
    Pair(Vec<String>),
}

#[derive(Debug, Default, Deserialize)]
struct HostFields {
    capabilities: Option<Vec<String>>,
    ca: Option<OneOrMany>,
    client: Option<ClientSpec>,
    skip_verify: Option<bool>,
    override_path: Option<bool>,
    header: Option<toml::Table>,
}

#[derive(Debug, Default, Deserialize)]
struct HostsFile {
    server: Option<String>,
    #[serde(flatten)]
    upstream: HostFields,
    /// In file order (`preserve_order`): the order mirrors are tried in.
    #[serde(default)]
    host: toml::map::Map<String, toml::Value>,
}

/// The default upstream of a registry with no `server`: `registry-1.docker.io` for Docker Hub,
/// plain HTTP for loopback registries (as before any config existed), HTTPS otherwise.
pub fn default_upstream(registry: &str) -> Endpoint {
    let (scheme, host) = if registry == "docker.io" {
        (Scheme::Https, "registry-1.docker.io".to_string())
    } else if super::reference::is_loopback(registry) {
        (Scheme::Http, registry.to_string())
    } else {
        (Scheme::Https, registry.to_string())
    };
    Endpoint {
        scheme,
        host,
        capabilities: Capabilities::ALL,
        ca: Vec::new(),
        client: Vec::new(),
        skip_verify: false,
        upstream: true,
    }
}

fn resolve_path(dir: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        dir.join(p)
    }
}

fn parse_url(file: &Path, url: &str) -> Result<(Scheme, String), HostsError> {
    let bad = |reason: &str| HostsError::BadHost {
        file: file.to_path_buf(),
        url: url.to_string(),
        reason: reason.to_string(),
    };
    let (scheme, rest) = if let Some(r) = url.strip_prefix("https://") {
        (Scheme::Https, r)
    } else if let Some(r) = url.strip_prefix("http://") {
        (Scheme::Http, r)
    } else if url.contains("://") {
        return Err(bad("the scheme must be http or https"));
    } else {
        // containerd takes a bare host as https.
        (Scheme::Https, url)
    };
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    if host.is_empty()
        || host.contains(['@', '?', '#', ' '])
        || !host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-.:[]_".contains(c))
    {
        return Err(bad("not a host[:port]"));
    }
    // containerd appends /v2 to a host's path; only the plain API root is supported here.
    let path = path.trim_end_matches('/');
    if !(path.is_empty() || path == "/v2") {
        return Err(bad(
            "a path prefix other than /v2 is not supported (override_path)",
        ));
    }
    Ok((scheme, host.to_string()))
}

fn capabilities(file: &Path, url: &str, caps: &[String]) -> Result<Capabilities, HostsError> {
    let mut c = Capabilities::default();
    for cap in caps {
        match cap.as_str() {
            "pull" => c.pull = true,
            "resolve" => c.resolve = true,
            "push" => c.push = true,
            other => {
                return Err(HostsError::BadHost {
                    file: file.to_path_buf(),
                    url: url.to_string(),
                    reason: format!("unknown capability {other:?} (pull, resolve, push)"),
                })
            }
        }
    }
    Ok(c)
}

fn endpoint(
    file: &Path,
    dir: &Path,
    url: &str,
    f: HostFields,
    upstream: bool,
) -> Result<Endpoint, HostsError> {
    let (scheme, host) = parse_url(file, url)?;
    if f.override_path == Some(true) {
        return Err(HostsError::BadHost {
            file: file.to_path_buf(),
            url: url.to_string(),
            reason: "override_path is not supported".into(),
        });
    }
    if f.header.as_ref().is_some_and(|h| !h.is_empty()) {
        tracing::warn!(file = %file.display(), host = url, "registry host headers are ignored");
    }
    let capabilities = match &f.capabilities {
        Some(c) => capabilities(file, url, c)?,
        None => Capabilities::ALL,
    };
    let ca = match f.ca {
        None => Vec::new(),
        Some(OneOrMany::One(p)) => vec![resolve_path(dir, &p)],
        Some(OneOrMany::Many(v)) => v.iter().map(|p| resolve_path(dir, p)).collect(),
    };
    let bad_pair = || HostsError::BadHost {
        file: file.to_path_buf(),
        url: url.to_string(),
        reason: "client must be a file, or a list of files and [cert, key] pairs".into(),
    };
    let client = match f.client {
        None => Vec::new(),
        Some(ClientSpec::One(p)) => vec![(resolve_path(dir, &p), None)],
        Some(ClientSpec::Many(v)) => v
            .into_iter()
            .map(|c| match c {
                ClientPair::Single(p) => Ok((resolve_path(dir, &p), None)),
                ClientPair::Pair(p) if p.len() == 1 => Ok((resolve_path(dir, &p[0]), None)),
                ClientPair::Pair(p) if p.len() == 2 => {
                    Ok((resolve_path(dir, &p[0]), Some(resolve_path(dir, &p[1]))))
                }
                ClientPair::Pair(_) => Err(bad_pair()),
            })
            .collect::<Result<_, _>>()?,
    };
    Ok(Endpoint {
        scheme,
        host,
        capabilities,
        ca,
        client,
        skip_verify: f.skip_verify.unwrap_or(false),
        upstream,
    })
}

/// The endpoints of `registry` described by the text of its hosts.toml (`file`, whose
/// directory relative `ca`/`client` paths start from): every `[host."…"]` in file order, then
/// the upstream (`server`, or [`default_upstream`]) with the top-level settings.
pub fn parse_hosts(registry: &str, file: &Path, text: &str) -> Result<Vec<Endpoint>, HostsError> {
    let dir = file.parent().unwrap_or(Path::new("."));
    let parsed: HostsFile =
        toml::from_str(text).map_err(|e| HostsError::Parse(file.to_path_buf(), e.to_string()))?;
    let mut out = Vec::new();
    for (url, v) in parsed.host {
        let fields: HostFields = v
            .try_into()
            .map_err(|e: toml::de::Error| HostsError::Parse(file.to_path_buf(), e.to_string()))?;
        out.push(endpoint(file, dir, &url, fields, false)?);
    }
    let upstream = match &parsed.server {
        Some(server) => endpoint(file, dir, server, parsed.upstream, true)?,
        None => {
            let d = default_upstream(registry);
            let url = d.url();
            let mut e = endpoint(file, dir, &url, parsed.upstream, true)?;
            e.scheme = d.scheme;
            e
        }
    };
    out.push(upstream);
    Ok(out)
}

/// Registry host configuration rooted at a `config_path` directory (or none).
#[derive(Debug, Clone, Default)]
pub struct RegistryHosts {
    config_path: Option<PathBuf>,
}

impl RegistryHosts {
    /// No configuration: every registry is its own single upstream ([`default_upstream`]).
    pub fn none() -> Self {
        Self { config_path: None }
    }

    /// Configuration read from `dir` (a missing dir is the same as an empty one).
    pub fn at(dir: impl Into<PathBuf>) -> Self {
        Self {
            config_path: Some(dir.into()),
        }
    }

    /// The `config_path`, if any.
    pub fn config_path(&self) -> Option<&Path> {
        self.config_path.as_deref()
    }

    /// The hosts.toml that applies to `registry`: its own directory's, else `_default`'s.
    pub fn file_for(&self, registry: &str) -> Option<PathBuf> {
        let root = self.config_path.as_ref()?;
        // A registry name is host[:port]; anything that could leave the directory is not one.
        if registry.is_empty() || registry.contains('/') || registry.starts_with('.') {
            return None;
        }
        [registry, "_default"]
            .iter()
            .map(|d| root.join(d).join(HOSTS_FILE))
            .find(|p| p.is_file())
    }

    /// The endpoints to try for `registry`, in order. Read on every call, so that edits apply
    /// to the next pull without a restart (containerd reads them per resolve, too).
    pub fn endpoints(&self, registry: &str) -> Result<Vec<Endpoint>, HostsError> {
        let Some(file) = self.file_for(registry) else {
            return Ok(vec![default_upstream(registry)]);
        };
        let text = std::fs::read_to_string(&file).map_err(|e| HostsError::Read(file.clone(), e))?;
        parse_hosts(registry, &file, &text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(registry: &str, text: &str) -> Result<Vec<Endpoint>, HostsError> {
        parse_hosts(
            registry,
            Path::new("/etc/hako/certs.d/r.example/hosts.toml"),
            text,
        )
    }

    #[test]
    fn mirrors_in_file_order_then_the_upstream() {
        let e = parse(
            "docker.io",
            r#"
server = "https://registry-1.docker.io"
[host."https://z-mirror.example"]
  capabilities = ["pull", "resolve"]
  ca = "ca.pem"
[host."http://a-mirror.example:5000"]
  capabilities = ["pull"]
  skip_verify = true
"#,
        )
        .unwrap();
        let urls: Vec<String> = e.iter().map(Endpoint::url).collect();
        assert_eq!(
            urls,
            [
                "https://z-mirror.example",
                "http://a-mirror.example:5000",
                "https://registry-1.docker.io"
            ]
        );
        assert_eq!(
            e[0].ca,
            vec![PathBuf::from("/etc/hako/certs.d/r.example/ca.pem")]
        );
        assert!(e[0].can_fetch(false) && e[0].can_fetch(true));
        assert!(!e[1].can_fetch(false) && e[1].can_fetch(true));
        assert!(e[1].skip_verify && !e[1].upstream);
        assert!(e[2].upstream && e[2].capabilities == Capabilities::ALL);
    }

    #[test]
    fn top_level_settings_belong_to_the_upstream() {
        let e = parse(
            "r.example:443",
            r#"
ca = ["/a.pem", "b.pem"]
skip_verify = true
client = [["/c.pem", "/k.pem"], "/both.pem"]
"#,
        )
        .unwrap();
        assert_eq!(e.len(), 1);
        let u = &e[0];
        assert_eq!(u.url(), "https://r.example:443");
        assert!(u.skip_verify && u.upstream);
        assert_eq!(
            u.ca,
            vec![
                PathBuf::from("/a.pem"),
                PathBuf::from("/etc/hako/certs.d/r.example/b.pem")
            ]
        );
        assert_eq!(
            u.client,
            vec![
                (PathBuf::from("/c.pem"), Some(PathBuf::from("/k.pem"))),
                (PathBuf::from("/both.pem"), None)
            ]
        );
    }

    #[test]
    fn plain_http_for_a_named_registry() {
        let e = parse("r.example", r#"server = "http://r.example""#).unwrap();
        assert_eq!(e[0].scheme, Scheme::Http);
        // No server: loopback stays plain HTTP, others HTTPS, Docker Hub its API host.
        assert_eq!(parse("127.0.0.1:5000", "").unwrap()[0].scheme, Scheme::Http);
        assert_eq!(parse("r.example", "").unwrap()[0].scheme, Scheme::Https);
        assert_eq!(
            parse("docker.io", "").unwrap()[0].url(),
            "https://registry-1.docker.io"
        );
        // /v2 is the API root containerd appends anyway.
        let e = parse("r.example", r#"[host."https://m.example/v2"]"#).unwrap();
        assert_eq!(e[0].host, "m.example");
    }

    #[test]
    fn bad_files_are_refused_with_the_reason() {
        for (text, want) in [
            ("server = ", "hosts.toml"),
            (r#"server = "ftp://x""#, "http or https"),
            (r#"[host."https://m/prefix"]"#, "path prefix"),
            (
                "[host.\"https://m\"]\ncapabilities = [\"fly\"]",
                "unknown capability",
            ),
            ("[host.\"https://m\"]\nskip_verify = \"yes\"", "hosts.toml"),
            (
                "[host.\"https://m\"]\nclient = [[\"a\", \"b\", \"c\"]]",
                "client",
            ),
            (
                "[host.\"https://m\"]\noverride_path = true",
                "override_path",
            ),
            (r#"server = "https://a b""#, "host[:port]"),
        ] {
            let err = parse("r.example", text).unwrap_err().to_string();
            assert!(err.contains(want), "{text:?}: {err}");
        }
    }

    #[test]
    fn files_are_found_per_host_then_default() {
        let d = tempfile::tempdir().unwrap();
        let hosts = RegistryHosts::at(d.path());
        assert_eq!(
            hosts.endpoints("r.example").unwrap(),
            vec![default_upstream("r.example")]
        );
        std::fs::create_dir_all(d.path().join("_default")).unwrap();
        std::fs::write(
            d.path().join("_default/hosts.toml"),
            "[host.\"https://all.example\"]\n",
        )
        .unwrap();
        std::fs::create_dir_all(d.path().join("r.example:5000")).unwrap();
        std::fs::write(
            d.path().join("r.example:5000/hosts.toml"),
            "server = \"http://r.example:5000\"\n",
        )
        .unwrap();
        let own = hosts.endpoints("r.example:5000").unwrap();
        assert_eq!(own.len(), 1);
        assert_eq!(own[0].url(), "http://r.example:5000");
        let dflt = hosts.endpoints("other.example").unwrap();
        assert_eq!(dflt[0].url(), "https://all.example");
        assert_eq!(dflt[1].url(), "https://other.example");
        assert!(hosts.file_for("../etc").is_none());
        assert_eq!(
            RegistryHosts::none().endpoints("r.example").unwrap(),
            vec![default_upstream("r.example")]
        );
    }
}

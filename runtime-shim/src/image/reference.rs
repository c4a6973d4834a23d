//! Image references normalised as Kubernetes/containerd do (`busybox` →
//! `docker.io/library/busybox:latest`), loopback detection, and registry credentials from a
//! docker config JSON (what imagePullSecrets carry). Pure.

use base64::Engine;
use serde::Deserialize;
use std::collections::HashMap;

/// Reference errors.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReferenceError {
    /// The reference cannot be parsed.
    #[error("invalid image reference {0:?}")]
    Invalid(String),
    /// The docker config JSON cannot be parsed.
    #[error("invalid docker config JSON: {0}")]
    DockerConfig(String),
}

/// A normalised reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// Registry host[:port] (`docker.io` for Docker Hub).
    pub registry: String,
    /// Repository path (`library/busybox`).
    pub repository: String,
    /// Tag (`latest` when neither tag nor digest is given).
    pub tag: Option<String>,
    /// `sha256:<hex>` when pinned.
    pub digest: Option<String>,
}

impl std::fmt::Display for ImageRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

/// Normalise `s` the way the kubelet/containerd do.
pub fn normalize(s: &str) -> Result<ImageRef, ReferenceError> {
    let bad = || ReferenceError::Invalid(s.to_string());
    if s.is_empty() || s.contains(char::is_whitespace) {
        return Err(bad());
    }
    let (rest, digest) = match s.split_once('@') {
        Some((r, d)) => {
            let hex = d.strip_prefix("sha256:").ok_or_else(bad)?;
            if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad());
            }
            (r, Some(d.to_string()))
        }
        None => (s, None),
    };
    let (first, remainder) = match rest.split_once('/') {
        Some((f, r)) if f.contains('.') || f.contains(':') || f == "localhost" => {
            (Some(f.to_string()), r.to_string())
        }
        _ => (None, rest.to_string()),
    };
    let registry = match first.as_deref() {
        None | Some("index.docker.io") | Some("registry-1.docker.io") => "docker.io".to_string(),
        Some(r) => r.to_string(),
    };
    let (repo, tag) = match remainder.rsplit_once(':') {
        Some((r, t)) if !t.contains('/') => (r.to_string(), Some(t.to_string())),
        _ => (remainder.clone(), None),
    };
    if repo.is_empty()
        || repo.starts_with('/')
        || repo.ends_with('/')
        || repo.contains("//")
        || repo.chars().any(|c| c.is_ascii_uppercase())
        || !repo
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-/".contains(c))
    {
        return Err(bad());
    }
    if let Some(t) = &tag {
        if t.is_empty()
            || t.len() > 128
            || !t
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        {
            return Err(bad());
        }
    }
    let repository = if registry == "docker.io" && !repo.contains('/') {
        format!("library/{repo}")
    } else {
        repo
    };
    let tag = match (&tag, &digest) {
        (None, None) => Some("latest".to_string()),
        _ => tag,
    };
    Ok(ImageRef {
        registry,
        repository,
        tag,
        digest,
    })
}

/// Is the registry on a loopback address (pulled over plain HTTP)?
pub fn is_loopback(registry: &str) -> bool {
    let host = if let Some(rest) = registry.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        registry.split(':').next().unwrap_or("")
    };
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .map(|ip| ip.is_loopback())
            .unwrap_or(false)
}

#[derive(Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: HashMap<String, AuthEntry>,
}

#[derive(Deserialize, Default)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

fn key_host(k: &str) -> String {
    let k = k
        .trim_start_matches("https://")
        .trim_start_matches("http://");
    let host = k.split('/').next().unwrap_or("");
    match host {
        "index.docker.io" | "registry-1.docker.io" => "docker.io".to_string(),
        h => h.to_string(),
    }
}

/// Credentials for `registry` from a docker config JSON (`.dockerconfigjson` or the older
/// `.dockercfg` map), `None` when it has none.
pub fn credentials(
    docker_config: &str,
    registry: &str,
) -> Result<Option<(String, String)>, ReferenceError> {
    let auths: HashMap<String, AuthEntry> =
        match serde_json::from_str::<DockerConfig>(docker_config) {
            Ok(c) if !c.auths.is_empty() => c.auths,
            _ => serde_json::from_str(docker_config)
                .map_err(|e| ReferenceError::DockerConfig(e.to_string()))?,
        };
    for (k, v) in auths {
        if key_host(&k) != registry {
            continue;
        }
        if let (Some(u), Some(p)) = (&v.username, &v.password) {
            return Ok(Some((u.clone(), p.clone())));
        }
        if let Some(a) = &v.auth {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(a.trim())
                .map_err(|e| ReferenceError::DockerConfig(format!("auth for {k}: {e}")))?;
            let text = String::from_utf8_lossy(&raw).into_owned();
            let (u, p) = text
                .split_once(':')
                .ok_or_else(|| ReferenceError::DockerConfig(format!("auth for {k}: no ':'")))?;
            return Ok(Some((u.to_string(), p.to_string())));
        }
    }
    Ok(None)
}

/// One docker config JSON (`{"auths": ...}`) with the entries of several `.dockerconfigjson` or
/// `.dockercfg` documents, in order: a registry named by more than one keeps the first
/// document's entry (a pod's imagePullSecrets order). Documents that do not parse are skipped;
/// `None` when no entry remains.
pub fn merge_docker_configs<'a>(configs: impl IntoIterator<Item = &'a str>) -> Option<String> {
    let mut merged = serde_json::Map::new();
    let mut hosts = std::collections::HashSet::new();
    for c in configs {
        let Ok(serde_json::Value::Object(mut top)) = serde_json::from_str(c) else {
            continue;
        };
        let entries = match top.remove("auths") {
            Some(serde_json::Value::Object(a)) if !a.is_empty() => a,
            _ => top,
        };
        for (k, v) in entries {
            if v.is_object() && hosts.insert(key_host(&k)) {
                merged.insert(k, v);
            }
        }
    }
    (!merged.is_empty()).then(|| serde_json::json!({ "auths": merged }).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalisation_table() {
        let d = format!("sha256:{}", "a".repeat(64));
        for (input, want) in [
            ("busybox", "docker.io/library/busybox:latest".to_string()),
            ("busybox:1.36", "docker.io/library/busybox:1.36".into()),
            ("user/app", "docker.io/user/app:latest".into()),
            (
                "index.docker.io/library/x",
                "docker.io/library/x:latest".into(),
            ),
            (
                "127.0.0.1:5000/hako/busybox:v1",
                "127.0.0.1:5000/hako/busybox:v1".into(),
            ),
            ("localhost/a/b", "localhost/a/b:latest".into()),
            ("quay.io/a/b:t", "quay.io/a/b:t".into()),
            (
                &format!("busybox@{d}"),
                format!("docker.io/library/busybox@{d}"),
            ),
            (&format!("r.io/x:t@{d}"), format!("r.io/x:t@{d}")),
        ] {
            assert_eq!(normalize(input).unwrap().to_string(), want, "{input}");
        }
        for bad in ["", "Busybox", "a b", "x@sha256:12", "r.io/", "x:"] {
            assert!(normalize(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn loopback() {
        for (r, want) in [
            ("127.0.0.1:5000", true),
            ("localhost:5000", true),
            ("[::1]:5000", true),
            ("docker.io", false),
            ("10.0.0.1:5000", false),
        ] {
            assert_eq!(is_loopback(r), want, "{r}");
        }
    }

    #[test]
    fn docker_config() {
        let cfg = r#"{"auths":{"https://index.docker.io/v1/":{"auth":"dTpw"},"r.io":{"username":"a","password":"b"}}}"#;
        assert_eq!(
            credentials(cfg, "docker.io").unwrap(),
            Some(("u".into(), "p".into()))
        );
        assert_eq!(
            credentials(cfg, "r.io").unwrap(),
            Some(("a".into(), "b".into()))
        );
        assert_eq!(credentials(cfg, "q.io").unwrap(), None);
        let old = r#"{"q.io":{"auth":"eDp5"}}"#;
        assert_eq!(
            credentials(old, "q.io").unwrap(),
            Some(("x".into(), "y".into()))
        );
        assert!(credentials("nope", "q.io").is_err());
    }

    #[test]
    fn merged_docker_configs_first_wins() {
        let a = r#"{"auths":{"r.io":{"username":"a","password":"1"}}}"#;
        let legacy =
            r#"{"https://q.io/v1/":{"auth":"eDp5"},"r.io":{"username":"b","password":"2"}}"#;
        let m = merge_docker_configs(["not json", a, legacy]).unwrap();
        assert_eq!(
            credentials(&m, "r.io").unwrap(),
            Some(("a".into(), "1".into()))
        );
        assert_eq!(
            credentials(&m, "q.io").unwrap(),
            Some(("x".into(), "y".into()))
        );
        assert_eq!(merge_docker_configs(["{}", "[]"]), None);
    }
}

//! Reading Services and EndpointSlices from a directory of YAML files (multi-document;
//! `kind: List` accepted). Effectful (file reads) around a pure parser.

use std::path::Path;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::Deserialize;
use tracing::warn;

/// Objects read.
#[derive(Debug, Default, Clone)]
pub struct Objects {
    /// Services.
    pub services: Vec<Service>,
    /// EndpointSlices.
    pub slices: Vec<EndpointSlice>,
}

/// Config reading failures.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Directory unreadable.
    #[error("reading {path}: {source}")]
    Io {
        /// Path.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
}

fn push_value(v: serde_yaml::Value, origin: &str, out: &mut Objects) {
    let kind = v
        .get("kind")
        .and_then(|k| k.as_str())
        .unwrap_or_default()
        .to_string();
    match kind.as_str() {
        "List" | "ServiceList" | "EndpointSliceList" => {
            if let Some(items) = v.get("items").and_then(|i| i.as_sequence()) {
                for it in items.clone() {
                    push_value(it, origin, out);
                }
            }
        }
        "Service" => match serde_yaml::from_value::<Service>(v) {
            Ok(s) => out.services.push(s),
            Err(e) => warn!(file = origin, error = %e, "skipping bad Service"),
        },
        "EndpointSlice" => match serde_yaml::from_value::<EndpointSlice>(v) {
            Ok(s) => out.slices.push(s),
            Err(e) => warn!(file = origin, error = %e, "skipping bad EndpointSlice"),
        },
        "" => {}
        other => warn!(
            file = origin,
            kind = other,
            "ignoring object of unknown kind"
        ),
    }
}

/// Parses one YAML text (any number of documents).
pub fn parse(text: &str, origin: &str, out: &mut Objects) {
    for doc in serde_yaml::Deserializer::from_str(text) {
        match serde_yaml::Value::deserialize(doc) {
            Ok(v) => push_value(v, origin, out),
            Err(e) => warn!(file = origin, error = %e, "skipping unparsable YAML document"),
        }
    }
}

/// Reads every `*.yaml`/`*.yml`/`*.json` file of `dir`, sorted by name.
pub fn read_dir(dir: &Path) -> Result<Objects, ConfigError> {
    let io = |source| ConfigError::Io {
        path: dir.display().to_string(),
        source,
    };
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map_err(io)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml" | "json")
            )
        })
        .collect();
    files.sort();
    let mut out = Objects::default();
    for f in files {
        match std::fs::read_to_string(&f) {
            Ok(t) => parse(&t, &f.display().to_string(), &mut out),
            Err(e) => warn!(file = %f.display(), error = %e, "skipping unreadable file"),
        }
    }
    Ok(out)
}

/// A fingerprint of the directory (names, sizes, mtimes) to notice changes cheaply.
pub fn fingerprint(dir: &Path) -> Vec<(String, u64, Option<std::time::SystemTime>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|e| {
            let m = e.metadata().ok()?;
            Some((
                e.file_name().to_string_lossy().into_owned(),
                m.len(),
                m.modified().ok(),
            ))
        })
        .collect();
    v.sort();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_doc_and_lists() {
        let mut o = Objects::default();
        parse(
            "kind: Service\nmetadata: {name: a}\n---\nkind: List\nitems:\n- kind: EndpointSlice\n  metadata: {name: a-1}\n  addressType: IPv4\n  endpoints: []\n---\nkind: Pod\n",
            "t",
            &mut o,
        );
        assert_eq!(o.services.len(), 1);
        assert_eq!(o.slices.len(), 1);
    }
}

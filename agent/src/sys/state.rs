//! Pod records on disk under `<root>/pods/<uid>/status.json` (effectful: std::fs; atomic writes
//! through a temporary file and rename).

use crate::model::record::PodRecord;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Errors reading or writing pod records.
#[derive(Debug, Error)]
pub enum StateError {
    /// Listing `<root>/pods` failed.
    #[error("reading {0}: {1}")]
    ReadDir(PathBuf, std::io::Error),
    /// Reading a record failed.
    #[error("reading {0}: {1}")]
    Read(PathBuf, std::io::Error),
    /// A record is not valid JSON of the expected format.
    #[error("decoding {0}: {1}")]
    Decode(PathBuf, serde_json::Error),
    /// Writing a record failed.
    #[error("writing {0}: {1}")]
    Write(PathBuf, std::io::Error),
}

/// Path of a pod's record.
pub fn record_path(root: &Path, uid: &str) -> PathBuf {
    root.join("pods").join(uid).join("status.json")
}

/// Reads one pod's record: `None` when it has none (adoption reads one record per pod, not the
/// whole directory per pod).
pub fn read_record(root: &Path, uid: &str) -> Result<Option<PodRecord>, StateError> {
    let p = record_path(root, uid);
    match std::fs::read(&p) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StateError::Read(p, e)),
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| StateError::Decode(p, e)),
    }
}

/// Reads every record under `<root>/pods`; a missing directory means no pods. Unreadable
/// records are returned as errors beside the good ones.
pub fn read_records(root: &Path) -> Result<(Vec<PodRecord>, Vec<StateError>), StateError> {
    let dir = root.join("pods");
    let rd = match std::fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((vec![], vec![])),
        Err(e) => return Err(StateError::ReadDir(dir, e)),
    };
    let mut paths: Vec<PathBuf> = rd
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("status.json"))
        .filter(|p| p.is_file())
        .collect();
    paths.sort();
    let (mut ok, mut bad) = (vec![], vec![]);
    for p in paths {
        match std::fs::read(&p) {
            Err(e) => bad.push(StateError::Read(p, e)),
            Ok(b) => match serde_json::from_slice::<PodRecord>(&b) {
                Ok(r) => ok.push(r),
                Err(e) => bad.push(StateError::Decode(p, e)),
            },
        }
    }
    ok.sort_by(|a, b| (a.namespace(), a.name()).cmp(&(b.namespace(), b.name())));
    Ok((ok, bad))
}

/// Writes a record durably (`hako_shim::durable`: temporary file, fsync, rename).
pub fn write_record(root: &Path, rec: &PodRecord) -> Result<PathBuf, StateError> {
    let uid = rec.pod.metadata.uid.as_deref().unwrap_or("unknown");
    let path = record_path(root, uid);
    let body = serde_json::to_vec_pretty(rec).map_err(|e| StateError::Decode(path.clone(), e))?;
    hako_shim::durable::write_file(&path, &body, 0o644)
        .map_err(|e| StateError::Write(path.clone(), e))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Pod;

    #[test]
    fn write_then_read() {
        let dir = tempfile::tempdir().unwrap();
        assert!(read_records(dir.path()).unwrap().0.is_empty());
        let mut pod = Pod::default();
        pod.metadata.uid = Some("u1".into());
        pod.metadata.name = Some("a".into());
        write_record(dir.path(), &PodRecord::new(pod)).unwrap();
        std::fs::create_dir_all(dir.path().join("pods/u2")).unwrap();
        std::fs::write(dir.path().join("pods/u2/status.json"), "{").unwrap();
        let (ok, bad) = read_records(dir.path()).unwrap();
        assert_eq!(ok.len(), 1);
        assert_eq!(bad.len(), 1);
        assert!(bad[0].to_string().contains("pods/u2/status.json"));
        let one = read_record(dir.path(), "u1").unwrap().unwrap();
        assert_eq!(one.pod.metadata.name.as_deref(), Some("a"));
        assert!(read_record(dir.path(), "u3").unwrap().is_none());
        assert!(matches!(
            read_record(dir.path(), "u2"),
            Err(StateError::Decode(..))
        ));
    }
}

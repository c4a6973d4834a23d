//! Manifest directory source: reads `*.yaml`/`*.yml`/`*.json` files and polls them for changes
//! (effectful: std::fs; all parsing and diffing is in `manifest`).

use crate::source::manifest::{
    self, Loaded, ManifestError, Snapshot, SourceEvent, StaticPodOptions,
};
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Errors reading the manifest directory.
#[derive(Debug, Error)]
pub enum SourceError {
    /// The directory could not be listed.
    #[error("reading manifest directory {0}: {1}")]
    ReadDir(PathBuf, std::io::Error),
}

/// A manifest file's path and contents.
pub type ManifestFile = (String, String);

/// Reads the manifest files of `dir`, sorted by name; hidden files are ignored like the kubelet
/// does. Unreadable files come back as errors naming the file.
pub fn read_dir(dir: &Path) -> Result<(Vec<ManifestFile>, Vec<ManifestError>), SourceError> {
    let rd = std::fs::read_dir(dir).map_err(|e| SourceError::ReadDir(dir.to_path_buf(), e))?;
    let mut paths: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or(".");
            !name.starts_with('.')
                && p.is_file()
                && matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("yaml" | "yml" | "json")
                )
        })
        .collect();
    paths.sort();
    let mut files = Vec::new();
    let mut errors = Vec::new();
    for p in paths {
        let name = p.display().to_string();
        match std::fs::read_to_string(&p) {
            Ok(text) => files.push((name, text)),
            Err(e) => errors.push(ManifestError {
                file: name,
                doc: 0,
                object: None,
                kind: manifest::ManifestErrorKind::Syntax(format!("read: {e}")),
            }),
        }
    }
    Ok((files, errors))
}

/// Loads the directory once.
pub fn load_dir(dir: &Path, opts: &StaticPodOptions) -> Result<Loaded, SourceError> {
    let (files, mut read_errors) = read_dir(dir)?;
    let mut loaded = manifest::load(&files, opts);
    read_errors.append(&mut loaded.errors);
    loaded.errors = read_errors;
    Ok(loaded)
}

/// Polls a manifest directory and turns each change into events.
#[derive(Debug)]
pub struct DirSource {
    dir: PathBuf,
    opts: StaticPodOptions,
    last: Snapshot,
    last_errors: Vec<ManifestError>,
}

/// The result of one poll.
#[derive(Debug, Default)]
pub struct Poll {
    /// Changes since the previous poll.
    pub events: Vec<SourceEvent>,
    /// Errors that are new since the previous poll (so each is reported once).
    pub new_errors: Vec<ManifestError>,
}

impl DirSource {
    /// A source over `dir` that has seen nothing yet.
    pub fn new(dir: PathBuf, opts: StaticPodOptions) -> Self {
        Self {
            dir,
            opts,
            last: Snapshot::default(),
            last_errors: Vec::new(),
        }
    }

    /// The snapshot of the last successful poll.
    pub fn snapshot(&self) -> &Snapshot {
        &self.last
    }

    /// Reads the directory and returns what changed. A directory that cannot be read is an error
    /// and leaves the previous snapshot in place (pods are not deleted on a transient failure).
    pub fn poll(&mut self) -> Result<Poll, SourceError> {
        let loaded = load_dir(&self.dir, &self.opts)?;
        let events = manifest::diff(&self.last, &loaded.snapshot);
        let new_errors = loaded
            .errors
            .iter()
            .filter(|e| !self.last_errors.contains(e))
            .cloned()
            .collect();
        self.last = loaded.snapshot;
        self.last_errors = loaded.errors;
        Ok(Poll { events, new_errors })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POD: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nspec: {containers: [{name: c, image: busybox}]}\n";

    #[test]
    fn polls_add_update_delete_and_reports_errors_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut src = DirSource::new(dir.path().to_path_buf(), StaticPodOptions::default());
        assert!(src.poll().unwrap().events.is_empty());
        std::fs::write(dir.path().join("a.yaml"), POD).unwrap();
        std::fs::write(dir.path().join(".hidden.yaml"), "garbage: [").unwrap();
        std::fs::write(dir.path().join("notes.txt"), "garbage: [").unwrap();
        std::fs::write(dir.path().join("bad.yaml"), "garbage: [").unwrap();
        let p = src.poll().unwrap();
        assert!(matches!(p.events.as_slice(), [SourceEvent::PodAdded(_)]));
        assert_eq!(p.new_errors.len(), 1);
        assert!(p.new_errors[0].file.ends_with("bad.yaml"));
        let p = src.poll().unwrap();
        assert!(p.events.is_empty() && p.new_errors.is_empty());
        std::fs::write(
            dir.path().join("a.yaml"),
            POD.replace("busybox", "busybox:1"),
        )
        .unwrap();
        assert!(matches!(
            src.poll().unwrap().events.as_slice(),
            [SourceEvent::PodUpdated { .. }]
        ));
        std::fs::remove_file(dir.path().join("a.yaml")).unwrap();
        assert!(matches!(
            src.poll().unwrap().events.as_slice(),
            [SourceEvent::PodDeleted(_)]
        ));
    }

    #[test]
    fn missing_dir_is_an_error() {
        let mut src = DirSource::new("/nonexistent/hako".into(), StaticPodOptions::default());
        assert!(src
            .poll()
            .unwrap_err()
            .to_string()
            .contains("/nonexistent/hako"));
    }
}

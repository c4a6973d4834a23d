//! The kubelet's AtomicWriter scheme: a payload of files is written into a fresh timestamped
//! `..<ts>` directory, the `..data` symlink is pointed at it with an atomic rename, and the
//! user-visible entries are symlinks through `..data`. A reader that opened (or resolved) the old
//! paths keeps seeing a consistent old set; a new open sees the new set.

use super::VolumeError;
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Write;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Name of the symlink that points at the current timestamped data directory.
pub const DATA_DIR: &str = "..data";
const DATA_DIR_TMP: &str = "..data_tmp";

/// One file of a projection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileProjection {
    /// File contents.
    pub data: Vec<u8>,
    /// Permission bits (0..=0o777).
    pub mode: u32,
    /// Owner uid given to the file (the kubelet's `FsUser`: a projected token for the pod's
    /// user); None keeps the writer's.
    pub owner: Option<u32>,
}

/// Relative path → file.
pub type Payload = BTreeMap<String, FileProjection>;

/// Why a payload path (or a payload) is invalid; the Display text is the kubelet's message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// The path is empty.
    #[error("path must not be empty")]
    Empty,
    /// The path is longer than 4096 bytes.
    #[error("{0:?}: path must be less than or equal to 4096 characters")]
    TooLong(String),
    /// The path is absolute.
    #[error("{0:?}: must be a relative path")]
    Absolute(String),
    /// The path starts with `..`.
    #[error("{0:?}: must not start with '..'")]
    StartsWithDotDot(String),
    /// An element is longer than 255 bytes.
    #[error("{0:?}: path elements must be less than or equal to 255 characters")]
    ElementTooLong(String),
    /// An element is `..`.
    #[error("{0:?}: must not contain '..'")]
    ContainsDotDot(String),
    /// A file mode above 0777.
    #[error("{path:?}: mode {mode:#o} is out of range (0..0777)")]
    Mode {
        /// The path.
        path: String,
        /// The mode asked for.
        mode: u32,
    },
    /// The path names no file (`.` or `./`).
    #[error("{0:?}: path must name a file")]
    NoFile(String),
    /// One entry is a file and the directory of another (`a` and `a/b`).
    #[error("{dir:?} is both a file and a directory of {path:?}")]
    FileAndDirectory {
        /// The entry used as a directory.
        dir: String,
        /// The entry beneath it.
        path: String,
    },
}

/// Validates one payload path like the kubelet (`validatePath`): relative, not empty, no `..`
/// element, not starting with `..`, at most 4096 bytes with elements of at most 255.
pub fn validate_path(p: &str) -> Result<(), PathError> {
    if p.is_empty() {
        return Err(PathError::Empty);
    }
    if p.len() > 4096 {
        return Err(PathError::TooLong(p.to_string()));
    }
    if Path::new(p).is_absolute() {
        return Err(PathError::Absolute(p.to_string()));
    }
    if p.starts_with("..") {
        return Err(PathError::StartsWithDotDot(p.to_string()));
    }
    for c in Path::new(p).components() {
        match c {
            Component::Normal(s) if s.len() > 255 => {
                return Err(PathError::ElementTooLong(p.to_string()))
            }
            Component::ParentDir => return Err(PathError::ContainsDotDot(p.to_string())),
            _ => {}
        }
    }
    Ok(())
}

/// Normalizes `a//b/./c` to `a/b/c`.
fn clean(p: &str) -> String {
    Path::new(p)
        .components()
        .filter_map(|c| match c {
            Component::Normal(s) => s.to_str(),
            _ => None,
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// Validates and normalizes every path of a payload.
pub fn validate_payload(payload: &Payload) -> Result<Payload, PathError> {
    let mut out = Payload::new();
    for (p, f) in payload {
        validate_path(p)?;
        if f.mode > 0o777 {
            return Err(PathError::Mode {
                path: p.clone(),
                mode: f.mode,
            });
        }
        let c = clean(p);
        if c.is_empty() {
            return Err(PathError::NoFile(p.clone()));
        }
        out.insert(c, f.clone());
    }
    // A file may not also be a directory of another entry ("a" and "a/b").
    for p in out.keys() {
        let mut prefix = String::new();
        for seg in p.split('/').collect::<Vec<_>>().iter().rev().skip(1).rev() {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(seg);
            if out.contains_key(&prefix) {
                return Err(PathError::FileAndDirectory {
                    dir: prefix,
                    path: p.clone(),
                });
            }
        }
    }
    Ok(out)
}

/// The top-level names the user sees (first element of each path).
pub fn user_visible(payload: &Payload) -> BTreeSet<String> {
    payload
        .keys()
        .filter_map(|p| p.split('/').next().map(str::to_string))
        .collect()
}

static SEQ: AtomicU64 = AtomicU64::new(0);

/// A fresh timestamped directory name, `..2006_01_02_15_04_05.<unique>` like the kubelet.
pub fn ts_dir_name() -> String {
    let now = k8s_openapi::chrono::Utc::now();
    format!(
        "..{}.{}{}{}",
        now.format("%Y_%m_%d_%H_%M_%S"),
        now.timestamp_subsec_nanos(),
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

fn io(path: &Path, what: &str) -> impl FnOnce(std::io::Error) -> VolumeError {
    let path = path.to_path_buf();
    let what = what.to_string();
    move |e| VolumeError::Io {
        path,
        what,
        source: e,
    }
}

/// Reads the payload currently visible through `..data` (None when there is none yet).
fn current(dir: &Path) -> Option<(String, Payload)> {
    let target = fs::read_link(dir.join(DATA_DIR)).ok()?;
    let name = target.to_str()?.to_string();
    let base = dir.join(&name);
    let mut out = Payload::new();
    fn walk(base: &Path, rel: &str, out: &mut Payload) -> std::io::Result<()> {
        for e in fs::read_dir(base.join(rel))? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            let r = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let md = e.metadata()?;
            if md.is_dir() {
                walk(base, &r, out)?;
            } else {
                let data = fs::read(e.path())?;
                out.insert(
                    r,
                    FileProjection {
                        data,
                        mode: md.permissions().mode() & 0o777,
                        owner: Some(std::os::unix::fs::MetadataExt::uid(&md)),
                    },
                );
            }
        }
        Ok(())
    }
    walk(&base, "", &mut out).ok()?;
    Some((name, out))
}

/// Whether the files on disk (`cur`, read with their owners) are the payload: same paths,
/// contents and modes, and the owner where the payload asks for one.
fn same_payload(cur: &Payload, want: &Payload) -> bool {
    cur.len() == want.len()
        && want.iter().all(|(p, w)| {
            cur.get(p).is_some_and(|c| {
                c.data == w.data && c.mode == w.mode && w.owner.is_none_or(|u| c.owner == Some(u))
            })
        })
}

/// Writes `payload` into `dir` with the atomic scheme. Returns whether anything changed (an
/// identical payload with all user-visible links in place is a no-op).
pub fn write(dir: &Path, payload: &Payload) -> Result<bool, VolumeError> {
    write_with(dir, payload, &|| Ok(()))
}

/// [`write`], calling `set_perms` once the new files are written and before `..data` is
/// swapped to them (the kubelet's `setPerms` hook: fsGroup ownership is in place before any
/// reader can see the new files). Not called when nothing changed.
pub fn write_with(
    dir: &Path,
    payload: &Payload,
    set_perms: &dyn Fn() -> Result<(), VolumeError>,
) -> Result<bool, VolumeError> {
    let payload = validate_payload(payload)?;
    let visible = user_visible(&payload);
    let old = current(dir);
    let links_ok = visible
        .iter()
        .all(|v| fs::read_link(dir.join(v)).is_ok_and(|t| t == Path::new(DATA_DIR).join(v)));
    let stale: Vec<PathBuf> = existing_visible(dir)
        .into_iter()
        .filter(|n| !visible.contains(n))
        .map(|n| dir.join(n))
        .collect();
    if let Some((_, cur)) = &old {
        if same_payload(cur, &payload) && links_ok && stale.is_empty() {
            return Ok(false);
        }
    }
    // A user-visible name taken by something that is not our symlink: refuse before writing.
    for v in &visible {
        let link = dir.join(v);
        if fs::symlink_metadata(&link).is_ok() && fs::read_link(&link).is_err() {
            return Err(VolumeError::InvalidPath(format!(
                "{}: exists and is not a symlink",
                link.display()
            )));
        }
    }
    // 1. New timestamped directory with the files.
    let ts = ts_dir_name();
    let ts_path = dir.join(&ts);
    fs::create_dir(&ts_path).map_err(io(&ts_path, "creating data directory"))?;
    fs::set_permissions(&ts_path, fs::Permissions::from_mode(0o755))
        .map_err(io(&ts_path, "chmod"))?;
    let res = (|| {
        for (p, f) in &payload {
            let fp = ts_path.join(p);
            if let Some(parent) = fp.parent() {
                fs::create_dir_all(parent).map_err(io(parent, "creating directory"))?;
            }
            let mut file = fs::File::create(&fp).map_err(io(&fp, "creating file"))?;
            file.write_all(&f.data).map_err(io(&fp, "writing file"))?;
            fs::set_permissions(&fp, fs::Permissions::from_mode(f.mode))
                .map_err(io(&fp, "chmod"))?;
            if let Some(uid) = f.owner {
                std::os::unix::fs::chown(&fp, Some(uid), None).map_err(io(&fp, "chown"))?;
            }
        }
        set_perms()?;
        // 2. ..data_tmp -> ts, renamed over ..data (atomic).
        let tmp = dir.join(DATA_DIR_TMP);
        let _ = fs::remove_file(&tmp);
        symlink(&ts, &tmp).map_err(io(&tmp, "creating symlink"))?;
        fs::rename(&tmp, dir.join(DATA_DIR)).map_err(io(&tmp, "renaming symlink"))?;
        Ok(())
    })();
    if let Err(e) = res {
        let _ = fs::remove_dir_all(&ts_path);
        return Err(e);
    }
    // 3. User-visible links.
    for v in &visible {
        let link = dir.join(v);
        let want = Path::new(DATA_DIR).join(v);
        match fs::read_link(&link) {
            Ok(t) if t == want => continue,
            Ok(_) => fs::remove_file(&link).map_err(io(&link, "removing stale link"))?,
            Err(_) => {}
        }
        symlink(&want, &link).map_err(io(&link, "creating symlink"))?;
    }
    // 4. Entries no longer in the payload, then older data directories. The one just
    // replaced is kept until the next update: a reader that resolved `..data` an instant
    // before the swap still finds its files (removing it at once, as the kubelet does, lets
    // such a reader see ENOENT).
    for s in stale {
        fs::remove_file(&s).map_err(io(&s, "removing old entry"))?;
    }
    let keep = old.map(|(name, _)| name);
    for name in data_dirs(dir) {
        if name != ts && Some(&name) != keep.as_ref() {
            let p = dir.join(&name);
            fs::remove_dir_all(&p).map_err(io(&p, "removing old data directory"))?;
        }
    }
    Ok(true)
}

/// Timestamped data directories (`..<ts>`) in `dir`.
fn data_dirs(dir: &Path) -> Vec<String> {
    let Ok(rd) = fs::read_dir(dir) else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter(|n| n.starts_with("..") && n != DATA_DIR && n != DATA_DIR_TMP)
        .collect()
}

/// User-visible entries present in `dir` (symlinks into `..data`, not starting with `..`).
fn existing_visible(dir: &Path) -> Vec<String> {
    let Ok(rd) = fs::read_dir(dir) else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok())
        .filter_map(|e| {
            let n = e.file_name().to_str()?.to_string();
            if n.starts_with("..") {
                return None;
            }
            let t = fs::read_link(e.path()).ok()?;
            t.starts_with(DATA_DIR).then_some(n)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file with an owner is chowned, and a payload whose owner differs from the disk is
    /// written again (root only).
    #[test]
    fn owner_is_applied_and_compared() {
        use std::os::unix::fs::MetadataExt;
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let mut p = Payload::new();
        p.insert(
            "token".into(),
            FileProjection {
                data: b"t".to_vec(),
                mode: 0o600,
                owner: Some(4321),
            },
        );
        assert!(write(d.path(), &p).unwrap());
        let md = fs::metadata(d.path().join("token")).unwrap();
        assert_eq!((md.uid(), md.mode() & 0o777), (4321, 0o600));
        assert!(!write(d.path(), &p).unwrap(), "unchanged");
        p.get_mut("token").unwrap().owner = Some(4322);
        assert!(write(d.path(), &p).unwrap(), "a new owner is a change");
        assert_eq!(fs::metadata(d.path().join("token")).unwrap().uid(), 4322);
    }

    fn f(s: &str, mode: u32) -> FileProjection {
        FileProjection {
            data: s.as_bytes().to_vec(),
            mode,
            owner: None,
        }
    }

    #[test]
    fn path_validation() {
        for ok in ["a", "a/b", "a.b", ".a", "a/.b/c"] {
            assert!(validate_path(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "/a",
            "..",
            "../a",
            "a/../b",
            "..a",
            "a/..",
            &"x".repeat(256),
        ] {
            assert!(validate_path(bad).is_err(), "{bad}");
        }
        let mut p = Payload::new();
        p.insert("a".into(), f("1", 0o644));
        p.insert("a/b".into(), f("2", 0o644));
        assert!(validate_payload(&p)
            .unwrap_err()
            .to_string()
            .contains("both a file and a directory"));
        let mut p = Payload::new();
        p.insert("a".into(), f("1", 0o1777));
        assert!(validate_payload(&p).is_err());
    }

    #[test]
    fn writes_swaps_and_cleans() {
        let d = tempfile::tempdir().unwrap();
        let mut p = Payload::new();
        p.insert("k1".into(), f("v1", 0o644));
        p.insert("dir/k2".into(), f("v2", 0o400));
        assert!(write(d.path(), &p).unwrap());
        assert_eq!(fs::read_to_string(d.path().join("k1")).unwrap(), "v1");
        assert_eq!(fs::read_to_string(d.path().join("dir/k2")).unwrap(), "v2");
        assert_eq!(
            fs::read_link(d.path().join("k1")).unwrap(),
            Path::new("..data/k1")
        );
        let m = fs::metadata(d.path().join("dir/k2"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(m, 0o400);
        let first = fs::read_link(d.path().join(DATA_DIR)).unwrap();
        // Same payload: nothing changes.
        assert!(!write(d.path(), &p).unwrap());
        assert_eq!(fs::read_link(d.path().join(DATA_DIR)).unwrap(), first);
        // New payload: k1 changes, dir goes away, k3 appears; old ts dir removed.
        let mut p2 = Payload::new();
        p2.insert("k1".into(), f("v1b", 0o644));
        p2.insert("k3".into(), f("v3", 0o600));
        assert!(write(d.path(), &p2).unwrap());
        assert_eq!(fs::read_to_string(d.path().join("k1")).unwrap(), "v1b");
        assert!(fs::symlink_metadata(d.path().join("dir")).is_err());
        assert!(
            d.path().join(&first).exists(),
            "the previous version is kept once"
        );
        let second = fs::read_link(d.path().join(DATA_DIR)).unwrap();
        let names: BTreeSet<String> = fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        // ..data, two ..<ts>, k1, k3
        assert_eq!(names.len(), 5, "{names:?}");
        // A mode change alone is a change; the oldest version goes.
        p2.insert("k3".into(), f("v3", 0o644));
        assert!(write(d.path(), &p2).unwrap());
        assert!(!d.path().join(&first).exists());
        assert!(d.path().join(&second).exists());
    }

    #[test]
    fn refuses_to_replace_a_real_file() {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join("k"), "user").unwrap();
        let mut p = Payload::new();
        p.insert("k".into(), f("v", 0o644));
        assert!(write(d.path(), &p).is_err());
        assert_eq!(fs::read_to_string(d.path().join("k")).unwrap(), "user");
        assert!(fs::symlink_metadata(d.path().join(DATA_DIR)).is_err());
    }

    /// The Display of each variant is the message the kubelet's `validatePath` gives, and the
    /// one volume events carried before the error became typed.
    #[test]
    fn path_error_messages_are_unchanged() {
        let f = |d: &str, mode| FileProjection {
            data: d.as_bytes().to_vec(),
            mode,
            owner: None,
        };
        for (p, want) in [
            ("", "path must not be empty".to_string()),
            ("/etc/x", "\"/etc/x\": must be a relative path".into()),
            ("..x", "\"..x\": must not start with '..'".into()),
            ("a/../b", "\"a/../b\": must not contain '..'".into()),
            (
                &"a".repeat(256),
                format!(
                    "{:?}: path elements must be less than or equal to 255 characters",
                    "a".repeat(256)
                ),
            ),
        ] {
            assert_eq!(validate_path(p).unwrap_err().to_string(), want, "{p}");
        }
        let mut p = Payload::new();
        p.insert("a".into(), f("1", 0o1777));
        assert_eq!(
            validate_payload(&p).unwrap_err().to_string(),
            "\"a\": mode 0o1777 is out of range (0..0777)"
        );
        let mut p = Payload::new();
        p.insert("./".into(), f("1", 0o644));
        assert_eq!(
            validate_payload(&p).unwrap_err().to_string(),
            "\"./\": path must name a file"
        );
        let mut p = Payload::new();
        p.insert("a".into(), f("1", 0o644));
        p.insert("a/b".into(), f("2", 0o644));
        assert_eq!(
            validate_payload(&p).unwrap_err().to_string(),
            "\"a\" is both a file and a directory of \"a/b\""
        );
    }
}

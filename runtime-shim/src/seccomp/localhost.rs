//! Reading a Localhost profile (`localhostProfile: profiles/x.json`) from the node's profile
//! root, as the kubelet's `--seccomp-profile-root` does: the name is relative, has no `..`,
//! and is resolved with `openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)` on the root's fd,
//! so a symlink may not lead out of the root; the file must be a regular file of at most
//! [`MAX_PROFILE_BYTES`]. Effectful (one `openat2` wrapper).
#![allow(unsafe_code)]

use super::profile::{Profile, ProfileError, MAX_PROFILE_BYTES};
use super::LocalhostProfile;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

/// A Localhost profile that cannot be used; each message names the file.
#[derive(Debug, thiserror::Error)]
pub enum LocalhostError {
    /// The name is empty, absolute or has a `..` component.
    #[error("localhostProfile {0:?} must be a relative path without \"..\"")]
    BadName(String),
    /// The profile root cannot be opened.
    #[error("cannot open seccomp profile root {0:?}: {1}")]
    Root(PathBuf, std::io::Error),
    /// The file cannot be opened beneath the root (missing, or a symlink out of the root).
    #[error("cannot load seccomp profile {0:?}: {1}")]
    Open(PathBuf, nix::Error),
    /// A symlink on the way leads out of the root.
    #[error("cannot load seccomp profile {0:?}: a symlink leads out of the profile root")]
    Escapes(PathBuf),
    /// Not a regular file.
    #[error("cannot load seccomp profile {0:?}: not a regular file")]
    NotFile(PathBuf),
    /// Reading failed.
    #[error("cannot load seccomp profile {0:?}: {1}")]
    Read(PathBuf, std::io::Error),
    /// Larger than [`MAX_PROFILE_BYTES`].
    #[error("cannot load seccomp profile {0:?}: larger than {MAX_PROFILE_BYTES} bytes")]
    TooLarge(PathBuf),
    /// Not a valid profile.
    #[error("cannot load seccomp profile {0:?}: {1}")]
    Invalid(PathBuf, ProfileError),
}

/// Check a `localhostProfile` name: relative, no `..`, not empty. Pure.
pub fn check_name(name: &str) -> Result<&Path, LocalhostError> {
    let p = Path::new(name);
    let ok = !name.is_empty()
        && !name.contains('\0')
        && p.components().any(|c| matches!(c, Component::Normal(_)))
        && p.components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
    ok.then_some(p)
        .ok_or_else(|| LocalhostError::BadName(name.to_string()))
}

/// `openat2(dir, path, how)` as an owned fd.
fn openat2(dir: &File, path: &Path, how: OpenHow) -> nix::Result<OwnedFd> {
    let fd = nix::fcntl::openat2(dir.as_raw_fd(), path, how)?;
    // SAFETY: openat2 returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Read and parse `<root>/<name>`.
pub fn read(root: &Path, name: &str) -> Result<LocalhostProfile, LocalhostError> {
    let rel = check_name(name)?;
    let shown = root.join(rel);
    let dir = File::open(root).map_err(|e| LocalhostError::Root(root.to_path_buf(), e))?;
    let how = OpenHow::new()
        .flags(OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NOCTTY | OFlag::O_NONBLOCK)
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    let fd = openat2(&dir, rel, how).map_err(|e| match e {
        nix::Error::EXDEV => LocalhostError::Escapes(shown.clone()),
        e => LocalhostError::Open(shown.clone(), e),
    })?;
    let file = File::from(fd);
    let meta = file
        .metadata()
        .map_err(|e| LocalhostError::Read(shown.clone(), e))?;
    if !meta.is_file() {
        return Err(LocalhostError::NotFile(shown));
    }
    let mut data = Vec::new();
    file.take(MAX_PROFILE_BYTES + 1)
        .read_to_end(&mut data)
        .map_err(|e| LocalhostError::Read(shown.clone(), e))?;
    if data.len() as u64 > MAX_PROFILE_BYTES {
        return Err(LocalhostError::TooLarge(shown));
    }
    let profile = Profile::parse(&data).map_err(|e| LocalhostError::Invalid(shown.clone(), e))?;
    Ok(LocalhostProfile {
        path: shown.display().to_string(),
        profile,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn names() {
        for ok in ["p.json", "profiles/p.json", "./a/b.json"] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "/etc/p.json",
            "../p.json",
            "a/../../p.json",
            "a/..",
            ".",
        ] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn reads_beneath_the_root_only() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("seccomp");
        std::fs::create_dir_all(root.join("profiles")).unwrap();
        let doc = r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_ERRNO"}]}"#;
        std::fs::write(root.join("profiles/ok.json"), doc).unwrap();
        std::fs::write(t.path().join("outside.json"), doc).unwrap();
        symlink("ok.json", root.join("profiles/inner.json")).unwrap();
        symlink("../../outside.json", root.join("profiles/escape.json")).unwrap();
        symlink(
            t.path().join("outside.json"),
            root.join("profiles/abs.json"),
        )
        .unwrap();
        std::fs::write(root.join("profiles/bad.json"), "{\"defaultAction\": 1}").unwrap();
        std::fs::create_dir(root.join("profiles/dir.json")).unwrap();
        std::fs::write(
            root.join("profiles/big.json"),
            vec![b' '; usize::try_from(MAX_PROFILE_BYTES).unwrap() + 1],
        )
        .unwrap();

        let p = read(&root, "profiles/ok.json").unwrap();
        assert!(p.path.ends_with("seccomp/profiles/ok.json"), "{}", p.path);
        assert!(read(&root, "profiles/inner.json").is_ok());
        for (name, want) in [
            ("profiles/missing.json", "No such file"),
            ("profiles/escape.json", "leads out of the profile root"),
            ("profiles/abs.json", "leads out of the profile root"),
            ("../outside.json", "relative path"),
            ("profiles/bad.json", "invalid seccomp profile"),
            ("profiles/dir.json", "not a regular file"),
            ("profiles/big.json", "larger than"),
        ] {
            let e = read(&root, name).unwrap_err().to_string();
            assert!(e.contains(want), "{name}: {e}");
            if !name.starts_with("..") {
                assert!(e.contains(name), "{name}: {e}");
            }
        }
        let e = read(&t.path().join("nope"), "p.json")
            .unwrap_err()
            .to_string();
        assert!(e.contains("profile root"), "{e}");
    }
}

//! Unpacking of one image layer (gzip, zstd or plain tar) into its own directory in overlayfs
//! form: `.wh.<name>` whiteouts become 0/0 character devices and `.wh..wh..opq` marks its
//! directory opaque (`trusted.overlay.opaque=y`). Ownership, modes and xattrs are kept.
//! Effectful (needs root for devices and trusted xattrs).
#![allow(unsafe_code)]

use std::ffi::CString;
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

/// Layer unpack errors.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    /// Reading or writing the archive failed.
    #[error("unpack layer into {0}: {1}")]
    Io(PathBuf, io::Error),
    /// An entry path escapes the layer root.
    #[error("layer entry {0:?} escapes the layer root")]
    BadPath(String),
    /// The compression is not supported.
    #[error("unsupported layer compression ({0})")]
    Compression(&'static str),
}

/// Compression of a layer, from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Plain tar.
    None,
    /// gzip.
    Gzip,
    /// zstd.
    Zstd,
}

/// Detect compression from magic bytes. Pure.
pub fn detect(head: &[u8]) -> Compression {
    if head.starts_with(&[0x1f, 0x8b]) {
        Compression::Gzip
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Compression::Zstd
    } else {
        Compression::None
    }
}

/// What a tar entry name means for overlayfs. Pure.
#[derive(Debug, PartialEq, Eq)]
pub enum EntryKind {
    /// A regular entry at this relative path.
    Regular(PathBuf),
    /// Delete `path` from lower layers.
    Whiteout(PathBuf),
    /// Hide the lower contents of this directory.
    Opaque(PathBuf),
}

/// Classify an entry path (relative, `..` rejected).
pub fn classify(path: &Path) -> Result<EntryKind, LayerError> {
    let mut rel = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => rel.push(p),
            Component::CurDir | Component::RootDir => {}
            _ => return Err(LayerError::BadPath(path.display().to_string())),
        }
    }
    let name = rel
        .file_name()
        .map(|n| n.as_bytes().to_vec())
        .unwrap_or_default();
    let parent = rel.parent().map(Path::to_path_buf).unwrap_or_default();
    if name == b".wh..wh..opq" {
        Ok(EntryKind::Opaque(parent))
    } else if let Some(rest) = name.strip_prefix(b".wh.") {
        Ok(EntryKind::Whiteout(
            parent.join(std::ffi::OsStr::from_bytes(rest)),
        ))
    } else {
        Ok(EntryKind::Regular(rel))
    }
}

fn set_opaque(dir: &Path) -> io::Result<()> {
    let p = CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let name = c"trusted.overlay.opaque";
    // SAFETY: both strings are NUL-terminated and live across the call; the value pointer
    // and length describe a 1-byte static buffer.
    let r = unsafe { libc::lsetxattr(p.as_ptr(), name.as_ptr(), b"y".as_ptr().cast(), 1, 0) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Unpack a layer stream (compression detected) into `dest`, which must exist.
/// Returns the number of bytes of uncompressed tar read.
pub fn unpack(src: impl Read, dest: &Path) -> Result<(), LayerError> {
    let io_err = |e| LayerError::Io(dest.to_path_buf(), e);
    let mut br = BufReader::new(src);
    let head = br.fill_buf().map_err(io_err)?.to_vec();
    match detect(&head) {
        Compression::Gzip => unpack_tar(flate2::read::GzDecoder::new(br), dest),
        Compression::None => unpack_tar(br, dest),
        Compression::Zstd => match zstd::stream::read::Decoder::with_buffer(br) {
            Ok(d) => unpack_tar(d, dest),
            Err(_) => Err(LayerError::Compression("zstd")),
        },
    }
}

fn unpack_tar(src: impl Read, dest: &Path) -> Result<(), LayerError> {
    let io_err = |e| LayerError::Io(dest.to_path_buf(), e);
    let mut ar = tar::Archive::new(src);
    ar.set_preserve_permissions(true);
    ar.set_preserve_ownerships(true);
    ar.set_unpack_xattrs(true);
    ar.set_preserve_mtime(true);
    ar.set_overwrite(true);
    for entry in ar.entries().map_err(io_err)? {
        let mut entry = entry.map_err(io_err)?;
        let path = entry.path().map_err(io_err)?.into_owned();
        match classify(&path)? {
            EntryKind::Regular(_) => {
                entry.unpack_in(dest).map_err(io_err)?;
            }
            EntryKind::Opaque(dir) => {
                let d = dest.join(dir);
                std::fs::create_dir_all(&d).map_err(io_err)?;
                set_opaque(&d).map_err(io_err)?;
            }
            EntryKind::Whiteout(p) => {
                let target = dest.join(&p);
                if let Some(parent) = target.parent() {
                    std::fs::create_dir_all(parent).map_err(io_err)?;
                }
                let _ = std::fs::remove_file(&target);
                nix::sys::stat::mknod(
                    &target,
                    nix::sys::stat::SFlag::S_IFCHR,
                    nix::sys::stat::Mode::empty(),
                    0,
                )
                .map_err(|e| io_err(io::Error::from(e)))?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_table() {
        for (p, want) in [
            ("etc/passwd", EntryKind::Regular("etc/passwd".into())),
            ("./a/.wh.b", EntryKind::Whiteout("a/b".into())),
            ("a/.wh..wh..opq", EntryKind::Opaque("a".into())),
            ("/x", EntryKind::Regular("x".into())),
        ] {
            assert_eq!(classify(Path::new(p)).unwrap(), want, "{p}");
        }
        assert!(classify(Path::new("../etc")).is_err());
    }

    #[test]
    fn unpacks_every_compression() {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(2);
        h.set_mode(0o644);
        h.set_uid(nix::unistd::getuid().as_raw().into());
        h.set_gid(nix::unistd::getgid().as_raw().into());
        b.append_data(&mut h, "a/f", &b"hi"[..]).unwrap();
        let plain = b.into_inner().unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &plain).unwrap();
        let gz = gz.finish().unwrap();
        let zst = zstd::stream::encode_all(&plain[..], 1).unwrap();
        for data in [plain.clone(), gz, zst] {
            let d = tempfile::tempdir().unwrap();
            unpack(&data[..], d.path()).unwrap();
            assert_eq!(std::fs::read(d.path().join("a/f")).unwrap(), b"hi");
        }
    }

    #[test]
    fn magic() {
        assert_eq!(detect(&[0x1f, 0x8b, 8]), Compression::Gzip);
        assert_eq!(detect(&[0x28, 0xb5, 0x2f, 0xfd]), Compression::Zstd);
        assert_eq!(detect(b"etc/"), Compression::None);
    }
}

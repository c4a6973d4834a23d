//! hostPath type checks (the kubelet's `checkType`): `""` (none), `DirectoryOrCreate`,
//! `Directory`, `FileOrCreate`, `File`, `Socket`, `CharDevice`, `BlockDevice`.

use super::VolumeError;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;

/// Checks (and for the `OrCreate` types, creates) the host path. `DirectoryOrCreate` makes the
/// directory (and parents) with mode 0755; `FileOrCreate` makes an empty 0644 file but not its
/// parent directory, as in Kubernetes.
pub fn check(volume: &str, path: &Path, type_: &str) -> Result<(), VolumeError> {
    let fail = |message: String| VolumeError::HostPathType {
        volume: volume.to_string(),
        message,
    };
    let p = path.display();
    let md = std::fs::metadata(path);
    match type_ {
        "" => Ok(()),
        "DirectoryOrCreate" => match md {
            Ok(m) if m.is_dir() => Ok(()),
            Ok(_) => Err(fail(format!("path {p} exists but is not a directory"))),
            Err(_) => {
                std::fs::create_dir_all(path)
                    .map_err(|e| fail(format!("creating directory {p}: {e}")))?;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
                    .map_err(|e| fail(format!("chmod {p}: {e}")))
            }
        },
        "Directory" => match md {
            Ok(m) if m.is_dir() => Ok(()),
            Ok(_) => Err(fail(format!("{p} is not a directory"))),
            Err(_) => Err(fail(format!("directory {p} does not exist"))),
        },
        "FileOrCreate" => match md {
            Ok(m) if m.is_file() => Ok(()),
            Ok(_) => Err(fail(format!("path {p} exists but is not a file"))),
            Err(_) => {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(path)
                    .map_err(|e| fail(format!("creating file {p}: {e}")))?;
                f.set_permissions(std::fs::Permissions::from_mode(0o644))
                    .map_err(|e| fail(format!("chmod {p}: {e}")))
            }
        },
        "File" => match md {
            Ok(m) if m.is_file() => Ok(()),
            Ok(_) => Err(fail(format!("{p} is not a file"))),
            Err(_) => Err(fail(format!("file {p} does not exist"))),
        },
        "Socket" | "CharDevice" | "BlockDevice" => {
            let m = md.map_err(|_| fail(format!("{p} does not exist")))?;
            let ft = m.file_type();
            let ok = match type_ {
                "Socket" => ft.is_socket(),
                "CharDevice" => ft.is_char_device(),
                _ => ft.is_block_device(),
            };
            if ok {
                Ok(())
            } else {
                let what = match type_ {
                    "Socket" => "a socket file",
                    "CharDevice" => "a character device",
                    _ => "a block device",
                };
                Err(fail(format!("{p} is not {what}")))
            }
        }
        t => Err(fail(format!("invalid hostPath type {t:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("a/b");
        check("v", &dir, "DirectoryOrCreate").unwrap();
        assert!(dir.is_dir());
        assert_eq!(
            std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o755
        );
        check("v", &dir, "Directory").unwrap();
        let f = d.path().join("f");
        assert!(check("v", &f, "File").is_err());
        check("v", &f, "FileOrCreate").unwrap();
        assert!(f.is_file());
        check("v", &f, "File").unwrap();
        assert!(check("v", &f, "Directory")
            .unwrap_err()
            .to_string()
            .contains("is not a directory"));
        assert!(check("v", &dir, "FileOrCreate").is_err());
        assert!(
            check("v", &d.path().join("x/y"), "FileOrCreate").is_err(),
            "parent is not created"
        );
        check("v", Path::new("/dev/null"), "CharDevice").unwrap();
        assert!(check("v", Path::new("/dev/null"), "BlockDevice").is_err());
        assert!(check("v", &f, "Socket")
            .unwrap_err()
            .to_string()
            .contains("not a socket"));
        let sock = d.path().join("s");
        let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        check("v", &sock, "Socket").unwrap();
        check("v", &d.path().join("nothing"), "").unwrap();
        assert!(check("v", &f, "Weird").is_err());
    }
}

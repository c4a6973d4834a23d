#![cfg(feature = "root")]
// llistxattr/lgetxattr for the sentinel snapshots.
#![allow(unsafe_code)]
//! Root tests of hostile image layers: each image is built here (raw tar entries where the
//! layer builder would refuse them), pushed into the local registry fixture and pulled with
//! the image store. Layers that try to reach host files through their own symlinks,
//! whiteouts, opaque markers, hard links, `..` names or device nodes must fail the pull
//! with an error naming the entry, leave no image, layer or partial directory in the store,
//! and leave every host sentinel (files, a directory, a symlink made by the test in its own
//! temp dir, next to the store) byte- and metadata-identical with nothing new beside them.

use hako_shim::image::{Image, ImageError, ImageStore, PullPolicy};
use hako_tests::images::{self as img, LayerBuilder, ManifestForm, RawKind, RunConfig};
use hako_tests::registry::Registry;
use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

const REPO: &str = "hostile";

/// What is compared of every path under the sentinel dir.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Node {
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    ino: u64,
    nlink: u64,
    rdev: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    content: Vec<u8>,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Extended attributes of `p` itself (not following a symlink), sorted.
fn xattrs(p: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    let mut names = vec![0u8; 4096];
    // SAFETY: `c` is NUL-terminated and `names` is a live buffer of its length.
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    assert!(n >= 0, "llistxattr {}", p.display());
    names.truncate(usize::try_from(n).unwrap());
    let mut out = Vec::new();
    for name in names.split(|b| *b == 0).filter(|s| !s.is_empty()) {
        let k = CString::new(name).unwrap();
        let mut v = vec![0u8; 4096];
        // SAFETY: `c` and `k` are NUL-terminated, `v` is a live buffer of its length.
        let m = unsafe { libc::lgetxattr(c.as_ptr(), k.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
        assert!(m >= 0, "lgetxattr {}", p.display());
        v.truncate(usize::try_from(m).unwrap());
        out.push((name.to_vec(), v));
    }
    out.sort();
    out
}

/// Every path under `dir` (itself included) with its metadata, content and xattrs.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Node> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(p) = todo.pop() {
        let m = std::fs::symlink_metadata(&p).unwrap();
        let ft = m.file_type();
        let (kind, content) = if ft.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                todo.push(e.unwrap().path());
            }
            ("dir", Vec::new())
        } else if ft.is_symlink() {
            let t = std::fs::read_link(&p).unwrap();
            ("symlink", t.as_os_str().as_bytes().to_vec())
        } else if ft.is_file() {
            ("file", std::fs::read(&p).unwrap())
        } else if ft.is_char_device() {
            ("char", Vec::new())
        } else {
            ("other", Vec::new())
        };
        out.insert(
            p.clone(),
            Node {
                kind,
                mode: m.mode(),
                uid: m.uid(),
                gid: m.gid(),
                ino: m.ino(),
                nlink: m.nlink(),
                rdev: m.rdev(),
                mtime: (m.mtime(), m.mtime_nsec()),
                ctime: (m.ctime(), m.ctime_nsec()),
                content,
                xattrs: xattrs(&p),
            },
        );
    }
    out
}

/// A store, a registry and host sentinels, all removed on drop:
/// `<base>/images` is the store (a layer unpacks in `<base>/images/tmp/<random>`, so
/// `../../../host` from a layer root is the sentinel dir), `<base>/host` holds
/// `secret` (0600, an xattr), `dir/` with `secret` and `keep`, and `link` -> `<base>/host/dir`.
struct Scene {
    base: tempfile::TempDir,
    reg: Registry,
    store: ImageStore,
}

impl Scene {
    fn new() -> Scene {
        let base = tempfile::Builder::new()
            .prefix("hako-secimg-")
            .tempdir()
            .unwrap();
        let host = base.path().join("host");
        std::fs::create_dir_all(host.join("dir")).unwrap();
        std::fs::write(host.join("secret"), "top secret\n").unwrap();
        std::fs::set_permissions(host.join("secret"), std::fs::Permissions::from_mode(0o600))
            .unwrap();
        let c = CString::new(host.join("secret").as_os_str().as_bytes()).unwrap();
        // SAFETY: NUL-terminated strings and a 3-byte value that outlive the call.
        let r = unsafe {
            libc::lsetxattr(
                c.as_ptr(),
                c"user.hako".as_ptr(),
                b"yes".as_ptr().cast(),
                3,
                0,
            )
        };
        assert_eq!(r, 0, "user xattr on the sentinel");
        std::fs::write(host.join("dir/secret"), "dir secret\n").unwrap();
        std::fs::write(host.join("dir/keep"), "keep\n").unwrap();
        std::os::unix::fs::symlink(host.join("dir"), host.join("link")).unwrap();
        let reg = Registry::start().expect("registry");
        let store = ImageStore::open(base.path().join("images")).unwrap();
        Scene { base, reg, store }
    }

    fn host(&self) -> String {
        self.base.path().join("host").to_str().unwrap().to_string()
    }

    /// Everything outside the store: the sentinels and `<base>` itself.
    fn outside(&self) -> (BTreeMap<PathBuf, Node>, Vec<PathBuf>) {
        let mut top: Vec<PathBuf> = std::fs::read_dir(self.base.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        top.sort();
        (snapshot(&self.base.path().join("host")), top)
    }

    fn push(&self, tag: &str, layer: &LayerBuilder) -> String {
        let image = img::Image::new(RunConfig::default(), vec![layer.build().unwrap()]);
        self.reg
            .client()
            .push_image(REPO, tag, &image, ManifestForm::Oci)
            .unwrap();
        self.reg.reference(&format!("{REPO}:{tag}"))
    }

    /// Pull must fail naming `entry`; the store holds nothing and nothing outside changed.
    fn refused(&self, tag: &str, layer: LayerBuilder, entry: &str) {
        let r = self.push(tag, &layer);
        let before = self.outside();
        let e = self
            .store
            .ensure_blocking(&r, PullPolicy::Always, None)
            .expect_err(tag);
        let msg = e.to_string();
        assert!(matches!(e, ImageError::Layer(..)), "{tag}: {msg}");
        assert!(
            msg.contains(&format!("layer entry {entry:?}")),
            "{tag}: error does not name {entry:?}: {msg}"
        );
        let after = self.outside();
        assert_eq!(
            before.1, after.1,
            "{tag}: something new next to the sentinels"
        );
        for (p, n) in &before.0 {
            assert_eq!(
                after.0.get(p),
                Some(n),
                "{tag}: sentinel {} changed",
                p.display()
            );
        }
        assert_eq!(before.0, after.0, "{tag}: new files among the sentinels");
        self.assert_store_empty(tag);
    }

    fn assert_store_empty(&self, tag: &str) {
        let root = self.base.path().join("images");
        assert!(
            self.store.list().unwrap().is_empty(),
            "{tag}: image recorded"
        );
        for d in ["tmp", "layers"] {
            let left: Vec<_> = std::fs::read_dir(root.join(d)).unwrap().collect();
            assert!(left.is_empty(), "{tag}: {d} not empty: {left:?}");
        }
    }

    /// Pull must succeed without touching anything outside the store.
    fn pulled(&self, tag: &str, layer: LayerBuilder) -> (Image, PathBuf) {
        let r = self.push(tag, &layer);
        let before = self.outside();
        let image = self
            .store
            .ensure_blocking(&r, PullPolicy::Always, None)
            .expect(tag);
        assert_eq!(
            before,
            self.outside(),
            "{tag}: outside of the store changed"
        );
        let dir = self.store.layer_dirs(&image)[0].clone();
        (image, dir)
    }
}

fn layer() -> LayerBuilder {
    LayerBuilder::new("hako-tests: hostile layer")
}

fn symlink(target: &str) -> RawKind {
    RawKind::Symlink(target.to_string())
}

fn empty() -> RawKind {
    RawKind::File(Vec::new())
}

#[test]
fn symlink_then_whiteout_in_one_layer() {
    let s = Scene::new();
    let host = s.host();
    s.refused(
        "wh-existing",
        layer()
            .raw("x", symlink(&format!("{host}/dir")), 0o777)
            .raw("x/.wh.secret", empty(), 0o644),
        "x/.wh.secret",
    );
    // A whiteout deeper down would create the missing directories on the host.
    s.refused(
        "wh-deep",
        layer()
            .raw("x", symlink(&format!("{host}/dir")), 0o777)
            .raw("x/new/sub/.wh.f", empty(), 0o644),
        "x/new/sub/.wh.f",
    );
}

#[test]
fn opaque_marker_through_a_symlink() {
    let s = Scene::new();
    let host = s.host();
    // Would set trusted.overlay.opaque on the host directory.
    s.refused(
        "opq-existing",
        layer()
            .raw("y", symlink(&host), 0o777)
            .raw("y/dir/.wh..wh..opq", empty(), 0o644),
        "y/dir/.wh..wh..opq",
    );
    // Would create a host directory and mark it.
    s.refused(
        "opq-new",
        layer()
            .raw("x", symlink(&format!("{host}/dir")), 0o777)
            .raw("x/sub/.wh..wh..opq", empty(), 0o644),
        "x/sub/.wh..wh..opq",
    );
}

#[test]
fn hard_links_to_host_paths() {
    let s = Scene::new();
    let host = s.host();
    s.refused(
        "hl-abs",
        layer().raw("h", RawKind::Hardlink(format!("{host}/secret")), 0o644),
        "h",
    );
    s.refused(
        "hl-dotdot",
        layer().raw("h", RawKind::Hardlink("../../../host/secret".into()), 0o644),
        "h",
    );
    s.refused(
        "hl-via-symlink",
        layer().raw("x", symlink(&host), 0o777).raw(
            "h",
            RawKind::Hardlink("x/secret".into()),
            0o644,
        ),
        "h",
    );
    // The link itself named through a symlink to the host.
    s.refused(
        "hl-name-via-symlink",
        layer()
            .file("f", 0o644, "layer file\n")
            .raw("x", symlink(&format!("{host}/dir")), 0o777)
            .raw("x/h", RawKind::Hardlink("f".into()), 0o644),
        "x/h",
    );
}

#[test]
fn dotdot_entries() {
    let s = Scene::new();
    for (tag, name, kind) in [
        (
            "dd-file",
            "../../../host/pwned",
            RawKind::File(b"pwned".to_vec()),
        ),
        ("dd-dir", "a/../../../../host/newdir/", RawKind::Dir),
        ("dd-symlink", "../../../host/evil", symlink("/")),
        ("dd-whiteout", "../../../host/.wh.secret", empty()),
        ("dd-opaque", "../../../host/dir/.wh..wh..opq", empty()),
        ("dd-whiteout-dot", "a/.wh..", empty()),
    ] {
        s.refused(tag, layer().raw(name, kind, 0o644), name);
    }
}

#[test]
fn absolute_symlink_chains() {
    let s = Scene::new();
    let host = s.host();
    // Through the host's own symlink.
    s.refused(
        "chain-host-link",
        layer()
            .raw("a", symlink(&format!("{host}/link")), 0o777)
            .raw("a/.wh.secret", empty(), 0o644),
        "a/.wh.secret",
    );
    // a -> /b (inside the layer if it were the root) and b -> the host directory.
    s.refused(
        "chain-abs",
        layer()
            .raw("b", symlink(&format!("{host}/dir")), 0o777)
            .raw("a", symlink("/b"), 0o777)
            .raw("a/.wh.secret", empty(), 0o644),
        "a/.wh.secret",
    );
    // A relative link to an absolute one.
    s.refused(
        "chain-rel-abs",
        layer()
            .raw("b", symlink(&format!("{host}/dir")), 0o777)
            .raw("a", symlink("b"), 0o777)
            .raw("a/keep", RawKind::File(b"pwned".to_vec()), 0o644),
        "a/keep",
    );
}

#[test]
fn relative_symlink_escaping_with_dotdot() {
    let s = Scene::new();
    s.refused(
        "rel-up",
        layer()
            .raw("r", symlink("../../../host/dir"), 0o777)
            .raw("r/.wh.secret", empty(), 0o644),
        "r/.wh.secret",
    );
    s.refused(
        "rel-up-nested",
        layer()
            .raw("d/", RawKind::Dir, 0o755)
            .raw("d/r", symlink("../d/../../../../host"), 0o777)
            .raw("d/r/dir/.wh..wh..opq", empty(), 0o644),
        "d/r/dir/.wh..wh..opq",
    );
    s.refused(
        "rel-up-file",
        layer().raw("r", symlink("../../../host"), 0o777).raw(
            "r/new",
            RawKind::File(b"pwned".to_vec()),
            0o644,
        ),
        "r/new",
    );
}

#[test]
fn device_nodes() {
    let s = Scene::new();
    let host = s.host();
    s.refused(
        "dev-via-symlink",
        layer()
            .raw("x", symlink(&format!("{host}/dir")), 0o777)
            .raw("x/null", RawKind::Char(1, 3), 0o666),
        "x/null",
    );
    s.refused(
        "dev-dotdot",
        layer().raw("../../../host/disk", RawKind::Block(7, 0), 0o660),
        "../../../host/disk",
    );
    // A device node replacing the layer's own symlink to a host file is created in the
    // layer (as containerd does as root), never through the symlink.
    let (_, dir) = s.pulled(
        "dev-over-symlink",
        layer()
            .raw("s", symlink(&format!("{host}/secret")), 0o777)
            .raw("s", RawKind::Char(1, 3), 0o666)
            .raw("p", RawKind::Fifo, 0o640),
    );
    let m = std::fs::symlink_metadata(dir.join("s")).unwrap();
    assert!(m.file_type().is_char_device(), "{m:?}");
    assert_eq!((m.rdev(), m.mode() & 0o7777), (libc::makedev(1, 3), 0o666));
    let p = std::fs::symlink_metadata(dir.join("p")).unwrap();
    assert!(p.file_type().is_fifo());
}

#[test]
fn benign_layer_with_in_layer_symlinks_still_unpacks() {
    let s = Scene::new();
    let (_, dir) = s.pulled(
        "benign",
        layer()
            .dir("usr/lib", 0o755)
            .file("usr/lib/f", 0o640, "f\n")
            .symlink("lib", "usr/lib")
            .symlink("abs", "/usr/lib/f")
            .hardlink("usr/lib/g", "usr/lib/f")
            .raw("lib/.wh.old", empty(), 0o644)
            .raw("lib/opq/.wh..wh..opq", empty(), 0o644)
            .raw("lib/new", RawKind::File(b"via lib\n".to_vec()), 0o600),
    );
    let f = std::fs::metadata(dir.join("usr/lib/f")).unwrap();
    assert_eq!((f.nlink(), f.mode() & 0o7777), (2, 0o640));
    assert_eq!(
        std::fs::read_link(dir.join("abs")).unwrap(),
        Path::new("/usr/lib/f")
    );
    let wh = std::fs::symlink_metadata(dir.join("usr/lib/old")).unwrap();
    assert!(wh.file_type().is_char_device() && wh.rdev() == 0);
    let opq = xattrs(&dir.join("usr/lib/opq"));
    assert!(opq.contains(&(b"trusted.overlay.opaque".to_vec(), b"y".to_vec())));
    assert_eq!(
        std::fs::read(dir.join("usr/lib/new")).unwrap(),
        b"via lib\n"
    );
}

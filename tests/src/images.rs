//! Small container images built from busybox-static without network: deterministic layer
//! tars (sorted entries, fixed mtimes and owners, fixed gzip header, so digests are stable
//! across runs), image configs, OCI and Docker v2 manifests, OCI image indexes and Docker
//! manifest lists, and the standard test images. Pure, except for reading `/bin/busybox`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::OnceLock;

use flate2::{Compression, GzBuilder};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// OCI image manifest media type.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index media type.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image config media type.
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// OCI gzip layer media type.
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// Docker v2 schema 2 manifest media type.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker v2 manifest list media type.
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker image config media type.
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
/// Docker gzip layer media type.
pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

/// Modification time of every tar entry and of the config (2024-01-01T00:00:00Z).
pub const FIXED_MTIME: u64 = 1_704_067_200;
/// `created` of configs and history entries, matching [`FIXED_MTIME`].
pub const FIXED_CREATED: &str = "2024-01-01T00:00:00Z";
/// Where the busybox-static binary is read from.
pub const BUSYBOX_PATH: &str = "/bin/busybox";
/// `PATH` set in every standard image's config.
pub const DEFAULT_PATH_ENV: &str =
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Applets linked to `/bin/busybox` as symlinks in the standard base layer.
pub const APPLET_SYMLINKS: &[&str] = &[
    "sh",
    "ash",
    "sleep",
    "httpd",
    "nc",
    "wget",
    "cat",
    "echo",
    "ls",
    "id",
    "hostname",
    "env",
    "ps",
    "mkdir",
    "touch",
    "rm",
    "grep",
    "head",
    "tail",
    "printf",
    "test",
    "[",
    "kill",
    "ip",
    "ifconfig",
    "ping",
    "mount",
    "umount",
    "chmod",
    "chown",
    "cp",
    "mv",
    "ln",
    "stat",
    "date",
    "uname",
    "whoami",
    "pwd",
    "sed",
    "awk",
    "wc",
    "sort",
    "tr",
    "dd",
    "df",
    "du",
    "find",
    "xargs",
    "top",
    "free",
    "nslookup",
    "seq",
    "vi",
    "readlink",
    "realpath",
    "basename",
    "dirname",
    "sync",
    "tee",
    "yes",
    "expr",
    "md5sum",
    "sha256sum",
    "timeout",
    "usleep",
    "netstat",
    "route",
    "arp",
    "traceroute",
    "mkfifo",
    "nohup",
    "nproc",
];
/// Applets linked to `/bin/busybox` as hard links in the standard base layer.
pub const APPLET_HARDLINKS: &[&str] = &["true", "false"];

/// Errors while building images.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// Reading a host file that goes into a layer failed.
    #[error("reading {0}: {1} (is busybox-static installed? run scripts/setup)")]
    ReadHostFile(PathBuf, std::io::Error),
    /// Writing the tar or gzip stream failed.
    #[error("writing layer entry {0}: {1}")]
    Tar(String, std::io::Error),
    /// A path in a layer is empty, absolute after normalisation or contains `..`.
    #[error("invalid layer path {0:?}")]
    InvalidPath(String),
}

/// A content-addressed blob: bytes, their `sha256:` digest and media type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blob {
    /// Media type the blob is referenced with.
    pub media_type: String,
    /// `sha256:<hex>` of `bytes`.
    pub digest: String,
    /// The content.
    pub bytes: Vec<u8>,
}

impl Blob {
    /// Wraps bytes, computing their digest.
    pub fn new(media_type: &str, bytes: Vec<u8>) -> Self {
        Blob {
            media_type: media_type.to_string(),
            digest: sha256_digest(&bytes),
            bytes,
        }
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.bytes.len() as u64
    }

    /// An OCI/Docker descriptor (`mediaType`, `digest`, `size`) for this blob.
    pub fn descriptor(&self) -> Value {
        json!({"mediaType": self.media_type, "digest": self.digest, "size": self.size()})
    }

    /// The same bytes referenced under another media type.
    pub fn with_media_type(&self, media_type: &str) -> Blob {
        Blob {
            media_type: media_type.to_string(),
            ..self.clone()
        }
    }
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// A built layer: the gzip blob (OCI media type) and the digest of the uncompressed tar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    /// The compressed layer, media type [`OCI_LAYER_GZIP`].
    pub blob: Blob,
    /// `sha256:` of the uncompressed tar, as listed in the config's `rootfs.diff_ids`.
    pub diff_id: String,
    /// The uncompressed tar.
    pub tar: Vec<u8>,
    /// What the layer does, for the config's history.
    pub created_by: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    Dir,
    File(Vec<u8>),
    Symlink(String),
    Hardlink(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    kind: Kind,
    mode: u32,
    uid: u64,
    gid: u64,
}

/// What a [`LayerBuilder::raw`] entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawKind {
    /// A regular file with this content.
    File(Vec<u8>),
    /// A directory.
    Dir,
    /// A symlink with this target.
    Symlink(String),
    /// A hard link to this name.
    Hardlink(String),
    /// A character device (major, minor).
    Char(u32, u32),
    /// A block device (major, minor).
    Block(u32, u32),
    /// A named pipe.
    Fifo,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct RawEntry {
    name: String,
    kind: RawKind,
    mode: u32,
}

/// Longest name or link name a raw entry may have (the old tar header fields).
const RAW_NAME_MAX: usize = 100;

/// Builds one layer tar. Paths are relative to the image root (a leading `/` is dropped);
/// missing parent directories are added as `0755 root:root`; entries are written sorted by
/// path (parents first) with hard links last, then [`LayerBuilder::raw`] entries in the
/// order added, all with mtime [`FIXED_MTIME`].
#[derive(Debug, Clone, Default)]
pub struct LayerBuilder {
    entries: BTreeMap<String, Entry>,
    raw: Vec<RawEntry>,
    created_by: String,
}

fn normalize(path: &str) -> String {
    path.trim_matches('/').to_string()
}

impl LayerBuilder {
    /// An empty layer described as `created_by` in the image history.
    pub fn new(created_by: &str) -> Self {
        LayerBuilder {
            entries: BTreeMap::new(),
            raw: Vec::new(),
            created_by: created_by.to_string(),
        }
    }

    fn put(mut self, path: &str, kind: Kind, mode: u32, uid: u64, gid: u64) -> Self {
        self.entries.insert(
            normalize(path),
            Entry {
                kind,
                mode,
                uid,
                gid,
            },
        );
        self
    }

    /// A directory owned by root.
    pub fn dir(self, path: &str, mode: u32) -> Self {
        self.put(path, Kind::Dir, mode, 0, 0)
    }

    /// A directory with an owner.
    pub fn dir_owned(self, path: &str, mode: u32, uid: u64, gid: u64) -> Self {
        self.put(path, Kind::Dir, mode, uid, gid)
    }

    /// A regular file owned by root.
    pub fn file(self, path: &str, mode: u32, data: impl Into<Vec<u8>>) -> Self {
        self.put(path, Kind::File(data.into()), mode, 0, 0)
    }

    /// A regular file with an owner.
    pub fn file_owned(
        self,
        path: &str,
        mode: u32,
        uid: u64,
        gid: u64,
        data: impl Into<Vec<u8>>,
    ) -> Self {
        self.put(path, Kind::File(data.into()), mode, uid, gid)
    }

    /// A symbolic link at `path` pointing to `target` (kept verbatim).
    pub fn symlink(self, path: &str, target: &str) -> Self {
        self.put(path, Kind::Symlink(target.to_string()), 0o777, 0, 0)
    }

    /// A hard link at `path` to the earlier entry `target` (an image path).
    pub fn hardlink(self, path: &str, target: &str) -> Self {
        self.put(path, Kind::Hardlink(normalize(target)), 0o755, 0, 0)
    }

    /// A whiteout: deletes `path` of a lower layer (`<dir>/.wh.<name>`).
    pub fn whiteout(self, path: &str) -> Self {
        let p = normalize(path);
        let wh = match p.rsplit_once('/') {
            Some((dir, name)) => format!("{dir}/.wh.{name}"),
            None => format!(".wh.{p}"),
        };
        self.put(&wh, Kind::File(Vec::new()), 0o644, 0, 0)
    }

    /// Makes directory `dir` opaque: lower layers' contents are hidden
    /// (`<dir>/.wh..wh..opq`). The directory itself is added if missing.
    pub fn opaque(self, dir: &str, mode: u32) -> Self {
        let d = normalize(dir);
        let mut me = if self.entries.contains_key(&d) {
            self
        } else {
            self.dir(&d, mode)
        };
        me = me.put(
            &format!("{d}/.wh..wh..opq"),
            Kind::File(Vec::new()),
            0o644,
            0,
            0,
        );
        me
    }

    /// An entry written verbatim after all others, in the order added, owned by root: its
    /// name and link name go into the header unchanged (`..`, absolute names and any order
    /// allowed; at most 100 bytes each) and no parent directories are added. For hostile
    /// layers in tests.
    pub fn raw(mut self, name: &str, kind: RawKind, mode: u32) -> Self {
        self.raw.push(RawEntry {
            name: name.to_string(),
            kind,
            mode,
        });
        self
    }

    /// Entry paths in the order they are written to the tar.
    pub fn paths(&self) -> Vec<String> {
        self.ordered()
            .into_iter()
            .map(|(p, _)| p)
            .chain(self.raw.iter().map(|r| r.name.clone()))
            .collect()
    }

    fn append_raw(b: &mut tar::Builder<Vec<u8>>, r: &RawEntry) -> Result<(), ImageError> {
        let invalid = || ImageError::InvalidPath(r.name.clone());
        let mut h = tar::Header::new_gnu();
        h.set_mtime(FIXED_MTIME);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mode(r.mode);
        let (ty, data, link): (tar::EntryType, &[u8], Option<&str>) = match &r.kind {
            RawKind::File(d) => (tar::EntryType::Regular, d, None),
            RawKind::Dir => (tar::EntryType::Directory, &[], None),
            RawKind::Symlink(t) => (tar::EntryType::Symlink, &[], Some(t)),
            RawKind::Hardlink(t) => (tar::EntryType::Link, &[], Some(t)),
            RawKind::Char(..) => (tar::EntryType::Char, &[], None),
            RawKind::Block(..) => (tar::EntryType::Block, &[], None),
            RawKind::Fifo => (tar::EntryType::Fifo, &[], None),
        };
        h.set_entry_type(ty);
        h.set_size(data.len() as u64);
        if let RawKind::Char(major, minor) | RawKind::Block(major, minor) = r.kind {
            let err = |io| ImageError::Tar(r.name.clone(), io);
            h.set_device_major(major).map_err(err)?;
            h.set_device_minor(minor).map_err(err)?;
        }
        let old = h.as_old_mut();
        if r.name.is_empty() || r.name.len() > RAW_NAME_MAX {
            return Err(invalid());
        }
        old.name[..r.name.len()].copy_from_slice(r.name.as_bytes());
        if let Some(l) = link {
            if l.len() > RAW_NAME_MAX {
                return Err(invalid());
            }
            old.linkname[..l.len()].copy_from_slice(l.as_bytes());
        }
        h.set_cksum();
        b.append(&h, data)
            .map_err(|io| ImageError::Tar(r.name.clone(), io))
    }

    fn ordered(&self) -> Vec<(String, Entry)> {
        let mut all = self.entries.clone();
        for path in self.entries.keys() {
            let mut parent = path.as_str();
            while let Some((p, _)) = parent.rsplit_once('/') {
                all.entry(p.to_string()).or_insert(Entry {
                    kind: Kind::Dir,
                    mode: 0o755,
                    uid: 0,
                    gid: 0,
                });
                parent = p;
            }
        }
        let (links, rest): (Vec<_>, Vec<_>) = all
            .into_iter()
            .partition(|(_, e)| matches!(e.kind, Kind::Hardlink(_)));
        rest.into_iter().chain(links).collect()
    }

    /// The uncompressed tar.
    pub fn tar(&self) -> Result<Vec<u8>, ImageError> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, e) in self.ordered() {
            if path.is_empty() || path.split('/').any(|c| c == ".." || c.is_empty()) {
                return Err(ImageError::InvalidPath(path));
            }
            let mut h = tar::Header::new_gnu();
            h.set_mtime(FIXED_MTIME);
            h.set_uid(e.uid);
            h.set_gid(e.gid);
            h.set_mode(e.mode);
            let err = |io| ImageError::Tar(path.clone(), io);
            match &e.kind {
                Kind::Dir => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_size(0);
                    b.append_data(&mut h, format!("{path}/"), std::io::empty())
                        .map_err(err)?;
                }
                Kind::File(data) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_size(data.len() as u64);
                    b.append_data(&mut h, &path, data.as_slice()).map_err(err)?;
                }
                Kind::Symlink(target) => {
                    h.set_entry_type(tar::EntryType::Symlink);
                    h.set_size(0);
                    b.append_link(&mut h, &path, target).map_err(err)?;
                }
                Kind::Hardlink(target) => {
                    h.set_entry_type(tar::EntryType::Link);
                    h.set_size(0);
                    b.append_link(&mut h, &path, target).map_err(err)?;
                }
            }
        }
        for r in &self.raw {
            Self::append_raw(&mut b, r)?;
        }
        b.into_inner()
            .map_err(|io| ImageError::Tar("<end of archive>".into(), io))
    }

    /// Builds the tar and its gzip blob.
    pub fn build(&self) -> Result<Layer, ImageError> {
        let tar = self.tar()?;
        let gz = gzip(&tar).map_err(|io| ImageError::Tar("<gzip>".into(), io))?;
        Ok(Layer {
            diff_id: sha256_digest(&tar),
            blob: Blob::new(OCI_LAYER_GZIP, gz),
            tar,
            created_by: self.created_by.clone(),
        })
    }
}

/// Gzip with a fixed header (mtime 0, no name), so the output depends only on the input.
pub fn gzip(data: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut enc = GzBuilder::new()
        .mtime(0)
        .operating_system(3)
        .write(Vec::new(), Compression::fast());
    enc.write_all(data)?;
    enc.finish()
}

/// The runtime part of an image config (`config` in the OCI image config).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunConfig {
    /// `Entrypoint`.
    pub entrypoint: Option<Vec<String>>,
    /// `Cmd`.
    pub cmd: Option<Vec<String>>,
    /// `Env`, `KEY=value`.
    pub env: Vec<String>,
    /// `WorkingDir`.
    pub working_dir: Option<String>,
    /// `User` (`name`, `uid`, `uid:gid` ...).
    pub user: Option<String>,
    /// `Labels`.
    pub labels: BTreeMap<String, String>,
    /// `ExposedPorts` keys such as `8080/tcp`.
    pub exposed_ports: Vec<String>,
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

impl RunConfig {
    fn to_json(&self) -> Value {
        let mut c = serde_json::Map::new();
        if let Some(u) = &self.user {
            c.insert("User".into(), json!(u));
        }
        if !self.exposed_ports.is_empty() {
            let ports: serde_json::Map<String, Value> = self
                .exposed_ports
                .iter()
                .map(|p| (p.clone(), json!({})))
                .collect();
            c.insert("ExposedPorts".into(), Value::Object(ports));
        }
        if !self.env.is_empty() {
            c.insert("Env".into(), json!(self.env));
        }
        if let Some(e) = &self.entrypoint {
            c.insert("Entrypoint".into(), json!(e));
        }
        if let Some(cmd) = &self.cmd {
            c.insert("Cmd".into(), json!(cmd));
        }
        if let Some(w) = &self.working_dir {
            c.insert("WorkingDir".into(), json!(w));
        }
        if !self.labels.is_empty() {
            c.insert("Labels".into(), json!(self.labels));
        }
        Value::Object(c)
    }
}

/// A single-platform (linux/amd64) image: config blob and layers.
#[derive(Debug, Clone)]
pub struct Image {
    /// The config blob, media type [`OCI_CONFIG`].
    pub config: Blob,
    /// Layers, lowest first.
    pub layers: Vec<Layer>,
    /// The runtime config it was made from.
    pub run: RunConfig,
}

/// Which manifest form to produce or push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ManifestForm {
    /// `application/vnd.oci.image.manifest.v1+json`.
    Oci,
    /// `application/vnd.docker.distribution.manifest.v2+json`.
    Docker,
}

impl Image {
    /// Builds the config JSON (`architecture`, `os`, `config`, `rootfs.diff_ids`, `history`).
    pub fn new(run: RunConfig, layers: Vec<Layer>) -> Self {
        let diff_ids: Vec<&str> = layers.iter().map(|l| l.diff_id.as_str()).collect();
        let history: Vec<Value> = layers
            .iter()
            .map(|l| json!({"created": FIXED_CREATED, "created_by": l.created_by}))
            .collect();
        let config = json!({
            "created": FIXED_CREATED,
            "architecture": "amd64",
            "os": "linux",
            "config": run.to_json(),
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": history,
        });
        let bytes = serde_json::to_vec_pretty(&config).unwrap_or_default();
        Image {
            config: Blob::new(OCI_CONFIG, bytes),
            layers,
            run,
        }
    }

    /// Every blob the manifest references (config first), with media types of `form`.
    pub fn blobs(&self, form: ManifestForm) -> Vec<Blob> {
        let (cfg, layer) = match form {
            ManifestForm::Oci => (OCI_CONFIG, OCI_LAYER_GZIP),
            ManifestForm::Docker => (DOCKER_CONFIG, DOCKER_LAYER_GZIP),
        };
        std::iter::once(self.config.with_media_type(cfg))
            .chain(self.layers.iter().map(|l| l.blob.with_media_type(layer)))
            .collect()
    }

    /// The manifest in the given form, as the blob that is PUT (its digest is the image
    /// manifest digest).
    pub fn manifest(&self, form: ManifestForm) -> Blob {
        let blobs = self.blobs(form);
        let layers: Vec<Value> = blobs[1..].iter().map(Blob::descriptor).collect();
        let (mt, v) = match form {
            ManifestForm::Oci => (
                OCI_MANIFEST,
                json!({
                    "schemaVersion": 2,
                    "mediaType": OCI_MANIFEST,
                    "config": blobs[0].descriptor(),
                    "layers": layers,
                }),
            ),
            ManifestForm::Docker => (
                DOCKER_MANIFEST,
                json!({
                    "schemaVersion": 2,
                    "mediaType": DOCKER_MANIFEST,
                    "config": blobs[0].descriptor(),
                    "layers": layers,
                }),
            ),
        };
        Blob::new(mt, serde_json::to_vec_pretty(&v).unwrap_or_default())
    }
}

/// An index over linux/amd64 manifests: an OCI image index for [`ManifestForm::Oci`]
/// manifests, a Docker manifest list for [`ManifestForm::Docker`] ones.
pub fn index(form: ManifestForm, manifests: &[Blob]) -> Blob {
    let entries: Vec<Value> = manifests
        .iter()
        .map(|m| {
            let mut d = m.descriptor();
            d["platform"] = json!({"architecture": "amd64", "os": "linux"});
            d
        })
        .collect();
    let mt = match form {
        ManifestForm::Oci => OCI_INDEX,
        ManifestForm::Docker => DOCKER_MANIFEST_LIST,
    };
    let v = json!({"schemaVersion": 2, "mediaType": mt, "manifests": entries});
    Blob::new(mt, serde_json::to_vec_pretty(&v).unwrap_or_default())
}

/// `/etc/passwd` of the standard images: root, nobody and app (1000).
pub const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
app:x:1000:1000:app:/home/app:/bin/sh\n\
nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n";
/// `/etc/group` of the standard images.
pub const GROUP: &str = "root:x:0:\napp:x:1000:\nnogroup:x:65534:\n";

/// The standard base layer: busybox with its applet links, users, `/tmp` (1777) and files
/// with non-trivial modes and owners, plus files the second layer deletes or hides.
pub fn base_layer() -> Result<LayerBuilder, ImageError> {
    let busybox = std::fs::read(BUSYBOX_PATH)
        .map_err(|e| ImageError::ReadHostFile(PathBuf::from(BUSYBOX_PATH), e))?;
    let mut l = LayerBuilder::new("hako-tests: busybox-static, users and test files")
        .dir("bin", 0o755)
        .file("bin/busybox", 0o755, busybox);
    for a in APPLET_SYMLINKS {
        l = l.symlink(&format!("bin/{a}"), "busybox");
    }
    for a in APPLET_HARDLINKS {
        l = l.hardlink(&format!("bin/{a}"), "bin/busybox");
    }
    Ok(l.dir("usr/bin", 0o755)
        .symlink("usr/bin/env", "../../bin/busybox")
        .dir("sbin", 0o755)
        .dir("etc", 0o755)
        .file("etc/passwd", 0o644, PASSWD)
        .file("etc/group", 0o644, GROUP)
        .file(
            "etc/shadow",
            0o640,
            "root:*:19723::::::\napp:*:19723::::::\n",
        )
        .file("etc/motd", 0o644, "deleted by layer 2\n")
        .file("etc/secret", 0o600, "root only\n")
        .dir("tmp", 0o1777)
        .dir("root", 0o700)
        .dir("proc", 0o555)
        .dir("sys", 0o555)
        .dir("dev", 0o755)
        .dir("run", 0o755)
        .dir("var/log", 0o755)
        .dir_owned("home/app", 0o750, 1000, 1000)
        .file_owned(
            "home/app/.profile",
            0o640,
            1000,
            1000,
            "export PS1='app$ '\n",
        )
        .file_owned("home/app/data.txt", 0o600, 1000, 1000, "owned by app\n")
        .dir_owned("opt/app", 0o750, 1000, 1000)
        .file_owned(
            "opt/app/hello.sh",
            0o750,
            1000,
            1000,
            "#!/bin/sh\necho \"hello from $(id -un) in $(pwd): $HAKO_GREETING\"\n",
        )
        .file("usr/local/bin/suid-marker", 0o4755, "setuid bit kept\n")
        .dir("srv/www", 0o755)
        .file("srv/www/index.html", 0o644, "hello from hako busybox\n")
        .file(
            "data/old/a.txt",
            0o644,
            "hidden by the opaque dir of layer 2\n",
        )
        .file(
            "data/old/b.txt",
            0o644,
            "hidden by the opaque dir of layer 2\n",
        )
        .file("data/keep.txt", 0o644, "from layer 1\n"))
}

/// The standard second layer: whiteout of `/etc/motd`, `/data/old` made opaque with a new
/// `/data/old/new.txt`, and a new `/etc/hako-release`.
pub fn change_layer() -> LayerBuilder {
    LayerBuilder::new("hako-tests: whiteout, opaque dir and a new file")
        .whiteout("etc/motd")
        .opaque("data/old", 0o755)
        .file("data/old/new.txt", 0o644, "from layer 2\n")
        .file("etc/hako-release", 0o644, "hako test image layer 2\n")
}

/// The custom variable in the standard images' `Env`.
pub const GREETING_ENV: &str = "HAKO_GREETING=hello from hako";

/// The standard images built from [`base_layer`] and [`change_layer`].
#[derive(Debug, Clone)]
pub struct StandardImages {
    /// Entrypoint `httpd -f -v`, Cmd `-p 8080 -h /srv/www`, User `app`, WorkingDir
    /// `/home/app`, Env PATH and `HAKO_GREETING`. Tags `oci`, `docker`, `latest`,
    /// `docker-list`.
    pub busybox: Image,
    /// No Entrypoint, Cmd `sh`, no User (root), WorkingDir `/`, Env PATH. Tag `plain`.
    pub plain: Image,
    /// No Entrypoint, Cmd `sleep 3600`, root, Env PATH. Tag `sleep`.
    pub sleep: Image,
}

impl StandardImages {
    /// Builds the standard images (cached per process: busybox is compressed once).
    pub fn get() -> Result<&'static StandardImages, ImageError> {
        static CACHE: OnceLock<StandardImages> = OnceLock::new();
        if let Some(s) = CACHE.get() {
            return Ok(s);
        }
        let built = Self::build()?;
        Ok(CACHE.get_or_init(|| built))
    }

    /// Builds the standard images.
    pub fn build() -> Result<StandardImages, ImageError> {
        let layers = vec![base_layer()?.build()?, change_layer().build()?];
        let busybox = Image::new(
            RunConfig {
                entrypoint: Some(strings(&["/bin/httpd", "-f", "-v"])),
                cmd: Some(strings(&["-p", "8080", "-h", "/srv/www"])),
                env: strings(&[DEFAULT_PATH_ENV, GREETING_ENV]),
                working_dir: Some("/home/app".into()),
                user: Some("app".into()),
                labels: BTreeMap::from([("org.hako.test".into(), "busybox".into())]),
                exposed_ports: vec!["8080/tcp".into()],
            },
            layers.clone(),
        );
        let plain = Image::new(
            RunConfig {
                cmd: Some(strings(&["sh"])),
                env: strings(&[DEFAULT_PATH_ENV]),
                working_dir: Some("/".into()),
                ..RunConfig::default()
            },
            layers.clone(),
        );
        let sleep = Image::new(
            RunConfig {
                cmd: Some(strings(&["sleep", "3600"])),
                env: strings(&[DEFAULT_PATH_ENV]),
                ..RunConfig::default()
            },
            layers,
        );
        Ok(StandardImages {
            busybox,
            plain,
            sleep,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn entries(tar_bytes: &[u8]) -> Vec<(String, tar::EntryType, u32, u64, u64)> {
        let mut a = tar::Archive::new(tar_bytes);
        a.entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let h = e.header();
                (
                    e.path().unwrap().to_string_lossy().into_owned(),
                    h.entry_type(),
                    h.mode().unwrap(),
                    h.uid().unwrap(),
                    h.mtime().unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn layer_is_deterministic_and_sorted_with_parents_first() {
        let make = || {
            LayerBuilder::new("t")
                .file("z/y/file", 0o600, "x")
                .hardlink("a/link", "z/y/file")
                .symlink("a/sym", "../z/y/file")
                .dir("tmp", 0o1777)
        };
        let a = make().build().unwrap();
        let b = make().build().unwrap();
        assert_eq!(a, b);
        let names: Vec<String> = entries(&a.tar).into_iter().map(|e| e.0).collect();
        assert_eq!(
            names,
            ["a/", "a/sym", "tmp/", "z/", "z/y/", "z/y/file", "a/link"]
        );
        assert_eq!(a.diff_id, sha256_digest(&a.tar));
        assert_eq!(a.blob.digest, sha256_digest(&a.blob.bytes));
        let mut unzipped = Vec::new();
        flate2::read::GzDecoder::new(a.blob.bytes.as_slice())
            .read_to_end(&mut unzipped)
            .unwrap();
        assert_eq!(unzipped, a.tar);
    }

    #[test]
    fn entries_keep_modes_owners_and_fixed_mtime() {
        let l = LayerBuilder::new("t")
            .dir("tmp", 0o1777)
            .file_owned("home/app/f", 0o640, 1000, 1000, "x")
            .file("s", 0o4755, "")
            .build()
            .unwrap();
        let cases = [
            ("tmp/", tar::EntryType::Directory, 0o1777, 0),
            ("home/app/f", tar::EntryType::Regular, 0o640, 1000),
            ("s", tar::EntryType::Regular, 0o4755, 0),
            ("home/", tar::EntryType::Directory, 0o755, 0),
        ];
        let got = entries(&l.tar);
        for (path, ty, mode, uid) in cases {
            let e = got.iter().find(|e| e.0 == path).unwrap_or_else(|| {
                panic!("{path} missing in {got:?}");
            });
            assert_eq!((e.1, e.2, e.3, e.4), (ty, mode, uid, FIXED_MTIME), "{path}");
        }
    }

    #[test]
    fn whiteouts_and_opaque_markers() {
        let cases = [
            ("etc/motd", "etc/.wh.motd"),
            ("/top", ".wh.top"),
            ("a/b/c/", "a/b/.wh.c"),
        ];
        for (deleted, marker) in cases {
            let l = LayerBuilder::new("t").whiteout(deleted);
            assert!(l.paths().contains(&marker.to_string()), "{deleted}");
        }
        let l = LayerBuilder::new("t").opaque("/data/old", 0o755);
        assert_eq!(l.paths(), ["data", "data/old", "data/old/.wh..wh..opq"]);
    }

    #[test]
    fn raw_entries_are_verbatim_and_last() {
        let l = LayerBuilder::new("t")
            .raw("x", RawKind::Symlink("/host/dir".into()), 0o777)
            .raw("../../up", RawKind::File(b"hi".to_vec()), 0o644)
            .raw("h", RawKind::Hardlink("../../etc/passwd".into()), 0o644)
            .raw("null", RawKind::Char(1, 3), 0o666)
            .file("a", 0o644, "");
        assert_eq!(l.paths(), ["a", "x", "../../up", "h", "null"]);
        let tar_bytes = l.tar().unwrap();
        let mut a = tar::Archive::new(tar_bytes.as_slice());
        let got: Vec<_> = a
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let h = e.header();
                (
                    String::from_utf8_lossy(&e.path_bytes()).into_owned(),
                    h.entry_type(),
                    e.link_name_bytes()
                        .map(|b| String::from_utf8_lossy(&b).into_owned()),
                    h.device_major().unwrap_or_default(),
                )
            })
            .collect();
        assert_eq!(
            got[1..],
            [
                (
                    "x".into(),
                    tar::EntryType::Symlink,
                    Some("/host/dir".into()),
                    None
                ),
                ("../../up".into(), tar::EntryType::Regular, None, None),
                (
                    "h".into(),
                    tar::EntryType::Link,
                    Some("../../etc/passwd".into()),
                    None
                ),
                ("null".into(), tar::EntryType::Char, None, Some(1)),
            ]
        );
        let long = "n".repeat(101);
        let r = LayerBuilder::new("t").raw(&long, RawKind::Dir, 0o755).tar();
        assert!(matches!(r, Err(ImageError::InvalidPath(_))), "{r:?}");
    }

    #[test]
    fn invalid_paths_are_errors() {
        for p in ["a/../b", "a//b"] {
            let r = LayerBuilder::new("t").file(p, 0o644, "").tar();
            assert!(matches!(r, Err(ImageError::InvalidPath(_))), "{p}: {r:?}");
        }
    }

    #[test]
    fn manifests_reference_config_and_layers() {
        let layer = LayerBuilder::new("one")
            .file("f", 0o644, "x")
            .build()
            .unwrap();
        let img = Image::new(
            RunConfig {
                cmd: Some(strings(&["sh"])),
                user: Some("1000:1000".into()),
                ..RunConfig::default()
            },
            vec![layer.clone()],
        );
        let cfg: Value = serde_json::from_slice(&img.config.bytes).unwrap();
        assert_eq!(cfg["rootfs"]["diff_ids"][0], json!(layer.diff_id));
        assert_eq!(cfg["config"]["User"], json!("1000:1000"));
        assert_eq!(cfg["history"][0]["created_by"], json!("one"));
        for (form, mt, cfg_mt, layer_mt) in [
            (ManifestForm::Oci, OCI_MANIFEST, OCI_CONFIG, OCI_LAYER_GZIP),
            (
                ManifestForm::Docker,
                DOCKER_MANIFEST,
                DOCKER_CONFIG,
                DOCKER_LAYER_GZIP,
            ),
        ] {
            let m = img.manifest(form);
            assert_eq!(m.media_type, mt);
            let v: Value = serde_json::from_slice(&m.bytes).unwrap();
            assert_eq!(v["mediaType"], json!(mt));
            assert_eq!(v["config"]["mediaType"], json!(cfg_mt));
            assert_eq!(v["config"]["digest"], json!(img.config.digest));
            assert_eq!(v["layers"][0]["mediaType"], json!(layer_mt));
            assert_eq!(v["layers"][0]["digest"], json!(layer.blob.digest));
            assert_eq!(v["layers"][0]["size"], json!(layer.blob.size()));
            let idx = index(form, std::slice::from_ref(&m));
            let iv: Value = serde_json::from_slice(&idx.bytes).unwrap();
            assert_eq!(iv["manifests"][0]["digest"], json!(m.digest));
            assert_eq!(
                iv["manifests"][0]["platform"]["architecture"],
                json!("amd64")
            );
        }
    }

    #[test]
    fn change_layer_tar_matches_its_golden_digest() {
        // The uncompressed tar depends only on this code and the tar format, so its digest
        // is pinned; a change here changes every standard image's diff_ids.
        let l = change_layer().build().unwrap();
        assert_eq!(
            l.diff_id,
            "sha256:4e8fa4aaa4c98b7c2993f28c8fa559e92a6527b21d440ec1293df74bae373f18"
        );
    }

    #[test]
    fn standard_images_are_stable() {
        let a = StandardImages::build().unwrap();
        let b = StandardImages::build().unwrap();
        assert_eq!(
            a.busybox.manifest(ManifestForm::Oci),
            b.busybox.manifest(ManifestForm::Oci)
        );
        let l2: Vec<String> = entries(&a.busybox.layers[1].tar)
            .into_iter()
            .map(|e| e.0)
            .collect();
        for want in ["etc/.wh.motd", "data/old/.wh..wh..opq", "data/old/new.txt"] {
            assert!(l2.iter().any(|p| p == want), "{want} missing in {l2:?}");
        }
        let l1 = entries(&a.busybox.layers[0].tar);
        for want in [
            "bin/busybox",
            "bin/sh",
            "bin/true",
            "etc/passwd",
            "etc/motd",
            "tmp/",
        ] {
            assert!(l1.iter().any(|e| e.0 == want), "{want} missing");
        }
    }
}

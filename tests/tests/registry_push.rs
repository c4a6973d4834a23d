//! Root tests of the local OCI registry fixture: the standard images are pushed, fetched
//! back through the HTTP API in both manifest forms and as an index, every digest is
//! checked, the layers carry their whiteouts, the image runs in a chroot, and the registry
//! process and its temp dir are gone after drop, even after a panic.
#![cfg(feature = "root")]

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use hako_tests::images::{
    self, sha256_digest, Blob, Image, LayerBuilder, ManifestForm, RunConfig, StandardImages,
};
use hako_tests::registry::{push_standard, tags, Client, Registry, ACCEPT_ALL, BUSYBOX_REPO};
use hako_tests::require_root;
use serde_json::Value;

fn json(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).unwrap()
}

fn gunzip(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_end(&mut out)
        .unwrap();
    out
}

fn tar_paths(tar_bytes: &[u8]) -> Vec<String> {
    let mut a = tar::Archive::new(tar_bytes);
    a.entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
        .collect()
}

/// Fetches a manifest with exactly its own media type accepted, checks type, bytes and
/// digest, then fetches and checks every blob it references; returns the config JSON and
/// the uncompressed layer tars.
fn check_image_manifest(c: &Client, tag: &str, pushed: &Blob) -> (Value, Vec<Vec<u8>>) {
    let f = c
        .get_manifest(BUSYBOX_REPO, tag, &[pushed.media_type.as_str()])
        .unwrap();
    assert_eq!(f.content_type, pushed.media_type, "{tag}");
    assert_eq!(f.bytes, pushed.bytes, "{tag}");
    assert_eq!(sha256_digest(&f.bytes), pushed.digest, "{tag}");
    assert_eq!(f.digest_header.as_deref(), Some(pushed.digest.as_str()));
    let m = json(&f.bytes);
    assert_eq!(m["mediaType"], Value::from(pushed.media_type.as_str()));
    let (cfg_mt, layer_mt) = if pushed.media_type == images::OCI_MANIFEST {
        (images::OCI_CONFIG, images::OCI_LAYER_GZIP)
    } else {
        (images::DOCKER_CONFIG, images::DOCKER_LAYER_GZIP)
    };
    assert_eq!(m["config"]["mediaType"], Value::from(cfg_mt));
    let mut descs = vec![m["config"].clone()];
    descs.extend(m["layers"].as_array().unwrap().iter().cloned());
    let mut blobs = Vec::new();
    for d in &descs {
        let digest = d["digest"].as_str().unwrap();
        let b = c.get_blob(BUSYBOX_REPO, digest).unwrap();
        assert_eq!(sha256_digest(&b), digest, "{tag}: blob digest");
        assert_eq!(Some(b.len() as u64), d["size"].as_u64(), "{tag}: blob size");
        blobs.push(b);
    }
    let config = json(&blobs[0]);
    let diff_ids = config["rootfs"]["diff_ids"].as_array().unwrap().clone();
    assert_eq!(diff_ids.len(), blobs.len() - 1);
    let mut tars = Vec::new();
    for (i, (layer, desc)) in blobs[1..].iter().zip(&descs[1..]).enumerate() {
        assert_eq!(desc["mediaType"], Value::from(layer_mt));
        let t = gunzip(layer);
        assert_eq!(
            Value::from(sha256_digest(&t)),
            diff_ids[i],
            "{tag}: diff_id {i}"
        );
        tars.push(t);
    }
    assert_eq!(
        config["history"].as_array().map(Vec::len),
        Some(diff_ids.len())
    );
    (config, tars)
}

#[test]
fn standard_images_round_trip_in_both_forms() {
    require_root();
    let (reg, pushed) = Registry::with_standard_images().unwrap();
    let c = reg.client();

    let (oci_cfg, oci_tars) = check_image_manifest(&c, tags::OCI, &pushed.oci);
    let (docker_cfg, docker_tars) = check_image_manifest(&c, tags::DOCKER, &pushed.docker);
    assert_eq!(oci_cfg, docker_cfg, "both forms share one config");
    assert_eq!(oci_tars, docker_tars, "both forms share the layers");
    assert!(oci_tars.len() >= 2);

    let cfg = &oci_cfg["config"];
    assert_eq!(
        cfg["Entrypoint"],
        serde_json::json!(["/bin/httpd", "-f", "-v"])
    );
    assert_eq!(
        cfg["Cmd"],
        serde_json::json!(["-p", "8080", "-h", "/srv/www"])
    );
    assert_eq!(cfg["User"], Value::from("app"));
    assert_eq!(cfg["WorkingDir"], Value::from("/home/app"));
    let env: Vec<&str> = cfg["Env"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(env.iter().any(|e| e.starts_with("PATH=")), "{env:?}");
    assert!(env.contains(&images::GREETING_ENV), "{env:?}");
    assert_eq!(oci_cfg["architecture"], Value::from("amd64"));
    assert_eq!(oci_cfg["os"], Value::from("linux"));

    let l1 = tar_paths(&oci_tars[0]);
    for want in [
        "bin/busybox",
        "bin/sh",
        "bin/httpd",
        "etc/passwd",
        "etc/motd",
        "tmp/",
    ] {
        assert!(l1.iter().any(|p| p == want), "layer 1 lacks {want}");
    }
    let l2 = tar_paths(&oci_tars[1]);
    for want in ["etc/.wh.motd", "data/old/.wh..wh..opq", "data/old/new.txt"] {
        assert!(l2.iter().any(|p| p == want), "layer 2 lacks {want}: {l2:?}");
    }

    for (tag, pushed) in [(tags::PLAIN, &pushed.plain), (tags::SLEEP, &pushed.sleep)] {
        let (cfg, _) = check_image_manifest(&c, tag, pushed);
        assert!(cfg["config"].get("Entrypoint").is_none(), "{tag}");
        assert!(cfg["config"].get("User").is_none(), "{tag}");
    }
}

#[test]
fn indexes_point_at_the_linux_amd64_manifests() {
    require_root();
    let (reg, pushed) = Registry::with_standard_images().unwrap();
    let c = reg.client();
    for (tag, index, target) in [
        (tags::LATEST, &pushed.latest, &pushed.oci),
        (tags::DOCKER_LIST, &pushed.docker_list, &pushed.docker),
    ] {
        let f = c.get_manifest(BUSYBOX_REPO, tag, ACCEPT_ALL).unwrap();
        assert_eq!(f.content_type, index.media_type, "{tag}");
        assert_eq!(f.bytes, index.bytes, "{tag}");
        assert_eq!(f.digest_header.as_deref(), Some(index.digest.as_str()));
        let v = json(&f.bytes);
        let entries = v["manifests"].as_array().unwrap();
        assert_eq!(entries.len(), 1, "{tag}");
        let e = &entries[0];
        assert_eq!(e["digest"], Value::from(target.digest.as_str()));
        assert_eq!(e["mediaType"], Value::from(target.media_type.as_str()));
        assert_eq!(e["platform"]["architecture"], Value::from("amd64"));
        assert_eq!(e["platform"]["os"], Value::from("linux"));
        // The entry resolves by digest.
        let m = c
            .get_manifest(BUSYBOX_REPO, &target.digest, &[target.media_type.as_str()])
            .unwrap();
        assert_eq!(m.bytes, target.bytes);
    }
    assert_eq!(reg.busybox(), format!("{}/busybox:latest", reg.addr()));
}

#[test]
fn pushed_images_are_listed_and_pushes_are_idempotent() {
    require_root();
    let (reg, pushed) = Registry::with_standard_images().unwrap();
    let c = reg.client();

    let layer = LayerBuilder::new("sleeper")
        .file("etc/sleeper", 0o644, "custom image\n")
        .build()
        .unwrap();
    let mut layers = StandardImages::get().unwrap().busybox.layers.clone();
    layers.push(layer);
    let custom = Image::new(
        RunConfig {
            cmd: Some(vec!["sleep".into(), "3600".into()]),
            env: vec![images::DEFAULT_PATH_ENV.into()],
            labels: BTreeMap::from([("purpose".into(), "test".into())]),
            ..RunConfig::default()
        },
        layers,
    );
    let m = c
        .push_image("hako/sleeper", "v1", &custom, ManifestForm::Docker)
        .unwrap();
    check_digest_round_trip(&c, "hako/sleeper", "v1", &m);

    let mut repos = c.catalog().unwrap();
    repos.sort();
    assert_eq!(repos, ["busybox", "hako/sleeper"]);
    let mut got = c.tags(BUSYBOX_REPO).unwrap();
    got.sort();
    let mut want: Vec<&str> = pushed.by_tag().into_iter().map(|(t, _)| t).collect();
    want.sort();
    assert_eq!(got, want);
    assert_eq!(c.tags("hako/sleeper").unwrap(), ["v1"]);

    // A second push finds every blob present and yields the same manifests.
    let again = push_standard(&c).unwrap();
    for ((t1, a), (t2, b)) in pushed.by_tag().into_iter().zip(again.by_tag()) {
        assert_eq!((t1, &a.digest), (t2, &b.digest));
    }
    for b in StandardImages::get()
        .unwrap()
        .busybox
        .blobs(ManifestForm::Oci)
    {
        assert!(
            !c.push_blob(BUSYBOX_REPO, &b).unwrap(),
            "{} re-uploaded",
            b.digest
        );
    }
}

fn check_digest_round_trip(c: &Client, repo: &str, tag: &str, m: &Blob) {
    let f = c.get_manifest(repo, tag, ACCEPT_ALL).unwrap();
    assert_eq!(f.content_type, m.media_type);
    assert_eq!(sha256_digest(&f.bytes), m.digest);
}

/// Applies one layer tar to `root` the way a runtime does: whiteouts delete, opaque
/// markers empty the directory, everything else is unpacked with its mode and owner.
fn apply_layer(root: &Path, tar_bytes: &[u8]) {
    let mut a = tar::Archive::new(tar_bytes);
    a.set_preserve_permissions(true);
    a.set_preserve_ownerships(true);
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        let path = e.path().unwrap().into_owned();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let parent = root.join(path.parent().unwrap_or(Path::new("")));
        if name == ".wh..wh..opq" {
            for child in std::fs::read_dir(&parent).unwrap() {
                let p = child.unwrap().path();
                if p.is_dir() && !p.is_symlink() {
                    std::fs::remove_dir_all(&p).unwrap();
                } else {
                    std::fs::remove_file(&p).unwrap();
                }
            }
        } else if let Some(victim) = name.strip_prefix(".wh.") {
            let p = parent.join(victim);
            if p.is_dir() && !p.is_symlink() {
                std::fs::remove_dir_all(&p).unwrap();
            } else {
                std::fs::remove_file(&p).unwrap();
            }
        } else {
            assert!(e.unpack_in(root).unwrap(), "{} escaped", path.display());
        }
    }
}

#[test]
fn pulled_layers_unpack_into_a_runnable_busybox_root() {
    require_root();
    let (reg, pushed) = Registry::with_standard_images().unwrap();
    let c = reg.client();
    let root_dir = tempfile::tempdir().unwrap();
    let root = root_dir.path();
    let f = c
        .get_manifest(BUSYBOX_REPO, tags::DOCKER, &[images::DOCKER_MANIFEST])
        .unwrap();
    assert_eq!(sha256_digest(&f.bytes), pushed.docker.digest);
    let m = json(&f.bytes);
    for l in m["layers"].as_array().unwrap() {
        let gz = c
            .get_blob(BUSYBOX_REPO, l["digest"].as_str().unwrap())
            .unwrap();
        apply_layer(root, &gunzip(&gz));
    }
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let mode = |p: &str| std::fs::symlink_metadata(root.join(p)).unwrap().mode() & 0o7777;
    assert_eq!(mode("tmp"), 0o1777);
    assert_eq!(mode("etc/secret"), 0o600);
    assert_eq!(mode("usr/local/bin/suid-marker"), 0o4755);
    let home = std::fs::metadata(root.join("home/app")).unwrap();
    assert_eq!((home.uid(), home.gid()), (1000, 1000));
    assert_eq!(home.permissions().mode() & 0o7777, 0o750);
    assert!(!root.join("etc/motd").exists(), "whiteout not applied");
    assert!(
        !root.join("data/old/a.txt").exists(),
        "opaque dir not applied"
    );
    assert!(root.join("data/old/new.txt").exists());
    assert!(root.join("data/keep.txt").exists());
    let bb = std::fs::metadata(root.join("bin/busybox")).unwrap();
    let t = std::fs::metadata(root.join("bin/true")).unwrap();
    assert_eq!(bb.ino(), t.ino(), "bin/true is a hard link");

    let chroot = |userspec: &str, script: &str| {
        let out = std::process::Command::new("chroot")
            .arg(format!("--userspec={userspec}"))
            .arg(root)
            .args(["/bin/sh", "-c", script])
            .env("HAKO_GREETING", "hi")
            .output()
            .unwrap();
        assert!(out.status.success(), "{script}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let app = chroot(
        "1000:1000",
        "cd /home/app && /opt/app/hello.sh && cat data.txt",
    );
    assert_eq!(app, "hello from app in /home/app: hi\nowned by app\n");
    let root_out = chroot(
        "0:0",
        "cat /etc/hako-release /etc/secret; /bin/true && echo ok",
    );
    assert_eq!(root_out, "hako test image layer 2\nroot only\nok\n");
}

#[test]
fn registry_process_and_dir_are_gone_after_a_panic() {
    require_root();
    let (tx, rx) = std::sync::mpsc::channel::<(u32, PathBuf, String)>();
    let r = std::panic::catch_unwind(move || {
        let reg = Registry::start().unwrap();
        tx.send((reg.pid(), reg.dir().to_path_buf(), reg.addr().to_string()))
            .unwrap();
        panic!("boom");
    });
    assert!(r.is_err());
    let (pid, dir, addr) = rx.recv().unwrap();
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "registry {pid} still runs"
    );
    assert!(!dir.exists(), "{} leaked", dir.display());
    assert!(
        Client::new(&addr).catalog().is_err(),
        "{addr} still answers"
    );
}

#[test]
fn two_registries_run_side_by_side() {
    require_root();
    let a = Registry::start().unwrap();
    let b = Registry::start().unwrap();
    assert_ne!(a.addr(), b.addr());
    assert_ne!(a.dir(), b.dir());
    assert!(a.client().catalog().unwrap().is_empty());
    assert!(b.client().catalog().unwrap().is_empty());
    assert!(a.log_path().exists());
}

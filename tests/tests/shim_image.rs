#![cfg(feature = "root")]
//! Root tests of the image store against the local registry: OCI, Docker v2, index and
//! manifest-list pulls, digest checks, whiteouts/opaque dirs/ownership of real image layers,
//! image config (user, env, cwd) in a running container, de-duplicated concurrent pulls, GC,
//! and clean failures for unknown images and bad digests.

mod shim_support;

use hako_shim::image::{process_for, ImageError, ImageStore, PullPolicy};
use hako_shim::spec::Rootfs;
use hako_tests::registry::Registry;
use shim_support::Env;
use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;

fn assert_store_clean(store_root: &std::path::Path) {
    let tmp: Vec<_> = std::fs::read_dir(store_root.join("tmp")).unwrap().collect();
    assert!(tmp.is_empty(), "partial pull left files behind");
}

#[test]
fn pulls_every_manifest_kind_and_runs_the_image() {
    let env = Env::new("img");
    let (reg, pushed) = Registry::with_standard_images().expect("registry");
    let root = env.tmp.path().join("images");
    let store = ImageStore::open(&root).unwrap();
    let mut digests = HashSet::new();
    for tag in ["oci", "docker", "latest", "docker-list"] {
        let r = reg.reference(&format!("busybox:{tag}"));
        let img = store
            .ensure_blocking(&r, PullPolicy::Always, None)
            .expect(tag);
        assert_eq!(img.layers.len(), 2, "{tag}");
        assert_eq!(img.config.user.as_deref(), Some("app"));
        assert_eq!(img.config.working_dir.as_deref(), Some("/home/app"));
        digests.insert(img.layers.clone());
        for d in store.layer_dirs(&img) {
            assert!(d.is_dir());
        }
    }
    // Every manifest kind (index and list resolved to linux/amd64) names the same layers.
    assert_eq!(digests.len(), 1);
    assert!(store
        .list()
        .unwrap()
        .iter()
        .any(|i| i.digest == pushed.oci.digest));
    assert_store_clean(&root);

    let img = store.get(&reg.busybox()).unwrap().expect("present");
    let top = store.layer_dirs(&img);
    // Ownership and modes kept; whiteout and opaque markers in overlayfs form.
    let data = std::fs::metadata(top[0].join("home/app/data.txt")).unwrap();
    assert_eq!(
        (data.uid(), data.gid(), data.mode() & 0o7777),
        (1000, 1000, 0o600)
    );
    let suid = std::fs::metadata(top[0].join("usr/local/bin/suid-marker")).unwrap();
    assert_eq!(suid.mode() & 0o7777, 0o4755);
    let wh = std::fs::metadata(top[1].join("etc/motd")).unwrap();
    assert_eq!(wh.rdev(), 0);

    // Run it with the image's config (user app, cwd, env) and check the whiteouts.
    let mut spec = env.spec("img", &["true"]);
    spec.rootfs = Rootfs::Layers(top.clone());
    spec.process = process_for(
        &img.config,
        &["sh".to_string()],
        &[
            "-c".to_string(),
            "/opt/app/hello.sh; id -u; ls /etc/motd 2>&1 || true; ls /data/old; cat /data/keep.txt"
                .to_string(),
        ],
    );
    let (st, _) = env.run(&spec);
    assert_eq!(st.exit_code, Some(0));
    let out = env.stdout("img");
    assert_eq!(out[0], "hello from app in /home/app: hello from hako");
    assert_eq!(out[1], "1000");
    assert!(out[2].contains("No such file"), "{out:?}");
    assert_eq!(out[3..], ["new.txt", "from layer 1"]);
}

#[test]
fn concurrent_pulls_policies_and_gc() {
    let env = Env::new("imggc");
    let (reg, _) = Registry::with_standard_images().expect("registry");
    let root = env.tmp.path().join("images");
    let store = ImageStore::open(&root).unwrap();
    let r = reg.busybox();
    let (a, b) = std::thread::scope(|sc| {
        let t1 = sc.spawn(|| store.ensure_blocking(&r, PullPolicy::IfNotPresent, None));
        let t2 = sc.spawn(|| store.ensure_blocking(&r, PullPolicy::IfNotPresent, None));
        (t1.join().unwrap(), t2.join().unwrap())
    });
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a, b, "the second pull must reuse the first");
    // Never: present works, absent fails.
    store.ensure_blocking(&r, PullPolicy::Never, None).unwrap();
    let plain = reg.reference("busybox:plain");
    assert!(matches!(
        store.ensure_blocking(&plain, PullPolicy::Never, None),
        Err(ImageError::NotPresent(_))
    ));
    let p = store
        .ensure_blocking(&plain, PullPolicy::IfNotPresent, None)
        .unwrap();
    assert_eq!(store.list().unwrap().len(), 2);
    // GC with busybox in use: only plain goes; layers busybox uses stay.
    let in_use: HashSet<String> = [a.reference.clone()].into();
    let removed = store.gc(&in_use, 0).unwrap();
    assert_eq!(removed, vec![p.reference.clone()]);
    for d in store.layer_dirs(&a) {
        assert!(d.is_dir());
    }
    assert!(store.get(&plain).unwrap().is_none());
}

#[test]
fn unknown_image_and_bad_digest_fail_cleanly() {
    let env = Env::new("imgbad");
    let (reg, _) = Registry::with_standard_images().expect("registry");
    let root = env.tmp.path().join("images");
    let store = ImageStore::open(&root).unwrap();
    let unknown = reg.reference("no-such-image:v1");
    let e = store
        .ensure_blocking(&unknown, PullPolicy::Always, None)
        .unwrap_err();
    assert!(
        matches!(&e, ImageError::Registry(r, m) if r == &unknown && m.contains("manifest unknown")),
        "{e}"
    );
    let bad = format!("{}/busybox@sha256:{}", reg.addr(), "0".repeat(64));
    let e = store
        .ensure_blocking(&bad, PullPolicy::Always, None)
        .unwrap_err();
    assert!(
        matches!(&e, ImageError::Registry(..) | ImageError::Digest { .. }),
        "{e}"
    );
    assert!(store.list().unwrap().is_empty());
    assert_eq!(std::fs::read_dir(root.join("layers")).unwrap().count(), 0);
    assert_store_clean(&root);
}

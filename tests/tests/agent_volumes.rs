//! Root tests of the agent's pod volumes: real tmpfs mounts (secret, memory emptyDir with its
//! size limit) that are mounted and cleaned, the atomic `..data` swap as a reader sees it,
//! hostPath type checks against real sockets and devices, and file modes.
#![cfg(feature = "root")]

use hako_agent::sys::volumes::{
    mounts_for_container, refresh_pod_volumes, setup_pod_volumes, teardown_pod_volumes, MapObjects,
    PodContext, PodVolumes, VolumeHost,
};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

/// Tears the pod's volumes down even when the test fails.
struct Guard {
    host: VolumeHost,
    uid: String,
    _tmp: tempfile::TempDir,
}

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = teardown_pod_volumes(&self.host, &self.uid);
    }
}

fn setup(uid: &str) -> Guard {
    hako_tests::require_root();
    let tmp = tempfile::tempdir().expect("tempdir");
    Guard {
        host: VolumeHost::new(tmp.path().join("root")),
        uid: uid.to_string(),
        _tmp: tmp,
    }
}

/// (fstype, options) of the mount at `path`, from /proc/self/mountinfo.
fn mount_of(path: &Path) -> Option<(String, String)> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    text.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        let f: Vec<&str> = pre.split(' ').collect();
        if Path::new(f.get(4)?) != path {
            return None;
        }
        let p: Vec<&str> = post.split(' ').collect();
        Some((p.first()?.to_string(), p.get(2)?.to_string()))
    })
}

fn mounts_under(dir: &Path) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| Path::new(p).starts_with(dir))
        .map(str::to_string)
        .collect()
}

fn cm(greeting: &str, color: &str) -> ConfigMap {
    serde_yaml::from_str(&format!(
        "metadata: {{name: cfg, namespace: default}}\ndata: {{greeting: \"{greeting}\", color: \"{color}\"}}"
    ))
    .expect("configmap")
}

fn objects() -> MapObjects {
    let mut o = MapObjects::default();
    o.config_maps
        .insert(("default".into(), "cfg".into()), cm("hello", "blue"));
    o.secrets.insert(
        ("default".into(), "sec".into()),
        serde_yaml::from_str("metadata: {name: sec, namespace: default}\ndata: {password: aHVudGVyMg==, user: YWRtaW4=}")
            .expect("secret"),
    );
    o
}

fn pod(uid: &str, extra_volumes: &str) -> Pod {
    serde_yaml::from_str(&format!(
        r#"
metadata: {{name: web, namespace: default, uid: {uid}, labels: {{app: web}}}}
spec:
  containers:
  - name: c
    image: busybox
    volumeMounts:
    - {{name: mem, mountPath: /mem}}
    - {{name: sec, mountPath: /sec}}
    - {{name: cfg, mountPath: /cfg}}
  volumes:
  - {{name: mem, emptyDir: {{medium: Memory, sizeLimit: 1Mi}}}}
  - {{name: disk, emptyDir: {{}}}}
  - {{name: sec, secret: {{secretName: sec, defaultMode: 256, items: [{{key: password, path: pw}}, {{key: user, path: user, mode: 0o444}}]}}}}
  - {{name: cfg, configMap: {{name: cfg}}}}
  - {{name: info, downwardAPI: {{items: [{{path: labels, fieldRef: {{fieldPath: metadata.labels}}}}]}}}}
  - {{name: proj, projected: {{sources: [{{configMap: {{name: cfg}}}}, {{secret: {{name: sec}}}}]}}}}
{extra_volumes}
"#
    ))
    .expect("pod")
}

fn path_of(v: &PodVolumes, name: &str) -> PathBuf {
    v.volumes[name].path.clone()
}

#[test]
fn tmpfs_volumes_are_mounted_limited_and_cleaned() {
    let g = setup("vol-tmpfs");
    let o = objects();
    let p = pod("vol-tmpfs", "");
    let vols = setup_pod_volumes(&g.host, &PodContext::new(&p, &o)).expect("setup");

    let mem = path_of(&vols, "mem");
    let (fs, opts) = mount_of(&mem).expect("memory emptyDir is a mount");
    assert_eq!(fs, "tmpfs");
    assert!(opts.contains("size=1024k"), "{opts}");
    for name in ["sec", "info", "proj"] {
        let (fs, _) = mount_of(&path_of(&vols, name)).unwrap_or_else(|| panic!("{name} mounted"));
        assert_eq!(fs, "tmpfs", "{name}");
    }
    assert!(
        mount_of(&path_of(&vols, "cfg")).is_none(),
        "configMap volumes are on disk"
    );
    assert!(mount_of(&path_of(&vols, "disk")).is_none());

    // The size limit holds: 2 MiB into a 1 MiB tmpfs fails with ENOSPC.
    let mut f = std::fs::File::create(mem.join("big")).expect("create");
    let err = f.write_all(&vec![7u8; 2 << 20]).and_then(|_| f.sync_all());
    assert_eq!(
        err.expect_err("write beyond sizeLimit").raw_os_error(),
        Some(libc::ENOSPC)
    );
    drop(f);

    // Contents and modes.
    let sec = path_of(&vols, "sec");
    assert_eq!(
        std::fs::read_to_string(sec.join("pw")).expect("pw"),
        "hunter2"
    );
    let mode = |p: PathBuf| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode(sec.join("pw")), 0o400);
    assert_eq!(mode(sec.join("user")), 0o444);
    assert_eq!(mode(path_of(&vols, "cfg").join("greeting")), 0o644);
    assert_eq!(mode(path_of(&vols, "disk")), 0o777);
    assert_eq!(
        std::fs::read_to_string(path_of(&vols, "info").join("labels")).expect("labels"),
        "app=\"web\""
    );
    let proj = path_of(&vols, "proj");
    assert_eq!(
        std::fs::read_to_string(proj.join("color")).expect("color"),
        "blue"
    );
    assert_eq!(
        std::fs::read_to_string(proj.join("password")).expect("password"),
        "hunter2"
    );

    // Mount specs: API data read-only, emptyDir writable.
    let c = &p.spec.as_ref().expect("spec").containers[0];
    let ms = mounts_for_container(&vols, c).expect("mounts");
    assert_eq!(
        ms.iter().map(|m| m.readonly).collect::<Vec<_>>(),
        [false, true, true]
    );

    // Setup again (agent restart) does not stack a second tmpfs.
    let before = mounts_under(&g.host.volumes_dir("vol-tmpfs")).len();
    setup_pod_volumes(&g.host, &PodContext::new(&p, &o)).expect("setup again");
    assert_eq!(mounts_under(&g.host.volumes_dir("vol-tmpfs")).len(), before);
    assert_eq!(before, 4);

    teardown_pod_volumes(&g.host, "vol-tmpfs").expect("teardown");
    assert!(mounts_under(&g.host.volumes_dir("vol-tmpfs")).is_empty());
    assert!(!g.host.volumes_dir("vol-tmpfs").exists());
}

#[test]
fn atomic_update_as_readers_see_it() {
    let g = setup("vol-atomic");
    let mut o = objects();
    let p = pod("vol-atomic", "");
    let vols = setup_pod_volumes(&g.host, &PodContext::new(&p, &o)).expect("setup");
    let cfg = path_of(&vols, "cfg");

    // A reader that opened the file before the update keeps the old contents.
    let mut held = std::fs::File::open(cfg.join("greeting")).expect("open");
    o.config_maps
        .insert(("default".into(), "cfg".into()), cm("bonjour", "red"));
    assert!(refresh_pod_volumes(&g.host, &PodContext::new(&p, &o), &vols).expect("refresh"));
    let mut s = String::new();
    held.read_to_string(&mut s).expect("read held");
    assert_eq!(s, "hello");
    assert_eq!(
        std::fs::read_to_string(cfg.join("greeting")).expect("new"),
        "bonjour"
    );
    assert!(!refresh_pod_volumes(&g.host, &PodContext::new(&p, &o), &vols).expect("no-op"));

    // Concurrent readers through the public paths never see a missing or partial file, and a
    // reader that resolves `..data` once sees both keys from the same version.
    o.config_maps
        .insert(("default".into(), "cfg".into()), cm("v999", "c999"));
    refresh_pod_volumes(&g.host, &PodContext::new(&p, &o), &vols).expect("refresh");
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicUsize::new(0));
    let reader = {
        let (stop, reads, cfg) = (stop.clone(), reads.clone(), cfg.clone());
        std::thread::spawn(move || -> Result<(), String> {
            while !stop.load(Ordering::Relaxed) {
                // The previous version is kept one update long, so a missing file can only
                // come from a reader stalled across two updates; it resolves on a retry.
                let mut g = Err(String::new());
                for _ in 0..3 {
                    g = std::fs::read_to_string(cfg.join("greeting"))
                        .map_err(|e| format!("greeting: {e}"));
                    if g.is_ok() {
                        break;
                    }
                }
                let g = g?;
                if !g.starts_with("v") || g.len() < 4 {
                    return Err(format!("partial greeting {g:?}"));
                }
                // Snapshot consistency: resolve ..data once, read both from that dir.
                if let Ok(dir) = std::fs::read_link(cfg.join("..data")) {
                    let d = cfg.join(dir);
                    if let (Ok(a), Ok(b)) = (
                        std::fs::read_to_string(d.join("greeting")),
                        std::fs::read_to_string(d.join("color")),
                    ) {
                        if a.trim_start_matches('v') != b.trim_start_matches('c') {
                            return Err(format!("mixed versions {a:?} {b:?}"));
                        }
                    }
                }
                reads.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        })
    };
    for i in 1000..1200 {
        o.config_maps.insert(
            ("default".into(), "cfg".into()),
            cm(&format!("v{i}"), &format!("c{i}")),
        );
        assert!(refresh_pod_volumes(&g.host, &PodContext::new(&p, &o), &vols).expect("refresh"));
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    stop.store(true, Ordering::Relaxed);
    reader
        .join()
        .expect("reader thread")
        .expect("reader saw a torn update");
    assert!(reads.load(Ordering::Relaxed) > 50, "reader ran");
    // Only the current and the previous timestamped dirs are left.
    let ts: Vec<String> = std::fs::read_dir(&cfg)
        .expect("readdir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("..") && n != "..data")
        .collect();
    assert_eq!(ts.len(), 2, "{ts:?}");

    // A container holding a bind mount of the volume sees the update (a private mount
    // namespace with the volume bound elsewhere stands in for the container). The reader
    // reads once, then waits for the signal file the test creates after the update (10 s at
    // most), then reads again: no timing is assumed.
    let signal = std::env::temp_dir().join(format!("hako-vol-signal-{}", std::process::id()));
    let _ = std::fs::remove_file(&signal);
    let mut child = std::process::Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c"])
        .arg(format!(
            "mkdir -p /tmp/hako-vol-bind-$$ && mount --bind {} /tmp/hako-vol-bind-$$ && cat /tmp/hako-vol-bind-$$/greeting; echo; i=0; while [ ! -e {} ] && [ $i -lt 500 ]; do sleep 0.02; i=$((i+1)); done; cat /tmp/hako-vol-bind-$$/greeting; umount /tmp/hako-vol-bind-$$; rmdir /tmp/hako-vol-bind-$$",
            cfg.display(),
            signal.display()
        ))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("unshare");
    let mut stdout = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    let mut first = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut first).expect("first read");
    o.config_maps
        .insert(("default".into(), "cfg".into()), cm("final", "green"));
    refresh_pod_volumes(&g.host, &PodContext::new(&p, &o), &vols).expect("refresh");
    std::fs::write(&signal, b"").expect("signal");
    let mut second = String::new();
    stdout.read_to_string(&mut second).expect("second read");
    child.wait().expect("wait");
    let _ = std::fs::remove_file(&signal);
    assert_eq!(format!("{first}{second}"), "v1199\nfinal");

    // A deleted ConfigMap: refresh reports it and keeps the last contents.
    o.config_maps.clear();
    let e = refresh_pod_volumes(&g.host, &PodContext::new(&p, &o), &vols).expect_err("missing");
    assert!(e.to_string().contains("configmap \"cfg\" not found"), "{e}");
    assert_eq!(
        std::fs::read_to_string(cfg.join("greeting")).expect("kept"),
        "final"
    );
}

#[test]
fn host_path_types() {
    let g = setup("vol-host");
    let o = objects();
    let dir = g._tmp.path().join("host");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let sock = dir.join("app.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&sock).expect("bind socket");
    let ok = format!(
        r#"  - {{name: a, hostPath: {{path: {d}/made/dir, type: DirectoryOrCreate}}}}
  - {{name: b, hostPath: {{path: {d}/made/file, type: FileOrCreate}}}}
  - {{name: c, hostPath: {{path: {sock}, type: Socket}}}}
  - {{name: d, hostPath: {{path: /dev/null, type: CharDevice}}}}
  - {{name: e, hostPath: {{path: {d}, type: Directory}}}}"#,
        d = dir.display(),
        sock = sock.display()
    );
    let p = pod("vol-host", &ok);
    let vols = setup_pod_volumes(&g.host, &PodContext::new(&p, &o)).expect("setup");
    assert!(dir.join("made/dir").is_dir());
    let f = dir.join("made/file");
    assert!(f.is_file());
    assert_eq!(
        std::fs::metadata(&f).expect("stat").permissions().mode() & 0o777,
        0o644
    );
    assert_eq!(path_of(&vols, "c"), sock);
    teardown_pod_volumes(&g.host, "vol-host").expect("teardown");
    assert!(
        sock.exists() && dir.join("made/dir").is_dir(),
        "hostPath sources are left alone"
    );

    for (vol, want) in [
        (
            format!(
                "{{name: x, hostPath: {{path: {}, type: Directory}}}}",
                sock.display()
            ),
            "is not a directory",
        ),
        (
            format!(
                "{{name: x, hostPath: {{path: {}, type: File}}}}",
                dir.display()
            ),
            "is not a file",
        ),
        (
            format!(
                "{{name: x, hostPath: {{path: {}, type: Socket}}}}",
                f.display()
            ),
            "is not a socket",
        ),
        (
            "{name: x, hostPath: {path: /dev/null, type: BlockDevice}}".to_string(),
            "is not a block device",
        ),
        (
            format!(
                "{{name: x, hostPath: {{path: {}/nope, type: Directory}}}}",
                dir.display()
            ),
            "does not exist",
        ),
    ] {
        let p = pod("vol-host-bad", &format!("  - {vol}"));
        let e = setup_pod_volumes(&g.host, &PodContext::new(&p, &o)).expect_err(&vol);
        assert!(e.to_string().contains(want), "{vol}: {e}");
        assert!(
            !g.host.volumes_dir("vol-host-bad").exists(),
            "nothing half-made for {vol}"
        );
    }
    // No tmpfs left over from the refused attempts.
    assert!(mounts_under(&g.host.root).is_empty());
}

#[test]
fn missing_secret_is_a_failed_mount_and_nothing_is_mounted() {
    let g = setup("vol-missing");
    let mut o = objects();
    o.secrets.clear();
    let p = pod("vol-missing", "");
    let e = setup_pod_volumes(&g.host, &PodContext::new(&p, &o)).expect_err("missing secret");
    assert_eq!(
        e.to_string(),
        "MountVolume.SetUp failed for volume \"sec\" : secret \"sec\" not found"
    );
    assert!(mounts_under(&g.host.root).is_empty());
}

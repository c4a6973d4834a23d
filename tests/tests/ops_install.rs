#![cfg(feature = "root")]
//! Root tests of the install artefacts: `scripts/install` and `scripts/uninstall` into a
//! temporary root (DESTDIR), twice each: the file list, modes and contents, the systemd units
//! (Delegate=yes, KillMode=process, the install paths, `systemd-analyze verify`), the daemons'
//! flag files accepted by the binaries, a conflist whose cniVersion every plugin in it supports
//! (hako-cni and Debian's reference portmap), edited configuration kept until `--purge`, a
//! custom prefix; `scripts/demo`'s package list without the VM lane's qemu and kernel; and the
//! agent's error naming the plugin and versions when Debian's portmap refuses a cniVersion.
//! Needs `cargo build -p hako-agent -p hako-shim -p hako-cni -p hako-proxier` (same target dir).

use hako_tests::agent::target_bin;
use hako_tests::netns::require_root;
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo root")
        .to_path_buf()
}

fn bin_dir() -> PathBuf {
    let agent = target_bin("hako-agent", "HAKO_AGENT_BIN");
    let dir = agent.parent().expect("bin dir").to_path_buf();
    for b in ["hako-shim", "hako-cni", "hako-proxy"] {
        assert!(
            dir.join(b).exists(),
            "{b} missing in {}: cargo build -p hako-agent -p hako-shim -p hako-cni -p hako-proxier",
            dir.display()
        );
    }
    dir
}

fn run(script: &str, args: &[&str], env: &[(&str, &Path)]) -> Output {
    let mut c = Command::new(repo().join("scripts").join(script));
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c
        .output()
        .unwrap_or_else(|e| panic!("run scripts/{script}: {e}"));
    out
}

fn ok(script: &str, args: &[&str], env: &[(&str, &Path)]) -> String {
    let out = run(script, args, env);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "scripts/{script} {args:?} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Every regular file under `root`: relative path → (mode, contents).
fn tree(root: &Path) -> BTreeMap<String, (u32, Vec<u8>)> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, (u32, Vec<u8>)>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            if m.is_dir() {
                walk(root, &p, out);
            } else {
                let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
                out.insert(
                    rel,
                    (
                        m.permissions().mode() & 0o7777,
                        std::fs::read(&p).unwrap_or_default(),
                    ),
                );
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

const FILES: &[(&str, u32)] = &[
    ("etc/cni/net.d/10-hako.conflist", 0o644),
    ("etc/default/hako-agent", 0o644),
    ("etc/default/hako-proxy", 0o644),
    ("etc/systemd/system/hako-agent.service", 0o644),
    ("etc/systemd/system/hako-proxy.service", 0o644),
    ("opt/cni/bin/hako-cni", 0o755),
    ("usr/local/bin/hako-agent", 0o755),
    ("usr/local/bin/hako-proxy", 0o755),
    ("usr/local/bin/hako-shim", 0o755),
];

/// The value of `Key=` lines in a unit's `[Service]` section.
fn service_keys(unit: &str) -> Vec<(String, String)> {
    let mut in_service = false;
    let mut out = Vec::new();
    for l in unit.lines() {
        let l = l.trim();
        if l.starts_with('[') {
            in_service = l == "[Service]";
        } else if in_service && !l.starts_with('#') {
            if let Some((k, v)) = l.split_once('=') {
                out.push((k.to_string(), v.to_string()));
            }
        }
    }
    out
}

/// `HAKO_..._ARGS="..."` of a flags file, split into words.
fn args_of(file: &str) -> Vec<String> {
    let line = file
        .lines()
        .find(|l| l.starts_with("HAKO_") && l.contains("_ARGS="))
        .expect("an ARGS line");
    let v = line.split_once('=').unwrap().1.trim_matches('"');
    v.split_whitespace().map(str::to_string).collect()
}

/// The plugin's `supportedVersions` (CNI_COMMAND=VERSION).
fn supported_versions(plugin: &Path) -> Vec<String> {
    use std::io::Write;
    let mut c = Command::new(plugin)
        .env_clear()
        .env("CNI_COMMAND", "VERSION")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e}", plugin.display()));
    c.stdin
        .take()
        .unwrap()
        .write_all(br#"{"cniVersion":"0.4.0"}"#)
        .unwrap();
    let out = c.wait_with_output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{} VERSION: {e}", plugin.display()));
    v["supportedVersions"]
        .as_array()
        .expect("supportedVersions")
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn install_and_uninstall_into_a_temporary_root_twice_each() {
    require_root();
    let bins = bin_dir();
    let root = tempfile::Builder::new()
        .prefix("hako-ops-install-")
        .tempdir()
        .unwrap();
    let d = root.path();
    let bin_arg = bins.to_str().unwrap();

    // First install through DESTDIR in the environment, the second through --destdir.
    let first = ok("install", &["--bin-dir", bin_arg], &[("DESTDIR", d)]);
    let t1 = tree(d);
    let second = ok(
        "install",
        &["--bin-dir", bin_arg, "--destdir", d.to_str().unwrap()],
        &[],
    );
    let t2 = tree(d);
    assert_eq!(t1, t2, "a second install changed the tree");
    assert!(
        first.contains("installed  /usr/local/bin/hako-agent"),
        "{first}"
    );
    assert!(!second.contains("installed"), "second install:\n{second}");
    let names: Vec<&str> = t1.keys().map(String::as_str).collect();
    let want: Vec<&str> = FILES.iter().map(|(f, _)| *f).collect();
    assert_eq!(names, want);
    for (f, mode) in FILES {
        assert_eq!(t1[*f].0, *mode, "mode of {f}");
    }
    for (f, b) in [
        ("usr/local/bin/hako-agent", "hako-agent"),
        ("usr/local/bin/hako-shim", "hako-shim"),
        ("usr/local/bin/hako-proxy", "hako-proxy"),
        ("opt/cni/bin/hako-cni", "hako-cni"),
    ] {
        assert!(
            t1[f].1 == std::fs::read(bins.join(b)).unwrap(),
            "{f} is not {b}"
        );
    }
    for dir in ["etc/hako/manifests", "etc/hako/certs.d"] {
        assert!(d.join(dir).is_dir(), "{dir}");
    }
    // Nothing staged names the staging dir: the files are right for the real root.
    let staged = d.to_string_lossy().into_owned();
    for (f, (_, content)) in &t1 {
        if f.ends_with("service") || f.starts_with("etc/default") || f.ends_with("conflist") {
            assert!(
                !String::from_utf8_lossy(content).contains(&staged),
                "{f} names {staged}"
            );
        }
    }

    // The units: the kubelet's/containerd's process model, the install paths.
    for (u, exec) in [
        ("hako-agent", "/usr/local/bin/hako-agent $HAKO_AGENT_ARGS"),
        ("hako-proxy", "/usr/local/bin/hako-proxy $HAKO_PROXY_ARGS"),
    ] {
        let unit =
            String::from_utf8_lossy(&t1[&format!("etc/systemd/system/{u}.service")].1).into_owned();
        let keys = service_keys(&unit);
        let has = |k: &str, v: &str| keys.iter().any(|(a, b)| a == k && b == v);
        assert!(has("ExecStart", exec), "{u}:\n{unit}");
        assert!(has("Delegate", "yes"), "{u}:\n{unit}");
        assert!(has("KillMode", "process"), "{u}:\n{unit}");
        assert!(has("EnvironmentFile", &format!("-/etc/default/{u}")), "{u}");
        assert!(has("Restart", "always"), "{u}");
        assert!(unit.contains("WantedBy=multi-user.target"), "{u}");
    }
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        assert!(first.contains("verified   the units"), "{first}");
    }

    // The flag files are accepted by the installed binaries (a typo'd flag fails here).
    let agent_args = args_of(&String::from_utf8_lossy(&t1["etc/default/hako-agent"].1));
    assert!(agent_args.contains(&"--registry-config-path".to_string()));
    let manifests = d.join("etc/hako/manifests");
    let mut args = agent_args.clone();
    let i = args
        .iter()
        .position(|a| a == "--pod-manifest-path")
        .expect("--pod-manifest-path");
    args[i + 1] = manifests.to_string_lossy().into_owned();
    let out = Command::new(d.join("usr/local/bin/hako-agent"))
        .args(&args)
        .arg("--dry-run")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "hako-agent {args:?} --dry-run: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let proxy_args = args_of(&String::from_utf8_lossy(&t1["etc/default/hako-proxy"].1));
    let out = Command::new(d.join("usr/local/bin/hako-proxy"))
        .args(&proxy_args)
        .arg("--help")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "hako-proxy {proxy_args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The conflist's cniVersion is one every plugin in it supports.
    let conf: serde_json::Value =
        serde_json::from_slice(&t1["etc/cni/net.d/10-hako.conflist"].1).unwrap();
    let version = conf["cniVersion"].as_str().unwrap();
    for p in conf["plugins"].as_array().unwrap() {
        let ty = p["type"].as_str().unwrap();
        let bin = [d.join("opt/cni/bin"), PathBuf::from("/usr/lib/cni")]
            .iter()
            .map(|dir| dir.join(ty))
            .find(|b| b.exists())
            .unwrap_or_else(|| {
                panic!("plugin {ty} not found (scripts/setup installs containernetworking-plugins)")
            });
        let supported = supported_versions(&bin);
        assert!(
            supported.iter().any(|v| v == version),
            "{} supports {supported:?}, the conflist asks for {version}",
            bin.display()
        );
    }

    // Uninstall twice: everything goes, the second run has nothing to do.
    let u1 = ok("uninstall", &[], &[("DESTDIR", d)]);
    assert!(u1.contains("removed    /usr/local/bin/hako-agent"), "{u1}");
    assert_eq!(tree(d), BTreeMap::new(), "files left after uninstall");
    assert!(!d.join("etc/hako").exists());
    let u2 = ok("uninstall", &["--destdir", d.to_str().unwrap()], &[]);
    assert!(!u2.contains("removed"), "second uninstall:\n{u2}");
}

#[test]
fn edited_configuration_is_kept_until_purge() {
    require_root();
    let bins = bin_dir();
    let root = tempfile::tempdir().unwrap();
    let d = root.path();
    let bin_arg = bins.to_str().unwrap();
    ok("install", &["--bin-dir", bin_arg], &[("DESTDIR", d)]);
    let flags = d.join("etc/default/hako-agent");
    let edited = "HAKO_AGENT_ARGS=\"--pod-manifest-path /srv/pods\"\n";
    std::fs::write(&flags, edited).unwrap();
    // An operator's manifest and hosts.toml stay through uninstall, too.
    std::fs::write(d.join("etc/hako/manifests/pod.yaml"), "kind: Pod\n").unwrap();

    let again = ok("install", &["--bin-dir", bin_arg], &[("DESTDIR", d)]);
    assert!(
        again.contains("kept       /etc/default/hako-agent"),
        "{again}"
    );
    assert_eq!(std::fs::read_to_string(&flags).unwrap(), edited);

    let u = ok("uninstall", &[], &[("DESTDIR", d)]);
    assert!(u.contains("kept       /etc/default/hako-agent"), "{u}");
    let left: Vec<String> = tree(d).into_keys().collect();
    assert_eq!(
        left,
        ["etc/default/hako-agent", "etc/hako/manifests/pod.yaml"]
    );
    ok("uninstall", &["--purge"], &[("DESTDIR", d)]);
    let left: Vec<String> = tree(d).into_keys().collect();
    assert_eq!(left, ["etc/hako/manifests/pod.yaml"]);
}

#[test]
fn a_custom_prefix_reaches_the_units_and_flags() {
    require_root();
    let bins = bin_dir();
    let root = tempfile::tempdir().unwrap();
    let d = root.path();
    let args = ["--bin-dir", bins.to_str().unwrap(), "--prefix", "/opt/hako"];
    ok("install", &args, &[("DESTDIR", d)]);
    assert!(d.join("opt/hako/bin/hako-agent").is_file());
    assert!(!d.join("usr/local/bin/hako-agent").exists());
    let unit = std::fs::read_to_string(d.join("etc/systemd/system/hako-agent.service")).unwrap();
    assert!(
        unit.contains("ExecStart=/opt/hako/bin/hako-agent $HAKO_AGENT_ARGS"),
        "{unit}"
    );
    let flags = std::fs::read_to_string(d.join("etc/default/hako-agent")).unwrap();
    assert!(
        flags.contains("--shim-binary /opt/hako/bin/hako-shim"),
        "{flags}"
    );
    ok("uninstall", &["--prefix", "/opt/hako"], &[("DESTDIR", d)]);
    assert_eq!(tree(d), BTreeMap::new());
}

#[test]
fn the_demo_installs_only_its_own_packages() {
    let list = |args: &[&str]| -> Vec<String> {
        ok("setup", args, &[]).lines().map(str::to_string).collect()
    };
    let demo = list(&["--list", "--demo"]);
    let all = list(&["--list"]);
    assert!(!demo.is_empty());
    for p in &demo {
        for vm in ["qemu", "linux-image", "initramfs", "cpio", "crun", "runc"] {
            assert!(!p.contains(vm), "the demo's packages include {p}");
        }
        assert!(all.contains(p), "{p} missing from the full list");
    }
    // The test lane keeps its packages.
    for p in ["qemu-system-x86", "linux-image-amd64", "cpio", "crun"] {
        assert!(all.iter().any(|a| a == p), "{p} dropped from scripts/setup");
    }
    // The demo installs through the demo list, never the full one.
    let demo_script = std::fs::read_to_string(repo().join("scripts/demo")).unwrap();
    let calls: Vec<&str> = demo_script
        .lines()
        .filter(|l| !l.trim_start().starts_with('#') && l.contains("scripts/setup"))
        .collect();
    assert!(!calls.is_empty(), "scripts/demo never runs scripts/setup");
    for c in calls {
        assert!(c.contains("scripts/setup --demo"), "{c}");
    }
}

/// The agent's error for a list whose cniVersion Debian's reference portmap does not support
/// (the old example conflist's 1.1.0) names the plugin, its binary and both sides' versions.
#[test]
fn a_cni_version_mismatch_with_the_reference_portmap_is_named() {
    use hako_agent::sys::cni::{Attachment, CniConfig, CniError};
    require_root();
    let portmap = Path::new("/usr/lib/cni/portmap");
    assert!(
        portmap.exists(),
        "{} missing (scripts/setup installs containernetworking-plugins)",
        portmap.display()
    );
    let d = tempfile::tempdir().unwrap();
    let conf = d.path().join("net.d");
    std::fs::create_dir_all(&conf).unwrap();
    let list = conf.join("10-hako.conflist");
    std::fs::write(
        &list,
        r#"{"cniVersion": "1.1.0", "name": "hako",
            "plugins": [{"type": "portmap", "capabilities": {"portMappings": true}}]}"#,
    )
    .unwrap();
    let cni = CniConfig {
        conf_dir: conf,
        bin_dirs: vec![PathBuf::from("/usr/lib/cni")],
        cache_dir: d.path().join("cache"),
        timeout: std::time::Duration::from_secs(30),
    };
    // The plugin refuses the version before it looks at the namespace.
    let a = Attachment {
        container_id: "hako-ops-install-version".into(),
        netns: "/proc/self/ns/net".into(),
        ifname: "eth0".into(),
        pod_namespace: "default".into(),
        pod_name: "p".into(),
        pod_uid: "u".into(),
    };
    let e = cni.add(&a).unwrap_err();
    let CniError::IncompatibleVersion(m) = &e else {
        panic!("not a version mismatch: {e:?}")
    };
    assert_eq!(m.plugin, "portmap");
    assert_eq!(m.config_version, "1.1.0");
    assert!(m.supported.iter().any(|v| v == "1.0.0"), "{m:?}");
    assert!(!m.supported.iter().any(|v| v == "1.1.0"), "{m:?}");
    let text = e.to_string();
    eprintln!("{text}");
    for want in [
        "\"portmap\"",
        "/usr/lib/cni/portmap",
        "\"1.1.0\"",
        "1.0.0",
        &list.display().to_string(),
    ] {
        assert!(text.contains(want), "{want:?} not in {text}");
    }
}

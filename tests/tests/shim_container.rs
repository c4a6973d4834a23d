#![cfg(feature = "root")]
//! Root tests of hako-shim containers from a busybox rootfs: PID 1, hostname, ids,
//! capabilities, read-only rootfs, masked paths, volumes, exec, stop, cgroup limits, OOM,
//! CRI logs and rotation, re-adoption, whiteouts, and clean failures.

mod shim_support;

use hako_shim::client::ClientError;
use hako_shim::protocol::ExecRequest;
use hako_shim::spec::{LogSpec, Mount, Rootfs, User};
use hako_shim::state::Status;
use shim_support::Env;
use std::path::Path;
use std::time::Duration;

fn exec(c: &hako_shim::client::ShimClient, args: &[&str]) -> hako_shim::protocol::ExecResult {
    c.exec(ExecRequest {
        args: args.iter().map(|s| s.to_string()).collect(),
        timeout_ms: Some(30_000),
        ..Default::default()
    })
    .expect("exec")
}

fn cgroup_leaf_exists(env: &Env, id: &str) -> bool {
    ["memory", "pids", "cpu"].iter().any(|c| {
        Path::new("/sys/fs/cgroup")
            .join(c)
            .join(&env.cgroup_parent)
            .join(format!("kubepods/burstable/pod-{id}/{id}"))
            .exists()
    })
}

#[test]
fn entrypoint_is_pid1_with_hostname_ids_caps_and_cri_logs() {
    let env = Env::new("basic");
    let mut spec = env.spec(
        "basic",
        &[
            "sh",
            "-c",
            "echo pid=$$; hostname; id -u; id -g; grep CapEff /proc/self/status; echo oops >&2; exit 3",
        ],
    );
    spec.hostname = Some("hk-basic".into());
    spec.process.user = User {
        spec: "1234:4321".into(),
        additional_gids: vec![],
    };
    let (st, recs) = env.run(&spec);
    assert_eq!(st.exit_code, Some(3));
    assert_eq!(st.reason.as_deref(), Some("Error"));
    let out = env.stdout("basic");
    assert_eq!(out[..4], ["pid=1", "hk-basic", "1234", "4321"]);
    // Non-root without ambient capabilities: nothing effective after exec (as containerd).
    assert_eq!(out[4], "CapEff:\t0000000000000000");
    assert!(recs
        .iter()
        .any(|r| r.stream == "stderr" && r.line == "oops" && !r.partial));

    // Root with an explicit set: CapEff is exactly that set.
    let mut spec = env.spec("caps", &["grep", "CapEff", "/proc/self/status"]);
    spec.process.capabilities = Some(vec![
        "CAP_CHOWN".into(),
        "KILL".into(),
        "NET_BIND_SERVICE".into(),
    ]);
    let (st, _) = env.run(&spec);
    assert_eq!(st.exit_code, Some(0));
    let want = (1u64 << 0) | (1 << 5) | (1 << 10);
    assert_eq!(env.stdout("caps"), vec![format!("CapEff:\t{want:016x}")]);

    // Default set: Docker's well-known mask.
    let (_, _) = env.run(&env.spec("defcaps", &["grep", "CapEff", "/proc/self/status"]));
    assert_eq!(env.stdout("defcaps"), vec!["CapEff:\t00000000a80425fb"]);
}

#[test]
fn user_names_resolve_and_unknown_user_fails_cleanly() {
    let env = Env::new("user");
    let mut spec = env.spec("named", &["sh", "-c", "id -u; id -g; id -G; echo $HOME"]);
    spec.process.user.spec = "app".into();
    let (st, _) = env.run(&spec);
    assert_eq!(st.exit_code, Some(0));
    assert_eq!(
        env.stdout("named"),
        ["1000", "1000", "1000 10", "/home/app"]
    );

    let mut spec = env.spec("nouser", &["true"]);
    spec.process.user.spec = "nobody-here".into();
    spec.cgroup = Some(env.cgroup("nouser"));
    let err = env.create(&spec).expect_err("unknown user must fail");
    assert!(
        matches!(&err, ClientError::Create(id, m) if id == "nouser" && m.contains("unknown user name \"nobody-here\"")),
        "{err}"
    );
    assert!(!env.rt.dir("nouser").exists());
    assert!(!cgroup_leaf_exists(&env, "nouser"));
}

#[test]
fn readonly_rootfs_masked_and_readonly_proc_paths() {
    let env = Env::new("ro");
    // A masked file that exists on this host.
    let masked = [
        "/proc/kcore",
        "/proc/timer_list",
        "/proc/sched_debug",
        "/proc/keys",
    ]
    .into_iter()
    .find(|p| Path::new(p).exists())
    .expect("a maskable /proc file");
    let script = format!(
        "if touch /newfile 2>/dev/null; then echo rootfs-writable; else echo rootfs-ro; fi; \
         echo masked=$(cat {masked} | wc -c); \
         if echo 1 > /proc/sys/kernel/domainname 2>/dev/null; then echo procsys-rw; else echo procsys-ro; fi; \
         if touch /sys/x 2>/dev/null; then echo sys-rw; else echo sys-ro; fi; \
         touch /tmp/ok 2>/dev/null || echo tmp-ro"
    );
    let mut spec = env.spec("ro", &["sh", "-c", &script]);
    spec.readonly_rootfs = true;
    let (st, _) = env.run(&spec);
    assert_eq!(st.exit_code, Some(0));
    let out = env.stdout("ro");
    assert_eq!(out[..4], ["rootfs-ro", "masked=0", "procsys-ro", "sys-ro"]);
    assert!(out.contains(&"tmp-ro".to_string()), "{out:?}");
    assert!(!env.rootfs.join("newfile").exists());
}

#[test]
fn volumes_bind_ro_and_missing_source_fails_cleanly() {
    let env = Env::new("vol");
    let data = env.tmp.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join("hello"), "from-host\n").unwrap();
    let mut spec = env.spec(
        "vol",
        &[
            "sh",
            "-c",
            "cat /data/hello; echo x > /data/new || echo ro-ok; echo y > /rw/new",
        ],
    );
    let rw = env.tmp.path().join("rw");
    std::fs::create_dir(&rw).unwrap();
    spec.mounts = vec![
        Mount {
            destination: "/data".into(),
            source: data.display().to_string(),
            options: vec!["ro".into(), "rprivate".into()],
            ..Default::default()
        },
        Mount {
            destination: "/rw".into(),
            source: rw.display().to_string(),
            ..Default::default()
        },
    ];
    // A symlink in the rootfs that points at the host's / must not carry a mount out.
    std::os::unix::fs::symlink("/", env.rootfs.join("evil")).unwrap();
    let escape = format!("hako-escape-{}", std::process::id());
    spec.mounts.push(Mount {
        destination: format!("/evil/../evil/{escape}"),
        source: data.display().to_string(),
        options: vec!["ro".into()],
        ..Default::default()
    });
    let (st, _) = env.run(&spec);
    assert_eq!(st.exit_code, Some(0));
    assert_eq!(env.stdout("vol"), ["from-host", "ro-ok"]);
    assert!(
        !Path::new("/").join(&escape).exists(),
        "mount target escaped the rootfs"
    );
    assert!(env.rootfs.join(&escape).is_dir());
    assert_eq!(std::fs::read_to_string(rw.join("new")).unwrap(), "y\n");
    assert!(!data.join("new").exists());

    let mut spec = env.spec("missing", &["true"]);
    spec.cgroup = Some(env.cgroup("missing"));
    spec.mounts = vec![Mount {
        destination: "/x".into(),
        source: "/nonexistent/hako/source".into(),
        ..Default::default()
    }];
    let err = env.create(&spec).expect_err("missing source must fail");
    assert!(
        err.to_string()
            .contains("mount source /nonexistent/hako/source does not exist"),
        "{err}"
    );
    assert!(!env.rt.dir("missing").exists());
    assert!(!cgroup_leaf_exists(&env, "missing"));
}

#[test]
fn exec_joins_namespaces_and_cgroup() {
    let env = Env::new("exec");
    let mut spec = env.spec("exec", &["sleep", "1000"]);
    spec.hostname = Some("hk-exec".into());
    spec.cgroup = Some(env.cgroup("exec"));
    let c = env.create(&spec).unwrap();
    assert_eq!(c.state().unwrap().status, Status::Created);
    let st = c.start().unwrap();
    assert_eq!(st.status, Status::Running);
    let r = exec(
        &c,
        &[
            "sh",
            "-c",
            "hostname; cat /proc/1/cmdline | tr '\\0' ' '; echo; cat /proc/self/cgroup; exit 7",
        ],
    );
    assert_eq!(r.exit_code, 7);
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines[0], "hk-exec");
    assert_eq!(lines[1].trim(), "sleep 1000");
    let leaf = format!("/{}/kubepods/burstable/pod-exec/exec", env.cgroup_parent);
    assert!(
        r.stdout
            .lines()
            .any(|l| l.contains(":memory:") && l.ends_with(&leaf)),
        "{}",
        r.stdout
    );
    // Same mount, uts, ipc and net namespaces as PID 1.
    for ns in ["mnt", "uts", "ipc", "net", "pid"] {
        let host = std::fs::read_link(format!("/proc/{}/ns/{ns}", st.pid)).unwrap();
        let inner = exec(&c, &["readlink", &format!("/proc/self/ns/{ns}")]);
        assert_eq!(inner.stdout.trim(), host.to_string_lossy(), "{ns}");
    }
    // With a terminal from the container's own devpts, and without.
    let script = "tty; if test -t 0; then echo tty-yes; else echo tty-no; fi";
    let r = c
        .exec(ExecRequest {
            args: vec!["sh".into(), "-c".into(), script.into()],
            tty: true,
            timeout_ms: Some(30_000),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(r.exit_code, 0);
    assert_eq!(r.stdout, "/dev/pts/0\r\ntty-yes\r\n");
    let r = exec(&c, &["sh", "-c", script]);
    assert!(r.stdout.ends_with("tty-no\n"), "{r:?}");
    let missing = c.exec(ExecRequest {
        args: vec!["no-such-tool".into()],
        ..Default::default()
    });
    assert!(missing.is_err());
    c.kill(9).unwrap();
    let st = c.wait(Some(Duration::from_secs(30))).unwrap();
    assert_eq!((st.status, st.exit_code), (Status::Stopped, Some(137)));
    c.delete().unwrap();
    assert!(!cgroup_leaf_exists(&env, "exec"));
    assert!(!env.rt.dir("exec").exists());
}

#[test]
fn stop_honours_grace_then_kills() {
    let env = Env::new("stop");
    // PID 1 without a SIGTERM handler ignores SIGTERM: killed after the grace period.
    let c = env
        .create(&env.spec("stubborn", &["sleep", "1000"]))
        .unwrap();
    c.start().unwrap();
    let t = std::time::Instant::now();
    let st = c.stop(Duration::from_millis(500)).unwrap();
    assert!(
        t.elapsed() >= Duration::from_millis(500),
        "killed before the grace period"
    );
    assert_eq!((st.status, st.exit_code), (Status::Stopped, Some(137)));
    c.delete().unwrap();

    // A handler: exits on SIGTERM within the grace period with its own code.
    let c = env
        .create(&env.spec(
            "polite",
            &[
                "sh",
                "-c",
                "trap 'echo bye; exit 3' TERM; echo ready; while true; do sleep 0.1; done",
            ],
        ))
        .unwrap();
    c.start().unwrap();
    // Wait until the trap is installed.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !env.stdout("polite").contains(&"ready".to_string()) {
        assert!(std::time::Instant::now() < deadline, "never ready");
        std::thread::sleep(Duration::from_millis(20));
    }
    let st = c.stop(Duration::from_secs(60)).unwrap();
    assert_eq!(st.exit_code, Some(3));
    c.delete().unwrap();
    assert_eq!(env.stdout("polite"), ["ready", "bye"]);
}

#[test]
fn pids_limit_stops_a_fork_bomb() {
    let env = Env::new("pids");
    let mut spec = env.spec(
        "bomb",
        &["sh", "-c", "n=0; for i in $(seq 1 40); do sleep 30 & n=$((n+1)); done; echo started; cat /sys/fs/cgroup/pids/pids.max 2>/dev/null; exit 0"],
    );
    let mut cg = env.cgroup("bomb");
    cg.pids_limit = Some(10);
    spec.cgroup = Some(cg);
    let c = env.create(&spec).unwrap();
    let st = c.start().unwrap();
    let done = c.wait(Some(Duration::from_secs(60))).unwrap();
    assert_eq!(done.status, Status::Stopped);
    let recs = env.records("bomb");
    assert!(
        recs.iter()
            .any(|r| r.stream == "stderr" && r.line.contains("fork")),
        "no fork failure logged: {recs:?}"
    );
    let _ = st;
    c.delete().unwrap();
}

#[test]
fn memory_limit_leads_to_oomkilled() {
    let env = Env::new("oom");
    let mut spec = env.spec(
        "oom",
        &[
            "sh",
            "-c",
            "x=$(head -c 200000000 /dev/zero | tr '\\0' a); echo survived",
        ],
    );
    let mut cg = env.cgroup("oom");
    cg.memory_limit = Some(32 << 20);
    spec.cgroup = Some(cg);
    let (st, _) = env.run(&spec);
    assert_eq!(st.reason.as_deref(), Some("OOMKilled"), "{st:?}");
    assert!(!env.stdout("oom").contains(&"survived".to_string()));
}

#[test]
fn survives_its_starter_and_is_readopted() {
    let env = Env::new("adopt");
    // The shim is started by a short-lived `sh`, which exits at once.
    let spec = env.spec("adopt", &["sleep", "1000"]);
    let dir = env.rt.dir("adopt");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("spec.json"), serde_json::to_vec(&spec).unwrap()).unwrap();
    env.track("adopt");
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "'{}' create --state-dir '{}' >/dev/null",
            shim_support::shim_bin().display(),
            dir.display()
        ))
        .status()
        .unwrap();
    assert!(out.success());
    // A fresh runtime (as after an agent restart) finds and drives the container.
    let rt2 = hako_shim::client::Runtime::new(shim_support::shim_bin(), &env.rt.state_root);
    let listed = rt2.list().unwrap();
    let st = listed.iter().find(|s| s.id == "adopt").expect("listed");
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", st.shim_pid)).unwrap();
    let ppid: i32 = stat
        .rsplit(") ")
        .next()
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert_ne!(ppid, std::process::id() as i32, "shim not reparented");
    let c = rt2.client("adopt");
    c.start().unwrap();
    assert_eq!(c.state().unwrap().status, Status::Running);
    let st = c.stop(Duration::from_millis(100)).unwrap();
    assert_eq!(st.exit_code, Some(137));
    c.delete().unwrap();
    assert!(rt2.list().unwrap().iter().all(|s| s.id != "adopt"));
}

#[test]
fn logs_rotate_at_the_size_limit() {
    let env = Env::new("rot");
    let mut spec = env.spec(
        "rot",
        &["sh", "-c", "for i in $(seq 1 300); do echo line-$i; done"],
    );
    spec.log = Some(LogSpec {
        path: env.log_path("rot"),
        max_size: 4096,
        max_files: 2,
    });
    let (st, _) = env.run(&spec);
    assert_eq!(st.exit_code, Some(0));
    // The kubelet's rule: max_files counts the current file, rotated ones are
    // `0.log.<YYYYMMDD-HHMMSS>` (with `.N` when one second sees several rotations).
    let p = env.log_path("rot");
    let dir = p.parent().unwrap();
    let rotated: Vec<std::path::PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|f| {
            f.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("0.log."))
        })
        .collect();
    assert_eq!(rotated.len(), 1, "{rotated:?}");
    for f in std::iter::once(p.clone()).chain(rotated) {
        let text = std::fs::read_to_string(&f).unwrap();
        assert!(text.len() <= 4096, "{} too big", f.display());
        for l in text.lines() {
            assert!(hako_shim::logs::parse_record(l).is_some(), "{l}");
        }
    }
    assert_eq!(
        env.stdout("rot").last().map(String::as_str),
        Some("line-300")
    );
}

#[test]
fn oom_score_adj_is_clamped_without_cap_sys_resource() {
    let env = Env::new("oomadj");
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .unwrap()
        .trim();
    let has = u64::from_str_radix(eff, 16).unwrap() & (1 << 24) != 0; // CAP_SYS_RESOURCE
    let cur: i32 = std::fs::read_to_string("/proc/self/oom_score_adj")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    for (id, req) in [("guaranteed", -997), ("besteffort", 1000)] {
        let mut spec = env.spec(id, &["sleep", "1000"]);
        spec.process.oom_score_adj = Some(req);
        let c = env.create(&spec).unwrap();
        let st = c.start().unwrap();
        let got: i32 = std::fs::read_to_string(format!("/proc/{}/oom_score_adj", st.pid))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let want = if req < cur && !has { cur } else { req };
        assert_eq!(got, want, "{id}");
        assert_eq!(st.oom_score_adj, Some(want));
        assert_eq!(st.oom_score_adj_clamped, want != req);
        c.delete().unwrap();
    }
}

#[test]
fn whiteouts_and_opaque_dirs_from_layers_are_honoured() {
    let env = Env::new("wh");
    let build = |files: &[(&str, Option<&str>)]| -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, content) in files {
            let mut h = tar::Header::new_gnu();
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            match content {
                Some(c) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_size(c.len() as u64);
                    h.set_mode(0o644);
                    b.append_data(&mut h, path, c.as_bytes()).unwrap();
                }
                None => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_size(0);
                    h.set_mode(0o755);
                    b.append_data(&mut h, path, &[][..]).unwrap();
                }
            }
        }
        b.into_inner().unwrap()
    };
    // Layer 0: the busybox tree (plain tar); layer 1 (gzip): files; layer 2 deletes some.
    let mut base = tar::Builder::new(Vec::new());
    base.follow_symlinks(false);
    base.append_dir_all(".", &env.rootfs).unwrap();
    let base = base.into_inner().unwrap();
    let l1 = build(&[
        ("etc/removed", Some("x")),
        ("etc/kept", Some("k")),
        ("opq/", None),
        ("opq/old", Some("o")),
    ]);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &l1).unwrap();
    let l1 = gz.finish().unwrap();
    let l2 = build(&[
        ("etc/.wh.removed", Some("")),
        ("opq/.wh..wh..opq", Some("")),
        ("opq/new", Some("n")),
    ]);
    let mut layers = Vec::new();
    for (i, data) in [base, l1, l2].into_iter().enumerate() {
        let d = env.tmp.path().join(format!("layer{i}"));
        std::fs::create_dir(&d).unwrap();
        hako_shim::layer::unpack(&data[..], &d).unwrap();
        layers.push(d);
    }
    let mut spec = env.spec(
        "wh",
        &[
            "sh",
            "-c",
            "ls /etc; echo ---; ls /opq; echo changed > /etc/kept",
        ],
    );
    spec.rootfs = Rootfs::Layers(layers.clone());
    let (st, _) = env.run(&spec);
    assert_eq!(st.exit_code, Some(0));
    let out = env.stdout("wh");
    let sep = out.iter().position(|l| l == "---").unwrap();
    assert!(out[..sep].contains(&"kept".to_string()));
    assert!(!out[..sep].contains(&"removed".to_string()), "{out:?}");
    assert_eq!(out[sep + 1..], ["new"]);
    // The write went to the container's upper dir, not the shared layer.
    assert_eq!(
        std::fs::read_to_string(layers[1].join("etc/kept")).unwrap(),
        "k"
    );
}

#[test]
fn seccomp_runtime_default_refuses_unshare() {
    let env = Env::new("seccomp");
    let script = "grep '^Seccomp:' /proc/self/status; if unshare -U true 2>/dev/null; then echo unshare-ok; else echo unshare-refused; fi";
    let mut spec = env.spec("confined", &["sh", "-c", script]);
    spec.seccomp = hako_shim::seccomp::SeccompProfile::RuntimeDefault;
    spec.process.no_new_privileges = true;
    let c = env.create(&spec).unwrap();
    c.start().unwrap();
    assert_eq!(
        c.wait(Some(Duration::from_secs(30))).unwrap().exit_code,
        Some(0)
    );
    assert_eq!(env.stdout("confined"), ["Seccomp:\t2", "unshare-refused"]);
    c.delete().unwrap();
    let (st, _) = env.run(&env.spec("unconfined", &["sh", "-c", script]));
    assert_eq!(st.exit_code, Some(0));
    assert_eq!(env.stdout("unconfined"), ["Seccomp:\t0", "unshare-ok"]);

    let mut spec = env.spec("confined-exec", &["sleep", "1000"]);
    spec.seccomp = hako_shim::seccomp::SeccompProfile::RuntimeDefault;
    let c = env.create(&spec).unwrap();
    c.start().unwrap();
    let r = exec(&c, &["sh", "-c", script]);
    assert_eq!(r.stdout, "Seccomp:\t2\nunshare-refused\n");
    c.delete().unwrap();
}

#[test]
fn force_delete_cleans_up_after_a_dead_shim() {
    let env = Env::new("force");
    let mut spec = env.spec("orphan", &["sleep", "1000"]);
    spec.cgroup = Some(env.cgroup("orphan"));
    let c = env.create(&spec).unwrap();
    let st = c.start().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(st.shim_pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // The shim is gone; the container runs on until force_delete.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while c.state().is_ok() {
        assert!(std::time::Instant::now() < deadline, "shim still answers");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(matches!(c.state(), Err(ClientError::Unreachable(..))));
    assert_eq!(c.recorded_state().unwrap().status, Status::Running);
    env.rt.force_delete("orphan").unwrap();
    let gone = |pid: i32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.contains(") Z "))
            .unwrap_or(true)
    };
    while !gone(st.pid) {
        assert!(std::time::Instant::now() < deadline, "container still runs");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!env.rt.dir("orphan").exists());
    assert!(!cgroup_leaf_exists(&env, "orphan"));
}

#[test]
fn runs_an_oci_bundle_from_the_command_line() {
    let env = Env::new("bundle");
    let bundle = env.tmp.path().join("bundle");
    std::fs::create_dir(&bundle).unwrap();
    let config = serde_json::json!({
        "ociVersion": "1.0.2",
        "process": {"user": {"uid": 0, "gid": 0}, "args": ["sh", "-c", "echo from-bundle; hostname"],
                    "env": ["PATH=/bin"], "cwd": "/"},
        "root": {"path": env.rootfs, "readonly": true},
        "hostname": "hk-bundle",
        "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "uts"}, {"type": "ipc"}],
                  "cgroupsPath": format!("{}/bundle", env.cgroup_parent)}
    });
    std::fs::write(bundle.join("config.json"), config.to_string()).unwrap();
    env.track("bundle");
    let dir = env.rt.dir("bundle");
    let out = std::process::Command::new(shim_support::shim_bin())
        .args(["create", "--state-dir"])
        .arg(&dir)
        .arg("--bundle")
        .arg(&bundle)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let c = env.rt.client("bundle");
    c.start().unwrap();
    let st = c.wait(Some(Duration::from_secs(30))).unwrap();
    assert_eq!(st.exit_code, Some(0));
    assert!(!st.cgroup_dirs.is_empty());
    assert_eq!(st.reason.as_deref(), Some("Completed"));
    c.delete().unwrap();
    assert!(!dir.exists());
}

//! Root tests of subPath and mount-destination confinement (CVE-2017-1002101,
//! CVE-2021-25741, CVE-2021-30465 shapes): a container that swaps a shared volume's directory
//! for a symlink while other containers mount a subPath of it; a subPath that is a symlink to
//! the host; rootfs symlinks (absolute, chained past the kernel's limit, swapped during the
//! mount) under mount destinations. Each checks that nothing is created or mounted outside the
//! volume or the rootfs.
#![cfg(feature = "root")]

mod shim_support;

use hako_shim::spec::Mount;
use hako_tests::agent::AgentEnv;
use shim_support::Env;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(90);

/// Names of the entries of a directory, sorted.
fn ls(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Every CRI log file under `dir` with its contents.
fn logs_under(dir: &Path) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "log") {
                out.push((p.clone(), std::fs::read_to_string(&p).unwrap_or_default()));
            }
        }
    }
    out
}

/// A host directory the test owns that a symlink in a volume points at: it holds one file
/// (`SECRET`) and must hold exactly that at the end.
fn sentinel(env: &AgentEnv) -> PathBuf {
    let s = env.tmp.path().join("host-sentinel");
    std::fs::create_dir_all(&s).unwrap();
    std::fs::write(s.join("SECRET"), "host data\n").unwrap();
    s
}

#[test]
fn subpath_symlink_to_the_host_is_a_config_error_and_creates_nothing() {
    let mut env = AgentEnv::new("sp-link");
    let img = env.image("sleep");
    let shared = env.tmp.path().join("shared");
    std::fs::create_dir_all(&shared).unwrap();
    let s = sentinel(&env);
    std::os::unix::fs::symlink(&s, shared.join("esc")).unwrap();
    env.write_manifest(
        "p.yaml",
        &format!(
            r#"apiVersion: v1
kind: Pod
metadata: {{name: esc}}
spec:
  terminationGracePeriodSeconds: 1
  volumes: [{{name: shared, hostPath: {{path: "{shared}", type: Directory}}}}]
  containers:
  - name: mk
    image: "{img}"
    command: [sh, -c, "ls -a /m; sleep 3600"]
    volumeMounts: [{{name: shared, mountPath: /m, subPath: esc/newdir}}]
  - name: see
    image: "{img}"
    command: [sh, -c, "ls -a /m; sleep 3600"]
    volumeMounts: [{{name: shared, mountPath: /m, subPath: esc}}]
"#,
            shared = shared.display()
        ),
    );
    env.start();
    for (c, sub) in [("mk", "esc/newdir"), ("see", "esc")] {
        let st = env.wait_for(&format!("{c}: CreateContainerConfigError"), T, |e| {
            let s = e.container_status("esc", c)?;
            (s["state"]["waiting"]["reason"] == "CreateContainerConfigError").then_some(s)
        });
        let msg = st["state"]["waiting"]["message"].as_str().unwrap_or("");
        assert!(
            msg.contains(&format!("subPath {sub:?}")) && msg.contains("outside the volume"),
            "{c}: {msg}"
        );
    }
    // A few more sync rounds must not change anything either.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        ls(&s),
        ["SECRET"],
        "something was created outside the volume"
    );
    assert_eq!(ls(&shared), ["esc"]);
    for (p, text) in logs_under(&env.logs) {
        assert!(
            !text.contains("SECRET"),
            "{} saw the host: {text}",
            p.display()
        );
    }
}

#[test]
fn subpath_swapped_for_a_symlink_while_containers_start() {
    let mut env = AgentEnv::new("sp-race");
    let img = env.image("sleep");
    let shared = env.tmp.path().join("shared");
    std::fs::create_dir_all(&shared).unwrap();
    let s = sentinel(&env);
    // The attacker swaps /vol/d between a directory (renamed away and back, so it lives on)
    // and a symlink to the sentinel (an absolute host path: dangling in its own view, live in
    // the agent's).
    let attack = format!(
        "cd /vol; mkdir -p dd; while :; do mv dd d; mv d dd; ln -s {} d; rm d; done",
        s.display()
    );
    let volumes = format!(
        r#"  volumes: [{{name: shared, hostPath: {{path: "{}", type: Directory}}}}]"#,
        shared.display()
    );
    env.write_manifest(
        "attacker.yaml",
        &format!(
            r#"apiVersion: v1
kind: Pod
metadata: {{name: attacker}}
spec:
  terminationGracePeriodSeconds: 1
{volumes}
  containers:
  - name: swap
    image: "{img}"
    command: [sh, -c, "{attack}"]
    volumeMounts: [{{name: shared, mountPath: /vol}}]
"#
        ),
    );
    env.start();
    env.wait_running("attacker", T);
    // Two rounds of a pod with ten containers: five mount subPath d (which the attacker
    // swaps), five mount d/new-N (which must be created, inside the volume only).
    let mut started = 0;
    for round in 0..2 {
        let mut containers = String::new();
        for i in 0..5 {
            containers.push_str(&format!(
                r#"  - name: see-{i}
    image: "{img}"
    command: [sh, -c, "echo BEGIN; ls -a /m; echo END; sleep 3600"]
    volumeMounts: [{{name: shared, mountPath: /m, subPath: d}}]
  - name: mk-{i}
    image: "{img}"
    command: [sh, -c, "echo BEGIN; ls -a /m; echo END; sleep 3600"]
    volumeMounts: [{{name: shared, mountPath: /m, subPath: d/new-{round}-{i}}}]
"#
            ));
        }
        let name = format!("victim-{round}");
        env.write_manifest(
            "victim.yaml",
            &format!(
                r#"apiVersion: v1
kind: Pod
metadata: {{name: {name}}}
spec:
  terminationGracePeriodSeconds: 1
{volumes}
  containers:
{containers}"#
            ),
        );
        // Every container eventually starts (a start that meets the symlink is refused and
        // retried); each one that ran printed what it saw at its mountpoint.
        let deadline = Instant::now() + Duration::from_secs(150);
        loop {
            let running = (0..5)
                .flat_map(|i| [format!("see-{i}"), format!("mk-{i}")])
                .filter(|c| {
                    env.container_status(&name, c)
                        .is_some_and(|s| s["state"]["running"].is_object())
                })
                .count();
            if running == 10 || Instant::now() > deadline {
                if running < 10 {
                    eprintln!(
                        "{name}: {} of 10 running; status {}\nevents {:?}",
                        running,
                        env.record(&name)
                            .map(|r| r["pod"]["status"].clone())
                            .unwrap_or_default(),
                        env.events(&name)
                    );
                }
                started += running;
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        env.remove_manifest("victim.yaml");
        env.wait_for(&format!("{name} removed"), T, |e| {
            e.record(&name).is_none().then_some(())
        });
    }
    assert!(started >= 10, "only {started} of 20 containers started");
    // Give the last starts time to print.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        ls(&s),
        ["SECRET"],
        "something was created outside the volume"
    );
    let logs = logs_under(&env.logs);
    assert!(
        logs.iter().any(|(_, t)| t.contains("END")),
        "no container printed"
    );
    for (p, text) in &logs {
        assert!(
            !text.contains("SECRET"),
            "{} saw the host: {text}",
            p.display()
        );
    }
    // Removed pods leave no subPath mounts behind.
    let left: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(String::from))
        .filter(|m| m.contains("volume-subpaths"))
        .filter(|m| m.starts_with(&env.root.to_string_lossy().to_string()))
        .collect();
    assert!(left.is_empty(), "subPath mounts left: {left:?}");
}

#[test]
fn mount_destinations_resolve_inside_the_rootfs() {
    let env = Env::new("sp-dest");
    let host = env.tmp.path().join("host-side");
    std::fs::create_dir_all(&host).unwrap();
    std::fs::write(host.join("hosts"), "host file\n").unwrap();
    let pod_hosts = env.tmp.path().join("pod-hosts");
    std::fs::write(&pod_hosts, "pod hosts\n").unwrap();
    let data = env.tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("f"), "volume\n").unwrap();
    // The image's /etc/hosts is a symlink to an absolute host path; /deep is a chain of 41
    // symlinks (one more than the kernel follows) whose last one names the host directory.
    let etc_hosts = env.rootfs.join("etc/hosts");
    let _ = std::fs::remove_file(&etc_hosts);
    std::os::unix::fs::symlink(host.join("hosts"), &etc_hosts).unwrap();
    std::os::unix::fs::symlink(&host, env.rootfs.join("chain-41")).unwrap();
    for i in 0..41 {
        std::os::unix::fs::symlink(
            format!("chain-{}", i + 1),
            env.rootfs.join(format!("chain-{i}")),
        )
        .unwrap();
    }
    let mut spec = env.spec("dest", &["sh", "-c", "cat /etc/hosts; cat /data/f"]);
    spec.mounts = vec![
        Mount {
            destination: "/etc/hosts".into(),
            source: pod_hosts.display().to_string(),
            ..Default::default()
        },
        Mount {
            destination: "/data".into(),
            source: data.display().to_string(),
            options: vec!["ro".into()],
            ..Default::default()
        },
    ];
    let (st, _) = env.run(&spec);
    assert_eq!(st.exit_code, Some(0));
    assert_eq!(env.stdout("dest"), ["pod hosts", "volume"]);
    assert_eq!(
        std::fs::read_to_string(host.join("hosts")).unwrap(),
        "host file\n"
    );
    assert!(
        env.rootfs
            .join(host.strip_prefix("/").unwrap())
            .join("hosts")
            .is_file(),
        "the destination is made inside the rootfs"
    );

    // Past the symlink limit: an error, not a mount through the last link.
    let mut spec = env.spec("chain", &["true"]);
    spec.mounts = vec![Mount {
        destination: "/chain-0/made".into(),
        source: data.display().to_string(),
        ..Default::default()
    }];
    let r = env.create(&spec);
    assert!(r.is_err(), "a 41-link chain must not resolve");
    assert_eq!(
        ls(&host),
        ["hosts"],
        "created on the host through the chain"
    );
}

#[test]
fn mount_destination_swapped_during_setup_stays_inside() {
    // A second mount nested in a shared volume whose entry `sub` another process (here: this
    // test, standing for another container) keeps swapping for a symlink to a host directory:
    // `/vol/sub/x` must be made and mounted inside the rootfs every time.
    let env = Env::new("sp-swap");
    let shared = env.tmp.path().join("shared");
    let host = env.tmp.path().join("host-side");
    let inner = env.tmp.path().join("inner");
    for d in [&shared, &host, &inner] {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::write(inner.join("INNER"), "x").unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let swapper = {
        let (stop, shared, target) = (stop.clone(), shared.clone(), host.clone());
        std::thread::spawn(move || {
            let (sub, away) = (shared.join("sub"), shared.join("sub.away"));
            let _ = std::fs::create_dir(&sub);
            while !stop.load(Ordering::Relaxed) {
                // The directory is renamed away and back, so what is made in it stays.
                let _ = std::fs::rename(&sub, &away);
                let _ = std::os::unix::fs::symlink(&target, &sub);
                let _ = std::fs::remove_file(&sub);
                let _ = std::fs::rename(&away, &sub);
            }
        })
    };
    let mut escaped = Vec::new();
    for i in 0..40 {
        let id = format!("swap-{i}");
        let mut spec = env.spec(&id, &["sh", "-c", "ls /vol/sub/x"]);
        spec.mounts = vec![
            Mount {
                destination: "/vol".into(),
                source: shared.display().to_string(),
                ..Default::default()
            },
            Mount {
                destination: "/vol/sub/x".into(),
                source: inner.display().to_string(),
                ..Default::default()
            },
        ];
        // A start may fail, and the swapper may detach the nested mount (removing a
        // mountpoint of another mount namespace does that), but a container never shows
        // anything but the nested source there.
        let created = env.create(&spec);
        if let Err(e) = &created {
            eprintln!("{id}: {e}");
        }
        if let Ok(c) = created {
            c.start().expect("start");
            c.wait(Some(Duration::from_secs(30))).expect("wait");
            let out = env.stdout(&id);
            if out.iter().any(|l| l != "INNER") {
                escaped.push(format!("{id}: {out:?}"));
            }
            let _ = c.delete();
        }
        if !ls(&host).is_empty() {
            escaped.push(format!("{id}: created on the host: {:?}", ls(&host)));
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    swapper.join().unwrap();
    assert!(escaped.is_empty(), "{escaped:?}");
}

/// subPath bind mounts under the agent root (mount points, from /proc/self/mountinfo).
fn subpath_mounts(env: &AgentEnv) -> Vec<String> {
    let root = env.root.to_string_lossy().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(String::from))
        .filter(|m| m.starts_with(&root) && m.contains("/volume-subpaths/"))
        .collect()
}

#[test]
fn subpath_mounts_of_a_pod_removed_while_the_agent_was_down_are_cleaned() {
    let mut env = AgentEnv::new("sp-gone");
    let img = env.image("sleep");
    let shared = env.tmp.path().join("shared");
    std::fs::create_dir_all(&shared).unwrap();
    env.write_manifest(
        "p.yaml",
        &format!(
            r#"apiVersion: v1
kind: Pod
metadata: {{name: gone}}
spec:
  terminationGracePeriodSeconds: 1
  volumes: [{{name: shared, hostPath: {{path: "{}", type: Directory}}}}]
  containers:
  - name: c
    image: "{img}"
    command: [sh, -c, "echo hi > /m/file; sleep 3600"]
    volumeMounts: [{{name: shared, mountPath: /m, subPath: a/b}}]
"#,
            shared.display()
        ),
    );
    env.start();
    env.wait_running("gone", T);
    let m = subpath_mounts(&env);
    assert_eq!(m.len(), 1, "{m:?}");
    assert!(m[0].ends_with("/volume-subpaths/shared/c/0"), "{m:?}");
    env.wait_for("the container writes through the subPath", T, |_| {
        shared.join("a/b/file").exists().then_some(())
    });
    env.stop();
    env.remove_manifest("p.yaml");
    env.start();
    // The subPath mount goes, then the pod directory (only once nothing is mounted in it).
    env.wait_for(
        "the orphaned pod's subPath mount and directory removed",
        T,
        |e| (subpath_mounts(e).is_empty() && ls(&e.root.join("pods")).is_empty()).then_some(()),
    );
    // The volume's contents are untouched.
    assert_eq!(
        std::fs::read_to_string(shared.join("a/b/file")).unwrap(),
        "hi\n"
    );
}

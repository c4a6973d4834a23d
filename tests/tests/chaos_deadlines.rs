//! Deadlines on the pod sync and proxy paths (issue 16): a CNI plugin that hangs, an image
//! blob that stalls, an xtables lock held by someone else. Each must end in a clear error
//! within its bound, leave nothing behind, and recover once the fault is gone.
#![cfg(feature = "root")]

use hako_tests::agent::AgentEnv;
use std::path::{Path, PathBuf};
use std::time::Duration;

const T: Duration = Duration::from_secs(90);

/// Addresses host-local holds under `dir` (files named like an IPv4 address, any depth).
fn ipam_leases(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            out.extend(ipam_leases(&e.path()));
        } else if name.parse::<std::net::Ipv4Addr>().is_ok() {
            out.push(name);
        }
    }
    out
}

/// veth links in the agent's namespace.
fn veths(env: &AgentEnv) -> Vec<String> {
    env.ns
        .ip(&["-o", "link", "show", "type", "veth"])
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// Sandbox dirs whose `net` file is still a mounted namespace.
fn mounted_netns(env: &AgentEnv) -> Vec<PathBuf> {
    let dir = env.run.join("sandboxes");
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|d| {
                    let (Ok(a), Ok(b)) = (std::fs::metadata(d.join("net")), std::fs::metadata(d))
                    else {
                        return false;
                    };
                    std::os::unix::fs::MetadataExt::dev(&a)
                        != std::os::unix::fs::MetadataExt::dev(&b)
                })
                .collect()
        })
        .unwrap_or_default()
}

fn alive(pid: i32) -> bool {
    let st = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    !st.is_empty()
        && st
            .rsplit(')')
            .next()
            .and_then(|r| r.split_whitespace().next())
            != Some("Z")
}

/// The second plugin of the list hangs on ADD while `<bin>/hang-on` exists (and forks a
/// sleeper, recording its pid and its own); otherwise it passes the previous result through
/// by printing nothing.
const HANG_PLUGIN: &str = r#"#!/bin/sh
dir=$(dirname "$0")
cat >/dev/null
if [ "$CNI_COMMAND" = ADD ] && [ -e "$dir/hang-on" ]; then
    sleep 1000 &
    echo $! >> "$dir/pids"
    echo $$ >> "$dir/pids"
    sleep 1000
fi
exit 0
"#;

#[test]
fn hung_cni_plugin_fails_the_sandbox_within_the_deadline_and_leaks_nothing() {
    use std::os::unix::fs::PermissionsExt;
    let mut env = AgentEnv::new("dlcni");
    let p = env.tmp.path().to_path_buf();
    let bin = p.join("hangbin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::write(bin.join("hang"), HANG_PLUGIN).unwrap();
    std::fs::set_permissions(bin.join("hang"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(bin.join("hang-on"), "").unwrap();
    std::fs::write(
        p.join("net.d").join("10-test.conflist"),
        serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "hako-test",
            "plugins": [
                {
                    "type": "bridge", "bridge": "hkbr0", "isGateway": true, "ipMasq": false,
                    "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.88.0.0/24"}]],
                             "dataDir": p.join("ipam")}
                },
                {"type": "hang"}
            ]
        })
        .to_string(),
    )
    .unwrap();
    env.args = vec![
        "--cni-bin-dir".into(),
        bin.display().to_string(),
        "--cni-timeout".into(),
        "3".into(),
        "--sync-frequency".into(),
        "2".into(),
    ];
    let img = env.image("sleep");
    env.write_manifest(
        "p.yaml",
        &format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: p}}\nspec:\n  terminationGracePeriodSeconds: 1\n  containers:\n  - {{name: c, image: \"{img}\"}}\n"),
    );
    env.start();
    let msg = env.wait_for("FailedCreatePodSandBox from the CNI deadline", T, |e| {
        e.events("p")
            .into_iter()
            .find(|(r, m)| r == "FailedCreatePodSandBox" && m.contains("did not finish"))
            .map(|(_, m)| m)
    });
    assert!(msg.contains("type=\"hang\""), "{msg}");
    // The plugin and what it forked were killed.
    let pids: Vec<i32> = std::fs::read_to_string(bin.join("pids"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    assert!(!pids.is_empty(), "the hang plugin never ran");
    env.wait_for(
        "hung plugin processes gone",
        Duration::from_secs(10),
        |_| {
            // The attempt after the first may be hanging right now: only the first one's pids.
            (!pids.iter().take(2).any(|&p| alive(p))).then_some(())
        },
    );
    // The plugin works again: the pod runs, with exactly one of everything.
    std::fs::remove_file(bin.join("hang-on")).unwrap();
    env.wait_running("p", T);
    assert_eq!(
        ipam_leases(&p.join("ipam")).len(),
        1,
        "{:?}",
        ipam_leases(&p.join("ipam"))
    );
    assert_eq!(veths(&env).len(), 1, "{:?}", veths(&env));
    assert_eq!(mounted_netns(&env).len(), 1, "{:?}", mounted_netns(&env));
    for pid in &pids {
        assert!(!alive(*pid), "hang plugin process {pid} still alive");
    }
    env.remove_manifest("p.yaml");
    env.wait_for("pod removed", T, |e| e.records().is_empty().then_some(()));
    assert!(
        ipam_leases(&p.join("ipam")).is_empty(),
        "{:?}",
        ipam_leases(&p.join("ipam"))
    );
    assert!(veths(&env).is_empty(), "{:?}", veths(&env));
    assert!(mounted_netns(&env).is_empty(), "{:?}", mounted_netns(&env));
}

fn proxier_service() -> (
    k8s_openapi::api::core::v1::Service,
    k8s_openapi::api::discovery::v1::EndpointSlice,
) {
    let svc = serde_yaml::from_str(
        "metadata: {name: web, namespace: t}\nspec: {clusterIP: 10.96.0.10, ports: [{name: p, port: 80}]}",
    )
    .unwrap();
    let slice = serde_yaml::from_str(
        "metadata: {name: web-1, namespace: t, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{name: p, port: 8080}]\nendpoints: [{addresses: [10.244.1.11], nodeName: n}]",
    )
    .unwrap();
    (svc, slice)
}

/// The legacy flavour takes the xtables lock: held by someone else (a private lock file,
/// never the host's /run/xtables.lock), a sync gives up with a lock error instead of
/// waiting forever, and the next sync after the release programs everything in full.
#[test]
fn proxier_gives_up_on_a_held_xtables_lock_and_recovers_after_release() {
    use hako_proxier::iptables::IptablesError;
    use hako_proxier::proxier::SyncError;
    use hako_proxier::{IptablesBackend, Proxier, ProxierOpts, RealIptables, RenderOpts};
    hako_tests::require_root();
    let ns = hako_tests::NetNs::new("dllock").unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let lock_path = tmp.path().join("xtables.lock");
    let ipt = RealIptables::with_variant("legacy").with_lock_file(&lock_path);
    let render = RenderOpts::default();
    let mut proxier = Proxier::new(
        Box::new(IptablesBackend::new(ipt, render.clone())),
        ProxierOpts {
            hostname: "n".into(),
            render,
        },
    );
    let (svc, slice) = proxier_service();
    proxier.on_service_add(svc);
    proxier.on_endpointslice_add(slice);
    let lock_file = std::fs::File::create(&lock_path).unwrap();
    let held = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|(_, e)| e)
        .expect("take the private xtables lock");
    let (tx, rx) = std::sync::mpsc::channel();
    let first = std::thread::scope(|s| {
        let ns = &ns;
        let p = &mut proxier;
        s.spawn(move || {
            let _ = tx.send(ns.run(|| p.sync()).unwrap());
        });
        let r = rx.recv_timeout(Duration::from_secs(60));
        // Released either way, so a sync stuck on the lock (the bug) can finish and the
        // scope can end.
        drop(held);
        r.expect("a sync under a held xtables lock returned within 60 s")
    });
    match &first {
        Err(SyncError::Iptables(IptablesError::Lock { stderr, .. })) => {
            assert!(stderr.contains("xtables lock"), "{stderr}")
        }
        r => panic!("expected a lock error, got {r:?}"),
    }
    assert!(first.unwrap_err().to_string().contains("gave up"));
    // Lock free: the next sync is a full one and programs the service.
    let stats = ns
        .run(|| proxier.sync())
        .unwrap()
        .expect("sync after release");
    assert!(stats.full);
    let rules = ns.sh("iptables-legacy-save -t nat").unwrap();
    assert!(
        rules.contains("-d 10.96.0.10/32") && rules.contains("KUBE-SVC-"),
        "{rules}"
    );
}

/// An agent whose pod `p` pulls busybox through a [`StallProxy`](hako_tests::registry::StallProxy)
/// (stalling from the start) with a progress deadline of `deadline_secs`; started.
fn stalled_pull_env(
    tag: &str,
    deadline_secs: u64,
) -> (AgentEnv, hako_tests::registry::StallProxy, String) {
    let mut env = AgentEnv::new(tag);
    let upstream = env.registry.addr().to_string();
    let proxy = env
        .ns
        .run(move || hako_tests::registry::StallProxy::start(&upstream))
        .unwrap()
        .expect("stall proxy");
    let img = proxy.reference("busybox:sleep");
    env.args = vec![
        "--image-pull-progress-deadline".into(),
        deadline_secs.to_string(),
    ];
    env.write_manifest(
        "p.yaml",
        &format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: p}}\nspec:\n  terminationGracePeriodSeconds: 1\n  containers:\n  - {{name: c, image: \"{img}\"}}\n"),
    );
    env.start();
    (env, proxy, img)
}

/// A registry that stalls mid-blob: the pull is cancelled after the progress deadline with
/// ErrImagePull, the pod can be deleted while it retries, and once the registry answers
/// again the image pulls and a pod runs.
#[test]
fn stalled_blob_fails_the_pull_at_the_progress_deadline() {
    let (env, proxy, img) = stalled_pull_env("dlpull", 3);
    let msg = env.wait_for("ErrImagePull from the progress deadline", T, |e| {
        e.events("p")
            .into_iter()
            .find(|(r, m)| r == "Failed" && m.contains("no progress"))
            .map(|(_, m)| m)
    });
    assert!(msg.contains("Failed to pull image"), "{msg}");
    assert!(proxy.stalled() >= 1);
    env.wait_for("ErrImagePull or ImagePullBackOff", T, |e| {
        let s = e.container_status("p", "c")?;
        let r = s["state"]["waiting"]["reason"].as_str()?.to_string();
        (r == "ErrImagePull" || r == "ImagePullBackOff").then_some(())
    });
    // Deleted while its pulls keep stalling: gone within the bound.
    env.remove_manifest("p.yaml");
    env.wait_for("stalled pod removed", T, |e| {
        e.record("p").is_none().then_some(())
    });
    // The registry answers again: the same image pulls and runs.
    proxy.set_stall(false);
    env.write_manifest(
        "q.yaml",
        &format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: q}}\nspec:\n  terminationGracePeriodSeconds: 1\n  containers:\n  - {{name: c, image: \"{img}\"}}\n"),
    );
    env.wait_running("q", T);
    env.remove_manifest("q.yaml");
    env.wait_for("pods removed", T, |e| e.records().is_empty().then_some(()));
    drop(proxy);
}

/// A pod deleted while its image pull is stalled is removed at once, not after the pull's
/// progress deadline (here 10 minutes): deletion pre-empts the pull.
#[test]
fn deletion_does_not_wait_for_a_stalled_pull() {
    let (env, proxy, _) = stalled_pull_env("dlcancel", 600);
    env.wait_for("the pull to stall", T, |e| {
        let pulling = e.agent_log().contains("Pulling image");
        (pulling && proxy.stalled() >= 1).then_some(())
    });
    let t0 = std::time::Instant::now();
    env.remove_manifest("p.yaml");
    env.wait_for(
        "pod removed during its pull",
        Duration::from_secs(30),
        |e| {
            let gone = e.record("p").is_none()
                && e.agent_log().contains("pod deleted during the image pull")
                && e.agent_log().contains("pod removed");
            gone.then_some(())
        },
    );
    eprintln!(
        "pod removed {:.1} s after its manifest, its pull still stalled",
        t0.elapsed().as_secs_f64()
    );
    proxy.set_stall(false);
    drop(proxy);
}

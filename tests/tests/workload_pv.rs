//! Root test of persistent volumes in cluster mode, through the apiserver fixture: a claim
//! bound to a `local` PV with node affinity to this node is bind-mounted into the pod with the
//! pod's fsGroup; what pod 1 wrote is still on the volume after pod 1 is deleted and pod 2
//! (mounting the claim read-only) reads it and cannot write; a PV for another node is refused
//! with a FailedMount event and the pod never starts; `/stats/summary` and `/metrics` on the
//! kubelet port show the volume's figures; the projected token is 0640, owned by the pod's
//! runAsUser with the fsGroup (the kubelet's 0600 plus the group's read bit).
#![cfg(feature = "root")]

use hako_tests::agent::AgentEnv;
use hako_tests::apiserver::{User, SERVICE_ACCOUNT_MOUNT};
use hako_tests::cluster::{container_pid, wait_for};
use serde_json::{json, Value};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

const RUN_AS: u32 = 1000;
const FS_GROUP: u32 = 2000;

fn pv(name: &str, path: &Path, node: &str, claim: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": {"name": name},
        "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Retain", "storageClassName": "local",
            "local": {"path": path},
            "claimRef": {"namespace": "default", "name": claim},
            "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                {"key": "kubernetes.io/hostname", "operator": "In", "values": [node]}]}]}}}})
}

fn claim(name: &str, pv: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "local",
            "resources": {"requests": {"storage": "1Gi"}}, "volumeName": pv},
        "status": {"phase": "Bound"}})
}

fn pod(name: &str, image: &str, claim: &str, read_only: bool, command: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"nodeName": "node1", "terminationGracePeriodSeconds": 1,
            "securityContext": {"runAsUser": RUN_AS, "fsGroup": FS_GROUP,
                "fsGroupChangePolicy": "OnRootMismatch"},
            "containers": [{"name": "c", "image": image, "command": ["sh", "-c", command],
                "volumeMounts": [{"name": "data", "mountPath": "/data"},
                                 {"name": "scratch", "mountPath": "/scratch"}]}],
            "volumes": [
                {"name": "data", "persistentVolumeClaim": {"claimName": claim, "readOnly": read_only}},
                {"name": "scratch", "emptyDir": {}}]}})
}

fn running(srv: &hako_tests::apiserver::ApiServer, env: &AgentEnv, name: &str) -> Value {
    wait_for(&format!("{name} Running"), 90, env, || {
        srv.get("", "pods", "default", name)
            .filter(|p| p["status"]["phase"] == "Running")
    })
}

/// Mount points under `dir` in this mount namespace.
fn mounts_under(dir: &Path) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
        .filter(|m| Path::new(m).starts_with(dir))
        .collect()
}

#[test]
fn local_persistent_volume_kept_across_pods() {
    let mut env = AgentEnv::new("wkpv");
    let (srv, kc) = hako_tests::cluster::start_fixture(&env);
    srv.enable_service_account_admission();
    let port = 10250u16;
    env.args.extend(
        [
            "--kubeconfig",
            kc.to_str().expect("path"),
            "--kubelet-address",
            "127.0.0.1",
            "--kubelet-port",
            "10250",
        ]
        .map(String::from),
    );
    // The local volume: a directory under the test's temp dir (removed with it).
    let disk = env.tmp.path().join("disk1");
    std::fs::create_dir(&disk).expect("disk");
    std::fs::set_permissions(&disk, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::write(disk.join("preexisting"), "old data\n").expect("seed");
    let far = env.tmp.path().join("disk2");
    std::fs::create_dir(&far).expect("disk2");
    env.start();
    srv.create(pv("local-pv", &disk, "node1", "data"))
        .expect("pv");
    srv.create(claim("data", "local-pv")).expect("claim");
    srv.create(pv("far-pv", &far, "node2", "far")).expect("pv2");
    srv.create(claim("far", "far-pv")).expect("claim2");
    let image = env.image("sleep");

    // Pod 1 writes to the claim and 100 kB to its emptyDir.
    srv.create(pod(
        "writer",
        &image,
        "data",
        false,
        "echo from-pod1 > /data/hello && dd if=/dev/zero of=/scratch/blob bs=1000 count=100 2>/dev/null && touch /scratch/done && sleep 3600",
    ))
    .expect("writer");
    let p1 = running(&srv, &env, "writer");
    let uid1 = p1["metadata"]["uid"].as_str().expect("uid").to_string();
    let pid = container_pid(&env, &p1);
    let root = format!("/proc/{pid}/root");
    wait_for("pod 1 wrote", 30, &env, || {
        Path::new(&format!("{root}/scratch/done"))
            .exists()
            .then_some(())
    });
    assert_eq!(
        std::fs::read_to_string(disk.join("hello")).expect("written through to the volume"),
        "from-pod1\n"
    );
    // fsGroup: the volume root and the new file carry the group (setgid directory).
    let md = std::fs::metadata(disk.join("hello")).expect("hello");
    assert_eq!(
        (md.uid(), md.gid()),
        (RUN_AS, FS_GROUP),
        "owner of pod 1's file"
    );
    let md = std::fs::metadata(&disk).expect("disk");
    assert_eq!(md.gid(), FS_GROUP);
    assert_eq!(md.mode() & 0o2000, 0o2000, "setgid volume root");
    assert_eq!(
        std::fs::metadata(disk.join("preexisting"))
            .expect("old")
            .gid(),
        FS_GROUP,
        "the walk re-owned existing files"
    );
    // The kubelet's layout: a bind mount under the pod's volume directory.
    let vol_dir = env.root.join(format!(
        "pods/{uid1}/volumes/kubernetes.io~local-volume/data"
    ));
    assert_eq!(
        mounts_under(&vol_dir),
        [vol_dir.display().to_string()],
        "one bind mount"
    );

    // The token: 0600 + the fsGroup's read bit, owned by runAsUser, group fsGroup.
    let token = format!("{root}{SERVICE_ACCOUNT_MOUNT}/token");
    let md = std::fs::metadata(&token).expect("token file");
    assert_eq!(
        (md.uid(), md.gid(), md.mode() & 0o777),
        (RUN_AS, FS_GROUP, 0o640),
        "token file owner, group, mode"
    );
    let ca = std::fs::metadata(format!("{root}{SERVICE_ACCOUNT_MOUNT}/ca.crt")).expect("ca");
    assert_eq!(ca.uid(), 0, "only the token gets the pod's user");

    // Volume figures on the kubelet API.
    srv.add_token("alice-token", User::plain("alice"));
    srv.grant("alice", "get", "nodes", "metrics");
    srv.grant("alice", "get", "nodes", "stats");
    let curl = |path: &str| -> String {
        let out = env
            .ns
            .command("curl")
            .args(["-skf", "-H", "Authorization: Bearer alice-token"])
            .arg(format!("https://127.0.0.1:{port}{path}"))
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let disk_size = {
        let out = std::process::Command::new("df")
            .args(["-B1", "--output=size"])
            .arg(&disk)
            .output()
            .expect("df");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)
            .and_then(|l| l.trim().parse::<u64>().ok())
            .expect("df size")
    };
    let summary: Value = wait_for("/stats/summary with volumes", 30, &env, || {
        let s: Value = serde_json::from_str(&curl("/stats/summary")).ok()?;
        let p = s["pods"]
            .as_array()?
            .iter()
            .find(|p| p["podRef"]["name"] == "writer")?
            .clone();
        (p["volume"].as_array().map(Vec::len) == Some(2)).then_some(p)
    });
    let vols = summary["volume"].as_array().expect("volumes");
    let data = vols.iter().find(|v| v["name"] == "data").expect("data");
    assert_eq!(
        data["pvcRef"],
        json!({"name": "data", "namespace": "default"})
    );
    assert_eq!(data["capacityBytes"].as_u64(), Some(disk_size), "{data}");
    for k in [
        "usedBytes",
        "availableBytes",
        "inodes",
        "inodesFree",
        "inodesUsed",
    ] {
        assert!(data[k].as_u64().is_some_and(|v| v > 0), "{k}: {data}");
    }
    let scratch = vols
        .iter()
        .find(|v| v["name"] == "scratch")
        .expect("scratch");
    assert!(
        scratch["usedBytes"].as_u64().is_some_and(|u| u >= 100_000),
        "emptyDir by du: {scratch}"
    );
    assert!(
        scratch["inodesUsed"].as_u64() == Some(3),
        "the directory, blob and done: {scratch}"
    );
    assert!(scratch.get("pvcRef").is_none(), "{scratch}");
    eprintln!("volume figures of pod 1: {}", summary["volume"]);
    let metrics = curl("/metrics");
    let sample = |name: &str| -> Option<u64> {
        let want = format!("{name}{{namespace=\"default\",persistentvolumeclaim=\"data\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(want.as_str())?.trim().parse().ok())
    };
    assert_eq!(
        sample("kubelet_volume_stats_capacity_bytes"),
        Some(disk_size),
        "{metrics}"
    );
    for name in [
        "kubelet_volume_stats_available_bytes",
        "kubelet_volume_stats_used_bytes",
        "kubelet_volume_stats_inodes",
        "kubelet_volume_stats_inodes_free",
        "kubelet_volume_stats_inodes_used",
    ] {
        assert!(sample(name).is_some_and(|v| v > 0), "{name}: {metrics}");
    }

    // Pod 1 goes; its bind mount goes with it, the data stays.
    srv.delete("", "pods", "default", "writer", &json!({}))
        .expect("delete");
    wait_for("writer deleted", 60, &env, || {
        srv.get("", "pods", "default", "writer")
            .is_none()
            .then_some(())
    });
    wait_for("writer's mount gone", 30, &env, || {
        mounts_under(&env.root.join(format!("pods/{uid1}")))
            .is_empty()
            .then_some(())
    });
    assert_eq!(
        std::fs::read_to_string(disk.join("hello")).expect("data kept"),
        "from-pod1\n"
    );
    assert!(disk.join("preexisting").exists());

    // Pod 2 mounts the claim read-only: reads pod 1's file, cannot write.
    srv.create(pod("reader", &image, "data", true, "sleep 3600"))
        .expect("reader");
    let p2 = running(&srv, &env, "reader");
    let pid = container_pid(&env, &p2);
    assert_eq!(
        std::fs::read_to_string(format!("/proc/{pid}/root/data/hello")).expect("read"),
        "from-pod1\n"
    );
    let e = std::fs::write(format!("/proc/{pid}/root/data/new"), "x")
        .expect_err("a read-only claim refuses writes");
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
    assert!(!disk.join("new").exists());

    // A PV for node2: refused with FailedMount, nothing started, nothing mounted.
    srv.create(pod("far", &image, "far", false, "sleep 3600"))
        .expect("far");
    let msg = wait_for("FailedMount for the far PV", 60, &env, || {
        srv.list("", "events").into_iter().find_map(|e| {
            (e["involvedObject"]["name"] == "far" && e["reason"] == "FailedMount")
                .then(|| e["message"].as_str().unwrap_or_default().to_string())
        })
    });
    assert!(
        msg.contains("NodeAffinity check failed for volume \"far-pv\"")
            && msg.contains("kubernetes.io/hostname In [node2]")
            && msg.contains("node \"node1\""),
        "{msg}"
    );
    eprintln!("refused: {msg}");
    let far_pod = srv.get("", "pods", "default", "far").expect("far pod");
    assert_ne!(far_pod["status"]["phase"], "Running", "{far_pod}");
    assert!(
        far_pod["status"]["containerStatuses"]
            .as_array()
            .into_iter()
            .flatten()
            .all(|c| c["state"]["running"].is_null()),
        "{far_pod}"
    );
    let far_uid = far_pod["metadata"]["uid"].as_str().expect("uid");
    assert!(
        mounts_under(&env.root.join(format!("pods/{far_uid}"))).is_empty(),
        "nothing mounted for the refused pod"
    );
    // No 403s: the node read exactly the claims and volumes it was allowed.
    let forbidden: Vec<_> = srv
        .requests()
        .into_iter()
        .filter(|r| r.user == "system:node:node1" && r.status == 403)
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    assert!(forbidden.is_empty(), "{forbidden:?}");
    for p in ["reader", "far"] {
        let _ = srv.delete("", "pods", "default", p, &json!({}));
    }
    wait_for("pods deleted", 60, &env, || {
        ["reader", "far"]
            .iter()
            .all(|p| srv.get("", "pods", "default", p).is_none())
            .then_some(())
    });
    assert_eq!(
        std::fs::read_to_string(disk.join("hello")).expect("data kept"),
        "from-pod1\n"
    );
}

/// Standalone mode: PersistentVolume and PersistentVolumeClaim documents in the manifest
/// directory are what the pods' claims resolve against (bound by `spec.volumeName`, affinity
/// against the agent's node name); a PV for another node is refused with FailedMount.
#[test]
fn standalone_claims_from_the_manifest_directory() {
    let mut env = AgentEnv::new("wkpvs");
    let disk = env.tmp.path().join("disk1");
    std::fs::create_dir(&disk).expect("disk");
    let far = env.tmp.path().join("disk2");
    std::fs::create_dir(&far).expect("disk2");
    env.start();
    let image = env.image("sleep");
    let pv_doc = |name: &str, path: &Path, node: &str| {
        format!(
            "apiVersion: v1\nkind: PersistentVolume\nmetadata: {{name: {name}}}\nspec:\n  accessModes: [ReadWriteOnce]\n  local: {{path: '{}'}}\n  nodeAffinity:\n    required:\n      nodeSelectorTerms:\n      - matchExpressions: [{{key: kubernetes.io/hostname, operator: In, values: [{node}]}}]\n",
            path.display()
        )
    };
    let claim_doc = |name: &str, pv: &str| {
        format!("apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {{name: {name}}}\nspec: {{volumeName: {pv}}}\n")
    };
    let pod_doc = |name: &str, claim: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\nspec:\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: c\n    image: {image}\n    command: [sh, -c, 'echo standalone > /data/hello && sleep 3600']\n    volumeMounts: [{{name: data, mountPath: /data}}]\n  volumes:\n  - {{name: data, persistentVolumeClaim: {{claimName: {claim}}}}}\n"
        )
    };
    env.write_manifest(
        "volumes.yaml",
        &[
            pv_doc("near", &disk, "node1"),
            claim_doc("data", "near"),
            pv_doc("far", &far, "node2"),
            claim_doc("far", "far"),
        ]
        .join("---\n"),
    );
    env.write_manifest("app.yaml", &pod_doc("app", "data"));
    env.write_manifest("away.yaml", &pod_doc("away", "far"));
    env.wait_running("app", std::time::Duration::from_secs(90));
    env.wait_for(
        "the pod's write on the volume",
        std::time::Duration::from_secs(30),
        |_| {
            std::fs::read_to_string(disk.join("hello"))
                .ok()
                .filter(|s| s == "standalone\n")
        },
    );
    let msg = env.wait_for(
        "FailedMount of away",
        std::time::Duration::from_secs(30),
        |e| {
            e.events("away")
                .into_iter()
                .find(|(r, _)| r == "FailedMount")
                .map(|(_, m)| m)
        },
    );
    assert!(
        msg.contains("NodeAffinity check failed for volume \"far\"")
            && msg.contains("node \"node1\""),
        "{msg}"
    );
    assert_ne!(env.phase("away").as_deref(), Some("Running"));
    assert!(
        std::fs::read_dir(&far).expect("far").next().is_none(),
        "nothing written there"
    );
    // The pod goes, the data stays.
    env.remove_manifest("app.yaml");
    env.wait_for("app removed", std::time::Duration::from_secs(60), |e| {
        e.record("app").is_none().then_some(())
    });
    assert!(
        mounts_under(&env.root).is_empty(),
        "{:?}",
        mounts_under(&env.root)
    );
    assert_eq!(
        std::fs::read_to_string(disk.join("hello")).expect("kept"),
        "standalone\n"
    );
}

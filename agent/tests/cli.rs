//! End-to-end checks of the `hako-agent` binary without root: dry run over the example
//! manifests, and `get pods`/`describe pod` over records written to a temporary root.

use std::path::PathBuf;
use std::process::Command;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_hako-agent"));
    c.env("RUST_BACKTRACE", "0").env("RUST_LOG", "info");
    c
}

fn testdata(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("testdata")
        .join(p)
}

#[test]
fn dry_run_reports_the_bad_document_and_plans_the_rest() {
    let out = bin()
        .args(["--dry-run", "--pod-manifest-path"])
        .arg(testdata("manifests"))
        .args([
            "--hostname-override",
            "node1",
            "--cluster-dns",
            "10.96.0.10",
            "--memory-capacity",
            "4294967296",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(stderr.contains("broken.yaml: document 1 (Pod default/broken): invalid: spec.containers[0].image: Required value"), "{stderr}");
    for want in [
        "2 pod(s), 1 configmap(s), 1 secret(s), 1 service(s), 1 rejected document(s)",
        "pod default/web-node1",
        "StartInitContainer { index: 0, name: \"page\" }",
        "container httpd: image=busybox:1.36 oom_score_adj=993",
        "\"httpd\", \"-f\", \"-p\", \"8080\"",
        "hello from web-node1",
        "waiting: CreateContainerConfigError: configmap \"absent\" not found",
        "search default.svc.cluster.local svc.cluster.local cluster.local | nameserver 10.96.0.10 | options ndots:5",
    ] {
        assert!(stdout.contains(want), "missing {want:?} in\n{stdout}");
    }
}

#[test]
fn get_and_describe_read_records() {
    let root = tempfile::tempdir().unwrap();
    let recs: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(testdata("records.json")).unwrap()).unwrap();
    for r in &recs {
        let uid = r["pod"]["metadata"]["uid"].as_str().unwrap();
        let dir = root.path().join("pods").join(uid);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("status.json"), serde_json::to_vec(r).unwrap()).unwrap();
    }
    let run = |args: &[&str]| {
        let out = bin()
            .args(args)
            .arg("--root-dir")
            .arg(root.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let table = run(&["get", "pods"]);
    assert!(
        table.starts_with("NAMESPACE   NAME           READY   STATUS"),
        "{table}"
    );
    assert!(table.contains("CrashLoopBackOff"));
    assert!(run(&["get", "pods", "-o", "wide"]).contains("10.88.0.5"));
    let json: serde_json::Value =
        serde_json::from_str(&run(&["get", "pods", "-o", "json"])).unwrap();
    assert_eq!(json["items"].as_array().unwrap().len(), 3);
    assert!(run(&["get", "pods", "-o", "yaml"]).contains("kind: List"));
    assert!(run(&["describe", "pod", "tools/setup-node1"]).contains("Init Containers:"));
    let out = bin()
        .args(["describe", "pod", "nope", "--root-dir"])
        .arg(root.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("pod \"nope\" not found"));
}

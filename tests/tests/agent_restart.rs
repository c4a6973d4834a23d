//! Agent root tests: agent restart re-adopts running pods (no restart, no duplicate; status
//! rebuilt; pods deleted meanwhile are cleaned up) and keeps a crash loop's back-off, and
//! manifest updates/deletes.
#![cfg(feature = "root")]

use hako_tests::agent::AgentEnv;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

fn alive(pid: i32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn agent_restart_adopts_running_pods() {
    let mut env = AgentEnv::new("aadopt");
    let img = env.image("sleep");
    let pod = |name: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\nspec:\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: c\n    image: \"{img}\"\n    readinessProbe: {{exec: {{command: [\"true\"]}}, periodSeconds: 1}}\n"
        )
    };
    env.write_manifest("keep.yaml", &pod("keep"));
    env.write_manifest("gone.yaml", &pod("gone"));
    env.start();
    env.wait_running("keep", T);
    env.wait_running("gone", T);
    let before = env.container_status("keep", "c").unwrap();
    let pid = env.container_pid("keep", "c").unwrap();
    let gone_pid = env.container_pid("gone", "c").unwrap();
    let shims_before = env.shim_containers().len();
    assert_eq!(shims_before, 2);
    env.stop();
    // Pods outlive the agent.
    assert!(alive(pid) && alive(gone_pid));
    // While the agent is down: one manifest goes away, and the other's record is lost.
    env.remove_manifest("gone.yaml");
    let uid = before["containerID"].as_str().unwrap().to_string();
    let keep_uid = env.record("keep").unwrap()["pod"]["metadata"]["uid"]
        .as_str()
        .unwrap()
        .to_string();
    std::fs::remove_file(env.root.join("pods").join(&keep_uid).join("status.json")).unwrap();
    env.start();
    let rec = env.wait_running("keep", T);
    let after = env.container_status("keep", "c").unwrap();
    assert_eq!(after["containerID"].as_str().unwrap(), uid, "{after}");
    assert_eq!(after["restartCount"], 0);
    assert_eq!(after["ready"], true);
    assert_eq!(env.container_pid("keep", "c"), Some(pid));
    assert!(alive(pid));
    assert!(rec["pod"]["status"]["podIP"]
        .as_str()
        .unwrap()
        .starts_with("10.88.0."));
    // The pod deleted while the agent was down is stopped and removed.
    env.wait_for("orphan removed", T, |e| {
        (e.record("gone").is_none() && e.shim_containers().len() == 1).then_some(())
    });
    assert!(!alive(gone_pid));
    // The adopted container's exit is still noticed: kill it, it is restarted.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    env.wait_for("restart after kill", T, |e| {
        let s = e.container_status("keep", "c")?;
        (s["restartCount"] == 1 && s["state"]["running"].is_object()).then_some(())
    });
    let s = env.container_status("keep", "c").unwrap();
    assert_eq!(s["lastState"]["terminated"]["exitCode"], 137, "{s}");
}

#[test]
fn manifest_update_restarts_the_pod_and_delete_terminates_it() {
    let mut env = AgentEnv::new("aupd");
    let img = env.image("sleep");
    let pod = |v: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: app}}\nspec:\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: c\n    image: \"{img}\"\n    env: [{{name: VERSION, value: \"{v}\"}}]\n"
        )
    };
    env.write_manifest("app.yaml", &pod("1"));
    env.start();
    let r1 = env.wait_running("app", T);
    let uid1 = r1["pod"]["metadata"]["uid"].as_str().unwrap().to_string();
    let pid1 = env.container_pid("app", "c").unwrap();
    env.write_manifest("app.yaml", &pod("2"));
    let r2 = env.wait_for("new pod version", T, |e| {
        let r = e.record("app")?;
        let running = r["pod"]["status"]["phase"] == "Running";
        (r["pod"]["metadata"]["uid"] != uid1.as_str() && running && e.records().len() == 1)
            .then_some(r)
    });
    let _ = r2;
    assert!(!alive(pid1), "old container still running");
    let out = env.cli(&["exec", "app-node1", "--", "sh", "-c", "echo $VERSION"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "2\n", "{out:?}");
    assert_eq!(
        env.shim_containers().len(),
        1,
        "{:?}",
        env.shim_containers()
    );
    // Delete: graceful termination, then nothing left of the pod on the node.
    let pid2 = env.container_pid("app", "c").unwrap();
    env.remove_manifest("app.yaml");
    env.wait_for("pod removed", T, |e| e.records().is_empty().then_some(()));
    assert!(!alive(pid2));
    assert!(
        env.shim_containers().is_empty(),
        "{:?}",
        env.shim_containers()
    );
    let sandboxes: Vec<_> = std::fs::read_dir(env.run.join("sandboxes"))
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(sandboxes.is_empty(), "{sandboxes:?}");
    let cache: Vec<_> = std::fs::read_dir(env.root.join("cni").join("results"))
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(cache.is_empty(), "CNI results left: {cache:?}");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(&env.run.display().to_string()),
        "namespace mounts left"
    );
    let log = env.agent_log();
    assert!(log.contains("changed: uid"), "{log}");
}

#[test]
fn failed_cni_check_recreates_the_sandbox() {
    let mut env = AgentEnv::new("acheck");
    let img = env.image("sleep");
    env.args = vec!["--cni-check-frequency".into(), "1".into()];
    env.write_manifest(
        "net.yaml",
        &format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: net}}\nspec:\n  terminationGracePeriodSeconds: 1\n  containers:\n  - {{name: c, image: \"{img}\"}}\n"),
    );
    env.start();
    env.wait_running("net", T);
    let pid = env.container_pid("net", "c").unwrap();
    // Break the pod's network from the outside: delete its veth on the bridge.
    let veths = env
        .ns
        .ip(&["-o", "link", "show", "master", "hkbr0"])
        .unwrap();
    let veth = veths
        .lines()
        .next()
        .and_then(|l| l.split(": ").nth(1))
        .and_then(|n| n.split('@').next())
        .unwrap()
        .to_string();
    env.ns.ip(&["link", "del", &veth]).unwrap();
    env.wait_for("sandbox re-created", T, |e| {
        let ev = e.events("net");
        let changed = ev
            .iter()
            .any(|(r, m)| r == "SandboxChanged" && m.contains("CNI CHECK"));
        let s = e.container_status("net", "c")?;
        (changed && s["restartCount"].as_i64()? >= 1 && s["state"]["running"].is_object())
            .then_some(())
    });
    assert!(
        !alive(pid),
        "old container kept running in the broken sandbox"
    );
    env.wait_running("net", T);
    // The new sandbox has a working network again.
    let out = env.cli(&[
        "exec",
        "net-node1",
        "--",
        "ip",
        "-4",
        "addr",
        "show",
        "eth0",
    ]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("10.88.0."),
        "{out:?}"
    );
}

#[test]
fn runs_pods_on_hako_cni() {
    let mut env = AgentEnv::new("ahcni");
    let img = env.image("sleep");
    env.use_hako_cni();
    let web = |name: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\nspec:\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: c\n    image: \"{img}\"\n    command: [sh, -c, \"mkdir /www; echo hello from $HOSTNAME > /www/index.html; exec httpd -f -p 8080 -h /www\"]\n    readinessProbe: {{httpGet: {{port: 8080}}, periodSeconds: 1}}\n"
        )
    };
    env.write_manifest("a.yaml", &web("a"));
    env.write_manifest("b.yaml", &web("b"));
    env.start();
    env.wait_running("a", T);
    let rb = env.wait_running("b", T);
    let ip_b = rb["pod"]["status"]["podIP"].as_str().unwrap().to_string();
    // Pod to pod over the hako-cni bridge.
    let out = env.cli(&[
        "exec",
        "a-node1",
        "--",
        "wget",
        "-qO-",
        &format!("http://{ip_b}:8080/"),
    ]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello from b-node1\n",
        "{out:?}"
    );
    env.remove_manifest("a.yaml");
    env.remove_manifest("b.yaml");
    env.wait_for("pods removed", T, |e| e.records().is_empty().then_some(()));
    let left: Vec<_> = std::fs::read_dir(env.tmp.path().join("ipam"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .filter(|n| n.starts_with("10.88."))
                .collect()
        })
        .unwrap_or_default();
    assert!(left.is_empty(), "addresses still allocated: {left:?}");
}

#[test]
fn stop_pods_on_exit_cleans_up_everything() {
    let mut env = AgentEnv::new("astop");
    let img = env.image("sleep");
    env.args = vec!["--stop-pods-on-exit".into()];
    env.write_manifest(
        "p.yaml",
        &format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: p}}\nspec:\n  terminationGracePeriodSeconds: 1\n  containers:\n  - {{name: c, image: \"{img}\"}}\n"),
    );
    env.start();
    env.wait_running("p", T);
    let pid = env.container_pid("p", "c").unwrap();
    env.stop();
    assert!(!alive(pid));
    assert!(env.records().is_empty());
    assert!(
        env.shim_containers().is_empty(),
        "{:?}",
        env.shim_containers()
    );
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(&env.run.display().to_string()),
        "namespace mounts left"
    );
    assert!(env.agent_log().contains("stopping every pod before exit"));
}

#[test]
fn a_container_whose_shim_died_is_killed_and_restarted() {
    let mut env = AgentEnv::new("ashim");
    let img = env.image("sleep");
    env.write_manifest(
        "p.yaml",
        &format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: p}}\nspec:\n  terminationGracePeriodSeconds: 1\n  containers:\n  - {{name: c, image: \"{img}\"}}\n"),
    );
    env.start();
    env.wait_running("p", T);
    let pid = env.container_pid("p", "c").unwrap();
    let id = env.container_status("p", "c").unwrap()["containerID"]
        .as_str()
        .unwrap()
        .strip_prefix("hako://")
        .unwrap()
        .to_string();
    let st: serde_json::Value = serde_json::from_slice(
        &std::fs::read(env.run.join("containers").join(&id).join("state.json")).unwrap(),
    )
    .unwrap();
    let shim_pid = i32::try_from(st["shimPid"].as_i64().unwrap()).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(shim_pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    env.wait_for("restart after the shim died", T, |e| {
        let s = e.container_status("p", "c")?;
        (s["restartCount"] == 1 && s["state"]["running"].is_object()).then_some(())
    });
    // The orphaned process was killed, not left beside the new one.
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert!(
        !alive(pid)
            || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| s.contains(") Z "))
    );
    assert_eq!(
        env.shim_containers().len(),
        1,
        "{:?}",
        env.shim_containers()
    );
}

#[test]
fn restart_backoff_survives_an_agent_restart() {
    let mut env = AgentEnv::new("abackoff");
    let img = env.image("sleep");
    env.args = vec![
        "--restart-backoff-base".into(),
        "1.5".into(),
        "--restart-backoff-max".into(),
        "60".into(),
        // Every attempt's log stays (its mtime times the back-off): exited instances beyond
        // the default one are removed with their logs otherwise.
        "--maximum-dead-containers-per-container".into(),
        "10".into(),
    ];
    env.write_manifest(
        "crash.yaml",
        &format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: crash}}\nspec:\n  containers:\n  - {{name: c, image: \"{img}\", command: [sh, -c, \"echo boom; exit 1\"]}}\n"),
    );
    env.start();
    // Attempts start at about 0, 0, 1.5, 4.5 s; the next delay is then 6 s.
    env.wait_for("3 restarts", T, |e| {
        let s = e.container_status("crash", "c")?;
        (s["restartCount"].as_i64()? >= 3 && s["state"]["running"].is_null()).then_some(())
    });
    env.stop();
    env.start();
    env.wait_for("restart after the agent restart", T, |e| {
        let s = e.container_status("crash", "c")?;
        (s["restartCount"].as_i64()? >= 4).then_some(())
    });
    let gaps = env.crash_gaps("crash", "c");
    assert!(gaps.len() >= 4, "{gaps:?}");
    // Without the saved back-off the new agent restarts the container at once.
    assert!(gaps[3] >= 5.0, "{gaps:?}");
}

//! Chaos root tests of pod sandboxes: the agent is SIGKILLed in the middle of a CNI chain
//! (ADD and DEL), restarted with the pods deleted or kept, and the run dir is lost as on a
//! reboot; afterwards nothing may be left that the pods no longer own — no sandbox netns
//! mount, no host veth on the bridge, no IPAM reservation, no CNI cache entry, no container.
//! The second plugin of the chain is a small script (`hk-step`) whose behaviour the test sets
//! with marker files next to it: `kill-on-add` / `kill-on-del` SIGKILL its parent (the agent)
//! once, `fail-add` makes every ADD fail, `slow-add` makes ADD take 15 s, `slow` makes every call take 0.3 s (so that random
//! kills land inside the chain often). A seeded run kills the agent at random moments of
//! pod creation and deletion (`HAKO_CHAOS_SEED`, `HAKO_CHAOS_ITERATIONS`).
#![cfg(feature = "root")]

use hako_tests::agent::{target_bin, AgentEnv};
use hako_tests::holdings::{holdings, unmount_under, Holdings};
use rand::{Rng, SeedableRng};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(90);

const STEP_PLUGIN: &str = r#"#!/bin/sh
# hk-step: a chained CNI plugin for the chaos tests; passes prevResult through.
d=$(dirname "$0")
conf=$(cat)
if [ -e "$d/slow" ]; then sleep 0.3; fi
case "$CNI_COMMAND" in
ADD)
  if [ -e "$d/slow-add" ]; then sleep 15; fi
  if [ -e "$d/kill-on-add" ]; then rm -f "$d/kill-on-add"; kill -9 "$PPID"; sleep 2; exit 1; fi
  if [ -e "$d/fail-add" ]; then
    echo '{"cniVersion":"1.1.0","code":999,"msg":"hk-step: ADD refused by the test"}'
    exit 1
  fi
  printf '%s' "$conf" | jq -c '.prevResult'
  ;;
DEL)
  if [ -e "$d/kill-on-del" ]; then rm -f "$d/kill-on-del"; kill -9 "$PPID"; sleep 2; exit 1; fi
  ;;
CHECK|STATUS|GC) ;;
VERSION) echo '{"cniVersion":"1.1.0","supportedVersions":["1.0.0","1.1.0"]}' ;;
esac
exit 0
"#;

/// An agent with hako-cni + `hk-step` as its network.
struct Chaos {
    env: AgentEnv,
    bin: PathBuf,
}

impl Chaos {
    fn new(tag: &str) -> Chaos {
        let mut env = AgentEnv::new(tag);
        env.use_hako_cni();
        let p = env.tmp.path().to_path_buf();
        let bin = p.join("cni-step");
        std::fs::create_dir_all(&bin).unwrap();
        let script = bin.join("hk-step");
        std::fs::write(&script, STEP_PLUGIN).unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(
            p.join("net.d").join("10-test.conflist"),
            serde_json::json!({
                "cniVersion": "1.1.0",
                "name": "hako-test",
                "plugins": [
                    {"type": "hako-cni", "bridge": "hkbr0", "isGateway": true, "ipMasq": false,
                     "dataDir": p.join("ipam"),
                     "ipam": {"ranges": [{"subnet": "10.88.0.0/24"}]}},
                    {"type": "hk-step"}
                ]
            })
            .to_string(),
        )
        .unwrap();
        env.args
            .extend(["--cni-bin-dir".to_string(), bin.display().to_string()]);
        Chaos { env, bin }
    }

    fn arm(&self, marker: &str) {
        std::fs::write(self.bin.join(marker), b"").unwrap();
    }

    fn disarm(&self, marker: &str) {
        let _ = std::fs::remove_file(self.bin.join(marker));
    }

    fn pod(&self, name: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\nspec:\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: c\n    image: \"{}\"\n",
            self.env.image("sleep")
        )
    }

    /// Waits for the agent process to be gone (killed by `hk-step`), then reaps it.
    fn wait_agent_killed(&mut self) {
        let pid = self.env.agent_pid();
        let deadline = Instant::now() + T;
        while Path::new(&format!("/proc/{pid}/exe")).exists() {
            assert!(
                Instant::now() < deadline,
                "the agent was not killed by the CNI plugin"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        self.env.stop();
    }

    fn sigkill_agent(&mut self) {
        let pid = i32::try_from(self.env.agent_pid()).unwrap();
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        self.env.stop();
    }

    fn held(&self) -> Holdings {
        holdings(&self.env)
    }

    /// Waits until the node holds exactly what `pods` running pods need.
    fn wait_held(&self, what: &str, pods: usize) -> Holdings {
        let want = Holdings::for_pods(pods);
        let deadline = Instant::now() + T;
        loop {
            let h = self.held();
            if h == want {
                return h;
            }
            if Instant::now() > deadline {
                let shims: Vec<String> = self
                    .env
                    .shim_containers()
                    .iter()
                    .map(|id| {
                        let st = std::fs::read_to_string(
                            self.env.run.join("containers").join(id).join("state.json"),
                        )
                        .unwrap_or_default();
                        let status = st
                            .lines()
                            .find(|l| l.contains("\"status\""))
                            .unwrap_or("no state")
                            .trim();
                        format!("{id}: {status}")
                    })
                    .collect();
                let cache =
                    hako_tests::holdings::dir_entries(&self.env.root.join("cni").join("results"));
                let sandboxes: Vec<String> =
                    hako_tests::holdings::dir_entries(&self.env.run.join("sandboxes"))
                        .into_iter()
                        .map(|id| {
                            let files = hako_tests::holdings::dir_entries(
                                &self.env.run.join("sandboxes").join(&id),
                            );
                            format!("{id}: {files:?}")
                        })
                        .collect();
                panic!(
                    "{what}: the node holds {h:?}, want {want:?}\nshim containers:\n{}\nCNI cache: {cache:?}\nsandboxes: {sandboxes:?}\nagent log:\n{}",
                    shims.join("\n"),
                    hako_tests::agent::tail(&self.env.agent_log(), 6000)
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

#[test]
fn agent_killed_in_the_middle_of_cni_add_leaks_nothing() {
    let _ = target_bin("hako-cni", "HAKO_CNI_BIN");
    let mut c = Chaos::new("chadd");
    c.arm("kill-on-add");
    c.env.write_manifest("gone.yaml", &c.pod("gone"));
    c.env.start();
    c.wait_agent_killed();
    // The first pod's bridge ADD is done, its chain is not: netns, veth, address, no cache.
    let h = c.held();
    assert!(h.veths >= 1 && h.ipam >= 1, "{h:?}");
    // The pod is deleted while the agent is down; another one is created.
    c.env.remove_manifest("gone.yaml");
    c.env.write_manifest("kept.yaml", &c.pod("kept"));
    c.env.start();
    c.env.wait_running("kept", T);
    c.wait_held("after the restart", 1);
    c.env.wait_for("gone forgotten", T, |e| {
        (e.records().len() == 1).then_some(())
    });
    c.env.remove_manifest("kept.yaml");
    c.env
        .wait_for("pods removed", T, |e| e.records().is_empty().then_some(()));
    c.wait_held("after deleting every pod", 0);
}

#[test]
fn agent_killed_in_the_middle_of_cni_add_of_a_kept_pod_converges() {
    let mut c = Chaos::new("chkeep");
    c.arm("kill-on-add");
    c.env.write_manifest("app.yaml", &c.pod("app"));
    c.env.start();
    c.wait_agent_killed();
    c.env.start();
    c.env.wait_running("app", T);
    c.wait_held("the kept pod after the restart", 1);
    c.env.remove_manifest("app.yaml");
    c.env
        .wait_for("pod removed", T, |e| e.records().is_empty().then_some(()));
    c.wait_held("after deleting the pod", 0);
}

#[test]
fn agent_killed_in_the_middle_of_cni_del_leaks_nothing() {
    let mut c = Chaos::new("chdel");
    c.env.write_manifest("app.yaml", &c.pod("app"));
    c.env.start();
    c.env.wait_running("app", T);
    c.wait_held("running", 1);
    // DEL runs the chain in reverse: hk-step kills the agent before hako-cni's DEL.
    c.arm("kill-on-del");
    c.env.remove_manifest("app.yaml");
    c.wait_agent_killed();
    c.env.start();
    c.env
        .wait_for("pod removed", T, |e| e.records().is_empty().then_some(()));
    c.wait_held("after the restart", 0);
}

#[test]
fn a_failing_chain_and_a_restart_leak_nothing() {
    let mut c = Chaos::new("chfail");
    c.arm("fail-add");
    for n in ["a", "b", "c"] {
        c.env.write_manifest(&format!("{n}.yaml"), &c.pod(n));
    }
    c.env.start();
    c.env
        .wait_for("every pod failed its sandbox twice", T, |e| {
            ["a", "b", "c"]
                .iter()
                .all(|n| {
                    let events = e.record(n).map(|r| r["events"].clone());
                    let failed: u64 = events
                        .as_ref()
                        .and_then(|v| v.as_array())
                        .into_iter()
                        .flatten()
                        .filter(|ev| ev["reason"] == "FailedCreatePodSandBox")
                        .map(|ev| ev["count"].as_u64().unwrap_or(1))
                        .sum();
                    failed >= 2
                })
                .then_some(())
        });
    // A failed ADD is undone at once: nothing is held while the pods keep failing.
    let h = c.held();
    assert_eq!(
        (h.veths, h.ipam, h.cache, h.containers),
        (0, 0, 0, 0),
        "{h:?}"
    );
    c.env.stop();
    for n in ["a", "b"] {
        c.env.remove_manifest(&format!("{n}.yaml"));
    }
    c.disarm("fail-add");
    c.env.start();
    c.env.wait_running("c", T);
    c.wait_held("one pod left after the restart", 1);
    c.env.remove_manifest("c.yaml");
    c.env
        .wait_for("pods removed", T, |e| e.records().is_empty().then_some(()));
    c.wait_held("after deleting every pod", 0);
}

/// As after a reboot: the run dir (sandbox namespaces, shim state) and every process are gone,
/// the state root (pod records, CNI cache) and the IPAM store on disk are not.
#[test]
fn a_lost_run_dir_releases_the_old_sandbox() {
    let mut c = Chaos::new("chboot");
    c.env.write_manifest("app.yaml", &c.pod("app"));
    c.env.start();
    c.env.wait_running("app", T);
    c.wait_held("running", 1);
    let ip1 = c.env.record("app").unwrap()["pod"]["status"]["podIP"].clone();
    c.env.stop();
    // Every container and shim of the test goes, then the run dir with its mounts.
    let rt = hako_shim::client::Runtime::new(
        target_bin("hako-shim", "HAKO_SHIM_BIN"),
        c.env.run.join("containers"),
    );
    for st in rt.list().unwrap_or_default() {
        rt.force_delete(&st.id).unwrap();
    }
    let failed = unmount_under(&c.env.run);
    assert!(failed.is_empty(), "{failed:?}");
    std::fs::remove_dir_all(&c.env.run).unwrap();
    std::fs::create_dir_all(&c.env.run).unwrap();
    // The pod's old address is still reserved, its old veth died with the netns.
    assert_eq!(c.held().ipam, 1);
    c.env.start();
    c.env.wait_for("pod running again", T, |e| {
        let s = e.container_status("app", "c")?;
        s["state"]["running"].is_object().then_some(())
    });
    c.wait_held("after the reboot", 1);
    let ip2 = c.env.record("app").unwrap()["pod"]["status"]["podIP"].clone();
    assert!(ip1.is_string() && ip2.is_string(), "{ip1} {ip2}");
    c.env.remove_manifest("app.yaml");
    c.env
        .wait_for("pod removed", T, |e| e.records().is_empty().then_some(()));
    c.wait_held("after deleting the pod", 0);
}

/// SIGKILL at seeded random moments while pods are created and deleted; after every restart
/// the pods converge with exactly one sandbox and container each, and deleting them leaves
/// nothing.
#[test]
fn random_agent_kills_during_pod_churn_converge_and_leak_nothing() {
    let seed: u64 = std::env::var("HAKO_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    let iterations: usize = std::env::var("HAKO_CHAOS_ITERATIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    eprintln!("chaos: seed {seed} (HAKO_CHAOS_SEED), {iterations} iterations");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut c = Chaos::new("chrand");
    c.arm("slow");
    let names = ["p0", "p1", "p2"];
    let mut kills = 0;
    for i in 0..iterations {
        for n in names {
            c.env.write_manifest(&format!("{n}.yaml"), &c.pod(n));
        }
        for _ in 0..2 {
            c.env.start();
            std::thread::sleep(Duration::from_millis(rng.gen_range(0..1500)));
            c.sigkill_agent();
            kills += 1;
        }
        c.env.start();
        for n in names {
            c.env.wait_running(n, T);
        }
        c.wait_held(&format!("iteration {i} (seed {seed}): pods running"), 3);
        for n in names {
            c.env.remove_manifest(&format!("{n}.yaml"));
        }
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..1500)));
        c.sigkill_agent();
        kills += 1;
        c.env.start();
        c.env
            .wait_for("pods removed", T, |e| e.records().is_empty().then_some(()));
        c.wait_held(&format!("iteration {i} (seed {seed}): pods deleted"), 0);
        c.env.stop();
    }
    eprintln!("chaos: {iterations} iterations, {kills} agent kills, nothing leaked");
}

/// A pod deleted while its CNI ADD runs is removed without waiting for the chain; what the
/// chain made is torn down when it returns.
#[test]
fn deletion_during_a_slow_cni_add_does_not_wait_and_leaks_nothing() {
    let mut c = Chaos::new("chslow");
    c.arm("slow-add");
    c.env.write_manifest("app.yaml", &c.pod("app"));
    c.env.start();
    // hako-cni's ADD is done, hk-step is in its 15 s sleep.
    c.env.wait_for("the chain to be half done", T, |e| {
        (holdings(e).veths == 1).then_some(())
    });
    let t0 = Instant::now();
    c.env.remove_manifest("app.yaml");
    c.env.wait_for(
        "pod removed during its CNI ADD",
        Duration::from_secs(10),
        |e| e.agent_log().contains("pod removed").then_some(()),
    );
    eprintln!(
        "pod removed {:.1} s after its manifest, its CNI ADD still running",
        t0.elapsed().as_secs_f64()
    );
    c.disarm("slow-add");
    c.wait_held("after the ADD returned", 0);
}

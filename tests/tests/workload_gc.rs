//! Image GC and dead-container GC of the agent (issue 17): the agent's image store on a small
//! tmpfs the test mounts, GC thresholds that make it run, an image a running pod uses next to
//! one nothing uses; and a container that crashes a few times before it stays up, whose
//! exited instances beyond the limit leave the node (shim state, logs).
#![cfg(feature = "root")]

use hako_shim::image::{ImageStore, PullPolicy};
use hako_tests::agent::AgentEnv;
use hako_tests::images::{self, Image, LayerBuilder, ManifestForm, RunConfig, StandardImages};
use std::path::{Path, PathBuf};
use std::time::Duration;

const T: Duration = Duration::from_secs(60);
const MIB: u64 = 1 << 20;

/// A tmpfs of a fixed size mounted by the test; detached on drop (also when the test fails).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size_mib: u64) -> Self {
        std::fs::create_dir_all(at).expect("mkdir");
        nix::mount::mount(
            Some("tmpfs"),
            at,
            Some("tmpfs"),
            nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
            Some(format!("size={}m,mode=0700", size_mib).as_str()),
        )
        .expect("mount tmpfs");
        Tmpfs(at.to_path_buf())
    }

    /// (capacity, used) in bytes.
    fn usage(&self) -> (u64, u64) {
        let s = nix::sys::statvfs::statvfs(&self.0).expect("statvfs");
        let f = s.fragment_size();
        (s.blocks() * f, (s.blocks() - s.blocks_available()) * f)
    }

    fn percent(&self) -> u64 {
        let (cap, used) = self.usage();
        used * 100 / cap
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Pushes `big:v1` to the env's registry: the standard busybox layers plus a layer of
/// `mib` MiB of random bytes, so that deleting it frees that much.
fn push_big_image(env: &AgentEnv, mib: u64) -> String {
    let data: Vec<u8> = (0..mib * MIB).map(|_| rand::random::<u8>()).collect();
    let big = LayerBuilder::new("hako-tests: big")
        .file("big.bin", 0o644, data)
        .build()
        .expect("layer");
    let mut layers = StandardImages::get().expect("images").sleep.layers.clone();
    layers.push(big);
    let img = Image::new(
        RunConfig {
            cmd: Some(vec!["sleep".into(), "3600".into()]),
            env: vec![images::DEFAULT_PATH_ENV.into()],
            ..RunConfig::default()
        },
        layers,
    );
    let client = env.registry.client();
    env.ns
        .run(|| client.push_image("big", "v1", &img, ManifestForm::Oci))
        .expect("enter netns")
        .expect("push big:v1");
    env.registry.reference("big:v1")
}

fn pull(env: &AgentEnv, store: &ImageStore, r: &str) {
    env.ns
        .run(|| store.ensure_blocking(r, PullPolicy::IfNotPresent, None))
        .expect("enter netns")
        .unwrap_or_else(|e| panic!("pull {r}: {e}"));
}

fn fill(path: &Path, bytes: u64) {
    std::fs::write(path, vec![0xa5u8; usize::try_from(bytes).expect("size")]).expect("filler");
}

#[test]
fn image_gc_frees_unused_images_down_to_the_low_threshold() {
    let mut env = AgentEnv::new("imggc");
    let used_ref = env.image("sleep");
    let big_ref = push_big_image(&env, 8);
    let images_dir = env.root.join("images");
    let fs = Tmpfs::mount(&images_dir, 64);
    // Both images in the store before the agent starts (pulled as the agent would).
    let store = ImageStore::open(&images_dir).expect("store");
    pull(&env, &store, &used_ref);
    pull(&env, &store, &big_ref);
    let big = store.get(&big_ref).unwrap().expect("big pulled");
    let used = store.get(&used_ref).unwrap().expect("sleep pulled");
    let u = store.usage().unwrap();
    let big_unique = u
        .iter()
        .find(|i| i.reference == big.reference)
        .unwrap()
        .unique_size;
    assert!(big_unique >= 8 * MIB, "{u:?}");
    // The layers busybox shares with big are not what deleting big frees.
    assert!(
        big_unique
            < u.iter()
                .find(|i| i.reference == big.reference)
                .unwrap()
                .size
    );
    let (cap, used0) = fs.usage();
    assert!(
        used0 * 100 / cap < 60,
        "{used0} of {cap} used before the filler"
    );
    // GC at 75 %, down to 70 %: a filler will bring usage to ~80 %; deleting big (8 MiB of
    // 64, 12.5 %) is enough, deleting nothing is not.
    env.args = [
        "--image-gc-high-threshold",
        "75",
        "--image-gc-low-threshold",
        "70",
        "--minimum-image-ttl-duration",
        "0s",
        "--image-gc-period",
        "0.5",
    ]
    .map(String::from)
    .to_vec();
    env.write_manifest(
        "user.yaml",
        &format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: user}}\nspec:\n  terminationGracePeriodSeconds: 1\n  containers:\n  - {{name: c, image: \"{used_ref}\", imagePullPolicy: IfNotPresent}}\n"
        ),
    );
    env.start();
    env.wait_running("user", T);
    // Below the high threshold nothing is deleted (several GC periods).
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        store.get(&big_ref).unwrap().is_some(),
        "big deleted below the threshold"
    );
    // Over the high threshold: the unused image goes, the used one stays.
    let filler = cap * 80 / 100 - fs.usage().1;
    fill(&images_dir.join("filler"), filler);
    assert!(fs.percent() >= 75, "{}% after the filler", fs.percent());
    env.wait_for("big:v1 garbage collected", T, |_| {
        store.get(&big_ref).unwrap().is_none().then_some(())
    });
    assert!(
        store.get(&used_ref).unwrap().is_some(),
        "the image of the running pod was deleted"
    );
    for d in store.layer_dirs(&used) {
        assert!(d.is_dir(), "{} of the used image is gone", d.display());
    }
    // Only big's own layer was deleted: the shared busybox layers stay with sleep.
    let big_own = store.layer_dir(big.layers.last().unwrap());
    assert!(!big_own.exists(), "{} left", big_own.display());
    let pct = fs.percent();
    assert!(pct <= 70, "usage {pct}% after GC, low threshold 70%");
    assert_eq!(env.phase("user").as_deref(), Some("Running"));
    assert!(
        env.agent_log()
            .contains("Disk usage on image filesystem is over the high threshold"),
        "{}",
        hako_tests::agent::tail(&env.agent_log(), 3000)
    );
    // The CLI shows the survivor, in use.
    let out = env.cli(&["images"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = text
        .lines()
        .find(|l| l.starts_with(&used.reference))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(line.ends_with("yes"), "{text}");
    assert!(!text.contains("big:v1"), "{text}");

    // Full again with nothing left to delete: FreeDiskSpaceFailed, as the kubelet reports it.
    fill(&images_dir.join("filler2"), cap * 85 / 100 - fs.usage().1);
    env.wait_for("FreeDiskSpaceFailed node event", T, |e| {
        let out = e.cli(&["get", "events"]);
        let t = String::from_utf8_lossy(&out.stdout).to_string();
        t.lines()
            .any(|l| {
                l.contains("FreeDiskSpaceFailed")
                    && l.contains("Failed to garbage collect required amount of images")
            })
            .then_some(())
    });
    assert!(store.get(&used_ref).unwrap().is_some());
    drop(env);
    drop(fs);
}

fn log_attempts(env: &AgentEnv, pod: &str, c: &str) -> Vec<u32> {
    let prefix = format!("default_{pod}-node1_");
    let dir = std::fs::read_dir(&env.logs)
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path().join(c))
        .expect("pod log dir");
    let mut v: Vec<u32> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_string_lossy()
                .strip_suffix(".log")?
                .parse()
                .ok()
        })
        .collect();
    v.sort();
    v
}

/// A container that crashes 5 times (attempts 0-4) before attempt 5 keeps running, under
/// `extra` agent flags: the attempts whose instance (shim state, log, metadata) is left must be
/// `kept`, and `logs --previous` still reads attempt 4.
fn crash_five_times(tag: &str, extra: &[&str], kept: &[u32]) {
    let mut env = AgentEnv::new(tag);
    let img = env.image("sleep");
    env.args = [
        "--restart-backoff-base",
        "0.2",
        "--restart-backoff-max",
        "0.4",
    ]
    .iter()
    .chain(extra)
    .map(|s| s.to_string())
    .collect();
    // The emptyDir counts the attempts.
    env.write_manifest(
        "crash.yaml",
        &format!(
            r#"apiVersion: v1
kind: Pod
metadata: {{name: crash}}
spec:
  terminationGracePeriodSeconds: 1
  volumes: [{{name: n, emptyDir: {{}}}}]
  containers:
  - name: c
    image: "{img}"
    volumeMounts: [{{name: n, mountPath: /n}}]
    command: [sh, -c, "n=$(ls /n | wc -l); touch /n/$n; echo attempt $n; [ $n -ge 5 ] && exec sleep 3600; exit 1"]
"#
        ),
    );
    env.start();
    env.wait_for("attempt 5 running", T, |e| {
        let s = e.container_status("crash", "c")?;
        (s["restartCount"].as_i64()? == 5 && !s["state"]["running"].is_null()).then_some(())
    });
    env.wait_for("dead instances removed", Duration::from_secs(20), |e| {
        (e.shim_containers().len() == kept.len()).then_some(())
    });
    let mut ids: Vec<u32> = env
        .shim_containers()
        .iter()
        .filter_map(|i| i.rsplit_once("-c-")?.1.parse().ok())
        .collect();
    ids.sort();
    assert_eq!(ids, kept, "shim containers {:?}", env.shim_containers());
    assert_eq!(log_attempts(&env, "crash", "c"), kept, "log files");
    let metas = std::fs::read_dir(env.root.join("pods"))
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_dir(e.path().join("containers")).ok())
        .flat_map(|rd| rd.flatten())
        .count();
    assert_eq!(metas, kept.len(), "container metadata files");
    // What the status and `logs --previous` need is still there.
    let s = env.container_status("crash", "c").unwrap();
    assert_eq!(s["lastState"]["terminated"]["exitCode"], 1, "{s}");
    let out = env.cli(&["logs", "crash-node1", "--previous"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "attempt 4\n");
    let out = env.cli(&["logs", "crash-node1"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "attempt 5\n");
}

#[test]
fn dead_containers_beyond_the_default_limit_leave_the_node() {
    // The running instance and one exited (the previous); attempts 0-3 are gone with their
    // logs (kept for ever before).
    crash_five_times("deadgc1", &[], &[4, 5]);
}

#[test]
fn dead_containers_beyond_the_limit_leave_the_node() {
    crash_five_times(
        "deadgc2",
        &["--maximum-dead-containers-per-container", "2"],
        &[3, 4, 5],
    );
}

#[test]
fn node_wide_dead_container_limit() {
    // Two containers crashing 4 times each (attempts 0-3) before attempt 4 keeps running; no
    // per-container limit, at most 2 exited instances on the node: each keeps only its
    // previous instance (the node-wide pass cuts every container to 2/2 = 1).
    let mut env = AgentEnv::new("deadgc3");
    let img = env.image("sleep");
    env.args = [
        "--restart-backoff-base",
        "0.2",
        "--restart-backoff-max",
        "0.4",
        "--maximum-dead-containers-per-container",
        "-1",
        "--maximum-dead-containers",
        "2",
        "--container-gc-period",
        "0.5",
    ]
    .map(String::from)
    .to_vec();
    let c = |name: &str| {
        format!(
            r#"  - name: {name}
    image: "{img}"
    volumeMounts: [{{name: n, mountPath: /n}}]
    command: [sh, -c, "mkdir -p /n/{name}; n=$(ls /n/{name} | wc -l); touch /n/{name}/$n; [ $n -ge 4 ] && exec sleep 3600; exit 1"]
"#
        )
    };
    env.write_manifest(
        "two.yaml",
        &format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: two}}\nspec:\n  terminationGracePeriodSeconds: 1\n  volumes: [{{name: n, emptyDir: {{}}}}]\n  containers:\n{}{}",
            c("a"),
            c("b")
        ),
    );
    env.start();
    env.wait_for("both at attempt 4, running", T, |e| {
        ["a", "b"]
            .iter()
            .all(|n| {
                e.container_status("two", n).is_some_and(|s| {
                    s["restartCount"].as_i64() == Some(4) && !s["state"]["running"].is_null()
                })
            })
            .then_some(())
    });
    env.wait_for("node-wide pass", Duration::from_secs(20), |e| {
        (e.shim_containers().len() == 4).then_some(())
    });
    let mut ids: Vec<String> = env
        .shim_containers()
        .iter()
        .filter_map(|i| i.split_once('-').map(|(_, rest)| rest.to_string()))
        .collect();
    ids.sort();
    assert_eq!(
        ids,
        ["a-3", "a-4", "b-3", "b-4"],
        "{:?}",
        env.shim_containers()
    );
    assert_eq!(log_attempts(&env, "two", "a"), [3, 4]);
    assert_eq!(log_attempts(&env, "two", "b"), [3, 4]);
    // The node-wide pass did it (the workers' own pass, limited to one container, would keep
    // attempts 2-4 of each: 2 exited per container).
    assert!(
        env.agent_log()
            .lines()
            .any(|l| l.contains("removing dead container") && l.contains("pod_uid=")),
        "{}",
        hako_tests::agent::tail(&env.agent_log(), 2000)
    );
}

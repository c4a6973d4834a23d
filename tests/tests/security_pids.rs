#![cfg(feature = "root")]
//! Root tests of process identity: no signal from the shim or from `force_delete` reaches a
//! process that merely got a container's old pid, and a container's forked children die with
//! it. Each scenario runs as PID 1 of a private pid namespace (the test binary runs itself
//! again under `unshare --pid --fork --mount-proc`), where writing `ns_last_pid` hands a
//! chosen pid to the next process deterministically without touching the host's pids; the
//! namespace, and everything left in it, dies with that PID 1.

mod shim_support;

use hako_shim::protocol::ExecRequest;
use hako_shim::state::Status;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag};
use nix::unistd::Pid;
use shim_support::{rmdir_tree, Env};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const INNER: &str = "HAKO_PIDS_INNER";
const TAG: &str = "HAKO_PIDS_TAG";

/// Removes, after the inner run, the cgroups and files its environment may have left.
struct OuterGuard {
    tag: String,
}

impl Drop for OuterGuard {
    fn drop(&mut self) {
        let prefix = format!("hako-test-{}-", self.tag);
        let root = Path::new("/sys/fs/cgroup");
        let mut bases = vec![root.to_path_buf()];
        bases.extend(
            hako_shim::cgroup::V1_CONTROLLERS
                .iter()
                .map(|c| root.join(c)),
        );
        for b in bases {
            let Ok(rd) = std::fs::read_dir(&b) else {
                continue;
            };
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().starts_with(&prefix) {
                    rmdir_tree(&e.path());
                }
            }
        }
    }
}

/// Run `scenario` (given a unique tag) as PID 1 of a fresh pid namespace with its own /proc.
fn in_private_pid_ns(name: &str, scenario: impl FnOnce(&str)) {
    hako_tests::require_root();
    if std::env::var(INNER).as_deref() == Ok(name) {
        let tag = std::env::var(TAG).expect("tag of the inner run");
        assert_eq!(std::process::id(), 1, "the scenario runs as PID 1");
        return scenario(&tag);
    }
    let tag = format!("pids{}-{:x}", std::process::id(), rand::random::<u32>());
    let tmp = tempfile::Builder::new()
        .prefix("hako-pids-")
        .tempdir()
        .unwrap();
    // Dropped before `tmp` (declared after it): cgroups first, then the files.
    let _guard = OuterGuard { tag: tag.clone() };
    let exe = std::env::current_exe().unwrap();
    let out_path = tmp.path().join("out");
    let out = std::fs::File::create(&out_path).unwrap();
    let mut child = Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", "--kill-child"])
        .arg(&exe)
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(INNER, name)
        .env(TAG, &tag)
        .env("TMPDIR", tmp.path())
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(180);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() >= deadline {
            // --kill-child: the namespace's PID 1, and with it the namespace, goes too.
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = std::fs::read_to_string(&out_path).unwrap_or_default();
    eprintln!("--- inner run of {name} ---\n{text}--- end ---");
    match status {
        Some(s) => assert!(
            s.success() && text.contains("1 passed"),
            "{name} failed in its pid namespace: {s}"
        ),
        None => panic!("{name} did not finish within 180 s"),
    }
}

/// Whether `pid` names a process that has not exited (a zombie counts as gone).
fn running(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

/// Whether `pid` is taken (by a process or an unreaped zombie).
fn taken(pid: i32) -> bool {
    kill(Pid::from_raw(pid), None).is_ok()
}

fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Reap `pid` if it is our child (we are PID 1: orphans of the namespace are ours).
fn reap(pid: i32) {
    let _ = waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG));
}

/// Start `cmd` so that it gets exactly `pid` (free, in this namespace): `ns_last_pid` makes
/// `pid` the next one handed out. Retried (bounded) while the number is still held, e.g. as
/// the session id of a process that has not left its session yet.
fn spawn_on_pid(pid: i32, cmd: &mut Command) -> Child {
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        assert!(!taken(pid), "pid {pid} is still taken");
        std::fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string()).unwrap();
        let mut c = cmd.spawn().unwrap();
        if c.id() as i32 == pid {
            return c;
        }
        got.push(c.id());
        let _ = c.kill();
        let _ = c.wait();
        std::thread::sleep(Duration::from_millis(2));
    }
    let tasks: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|p| std::fs::read_to_string(p.path().join("stat")).ok())
        .map(|s| s.split(") ").next().unwrap_or_default().to_string())
        .collect();
    panic!("could not start a process on pid {pid}: got {got:?}; processes {tasks:?}");
}

fn impostor() -> Command {
    let mut c = Command::new("sleep");
    c.arg("1000");
    c
}

fn assert_alive(c: &mut Child, what: &str) {
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        c.try_wait().unwrap(),
        None,
        "{what}: the process now on the container's old pid {} was signalled",
        c.id()
    );
}

fn end(mut c: Child) {
    let _ = c.kill();
    let _ = c.wait();
}

/// The pid namespace the shim runs in (the scenario's), joined by the container the way a
/// pod with `shareProcessNamespace` joins its pod's: its PID 1 is then an ordinary process
/// there, whose children outlive it.
fn shared_pid_ns() -> Option<PathBuf> {
    Some(PathBuf::from("/proc/self/ns/pid"))
}

#[test]
fn the_shim_never_signals_a_process_that_took_its_containers_pid() {
    in_private_pid_ns(
        "the_shim_never_signals_a_process_that_took_its_containers_pid",
        |tag| {
            let env = Env::new(tag);
            // PID 1 exits at once, but its background child keeps the output pipes open:
            // the shim drains the log for up to 2 s after the exit before it records it.
            // The child leaves PID 1's session, which would otherwise keep its pid taken.
            let mut spec = env.spec("recycled", &["sh", "-c", "setsid sleep 1000 & exit 0"]);
            spec.namespaces.pid = shared_pid_ns();
            spec.cgroup = Some(env.cgroup("recycled"));
            let c = env.create(&spec).unwrap();
            let pid = c.start().unwrap().pid;
            wait_for(
                "PID 1 to exit and be reaped",
                Duration::from_secs(10),
                || !taken(pid),
            );
            let mut imp = spawn_on_pid(pid, &mut impostor());
            for sig in [15, 9] {
                let r = c.kill(sig);
                assert_alive(&mut imp, &format!("kill {sig}"));
                let e = r.expect_err("a signal for an exited container");
                assert!(e.to_string().contains("not running"), "{e}");
            }
            let r = c.exec(ExecRequest {
                args: vec!["true".into()],
                timeout_ms: Some(10_000),
                ..Default::default()
            });
            assert!(
                r.as_ref()
                    .is_err_and(|e| e.to_string().contains("not running")),
                "exec in an exited container: {r:?}"
            );
            let st = c.stop(Duration::from_secs(1)).unwrap();
            assert_alive(&mut imp, "stop");
            assert_eq!((st.status, st.exit_code), (Status::Stopped, Some(0)));
            c.delete().unwrap();
            assert_alive(&mut imp, "delete");
            end(imp);
        },
    );
}

#[test]
fn force_delete_spares_processes_that_took_the_recorded_pids() {
    in_private_pid_ns(
        "force_delete_spares_processes_that_took_the_recorded_pids",
        |tag| {
            let env = Env::new(tag);
            let mut spec = env.spec("orphan", &["sleep", "1000"]);
            spec.cgroup = Some(env.cgroup("orphan"));
            let c = env.create(&spec).unwrap();
            let st = c.start().unwrap();
            // The shim dies, then its container; both are ours to reap now (PID 1 here).
            for pid in [st.shim_pid, st.pid] {
                kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap();
                waitpid(Pid::from_raw(pid), None).unwrap();
            }
            assert_eq!(c.recorded_state().unwrap().status, Status::Running);
            let dir = env.rt.dir("orphan");
            // A process is named by (pid, start time in clock ticks of 10 ms): one that takes
            // the pid within the tick the container started in cannot be told apart (see the
            // shim README's limits). Let a tick pass, as any real pid reuse does.
            std::thread::sleep(Duration::from_millis(20));
            // Unrelated processes get both pids; the one on the shim's pid even has the
            // state directory on its command line.
            let mut on_init = spawn_on_pid(st.pid, &mut impostor());
            let mut on_shim = spawn_on_pid(
                st.shim_pid,
                Command::new("sh")
                    .args(["-c", "read x", "sh"])
                    .arg(&dir)
                    .stdin(Stdio::piped()),
            );
            env.rt.force_delete("orphan").unwrap();
            assert_alive(&mut on_init, "force_delete (container pid)");
            assert_alive(&mut on_shim, "force_delete (shim pid)");
            assert!(!dir.exists());
            end(on_init);
            end(on_shim);
        },
    );
}

#[test]
fn a_containers_forked_children_die_on_delete_and_force_delete() {
    in_private_pid_ns(
        "a_containers_forked_children_die_on_delete_and_force_delete",
        |tag| {
            let env = Env::new(tag);
            for (id, force) in [("deleted", false), ("forced", true)] {
                let mut spec = env.spec(
                    id,
                    &["sh", "-c", "sleep 1000 & sleep 1000 & exec sleep 1000"],
                );
                spec.namespaces.pid = shared_pid_ns();
                spec.cgroup = Some(env.cgroup(id));
                let c = env.create(&spec).unwrap();
                let st = c.start().unwrap();
                let procs = st.cgroup_dirs[0].join("cgroup.procs");
                let listed = || -> Vec<i32> {
                    std::fs::read_to_string(&procs)
                        .unwrap_or_default()
                        .lines()
                        .filter_map(|l| l.trim().parse().ok())
                        .collect()
                };
                wait_for("three processes", Duration::from_secs(10), || {
                    listed().len() == 3
                });
                let pids = listed();
                assert!(pids.contains(&st.pid), "{pids:?} {}", st.pid);
                if force {
                    kill(Pid::from_raw(st.shim_pid), Signal::SIGKILL).unwrap();
                    waitpid(Pid::from_raw(st.shim_pid), None).unwrap();
                    env.rt.force_delete(id).unwrap();
                } else {
                    c.delete().unwrap();
                }
                wait_for(
                    &format!("{id}: every process of the container to die"),
                    Duration::from_secs(10),
                    || {
                        pids.iter().for_each(|p| reap(*p));
                        !pids.iter().any(|p| running(*p))
                    },
                );
                for d in &st.cgroup_dirs {
                    assert!(!d.exists(), "{id}: cgroup {} left", d.display());
                }
                assert!(!env.rt.dir(id).exists());
            }
        },
    );
}

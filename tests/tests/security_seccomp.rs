#![cfg(feature = "root")]
//! Root tests of seccomp: a RuntimeDefault container cannot make namespaces (clone with
//! CLONE_NEWUSER, unshare), reach the new mount API (fsopen) through a user namespace, set up
//! io_uring, call through the x32 ABI or set odd personalities, while ordinary work (sh, ls,
//! threads, fork) goes on; a Localhost profile from the agent's --seccomp-profile-root is
//! enforced, and a missing or escaping one fails the container with
//! CreateContainerConfigError. The raw calls come from a small static C probe built with
//! `gcc -static` at test time (gcc and libc6-dev are in scripts/setup).

mod shim_support;

use hako_shim::protocol::ExecRequest;
use hako_shim::seccomp::SeccompProfile;
use hako_tests::agent::AgentEnv;
use shim_support::Env;
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);
const EPERM: i32 = 1;
const ENOSYS: i32 = 38;

/// The probe's source: prints `<name> <errno>` per call (0 = the call worked).
const PROBE_C: &str = r#"/* Seccomp probe for tests/tests/security_seccomp.rs: tries each call and prints
 * "<name> <errno>" (0 = the call worked). Built with `gcc -static` at test time. */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/personality.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#define X32_SYSCALL_BIT 0x40000000L

static void report(const char *name, long r, int err) { printf("%s %d\n", name, r < 0 ? err : 0); }

/* A raw clone (fork-like, no new stack); the child exits with `code` from `fn`. */
static long clone_run(unsigned long flags, int (*fn)(void)) {
    long pid = syscall(SYS_clone, flags | SIGCHLD, 0, 0, 0, 0);
    if (pid == 0) _exit(fn ? fn() : 0);
    if (pid < 0) return -1;
    int st = 0;
    waitpid((pid_t)pid, &st, 0);
    if (WIFEXITED(st) && WEXITSTATUS(st) != 0) {
        errno = WEXITSTATUS(st);
        return -1;
    }
    return 0;
}

static int try_fsopen(void) {
    long fd = syscall(SYS_fsopen, "tmpfs", 0);
    return fd < 0 ? errno : 0;
}

static int try_unshare(void) { return syscall(SYS_unshare, CLONE_NEWUSER) < 0 ? errno : 0; }

static int try_x32_unshare(void) {
    return syscall(X32_SYSCALL_BIT | SYS_unshare, CLONE_NEWUSER) < 0 ? errno : 0;
}

static void *thread_main(void *arg) { return arg; }

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    long r;

    r = clone_run(0, NULL);
    report("clone_plain", r, errno);
    r = clone_run(CLONE_NEWUSER, NULL);
    report("clone_newuser", r, errno);
    r = clone_run(CLONE_NEWNS, NULL);
    report("clone_newns", r, errno);

    /* The new mount API from a fresh user + mount namespace (where it would be allowed),
     * or here when such a namespace cannot be made. */
    r = clone_run(CLONE_NEWUSER | CLONE_NEWNS, try_fsopen);
    if (r < 0 && (errno == EPERM || errno == ENOSYS || errno == EINVAL)) {
        int e = try_fsopen();
        r = e ? -1 : 0;
        errno = e;
    }
    report("fsopen", r, errno);

    uint64_t args[11] = {0};
    args[4] = SIGCHLD; /* exit_signal */
    r = syscall(SYS_clone3, args, 88);
    if (r == 0) _exit(0);
    if (r > 0) waitpid((pid_t)r, NULL, 0);
    report("clone3", r, errno);

    r = clone_run(0, try_unshare);
    report("unshare_user", r, errno);

    char params[256];
    memset(params, 0, sizeof params);
    r = syscall(SYS_io_uring_setup, 1, params);
    if (r >= 0) close((int)r);
    report("io_uring_setup", r, errno);

    r = syscall(X32_SYSCALL_BIT | SYS_getpid);
    report("x32_getpid", r, errno);
    r = clone_run(0, try_x32_unshare);
    report("x32_unshare", r, errno);

    r = personality(ADDR_NO_RANDOMIZE);
    report("personality_addr_no_randomize", r, errno);
    r = personality(0xffffffff);
    report("personality_query", r, errno);

    r = socket(40 /* AF_VSOCK */, SOCK_STREAM, 0);
    if (r >= 0) close((int)r);
    report("socket_vsock", r, errno);
    r = socket(AF_INET, SOCK_STREAM, 0);
    if (r >= 0) close((int)r);
    report("socket_inet", r, errno);

    pthread_t t;
    int e = pthread_create(&t, NULL, thread_main, NULL);
    if (e == 0) pthread_join(t, NULL);
    report("thread", e ? -1 : 0, e);

    pid_t p = fork();
    if (p == 0) _exit(7);
    int st = 0;
    if (p > 0) waitpid(p, &st, 0);
    report("fork", p > 0 && WIFEXITED(st) && WEXITSTATUS(st) == 7 ? 0 : -1, errno);
    return 0;
}
"#;

/// Compile the probe into `dir/bin/seccomp-probe` (a container rootfs).
fn install_probe(rootfs: &Path, tmp: &Path) {
    let src = tmp.join("seccomp_probe.c");
    std::fs::write(&src, PROBE_C).unwrap();
    let out = rootfs.join("bin/seccomp-probe");
    let r = std::process::Command::new("gcc")
        .args(["-static", "-O1", "-pthread", "-o"])
        .arg(&out)
        .arg(&src)
        .output()
        .expect("gcc (install gcc and libc6-dev: scripts/setup)");
    assert!(
        r.status.success(),
        "gcc -static failed (libc6-dev installed?): {}",
        String::from_utf8_lossy(&r.stderr)
    );
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o755)).unwrap();
}

fn parse(lines: &[String]) -> BTreeMap<String, i32> {
    lines
        .iter()
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

fn io_uring_enabled() -> bool {
    std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        .map(|s| s.trim() == "0")
        .unwrap_or(true)
}

/// What the probe must see under RuntimeDefault with the default capabilities.
fn assert_runtime_default(got: &BTreeMap<String, i32>) {
    let want = [
        ("clone_plain", 0),
        ("clone_newuser", EPERM),
        ("fsopen", EPERM),
        ("clone3", ENOSYS),
        ("unshare_user", EPERM),
        ("io_uring_setup", EPERM),
        ("x32_getpid", EPERM),
        ("x32_unshare", EPERM),
        ("personality_addr_no_randomize", EPERM),
        ("personality_query", 0),
        ("socket_vsock", EPERM),
        ("socket_inet", 0),
        ("thread", 0),
        ("fork", 0),
    ];
    let mismatches: Vec<String> = want
        .iter()
        .filter(|(k, v)| got.get(*k) != Some(v))
        .map(|(k, v)| format!("{k}: want {v}, got {:?}", got.get(*k)))
        .collect();
    assert!(mismatches.is_empty(), "{mismatches:#?}\nall: {got:?}");
}

#[test]
fn runtime_default_refuses_namespaces_io_uring_new_mount_api_and_x32() {
    let env = Env::new("scmp-rd");
    install_probe(&env.rootfs, env.tmp.path());

    // Control: without a filter the probe's attacks work, so the checks below can fail.
    let (st, _) = env.run(&env.spec("open", &["/bin/seccomp-probe"]));
    assert_eq!(st.exit_code, Some(0));
    let open = parse(&env.stdout("open"));
    for k in [
        "clone_newuser",
        "fsopen",
        "clone3",
        "personality_addr_no_randomize",
    ] {
        assert_eq!(open.get(k), Some(&0), "unconfined {k}: {open:?}");
    }
    if io_uring_enabled() {
        assert_eq!(open.get("io_uring_setup"), Some(&0), "{open:?}");
    }
    assert_ne!(open.get("x32_getpid"), Some(&EPERM), "{open:?}");

    // RuntimeDefault: the container's first process.
    let mut spec = env.spec("confined", &["/bin/seccomp-probe"]);
    spec.seccomp = SeccompProfile::RuntimeDefault;
    let (st, _) = env.run(&spec);
    assert_eq!(st.exit_code, Some(0));
    assert_runtime_default(&parse(&env.stdout("confined")));

    // Ordinary shell work goes on; busybox `unshare -U` is refused.
    let script = "grep '^Seccomp:' /proc/self/status; ls / >/dev/null && echo ls-ok; \
                  (echo sub-ok) & wait; \
                  if unshare -U true 2>/dev/null; then echo unshare-ok; else echo unshare-refused; fi";
    let mut spec = env.spec("shell", &["sh", "-c", script]);
    spec.seccomp = SeccompProfile::RuntimeDefault;
    let (st, _) = env.run(&spec);
    assert_eq!(st.exit_code, Some(0));
    assert_eq!(
        env.stdout("shell"),
        ["Seccomp:\t2", "ls-ok", "sub-ok", "unshare-refused"]
    );

    // Processes exec'd into a RuntimeDefault container get the same filter.
    let mut spec = env.spec("execd", &["sleep", "1000"]);
    spec.seccomp = SeccompProfile::RuntimeDefault;
    let c = env.create(&spec).unwrap();
    c.start().unwrap();
    let r = c
        .exec(ExecRequest {
            args: vec!["/bin/seccomp-probe".into()],
            timeout_ms: Some(30_000),
            ..Default::default()
        })
        .expect("exec");
    let lines: Vec<String> = r.stdout.lines().map(str::to_string).collect();
    assert_runtime_default(&parse(&lines));
    c.delete().unwrap();
}

const DENY_MKDIR: &str = r#"{
    "defaultAction": "SCMP_ACT_ALLOW",
    "architectures": ["SCMP_ARCH_X86_64"],
    "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]
}"#;

fn exec_out(env: &AgentEnv, pod: &str, script: &str) -> Vec<String> {
    let out = env.cli(&["exec", pod, "--", "sh", "-c", script]);
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

fn wait_config_error(env: &AgentEnv, pod: &str, want: &str) {
    env.wait_for(&format!("{pod}: CreateContainerConfigError"), T, |e| {
        let s = e.container_status(pod, "c")?;
        let w = &s["state"]["waiting"];
        let msg = w["message"].as_str().unwrap_or("");
        (w["reason"] == "CreateContainerConfigError" && msg.contains(want)).then_some(())
    });
}

#[test]
fn localhost_profile_enforced_and_missing_or_escaping_profile_is_a_config_error() {
    let mut env = AgentEnv::new("scmp-lh");
    let root = env.root.join("seccomp");
    std::fs::create_dir_all(root.join("profiles")).unwrap();
    std::fs::write(root.join("profiles/deny-mkdir.json"), DENY_MKDIR).unwrap();
    std::fs::write(env.tmp.path().join("outside.json"), DENY_MKDIR).unwrap();
    std::os::unix::fs::symlink("../../../outside.json", root.join("profiles/escape.json")).unwrap();
    let img = env.image("sleep");
    let pod = |name: &str, pod_sc: &str, c_sc: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\nspec:\n  terminationGracePeriodSeconds: 1\n  securityContext: {{{pod_sc}}}\n  containers:\n  - {{name: c, image: \"{img}\", securityContext: {{{c_sc}}}}}\n"
        )
    };
    let localhost = |p: &str| format!("seccompProfile: {{type: Localhost, localhostProfile: {p}}}");
    // Pod-level profile.
    env.write_manifest(
        "deny.yaml",
        &pod("deny", &localhost("profiles/deny-mkdir.json"), ""),
    );
    // The container's RuntimeDefault overrides the pod's Localhost profile.
    env.write_manifest(
        "override.yaml",
        &pod(
            "override",
            &localhost("profiles/deny-mkdir.json"),
            "seccompProfile: {type: RuntimeDefault}",
        ),
    );
    env.write_manifest(
        "missing.yaml",
        &pod("missing", "", &localhost("profiles/missing.json")),
    );
    env.write_manifest(
        "escape.yaml",
        &pod("escape", "", &localhost("profiles/escape.json")),
    );
    env.start();

    env.wait_running("deny", T);
    let script = "grep '^Seccomp:' /proc/1/status; \
                  if mkdir /tmp/x 2>/dev/null; then echo mkdir-ok; else echo mkdir-refused; fi; \
                  ls /etc >/dev/null && echo ls-ok; echo hi > /tmp/f && cat /tmp/f";
    assert_eq!(
        exec_out(&env, "deny-node1", script),
        ["Seccomp:\t2", "mkdir-refused", "ls-ok", "hi"]
    );
    env.wait_running("override", T);
    assert_eq!(
        exec_out(&env, "override-node1", script),
        ["Seccomp:\t2", "mkdir-ok", "ls-ok", "hi"]
    );

    wait_config_error(&env, "missing", "profiles/missing.json");
    wait_config_error(&env, "escape", "leads out of the profile root");
    for p in ["missing", "escape"] {
        let s = env.container_status(p, "c").unwrap();
        assert!(s["state"]["running"].is_null(), "{p} must not run: {s}");
    }
}

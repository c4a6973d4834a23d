//! The `hako-shim` binary's command line without root: bad input fails with clear errors.
//! (Also makes `cargo test` build the binary that the root tests in `tests/` run.)

use std::process::Command;

fn shim() -> Command {
    Command::new(env!("CARGO_BIN_EXE_hako-shim"))
}

#[test]
fn help_lists_the_lifecycle() {
    let out = shim().arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for cmd in [
        "create", "start", "kill", "stop", "wait", "exec", "delete", "pull",
    ] {
        assert!(text.contains(cmd), "{cmd} missing from --help");
    }
}

#[test]
fn create_without_a_spec_fails_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("c1");
    std::fs::create_dir(&state).unwrap();
    let out = shim()
        .args(["create", "--state-dir"])
        .arg(&state)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("read spec"), "{err}");
    assert!(!state.exists(), "state dir left behind");
}

#[test]
fn pull_policy_never_on_an_empty_store_fails() {
    let dir = tempfile::tempdir().unwrap();
    let out = shim()
        .args(["pull", "--policy", "Never", "--image-root"])
        .arg(dir.path())
        .arg("busybox")
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("docker.io/library/busybox:latest is not present"),
        "{err}"
    );
}

//! The command line as an operator uses it against a running agent: `exec -it` on a real
//! terminal (a pty the test opens and makes the controlling terminal of `hako-agent`):
//! `stty size` inside reports the caller's size, a resize of the caller's terminal reaches
//! the container (SIGWINCH), the exit code comes back and the caller's terminal is restored;
//! `exec -i` pipes stdin; `describe -o json|yaml`.
#![cfg(feature = "root")]

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hako_tests::agent::{target_bin, AgentEnv};

const T: Duration = Duration::from_secs(120);

fn agent_cmd(env: &AgentEnv) -> Command {
    let mut cmd = Command::new(target_bin("hako-agent", "HAKO_AGENT_BIN"));
    cmd.arg("--root-dir")
        .arg(&env.root)
        .arg("--run-dir")
        .arg(&env.run)
        .arg("--pod-log-dir")
        .arg(&env.logs)
        .arg("--shim-binary")
        .arg(target_bin("hako-shim", "HAKO_SHIM_BIN"));
    cmd
}

/// Kills the child on drop.
struct Kill(std::process::Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_pod(tag: &str) -> AgentEnv {
    let mut env = AgentEnv::new(tag);
    env.write_manifest(
        "term.yaml",
        &format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: term, namespace: default}}\nspec:\n  containers: [{{name: c, image: {}, command: [sleep, '3600']}}]\n",
            env.image("sleep")
        ),
    );
    env.start();
    env.wait_running("term", T);
    env
}

#[test]
fn exec_it_gives_the_callers_terminal_size_and_follows_resizes() {
    let env = start_pod("opsclit");
    let size = nix::pty::Winsize {
        ws_row: 33,
        ws_col: 111,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let pty = nix::pty::openpty(Some(&size), None).unwrap();
    let slave_path = nix::unistd::ttyname(&pty.slave).unwrap();
    let mut cmd = Command::new("setsid");
    // -c: the pty becomes hako-agent's controlling terminal, so a resize sends it SIGWINCH.
    cmd.arg("-c")
        .arg(target_bin("hako-agent", "HAKO_AGENT_BIN"))
        .arg("--root-dir")
        .arg(&env.root)
        .arg("--run-dir")
        .arg(&env.run)
        .arg("--pod-log-dir")
        .arg(&env.logs)
        .arg("--shim-binary")
        .arg(target_bin("hako-shim", "HAKO_SHIM_BIN"))
        .args(["exec", "-i", "-t", "term-node1", "--", "sh", "-c"])
        .arg("read a; busybox stty size; while read b; do [ \"$b\" = q ] && exit 7; busybox stty size; done")
        .stdin(Stdio::from(pty.slave.try_clone().unwrap()))
        .stdout(Stdio::from(pty.slave.try_clone().unwrap()))
        .stderr(Stdio::from(pty.slave.try_clone().unwrap()));
    let mut child = Kill(cmd.spawn().unwrap());
    drop(pty.slave);
    let mut master = std::fs::File::from(pty.master);
    let output = Arc::new(Mutex::new(String::new()));
    {
        let mut reader = master.try_clone().unwrap();
        let output = output.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                output
                    .lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
    }
    let seen = |want: &str| output.lock().unwrap().contains(want);
    let wait_for = |want: &str, master: &mut std::fs::File, poke: bool| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !seen(want) {
            assert!(
                Instant::now() < deadline,
                "{want:?} never shown; terminal output:\n{:?}\n--- agent log:\n{}",
                output.lock().unwrap(),
                hako_tests::agent::tail(&env.agent_log(), 3000)
            );
            if poke {
                master.write_all(b"\n").unwrap();
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    };
    // The command reads a line first: the size was set before any input went through.
    master.write_all(b"\n").unwrap();
    wait_for("33 111", &mut master, false);
    // The caller's terminal changes size: hako-agent gets SIGWINCH and resizes the
    // container's terminal. Each newline makes the command print the size it sees.
    let out = Command::new("stty")
        .arg("-F")
        .arg(&slave_path)
        .args(["rows", "44", "cols", "132"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    wait_for("44 132", &mut master, true);
    master.write_all(b"q\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = child.0.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "exec -it did not end after q");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(status.code(), Some(7), "{:?}", output.lock().unwrap());
    // The caller's terminal is back in canonical mode.
    let out = Command::new("stty")
        .arg("-F")
        .arg(&slave_path)
        .arg("-a")
        .output()
        .unwrap();
    let modes = String::from_utf8_lossy(&out.stdout);
    assert!(
        modes.split_whitespace().any(|w| w == "icanon"),
        "terminal left raw: {modes}"
    );
}

#[test]
fn exec_i_pipes_stdin_and_describe_prints_json_and_yaml() {
    let env = start_pod("opsclii");
    // exec -i: stdin reaches the command, EOF ends it.
    let mut c = Kill(
        agent_cmd(&env)
            .args([
                "exec",
                "-i",
                "term-node1",
                "--",
                "sh",
                "-c",
                "tr a-z A-Z; exit 3",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    c.0.stdin.take().unwrap().write_all(b"hello\n").unwrap();
    let mut out = String::new();
    c.0.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    let mut err = String::new();
    c.0.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert_eq!(out, "HELLO\n", "stderr: {err}");
    assert_eq!(c.0.wait().unwrap().code(), Some(3), "stderr: {err}");
    // exec -t without a terminal on stdin: a warning, and the command runs without one.
    let out = agent_cmd(&env)
        .args([
            "exec",
            "-t",
            "term-node1",
            "--",
            "sh",
            "-c",
            "[ -t 0 ] && echo tty || echo notty",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "notty\n");
    assert!(String::from_utf8_lossy(&out.stderr).contains("Unable to use a TTY"));
    // describe -o json / -o yaml: the pod as the agent records it.
    let out = env.cli(&["describe", "pod", "term-node1", "-o", "json"]);
    assert!(out.status.success(), "{out:?}");
    let pod: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(pod["metadata"]["name"], "term-node1");
    assert_eq!(pod["status"]["phase"], "Running");
    let out = env.cli(&["describe", "pod", "default/term-node1", "-o", "yaml"]);
    assert!(out.status.success(), "{out:?}");
    let pod: serde_json::Value = serde_yaml::from_slice(&out.stdout).unwrap();
    assert_eq!(pod["metadata"]["name"], "term-node1");
    assert_eq!(pod["spec"]["containers"][0]["name"], "c");
}

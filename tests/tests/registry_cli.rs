//! Root tests of the `hako-test-registry` CLI: `serve` prints its address, serves the
//! standard images and cleans up on SIGTERM (and keeps a given `--dir`); `push` fills an
//! already running registry.
#![cfg(feature = "root")]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hako_tests::registry::{tags, Client, Registry, RegistryOptions, BUSYBOX_REPO};
use hako_tests::require_root;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const BIN: &str = env!("CARGO_BIN_EXE_hako-test-registry");

fn all_tags() -> Vec<&'static str> {
    let mut t = vec![
        tags::OCI,
        tags::DOCKER,
        tags::LATEST,
        tags::DOCKER_LIST,
        tags::PLAIN,
        tags::SLEEP,
    ];
    t.sort();
    t
}

fn sorted_tags(addr: &str) -> Vec<String> {
    let mut t = Client::new(addr).tags(BUSYBOX_REPO).unwrap();
    t.sort();
    t
}

/// A running `serve`; drop sends SIGTERM and, past a deadline, SIGKILL.
struct Serve {
    child: Child,
    addr: String,
}

impl Serve {
    fn start(args: &[&str]) -> Serve {
        let mut child = Command::new(BIN)
            .arg("serve")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line.trim().to_string();
        let mut s = Serve { child, addr };
        assert!(s.addr.starts_with("127.0.0.1:"), "serve printed {line:?}");
        assert!(s.child.try_wait().unwrap().is_none());
        s
    }

    /// The registry child: its pid and the dir of its config file.
    fn registry(&self) -> (u32, PathBuf) {
        let children =
            std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", self.child.id()))
                .unwrap();
        let pid: u32 = children.split_whitespace().next().unwrap().parse().unwrap();
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        assert!(args[0].ends_with("docker-registry"), "{args:?}");
        let config = PathBuf::from(&args[2]);
        (pid, config.parent().unwrap().to_path_buf())
    }

    fn stop(&mut self) -> std::process::ExitStatus {
        let pid = Pid::from_raw(i32::try_from(self.child.id()).unwrap());
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        self.child.wait().unwrap()
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.stop();
        }
    }
}

#[test]
fn serve_serves_the_standard_images_and_cleans_up_on_sigterm() {
    require_root();
    let mut s = Serve::start(&[]);
    assert_eq!(sorted_tags(&s.addr), all_tags());
    let (pid, dir) = s.registry();
    assert!(dir.join("registry.log").exists());
    let status = s.stop();
    assert!(status.success(), "{status}");
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "registry {pid} left running"
    );
    assert!(!dir.exists(), "{} left behind", dir.display());
}

#[test]
fn serve_keeps_a_given_dir_and_port() {
    require_root();
    let keep = tempfile::tempdir().unwrap();
    let dir = keep.path().join("reg");
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut s = Serve::start(&["--port", &port.to_string(), "--dir", dir.to_str().unwrap()]);
    assert_eq!(s.addr, format!("127.0.0.1:{port}"));
    assert!(s.stop().success());
    assert!(dir.join("storage").is_dir());
    // A new registry on the same storage still has the images.
    let reg = Registry::start_with(RegistryOptions {
        port: None,
        dir: Some(dir.clone()),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(sorted_tags(reg.addr()), all_tags());
    drop(reg);
    assert!(dir.is_dir(), "a given dir is kept");
}

#[test]
fn push_fills_a_running_registry() {
    require_root();
    let reg = Registry::start().unwrap();
    let out = Command::new(BIN)
        .args(["push", "--registry", reg.addr()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), reg.addr());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("pushed {}/busybox:latest sha256:", reg.addr())),
        "{stderr}"
    );
    assert_eq!(sorted_tags(reg.addr()), all_tags());
}

#[test]
fn push_to_nothing_fails_with_the_address() {
    require_root();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let addr = format!("127.0.0.1:{port}");
    let out = Command::new(BIN)
        .args(["push", "--registry", &addr])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&addr), "{stderr}");
}

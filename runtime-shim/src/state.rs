//! Container state as the shim records it in `<state-root>/<id>/state.json`, and discovery
//! of containers after an agent restart. Effectful (files); the types are plain data.

use serde::{Deserialize, Serialize};
use std::io;
use std::path::{Path, PathBuf};

/// Lifecycle status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Process set up, waiting for start.
    Created,
    /// Program running.
    Running,
    /// Process exited; `exit_code` is set.
    Stopped,
}

/// What the shim knows about its container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct State {
    /// Container id.
    pub id: String,
    /// Lifecycle status.
    pub status: Status,
    /// Pid of the shim process.
    pub shim_pid: i32,
    /// Host pid of the container's PID 1.
    pub pid: i32,
    /// Start time of `pid` (field 22 of `/proc/<pid>/stat`): with `pid` it names the
    /// process, so a later process given the same pid is never taken for the container.
    /// Absent in state files written before it was recorded.
    #[serde(default)]
    pub pid_start_time: Option<u64>,
    /// Start time of `shim_pid`, as for `pid_start_time`.
    #[serde(default)]
    pub shim_start_time: Option<u64>,
    /// Exit code (128+signal when killed by a signal).
    pub exit_code: Option<i32>,
    /// Kubernetes-style reason: `Completed`, `Error`, `OOMKilled`.
    pub reason: Option<String>,
    /// RFC 3339 times.
    pub created_at: String,
    /// Set once started.
    pub started_at: Option<String>,
    /// Set once stopped.
    pub finished_at: Option<String>,
    /// oom_score_adj in force (after clamping).
    pub oom_score_adj: Option<i32>,
    /// Set when the requested oom_score_adj was clamped (no CAP_SYS_RESOURCE).
    pub oom_score_adj_clamped: bool,
    /// cgroup directories of the container.
    pub cgroup_dirs: Vec<PathBuf>,
}

/// Name of the state file in a container's state directory.
pub const STATE_FILE: &str = "state.json";
/// Name of the shim's socket in a container's state directory.
pub const SOCKET: &str = "shim.sock";
/// Name of the spec file in a container's state directory.
pub const SPEC_FILE: &str = "spec.json";

/// The exit reason for an exit code and OOM kill count. Pure.
pub fn reason(exit_code: i32, oom_kills: u64) -> &'static str {
    if oom_kills > 0 {
        "OOMKilled"
    } else if exit_code == 0 {
        "Completed"
    } else {
        "Error"
    }
}

/// Write the state durably (a force_delete after a crash relies on it).
pub fn write(dir: &Path, st: &State) -> io::Result<()> {
    let data = serde_json::to_vec_pretty(st).map_err(io::Error::other)?;
    crate::durable::write_file(&dir.join(STATE_FILE), &data, 0o644)
}

/// Read a container's last recorded state.
pub fn read(dir: &Path) -> io::Result<State> {
    let data = std::fs::read(dir.join(STATE_FILE))?;
    serde_json::from_slice(&data).map_err(io::Error::other)
}

/// Every container recorded under `root` (directories without a readable state are skipped).
pub fn list(root: &Path) -> io::Result<Vec<State>> {
    let mut out = Vec::new();
    let rd = match std::fs::read_dir(root) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for e in rd.flatten() {
        if let Ok(st) = read(&e.path()) {
            out.push(st);
        }
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons() {
        assert_eq!(reason(0, 0), "Completed");
        assert_eq!(reason(1, 0), "Error");
        assert_eq!(reason(137, 1), "OOMKilled");
    }

    #[test]
    fn write_read_list() {
        let d = tempfile::tempdir().unwrap();
        let c = d.path().join("c1");
        std::fs::create_dir(&c).unwrap();
        let st = State {
            id: "c1".into(),
            status: Status::Running,
            shim_pid: 1,
            pid: 2,
            pid_start_time: Some(7),
            shim_start_time: Some(5),
            exit_code: None,
            reason: None,
            created_at: "t".into(),
            started_at: None,
            finished_at: None,
            oom_score_adj: Some(0),
            oom_score_adj_clamped: true,
            cgroup_dirs: vec![],
        };
        write(&c, &st).unwrap();
        std::fs::create_dir(d.path().join("junk")).unwrap();
        assert_eq!(list(d.path()).unwrap(), vec![st]);
    }

    #[test]
    fn state_files_without_start_times_still_parse() {
        let old = r#"{"id":"c1","status":"running","shimPid":10,"pid":11,"exitCode":null,
            "reason":null,"createdAt":"t","startedAt":"t","finishedAt":null,
            "oomScoreAdj":null,"oomScoreAdjClamped":false,"cgroupDirs":["/sys/fs/cgroup/pids/x"]}"#;
        let st: State = serde_json::from_str(old).unwrap();
        assert_eq!(
            (st.pid, st.pid_start_time, st.shim_start_time),
            (11, None, None)
        );
        let new = serde_json::to_string(&State {
            pid_start_time: Some(123),
            ..st
        })
        .unwrap();
        assert!(new.contains(r#""pidStartTime":123"#), "{new}");
        assert!(new.contains(r#""shimStartTime":null"#), "{new}");
    }
}

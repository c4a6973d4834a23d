//! The shim's socket protocol: one JSON request line, one JSON response line per
//! connection. Pure data.

use crate::state::State;
use serde::{Deserialize, Serialize};

/// A request to the shim.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "camelCase")]
pub enum Request {
    /// Current state.
    State,
    /// Exec the container's program.
    Start,
    /// Send a signal to the container's PID 1.
    Kill {
        /// Signal number.
        signal: i32,
    },
    /// SIGTERM, then SIGKILL after `grace_ms`; answers once the process has exited.
    Stop {
        /// Grace period in milliseconds.
        grace_ms: u64,
    },
    /// Wait for the exit (or the timeout); answers with the state.
    Wait {
        /// Give up after this many milliseconds (none: wait forever).
        timeout_ms: Option<u64>,
    },
    /// Run a process in the container's namespaces and cgroup; answers with its output.
    Exec(ExecRequest),
    /// Run a process in the container with its stdio handed to the caller while it runs
    /// (see [`crate::stream`]): the first response line carries the descriptors, the second
    /// the exit code.
    ExecStream(ExecRequest),
    /// A duplicate of the write end of the container's stdin (`process.stdin`), handed over
    /// with the response line (see [`crate::stream`]).
    AttachStdin,
    /// Kill what runs, remove the cgroup, rootfs and state; the shim exits.
    Delete,
}

/// An exec.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct ExecRequest {
    /// argv (looked up in the container's PATH).
    pub args: Vec<String>,
    /// Extra `NAME=value` entries on top of the container's env.
    pub env: Vec<String>,
    /// Working directory (default: the container's).
    pub cwd: Option<String>,
    /// Kill the process after this many milliseconds.
    pub timeout_ms: Option<u64>,
    /// Run on a terminal from the container's devpts (stdin, stdout and stderr); the
    /// terminal's output comes back as `stdout`.
    pub tty: bool,
    /// Streaming exec only: give the process a stdin pipe (else /dev/null; with `tty` the
    /// terminal is always its stdin).
    pub stdin: bool,
}

/// An exec's result.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExecResult {
    /// Exit code (128+signal when killed).
    pub exit_code: i32,
    /// Captured stdout (lossy UTF-8).
    pub stdout: String,
    /// Captured stderr (lossy UTF-8).
    pub stderr: String,
    /// Killed at the timeout.
    pub timed_out: bool,
}

/// A response.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Response {
    /// Error text when the request failed.
    pub error: Option<String>,
    /// The state after the request.
    pub state: Option<State>,
    /// Result of an exec.
    pub exec: Option<ExecResult>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format() {
        let r = Request::Kill { signal: 15 };
        let s = serde_json::to_string(&r).unwrap();
        assert_eq!(s, r#"{"op":"kill","signal":15}"#);
        let e: Request = serde_json::from_str(r#"{"op":"exec","args":["id"]}"#).unwrap();
        assert_eq!(
            e,
            Request::Exec(ExecRequest {
                args: vec!["id".into()],
                ..Default::default()
            })
        );
    }
}

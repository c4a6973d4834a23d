//! Delegated IPAM: runs the plugin named by `ipam.type` from `CNI_PATH` with this plugin's
//! own stdin and environment (only `CNI_COMMAND` set per call), as the reference bridge
//! plugin does through `pkg/ipam`. The `IpamPlugin` trait is the seam (`ExecIpam` runs the
//! binary, tests use a recorder). Effectful.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::skel::{codes, CniError};

/// How long one IPAM plugin call may take (dhcp's own ADD waits up to about a minute).
pub const DEADLINE: Duration = Duration::from_secs(90);

/// Largest stdout accepted from an IPAM plugin.
const MAX_OUTPUT: u64 = 1 << 20;

/// One IPAM plugin, called with a CNI command.
pub trait IpamPlugin {
    /// Runs `command` (ADD, DEL, CHECK, GC, STATUS); returns stdout as JSON (`Null` when
    /// empty), or the plugin's own error.
    fn call(&self, command: &str) -> Result<Value, CniError>;
}

fn exec_err(details: String) -> CniError {
    CniError::new(codes::IPAM_PLUGIN, "IPAM plugin failed", details)
}

/// Finds `name` in the `CNI_PATH` directories (first match, as libcni's `FindInPath`).
pub fn find_in_path(name: &str, dirs: &[PathBuf]) -> Result<PathBuf, CniError> {
    dirs.iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            CniError::new(
                codes::INVALID_CONFIG,
                "invalid network configuration",
                format!(
                    "ipam.type {name:?}: no such plugin in CNI_PATH ({})",
                    dirs.iter()
                        .map(|d| d.display().to_string())
                        .collect::<Vec<_>>()
                        .join(":")
                ),
            )
        })
}

/// The real plugin: a binary run with the given stdin and the inherited environment.
pub struct ExecIpam {
    /// The plugin binary.
    pub bin: PathBuf,
    /// Its stdin (this plugin's stdin, unchanged).
    pub stdin: Vec<u8>,
}

fn reader(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = (&mut r).take(MAX_OUTPUT).read_to_end(&mut buf);
        // Drain the rest so the child never blocks on a full pipe.
        let _ = std::io::copy(&mut r, &mut std::io::sink());
        buf
    })
}

fn wait_bounded(child: &mut Child, bin: &Path) -> Result<std::process::ExitStatus, CniError> {
    let until = Instant::now() + DEADLINE;
    loop {
        match child.try_wait() {
            Ok(Some(st)) => return Ok(st),
            Ok(None) if Instant::now() >= until => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(CniError::new(
                    codes::TRY_AGAIN,
                    "IPAM plugin timed out",
                    format!("{} did not answer within {:?}", bin.display(), DEADLINE),
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => return Err(exec_err(format!("waiting for {}: {e}", bin.display()))),
        }
    }
}

impl IpamPlugin for ExecIpam {
    fn call(&self, command: &str) -> Result<Value, CniError> {
        let bin = &self.bin;
        let mut child = Command::new(bin)
            .env("CNI_COMMAND", command)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| exec_err(format!("running {}: {e}", bin.display())))?;
        let out = child.stdout.take().map(reader);
        let err = child.stderr.take().map(reader);
        if let Some(mut stdin) = child.stdin.take() {
            // A plugin that exits without reading stdin is judged by its answer.
            let _ = stdin.write_all(&self.stdin);
        }
        let status = wait_bounded(&mut child, bin)?;
        let stdout = out.and_then(|h| h.join().ok()).unwrap_or_default();
        let stderr = err.and_then(|h| h.join().ok()).unwrap_or_default();
        parse_answer(bin, command, status.success(), &stdout, &stderr)
    }
}

/// Interprets a plugin's exit and output: its result JSON, or its error JSON forwarded
/// with its own code. Pure.
pub fn parse_answer(
    bin: &Path,
    command: &str,
    success: bool,
    stdout: &[u8],
    stderr: &[u8],
) -> Result<Value, CniError> {
    let text = String::from_utf8_lossy(stdout);
    let json = if text.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str::<Value>(&text).map_err(|e| {
            exec_err(format!(
                "{} {command}: stdout is not JSON ({e}): {}",
                bin.display(),
                text.trim()
            ))
        })?
    };
    if success {
        return Ok(json);
    }
    let code = json
        .get("code")
        .and_then(Value::as_u64)
        .and_then(|c| u32::try_from(c).ok())
        .filter(|c| *c != 0)
        .unwrap_or(codes::IPAM_PLUGIN);
    let msg = json.get("msg").and_then(Value::as_str).unwrap_or("");
    let details = json.get("details").and_then(Value::as_str).unwrap_or("");
    let name = bin.file_name().map(|n| n.to_string_lossy().into_owned());
    let mut d = format!("{} {command}", name.unwrap_or_default());
    for part in [msg, details] {
        if !part.is_empty() {
            d.push_str(": ");
            d.push_str(part);
        }
    }
    if msg.is_empty() && details.is_empty() {
        d.push_str(&format!(
            ": failed without an error JSON: {}",
            String::from_utf8_lossy(stderr).trim()
        ));
    }
    Err(CniError::new(code, "IPAM plugin failed", d))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers() {
        let bin = Path::new("/usr/lib/cni/host-local");
        let ok = parse_answer(bin, "ADD", true, br#"{"ips":[]}"#, b"").unwrap();
        assert!(ok["ips"].is_array());
        assert_eq!(
            parse_answer(bin, "DEL", true, b"", b"").unwrap(),
            Value::Null
        );
        let e = parse_answer(
            bin,
            "ADD",
            false,
            br#"{"code":11,"msg":"no IP addresses available","details":"range full"}"#,
            b"",
        )
        .unwrap_err();
        assert_eq!(e.code, 11);
        assert!(e
            .details
            .contains("host-local ADD: no IP addresses available: range full"));
        let e = parse_answer(bin, "ADD", false, b"", b"boom").unwrap_err();
        assert_eq!(e.code, codes::IPAM_PLUGIN);
        assert!(e.details.contains("boom"));
        let e = parse_answer(bin, "ADD", true, b"not json", b"").unwrap_err();
        assert_eq!(e.code, codes::IPAM_PLUGIN);
    }

    #[test]
    fn lookup_in_path() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("host-local"), b"").unwrap();
        let dirs = vec![PathBuf::from("/nonexistent"), d.path().to_path_buf()];
        assert_eq!(
            find_in_path("host-local", &dirs).unwrap(),
            d.path().join("host-local")
        );
        assert_eq!(find_in_path("static", &dirs).unwrap_err().code, 7);
    }
}

//! Log set-up shared by the daemons (`hako-proxy`, `hako-agent`): the kubelet's
//! `--logging-format text|json` and klog's `-v N`, mapped onto `tracing`. Text is plain (no
//! ANSI colour) unless stderr is a terminal. [`filter_for`] is pure; [`init`] installs the
//! global subscriber.

use std::io::IsTerminal;

/// `--log-format`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event (colour only on a terminal).
    #[default]
    Text,
    /// One JSON object per line (`timestamp`, `level`, `fields.message`, `target`, span
    /// fields), the shape of the kubelet's `--logging-format json`.
    Json,
}

/// The workspace's crates, whose debug/trace events `-v 3..5` turns on (the crates they use,
/// such as hyper or kube, stay at info until `-v 6`).
const OWN: &[&str] = &["hako_agent", "hako_proxier", "hako_shim", "hako_cni"];

/// The `tracing` filter of a klog verbosity. klog prints V(0)-V(2) messages by default on
/// most nodes, V(3)-V(4) are debugging detail, V(5)+ trace; so: no `-v` → `RUST_LOG` if set,
/// else `info`; `-v 0..=2` → `info`; `-v 3..=4` → `debug` for hako's crates; `-v 5` →
/// `trace` for hako's crates; `-v 6+` → `trace` for everything. Warnings and errors always
/// show. An explicit `-v` wins over `RUST_LOG`.
pub fn filter_for(verbosity: Option<u8>, rust_log: Option<&str>) -> String {
    let own = |level: &str| {
        let mut s = String::from("info");
        for c in OWN {
            s.push(',');
            s.push_str(c);
            s.push('=');
            s.push_str(level);
        }
        s
    };
    match verbosity {
        None => rust_log
            .filter(|s| !s.trim().is_empty())
            .unwrap_or("info")
            .to_string(),
        Some(0..=2) => "info".into(),
        Some(3 | 4) => own("debug"),
        Some(5) => own("trace"),
        Some(_) => "trace".into(),
    }
}

/// Installs the global subscriber writing to stderr. A `RUST_LOG` that does not parse
/// falls back to `info` (with a warning once the subscriber is up).
pub fn init(format: LogFormat, verbosity: Option<u8>) {
    let rust_log = std::env::var("RUST_LOG").ok();
    let wanted = filter_for(verbosity, rust_log.as_deref());
    let (filter, bad) = match tracing_subscriber::EnvFilter::try_new(&wanted) {
        Ok(f) => (f, None),
        Err(e) => (tracing_subscriber::EnvFilter::new("info"), Some(e)),
    };
    let b = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    let r = match format {
        LogFormat::Json => b.json().try_init(),
        LogFormat::Text => b.with_ansi(std::io::stderr().is_terminal()).try_init(),
    };
    if r.is_ok() {
        if let Some(e) = bad {
            tracing::warn!(filter = wanted, error = %e, "ignoring RUST_LOG: it does not parse");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verbosity_mapping() {
        assert_eq!(filter_for(None, None), "info");
        assert_eq!(filter_for(None, Some("warn")), "warn");
        assert_eq!(filter_for(None, Some(" ")), "info");
        assert_eq!(filter_for(Some(0), Some("trace")), "info");
        assert_eq!(filter_for(Some(2), None), "info");
        let v4 = filter_for(Some(4), None);
        assert!(v4.starts_with("info,") && v4.contains("hako_proxier=debug"));
        assert!(v4.contains("hako_agent=debug"));
        assert!(filter_for(Some(5), None).contains("hako_shim=trace"));
        assert_eq!(filter_for(Some(9), None), "trace");
        for v in [None, Some(0), Some(3), Some(5), Some(200)] {
            assert!(tracing_subscriber::EnvFilter::try_new(filter_for(v, None)).is_ok());
        }
    }
}

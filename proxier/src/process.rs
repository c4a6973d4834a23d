//! The `process_*` metrics of the Prometheus client libraries (what kube-proxy exposes
//! through client_golang's process collector): CPU seconds, resident and virtual memory,
//! open and maximum file descriptors, start time. The parsers of `/proc` text are pure;
//! [`ProcessStats::read`] reads `/proc/self` (effectful).

use std::fmt::Write as _;

/// One reading of this process.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcessStats {
    /// User + system CPU time, seconds.
    pub cpu_seconds: f64,
    /// Resident set size, bytes.
    pub resident_bytes: u64,
    /// Virtual memory size, bytes.
    pub virtual_bytes: u64,
    /// Open file descriptors.
    pub open_fds: u64,
    /// The soft limit of open file descriptors (None: unlimited or unknown).
    pub max_fds: Option<u64>,
    /// Start time, seconds since the epoch.
    pub start_time_seconds: f64,
}

/// The fields of `/proc/<pid>/stat` these metrics use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatFields {
    /// utime + stime, clock ticks.
    pub cpu_ticks: u64,
    /// Start time after boot, clock ticks.
    pub start_ticks: u64,
    /// vsize, bytes.
    pub vsize: u64,
    /// rss, pages.
    pub rss_pages: u64,
}

/// Parses `/proc/<pid>/stat`. The command name (field 2) is in parentheses and may hold
/// spaces and parentheses itself, so fields are counted after its last `)`.
pub fn parse_stat(text: &str) -> Option<StatFields> {
    let rest = &text[text.rfind(')')? + 1..];
    // rest starts at field 3 (state).
    let f: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| -> Option<u64> { f.get(n - 3)?.parse().ok() };
    Some(StatFields {
        cpu_ticks: field(14)?.checked_add(field(15)?)?,
        start_ticks: field(22)?,
        vsize: field(23)?,
        rss_pages: field(24)?,
    })
}

/// The boot time (`btime`, seconds since the epoch) from `/proc/stat`.
pub fn parse_btime(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

/// The soft limit of "Max open files" from `/proc/<pid>/limits` (None: unlimited or absent).
pub fn parse_max_fds(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

impl ProcessStats {
    /// Combines the parsed pieces (`ticks` per second, `page` bytes).
    pub fn from_parts(
        stat: StatFields,
        btime: u64,
        ticks: u64,
        page: u64,
        open_fds: u64,
        max_fds: Option<u64>,
    ) -> Self {
        let ticks = ticks.max(1);
        #[allow(clippy::cast_precision_loss)]
        let (cpu, start) = (
            stat.cpu_ticks as f64 / ticks as f64,
            btime as f64 + stat.start_ticks as f64 / ticks as f64,
        );
        Self {
            cpu_seconds: cpu,
            resident_bytes: stat.rss_pages.saturating_mul(page),
            virtual_bytes: stat.vsize,
            open_fds,
            max_fds,
            start_time_seconds: start,
        }
    }

    /// Reads `/proc/self` (None when `/proc` is not readable).
    pub fn read() -> Option<Self> {
        let stat = parse_stat(&std::fs::read_to_string("/proc/self/stat").ok()?)?;
        let btime = parse_btime(&std::fs::read_to_string("/proc/stat").ok()?)?;
        let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .ok()
            .flatten()
            .and_then(|v| u64::try_from(v).ok())
            .unwrap_or(100);
        let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
            .ok()
            .flatten()
            .and_then(|v| u64::try_from(v).ok())
            .unwrap_or(4096);
        // The directory handle of the listing is one of the entries; leave it out.
        let open = std::fs::read_dir("/proc/self/fd").ok()?.count();
        let open = u64::try_from(open.saturating_sub(1)).unwrap_or(u64::MAX);
        let max = std::fs::read_to_string("/proc/self/limits")
            .ok()
            .and_then(|t| parse_max_fds(&t));
        Some(Self::from_parts(stat, btime, ticks, page, open, max))
    }

    /// Appends the `process_*` families in Prometheus text format.
    pub fn render(&self, o: &mut String) {
        let mut g = |name: &str, kind: &str, help: &str, v: String| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        };
        g(
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds.",
            self.cpu_seconds.to_string(),
        );
        g(
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            self.resident_bytes.to_string(),
        );
        g(
            "process_virtual_memory_bytes",
            "gauge",
            "Virtual memory size in bytes.",
            self.virtual_bytes.to_string(),
        );
        g(
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
            self.open_fds.to_string(),
        );
        if let Some(m) = self.max_fds {
            g(
                "process_max_fds",
                "gauge",
                "Maximum number of open file descriptors.",
                m.to_string(),
            );
        }
        g(
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since unix epoch in seconds.",
            self.start_time_seconds.to_string(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT: &str = "4242 (hako (proxy) x) S 1 4242 4242 0 -1 4194560 2915 0 0 0 150 50 0 0 20 0 9 0 123400 1234567168 9000 18446744073709551615 1 1 0 0 0 0 0 4096 17131 0 0 0 17 1 0 0 0 0 0";

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        let s = parse_stat(STAT).expect("parsed");
        assert_eq!(
            s,
            StatFields {
                cpu_ticks: 200,
                start_ticks: 123_400,
                vsize: 1_234_567_168,
                rss_pages: 9000,
            }
        );
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_stat("1 (x) S 1 2"), None);
    }

    #[test]
    fn stats_combine_into_the_process_metrics() {
        let stat = parse_stat(STAT).expect("parsed");
        let btime = parse_btime("cpu  1 2 3\nbtime 1700000000\nprocesses 9\n").expect("btime");
        let max = parse_max_fds(
            "Limit                     Soft Limit           Hard Limit           Units\nMax open files            1024                 524288               files\n",
        );
        assert_eq!(max, Some(1024));
        let p = ProcessStats::from_parts(stat, btime, 100, 4096, 7, max);
        assert!((p.cpu_seconds - 2.0).abs() < 1e-9);
        assert!((p.start_time_seconds - 1_700_001_234.0).abs() < 1e-6);
        assert_eq!(p.resident_bytes, 9000 * 4096);
        let mut o = String::new();
        p.render(&mut o);
        for l in [
            "process_cpu_seconds_total 2",
            "process_resident_memory_bytes 36864000",
            "process_open_fds 7",
            "process_max_fds 1024",
            "process_start_time_seconds 1700001234",
        ] {
            assert!(o.lines().any(|x| x == l), "{l} missing:\n{o}");
        }
    }

    #[test]
    fn this_process_reads() {
        let p = ProcessStats::read().expect("/proc/self");
        assert!(p.resident_bytes > 0);
        assert!(p.open_fds >= 3);
    }
}

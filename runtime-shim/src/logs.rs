//! CRI log format (`<RFC3339Nano> stdout|stderr F|P <line>`) and a size-rotated log file
//! writer. Formatting is pure; [`CriLog`] writes files.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

/// Longest line payload written as one record; longer lines are split into `P` records.
pub const MAX_LINE: usize = 16 * 1024;

/// Which stream a record came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// The container's stdout.
    Stdout,
    /// The container's stderr.
    Stderr,
}

impl Stream {
    fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// Format a time as RFC 3339 with nanoseconds in UTC (`2006-01-02T15:04:05.000000000Z`).
pub fn rfc3339_nano(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, dd) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{dd:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60,
        d.subsec_nanos()
    )
}

// Howard Hinnant's days-to-civil algorithm.
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// One CRI record: `partial` is true for a `P` record (line continues).
pub fn format_record(ts: &str, stream: Stream, partial: bool, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(ts.len() + payload.len() + 12);
    out.extend_from_slice(ts.as_bytes());
    out.push(b' ');
    out.extend_from_slice(stream.as_str().as_bytes());
    out.extend_from_slice(if partial { b" P " } else { b" F " });
    out.extend_from_slice(payload);
    out.push(b'\n');
    out
}

/// A parsed CRI record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Timestamp text.
    pub time: String,
    /// `stdout` or `stderr`.
    pub stream: String,
    /// `P` record.
    pub partial: bool,
    /// Payload without the newline.
    pub line: String,
}

/// Parse one CRI log line; `None` when it is not in the format.
pub fn parse_record(line: &str) -> Option<Record> {
    let mut it = line.splitn(4, ' ');
    let time = it.next()?;
    let stream = it.next()?;
    let tag = it.next()?;
    let rest = it.next().unwrap_or("");
    if !(stream == "stdout" || stream == "stderr") || !(tag == "F" || tag == "P") {
        return None;
    }
    if time.len() != 30 || !time.ends_with('Z') || time.as_bytes()[10] != b'T' {
        return None;
    }
    Some(Record {
        time: time.into(),
        stream: stream.into(),
        partial: tag == "P",
        line: rest.into(),
    })
}

/// A CRI log file shared by the stdout and stderr copiers, rotated by size.
#[derive(Clone)]
pub struct CriLog {
    inner: Arc<Mutex<LogFile>>,
}

struct LogFile {
    path: PathBuf,
    file: File,
    size: u64,
    max_size: u64,
    max_files: u32,
}

impl CriLog {
    /// Open (append) the log at `path`, creating its directory.
    pub fn open(path: &Path, max_size: u64, max_files: u32) -> io::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let size = file.metadata()?.len();
        Ok(Self {
            inner: Arc::new(Mutex::new(LogFile {
                path: path.to_path_buf(),
                file,
                size,
                max_size,
                max_files,
            })),
        })
    }

    /// Write one record, rotating first when it would pass the size limit.
    pub fn write_record(&self, stream: Stream, partial: bool, payload: &[u8]) -> io::Result<()> {
        let rec = format_record(&rfc3339_nano(SystemTime::now()), stream, partial, payload);
        let mut f = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if f.max_size > 0 && f.size > 0 && f.size + rec.len() as u64 > f.max_size {
            f.rotate()?;
        }
        f.file.write_all(&rec)?;
        f.size += rec.len() as u64;
        Ok(())
    }

    /// Copy `src` to the log as `stream` records until EOF.
    pub fn copy_from(&self, mut src: impl Read, stream: Stream) -> io::Result<()> {
        let mut buf = vec![0u8; 32 * 1024];
        let mut pending: Vec<u8> = Vec::new();
        loop {
            let n = match src.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            pending.extend_from_slice(&buf[..n]);
            let mut start = 0;
            while let Some(pos) = pending[start..].iter().position(|&b| b == b'\n') {
                let line = &pending[start..start + pos];
                self.write_line(stream, line)?;
                start += pos + 1;
            }
            pending.drain(..start);
            while pending.len() >= MAX_LINE {
                self.write_record(stream, true, &pending[..MAX_LINE])?;
                pending.drain(..MAX_LINE);
            }
        }
        if !pending.is_empty() {
            self.write_record(stream, true, &pending)?;
        }
        Ok(())
    }

    fn write_line(&self, stream: Stream, line: &[u8]) -> io::Result<()> {
        let mut chunks = line.chunks(MAX_LINE).peekable();
        if line.is_empty() {
            return self.write_record(stream, false, b"");
        }
        while let Some(c) = chunks.next() {
            self.write_record(stream, chunks.peek().is_some(), c)?;
        }
        Ok(())
    }
}

impl LogFile {
    fn rotate(&mut self) -> io::Result<()> {
        let name = |n: u32| {
            let mut p = self.path.clone().into_os_string();
            p.push(format!(".{n}"));
            PathBuf::from(p)
        };
        if self.max_files == 0 {
            self.file.set_len(0)?;
            self.size = 0;
            return Ok(());
        }
        let _ = std::fs::remove_file(name(self.max_files));
        for n in (1..self.max_files).rev() {
            let _ = std::fs::rename(name(n), name(n + 1));
        }
        std::fs::rename(&self.path, name(1))?;
        self.file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        self.size = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps() {
        for (secs, nanos, want) in [
            (0u64, 0u32, "1970-01-01T00:00:00.000000000Z"),
            (951_782_400, 5, "2000-02-29T00:00:00.000000005Z"),
            (1_795_000_000, 123_456_789, "2026-11-18T11:06:40.123456789Z"),
        ] {
            let t = UNIX_EPOCH + Duration::new(secs, nanos);
            assert_eq!(rfc3339_nano(t), want);
        }
    }

    #[test]
    fn records_round_trip() {
        let r = format_record(
            "2026-11-18T09:46:40.123456789Z",
            Stream::Stderr,
            false,
            b"a b",
        );
        let line = String::from_utf8(r).unwrap();
        let p = parse_record(line.trim_end_matches('\n')).unwrap();
        assert_eq!(
            (p.stream.as_str(), p.partial, p.line.as_str()),
            ("stderr", false, "a b")
        );
        assert!(parse_record("garbage").is_none());
    }

    #[test]
    fn copy_splits_and_rotates() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.log");
        let log = CriLog::open(&path, 200, 2).unwrap();
        let mut input = Vec::new();
        for i in 0..20 {
            input.extend_from_slice(format!("line {i}\n").as_bytes());
        }
        input.extend_from_slice(b"tail");
        log.copy_from(&input[..], Stream::Stdout).unwrap();
        let cur = std::fs::read_to_string(&path).unwrap();
        assert!(std::fs::metadata(&path).unwrap().len() <= 200);
        assert!(path.with_file_name("0.log.1").exists());
        assert!(path.with_file_name("0.log.2").exists());
        assert!(!path.with_file_name("0.log.3").exists());
        let last = cur.lines().last().unwrap();
        let rec = parse_record(last).unwrap();
        assert_eq!((rec.partial, rec.line.as_str()), (true, "tail"));
        for l in cur.lines() {
            assert!(parse_record(l).is_some(), "{l}");
        }
    }
}

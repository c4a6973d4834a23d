//! CRI log format (`<RFC3339Nano> stdout|stderr F|P <line>`): formatting and byte-exact
//! parsing (pure), and [`CriLog`], the size- and count-rotated log file writer (effectful).
//!
//! Rotation follows the kubelet's container log manager: the current file `N.log` is renamed
//! to `N.log.<YYYYMMDD-HHMMSS>` (UTC) and a new `N.log` is opened; at most `max_files` files
//! (the current one included) are kept, the oldest rotated ones are removed. Rotated files are
//! not compressed. Rotation happens between two records under the writer's lock, so a record is
//! never split across files, and a record is written even when rotation fails.

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

/// A parsed CRI record borrowing the raw bytes of its line (no UTF-8 requirement).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordRef<'a> {
    /// Timestamp text (RFC 3339, as written).
    pub time: &'a [u8],
    /// Which stream.
    pub stream: Stream,
    /// `P` record: the line continues in the next record.
    pub partial: bool,
    /// Payload without the newline, raw bytes.
    pub payload: &'a [u8],
}

/// Parse one CRI log line (without its newline) as bytes; `None` when it is not in the format.
/// The payload is passed through untouched: invalid UTF-8 and characters split across `P`
/// records stay exactly as the container wrote them.
pub fn parse_record_bytes(line: &[u8]) -> Option<RecordRef<'_>> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let mut it = line.splitn(4, |&b| b == b' ');
    let time = it.next()?;
    let stream = match it.next()? {
        b"stdout" => Stream::Stdout,
        b"stderr" => Stream::Stderr,
        _ => return None,
    };
    let partial = match it.next()? {
        b"P" => true,
        b"F" => false,
        _ => return None,
    };
    let payload = it.next().unwrap_or(b"");
    parse_rfc3339(time)?;
    Some(RecordRef {
        time,
        stream,
        partial,
        payload,
    })
}

/// Parse an RFC 3339 time (`2006-01-02T15:04:05[.fraction](Z|±hh:mm)`) as nanoseconds since
/// the Unix epoch (negative before it); `None` when it is not one.
pub fn parse_rfc3339(t: &[u8]) -> Option<i128> {
    let t = std::str::from_utf8(t).ok()?;
    if t.len() < 20 || !t.is_char_boundary(19) {
        return None;
    }
    let (date_time, rest) = t.split_at(19);
    let b = date_time.as_bytes();
    if b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let s = &date_time[r];
        if s.bytes().all(|c| c.is_ascii_digit()) {
            s.parse().ok()
        } else {
            None
        }
    };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, s) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || s > 60 {
        return None;
    }
    let (frac, zone) = match rest.strip_prefix('.') {
        Some(r) => {
            let n = r.bytes().take_while(u8::is_ascii_digit).count();
            if n == 0 {
                return None;
            }
            (&r[..n], &r[n..])
        }
        None => ("", rest),
    };
    let mut nanos: i128 = 0;
    for (i, c) in frac.bytes().enumerate().take(9) {
        nanos += i128::from(c - b'0') * 10i128.pow(8 - u32::try_from(i).ok()?);
    }
    let offset_secs: i64 = match zone.as_bytes() {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2]
            if [h1, h2, m1, m2].iter().all(|c| c.is_ascii_digit()) =>
        {
            let v = i64::from((h1 - b'0') * 10 + (h2 - b'0')) * 3600
                + i64::from((m1 - b'0') * 10 + (m2 - b'0')) * 60;
            if *sign == b'+' {
                v
            } else {
                -v
            }
        }
        _ => return None,
    };
    let secs = days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + s - offset_secs;
    Some(i128::from(secs) * 1_000_000_000 + nanos)
}

// Inverse of `civil_from_days` (Howard Hinnant's days-from-civil).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The suffix the kubelet gives a rotated log file (`20060102-150405`, UTC).
pub fn rotation_suffix(t: SystemTime) -> String {
    let full = rfc3339_nano(t);
    // 2006-01-02T15:04:05.000000000Z
    let b = full.as_bytes();
    let pick = |r: std::ops::Range<usize>| String::from_utf8_lossy(&b[r]).into_owned();
    format!(
        "{}{}{}-{}{}{}",
        pick(0..4),
        pick(5..7),
        pick(8..10),
        pick(11..13),
        pick(14..16),
        pick(17..19)
    )
}

/// The rotated files of the log at `path` (`<name>.<YYYYMMDD-HHMMSS>[.<n>]`), oldest first.
pub fn rotated_files(path: &Path) -> Vec<PathBuf> {
    let Some(dir) = path.parent() else {
        return Vec::new();
    };
    let mut v: Vec<((String, u64), PathBuf)> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .filter_map(|e| {
                    let p = e.path();
                    rotated_key(path, &p).map(|k| (k, p))
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v.into_iter().map(|(_, p)| p).collect()
}

/// (`YYYYMMDD-HHMMSS`, n) of a rotated file `<log>.<YYYYMMDD-HHMMSS>[.<n>]` of `log`.
fn rotated_key(log: &Path, rotated: &Path) -> Option<(String, u64)> {
    let name = log.file_name()?.to_string_lossy().into_owned();
    let n = rotated.file_name()?.to_string_lossy().into_owned();
    let rest = n.strip_prefix(&name)?.strip_prefix('.')?;
    let (ts, seq) = match rest.split_once('.') {
        Some((ts, seq)) => (ts, seq.parse::<u64>().ok()?),
        None => (rest, 0),
    };
    let ok = ts.len() == 15
        && ts.bytes().enumerate().all(|(i, c)| {
            if i == 8 {
                c == b'-'
            } else {
                c.is_ascii_digit()
            }
        });
    ok.then(|| (ts.to_string(), seq))
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
            // A failed rotation keeps the current file: the record is written either way.
            if let Err(e) = f.rotate() {
                tracing::warn!(path = %f.path.display(), error = %e, "log rotation failed");
            }
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
    /// Removes the oldest rotated files beyond `max_files - 2`, renames the current file to
    /// `<path>.<YYYYMMDD-HHMMSS>` (`.<n>` added within one second) and opens a new one. On
    /// error the open file stays in use (nothing is lost; the next write retries).
    fn rotate(&mut self) -> io::Result<()> {
        if self.max_files <= 1 {
            self.file.set_len(0)?;
            self.size = 0;
            return Ok(());
        }
        let suffix = rotation_suffix(SystemTime::now());
        // Within one second, `.<n>` counts up past every name of that second still present
        // (never reusing a removed one), so the names sort in rotation order.
        let taken = rotated_files(&self.path)
            .iter()
            .filter_map(|p| rotated_key(&self.path, p))
            .filter(|(ts, _)| *ts == suffix)
            .map(|(_, n)| n + 1)
            .max();
        let mut target = self.path.clone().into_os_string();
        target.push(".");
        target.push(&suffix);
        if let Some(n) = taken {
            target.push(format!(".{n}"));
        }
        let target = PathBuf::from(target);
        // Remove the oldest first, so that with the new file no more than max_files exist.
        let rotated = rotated_files(&self.path);
        let keep = usize::try_from(self.max_files - 2).unwrap_or(usize::MAX);
        for old in &rotated[..rotated.len().saturating_sub(keep)] {
            let _ = std::fs::remove_file(old);
        }
        std::fs::rename(&self.path, &target)?;
        // Until the new file opens, records go on into the renamed one (nothing is lost).
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
        let log = CriLog::open(&path, 200, 3).unwrap();
        let mut input = Vec::new();
        for i in 0..20 {
            input.extend_from_slice(format!("line {i}\n").as_bytes());
        }
        input.extend_from_slice(b"tail");
        log.copy_from(&input[..], Stream::Stdout).unwrap();
        let cur = std::fs::read(&path).unwrap();
        assert!(cur.len() <= 200);
        let rotated = rotated_files(&path);
        assert_eq!(rotated.len(), 2, "{rotated:?}");
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 3, "{names:?}");
        // The newest lines survive whole, in order, across the kept files.
        let mut all = Vec::new();
        for p in rotated.iter().chain([&path]) {
            all.extend(std::fs::read(p).unwrap());
        }
        let lines: Vec<RecordRef<'_>> = all
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| parse_record_bytes(l).unwrap())
            .collect();
        let last = lines.last().unwrap();
        assert_eq!((last.partial, last.payload), (true, &b"tail"[..]));
        assert_eq!(lines[lines.len() - 2].payload, b"line 19");
        let nums: Vec<u32> = lines[..lines.len() - 1]
            .iter()
            .map(|r| {
                std::str::from_utf8(&r.payload[5..])
                    .unwrap()
                    .parse()
                    .unwrap()
            })
            .collect();
        assert!(nums.windows(2).all(|w| w[1] == w[0] + 1), "{nums:?}");
    }

    #[test]
    fn bytes_parse_raw() {
        let r =
            parse_record_bytes(b"2026-11-18T09:46:40.123456789Z stdout P a\xff\xf0\x9f").unwrap();
        assert_eq!(r.stream, Stream::Stdout);
        assert!(r.partial);
        assert_eq!(r.payload, b"a\xff\xf0\x9f");
        let r = parse_record_bytes(b"2026-11-18T09:46:40.1Z stderr F \n").unwrap();
        assert_eq!(
            (r.stream, r.partial, r.payload),
            (Stream::Stderr, false, &b""[..])
        );
        for bad in [
            &b"garbage"[..],
            b"2026-11-18T09:46:40Z stdin F x",
            b"2026-11-18T09:46:40Z stdout X x",
            b"2026-13-18T09:46:40Z stdout F x",
            b"",
        ] {
            assert!(parse_record_bytes(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn rfc3339_parse() {
        for (t, want) in [
            ("1970-01-01T00:00:00Z", Some(0i128)),
            ("1970-01-01T00:00:01.5Z", Some(1_500_000_000)),
            ("1970-01-01T01:00:00+01:00", Some(0)),
            (
                "2026-11-18T11:06:40.123456789Z",
                Some(1_795_000_000_123_456_789),
            ),
            ("2026-11-18T11:06:40.Z", None),
            ("2026-11-18 11:06:40Z", None),
            ("2026-11-18T11:06:40", None),
        ] {
            assert_eq!(parse_rfc3339(t.as_bytes()), want, "{t}");
        }
        let t = UNIX_EPOCH + Duration::new(1_795_000_000, 7);
        assert_eq!(
            parse_rfc3339(rfc3339_nano(t).as_bytes()),
            Some(1_795_000_000_000_000_007)
        );
        assert_eq!(rotation_suffix(t), "20261118-110640");
    }
}

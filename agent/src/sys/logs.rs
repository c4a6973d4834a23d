//! Container log reading as `kubectl logs` shows it, shared by the kubelet API
//! (`/containerLogs`), `hako-agent logs` and attach (effectful: reads CRI log files; the record
//! joining and option handling are pure).
//!
//! Semantics follow the kubelet's `kuberuntime/logs` `ReadLogs`: payload bytes pass through
//! raw (no UTF-8 requirement); `P` records continue the line of their stream, so a multibyte
//! character split across records comes out whole; `tailLines` counts whole lines,
//! `sinceTime`/`sinceSeconds` drop lines that started before it, `timestamps` prefixes each line
//! with its first record's time, `limitBytes` cuts the output at that many bytes. Follow reads
//! on from the last offset (a cheap `read` at EOF per poll, never a re-read), and when the file
//! at the path is replaced (rotation) it drains the old file before continuing on the new one;
//! it ends once the container has exited and the file is fully read.

use hako_shim::logs::{parse_record_bytes, Stream};
use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Longest unterminated CRI record kept while waiting for its newline (longer ones are
/// dropped: the shim writes records of at most 16 KiB).
const MAX_RECORD: usize = 1 << 20;
/// Longest joined line kept whole for `tailLines`; a longer one is cut into pieces.
const MAX_JOINED: usize = 1 << 20;
/// Read size.
const CHUNK: usize = 64 * 1024;
/// Output is handed to the sink in chunks of about this size (and at the end of each poll).
const FLUSH_AT: usize = 32 * 1024;

/// Log reading errors.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The log file could not be opened.
    #[error("open log {0}: {1}")]
    Open(PathBuf, #[source] io::Error),
    /// The log file could not be read.
    #[error("read log {0}: {1}")]
    Read(PathBuf, #[source] io::Error),
}

/// What to show (the kubelet's `PodLogOptions` as the log reader sees them).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogOptions {
    /// Only the last N lines of the existing log.
    pub tail_lines: Option<u64>,
    /// Only lines whose first record is at or after this time (ns since the Unix epoch).
    pub since_nanos: Option<i128>,
    /// Prefix each line with its time.
    pub timestamps: bool,
    /// Stop after this many bytes of output.
    pub limit_bytes: Option<u64>,
    /// Keep reading new output until the container exits.
    pub follow: bool,
}

/// One record's share of a line: `starts_line` when it opens a line of its stream,
/// `ends_line` when it closes it (an `F` record).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece<'a> {
    /// Record time as written.
    pub time: &'a [u8],
    /// Stream.
    pub stream: Stream,
    /// Raw payload bytes.
    pub bytes: &'a [u8],
    /// First record of its line.
    pub starts_line: bool,
    /// Last record of its line.
    pub ends_line: bool,
}

/// Splits CRI log bytes into records and tracks, per stream, whether a line is open (pure).
#[derive(Debug, Default)]
pub struct Assembler {
    rest: Vec<u8>,
    skipping: bool,
    open: [bool; 2],
}

fn idx(s: Stream) -> usize {
    match s {
        Stream::Stdout => 0,
        Stream::Stderr => 1,
    }
}

impl Assembler {
    /// Feeds bytes; calls `out` for every complete record (lines not in the CRI format are
    /// skipped, as the kubelet does).
    pub fn feed(&mut self, data: &[u8], out: &mut dyn FnMut(Piece<'_>)) {
        let mut data = data;
        while !data.is_empty() {
            let Some(nl) = data.iter().position(|&b| b == b'\n') else {
                if !self.skipping {
                    self.rest.extend_from_slice(data);
                    if self.rest.len() > MAX_RECORD {
                        self.rest.clear();
                        self.skipping = true;
                    }
                }
                return;
            };
            let (head, tail) = data.split_at(nl);
            data = &tail[1..];
            if std::mem::take(&mut self.skipping) {
                continue;
            }
            if self.rest.is_empty() {
                self.record(head, out);
            } else {
                let mut line = std::mem::take(&mut self.rest);
                line.extend_from_slice(head);
                self.record(&line, out);
                line.clear();
                self.rest = line;
            }
        }
    }

    /// The end of the input: a last record without its newline (a runtime that stopped
    /// mid-write, a file cut short) is parsed and handed out as the kubelet does with an
    /// incomplete last line.
    pub fn finish(&mut self, out: &mut dyn FnMut(Piece<'_>)) {
        let line = std::mem::take(&mut self.rest);
        if !std::mem::take(&mut self.skipping) && !line.is_empty() {
            self.record(&line, out);
        }
    }

    fn record(&mut self, line: &[u8], out: &mut dyn FnMut(Piece<'_>)) {
        let Some(r) = parse_record_bytes(line) else {
            return;
        };
        let open = &mut self.open[idx(r.stream)];
        let starts_line = !*open;
        *open = r.partial;
        out(Piece {
            time: r.time,
            stream: r.stream,
            bytes: r.payload,
            starts_line,
            ends_line: !r.partial,
        });
    }
}

/// Applies `sinceTime`, `timestamps` and `limitBytes` and hands the bytes to a sink (pure
/// apart from the sink).
pub struct LogWriter<'s> {
    opts: LogOptions,
    skip: [bool; 2],
    written: u64,
    done: bool,
    gone: bool,
    buf: Vec<u8>,
    sink: &'s mut dyn FnMut(&[u8]) -> bool,
}

impl<'s> LogWriter<'s> {
    /// A writer into `sink` (which returns false when its reader is gone).
    pub fn new(opts: LogOptions, sink: &'s mut dyn FnMut(&[u8]) -> bool) -> Self {
        LogWriter {
            opts,
            skip: [false; 2],
            written: 0,
            done: false,
            gone: false,
            buf: Vec::new(),
            sink,
        }
    }

    /// The output bytes of one piece (empty when `sinceTime` drops its line).
    fn render(&mut self, p: &Piece<'_>) -> Vec<u8> {
        let i = idx(p.stream);
        if p.starts_line {
            self.skip[i] = match self.opts.since_nanos {
                Some(since) => hako_shim::logs::parse_rfc3339(p.time).is_none_or(|t| t < since),
                None => false,
            };
        }
        let mut v = Vec::new();
        if self.skip[i] {
            return v;
        }
        if p.starts_line && self.opts.timestamps {
            v.extend_from_slice(p.time);
            v.push(b' ');
        }
        v.extend_from_slice(p.bytes);
        if p.ends_line {
            v.push(b'\n');
        }
        v
    }

    /// Writes output bytes; false once the limit is reached or the sink is gone.
    fn write(&mut self, b: &[u8]) -> bool {
        if self.done {
            return false;
        }
        if b.is_empty() {
            return true;
        }
        let mut b = b;
        if let Some(limit) = self.opts.limit_bytes {
            let left = usize::try_from(limit.saturating_sub(self.written)).unwrap_or(usize::MAX);
            if b.len() >= left {
                b = &b[..left];
                self.done = true;
            }
        }
        self.written += b.len() as u64;
        self.buf.extend_from_slice(b);
        if self.buf.len() >= FLUSH_AT || self.done {
            return self.flush() && !self.done;
        }
        true
    }

    /// Hands the buffered output to the sink; false when the sink is gone.
    pub fn flush(&mut self) -> bool {
        if self.buf.is_empty() {
            return !self.gone;
        }
        if !self.gone && !(self.sink)(&self.buf) {
            self.gone = true;
            self.done = true;
        }
        self.buf.clear();
        !self.gone
    }

    /// Whether nothing more will be written.
    pub fn done(&self) -> bool {
        self.done
    }
}

/// Keeps the last N lines of the existing log for `tailLines` (bounded by N lines of at most
/// [`MAX_JOINED`] bytes each).
struct Tail {
    n: usize,
    lines: VecDeque<Vec<u8>>,
    open: [Vec<u8>; 2],
}

impl Tail {
    fn push(&mut self, line: Vec<u8>) {
        if self.n == 0 {
            return;
        }
        if self.lines.len() == self.n {
            self.lines.pop_front();
        }
        self.lines.push_back(line);
    }

    fn add(&mut self, stream: Stream, bytes: Vec<u8>, ends_line: bool) {
        let i = idx(stream);
        self.open[i].extend_from_slice(&bytes);
        if ends_line || self.open[i].len() >= MAX_JOINED {
            let l = std::mem::take(&mut self.open[i]);
            if !l.is_empty() {
                self.push(l);
            }
        }
    }

    /// The kept lines, lines still open last.
    fn finish(mut self) -> VecDeque<Vec<u8>> {
        for i in 0..2 {
            let l = std::mem::take(&mut self.open[i]);
            if !l.is_empty() {
                self.push(l);
            }
        }
        self.lines
    }
}

/// Reads a CRI log file from an offset on, across rotations (effectful).
pub struct CriFollower {
    path: PathBuf,
    file: Option<File>,
    id: (u64, u64),
    asm: Assembler,
    buf: Vec<u8>,
}

fn file_id(m: &std::fs::Metadata) -> (u64, u64) {
    (m.dev(), m.ino())
}

impl CriFollower {
    /// Reads `path` from its start.
    pub fn open(path: &Path) -> Result<Self, LogError> {
        let f = File::open(path).map_err(|e| LogError::Open(path.into(), e))?;
        let id = f
            .metadata()
            .map(|m| file_id(&m))
            .map_err(|e| LogError::Open(path.into(), e))?;
        Ok(CriFollower {
            path: path.into(),
            file: Some(f),
            id,
            asm: Assembler::default(),
            buf: vec![0; CHUNK],
        })
    }

    /// Reads only what is written to `path` from now on (a missing file is read from its
    /// start once it appears).
    pub fn at_end(path: &Path) -> Self {
        let mut me = CriFollower {
            path: path.into(),
            file: None,
            id: (0, 0),
            asm: Assembler::default(),
            buf: vec![0; CHUNK],
        };
        if let Ok(mut f) = File::open(path) {
            use std::io::Seek;
            if let (Ok(m), Ok(_)) = (f.metadata(), f.seek(io::SeekFrom::End(0))) {
                me.id = file_id(&m);
                me.file = Some(f);
            }
        }
        me
    }

    /// Reads the open file to its end.
    fn drain(&mut self, out: &mut dyn FnMut(Piece<'_>)) -> Result<bool, LogError> {
        let Some(f) = self.file.as_mut() else {
            return Ok(false);
        };
        let mut any = false;
        loop {
            match f.read(&mut self.buf) {
                Ok(0) => return Ok(any),
                Ok(n) => {
                    any = true;
                    self.asm.feed(&self.buf[..n], out);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(LogError::Read(self.path.clone(), e)),
            }
        }
    }

    /// Reads, oldest first, the rotated files newer than the open (rotated) one: those after
    /// it in rotation order, or when it was already removed, those modified after it.
    fn drain_rotated_after(&mut self, out: &mut dyn FnMut(Piece<'_>)) -> Result<bool, LogError> {
        let Some(cur) = self.file.as_ref().and_then(|f| f.metadata().ok()) else {
            return Ok(false);
        };
        let rotated = hako_shim::logs::rotated_files(&self.path);
        let ids: Vec<Option<std::fs::Metadata>> =
            rotated.iter().map(|p| std::fs::metadata(p).ok()).collect();
        let newer: Vec<usize> = match ids
            .iter()
            .position(|m| m.as_ref().is_some_and(|m| file_id(m) == self.id))
        {
            Some(i) => (i + 1..rotated.len()).collect(),
            None => (0..rotated.len())
                .filter(|&i| {
                    ids[i].as_ref().is_some_and(|m| {
                        (m.mtime(), m.mtime_nsec()) > (cur.mtime(), cur.mtime_nsec())
                    })
                })
                .collect(),
        };
        let mut any = false;
        for i in newer {
            let Ok(f) = File::open(&rotated[i]) else {
                continue;
            };
            self.file = Some(f);
            any |= self.drain(out)?;
        }
        Ok(any)
    }

    /// Hands out an unterminated last record (see [`Assembler::finish`]); called once
    /// nothing more will be read.
    fn finish(&mut self, out: &mut dyn FnMut(Piece<'_>)) {
        self.asm.finish(out);
    }

    /// Reads everything written since the last call. When the file at the path was replaced
    /// (rotated), the old file is drained first and reading goes on in the new one. Returns
    /// whether any bytes were read.
    pub fn poll(&mut self, out: &mut dyn FnMut(Piece<'_>)) -> Result<bool, LogError> {
        let mut any = self.drain(out)?;
        loop {
            let now = match std::fs::metadata(&self.path) {
                Ok(m) => file_id(&m),
                // Mid-rotation or removed: keep what is open.
                Err(_) => return Ok(any),
            };
            if self.file.is_some() && now == self.id {
                // Truncated in place (rotation with max-files 1): read on from its start.
                if let Some(f) = self.file.as_mut() {
                    use std::io::Seek;
                    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
                    if f.stream_position().is_ok_and(|pos| pos > len) {
                        f.seek(io::SeekFrom::Start(0))
                            .map_err(|e| LogError::Read(self.path.clone(), e))?;
                        any |= self.drain(out)?;
                    }
                }
                return Ok(any);
            }
            // Records written to the old file before it was renamed: read them first, then
            // the files rotated after it (more than one rotation between two polls).
            any |= self.drain(out)?;
            if self.file.is_some() {
                any |= self.drain_rotated_after(out)?;
            }
            let Ok(f) = File::open(&self.path) else {
                return Ok(any);
            };
            let Ok(m) = f.metadata() else {
                return Ok(any);
            };
            self.id = file_id(&m);
            self.file = Some(f);
            any |= self.drain(out)?;
        }
    }
}

/// How a follow learns about the container and its client (effects behind a trait so tests
/// can script them).
pub trait FollowCtl {
    /// Whether the container still runs (it may write more).
    fn running(&mut self) -> bool;
    /// Whether the reader is gone (stop without waiting for output).
    fn cancelled(&self) -> bool {
        false
    }
    /// Waits before the next poll.
    fn wait(&mut self) {
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// How often a follow asks whether the container still runs while its log is idle.
const STATE_CHECK: Duration = Duration::from_millis(500);

/// Writes the log at `path` to `sink` as `opts` says (see the module docs); with `follow`,
/// keeps going until the container has exited and its log is fully read, the sink is gone,
/// `limitBytes` is reached, or `ctl` says the reader is gone.
pub fn read_logs(
    path: &Path,
    opts: &LogOptions,
    ctl: &mut dyn FollowCtl,
    sink: &mut dyn FnMut(&[u8]) -> bool,
) -> Result<(), LogError> {
    let mut rd = CriFollower::open(path)?;
    let mut w = LogWriter::new(opts.clone(), sink);
    let mut stop = false;
    if let Some(n) = opts.tail_lines {
        let mut tail = Tail {
            n: usize::try_from(n).unwrap_or(usize::MAX),
            lines: VecDeque::new(),
            open: [Vec::new(), Vec::new()],
        };
        let mut add = |p: Piece<'_>| {
            let b = w.render(&p);
            tail.add(p.stream, b, p.ends_line);
        };
        rd.drain(&mut add)?;
        if !opts.follow {
            rd.finish(&mut add);
        }
        for l in tail.finish() {
            if !w.write(&l) {
                break;
            }
        }
    } else {
        let mut add = |p: Piece<'_>| {
            if !stop {
                let b = w.render(&p);
                stop = !w.write(&b);
            }
        };
        rd.drain(&mut add)?;
        if !opts.follow {
            rd.finish(&mut add);
        }
    }
    if !w.flush() || !opts.follow || w.done() || stop {
        return Ok(());
    }
    let mut last_check: Option<Instant> = None;
    let mut exited = false;
    loop {
        let mut stop = false;
        let any = rd.poll(&mut |p| {
            if !stop {
                let b = w.render(&p);
                stop = !w.write(&b);
            }
        })?;
        if !w.flush() || stop || w.done() || ctl.cancelled() {
            return Ok(());
        }
        if any {
            continue;
        }
        if exited {
            // One more idle poll after the exit was seen: the log is complete (an
            // unterminated last record included).
            rd.finish(&mut |p| {
                if !stop {
                    let b = w.render(&p);
                    stop = !w.write(&b);
                }
            });
            w.flush();
            return Ok(());
        }
        if last_check.is_none_or(|t| t.elapsed() >= STATE_CHECK) {
            last_check = Some(Instant::now());
            exited = !ctl.running();
        }
        ctl.wait();
    }
}

/// Follows a container's output from now on for attach: each poll returns the new pieces as
/// (1 stdout | 2 stderr, raw bytes with the newline of lines that end).
pub struct AttachFollower {
    inner: CriFollower,
}

impl AttachFollower {
    /// Starts at the current end of `path`.
    pub fn at_end(path: &Path) -> Self {
        AttachFollower {
            inner: CriFollower::at_end(path),
        }
    }

    /// New output since the last poll (read errors end nothing: the next poll retries).
    pub fn poll(&mut self) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        let _ = self.inner.poll(&mut |p| {
            let mut m = p.bytes.to_vec();
            if p.ends_line {
                m.push(b'\n');
            }
            let c = match p.stream {
                Stream::Stdout => 1,
                Stream::Stderr => 2,
            };
            out.push((c, m));
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hako_shim::logs::{format_record, CriLog};
    use std::io::Write;

    fn rec(ts: &str, s: Stream, partial: bool, b: &[u8]) -> Vec<u8> {
        format_record(ts, s, partial, b)
    }

    const T1: &str = "2026-01-01T00:00:01.000000000Z";
    const T2: &str = "2026-01-01T00:00:02.000000000Z";
    const T3: &str = "2026-01-01T00:00:03.000000000Z";

    struct NoFollow;
    impl FollowCtl for NoFollow {
        fn running(&mut self) -> bool {
            false
        }
        fn wait(&mut self) {}
    }

    fn read(content: &[u8], opts: LogOptions) -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("0.log");
        std::fs::write(&p, content).unwrap();
        let mut out = Vec::new();
        read_logs(&p, &opts, &mut NoFollow, &mut |b| {
            out.extend_from_slice(b);
            true
        })
        .unwrap();
        out
    }

    fn sample() -> Vec<u8> {
        // "é" = c3 a9 and "😀" = f0 9f 98 80; an invalid byte 0xff.
        [
            rec(T1, Stream::Stdout, false, b"bad \xff byte"),
            rec(T2, Stream::Stdout, true, b"smile \xf0\x9f"),
            rec(T2, Stream::Stderr, false, b"err"),
            rec(T2, Stream::Stdout, false, b"\x98\x80!"),
            rec(T3, Stream::Stdout, false, b"caf\xc3\xa9"),
        ]
        .concat()
    }

    #[test]
    fn raw_bytes_and_split_characters() {
        assert_eq!(
            read(&sample(), LogOptions::default()),
            b"bad \xff byte\nsmile \xf0\x9ferr\n\x98\x80!\ncaf\xc3\xa9\n".to_vec(),
            "pieces come in record order; bytes untouched"
        );
        // With tail, lines are whole: the split character is joined.
        let all = read(
            &sample(),
            LogOptions {
                tail_lines: Some(10),
                ..Default::default()
            },
        );
        assert_eq!(
            all,
            b"bad \xff byte\nerr\nsmile \xf0\x9f\x98\x80!\ncaf\xc3\xa9\n".to_vec()
        );
    }

    #[test]
    fn options_table() {
        let since2 = hako_shim::logs::parse_rfc3339(T2.as_bytes());
        let cases: Vec<(LogOptions, &[u8])> = vec![
            (
                LogOptions {
                    tail_lines: Some(2),
                    ..Default::default()
                },
                b"smile \xf0\x9f\x98\x80!\ncaf\xc3\xa9\n",
            ),
            (
                LogOptions {
                    tail_lines: Some(0),
                    ..Default::default()
                },
                b"",
            ),
            (
                LogOptions {
                    tail_lines: Some(1),
                    timestamps: true,
                    ..Default::default()
                },
                b"2026-01-01T00:00:03.000000000Z caf\xc3\xa9\n",
            ),
            (
                LogOptions {
                    since_nanos: since2,
                    tail_lines: Some(10),
                    ..Default::default()
                },
                b"err\nsmile \xf0\x9f\x98\x80!\ncaf\xc3\xa9\n",
            ),
            (
                LogOptions {
                    since_nanos: since2.map(|t| t + 1),
                    ..Default::default()
                },
                b"caf\xc3\xa9\n",
            ),
            (
                // The limit cuts raw bytes, even inside a character.
                LogOptions {
                    limit_bytes: Some(9),
                    tail_lines: Some(2),
                    ..Default::default()
                },
                b"smile \xf0\x9f\x98",
            ),
            (
                LogOptions {
                    limit_bytes: Some(0),
                    ..Default::default()
                },
                b"",
            ),
            (
                LogOptions {
                    timestamps: true,
                    ..Default::default()
                },
                b"2026-01-01T00:00:01.000000000Z bad \xff byte\n2026-01-01T00:00:02.000000000Z smile \xf0\x9f2026-01-01T00:00:02.000000000Z err\n\x98\x80!\n2026-01-01T00:00:03.000000000Z caf\xc3\xa9\n",
            ),
        ];
        for (i, (opts, want)) in cases.into_iter().enumerate() {
            assert_eq!(
                String::from_utf8_lossy(&read(&sample(), opts.clone())),
                String::from_utf8_lossy(want),
                "case {i}: {opts:?}"
            );
        }
    }

    #[test]
    fn garbage_and_unterminated_records() {
        let mut c = b"not a record\n".to_vec();
        c.extend(rec(T1, Stream::Stdout, false, b"ok"));
        c.extend_from_slice(b"2026-01-01T00:00:02.000000000Z stdout F half");
        // An unterminated last record is printed, as the kubelet prints an incomplete last
        // line (it was dropped before).
        assert_eq!(read(&c, LogOptions::default()), b"ok\nhalf\n".to_vec());
        let mut g = b"garbage without newline".to_vec();
        assert_eq!(read(&g, LogOptions::default()), b"".to_vec());
        g.clear();
        assert_eq!(read(&g, LogOptions::default()), b"".to_vec());
    }

    #[test]
    fn a_last_partial_record_is_printed() {
        // The projected-volume e2e container: `cat` of files without a newline. The shim
        // writes the last bytes as a `P` record; the kubelet prints it without a newline.
        let log = [
            rec(T1, Stream::Stdout, false, b"first"),
            rec(T2, Stream::Stdout, true, b"secret-value-1"),
            rec(T3, Stream::Stdout, true, b"configmap-value-1"),
        ]
        .concat();
        let mut unterminated = log.clone();
        unterminated.pop();
        let o = |tail: Option<u64>, ts: bool, follow: bool| LogOptions {
            tail_lines: tail,
            timestamps: ts,
            follow,
            ..Default::default()
        };
        let cases: [(LogOptions, &str); 6] = [
            (o(None, false, false), "first\nsecret-value-1configmap-value-1"),
            (o(Some(1), false, false), "secret-value-1configmap-value-1"),
            (o(Some(2), false, false), "first\nsecret-value-1configmap-value-1"),
            (
                o(None, true, false),
                "2026-01-01T00:00:01.000000000Z first\n2026-01-01T00:00:02.000000000Z secret-value-1configmap-value-1",
            ),
            (
                o(Some(1), true, false),
                "2026-01-01T00:00:02.000000000Z secret-value-1configmap-value-1",
            ),
            // Follow of an exited container: everything, then the end.
            (o(None, false, true), "first\nsecret-value-1configmap-value-1"),
        ];
        for content in [&log, &unterminated] {
            for (opts, want) in &cases {
                assert_eq!(
                    String::from_utf8_lossy(&read(content, opts.clone())),
                    *want,
                    "{opts:?} (newline at the end: {})",
                    content == &log
                );
            }
        }
    }

    /// A scripted follow: each wait runs the next step; running() is false once the script
    /// is over.
    struct Script {
        steps: VecDeque<Box<dyn FnOnce()>>,
        waits: usize,
    }
    impl FollowCtl for Script {
        fn running(&mut self) -> bool {
            !self.steps.is_empty()
        }
        fn wait(&mut self) {
            self.waits += 1;
            if let Some(s) = self.steps.pop_front() {
                s();
            }
        }
    }

    fn append(p: &Path, b: &[u8]) {
        let mut f = std::fs::OpenOptions::new().append(true).open(p).unwrap();
        f.write_all(b).unwrap();
    }

    #[test]
    fn follow_reads_on_across_rotation_and_ends_after_exit() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("0.log");
        std::fs::write(&p, rec(T1, Stream::Stdout, false, b"one")).unwrap();
        let (p1, p2, p3) = (p.clone(), p.clone(), p.clone());
        let mut ctl = Script {
            steps: VecDeque::from(vec![
                Box::new(move || append(&p1, &rec(T1, Stream::Stdout, true, b"tw\xc3")))
                    as Box<dyn FnOnce()>,
                Box::new(move || {
                    // The end of the line goes to the old file just before it is renamed;
                    // the new file is created beside it.
                    append(&p2, &rec(T2, Stream::Stdout, false, b"\xa9o"));
                    let old = p2.with_file_name("0.log.20260101-000002");
                    std::fs::rename(&p2, &old).unwrap();
                    std::fs::write(&p2, rec(T2, Stream::Stdout, false, b"three")).unwrap();
                }),
                Box::new(move || append(&p3, &rec(T3, Stream::Stderr, false, b"four"))),
            ]),
            waits: 0,
        };
        let mut out = Vec::new();
        read_logs(
            &p,
            &LogOptions {
                follow: true,
                ..Default::default()
            },
            &mut ctl,
            &mut |b| {
                out.extend_from_slice(b);
                true
            },
        )
        .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out),
            String::from_utf8_lossy(b"one\ntw\xc3\xa9o\nthree\nfour\n")
        );
        assert!(ctl.steps.is_empty());
    }

    #[test]
    fn follow_stops_at_limit_and_when_sink_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("0.log");
        std::fs::write(&p, rec(T1, Stream::Stdout, false, b"0123456789")).unwrap();
        struct Forever;
        impl FollowCtl for Forever {
            fn running(&mut self) -> bool {
                true
            }
            fn wait(&mut self) {}
        }
        let mut out = Vec::new();
        let opts = LogOptions {
            follow: true,
            limit_bytes: Some(4),
            ..Default::default()
        };
        read_logs(&p, &opts, &mut Forever, &mut |b| {
            out.extend_from_slice(b);
            true
        })
        .unwrap();
        assert_eq!(out, b"0123");
        let opts = LogOptions {
            follow: true,
            ..Default::default()
        };
        read_logs(&p, &opts, &mut Forever, &mut |_| false).unwrap();
    }

    #[test]
    fn follow_with_the_shim_writer_loses_nothing_across_rotations() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("0.log");
        let log = CriLog::open(&p, 300, 3).unwrap();
        log.write_record(Stream::Stdout, false, b"start").unwrap();
        let mut n = 0u32;
        struct Writer<'a> {
            log: &'a CriLog,
            n: &'a mut u32,
        }
        impl FollowCtl for Writer<'_> {
            fn running(&mut self) -> bool {
                *self.n < 200
            }
            fn wait(&mut self) {
                for _ in 0..7 {
                    if *self.n < 200 {
                        *self.n += 1;
                        let line = format!("line {:03}", self.n);
                        self.log
                            .write_record(Stream::Stdout, false, line.as_bytes())
                            .unwrap();
                    }
                }
            }
        }
        let mut out = Vec::new();
        let opts = LogOptions {
            follow: true,
            ..Default::default()
        };
        read_logs(
            &p,
            &opts,
            &mut Writer {
                log: &log,
                n: &mut n,
            },
            &mut |b| {
                out.extend_from_slice(b);
                true
            },
        )
        .unwrap();
        let mut want = String::from("start\n");
        for i in 1..=200 {
            want.push_str(&format!("line {i:03}\n"));
        }
        assert_eq!(String::from_utf8_lossy(&out), want);
        assert_eq!(hako_shim::logs::rotated_files(&p).len(), 2);
    }

    #[test]
    fn attach_follower_starts_at_end() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("0.log");
        std::fs::write(&p, rec(T1, Stream::Stdout, false, b"old")).unwrap();
        let mut f = AttachFollower::at_end(&p);
        assert!(f.poll().is_empty());
        append(&p, &rec(T2, Stream::Stderr, true, b"\xff"));
        append(&p, &rec(T2, Stream::Stderr, false, b"x"));
        assert_eq!(f.poll(), vec![(2, b"\xff".to_vec()), (2, b"x\n".to_vec())]);
    }
}

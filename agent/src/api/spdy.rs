//! SPDY/3.1 streaming for the kubelet API (effectful sessions over pure framing): what
//! `kubectl exec` (SPDY) and `kubectl port-forward` speak through the apiserver. Framing per the
//! SPDY/3 draft: control frames (SYN_STREAM, SYN_REPLY, RST_STREAM, PING, GOAWAY, SETTINGS,
//! WINDOW_UPDATE) and data frames. SPDY/3.1 flow control: every chunk of stdin or port-forward
//! data is granted back to the peer with a WINDOW_UPDATE only once its consumer took it (so a
//! slow process or pod socket back-pressures a client that honours windows), and our data
//! honours the peer's per-stream windows once the peer has shown it manages them by sending a
//! WINDOW_UPDATE (Go's spdystream, under kubectl and the apiserver, never does: holding it to
//! 64 KiB would stall every session). Everything from the peer is bounded: frame lengths ([`MAX_CONTROL_FRAME`],
//! [`MAX_DATA_FRAME`]), the inflated size of a header block ([`MAX_HEADER_BLOCK`]), streams
//! per session ([`MAX_STREAMS`]); queues to the peer, to a process's stdin and to a forwarded
//! connection are bounded channels, so a slow consumer stops the reading of the peer (TCP
//! back-pressure) instead of growing memory; header blocks are one zlib stream per direction, the client's compressed with
//! the SPDY/3 dictionary (handed to zlib, flate2's zlib-rs backend, when the stream asks for
//! it), ours without one. The remote-command protocol `v4.channel.k8s.io` has one stream per role
//! (`streamType` error, stdin, stdout, stderr, resize); port-forward `portforward.k8s.io` pairs an
//! error and a data stream per connection by `requestID`, for the port in their `port` header.

use bytes::Bytes;
use hako_shim::client::ShimClient;
use hako_shim::protocol::ExecRequest;
use hyper_util::rt::TokioIo;
use std::collections::HashMap;
use std::fs::File;
use std::io::Write as _;
use std::sync::OnceLock;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

type Io = TokioIo<hyper::upgrade::Upgraded>;

/// The remote-command protocol served over SPDY.
pub const EXEC_PROTOCOL: &str = "v4.channel.k8s.io";
/// The port-forward protocol served over SPDY.
pub const PORT_FORWARD_PROTOCOL: &str = "portforward.k8s.io";

/// The SPDY/3 header-compression dictionary (draft-mbelshe-httpbis-spdy-00 §2.6.10.1):
/// length-prefixed common header names and values, then a plain tail.
pub fn dictionary() -> &'static [u8] {
    static D: OnceLock<Vec<u8>> = OnceLock::new();
    D.get_or_init(|| {
        let words = [
            "options", "head", "post", "put", "delete", "trace", "accept", "accept-charset",
            "accept-encoding", "accept-language", "accept-ranges", "age", "allow",
            "authorization", "cache-control", "connection", "content-base", "content-encoding",
            "content-language", "content-length", "content-location", "content-md5",
            "content-range", "content-type", "date", "etag", "expect", "expires", "from", "host",
            "if-match", "if-modified-since", "if-none-match", "if-range", "if-unmodified-since",
            "last-modified", "location", "max-forwards", "pragma", "proxy-authenticate",
            "proxy-authorization", "range", "referer", "retry-after", "server", "te", "trailer",
            "transfer-encoding", "upgrade", "user-agent", "vary", "via", "warning",
            "www-authenticate", "method", "get", "status", "200 OK", "version", "HTTP/1.1", "url",
            "public", "set-cookie", "keep-alive", "origin",
        ];
        let mut d = Vec::with_capacity(1500);
        for w in words {
            d.extend_from_slice(&u32::try_from(w.len()).unwrap_or(0).to_be_bytes());
            d.extend_from_slice(w.as_bytes());
        }
        d.extend_from_slice(
            concat!(
                "100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505",
                "203 Non-Authoritative Information204 No Content301 Moved Permanently400 Bad Request",
                "401 Unauthorized403 Forbidden404 Not Found500 Internal Server Error501 Not Implemented",
                "503 Service UnavailableJan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 ",
                "Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMTchunked,text/html,image/png,image/jpg,image/gif,",
                "application/xml,application/xhtml+xml,text/plain,text/javascript,publicprivate",
                "max-age=gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0."
            )
            .as_bytes(),
        );
        d
    })
}

/// Inflates the peer's header blocks: one zlib stream across frames, the SPDY/3 dictionary
/// given to zlib when the stream asks for it (FDICT; zlib checks its Adler-32 id).
pub struct HeaderInflater(flate2::Decompress);

/// The most plain bytes one header block may inflate to (kubectl's are a few hundred; Go's
/// net/http allows 1 MiB of headers per request, SPDY streams here carry a handful).
pub const MAX_HEADER_BLOCK: usize = 64 * 1024;
/// The longest control frame accepted (the compressed header block and its fields).
pub const MAX_CONTROL_FRAME: usize = 128 * 1024;
/// The longest data frame accepted (the peer's initial window is 64 KiB; Go's spdystream
/// writes at most 32 KiB at a time).
pub const MAX_DATA_FRAME: usize = 256 * 1024;
/// Streams one session may open.
pub const MAX_STREAMS: usize = 256;
/// Frames queued to the writer of one session, and chunks queued to one stdin or
/// port-forward connection, before the reader stops reading the peer (back-pressure).
const QUEUE: usize = 64;

/// Why a header block could not be inflated (the session ends).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InflateError {
    /// The first block of the stream is empty.
    #[error("empty header block")]
    Empty,
    /// The block inflates past [`MAX_HEADER_BLOCK`] (a zlib bomb).
    #[error("header block inflates past {MAX_HEADER_BLOCK} bytes")]
    TooLarge,
    /// Not zlib, or another dictionary than SPDY/3's (zlib's message).
    #[error("inflate header block: {0}")]
    Zlib(String),
}

impl Default for HeaderInflater {
    fn default() -> Self {
        HeaderInflater(flate2::Decompress::new(true))
    }
}

impl HeaderInflater {
    /// The plain bytes of the next compressed chunk; an error when they would exceed
    /// [`MAX_HEADER_BLOCK`] (a zlib bomb) or the stream is not zlib.
    pub fn inflate(&mut self, mut input: &[u8]) -> Result<Vec<u8>, InflateError> {
        if input.is_empty() && self.0.total_in() == 0 {
            return Err(InflateError::Empty);
        }
        // One byte past the bound shows that the block is too large.
        let cap = MAX_HEADER_BLOCK + 1;
        let mut out = Vec::with_capacity(1024);
        loop {
            if out.len() == out.capacity() {
                out.reserve_exact(out.len().max(1024).min(cap - out.len()));
            }
            let (in0, out0) = (self.0.total_in(), out.len());
            let r = self
                .0
                .decompress_vec(input, &mut out, flate2::FlushDecompress::Sync);
            let used = usize::try_from(self.0.total_in() - in0).unwrap_or(input.len());
            input = input.get(used..).unwrap_or_default();
            if out.len() > MAX_HEADER_BLOCK {
                return Err(InflateError::TooLarge);
            }
            match r {
                Ok(flate2::Status::StreamEnd) => return Ok(out),
                // Everything consumed and flushed (room left in the output), or no progress.
                Ok(_)
                    if out.len() < out.capacity()
                        && (input.is_empty() || (used == 0 && out.len() == out0)) =>
                {
                    return Ok(out)
                }
                Ok(_) => {}
                Err(e) if e.needs_dictionary().is_some() => {
                    self.0
                        .set_dictionary(dictionary())
                        .map_err(|e| InflateError::Zlib(e.to_string()))?;
                }
                Err(e) => return Err(InflateError::Zlib(e.to_string())),
            }
        }
    }
}

/// Compresses our header blocks (one zlib stream, no dictionary, a sync flush per block).
pub struct HeaderDeflater(flate2::Compress);

impl Default for HeaderDeflater {
    fn default() -> Self {
        HeaderDeflater(flate2::Compress::new(flate2::Compression::default(), true))
    }
}

impl HeaderDeflater {
    /// The compressed form of a name/value block.
    pub fn deflate(&mut self, plain: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(plain.len() + 64);
        let mut input = plain;
        loop {
            out.reserve(256);
            let before = self.0.total_in();
            if self
                .0
                .compress_vec(input, &mut out, flate2::FlushCompress::Sync)
                .is_err()
            {
                break;
            }
            let used = usize::try_from(self.0.total_in() - before).unwrap_or(input.len());
            input = &input[used..];
            if input.is_empty() && out.len() < out.capacity() {
                break;
            }
        }
        out
    }
}

/// A name/value block (SPDY/3: 32-bit counts and lengths; multiple values NUL-separated).
pub fn encode_headers(h: &[(&str, &str)]) -> Vec<u8> {
    let mut b = Vec::new();
    let n = |x: usize| u32::try_from(x).unwrap_or(0).to_be_bytes();
    b.extend_from_slice(&n(h.len()));
    for (k, v) in h {
        b.extend_from_slice(&n(k.len()));
        b.extend_from_slice(k.to_ascii_lowercase().as_bytes());
        b.extend_from_slice(&n(v.len()));
        b.extend_from_slice(v.as_bytes());
    }
    b
}

/// Parses a name/value block; names lowercased (None when it is truncated).
pub fn parse_headers(b: &[u8]) -> Option<HashMap<String, String>> {
    let be = |x: &[u8]| -> Option<usize> {
        usize::try_from(u32::from_be_bytes(x.try_into().ok()?)).ok()
    };
    let mut p = 0usize;
    let mut take = |n: usize| -> Option<&[u8]> {
        let s = b.get(p..p.checked_add(n)?)?;
        p += n;
        Some(s)
    };
    let count = be(take(4)?)?;
    let mut h = HashMap::new();
    for _ in 0..count {
        let kl = be(take(4)?)?;
        let k = String::from_utf8_lossy(take(kl)?).to_ascii_lowercase();
        let vl = be(take(4)?)?;
        let v = String::from_utf8_lossy(take(vl)?).into_owned();
        h.insert(k, v);
    }
    Some(h)
}

/// A frame from the peer.
#[derive(Debug, PartialEq)]
pub enum Frame {
    /// A new stream with its headers.
    Syn {
        /// Stream id.
        id: u32,
        /// FIN: the peer will send nothing on it.
        fin: bool,
        /// Headers (names lowercased).
        headers: HashMap<String, String>,
    },
    /// Data on a stream.
    Data {
        /// Stream id.
        id: u32,
        /// FIN: the last data of the peer on this stream.
        fin: bool,
        /// Payload.
        data: Bytes,
    },
    /// The peer reset a stream.
    Rst(u32),
    /// A ping to echo (the whole frame).
    Ping(Vec<u8>),
    /// The peer is going away.
    GoAway,
    /// The peer consumed `delta` more bytes of stream `id` (SPDY/3.1: id 0 is the session).
    WindowUpdate {
        /// Stream id (0: the whole session).
        id: u32,
        /// Bytes the peer may now receive beyond the previous window.
        delta: u32,
    },
    /// SETTINGS from the peer: its initial per-stream window when it sets one.
    Settings {
        /// SETTINGS_INITIAL_WINDOW_SIZE (id 7).
        initial_window: Option<u32>,
    },
    /// Anything else (HEADERS, SYN_REPLY, NOOP...).
    Other,
}

/// Reads one frame (None at a clean end of the connection).
pub async fn read_frame<R: tokio::io::AsyncRead + Unpin>(
    r: &mut R,
    inf: &mut HeaderInflater,
) -> std::io::Result<Option<Frame>> {
    let mut h = [0u8; 8];
    match r.read_exact(&mut h).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let flags = h[4];
    let len = usize::from(h[5]) << 16 | usize::from(h[6]) << 8 | usize::from(h[7]);
    let max = if h[0] & 0x80 != 0 {
        MAX_CONTROL_FRAME
    } else {
        MAX_DATA_FRAME
    };
    if len > max {
        return Err(std::io::Error::other(format!(
            "SPDY frame of {len} bytes (at most {max})"
        )));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    let bad = |m: &str| std::io::Error::other(m.to_string());
    if h[0] & 0x80 == 0 {
        let id = u32::from_be_bytes([h[0], h[1], h[2], h[3]]) & 0x7fff_ffff;
        return Ok(Some(Frame::Data {
            id,
            fin: flags & 0x01 != 0,
            data: Bytes::from(body),
        }));
    }
    let kind = u16::from_be_bytes([h[2], h[3]]);
    let id = || -> std::io::Result<u32> {
        Ok(u32::from_be_bytes(
            body.get(0..4)
                .ok_or_else(|| bad("short frame"))?
                .try_into()
                .map_err(|_| bad("id"))?,
        ) & 0x7fff_ffff)
    };
    Ok(Some(match kind {
        1 => {
            let block = body.get(10..).ok_or_else(|| bad("short SYN_STREAM"))?;
            let plain = inf.inflate(block).map_err(std::io::Error::other)?;
            Frame::Syn {
                id: id()?,
                fin: flags & 0x01 != 0,
                headers: parse_headers(&plain).ok_or_else(|| bad("bad header block"))?,
            }
        }
        2 | 8 => {
            // SYN_REPLY/HEADERS from a client: keep the zlib stream in step.
            if let Some(block) = body.get(4..).filter(|b| !b.is_empty()) {
                inf.inflate(block).map_err(std::io::Error::other)?;
            }
            Frame::Other
        }
        3 => Frame::Rst(id()?),
        6 => {
            let mut f = h.to_vec();
            f.extend_from_slice(&body);
            Frame::Ping(f)
        }
        7 => Frame::GoAway,
        9 => {
            let delta = body.get(4..8).ok_or_else(|| bad("short WINDOW_UPDATE"))?;
            let delta = u32::from_be_bytes(delta.try_into().map_err(|_| bad("delta"))?);
            Frame::WindowUpdate {
                id: id()?,
                delta: delta & 0x7fff_ffff,
            }
        }
        4 => {
            // Entries: flags (1), id (3), value (4).
            let n = id()? as usize;
            let entries = body.get(4..).unwrap_or_default();
            let initial_window = entries
                .chunks_exact(8)
                .take(n)
                .filter(|e| e[1..4] == [0, 0, 7])
                .filter_map(|e| e[4..8].try_into().ok().map(u32::from_be_bytes))
                .next_back();
            Frame::Settings { initial_window }
        }
        _ => Frame::Other,
    }))
}

fn control(kind: u16, flags: u8, body: &[u8]) -> Vec<u8> {
    let len = u32::try_from(body.len()).unwrap_or(0).to_be_bytes();
    let k = kind.to_be_bytes();
    let mut f = vec![0x80, 3, k[0], k[1], flags, len[1], len[2], len[3]];
    f.extend_from_slice(body);
    f
}

/// A data frame (FIN with `fin`).
pub fn data_frame(id: u32, fin: bool, data: &[u8]) -> Vec<u8> {
    let len = u32::try_from(data.len()).unwrap_or(0).to_be_bytes();
    let idb = (id & 0x7fff_ffff).to_be_bytes();
    let mut f = vec![
        idb[0],
        idb[1],
        idb[2],
        idb[3],
        u8::from(fin),
        len[1],
        len[2],
        len[3],
    ];
    f.extend_from_slice(data);
    f
}

/// A SYN_REPLY with an empty header block.
fn syn_reply(id: u32, def: &mut HeaderDeflater) -> Vec<u8> {
    let mut body = (id & 0x7fff_ffff).to_be_bytes().to_vec();
    body.extend_from_slice(&def.deflate(&encode_headers(&[])));
    control(2, 0, &body)
}

/// A WINDOW_UPDATE granting the peer `delta` more bytes on stream `id`.
pub fn window_update(id: u32, delta: u32) -> Vec<u8> {
    let mut body = (id & 0x7fff_ffff).to_be_bytes().to_vec();
    body.extend_from_slice(&(delta & 0x7fff_ffff).to_be_bytes());
    control(9, 0, &body)
}

/// The SPDY/3 initial per-stream window.
pub const INITIAL_WINDOW: i64 = 64 * 1024;

#[derive(Debug)]
struct Windows {
    /// The peer has sent a WINDOW_UPDATE: it does flow control, so its windows are honoured.
    /// (Go's spdystream, which kubectl uses, neither sends nor reads WINDOW_UPDATE: windows
    /// are kept but not waited on until a peer shows it manages them.)
    enforced: bool,
    initial: i64,
    per_stream: HashMap<u32, i64>,
    closed: bool,
}

/// The peer's receive windows for the data we send (SPDY/3.1 flow control, per stream).
#[derive(Debug)]
pub struct SendWindows {
    state: std::sync::Mutex<Windows>,
    changed: tokio::sync::Notify,
}

impl Default for SendWindows {
    fn default() -> Self {
        SendWindows {
            state: std::sync::Mutex::new(Windows {
                enforced: false,
                initial: INITIAL_WINDOW,
                per_stream: HashMap::new(),
                closed: false,
            }),
            changed: tokio::sync::Notify::new(),
        }
    }
}

impl SendWindows {
    fn lock(&self) -> std::sync::MutexGuard<'_, Windows> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A WINDOW_UPDATE from the peer (stream 0, the session window, is not tracked).
    pub fn update(&self, id: u32, delta: u32) {
        {
            let mut st = self.lock();
            st.enforced = true;
            if id != 0 {
                let init = st.initial;
                let w = st.per_stream.entry(id).or_insert(init);
                *w = w.saturating_add(i64::from(delta)).min(i64::from(i32::MAX));
            }
        }
        self.changed.notify_waiters();
    }

    /// The peer's SETTINGS_INITIAL_WINDOW_SIZE: every window moves by the difference.
    pub fn set_initial(&self, v: u32) {
        {
            let mut st = self.lock();
            let d = i64::from(v) - st.initial;
            st.initial = i64::from(v);
            for w in st.per_stream.values_mut() {
                *w += d;
            }
        }
        self.changed.notify_waiters();
    }

    /// The session ended: nobody waits any more.
    pub fn close(&self) {
        self.lock().closed = true;
        self.changed.notify_waiters();
    }

    /// How many of `want` bytes may be sent on `id` now (at least 1), waiting while the
    /// peer's window is spent; None once the session has ended.
    pub async fn take(&self, id: u32, want: usize) -> Option<usize> {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            {
                let mut st = self.lock();
                if st.closed {
                    return None;
                }
                let (enforced, init) = (st.enforced, st.initial);
                let w = st.per_stream.entry(id).or_insert(init);
                let want64 = i64::try_from(want).unwrap_or(i64::MAX);
                if !enforced {
                    *w -= want64;
                    return Some(want);
                }
                if *w > 0 {
                    let n = want64.min(*w);
                    *w -= n;
                    return Some(usize::try_from(n).unwrap_or(0).max(1));
                }
            }
            changed.await;
        }
    }
}

/// Sends `data` on stream `id` in as many data frames as the peer's window allows.
async fn send_data(tx: &Tx, fc: &SendWindows, id: u32, mut data: &[u8]) -> bool {
    while !data.is_empty() {
        let Some(n) = fc.take(id, data.len()).await else {
            return false;
        };
        let n = n.min(data.len());
        if tx.send(data_frame(id, false, &data[..n])).await.is_err() {
            return false;
        }
        data = &data[n..];
    }
    true
}

/// Hands data of stream `id` to its consumer (a bounded queue: waits while it is full), then
/// grants the peer as many bytes again, so the client's window follows what was consumed.
async fn deliver<T>(tx: &Tx, to: &mpsc::Sender<T>, id: u32, item: T, len: usize) -> bool {
    if to.send(item).await.is_err() {
        return false;
    }
    if let Ok(d) = u32::try_from(len) {
        if d > 0 {
            let _ = tx.send(window_update(id, d)).await;
        }
    }
    true
}

fn goaway(last: u32) -> Vec<u8> {
    let mut body = (last & 0x7fff_ffff).to_be_bytes().to_vec();
    body.extend_from_slice(&0u32.to_be_bytes());
    control(7, 0, &body)
}

/// Frames to the peer (bounded: a peer that does not read stalls our readers of it).
type Tx = mpsc::Sender<Vec<u8>>;

/// Writes whatever arrives; ends (shutting the write side) when every sender is gone.
fn spawn_writer(mut w: tokio::io::WriteHalf<Io>) -> Tx {
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(QUEUE);
    tokio::spawn(async move {
        while let Some(f) = rx.recv().await {
            if w.write_all(&f).await.is_err() {
                return;
            }
        }
        let _ = w.shutdown().await;
    });
    tx
}

/// Output of a pipe as data frames on `id`, on its own thread; fires at EOF.
fn pump(
    mut r: File,
    id: u32,
    tx: Tx,
    fc: std::sync::Arc<SendWindows>,
) -> tokio::sync::oneshot::Receiver<()> {
    let (done, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        use std::io::Read;
        let mut buf = vec![0u8; 32 * 1024];
        while let Ok(n) = r.read(&mut buf) {
            if n == 0 || !futures::executor::block_on(send_data(&tx, &fc, id, &buf[..n])) {
                break;
            }
        }
        let _ = done.send(());
    });
    rx
}

/// The opening of a remote-command session: answers the client's SYN_STREAMs (and its
/// pings, window updates and settings) until every stream type in `needed` exists. The
/// streams by type; or, when the client opens more than 16 streams, breaks the framing or
/// takes longer than 30 s, the last stream id it opened (for a GOAWAY).
async fn await_streams<R: tokio::io::AsyncRead + Unpin>(
    r: &mut R,
    inf: &mut HeaderInflater,
    def: &mut HeaderDeflater,
    tx: &Tx,
    fc: &SendWindows,
    needed: &[&str],
) -> Result<HashMap<String, u32>, u32> {
    let mut ids: HashMap<String, u32> = HashMap::new();
    let mut last = 0;
    let got = tokio::time::timeout(Duration::from_secs(30), async {
        let mut syns = 0usize;
        while !needed.iter().all(|n| ids.contains_key(*n)) {
            match read_frame(r, inf).await {
                Ok(Some(Frame::Syn { .. })) if syns >= 16 => return false,
                Ok(Some(Frame::Syn { id, headers, .. })) => {
                    syns += 1;
                    last = id;
                    let _ = tx.send(syn_reply(id, def)).await;
                    if let Some(t) = headers.get("streamtype") {
                        ids.insert(t.clone(), id);
                    }
                }
                Ok(Some(Frame::Ping(p))) => {
                    let _ = tx.send(p).await;
                }
                Ok(Some(Frame::WindowUpdate { id, delta })) => fc.update(id, delta),
                Ok(Some(Frame::Settings {
                    initial_window: Some(v),
                })) => fc.set_initial(v),
                Ok(Some(_)) => {}
                _ => return false,
            }
        }
        true
    })
    .await
    .unwrap_or(false);
    if got {
        Ok(ids)
    } else {
        Err(last)
    }
}

/// A remote-command session (`exec`) over SPDY: waits for the streams the query promised,
/// runs the process through the shim's streaming exec, relays, ends with the status on the
/// error stream.
pub async fn exec_session(io: Io, client: ShimClient, x: ExecRequest, want: [bool; 3]) {
    let [want_stdin, want_stdout, want_stderr] = want;
    let tty = x.tty;
    let (mut r, w) = tokio::io::split(io);
    let tx = spawn_writer(w);
    let fc = std::sync::Arc::new(SendWindows::default());
    let mut inf = HeaderInflater::default();
    let mut def = HeaderDeflater::default();
    let mut needed = vec!["error"];
    if want_stdin {
        needed.push("stdin");
    }
    if want_stdout {
        needed.push("stdout");
    }
    if want_stderr && !tty {
        needed.push("stderr");
    }
    if tty {
        needed.push("resize");
    }
    let ids = match await_streams(&mut r, &mut inf, &mut def, &tx, &fc, &needed).await {
        Ok(ids) => ids,
        Err(last) => {
            let _ = tx.send(goaway(last)).await;
            return;
        }
    };
    let err_id = ids.get("error").copied().unwrap_or(0);
    let started = tokio::task::spawn_blocking(move || client.exec_stream(x)).await;
    let mut es = match started {
        Ok(Ok(es)) => es,
        Ok(Err(e)) => return finish(&tx, err_id, &[], Err(e.to_string().into())).await,
        Err(e) => return finish(&tx, err_id, &[], Err(e.to_string().into())).await,
    };
    let io = es.take_stdio();
    let mut outs = Vec::new();
    let mut out_ids = Vec::new();
    let input: Option<File>;
    let mut resize: Option<File> = None;
    let out_id = ids.get("stdout").copied();
    let err_out_id = ids.get("stderr").copied();
    if let Some(t) = io.tty {
        if let (Ok(rd), Some(id)) = (t.try_clone(), out_id) {
            outs.push(pump(rd, id, tx.clone(), fc.clone()));
            out_ids.push(id);
        } else if let Ok(rd) = t.try_clone() {
            // Nobody reads the terminal: drain it.
            std::thread::spawn(move || std::io::copy(&mut { rd }, &mut std::io::sink()));
        }
        resize = t.try_clone().ok();
        input = want_stdin.then_some(t);
    } else {
        for (f, id) in [(io.stdout, out_id), (io.stderr, err_out_id)] {
            match (f, id) {
                (Some(f), Some(id)) => {
                    outs.push(pump(f, id, tx.clone(), fc.clone()));
                    out_ids.push(id);
                }
                (Some(f), None) => {
                    std::thread::spawn(move || std::io::copy(&mut { f }, &mut std::io::sink()));
                }
                _ => {}
            }
        }
        input = io.stdin;
    }
    // stdin: bounded, so a process that does not read stalls the reader of the peer (and
    // TCP then stalls the client) instead of queueing without end.
    let (in_tx, mut in_rx) = mpsc::channel::<Bytes>(QUEUE);
    if let Some(mut w) = input {
        std::thread::spawn(move || {
            while let Some(chunk) = in_rx.blocking_recv() {
                if w.write_all(&chunk).is_err() {
                    break;
                }
            }
        });
    }
    let stdin_id = ids.get("stdin").copied();
    let resize_id = ids.get("resize").copied();
    let txr = tx.clone();
    let fcr = fc.clone();
    let reader = tokio::spawn(async move {
        let mut in_tx = Some(in_tx);
        let mut pending = Vec::new();
        loop {
            match read_frame(&mut r, &mut inf).await {
                Ok(Some(Frame::Data { id, fin, data })) => {
                    if Some(id) == stdin_id {
                        if let Some(t) = &in_tx {
                            if !data.is_empty() {
                                let n = data.len();
                                let _ = deliver(&txr, t, id, data, n).await;
                            }
                        }
                        if fin {
                            in_tx = None;
                        }
                    } else if Some(id) == resize_id {
                        pending.extend_from_slice(&data);
                        let mut it = serde_json::Deserializer::from_slice(&pending)
                            .into_iter::<serde_json::Value>();
                        let mut used = 0;
                        while let Some(Ok(v)) = it.next() {
                            used = it.byte_offset();
                            if let (Some(t), Some(sz)) = (
                                &resize,
                                crate::api::stream::parse_resize(v.to_string().as_bytes()),
                            ) {
                                let _ = hako_shim::stream::resize(t, sz.0, sz.1);
                            }
                        }
                        pending.drain(..used);
                    }
                }
                Ok(Some(Frame::Rst(id))) if Some(id) == stdin_id => in_tx = None,
                Ok(Some(Frame::Syn { id, .. })) => {
                    let _ = txr.send(syn_reply(id, &mut def)).await;
                }
                Ok(Some(Frame::Ping(p))) => {
                    let _ = txr.send(p).await;
                }
                Ok(Some(Frame::WindowUpdate { id, delta })) => fcr.update(id, delta),
                Ok(Some(Frame::Settings {
                    initial_window: Some(v),
                })) => fcr.set_initial(v),
                Ok(Some(Frame::GoAway)) | Ok(None) | Err(_) => break,
                Ok(Some(_)) => {}
            }
        }
        // The client is gone: nothing waits for its windows any more.
        fcr.close();
    });
    let code = crate::api::stream::on_own_thread("exec-wait", move || {
        es.wait_exit()
            .map_err(|e| crate::api::stream::SessionError::Exec(e.to_string()))
    })
    .await
    .unwrap_or_else(Err);
    for o in outs {
        let _ = tokio::time::timeout(Duration::from_secs(1), o).await;
    }
    finish(&tx, err_id, &out_ids, code).await;
    fc.close();
    drop(tx);
    // The client closes the connection once it has the status.
    let _ = tokio::time::timeout(Duration::from_secs(5), reader).await;
}

/// An attach session over SPDY: the container's output from its CRI log on the stdout and
/// stderr streams until it stops; the stdin stream to its stdin when its spec has
/// `stdin: true` (the shim's `attachStdin`).
pub async fn attach_session(
    io: Io,
    client: ShimClient,
    log_path: std::path::PathBuf,
    want: [bool; 3],
) {
    let [want_stdin, want_stdout, want_stderr] = want;
    let (mut r, w) = tokio::io::split(io);
    let tx = spawn_writer(w);
    let fc = std::sync::Arc::new(SendWindows::default());
    let mut inf = HeaderInflater::default();
    let mut def = HeaderDeflater::default();
    let mut needed = vec!["error"];
    for (n, want) in [
        ("stdin", want_stdin),
        ("stdout", want_stdout),
        ("stderr", want_stderr),
    ] {
        if want {
            needed.push(n);
        }
    }
    let Ok(ids) = await_streams(&mut r, &mut inf, &mut def, &tx, &fc, &needed).await else {
        return;
    };
    let input = if want_stdin {
        let c = client.clone();
        tokio::task::spawn_blocking(move || c.attach_stdin().ok())
            .await
            .ok()
            .flatten()
    } else {
        None
    };
    // stdin: bounded, so a process that does not read stalls the reader of the peer (and
    // TCP then stalls the client) instead of queueing without end.
    let (in_tx, mut in_rx) = mpsc::channel::<Bytes>(QUEUE);
    if let Some(mut w) = input {
        std::thread::spawn(move || {
            while let Some(chunk) = in_rx.blocking_recv() {
                if w.write_all(&chunk).is_err() {
                    break;
                }
            }
        });
    }
    let stdin_id = ids.get("stdin").copied();
    let txr = tx.clone();
    let fcr = fc.clone();
    let reader = tokio::spawn(async move {
        let mut in_tx = Some(in_tx);
        loop {
            match read_frame(&mut r, &mut inf).await {
                Ok(Some(Frame::Data { id, fin, data })) if Some(id) == stdin_id => {
                    if let Some(t) = &in_tx {
                        if !data.is_empty() {
                            let n = data.len();
                            let _ = deliver(&txr, t, id, data, n).await;
                        }
                    }
                    if fin {
                        in_tx = None;
                    }
                }
                Ok(Some(Frame::Syn { id, .. })) => {
                    let _ = txr.send(syn_reply(id, &mut def)).await;
                }
                Ok(Some(Frame::Ping(p))) => {
                    let _ = txr.send(p).await;
                }
                Ok(Some(Frame::WindowUpdate { id, delta })) => fcr.update(id, delta),
                Ok(Some(Frame::Settings {
                    initial_window: Some(v),
                })) => fcr.set_initial(v),
                Ok(Some(Frame::GoAway)) | Ok(None) | Err(_) => break,
                Ok(Some(_)) => {}
            }
        }
        // The client is gone: nothing waits for its windows any more.
        fcr.close();
    });
    let (out_id, err_id) = (ids.get("stdout").copied(), ids.get("stderr").copied());
    let mut log = crate::api::stream::LogFollower::at_end(log_path);
    let mut last_check = std::time::Instant::now();
    loop {
        if reader.is_finished() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        for (c, m) in log.poll() {
            if let Some(id) = if c == 1 { out_id } else { err_id } {
                let _ = send_data(&tx, &fc, id, &m).await;
            }
        }
        if last_check.elapsed() > Duration::from_millis(500) {
            last_check = std::time::Instant::now();
            if !crate::api::stream::running(&client).await {
                break;
            }
        }
    }
    let outs: Vec<u32> = [out_id, err_id].into_iter().flatten().collect();
    finish(&tx, ids.get("error").copied().unwrap_or(0), &outs, Ok(0)).await;
    fc.close();
    drop(tx);
    let _ = tokio::time::timeout(Duration::from_secs(5), reader).await;
}

/// Ends a remote-command session: FIN on the output streams, the status on the error stream.
async fn finish(
    tx: &Tx,
    err_id: u32,
    outs: &[u32],
    code: Result<i32, crate::api::stream::SessionError>,
) {
    for &id in outs {
        let _ = tx.send(data_frame(id, true, &[])).await;
    }
    let st = crate::api::stream::exit_status(code).to_string();
    let _ = tx.send(data_frame(err_id, false, st.as_bytes())).await;
    let _ = tx.send(data_frame(err_id, true, &[])).await;
}

/// A connection being set up: (error stream, data stream, port).
type Pair = (Option<u32>, Option<u32>, Option<u16>);

/// A port-forward session over SPDY: every (error, data) stream pair with the same
/// `requestID` is one connection to `127.0.0.1:<port>` in the pod's network namespace. At
/// most [`MAX_STREAMS`] streams per session; a protocol error (an oversized frame or header
/// block, too many streams) ends the session with GOAWAY.
pub async fn forward_session(io: Io, netns: File) {
    let (mut r, w) = tokio::io::split(io);
    let tx = spawn_writer(w);
    let fc = std::sync::Arc::new(SendWindows::default());
    let mut inf = HeaderInflater::default();
    let mut def = HeaderDeflater::default();
    // requestID → (error stream, data stream, port)
    let mut pairs: HashMap<String, Pair> = HashMap::new();
    // data stream → writer to its connection (None: the client finished sending)
    let mut conns: HashMap<u32, mpsc::Sender<Option<Bytes>>> = HashMap::new();
    let (mut last, mut opened) = (0u32, 0usize);
    loop {
        let f = match read_frame(&mut r, &mut inf).await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => {
                tracing::debug!(error = %e, "port-forward: SPDY protocol error");
                let _ = tx.send(goaway(last)).await;
                break;
            }
        };
        match f {
            Frame::Syn { id, headers, .. } => {
                opened += 1;
                if opened > MAX_STREAMS || pairs.len() >= MAX_STREAMS / 2 {
                    tracing::debug!("port-forward: too many streams in one session");
                    let _ = tx.send(goaway(last)).await;
                    break;
                }
                last = id;
                let _ = tx.send(syn_reply(id, &mut def)).await;
                let req = headers
                    .get("requestid")
                    .cloned()
                    .unwrap_or_else(|| id.to_string());
                let port = headers
                    .get("port")
                    .and_then(|p| p.parse::<u16>().ok())
                    .filter(|&p| p > 0);
                let kind = match headers.get("streamtype").map(String::as_str) {
                    Some("error") => 0,
                    Some("data") => 1,
                    _ => continue,
                };
                let e = pairs.entry(req.clone()).or_default();
                if kind == 0 {
                    e.0 = Some(id);
                } else {
                    e.1 = Some(id);
                }
                if e.2.is_none() {
                    e.2 = port;
                }
                if let (Some(eid), Some(did)) = (e.0, e.1) {
                    let port = e.2;
                    pairs.remove(&req);
                    let (ctx, crx) = mpsc::channel(QUEUE);
                    conns.insert(did, ctx);
                    let ns = netns.try_clone();
                    tokio::spawn(forward_one(
                        ns,
                        port,
                        (eid, did),
                        crx,
                        tx.clone(),
                        fc.clone(),
                    ));
                }
            }
            Frame::Data { id, fin, data } => {
                if let Some(c) = conns.get(&id) {
                    // Waits when the pod side is slow: the client is then not read either.
                    if !data.is_empty() {
                        let n = data.len();
                        let _ = deliver(&tx, c, id, Some(data), n).await;
                    }
                    if fin {
                        let _ = c.send(None).await;
                    }
                }
            }
            Frame::Rst(id) => {
                if let Some(c) = conns.remove(&id) {
                    let _ = c.try_send(None);
                }
            }
            Frame::Ping(p) => {
                let _ = tx.send(p).await;
            }
            Frame::WindowUpdate { id, delta } => fc.update(id, delta),
            Frame::Settings {
                initial_window: Some(v),
            } => fc.set_initial(v),
            Frame::GoAway => break,
            Frame::Settings { .. } | Frame::Other => {}
        }
    }
    fc.close();
}

async fn forward_one(
    ns: std::io::Result<File>,
    port: Option<u16>,
    (eid, did): (u32, u32),
    mut from_client: mpsc::Receiver<Option<Bytes>>,
    tx: Tx,
    fc: std::sync::Arc<SendWindows>,
) {
    let fail = |msg: String| {
        let tx = tx.clone();
        async move {
            let _ = tx.send(data_frame(eid, false, msg.as_bytes())).await;
            let _ = tx.send(data_frame(eid, true, &[])).await;
            let _ = tx.send(data_frame(did, true, &[])).await;
        }
    };
    let Some(port) = port else {
        return fail("invalid or missing port header".into()).await;
    };
    let conn = tokio::task::spawn_blocking(move || {
        let s = crate::api::stream::connect_in(&ns?, port)?;
        s.set_nonblocking(true)?;
        tokio::net::TcpStream::from_std(s)
    })
    .await
    .map_err(std::io::Error::other)
    .and_then(|r| r);
    let s = match conn {
        Ok(s) => s,
        Err(e) => return fail(format!("error forwarding port {port} to pod: {e}")).await,
    };
    let (mut rd, mut wr) = s.into_split();
    let up = tokio::spawn(async move {
        while let Some(m) = from_client.recv().await {
            match m {
                Some(b) => {
                    if wr.write_all(&b).await.is_err() {
                        break;
                    }
                }
                None => break,
            }
        }
        let _ = wr.shutdown().await;
    });
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match rd.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if !send_data(&tx, &fc, did, &buf[..n]).await {
                    break;
                }
            }
        }
    }
    let _ = tx.send(data_frame(did, true, &[])).await;
    let _ = tx.send(data_frame(eid, true, &[])).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), up).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dictionary_is_the_spdy3_one() {
        let d = dictionary();
        assert_eq!(d.len(), 1423);
        assert_eq!(&d[..11], b"\0\0\0\x07options");
        assert!(d.ends_with(b"enq=0."));
    }

    #[test]
    fn header_blocks_round_trip_through_zlib_with_the_dictionary() {
        // A peer's stream: zlib with the preset dictionary (FDICT, id 0xe3c6a7c2), two
        // sync-flushed blocks (made with Python's zlib, `compressobj(zdict=...)`).
        let hex = |h: &str| -> Vec<u8> {
            (0..h.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&h[i..i + 2], 16).expect("hex"))
                .collect()
        };
        let z1 =
            hex("78bbe3c6a7c202e50e703a2b294a4dcc851625aca9a0808614cb45e01c6061606100000000ffff");
        let z2 = hex("c2aa1454ea803205671124823341099fd100000000ffff");
        let b1 = encode_headers(&[("streamType", "error"), ("port", "8080")]);
        let mut inf = HeaderInflater::default();
        let h1 = parse_headers(&inf.inflate(&z1).expect("i1")).expect("p1");
        assert_eq!(h1.get("streamtype").map(String::as_str), Some("error"));
        assert_eq!(h1.get("port").map(String::as_str), Some("8080"));
        let h2 = parse_headers(&inf.inflate(&z2).expect("i2")).expect("p2");
        assert_eq!(h2.get("streamtype").map(String::as_str), Some("data"));
        assert_eq!(h2.get("requestid").map(String::as_str), Some("0"));
        // Ours inflate without a dictionary.
        let mut def = HeaderDeflater::default();
        let ours = def.deflate(&b1);
        let mut d = flate2::Decompress::new(true);
        let mut out = Vec::with_capacity(4096);
        d.decompress_vec(&ours, &mut out, flate2::FlushDecompress::Sync)
            .expect("d");
        assert_eq!(out, b1);
        let again = def.deflate(&b1);
        let mut out2 = Vec::with_capacity(4096);
        d.decompress_vec(&again, &mut out2, flate2::FlushDecompress::Sync)
            .expect("d2");
        assert_eq!(out2, b1, "one stream across blocks");
    }

    #[test]
    fn a_stream_with_another_dictionary_is_refused() {
        // FDICT names the dictionary by its Adler-32; zlib refuses the SPDY/3 one for it.
        let mut c = flate2::Compress::new(flate2::Compression::default(), true);
        c.set_dictionary(b"not the spdy dictionary").expect("dict");
        let mut z = Vec::with_capacity(256);
        c.compress_vec(
            &encode_headers(&[("a", "b")]),
            &mut z,
            flate2::FlushCompress::Sync,
        )
        .expect("z");
        let r = HeaderInflater::default().inflate(&z);
        assert!(r.is_err(), "{r:?}");
        // And a block that is not zlib at all.
        assert!(HeaderInflater::default()
            .inflate(b"\x00\x00\x00\x01")
            .is_err());
        assert!(HeaderInflater::default().inflate(b"").is_err());
    }

    #[test]
    fn name_value_blocks() {
        let b = encode_headers(&[("streamType", "stdin"), ("port", "80")]);
        let h = parse_headers(&b).expect("parse");
        assert_eq!(h.get("streamtype").map(String::as_str), Some("stdin"));
        assert_eq!(h.get("port").map(String::as_str), Some("80"));
        assert_eq!(parse_headers(&b[..b.len() - 1]), None, "truncated");
        assert_eq!(parse_headers(&[0, 0, 0, 9]), None, "count beyond the data");
    }

    #[test]
    fn header_bombs_are_refused() {
        // One zlib stream (a peer may leave the dictionary unused) of 1 MiB of zeros.
        let mut c = flate2::Compress::new(flate2::Compression::best(), true);
        let plain = vec![0u8; 1 << 20];
        let mut z = Vec::with_capacity(1 << 16);
        c.compress_vec(&plain, &mut z, flate2::FlushCompress::Sync)
            .expect("z");
        assert!(z.len() < 8 * 1024, "{}", z.len());
        let r = HeaderInflater::default().inflate(&z);
        assert!(
            matches!(&r, Err(e) if e.to_string().contains("inflates past")),
            "a zlib bomb inflated: {:?}",
            r.as_ref().map(Vec::len)
        );
    }

    #[test]
    fn frame_lengths_are_capped() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("rt");
        // A data frame claiming 16 MiB - 1 bytes, and a control frame of 1 MiB.
        for h in [
            [0u8, 0, 0, 1, 0, 0xff, 0xff, 0xff],
            [0x80, 3, 0, 1, 0, 0x10, 0, 0],
        ] {
            let mut inf = HeaderInflater::default();
            let r = rt.block_on(read_frame(&mut &h[..], &mut inf));
            let e = r.expect_err("too long");
            assert!(e.to_string().contains("at most"), "{e}");
        }
    }

    #[test]
    fn window_updates_and_settings_are_read() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("rt");
        let mut inf = HeaderInflater::default();
        let f = window_update(5, 4096);
        assert_eq!(f, [0x80, 3, 0, 9, 0, 0, 0, 8, 0, 0, 0, 5, 0, 0, 0x10, 0]);
        let r = rt
            .block_on(read_frame(&mut &f[..], &mut inf))
            .expect("read");
        assert_eq!(r, Some(Frame::WindowUpdate { id: 5, delta: 4096 }));
        // SETTINGS: two entries, ROUND_TRIP_TIME (3) and INITIAL_WINDOW_SIZE (7).
        let body = [
            0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 9, 0, 0, 0, 7, 0, 0, 0x20, 0,
        ];
        let f = control(4, 0, &body);
        let r = rt
            .block_on(read_frame(&mut &f[..], &mut inf))
            .expect("read");
        assert_eq!(
            r,
            Some(Frame::Settings {
                initial_window: Some(8192)
            })
        );
        // A short WINDOW_UPDATE is an error, not a panic.
        let f = control(9, 0, &[0, 0, 0, 1]);
        assert!(rt.block_on(read_frame(&mut &f[..], &mut inf)).is_err());
    }

    #[test]
    fn send_windows_wait_only_for_peers_that_update_them() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("rt");
        rt.block_on(async {
            // A peer that never sends WINDOW_UPDATE (Go's spdystream) is never waited on.
            let fc = SendWindows::default();
            assert_eq!(fc.take(1, 1 << 20).await, Some(1 << 20));
            // Once a peer updates windows, they are honoured.
            let fc = std::sync::Arc::new(SendWindows::default());
            fc.update(3, 0);
            assert_eq!(fc.take(3, 40_000).await, Some(40_000));
            assert_eq!(fc.take(3, 40_000).await, Some(65_536 - 40_000));
            let waiting = tokio::time::timeout(Duration::from_millis(50), fc.take(3, 10)).await;
            assert!(waiting.is_err(), "the window is spent");
            let fc2 = fc.clone();
            let t = tokio::spawn(async move { fc2.take(3, 10_000).await });
            tokio::time::sleep(Duration::from_millis(20)).await;
            fc.update(3, 4_000);
            assert_eq!(t.await.expect("join"), Some(4_000));
            // A smaller initial window from SETTINGS applies to open streams.
            fc.set_initial(1_000);
            assert_eq!(fc.take(9, 5_000).await, Some(1_000));
            let fc3 = fc.clone();
            let t = tokio::spawn(async move { fc3.take(9, 1).await });
            tokio::time::sleep(Duration::from_millis(20)).await;
            fc.close();
            assert_eq!(
                t.await.expect("join"),
                None,
                "ended sessions release waiters"
            );
        });
    }

    #[test]
    fn frames() {
        let f = data_frame(5, true, b"hi");
        assert_eq!(f, [0, 0, 0, 5, 1, 0, 0, 2, b'h', b'i']);
        let mut def = HeaderDeflater::default();
        let r = syn_reply(3, &mut def);
        assert_eq!(&r[..4], &[0x80, 3, 0, 2]);
        assert_eq!(&r[8..12], &[0, 0, 0, 3]);
    }
}

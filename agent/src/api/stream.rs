//! Streaming endpoints of the kubelet API over WebSocket (effectful): `/exec` and `/attach`
//! with the subprotocols the kubelet serves ([`Framing`]): `v5.channel.k8s.io`,
//! `v4.channel.k8s.io`, `v4.base64.channel.k8s.io`, `channel.k8s.io`,
//! `base64.channel.k8s.io` and none (= `channel.k8s.io`). Binary ones put one byte of channel
//! in front of every binary message (0 stdin, 1 stdout, 2 stderr, 3 error/status, 4 terminal
//! resize `{"Width":w,"Height":h}`; v5 adds 255 = close the channel in the next byte); base64
//! ones send text messages of the channel as an ASCII digit and the payload in standard
//! base64. v4 and v5 write the final `metav1.Status` as JSON on channel 3; the older ones
//! write nothing on success and the status message as text on failure. As the kubelet, an
//! empty message on the lowest writable channel opens every session. And `/portForward` with the kubelet's port-forward WebSocket protocol (per port
//! `i` a data channel `2i` and an error channel `2i+1`, each opened by the port number as two
//! bytes little endian). The exec runs through the shim's streaming exec (its stdio handed
//! over as descriptors); attach follows the container's CRI log (output only); port-forward
//! connects to `127.0.0.1:<port>` from a socket made in the pod's network namespace, entered
//! through the sandbox's bind-mounted namespace file (never a container pid, which could be
//! recycled). Client messages are capped at [`MAX_WS_MESSAGE`] and stdin is a bounded queue.
//! SPDY upgrades of the same endpoints go to [`crate::api::spdy`].

use crate::api::kubelet_api::PodStore;
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use hako_shim::client::{Runtime as ShimRuntime, ShimClient};
use hako_shim::protocol::ExecRequest;
use hako_shim::state::Status;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::fs::File;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;
type Ws = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

/// The remote-command subprotocols served ("" = none offered: binary v1, as the kubelet). The
/// first one the client offers wins.
pub const EXEC_PROTOCOLS: [&str; 6] = [
    "v5.channel.k8s.io",
    "v4.channel.k8s.io",
    "v4.base64.channel.k8s.io",
    "channel.k8s.io",
    "base64.channel.k8s.io",
    "",
];

/// How one remote-command subprotocol frames messages and reports the end (pure).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Framing {
    /// Text messages: channel as an ASCII digit, payload base64 (else binary: channel byte).
    pub base64: bool,
    /// The final status is `metav1.Status` JSON, success included (v4, v5); else only a
    /// failure's message text (channel.k8s.io, base64.channel.k8s.io).
    pub status_json: bool,
    /// `[255, channel]` closes a channel (v5).
    pub v5: bool,
}

impl Framing {
    /// Binary framing without the v5 close signal (port-forward, SPDY-less tests).
    pub const BINARY: Framing = Framing {
        base64: false,
        status_json: true,
        v5: false,
    };

    /// The framing of a negotiated subprotocol (None: not a remote-command subprotocol).
    pub fn of(protocol: &str) -> Option<Framing> {
        let (base64, status_json, v5) = match protocol {
            "v5.channel.k8s.io" => (false, true, true),
            "v4.channel.k8s.io" => (false, true, false),
            "v4.base64.channel.k8s.io" => (true, true, false),
            "channel.k8s.io" | "" => (false, false, false),
            "base64.channel.k8s.io" => (true, false, false),
            _ => return None,
        };
        Some(Framing {
            base64,
            status_json,
            v5,
        })
    }

    /// One message to the client on `channel`.
    pub fn encode(self, channel: u8, data: &[u8]) -> Message {
        if self.base64 {
            use base64::Engine as _;
            let mut t = String::with_capacity(1 + data.len().div_ceil(3) * 4);
            t.push(char::from(b'0'.wrapping_add(channel)));
            base64::engine::general_purpose::STANDARD.encode_string(data, &mut t);
            Message::Text(t)
        } else {
            let mut v = Vec::with_capacity(data.len() + 1);
            v.push(channel);
            v.extend_from_slice(data);
            Message::Binary(v)
        }
    }

    /// A client message as (channel byte, payload) bytes; None for control messages, a
    /// message of the other kind's framing or undecodable base64 (dropped, as the kubelet
    /// drops a frame it cannot decode).
    pub fn decode(self, m: Message) -> Option<Vec<u8>> {
        let text = match (m, self.base64) {
            (Message::Binary(b), false) => return Some(b),
            (Message::Text(t), true) => t.into_bytes(),
            (Message::Binary(b), true) => b,
            _ => return None,
        };
        use base64::Engine as _;
        let (&c, rest) = text.split_first()?;
        let mut v = vec![c.wrapping_sub(b'0')];
        base64::engine::general_purpose::STANDARD
            .decode_vec(rest, &mut v)
            .ok()?;
        Some(v)
    }

    /// What goes on the error channel at the end (None: nothing, a v1 success).
    pub fn status_message(self, code: Result<i32, SessionError>) -> Option<Vec<u8>> {
        let st = exit_status(code);
        if self.status_json {
            return Some(st.to_string().into_bytes());
        }
        (st["status"] != "Success")
            .then(|| st["message"].as_str().unwrap_or("").as_bytes().to_vec())
    }
}
/// The port-forward subprotocols served ("" = none offered; both are the binary form).
pub const PORT_FORWARD_PROTOCOLS: [&str; 2] = ["v4.channel.k8s.io", ""];

/// Chunks queued to a process's stdin before the reader of the client waits (back-pressure).
const STDIN_QUEUE: usize = 64;
/// The largest WebSocket message and frame accepted from a client (client-go sends stdin
/// and port-forward data in 32 KiB chunks).
pub const MAX_WS_MESSAGE: usize = 1 << 20;

/// WebSocket limits for the streaming endpoints.
fn ws_config() -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
        max_message_size: Some(MAX_WS_MESSAGE),
        max_frame_size: Some(MAX_WS_MESSAGE),
        max_write_buffer_size: 4 << 20,
        ..Default::default()
    }
}

/// What the streaming handlers need from the API server.
#[derive(Clone)]
pub struct StreamCtx {
    /// Pods bound to the node.
    pub pods: PodStore,
    /// Agent state root (container metadata under `pods/<uid>/containers`, the sandbox
    /// record in `pods/<uid>/sandbox.json`).
    pub root_dir: PathBuf,
    /// The pod workers' run dir (sandbox namespaces under `sandboxes/<id>`).
    pub run_dir: Option<PathBuf>,
    /// The shim runtime (None: no pod workers run here; the endpoints answer 503).
    pub shim: Option<ShimRuntime>,
}

fn text(code: StatusCode, s: impl Into<String>) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(s.into())).boxed());
    *r.status_mut() = code;
    r
}

pub use crate::api::query::decode as pct_decode;

/// Every `key=value` of a query string, decoded, in order (repeated keys kept).
pub fn query_pairs(q: &str) -> Vec<(String, String)> {
    crate::api::query::Query::parse(q).into_pairs()
}

fn flag(pairs: &[(String, String)], key: &str) -> bool {
    pairs
        .iter()
        .rev()
        .find(|(k, _)| k == key)
        .is_some_and(|(_, v)| matches!(v.as_str(), "1" | "true" | "True" | "TRUE"))
}

/// Why the ports of a port-forward request were refused (400; the kubelet's messages).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortsError {
    /// `port=` with nothing.
    #[error("query parameter \"port\" cannot be empty")]
    Empty,
    /// Not a number from 0 to 65535.
    #[error("unable to parse {0:?} as a port: {1}")]
    Parse(String, std::num::ParseIntError),
    /// Port 0.
    #[error("port {0:?} must be > 0")]
    Zero(String),
    /// No port at all.
    #[error("query parameter \"port\" is required")]
    Missing,
}

/// The ports of a port-forward request (`ports=80,8080&ports=9000`), as the kubelet checks them.
pub fn parse_ports(pairs: &[(String, String)]) -> Result<Vec<u16>, PortsError> {
    let mut ports = Vec::new();
    for (_, v) in pairs.iter().filter(|(k, _)| k == "port" || k == "ports") {
        if v.is_empty() {
            return Err(PortsError::Empty);
        }
        for p in v.split(',') {
            let n: u16 = p
                .trim()
                .parse()
                .map_err(|e| PortsError::Parse(p.into(), e))?;
            if n == 0 {
                return Err(PortsError::Zero(p.into()));
            }
            ports.push(n);
        }
    }
    if ports.is_empty() {
        return Err(PortsError::Missing);
    }
    Ok(ports)
}

/// The subprotocol to answer with: the first the client offers that we serve; "" when it
/// offers none and "" is served. None: no common protocol.
pub fn pick_protocol(offered: &str, served: &[&str]) -> Option<String> {
    let offered: Vec<&str> = offered
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    if offered.is_empty() {
        return served.contains(&"").then(String::new);
    }
    offered
        .into_iter()
        .find(|o| served.contains(o))
        .map(str::to_string)
}

/// Checks a WebSocket upgrade request; returns the 101 answer, the negotiated subprotocol and
/// the pending upgrade, or the error answer.
fn accept(
    req: &mut Request<Incoming>,
    served: &[&str],
) -> Result<(Response<Body>, String, hyper::upgrade::OnUpgrade), (StatusCode, String)> {
    let h = req.headers();
    let hv = |n: &str| {
        h.get_all(n)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect::<Vec<_>>()
            .join(",")
    };
    let upgrade = hv("upgrade").to_ascii_lowercase();
    if !upgrade.split(',').any(|u| u.trim() == "websocket") {
        let spdy = upgrade.contains("spdy");
        return Err((
            StatusCode::BAD_REQUEST,
            if spdy {
                "SPDY streaming is not supported by this node: use a WebSocket client (v5.channel.k8s.io, v4.channel.k8s.io)"
            } else {
                "a WebSocket upgrade is required"
            }
            .to_string(),
        ));
    }
    let Some(key) = h.get("sec-websocket-key").map(|k| k.as_bytes().to_vec()) else {
        return Err((StatusCode::BAD_REQUEST, "missing Sec-WebSocket-Key".into()));
    };
    let Some(proto) = pick_protocol(&hv("sec-websocket-protocol"), served) else {
        return Err((
            StatusCode::BAD_REQUEST,
            format!(
                "requested protocol(s) are not supported: {:?}; supported protocols: {:?}",
                hv("sec-websocket-protocol"),
                served.iter().filter(|s| !s.is_empty()).collect::<Vec<_>>()
            ),
        ));
    };
    let on = hyper::upgrade::on(req);
    let mut r = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header("upgrade", "websocket")
        .header("connection", "Upgrade")
        .header("sec-websocket-accept", derive_accept_key(&key));
    if !proto.is_empty() {
        r = r.header("sec-websocket-protocol", proto.as_str());
    }
    let r = r
        .body(Full::new(Bytes::new()).boxed())
        .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok((r, proto, on))
}

/// Whether a request asks for a SPDY/3.1 upgrade.
fn is_spdy(req: &Request<Incoming>) -> bool {
    req.headers()
        .get_all("upgrade")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.to_ascii_lowercase().contains("spdy/3.1"))
}

/// Checks a SPDY upgrade offering `protocol` (`X-Stream-Protocol-Version`); the 101 answer
/// and the pending upgrade.
fn accept_spdy(
    req: &mut Request<Incoming>,
    protocol: &str,
) -> Result<(Response<Body>, hyper::upgrade::OnUpgrade), (StatusCode, String)> {
    let offered: Vec<String> = req
        .headers()
        .get_all("x-stream-protocol-version")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|p| p.trim().to_string()))
        .collect();
    if !offered.iter().any(|p| p == protocol) {
        return Err((
            StatusCode::FORBIDDEN,
            format!("no common stream protocol: offered {offered:?}, supported [{protocol:?}]"),
        ));
    }
    let on = hyper::upgrade::on(req);
    let r = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header("connection", "Upgrade")
        .header("upgrade", "SPDY/3.1")
        .header("x-stream-protocol-version", protocol)
        .body(Full::new(Bytes::new()).boxed())
        .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok((r, on))
}

/// A container resolved for a streaming request.
struct Target {
    client: ShimClient,
    log_path: PathBuf,
}

/// Finds the newest instance of `container` in pod `ns/pod` (blocking: asks its shim).
fn find(
    ctx: &StreamCtx,
    ns: &str,
    pod: &str,
    container: &str,
) -> Result<Target, (StatusCode, String)> {
    let Some(shim) = &ctx.shim else {
        return Err((
            StatusCode::SERVICE_UNAVAILABLE,
            "this node runs no pod workers".into(),
        ));
    };
    let p = ctx.pods.read().ok().and_then(|p| {
        p.values()
            .find(|p| {
                p.metadata.namespace.as_deref() == Some(ns)
                    && p.metadata.name.as_deref() == Some(pod)
            })
            .cloned()
    });
    let Some(p) = p else {
        return Err((StatusCode::NOT_FOUND, format!("pod {ns}/{pod} not found")));
    };
    let uid = crate::api::kubelet_api::runtime_uid(&p).unwrap_or_default();
    let name = if container.is_empty() {
        // The kubelet defaults to the only container.
        match p.spec.as_ref().map(|s| s.containers.as_slice()) {
            Some([c]) => c.name.clone(),
            _ => {
                return Err((
                    StatusCode::BAD_REQUEST,
                    format!("a container name must be specified for pod {pod}"),
                ))
            }
        }
    } else {
        container.to_string()
    };
    let meta = crate::sys::runtime::read_metas(&ctx.root_dir, &uid)
        .into_iter()
        .filter(|m| m.name == name)
        .max_by_key(|m| m.attempt);
    let Some(meta) = meta else {
        return Err((
            StatusCode::NOT_FOUND,
            format!("container {name} is not found in pod {ns}/{pod}"),
        ));
    };
    let client = shim.client(&meta.id);
    match client.state() {
        Ok(st) if st.status == Status::Running => Ok(Target {
            client,
            log_path: meta.log_path,
        }),
        Ok(_) => Err((
            StatusCode::BAD_REQUEST,
            format!("container {name} in pod {ns}/{pod} is not running"),
        )),
        Err(e) => Err((StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
    }
}

/// Whether a sandbox id is one the agent makes (`<uid chars>-s<attempt>`): a plain name, so
/// it cannot leave `<run-dir>/sandboxes`.
pub fn valid_sandbox_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The pod's network namespace: the sandbox's bind-mounted `net` file (blocking). Named by the
/// sandbox, never by a container pid, which could be recycled into another namespace.
fn pod_netns(ctx: &StreamCtx, ns: &str, pod: &str) -> Result<File, (StatusCode, String)> {
    let Some(run_dir) = &ctx.run_dir else {
        return Err((
            StatusCode::SERVICE_UNAVAILABLE,
            "this node runs no pod workers".into(),
        ));
    };
    let uid = ctx.pods.read().ok().and_then(|p| {
        p.values()
            .find(|p| {
                p.metadata.namespace.as_deref() == Some(ns)
                    && p.metadata.name.as_deref() == Some(pod)
            })
            .map(|p| crate::api::kubelet_api::runtime_uid(p).unwrap_or_default())
    });
    let Some(uid) = uid.filter(|u| valid_sandbox_id(u)) else {
        return Err((StatusCode::NOT_FOUND, format!("pod {ns}/{pod} not found")));
    };
    let no_sandbox = || {
        (
            StatusCode::BAD_REQUEST,
            format!("pod {ns}/{pod} has no running sandbox"),
        )
    };
    let rec: serde_json::Value =
        std::fs::read(ctx.root_dir.join("pods").join(&uid).join("sandbox.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(no_sandbox)?;
    let id = rec["id"]
        .as_str()
        .filter(|i| valid_sandbox_id(i))
        .ok_or_else(no_sandbox)?;
    let paths = crate::sys::sandbox::SandboxPaths::new(run_dir, id);
    if !paths.exists() {
        return Err(no_sandbox());
    }
    let f = {
        use std::os::unix::fs::OpenOptionsExt as _;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
            .open(paths.net())
    }
    .map_err(|e| {
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("network namespace of pod {ns}/{pod}: {e}"),
        )
    })?;
    // Only a namespace file (nsfs) is entered.
    match nix::sys::statfs::fstatfs(&f) {
        Ok(s) if s.filesystem_type() == nix::sys::statfs::NSFS_MAGIC => Ok(f),
        _ => Err(no_sandbox()),
    }
}

/// What goes to the WebSocket writer.
enum Out {
    Msg(Message),
    /// Close the connection (a normal close frame) and stop.
    Close,
}

fn frame(f: Framing, channel: u8, data: &[u8]) -> Out {
    Out::Msg(f.encode(channel, data))
}

/// Runs the writer half: sends what arrives until `Close` (or a send error).
fn spawn_writer(
    mut sink: futures::stream::SplitSink<Ws, Message>,
) -> (mpsc::Sender<Out>, tokio::task::JoinHandle<()>) {
    let (tx, mut rx) = mpsc::channel::<Out>(64);
    let h = tokio::spawn(async move {
        while let Some(o) = rx.recv().await {
            match o {
                Out::Msg(m) => {
                    if sink.send(m).await.is_err() {
                        return;
                    }
                }
                Out::Close => break,
            }
        }
        // A normal closure (1000), which clients read as the end of the streams (a close
        // frame without a code, 1005, is an error to client-go).
        let bye = tokio_tungstenite::tungstenite::protocol::CloseFrame {
            code: tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode::Normal,
            reason: "".into(),
        };
        let _ = sink.send(Message::Close(Some(bye))).await;
        let _ = sink.close().await;
    });
    (tx, h)
}

/// Copies a blocking reader into a channel on its own thread; the receiver fires at EOF.
fn pump(
    mut r: File,
    f: Framing,
    channel: Option<u8>,
    tx: mpsc::Sender<Out>,
) -> tokio::sync::oneshot::Receiver<()> {
    let (done, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 32 * 1024];
        // A terminal master reads EIO once the process side is closed.
        while let Ok(n) = r.read(&mut buf) {
            if n == 0 {
                break;
            }
            if let Some(c) = channel {
                if tx.blocking_send(frame(f, c, &buf[..n])).is_err() {
                    break;
                }
            }
        }
        let _ = done.send(());
    });
    rx
}

/// Why a remote-command session has no exit code (a 500 `metav1.Status` to the client).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// A thread of the session could not be started or went away: (thread name, why).
    #[error("{0} thread: {1}")]
    Thread(String, String),
    /// The shim could not start the process or lost it (its message).
    #[error("{0}")]
    Exec(String),
}

impl From<String> for SessionError {
    fn from(m: String) -> Self {
        SessionError::Exec(m)
    }
}

impl From<&str> for SessionError {
    fn from(m: &str) -> Self {
        SessionError::Exec(m.into())
    }
}

/// `metav1.Status` for the error channel, as the kubelet writes it.
pub fn exit_status(code: Result<i32, SessionError>) -> serde_json::Value {
    match code {
        Ok(0) => serde_json::json!({"metadata": {}, "status": "Success"}),
        Ok(c) => serde_json::json!({"metadata": {}, "status": "Failure",
            "message": format!("command terminated with non-zero exit code: exit status {c}"),
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": c.to_string()}]}}),
        Err(e) => {
            let e = e.to_string();
            serde_json::json!({"metadata": {}, "status": "Failure", "message": e,
            "reason": "InternalError", "code": 500,
            "details": {"causes": [{"message": e}]}})
        }
    }
}

/// Terminal size from a resize message (`{"Width":80,"Height":24}`).
pub fn parse_resize(b: &[u8]) -> Option<(u16, u16)> {
    let v: serde_json::Value = serde_json::from_slice(b).ok()?;
    let w = u16::try_from(v["Width"].as_u64()?).ok()?;
    let h = u16::try_from(v["Height"].as_u64()?).ok()?;
    Some((w, h))
}

/// What one binary WebSocket message from the client means (channel byte first). Pure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound<'a> {
    /// Bytes for the process's stdin (exec/attach channel 0).
    Stdin(&'a [u8]),
    /// A terminal resize (exec/attach channel 4); None when the message is not a size.
    Resize(Option<(u16, u16)>),
    /// The client closed stdin (v5: `[255, 0]`).
    CloseStdin,
    /// Bytes for port-forward connection `conn` (data channel `2 * conn`).
    Forward {
        /// Index of the port in the request.
        conn: usize,
        /// Payload.
        data: &'a [u8],
    },
    /// Nothing to do (empty, an unknown or output channel, an error channel from the client).
    Ignored,
}

/// An exec or attach message: channel 0 stdin, 4 resize, `[255, 0]` stdin close with v5.
pub fn exec_inbound(data: &[u8], v5: bool) -> Inbound<'_> {
    match data.split_first() {
        Some((0, rest)) => Inbound::Stdin(rest),
        Some((4, rest)) => Inbound::Resize(parse_resize(rest)),
        Some((255, [0, ..])) if v5 => Inbound::CloseStdin,
        _ => Inbound::Ignored,
    }
}

/// A port-forward message: data on channel `2i` goes to connection `i`; error channels
/// (odd) and empty payloads are ignored.
pub fn forward_inbound(data: &[u8]) -> Inbound<'_> {
    match data.split_first() {
        Some((&c, rest)) if c % 2 == 0 && !rest.is_empty() => Inbound::Forward {
            conn: usize::from(c / 2),
            data: rest,
        },
        _ => Inbound::Ignored,
    }
}

/// `/exec/{ns}/{pod}/[{uid}/]{container}` and `/attach/...`.
pub async fn exec_or_attach(
    ctx: StreamCtx,
    mut req: Request<Incoming>,
    attach: bool,
    ns: String,
    pod: String,
    container: String,
) -> Response<Body> {
    let pairs = query_pairs(req.uri().query().unwrap_or(""));
    let command: Vec<String> = pairs
        .iter()
        .filter(|(k, _)| k == "command")
        .map(|(_, v)| v.clone())
        .collect();
    let (stdin, stdout, stderr, tty) = (
        flag(&pairs, "stdin") || flag(&pairs, "input"),
        flag(&pairs, "stdout") || flag(&pairs, "output"),
        flag(&pairs, "stderr") || flag(&pairs, "error"),
        flag(&pairs, "tty"),
    );
    if !attach && command.is_empty() {
        return text(StatusCode::BAD_REQUEST, "command is required");
    }
    if !(stdin || stdout || stderr) {
        return text(
            StatusCode::BAD_REQUEST,
            "you must specify at least 1 of stdin, stdout, stderr",
        );
    }
    let c2 = ctx.clone();
    let found = tokio::task::spawn_blocking(move || find(&c2, &ns, &pod, &container)).await;
    let target = match found {
        Ok(Ok(t)) => t,
        Ok(Err((code, msg))) => return text(code, msg),
        Err(e) => return text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    if is_spdy(&req) {
        let (resp, on) = match accept_spdy(&mut req, crate::api::spdy::EXEC_PROTOCOL) {
            Ok(x) => x,
            Err((code, msg)) => return text(code, msg),
        };
        if attach {
            tokio::spawn(async move {
                let Ok(up) = on.await else { return };
                crate::api::spdy::attach_session(
                    TokioIo::new(up),
                    target.client,
                    target.log_path,
                    [stdin, stdout, stderr],
                )
                .await;
            });
            return resp;
        }
        let x = ExecRequest {
            args: command,
            tty,
            stdin: stdin && !tty,
            ..Default::default()
        };
        tokio::spawn(async move {
            let Ok(up) = on.await else { return };
            crate::api::spdy::exec_session(
                TokioIo::new(up),
                target.client,
                x,
                [stdin, stdout, stderr],
            )
            .await;
        });
        return resp;
    }
    let (resp, proto, on) = match accept(&mut req, &EXEC_PROTOCOLS) {
        Ok(x) => x,
        Err((code, msg)) => return text(code, msg),
    };
    let Some(framing) = Framing::of(&proto) else {
        return text(
            StatusCode::BAD_REQUEST,
            format!("unknown protocol {proto:?}"),
        );
    };
    tokio::spawn(async move {
        let Ok(up) = on.await else { return };
        let ws =
            WebSocketStream::from_raw_socket(TokioIo::new(up), Role::Server, Some(ws_config()))
                .await;
        if attach {
            attach_session(ws, framing, target, stdin, stdout, stderr).await;
        } else {
            let x = ExecRequest {
                args: command,
                tty,
                stdin: stdin && !tty,
                ..Default::default()
            };
            exec_session(ws, framing, target.client, x, stdin, stdout, stderr && !tty).await;
        }
    });
    resp
}

#[allow(clippy::too_many_arguments)]
async fn exec_session(
    ws: Ws,
    f: Framing,
    client: ShimClient,
    x: ExecRequest,
    want_stdin: bool,
    want_stdout: bool,
    want_stderr: bool,
) {
    let (sink, mut src) = ws.split();
    let (tx, writer) = spawn_writer(sink);
    opened(&tx, f, want_stdout, want_stderr).await;
    let started = tokio::task::spawn_blocking(move || client.exec_stream(x)).await;
    let mut es = match started {
        Ok(Ok(es)) => es,
        Ok(Err(e)) => return finish(tx, writer, f, Err(e.to_string().into()), None).await,
        Err(e) => return finish(tx, writer, f, Err(e.to_string().into()), None).await,
    };
    let io = es.take_stdio();
    let mut outs = Vec::new();
    let mut input: Option<File> = None;
    let mut resize: Option<File> = None;
    if let Some(t) = io.tty {
        if let Ok(r) = t.try_clone() {
            outs.push(pump(r, f, want_stdout.then_some(1), tx.clone()));
        }
        resize = t.try_clone().ok();
        if want_stdin {
            input = Some(t);
        }
    } else {
        let framing = f;
        for (f, c, want) in [(io.stdout, 1u8, want_stdout), (io.stderr, 2u8, want_stderr)] {
            if let Some(f) = f {
                outs.push(pump(f, framing, want.then_some(c), tx.clone()));
            }
        }
        input = io.stdin;
    }
    // stdin: a thread owns the write end; dropping its sender closes it (EOF).
    let (in_tx, mut in_rx) = mpsc::channel::<Vec<u8>>(STDIN_QUEUE);
    if let Some(mut w) = input {
        std::thread::spawn(move || {
            while let Some(chunk) = in_rx.blocking_recv() {
                if w.write_all(&chunk).is_err() {
                    break;
                }
            }
        });
    }
    let reader = tokio::spawn(async move {
        let mut in_tx = Some(in_tx);
        while let Some(Ok(m)) = src.next().await {
            if let Message::Close(_) = m {
                break;
            }
            let Some(data) = f.decode(m) else { continue };
            match exec_inbound(&data, f.v5) {
                Inbound::Stdin(b) => {
                    if let Some(t) = &in_tx {
                        let _ = t.send(b.to_vec()).await;
                    }
                }
                Inbound::Resize(Some((w, h))) => {
                    if let Some(t) = &resize {
                        if let Err(e) = hako_shim::stream::resize(t, w, h) {
                            tracing::debug!(error = %e, "exec: terminal resize");
                        }
                    }
                }
                Inbound::CloseStdin => in_tx = None,
                _ => {}
            }
        }
        // The client is gone: the process sees EOF on stdin.
        drop(in_tx);
    });
    let code = on_own_thread("exec-wait", move || {
        es.wait_exit()
            .map_err(|e| SessionError::Exec(e.to_string()))
    })
    .await
    .unwrap_or_else(Err);
    // Output still in the pipes; bounded (a background process may hold them).
    for o in outs {
        let _ = tokio::time::timeout(Duration::from_secs(1), o).await;
    }
    finish(tx, writer, f, code, Some(reader)).await;
}

/// The kubelet's first message of a session: an empty one on the lowest writable channel
/// (stdout, else stderr, else the error channel), telling the client the streams are open.
async fn opened(tx: &mpsc::Sender<Out>, f: Framing, stdout: bool, stderr: bool) {
    let c = if stdout {
        1
    } else if stderr {
        2
    } else {
        3
    };
    let _ = tx.send(frame(f, c, &[])).await;
}

async fn finish(
    tx: mpsc::Sender<Out>,
    writer: tokio::task::JoinHandle<()>,
    f: Framing,
    code: Result<i32, SessionError>,
    reader: Option<tokio::task::JoinHandle<()>>,
) {
    if let Some(st) = f.status_message(code) {
        let _ = tx.send(frame(f, 3, &st)).await;
    }
    let _ = tx.send(Out::Close).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), writer).await;
    if let Some(r) = reader {
        r.abort();
    }
}

/// Attach: the container's output from now on (from its CRI log) until it stops; input goes
/// to the container's stdin when its spec has `stdin: true` (a duplicate of the write end the
/// shim keeps; closing it does not close the container's stdin), else it is dropped.
async fn attach_session(
    ws: Ws,
    f: Framing,
    t: Target,
    want_stdin: bool,
    want_stdout: bool,
    want_stderr: bool,
) {
    let (sink, mut src) = ws.split();
    let (tx, writer) = spawn_writer(sink);
    opened(&tx, f, want_stdout, want_stderr).await;
    let input = if want_stdin {
        let c = t.client.clone();
        match tokio::task::spawn_blocking(move || c.attach_stdin()).await {
            Ok(Ok(f)) => Some(f),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "attach: no stdin");
                None
            }
            Err(_) => None,
        }
    } else {
        None
    };
    let (in_tx, mut in_rx) = mpsc::channel::<Vec<u8>>(STDIN_QUEUE);
    if let Some(mut w) = input {
        std::thread::spawn(move || {
            while let Some(chunk) = in_rx.blocking_recv() {
                if w.write_all(&chunk).is_err() {
                    break;
                }
            }
        });
    }
    let reader = tokio::spawn(async move {
        let mut in_tx = Some(in_tx);
        while let Some(Ok(m)) = src.next().await {
            if let Message::Close(_) = m {
                break;
            }
            let Some(data) = f.decode(m) else { continue };
            match exec_inbound(&data, f.v5) {
                Inbound::Stdin(b) => {
                    if let Some(t) = &in_tx {
                        let _ = t.send(b.to_vec()).await;
                    }
                }
                Inbound::CloseStdin => in_tx = None,
                _ => {}
            }
        }
    });
    let mut log = LogFollower::at_end(t.log_path.clone());
    let mut last_check = std::time::Instant::now();
    loop {
        if reader.is_finished() {
            writer.abort();
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        for (c, m) in log.poll() {
            if (c == 1 && want_stdout) || (c == 2 && want_stderr) {
                let _ = tx.send(frame(f, c, &m)).await;
            }
        }
        if last_check.elapsed() > Duration::from_millis(500) {
            last_check = std::time::Instant::now();
            if !running(&t.client).await {
                // What it wrote before it exited.
                for (c, m) in log.poll() {
                    if (c == 1 && want_stdout) || (c == 2 && want_stderr) {
                        let _ = tx.send(frame(f, c, &m)).await;
                    }
                }
                break;
            }
        }
    }
    finish(tx, writer, f, Ok(0), Some(reader)).await;
}

/// Whether the container still runs (asks its shim off the async workers).
pub(crate) async fn running(c: &ShimClient) -> bool {
    let c = c.clone();
    tokio::task::spawn_blocking(move || c.state().is_ok_and(|s| s.status == Status::Running))
        .await
        .unwrap_or(false)
}

/// Follows a container's CRI log from its end for attach (see [`crate::sys::logs::AttachFollower`]:
/// raw bytes, across rotations): each poll returns the new pieces as (1 stdout | 2 stderr,
/// bytes, with the newline of lines that end).
pub(crate) struct LogFollower(crate::sys::logs::AttachFollower);

impl LogFollower {
    /// Starts at the current end of `path`.
    pub(crate) fn at_end(path: PathBuf) -> Self {
        LogFollower(crate::sys::logs::AttachFollower::at_end(&path))
    }

    /// New output since the last poll.
    pub(crate) fn poll(&mut self) -> Vec<(u8, Vec<u8>)> {
        self.0.poll()
    }
}

/// Connects to `127.0.0.1:port` from a socket created in the network namespace `netns`
/// (on a short-lived thread, so no other work runs in that namespace).
pub(crate) fn connect_in(netns: &File, port: u16) -> std::io::Result<std::net::TcpStream> {
    let ns = netns.try_clone()?;
    std::thread::spawn(move || {
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(std::io::Error::from)?;
        std::net::TcpStream::connect_timeout(
            &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            Duration::from_secs(5),
        )
    })
    .join()
    .map_err(|_| std::io::Error::other("connect thread panicked"))?
}

/// `/portForward/{ns}/{pod}[/{uid}]?ports=...`.
pub async fn port_forward(
    ctx: StreamCtx,
    mut req: Request<Incoming>,
    ns: String,
    pod: String,
) -> Response<Body> {
    let pairs = query_pairs(req.uri().query().unwrap_or(""));
    let spdy = is_spdy(&req);
    // Over SPDY the ports come with each stream; over WebSocket in the query.
    let ports = match parse_ports(&pairs) {
        Ok(p) => p,
        Err(_) if spdy => Vec::new(),
        Err(e) => return text(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let c2 = ctx.clone();
    let netns = match tokio::task::spawn_blocking(move || pod_netns(&c2, &ns, &pod)).await {
        Ok(Ok(f)) => f,
        Ok(Err((code, msg))) => return text(code, msg),
        Err(e) => return text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    if spdy {
        let (resp, on) = match accept_spdy(&mut req, crate::api::spdy::PORT_FORWARD_PROTOCOL) {
            Ok(x) => x,
            Err((code, msg)) => return text(code, msg),
        };
        tokio::spawn(async move {
            let Ok(up) = on.await else { return };
            crate::api::spdy::forward_session(TokioIo::new(up), netns).await;
        });
        return resp;
    }
    let (resp, _proto, on) = match accept(&mut req, &PORT_FORWARD_PROTOCOLS) {
        Ok(x) => x,
        Err((code, msg)) => return text(code, msg),
    };
    tokio::spawn(async move {
        let Ok(up) = on.await else { return };
        let ws =
            WebSocketStream::from_raw_socket(TokioIo::new(up), Role::Server, Some(ws_config()))
                .await;
        forward_session(ws, netns, ports).await;
    });
    resp
}

async fn forward_session(ws: Ws, netns: File, ports: Vec<u16>) {
    let (sink, mut src) = ws.split();
    let (tx, writer) = spawn_writer(sink);
    let mut conns: Vec<Option<tokio::net::tcp::OwnedWriteHalf>> = Vec::new();
    let mut readers = Vec::new();
    for (i, &port) in ports.iter().enumerate() {
        let Ok(i) = u8::try_from(i) else { break };
        let (data, err) = (i.saturating_mul(2), i.saturating_mul(2).saturating_add(1));
        let _ = tx
            .send(frame(Framing::BINARY, data, &port.to_le_bytes()))
            .await;
        let _ = tx
            .send(frame(Framing::BINARY, err, &port.to_le_bytes()))
            .await;
        let nsf = netns.try_clone();
        let conn = tokio::task::spawn_blocking(move || {
            let s = connect_in(&nsf?, port)?;
            s.set_nonblocking(true)?;
            tokio::net::TcpStream::from_std(s)
        })
        .await
        .map_err(std::io::Error::other)
        .and_then(|r| r);
        match conn {
            Ok(s) => {
                let (mut r, w) = s.into_split();
                conns.push(Some(w));
                let tx = tx.clone();
                readers.push(tokio::spawn(async move {
                    use tokio::io::AsyncReadExt;
                    let mut buf = vec![0u8; 32 * 1024];
                    loop {
                        match r.read(&mut buf).await {
                            Ok(0) => break,
                            Ok(n) => {
                                if tx
                                    .send(frame(Framing::BINARY, data, &buf[..n]))
                                    .await
                                    .is_err()
                                {
                                    break;
                                }
                            }
                            Err(e) => {
                                let msg = format!("error forwarding port {port}: {e}");
                                let _ = tx.send(frame(Framing::BINARY, err, msg.as_bytes())).await;
                                break;
                            }
                        }
                    }
                }));
            }
            Err(e) => {
                conns.push(None);
                let msg = format!("error forwarding port {port} to pod: {e}");
                let _ = tx.send(frame(Framing::BINARY, err, msg.as_bytes())).await;
            }
        }
    }
    // Client → pod: data frames on channel 2i go to connection i.
    let client = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        while let Some(Ok(m)) = src.next().await {
            let d = match m {
                Message::Binary(b) => b,
                Message::Close(_) => break,
                _ => continue,
            };
            let Inbound::Forward { conn, data } = forward_inbound(&d) else {
                continue;
            };
            if let Some(Some(w)) = conns.get_mut(conn) {
                if w.write_all(data).await.is_err() {
                    conns[conn] = None;
                }
            }
        }
    });
    // The session ends when every pod connection has closed, or the client goes away (then
    // the pod connections are dropped).
    let aborts: Vec<_> = readers.iter().map(|r| r.abort_handle()).collect();
    let all = futures::future::join_all(readers);
    tokio::pin!(all);
    let mut client = client;
    tokio::select! {
        _ = &mut all => client.abort(),
        _ = &mut client => aborts.iter().for_each(|a| a.abort()),
    }
    let _ = tx.send(Out::Close).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), writer).await;
}

/// Runs `f` on a thread of its own and awaits its result: an exec or attach session can last
/// for hours and must not hold one of the runtime's bounded blocking-pool threads (pod sync,
/// CNI and shim calls need them).
pub(crate) async fn on_own_thread<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, SessionError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let _ = tx.send(f());
        })
        .map_err(|e| SessionError::Thread(name.into(), e.to_string()))?;
    rx.await
        .map_err(|e| SessionError::Thread(name.into(), e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries() {
        let p = query_pairs("command=sh&command=-c&command=echo+a%20b%3Bexit+3&stdin=1&tty=0");
        let cmd: Vec<_> = p
            .iter()
            .filter(|(k, _)| k == "command")
            .map(|(_, v)| v.as_str())
            .collect();
        assert_eq!(cmd, ["sh", "-c", "echo a b;exit 3"]);
        assert!(flag(&p, "stdin"));
        assert!(!flag(&p, "tty"));
        assert!(!flag(&p, "stdout"));
        assert_eq!(pct_decode("100%"), "100%");
        assert_eq!(pct_decode("%zz%4"), "%zz%4");
    }

    #[test]
    fn ports() {
        let p = query_pairs("ports=80,8080&ports=9000");
        assert_eq!(parse_ports(&p), Ok(vec![80, 8080, 9000]));
        assert!(parse_ports(&query_pairs("ports=0")).is_err());
        assert!(parse_ports(&query_pairs("ports=x")).is_err());
        assert!(parse_ports(&query_pairs("ports=")).is_err());
        assert!(parse_ports(&query_pairs("")).is_err());
    }

    #[test]
    fn port_and_session_errors_keep_their_messages() {
        let e = |q: &str| parse_ports(&query_pairs(q)).map_err(|e| e.to_string());
        assert_eq!(e("ports=0"), Err("port \"0\" must be > 0".into()));
        assert_eq!(
            e("ports="),
            Err("query parameter \"port\" cannot be empty".into())
        );
        assert_eq!(e(""), Err("query parameter \"port\" is required".into()));
        assert!(matches!(
            parse_ports(&query_pairs("port=99999")),
            Err(PortsError::Parse(p, _)) if p == "99999"
        ));
        let s = exit_status(Err(SessionError::Thread("exec-wait".into(), "gone".into())));
        assert_eq!(s["message"], "exec-wait thread: gone");
        assert_eq!(s["code"], 500);
    }

    #[test]
    fn protocols() {
        assert_eq!(
            pick_protocol("v4.channel.k8s.io, v5.channel.k8s.io", &EXEC_PROTOCOLS).as_deref(),
            Some("v4.channel.k8s.io")
        );
        for p in [
            "channel.k8s.io",
            "base64.channel.k8s.io",
            "v4.base64.channel.k8s.io",
        ] {
            assert_eq!(pick_protocol(p, &EXEC_PROTOCOLS).as_deref(), Some(p));
        }
        // The client's order decides, as the kubelet's handshake.
        assert_eq!(
            pick_protocol("base64.channel.k8s.io,channel.k8s.io", &EXEC_PROTOCOLS).as_deref(),
            Some("base64.channel.k8s.io")
        );
        assert_eq!(pick_protocol("", &EXEC_PROTOCOLS).as_deref(), Some(""));
        assert_eq!(pick_protocol("v9.channel.k8s.io", &EXEC_PROTOCOLS), None);
        assert_eq!(
            pick_protocol("", &PORT_FORWARD_PROTOCOLS).as_deref(),
            Some("")
        );
    }

    #[test]
    fn framings() {
        // (protocol, base64, JSON status, v5)
        let cases = [
            ("v5.channel.k8s.io", false, true, true),
            ("v4.channel.k8s.io", false, true, false),
            ("v4.base64.channel.k8s.io", true, true, false),
            ("channel.k8s.io", false, false, false),
            ("", false, false, false),
            ("base64.channel.k8s.io", true, false, false),
        ];
        for (p, b64, json, v5) in cases {
            let f = Framing::of(p).expect(p);
            assert_eq!((f.base64, f.status_json, f.v5), (b64, json, v5), "{p}");
        }
        assert_eq!(Framing::of("v9.channel.k8s.io"), None);
        // Every served protocol has a framing.
        assert!(EXEC_PROTOCOLS.iter().all(|p| Framing::of(p).is_some()));

        let bin = Framing::of("channel.k8s.io").unwrap();
        let b64 = Framing::of("base64.channel.k8s.io").unwrap();
        // The upstream wsstream examples: "foo\n" on stdin, "\n" on stdout.
        assert_eq!(bin.encode(1, b"\n"), Message::Binary(vec![1, 10]));
        assert_eq!(b64.encode(1, b"\n"), Message::Text("1Cg==".into()));
        assert_eq!(b64.encode(3, b""), Message::Text("3".into()));
        assert_eq!(
            b64.decode(Message::Text("0Zm9vCg==".into())),
            Some(b"\0foo\n".to_vec())
        );
        assert_eq!(
            bin.decode(Message::Binary(vec![0, 102, 111, 111, 10])),
            Some(b"\0foo\n".to_vec())
        );
        for bad in [
            Message::Text("0not base64!".into()),
            Message::Text(String::new()),
            Message::Ping(vec![]),
        ] {
            assert_eq!(b64.decode(bad.clone()), None, "{bad:?}");
        }
        assert_eq!(bin.decode(Message::Text("0Zm9v".into())), None);

        // Status: v1 is silent on success and writes the message on failure; v4 writes JSON.
        assert_eq!(bin.status_message(Ok(0)), None);
        let m = bin.status_message(Ok(3)).expect("failure text");
        assert_eq!(
            String::from_utf8_lossy(&m),
            exit_status(Ok(3))["message"].as_str().unwrap()
        );
        let v4 = Framing::of("v4.base64.channel.k8s.io").unwrap();
        let j: serde_json::Value =
            serde_json::from_slice(&v4.status_message(Ok(0)).expect("json")).unwrap();
        assert_eq!(j["status"], "Success");
    }

    #[test]
    fn statuses() {
        assert_eq!(exit_status(Ok(0))["status"], "Success");
        let s = exit_status(Ok(3));
        assert_eq!(s["reason"], "NonZeroExitCode");
        assert_eq!(s["details"]["causes"][0]["reason"], "ExitCode");
        assert_eq!(s["details"]["causes"][0]["message"], "3");
        assert_eq!(exit_status(Err("x".into()))["reason"], "InternalError");
        assert_eq!(
            parse_resize(br#"{"Width":100,"Height":40}"#),
            Some((100, 40))
        );
        assert_eq!(parse_resize(b"{}"), None);
    }
}

//! Fuzz targets for the agent's parsers of peer input: SPDY/3 frames and header blocks
//! (kubelet API exec/attach/port-forward), the WebSocket streams' query, port and resize
//! parsing, client-certificate subjects (DER), resource quantities and manifest documents.
//!
//! Each `fuzz_*` target is `#[ignore]`d and runs for `HAKO_FUZZ_SECONDS` (scripts/fuzz runs
//! them all); each `quick_*` test runs a few deterministic inputs of the same target in the
//! unit lane. See `tests/fuzz/harness.rs` for limits and replay.

#[path = "../../tests/fuzz/harness.rs"]
mod harness;
#[path = "../../tests/fuzz/json.rs"]
mod json;

use std::collections::HashMap;

use hako_agent::api::kubelet_api::subject_identity;
use hako_agent::api::spdy::{
    data_frame, encode_headers, parse_headers, read_frame, Frame, HeaderDeflater, HeaderInflater,
};
use hako_agent::api::stream::{
    exec_inbound, forward_inbound, parse_ports, parse_resize, pct_decode, pick_protocol,
    query_pairs, Inbound,
};
use hako_agent::model::quantity::{self, Nano};
use hako_agent::source::manifest::{self, StaticPodOptions};
use harness::{apply, edits, fuzz, quick, raw, text, Edit};
use proptest::prelude::*;
use serde_json::{json, Value};

const QUICK: u32 = 48;

// ---- SPDY header blocks ----------------------------------------------------------------

type Headers = Vec<(String, String)>;

fn header_name() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => proptest::sample::select(vec![
            "streamType", "port", "requestID", "Content-Type", "X-Stream-Protocol-Version",
            ":method", "",
        ])
        .prop_map(str::to_string),
        2 => text(),
    ]
}

fn headers() -> impl Strategy<Value = Headers> {
    proptest::collection::vec((header_name(), text()), 0..6)
}

/// What `parse_headers` gives for a block of `h`: names lowercased, the last value wins.
fn header_map(h: &Headers) -> HashMap<String, String> {
    h.iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
        .collect()
}

fn block(h: &Headers) -> Vec<u8> {
    let pairs: Vec<(&str, &str)> = h.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    encode_headers(&pairs)
}

fn hex(h: &str) -> Vec<u8> {
    (0..h.len())
        .step_by(2)
        .filter_map(|i| u8::from_str_radix(h.get(i..i + 2)?, 16).ok())
        .collect()
}

/// A client's stream (zlib with the SPDY/3 dictionary, two sync-flushed blocks, made with
/// Python's zlib) and what its blocks hold.
fn dictionary_stream() -> Vec<Vec<u8>> {
    vec![
        hex("78bbe3c6a7c202e50e703a2b294a4dcc851625aca9a0808614cb45e01c6061606100000000ffff"),
        hex("c2aa1454ea803205671124823341099fd100000000ffff"),
    ]
}

#[derive(Debug, Clone)]
enum BlockInput {
    /// Our deflater's blocks, one of them edited.
    Ours(Vec<Headers>, usize, Vec<Edit>),
    /// The dictionary stream of a client, edited.
    Client(usize, Vec<Edit>),
    /// Raw bytes as a compressed block and as a name/value block.
    Raw(Vec<u8>),
    /// A name/value block, edited (counts and lengths made huge, truncations).
    Plain(Headers, Vec<Edit>),
}

fn block_input() -> impl Strategy<Value = BlockInput> {
    prop_oneof![
        4 => (proptest::collection::vec(headers(), 1..4), any::<usize>(), edits(6))
            .prop_map(|(h, i, e)| BlockInput::Ours(h, i, e)),
        2 => (0usize..2, edits(6)).prop_map(|(i, e)| BlockInput::Client(i, e)),
        1 => raw(256).prop_map(BlockInput::Raw),
        2 => (headers(), edits(6)).prop_map(|(h, e)| BlockInput::Plain(h, e)),
    ]
}

fn check_block(input: &BlockInput) -> Result<(), String> {
    match input {
        BlockInput::Ours(blocks, which, ed) => {
            let mut def = HeaderDeflater::default();
            let mut inf = HeaderInflater::default();
            let which = which % blocks.len();
            for (i, h) in blocks.iter().enumerate() {
                let plain = block(h);
                let z = def.deflate(&plain);
                if i == which && !ed.is_empty() {
                    if let Ok(p) = inf.inflate(&apply(z, ed)) {
                        let _ = parse_headers(&p);
                    }
                    // The stream is out of step now: nothing more to compare.
                    return Ok(());
                }
                let got = inf.inflate(&z).map_err(|e| format!("block {i}: {e}"))?;
                if got != plain {
                    return Err(format!("block {i}: inflate(deflate(x)) != x"));
                }
                if parse_headers(&got) != Some(header_map(h)) {
                    return Err(format!("block {i}: parse_headers(encode_headers(h)) != h"));
                }
            }
            Ok(())
        }
        BlockInput::Client(which, ed) => {
            let mut inf = HeaderInflater::default();
            for (i, z) in dictionary_stream().into_iter().enumerate() {
                let z = if i == *which { apply(z, ed) } else { z };
                match inf.inflate(&z) {
                    Ok(p) => {
                        let h = parse_headers(&p);
                        if ed.is_empty() && h.is_none() {
                            return Err(format!("client block {i} does not parse"));
                        }
                    }
                    Err(e) if ed.is_empty() => return Err(format!("client block {i}: {e}")),
                    Err(_) => return Ok(()),
                }
            }
            Ok(())
        }
        BlockInput::Raw(b) => {
            let _ = HeaderInflater::default().inflate(b);
            let _ = parse_headers(b);
            Ok(())
        }
        BlockInput::Plain(h, ed) => {
            let b = apply(block(h), ed);
            let got = parse_headers(&b);
            if ed.is_empty() && got != Some(header_map(h)) {
                return Err("parse_headers(encode_headers(h)) != h".into());
            }
            Ok(())
        }
    }
}

#[test]
#[ignore = "fuzz target: scripts/fuzz"]
fn fuzz_spdy_header_blocks() {
    fuzz("fuzz_spdy_header_blocks", block_input(), check_block);
}

#[test]
fn quick_spdy_header_blocks() {
    quick(QUICK, block_input(), check_block);
}

// ---- SPDY frames -----------------------------------------------------------------------

/// A frame a client may send.
#[derive(Debug, Clone)]
enum Spec {
    Data(u32, bool, Vec<u8>),
    Syn(u32, bool, Headers),
    /// SYN_REPLY (2) or HEADERS (8): a header block the reader inflates and drops.
    Reply(u16, u32, Headers),
    Rst(u32, u32),
    Ping(u32),
    GoAway(u32),
    /// WINDOW_UPDATE: stream id and delta (the reader drops the reserved top bit).
    WindowUpdate(u32, u32),
    /// SETTINGS entries (id, value); the reader keeps the last initial window (id 7).
    Settings(Vec<(u32, u32)>),
    /// NOOP or an unknown type.
    Other(u16, Vec<u8>),
}

fn spec() -> impl Strategy<Value = Spec> {
    let id = prop_oneof![
        1u32..16,
        Just(0x7fff_ffff),
        any::<u32>().prop_map(|i| i & 0x7fff_ffff)
    ];
    prop_oneof![
        4 => (id.clone(), any::<bool>(), raw(64)).prop_map(|(i, f, d)| Spec::Data(i, f, d)),
        3 => (id.clone(), any::<bool>(), headers()).prop_map(|(i, f, h)| Spec::Syn(i, f, h)),
        1 => (prop_oneof![Just(2u16), Just(8)], id.clone(), headers())
            .prop_map(|(k, i, h)| Spec::Reply(k, i, h)),
        1 => (id.clone(), any::<u32>()).prop_map(|(i, s)| Spec::Rst(i, s)),
        1 => any::<u32>().prop_map(Spec::Ping),
        1 => id.clone().prop_map(Spec::GoAway),
        1 => (id, any::<u32>()).prop_map(|(i, d)| Spec::WindowUpdate(i, d)),
        1 => proptest::collection::vec(
            (prop_oneof![Just(7u32), 0u32..0x00ff_ffff], any::<u32>()),
            0..4
        )
        .prop_map(Spec::Settings),
        1 => (
            prop_oneof![Just(5u16), 10u16..],
            raw(16)
        )
            .prop_map(|(k, b)| Spec::Other(k, b)),
    ]
}

fn control(kind: u16, flags: u8, body: &[u8]) -> Vec<u8> {
    let len = u32::try_from(body.len()).unwrap_or(0).to_be_bytes();
    let k = kind.to_be_bytes();
    let mut f = vec![0x80, 3, k[0], k[1], flags, len[1], len[2], len[3]];
    f.extend_from_slice(body);
    f
}

/// The wire bytes of the frames (one header stream across them) and what the reader yields.
fn encode_frames(specs: &[Spec]) -> (Vec<u8>, Vec<Frame>) {
    let mut def = HeaderDeflater::default();
    let mut wire = Vec::new();
    let mut want = Vec::new();
    for s in specs {
        match s {
            Spec::Data(id, fin, d) => {
                wire.extend(data_frame(*id, *fin, d));
                want.push(Frame::Data {
                    id: *id,
                    fin: *fin,
                    data: bytes::Bytes::from(d.clone()),
                });
            }
            Spec::Syn(id, fin, h) => {
                let mut body = id.to_be_bytes().to_vec();
                body.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
                body.extend(def.deflate(&block(h)));
                wire.extend(control(1, u8::from(*fin), &body));
                want.push(Frame::Syn {
                    id: *id,
                    fin: *fin,
                    headers: header_map(h),
                });
            }
            Spec::Reply(kind, id, h) => {
                let mut body = id.to_be_bytes().to_vec();
                body.extend(def.deflate(&block(h)));
                wire.extend(control(*kind, 0, &body));
                want.push(Frame::Other);
            }
            Spec::Rst(id, status) => {
                let mut body = id.to_be_bytes().to_vec();
                body.extend_from_slice(&status.to_be_bytes());
                wire.extend(control(3, 0, &body));
                want.push(Frame::Rst(*id));
            }
            Spec::Ping(n) => {
                let f = control(6, 0, &n.to_be_bytes());
                want.push(Frame::Ping(f.clone()));
                wire.extend(f);
            }
            Spec::GoAway(last) => {
                let mut body = last.to_be_bytes().to_vec();
                body.extend_from_slice(&[0, 0, 0, 0]);
                wire.extend(control(7, 0, &body));
                want.push(Frame::GoAway);
            }
            Spec::WindowUpdate(id, delta) => {
                let mut body = id.to_be_bytes().to_vec();
                body.extend_from_slice(&delta.to_be_bytes());
                wire.extend(control(9, 0, &body));
                want.push(Frame::WindowUpdate {
                    id: *id,
                    delta: delta & 0x7fff_ffff,
                });
            }
            Spec::Settings(entries) => {
                let n = u32::try_from(entries.len()).unwrap_or(0);
                let mut body = n.to_be_bytes().to_vec();
                for (eid, value) in entries {
                    body.extend_from_slice(&eid.to_be_bytes());
                    body.extend_from_slice(&value.to_be_bytes());
                }
                wire.extend(control(4, 0, &body));
                want.push(Frame::Settings {
                    initial_window: entries
                        .iter()
                        .filter(|(eid, _)| eid & 0x00ff_ffff == 7)
                        .map(|(_, v)| *v)
                        .next_back(),
                });
            }
            Spec::Other(kind, b) => {
                wire.extend(control(*kind, 0, b));
                want.push(Frame::Other);
            }
        }
    }
    (wire, want)
}

fn frames_input() -> impl Strategy<Value = (Vec<Spec>, Vec<Edit>)> {
    (proptest::collection::vec(spec(), 0..8), edits(8))
}

fn read_all(wire: &[u8]) -> (Vec<Frame>, Option<String>) {
    let mut r: &[u8] = wire;
    let mut inf = HeaderInflater::default();
    let mut got = Vec::new();
    // Every frame takes at least its 8-byte header: this ends.
    loop {
        match futures::executor::block_on(read_frame(&mut r, &mut inf)) {
            Ok(Some(f)) => got.push(f),
            Ok(None) => return (got, None),
            Err(e) => return (got, Some(e.to_string())),
        }
    }
}

fn check_frames((specs, ed): &(Vec<Spec>, Vec<Edit>)) -> Result<(), String> {
    let (wire, want) = encode_frames(specs);
    let wire = apply(wire, ed);
    let (got, err) = read_all(&wire);
    if ed.is_empty() {
        if let Some(e) = err {
            return Err(format!("valid frames: {e}"));
        }
        if got != want {
            return Err(format!("read {got:?}, sent {want:?}"));
        }
    }
    Ok(())
}

#[test]
#[ignore = "fuzz target: scripts/fuzz"]
fn fuzz_spdy_frames() {
    fuzz("fuzz_spdy_frames", frames_input(), check_frames);
}

#[test]
fn quick_spdy_frames() {
    quick(QUICK, frames_input(), check_frames);
}

/// A SYN_STREAM whose 160 KiB header block inflates to 160 MiB: without a cap on the
/// inflater's output (a 16 MiB frame, which read_frame once accepted, would inflate to about
/// 16 GiB) the read allocates without bound; with it the read fails early.
/// Found while writing these targets (random inputs do not reach such ratios).
#[test]
fn spdy_header_block_inflation_is_bounded() {
    let zeros = vec![0u8; 1 << 20];
    let mut def = HeaderDeflater::default();
    let z: Vec<u8> = (0..160).flat_map(|_| def.deflate(&zeros)).collect();
    let mut body = 1u32.to_be_bytes().to_vec();
    body.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    body.extend(z);
    let wire = control(1, 0, &body);
    harness::once("spdy_header_block_inflation", wire, |w| {
        let _ = read_all(w);
        Ok(())
    });
}

// ---- WebSocket streams: query, ports, protocols, resize, channel frames ----------------

#[derive(Debug, Clone)]
enum WsInput {
    /// A query string of pieces (ports, escapes, separators), decoded and checked for ports.
    Query(Vec<String>),
    /// Any string percent-encoded must decode to itself.
    Encoded(String),
    /// Ports written as a port-forward query must parse back.
    Ports(Vec<Vec<u16>>, bool),
    /// A Sec-WebSocket-Protocol offer.
    Protocols(String),
    /// A resize message (channel 4), maybe edited.
    Resize(u16, u16, Vec<Edit>),
    /// Any JSON as a resize message.
    ResizeJson(Value),
    /// A binary message as a client sends it: channel byte, payload, maybe edited.
    Channel(u8, Vec<u8>, bool, Vec<Edit>),
}

fn query_piece() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => proptest::sample::select(vec![
            "port=", "ports=", "&", ",", "=", "%", "%2C", "%2c", "%3D", "%26", "%zz", "%4", "+",
            "command=", "stdin=1", "tty=true", "container=", "0", "65535", "65536", "-1", " 80",
            "99999999999999999999",
        ])
        .prop_map(str::to_string),
        2 => (0u32..70000).prop_map(|n| n.to_string()),
        1 => text(),
    ]
}

fn ws_input() -> impl Strategy<Value = WsInput> {
    prop_oneof![
        3 => proptest::collection::vec(query_piece(), 0..16).prop_map(WsInput::Query),
        1 => text().prop_map(WsInput::Encoded),
        1 => (
            proptest::collection::vec(proptest::collection::vec(1u16.., 1..4), 1..4),
            any::<bool>()
        )
            .prop_map(|(p, s)| WsInput::Ports(p, s)),
        1 => proptest::collection::vec(
            prop_oneof![
                Just("v5.channel.k8s.io".to_string()),
                Just("v4.channel.k8s.io".to_string()),
                Just(",".to_string()),
                Just(" ".to_string()),
                text()
            ],
            0..6
        )
        .prop_map(|v| WsInput::Protocols(v.concat())),
        2 => (any::<u16>(), any::<u16>(), edits(4)).prop_map(|(w, h, e)| WsInput::Resize(w, h, e)),
        1 => json::shaped(vec![("Width", json!(80)), ("Height", json!(24))])
            .prop_map(WsInput::ResizeJson),
        2 => (
            prop_oneof![Just(0u8), Just(1), Just(2), Just(4), Just(255), any::<u8>()],
            raw(64),
            any::<bool>(),
            edits(2)
        )
            .prop_map(|(c, d, v5, e)| WsInput::Channel(c, d, v5, e)),
    ]
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn check_ws(input: &WsInput) -> Result<(), String> {
    match input {
        WsInput::Query(pieces) => {
            let q = pieces.concat();
            let pairs = query_pairs(&q);
            if let Ok(ports) = parse_ports(&pairs) {
                if ports.is_empty() || ports.contains(&0) {
                    return Err(format!("parse_ports accepted {ports:?}"));
                }
            }
        }
        WsInput::Encoded(s) => {
            let got = pct_decode(&percent_encode(s));
            if &got != s {
                return Err(format!("pct_decode(encode({s:?})) = {got:?}"));
            }
            let _ = pct_decode(s);
        }
        WsInput::Ports(groups, plural) => {
            let key = if *plural { "ports" } else { "port" };
            let q = groups
                .iter()
                .map(|g| {
                    let list: Vec<String> = g.iter().map(u16::to_string).collect();
                    format!("{key}={}", percent_encode(&list.join(",")))
                })
                .collect::<Vec<_>>()
                .join("&");
            let want: Vec<u16> = groups.concat();
            let got = parse_ports(&query_pairs(&q));
            if got.as_ref() != Ok(&want) {
                return Err(format!("parse_ports({q:?}) = {got:?}, want {want:?}"));
            }
        }
        WsInput::Protocols(offer) => {
            let served = ["v5.channel.k8s.io", "v4.channel.k8s.io"];
            if let Some(p) = pick_protocol(offer, &served) {
                if !served.contains(&p.as_str()) {
                    return Err(format!("picked {p:?}, which is not served"));
                }
            }
            let _ = pick_protocol(offer, &["v4.channel.k8s.io", ""]);
        }
        WsInput::Resize(w, h, ed) => {
            let msg = format!("{{\"Width\":{w},\"Height\":{h}}}").into_bytes();
            let got = parse_resize(&apply(msg, ed));
            if ed.is_empty() && got != Some((*w, *h)) {
                return Err(format!("resize {w}x{h} read as {got:?}"));
            }
        }
        WsInput::ResizeJson(v) => {
            let _ = parse_resize(v.to_string().as_bytes());
        }
        WsInput::Channel(c, payload, v5, ed) => {
            let mut msg = vec![*c];
            msg.extend_from_slice(payload);
            let msg = apply(msg, ed);
            let exec = exec_inbound(&msg, *v5);
            let fwd = forward_inbound(&msg);
            if ed.is_empty() {
                let want_exec = match (c, payload.first()) {
                    (0, _) => Inbound::Stdin(payload),
                    (4, _) => Inbound::Resize(parse_resize(payload)),
                    (255, Some(0)) if *v5 => Inbound::CloseStdin,
                    _ => Inbound::Ignored,
                };
                if exec != want_exec {
                    return Err(format!("exec message {msg:?} read as {exec:?}"));
                }
                let want_fwd = if c % 2 == 0 && !payload.is_empty() {
                    Inbound::Forward {
                        conn: usize::from(c / 2),
                        data: payload,
                    }
                } else {
                    Inbound::Ignored
                };
                if fwd != want_fwd {
                    return Err(format!("port-forward message {msg:?} read as {fwd:?}"));
                }
            }
            if let Inbound::Forward { conn, .. } = fwd {
                if conn > 127 {
                    return Err(format!("connection index {conn} from one byte"));
                }
            }
        }
    }
    Ok(())
}

#[test]
#[ignore = "fuzz target: scripts/fuzz"]
fn fuzz_websocket_streams() {
    fuzz("fuzz_websocket_streams", ws_input(), check_ws);
}

#[test]
fn quick_websocket_streams() {
    quick(QUICK, ws_input(), check_ws);
}

// ---- DER certificate subjects ----------------------------------------------------------

#[derive(Debug, Clone)]
enum Attr {
    Cn(String),
    O(String),
    /// Another attribute type (country, OU...): ignored by the reader.
    Other(Vec<u8>, String),
}

#[derive(Debug, Clone)]
struct CertSpec {
    version: bool,
    subject: Vec<Vec<Attr>>,
    issuer: Vec<Vec<Attr>>,
    /// Long-form lengths everywhere (still valid BER for this reader).
    long: bool,
}

fn attr() -> impl Strategy<Value = Attr> {
    prop_oneof![
        2 => text().prop_map(Attr::Cn),
        2 => text().prop_map(Attr::O),
        1 => (
            prop_oneof![
                Just(vec![0x55, 4, 6]),
                Just(vec![0x55, 4, 11]),
                Just(vec![0x55, 4]),
                raw(6)
            ],
            text()
        )
            .prop_map(|(o, v)| Attr::Other(o, v)),
    ]
}

fn name() -> impl Strategy<Value = Vec<Vec<Attr>>> {
    proptest::collection::vec(proptest::collection::vec(attr(), 1..3), 0..4)
}

fn tlv(tag: u8, content: &[u8], long: bool) -> Vec<u8> {
    let n = content.len();
    let mut out = vec![tag];
    if n < 0x80 && !long {
        out.push(u8::try_from(n).unwrap_or(0));
    } else {
        let be = u32::try_from(n).unwrap_or(u32::MAX).to_be_bytes();
        let skip = if long {
            0
        } else {
            be.iter().take_while(|b| **b == 0).count()
        };
        out.push(0x80 | u8::try_from(4 - skip).unwrap_or(4));
        out.extend_from_slice(&be[skip..]);
    }
    out.extend_from_slice(content);
    out
}

fn der_name(rdns: &[Vec<Attr>], long: bool) -> Vec<u8> {
    let mut seq = Vec::new();
    for rdn in rdns {
        let mut set = Vec::new();
        for a in rdn {
            let (oid, val): (&[u8], &str) = match a {
                Attr::Cn(v) => (&[0x55, 4, 3], v),
                Attr::O(v) => (&[0x55, 4, 10], v),
                Attr::Other(o, v) => (o, v),
            };
            let mut atv = tlv(0x06, oid, long);
            atv.extend(tlv(0x0c, val.as_bytes(), long));
            set.extend(tlv(0x30, &atv, long));
        }
        seq.extend(tlv(0x31, &set, long));
    }
    tlv(0x30, &seq, long)
}

fn der_cert(c: &CertSpec) -> Vec<u8> {
    let l = c.long;
    let alg = tlv(
        0x30,
        &tlv(0x06, &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 1, 1, 11], l),
        l,
    );
    let mut tbs = Vec::new();
    if c.version {
        tbs.extend(tlv(0xa0, &tlv(0x02, &[2], l), l));
    }
    tbs.extend(tlv(0x02, &[0x01, 0x23], l));
    tbs.extend(alg.clone());
    tbs.extend(der_name(&c.issuer, l));
    let mut validity = tlv(0x17, b"260101000000Z", l);
    validity.extend(tlv(0x17, b"270101000000Z", l));
    tbs.extend(tlv(0x30, &validity, l));
    tbs.extend(der_name(&c.subject, l));
    tbs.extend(tlv(0x30, &tlv(0x03, &[0, 1, 2, 3], l), l));
    let mut cert = tlv(0x30, &tbs, l);
    cert.extend(alg);
    cert.extend(tlv(0x03, &[0, 0xde, 0xad], l));
    tlv(0x30, &cert, l)
}

fn identity(c: &CertSpec) -> Option<(String, Vec<String>)> {
    let mut cn = None;
    let mut orgs = Vec::new();
    for a in c.subject.iter().flatten() {
        match a {
            Attr::Cn(v) => cn = Some(v.clone()),
            Attr::O(v) => orgs.push(v.clone()),
            Attr::Other(oid, v) if oid.as_slice() == [0x55, 4, 3] => cn = Some(v.clone()),
            Attr::Other(oid, v) if oid.as_slice() == [0x55, 4, 10] => orgs.push(v.clone()),
            Attr::Other(..) => {}
        }
    }
    Some((cn?, orgs))
}

/// A real client certificate (rcgen), as the apiserver presents one.
fn real_cert() -> Vec<u8> {
    let mut params = rcgen::CertificateParams::new(vec!["x".into()]).expect("params");
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "system:masters");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "kube-apiserver-kubelet-client");
    let key = rcgen::KeyPair::generate().expect("key");
    params.self_signed(&key).expect("cert").der().to_vec()
}

#[derive(Debug, Clone)]
enum DerInput {
    Spec(CertSpec, Vec<Edit>),
    Real(Vec<u8>, Vec<Edit>),
    Raw(Vec<u8>),
}

fn der_input() -> impl Strategy<Value = DerInput> {
    let spec = (any::<bool>(), name(), name(), any::<bool>()).prop_map(|(v, s, i, l)| CertSpec {
        version: v,
        subject: s,
        issuer: i,
        long: l,
    });
    prop_oneof![
        4 => (spec, edits(6)).prop_map(|(s, e)| DerInput::Spec(s, e)),
        2 => (Just(real_cert()), edits(6)).prop_map(|(c, e)| DerInput::Real(c, e)),
        1 => raw(128).prop_map(DerInput::Raw),
    ]
}

fn check_der(input: &DerInput) -> Result<(), String> {
    match input {
        DerInput::Spec(c, ed) => {
            let got = subject_identity(&apply(der_cert(c), ed));
            if ed.is_empty() {
                // The reader decodes values lossily; the generated ones are UTF-8.
                let want = identity(c);
                if got != want {
                    return Err(format!("subject read as {got:?}, want {want:?}"));
                }
            }
        }
        DerInput::Real(c, ed) => {
            let got = subject_identity(&apply(c.clone(), ed));
            if ed.is_empty()
                && got
                    != Some((
                        "kube-apiserver-kubelet-client".into(),
                        vec!["system:masters".into()],
                    ))
            {
                return Err(format!("rcgen certificate read as {got:?}"));
            }
        }
        DerInput::Raw(b) => {
            let _ = subject_identity(b);
        }
    }
    Ok(())
}

#[test]
#[ignore = "fuzz target: scripts/fuzz"]
fn fuzz_der_subject() {
    fuzz("fuzz_der_subject", der_input(), check_der);
}

#[test]
fn quick_der_subject() {
    quick(QUICK, der_input(), check_der);
}

// ---- quantities ------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum QInput {
    /// Sign, digits, fraction, suffix, spaces: mostly well formed.
    Shaped(String),
    /// Any text.
    Text(String),
    /// `<n>n` must read as n nano units exactly.
    Nanos(i128),
    /// `<k><binary suffix>` must read exactly.
    Binary(i64, usize),
}

const SUFFIXES: [&str; 26] = [
    "",
    "n",
    "u",
    "m",
    "k",
    "M",
    "G",
    "T",
    "P",
    "E",
    "Ki",
    "Mi",
    "Gi",
    "Ti",
    "Pi",
    "Ei",
    "e3",
    "E-3",
    "e+30",
    "e-30",
    "e31",
    "e99999999999",
    "e",
    "i",
    "K",
    "mi",
];

fn shaped_quantity() -> impl Strategy<Value = String> {
    let digits = prop_oneof![
        Just(String::new()),
        "[0-9]{1,3}",
        "[0-9]{25,34}",
        "0{20,40}[1-9]",
    ];
    (
        prop_oneof![Just(""), Just("-"), Just("+"), Just("--"), Just(" ")],
        digits.clone(),
        prop_oneof![Just(None), digits.prop_map(Some)],
        proptest::sample::select(SUFFIXES.to_vec()),
        prop_oneof![Just(""), Just(" "), Just("\t"), Just("é")],
    )
        .prop_map(|(s, i, f, x, w)| match f {
            Some(f) => format!("{s}{i}.{f}{x}{w}"),
            None => format!("{s}{i}{x}{w}"),
        })
}

fn q_input() -> impl Strategy<Value = QInput> {
    let nanos = (-(10i128.pow(29)) + 1)..10i128.pow(29);
    prop_oneof![
        4 => shaped_quantity().prop_map(QInput::Shaped),
        1 => text().prop_map(QInput::Text),
        2 => nanos.prop_map(QInput::Nanos),
        2 => (-(1i64 << 40)..(1i64 << 40), 0usize..6).prop_map(|(k, s)| QInput::Binary(k, s)),
    ]
}

fn check_quantity(input: &QInput) -> Result<(), String> {
    match input {
        QInput::Shaped(s) | QInput::Text(s) => {
            if let Ok(n) = quantity::parse(s) {
                let _ = (n.value(), n.milli_value(), n.is_zero());
            }
        }
        QInput::Nanos(n) => {
            let got = quantity::parse(&format!("{n}n"));
            if got != Ok(Nano(*n)) {
                return Err(format!("{n}n read as {got:?}"));
            }
        }
        QInput::Binary(k, s) => {
            let suffix = ["Ki", "Mi", "Gi", "Ti", "Pi", "Ei"][*s];
            let want = i128::from(*k)
                .checked_mul(1i128 << (10 * (s + 1)))
                .and_then(|v| v.checked_mul(1_000_000_000));
            let got = quantity::parse(&format!("{k}{suffix}"));
            match want {
                Some(w) if got != Ok(Nano(w)) => {
                    return Err(format!("{k}{suffix} read as {got:?}, want {w}"))
                }
                _ => {}
            }
        }
    }
    Ok(())
}

#[test]
#[ignore = "fuzz target: scripts/fuzz"]
fn fuzz_quantity() {
    fuzz("fuzz_quantity", q_input(), check_quantity);
}

#[test]
fn quick_quantity() {
    quick(QUICK, q_input(), check_quantity);
}

// ---- manifests -------------------------------------------------------------------------

fn container() -> impl Strategy<Value = Value> {
    let resources = json::shaped(vec![
        ("limits", json!({"cpu": "500m", "memory": "128Mi"})),
        ("requests", json!({"cpu": "250m", "memory": "64Mi"})),
    ]);
    let quantities = (
        proptest::sample::select(vec!["cpu", "memory", "ephemeral-storage"]),
        shaped_quantity(),
    )
        .prop_map(|(k, q)| json!({"limits": {k: q}, "requests": {k: q}}));
    let probe = json::shaped(vec![
        ("httpGet", json!({"path": "/", "port": 80})),
        ("periodSeconds", json!(10)),
        ("successThreshold", json!(1)),
        ("initialDelaySeconds", json!(0)),
    ]);
    let lifecycle = json::shaped(vec![
        ("postStart", json!({"sleep": {"seconds": 1}})),
        (
            "preStop",
            json!({"sleep": {"seconds": 5}, "exec": {"command": ["true"]}}),
        ),
    ]);
    (
        prop_oneof![Just("app".to_string()), "[a-z][a-z0-9-]{0,8}", text()],
        prop_oneof![resources, quantities],
        probe,
        lifecycle,
    )
        .prop_flat_map(|(name, res, probe, lc)| {
            json::shaped(vec![
                ("name", json!(name)),
                ("image", json!("busybox:1.36")),
                ("command", json!(["sleep", "3600"])),
                ("resources", res),
                ("livenessProbe", probe),
                ("lifecycle", lc),
                ("restartPolicy", json!("Always")),
                ("env", json!([{"name": "A", "value": "1"}])),
            ])
        })
}

fn pod() -> impl Strategy<Value = Value> {
    let mode = prop_oneof![
        Just(json!("0644")),
        Just(json!("0999")),
        Just(json!("+0755")),
        Just(json!(420)),
        Just(json!("00000000000000000000000000777")),
        json::json(),
    ];
    (
        proptest::collection::vec(container(), 0..3),
        mode,
        prop_oneof![Just("web".to_string()), "[a-z0-9.-]{1,12}", text()],
    )
        .prop_flat_map(|(containers, mode, name)| {
            let spec = json::shaped(vec![
                ("containers", Value::Array(containers)),
                ("terminationGracePeriodSeconds", json!(30)),
                ("restartPolicy", json!("Always")),
                ("dnsPolicy", json!("None")),
                (
                    "volumes",
                    json!([{"name": "c", "configMap": {"name": "c", "defaultMode": mode,
                        "items": [{"key": "k", "path": "p", "mode": mode}]}}]),
                ),
            ]);
            let meta = json::shaped(vec![
                ("name", json!(name)),
                ("namespace", json!("default")),
                ("annotations", json!({"hako.dev/lifecycle-sleep": "{}"})),
            ]);
            (meta, spec).prop_flat_map(|(meta, spec)| {
                json::shaped(vec![
                    ("apiVersion", json!("v1")),
                    ("kind", json!("Pod")),
                    ("metadata", meta),
                    ("spec", spec),
                ])
            })
        })
}

fn other_object() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"},
            "data": {"k": "v"}})
        ),
        Just(
            json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"},
            "data": {"k": "dg=="}})
        ),
        Just(
            json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "svc"},
            "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]}})
        ),
        json::json(),
    ]
}

/// YAML-level edits: document markers, anchors and aliases, tags, odd indentation.
fn yaml_piece() -> impl Strategy<Value = String> {
    proptest::sample::select(vec![
        "---\n",
        "...\n",
        "--- |\n",
        "&a ",
        "*a",
        "<<: *a\n",
        "!!binary ",
        "!!str ",
        "? ",
        ": ",
        "- ",
        "{",
        "}",
        "[",
        "]",
        "\t",
        "  ",
        "#",
        "\"",
        "'",
        "\\u0000",
        "0644",
        "~",
        "0x1F",
        ".inf",
        "1e400",
        "\n",
    ])
    .prop_map(str::to_string)
}

#[derive(Debug, Clone)]
struct ManifestInput {
    docs: Vec<Value>,
    as_list: bool,
    json_text: bool,
    yaml_edits: Vec<(usize, String)>,
    byte_edits: Vec<Edit>,
}

fn manifest_input() -> impl Strategy<Value = ManifestInput> {
    (
        proptest::collection::vec(prop_oneof![3 => pod(), 1 => other_object()], 1..4),
        any::<bool>(),
        any::<bool>(),
        prop_oneof![
            2 => Just(Vec::new()),
            1 => proptest::collection::vec((any::<usize>(), yaml_piece()), 1..4)
        ],
        edits(4),
    )
        .prop_map(
            |(docs, as_list, json_text, yaml_edits, byte_edits)| ManifestInput {
                docs,
                as_list,
                json_text,
                yaml_edits,
                byte_edits,
            },
        )
}

fn manifest_text(m: &ManifestInput) -> String {
    let docs: Vec<Value> = if m.as_list {
        vec![json!({"apiVersion": "v1", "kind": "List", "items": m.docs})]
    } else {
        m.docs.clone()
    };
    let mut text = docs
        .iter()
        .map(|d| {
            if m.json_text {
                d.to_string()
            } else {
                serde_yaml::to_string(d).unwrap_or_default()
            }
        })
        .collect::<Vec<_>>()
        .join("\n---\n");
    for (at, piece) in &m.yaml_edits {
        let mut i = at % (text.len() + 1);
        while !text.is_char_boundary(i) {
            i -= 1;
        }
        text.insert_str(i, piece);
    }
    if m.byte_edits.is_empty() {
        text
    } else {
        String::from_utf8_lossy(&apply(text.into_bytes(), &m.byte_edits)).into_owned()
    }
}

fn check_manifest(m: &ManifestInput) -> Result<(), String> {
    let text = manifest_text(m);
    let files = vec![("pods.yaml".to_string(), text)];
    let opts = StaticPodOptions::default();
    let a = manifest::load(&files, &opts);
    for (key, p) in &a.snapshot.pods {
        if p.uid().is_empty() || key.0.is_empty() {
            return Err(format!("pod {key:?} loaded without a UID or namespace"));
        }
        for c in p.pod.spec.iter().flat_map(|s| s.containers.iter()) {
            for hook in ["postStart", "preStop"] {
                let _ = manifest::lifecycle_sleep(&p.pod, &c.name, hook);
            }
        }
    }
    // Loading is a function of the text: the same UIDs (content hashes) and errors again.
    let b = manifest::load(&files, &opts);
    if a.snapshot != b.snapshot || a.errors != b.errors {
        return Err("loading the same text twice differs".into());
    }
    if !manifest::diff(&a.snapshot, &b.snapshot).is_empty() {
        return Err("a snapshot differs from itself".into());
    }
    let _ = manifest::diff(&a.snapshot, &Default::default());
    Ok(())
}

#[test]
#[ignore = "fuzz target: scripts/fuzz"]
fn fuzz_manifest() {
    fuzz("fuzz_manifest", manifest_input(), check_manifest);
}

#[test]
fn quick_manifest() {
    quick(QUICK / 2, manifest_input(), check_manifest);
}

/// Aliases that expand to a billion nodes ("billion laughs") are refused, in bounded time and
/// memory, and do not stop the other documents.
#[test]
fn manifest_alias_expansion_is_bounded() {
    let mut text = String::from("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n");
    text.push_str("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
    for i in 1..10 {
        let p = i - 1;
        text.push_str(&format!(
            "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
        ));
    }
    text.push_str("data: {k: v}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: d}\n");
    harness::once("manifest_alias_expansion", text, |t| {
        let l = manifest::load(
            &[("f.yaml".into(), t.clone())],
            &StaticPodOptions::default(),
        );
        if l.errors.len() != 1 || l.snapshot.config_maps.len() != 1 {
            return Err(format!("errors {:?}", l.errors));
        }
        Ok(())
    });
}

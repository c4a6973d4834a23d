//! Probe and hook handlers (effectful, blocking; the worker runs them on the blocking pool):
//! exec through the container's shim, httpGet (HTTP/1.1, kubelet's `kube-probe` user agent,
//! 200–399 = success; scheme HTTPS over TLS without certificate verification, as the kubelet
//! does), tcpSocket (connect), and gRPC health (`grpc.health.v1.Health/Check` over cleartext
//! HTTP/2 with prior knowledge).
//!
//! The gRPC client is a small hand-written HTTP/2 exchange (one stream, literal HPACK headers,
//! no response header decoding: success is a response message with status SERVING). A full
//! client (tonic + tonic-health, hyper, h2, prost, tower) would add dozens of crates and a
//! large share of the agent's binary size and memory for one request shape.

use crate::model::probe::{ProbeAction, ProbeOutcome, ProbeTarget};
use hako_shim::client::Runtime as ShimRuntime;
use hako_shim::protocol::ExecRequest;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tokio_rustls::rustls;

/// Why a probe or hook handler failed. The Display text is the probe failure output that
/// events (`Liveness probe failed: ...`) and hook failure messages carry, in the kubelet's words.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The host name did not resolve.
    #[error("resolve {addr}: {source}")]
    Resolve {
        /// `host:port` as looked up.
        addr: String,
        /// The resolver's error.
        source: std::io::Error,
    },
    /// The host name resolved to no address.
    #[error("resolve {0}: no address")]
    NoAddress(String),
    /// The TCP connection failed or timed out.
    #[error("dial tcp {addr}: {source}")]
    Dial {
        /// The address dialled.
        addr: SocketAddr,
        /// The connect error.
        source: std::io::Error,
    },
    /// The shim could not run the command.
    #[error(transparent)]
    Exec(#[from] hako_shim::client::ClientError),
    /// The command ran past the probe's timeout.
    #[error("command {argv:?} timed out after {secs}s")]
    ExecTimedOut {
        /// The command.
        argv: Vec<String>,
        /// The timeout in whole seconds.
        secs: u64,
    },
    /// The command exited non-zero without output.
    #[error("command {argv:?} exited with {code}")]
    Exited {
        /// The command.
        argv: Vec<String>,
        /// Its exit code.
        code: i32,
    },
    /// The command exited non-zero; its output (trailing whitespace trimmed) is the message.
    #[error("{0}")]
    Output(String),
    /// An httpGet scheme other than HTTP or HTTPS.
    #[error("scheme {0:?} is not supported (HTTP or HTTPS)")]
    UnsupportedScheme(String),
    /// The TLS client configuration could not be built.
    #[error("TLS configuration: {0}")]
    TlsConfig(rustls::Error),
    /// The HTTP request to `url` failed.
    #[error("Get \"{url}\": {source}")]
    Http {
        /// The URL requested.
        url: String,
        /// What failed.
        source: HttpError,
    },
    /// The server answered with a status outside 200–399.
    #[error("HTTP probe failed with statuscode: {0}")]
    HttpStatus(u16),
    /// The gRPC exchange with `target` failed on the wire.
    #[error("rpc error to {target}: {source}")]
    Rpc {
        /// `host:port`.
        target: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The gRPC peer broke the protocol (frame too large, stream reset, GOAWAY, ...).
    #[error("rpc error to {target}: {what}")]
    RpcProtocol {
        /// `host:port`.
        target: String,
        /// What the peer did.
        what: &'static str,
    },
    /// The health RPC did not complete before the probe's timeout.
    #[error("timeout: health rpc did not complete within {0:?}")]
    RpcTimeout(Duration),
    /// The health service answered with a status other than SERVING.
    #[error("service unhealthy (responded with status {0})")]
    Unhealthy(u64),
    /// The health response could not be decoded.
    #[error("malformed health response")]
    MalformedHealth,
}

/// What failed in an HTTP GET after the connection was made.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The host is not a valid TLS server name.
    #[error(transparent)]
    ServerName(#[from] rustls::pki_types::InvalidDnsNameError),
    /// The TLS session could not be set up.
    #[error(transparent)]
    Tls(#[from] rustls::Error),
    /// Sending the request or reading the answer failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The answer does not start with an HTTP status line.
    #[error("malformed HTTP response")]
    Malformed,
}

/// Runs probes and hook handlers against containers of one runtime.
#[derive(Debug, Clone)]
pub struct RealProber {
    /// Shim runtime (exec).
    pub shim: ShimRuntime,
}

fn addr(host: &str, port: u16) -> Result<SocketAddr, ProbeError> {
    let h = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    match h.to_socket_addrs() {
        Ok(mut a) => a.next().ok_or(ProbeError::NoAddress(h)),
        Err(source) => Err(ProbeError::Resolve { addr: h, source }),
    }
}

fn connect(host: &str, port: u16, timeout: Duration) -> Result<TcpStream, ProbeError> {
    let a = addr(host, port)?;
    let s = TcpStream::connect_timeout(&a, timeout)
        .map_err(|source| ProbeError::Dial { addr: a, source })?;
    let _ = s.set_read_timeout(Some(timeout));
    let _ = s.set_write_timeout(Some(timeout));
    Ok(s)
}

/// Output of an exec handler: exit code and combined output.
pub fn exec(
    shim: &ShimRuntime,
    container_id: &str,
    argv: &[String],
    timeout: Duration,
) -> Result<(i32, String), ProbeError> {
    let r = shim.client(container_id).exec(ExecRequest {
        args: argv.to_vec(),
        timeout_ms: Some(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX)),
        ..Default::default()
    })?;
    if r.timed_out {
        return Err(ProbeError::ExecTimedOut {
            argv: argv.to_vec(),
            secs: timeout.as_secs(),
        });
    }
    Ok((r.exit_code, format!("{}{}", r.stdout, r.stderr)))
}

/// Accepts any server certificate (the kubelet's probes and hooks use `InsecureSkipVerify`)
/// but still checks the handshake signatures, so the peer holds the certificate's key.
#[derive(Debug)]
struct NoCertificateVerification(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoCertificateVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The TLS client configuration of HTTPS probes and hooks (built once).
fn tls_config() -> Result<Arc<rustls::ClientConfig>, ProbeError> {
    static CONFIG: OnceLock<Result<Arc<rustls::ClientConfig>, rustls::Error>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()?
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoCertificateVerification(provider)))
                .with_no_client_auth();
            Ok(Arc::new(cfg))
        })
        .clone()
        .map_err(ProbeError::TlsConfig)
}

/// HTTP GET (scheme `HTTP` or `HTTPS`); returns the status code.
pub fn http_get(
    scheme: &str,
    host: &str,
    port: u16,
    path: &str,
    headers: &[(String, String)],
    timeout: Duration,
) -> Result<u16, ProbeError> {
    let path = if path.starts_with('/') {
        path.to_string()
    } else {
        format!("/{path}")
    };
    let tls = if scheme.eq_ignore_ascii_case("https") {
        true
    } else if scheme.eq_ignore_ascii_case("http") {
        false
    } else {
        return Err(ProbeError::UnsupportedScheme(scheme.to_string()));
    };
    let tcp = connect(host, port, timeout)?;
    if !tls {
        return http_exchange(tcp, "http", host, port, &path, headers);
    }
    let url = format!("https://{}:{port}{path}", host_for_url(host));
    let http = |source: HttpError| ProbeError::Http {
        url: url.clone(),
        source,
    };
    let name = rustls::pki_types::ServerName::try_from(host.trim_matches(['[', ']']).to_string())
        .map_err(|e| http(e.into()))?;
    let conn = rustls::ClientConnection::new(tls_config()?, name).map_err(|e| http(e.into()))?;
    http_exchange(
        rustls::StreamOwned::new(conn, tcp),
        "https",
        host,
        port,
        &path,
        headers,
    )
}

fn host_for_url(host: &str) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

/// One request on a connected stream (plain or TLS); returns the status code.
fn http_exchange(
    mut s: impl Read + Write,
    scheme: &str,
    host: &str,
    port: u16,
    path: &str,
    headers: &[(String, String)],
) -> Result<u16, ProbeError> {
    let url = format!("{scheme}://{}:{port}{path}", host_for_url(host));
    let mut req = format!("GET {path} HTTP/1.1\r\n");
    let has = |n: &str| headers.iter().any(|(k, _)| k.eq_ignore_ascii_case(n));
    if !has("host") {
        req.push_str(&format!("Host: {}:{port}\r\n", host_for_url(host)));
    }
    if !has("user-agent") {
        req.push_str("User-Agent: kube-probe/1.28\r\n");
    }
    if !has("accept") {
        req.push_str("Accept: */*\r\n");
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("Connection: close\r\n\r\n");
    s.write_all(req.as_bytes())
        .and_then(|()| s.flush())
        .map_err(|e| ProbeError::Http {
            url: url.clone(),
            source: e.into(),
        })?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 512];
    while !buf.windows(2).any(|w| w == b"\r\n") {
        let n = match s.read(&mut chunk) {
            Ok(n) => n,
            // A TLS peer that closes without close_notify after its answer.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !buf.is_empty() => 0,
            Err(e) => {
                return Err(ProbeError::Http {
                    url,
                    source: e.into(),
                })
            }
        };
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > 8192 {
            break;
        }
    }
    let line = String::from_utf8_lossy(&buf);
    line.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or(ProbeError::Http {
            url,
            source: HttpError::Malformed,
        })
}

fn hpack_int(out: &mut Vec<u8>, prefix_bits: u8, first: u8, mut v: usize) {
    let max = (1usize << prefix_bits) - 1;
    if v < max {
        out.push(first | u8::try_from(v).unwrap_or(0));
        return;
    }
    out.push(first | u8::try_from(max).unwrap_or(0));
    v -= max;
    while v >= 128 {
        out.push(u8::try_from(v % 128).unwrap_or(0) | 0x80);
        v /= 128;
    }
    out.push(u8::try_from(v).unwrap_or(0));
}

fn hpack_str(out: &mut Vec<u8>, s: &str) {
    hpack_int(out, 7, 0, s.len());
    out.extend_from_slice(s.as_bytes());
}

fn frame(out: &mut Vec<u8>, ty: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = u32::try_from(payload.len()).unwrap_or(0);
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(ty);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

/// The bytes a client sends for one health check (preface, SETTINGS, HEADERS, DATA). Pure.
pub fn grpc_health_request(authority: &str, service: &str) -> Vec<u8> {
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    frame(&mut out, 4, 0, 0, &[]);
    let mut h = vec![0x83, 0x86]; // :method POST, :scheme http
    h.push(0x04); // :path, literal without indexing, indexed name 4
    hpack_str(&mut h, "/grpc.health.v1.Health/Check");
    h.push(0x01); // :authority
    hpack_str(&mut h, authority);
    for (k, v) in [
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        ("user-agent", "kube-probe/1.28"),
    ] {
        h.push(0x00);
        hpack_str(&mut h, k);
        hpack_str(&mut h, v);
    }
    frame(&mut out, 1, 0x4, 1, &h); // END_HEADERS
    let mut msg = Vec::new();
    if !service.is_empty() {
        msg.push(0x0a);
        let mut l = Vec::new();
        hpack_int(&mut l, 7, 0, service.len()); // varint for < 128; larger handled below
        if service.len() >= 127 {
            l.clear();
            let mut v = service.len();
            while v >= 128 {
                l.push(u8::try_from(v % 128).unwrap_or(0) | 0x80);
                v /= 128;
            }
            l.push(u8::try_from(v).unwrap_or(0));
        }
        msg.extend_from_slice(&l);
        msg.extend_from_slice(service.as_bytes());
    }
    let mut data = vec![0];
    data.extend_from_slice(&u32::try_from(msg.len()).unwrap_or(0).to_be_bytes());
    data.extend_from_slice(&msg);
    frame(&mut out, 0, 0x1, 1, &data); // END_STREAM
    out
}

/// Parses a HealthCheckResponse gRPC message (5-byte prefix + protobuf); returns status.
pub fn grpc_health_status(msg: &[u8]) -> Option<u64> {
    let body = msg.get(5..)?;
    let mut i = 0;
    while i < body.len() {
        let tag = body[i];
        i += 1;
        let mut v: u64 = 0;
        let mut shift = 0;
        loop {
            let b = *body.get(i)?;
            i += 1;
            v |= u64::from(b & 0x7f) << shift;
            shift += 7;
            if b & 0x80 == 0 {
                break;
            }
        }
        if tag == 0x08 {
            return Some(v);
        }
        if tag & 7 == 2 {
            i += usize::try_from(v).ok()?;
        }
    }
    Some(0)
}

/// gRPC health check: Ok when the server answers SERVING.
pub fn grpc_check(
    host: &str,
    port: u16,
    service: &str,
    timeout: Duration,
) -> Result<(), ProbeError> {
    let deadline = Instant::now() + timeout;
    let mut s = connect(host, port, timeout)?;
    let target = format!("{host}:{port}");
    let rpc = |source: std::io::Error| ProbeError::Rpc {
        target: target.clone(),
        source,
    };
    let protocol = |what: &'static str| ProbeError::RpcProtocol {
        target: target.clone(),
        what,
    };
    s.write_all(&grpc_health_request(&target, service))
        .map_err(rpc)?;
    let mut data = Vec::new();
    loop {
        if Instant::now() > deadline {
            return Err(ProbeError::RpcTimeout(timeout));
        }
        let mut hdr = [0u8; 9];
        s.read_exact(&mut hdr).map_err(rpc)?;
        let len = usize::from(hdr[0]) << 16 | usize::from(hdr[1]) << 8 | usize::from(hdr[2]);
        let (ty, flags) = (hdr[3], hdr[4]);
        let stream = u32::from_be_bytes([hdr[5], hdr[6], hdr[7], hdr[8]]) & 0x7fff_ffff;
        if len > 1 << 20 {
            return Err(protocol("frame too large"));
        }
        let mut payload = vec![0u8; len];
        s.read_exact(&mut payload).map_err(rpc)?;
        match ty {
            4 if flags & 1 == 0 => {
                let mut ack = Vec::new();
                frame(&mut ack, 4, 1, 0, &[]);
                let _ = s.write_all(&ack);
            }
            0 if stream == 1 => {
                let body = if flags & 0x8 != 0 {
                    let pad = usize::from(*payload.first().unwrap_or(&0));
                    payload
                        .get(1..payload.len().saturating_sub(pad))
                        .unwrap_or(&[])
                } else {
                    &payload[..]
                };
                data.extend_from_slice(body);
                if data.len() >= 5 {
                    let want =
                        usize::try_from(u32::from_be_bytes([data[1], data[2], data[3], data[4]]))
                            .unwrap_or(usize::MAX);
                    if data.len() >= 5 + want {
                        return match grpc_health_status(&data[..5 + want]) {
                            Some(1) => Ok(()),
                            Some(st) => Err(ProbeError::Unhealthy(st)),
                            None => Err(ProbeError::MalformedHealth),
                        };
                    }
                }
            }
            1 if stream == 1 && flags & 1 != 0 => {
                return Err(protocol("stream ended without a response"));
            }
            3 if stream == 1 => return Err(protocol("stream reset")),
            7 => return Err(protocol("connection closed (GOAWAY)")),
            _ => {}
        }
    }
}

impl crate::model::probe::Prober for RealProber {
    fn run(
        &self,
        target: &ProbeTarget,
        action: &ProbeAction,
        timeout: k8s_openapi::chrono::Duration,
    ) -> ProbeOutcome {
        let timeout = timeout.to_std().unwrap_or(Duration::from_secs(1));
        let r = match action {
            ProbeAction::Exec { command } => {
                match exec(&self.shim, &target.container_id, command, timeout) {
                    Ok((0, _)) => Ok(()),
                    Ok((code, out)) => Err(if out.trim().is_empty() {
                        ProbeError::Exited {
                            argv: command.clone(),
                            code,
                        }
                    } else {
                        ProbeError::Output(out.trim_end().to_string())
                    }),
                    Err(e) => Err(e),
                }
            }
            ProbeAction::HttpGet {
                scheme,
                host,
                port,
                path,
                headers,
            } => {
                let h = host.as_deref().unwrap_or(&target.pod_ip);
                match http_get(scheme, h, *port, path, headers, timeout) {
                    Ok(code) if (200..400).contains(&code) => Ok(()),
                    Ok(code) => Err(ProbeError::HttpStatus(code)),
                    Err(e) => Err(e),
                }
            }
            ProbeAction::TcpSocket { host, port } => {
                connect(host.as_deref().unwrap_or(&target.pod_ip), *port, timeout).map(|_| ())
            }
            ProbeAction::Grpc { port, service } => {
                grpc_check(&target.pod_ip, *port, service, timeout)
            }
        };
        match r {
            Ok(()) => ProbeOutcome::Success,
            Err(e) => ProbeOutcome::Failure(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A one-connection HTTPS server with a fresh self-signed certificate; returns the port and
    /// the request head it received.
    fn tls_server(status: &'static str) -> (u16, std::thread::JoinHandle<String>) {
        let ck = rcgen::generate_simple_self_signed(vec!["probe.test".into()]).unwrap();
        let cert = rustls::pki_types::CertificateDer::from(ck.cert.der().to_vec());
        let key = rustls::pki_types::PrivateKeyDer::try_from(ck.key_pair.serialize_der()).unwrap();
        let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .unwrap();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let t = std::thread::spawn(move || {
            let (tcp, _) = l.accept().unwrap();
            let conn = rustls::ServerConnection::new(Arc::new(cfg)).unwrap();
            let mut s = rustls::StreamOwned::new(conn, tcp);
            let mut head = Vec::new();
            let mut b = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                if s.read(&mut b).unwrap_or(0) == 0 {
                    break;
                }
                head.push(b[0]);
            }
            let _ = write!(s, "HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n");
            let _ = s.flush();
            s.conn.send_close_notify();
            let _ = s.flush();
            String::from_utf8_lossy(&head).into_owned()
        });
        (port, t)
    }

    #[test]
    fn https_get_without_verification() {
        let (port, t) = tls_server("204 No Content");
        let code = http_get(
            "HTTPS",
            "127.0.0.1",
            port,
            "healthz",
            &[("X-Probe".into(), "1".into())],
            Duration::from_secs(5),
        )
        .unwrap();
        assert_eq!(code, 204);
        let head = t.join().unwrap();
        assert!(head.starts_with("GET /healthz HTTP/1.1\r\n"), "{head}");
        assert!(head.contains("User-Agent: kube-probe/1.28\r\n"), "{head}");
        assert!(head.contains("X-Probe: 1\r\n"), "{head}");
        // A host name (sent as SNI) that is not in the certificate is fine too.
        let (port, t) = tls_server("503 Service Unavailable");
        assert_eq!(
            http_get("https", "localhost", port, "/", &[], Duration::from_secs(5)).unwrap(),
            503
        );
        t.join().unwrap();
    }

    #[test]
    fn https_against_plain_http_fails_and_bad_scheme_is_an_error() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let t = std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            let mut b = [0u8; 512];
            let _ = c.read(&mut b);
            let _ = c.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
        });
        let r = http_get("HTTPS", "127.0.0.1", port, "/", &[], Duration::from_secs(5))
            .map_err(|e| e.to_string());
        assert!(
            r.as_ref()
                .is_err_and(|e| e.starts_with(&format!("Get \"https://127.0.0.1:{port}/\""))),
            "{r:?}"
        );
        t.join().unwrap();
        assert!(
            http_get("ftp", "127.0.0.1", 1, "/", &[], Duration::from_secs(1))
                .is_err_and(|e| e.to_string().contains("not supported"))
        );
    }

    #[test]
    fn grpc_frames() {
        let b = grpc_health_request("10.0.0.1:50051", "");
        assert!(b.starts_with(b"PRI * HTTP/2.0"));
        // last frame: DATA, END_STREAM, stream 1, empty message
        let tail = &b[b.len() - 14..];
        assert_eq!(tail, &[0, 0, 5, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0]);
        assert_eq!(grpc_health_status(&[0, 0, 0, 0, 2, 0x08, 1]), Some(1));
        assert_eq!(grpc_health_status(&[0, 0, 0, 0, 2, 0x08, 2]), Some(2));
        assert_eq!(grpc_health_status(&[0, 0, 0, 0, 0]), Some(0));
        let mut v = Vec::new();
        hpack_int(&mut v, 7, 0, 200);
        assert_eq!(v, vec![127, 73]);
    }

    /// Probe failure outputs are the kubelet's words, and root tests match them in events.
    #[test]
    fn probe_error_messages_are_unchanged() {
        let a: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let refused = || std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        for (e, want) in [
            (
                ProbeError::Dial {
                    addr: a,
                    source: refused(),
                },
                format!("dial tcp 10.0.0.1:80: {}", refused()),
            ),
            (
                ProbeError::NoAddress("x:80".into()),
                "resolve x:80: no address".into(),
            ),
            (
                ProbeError::HttpStatus(404),
                "HTTP probe failed with statuscode: 404".into(),
            ),
            (
                ProbeError::Http {
                    url: "http://10.0.0.1:80/".into(),
                    source: HttpError::Malformed,
                },
                "Get \"http://10.0.0.1:80/\": malformed HTTP response".into(),
            ),
            (
                ProbeError::ExecTimedOut {
                    argv: vec!["sleep".into(), "9".into()],
                    secs: 1,
                },
                "command [\"sleep\", \"9\"] timed out after 1s".into(),
            ),
            (
                ProbeError::Exited {
                    argv: vec!["false".into()],
                    code: 1,
                },
                "command [\"false\"] exited with 1".into(),
            ),
            (
                ProbeError::Unhealthy(2),
                "service unhealthy (responded with status 2)".into(),
            ),
            (
                ProbeError::RpcProtocol {
                    target: "10.0.0.1:50051".into(),
                    what: "stream reset",
                },
                "rpc error to 10.0.0.1:50051: stream reset".into(),
            ),
            (
                ProbeError::RpcTimeout(Duration::from_secs(1)),
                "timeout: health rpc did not complete within 1s".into(),
            ),
        ] {
            assert_eq!(e.to_string(), want);
        }
    }
}

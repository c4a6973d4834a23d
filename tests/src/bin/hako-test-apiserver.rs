//! `hako-test-apiserver`: the kube-apiserver fixture as a process, for scripts (the proxier
//! daemon bench). Listens on 127.0.0.1 (of the network namespace it runs in), loads N
//! Services with one EndpointSlice of E endpoints each (namespace `bench`), writes an
//! administrator kubeconfig, prints `ready <url>` on stdout and then serves until stdin
//! closes. Commands on stdin, one per line, each answered with one line on stdout:
//! `bump I` moves the first endpoint of Service I to a new address (with the
//! `endpoints.kubernetes.io/last-change-trigger-time` annotation set to now, as the
//! EndpointSlice controller does) and answers `ok`; `quit` ends.

use std::io::{BufRead, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use hako_tests::apiserver::ApiServer;
use serde_json::{json, Value};

#[derive(Parser, Debug)]
#[command(
    name = "hako-test-apiserver",
    version,
    about = "kube-apiserver fixture loaded with Services"
)]
struct Cli {
    /// Services to load.
    #[arg(long, default_value_t = 0)]
    services: u32,
    /// Endpoints per Service (one EndpointSlice each).
    #[arg(long, default_value_t = 5)]
    endpoints: u32,
    /// Where to write the administrator kubeconfig.
    #[arg(long)]
    kubeconfig: PathBuf,
    /// Port on 127.0.0.1 (default: a free one).
    #[arg(long, default_value_t = 0)]
    port: u16,
}

const NS: &str = "bench";

/// The i-th address of a /8 (`base`.0.0.0 + i).
fn addr(base: u8, i: u32) -> String {
    let [_, b, c, d] = i.to_be_bytes();
    Ipv4Addr::new(base, b, c, d).to_string()
}

fn service(i: u32) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": format!("svc-{i}"), "namespace": NS},
        "spec": {"type": "ClusterIP", "clusterIP": addr(10, 0x60_0000 + i + 1),
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]}
    })
}

fn slice(i: u32, eps: u32, first: &str) -> Value {
    let endpoints: Vec<Value> = (0..eps)
        .map(|j| {
            let ip = if j == 0 {
                first.to_string()
            } else {
                addr(10, 0x80_0000 + i * eps + j)
            };
            json!({"addresses": [ip], "conditions": {"ready": true},
                   "nodeName": format!("node-{}", j % 3)})
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("svc-{i}-1"), "namespace": NS,
                     "labels": {"kubernetes.io/service-name": format!("svc-{i}")}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints
    })
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let api = ApiServer::start_on(SocketAddr::from(([127, 0, 0, 1], cli.port)))?;
    for i in 0..cli.services {
        api.create(service(i))
            .map_err(|e| anyhow::anyhow!("creating svc-{i}: {e}"))?;
        api.create(slice(
            i,
            cli.endpoints,
            &addr(10, 0x80_0000 + i * cli.endpoints),
        ))
        .map_err(|e| anyhow::anyhow!("creating svc-{i}-1: {e}"))?;
    }
    api.write_kubeconfig(&cli.kubeconfig, &api.admin_token())?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready {}", api.url())?;
    out.flush()?;
    let mut bumps = 0u32;
    for line in std::io::stdin().lock().lines() {
        let line = line.context("reading stdin")?;
        let mut words = line.split_whitespace();
        match (words.next(), words.next().map(str::parse::<u32>)) {
            (Some("bump"), Some(Ok(i))) if i < cli.services => {
                bumps += 1;
                let now = k8s_openapi::chrono::Utc::now()
                    .to_rfc3339_opts(k8s_openapi::chrono::SecondsFormat::Nanos, true);
                let mut s = slice(i, cli.endpoints, &addr(10, 0xc8_0000 + bumps));
                s["metadata"]["annotations"] =
                    json!({"endpoints.kubernetes.io/last-change-trigger-time": now});
                let patch = json!({"metadata": {"annotations": s["metadata"]["annotations"]},
                                   "endpoints": s["endpoints"]});
                match api.merge_patch(
                    "discovery.k8s.io",
                    "endpointslices",
                    NS,
                    &format!("svc-{i}-1"),
                    "",
                    &patch,
                ) {
                    Ok(_) => writeln!(out, "ok")?,
                    Err(e) => writeln!(out, "error {e}")?,
                }
            }
            (Some("quit"), _) => break,
            _ => writeln!(out, "error unknown command {line:?}")?,
        }
        out.flush()?;
    }
    Ok(())
}

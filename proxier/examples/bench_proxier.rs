//! Benchmark driver for scripts/bench-proxier: run inside a scratch network namespace.
//! Builds N services × E endpoints, then prints one tab-separated line: variant, N, E,
//! render seconds, full sync seconds, one-endpoint partial sync seconds, bare
//! iptables-restore seconds of the same full payload, payload rules, RSS MiB, and the
//! seconds of a one-chain restore on the loaded table (the floor of any partial sync).
#![allow(clippy::print_stdout)]

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::Instant;

use hako_proxier::iptables::Writer;
use hako_proxier::iptables::{nft_zero_split, render};
use hako_proxier::{IptablesBackend, Proxier, ProxierOpts, RealIptables};
use k8s_openapi::api::discovery::v1::EndpointSlice;

fn slice(i: usize, eps: usize, shift: usize) -> EndpointSlice {
    let list: Vec<String> = (0..eps)
        .map(|e| {
            let n = i * eps + e + shift;
            format!(
                "{{addresses: [10.{}.{}.{}], nodeName: n}}",
                128 + n / 65536,
                (n / 256) % 256,
                n % 256
            )
        })
        .collect();
    serde_yaml::from_str(&format!(
        "metadata: {{name: s{i}-1, namespace: bench, labels: {{kubernetes.io/service-name: s{i}}}}}\naddressType: IPv4\nports: [{{name: p, port: 8080}}]\nendpoints: [{}]",
        list.join(",")
    ))
    .expect("slice")
}

mod common;
use common::{rss_mib, rss_now_mib, svc};

/// `<ipt>-restore --noflush -w` fed `parts` in order; whether it succeeded.
fn restore(ipt: &str, parts: &[&[u8]]) -> anyhow::Result<bool> {
    let mut child = Command::new(format!("{ipt}-restore"))
        .args(["--noflush", "-w"])
        .stdin(Stdio::piped())
        .spawn()?;
    if let Some(mut w) = child.stdin.take() {
        for p in parts {
            w.write_all(p)?;
        }
    }
    Ok(child.wait()?.success())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    // "legacy-kernel": the legacy flavour written by the kernel writer; "legacy" (and the
    // others): through iptables-restore, as before.
    let arg = args.get(1).cloned().unwrap_or_default();
    let (variant, writer) = match arg.strip_suffix("-kernel") {
        Some(v) => (v.to_string(), Writer::Kernel),
        None => (arg.clone(), Writer::Restore),
    };
    let n: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1000);
    let eps: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(5);
    let ropts = common::render_opts();
    let mut p = Proxier::new(
        Box::new(IptablesBackend::new(
            RealIptables::with_variant(&variant).with_writer(writer),
            ropts.clone(),
        )),
        ProxierOpts {
            hostname: "n".into(),
            render: ropts.clone(),
        },
    );
    for i in 0..n {
        p.on_service_add(svc(i));
        p.on_endpointslice_add(slice(i, eps, 0));
    }
    let t = Instant::now();
    let full = p.sync()?;
    let full_s = t.elapsed().as_secs_f64();
    anyhow::ensure!(full.full, "first sync must be full");

    // One endpoint of one service changes.
    let mut changed = slice(n / 2, eps, 0);
    if let Some(ep) = changed.endpoints.first_mut() {
        ep.addresses = vec!["10.127.255.1".into()];
    }
    p.on_endpointslice_update(changed);
    let t = Instant::now();
    let part = p.sync()?;
    let partial_s = t.elapsed().as_secs_f64();
    anyhow::ensure!(!part.full, "second sync must be partial");
    // What the daemon holds between syncs (before this bench renders a payload of its own).
    let rss_state = rss_now_mib();
    let rss_peak = rss_mib();
    let t = Instant::now();
    let r = render(p.model(), &ropts);
    let render_s = t.elapsed().as_secs_f64();

    // Floor of any sync on this table: a restore that rewrites one tiny chain (legacy
    // iptables reads and writes the whole table in the kernel even so).
    let ipt = if variant.is_empty() {
        "iptables".to_string()
    } else {
        format!("iptables-{variant}")
    };
    let t = Instant::now();
    anyhow::ensure!(
        restore(
            &ipt,
            &[b"*nat\n:KUBE-MARK-MASQ - [0:0]\n-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\nCOMMIT\n"],
        )?,
        "floor restore failed"
    );
    let floor_s = t.elapsed().as_secs_f64();
    if variant == "legacy" {
        // The kernel's own floor: read the nat table out and replace it with the same
        // entries (what any legacy writer pays per change, before any work of its own).
        let sock = hako_proxier::xtables::sys::Socket::open()?;
        let t = Instant::now();
        let (info, entries) = hako_proxier::xtables::read(&sock, "nat")?;
        let read_s = t.elapsed().as_secs_f64();
        let mut buf = vec![0u8; hako_proxier::xtables::sys::REPLACE];
        buf.extend_from_slice(&entries);
        let t2 = Instant::now();
        sock.replace("nat", &info, &mut buf, info.num_entries)?;
        let replace_s = t2.elapsed().as_secs_f64();
        eprintln!(
            "kernel floor, nat table of {} entries, {:.1} MB: read {read_s:.3} s + replace {replace_s:.3} s = {:.3} s",
            info.num_entries,
            f64::from(info.size) / 1e6,
            read_s + replace_s
        );
    }

    // Bare restore of the same full payload on emptied tables.
    for table in ["nat", "filter"] {
        for op in ["-F", "-X"] {
            Command::new(&ipt).args(["-w", "-t", table, op]).status()?;
        }
    }
    // Fed as the backend feeds it (the nf_tables flavour gets the leading `-Z` of
    // `nft_zero_split` on large payloads; without it the 10,000-service payload does not
    // load within minutes).
    let nft = RealIptables::with_variant(&variant).is_nft_flavour();
    let (at, zero) = nft_zero_split(&r.text);
    let text = r.text.as_bytes();
    let t = Instant::now();
    let ok = if zero && nft {
        restore(&ipt, &[&text[..at], b"-Z\n", &text[at..]])?
    } else {
        restore(&ipt, &[text])?
    };
    let bare_s = t.elapsed().as_secs_f64();
    anyhow::ensure!(ok, "bare restore failed");
    let v = if arg.is_empty() { "default" } else { &arg };
    writeln!(
        std::io::stdout().lock(),
        "{v}\t{n}\t{eps}\t{render_s:.3}\t{full_s:.3}\t{partial_s:.4}\t{bare_s:.3}\t{}\t{rss_state:.0}/{rss_peak:.0}\t{floor_s:.4}",
        r.rules
    )?;
    Ok(())
}

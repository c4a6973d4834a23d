//! Network-programming latency driver for `scripts/bench-proxier --latency`: run inside a
//! scratch network namespace. N services × E endpoints are listed to the sync runner through
//! the same channel the API watchers feed (`WatchSource`), with `--min-sync-period` 1 s, as
//! `hako-proxy --kubeconfig` runs; after the first sync, K endpoint changes are sent one at a
//! time, each 1.5–2.5 s after the previous one (longer than the period, as changes to a
//! quiet cluster come), and the time from sending a change to the end of the sync that
//! programmed it is measured. Prints one tab-separated line: variant, N, E, K, median, p90,
//! max and first-sync seconds. Uses only the runner API that predates the bounded-frequency
//! runner, so the script can build it against an earlier revision for a before/after run.
#![allow(clippy::print_stdout)]

use std::sync::mpsc;
use std::time::{Duration, Instant};

use hako_proxier::kube::WatchEvent;
use hako_proxier::runner::{Runner, RunnerConfig, SyncEvent, WatchSource};
use hako_proxier::IptablesBackend;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::watcher::Event;

mod common;
use common::{render_opts, svc};

/// Slice `i` with its endpoints shifted by `shift` addresses (a one-endpoint change when
/// `shift` moves the window by one).
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

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let variant = args.get(1).cloned().unwrap_or_default();
    let n: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1000);
    let eps: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(5);
    let k: usize = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(20);

    let (tx, rx) = mpsc::channel::<WatchEvent>();
    let (done_tx, done_rx) = mpsc::channel::<(Instant, bool)>();
    let v = variant.clone();
    let runner = std::thread::spawn(move || {
        let backend = IptablesBackend::real(&v, render_opts());
        let mut proxier = hako_proxier::Proxier::new(
            Box::new(backend),
            hako_proxier::ProxierOpts {
                hostname: "n".into(),
                render: render_opts(),
            },
        );
        let mut runner = Runner::new(RunnerConfig::new(
            Duration::from_secs(1),
            Duration::from_secs(3600),
        ))
        .with_observer(move |ev| {
            if let SyncEvent::Synced { stats, .. } = ev {
                if stats.full || stats.services_written > 0 {
                    let _ = done_tx.send((Instant::now(), stats.full));
                }
            }
        });
        let _ = runner.run(&mut proxier, &mut WatchSource::new(rx));
    });

    let started = Instant::now();
    tx.send(WatchEvent::Service(Event::Init))?;
    for i in 0..n {
        tx.send(WatchEvent::Service(Event::InitApply(svc(i))))?;
    }
    tx.send(WatchEvent::Service(Event::InitDone))?;
    tx.send(WatchEvent::Slice(Event::Init))?;
    for i in 0..n {
        tx.send(WatchEvent::Slice(Event::InitApply(slice(i, eps, 0))))?;
    }
    tx.send(WatchEvent::Slice(Event::InitDone))?;
    let (first, full) = done_rx.recv_timeout(Duration::from_secs(600))?;
    anyhow::ensure!(full, "the first sync must be full");
    let first_s = first.duration_since(started).as_secs_f64();

    let mut lat = Vec::with_capacity(k);
    for c in 0..k {
        // 1.5–2.5 s apart, spread deterministically.
        let gap = 1500 + u64::try_from((c * 397) % 1000).unwrap_or(0);
        std::thread::sleep(Duration::from_millis(gap));
        let i = (c * 37) % n;
        let sent = Instant::now();
        tx.send(WatchEvent::Slice(Event::Apply(slice(i, eps, c % 2 + 1))))?;
        let (end, _) = done_rx.recv_timeout(Duration::from_secs(120))?;
        lat.push(end.duration_since(sent).as_secs_f64());
    }
    drop(tx);
    let _ = runner.join();
    lat.sort_by(f64::total_cmp);
    let at = |q: f64| {
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss
        )]
        let i = ((lat.len() as f64 - 1.0) * q).round() as usize;
        lat[i.min(lat.len() - 1)]
    };
    println!(
        "{}\t{n}\t{eps}\t{k}\t{:.3}\t{:.3}\t{:.3}\t{:.2}",
        if variant.is_empty() {
            "default"
        } else {
            &variant
        },
        at(0.5),
        at(0.9),
        lat.last().copied().unwrap_or_default(),
        first_s
    );
    Ok(())
}

//! `hako-proxy --kubeconfig` against the kube-apiserver fixture: the watchers feed the
//! proxier (iptables mode) inside a fresh network namespace; added, changed and deleted
//! Services and EndpointSlices show in the rules, and the daemon rides out a compacted
//! history (410 Gone) and failing requests without exiting.
#![cfg(feature = "root")]

use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use hako_tests::apiserver::ApiServer;
use hako_tests::netns::require_root;
use hako_tests::NetNs;
use serde_json::json;

fn proxy_bin() -> PathBuf {
    if let Ok(p) = std::env::var("HAKO_PROXY_BIN") {
        return p.into();
    }
    let exe = std::env::current_exe().unwrap();
    let p = exe.parent().unwrap().parent().unwrap().join("hako-proxy");
    assert!(
        p.exists(),
        "{} missing: run `cargo build -p hako-proxier` with the same target dir first",
        p.display()
    );
    p
}

struct Daemon(Child, PathBuf);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn service(name: &str, ip: &str) -> serde_json::Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "t"},
        "spec": {"clusterIP": ip, "ports": [{"name": "p", "port": 80, "protocol": "TCP"}]}
    })
}

fn slice(svc: &str, ip: &str) -> serde_json::Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{svc}-1"), "namespace": "t",
                     "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4",
        "ports": [{"name": "p", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": [ip], "conditions": {"ready": true}}]
    })
}

/// Waits until `pred` holds for the node's nat table (30 s at most).
fn wait_nat(ns: &NetNs, what: &str, daemon: &mut Daemon, pred: impl Fn(&str) -> bool) {
    wait_nat_for(ns, what, daemon, Duration::from_secs(30), pred);
}

/// Waits until `pred` holds for the node's nat table, `limit` at most.
fn wait_nat_for(
    ns: &NetNs,
    what: &str,
    daemon: &mut Daemon,
    limit: Duration,
    pred: impl Fn(&str) -> bool,
) {
    let deadline = Instant::now() + limit;
    loop {
        let nat = ns.sh("iptables-save -t nat").unwrap();
        if pred(&nat) {
            return;
        }
        if let Ok(Some(st)) = daemon.0.try_wait() {
            let log = std::fs::read_to_string(&daemon.1).unwrap_or_default();
            panic!("hako-proxy exited ({st}) while waiting for {what}:\n{log}");
        }
        if Instant::now() >= deadline {
            let log = std::fs::read_to_string(&daemon.1).unwrap_or_default();
            panic!("timed out waiting for {what}:\n{nat}\n--- hako-proxy log:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn kubeconfig_watchers_feed_the_proxier() {
    require_root();
    let ns = NetNs::new("pkube").unwrap();
    // The fixture listens on 127.0.0.1 inside the namespace, where hako-proxy runs.
    let api = ns.run(ApiServer::start).unwrap().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kc = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kc, &api.admin_token()).unwrap();
    api.create(service("web", "10.96.0.50")).unwrap();
    api.create(slice("web", "10.244.0.5")).unwrap();

    let log = dir.path().join("hako-proxy.log");
    let mut d = Daemon(
        ns.command(proxy_bin().to_str().unwrap())
            .arg("--kubeconfig")
            .arg(&kc)
            .args(["--min-sync-period", "200ms", "--hostname-override", "n1"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
        log.clone(),
    );
    wait_nat(&ns, "the listed service", &mut d, |nat| {
        nat.contains("-d 10.96.0.50/32") && nat.contains("10.244.0.5:8080")
    });

    // Watch events: a new service, an endpoint change, a deletion.
    api.create(service("api", "10.96.0.51")).unwrap();
    api.create(slice("api", "10.244.0.6")).unwrap();
    api.merge_patch(
        "discovery.k8s.io",
        "endpointslices",
        "t",
        "web-1",
        "",
        &json!({"endpoints": [{"addresses": ["10.244.0.7"], "conditions": {"ready": true}}]}),
    )
    .unwrap();
    wait_nat(
        &ns,
        "the added service and the new endpoint",
        &mut d,
        |nat| {
            nat.contains("10.244.0.6:8080")
                && nat.contains("10.244.0.7:8080")
                && !nat.contains("10.244.0.5:8080")
        },
    );
    api.delete("", "services", "t", "api", &json!({})).unwrap();
    wait_nat(&ns, "the deleted service to go", &mut d, |nat| {
        !nat.contains("-d 10.96.0.51/32") && nat.contains("-d 10.96.0.50/32")
    });

    // Transient failures: history compacted (watches get 410 Gone) and failing requests.
    // The daemon relists, keeps running and picks up what changed meanwhile.
    // The server goes away (watches break), objects change meanwhile and the history is
    // compacted: the watches resume from a resourceVersion that is gone (410) and must
    // relist, through failing requests.
    let mut api = api;
    api.stop();
    api.create(service("late", "10.96.0.52")).unwrap();
    api.create(slice("late", "10.244.0.8")).unwrap();
    api.compact();
    api.fail_next(4);
    ns.run(|| api.restart()).unwrap().unwrap();
    // Each watch backs off as client-go's reflector does (0.8 s doubling to 30 s, with
    // jitter): after a broken connection, the injected failures and a 410, one watch can
    // be 25-40 s away from its relist, so this wait is longer than the others.
    wait_nat_for(
        &ns,
        "the service created across the failures",
        &mut d,
        Duration::from_secs(90),
        |nat| nat.contains("-d 10.96.0.52/32") && nat.contains("10.244.0.8:8080"),
    );
    assert!(
        d.0.try_wait().unwrap().is_none(),
        "hako-proxy must still run"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    // Which of the two watches hits the compacted history first (and relists) depends on
    // timing; at least one of them must have relisted.
    let relisted = text.matches("Services listed").count() >= 2
        || text.matches("EndpointSlices listed").count() >= 2;
    assert!(
        relisted && text.contains("retrying with back-off"),
        "expected a failed watch and a relist:\n{text}"
    );
    drop(d);
    drop(api);
}

/// A list of more objects than one page (the watchers ask for 500 at a time; the fixture
/// pages as the apiserver does, with `limit` and an opaque `continue` token): every page is
/// programmed, not only the first, and the lists really were paginated.
#[test]
fn a_list_over_several_pages_is_programmed_completely() {
    require_root();
    const N: u32 = 1_201;
    let ns = NetNs::new("ppage").unwrap();
    let api = ns.run(ApiServer::start).unwrap().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kc = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kc, &api.admin_token()).unwrap();
    let ip = |base: u8, i: u32| format!("{base}.{}.{}.{}", 96, i / 256, i % 256);
    for i in 0..N {
        api.create(service(&format!("s{i}"), &ip(10, i))).unwrap();
        api.create(slice(&format!("s{i}"), &ip(11, i))).unwrap();
    }

    let log = dir.path().join("hako-proxy.log");
    let mut d = Daemon(
        ns.command(proxy_bin().to_str().unwrap())
            .arg("--kubeconfig")
            .arg(&kc)
            .args(["--min-sync-period", "200ms", "--hostname-override", "n1"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
        log.clone(),
    );
    wait_nat_for(
        &ns,
        "every listed service",
        &mut d,
        Duration::from_secs(120),
        |nat| nat.matches("-A KUBE-SERVICES -d ").count() >= N as usize,
    );
    let nat = ns.sh("iptables-save -t nat").unwrap();
    for i in [0, 499, 500, 999, 1000, N - 1] {
        assert!(
            nat.contains(&format!("-d {}/32", ip(10, i))),
            "service s{i} missing"
        );
        assert!(
            nat.contains(&format!("{}:8080", ip(11, i))),
            "endpoint of s{i} missing"
        );
    }
    // Both kinds were listed in pages: a first request with a limit and continued ones.
    for path in [
        "/api/v1/services",
        "/apis/discovery.k8s.io/v1/endpointslices",
    ] {
        let lists: Vec<_> = api
            .requests()
            .into_iter()
            .filter(|r| r.path == path && !r.query.contains("watch=true"))
            .collect();
        assert!(
            lists.iter().any(|r| r.query.contains("limit=500")),
            "{path}: no paginated list: {:?}",
            lists.iter().map(|r| &r.query).collect::<Vec<_>>()
        );
        assert!(
            lists
                .iter()
                .filter(|r| r.query.contains("continue="))
                .count()
                >= 2,
            "{path}: fewer than two continued pages: {:?}",
            lists.iter().map(|r| &r.query).collect::<Vec<_>>()
        );
    }
    drop(d);
    drop(api);
}

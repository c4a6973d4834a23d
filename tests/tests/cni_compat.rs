//! hako-cni under the conflists users already have: podman's
//! `87-podman-bridge.conflist`, containerd's bridge example and the CNI reference docs'
//! examples, with only `"type": "bridge"` changed to `"hako-cni"` (and the IPAM data
//! directories pointed into the test's temp dir, so tests share no host state). Each is run
//! with cniVersion 0.4.0 and 1.0.0 as libcni runs a chain (ADD in order with prevResult,
//! CHECK with the cached result, DEL in reverse), chained with the reference `portmap`,
//! `firewall`, `tuning` and `bandwidth` from /usr/lib/cni, with the reference `host-local`
//! or `static` as delegated IPAM; then nothing may be left: links, addresses, routes,
//! iptables rules naming the pod, IPAM files.
#![cfg(feature = "root")]

mod cni_support;

use cni_support::{chain_add, chain_run, exec, host_veths, result_ipv4, Call, Outcome};
use hako_tests::{NetNs, Topology};
use serde_json::{json, Value};
use std::path::Path;

const VERSIONS: [&str; 2] = ["0.4.0", "1.0.0"];

/// Reachable within three pings (a positive check under load; negative checks use `ping`).
fn reach(ns: &NetNs, ip: &str) -> bool {
    (0..3).any(|_| ping(ns, ip))
}

fn ping(ns: &NetNs, ip: &str) -> bool {
    ns.sh_output(&format!("ping -c 1 -W 2 {ip}"))
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// A temp dir for one conflist's state (host-local's dataDir, hako's own dataDir).
fn state_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("hako-cni-compat-")
        .tempdir()
        .expect("tempdir")
}

/// Points the first plugin's state into `dir`: `ipam.dataDir` (host-local) and `dataDir`.
fn isolate(list: &mut Value, dir: &Path) {
    let first = &mut list["plugins"][0];
    first["dataDir"] = json!(dir.join("hako"));
    if first["ipam"]["type"] == "host-local" {
        first["ipam"]["dataDir"] = json!(dir.join("host-local"));
    }
}

/// Addresses host-local holds in `dir` (files named by an IP).
fn host_local_ips(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir.join("host-local"))
        .into_iter()
        .flatten()
        .flat_map(|d| std::fs::read_dir(d.ok()?.path()).ok())
        .flatten()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.parse::<std::net::IpAddr>().is_ok())
        .collect();
    v.sort();
    v
}

fn all_ok(what: &str, outs: Vec<Outcome>) {
    for o in outs {
        assert!(o.ok, "{what}: {} / {}", o.stdout, o.stderr);
    }
}

/// The plugins of `list` without the named types (for CHECK: see `podman_conflist`).
fn without(list: &Value, types: &[&str]) -> Value {
    let mut l = list.clone();
    l["plugins"]
        .as_array_mut()
        .expect("plugins")
        .retain(|p| !types.contains(&p["type"].as_str().unwrap_or("")));
    l
}

/// Everything an attachment leaves must be gone after DEL: host veths, IPAM files, the
/// pod's interface, and any iptables rule naming the pod's address.
fn assert_clean(node: &NetNs, pod: &NetNs, dir: &Path, ips: &[String]) {
    assert!(host_veths(node).is_empty(), "{:?}", host_veths(node));
    assert!(host_local_ips(dir).is_empty(), "{:?}", host_local_ips(dir));
    let links = pod.ip(&["-o", "link", "show"]).expect("ip link");
    assert!(!links.contains("eth0"), "{links}");
    let rules = node
        .sh("iptables-save; ip6tables-save")
        .expect("iptables-save");
    for ip in ips {
        assert!(!rules.contains(ip.as_str()), "{ip} still in\n{rules}");
    }
}

fn podman_list(version: &str) -> Value {
    // podman 4.x's /etc/cni/net.d/87-podman-bridge.conflist, "bridge" -> "hako-cni".
    json!({
        "cniVersion": version,
        "name": "podman",
        "plugins": [
            {
                "type": "hako-cni",
                "bridge": "cni-podman0",
                "isGateway": true,
                "ipMasq": true,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "routes": [{ "dst": "0.0.0.0/0" }],
                    "ranges": [[{ "subnet": "10.88.0.0/16", "gateway": "10.88.0.1" }]]
                }
            },
            { "type": "portmap", "capabilities": { "portMappings": true } },
            { "type": "firewall" },
            { "type": "tuning" }
        ]
    })
}

#[test]
fn podman_conflist_with_host_local_portmap_firewall_tuning() {
    hako_tests::require_root();
    for version in VERSIONS {
        let topo = Topology::new(1, 1500).unwrap();
        let node = &topo.nodes[0].ns;
        let dir = state_dir();
        let mut list = podman_list(version);
        isolate(&mut list, dir.path());
        // What podman passes for a published port.
        list["plugins"][1]["runtimeConfig"] = json!({"portMappings": [
            {"hostPort": 18081, "containerPort": 80, "protocol": "tcp"}]});
        let p1 = NetNs::new("pod").unwrap();
        let p2 = NetNs::new("pod").unwrap();
        let r1 = chain_add(node, &list, &Call::attach("ADD", "podman-one", &p1));
        let r2 = chain_add(node, &list, &Call::attach("ADD", "podman-two", &p2));
        assert_eq!(r1["cniVersion"], version);
        let (ip1, ip2) = (result_ipv4(&r1), result_ipv4(&r2));
        assert!(ip1.starts_with("10.88.") && ip1 != ip2, "{r1} {r2}");
        assert_eq!(host_local_ips(dir.path()), {
            let mut v = vec![ip1.clone(), ip2.clone()];
            v.sort();
            v
        });
        // isGateway + the explicit default route: exactly one default route.
        let routes = p1.ip(&["route", "show", "default"]).unwrap();
        assert_eq!(routes.lines().count(), 1, "{routes}");
        assert!(routes.contains("via 10.88.0.1 dev eth0"), "{routes}");
        let br = node
            .ip(&["-o", "addr", "show", "dev", "cni-podman0"])
            .unwrap();
        assert!(br.contains("10.88.0.1/16"), "{br}");
        assert!(reach(&p1, &ip2), "{version}: pod one cannot reach pod two");
        assert!(
            reach(&p1, "10.88.0.1"),
            "{version}: pod cannot reach the gateway"
        );
        // portmap and firewall acted on hako's result.
        let rules = node.sh("iptables-save").unwrap();
        assert!(rules.contains(&format!("{ip1}:80")), "{rules}");
        assert!(
            rules.contains("CNI-FORWARD") && rules.contains(&ip1),
            "{rules}"
        );
        let mut srv = p1
            .spawn("busybox nc -l -p 80 -e echo hello-podman")
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(300));
        let node_ip = topo.nodes[0].ip.to_string();
        let got = node
            .sh(&format!(
                "busybox nc -w 2 {node_ip} 18081 </dev/null || true"
            ))
            .unwrap();
        let _ = srv.kill();
        let _ = srv.wait();
        assert!(
            got.contains("hello-podman"),
            "{version}: port mapping: {got:?}"
        );
        // CHECK through the chain (host-local's CHECK included). portmap 1.1.1's CHECK is
        // left out: it checks its IPv6 chain with the IPv4 rules and fails for any plugin.
        let check = without(&list, &["portmap"]);
        for (id, pod, r) in [("podman-one", &p1, &r1), ("podman-two", &p2, &r2)] {
            all_ok(
                &format!("{version} CHECK {id}"),
                chain_run(node, &check, &Call::attach("CHECK", id, pod), r),
            );
        }
        // CHECK sees drift: the address removed from the pod.
        p2.ip(&["addr", "flush", "dev", "eth0"]).unwrap();
        let drift = chain_run(node, &check, &Call::attach("CHECK", "podman-two", &p2), &r2);
        assert!(!drift[0].ok, "{version}: CHECK missed a flushed address");
        for (id, pod, r) in [("podman-one", &p1, &r1), ("podman-two", &p2, &r2)] {
            all_ok(
                &format!("{version} DEL {id}"),
                chain_run(node, &list, &Call::attach("DEL", id, pod), r),
            );
            // A second DEL (runtimes retry) succeeds too.
            all_ok(
                &format!("{version} DEL again {id}"),
                chain_run(node, &list, &Call::attach("DEL", id, pod), r),
            );
        }
        assert_clean(node, &p1, dir.path(), &[ip1.clone(), ip2.clone()]);
        assert_clean(node, &p2, dir.path(), &[ip1, ip2]);
    }
}

#[test]
fn containerd_bridge_example_dual_stack_promisc_with_bandwidth() {
    hako_tests::require_root();
    for version in VERSIONS {
        let topo = Topology::new(1, 1500).unwrap();
        let node = &topo.nodes[0].ns;
        let dir = state_dir();
        // containerd's docs/cri bridge example ("bridge" -> "hako-cni"), plus bandwidth.
        let mut list = json!({
            "cniVersion": version,
            "name": "containerd-net",
            "plugins": [
                {
                    "type": "hako-cni",
                    "bridge": "cni0",
                    "isGateway": true,
                    "ipMasq": true,
                    "promiscMode": true,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [
                            [{ "subnet": "10.88.0.0/16" }],
                            [{ "subnet": "2001:4860:4860::/64" }]
                        ],
                        "routes": [{ "dst": "0.0.0.0/0" }, { "dst": "::/0" }]
                    }
                },
                { "type": "portmap", "capabilities": { "portMappings": true } },
                { "type": "bandwidth", "capabilities": { "bandwidth": true },
                  "runtimeConfig": { "bandwidth": {
                      "ingressRate": 8000000, "ingressBurst": 80000,
                      "egressRate": 8000000, "egressBurst": 80000 } } }
            ]
        });
        isolate(&mut list, dir.path());
        let pod = NetNs::new("pod").unwrap();
        let r = chain_add(node, &list, &Call::attach("ADD", "ctrd", &pod));
        let ip = result_ipv4(&r);
        let ips: Vec<String> = r["ips"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| {
                i["address"]
                    .as_str()
                    .unwrap()
                    .split('/')
                    .next()
                    .unwrap()
                    .into()
            })
            .collect();
        assert_eq!(ips.len(), 2, "{r}");
        let v4 = pod.ip(&["route", "show", "default"]).unwrap();
        assert_eq!(v4.lines().count(), 1, "{v4}");
        assert!(v4.contains("via 10.88.0.1"), "{v4}");
        let v6 = pod.ip(&["-6", "route", "show", "default"]).unwrap();
        assert_eq!(v6.lines().count(), 1, "{v6}");
        assert!(v6.contains("via 2001:4860:4860::1"), "{v6}");
        let br = node.ip(&["link", "show", "cni0"]).unwrap();
        assert!(br.contains("PROMISC"), "{br}");
        assert!(reach(&pod, "10.88.0.1"));
        // bandwidth shaped hako's host veth (egress via an ifb device) from prevResult.
        let host = host_veths(node);
        assert_eq!(host.len(), 1);
        let tc = node.sh(&format!("tc qdisc show dev {}", host[0])).unwrap();
        assert!(tc.contains("tbf"), "{tc}");
        let ifb = node.ip(&["-o", "link", "show", "type", "ifb"]).unwrap();
        assert!(!ifb.trim().is_empty(), "no ifb device");
        all_ok(
            &format!("{version} CHECK"),
            chain_run(
                node,
                &without(&list, &["portmap"]),
                &Call::attach("CHECK", "ctrd", &pod),
                &r,
            ),
        );
        all_ok(
            &format!("{version} DEL"),
            chain_run(node, &list, &Call::attach("DEL", "ctrd", &pod), &r),
        );
        let ifb = node.ip(&["-o", "link", "show", "type", "ifb"]).unwrap();
        assert!(ifb.trim().is_empty(), "ifb left: {ifb}");
        assert_clean(node, &pod, dir.path(), &ips);
        assert!(!ip.is_empty());
    }
}

#[test]
fn reference_docs_examples_single_conf_and_spec_conflist() {
    hako_tests::require_root();
    for version in VERSIONS {
        let topo = Topology::new(1, 1500).unwrap();
        let node = &topo.nodes[0].ns;
        let dir = state_dir();
        // cni.dev's bridge page example, a single network config.
        let mut mynet = json!({
            "cniVersion": version,
            "name": "mynet",
            "type": "hako-cni",
            "bridge": "mynet0",
            "isDefaultGateway": true,
            "forceAddress": false,
            "ipMasq": true,
            "hairpinMode": true,
            "ipam": { "type": "host-local", "subnet": "10.10.0.0/16" }
        });
        mynet["dataDir"] = json!(dir.path().join("hako"));
        mynet["ipam"]["dataDir"] = json!(dir.path().join("host-local"));
        let pod = NetNs::new("pod").unwrap();
        let add = exec(node, &Call::attach("ADD", "mynet", &pod), &mynet);
        let r = add.result().clone();
        let ip = result_ipv4(&r);
        assert!(ip.starts_with("10.10."), "{r}");
        let routes = pod.ip(&["route", "show", "default"]).unwrap();
        assert!(routes.contains("via 10.10.0.1 dev eth0"), "{routes}");
        let mut check = mynet.clone();
        check["prevResult"] = r.clone();
        assert!(exec(node, &Call::attach("CHECK", "mynet", &pod), &check).ok);
        assert!(exec(node, &Call::attach("DEL", "mynet", &pod), &check).ok);
        assert_clean(node, &pod, dir.path(), std::slice::from_ref(&ip));

        // SPEC.md's example conflist (cniVersion set to the one under test).
        let mut list = json!({
            "cniVersion": version,
            "name": "dbnet",
            "plugins": [
                {
                    "type": "hako-cni",
                    "bridge": "cni0",
                    "keyA": ["some more", "plugin specific", "configuration"],
                    "ipam": {
                        "type": "host-local",
                        "subnet": "10.1.0.0/16",
                        "gateway": "10.1.0.1",
                        "routes": [{ "dst": "0.0.0.0/0" }]
                    },
                    "dns": { "nameservers": ["10.1.0.1"] }
                },
                {
                    "type": "tuning",
                    "capabilities": { "mac": true },
                    "sysctl": { "net.core.somaxconn": "500" }
                },
                { "type": "portmap", "capabilities": { "portMappings": true } }
            ]
        });
        isolate(&mut list, dir.path());
        let pod = NetNs::new("pod").unwrap();
        let r = chain_add(node, &list, &Call::attach("ADD", "dbnet", &pod));
        let ip = result_ipv4(&r);
        assert!(ip.starts_with("10.1."), "{r}");
        assert_eq!(r["dns"]["nameservers"][0], "10.1.0.1", "{r}");
        assert_eq!(
            pod.sh("cat /proc/sys/net/core/somaxconn").unwrap().trim(),
            "500"
        );
        let routes = pod.ip(&["route", "show", "default"]).unwrap();
        assert_eq!(routes.lines().count(), 1, "{routes}");
        all_ok(
            &format!("{version} CHECK dbnet"),
            chain_run(
                node,
                &without(&list, &["portmap"]),
                &Call::attach("CHECK", "dbnet", &pod),
                &r,
            ),
        );
        all_ok(
            &format!("{version} DEL dbnet"),
            chain_run(node, &list, &Call::attach("DEL", "dbnet", &pod), &r),
        );
        assert_clean(node, &pod, dir.path(), &[ip]);
    }
}

#[test]
fn static_ipam_and_undo_through_the_ipam_plugin() {
    hako_tests::require_root();
    let topo = Topology::new(1, 1500).unwrap();
    let node = &topo.nodes[0].ns;
    let dir = state_dir();
    // The reference static IPAM: the address and route it names, nothing else.
    let conf = json!({
        "cniVersion": "1.0.0",
        "name": "staticnet",
        "type": "hako-cni",
        "bridge": "st0",
        "isGateway": true,
        "dataDir": dir.path().join("hako"),
        "ipam": {
            "type": "static",
            "addresses": [{ "address": "10.41.0.5/24", "gateway": "10.41.0.1" }],
            "routes": [{ "dst": "0.0.0.0/0" }, { "dst": "192.168.50.0/24", "gw": "10.41.0.9" }]
        }
    });
    let pod = NetNs::new("pod").unwrap();
    let r = exec(node, &Call::attach("ADD", "static", &pod), &conf);
    let r = r.result().clone();
    assert_eq!(r["ips"][0]["address"], "10.41.0.5/24");
    let addr = pod.ip(&["-o", "addr", "show", "dev", "eth0"]).unwrap();
    assert!(addr.contains("10.41.0.5/24"), "{addr}");
    let routes = pod.ip(&["route", "show"]).unwrap();
    assert!(
        routes.contains("default via 10.41.0.1 dev eth0"),
        "{routes}"
    );
    assert!(
        routes.contains("192.168.50.0/24 via 10.41.0.9 dev eth0"),
        "{routes}"
    );
    assert!(reach(&pod, "10.41.0.1"));
    assert!(exec(node, &Call::attach("DEL", "static", &pod), &conf).ok);
    assert!(host_veths(node).is_empty());

    // host-local allocates, then a later step fails (a route whose next hop is off-link):
    // the allocation is released through host-local's DEL and the veth is gone.
    let bad = json!({
        "cniVersion": "1.0.0",
        "name": "undonet",
        "type": "hako-cni",
        "bridge": "un0",
        "dataDir": dir.path().join("hako"),
        "ipam": {
            "type": "host-local",
            "dataDir": dir.path().join("host-local"),
            "ranges": [[{ "subnet": "10.42.0.0/24" }]],
            "routes": [{ "dst": "192.168.60.0/24", "gw": "10.99.0.1" }]
        }
    });
    let pod2 = NetNs::new("pod").unwrap();
    let out = exec(node, &Call::attach("ADD", "undo", &pod2), &bad);
    assert!(
        !out.ok,
        "ADD with an off-link next hop succeeded: {}",
        out.stdout
    );
    assert!(
        out.json["details"]
            .as_str()
            .unwrap_or("")
            .contains("192.168.60.0/24"),
        "{}",
        out.stdout
    );
    assert!(
        std::fs::read_dir(dir.path().join("host-local/undonet")).is_ok(),
        "host-local never ran"
    );
    assert_clean(node, &pod2, dir.path(), &[]);
}

#[test]
fn unsupported_reference_fields_are_refused_by_name() {
    hako_tests::require_root();
    let topo = Topology::new(1, 1500).unwrap();
    let node = &topo.nodes[0].ns;
    let dir = state_dir();
    let pod = NetNs::new("pod").unwrap();
    for (field, value, code) in [
        ("vlanTrunk", json!([{"id": 0}]), 7),
        ("disableContainerInterface", json!(true), 2),
        ("ipMasqBackend", json!("pf"), 7),
        ("vlan", json!(5000), 7),
    ] {
        let mut conf = json!({
            "cniVersion": "1.0.0",
            "name": "refused",
            "type": "hako-cni",
            "dataDir": dir.path().join("hako"),
            "ipam": { "type": "host-local", "subnet": "10.43.0.0/24",
                      "dataDir": dir.path().join("host-local") }
        });
        conf[field] = value;
        let out = exec(node, &Call::attach("ADD", "refused", &pod), &conf);
        assert_eq!(out.code(), code, "{field}: {}", out.stdout);
        let text = out.stdout.to_lowercase();
        assert!(
            text.contains(&field.to_lowercase()),
            "{field} not named: {}",
            out.stdout
        );
        assert_clean(node, &pod, dir.path(), &[]);
    }
}

#[test]
fn podman_shape_with_builtin_ipam_gc_and_status() {
    hako_tests::require_root();
    let topo = Topology::new(1, 1500).unwrap();
    let node = &topo.nodes[0].ns;
    let dir = state_dir();
    // podman's plugin entry with hako's own IPAM (ipam.type left out) at 1.1.0, where GC
    // and STATUS exist: the explicit default route and isGateway gave EEXIST before.
    let mut conf = podman_list("1.1.0")["plugins"][0].clone();
    conf["cniVersion"] = json!("1.1.0");
    conf["name"] = json!("podman");
    conf["dataDir"] = json!(dir.path().join("hako"));
    conf["ipam"].as_object_mut().unwrap().remove("type");
    let pods = [NetNs::new("pod").unwrap(), NetNs::new("pod").unwrap()];
    let mut ips = vec![];
    for (i, pod) in pods.iter().enumerate() {
        let id = format!("gc-{i}");
        let r = exec(node, &Call::attach("ADD", &id, pod), &conf);
        ips.push(result_ipv4(r.result()));
        let routes = pod.ip(&["route", "show", "default"]).unwrap();
        assert_eq!(routes.lines().count(), 1, "{routes}");
        assert!(routes.contains("via 10.88.0.1 dev eth0"), "{routes}");
    }
    assert!(exec(node, &Call::plain("STATUS"), &conf).ok);
    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "gc-0", "ifname": "eth0"}]);
    let out = exec(node, &Call::plain("GC"), &gc);
    assert!(out.ok, "{} / {}", out.stdout, out.stderr);
    assert_eq!(host_veths(node).len(), 1, "GC kept the wrong veths");
    let held: Vec<String> = std::fs::read_dir(dir.path().join("hako"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.parse::<std::net::IpAddr>().is_ok())
        .collect();
    assert_eq!(held, [ips[0].clone()]);
    assert!(exec(node, &Call::attach("DEL", "gc-0", &pods[0]), &conf).ok);
    assert!(host_veths(node).is_empty());
}

/// A recording IPAM plugin: appends `$CNI_COMMAND` to `log`, answers ADD with one address.
fn fake_ipam(dir: &Path) -> std::path::PathBuf {
    let log = dir.join("calls.log");
    let bin = dir.join("fake-ipam");
    std::fs::write(
        &bin,
        format!(
            "#!/bin/sh\ncat >/dev/null\necho \"$CNI_COMMAND\" >> {}\n\
             [ \"$CNI_COMMAND\" = ADD ] && echo '{{\"cniVersion\":\"1.1.0\",\"ips\":[{{\"address\":\"10.44.0.7/24\",\"gateway\":\"10.44.0.1\"}}]}}'\n\
             exit 0\n",
            log.display()
        ),
    )
    .unwrap();
    std::process::Command::new("chmod")
        .args(["+x", bin.to_str().unwrap()])
        .status()
        .unwrap();
    log
}

#[test]
fn delegated_gc_and_status_go_to_the_ipam_plugin() {
    hako_tests::require_root();
    let topo = Topology::new(1, 1500).unwrap();
    let node = &topo.nodes[0].ns;
    let dir = state_dir();
    let log = fake_ipam(dir.path());
    let bin = cni_support::cni_bin();
    let cni_path = format!(
        "{}:{}",
        dir.path().display(),
        bin.parent().unwrap().display()
    );
    let conf = json!({
        "cniVersion": "1.1.0",
        "name": "fakenet",
        "type": "hako-cni",
        "bridge": "fk0",
        "dataDir": dir.path().join("hako"),
        "ipam": { "type": "fake-ipam" }
    });
    let run = |call: &Call<'_>, conf: &Value| {
        cni_support::exec_raw_in(&bin, node, call, conf.to_string().as_bytes(), &cni_path)
    };
    let pod = NetNs::new("pod").unwrap();
    let r = run(&Call::attach("ADD", "fake", &pod), &conf);
    assert_eq!(r.result()["ips"][0]["address"], "10.44.0.7/24");
    assert!(run(&Call::plain("STATUS"), &conf).ok);
    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([]);
    let out = run(&Call::plain("GC"), &gc);
    assert!(out.ok, "{} / {}", out.stdout, out.stderr);
    // GC removed the veth of the attachment no longer valid.
    assert!(host_veths(node).is_empty());
    assert!(run(&Call::attach("DEL", "fake", &pod), &conf).ok);
    let calls = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        calls.lines().collect::<Vec<_>>(),
        ["ADD", "STATUS", "GC", "DEL"]
    );
}

#[test]
fn ip_masq_backend_iptables_masquerades_with_a_chain_per_bridge() {
    hako_tests::require_root();
    // Node 1 is "outside": it has no route back to the pod network.
    let topo = Topology::new(2, 1500).unwrap();
    let node = &topo.nodes[0].ns;
    let outside = topo.nodes[1].ip.to_string();
    let dir = state_dir();
    let mut list = podman_list("1.0.0");
    list["plugins"][0]["ipMasqBackend"] = json!("iptables");
    isolate(&mut list, dir.path());
    let pods = [NetNs::new("pod").unwrap(), NetNs::new("pod").unwrap()];
    let mut results = vec![];
    for (i, pod) in pods.iter().enumerate() {
        let id = format!("ipt-{i}");
        results.push(chain_add(node, &list, &Call::attach("ADD", &id, pod)));
        assert!(reach(pod, &outside), "pod {i} cannot reach {outside}");
    }
    let nat = node.sh("iptables-save -t nat").unwrap();
    let jumps = nat
        .lines()
        .filter(|l| l.starts_with("-A POSTROUTING -s 10.88.0.0/16") && l.contains("HAKO-MASQ-"))
        .count();
    assert_eq!(jumps, 1, "one jump per bridge subnet, not per pod:\n{nat}");
    assert!(nat.contains("-j MASQUERADE"), "{nat}");
    let nft = node.sh("nft list tables").unwrap();
    assert!(
        !nft.contains("hako_cni_"),
        "nft table made with the iptables backend: {nft}"
    );
    for (i, pod) in pods.iter().enumerate() {
        let id = format!("ipt-{i}");
        all_ok(
            "DEL",
            chain_run(node, &list, &Call::attach("DEL", &id, pod), &results[i]),
        );
    }
    assert!(host_veths(node).is_empty());
    assert!(host_local_ips(dir.path()).is_empty());
}

/// Kills a helper process started for one test (the DHCP server, the dhcp daemon).
struct Proc(std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn dhcp_ipam_through_the_reference_daemon_and_a_dhcp_server() {
    hako_tests::require_root();
    let topo = Topology::new(1, 1500).unwrap();
    let node = &topo.nodes[0].ns;
    let dir = state_dir();
    let d = dir.path();
    // A DHCP server (busybox udhcpd) on the bridge, which exists before the first ADD.
    node.ip(&["link", "add", "dh0", "type", "bridge"]).unwrap();
    node.ip(&["addr", "add", "10.45.0.1/24", "dev", "dh0"])
        .unwrap();
    node.ip(&["link", "set", "dh0", "up"]).unwrap();
    std::fs::write(
        d.join("udhcpd.conf"),
        format!(
            "start 10.45.0.10\nend 10.45.0.50\ninterface dh0\nopt router 10.45.0.1\n\
             opt subnet 255.255.255.0\nlease_file {}\npidfile {}\n",
            d.join("leases").display(),
            d.join("udhcpd.pid").display()
        ),
    )
    .unwrap();
    let _server = Proc(
        node.spawn(&format!(
            "busybox udhcpd -f {}",
            d.join("udhcpd.conf").display()
        ))
        .unwrap(),
    );
    let sock = d.join("dhcp.sock");
    let _daemon = Proc(
        node.spawn(&format!(
            "/usr/lib/cni/dhcp daemon -socketpath {}",
            sock.display()
        ))
        .unwrap(),
    );
    hako_tests::poll_until(
        "the dhcp daemon's socket",
        std::time::Duration::from_secs(10),
        std::time::Duration::from_millis(50),
        || sock.display().to_string(),
        || sock.exists().then_some(()),
    );
    let conf = json!({
        "cniVersion": "1.0.0",
        "name": "dhcpnet",
        "type": "hako-cni",
        "bridge": "dh0",
        "ipMasq": false,
        "dataDir": d.join("hako"),
        "ipam": { "type": "dhcp", "daemonSocketPath": sock }
    });
    let pod = NetNs::new("pod").unwrap();
    let add = exec(node, &Call::attach("ADD", "dhcp", &pod), &conf);
    let r = add.result().clone();
    let ip = result_ipv4(&r);
    assert!(ip.starts_with("10.45.0."), "{r}");
    assert_eq!(r["ips"][0]["gateway"], "10.45.0.1", "{r}");
    let addr = pod.ip(&["-o", "addr", "show", "dev", "eth0"]).unwrap();
    assert!(addr.contains(&format!("{ip}/24")), "{addr}");
    assert!(reach(&pod, "10.45.0.1"));
    assert!(exec(node, &Call::attach("DEL", "dhcp", &pod), &conf).ok);
    assert!(host_veths(node).is_empty());
}

#[test]
fn macspoofchk_drops_frames_from_a_changed_mac() {
    hako_tests::require_root();
    let topo = Topology::new(1, 1500).unwrap();
    let node = &topo.nodes[0].ns;
    let dir = state_dir();
    let conf = json!({
        "cniVersion": "1.0.0",
        "name": "spoof",
        "type": "hako-cni",
        "bridge": "sp0",
        "macspoofchk": true,
        "ipMasq": false,
        "dataDir": dir.path().join("hako"),
        "ipam": {
            "type": "host-local",
            "dataDir": dir.path().join("host-local"),
            "ranges": [[{ "subnet": "10.46.0.0/24" }]]
        }
    });
    let p1 = NetNs::new("pod").unwrap();
    let p2 = NetNs::new("pod").unwrap();
    let r1 = exec(node, &Call::attach("ADD", "spoof-1", &p1), &conf)
        .result()
        .clone();
    let r2 = exec(node, &Call::attach("ADD", "spoof-2", &p2), &conf)
        .result()
        .clone();
    let ip2 = result_ipv4(&r2);
    assert!(
        reach(&p1, &ip2),
        "pod one cannot reach pod two with its own MAC"
    );
    let mac = r1["interfaces"][2]["mac"].as_str().unwrap().to_string();
    let spoof = |pod: &NetNs, peer: &NetNs, mac: &str| {
        pod.ip(&["link", "set", "eth0", "address", mac]).unwrap();
        pod.ip(&["neigh", "flush", "all"]).unwrap();
        peer.ip(&["neigh", "flush", "all"]).unwrap();
    };
    // Control: without macspoofchk the same change goes through.
    let mut open = conf.clone();
    open["macspoofchk"] = json!(false);
    open["bridge"] = json!("sp1");
    open["name"] = json!("spoofopen");
    open["ipam"]["ranges"] = json!([[{ "subnet": "10.47.0.0/24" }]]);
    let (p3, p4) = (NetNs::new("pod").unwrap(), NetNs::new("pod").unwrap());
    exec(node, &Call::attach("ADD", "open-3", &p3), &open).result();
    let r4 = exec(node, &Call::attach("ADD", "open-4", &p4), &open)
        .result()
        .clone();
    spoof(&p3, &p4, "02:de:ad:be:ef:03");
    assert!(
        reach(&p3, &result_ipv4(&r4)),
        "control: a changed MAC is dropped without macspoofchk"
    );
    spoof(&p1, &p2, "02:de:ad:be:ef:01");
    assert!(!ping(&p1, &ip2), "a spoofed MAC got through");
    assert!(!ping(&p1, "10.46.0.1"), "a spoofed MAC reached the gateway");
    spoof(&p1, &p2, &mac);
    assert!(
        reach(&p1, &ip2),
        "the pod's own MAC is dropped after a change back"
    );
    for (id, pod) in [("spoof-1", &p1), ("spoof-2", &p2)] {
        assert!(exec(node, &Call::attach("DEL", id, pod), &conf).ok);
        assert!(
            exec(node, &Call::attach("DEL", id, pod), &conf).ok,
            "second DEL"
        );
    }
    for (id, pod) in [("open-3", &p3), ("open-4", &p4)] {
        assert!(exec(node, &Call::attach("DEL", id, pod), &open).ok);
    }
    let table = node.sh("nft list table bridge hako_spoofchk").unwrap();
    assert!(!table.contains("a-hako"), "{table}");
    assert_clean(node, &p1, dir.path(), &[]);
}

#[test]
fn vlan_separates_pods_on_one_bridge() {
    hako_tests::require_root();
    let topo = Topology::new(1, 1500).unwrap();
    let node = &topo.nodes[0].ns;
    let dir = state_dir();
    let conf = |name: &str, vlan: u16, subnet: &str| {
        json!({
            "cniVersion": "1.0.0",
            "name": name,
            "type": "hako-cni",
            "bridge": "vb0",
            "isGateway": true,
            "ipMasq": false,
            "vlan": vlan,
            "dataDir": dir.path().join("hako"),
            "ipam": {
                "type": "host-local",
                "dataDir": dir.path().join("host-local"),
                "ranges": [[{ "subnet": subnet }]]
            }
        })
    };
    let (a, b) = (
        conf("vlan-a", 100, "10.48.0.0/24"),
        conf("vlan-b", 200, "10.49.0.0/24"),
    );
    let (a1, a2, b1) = (
        NetNs::new("pod").unwrap(),
        NetNs::new("pod").unwrap(),
        NetNs::new("pod").unwrap(),
    );
    // This host's kernel has no bridge VLAN filtering (CONFIG_BRIDGE_VLAN_FILTERING off):
    // there ADD must fail naming the field, and leave nothing behind.
    let filtering = node
        .sh("ip link add hkvlanprobe type bridge vlan_filtering 1 && ip link del hkvlanprobe")
        .is_ok();
    if !filtering {
        let out = exec(node, &Call::attach("ADD", "vlan-a1", &a1), &a);
        assert_eq!(out.code(), 2, "{}", out.stdout);
        assert!(out.stdout.contains("vlan 100"), "{}", out.stdout);
        assert_clean(node, &a1, dir.path(), &[]);
        return;
    }
    let ra1 = exec(node, &Call::attach("ADD", "vlan-a1", &a1), &a)
        .result()
        .clone();
    let ra2 = exec(node, &Call::attach("ADD", "vlan-a2", &a2), &a)
        .result()
        .clone();
    exec(node, &Call::attach("ADD", "vlan-b1", &b1), &b).result();
    let ip_a1 = result_ipv4(&ra1);
    assert!(reach(&a2, &ip_a1), "pods of one VLAN cannot talk");
    assert!(
        reach(&a1, &result_ipv4(&ra2)),
        "pods of one VLAN cannot talk back"
    );
    assert!(reach(&a1, "10.48.0.1"), "gateway on vb0.100 unreachable");
    assert!(reach(&b1, "10.49.0.1"), "gateway on vb0.200 unreachable");
    let gw = node.ip(&["-o", "addr", "show", "dev", "vb0.100"]).unwrap();
    assert!(gw.contains("10.48.0.1/24"), "{gw}");
    // The pod's port is in its VLAN only, untagged.
    let host = ra1["interfaces"][1]["name"].as_str().unwrap();
    let vlans = node.sh(&format!("bridge -j vlan show dev {host}")).unwrap();
    let v: Value = serde_json::from_str(&vlans).unwrap();
    let ids: Vec<u64> = v[0]["vlans"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["vlan"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, [100], "{vlans}");
    assert!(
        vlans.contains("PVID") && vlans.contains("Egress Untagged"),
        "{vlans}"
    );
    // A pod of VLAN 200 given an address of VLAN 100's subnet still cannot reach it.
    b1.ip(&["addr", "add", "10.48.0.77/24", "dev", "eth0"])
        .unwrap();
    assert!(!ping(&b1, &ip_a1), "VLAN 200 reached VLAN 100");
    // A trunk port (vlanTrunk): VLAN 1 native, the trunk tagged; the pod's own VLAN
    // interface on 100 reaches VLAN 100's pods.
    let mut t = conf("vlan-t", 0, "10.51.0.0/24");
    t["vlanTrunk"] = json!([{"id": 100}, {"minID": 310, "maxID": 312}]);
    let tp = NetNs::new("pod").unwrap();
    let rt = exec(node, &Call::attach("ADD", "vlan-t1", &tp), &t)
        .result()
        .clone();
    let host_t = rt["interfaces"][1]["name"].as_str().unwrap();
    let vlans = node
        .sh(&format!("bridge -j vlan show dev {host_t}"))
        .unwrap();
    let v: Value = serde_json::from_str(&vlans).unwrap();
    let ids: Vec<u64> = v[0]["vlans"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["vlan"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, [1, 100, 310, 311, 312], "{vlans}");
    tp.sh("ip link add link eth0 name eth0.100 type vlan id 100 && ip addr add 10.48.0.99/24 dev eth0.100 && ip link set eth0.100 up")
        .unwrap();
    assert!(
        reach(&tp, &ip_a1),
        "tagged VLAN 100 over the trunk does not reach VLAN 100"
    );
    assert!(exec(node, &Call::attach("DEL", "vlan-t1", &tp), &t).ok);
    for (id, pod, c) in [
        ("vlan-a1", &a1, &a),
        ("vlan-a2", &a2, &a),
        ("vlan-b1", &b1, &b),
    ] {
        assert!(exec(node, &Call::attach("DEL", id, pod), c).ok);
    }
    assert_clean(node, &a1, dir.path(), &[]);
}

#[test]
fn fixed_mac_and_port_isolation() {
    hako_tests::require_root();
    let topo = Topology::new(1, 1500).unwrap();
    let node = &topo.nodes[0].ns;
    let dir = state_dir();
    let conf = json!({
        "cniVersion": "1.0.0",
        "name": "isolated",
        "type": "hako-cni",
        "bridge": "pi0",
        "portIsolation": true,
        "ipMasq": false,
        "dataDir": dir.path().join("hako"),
        "ipam": {
            "type": "host-local",
            "dataDir": dir.path().join("host-local"),
            "ranges": [[{ "subnet": "10.50.0.0/24" }]]
        }
    });
    let (p1, p2) = (NetNs::new("pod").unwrap(), NetNs::new("pod").unwrap());
    // runtimeConfig.mac (what libcni passes for the "mac" capability) and CNI_ARGS MAC=.
    let mut c1 = conf.clone();
    c1["runtimeConfig"] = json!({"mac": "02:aa:bb:cc:dd:01"});
    let r1 = exec(node, &Call::attach("ADD", "iso-1", &p1), &c1)
        .result()
        .clone();
    let mut call2 = Call::attach("ADD", "iso-2", &p2);
    call2.args = Some("IgnoreUnknown=1;MAC=02:aa:bb:cc:dd:02");
    let r2 = exec(node, &call2, &conf).result().clone();
    assert_eq!(r1["interfaces"][2]["mac"], "02:aa:bb:cc:dd:01", "{r1}");
    assert!(p1
        .ip(&["link", "show", "eth0"])
        .unwrap()
        .contains("link/ether 02:aa:bb:cc:dd:01"));
    assert!(p2
        .ip(&["link", "show", "eth0"])
        .unwrap()
        .contains("link/ether 02:aa:bb:cc:dd:02"));
    let ip2 = result_ipv4(&r2);
    // Isolated ports reach the gateway, not each other.
    assert!(
        reach(&p1, "10.50.0.1"),
        "isolated pod cannot reach the gateway"
    );
    assert!(!ping(&p1, &ip2), "isolated ports reached each other");
    let host1 = r1["interfaces"][1]["name"].as_str().unwrap();
    let port = node
        .sh(&format!("bridge -d link show dev {host1}"))
        .unwrap();
    assert!(port.contains("isolated on"), "{port}");
    // Control: with isolation turned off by hand the same ping passes.
    node.ip(&[
        "link",
        "set",
        host1,
        "type",
        "bridge_slave",
        "isolated",
        "off",
    ])
    .unwrap();
    let host2 = r2["interfaces"][1]["name"].as_str().unwrap();
    node.ip(&[
        "link",
        "set",
        host2,
        "type",
        "bridge_slave",
        "isolated",
        "off",
    ])
    .unwrap();
    // The failed neighbour entries of the isolated phase may need a retry (bounded).
    p1.ip(&["neigh", "flush", "all"]).unwrap();
    p2.ip(&["neigh", "flush", "all"]).unwrap();
    assert!(
        reach(&p1, &ip2),
        "control: pods cannot reach each other without isolation"
    );
    assert!(exec(node, &Call::attach("DEL", "iso-1", &p1), &c1).ok);
    assert!(exec(node, &Call::attach("DEL", "iso-2", &p2), &conf).ok);
    assert_clean(node, &p1, dir.path(), &[]);
}

#[test]
fn enabledad_runs_duplicate_address_detection() {
    hako_tests::require_root();
    let topo = Topology::new(1, 1500).unwrap();
    let node = &topo.nodes[0].ns;
    let dir = state_dir();
    let conf = |dad: bool| {
        json!({
            "cniVersion": "1.0.0",
            "name": "dadnet",
            "type": "hako-cni",
            "bridge": "dd0",
            "enabledad": dad,
            "ipMasq": false,
            "dataDir": dir.path().join("hako"),
            "ipam": {
                "type": "host-local",
                "dataDir": dir.path().join("host-local"),
                "ranges": [[{ "subnet": "fd51::/64" }]]
            }
        })
    };
    for dad in [false, true] {
        let pod = NetNs::new("pod").unwrap();
        let c = conf(dad);
        assert!(
            exec(node, &Call::attach("ADD", "dad", &pod), &c).result()["ips"][0]["address"]
                .as_str()
                .unwrap()
                .starts_with("fd51::")
        );
        let addr = pod
            .ip(&["-6", "addr", "show", "dev", "eth0", "scope", "global"])
            .unwrap();
        // Without enabledad the address carries the nodad flag (as the reference's
        // accept_dad=0); with it, it does not, and accept_dad is 1.
        assert_eq!(!addr.contains("nodad"), dad, "enabledad {dad}: {addr}");
        if dad {
            let knob = pod
                .sh("cat /proc/sys/net/ipv6/conf/eth0/accept_dad")
                .unwrap();
            assert_eq!(knob.trim(), "1");
        }
        assert!(exec(node, &Call::attach("DEL", "dad", &pod), &c).ok);
        assert_clean(node, &pod, dir.path(), &[]);
    }
}

/// A podman run's state (storage, run root, config) in a temp dir; on drop, containers
/// are removed and anything still mounted under the dir is unmounted.
struct Podman {
    dir: tempfile::TempDir,
    node: std::path::PathBuf,
    /// podman keeps its blob-info cache in /var/lib/containers whatever `--root` says:
    /// removed on drop when the test made it.
    made_var_lib: bool,
}

impl Podman {
    fn cmd(&self, args: &[&str]) -> std::process::Output {
        let d = self.dir.path();
        std::process::Command::new("nsenter")
            // nsenter, not `ip netns exec`: that remounts /sys, hiding the cgroup mounts.
            .arg(format!("--net={}", self.node.display()))
            .arg("podman")
            .args(["--root", d.join("root").to_str().unwrap()])
            .args(["--runroot", d.join("run").to_str().unwrap()])
            .args(["--tmpdir", d.join("tmp").to_str().unwrap()])
            .args(["--storage-driver", "vfs"])
            .args(args)
            .env("CONTAINERS_CONF", d.join("containers.conf"))
            .output()
            .expect("running podman")
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self.cmd(&["rm", "-af", "-t", "0"]);
        hako_tests::holdings::unmount_under(self.dir.path());
        if self.made_var_lib {
            let _ = std::fs::remove_dir_all("/var/lib/containers");
        }
    }
}

#[test]
fn podman_with_the_cni_backend_runs_hako_cni() {
    hako_tests::require_root();
    if std::process::Command::new("podman")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipped: podman is not installed (apt-get install podman)");
        return;
    }
    for version in VERSIONS {
        let node = NetNs::new("node").unwrap();
        let p = Podman {
            dir: state_dir(),
            node: node.path(),
            made_var_lib: !Path::new("/var/lib/containers").exists(),
        };
        let d = p.dir.path();
        // The conflist the podman package ships, "bridge" -> "hako-cni".
        let mut list = std::fs::read_to_string("/etc/cni/net.d/87-podman-bridge.conflist")
            .ok()
            .and_then(|t| serde_json::from_str::<Value>(&t).ok())
            .unwrap_or_else(|| podman_list("0.4.0"));
        assert_eq!(list["plugins"][0]["type"], "bridge", "{list}");
        list["plugins"][0]["type"] = json!("hako-cni");
        list["cniVersion"] = json!(version);
        isolate(&mut list, d);
        std::fs::create_dir_all(d.join("net.d")).unwrap();
        std::fs::write(d.join("net.d/87-podman-bridge.conflist"), list.to_string()).unwrap();
        let bin_dir = cni_support::cni_bin().parent().unwrap().to_path_buf();
        std::fs::write(
            d.join("containers.conf"),
            format!(
                "[containers]\ndefault_ulimits = []\n\n[network]\nnetwork_backend = \"cni\"\n\
                 cni_plugin_dirs = [\"{}\", \"/usr/lib/cni\"]\nnetwork_config_dir = \"{}\"\n\n\
                 [engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n\
                 events_logfile_path = \"{}\"\nruntime = \"runc\"\n",
                bin_dir.display(),
                d.join("net.d").display(),
                d.join("events.log").display()
            ),
        )
        .unwrap();
        // A one-binary image: static busybox.
        let rootfs = d.join("rootfs/bin");
        std::fs::create_dir_all(&rootfs).unwrap();
        std::fs::copy("/bin/busybox", rootfs.join("busybox")).unwrap();
        for a in ["sh", "ip", "ping"] {
            std::os::unix::fs::symlink("busybox", rootfs.join(a)).unwrap();
        }
        let tar = d.join("rootfs.tar");
        let st = std::process::Command::new("tar")
            .args(["-C", d.join("rootfs").to_str().unwrap(), "-cf"])
            .arg(&tar)
            .arg(".")
            .status()
            .unwrap();
        assert!(st.success());
        let out = p.cmd(&["import", tar.to_str().unwrap(), "localhost/hako-bb:1"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Root here may not raise rlimits (no CAP_SYS_RESOURCE): ask for low ones.
        let out = p.cmd(&[
            "run",
            "--rm",
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1024:1024",
            "--network",
            "podman",
            "localhost/hako-bb:1",
            "sh",
            "-c",
            "ip -o -4 addr show eth0; ip route show default; ping -c 1 -W 2 10.88.0.1",
        ]);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{version}: podman run: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("inet 10.88."), "{stdout}");
        assert_eq!(
            stdout.matches("default via 10.88.0.1").count(),
            1,
            "{stdout}"
        );
        assert!(stdout.contains("1 packets received"), "{stdout}");
        let ip = stdout
            .split("inet ")
            .nth(1)
            .and_then(|s| s.split('/').next())
            .unwrap()
            .to_string();
        // podman ran DEL through the chain: nothing of the container is left.
        assert!(host_veths(&node).is_empty(), "{:?}", host_veths(&node));
        assert!(host_local_ips(d).is_empty(), "{:?}", host_local_ips(d));
        let rules = node.sh("iptables-save").unwrap();
        assert!(!rules.contains(&ip), "{ip} still in\n{rules}");
    }
}

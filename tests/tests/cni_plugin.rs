//! hako-cni as a CNI client runs it: ADD/CHECK/DEL/GC/STATUS in real namespaces, results
//! per cniVersion, bad input, concurrency, undo on failure, and chaining with the reference
//! `tuning` and `portmap` plugins.
#![cfg(feature = "root")]

mod cni_support;

use cni_support::{chain_add, chain_run, exec, exec_raw, host_veths, result_ipv4, Call, TestNet};
use hako_tests::{NetNs, Topology};
use serde_json::{json, Value};
use std::collections::HashSet;

fn ping(ns: &NetNs, ip: &str) -> bool {
    ns.sh_output(&format!("ping -c 1 -W 2 {ip}"))
        .map(|o| o.status.success())
        .unwrap_or(false)
}

#[test]
fn two_pods_on_one_node_reach_each_other_and_the_gateway() {
    hako_tests::require_root();
    let topo = Topology::new(1, 1500).unwrap();
    let node = &topo.nodes[0].ns;
    let net = TestNet::from_subnet_file(
        "HAKO_NETWORK=10.244.0.0/16\nHAKO_SUBNET=10.244.7.1/24\nHAKO_IPV6_SUBNET=fd44:7::/64\nHAKO_MTU=1400\n",
    );
    let p1 = NetNs::new("pod").unwrap();
    let p2 = NetNs::new("pod").unwrap();
    let r1 = exec(node, &Call::attach("ADD", "pod-one", &p1), &net.conf);
    let r2 = exec(node, &Call::attach("ADD", "pod-two", &p2), &net.conf);
    let (r1, r2) = (r1.result().clone(), r2.result().clone());
    let ip1 = result_ipv4(&r1);
    let ip2 = result_ipv4(&r2);
    assert_ne!(ip1, ip2);
    assert!(ip1.starts_with("10.244.7."), "{r1}");
    // The container sees exactly what the result says: address, default route, MTU.
    let addr = p1.ip(&["-o", "addr", "show", "dev", "eth0"]).unwrap();
    for ip in r1["ips"].as_array().unwrap() {
        let a = ip["address"].as_str().unwrap();
        assert!(addr.contains(a), "{a} not in {addr}");
    }
    let routes = p1.ip(&["route", "show", "default"]).unwrap();
    assert!(routes.contains("via 10.244.7.1 dev eth0"), "{routes}");
    let routes6 = p1.ip(&["-6", "route", "show", "default"]).unwrap();
    assert!(routes6.contains("via fd44:7::1 dev eth0"), "{routes6}");
    let link = p1.ip(&["link", "show", "eth0"]).unwrap();
    assert!(link.contains("mtu 1400"), "{link}");
    assert_eq!(r1["interfaces"][2]["mtu"], 1400);
    assert_eq!(
        r1["interfaces"][2]["sandbox"],
        p1.path().display().to_string()
    );
    assert_eq!(
        r1["interfaces"][2]["mac"].as_str().unwrap(),
        link.split("link/ether ")
            .nth(1)
            .unwrap()
            .split(' ')
            .next()
            .unwrap()
    );
    // Host side: bridge with the gateway, hairpin on, one masquerade rule set.
    let br = node.ip(&["-o", "addr", "show", "dev", "hako0"]).unwrap();
    assert!(
        br.contains("10.244.7.1/24") && br.contains("fd44:7::1/64"),
        "{br}"
    );
    let hv = r1["interfaces"][1]["name"].as_str().unwrap();
    let d = node.ip(&["-d", "link", "show", hv]).unwrap();
    assert!(
        d.contains("master hako0") && d.contains("hairpin on"),
        "{d}"
    );
    let nft = node.sh("nft list table inet hako_cni_hako0").unwrap();
    assert_eq!(nft.matches("masquerade").count(), 2, "{nft}");
    assert!(nft.contains("10.244.0.0/16"), "{nft}");
    // Traffic.
    assert!(ping(&p1, &ip2), "pod one cannot reach pod two");
    assert!(ping(&p2, &ip1), "pod two cannot reach pod one");
    assert!(ping(&p1, "10.244.7.1"), "pod one cannot reach the gateway");
    let ip2v6 = r2["ips"][1]["address"]
        .as_str()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string();
    assert!(ping(&p1, &ip2v6), "pod one cannot reach pod two over IPv6");
    // CHECK passes, then DEL cleans up, twice.
    let chk = net.with(json!({ "prevResult": r1 }));
    assert!(exec(node, &Call::attach("CHECK", "pod-one", &p1), &chk).ok);
    for _ in 0..2 {
        for (id, p) in [("pod-one", &p1), ("pod-two", &p2)] {
            let o = exec(node, &Call::attach("DEL", id, p), &net.conf);
            assert!(o.ok, "{o:?}");
            assert!(o.stdout.trim().is_empty(), "DEL printed {}", o.stdout);
        }
    }
    assert!(host_veths(node).is_empty(), "{:?}", host_veths(node));
    assert!(net.allocated().is_empty(), "{:?}", net.allocated());
    assert!(!p1.ip(&["link"]).unwrap().contains("eth0"));
}

/// Checks one result against the spec's shape for `v`.
fn validate_result(v: &str, r: &Value, netns: &str) {
    assert_eq!(r["cniVersion"], v, "{r}");
    let ifs = r["interfaces"].as_array().expect("interfaces");
    let ips = r["ips"].as_array().expect("ips");
    assert!(r["routes"].is_array());
    assert!(r["dns"].is_object());
    let old = v.starts_with("0.");
    for i in ifs {
        assert!(
            i["name"].is_string() && i["mac"].as_str().unwrap().len() == 17,
            "{i}"
        );
        let has_mtu = v == "1.1.0" && i["name"] != "hako0";
        assert_eq!(i.get("mtu").is_some(), has_mtu, "{v}: {i}");
    }
    for ip in ips {
        let a = ip["address"].as_str().unwrap();
        assert!(a.contains('/'), "{a}");
        assert_eq!(ip.get("version").is_some(), old, "{v}: {ip}");
        if old {
            assert_eq!(ip["version"], if a.contains(':') { "6" } else { "4" });
        }
        let idx = usize::try_from(ip["interface"].as_u64().unwrap()).unwrap();
        assert_eq!(
            ifs[idx]["sandbox"], netns,
            "{v}: ip points at the container interface"
        );
    }
}

#[test]
fn results_are_valid_for_every_supported_version() {
    hako_tests::require_root();
    let topo = Topology::new(1, 1500).unwrap();
    let node = &topo.nodes[0].ns;
    let net = TestNet::new(json!([{"subnet": "10.30.0.0/24"}, {"subnet": "fd30::/120"}]));
    for v in hako_cni::version::SUPPORTED {
        let pod = NetNs::new("pod").unwrap();
        let id = format!("ver-{}", v.replace('.', "-"));
        let conf = net.with(json!({ "cniVersion": v }));
        let r = exec(node, &Call::attach("ADD", &id, &pod), &conf);
        let r = r.result().clone();
        validate_result(v, &r, &pod.path().display().to_string());
        let chk = exec(
            node,
            &Call::attach("CHECK", &id, &pod),
            &net.with(json!({ "cniVersion": v, "prevResult": r })),
        );
        if v.starts_with("0.3") {
            assert_eq!(chk.code(), 1, "CHECK needs 0.4.0: {chk:?}");
        } else {
            assert!(chk.ok, "{v}: {chk:?}");
        }
        let st = exec(node, &Call::plain("STATUS"), &conf);
        if *v == "1.1.0" {
            assert!(st.ok, "{st:?}");
        } else {
            assert_eq!(st.code(), 1, "STATUS needs 1.1.0");
        }
        let ver = exec(node, &Call::plain("VERSION"), &conf);
        assert_eq!(ver.result()["cniVersion"], *v);
        assert_eq!(
            ver.result()["supportedVersions"],
            json!(hako_cni::version::SUPPORTED)
        );
        assert!(exec(node, &Call::attach("DEL", &id, &pod), &conf).ok);
    }
    assert!(net.allocated().is_empty());
    assert!(host_veths(node).is_empty());
}

#[test]
fn bad_input_gets_the_right_code_and_leaves_nothing_behind() {
    hako_tests::require_root();
    let topo = Topology::new(1, 1500).unwrap();
    let node = &topo.nodes[0].ns;
    let net = TestNet::new(json!([{"subnet": "10.31.0.0/30"}]));
    let pod = NetNs::new("pod").unwrap();
    let bin = cni_support::cni_bin();
    let nothing_left = |what: &str| {
        assert!(net.allocated().is_empty(), "{what}: {:?}", net.allocated());
        assert!(
            host_veths(node).is_empty(),
            "{what}: {:?}",
            host_veths(node)
        );
        assert!(!pod.ip(&["link"]).unwrap().contains("eth0"), "{what}");
    };
    let full = net.conf.to_string();
    let truncated = &full.as_bytes()[..full.len() / 2];
    let o = exec_raw(&bin, node, &Call::attach("ADD", "bad1", &pod), truncated);
    assert_eq!(o.code(), 6, "truncated JSON");
    assert_eq!(o.json["cniVersion"], "1.1.0");
    assert!(o.json["msg"].is_string());
    nothing_left("truncated");
    let o = exec(
        node,
        &Call::attach("ADD", "bad2", &pod),
        &net.with(json!({"cniVersion": "7.0.0"})),
    );
    assert_eq!(o.code(), 1, "unknown cniVersion");
    nothing_left("version");
    let mut call = Call::attach("ADD", "bad3", &pod);
    call.container_id = None;
    assert_eq!(
        exec(node, &call, &net.conf).code(),
        4,
        "missing CNI_CONTAINERID"
    );
    let mut call = Call::attach("ADD", "bad3", &pod);
    call.netns = None;
    assert_eq!(exec(node, &call, &net.conf).code(), 4, "missing CNI_NETNS");
    assert_eq!(
        exec(node, &Call::plain(""), &net.conf).code(),
        4,
        "missing CNI_COMMAND"
    );
    nothing_left("env");
    let mut call = Call::attach("ADD", "bad4", &pod);
    call.ifname = Some("et/h0");
    assert_eq!(exec(node, &call, &net.conf).code(), 4, "ifname with /");
    nothing_left("ifname");
    let mut call = Call::attach("ADD", "bad5", &pod);
    call.netns = Some("/run/netns/hk-does-not-exist".into());
    let o = exec(node, &call, &net.conf);
    assert_eq!(o.code(), 4, "missing netns path: {o:?}");
    nothing_left("netns");
    let o = exec(
        node,
        &Call::attach("ADD", "bad6", &pod),
        &net.with(json!({"mtu": 1})),
    );
    assert_eq!(o.code(), 7, "invalid config");
    nothing_left("config");
    // Exhaustion: a /30 has exactly one allocatable address besides the gateway.
    let first = exec(node, &Call::attach("ADD", "fits", &pod), &net.conf);
    let first = first.result().clone();
    assert_eq!(result_ipv4(&first), "10.31.0.2");
    let pod2 = NetNs::new("pod").unwrap();
    let o = exec(node, &Call::attach("ADD", "nofit", &pod2), &net.conf);
    assert_eq!(o.code(), 102, "exhausted: {o:?}");
    assert!(
        o.json["details"]
            .as_str()
            .unwrap()
            .contains("no free address"),
        "{o:?}"
    );
    assert_eq!(net.allocated(), vec!["10.31.0.2".to_string()]);
    assert_eq!(host_veths(node).len(), 1);
    assert!(!pod2.ip(&["link"]).unwrap().contains("eth0"));
    // STATUS reports the exhausted range as unavailable.
    assert_eq!(exec(node, &Call::plain("STATUS"), &net.conf).code(), 50);
    // CHECK of an unknown container: code 3.
    let mut call = Call::attach("CHECK", "fits", &pod);
    call.netns = Some("/run/netns/hk-gone".into());
    assert_eq!(
        exec(node, &call, &net.with(json!({"prevResult": first}))).code(),
        3
    );
    assert!(exec(node, &Call::attach("DEL", "fits", &pod), &net.conf).ok);
    nothing_left("after DEL");
    assert!(exec(node, &Call::plain("STATUS"), &net.conf).ok);
}

#[test]
fn add_failure_undoes_everything() {
    hako_tests::require_root();
    let topo = Topology::new(1, 1500).unwrap();
    let node = &topo.nodes[0].ns;
    let net = TestNet::new(json!([{"subnet": "10.32.0.0/24"}]));
    // The container already has an eth0: the veth cannot be created.
    let pod = NetNs::new("pod").unwrap();
    pod.ip(&[
        "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p",
    ])
    .unwrap();
    let o = exec(node, &Call::attach("ADD", "clash", &pod), &net.conf);
    assert!(!o.ok, "{o:?}");
    assert!(o.code() >= 100, "{o:?}");
    assert!(
        net.allocated().is_empty(),
        "reservation not undone: {:?}",
        net.allocated()
    );
    assert!(host_veths(node).is_empty());
    // The bridge name is taken by a non-bridge: invalid config, nothing reserved.
    let pod2 = NetNs::new("pod").unwrap();
    node.ip(&["link", "add", "brx", "type", "veth", "peer", "name", "brxp"])
        .unwrap();
    let o = exec(
        node,
        &Call::attach("ADD", "nobr", &pod2),
        &net.with(json!({"bridge": "brx"})),
    );
    assert_eq!(o.code(), 7, "{o:?}");
    let st = exec(
        node,
        &Call::plain("STATUS"),
        &net.with(json!({"bridge": "brx"})),
    );
    assert_eq!(st.code(), 50, "STATUS with an unusable bridge: {st:?}");
    assert!(net.allocated().is_empty());
    assert!(host_veths(node).is_empty());
    assert!(!pod2.ip(&["link"]).unwrap().contains("eth0"));
}

#[test]
fn del_is_idempotent_and_check_reports_drift() {
    hako_tests::require_root();
    let topo = Topology::new(1, 1500).unwrap();
    let node = &topo.nodes[0].ns;
    let net = TestNet::new(json!([{"subnet": "10.33.0.0/24"}]));
    let pod = NetNs::new("pod").unwrap();
    let r = exec(node, &Call::attach("ADD", "drift", &pod), &net.conf)
        .result()
        .clone();
    let chk = net.with(json!({ "prevResult": r }));
    let call = Call::attach("CHECK", "drift", &pod);
    assert!(exec(node, &call, &chk).ok);
    let addr = r["ips"][0]["address"].as_str().unwrap();
    pod.ip(&["addr", "del", addr, "dev", "eth0"]).unwrap();
    let o = exec(node, &call, &chk);
    assert_eq!(o.code(), 105, "{o:?}");
    assert!(o.json["details"].as_str().unwrap().contains(addr), "{o:?}");
    pod.ip(&["link", "del", "eth0"]).unwrap();
    assert_eq!(exec(node, &call, &chk).code(), 3, "missing interface");
    // DEL with the interface already gone, then with the netns gone: success, IP released.
    let pod2 = NetNs::new("pod").unwrap();
    let p2path = pod2.path();
    exec(node, &Call::attach("ADD", "gone", &pod2), &net.conf).result();
    drop(pod2);
    let mut del = Call::attach("DEL", "gone", &pod);
    del.netns = Some(p2path);
    assert!(exec(node, &del, &net.conf).ok);
    assert!(exec(node, &del, &net.conf).ok);
    assert!(exec(node, &Call::attach("DEL", "drift", &pod), &net.conf).ok);
    del.netns = None;
    assert!(exec(node, &del, &net.conf).ok, "DEL without CNI_NETNS");
    assert!(net.allocated().is_empty(), "{:?}", net.allocated());
    assert!(host_veths(node).is_empty(), "{:?}", host_veths(node));
}

#[test]
fn fifty_concurrent_adds_get_distinct_addresses_and_gc_collects() {
    hako_tests::require_root();
    let topo = Topology::new(1, 1500).unwrap();
    let node = &topo.nodes[0].ns;
    let net = TestNet::new(json!([{"subnet": "10.34.0.0/24"}]));
    let pods: Vec<NetNs> = (0..50).map(|_| NetNs::new("pod").unwrap()).collect();
    let results: Vec<Value> = std::thread::scope(|s| {
        let hs: Vec<_> = pods
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let conf = &net.conf;
                s.spawn(move || {
                    let id = format!("conc-{i}");
                    exec(node, &Call::attach("ADD", &id, p), conf)
                        .result()
                        .clone()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ips: HashSet<String> = results.iter().map(result_ipv4).collect();
    assert_eq!(ips.len(), 50, "addresses are not distinct: {ips:?}");
    assert!(!ips.contains("10.34.0.1"), "gateway handed out");
    assert_eq!(net.allocated().len(), 50);
    assert_eq!(host_veths(node).len(), 50);
    // GC without the list refuses instead of releasing everything.
    assert_eq!(exec(node, &Call::plain("GC"), &net.conf).code(), 7);
    assert_eq!(net.allocated().len(), 50);
    // GC keeping the first 25.
    let valid: Vec<Value> = (0..25)
        .map(|i| json!({"containerID": format!("conc-{i}"), "ifname": "eth0"}))
        .collect();
    let o = exec(
        node,
        &Call::plain("GC"),
        &net.with(json!({"cni.dev/valid-attachments": valid})),
    );
    assert!(o.ok, "{o:?}");
    assert_eq!(net.allocated().len(), 25);
    assert_eq!(host_veths(node).len(), 25);
    let kept: HashSet<String> = results[..25].iter().map(result_ipv4).collect();
    assert_eq!(kept, net.allocated().into_iter().collect::<HashSet<_>>());
    for (i, p) in pods.iter().enumerate().take(25) {
        let id = format!("conc-{i}");
        assert!(exec(node, &Call::attach("DEL", &id, p), &net.conf).ok);
    }
    assert!(net.allocated().is_empty());
    assert!(host_veths(node).is_empty());
}

#[test]
fn chains_with_reference_tuning_and_portmap() {
    hako_tests::require_root();
    let topo = Topology::new(1, 1500).unwrap();
    let node = &topo.nodes[0].ns;
    let net = TestNet::new(json!([{"subnet": "10.35.0.0/24"}]));
    let mut hako = net.conf.clone();
    let o = hako.as_object_mut().unwrap();
    o.remove("cniVersion");
    o.remove("name");
    let list = json!({
        "cniVersion": "1.0.0",
        "name": "hakotest",
        "plugins": [
            hako,
            {"type": "tuning", "sysctl": {"net.ipv4.conf.eth0.arp_accept": "1"}, "mtu": 1300},
            {"type": "portmap", "capabilities": {"portMappings": true},
             "runtimeConfig": {"portMappings": [{"hostPort": 18080, "containerPort": 80, "protocol": "tcp"}]}}
        ]
    });
    let pod = NetNs::new("pod").unwrap();
    let add = Call::attach("ADD", "chained", &pod);
    let result = chain_add(node, &list, &add);
    assert_eq!(result["cniVersion"], "1.0.0");
    let ip = result_ipv4(&result);
    // tuning acted on hako's interface from prevResult.
    assert_eq!(
        pod.sh("cat /proc/sys/net/ipv4/conf/eth0/arp_accept")
            .unwrap()
            .trim(),
        "1"
    );
    assert!(pod
        .ip(&["link", "show", "eth0"])
        .unwrap()
        .contains("mtu 1300"));
    // portmap consumed hako's prevResult: a DNAT to the pod address exists and works.
    let nat = node.sh("iptables-save -t nat").unwrap();
    assert!(nat.contains(&format!("{ip}:80")), "{nat}");
    let mut srv = pod
        .spawn("busybox nc -l -p 80 -e echo hello-from-pod")
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let node_ip = topo.nodes[0].ip.to_string();
    let got = node
        .sh(&format!(
            "busybox nc -w 2 {node_ip} 18080 </dev/null || true"
        ))
        .unwrap();
    let _ = srv.kill();
    let _ = srv.wait();
    assert!(
        got.contains("hello-from-pod"),
        "port mapping did not reach the pod: {got:?}"
    );
    // CHECK with the cached result, then DEL in reverse. portmap 1.1.1's own CHECK is left
    // out: it always checks its IPv6 chain with the IPv4 rules and fails with any plugin.
    let mut check_list = list.clone();
    check_list["plugins"].as_array_mut().unwrap().truncate(2);
    let checks = chain_run(
        node,
        &check_list,
        &Call::attach("CHECK", "chained", &pod),
        &result,
    );
    assert_eq!(checks.len(), 2);
    for o in checks {
        assert!(o.ok, "{o:?}");
    }
    for o in chain_run(node, &list, &Call::attach("DEL", "chained", &pod), &result) {
        assert!(o.ok, "{o:?}");
    }
    let nat = node.sh("iptables-save -t nat").unwrap();
    assert!(!nat.contains(&format!("{ip}:80")), "{nat}");
    assert!(net.allocated().is_empty());
    assert!(host_veths(node).is_empty());
}

#[test]
fn masquerade_lets_pods_reach_outside_the_cluster() {
    hako_tests::require_root();
    // Node 1 is "outside": it has no route back to the pod network.
    let topo = Topology::new(2, 1500).unwrap();
    let node = &topo.nodes[0].ns;
    let outside = topo.nodes[1].ip.to_string();
    let masq = TestNet::new(json!([{"subnet": "10.36.0.0/24"}]));
    let pod = NetNs::new("pod").unwrap();
    exec(node, &Call::attach("ADD", "masq", &pod), &masq.conf).result();
    assert!(
        ping(&pod, &outside),
        "masqueraded pod cannot reach {outside}"
    );
    assert!(exec(node, &Call::attach("DEL", "masq", &pod), &masq.conf).ok);
    // The same without masquerade on another bridge: replies have no way back.
    let plain = TestNet::new(json!([{"subnet": "10.37.0.0/24"}]));
    let conf = plain.with(json!({"ipMasq": false, "bridge": "hako1"}));
    let pod2 = NetNs::new("pod").unwrap();
    exec(node, &Call::attach("ADD", "plain", &pod2), &conf).result();
    assert!(
        !ping(&pod2, &outside),
        "reached {outside} without masquerade"
    );
    let nft = node.sh("nft list tables").unwrap();
    assert!(
        nft.contains("hako_cni_hako0") && !nft.contains("hako_cni_hako1"),
        "{nft}"
    );
    assert!(exec(node, &Call::attach("DEL", "plain", &pod2), &conf).ok);
}

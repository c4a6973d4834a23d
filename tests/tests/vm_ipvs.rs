//! IPVS in the VM lane's guest (the host kernel has none): a virtual service with real
//! servers is created in a fresh network namespace with `ipvsadm`, listed back, invisible
//! from the root namespace, and deleted.
#![cfg(feature = "vm")]

use hako_tests::netns::run;
use hako_tests::vm::require_guest;
use hako_tests::NetNs;

/// The listing's lines with runs of whitespace collapsed, for exact comparisons.
fn normalized(listing: &str) -> Vec<String> {
    listing
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|l| !l.is_empty())
        .collect()
}

/// A namespace like a node's: a dummy device holding the virtual IP (kube-ipvs0's role)
/// and a dummy "pod network" so that real server addresses are unicast-routable.
fn ipvs_node() -> NetNs {
    let ns = NetNs::new("ipvs").unwrap();
    for (dev, addr) in [
        ("hako-ipvs0", "198.51.100.10/32"),
        ("pods0", "203.0.113.1/24"),
    ] {
        ns.ip(&["link", "add", dev, "type", "dummy"]).unwrap();
        ns.ip(&["addr", "add", addr, "dev", dev]).unwrap();
        ns.ip(&["link", "set", dev, "up"]).unwrap();
    }
    ns
}

#[test]
fn ipvs_virtual_service_is_created_listed_and_deleted_in_a_netns() {
    require_guest();
    let ns = ipvs_node();

    ns.sh("ipvsadm -A -t 198.51.100.10:80 -s rr && \
         ipvsadm -a -t 198.51.100.10:80 -r 203.0.113.5:8080 -m -w 1 && \
         ipvsadm -a -t 198.51.100.10:80 -r 203.0.113.6:8080 -m -w 3 && \
         ipvsadm -A -u 198.51.100.10:53 -s sh && \
         ipvsadm -a -u 198.51.100.10:53 -r 203.0.113.7:5353 -m")
        .unwrap();

    let listing = ns.sh("ipvsadm -L -n").unwrap();
    let lines = normalized(&listing);
    let services: Vec<&str> = lines
        .iter()
        .map(String::as_str)
        .filter(|l| l.starts_with("TCP ") || l.starts_with("UDP ") || l.starts_with("-> 203."))
        .collect();
    assert_eq!(
        services,
        [
            "TCP 198.51.100.10:80 rr",
            "-> 203.0.113.5:8080 Masq 1 0 0",
            "-> 203.0.113.6:8080 Masq 3 0 0",
            "UDP 198.51.100.10:53 sh",
            "-> 203.0.113.7:5353 Masq 1 0 0",
        ],
        "ipvsadm -L -n in {}:\n{listing}",
        ns.name()
    );

    // IPVS state is per network namespace.
    let root = run("ipvsadm", ["-L", "-n"]).unwrap();
    assert!(
        !root.contains("198.51.100.10"),
        "the service leaked into the root namespace:\n{root}"
    );

    ns.sh("ipvsadm -D -t 198.51.100.10:80 && ipvsadm -D -u 198.51.100.10:53")
        .unwrap();
    let after = ns.sh("ipvsadm -L -n").unwrap();
    assert!(
        !after.contains("198.51.100.10"),
        "services still listed after deletion:\n{after}"
    );
}

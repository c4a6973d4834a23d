//! Unit tests of the blob codec and the payload parser (pure). The blobs under
//! `testdata/xtables/` were read from the kernel (`IPT_SO_GET_INFO` header, then the
//! entries) after `iptables-legacy` built the rules of the `.save` file next to them.

use std::collections::BTreeSet;

use super::blob::{Info, Table, Target, Verdict};
use super::rules::{parse, parse_rule, Editor, Op, RuleError, SpecTarget};

fn load(name: &str) -> (Info, Vec<u8>) {
    let path = format!(
        "{}/testdata/xtables/{name}.blob",
        env!("CARGO_MANIFEST_DIR")
    );
    let b = std::fs::read(&path).expect("testdata blob");
    let u = |at: usize| u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    let mut info = Info {
        valid_hooks: u(32),
        num_entries: u(76),
        size: u(80),
        ..Info::default()
    };
    for h in 0..5 {
        info.hook_entry[h] = u(36 + 4 * h);
        info.underflow[h] = u(56 + 4 * h);
    }
    (info, b[84..].to_vec())
}

#[test]
fn decode_encode_of_kernel_blobs_is_byte_identical() {
    for name in ["filter", "nat"] {
        let (info, b) = load(name);
        assert_eq!(b.len(), info.size as usize, "{name}");
        let t = Table::decode(name, &info, &b).expect("decode");
        let (i2, b2, old) = t.encode().expect("encode");
        assert_eq!(i2, info, "{name}: info");
        assert!(b2 == b, "{name}: bytes differ");
        // Every entry maps to itself.
        let want: Vec<Option<u32>> = (0..info.num_entries).map(Some).collect();
        assert_eq!(old, want, "{name}");
    }
}

#[test]
fn decode_finds_chains_policies_jumps_and_gotos() {
    let (info, b) = load("filter");
    let t = Table::decode("filter", &info, &b).expect("decode");
    let names: Vec<&str> = t.chains.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["INPUT", "FORWARD", "OUTPUT", "DOCKER"]);
    let docker = t.chain("DOCKER").expect("DOCKER");
    // A RETURN rule in the middle of a user chain is a rule, not its end.
    let d = &t.chains[docker];
    assert_eq!(d.rules.len(), 4, "{d:?}");
    assert_eq!(d.rules[1].target, Target::Standard(Verdict::Fallthrough));
    assert_eq!(d.rules[2].target, Target::Standard(Verdict::Return));
    assert_eq!(d.tail.target, Target::Standard(Verdict::Return));
    let fwd = &t.chains[t.chain("FORWARD").expect("FORWARD")];
    assert_eq!(fwd.rules[0].jump(), Some(docker));
    assert_eq!(fwd.tail.target, Target::Standard(Verdict::Accept));

    let (info, b) = load("nat");
    let t = Table::decode("nat", &info, &b).expect("decode");
    let out = &t.chains[t.chain("OUTPUT").expect("OUTPUT")];
    assert!(out.rules[0].is_goto());
    assert_eq!(out.rules[0].jump(), t.chain("DOCKER"));
}

#[test]
fn decode_refuses_broken_blobs_without_panicking() {
    let (info, b) = load("nat");
    // Truncations and bit flips anywhere: an error or a table, never a panic.
    for cut in (0..b.len()).step_by(8) {
        let _ = Table::decode("nat", &info, &b[..cut]);
    }
    for at in (0..b.len()).step_by(3) {
        let mut c = b.clone();
        c[at] ^= 0xa5;
        let _ = Table::decode("nat", &info, &c);
    }
    let mut bad = info.clone();
    bad.hook_entry[0] = 8;
    assert!(Table::decode("nat", &bad, &b).is_err());
    bad = info.clone();
    bad.num_entries += 1;
    assert!(Table::decode("nat", &bad, &b).is_err());
}

/// Every `-A` line of a save file that hako's parser takes encodes to the bytes the
/// kernel holds for it (iptables-legacy built them).
#[test]
fn parsed_rules_encode_as_iptables_does() {
    let mut checked = 0;
    for name in ["filter", "nat"] {
        let (info, b) = load(name);
        let t = Table::decode(name, &info, &b).expect("decode");
        let save = std::fs::read_to_string(format!(
            "{}/testdata/xtables/{name}.save",
            env!("CARGO_MANIFEST_DIR")
        ))
        .expect("save");
        let mut pos: std::collections::HashMap<String, usize> = Default::default();
        for l in save.lines().filter(|l| l.starts_with("-A ")) {
            let w: Vec<String> = super::split_words(l);
            let chain = w[1].clone();
            let i = pos.entry(chain.clone()).or_insert(0);
            let rule = &t.chains[t.chain(&chain).expect("chain")].rules[*i];
            *i += 1;
            let spec = match parse_rule(&w[2..]) {
                Ok(s) => s,
                Err(e) => {
                    // Only the foreign multiport rule is outside the subset.
                    assert!(l.contains("multiport"), "{l}: {e}");
                    continue;
                }
            };
            assert_eq!(spec.ip, rule.ip, "{l}: ipt_ip");
            assert_eq!(spec.matches, rule.matches.get(&t.src), "{l}: matches");
            match (&spec.target, &rule.target) {
                (SpecTarget::Raw(a), Target::Raw(b)) => {
                    assert_eq!(a, b.get(&t.src), "{l}: target");
                }
                (SpecTarget::Chain(c), Target::Standard(Verdict::Jump(j))) => {
                    assert_eq!(c, &t.chains[*j].name, "{l}");
                }
                (SpecTarget::Verdict(v), Target::Standard(w)) => assert_eq!(v, w, "{l}"),
                (SpecTarget::None, Target::Standard(Verdict::Fallthrough)) => {}
                (a, b) => panic!("{l}: {a:?} vs {b:?}"),
            }
            checked += 1;
        }
    }
    assert!(checked >= 12, "{checked}");
}

/// Each rule shape the renderer writes parses (tables built by the renderer itself).
#[test]
fn every_rendered_shape_parses() {
    use crate::iptables::{Family, RenderOpts, Renderer, JUMPS, LOCALNET_DROP};
    use crate::model::{Endpoint, Model, Protocol, ServiceKey, ServicePort};
    let ep = |ip: &str, local| Endpoint {
        ip: ip.parse().expect("ip"),
        port: 8080,
        ready: true,
        serving: true,
        terminating: false,
        local,
    };
    let mut m = Model::new();
    let mut add = |name: &str, proto, f: &dyn Fn(&mut ServicePort)| {
        let mut p = ServicePort {
            key: ServiceKey {
                namespace: "ns".into(),
                name: name.into(),
            },
            port_name: "p".into(),
            protocol: proto,
            cluster_ips: vec!["10.96.0.1".parse().expect("ip")],
            port: 80,
            node_port: Some(30080),
            external_ips: vec!["198.51.100.1".parse().expect("ip")],
            lb_ips: vec!["192.0.2.1".parse().expect("ip")],
            lb_source_ranges: vec!["203.0.113.0/24".into()],
            affinity_seconds: None,
            external_local: false,
            internal_local: false,
            endpoints: vec![ep("10.244.1.2", true), ep("10.244.1.3", false)],
        };
        f(&mut p);
        m.insert(p.key.clone(), vec![p]);
    };
    add("a", Protocol::Tcp, &|_| {});
    add("b", Protocol::Udp, &|p| p.affinity_seconds = Some(60));
    add("c", Protocol::Sctp, &|p| p.external_local = true);
    add("d", Protocol::Tcp, &|p| p.internal_local = true);
    add("e", Protocol::Tcp, &|p| p.endpoints.clear());
    add("f", Protocol::Udp, &|p| {
        p.external_local = true;
        p.endpoints = vec![ep("10.244.2.2", false)];
    });
    for opts in [
        RenderOpts {
            cluster_cidr: Some("10.244.0.0/16".into()),
            ..RenderOpts::default()
        },
        RenderOpts {
            masquerade_all: true,
            nodeport_addresses: vec!["127.0.0.0/8".into(), "192.168.0.0/16".into()],
            ..RenderOpts::default()
        },
    ] {
        let mut r = Renderer::new(Family::V4);
        let full = r.full(&m, &opts, &BTreeSet::from(["KUBE-SEP-OLD".to_string()]));
        let secs = parse(&full.text).unwrap_or_else(|e| panic!("{e}"));
        let n: usize = secs.iter().map(|s| s.ops.len()).sum();
        assert!(n > 60, "{n}");
        assert!(secs
            .iter()
            .flat_map(|s| &s.ops)
            .any(|(_, o)| matches!(o, Op::Delete(c) if c == "KUBE-SEP-OLD")));
    }
    for (_, _, rule) in JUMPS {
        parse_rule(&super::split_words(rule)).unwrap_or_else(|e| panic!("{rule}: {e}"));
    }
    let w = super::split_words(LOCALNET_DROP);
    parse_rule(&w[2..]).expect("KUBE-FIREWALL rule");
}

#[test]
fn bad_lines_are_errors_naming_the_line() {
    let cases: &[(&str, usize)] = &[
        (
            "*nat\n-A X -m multiport --dports 1,2 -j ACCEPT\nCOMMIT\n",
            2,
        ),
        (
            "*nat\n:X - [0:0]\n-A X -j SNAT --to-source 1.2.3.4\nCOMMIT\n",
            3,
        ),
        ("*nat\n-A X -s 300.1.1.1 -j ACCEPT\nCOMMIT\n", 2),
        ("*nat\n-A X -m tcp --dport 80 -j ACCEPT\nCOMMIT\n", 2),
        ("*nat\n-A X -m comment --comment \"open\nCOMMIT\n", 2),
        (
            "*nat\n-A X -p tcp -m tcp --dport 99999 -j ACCEPT\nCOMMIT\n",
            2,
        ),
        (
            "*nat\n-A X -m statistic --mode nth --every 2 -j ACCEPT\nCOMMIT\n",
            2,
        ),
        ("*nat\n-A X ! -m tcp -j ACCEPT\nCOMMIT\n", 2),
        ("*nat\n-A X -j MARK --or-mark zz\nCOMMIT\n", 2),
        ("*nat\n-D X 1\nCOMMIT\n", 2),
        ("*nat\n:X ACCEPTED [0:0]\nCOMMIT\n", 2),
        ("-A X -j ACCEPT\n", 1),
        ("*nat\n-A X -j ACCEPT\n", 2),
        ("*nat\n-A X -j DNAT --to-destination 1.2.3.4:x\nCOMMIT\n", 2),
        ("*nat\n-A X -j ACCEPT -m comment --comment y\nCOMMIT\n", 2),
        ("*nat\n-A X -s\nCOMMIT\n", 2),
    ];
    for (text, line) in cases {
        match parse(text) {
            Err(RuleError::Parse { line: l, .. }) => assert_eq!(l, *line, "{text}"),
            other => panic!("{text}: {other:?}"),
        }
    }
}

fn editor(name: &str) -> Editor {
    let (info, b) = load(name);
    Editor::new(Table::decode(name, &info, &b).expect("decode"))
}

fn apply(ed: &mut Editor, text: &str) -> Result<(), RuleError> {
    for s in parse(text)? {
        ed.apply_section(&s)?;
    }
    Ok(())
}

#[test]
fn restore_semantics() {
    let mut ed = editor("nat");
    // Declaring an existing chain flushes it; a new one is created empty.
    apply(
        &mut ed,
        "*nat\n:DOCKER - [0:0]\n:KUBE-NEW - [0:0]\n-A KUBE-NEW -j DOCKER\n-I KUBE-NEW -j RETURN\n-I KUBE-NEW 3 -j ACCEPT\nCOMMIT\n",
    )
    .expect("apply");
    let t = &ed.table;
    assert!(t.chains[t.chain("DOCKER").expect("DOCKER")]
        .rules
        .is_empty());
    let new = &t.chains[t.chain("KUBE-NEW").expect("new")];
    let targets: Vec<&Target> = new.rules.iter().map(|r| &r.target).collect();
    assert_eq!(
        targets,
        [
            &Target::Standard(Verdict::Return),
            &Target::Standard(Verdict::Jump(t.chain("DOCKER").expect("d"))),
            &Target::Standard(Verdict::Accept)
        ]
    );
    // Chains come out sorted after the built-in ones, as iptables lays them out.
    let order: Vec<&str> = t
        .order()
        .iter()
        .map(|&i| t.chains[i].name.as_str())
        .collect();
    assert_eq!(
        order,
        [
            "PREROUTING",
            "INPUT",
            "OUTPUT",
            "POSTROUTING",
            "DOCKER",
            "KUBE-NEW",
            "KUBE-SERVICES"
        ]
    );
    // In use: no -X (OUTPUT goes to DOCKER, KUBE-NEW jumps to it).
    assert!(apply(&mut ed, "*nat\n-X DOCKER\nCOMMIT\n").is_err());
    // Not empty: no -X.
    assert!(apply(&mut ed, "*nat\n-X KUBE-NEW\nCOMMIT\n").is_err());
    // Flushed and unreferenced: gone, and its jumps no longer count.
    apply(&mut ed, "*nat\n:KUBE-NEW - [0:0]\n-X KUBE-NEW\nCOMMIT\n").expect("delete");
    assert!(ed.table.chain("KUBE-NEW").is_none());
    assert!(apply(&mut ed, "*nat\n-A KUBE-NEW -j RETURN\nCOMMIT\n").is_err());
    // Built-in chains: policy, never deleted, never jumped to.
    apply(&mut ed, "*nat\n:OUTPUT DROP [0:0]\nCOMMIT\n").expect("policy");
    let out = &ed.table.chains[ed.table.chain("OUTPUT").expect("o")];
    assert_eq!(out.tail.target, Target::Standard(Verdict::Drop));
    assert_eq!(out.rules.len(), 1, "a policy does not flush");
    assert!(apply(&mut ed, "*nat\n-X OUTPUT\nCOMMIT\n").is_err());
    assert!(apply(&mut ed, "*nat\n-A DOCKER -j OUTPUT\nCOMMIT\n").is_err());
    assert!(apply(&mut ed, "*nat\n-I DOCKER 5 -j RETURN\nCOMMIT\n").is_err());
    // The result encodes and decodes to the same table.
    let (info, b, _) = ed.table.encode().expect("encode");
    let back = Table::decode("nat", &info, &b).expect("decode");
    assert_eq!(back.encode().expect("again").1, b);
}

#[test]
fn ensure_inserts_once() {
    let mut ed = editor("nat");
    let spec = parse_rule(&super::split_words(
        "-m comment --comment \"k s\" -j KUBE-SERVICES",
    ))
    .expect("rule");
    let op = Op::Ensure {
        chain: "OUTPUT".into(),
        rule: spec,
    };
    ed.apply(&op).expect("ensure");
    ed.apply(&op).expect("ensure");
    let out = &ed.table.chains[ed.table.chain("OUTPUT").expect("o")];
    assert_eq!(out.rules.len(), 2);
    assert_eq!(out.rules[0].jump(), ed.table.chain("KUBE-SERVICES"));
}

proptest::proptest! {
    /// Whatever the payload, the parser answers (Ok or Err) and never panics; so does
    /// applying what it took to a real table.
    #[test]
    fn parser_never_panics(lines in proptest::collection::vec(
        proptest::string::string_regex("(\\*nat|COMMIT|:[A-Z-]{1,8} (-|ACCEPT) \\[0:0\\]|-[AIX] [A-Z-]{1,8}( (!|-[spdioj]|-m|--[a-z-]{2,10}|[a-z0-9./:\" -]{1,12})){0,8})")
            .expect("regex"),
        0..12,
    )) {
        let text = lines.join("\n");
        if let Ok(secs) = parse(&text) {
            let mut ed = editor("nat");
            for s in &secs {
                let _ = ed.apply_section(s);
            }
            let _ = ed.table.encode();
        }
    }

    #[test]
    fn arbitrary_text_never_panics(text in "\\PC{0,200}") {
        let _ = parse(&text);
    }
}

#[test]
fn words_split_as_iptables_restore_does() {
    let w = super::rules::words_for_test(
        r#"-A X -m comment --comment "a \"b\" c" -m comment --comment "" x"y z"w"#,
    )
    .expect("words");
    assert_eq!(
        w,
        [
            "-A",
            "X",
            "-m",
            "comment",
            "--comment",
            "a \"b\" c",
            "-m",
            "comment",
            "--comment",
            "",
            "xy zw"
        ]
    );
    assert!(super::rules::words_for_test("-A X \"open").is_err());
}

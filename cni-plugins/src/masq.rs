//! IP masquerade of pod traffic leaving the cluster networks: one nftables table per bridge
//! (`inet hako_cni_<bridge>`, the default `ipMasqBackend`), or with `ipMasqBackend:
//! "iptables"` one nat chain per bridge and family (`HAKO-MASQ-<hash>`, jumped to from
//! POSTROUTING for the bridge's subnets), rendered purely (`render`, `render_iptables`,
//! `rules`) and loaded atomically with one `nft -f -` or `iptables-restore --noflush`
//! (`ensure`, effectful).
//! Loaded when the bridge is created or the ruleset changed; otherwise a marker file in the
//! data directory makes the check a single small read (no process on the ADD path).

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

use crate::config::Network;
use crate::skel::{codes, CniError};

/// The nftables table name for a bridge.
pub fn table_name(bridge: &str) -> String {
    let clean: String = bridge
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("hako_cni_{clean}")
}

/// Renders the nft script: (re)creates the table atomically, so loading it twice is a
/// no-op in effect.
pub fn render(bridge: &str, net: &Network) -> String {
    let t = table_name(bridge);
    let mut rules = String::new();
    for r in &net.ranges {
        let v4 = r.subnet.addr().is_ipv4();
        let fam = if v4 { "ip" } else { "ip6" };
        let mut keep: Vec<String> = net
            .cluster
            .iter()
            .filter(|c| c.addr().is_ipv4() == v4)
            .map(|c| c.to_string())
            .collect();
        keep.push(if v4 {
            "224.0.0.0/4".into()
        } else {
            "ff00::/8".into()
        });
        rules.push_str(&format!(
            "    {fam} saddr {} {fam} daddr != {{ {} }} masquerade\n",
            r.subnet,
            keep.join(", ")
        ));
    }
    format!(
        "add table inet {t}\ndelete table inet {t}\ntable inet {t} {{\n  chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n{rules}  }}\n}}\n"
    )
}

/// Where the masquerade rules live (`ipMasqBackend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    /// One nftables table per bridge (the default).
    #[default]
    Nftables,
    /// One iptables nat chain per bridge and family.
    Iptables,
}

/// The iptables rules of one family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IptablesFamily {
    /// `iptables` or `ip6tables` (the restore binary is `<cmd>-restore`).
    pub cmd: &'static str,
    /// `iptables-restore --noflush` input: declares (and so flushes) the chain, fills it.
    pub restore: String,
    /// The POSTROUTING jump rules (arguments after `-t nat -C|-A`), one per subnet.
    pub jumps: Vec<Vec<String>>,
}

/// The iptables chain name of a bridge (`HAKO-MASQ-` + 12 hex of sha256(bridge)).
pub fn chain_name(bridge: &str) -> String {
    let h = hex::encode(Sha256::digest(format!("hako-masq\0{bridge}").as_bytes()));
    format!("HAKO-MASQ-{}", h[..12].to_uppercase())
}

/// Renders the iptables rules per family: the chain returns for the cluster networks and
/// multicast and masquerades the rest; POSTROUTING jumps to it for the bridge's subnets.
pub fn render_iptables(bridge: &str, net: &Network) -> Vec<IptablesFamily> {
    let chain = chain_name(bridge);
    let mut out = Vec::new();
    for v4 in [true, false] {
        let subnets: Vec<String> = net
            .ranges
            .iter()
            .filter(|r| r.subnet.addr().is_ipv4() == v4)
            .map(|r| r.subnet.to_string())
            .collect();
        if subnets.is_empty() {
            continue;
        }
        let mut restore = format!("*nat\n:{chain} - [0:0]\n");
        let keep = net
            .cluster
            .iter()
            .filter(|c| c.addr().is_ipv4() == v4)
            .map(|c| c.to_string())
            .chain([if v4 { "224.0.0.0/4" } else { "ff00::/8" }.to_string()]);
        for k in keep {
            restore.push_str(&format!("-A {chain} -d {k} -j RETURN\n"));
        }
        restore.push_str(&format!("-A {chain} -j MASQUERADE\nCOMMIT\n"));
        let jumps = subnets
            .into_iter()
            .map(|s| {
                [
                    "POSTROUTING",
                    "-s",
                    &s,
                    "-m",
                    "comment",
                    "--comment",
                    &format!("hako-cni masquerade {bridge}"),
                    "-j",
                    &chain,
                ]
                .iter()
                .map(|a| a.to_string())
                .collect()
            })
            .collect();
        out.push(IptablesFamily {
            cmd: if v4 { "iptables" } else { "ip6tables" },
            restore,
            jumps,
        });
    }
    out
}

/// The masquerade rules of one bridge, rendered, and where their marker lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    /// Table name (`hako_cni_<bridge>`) or iptables chain name.
    pub table: String,
    /// The nft script ([`render`]); for iptables, the restore inputs (for the marker).
    pub script: String,
    /// The iptables rules (empty with nftables).
    pub iptables: Vec<IptablesFamily>,
    /// Directory of the marker file (the IPAM data directory).
    pub marker_dir: PathBuf,
}

/// The rules for `bridge` and `net` with `backend`, the marker in `data_dir`. Pure.
pub fn rules(bridge: &str, data_dir: &Path, net: &Network, backend: Backend) -> Rules {
    match backend {
        Backend::Nftables => Rules {
            table: table_name(bridge),
            script: render(bridge, net),
            iptables: vec![],
            marker_dir: data_dir.to_path_buf(),
        },
        Backend::Iptables => {
            let iptables = render_iptables(bridge, net);
            let script = iptables
                .iter()
                .map(|f| format!("{}\n{}{:?}\n", f.cmd, f.restore, f.jumps))
                .collect();
            Rules {
                table: chain_name(bridge),
                script,
                iptables,
                marker_dir: data_dir.to_path_buf(),
            }
        }
    }
}

/// Runs `cmd args` with `input` on stdin; Err(stderr) on failure.
pub(crate) fn run(cmd: &str, args: &[&str], input: Option<&[u8]>) -> Result<bool, String> {
    let mut child = Command::new(cmd)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawning {cmd}: {e}"))?;
    if let (Some(mut stdin), Some(data)) = (child.stdin.take(), input) {
        stdin
            .write_all(data)
            .map_err(|e| format!("writing to {cmd}: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("waiting for {cmd}: {e}"))?;
    if out.status.success() {
        return Ok(true);
    }
    // `-C` answers 1 for a missing rule; anything else is an error.
    if args.contains(&"-C") && out.status.code() == Some(1) {
        return Ok(false);
    }
    Err(format!(
        "{cmd} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    ))
}

/// Loads the iptables rules: the chains atomically, then each missing jump once.
fn load_iptables(families: &[IptablesFamily]) -> Result<(), String> {
    for f in families {
        let restore = format!("{}-restore", f.cmd);
        run(&restore, &["--noflush", "-w"], Some(f.restore.as_bytes()))?;
        for jump in &f.jumps {
            let mut check = vec!["-w", "-t", "nat", "-C"];
            check.extend(jump.iter().map(String::as_str));
            if !run(f.cmd, &check, None)? {
                let mut add = vec!["-w", "-t", "nat", "-A"];
                add.extend(jump.iter().map(String::as_str));
                run(f.cmd, &add, None)?;
            }
        }
    }
    Ok(())
}

/// Ensures the masquerade table. `bridge_created` forces a load.
pub fn ensure(rules: &Rules, bridge_created: bool) -> Result<(), CniError> {
    let script = &rules.script;
    let hash = hex::encode(Sha256::digest(script.as_bytes()));
    let ns_ino = std::fs::metadata("/proc/thread-self/ns/net")
        .map(|m| m.ino())
        .unwrap_or(0);
    let marker = rules
        .marker_dir
        .join(format!("masq-{ns_ino}-{}", rules.table));
    if !bridge_created && std::fs::read_to_string(&marker).is_ok_and(|m| m == hash) {
        return Ok(());
    }
    let err = |d: String| CniError::new(codes::MASQUERADE, "cannot install masquerade rules", d);
    if !rules.iptables.is_empty() {
        load_iptables(&rules.iptables).map_err(err)?;
        return write_marker(rules, &marker, &hash);
    }
    // One `nft -f -`: one transaction.
    run("nft", &["-f", "-"], Some(script.as_bytes())).map_err(err)?;
    write_marker(rules, &marker, &hash)
}

fn write_marker(rules: &Rules, marker: &Path, hash: &str) -> Result<(), CniError> {
    let _ = std::fs::create_dir_all(&rules.marker_dir);
    if let Err(e) = std::fs::write(marker, hash) {
        tracing::warn!("cannot write {}: {e}", marker.display());
    }
    tracing::info!(table = %rules.table, "masquerade rules loaded");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{resolve, NetConf};

    #[test]
    fn renders_one_rule_per_family() {
        let c = NetConf::parse(br#"{"cniVersion":"1.0.0","name":"n","bridge":"br.0","clusterNetwork":["10.244.0.0/16"],"ipam":{"ranges":[{"subnet":"10.244.1.0/24"},{"subnet":"fd00:1::/64"}]}}"#).unwrap();
        let n = resolve(&c, None).unwrap();
        let s = render(&c.bridge, &n);
        assert_eq!(
            s,
            "add table inet hako_cni_br_0\ndelete table inet hako_cni_br_0\ntable inet hako_cni_br_0 {\n  chain postrouting {\n    type nat hook postrouting priority srcnat; policy accept;\n    ip saddr 10.244.1.0/24 ip daddr != { 10.244.0.0/16, 224.0.0.0/4 } masquerade\n    ip6 saddr fd00:1::/64 ip6 daddr != { fd00:1::/64, ff00::/8 } masquerade\n  }\n}\n"
        );
        let ipt = render_iptables(&c.bridge, &n);
        let chain = chain_name("br.0");
        assert!(
            chain.starts_with("HAKO-MASQ-") && chain.len() <= 28,
            "{chain}"
        );
        assert_eq!(ipt.len(), 2);
        assert_eq!(ipt[0].cmd, "iptables");
        assert_eq!(
            ipt[0].restore,
            format!("*nat\n:{chain} - [0:0]\n-A {chain} -d 10.244.0.0/16 -j RETURN\n-A {chain} -d 224.0.0.0/4 -j RETURN\n-A {chain} -j MASQUERADE\nCOMMIT\n")
        );
        assert_eq!(
            ipt[0].jumps,
            [[
                "POSTROUTING",
                "-s",
                "10.244.1.0/24",
                "-m",
                "comment",
                "--comment",
                "hako-cni masquerade br.0",
                "-j",
                &chain
            ]]
        );
        assert_eq!(ipt[1].cmd, "ip6tables");
        assert!(ipt[1].restore.contains("-d ff00::/8 -j RETURN"));
        let r = rules(&c.bridge, Path::new("/x"), &n, Backend::Iptables);
        assert_eq!((r.table, r.iptables), (chain, ipt));
    }
}

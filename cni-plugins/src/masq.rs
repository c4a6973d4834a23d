//! IP masquerade of pod traffic leaving the cluster networks: one nftables table per bridge
//! (`inet hako_cni_<bridge>`), rendered purely (`render`, `rules`) and loaded atomically
//! with one `nft -f -` (`ensure`, effectful).
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

/// The masquerade table of one bridge, rendered, and where its marker lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    /// Table name (`hako_cni_<bridge>`).
    pub table: String,
    /// The nft script ([`render`]).
    pub script: String,
    /// Directory of the marker file (the IPAM data directory).
    pub marker_dir: PathBuf,
}

/// The rules for `bridge` and `net`, with the marker in `data_dir`. Pure.
pub fn rules(bridge: &str, data_dir: &Path, net: &Network) -> Rules {
    Rules {
        table: table_name(bridge),
        script: render(bridge, net),
        marker_dir: data_dir.to_path_buf(),
    }
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
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| err(format!("spawning nft: {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(|e| err(format!("writing to nft: {e}")))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| err(format!("waiting for nft: {e}")))?;
    if !out.status.success() {
        return Err(err(format!(
            "nft -f: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let _ = std::fs::create_dir_all(&rules.marker_dir);
    if let Err(e) = std::fs::write(&marker, &hash) {
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
    }
}

//! `macspoofchk`: frames entering the bridge from a pod's host veth must carry the pod
//! interface's MAC. One nftables table `bridge hako_spoofchk` holds a verdict map from host
//! veth name to a per-attachment chain (`ether saddr <mac> return; drop`), so adding and
//! removing an attachment touches only its own element and chain, in one transaction.
//! Rendering is pure (`render_add`, `render_del`); `load` runs `nft -f -` (effectful).

use crate::netlink::fmt_mac;
use crate::skel::{codes, CniError};

/// The table (family `bridge`).
pub const TABLE: &str = "hako_spoofchk";

fn chain(host: &str) -> String {
    format!("a-{host}")
}

fn base() -> String {
    format!(
        "add table bridge {TABLE}\n\
         add map bridge {TABLE} ports {{ type ifname : verdict; }}\n"
    )
}

/// The script that admits only `mac` from `host` (idempotent; replaces an older MAC).
pub fn render_add(host: &str, mac: &[u8; 6]) -> String {
    let c = chain(host);
    let mac = fmt_mac(mac);
    format!(
        "{}add chain bridge {TABLE} prerouting {{ type filter hook prerouting priority -300; policy accept; }}\n\
         flush chain bridge {TABLE} prerouting\n\
         add rule bridge {TABLE} prerouting iifname vmap @ports\n\
         add chain bridge {TABLE} {c}\n\
         flush chain bridge {TABLE} {c}\n\
         add rule bridge {TABLE} {c} ether saddr {mac} return\n\
         add rule bridge {TABLE} {c} drop\n\
         add element bridge {TABLE} ports {{ \"{host}\" : jump {c} }}\n",
        base()
    )
}

/// The script that removes `host`'s element and chain; adding them first makes it succeed
/// when they are already gone (a repeated DEL).
pub fn render_del(host: &str) -> String {
    let c = chain(host);
    format!(
        "{}add chain bridge {TABLE} {c}\n\
         add element bridge {TABLE} ports {{ \"{host}\" : jump {c} }}\n\
         delete element bridge {TABLE} ports {{ \"{host}\" }}\n\
         flush chain bridge {TABLE} {c}\n\
         delete chain bridge {TABLE} {c}\n",
        base()
    )
}

/// Loads a script with one `nft -f -` (one transaction).
pub fn load(script: &str) -> Result<(), CniError> {
    let err = |d: String| CniError::new(codes::SPOOFCHK, "cannot apply macspoofchk rules", d);
    crate::masq::run("nft", &["-f", "-"], Some(script.as_bytes())).map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripts() {
        let add = render_add("hakoabc", &[2, 0, 0, 0, 0, 9]);
        assert!(add.contains(
            "add rule bridge hako_spoofchk a-hakoabc ether saddr 02:00:00:00:00:09 return\n"
        ));
        assert!(add.ends_with(
            "add element bridge hako_spoofchk ports { \"hakoabc\" : jump a-hakoabc }\n"
        ));
        let del = render_del("hakoabc");
        let d = del.find("delete element").unwrap();
        assert!(del.find("add element").unwrap() < d);
        assert!(
            d < del
                .find("delete chain bridge hako_spoofchk a-hakoabc")
                .unwrap()
        );
    }
}

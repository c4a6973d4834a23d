//! Capability sets: containerd's default set and name parsing. Pure.

use caps::Capability;
use std::collections::HashSet;
use std::str::FromStr;

/// containerd's (and Docker's) default capability set.
pub const DEFAULT_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// An unknown capability name.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown capability {0:?}")]
pub struct UnknownCapability(pub String);

/// Parse a capability name, with or without the `CAP_` prefix, any case.
pub fn parse(name: &str) -> Result<Capability, UnknownCapability> {
    let up = name.to_ascii_uppercase();
    let full = if up.starts_with("CAP_") {
        up
    } else {
        format!("CAP_{up}")
    };
    Capability::from_str(&full).map_err(|_| UnknownCapability(name.to_string()))
}

/// Parse a list of names into a set.
pub fn parse_set(names: &[String]) -> Result<HashSet<Capability>, UnknownCapability> {
    names.iter().map(|n| parse(n)).collect()
}

/// The default set, parsed.
pub fn default_set() -> HashSet<Capability> {
    DEFAULT_CAPS.iter().filter_map(|n| parse(n).ok()).collect()
}

/// Compute the set for Kubernetes-style `add`/`drop` lists (`ALL` allowed in either).
pub fn with_add_drop(
    add: &[String],
    drop: &[String],
) -> Result<HashSet<Capability>, UnknownCapability> {
    let mut set = default_set();
    if drop.iter().any(|d| d.eq_ignore_ascii_case("ALL")) {
        set.clear();
    } else {
        for d in drop {
            set.remove(&parse(d)?);
        }
    }
    if add.iter().any(|a| a.eq_ignore_ascii_case("ALL")) {
        set.extend(caps::all());
    } else {
        for a in add {
            set.insert(parse(a)?);
        }
    }
    Ok(set)
}

/// The `CapEff`-style bit mask of a set (bit n = capability number n).
pub fn mask(set: &HashSet<Capability>) -> u64 {
    set.iter().fold(0u64, |m, c| m | c.bitmask())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_names() {
        assert_eq!(parse("net_admin"), Ok(Capability::CAP_NET_ADMIN));
        assert_eq!(parse("CAP_KILL"), Ok(Capability::CAP_KILL));
        assert!(parse("CAP_NOPE").is_err());
    }

    #[test]
    fn default_mask_matches_docker() {
        // Docker's well-known default CapEff.
        assert_eq!(mask(&default_set()), 0x00000000a80425fb);
    }

    #[test]
    fn add_drop() {
        let s = with_add_drop(&["NET_ADMIN".into()], &["ALL".into()]).unwrap();
        assert_eq!(s.len(), 1);
        let s = with_add_drop(&[], &["KILL".into()]).unwrap();
        assert!(!s.contains(&Capability::CAP_KILL));
        assert_eq!(s.len(), DEFAULT_CAPS.len() - 1);
    }
}

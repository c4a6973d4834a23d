//! Resolution of an image `USER` string against the container's /etc/passwd and /etc/group
//! text. Pure: callers read the files.

/// A resolved identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary groups (from /etc/group membership plus the spec's extras).
    pub groups: Vec<u32>,
    /// Home directory (for `HOME` when the spec does not set it).
    pub home: String,
}

/// User resolution errors.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UserError {
    /// The user name is not in /etc/passwd.
    #[error("unknown user name {0:?} (not in the image's /etc/passwd)")]
    UnknownUser(String),
    /// The group name is not in /etc/group.
    #[error("unknown group name {0:?} (not in the image's /etc/group)")]
    UnknownGroup(String),
}

struct PasswdEntry<'a> {
    name: &'a str,
    uid: u32,
    gid: u32,
    home: &'a str,
}

fn passwd_entries(passwd: &str) -> impl Iterator<Item = PasswdEntry<'_>> {
    passwd.lines().filter_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        if f.len() < 6 {
            return None;
        }
        Some(PasswdEntry {
            name: f[0],
            uid: f[2].parse().ok()?,
            gid: f[3].parse().ok()?,
            home: f[5],
        })
    })
}

fn group_entries(group: &str) -> impl Iterator<Item = (&str, u32, Vec<&str>)> {
    group.lines().filter_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        if f.len() < 3 {
            return None;
        }
        let members = f
            .get(3)
            .map(|m| m.split(',').filter(|s| !s.is_empty()).collect())
            .unwrap_or_default();
        Some((f[0], f[2].parse().ok()?, members))
    })
}

/// Resolve `spec` (`""`, `uid`, `name`, `uid:gid`, `name:group`) as containerd does: numeric ids
/// need no passwd entry; names must exist.
pub fn resolve(
    spec: &str,
    extra_gids: &[u32],
    passwd: &str,
    group: &str,
) -> Result<Identity, UserError> {
    let (user, grp) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let user = if user.is_empty() { "0" } else { user };
    let (uid, mut gid, home, name) = if let Ok(uid) = user.parse::<u32>() {
        match passwd_entries(passwd).find(|e| e.uid == uid) {
            Some(e) => (uid, e.gid, e.home.to_string(), Some(e.name.to_string())),
            None => (uid, 0, "/".to_string(), None),
        }
    } else {
        let e = passwd_entries(passwd)
            .find(|e| e.name == user)
            .ok_or_else(|| UserError::UnknownUser(user.to_string()))?;
        (e.uid, e.gid, e.home.to_string(), Some(e.name.to_string()))
    };
    if let Some(g) = grp {
        gid = match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => group_entries(group)
                .find(|(n, _, _)| *n == g)
                .map(|(_, id, _)| id)
                .ok_or_else(|| UserError::UnknownGroup(g.to_string()))?,
        };
    }
    let mut groups = vec![gid];
    if let Some(name) = &name {
        for (_, id, members) in group_entries(group) {
            if members.iter().any(|m| m == name) && !groups.contains(&id) {
                groups.push(id);
            }
        }
    }
    for g in extra_gids {
        if !groups.contains(g) {
            groups.push(*g);
        }
    }
    Ok(Identity {
        uid,
        gid,
        groups,
        home,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n";
    const GROUP: &str = "root:x:0:\napp:x:1000:\nwheel:x:10:app\nstaff:x:50:\n";

    #[test]
    fn table() {
        type Case<'a> = (&'a str, &'a [u32], Result<(u32, u32, Vec<u32>), UserError>);
        let cases: &[Case] = &[
            ("", &[], Ok((0, 0, vec![0]))),
            ("app", &[], Ok((1000, 1000, vec![1000, 10]))),
            ("1000", &[], Ok((1000, 1000, vec![1000, 10]))),
            ("1234", &[], Ok((1234, 0, vec![0]))),
            ("1234:99", &[7], Ok((1234, 99, vec![99, 7]))),
            ("app:staff", &[], Ok((1000, 50, vec![50, 10]))),
            ("nobody", &[], Err(UserError::UnknownUser("nobody".into()))),
            (
                "app:nogroup",
                &[],
                Err(UserError::UnknownGroup("nogroup".into())),
            ),
        ];
        for (spec, extra, want) in cases {
            let got = resolve(spec, extra, PASSWD, GROUP).map(|i| (i.uid, i.gid, i.groups));
            assert_eq!(&got, want, "{spec}");
        }
    }
}

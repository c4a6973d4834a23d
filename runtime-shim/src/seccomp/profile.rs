//! Seccomp profiles in the OCI / Docker JSON format (`defaultAction`, `defaultErrnoRet`,
//! `architectures`, `syscalls[{names, action, errnoRet, args[{index, value, valueTwo, op}],
//! includes, excludes}]`), and their resolution for one container (its capabilities, x86_64)
//! into a [`Policy`]: per system call number, rules with an action each. Pure.

use super::bpf::{Policy, Rule};
use super::syscalls;
use caps::Capability;
use seccompiler::{SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;

/// The largest profile file accepted (moby's default profile is about 20 KiB).
pub const MAX_PROFILE_BYTES: u64 = 1 << 20;

/// A seccomp profile document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Profile {
    /// Action for system calls no rule matches.
    pub default_action: Action,
    /// errno for an `SCMP_ACT_ERRNO` default action (EPERM when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_errno_ret: Option<u32>,
    /// Architectures (`SCMP_ARCH_X86_64`, ...). The filter is always built for the native
    /// x86_64 ABI only; other ABIs are refused (see [`super::bpf`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub architectures: Vec<String>,
    /// Rules.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub syscalls: Vec<Syscall>,
}

/// A rule: the calls named, the action, and conditions on the arguments (all must hold).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Syscall {
    /// System call names.
    #[serde(default)]
    pub names: Vec<String>,
    /// Old Docker format: one name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Action when the rule matches.
    pub action: Action,
    /// errno for `SCMP_ACT_ERRNO` (the profile's `defaultErrnoRet`, else EPERM, when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errno_ret: Option<u32>,
    /// Argument conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<Arg>,
    /// The rule applies only when all of these hold (Docker format).
    #[serde(default, skip_serializing_if = "Filter::is_empty")]
    pub includes: Filter,
    /// The rule does not apply when any of these holds (Docker format).
    #[serde(default, skip_serializing_if = "Filter::is_empty")]
    pub excludes: Filter,
}

/// Conditions on the container a rule applies to.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Filter {
    /// Capabilities (`CAP_SYS_ADMIN`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub caps: Vec<String>,
    /// Go architecture names (`amd64`, `arm64`, ...).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub arches: Vec<String>,
    /// Minimum kernel version; the kernels hako runs on are newer than any the profiles name,
    /// so this is accepted and not checked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_kernel: Option<String>,
}

impl Filter {
    fn is_empty(&self) -> bool {
        self.caps.is_empty() && self.arches.is_empty() && self.min_kernel.is_none()
    }
}

/// A condition on one argument.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Arg {
    /// Argument index, 0..=5.
    pub index: u32,
    /// Compared value (the mask for `SCMP_CMP_MASKED_EQ`).
    pub value: u64,
    /// For `SCMP_CMP_MASKED_EQ`: the value the masked argument must equal.
    #[serde(default)]
    pub value_two: u64,
    /// Comparison.
    pub op: Op,
}

/// Seccomp actions (libseccomp names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Action {
    /// Allow.
    #[serde(rename = "SCMP_ACT_ALLOW")]
    Allow,
    /// Fail with an errno.
    #[serde(rename = "SCMP_ACT_ERRNO")]
    Errno,
    /// Kill the thread (libseccomp's historical name).
    #[serde(rename = "SCMP_ACT_KILL")]
    Kill,
    /// Kill the thread.
    #[serde(rename = "SCMP_ACT_KILL_THREAD")]
    KillThread,
    /// Kill the process.
    #[serde(rename = "SCMP_ACT_KILL_PROCESS")]
    KillProcess,
    /// SIGSYS.
    #[serde(rename = "SCMP_ACT_TRAP")]
    Trap,
    /// Notify a ptrace tracer (fails with ENOSYS without one).
    #[serde(rename = "SCMP_ACT_TRACE")]
    Trace,
    /// Allow and log.
    #[serde(rename = "SCMP_ACT_LOG")]
    Log,
    /// User notification: needs a listener, which hako does not run; refused.
    #[serde(rename = "SCMP_ACT_NOTIFY")]
    Notify,
}

/// Argument comparisons (libseccomp names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// `!=`
    #[serde(rename = "SCMP_CMP_NE")]
    Ne,
    /// `<`
    #[serde(rename = "SCMP_CMP_LT")]
    Lt,
    /// `<=`
    #[serde(rename = "SCMP_CMP_LE")]
    Le,
    /// `==`
    #[serde(rename = "SCMP_CMP_EQ")]
    Eq,
    /// `>=`
    #[serde(rename = "SCMP_CMP_GE")]
    Ge,
    /// `>`
    #[serde(rename = "SCMP_CMP_GT")]
    Gt,
    /// `(arg & value) == valueTwo`
    #[serde(rename = "SCMP_CMP_MASKED_EQ")]
    MaskedEq,
}

/// A profile that cannot be turned into a filter.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProfileError {
    /// The JSON does not parse.
    #[error("invalid seccomp profile: {0}")]
    Parse(String),
    /// An action hako cannot implement.
    #[error("seccomp action {0:?} is not supported")]
    UnsupportedAction(Action),
    /// An argument index above 5.
    #[error("seccomp rule for {0}: argument index {1} is out of range (0..=5)")]
    ArgIndex(String, u32),
    /// An unknown capability in includes/excludes.
    #[error("seccomp rule for {0}: unknown capability {1}")]
    Capability(String, String),
    /// A rule names no system call.
    #[error("seccomp rule without names")]
    NoNames,
}

impl Profile {
    /// Parse a profile document.
    pub fn parse(data: &[u8]) -> Result<Profile, ProfileError> {
        serde_json::from_slice(data).map_err(|e| ProfileError::Parse(e.to_string()))
    }

    /// The filter policy for a container holding `caps` on x86_64: rules whose `includes`
    /// hold and `excludes` do not, names mapped to numbers (unknown names skipped), rules with
    /// the default action dropped (as runc does). Returns the policy and the skipped names.
    pub fn policy(
        &self,
        caps: &HashSet<Capability>,
    ) -> Result<(Policy, Vec<String>), ProfileError> {
        let default_errno = self.default_errno_ret.unwrap_or(libc::EPERM as u32);
        let default = action(self.default_action, self.default_errno_ret, default_errno)?;
        let mut policy = Policy::new(default.clone());
        let mut skipped = Vec::new();
        for s in &self.syscalls {
            let names: Vec<&str> = s
                .names
                .iter()
                .map(String::as_str)
                .chain(s.name.as_deref())
                .collect();
            let first = *names.first().ok_or(ProfileError::NoNames)?;
            if !applies(s, caps, first)? {
                continue;
            }
            let act = action(s.action, s.errno_ret, default_errno)?;
            if act == default {
                continue;
            }
            let conds = s
                .args
                .iter()
                .map(|a| condition(a, first))
                .collect::<Result<Vec<_>, _>>()?;
            for n in names {
                match syscalls::number(n) {
                    Some(nr) => policy.add(
                        nr,
                        Rule {
                            action: act.clone(),
                            conditions: conds.clone(),
                        },
                    ),
                    None => skipped.push(n.to_string()),
                }
            }
        }
        skipped.sort();
        skipped.dedup();
        Ok((policy, skipped))
    }
}

/// The Go names this node's architecture goes by in `includes.arches`.
const NATIVE_ARCHES: &[&str] = &["amd64", "x86_64", "SCMP_ARCH_X86_64"];

fn applies(s: &Syscall, caps: &HashSet<Capability>, name: &str) -> Result<bool, ProfileError> {
    let cap = |c: &String| {
        crate::capabilities::parse(c)
            .map_err(|_| ProfileError::Capability(name.to_string(), c.clone()))
    };
    for c in &s.includes.caps {
        if !caps.contains(&cap(c)?) {
            return Ok(false);
        }
    }
    for c in &s.excludes.caps {
        if caps.contains(&cap(c)?) {
            return Ok(false);
        }
    }
    let native = |a: &Vec<String>| a.iter().any(|x| NATIVE_ARCHES.contains(&x.as_str()));
    if !s.includes.arches.is_empty() && !native(&s.includes.arches) {
        return Ok(false);
    }
    Ok(!native(&s.excludes.arches))
}

fn action(
    a: Action,
    errno: Option<u32>,
    default_errno: u32,
) -> Result<SeccompAction, ProfileError> {
    // errno values live in the 16 data bits of the filter's return value.
    let data = |e: u32| e.min(0xffff);
    Ok(match a {
        Action::Allow => SeccompAction::Allow,
        Action::Errno => SeccompAction::Errno(data(errno.unwrap_or(default_errno))),
        Action::Kill | Action::KillThread => SeccompAction::KillThread,
        Action::KillProcess => SeccompAction::KillProcess,
        Action::Trap => SeccompAction::Trap,
        // runc passes errnoRet (else the profile's default errno) as the tracer's message.
        Action::Trace => SeccompAction::Trace(data(errno.unwrap_or(default_errno))),
        Action::Log => SeccompAction::Log,
        Action::Notify => return Err(ProfileError::UnsupportedAction(a)),
    })
}

fn condition(a: &Arg, name: &str) -> Result<SeccompCondition, ProfileError> {
    let op = match a.op {
        Op::Ne => SeccompCmpOp::Ne,
        Op::Lt => SeccompCmpOp::Lt,
        Op::Le => SeccompCmpOp::Le,
        Op::Eq => SeccompCmpOp::Eq,
        Op::Ge => SeccompCmpOp::Ge,
        Op::Gt => SeccompCmpOp::Gt,
        Op::MaskedEq => SeccompCmpOp::MaskedEq(a.value),
    };
    let value = if a.op == Op::MaskedEq {
        a.value_two
    } else {
        a.value
    };
    let index = u8::try_from(a.index)
        .ok()
        .filter(|i| *i <= 5)
        .ok_or_else(|| ProfileError::ArgIndex(name.to_string(), a.index))?;
    // libseccomp compares all 64 bits of an argument.
    SeccompCondition::new(index, SeccompCmpArgLen::Qword, op, value)
        .map_err(|_| ProfileError::ArgIndex(name.to_string(), a.index))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DENY_MKDIR: &str = r#"{
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [
            {"names": ["mkdir", "mkdirat", "no_such_call"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13},
            {"names": ["personality"], "action": "SCMP_ACT_ERRNO",
             "args": [{"index": 0, "value": 8, "op": "SCMP_CMP_NE"}], "comment": "ignored"},
            {"names": ["reboot"], "action": "SCMP_ACT_ALLOW"},
            {"names": ["clone"], "action": "SCMP_ACT_ERRNO",
             "args": [{"index": 0, "value": 2114060288, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}],
             "excludes": {"caps": ["CAP_SYS_ADMIN"]}},
            {"names": ["syslog"], "action": "SCMP_ACT_KILL", "includes": {"arches": ["arm64"]}}
        ]
    }"#;

    #[test]
    fn parses_and_resolves() {
        let p = Profile::parse(DENY_MKDIR.as_bytes()).unwrap();
        let (pol, skipped) = p.policy(&HashSet::new()).unwrap();
        assert_eq!(skipped, ["no_such_call"]);
        assert_eq!(pol.default, SeccompAction::Allow);
        let mk = &pol.syscalls[&libc::SYS_mkdir];
        assert_eq!(mk[0].action, SeccompAction::Errno(13));
        assert!(mk[0].conditions.is_empty());
        assert!(pol.syscalls.contains_key(&libc::SYS_mkdirat));
        assert!(pol.syscalls.contains_key(&libc::SYS_personality));
        assert!(pol.syscalls.contains_key(&libc::SYS_clone));
        assert!(
            !pol.syscalls.contains_key(&libc::SYS_reboot),
            "same action as the default"
        );
        assert!(
            !pol.syscalls.contains_key(&libc::SYS_syslog),
            "other architecture"
        );
        let admin = [Capability::CAP_SYS_ADMIN].into_iter().collect();
        let (pol, _) = p.policy(&admin).unwrap();
        assert!(
            !pol.syscalls.contains_key(&libc::SYS_clone),
            "excluded by cap"
        );
    }

    #[test]
    fn rejects_bad_profiles() {
        for (doc, want) in [
            ("{", "invalid seccomp profile"),
            (
                r#"{"defaultAction": "SCMP_ACT_NOPE"}"#,
                "invalid seccomp profile",
            ),
            (r#"{"syscalls": []}"#, "invalid seccomp profile"),
            (r#"{"defaultAction": "SCMP_ACT_NOTIFY"}"#, "not supported"),
            (
                r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ERRNO", "args": [{"index": 6, "value": 1, "op": "SCMP_CMP_EQ"}]}]}"#,
                "argument index 6",
            ),
            (
                r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ERRNO", "includes": {"caps": ["CAP_NOPE"]}}]}"#,
                "unknown capability",
            ),
            (
                r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"action": "SCMP_ACT_ERRNO"}]}"#,
                "without names",
            ),
        ] {
            let err = Profile::parse(doc.as_bytes())
                .and_then(|p| p.policy(&HashSet::new()).map(|_| ()))
                .unwrap_err();
            assert!(err.to_string().contains(want), "{doc}: {err}");
        }
    }

    #[test]
    fn round_trips() {
        let p = Profile::parse(DENY_MKDIR.as_bytes()).unwrap();
        let again = Profile::parse(&serde_json::to_vec(&p).unwrap()).unwrap();
        assert_eq!(p, again);
    }
}

//! Compilation of a [`Policy`] (per system call number, rules with their own action each, and
//! a default action) into one classic-BPF seccomp program for x86_64. `seccompiler` compiles
//! the argument conditions of each rule; this module lays out the program around them, since
//! `seccompiler`'s own filters have a single match action. Pure.
//!
//! Layout (the same as `seccompiler`'s, with a return per rule):
//! ```text
//!   ld arch; jeq AUDIT_ARCH_X86_64 ? +1 : 0; ret KILL_PROCESS     other ABIs (i386) never run
//!   ld nr;   jge 0x40000000 ? 0 : +1;      ret ERRNO(EPERM)        x32 numbers always refused
//!   per number: jeq nr ? 0 : 1; per rule: [ja 1; ja skip; conditions...; ret action]; ret default
//!   ret default
//! ```
//! A rule's conditions jump to the next rule on a mismatch; a number mismatch hops over every
//! rule through the second `ja` of each. Rules of one number are ordered most restrictive
//! first, so the first rule that matches is the most restrictive matching one.

use seccompiler::{sock_filter, BpfProgram, SeccompAction, SeccompCondition, SeccompRule};
use std::collections::BTreeMap;

/// The x32 ABI marks its system call numbers with this bit.
pub const X32_SYSCALL_BIT: u32 = 0x4000_0000;
/// The kernel's limit on a filter's length (BPF_MAXINSNS).
pub const MAX_INSNS: usize = 4096;

const AUDIT_ARCH_X86_64: u32 = 62 | 0x8000_0000 | 0x4000_0000;
const SECCOMP_DATA_NR: u32 = 0;
const SECCOMP_DATA_ARCH: u32 = 4;
const BPF_LD_W_ABS: u16 = 0x20;
const BPF_JMP_JA: u16 = 0x05;
const BPF_JMP_JEQ_K: u16 = 0x05 | 0x10;
const BPF_JMP_JGE_K: u16 = 0x05 | 0x30;
const BPF_RET_K: u16 = 0x06;

/// One rule: an action taken when every condition holds (no conditions: always).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// What the kernel does when the rule matches.
    pub action: SeccompAction,
    /// Conditions on the arguments, all of which must hold.
    pub conditions: Vec<SeccompCondition>,
}

/// A filter before compilation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Action when no rule matches.
    pub default: SeccompAction,
    /// Rules per x86_64 system call number.
    pub syscalls: BTreeMap<i64, Vec<Rule>>,
}

/// The program does not fit in a kernel filter.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the seccomp filter has {0} instructions; the kernel accepts at most {MAX_INSNS}")]
pub struct TooLarge(pub usize);

impl Policy {
    /// A policy with no rules.
    pub fn new(default: SeccompAction) -> Policy {
        Policy {
            default,
            syscalls: BTreeMap::new(),
        }
    }

    /// Add a rule for system call `nr`.
    pub fn add(&mut self, nr: i64, rule: Rule) {
        self.syscalls.entry(nr).or_default().push(rule);
    }

    /// The action the program takes for a call with no argument conditions involved: the
    /// first unconditional rule of `nr`, else the default. For tests and messages.
    pub fn unconditional_action(&self, nr: i64) -> SeccompAction {
        let mut rules: Vec<&Rule> = self.syscalls.get(&nr).into_iter().flatten().collect();
        rules.sort_by_key(|r| precedence(&r.action));
        rules
            .into_iter()
            .find(|r| r.conditions.is_empty())
            .map(|r| r.action.clone())
            .unwrap_or_else(|| self.default.clone())
    }

    /// Compile to BPF.
    pub fn compile(&self) -> Result<BpfProgram, TooLarge> {
        let mut p = vec![
            stmt(BPF_LD_W_ABS, SECCOMP_DATA_ARCH),
            jump(BPF_JMP_JEQ_K, AUDIT_ARCH_X86_64, 1, 0),
            ret(&SeccompAction::KillProcess),
            stmt(BPF_LD_W_ABS, SECCOMP_DATA_NR),
            jump(BPF_JMP_JGE_K, X32_SYSCALL_BIT, 0, 1),
            ret(&SeccompAction::Errno(libc::EPERM as u32)),
        ];
        for (nr, rules) in &self.syscalls {
            let Ok(nr) = u32::try_from(*nr) else { continue };
            if rules.is_empty() {
                continue;
            }
            let mut rules: Vec<&Rule> = rules.iter().collect();
            rules.sort_by_key(|r| precedence(&r.action));
            p.push(jump(BPF_JMP_JEQ_K, nr, 0, 1));
            for r in rules {
                match SeccompRule::new(r.conditions.clone()) {
                    // The conditions, preceded by the two jumps described above.
                    Ok(rule) => p.extend(BpfProgram::from(rule)),
                    // No conditions: enter, or hop to the next rule's second jump.
                    Err(_) => p.extend([stmt(BPF_JMP_JA, 1), stmt(BPF_JMP_JA, 2)]),
                }
                p.push(ret(&r.action));
            }
            p.push(ret(&self.default));
            if p.len() > MAX_INSNS {
                return Err(TooLarge(p.len()));
            }
        }
        p.push(ret(&self.default));
        if p.len() > MAX_INSNS {
            return Err(TooLarge(p.len()));
        }
        Ok(p)
    }
}

/// The kernel's order of actions, most restrictive first (`seccomp_run_filters`).
fn precedence(a: &SeccompAction) -> u8 {
    match a {
        SeccompAction::KillProcess => 0,
        SeccompAction::KillThread => 1,
        SeccompAction::Trap => 2,
        SeccompAction::Errno(_) => 3,
        SeccompAction::Trace(_) => 4,
        SeccompAction::Log => 5,
        SeccompAction::Allow => 6,
    }
}

fn stmt(code: u16, k: u32) -> sock_filter {
    sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter { code, jt, jf, k }
}

fn ret(a: &SeccompAction) -> sock_filter {
    stmt(BPF_RET_K, u32::from(a.clone()))
}

/// A classic-BPF interpreter for the instructions [`Policy::compile`] emits (and those of
/// `seccompiler`'s conditions), to check programs in unit tests without installing them.
#[cfg(test)]
pub fn run(prog: &[sock_filter], arch: u32, nr: u32, args: [u64; 6]) -> u32 {
    let word = |off: u32| -> u32 {
        match off {
            0 => nr,
            4 => arch,
            16..=63 => {
                let a = args[((off - 16) / 8) as usize];
                let half = if off % 8 == 0 { a } else { a >> 32 };
                (half & 0xffff_ffff) as u32
            }
            _ => panic!("load at {off}"),
        }
    };
    let (mut pc, mut acc) = (0usize, 0u32);
    loop {
        let i = &prog[pc];
        pc += 1;
        match i.code {
            0x20 => acc = word(i.k),
            0x54 => acc &= i.k,
            0x05 => pc += i.k as usize,
            0x06 => return i.k,
            c if c & 0x07 == 0x05 => {
                let t = match c & 0xf0 {
                    0x10 => acc == i.k,
                    0x20 => acc > i.k,
                    0x30 => acc >= i.k,
                    0x40 => acc & i.k != 0,
                    op => panic!("jump op {op:#x}"),
                };
                pc += usize::from(if t { i.jt } else { i.jf });
            }
            c => panic!("opcode {c:#x}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use seccompiler::{SeccompCmpArgLen, SeccompCmpOp};

    const EPERM: u32 = 0x0005_0000 | 1;
    const ALLOW: u32 = 0x7fff_0000;

    fn cond(i: u8, op: SeccompCmpOp, v: u64) -> SeccompCondition {
        SeccompCondition::new(i, SeccompCmpArgLen::Qword, op, v).unwrap()
    }

    fn policy() -> Policy {
        let mut p = Policy::new(SeccompAction::Errno(1));
        p.add(
            0,
            Rule {
                action: SeccompAction::Allow,
                conditions: vec![],
            },
        );
        // personality: allowed for 0 and 8 only.
        for v in [0, 8] {
            p.add(
                135,
                Rule {
                    action: SeccompAction::Allow,
                    conditions: vec![cond(0, SeccompCmpOp::Eq, v)],
                },
            );
        }
        // clone: allowed without namespace flags; ENOSYS for a flag pattern; trap otherwise.
        p.add(
            56,
            Rule {
                action: SeccompAction::Allow,
                conditions: vec![cond(0, SeccompCmpOp::MaskedEq(0x7E02_0000), 0)],
            },
        );
        p.add(
            56,
            Rule {
                action: SeccompAction::Errno(38),
                conditions: vec![
                    cond(0, SeccompCmpOp::MaskedEq(0x1000_0000), 0x1000_0000),
                    cond(1, SeccompCmpOp::Gt, 1 << 40),
                ],
            },
        );
        p.add(
            435,
            Rule {
                action: SeccompAction::Errno(38),
                conditions: vec![],
            },
        );
        p
    }

    #[test]
    fn runs_as_intended() {
        let prog = policy().compile().unwrap();
        let r = |nr: u32, args: [u64; 6]| run(&prog, AUDIT_ARCH_X86_64, nr, args);
        assert_eq!(r(0, [0; 6]), ALLOW);
        assert_eq!(r(1, [0; 6]), EPERM, "not listed");
        assert_eq!(r(X32_SYSCALL_BIT, [0; 6]), EPERM, "x32 read");
        assert_eq!(
            run(&prog, 0x4000_0003, 0, [0; 6]),
            0x8000_0000,
            "i386: kill"
        );
        assert_eq!(r(135, [8, 0, 0, 0, 0, 0]), ALLOW);
        assert_eq!(r(135, [0, 0, 0, 0, 0, 0]), ALLOW);
        assert_eq!(r(135, [0x0040_0000, 0, 0, 0, 0, 0]), EPERM);
        assert_eq!(r(135, [1 << 32, 0, 0, 0, 0, 0]), EPERM, "high word counts");
        assert_eq!(r(56, [0x11, 0, 0, 0, 0, 0]), ALLOW, "fork-like clone");
        assert_eq!(r(56, [0x1000_0000, 0, 0, 0, 0, 0]), EPERM, "CLONE_NEWUSER");
        assert_eq!(
            r(56, [0x1000_0000, 1 << 41, 0, 0, 0, 0]),
            0x0005_0000 | 38,
            "errno rule wins over allow"
        );
        assert_eq!(r(435, [0; 6]), 0x0005_0000 | 38);
        assert_eq!(policy().unconditional_action(435), SeccompAction::Errno(38));
        assert_eq!(policy().unconditional_action(1), SeccompAction::Errno(1));
    }

    #[test]
    fn too_large_is_an_error() {
        let mut p = Policy::new(SeccompAction::Errno(1));
        for nr in 0..1400 {
            p.add(
                nr,
                Rule {
                    action: SeccompAction::Allow,
                    conditions: vec![],
                },
            );
        }
        assert!(matches!(p.compile(), Err(TooLarge(_))));
    }
}

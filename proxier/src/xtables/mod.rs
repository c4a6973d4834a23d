//! iptables-legacy without `iptables-restore`: the kernel writer reads a table through
//! `IPT_SO_GET_INFO`/`IPT_SO_GET_ENTRIES`, applies a restore payload onto it with
//! `iptables-restore --noflush` semantics and writes it back with one `IPT_SO_SET_REPLACE`
//! per table (atomic per table), under the xtables lock. Effectful (the socket, the lock);
//! the layout ([`blob`]) and the payload parser ([`rules`]) are pure.

pub mod blob;
pub mod rules;
pub mod sys;

#[cfg(test)]
mod tests;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use self::blob::{BlobError, Table};
use self::rules::{Editor, Op, RuleError, Section};
use self::sys::{Socket, SysError};

/// Kernel writer failures. Every one but [`XtError::Lock`] leaves the kernel's tables as they
/// were before the failing table (tables before it in the payload are committed, as with
/// `iptables-restore`), and the caller may run the payload through `iptables-restore`.
#[derive(Debug, thiserror::Error)]
pub enum XtError {
    /// The payload is outside the subset the writer takes, or restore would refuse it.
    #[error(transparent)]
    Rules(#[from] RuleError),
    /// The kernel's table is not laid out as iptables lays it out.
    #[error(transparent)]
    Blob(#[from] BlobError),
    /// A socket call failed.
    #[error(transparent)]
    Sys(SysError),
    /// The xtables lock was not had in time.
    #[error(transparent)]
    Lock(SysError),
}

impl From<SysError> for XtError {
    fn from(e: SysError) -> Self {
        match e {
            SysError::LockBusy(..) => Self::Lock(e),
            e => Self::Sys(e),
        }
    }
}

/// What one restore did, for logs and benches.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Written {
    /// Tables replaced.
    pub tables: usize,
    /// Entries written in all of them.
    pub entries: usize,
    /// Bytes of entries written.
    pub bytes: usize,
}

/// The writer: the lock it takes and how long it waits for it.
#[derive(Debug, Clone)]
pub struct KernelWriter {
    lock_file: PathBuf,
    wait: Duration,
}

impl Default for KernelWriter {
    fn default() -> Self {
        Self::new(None)
    }
}

impl KernelWriter {
    /// A writer taking `lock_file` (None: `XTABLES_LOCKFILE` or `/run/xtables.lock`, as
    /// iptables-legacy), waiting at most 5 s for it (kube-proxy's `-w 5`).
    pub fn new(lock_file: Option<PathBuf>) -> Self {
        Self {
            lock_file: lock_file.unwrap_or_else(sys::default_lock_file),
            wait: Duration::from_secs(5),
        }
    }

    /// `iptables-restore --noflush` of `text`, then for each `(table, chain, rule)` of
    /// `ensure` an `-I chain rule` unless the chain holds that rule already (`iptables -C`).
    /// Nothing is written when the payload does not parse.
    pub fn restore(&self, text: &str, ensure: &[(&str, &str, &str)]) -> Result<Written, XtError> {
        let mut sections = rules::parse(text)?;
        for (table, chain, rule) in ensure {
            let words = split_words(rule);
            let spec = rules::parse_rule(&words).map_err(|why| RuleError::Parse {
                line: 0,
                text: (*rule).to_string(),
                why,
            })?;
            let op = Op::Ensure {
                chain: (*chain).to_string(),
                rule: spec,
            };
            match sections.iter_mut().rev().find(|s| s.table == *table) {
                Some(s) => s.ops.push((0, op)),
                None => sections.push(Section {
                    table: (*table).to_string(),
                    ops: vec![(0, op)],
                }),
            }
        }
        let _lock = sys::lock(&self.lock_file, self.wait)?;
        let sock = Socket::open()?;
        let mut w = Written::default();
        let n = sections.len();
        for (i, s) in sections.into_iter().enumerate() {
            let table = s.table.clone();
            match write_section(&sock, s) {
                Err(XtError::Sys(e)) if e.is_again() => {
                    // The table changed between read and replace (someone without the lock):
                    // once more from a fresh read, the section parsed again.
                    tracing::debug!(%table, "table changed during the write; again");
                    let again = rules::parse(text)?;
                    let s = again
                        .into_iter()
                        .nth(i)
                        .filter(|_| i < n && ensure.is_empty());
                    let Some(s) = s else {
                        return Err(XtError::Sys(e));
                    };
                    w.add(&write_section(&sock, s)?);
                }
                r => w.add(&r?),
            }
        }
        // The decoded table and the rules were small heap blocks: give them back.
        crate::mem::release_free_memory();
        Ok(w)
    }

    /// User chains of `table` whose names `keep` accepts (no lock: a read).
    pub fn user_chains(
        &self,
        table: &str,
        keep: impl Fn(&str) -> bool,
    ) -> Result<BTreeSet<String>, XtError> {
        let sock = Socket::open()?;
        let (_, b) = read(&sock, table)?;
        Ok(rules::blob_user_chains(&b)
            .filter_map(|n| std::str::from_utf8(n).ok())
            .filter(|n| keep(n))
            .map(str::to_string)
            .collect())
    }

    /// Whether `table` has a user chain `chain`.
    pub fn has_chain(&self, table: &str, chain: &str) -> Result<bool, XtError> {
        let sock = Socket::open()?;
        let (_, b) = read(&sock, table)?;
        Ok(rules::blob_has_chain(&b, chain))
    }
}

impl Written {
    fn add(&mut self, o: &Self) {
        self.tables += o.tables;
        self.entries += o.entries;
        self.bytes += o.bytes;
    }
}

/// A rule's words: split on spaces outside double quotes.
pub(crate) fn split_words(rule: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut q = false;
    for ch in rule.chars() {
        match ch {
            '"' => q = !q,
            ' ' if !q => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Reads `table`: its info and entries.
pub fn read(sock: &Socket, table: &str) -> Result<(blob::Info, Vec<u8>), XtError> {
    // The table may change between the two calls (EAGAIN from GET_ENTRIES): read again.
    for _ in 0..3 {
        let info = sock.info(table)?;
        match sock.entries(table, info.size) {
            Ok(b) => return Ok((info, b)),
            Err(SysError::Entries { source, .. })
                if source.raw_os_error() == Some(libc::EAGAIN) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let info = sock.info(table)?;
    let b = sock.entries(table, info.size)?;
    Ok((info, b))
}

/// Reads, edits and replaces one table.
fn write_section(sock: &Socket, s: Section) -> Result<Written, XtError> {
    let (info, b) = read(sock, &s.table)?;
    let table = Table::decode_owned(&s.table, &info, b)?;
    let mut ed = Editor::new(table);
    ed.apply_owned(s)?;
    let (new_info, mut buf, old) = ed.table.encode_after(sys::REPLACE)?;
    let old_entries = ed.table.old_entries;
    let name = ed.table.name.clone();
    drop(ed);
    let counters = sock.replace(&name, &new_info, &mut buf, old_entries)?;
    let bytes = buf.len() - sys::REPLACE;
    drop(buf);
    // Carry the counters of the entries kept over to their new places (iptables-restore
    // --noflush keeps them too); new and flushed rules start at zero.
    if counters.iter().any(|c| c != &[0, 0]) {
        let add: Vec<[u64; 2]> = old
            .iter()
            .map(|o| {
                o.and_then(|i| usize::try_from(i).ok())
                    .and_then(|i| counters.get(i).copied())
                    .unwrap_or([0, 0])
            })
            .collect();
        sock.add_counters(&name, &add)?;
    }
    Ok(Written {
        tables: 1,
        entries: old.len(),
        bytes,
    })
}

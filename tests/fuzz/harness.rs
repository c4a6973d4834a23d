//! Time-bounded fuzzing with proptest strategies, shared by the packages' `tests/fuzz.rs`
//! (included with `#[path]`; the stable toolchain has no libFuzzer sanitizers).
//!
//! [`fuzz`] draws inputs from a strategy until `HAKO_FUZZ_SECONDS` (default 5) have passed.
//! Each input gets its own seed, so one failing input is replayed with `HAKO_FUZZ_SEED`. An
//! input fails when the check returns an error, panics, allocates more than
//! `HAKO_FUZZ_MAX_MIB` (default 128) MiB beyond what its thread held before it, or runs past
//! `HAKO_FUZZ_INPUT_SECONDS` (default 5). Failures are shrunk with proptest's value trees and
//! reported with the minimal input. A watchdog thread ends the process (exit 70) when an input
//! hangs or when it grows past four times the allocation limit, naming the seed: those inputs
//! cannot be shrunk in process.
//!
//! [`quick`] runs a few deterministic cases through proptest's own runner, for the unit lane.

#![allow(dead_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::{Cell, RefCell};
use std::fmt::Debug;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use proptest::strategy::{Strategy, ValueTree};
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};

// ---- allocation accounting -------------------------------------------------------------

/// The system allocator, counting the bytes each thread holds, so one input's growth can be
/// measured and bounded.
struct Counting;

thread_local! {
    /// Bytes allocated minus bytes freed by this thread.
    static LIVE: Cell<i64> = const { Cell::new(0) };
    /// The highest `LIVE` since the current input started.
    static PEAK: Cell<i64> = const { Cell::new(0) };
    /// `LIVE` when the current input started; `i64::MAX` outside an input.
    static BASE: Cell<i64> = const { Cell::new(i64::MAX) };
    /// The hard limit of this thread's growth while an input runs.
    static HARD: Cell<i64> = const { Cell::new(i64::MAX) };
}

/// Set when an input went past the hard limit; the watchdog reports and exits.
static HARD_HIT: AtomicBool = AtomicBool::new(false);
static HARD_HIT_SEED: AtomicU64 = AtomicU64::new(0);
static HARD_HIT_BYTES: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static CURRENT_SEED: Cell<u64> = const { Cell::new(0) };
}

fn account(delta: i64) {
    let _ = LIVE.try_with(|l| {
        let now = l.get() + delta;
        l.set(now);
        let _ = PEAK.try_with(|p| {
            if now > p.get() {
                p.set(now);
            }
        });
        if delta > 0 {
            let base = BASE.try_with(Cell::get).unwrap_or(i64::MAX);
            let hard = HARD.try_with(Cell::get).unwrap_or(i64::MAX);
            if base != i64::MAX && now.saturating_sub(base) > hard {
                let seed = CURRENT_SEED.try_with(Cell::get).unwrap_or(0);
                HARD_HIT_SEED.store(seed, Ordering::SeqCst);
                HARD_HIT_BYTES.store(u64::try_from(now - base).unwrap_or(0), Ordering::SeqCst);
                HARD_HIT.store(true, Ordering::SeqCst);
                // The watchdog ends the process; allocating on would exhaust the machine.
                loop {
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }
    });
}

fn size_of(layout: Layout) -> i64 {
    i64::try_from(layout.size()).unwrap_or(i64::MAX)
}

#[allow(unsafe_code)]
// SAFETY: every method forwards to `System` with the caller's arguments unchanged; the
// accounting only touches const-initialized thread locals (no allocation, no destructor).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        account(size_of(layout));
        // SAFETY: forwarded as is; the caller upholds `GlobalAlloc::alloc`'s contract.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        account(size_of(layout));
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator, i.e. from `System`, with `layout`.
        unsafe { System.dealloc(ptr, layout) };
        account(-size_of(layout));
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        account(i64::try_from(new_size).unwrap_or(i64::MAX) - size_of(layout));
        // SAFETY: `ptr` came from `System` with `layout`; the caller upholds `realloc`'s
        // contract for `new_size`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

// ---- configuration ---------------------------------------------------------------------

fn env_f64(name: &str, default: f64) -> f64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .filter(|v: &f64| v.is_finite() && *v >= 0.0)
        .unwrap_or(default)
}

/// How long [`fuzz`] runs one target (`HAKO_FUZZ_SECONDS`, default 5).
pub fn budget() -> Duration {
    Duration::from_secs_f64(env_f64("HAKO_FUZZ_SECONDS", 5.0))
}

fn input_deadline() -> Duration {
    Duration::from_secs_f64(env_f64("HAKO_FUZZ_INPUT_SECONDS", 5.0).max(0.1))
}

fn soft_limit() -> i64 {
    // Whole MiB, so the cast cannot lose anything that matters.
    let mib = env_f64("HAKO_FUZZ_MAX_MIB", 128.0).min(1e6).round();
    // At most 1e6, so the conversion is exact.
    #[allow(clippy::cast_possible_truncation)]
    let mib = mib as i64;
    mib << 20
}

fn parse_seed(s: &str) -> Option<u64> {
    let s = s.trim();
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

// ---- panics ----------------------------------------------------------------------------

thread_local! {
    static QUIET: Cell<bool> = const { Cell::new(false) };
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Panics of a running input are recorded instead of printed (the report shows the
/// minimal one); every other panic goes to the previous hook.
fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if QUIET.with(Cell::get) {
                LAST_PANIC.with(|p| *p.borrow_mut() = Some(info.to_string()));
            } else {
                previous(info);
            }
        }));
    });
}

// ---- watchdog --------------------------------------------------------------------------

/// What the watchdog knows of one fuzzing thread.
struct Slot {
    name: &'static str,
    /// Milliseconds since `epoch()` when the current input started; 0 between inputs.
    started: AtomicU64,
    seed: AtomicU64,
}

fn epoch() -> Instant {
    static E: OnceLock<Instant> = OnceLock::new();
    *E.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    u64::try_from(epoch().elapsed().as_millis()).unwrap_or(u64::MAX)
}

fn slots() -> &'static Mutex<Vec<Arc<Slot>>> {
    static S: OnceLock<Mutex<Vec<Arc<Slot>>>> = OnceLock::new();
    S.get_or_init(|| {
        let deadline = input_deadline();
        std::thread::spawn(move || watchdog(deadline));
        Mutex::new(Vec::new())
    })
}

/// A watched slot for one fuzzing thread.
fn register(name: &'static str) -> Arc<Slot> {
    let slot = Arc::new(Slot {
        name,
        started: AtomicU64::new(0),
        seed: AtomicU64::new(0),
    });
    if let Ok(mut s) = slots().lock() {
        s.push(slot.clone());
    }
    slot
}

fn watchdog(deadline: Duration) {
    let limit = u64::try_from(deadline.as_millis()).unwrap_or(u64::MAX);
    loop {
        std::thread::sleep(Duration::from_millis(50));
        if HARD_HIT.load(Ordering::SeqCst) {
            eprintln!(
                "fuzz: an input (seed {:#x}) allocated {} MiB: unbounded allocation",
                HARD_HIT_SEED.load(Ordering::SeqCst),
                HARD_HIT_BYTES.load(Ordering::SeqCst) >> 20
            );
            std::process::exit(70);
        }
        let Ok(slots) = slots().lock() else { continue };
        let now = now_ms();
        for s in slots.iter() {
            let started = s.started.load(Ordering::SeqCst);
            if started != 0 && now.saturating_sub(started) > limit {
                eprintln!(
                    "fuzz {}: the input of seed {:#x} runs for more than {} ms: a hang \
                     (replay: HAKO_FUZZ_SEED={:#x})",
                    s.name,
                    s.seed.load(Ordering::SeqCst),
                    limit,
                    s.seed.load(Ordering::SeqCst)
                );
                std::process::exit(70);
            }
        }
    }
}

// ---- running inputs --------------------------------------------------------------------

struct Runner<'a, T> {
    slot: Arc<Slot>,
    soft: i64,
    check: &'a dyn Fn(&T) -> Result<(), String>,
}

impl<T> Runner<'_, T> {
    /// Runs one input; `Err` says why it failed.
    fn run(&self, seed: u64, v: &T) -> Result<(), String> {
        CURRENT_SEED.with(|c| c.set(seed));
        self.slot.seed.store(seed, Ordering::SeqCst);
        self.slot.started.store(now_ms().max(1), Ordering::SeqCst);
        let base = LIVE.with(Cell::get);
        PEAK.with(|p| p.set(base));
        HARD.with(|h| h.set(self.soft.saturating_mul(4)));
        BASE.with(|b| b.set(base));
        QUIET.with(|q| q.set(true));
        let r = catch_unwind(AssertUnwindSafe(|| (self.check)(v)));
        QUIET.with(|q| q.set(false));
        BASE.with(|b| b.set(i64::MAX));
        self.slot.started.store(0, Ordering::SeqCst);
        let grown = PEAK.with(Cell::get) - base;
        match r {
            Ok(Ok(())) if grown > self.soft => Err(format!(
                "allocated {} MiB for one input (limit {} MiB)",
                grown >> 20,
                self.soft >> 20
            )),
            Ok(Ok(())) => Ok(()),
            Ok(Err(m)) => Err(m),
            Err(payload) => Err(LAST_PANIC
                .with(|p| p.borrow_mut().take())
                .unwrap_or_else(|| {
                    payload
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| payload.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "panic".into())
                })),
        }
    }
}

fn rng_for(seed: u64) -> TestRng {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&seed.to_le_bytes());
    b[8..].copy_from_slice(&(seed ^ 0x9e37_79b9_7f4a_7c15).to_le_bytes());
    TestRng::from_seed(RngAlgorithm::XorShift, &b)
}

/// splitmix64: the seed of input `i` of a run.
fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Shrinks a failing input; returns the smallest failing value found and its failure.
fn shrink<T, V: ValueTree<Value = T>>(
    run: &Runner<'_, T>,
    seed: u64,
    tree: &mut V,
    first: String,
) -> (T, String) {
    let mut best = (tree.current(), first);
    let until = Instant::now() + Duration::from_secs(60);
    let mut steps = 0;
    if !tree.simplify() {
        return best;
    }
    while steps < 20_000 && Instant::now() < until {
        steps += 1;
        let v = tree.current();
        match run.run(seed, &v) {
            Err(m) => {
                best = (v, m);
                if !tree.simplify() {
                    break;
                }
            }
            Ok(()) => {
                if !tree.complicate() {
                    break;
                }
            }
        }
    }
    best
}

/// Fuzzes `check` with inputs of `strategy` for [`budget`] (or replays `HAKO_FUZZ_SEED`);
/// panics with the minimal failing input and its seed.
pub fn fuzz<S>(name: &'static str, strategy: S, check: impl Fn(&S::Value) -> Result<(), String>)
where
    S: Strategy,
    S::Value: Debug,
{
    install_panic_hook();
    let slot = register(name);
    let run = Runner {
        slot,
        soft: soft_limit(),
        check: &check,
    };
    let replay = std::env::var("HAKO_FUZZ_SEED")
        .ok()
        .and_then(|s| parse_seed(&s));
    let base = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos() % (1 << 64)).unwrap_or(0))
        .unwrap_or(0)
        ^ u64::from(std::process::id()) << 32;
    let budget = budget();
    let start = Instant::now();
    let mut tried = 0u64;
    let mut i = 0u64;
    loop {
        let seed = match replay {
            Some(s) if i == 0 => s,
            Some(_) => break,
            None if start.elapsed() >= budget && i > 0 => break,
            None => mix(base.wrapping_add(i)),
        };
        i += 1;
        let mut runner = TestRunner::new_with_rng(Config::default(), rng_for(seed));
        let Ok(mut tree) = strategy.new_tree(&mut runner) else {
            continue;
        };
        tried += 1;
        if let Err(first) = run.run(seed, &tree.current()) {
            let (min, why) = shrink(&run, seed, &mut tree, first.clone());
            panic!(
                "fuzz {name}: input {tried} (seed {seed:#x}) failed: {first}\n\
                 minimal failing input: {min:?}\nits failure: {why}\n\
                 replay: HAKO_FUZZ_SEED={seed:#x} cargo test --test fuzz -- --ignored --exact {name}"
            );
        }
    }
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "fuzz {name}: {tried} inputs in {secs:.1} s ({:.0}/s), no failure",
        tried as f64 / secs.max(1e-9)
    );
}

/// Runs one input under the same limits as [`fuzz`] (a regression input of a target).
pub fn once<T: Debug>(name: &'static str, v: T, check: impl Fn(&T) -> Result<(), String>) {
    install_panic_hook();
    let slot = register(name);
    let run = Runner {
        slot,
        soft: soft_limit(),
        check: &check,
    };
    if let Err(e) = run.run(0, &v) {
        panic!("{name}: {e}");
    }
}

/// Runs `cases` deterministic inputs of `strategy` through proptest's runner (the unit lane's
/// quick check of a fuzz target).
pub fn quick<S>(cases: u32, strategy: S, check: impl Fn(&S::Value) -> Result<(), String>)
where
    S: Strategy,
    S::Value: Debug,
{
    let config = Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    };
    let mut runner =
        TestRunner::new_with_rng(config, TestRng::deterministic_rng(RngAlgorithm::ChaCha));
    if let Err(e) = runner.run(&strategy, |v| check(&v).map_err(TestCaseError::fail)) {
        panic!("{e}");
    }
}

// ---- byte mutations --------------------------------------------------------------------

/// One edit of a byte string (positions are taken modulo the length).
#[derive(Debug, Clone)]
pub enum Edit {
    /// Flip one bit.
    Flip(usize, u8),
    /// Overwrite one byte.
    Set(usize, u8),
    /// Insert bytes.
    Insert(usize, Vec<u8>),
    /// Remove up to n bytes.
    Remove(usize, usize),
    /// Cut the tail.
    Truncate(usize),
    /// Write a boundary value (0, 0x7f.., 0x80.., 0xff..) of 1, 2 or 4 bytes.
    Boundary(usize, u8, u8),
    /// Repeat a slice.
    Repeat(usize, usize, u8),
}

/// One random [`Edit`].
pub fn edit() -> impl Strategy<Value = Edit> {
    use proptest::prelude::*;
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(i, b)| Edit::Flip(i, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Edit::Set(i, b)),
        (
            any::<usize>(),
            proptest::collection::vec(any::<u8>(), 1..16)
        )
            .prop_map(|(i, v)| Edit::Insert(i, v)),
        (any::<usize>(), 1usize..64).prop_map(|(i, n)| Edit::Remove(i, n)),
        any::<usize>().prop_map(Edit::Truncate),
        (any::<usize>(), 0u8..3, 0u8..4).prop_map(|(i, w, k)| Edit::Boundary(i, w, k)),
        (any::<usize>(), 1usize..32, 1u8..8).prop_map(|(i, n, k)| Edit::Repeat(i, n, k)),
    ]
}

/// No edit for half the inputs (so round-trip properties are checked often), else 1 to
/// `max` random edits.
pub fn edits(max: usize) -> impl Strategy<Value = Vec<Edit>> {
    use proptest::prelude::*;
    prop_oneof![Just(Vec::new()), proptest::collection::vec(edit(), 1..=max)]
}

/// Applies edits in order.
pub fn apply(mut b: Vec<u8>, edits: &[Edit]) -> Vec<u8> {
    for e in edits {
        let at = |i: usize, len: usize| if len == 0 { 0 } else { i % len };
        match e {
            Edit::Flip(i, bit) if !b.is_empty() => {
                let i = at(*i, b.len());
                b[i] ^= 1 << bit;
            }
            Edit::Set(i, v) if !b.is_empty() => {
                let i = at(*i, b.len());
                b[i] = *v;
            }
            Edit::Insert(i, v) => {
                let i = at(*i, b.len() + 1);
                b.splice(i..i, v.iter().copied());
            }
            Edit::Remove(i, n) if !b.is_empty() => {
                let i = at(*i, b.len());
                let end = (i + n).min(b.len());
                b.drain(i..end);
            }
            Edit::Truncate(i) => {
                let i = at(*i, b.len() + 1);
                b.truncate(i);
            }
            Edit::Boundary(i, w, k) if !b.is_empty() => {
                let width = 1usize << w;
                let i = at(*i, b.len());
                let v: [u8; 4] = match k {
                    0 => [0, 0, 0, 0],
                    1 => [0x7f, 0xff, 0xff, 0xff],
                    2 => [0x80, 0, 0, 0],
                    _ => [0xff; 4],
                };
                for (j, x) in v.iter().take(width).enumerate() {
                    if let Some(slot) = b.get_mut(i + j) {
                        *slot = *x;
                    }
                }
            }
            Edit::Repeat(i, n, k) if !b.is_empty() => {
                let i = at(*i, b.len());
                let end = (i + n).min(b.len());
                let piece = b[i..end].to_vec();
                for _ in 0..*k {
                    b.splice(end..end, piece.iter().copied());
                }
            }
            _ => {}
        }
    }
    b
}

/// Valid byte strings of `base`, then up to `max_edits` random edits.
pub fn mutated(
    base: impl Strategy<Value = Vec<u8>>,
    max_edits: usize,
) -> impl Strategy<Value = Vec<u8>> {
    (base, proptest::collection::vec(edit(), 0..=max_edits)).prop_map(|(b, e)| apply(b, &e))
}

/// Raw bytes up to `max` long.
pub fn raw(max: usize) -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(proptest::prelude::any::<u8>(), 0..max)
}

/// Short strings mixing ASCII, separators, escapes and multi-byte characters.
pub fn text() -> impl Strategy<Value = String> {
    use proptest::prelude::*;
    let piece = prop_oneof![
        4 => proptest::char::range('a', 'z').prop_map(|c| c.to_string()),
        2 => proptest::char::range('0', '9').prop_map(|c| c.to_string()),
        1 => proptest::sample::select(vec![
            "/", ".", "..", ":", ",", "=", "%", "%2", "%zz", "+", "-", " ", "\t", "\n", "\0",
            "\u{7f}", "é", "€", "😀", "\u{fffd}", "::", "0x", "1e", "Ki", "255.255.255.255",
            "::1", "/32", "/129",
        ])
        .prop_map(str::to_string),
        1 => any::<char>().prop_map(|c| c.to_string()),
    ];
    proptest::collection::vec(piece, 0..12).prop_map(|v| v.concat())
}

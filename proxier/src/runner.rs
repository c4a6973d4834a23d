//! The sync runner: the one loop that turns Service/EndpointSlice changes into proxier
//! syncs, for `hako-proxy` and for the agent's two proxier loops (kube-proxy's
//! `BoundedFrequencyRunner` role).
//!
//! - [`Schedule`] is pure: given the instants it is handed, it decides when the next sync is
//!   due (rate limit `min_sync_period`, back-off after failures, the periodic full resync
//!   `sync_period`) and whether it is a full one. Unit-tested with a manual clock.
//! - [`Runner`] is the effectful loop around it: it waits on a [`Source`] (watch events,
//!   a config directory, a poller) until the schedule's next instant, syncs a
//!   [`SyncTarget`] (the [`Proxier`]), and keeps the metrics and the healthz timestamp in a
//!   shared [`Status`].

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tracing::{info, info_span, warn};

use crate::config;
use crate::kube::{Mapper, Sink, WatchEvent};
use crate::metrics::Metrics;
use crate::proxier::{Proxier, SyncError, SyncStats};

/// When the runner syncs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncWhen {
    /// At every check, `min_sync_period` apart, changed or not (the proxier's own sync is
    /// cheap when nothing changed; it checks the canary and lets IPVS servers drain).
    /// `hako-proxy` and the agent's cluster-mode proxier.
    EveryPeriod,
    /// Only after a change was notified, while retrying a failure, or when the full
    /// resync is due (the agent's standalone Service loop).
    OnChange,
}

/// The runner's timing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunnerConfig {
    /// Shortest time from the end of one sync to the start of the next: changes arriving
    /// in between are batched into the next sync (kube-proxy's `--min-sync-period`).
    pub min_sync_period: Duration,
    /// Full resync period (`--sync-period`); `Duration::MAX`: never by time.
    pub sync_period: Duration,
    /// Which checks sync.
    pub sync_when: SyncWhen,
    /// Shortest wait after a failed sync.
    pub backoff_min: Duration,
    /// Longest wait after failed syncs (the wait doubles from `min_sync_period` up to it).
    pub backoff_max: Duration,
}

/// Default shortest wait after a failure.
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Default longest wait after failures.
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);

impl RunnerConfig {
    /// `hako-proxy`'s timing: a check every `min_sync_period`, back-off 100 ms to 30 s,
    /// a full resync every `sync_period`.
    pub fn new(min_sync_period: Duration, sync_period: Duration) -> Self {
        Self {
            min_sync_period,
            sync_period,
            sync_when: SyncWhen::EveryPeriod,
            backoff_min: BACKOFF_MIN,
            backoff_max: BACKOFF_MAX,
        }
    }
}

/// What a due check does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// The periodic full resync is due (the proxier may decide on a full sync by itself
    /// too: first sync, after a failure, lost canary).
    pub full: bool,
}

/// The pure timing of the runner, kube-proxy's `BoundedFrequencyRunner`: a change is
/// synced at once when the last sync is older than `min_sync_period`, and batched with
/// whatever else arrives until then otherwise. All instants come from the caller.
#[derive(Debug, Clone)]
pub struct Schedule {
    cfg: RunnerConfig,
    /// End of the last check (a sync, an idle sync or a skipped check); None before the
    /// first. Ticks (`min_sync_period` apart) count from it.
    last_check: Option<Instant>,
    /// End of the last sync that wrote something or failed: the rate limit and the
    /// back-off count from it. Syncs that found nothing to do do not hold back the next.
    last_sync: Option<Instant>,
    /// Wait after `last_sync` before the next sync: `min_sync_period`, or the back-off.
    wait: Duration,
    failures: u32,
    last_full: Option<Instant>,
    pending: bool,
    /// A due check was skipped (source not ready): pending work waits for the next tick or
    /// the next change instead of making every wait zero.
    held: bool,
}

impl Schedule {
    /// A schedule whose first check is due at once.
    pub fn new(cfg: RunnerConfig) -> Self {
        Self {
            cfg,
            last_check: None,
            last_sync: None,
            wait: cfg.min_sync_period,
            failures: 0,
            last_full: None,
            pending: false,
            held: false,
        }
    }

    /// A change arrived; it is programmed by the next due sync.
    pub fn notify(&mut self) {
        self.pending = true;
        self.held = false;
    }

    /// Whether a change arrived since the last successful sync.
    pub fn pending(&self) -> bool {
        self.pending
    }

    /// Failed syncs in a row.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// The current wait after a sync (`min_sync_period`, or the back-off after failures).
    pub fn wait(&self) -> Duration {
        self.wait
    }

    /// When a sync of pending work (or the retry of a failure) may start: the end of the
    /// last sync plus the wait (None: now).
    fn sync_allowed(&self) -> Option<Instant> {
        self.last_sync.map(|l| add(l, self.wait))
    }

    /// The instant of the next check (None: now). Saturates far in the future. A source
    /// may end its wait earlier when it feeds a change (see [`Source::wait`]).
    pub fn next_check(&self) -> Option<Instant> {
        let last = self.last_check?;
        if self.failures > 0 {
            // Back-off: nothing before the retry.
            return self.sync_allowed();
        }
        let mut next = add(last, self.cfg.min_sync_period);
        if self.pending && !self.held {
            match self.sync_allowed() {
                Some(t) => next = next.min(t),
                None => return None,
            }
        }
        if let Some(f) = self.last_full {
            next = next.min(add(f, self.cfg.sync_period));
        }
        Some(next)
    }

    /// Whether the periodic full resync is due at `now`.
    pub fn full_due(&self, now: Instant) -> bool {
        self.last_full.is_none_or(|t| {
            t.checked_add(self.cfg.sync_period)
                .is_some_and(|d| now >= d)
        })
    }

    /// What to do at `now`: None = not yet (rate limit or back-off), or nothing to do.
    ///
    /// - the first check syncs;
    /// - after failures: a retry once the back-off has passed, and nothing before;
    /// - a pending change, or the due full resync: a sync as soon as the last sync is
    ///   `min_sync_period` old (at once when it is older already);
    /// - otherwise, in [`SyncWhen::EveryPeriod`], a sync at each tick (`min_sync_period`
    ///   after the last check), which costs nothing in the proxier when nothing changed.
    pub fn decide(&self, now: Instant) -> Option<Plan> {
        let full = self.full_due(now);
        let Some(last) = self.last_check else {
            return Some(Plan { full });
        };
        let allowed = self.sync_allowed().is_none_or(|t| now >= t);
        if self.failures > 0 {
            return allowed.then_some(Plan { full });
        }
        if self.pending || full {
            return allowed.then_some(Plan { full });
        }
        let tick = now >= add(last, self.cfg.min_sync_period);
        (self.cfg.sync_when == SyncWhen::EveryPeriod && tick).then_some(Plan { full })
    }

    /// A due check did not sync (source not ready, nothing to do): the next tick is one
    /// `min_sync_period` later. Back-off state is kept.
    pub fn skipped(&mut self, now: Instant) {
        self.last_check = Some(now);
        self.held = true;
    }

    /// A sync ended at `now` without writing anything (nothing had changed in the model):
    /// what was pending is done, and the rate limit still counts from the last sync that
    /// wrote something.
    pub fn finished_idle(&mut self, now: Instant) {
        self.last_check = Some(now);
        self.pending = false;
        self.held = false;
    }

    /// A sync that wrote something (or failed) ended at `now`: success resets the back-off,
    /// a failure doubles the wait (clamped to `backoff_min..=backoff_max`). Returns the wait
    /// until the next sync may start.
    pub fn finished(&mut self, now: Instant, outcome: Result<bool, ()>) -> Duration {
        self.last_check = Some(now);
        self.last_sync = Some(now);
        self.held = false;
        match outcome {
            Ok(full) => {
                self.failures = 0;
                self.pending = false;
                self.wait = self.cfg.min_sync_period;
                if full {
                    self.last_full = Some(now);
                }
            }
            Err(()) => {
                self.failures = self.failures.saturating_add(1);
                self.wait = self
                    .wait
                    .saturating_mul(2)
                    .max(self.cfg.backoff_min)
                    .min(self.cfg.backoff_max);
            }
        }
        self.wait
    }
}

fn add(t: Instant, d: Duration) -> Instant {
    // Far enough to never come, without overflowing.
    t.checked_add(d)
        .or_else(|| t.checked_add(Duration::from_secs(100 * 365 * 86_400)))
        .unwrap_or(t)
}

/// What the runner syncs: the [`Proxier`], or a fake in tests.
pub trait SyncTarget {
    /// Programs the pending changes; `full` asks for a full sync.
    fn sync(&mut self, full: bool) -> Result<SyncStats, SyncError>;
}

impl SyncTarget for Proxier {
    fn sync(&mut self, full: bool) -> Result<SyncStats, SyncError> {
        if full {
            self.force_full();
        }
        Proxier::sync(self)
    }
}

/// What a source's wait ended with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// The deadline came; nothing changed.
    Idle,
    /// The deadline came (or the source has all it needs); changes were fed to the target.
    Changed,
    /// The source has ended (channel closed, stop asked); `changed`: changes were fed to
    /// the target before it ended.
    Closed {
        /// Changes were fed before the end.
        changed: bool,
    },
}

/// Where changes come from. `wait` feeds changes into the target until `deadline` and
/// returns then, or earlier once it has fed a change (`Wake::Changed`: the runner then syncs
/// at once when the last sync is `min_sync_period` old, or waits again until it is), or
/// when closed. It must not return early without a change, or the runner would spin.
pub trait Source<T> {
    /// Why the source cannot go on (ends the run).
    type Error;
    /// Feeds changes into `target` until `deadline` (or until the first changes).
    fn wait(&mut self, deadline: Instant, target: &mut T) -> Result<Wake, Self::Error>;
    /// Whether the target holds a complete picture to sync (e.g. both kinds listed).
    fn ready(&self) -> bool {
        true
    }
}

/// The instants the runner reads (real time, or a manual clock in tests).
pub trait Clock {
    /// Now.
    fn now(&self) -> Instant;
}

/// Real time.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// What the metrics and healthz endpoints read.
#[derive(Debug, Clone)]
pub struct Status {
    /// kube-proxy's sync metrics.
    pub metrics: Metrics,
    /// End of the last successful sync.
    pub last_success: Option<Instant>,
    /// When the runner was made.
    pub started: Instant,
}

/// The shared [`Status`] handle.
pub type SharedStatus = Arc<Mutex<Status>>;

/// One sync, as the runner's observer sees it.
#[derive(Debug)]
pub enum SyncEvent<'a> {
    /// A sync succeeded.
    Synced {
        /// What it did.
        stats: &'a SyncStats,
        /// How long it took.
        took: Duration,
        /// It ended a run of failures.
        recovered: bool,
    },
    /// A sync failed.
    Failed {
        /// Why.
        error: &'a SyncError,
        /// Wait until the retry.
        retry_in: Duration,
        /// Failures in a row.
        failures: u32,
    },
}

/// Why a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunEnd {
    /// The source closed (after a last sync of what it had delivered).
    Closed,
}

type Observer = Box<dyn FnMut(&SyncEvent<'_>) + Send>;

/// The sync loop: rate limit, back-off, periodic full resync, metrics and healthz timestamp.
pub struct Runner<C: Clock = SystemClock> {
    schedule: Schedule,
    clock: C,
    status: SharedStatus,
    observer: Option<Observer>,
}

impl Runner<SystemClock> {
    /// A runner on real time.
    pub fn new(cfg: RunnerConfig) -> Self {
        Self::with_clock(cfg, SystemClock)
    }
}

impl<C: Clock> Runner<C> {
    /// A runner on `clock`.
    pub fn with_clock(cfg: RunnerConfig, clock: C) -> Self {
        let status = Arc::new(Mutex::new(Status {
            metrics: Metrics::default(),
            last_success: None,
            started: clock.now(),
        }));
        Self {
            schedule: Schedule::new(cfg),
            clock,
            status,
            observer: None,
        }
    }

    /// Calls `f` after every sync (e.g. the agent's own metrics).
    #[must_use]
    pub fn with_observer(mut self, f: impl FnMut(&SyncEvent<'_>) + Send + 'static) -> Self {
        self.observer = Some(Box::new(f));
        self
    }

    /// The metrics and healthz timestamp, for the HTTP endpoints.
    pub fn status(&self) -> SharedStatus {
        self.status.clone()
    }

    /// The timing state.
    pub fn schedule(&self) -> &Schedule {
        &self.schedule
    }

    /// Marks a change fed to the target outside a [`Source`].
    pub fn notify(&mut self) {
        self.schedule.notify();
    }

    /// Runs one sync now (whatever the schedule says) and records it: metrics, healthz
    /// timestamp, back-off.
    pub fn sync_now<T: SyncTarget>(
        &mut self,
        target: &mut T,
        full: bool,
    ) -> Result<SyncStats, SyncError> {
        let span = info_span!("proxier_sync", full_due = full);
        let _g = span.enter();
        let t = self.clock.now();
        let res = target.sync(full);
        let end = self.clock.now();
        let took = end.saturating_duration_since(t);
        let recovered = self.schedule.failures() > 0;
        let wait = match &res {
            Ok(s) if s.is_idle() => {
                self.schedule.finished_idle(end);
                self.schedule.wait()
            }
            _ => self
                .schedule
                .finished(end, res.as_ref().map(|s| s.full).map_err(|_| ())),
        };
        let mut st = self.status.lock().unwrap_or_else(|p| p.into_inner());
        match &res {
            Ok(s) => {
                // Syncs that did nothing are not observed (kube-proxy observes syncs
                // that wrote rules).
                if !s.is_idle() {
                    st.metrics.synced(s, took);
                    st.metrics.programmed(&s.trigger_times, SystemTime::now());
                }
                st.last_success = Some(end);
                drop(st);
                if recovered {
                    info!("proxier sync recovered");
                }
                // A full sync (the first one above all: the initial list, the whole
                // payload) frees far more than it keeps; give it back to the kernel.
                if s.full {
                    crate::mem::release_free_memory();
                }
                if let Some(o) = self.observer.as_mut() {
                    o(&SyncEvent::Synced {
                        stats: s,
                        took,
                        recovered,
                    });
                }
            }
            Err(e) => {
                st.metrics.failures += 1;
                drop(st);
                warn!(error = %e, retry_in_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX), "proxier sync failed; retrying");
                if let Some(o) = self.observer.as_mut() {
                    o(&SyncEvent::Failed {
                        error: e,
                        retry_in: wait,
                        failures: self.schedule.failures(),
                    });
                }
            }
        }
        res
    }

    /// Waits until the source is ready, then syncs once (`--once`).
    pub fn run_once<T: SyncTarget, S: Source<T>>(
        &mut self,
        target: &mut T,
        source: &mut S,
    ) -> Result<Result<SyncStats, SyncError>, RunError<S::Error>> {
        loop {
            let now = self.clock.now();
            let deadline = self.schedule.next_check().unwrap_or(now);
            let wake = source.wait(deadline, target).map_err(RunError::Source)?;
            if matches!(wake, Wake::Closed { .. }) {
                return Err(RunError::Closed);
            }
            if source.ready() {
                let full = self.schedule.full_due(self.clock.now());
                return Ok(self.sync_now(target, full));
            }
            self.schedule.skipped(self.clock.now());
        }
    }

    /// Syncs `target` from `source` until the source closes (after one last sync of what
    /// it delivered, if ready) or fails.
    pub fn run<T: SyncTarget, S: Source<T>>(
        &mut self,
        target: &mut T,
        source: &mut S,
    ) -> Result<RunEnd, S::Error> {
        loop {
            let now = self.clock.now();
            let deadline = self.schedule.next_check().unwrap_or(now);
            let wake = source.wait(deadline, target)?;
            if wake == Wake::Changed {
                self.schedule.notify();
            }
            let now = self.clock.now();
            if let Wake::Closed { changed } = wake {
                // Program what was delivered, then hand back.
                let every = self.schedule.cfg.sync_when == SyncWhen::EveryPeriod;
                if source.ready() && (changed || every || self.schedule.pending()) {
                    let full = self.schedule.full_due(now);
                    let _ = self.sync_now(target, full);
                }
                return Ok(RunEnd::Closed);
            }
            if !source.ready() {
                self.schedule.skipped(now);
                continue;
            }
            match self.schedule.decide(now) {
                Some(plan) => {
                    let _ = self.sync_now(target, plan.full);
                }
                None if self.schedule.next_check().is_some_and(|t| now < t) => {}
                None => self.schedule.skipped(now),
            }
        }
    }
}

/// Why [`Runner::run_once`] did not sync.
#[derive(Debug, thiserror::Error)]
pub enum RunError<E> {
    /// The source failed.
    #[error(transparent)]
    Source(E),
    /// The source closed before it was ready.
    #[error("the source closed before the first sync")]
    Closed,
}

/// Watch events from a channel ([`crate::kube::spawn_watchers`]) mapped into the target;
/// ready once both kinds were listed; closed when the channel is.
pub struct WatchSource {
    rx: Receiver<WatchEvent>,
    mapper: Mapper,
}

impl WatchSource {
    /// Events from `rx`, with a fresh mapper (a new watch starts with a relist).
    pub fn new(rx: Receiver<WatchEvent>) -> Self {
        Self::with_mapper(rx, Mapper::default())
    }

    /// Events from `rx` continuing `mapper`'s state (what was listed stays listed).
    pub fn with_mapper(rx: Receiver<WatchEvent>, mapper: Mapper) -> Self {
        Self { rx, mapper }
    }

    /// The mapper, to continue on another channel.
    pub fn into_mapper(self) -> Mapper {
        self.mapper
    }
}

impl<T: Sink> Source<T> for WatchSource {
    type Error = Infallible;

    fn wait(&mut self, deadline: Instant, target: &mut T) -> Result<Wake, Infallible> {
        let mut changed = false;
        loop {
            let ev = match deadline.checked_duration_since(Instant::now()) {
                // Once something was fed, hand back what is queued without waiting more:
                // the runner decides whether it syncs now (bounded frequency).
                Some(left) if !left.is_zero() && !changed => match self.rx.recv_timeout(left) {
                    Ok(ev) => ev,
                    Err(RecvTimeoutError::Timeout) => break,
                    Err(RecvTimeoutError::Disconnected) => return Ok(Wake::Closed { changed }),
                },
                // Due now: take what is queued without waiting.
                _ => match self.rx.try_recv() {
                    Ok(ev) => ev,
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => return Ok(Wake::Closed { changed }),
                },
            };
            self.mapper.handle(ev, target);
            changed = true;
        }
        Ok(if changed { Wake::Changed } else { Wake::Idle })
    }

    fn ready(&self) -> bool {
        self.mapper.ready()
    }
}

/// A directory of Service/EndpointSlice files ([`config::read_dir`]), re-read when its
/// fingerprint changes, checked once per wait (after sleeping until the deadline).
pub struct DirSource {
    dir: PathBuf,
    fingerprint: Option<Vec<(String, u64, Option<std::time::SystemTime>)>>,
}

impl DirSource {
    /// Reads `dir` at the first check.
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            fingerprint: None,
        }
    }
}

impl Source<Proxier> for DirSource {
    type Error = config::ConfigError;

    fn wait(&mut self, deadline: Instant, target: &mut Proxier) -> Result<Wake, Self::Error> {
        if let Some(left) = deadline.checked_duration_since(Instant::now()) {
            std::thread::sleep(left);
        }
        let now = Some(config::fingerprint(&self.dir));
        if now == self.fingerprint {
            return Ok(Wake::Idle);
        }
        let objs = config::read_dir(&self.dir)?;
        info!(
            services = objs.services.len(),
            slices = objs.slices.len(),
            "config read"
        );
        target.replace_all(objs.services, objs.slices);
        self.fingerprint = now;
        Ok(Wake::Changed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::collections::VecDeque;
    use std::rc::Rc;

    const MS: Duration = Duration::from_millis(1);

    fn cfg(min_ms: u64, full_s: u64) -> RunnerConfig {
        RunnerConfig::new(
            MS * u32::try_from(min_ms).unwrap(),
            Duration::from_secs(full_s),
        )
    }

    fn ok(full: bool) -> Result<bool, ()> {
        Ok(full)
    }

    /// A manual clock: instants are a base plus an offset the test moves.
    #[derive(Clone)]
    struct Manual {
        base: Instant,
        at: Rc<Cell<Duration>>,
    }

    impl Manual {
        fn new() -> Self {
            Self {
                base: Instant::now(),
                at: Rc::default(),
            }
        }
        fn at(&self, ms: u64) -> Instant {
            self.base + MS * u32::try_from(ms).unwrap()
        }
        fn ms(&self, t: Instant) -> u64 {
            u64::try_from((t - self.base).as_millis()).unwrap()
        }
    }

    impl Clock for Manual {
        fn now(&self) -> Instant {
            self.base + self.at.get()
        }
    }

    #[test]
    fn the_first_check_is_due_at_once_and_full() {
        let s = Schedule::new(cfg(1000, 3600));
        let c = Manual::new();
        assert_eq!(s.next_check(), None);
        assert_eq!(s.decide(c.at(0)), Some(Plan { full: true }));
    }

    #[test]
    fn the_rate_limit_holds_the_next_sync_one_period_after_the_last() {
        let c = Manual::new();
        let mut s = Schedule::new(cfg(1000, 3600));
        s.finished(c.at(0), ok(true));
        // A burst of changes right after the sync: no sync until the period has passed.
        for t in [1, 10, 500, 999] {
            s.notify();
            assert_eq!(s.decide(c.at(t)), None, "at {t} ms");
        }
        assert_eq!(s.decide(c.at(1000)), Some(Plan { full: false }));
        // The burst is one sync: afterwards nothing is pending.
        s.finished(c.at(1010), ok(false));
        assert!(!s.pending());
        assert_eq!(s.next_check(), Some(c.at(2010)));
    }

    #[test]
    fn on_change_coalesces_a_burst_into_one_sync_and_idles_without_changes() {
        let c = Manual::new();
        let mut s = Schedule::new(RunnerConfig {
            sync_when: SyncWhen::OnChange,
            ..cfg(500, 3600)
        });
        s.finished(c.at(0), ok(true));
        // Nothing changed: a due check does not sync.
        assert_eq!(s.decide(c.at(500)), None);
        s.skipped(c.at(500));
        assert_eq!(s.next_check(), Some(c.at(1000)));
        // Three changes inside one period after a sync: one sync when the period is over.
        s.finished(c.at(900), ok(false));
        s.notify();
        s.notify();
        s.notify();
        assert_eq!(s.next_check(), Some(c.at(1400)));
        assert_eq!(s.decide(c.at(1399)), None);
        assert_eq!(s.decide(c.at(1400)), Some(Plan { full: false }));
        s.finished(c.at(1400), ok(false));
        assert_eq!(s.decide(c.at(1900)), None, "the burst was one sync");
    }

    #[test]
    fn a_change_after_a_quiet_period_syncs_at_once() {
        // kube-proxy's bounded-frequency runner: the rate limit only holds a change back
        // while the last sync is younger than min_sync_period. (Before: the next sync
        // waited for the next check, up to a whole period after the change.)
        for when in [SyncWhen::EveryPeriod, SyncWhen::OnChange] {
            let c = Manual::new();
            let mut s = Schedule::new(RunnerConfig {
                sync_when: when,
                ..cfg(1000, 3600)
            });
            s.finished(c.at(0), ok(true));
            // Idle checks (nothing changed) do not hold the next change back.
            s.finished_idle(c.at(1000));
            s.skipped(c.at(2000));
            s.notify();
            assert!(
                s.next_check().is_none_or(|t| t <= c.at(2000)),
                "{when:?}: due now"
            );
            assert_eq!(s.decide(c.at(2300)), Some(Plan { full: false }), "{when:?}");
            s.finished(c.at(2310), ok(false));
            // The next change, 100 ms later, waits for the period.
            s.notify();
            assert_eq!(s.decide(c.at(2410)), None, "{when:?}");
            assert_eq!(s.next_check(), Some(c.at(3310)), "{when:?}");
            assert_eq!(s.decide(c.at(3310)), Some(Plan { full: false }), "{when:?}");
        }
    }

    #[test]
    fn a_change_the_source_cannot_sync_yet_waits_for_the_next_tick_or_change() {
        // Services listed, slices not yet: the check is skipped, and the wait must not be
        // zero again (it would spin until the slices come).
        let c = Manual::new();
        let mut s = Schedule::new(cfg(1000, 3600));
        s.notify();
        assert_eq!(s.next_check(), None);
        s.skipped(c.at(0));
        assert_eq!(s.next_check(), Some(c.at(1000)));
        // The next change (the slices) makes it due at once again.
        s.notify();
        assert_eq!(s.next_check(), None);
        assert_eq!(s.decide(c.at(5)), Some(Plan { full: true }));
    }

    #[test]
    fn ticks_do_not_sync_during_back_off() {
        let c = Manual::new();
        let mut s = Schedule::new(cfg(100, 3600));
        s.finished(c.at(0), Err(()));
        s.finished(c.at(200), Err(()));
        // Wait 400 ms: no tick in between syncs, changes or not.
        s.notify();
        assert_eq!(s.next_check(), Some(c.at(600)));
        assert_eq!(s.decide(c.at(500)), None);
        assert_eq!(s.decide(c.at(600)), Some(Plan { full: true }));
    }

    #[test]
    fn back_off_doubles_from_the_period_and_caps() {
        let c = Manual::new();
        let mut s = Schedule::new(cfg(1000, 3600));
        let mut t = 0;
        let mut waits = Vec::new();
        for _ in 0..8 {
            let w = s.finished(c.at(t), Err(()));
            waits.push(w.as_secs());
            t += u64::try_from(w.as_millis()).unwrap();
            assert_eq!(s.next_check(), Some(c.at(t)));
        }
        assert_eq!(waits, [2, 4, 8, 16, 30, 30, 30, 30]);
        assert_eq!(s.failures(), 8);
    }

    #[test]
    fn back_off_has_a_floor_for_tiny_periods() {
        let c = Manual::new();
        let mut s = Schedule::new(cfg(5, 3600));
        assert_eq!(s.finished(c.at(0), Err(())), 100 * MS);
        assert_eq!(s.finished(c.at(100), Err(())), 200 * MS);
    }

    #[test]
    fn a_back_off_capped_at_the_period_retries_every_period() {
        // The agent's standalone loop: retry every poll period, no growth.
        let c = Manual::new();
        let mut s = Schedule::new(RunnerConfig {
            sync_when: SyncWhen::OnChange,
            backoff_max: 500 * MS,
            ..cfg(500, 3600)
        });
        s.finished(c.at(0), Err(()));
        // A failure is retried without a new change.
        assert_eq!(s.decide(c.at(500)), Some(Plan { full: true }));
        assert_eq!(s.finished(c.at(500), Err(())), 500 * MS);
        assert_eq!(s.finished(c.at(1000), Err(())), 500 * MS);
    }

    #[test]
    fn success_resets_the_back_off() {
        let c = Manual::new();
        let mut s = Schedule::new(cfg(1000, 3600));
        s.finished(c.at(0), Err(()));
        s.finished(c.at(2000), Err(()));
        assert_eq!(s.wait(), 4 * Duration::from_secs(1));
        assert_eq!(s.finished(c.at(6000), ok(true)), Duration::from_secs(1));
        assert_eq!(s.failures(), 0);
        // The next failure starts from the period again.
        assert_eq!(s.finished(c.at(7000), Err(())), Duration::from_secs(2));
    }

    #[test]
    fn full_resync_after_the_period_counted_from_the_last_full_sync() {
        let c = Manual::new();
        let mut s = Schedule::new(cfg(1000, 60));
        s.finished(c.at(0), ok(true));
        assert_eq!(s.decide(c.at(59_999)), Some(Plan { full: false }));
        assert_eq!(s.decide(c.at(60_000)), Some(Plan { full: true }));
        // A full sync the proxier did by itself (lost canary) restarts the period.
        s.finished(c.at(30_000), ok(true));
        assert_eq!(s.decide(c.at(60_000)), Some(Plan { full: false }));
        assert_eq!(s.decide(c.at(90_000)), Some(Plan { full: true }));
        // Partial syncs do not.
        s.finished(c.at(85_000), ok(false));
        assert_eq!(s.decide(c.at(90_000)), Some(Plan { full: true }));
    }

    #[test]
    fn full_resync_wakes_an_idle_on_change_loop() {
        let c = Manual::new();
        let mut s = Schedule::new(RunnerConfig {
            sync_when: SyncWhen::OnChange,
            ..cfg(500, 10)
        });
        s.finished(c.at(0), ok(true));
        assert_eq!(s.decide(c.at(9_500)), None);
        assert_eq!(s.decide(c.at(10_000)), Some(Plan { full: true }));
    }

    #[test]
    fn a_never_period_and_huge_waits_do_not_overflow() {
        let c = Manual::new();
        let mut s = Schedule::new(RunnerConfig {
            backoff_max: Duration::MAX,
            ..RunnerConfig::new(Duration::MAX, Duration::MAX)
        });
        s.finished(c.at(0), ok(true));
        assert!(!s.full_due(c.at(1_000_000)));
        assert!(s.next_check().is_some_and(|t| t > c.at(1_000_000)));
        s.finished(c.at(0), Err(()));
        assert_eq!(s.wait(), Duration::MAX);
    }

    // ---- the loop, on a manual clock ----------------------------------------------------

    /// A target that fails while `fail` says so and records the instants of its syncs.
    struct Fake {
        clock: Manual,
        fail: VecDeque<bool>,
        syncs: Vec<(u64, bool)>,
        took: Duration,
        /// Syncs write nothing unless a change was fed (`dirty`), full or first.
        idle_unless_dirty: bool,
        dirty: bool,
    }

    impl SyncTarget for Fake {
        fn sync(&mut self, full: bool) -> Result<SyncStats, SyncError> {
            let t = self.clock.ms(self.clock.now());
            self.syncs.push((t, full));
            self.clock.at.set(self.clock.at.get() + self.took);
            if self.fail.pop_front().unwrap_or(false) {
                return Err(crate::nft::NftError::NoState.into());
            }
            let full = self.syncs.len() == 1 || full;
            let work = full || self.dirty || !self.idle_unless_dirty;
            self.dirty = false;
            Ok(SyncStats {
                full,
                rules: usize::from(work),
                ..SyncStats::default()
            })
        }
    }

    /// A source that moves the clock to the deadline (no sleeping), reporting a change at
    /// the scripted instants, ready from `ready_at` and closed at `close_at`.
    struct Script {
        clock: Manual,
        changes: VecDeque<u64>,
        ready_at: u64,
        close_at: u64,
        /// Return at a change before the deadline (as a watch does), not at the deadline.
        early: bool,
    }

    impl Source<Fake> for Script {
        type Error = Infallible;
        fn wait(&mut self, deadline: Instant, t: &mut Fake) -> Result<Wake, Infallible> {
            let mut now = self.clock.now().max(deadline);
            if self.early {
                if let Some(c) = self.changes.front() {
                    now = now.min(self.clock.at(*c).max(self.clock.now()));
                }
            }
            let ms = self.clock.ms(now).min(self.close_at);
            self.clock.at.set(MS * u32::try_from(ms).unwrap());
            let mut changed = false;
            while self.changes.front().is_some_and(|c| *c <= ms) {
                self.changes.pop_front();
                changed = true;
                t.dirty = true;
            }
            Ok(if ms >= self.close_at {
                Wake::Closed { changed }
            } else if changed {
                Wake::Changed
            } else {
                Wake::Idle
            })
        }
        fn ready(&self) -> bool {
            self.clock.ms(self.clock.now()) >= self.ready_at
        }
    }

    fn run(
        cfg: RunnerConfig,
        fail: &[bool],
        changes: &[u64],
        ready_at: u64,
        close_at: u64,
    ) -> (Vec<(u64, bool)>, Status) {
        run_with(cfg, fail, changes, ready_at, close_at, false)
    }

    fn run_with(
        cfg: RunnerConfig,
        fail: &[bool],
        changes: &[u64],
        ready_at: u64,
        close_at: u64,
        early: bool,
    ) -> (Vec<(u64, bool)>, Status) {
        let clock = Manual::new();
        let mut target = Fake {
            clock: clock.clone(),
            fail: fail.iter().copied().collect(),
            syncs: Vec::new(),
            took: 10 * MS,
            idle_unless_dirty: early,
            dirty: false,
        };
        let mut source = Script {
            clock: clock.clone(),
            changes: changes.iter().copied().collect(),
            ready_at,
            close_at,
            early,
        };
        let mut r = Runner::with_clock(cfg, clock);
        assert_eq!(r.run(&mut target, &mut source), Ok(RunEnd::Closed));
        let st = r.status().lock().unwrap().clone();
        (target.syncs, st)
    }

    #[test]
    fn the_loop_waits_for_a_ready_source_then_syncs_every_period() {
        let (syncs, st) = run(cfg(1000, 3600), &[], &[], 2500, 5000);
        // Not ready at 0, 1000, 2000; ready at 3000; each sync takes 10 ms; one last sync
        // when the source closes.
        assert_eq!(syncs, [(3000, true), (4010, false), (5000, false)]);
        assert_eq!(st.metrics.sync.count(), 3);
        assert!(st.last_success.is_some());
    }

    #[test]
    fn the_loop_backs_off_then_recovers_and_counts_failures() {
        let (syncs, st) = run(cfg(1000, 3600), &[true, true, false], &[], 0, 8000);
        let at: Vec<u64> = syncs.iter().map(|s| s.0).collect();
        // Fail at 0 (wait 2 s), fail at 2010 (wait 4 s), succeed at 6020, then every second
        // until the close.
        assert_eq!(at, [0, 2010, 6020, 7030, 8000]);
        assert_eq!(st.metrics.failures, 2);
    }

    #[test]
    fn the_on_change_loop_syncs_changes_and_a_last_one_on_close() {
        let cfg = RunnerConfig {
            sync_when: SyncWhen::OnChange,
            ..cfg(500, 3600)
        };
        // Changes at 0 (first sync), 1200 and 1300 (one sync at 1510), 2600 (pending at close).
        let (syncs, _) = run(cfg, &[], &[0, 1200, 1300, 2600], 0, 2700);
        let at: Vec<u64> = syncs.iter().map(|s| s.0).collect();
        assert_eq!(at, [0, 1510, 2700]);
    }

    #[test]
    fn the_loop_syncs_a_watched_change_at_once_when_the_last_sync_is_old() {
        for when in [SyncWhen::OnChange, SyncWhen::EveryPeriod] {
            let cfg = RunnerConfig {
                sync_when: when,
                ..cfg(500, 3600)
            };
            // Changes at 0 (first sync), 1200 (the last sync is 1.19 s old: at once), 1300
            // (batched: 500 ms after the end of the 1200 one), 2600 (at once).
            let (syncs, _) = run_with(cfg, &[], &[0, 1200, 1300, 2600], 0, 2700, true);
            let changes: Vec<u64> = syncs
                .iter()
                .map(|s| s.0)
                .filter(|t| [0, 1200, 1710, 2600].contains(t))
                .collect();
            assert_eq!(changes, [0, 1200, 1710, 2600], "{when:?}: {syncs:?}");
            if when == SyncWhen::OnChange {
                assert_eq!(syncs.len(), 4, "only the changes sync: {syncs:?}");
            }
        }
    }

    #[test]
    fn watch_events_reach_the_rules_only_once_both_kinds_are_listed() {
        use ::kube::runtime::watcher::Event;
        use WatchEvent::{Service as S, Slice as L};
        let fake = crate::FakeIptables::default();
        let state = fake.state.clone();
        let mut proxier = Proxier::new(
            Box::new(crate::IptablesBackend::new(fake, Default::default())),
            crate::ProxierOpts::default(),
        );
        let svc = serde_yaml::from_str(
            "metadata: {name: web, namespace: default}\nspec: {clusterIP: 10.96.0.50, ports: [{name: http, port: 80}]}",
        )
        .expect("svc");
        let slice = serde_yaml::from_str(
            "metadata: {name: web-1, namespace: default, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{name: http, port: 8080}]\nendpoints: [{addresses: [10.244.2.5]}]",
        )
        .expect("slice");
        let mut runner = Runner::new(cfg(5, 3600));
        // Services listed, the channel closes: no sync (no half picture).
        let (tx, rx) = std::sync::mpsc::channel();
        for e in [S(Event::Init), S(Event::InitApply(svc)), S(Event::InitDone)] {
            tx.send(e).expect("send");
        }
        drop(tx);
        let mut src = WatchSource::new(rx);
        assert_eq!(runner.run(&mut proxier, &mut src), Ok(RunEnd::Closed));
        assert!(state.lock().expect("state").restores.is_empty());
        assert!(runner
            .status()
            .lock()
            .expect("status")
            .last_success
            .is_none());
        // The slices arrive on the next channel, same mapper: one sync programs both.
        let (tx, rx) = std::sync::mpsc::channel();
        for e in [
            L(Event::Init),
            L(Event::InitApply(slice)),
            L(Event::InitDone),
        ] {
            tx.send(e).expect("send");
        }
        drop(tx);
        let mut src = WatchSource::with_mapper(rx, src.into_mapper());
        assert_eq!(runner.run(&mut proxier, &mut src), Ok(RunEnd::Closed));
        let restores = state.lock().expect("state").restores.clone();
        assert_eq!(restores.len(), 1);
        assert!(restores[0].contains("10.244.2.5:8080"), "{}", restores[0]);
        let st = runner.status().lock().expect("status").clone();
        assert!(st.last_success.is_some());
        assert_eq!(st.metrics.full.count(), 1);
    }

    #[test]
    fn observer_sees_failures_with_their_retry_and_the_recovery() {
        let clock = Manual::new();
        let mut target = Fake {
            clock: clock.clone(),
            fail: [true, false].into_iter().collect(),
            syncs: Vec::new(),
            took: Duration::ZERO,
            idle_unless_dirty: false,
            dirty: false,
        };
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s2 = seen.clone();
        let mut r = Runner::with_clock(cfg(1000, 3600), clock).with_observer(move |e| {
            s2.lock().unwrap().push(match e {
                SyncEvent::Synced { recovered, .. } => format!("ok recovered={recovered}"),
                SyncEvent::Failed {
                    retry_in, failures, ..
                } => format!("failed {failures} retry {}ms", retry_in.as_millis()),
            });
        });
        assert!(r.sync_now(&mut target, false).is_err());
        assert!(r.sync_now(&mut target, false).is_ok());
        assert_eq!(
            *seen.lock().unwrap(),
            ["failed 1 retry 2000ms", "ok recovered=true"]
        );
    }
}

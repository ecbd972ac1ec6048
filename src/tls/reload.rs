//! Keeps every context's generation current: inotify on each Secret *directory*, a periodic
//! re-read as the safety net, fast retries while a context has nothing to serve, and forced
//! reloads (SIGHUP, `POST /reload`).
//!
//! The kubelet never modifies a projected file in place: it renames `..data` (see
//! `material.rs`), which shows up as an event in the watched directory. Our own reads show up
//! as `Access` events and must be ignored, or every reload would trigger the next one.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use notify::event::{AccessKind, AccessMode};
use notify::{Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::store::{ReloadOutcome, TlsStore};
use crate::config::WatchMode;
use crate::metrics::{self as m, Metrics};

/// Quiet time after the last event before reloading: the kubelet's swap is a burst of events.
const DEBOUNCE: Duration = Duration::from_millis(100);
/// First retry delay for a context with no generation; doubles up to the poll interval.
const FIRST_RETRY: Duration = Duration::from_millis(500);

/// What a forced reload did, per context: `ok`, `unchanged`, or the failure reason.
pub type ReloadReport = Vec<(String, String)>;

enum Msg {
    Changed(usize),
    All(Option<oneshot::Sender<ReloadReport>>),
}

/// Handle to force reloads.
#[derive(Clone, Debug)]
pub struct Reloader {
    tx: mpsc::UnboundedSender<Msg>,
}

impl Reloader {
    /// Re-reads every context now (SIGHUP); returns at once.
    pub fn trigger(&self) {
        let _ = self.tx.send(Msg::All(None));
    }

    /// Re-reads every context and reports what happened (`POST /reload`).
    pub async fn reload_and_report(&self) -> ReloadReport {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Msg::All(Some(tx))).is_err() {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }
}

fn outcome_label(o: &ReloadOutcome) -> String {
    match o {
        ReloadOutcome::Unchanged => "unchanged".to_owned(),
        ReloadOutcome::Published(g) => format!("ok (generation {})", g.number),
        ReloadOutcome::Failed(e) => format!("{}: {e}", e.kind()),
    }
}

/// Whether an event can mean new content. Opens and read-closes are our own reads.
fn relevant(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

struct Watches {
    watcher: Option<RecommendedWatcher>,
    /// Directory → context indices.
    dirs: HashMap<PathBuf, Vec<usize>>,
    watched: BTreeSet<PathBuf>,
}

impl Watches {
    fn new(store: &TlsStore, tx: mpsc::UnboundedSender<Msg>, mode: WatchMode) -> Self {
        let mut dirs: HashMap<PathBuf, Vec<usize>> = HashMap::new();
        for (i, slot) in store.slots().enumerate() {
            for d in slot.source().watch_dirs() {
                dirs.entry(d).or_default().push(i);
            }
        }
        let map = dirs.clone();
        if mode == WatchMode::Poll {
            tracing::info!("reload_watch: poll; Secret directories are re-read every reload_poll_interval only");
            return Watches {
                watcher: None,
                dirs,
                watched: BTreeSet::new(),
            };
        }
        let watcher = notify::recommended_watcher(move |res: notify::Result<Event>| {
            let Ok(event) = res else { return };
            if !relevant(&event.kind) {
                return;
            }
            for p in &event.paths {
                let hits = map.get(p.as_path()).or_else(|| p.parent().and_then(|d| map.get(d)));
                for &i in hits.into_iter().flatten() {
                    let _ = tx.send(Msg::Changed(i));
                }
            }
        });
        let watcher = match watcher {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(error = %e, "cannot start the file watcher; falling back to polling only (reload_poll_interval)");
                None
            }
        };
        Watches {
            watcher,
            dirs,
            watched: BTreeSet::new(),
        }
    }

    /// Watches every directory not watched yet (a directory may appear after start).
    fn arm(&mut self, store: &TlsStore, metrics: &Metrics) {
        let Some(w) = self.watcher.as_mut() else {
            for slot in store.slots() {
                set_mode(metrics, &slot.name, false);
            }
            return;
        };
        for dir in self.dirs.keys() {
            if self.watched.contains(dir) {
                continue;
            }
            match w.watch(dir, RecursiveMode::NonRecursive) {
                Ok(()) => {
                    self.watched.insert(dir.clone());
                }
                Err(e) => {
                    tracing::debug!(dir = %dir.display(), error = %e, "cannot watch directory yet; polling it");
                }
            }
        }
        for (i, slot) in store.slots().enumerate() {
            let all = self
                .dirs
                .iter()
                .filter(|(_, idx)| idx.contains(&i))
                .all(|(d, _)| self.watched.contains(d));
            set_mode(metrics, &slot.name, all);
        }
    }

    /// Forgets directories that vanished, so they are watched again when they come back.
    fn prune(&mut self) {
        self.watched.retain(|d| d.exists());
    }
}

fn set_mode(metrics: &Metrics, ctx: &str, inotify: bool) {
    let (on, off) = if inotify {
        ("inotify", "poll")
    } else {
        ("poll", "inotify")
    };
    metrics
        .gauge(m::CERT_WATCH_MODE, &[("tls_context", ctx), ("mode", on)])
        .set(1.0);
    metrics
        .gauge(m::CERT_WATCH_MODE, &[("tls_context", ctx), ("mode", off)])
        .set(0.0);
}

/// Loads every context once (blocking the caller until done), then keeps them current in
/// the background until `stop` fires.
pub async fn start(
    store: Arc<TlsStore>,
    metrics: Arc<Metrics>,
    poll: Duration,
    mode: WatchMode,
    stop: CancellationToken,
    on_change: Arc<dyn Fn() + Send + Sync>,
) -> Reloader {
    let (tx, rx) = mpsc::unbounded_channel();
    let reloader = Reloader { tx: tx.clone() };
    // Watch first, then load: a rotation that lands between the two is then an event
    // waiting in the channel, not a change nobody sees until the next poll.
    let mut watches = Watches::new(&store, tx, mode);
    watches.arm(&store, &metrics);
    let s = store.clone();
    let _ = tokio::task::spawn_blocking(move || s.reload_all()).await;
    on_change();
    tokio::spawn(run(store, metrics, poll, watches, stop, rx, on_change));
    reloader
}

async fn run(
    store: Arc<TlsStore>,
    metrics: Arc<Metrics>,
    poll: Duration,
    mut watches: Watches,
    stop: CancellationToken,
    mut rx: mpsc::UnboundedReceiver<Msg>,
    on_change: Arc<dyn Fn() + Send + Sync>,
) {
    let mut next_poll = tokio::time::Instant::now() + poll;
    let mut retry = FIRST_RETRY;
    let mut next_retry = tokio::time::Instant::now() + retry;
    loop {
        let missing = !store.missing().is_empty();
        let wake = if missing { next_poll.min(next_retry) } else { next_poll };
        let mut changed = BTreeSet::new();
        let mut waiters = Vec::new();
        let mut all = false;
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep_until(wake) => {
                all = true;
                let now = tokio::time::Instant::now();
                if now >= next_poll {
                    next_poll = now + poll;
                }
                if missing && now >= next_retry {
                    retry = (retry * 2).min(poll);
                    next_retry = now + retry;
                }
            }
            msg = rx.recv() => {
                let Some(msg) = msg else { return };
                absorb(msg, &mut changed, &mut all, &mut waiters);
                // Debounce: keep collecting until the burst is over.
                let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
                loop {
                    let quiet = tokio::time::sleep(DEBOUNCE);
                    tokio::select! {
                        m = rx.recv() => match m {
                            Some(m) => absorb(m, &mut changed, &mut all, &mut waiters),
                            None => return,
                        },
                        _ = quiet => break,
                    }
                    if tokio::time::Instant::now() >= deadline {
                        break;
                    }
                }
            }
        }
        let s = store.clone();
        let targets: Option<Vec<usize>> = (!all).then(|| changed.into_iter().collect());
        let report = tokio::task::spawn_blocking(move || {
            s.slots()
                .enumerate()
                .filter(|(i, _)| targets.as_ref().is_none_or(|t| t.contains(i)))
                .map(|(_, slot)| (slot.name.to_string(), outcome_label(&slot.reload())))
                .collect::<ReloadReport>()
        })
        .await
        .unwrap_or_default();
        on_change();
        if store.missing().is_empty() {
            retry = FIRST_RETRY;
        }
        watches.prune();
        watches.arm(&store, &metrics);
        for w in waiters {
            let _ = w.send(report.clone());
        }
    }
}

fn absorb(msg: Msg, changed: &mut BTreeSet<usize>, all: &mut bool, waiters: &mut Vec<oneshot::Sender<ReloadReport>>) {
    match msg {
        Msg::Changed(i) => {
            changed.insert(i);
        }
        Msg::All(w) => {
            *all = true;
            waiters.extend(w);
        }
    }
}

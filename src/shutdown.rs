//! Drain plumbing: one token to stop accepting, one to force-close, and a tracker that knows
//! when the last connection task has finished.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Shared by every listener and connection task.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    /// Cancelled when listeners must stop accepting.
    pub stop_accepting: CancellationToken,
    /// Cancelled when open connections must be closed now.
    pub force_close: CancellationToken,
    /// Cancelled when the drain starts: HTTP connections close when idle / send GOAWAY.
    pub drain: CancellationToken,
    /// Every connection task is spawned through this.
    pub tracker: TaskTracker,
    draining: Arc<AtomicBool>,
}

impl Shutdown {
    /// A fresh set of tokens.
    pub fn new() -> Self {
        Self::default()
    }

    /// Marks the sidecar as draining: readiness turns false, responses say `Connection: close`.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
        self.drain.cancel();
    }

    /// Whether a drain has started.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }
}

//! The accept loop every plaintext listener shares: connection cap, EMFILE back-off, drain.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use metrics::Counter;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::shutdown::Shutdown;

/// Pause after running out of file descriptors: long enough for connections to close, short
/// enough that the app barely notices (tokio-rs/tokio#3529: never spin on EMFILE).
const FD_EXHAUSTED_PAUSE: Duration = Duration::from_secs(1);
const OTHER_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// What a listener does when the connection cap is reached.
#[derive(Clone)]
pub struct Overload {
    /// Bytes written before closing (an HTTP 503 for the HTTP listener; nothing for TCP).
    pub reply: &'static [u8],
    /// `denied_total{listener, reason="overloaded"}`.
    pub counter: Counter,
}

fn fd_exhausted(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Accepts until `stop_accepting`, spawning `handle` for each connection through the tracker.
pub async fn accept_loop<F, Fut>(
    listener: TcpListener,
    name: Arc<str>,
    shutdown: Shutdown,
    cap: Arc<Semaphore>,
    overload: Overload,
    handle: F,
) where
    F: Fn(TcpStream, SocketAddr, OwnedSemaphorePermit) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        let accepted = tokio::select! {
            biased;
            _ = shutdown.stop_accepting.cancelled() => return,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                match cap.clone().try_acquire_owned() {
                    Ok(permit) => {
                        shutdown.tracker.spawn(handle(stream, peer, permit));
                    }
                    Err(_) => {
                        overload.counter.increment(1);
                        tracing::warn!(listener = %name, peer = %peer, reason = "overloaded", "connection cap reached (limits.max_connections); refusing");
                        let reply = overload.reply;
                        shutdown.tracker.spawn(async move {
                            let mut stream = stream;
                            if !reply.is_empty() {
                                let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(reply)).await;
                            }
                        });
                    }
                }
            }
            Err(e) => {
                let pause = if fd_exhausted(&e) {
                    FD_EXHAUSTED_PAUSE
                } else if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
                ) {
                    continue;
                } else {
                    OTHER_ERROR_PAUSE
                };
                tracing::warn!(listener = %name, error = %e, pause_ms = pause.as_millis() as u64, "accept failed; pausing before the next accept");
                tokio::select! {
                    _ = shutdown.stop_accepting.cancelled() => return,
                    _ = tokio::time::sleep(pause) => {}
                }
            }
        }
    }
}

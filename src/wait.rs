//! `mtls-sidecar wait`: exits 0 once the local sidecar reports ready. For clusters without
//! native sidecars, run it as the application's postStart hook (or before the app's command)
//! so the app does not send requests before the sidecar can carry them.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// Asks `GET /readyz` once; `Ok(true)` on 200.
fn ready_once(addr: SocketAddr, timeout: Duration) -> std::io::Result<bool> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.write_all(b"GET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
    let mut head = [0u8; 16];
    let mut n = 0;
    while n < head.len() {
        match s.read(&mut head[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(head[..n].starts_with(b"HTTP/1.1 200"))
}

/// Polls until ready or `timeout`; prints what it waited for.
pub fn main(admin: SocketAddr, timeout: Duration) -> ExitCode {
    let started = Instant::now();
    loop {
        let last = match ready_once(admin, Duration::from_secs(1)) {
            Ok(true) => {
                eprintln!("mtls-sidecar wait: ready after {:.1}s", started.elapsed().as_secs_f64());
                return ExitCode::SUCCESS;
            }
            Ok(false) => "the sidecar answered /readyz but is not ready yet".to_owned(),
            Err(e) => format!("cannot reach http://{admin}/readyz: {e}"),
        };
        if started.elapsed() >= timeout {
            eprintln!("mtls-sidecar wait: not ready after {timeout:?}: {last}");
            return ExitCode::FAILURE;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

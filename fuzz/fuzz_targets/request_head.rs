//! The request-head guard and the transparent-mode protocol sniffer: never panic; a head
//! without a single CR that has a line ending at all is always refused (bare LF); a ClAndTe
//! verdict only for heads naming both fields.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mtls_sidecar::proxy::http::guard::{Violation, check_head};
use mtls_sidecar::proxy::transparent::classify;

fuzz_target!(|data: &[u8]| {
    let verdict = check_head(data);
    if !data.contains(&b'\r') && data.contains(&b'\n') {
        assert_eq!(verdict, Some(Violation::BareLf), "LF-only line endings must be refused");
    }
    if verdict == Some(Violation::ClAndTe) {
        let text = String::from_utf8_lossy(data).to_ascii_lowercase();
        assert!(text.contains("content-length") && text.contains("transfer-encoding"));
    }
    let _ = classify(&data[..data.len().min(16)]);
});

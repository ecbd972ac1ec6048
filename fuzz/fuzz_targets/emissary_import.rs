//! Emissary Kubernetes YAML → config objects → validate(): must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mtls_sidecar::config::{Config, import_str, validate};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let mut config = Config::default();
    let (mut problems, mut warnings) = (Vec::new(), Vec::new());
    import_str(&mut config, text, "fuzz.yaml", &mut problems, &mut warnings);
    if problems.is_empty() {
        let _ = validate(&config);
    }
});

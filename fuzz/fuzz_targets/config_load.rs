//! YAML → typed config → validate(): must never panic, whatever the bytes.
#![no_main]

use figment::Figment;
use figment::providers::{Format, Yaml};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(config) = mtls_sidecar::config::from_figment(&Figment::from(Yaml::string(text))) {
        let _ = mtls_sidecar::config::validate(&config);
    }
});

//! The configuration as the binary sees it: a file, `MTLS_SIDECAR__*` environment overrides
//! (set on the child process only, never on this one), exit code 78, and `check`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::Path;
use std::process::{Command, Output};

use support::World;

const EX_CONFIG: i32 = 78;

/// Runs `mtls-sidecar check --config <path>` with `env` set, and no inherited overrides.
fn check(config: &Path, env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mtls-sidecar"));
    cmd.arg("check").arg("--config").arg(config);
    for (k, _) in std::env::vars() {
        if k.starts_with("MTLS_SIDECAR") || k == "RUST_LOG" {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().copied());
    cmd.output().expect("running mtls-sidecar check")
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn a_bad_configuration_exits_78_naming_the_field_and_the_file() {
    let w = World::new();
    let path = w.file("config.yaml", "admin: null\nlistners: { http: 127.0.0.1:15001 }\n");
    let out = check(&path, &[]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(EX_CONFIG), "{stdout}{stderr}");
    assert!(stderr.contains("listners: unknown field `listners`"), "{stderr}");
    assert!(stderr.contains(&path.display().to_string()), "names the file: {stderr}");
}

#[test]
fn a_missing_configuration_file_exits_78() {
    let w = World::new();
    let out = check(&w.dir.path().join("nowhere.yaml"), &[]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(EX_CONFIG), "{stderr}");
    assert!(stderr.contains("nowhere.yaml"), "{stderr}");
}

#[test]
fn environment_overrides_apply_over_the_file() {
    let w = World::new();
    // The file alone is invalid (plaintext listener off loopback); the override repairs it.
    let bad = w.file("bad.yaml", "admin: null\nlisteners: { http: 0.0.0.0:15001 }\n");
    let out = check(&bad, &[]);
    assert_eq!(out.status.code(), Some(EX_CONFIG), "{:?}", text(&out));
    let out = check(&bad, &[("MTLS_SIDECAR__LISTENERS__HTTP", "127.0.0.1:25001")]);
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));

    // The file alone is valid; the override moves http onto the TCP mapping's port.
    let good = w.file(
        "good.yaml",
        "admin: null\nlisteners: { http: 127.0.0.1:15001 }\ntcp_mappings:\n  - { name: db, port: 25001, service: \"db.svc:5432\" }\n",
    );
    let out = check(&good, &[]);
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
    let out = check(&good, &[("MTLS_SIDECAR__LISTENERS__HTTP", "127.0.0.1:25001")]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(EX_CONFIG), "{stderr}");
    assert!(
        stderr.contains("tcp_mappings[0].port: port 25001 is already used by listeners.http"),
        "{stderr}"
    );
}

#[test]
fn a_bad_environment_value_names_the_variable() {
    let w = World::new();
    let path = w.file("config.yaml", "admin: null\n");
    let out = check(&path, &[("MTLS_SIDECAR__LISTENERS__HTTP", "not-an-address")]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(EX_CONFIG), "{stderr}");
    assert!(stderr.contains("listeners.http"), "{stderr}");
    assert!(stderr.contains("`not-an-address`"), "{stderr}");
    assert!(
        stderr.contains("environment variable MTLS_SIDECAR__LISTENERS__HTTP"),
        "the origin is the variable, not the file: {stderr}"
    );
}

/// A config with context `good` (a valid client identity) and optionally `broken`.
fn check_config(w: &World, broken: bool) -> std::path::PathBuf {
    let leaf = w.ca.client("check-client");
    w.client_secret("good-certs", &leaf, &leaf.key_pem);
    let expired = w.ca.expired_client("old-client");
    w.client_secret("old-certs", &expired, &expired.key_pem);
    let mut yaml = format!(
        "admin: null\nsecrets_dir: \"{}\"\ntls_contexts:\n  good: {{ secret: good-certs }}\n",
        w.secrets_dir().display()
    );
    if broken {
        yaml.push_str("  broken: { secret: old-certs }\n");
    }
    w.file("config.yaml", &yaml)
}

#[test]
fn check_prints_each_context_and_exits_0() {
    let w = World::new();
    let out = check(&check_config(&w, false), &[]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("context good: OK"), "{stdout}");
    let line = stdout
        .lines()
        .find(|l| l.contains("client certificate:"))
        .unwrap_or_else(|| panic!("no client certificate line:\n{stdout}"));
    for needle in ["subject=\"CN=check-client\"", "key=ECDSA P-256", "not_after=20"] {
        assert!(line.contains(needle), "`{line}` should contain `{needle}`");
    }
    assert!(stdout.contains("CA bundle: 1 certificate(s), 0 ignored"), "{stdout}");
}

#[test]
fn check_fails_naming_a_context_that_cannot_load() {
    let w = World::new();
    let out = check(&check_config(&w, true), &[]);
    let (stdout, stderr) = text(&out);
    assert!(!out.status.success(), "{stdout}{stderr}");
    assert_ne!(out.status.code(), Some(EX_CONFIG), "the configuration itself is valid");
    assert!(stdout.contains("context good: OK"), "{stdout}");
    assert!(stdout.contains("context broken: FAILED (cert_expired)"), "{stdout}");
    assert!(stdout.contains("1 TLS context(s) failed to load"), "{stdout}");
}

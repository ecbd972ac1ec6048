//! Kubernetes packaging: `inject` golden files, idempotency and refusals; the example
//! manifests (kubernetes-validate --strict for 1.29 and 1.33, promtool on the alert rules,
//! our own validator on the embedded config); `wait` against a ready and an absent sidecar.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use mtls_sidecar::inject::{Options, inject};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn options(secrets: &[&str]) -> Options {
    Options {
        image: "mtls-sidecar:0.1.0".into(),
        secrets: secrets.iter().map(|s| (*s).to_owned()).collect(),
        ..Options::default()
    }
}

/// Compares with a golden file; `UPDATE_GOLDEN=1` rewrites it.
fn golden(path: &Path, actual: &str) {
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(path, actual).unwrap();
    }
    let expected = std::fs::read_to_string(path).unwrap();
    assert!(
        expected == actual,
        "{} differs from the output:\n{actual}",
        path.display()
    );
}

fn tool(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.exists())
}

/// A tool the CI installs: missing locally → skip with a reason; missing in CI → fail.
fn required_tool(name: &str, how: &str) -> Option<PathBuf> {
    let t = tool(name);
    if t.is_none() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{name} is required in CI ({how})"
        );
        eprintln!("SKIPPED: {name} is not installed ({how})");
    }
    t
}

#[test]
fn inject_every_workload_kind_matches_the_golden_file() {
    let dir = root().join("tests/golden/inject");
    let input = std::fs::read_to_string(dir.join("workloads.in.yaml")).unwrap();
    let out = inject(&input, &options(&["client-certs", "extra-ca"])).unwrap();
    golden(&dir.join("workloads.out.yaml"), &out);
    let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&out)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect();
    assert_eq!(docs.len(), 6);
    for d in &docs[..5] {
        let spec = pod_spec(d);
        let init = spec["initContainers"].as_sequence().unwrap();
        let sidecar = init.iter().find(|c| c["name"] == "mtls-sidecar").unwrap();
        assert_eq!(sidecar["restartPolicy"], "Always", "a native sidecar");
        assert_eq!(sidecar["startupProbe"]["httpGet"]["path"], "/readyz");
        assert_eq!(sidecar["livenessProbe"]["httpGet"]["path"], "/healthz");
        assert_eq!(sidecar["securityContext"]["runAsUser"], 65532);
        assert_eq!(sidecar["securityContext"]["readOnlyRootFilesystem"], true);
        assert_eq!(sidecar["securityContext"]["capabilities"]["drop"][0], "ALL");
        let text = serde_yaml::to_string(d).unwrap();
        assert!(
            !text.contains("subPath"),
            "Secrets are mounted as directories, never with subPath"
        );
        for v in spec["volumes"].as_sequence().unwrap() {
            if let Some(secret) = v.get("secret") {
                assert_eq!(secret["defaultMode"], 0o440);
            }
        }
        for c in spec["containers"].as_sequence().unwrap() {
            let names: Vec<_> = c["env"]
                .as_sequence()
                .unwrap()
                .iter()
                .map(|e| e["name"].as_str().unwrap())
                .collect();
            assert!(names.iter().any(|n| n.eq_ignore_ascii_case("http_proxy")));
        }
    }
    // The StatefulSet's own fsGroup and proxy setting are respected.
    let sts = pod_spec(&docs[1]);
    assert_eq!(sts["securityContext"]["fsGroup"], 2000);
    let env = sts["containers"][0]["env"].as_sequence().unwrap();
    assert_eq!(
        env.iter()
            .filter(|e| e["name"] == "http_proxy" || e["name"] == "HTTP_PROXY")
            .count(),
        1
    );
    // The DaemonSet's own init container still runs, after the sidecar started.
    let ds = pod_spec(&docs[2])["initContainers"].as_sequence().unwrap().clone();
    assert_eq!(ds[0]["name"], "mtls-sidecar");
    assert_eq!(ds[1]["name"], "setup");
    assert!(
        out.ends_with("pass through byte for byte   # like this\n"),
        "other kinds pass through untouched"
    );
}

fn pod_spec(d: &serde_yaml::Value) -> &serde_yaml::Value {
    match d["kind"].as_str().unwrap() {
        "Pod" => &d["spec"],
        "CronJob" => &d["spec"]["jobTemplate"]["spec"]["template"]["spec"],
        _ => &d["spec"]["template"]["spec"],
    }
}

#[test]
fn inject_is_idempotent_and_refuses_what_it_cannot_parse() {
    let input = std::fs::read_to_string(root().join("tests/golden/inject/workloads.in.yaml")).unwrap();
    let o = options(&["client-certs"]);
    let once = inject(&input, &o).unwrap();
    assert_eq!(inject(&once, &o).unwrap(), once, "injecting twice equals once");
    let e = inject("kind: Deployment\nspec: [", &o).unwrap_err().to_string();
    assert!(e.contains("document 1") && e.contains("not valid YAML"), "{e}");
    let e = inject(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\nspec: {}\n",
        &o,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("Deployment x") && e.contains("spec.template.spec"), "{e}");
    let e = inject("apiVersion: v1\nkind: List\nitems: []\n", &o)
        .unwrap_err()
        .to_string();
    assert!(e.contains("List"), "{e}");
    // The binary writes nothing on failure and exits non-zero.
    let out = Command::new(env!("CARGO_BIN_EXE_mtls-sidecar"))
        .args(["inject", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(b"kind: Pod\nspec: {containers: [")?;
            c.wait_with_output()
        })
        .unwrap();
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing was written"));
}

#[test]
fn inject_transparent_adds_the_iptables_init_container_first() {
    let input = "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers:\n  - {name: app, image: x}\n";
    let o = Options {
        transparent: Some(15006),
        ..options(&["certs"])
    };
    let out = inject(input, &o).unwrap();
    let d: serde_yaml::Value = serde_yaml::from_str(&out).unwrap();
    let init = d["spec"]["initContainers"].as_sequence().unwrap();
    assert_eq!(init[0]["name"], "mtls-sidecar-iptables");
    assert_eq!(init[0]["securityContext"]["capabilities"]["add"][0], "NET_ADMIN");
    assert_eq!(init[1]["name"], "mtls-sidecar");
    assert_eq!(inject(&out, &o).unwrap(), out);
}

#[test]
fn the_example_deployments_are_the_injected_example_app() {
    let app = std::fs::read_to_string(root().join("manifests/source/app.yaml")).unwrap();
    let transparent = Options {
        config_map: "mtls-sidecar-transparent-config".into(),
        transparent: Some(15006),
        ..options(&["mtls-client-certs"])
    };
    for (file, o) in [
        ("manifests/deployment.yaml", options(&["mtls-client-certs"])),
        ("manifests/transparent/deployment.yaml", transparent),
    ] {
        let generated = inject(&app, &o).unwrap();
        let shipped = std::fs::read_to_string(root().join(file)).unwrap();
        let shipped = shipped.split_once('\n').unwrap().1;
        assert_eq!(
            shipped, generated,
            "regenerate {file} with the command in its first line"
        );
    }
}

#[test]
fn the_example_config_maps_hold_valid_configurations() {
    for file in ["manifests/configmap.yaml", "manifests/transparent/configmap.yaml"] {
        let cm: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(root().join(file)).unwrap()).unwrap();
        let yaml = cm["data"]["config.yaml"].as_str().unwrap();
        let config = mtls_sidecar::config::from_figment(&figment::Figment::from(
            <figment::providers::Yaml as figment::providers::Format>::string(yaml),
        ))
        .unwrap();
        if let Err(e) = mtls_sidecar::config::validate(&config) {
            panic!("{file}: {e}");
        }
        assert!(
            config
                .tls_contexts
                .values()
                .all(|c| c.secret.as_deref() == Some("mtls-client-certs"))
        );
    }
}

#[test]
fn manifests_and_injected_output_pass_kubernetes_validate_strict() {
    let Some(kv) = required_tool("kubernetes-validate", "pip install kubernetes-validate") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let injected = dir.path().join("injected.yaml");
    let input = std::fs::read_to_string(root().join("tests/golden/inject/workloads.in.yaml")).unwrap();
    std::fs::write(&injected, inject(&input, &options(&["client-certs"])).unwrap()).unwrap();
    let mut files: Vec<PathBuf> = ["manifests", "manifests/transparent"]
        .iter()
        .flat_map(|d| std::fs::read_dir(root().join(d)).unwrap())
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.push(injected);
    for version in ["1.29", "1.33"] {
        let out = Command::new(&kv)
            .args(["--strict", "-k", version])
            .args(&files)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "kubernetes-validate {version}:\n{text}");
        assert!(text.contains("passed for resource deployment/orders"), "{text}");
        assert!(text.contains("passed for resource cronjob/report"), "{text}");
    }
}

#[test]
fn alert_rules_pass_promtool() {
    let Some(promtool) = required_tool("promtool", "Debian package prometheus") else {
        return;
    };
    let rule: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(root().join("manifests/prometheusrule.yaml")).unwrap()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.yaml");
    std::fs::write(&rules, serde_yaml::to_string(&rule["spec"]).unwrap()).unwrap();
    let out = Command::new(promtool)
        .args(["check", "rules"])
        .arg(&rules)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let names: Vec<_> = rule["spec"]["groups"][0]["rules"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|r| r["alert"].as_str().unwrap().to_owned())
        .collect();
    for want in ["ExpiresSoon", "ReloadFailing", "HandshakeFailures", "NotReady"] {
        assert!(names.iter().any(|n| n.contains(want)), "{want} alert in {names:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn wait_returns_zero_for_a_ready_sidecar_and_fails_after_its_timeout_without_one() {
    let yaml = "listeners: { http: null }\nadmin: 127.0.0.1:0\n";
    let config = mtls_sidecar::config::from_figment(&figment::Figment::from(
        <figment::providers::Yaml as figment::providers::Format>::string(yaml),
    ))
    .unwrap();
    let sidecar = mtls_sidecar::app::start(config).await.unwrap();
    let admin = sidecar.admin_addr.unwrap().to_string();
    let bin = env!("CARGO_BIN_EXE_mtls-sidecar");
    let ok = tokio::process::Command::new(bin)
        .args(["wait", "--timeout", "10s", "--admin", &admin])
        .status()
        .await
        .unwrap();
    assert!(ok.success());
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let started = std::time::Instant::now();
    let out = tokio::process::Command::new(bin)
        .args(["wait", "--timeout", "1s", "--admin", &free])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(started.elapsed() >= std::time::Duration::from_secs(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not ready after"));
}

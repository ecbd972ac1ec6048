//! `mtls-sidecar iptables`: the outbound redirect for transparent mode, printed in
//! `iptables-restore` format or applied (the init container runs `--apply`).
//!
//! Everything the app sends over TCP goes through chain `MTLS_SIDECAR_OUTPUT`, which returns
//! early for the sidecar's own uid (its upstream connections must never come back to itself),
//! for loopback, and for excluded destinations and ports, and redirects the rest to the
//! transparent listener.

use std::io::Write;
use std::process::{Command, ExitCode, Stdio};

use crate::config::Cidr;

/// The chain we own.
pub const CHAIN: &str = "MTLS_SIDECAR_OUTPUT";

/// What to generate.
#[derive(Debug, Clone)]
pub struct Rules {
    /// The transparent listener's port.
    pub port: u16,
    /// The sidecar's uid, whose traffic is never redirected.
    pub uid: u32,
    /// Destinations never redirected (e.g. the API server, a node-local DNS cache).
    pub exclude_cidrs: Vec<Cidr>,
    /// Destination ports never redirected.
    pub exclude_ports: Vec<u16>,
    /// IPv6 (ip6tables) instead of IPv4.
    pub ipv6: bool,
}

impl Rules {
    /// The `nat` table rules for our chain, without the jump from OUTPUT.
    fn chain_rules(&self) -> String {
        let mut out = String::new();
        let loopback = if self.ipv6 { "::1/128" } else { "127.0.0.0/8" };
        let mut rule = |r: String| {
            out.push_str(&format!("-A {CHAIN} {r}\n"));
        };
        rule(format!("-m owner --uid-owner {} -j RETURN", self.uid));
        rule("-o lo -j RETURN".to_owned());
        rule(format!("-d {loopback} -j RETURN"));
        for c in &self.exclude_cidrs {
            rule(format!("-d {c} -j RETURN"));
        }
        for p in &self.exclude_ports {
            rule(format!("-p tcp --dport {p} -j RETURN"));
        }
        rule(format!("-p tcp -j REDIRECT --to-ports {}", self.port));
        out
    }

    /// The full ruleset for a fresh pod network namespace, in `iptables-restore` format.
    pub fn render(&self) -> String {
        format!(
            "# mtls-sidecar transparent mode ({}): redirect outbound TCP to port {}\n*nat\n:{CHAIN} - [0:0]\n-A OUTPUT -p tcp -j {CHAIN}\n{}COMMIT\n",
            if self.ipv6 { "ip6tables" } else { "iptables" },
            self.port,
            self.chain_rules()
        )
    }

    /// Applies the rules idempotently: our chain is (re)written whole, and the jump from
    /// OUTPUT is added only if it is not there yet (init containers re-run on pod restarts).
    pub fn apply(&self) -> Result<(), String> {
        let (restore, tables) = if self.ipv6 {
            ("ip6tables-restore", "ip6tables")
        } else {
            ("iptables-restore", "iptables")
        };
        let input = format!("*nat\n:{CHAIN} - [0:0]\n{}COMMIT\n", self.chain_rules());
        let mut child = Command::new(restore)
            .arg("--noflush")
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run {restore}: {e}"))?;
        child
            .stdin
            .take()
            .ok_or("no stdin")?
            .write_all(input.as_bytes())
            .map_err(|e| format!("writing to {restore}: {e}"))?;
        let out = child.wait_with_output().map_err(|e| format!("{restore}: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "{restore} failed ({}): {} (the init container needs NET_ADMIN and NET_RAW)",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let jump = ["-t", "nat", "-p", "tcp", "-j", CHAIN];
        let present = Command::new(tables)
            .args(["-t", "nat", "-C", "OUTPUT"])
            .args(&jump[2..])
            .stderr(Stdio::null())
            .status()
            .map_err(|e| format!("cannot run {tables}: {e}"))?;
        if !present.success() {
            let out = Command::new(tables)
                .args(["-t", "nat", "-A", "OUTPUT"])
                .args(&jump[2..])
                .output()
                .map_err(|e| format!("cannot run {tables}: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "{tables} -A OUTPUT failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
        }
        Ok(())
    }
}

/// CLI entry.
pub fn main(rules: &Rules, apply: bool) -> ExitCode {
    if !apply {
        print!("{}", rules.render());
        return ExitCode::SUCCESS;
    }
    match rules.apply() {
        Ok(()) => {
            eprintln!(
                "mtls-sidecar iptables: outbound TCP is redirected to port {} (uid {} excluded){}",
                rules.port,
                rules.uid,
                if rules.ipv6 { " [IPv6]" } else { "" }
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mtls-sidecar iptables: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_returns_before_the_redirect() {
        let r = Rules {
            port: 15006,
            uid: 65532,
            exclude_cidrs: vec![Cidr::parse("10.0.0.1").unwrap()],
            exclude_ports: vec![22],
            ipv6: false,
        };
        let text = r.render();
        let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("-A")).collect();
        assert_eq!(lines[0], "-A OUTPUT -p tcp -j MTLS_SIDECAR_OUTPUT");
        assert_eq!(lines[1], "-A MTLS_SIDECAR_OUTPUT -m owner --uid-owner 65532 -j RETURN");
        assert!(lines.contains(&"-A MTLS_SIDECAR_OUTPUT -d 10.0.0.1/32 -j RETURN"));
        assert!(lines.contains(&"-A MTLS_SIDECAR_OUTPUT -p tcp --dport 22 -j RETURN"));
        assert_eq!(
            *lines.last().unwrap(),
            "-A MTLS_SIDECAR_OUTPUT -p tcp -j REDIRECT --to-ports 15006"
        );
        assert!(text.starts_with("# mtls-sidecar") && text.contains("*nat\n") && text.ends_with("COMMIT\n"));
        let v6 = Rules { ipv6: true, ..r }.render();
        assert!(v6.contains("-d ::1/128 -j RETURN"));
    }
}

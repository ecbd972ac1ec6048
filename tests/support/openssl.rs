//! Certificates made by the `openssl` command line, the tool operators actually use.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The `openssl version` line, or `None` when the command is not on PATH.
pub fn version() -> Option<String> {
    let out = Command::new("openssl").arg("version").output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Runs `openssl args...` in `dir`; panics with its stderr on failure.
pub fn run(dir: &Path, args: &[&str]) {
    try_run(dir, args).unwrap_or_else(|e| panic!("openssl {}: {e}", args.join(" ")));
}

/// Runs `openssl args...` in `dir`; the error is its stderr.
pub fn try_run(dir: &Path, args: &[&str]) -> Result<(), String> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// A CA made with `openssl req -x509` (P-256), living in `dir`.
pub struct OpensslCa {
    dir: PathBuf,
    /// `ca.crt`, PEM.
    pub cert_pem: String,
}

/// A client certificate made with openssl: cert and key, PEM, as openssl wrote them.
pub struct OpensslLeaf {
    /// The certificate.
    pub cert_pem: String,
    /// The key file, untouched.
    pub key_pem: String,
}

impl OpensslCa {
    /// Creates the CA in `dir`.
    pub fn new(dir: &Path) -> Self {
        run(
            dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
                "-days",
                "30",
                "-subj",
                "/CN=openssl test CA",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        );
        OpensslCa {
            dir: dir.to_owned(),
            cert_pem: read(&dir.join("ca.crt")),
        }
    }

    /// Signs a client certificate for the key file `key` (already in `dir`), with `serial`
    /// (hex) and a SPIFFE URI SAN, via a CSR made by `openssl req -new`.
    pub fn sign_client(&self, key: &str, cn: &str, serial_hex: &str) -> OpensslLeaf {
        let stem = key.trim_end_matches(".key");
        let (csr, crt, ext) = (format!("{stem}.csr"), format!("{stem}.crt"), format!("{stem}.ext"));
        run(
            &self.dir,
            &["req", "-new", "-key", key, "-subj", &format!("/CN={cn}"), "-out", &csr],
        );
        std::fs::write(
            self.dir.join(&ext),
            format!(
                "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\nsubjectAltName=URI:spiffe://openssl.test/{cn}\n"
            ),
        )
        .expect("writing the extension file");
        run(
            &self.dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-set_serial",
                &format!("0x{serial_hex}"),
                "-days",
                "1",
                "-sha256",
                "-extfile",
                &ext,
                "-out",
                &crt,
            ],
        );
        OpensslLeaf {
            cert_pem: read(&self.dir.join(&crt)),
            key_pem: read(&self.dir.join(key)),
        }
    }
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

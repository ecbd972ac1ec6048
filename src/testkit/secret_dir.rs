//! A directory updated exactly as the kubelet updates a Secret volume
//! (kubernetes pkg/volume/util/atomic_writer.go; `shared/tools/atomic_writer.py` is the
//! reference), plus the naive in-place writer the kubelet is careful never to be.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

const DATA: &str = "..data";
const DATA_TMP: &str = "..data_tmp";

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A Secret volume in kubelet layout.
#[derive(Debug, Clone)]
pub struct SecretDir {
    path: PathBuf,
}

impl SecretDir {
    /// Creates the directory (empty: like a Secret that has not been projected yet).
    pub fn create(path: impl Into<PathBuf>) -> io::Result<Self> {
        let path = path.into();
        fs::create_dir_all(&path)?;
        Ok(SecretDir { path })
    }

    /// The volume's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn timestamped_name() -> String {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let rfc = crate::tls::info::rfc3339((now / 1_000_000_000) as i64);
        // ..2026_11_28_10_00_00.<random>: the random part keeps two updates in one second apart.
        let stamp: String = rfc.trim_end_matches('Z').replace(['-', 'T', ':'], "_");
        let rand = (now as u32) ^ NEXT.fetch_add(0x9e37_79b9, Ordering::Relaxed);
        format!("..{stamp}.{rand}")
    }

    /// Publishes `files` (key → bytes) with file mode 0644, as one atomic switch.
    pub fn publish(&self, files: &[(&str, &[u8])]) -> io::Result<()> {
        self.publish_with_mode(files, 0o644)
    }

    /// Publishes `files` with the given file mode (`defaultMode`).
    pub fn publish_with_mode(&self, files: &[(&str, &[u8])], mode: u32) -> io::Result<()> {
        let payload: BTreeMap<&str, &[u8]> = files.iter().copied().collect();
        let old_ts = fs::read_link(self.path.join(DATA)).ok();
        let old_keys: Vec<String> = match &old_ts {
            Some(ts) => fs::read_dir(self.path.join(ts))?
                .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
                .collect(),
            None => Vec::new(),
        };
        let removed: Vec<&String> = old_keys.iter().filter(|k| !payload.contains_key(k.as_str())).collect();
        if let Some(ts) = &old_ts
            && removed.is_empty()
            && payload
                .iter()
                .all(|(k, v)| fs::read(self.path.join(ts).join(k)).is_ok_and(|old| old == *v))
        {
            // Byte-identical: the kubelet writes nothing and only ensures the user-visible links.
            return self.ensure_links(&payload);
        }
        let ts_name = Self::timestamped_name();
        let ts_dir = self.path.join(&ts_name);
        fs::create_dir(&ts_dir)?;
        fs::set_permissions(&ts_dir, fs::Permissions::from_mode(0o755))?;
        for (key, bytes) in &payload {
            let p = ts_dir.join(key);
            fs::write(&p, bytes)?;
            fs::set_permissions(&p, fs::Permissions::from_mode(mode))?;
        }
        let tmp = self.path.join(DATA_TMP);
        let _ = fs::remove_file(&tmp);
        symlink(&ts_name, &tmp)?;
        // The one atomic switch every reader relies on.
        fs::rename(&tmp, self.path.join(DATA))?;
        self.ensure_links(&payload)?;
        for key in removed {
            let _ = fs::remove_file(self.path.join(key));
        }
        if let Some(old) = old_ts {
            fs::remove_dir_all(self.path.join(old))?;
        }
        Ok(())
    }

    fn ensure_links(&self, payload: &BTreeMap<&str, &[u8]>) -> io::Result<()> {
        for key in payload.keys() {
            let link = self.path.join(key);
            if fs::symlink_metadata(&link).is_err() {
                symlink(Path::new(DATA).join(key), &link)?;
            }
        }
        Ok(())
    }

    /// Removes every key, as the kubelet does when an `optional: true` Secret is deleted.
    pub fn delete_all_keys(&self) -> io::Result<()> {
        self.publish(&[])
    }

    /// NOT what the kubelet does: overwrites each file in place, through the per-key symlinks,
    /// one after the other, calling `between` after each file (`atomic_writer.py --torn`).
    pub fn torn_write(&self, files: &[(&str, &[u8])], mut between: impl FnMut()) -> io::Result<()> {
        for (key, bytes) in files {
            fs::write(self.path.join(key), bytes)?;
            between();
        }
        Ok(())
    }

    /// Like `torn_write`, but each file is also written in two halves with `between` called
    /// in the middle, so a reader can see a truncated PEM (`--torn-partial`).
    pub fn torn_write_halves(&self, files: &[(&str, &[u8])], mut between: impl FnMut()) -> io::Result<()> {
        for (key, bytes) in files {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .truncate(true)
                .create(true)
                .open(self.path.join(key))?;
            let half = bytes.len() / 2;
            f.write_all(&bytes[..half])?;
            f.flush()?;
            between();
            f.write_all(&bytes[half..])?;
            f.flush()?;
            between();
        }
        Ok(())
    }
}

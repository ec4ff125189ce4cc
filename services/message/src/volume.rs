//! How full the embedded store's volume is, for the alert that warns
//! before it fills (a full volume refuses every append).

use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How often the volume is measured: filling takes minutes at the least.
const EVERY: Duration = Duration::from_secs(15);

/// Bytes used on the volume that holds `path`, and its size as an
/// unprivileged writer sees it (used plus available), as `df` counts them.
pub fn usage(path: &Path) -> std::io::Result<(u64, u64)> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let s = rustix::fs::statvfs(dir)?;
    let used = s
        .f_blocks
        .saturating_sub(s.f_bfree)
        .saturating_mul(s.f_frsize);
    let avail = s.f_bavail.saturating_mul(s.f_frsize);
    Ok((used, used.saturating_add(avail)))
}

/// Registers the volume gauges and keeps them current until `cancel`.
pub fn watch(path: PathBuf, reg: &mut Registry, cancel: CancellationToken) {
    let used: Gauge<u64, AtomicU64> = Gauge::default();
    let size: Gauge<u64, AtomicU64> = Gauge::default();
    reg.register(
        "pushcluster_store_volume_used_bytes",
        "Bytes used on the embedded store's volume",
        used.clone(),
    );
    reg.register(
        "pushcluster_store_volume_size_bytes",
        "Size of the embedded store's volume as the message service can fill it (used plus available)",
        size.clone(),
    );
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(EVERY);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            match usage(&path) {
                Ok((u, s)) => {
                    used.set(u);
                    size.set(s);
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot measure the store's volume")
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    #[test]
    fn measures_the_volume_of_a_file_to_be() {
        let dir = tempfile::tempdir().unwrap();
        let (used, size) = super::usage(&dir.path().join("store.redb")).unwrap();
        assert!(size > 0 && used <= size, "used {used} of {size}");
    }
}

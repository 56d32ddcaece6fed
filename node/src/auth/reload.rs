//! A value loaded from a file and reloaded when the file changes.
//!
//! The file's metadata (modification time, length and, on Unix, inode) is polled; a change
//! reloads it. A file that no longer loads keeps the previous value in use, and the failure is
//! reported once per change of the file.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use super::error::chain;
use super::AuthError;

/// Reads a file into a `T`, e.g. [`super::Acl::load`] or [`super::PasswordFile::load`].
pub type Loader<T> = fn(&Path) -> Result<T, AuthError>;

/// The current value of a file-backed `T`; readers take a cheap `Arc` snapshot.
pub struct Reloadable<T> {
    path: PathBuf,
    loader: Loader<T>,
    current: RwLock<Arc<T>>,
    /// How many times a new value replaced the first one: decisions taken from an older
    /// value are stale.
    generation: AtomicU64,
    /// Metadata seen at the last load attempt; `None` if the file could not be examined.
    seen: Mutex<Option<Stamp>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

impl<T> Reloadable<T>
where
    T: Send + Sync + 'static,
{
    /// Loads `path` for the first time; an error here is the caller's to report.
    pub fn load(path: impl Into<PathBuf>, loader: Loader<T>) -> Result<Self, AuthError> {
        let path = path.into();
        let seen = stamp(&path).ok();
        let value = loader(&path)?;
        Ok(Reloadable {
            path,
            loader,
            current: RwLock::new(Arc::new(value)),
            generation: AtomicU64::new(0),
            seen: Mutex::new(seen),
        })
    }

    /// The file this value comes from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The value loaded last.
    pub fn current(&self) -> Arc<T> {
        Arc::clone(
            &self
                .current
                .read()
                .unwrap_or_else(|poison| poison.into_inner()),
        )
    }

    /// Bumped by every reload that put a new value in use.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Reloads if the file's metadata changed since the last attempt: `Ok(true)` if a new value
    /// is in use, `Ok(false)` if nothing changed, `Err` if the changed file failed to load (the
    /// previous value stays in use; the same failure is not reported again until the file
    /// changes). Blocking: file I/O and parsing.
    pub fn reload_if_changed(&self) -> Result<bool, AuthError> {
        let mut seen = self
            .seen
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        let now = match stamp(&self.path) {
            Ok(now) => now,
            Err(source) => {
                if seen.take().is_none() {
                    return Ok(false);
                }
                return Err(AuthError::Read {
                    what: "file",
                    path: self.path.clone(),
                    source,
                });
            }
        };
        if seen.as_ref() == Some(&now) {
            return Ok(false);
        }
        // The stamp is taken before reading: a write racing with the read changes it again,
        // so the next poll loads the final content.
        *seen = Some(now);
        let value = (self.loader)(&self.path)?;
        *self
            .current
            .write()
            .unwrap_or_else(|poison| poison.into_inner()) = Arc::new(value);
        self.generation.fetch_add(1, Ordering::AcqRel);
        Ok(true)
    }

    /// Polls the file every `every` until `cancel` fires. Loading runs on the blocking pool.
    pub async fn watch(self: Arc<Self>, every: Duration, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            let this = Arc::clone(&self);
            let path = self.path.display();
            match tokio::task::spawn_blocking(move || this.reload_if_changed()).await {
                Ok(Ok(true)) => tracing::info!(path = %path, "reloaded"),
                Ok(Ok(false)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(path = %path, error = %chain(&e), "reload failed, keeping the previous version")
                }
                Err(e) => tracing::warn!(path = %path, error = %e, "reload task failed"),
            }
        }
    }
}

fn stamp(path: &Path) -> std::io::Result<Stamp> {
    let meta = std::fs::metadata(path)?;
    #[cfg(unix)]
    let inode = std::os::unix::fs::MetadataExt::ino(&meta);
    #[cfg(not(unix))]
    let inode = 0;
    Ok(Stamp {
        modified: meta.modified().ok(),
        len: meta.len(),
        inode,
    })
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::time::Instant;

    use super::*;

    /// Loads the first line of a file as a number.
    fn number(path: &Path) -> Result<u32, AuthError> {
        let text = fs::read_to_string(path).map_err(|source| AuthError::Read {
            what: "number file",
            path: path.to_path_buf(),
            source,
        })?;
        text.trim()
            .parse()
            .map_err(|e: std::num::ParseIntError| AuthError::Parse {
                what: "number file",
                path: Some(path.to_path_buf()),
                line: 1,
                reason: e.to_string(),
            })
    }

    /// Rewrites the file in place and moves its mtime, so a change is seen even when the
    /// length and the clock's granularity would hide it.
    fn rewrite(path: &Path, text: &str, mtime_secs: u64) {
        fs::write(path, text).expect("write");
        let file = fs::OpenOptions::new().write(true).open(path).expect("open");
        file.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(mtime_secs))
            .expect("set mtime");
    }

    #[test]
    fn reloads_on_change_and_keeps_old_value_on_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("n");
        rewrite(&path, "1\n", 1_000);
        let r = Reloadable::load(&path, number).expect("load");
        assert_eq!(*r.current(), 1);
        assert!(!r.reload_if_changed().expect("unchanged"));

        rewrite(&path, "2\n", 2_000);
        assert!(r.reload_if_changed().expect("changed"));
        assert_eq!(*r.current(), 2);

        rewrite(&path, "x\n", 3_000);
        let err = r.reload_if_changed().expect_err("bad content");
        assert!(err.to_string().contains("line 1"), "{err}");
        assert_eq!(*r.current(), 2, "old value kept");
        assert!(!r.reload_if_changed().expect("reported once"));

        fs::remove_file(&path).expect("rm");
        assert!(r.reload_if_changed().is_err());
        assert!(!r.reload_if_changed().expect("missing file reported once"));
        assert_eq!(*r.current(), 2);

        rewrite(&path, "3\n", 4_000);
        assert!(r.reload_if_changed().expect("back"));
        assert_eq!(*r.current(), 3);
    }

    #[test]
    fn same_length_same_mtime_replaced_by_rename_is_seen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("n");
        rewrite(&path, "1\n", 1_000);
        let r = Reloadable::load(&path, number).expect("load");
        let tmp = dir.path().join("n.tmp");
        rewrite(&tmp, "2\n", 1_000);
        fs::rename(&tmp, &path).expect("rename");
        assert!(r.reload_if_changed().expect("inode changed"));
        assert_eq!(*r.current(), 2);
    }

    #[test]
    fn initial_load_error_is_returned() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = Reloadable::load(dir.path().join("missing"), number)
            .err()
            .expect("missing file");
        assert!(err.to_string().starts_with("read number file "), "{err}");
    }

    #[tokio::test]
    async fn watch_picks_up_changes_and_stops_on_cancel() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("n");
        rewrite(&path, "1\n", 1_000);
        let r = Arc::new(Reloadable::load(&path, number).expect("load"));
        let cancel = CancellationToken::new();
        let task = tokio::spawn(Arc::clone(&r).watch(Duration::from_millis(10), cancel.clone()));
        rewrite(&path, "2\n", 2_000);
        let deadline = Instant::now() + Duration::from_secs(10);
        while *r.current() != 2 {
            assert!(Instant::now() < deadline, "value not reloaded within 10 s");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        cancel.cancel();
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("watch stops")
            .expect("no panic");
    }
}

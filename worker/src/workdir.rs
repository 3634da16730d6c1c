//! A run's working directory: a tmpfs of its own where runs get a mount namespace; else a
//! fresh directory on the host, with a random name, private to the run's uid, and removed when
//! its guard drops.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// A working directory could not be made.
#[derive(Debug, Error)]
pub enum WorkdirError {
    #[error("cannot create a working directory under {path}: {source}")]
    Create { path: PathBuf, source: io::Error },
    #[error("cannot hand the working directory {path} to uid {uid}: {source}")]
    Chown {
        path: PathBuf,
        uid: u32,
        source: nix::Error,
    },
}

/// Where a run works.
#[derive(Debug)]
pub enum RunDir {
    /// A private directory on the host's filesystem, removed when this drops.
    Host(tempfile::TempDir),
    /// A tmpfs of the run's own, mounted in its mount namespace at
    /// [`RUN_DIR`](crate::sandbox::rootfs::RUN_DIR); it goes with the namespace.
    Private,
}

impl RunDir {
    /// The directory of a run of `uid`: a tmpfs of its own where runs get a mount namespace
    /// (`private_mounts`), else a private directory made under `root`.
    pub fn make(private_mounts: bool, root: &Path, uid: Option<u32>) -> Result<Self, WorkdirError> {
        if private_mounts {
            Ok(Self::Private)
        } else {
            make_workdir(root, uid).map(Self::Host)
        }
    }

    /// The directory's path, as the run sees it.
    pub fn path(&self) -> &Path {
        match self {
            Self::Host(dir) => dir.path(),
            Self::Private => Path::new(crate::sandbox::rootfs::RUN_DIR),
        }
    }

    /// The directory's path on the host, where it has one.
    pub fn host_path(&self) -> Option<&Path> {
        match self {
            Self::Host(dir) => Some(dir.path()),
            Self::Private => None,
        }
    }

    /// Whether the run left nothing in a directory on the host (one of its own has gone with
    /// its namespace).
    pub fn is_empty(&self) -> bool {
        self.host_path()
            .is_none_or(|dir| std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_none()))
    }
}

/// A private working directory under `root` for a run of `uid` (mode 0700, owned by the uid
/// and its same-numbered gid, or by the worker when there is no uid).
pub fn make_workdir(root: &Path, uid: Option<u32>) -> Result<tempfile::TempDir, WorkdirError> {
    // Private to the run's uid: concurrent runs must not read each other's files.
    let dir = tempfile::Builder::new()
        .prefix("run-")
        .permissions(std::fs::Permissions::from_mode(0o700))
        .tempdir_in(root)
        .map_err(|source| WorkdirError::Create {
            path: root.to_path_buf(),
            source,
        })?;
    if let Some(uid) = uid {
        nix::unistd::chown(
            dir.path(),
            Some(nix::unistd::Uid::from_raw(uid)),
            Some(nix::unistd::Gid::from_raw(uid)),
        )
        .map_err(|source| WorkdirError::Chown {
            path: dir.path().to_path_buf(),
            uid,
            source,
        })?;
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn a_workdir_is_private_and_goes_with_its_guard() {
        let root = tempfile::tempdir().unwrap();
        let dir = make_workdir(root.path(), None).unwrap();
        let meta = std::fs::metadata(dir.path()).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o700);
        let path = dir.path().to_path_buf();
        drop(dir);
        assert!(!path.exists());
    }
}

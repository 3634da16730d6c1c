//! The filesystem a run sees: a read-only view of only what it needs, built once per worker.
//!
//! The view is a mount namespace whose root is a small read-only tmpfs. It holds read-only bind
//! mounts of the Python runtime (at its host path, which the interpreter and its libraries
//! were installed for), of `/usr` (the C library, the dynamic loader, `/bin/sh`), of two files
//! of `/etc` the C library reads and of the CPU topology in `/sys`, the harmless devices, and
//! empty mount points for what each run mounts for itself. Nothing else of the host exists in
//! it: no `/etc/passwd`, no `/home` or `/root`, no other run's files, no worker files, no
//! unix socket of the host (`/dev/log`, `/run`), no `/sys/fs/cgroup`.
//!
//! Each run's process joins the view (`setns`) and at once makes a private copy of it
//! (`unshare(CLONE_NEWNS)`), in which it mounts its own tmpfs on [`RUN_DIR`] (its working
//! directory), `/tmp` and `/dev/shm`, and its own procfs on `/proc` (see
//! `sys::PrivateMounts`). Copying the view is cheaper than copying the host's mount table, and
//! nothing a run mounts reaches the view or another run: every mount of the view is private.
//!
//! Building the view needs `CAP_SYS_ADMIN` and `mount`; where the host refuses them, runs get
//! no mount namespace at all, and Landlock alone narrows what they reach.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::CloneFlags;

/// A run's working directory inside the view: a tmpfs of its own.
pub const RUN_DIR: &str = "/work";

/// What the view holds from the host, read-only, each with its reason. A path the host lacks is
/// left out; a symbolic link is copied as a link (on merged-/usr systems `/bin` and `/lib` are
/// links into `/usr`).
const READ_ONLY: &[(&str, &str)] = &[
    (
        "/usr",
        "the C library, the dynamic loader, /bin/sh and the system's programs",
    ),
    ("/bin", "programs, where the system keeps them outside /usr"),
    (
        "/sbin",
        "programs, where the system keeps them outside /usr",
    ),
    (
        "/lib",
        "libraries, where the system keeps them outside /usr",
    ),
    (
        "/lib64",
        "the dynamic loader, where the system keeps it outside /usr",
    ),
    (
        "/etc/ld.so.cache",
        "the dynamic loader's index of libraries",
    ),
    ("/etc/localtime", "the time zone"),
    (
        "/sys/devices/system/cpu",
        "the CPU topology, which the C library and OpenBLAS read",
    ),
];

/// Devices bound into the view's `/dev`, readable and writable as on the host.
const DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom"];

/// Links the view's `/dev` has, as any Linux system has them.
const DEV_LINKS: &[(&str, &str)] = &[
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
];

/// Empty directories: mount points of each run's own mounts.
const MOUNT_POINTS: &[&str] = &[RUN_DIR, "/tmp", "/dev/shm", "/proc"];

/// The view, alive while this handle is (it is a namespace no process stays in).
#[derive(Debug, Clone)]
pub struct RootView {
    fd: Arc<OwnedFd>,
}

impl RootView {
    /// Builds the view for runs of the runtime at `runtime_dir`. A short-lived thread makes a
    /// mount namespace of its own, builds the tree on a tmpfs, makes it the root and opens the
    /// namespace; the namespace then lives on through the descriptor.
    ///
    /// With `host_proc`, the host's `/proc` is bound, read-only, under the runs' own: a worker
    /// without real root may mount a procfs for a run's PID namespace only where a procfs is
    /// already fully visible in the run's mount namespace (the kernel's rule for user
    /// namespaces), and each run's own covers it.
    pub fn build(runtime_dir: &Path, host_proc: bool) -> io::Result<Self> {
        // Made here, in the host's namespace, where its removal must happen too.
        let staging = tempfile::Builder::new()
            .prefix("pyrunner-view-")
            .tempdir()?;
        let root = staging.path().to_path_buf();
        let runtime_dir = std::fs::canonicalize(runtime_dir)?;
        if let Some(point) = MOUNT_POINTS.iter().find(|p| runtime_dir.starts_with(p)) {
            return Err(io::Error::other(format!(
                "the runtime at {} would be hidden by each run's own {point}; keep it elsewhere",
                runtime_dir.display()
            )));
        }
        let fd = std::thread::spawn(move || build_in_own_namespace(&root, &runtime_dir, host_proc))
            .join()
            .map_err(|_| io::Error::other("the view's thread panicked"))??;
        drop(staging);
        Ok(Self { fd: Arc::new(fd) })
    }

    /// The namespace's descriptor, for `setns`.
    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// A descriptor of the namespace of its own, to pass to another process.
    pub fn try_clone_fd(&self) -> io::Result<OwnedFd> {
        self.fd.try_clone()
    }
}

/// On a thread of its own (it changes the thread's namespace and root for good).
fn build_in_own_namespace(root: &Path, runtime_dir: &Path, host_proc: bool) -> io::Result<OwnedFd> {
    nix::sched::unshare(CloneFlags::CLONE_NEWNS)?;
    let namespace: OwnedFd = File::open("/proc/thread-self/ns/mnt")?.into();
    // Nothing below may reach the host's mount table.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )?;
    mount(
        Some("tmpfs"),
        root,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("size=1m,nr_inodes=256,mode=0755"),
    )?;
    let runtime = runtime_dir.to_string_lossy().into_owned();
    let read_only = READ_ONLY
        .iter()
        .map(|(path, _)| *path)
        .chain([runtime.as_str()]);
    for path in read_only {
        add_read_only(root, Path::new(path))?;
    }
    for device in DEVICES {
        let host = Path::new("/dev").join(device);
        if host.exists() {
            bind(root, &host, MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC)?;
        }
    }
    for (name, target) in DEV_LINKS {
        symlink(target, inside(root, &Path::new("/dev").join(name)))?;
    }
    for point in MOUNT_POINTS {
        make_dir(&inside(root, Path::new(point)))?;
    }
    if host_proc {
        bind(
            root,
            Path::new("/proc"),
            MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        )?;
    }
    // The root itself is read-only from now on; what a run writes goes to its own mounts.
    mount(
        None::<&str>,
        root,
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        None::<&str>,
    )?;
    // Make the tree the root, and let the host's go.
    std::env::set_current_dir(root)?;
    nix::unistd::pivot_root(".", ".")?;
    umount2(".", MntFlags::MNT_DETACH)?;
    std::env::set_current_dir("/")?;
    Ok(namespace)
}

/// `path` (absolute) under `root`.
fn inside(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

/// Directories down to `path`, each readable by all (the sandbox uids walk through them).
fn make_dir(path: &Path) -> io::Result<()> {
    std::fs::create_dir_all(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
}

/// Copies the host's `path` into the view read-only: a link as a link, anything else as a
/// read-only bind mount. A path the host lacks is skipped.
fn add_read_only(root: &Path, path: &Path) -> io::Result<()> {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if meta.file_type().is_symlink() {
        let target = std::fs::read_link(path)?;
        let link = inside(root, path);
        if let Some(parent) = link.parent() {
            make_dir(parent)?;
        }
        return symlink(target, link);
    }
    bind(
        root,
        path,
        MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
    )
}

/// Bind-mounts the host's `path` at the same place in the view, with `flags`.
fn bind(root: &Path, path: &Path, flags: MsFlags) -> io::Result<()> {
    let target = inside(root, path);
    if let Some(parent) = target.parent() {
        make_dir(parent)?;
    }
    if std::fs::metadata(path)?.is_dir() {
        make_dir(&target)?;
    } else {
        File::create(&target)?;
    }
    mount(
        Some(path),
        &target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )?;
    // A bind mount takes its flags from a remount.
    mount(
        None::<&str>,
        &target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | flags,
        None::<&str>,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_runtime_a_run_s_own_mounts_would_hide_is_refused() {
        let runtime = tempfile::Builder::new().tempdir_in("/tmp").unwrap();
        let error = RootView::build(runtime.path(), false)
            .unwrap_err()
            .to_string();
        assert!(error.contains("hidden by each run's own /tmp"), "{error}");
    }
}

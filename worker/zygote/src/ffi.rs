//! The embedded interpreter, the fork, and the other calls that need `unsafe` (with
//! `arena`, the only modules of the zygote that use it).
//!
//! The interpreter is initialised from an isolated configuration whose `executable` is the
//! runtime venv's python, so `sys.prefix` is the venv and its site-packages are importable, and
//! without signal handlers (the zygote has none to deliver to Python). It is forked through
//! `PyOS_BeforeFork` / `PyOS_AfterFork_*`, which take CPython's locks around the fork and run the
//! `os.register_at_fork` hooks (among them `random`'s reseed) in the child.
#![allow(unsafe_code)]

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::Instant;

use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyModule};
use pyrunner_worker::sandbox::sys::{self, CODE_FD, REPORT_FD};
use pyrunner_worker::zygote::protocol::{EndRecord, ReadyRecord, CONTROL_FD};
use thiserror::Error;

/// The interpreter cannot be made ready.
#[derive(Debug, Error)]
pub enum InterpreterError {
    #[error("cannot initialise python from {python}: {message}")]
    Init { python: String, message: String },
    #[error("cannot import preloaded module {module}: {message}")]
    Import { module: String, message: String },
    #[error("cannot load the run harness: {0}")]
    Harness(String),
}

/// The initialised interpreter, ready to fork.
pub struct Interpreter {
    /// The harness's `prepare(workdir)`, which readies a forked child for its job.
    prepare: Py<PyAny>,
    /// The harness's `serve(code)`, which runs the job of a prepared child.
    serve: Py<PyAny>,
}

/// What [`Interpreter::start`] returns.
pub struct Loaded {
    pub interpreter: Interpreter,
    /// `sys.version`.
    pub python: String,
    /// Each preloaded module with the milliseconds its import took.
    pub preloaded: Vec<(String, u64)>,
}

/// Which side of a fork this is.
pub enum Forked {
    Child,
    Parent(i32),
}

fn status_message(status: &ffi::PyStatus) -> String {
    if status.err_msg.is_null() {
        return "unknown error".into();
    }
    // SAFETY: a non-null err_msg of a PyStatus is a static NUL-terminated C string.
    unsafe { CStr::from_ptr(status.err_msg) }
        .to_string_lossy()
        .into_owned()
}

impl Interpreter {
    /// Initialises CPython for the venv interpreter `python`, imports `preload` and the
    /// `harness` source, then collects and freezes the heap so that children share its pages.
    pub fn start(
        python: &Path,
        preload: &[String],
        harness: &str,
    ) -> Result<Loaded, InterpreterError> {
        let init_error = |message: String| InterpreterError::Init {
            python: python.display().to_string(),
            message,
        };
        let path = CString::new(python.as_os_str().as_bytes())
            .map_err(|_| init_error("the path has a NUL byte".into()))?;
        // SAFETY: the config is initialised by PyConfig_InitIsolatedConfig before any use and
        // cleared after Py_InitializeFromConfig copied it; the strings passed are NUL-terminated
        // and outlive the calls. This runs once, on the zygote's only thread.
        unsafe {
            // As `python -I -X utf8` does: isolated, with the locale (LC_CTYPE) of the
            // environment (the runs' C.UTF-8), and in UTF-8 mode, so that the standard streams
            // and files are UTF-8 even where the host has no C.UTF-8 locale to load.
            libc::setlocale(libc::LC_CTYPE, c"".as_ptr());
            let mut preconfig = std::mem::MaybeUninit::<ffi::PyPreConfig>::uninit();
            ffi::PyPreConfig_InitIsolatedConfig(preconfig.as_mut_ptr());
            let mut preconfig = preconfig.assume_init();
            preconfig.configure_locale = 1;
            preconfig.utf8_mode = 1;
            let status = ffi::Py_PreInitialize(&preconfig);
            if ffi::PyStatus_Exception(status) != 0 {
                return Err(init_error(status_message(&status)));
            }
            let mut config = std::mem::MaybeUninit::<ffi::PyConfig>::uninit();
            ffi::PyConfig_InitIsolatedConfig(config.as_mut_ptr());
            let mut config = config.assume_init();
            config.install_signal_handlers = 0;
            config.write_bytecode = 0;
            let config_ptr: *mut ffi::PyConfig = &mut config;
            for field in [
                std::ptr::addr_of_mut!((*config_ptr).program_name),
                std::ptr::addr_of_mut!((*config_ptr).executable),
            ] {
                let status = ffi::PyConfig_SetBytesString(config_ptr, field, path.as_ptr());
                if ffi::PyStatus_Exception(status) != 0 {
                    ffi::PyConfig_Clear(config_ptr);
                    return Err(init_error(status_message(&status)));
                }
            }
            let status = ffi::Py_InitializeFromConfig(config_ptr);
            ffi::PyConfig_Clear(config_ptr);
            if ffi::PyStatus_Exception(status) != 0 {
                return Err(init_error(status_message(&status)));
            }
        }
        Python::attach(|py| {
            let python = py
                .import("sys")
                .and_then(|sys| sys.getattr("version")?.extract::<String>())
                .map_err(|e| init_error(e.to_string()))?;
            let mut preloaded = Vec::new();
            for module in preload {
                let started = Instant::now();
                py.import(module.as_str())
                    .map_err(|e| InterpreterError::Import {
                        module: module.clone(),
                        message: e.to_string(),
                    })?;
                preloaded.push((module.clone(), started.elapsed().as_millis() as u64));
            }
            let harness_error = |e: PyErr| InterpreterError::Harness(e.to_string());
            let source =
                CString::new(harness).map_err(|e| InterpreterError::Harness(e.to_string()))?;
            let module =
                PyModule::from_code(py, &source, c"<pyrunner-harness>", c"_pyrunner_harness")
                    .map_err(harness_error)?;
            let prepare = module.getattr("prepare").map_err(harness_error)?.unbind();
            let serve = module.getattr("serve").map_err(harness_error)?.unbind();
            module
                .getattr("prepare_zygote")
                .and_then(|prepare| prepare.call0())
                .map_err(harness_error)?;
            Ok(Loaded {
                interpreter: Interpreter { prepare, serve },
                python,
                preloaded,
            })
        })
    }

    /// Readies this forked, sandboxed child for its job, with `workdir` as its home.
    pub fn prepare(&self, workdir: &Path) -> Result<(), String> {
        Python::attach(|py| {
            let workdir = workdir.to_string_lossy();
            self.prepare
                .call1(py, (workdir.as_ref(),))
                .map(drop)
                .map_err(|e| e.to_string())
        })
    }

    /// Runs the job of a prepared child and returns its exit code.
    pub fn serve(&self, code: &[u8]) -> i32 {
        Python::attach(|py| match self.serve.call1(py, (PyBytes::new(py, code),)) {
            Ok(status) => status.extract::<i32>(py).unwrap_or(1),
            Err(error) => {
                error.print(py);
                1
            }
        })
    }
}

/// Forks the zygote through CPython's fork hooks.
pub fn fork() -> io::Result<Forked> {
    // SAFETY: the zygote has a single thread (checked once the preload set is imported) and it
    // holds the GIL, as PyOS_BeforeFork requires. The hooks take CPython's locks around the fork
    // and reinitialise them in the child, so the child may go on running Python.
    unsafe {
        ffi::PyOS_BeforeFork();
        let pid = libc::fork();
        if pid == 0 {
            ffi::PyOS_AfterFork_Child();
            return Ok(Forked::Child);
        }
        let error = io::Error::last_os_error();
        ffi::PyOS_AfterFork_Parent();
        if pid < 0 {
            Err(error)
        } else {
            Ok(Forked::Parent(pid))
        }
    }
}

/// Forks the zygote before the interpreter is initialised (for its PID namespace helper).
pub fn fork_small() -> io::Result<Forked> {
    // SAFETY: called before the interpreter starts, while the zygote has a single thread, so
    // the child inherits no lock held by another thread.
    match unsafe { libc::fork() } {
        0 => Ok(Forked::Child),
        pid if pid > 0 => Ok(Forked::Parent(pid)),
        _ => Err(io::Error::last_os_error()),
    }
}

/// Readies the PID namespace helper, just forked by [`fork_small`]: it dies with the zygote,
/// and drops the zygote's control socket, which is not its to use.
pub fn enter_helper(zygote: i32) -> io::Result<()> {
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
    if nix::unistd::getppid().as_raw() != zygote {
        return Err(io::Error::other("the zygote has gone"));
    }
    // SAFETY: the helper never uses the control socket, and nothing in it owns the descriptor.
    drop(unsafe { OwnedFd::from_raw_fd(CONTROL_FD) });
    Ok(())
}

/// Puts this freshly forked child into its sandbox.
pub fn enter_sandbox(plan: &sys::EntryPlan) -> io::Result<()> {
    // SAFETY: called once, in a child just forked from the single-threaded zygote, with a plan
    // whose descriptors were received for this child and are open. Descriptors the child does
    // not keep are closed by it; the zygote's Python objects that wrap descriptors (sys.stdin,
    // sys.stdout, sys.stderr) wrap 0 to 2, which the plan replaces with the run's pipes.
    unsafe { sys::enter(plan) }
}

/// Ends this process at once with `code`: no Python finalisation, no Rust destructors, no atexit
/// handlers of the zygote (the harness has already run the run's own).
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit only ends the process.
    unsafe { libc::_exit(code) }
}

/// The zygote's end of its control socket, which the worker put at descriptor 3.
pub fn control_socket() -> OwnedFd {
    // SAFETY: the worker starts the zygote with its socket at CONTROL_FD, and nothing else in
    // this process takes ownership of that descriptor.
    unsafe { OwnedFd::from_raw_fd(CONTROL_FD) }
}

/// The code pipe of a child inside its sandbox (descriptor 3), to read its job from.
pub fn code_pipe() -> File {
    // SAFETY: after `enter_sandbox` descriptor 3 is the run's code pipe and nothing else in the
    // child owns it (the harness reads its code from here only in the fresh executor).
    unsafe { File::from_raw_fd(CODE_FD) }
}

/// The report pipe, as (device, inode), to recognise it at the end of the run.
pub type PipeId = (u64, u64);

/// What descriptor 4 is now, if it is open.
fn report_identity() -> Option<PipeId> {
    // SAFETY: the descriptor is only borrowed for fstat; if 4 is closed, fstat fails with EBADF.
    let report = unsafe { std::os::fd::BorrowedFd::borrow_raw(REPORT_FD) };
    nix::sys::stat::fstat(report)
        .ok()
        .map(|st| (st.st_dev, st.st_ino))
}

/// Tells the worker that this child is in its sandbox and waits for its job, with what it has
/// used so far; returns the identity of the report pipe.
pub fn write_ready(record: ReadyRecord) -> io::Result<PipeId> {
    // SAFETY: after `enter_sandbox` descriptor 4 is the run's report pipe; it is borrowed for
    // one write and stays open for the harness.
    let report = unsafe { std::os::fd::BorrowedFd::borrow_raw(REPORT_FD) };
    // Far below PIPE_BUF, so written whole or not at all.
    let bytes = record.bytes();
    if nix::unistd::write(report, &bytes).map_err(io::Error::from)? != bytes.len() {
        return Err(io::Error::other("short write"));
    }
    report_identity().ok_or_else(|| io::Error::other("the report pipe is gone"))
}

/// The CPU time this process and its reaped children have used so far, in microseconds.
pub fn cpu_used_us() -> u64 {
    use nix::sys::resource::{getrusage, UsageWho};
    [UsageWho::RUSAGE_SELF, UsageWho::RUSAGE_CHILDREN]
        .into_iter()
        .filter_map(|who| getrusage(who).ok())
        .map(|u| {
            let (user, system) = (u.user_time(), u.system_time());
            (user.tv_sec() + system.tv_sec()) as u64 * 1_000_000
                + (user.tv_usec() + system.tv_usec()) as u64
        })
        .sum()
}

/// Ends a run that returned `exit`: writes the end record to the report pipe (if descriptor 4
/// still is the pipe `report`: the run may have closed it and opened a file in its place), then
/// closes every descriptor, so that the worker sees the run's output complete before the
/// process exits. Unless `exit_awaited`, the process then exits at the lowest priority.
pub fn end_run(exit: i32, report: PipeId, exit_awaited: bool) {
    let record = EndRecord { exit };
    if report_identity() == Some(report) {
        // SAFETY: descriptor 4 is the run's report pipe (just checked), left open by the
        // harness (closefd=False); it is borrowed for this write only.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(REPORT_FD) };
        let _ = nix::unistd::write(fd, &record.bytes());
    }
    // SAFETY: close_range only closes descriptors; the process exits right after, and no
    // object that owns one of them is used again.
    unsafe { libc::syscall(libc::SYS_close_range, 0u32, libc::c_uint::MAX, 0u32) };
    if exit_awaited {
        // The worker answers once the kernel has reported the exit.
        return;
    }
    // The worker answers on the closed pipes; what remains is the exit, which drops the address
    // space shared with the zygote (about a millisecond of CPU). At the lowest priority it gives
    // way at once to the task the closed pipes just woke (the worker's reader, often placed on
    // this CPU, which would otherwise wait for this process's time slice to end) and to the
    // next run.
    // SAFETY: setpriority only lowers this process's own scheduling priority, which needs no
    // privilege; it changes no memory.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, LOWEST_PRIORITY) };
}

/// The nice value of a child whose run has ended.
const LOWEST_PRIORITY: libc::c_int = 19;

/// `madvise` advice that collapses a range into transparent huge pages now (Linux 6.1).
const MADV_COLLAPSE: libc::c_int = 25;
const HUGE_PAGE: usize = 2 << 20;

/// Moves the heap the preload built into 2 MiB pages where the kernel can, so that a fork copies
/// (and an exit drops) one entry per 2 MiB instead of 512. Future allocations keep small pages.
/// Returns the bytes collapsed; a kernel without the call collapses nothing.
pub fn collapse_heap() -> usize {
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
        return 0;
    };
    let mut collapsed = 0;
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let (Some(range), Some(perms)) = (fields.next(), fields.next()) else {
            continue;
        };
        let path = fields.nth(3).unwrap_or("");
        // Private, writable, anonymous memory (the brk heap included), where the interpreter's
        // and the libraries' objects live.
        if !perms.starts_with("rw")
            || !perms.ends_with('p')
            || !(path.is_empty() || path == "[heap]")
        {
            continue;
        }
        let Some((start, end)) = range.split_once('-') else {
            continue;
        };
        let (Ok(start), Ok(end)) = (
            usize::from_str_radix(start, 16),
            usize::from_str_radix(end, 16),
        ) else {
            continue;
        };
        let start = start.next_multiple_of(HUGE_PAGE);
        let end = end - end % HUGE_PAGE;
        if end <= start {
            continue;
        }
        // SAFETY: madvise with MADV_COLLAPSE changes how a mapped range is backed, never its
        // contents; the range lies inside a mapping of this process read just above, and the
        // process has a single thread, so nothing unmaps it meanwhile.
        if unsafe { libc::madvise(start as *mut libc::c_void, end - start, MADV_COLLAPSE) } == 0 {
            collapsed += end - start;
        }
    }
    collapsed
}

/// Makes this process the reaper of its orphaned descendants.
pub fn become_child_subreaper() -> io::Result<()> {
    sys::become_child_subreaper()
}

//! A warm child, from the fork to `_exit`: it enters its sandbox, says it is ready, waits for
//! its one job on the code pipe, applies the job's own limits and runs it. Its seccomp filter is
//! the zygote's, inherited through the fork.

use std::ffi::CString;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;

use nix::sys::resource::{setrlimit, Resource};
use pyrunner_worker::sandbox::sys::{Entry, EntryPlan, PrivateMounts, UserNamespace};
use pyrunner_worker::zygote::protocol::{JobHeader, ReadyRecord, SpawnSpec, ENTRY_FAILED};
use seccompiler::BpfProgram;

use crate::ffi::{self, Interpreter};
use crate::server::Forking;

/// Runs the child's life and ends the process; never returns.
pub fn run(forking: &Forking<'_>, spec: &SpawnSpec, fds: Vec<OwnedFd>) -> ! {
    let code = match serve(
        forking.interpreter,
        spec,
        fds,
        forking.pid_namespaces.pidfd(),
        forking.entry_closed,
    ) {
        Ok(code) => code,
        Err(error) => {
            let _ = writeln!(io::stderr(), "pyrunner-zygote: warm child failed: {error}");
            ENTRY_FAILED
        }
    };
    ffi::exit_now(code)
}

fn serve(
    interpreter: &Interpreter,
    spec: &SpawnSpec,
    mut fds: Vec<OwnedFd>,
    zygote: RawFd,
    entry_closed: &Arc<Vec<BpfProgram>>,
) -> Result<i32, String> {
    let expected = pyrunner_worker::zygote::protocol::SPAWN_FDS
        + usize::from(spec.landlock)
        + usize::from(spec.private_mounts.is_some());
    if fds.len() != expected {
        return Err(format!("{} descriptors came with the request", fds.len()));
    }
    // The view comes last; it is used, not installed, and closed with the rest on entry.
    let view = spec.private_mounts.and_then(|_| fds.pop());
    let plan = EntryPlan {
        // The zygote already is in the runs' network namespace.
        netns: None,
        private_namespaces: spec.private_namespaces,
        mounts: spec
            .private_mounts
            .zip(view.as_ref())
            .map(|(size, view)| {
                let mounts = PrivateMounts::new(
                    view.as_raw_fd(),
                    spec.ids,
                    size,
                    spec.landlock_mount_access,
                )?;
                Ok::<_, io::Error>(if spec.pid_namespace {
                    mounts.with_proc(spec.landlock_proc_access)
                } else {
                    mounts
                })
            })
            .transpose()
            .map_err(|e| format!("cannot prepare the mounts: {e}"))?,
        // Descriptor 5, the ruleset the worker made for this child's working directory.
        landlock: spec.landlock,
        entry: Entry::Forked { parent: zygote },
        rlimits: spec
            .rlimits
            .iter()
            .map(|&(resource, soft, hard)| (resource as _, soft, hard))
            .collect(),
        ids: spec.ids,
        user_namespace: spec
            .user_namespace
            .then(|| UserNamespace::for_run(spec.ids)),
        fds: fds
            .iter()
            .enumerate()
            .map(|(i, fd)| (fd.as_raw_fd(), i as RawFd))
            .collect(),
        cgroup_procs: spec
            .cgroup_procs
            .iter()
            .map(|p| CString::new(p.as_os_str().as_bytes()).map_err(|e| e.to_string()))
            .collect::<Result<_, _>>()?,
        // The zygote's own filter, installed once before it forked, is inherited; this adds
        // the small program that refuses what only the entry needed.
        filters: Arc::clone(entry_closed),
    };
    ffi::enter_sandbox(&plan).map_err(|e| format!("cannot enter the sandbox: {e}"))?;
    // The received descriptors now live on as 0 to 4 and the originals were closed with the
    // rest: their numbers may be reused, so they must not be closed again.
    for fd in fds.into_iter().chain(view) {
        let _ = fd.into_raw_fd();
    }
    std::env::set_current_dir(&spec.workdir)
        .map_err(|e| format!("cannot enter {}: {e}", spec.workdir.display()))?;
    interpreter
        .prepare(&spec.workdir)
        .map_err(|e| format!("cannot prepare the run: {e}"))?;
    // The address space is counted from what the child has mapped (the zygote's whole heap),
    // so the run's own allowance will come on top of it. Where no cgroup counts the run, the
    // worker counts its CPU time and peak memory from what the child used and had resident
    // (the zygote's pages it maps) by now: the sandbox entry and preparation are the service's.
    let (mapped, resident) =
        memory_bytes().map_err(|e| format!("cannot read /proc/self/statm: {e}"))?;
    let ready = ReadyRecord {
        cpu_us: ffi::cpu_used_us(),
        resident_kb: resident / 1024,
    };
    let report = ffi::write_ready(ready).map_err(|e| format!("cannot report ready: {e}"))?;

    let mut input = Vec::new();
    ffi::code_pipe()
        .read_to_end(&mut input)
        .map_err(|e| format!("cannot read the job: {e}"))?;
    if input.is_empty() {
        // The worker let this child go without a job.
        return Ok(0);
    }
    let (header, code) = JobHeader::split(&input).ok_or("malformed job header")?;
    setrlimit(Resource::RLIMIT_CPU, header.cpu_secs, header.cpu_secs + 1)
        .map_err(|e| format!("cannot limit cpu time: {e}"))?;
    let address_space = mapped.saturating_add(header.address_space_bytes);
    setrlimit(Resource::RLIMIT_AS, address_space, address_space)
        .map_err(|e| format!("cannot limit the address space: {e}"))?;
    let exit = interpreter.serve(code);
    ffi::end_run(exit, report, header.exit_awaited);
    Ok(exit)
}

/// The size of this process's address space, and of its resident set, in bytes.
fn memory_bytes() -> io::Result<(u64, u64)> {
    let statm = std::fs::read_to_string("/proc/self/statm")?;
    let pages: Vec<u64> = statm
        .split_whitespace()
        .take(2)
        .map(|p| p.parse().ok())
        .collect::<Option<_>>()
        .filter(|p: &Vec<u64>| p.len() == 2)
        .ok_or_else(|| io::Error::other("unexpected format"))?;
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .unwrap_or(4096) as u64;
    Ok((pages[0] * page, pages[1] * page))
}

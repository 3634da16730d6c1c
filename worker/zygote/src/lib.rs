//! The zygote process: embeds CPython from the runtime's virtual environment, imports the preload
//! set once, freezes the heap, and then forks one warm child per request from its worker. Each
//! child enters its sandbox at once and waits for exactly one job.
//!
//! - [`ffi`]: the interpreter and the fork.
//! - [`arena`]: the region the preload's object arenas are carved from, so that they can be
//!   moved to huge pages. These two are the crate's only `unsafe`.
//! - [`server`]: the single-threaded loop serving the worker's requests and reaping children.
//! - [`inits`]: the small helper, forked first, that makes the runs' PID namespaces.
//! - [`child`]: a warm child's life, from its sandbox to `_exit`.
//!
//! The worker starts this binary with its end of the control socket as descriptor 3 and the
//! runs' environment as its own (every child inherits `os.environ`). It reads no other
//! configuration from the environment.

pub mod arena;
pub mod child;
pub mod ffi;
pub mod inits;
pub mod server;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use pyrunner_worker::sandbox::namespaces::PidNamespaces;
use pyrunner_worker::sandbox::seccomp;
use pyrunner_worker::zygote::protocol::{self, Event};
use seccompiler::BpfProgram;

/// Command line of the zygote, given by its worker.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "pyrunner-zygote",
    version,
    about = "PyRunner zygote: started by pyrunner-worker, not by hand"
)]
pub struct Args {
    /// The runtime's virtual-environment interpreter (sys.executable of every run).
    #[arg(long)]
    pub python: PathBuf,
    /// Modules to import before forking, separated by commas.
    #[arg(long, default_value = "", value_delimiter = ',')]
    pub preload: Vec<String>,
}

/// Starts the interpreter, reports to the worker and serves until the worker goes away.
pub fn run(args: &Args) -> ExitCode {
    let started = Instant::now();
    let control = ffi::control_socket();
    let ready = prepare(args, started);
    let prepared = match ready {
        Ok(prepared) => {
            if protocol::send(&control, &prepared.event, &[]).is_err() {
                return ExitCode::FAILURE;
            }
            prepared
        }
        Err(error) => {
            let _ = protocol::send(&control, &Event::Failed { error }, &[]);
            return ExitCode::FAILURE;
        }
    };
    let forking = server::Forking {
        interpreter: &prepared.interpreter,
        entry_closed: &prepared.entry_closed,
        pid_namespaces: &prepared.pid_namespaces,
        inits: prepared.inits,
    };
    match server::serve(&forking, control) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("pyrunner-zygote: {error}");
            ExitCode::FAILURE
        }
    }
}

/// What the zygote has made ready before it serves.
struct Prepared {
    interpreter: ffi::Interpreter,
    /// The filter each child adds once in its sandbox.
    entry_closed: Arc<Vec<BpfProgram>>,
    pid_namespaces: PidNamespaces,
    inits: Result<inits::Inits, String>,
    /// The ready message.
    event: Event,
}

fn prepare(args: &Args, started: Instant) -> Result<Prepared, String> {
    // Terminal signals meant for the worker's group are not for the zygote; it ends when its
    // socket closes.
    let _ = nix::unistd::setsid();
    ffi::become_child_subreaper().map_err(|e| format!("cannot become a subreaper: {e}"))?;
    // The runs' seccomp filter, on the zygote itself: every child inherits it through the fork
    // (installing it per child would compile it to BPF each time), and the zygote, which needs
    // none of the calls it denies, is held to it too. It allows what the zygote needs to fork a
    // child into its PID namespace and a child to enter its sandbox; each child then adds the
    // small program that closes those calls, compiled here once.
    let entry_closed = seccomp::compile_entry_closed().map_err(|e| e.to_string())?;
    let filters = seccomp::compile_for_zygote().map_err(|e| e.to_string())?;
    // Before the interpreter, while the zygote is small: the helper that makes the runs' PID
    // namespaces (where the worker asks for none, it only waits).
    let inits = inits::Inits::start(&filters);
    if let Err(error) = &inits {
        eprintln!("pyrunner-zygote: {error}");
    }
    // The children check through it that the zygote is alive (pidfd_open is not allowed later).
    let pid_namespaces =
        PidNamespaces::open().map_err(|e| format!("cannot open the PID namespace: {e}"))?;
    let preload: Vec<String> = args
        .preload
        .iter()
        .map(|m| m.trim().to_owned())
        .filter(|m| !m.is_empty())
        .collect();
    // Without the region the preload's arenas stay in small pages: slower forks, nothing worse.
    if let Err(error) = arena::install() {
        eprintln!("pyrunner-zygote: object arenas stay where CPython puts them: {error}");
    }
    let loaded =
        ffi::Interpreter::start(&args.python, &preload, pyrunner_worker::executor::HARNESS)
            .map_err(|e| e.to_string())?;
    let arena_mib = (arena::seal() >> 20) as u64;
    let huge_pages_mib = (ffi::collapse_heap() >> 20) as u64;
    let threads = std::fs::read_dir("/proc/self/task")
        .map(|d| d.count())
        .unwrap_or(0);
    if threads != 1 {
        return Err(format!(
            "the zygote has {threads} threads after its imports, and fork is only safe with one \
             (a preloaded module started threads; OPENBLAS_NUM_THREADS=1 and the like prevent \
             that for numpy)"
        ));
    }
    for filter in &filters {
        seccompiler::apply_filter(filter)
            .map_err(|e| format!("cannot install the seccomp filter: {e}"))?;
    }
    let event = Event::Ready {
        python: loaded.python,
        preloaded: loaded.preloaded,
        startup_ms: started.elapsed().as_millis() as u64,
        huge_pages_mib,
        arena_mib,
    };
    Ok(Prepared {
        interpreter: loaded.interpreter,
        entry_closed: Arc::new(vec![entry_closed]),
        pid_namespaces,
        inits,
        event,
    })
}

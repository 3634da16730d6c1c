//! The Python runtime runs execute in: a copy of CPython and a virtual environment with the
//! preinstalled packages, made by `scripts/prepare-runtime`, readable by the sandbox uids.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use pyrunner_shared::runtime::RuntimeInfo;
use pyrunner_shared::{LimitPolicy, RunStatus};
use thiserror::Error;

use crate::executor::{probe_job, Executor};

/// A runtime that is missing or does not work.
#[derive(Debug, Error)]
pub enum RuntimeError {
    #[error("no python runtime at {0}: run scripts/prepare-runtime first")]
    Missing(PathBuf),
    #[error("the python runtime at {dir} failed its start-up check ({status}): {detail}")]
    ProbeFailed {
        dir: PathBuf,
        status: &'static str,
        detail: String,
    },
}

/// The layout of a prepared runtime directory.
#[derive(Debug, Clone)]
pub struct PythonRuntime {
    dir: PathBuf,
}

/// The code run at start-up: imports the preinstalled libraries inside a real sandbox (which
/// proves the sandbox uid can read the runtime) and lists what is installed.
const PROBE: &str = r#"
import json, sys, importlib.metadata as md
import numpy, sympy
skip = {"pip", "setuptools", "wheel"}
found = {}
for d in md.distributions():
    name = d.metadata["Name"]
    if name and name.lower() not in skip:
        found[name.lower()] = {"name": name, "version": d.version}
print(json.dumps({
    "python": sys.version.split()[0],
    "packages": sorted(found.values(), key=lambda p: p["name"].lower()),
}))
"#;

impl PythonRuntime {
    /// The runtime in `dir`, if it has been prepared.
    pub fn open(dir: &Path) -> Result<Self, RuntimeError> {
        let runtime = Self {
            dir: dir.to_path_buf(),
        };
        if !runtime.python().is_file() {
            return Err(RuntimeError::Missing(dir.to_path_buf()));
        }
        Ok(runtime)
    }

    /// The interpreter of the virtual environment.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The venv interpreter runs start.
    pub fn python(&self) -> PathBuf {
        self.dir.join("venv/bin/python3")
    }

    /// The whole environment of a run: nothing of the worker's own leaks in.
    pub fn env(&self, workdir: &Path) -> Vec<(&'static str, OsString)> {
        let bin = self.dir.join("venv/bin");
        let mut path = OsString::from(bin);
        path.push(":/usr/local/bin:/usr/bin:/bin");
        vec![
            ("PATH", path),
            ("HOME", workdir.into()),
            ("TMPDIR", workdir.into()),
            ("LANG", "C.UTF-8".into()),
            ("LC_ALL", "C.UTF-8".into()),
            // The copied interpreter was linked with a run path the sandbox uid cannot read.
            ("LD_LIBRARY_PATH", self.library_dir().into()),
            // One BLAS thread per run: runs are the unit of parallelism, and each thread's
            // buffers would count against the run's address space.
            ("OPENBLAS_NUM_THREADS", "1".into()),
            ("OMP_NUM_THREADS", "1".into()),
            ("MKL_NUM_THREADS", "1".into()),
            ("MPLBACKEND", "Agg".into()),
        ]
    }

    /// Runs the start-up probe through `executor` and returns what the runtime offers.
    pub async fn probe(&self, executor: &Executor) -> Result<RuntimeInfo, RuntimeError> {
        let policy = LimitPolicy::default();
        let mut limits = policy
            .resolve(&pyrunner_shared::RunRequest {
                code: String::new(),
                stdin: None,
                timeout_ms: Some(60_000),
                memory_mb: None,
            })
            .expect("the default policy accepts its own defaults");
        limits.memory_mb = policy.max_memory_mb;
        let result = executor.run(&probe_job(PROBE, limits)).await;
        let failed = |detail: String| RuntimeError::ProbeFailed {
            dir: self.dir.clone(),
            status: result.status.as_str(),
            detail,
        };
        if result.status != RunStatus::Success {
            return Err(failed(result.stderr.trim().to_owned()));
        }
        let mut info: RuntimeInfo =
            serde_json::from_str(&result.stdout).map_err(|e| failed(e.to_string()))?;
        info.executor = executor.kind().to_owned();
        info.preloaded = executor.preloaded().to_vec();
        info.isolation = executor.isolation();
        Ok(info)
    }

    /// The directory holding the runtime's libpython, which the zygote loads.
    pub fn library_dir(&self) -> PathBuf {
        self.dir.join("python/lib")
    }
}

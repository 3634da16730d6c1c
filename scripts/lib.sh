# Shared by the scripts: where the Python runtime lives unless PYRUNNER_RUNTIME_DIR says.
# Root gets a system directory that the sandbox uids can traverse; other users a cache dir.
pyrunner_default_runtime_dir() {
  if [ "$(id -u)" -eq 0 ]; then
    echo /var/lib/pyrunner/runtime
  else
    echo "${XDG_CACHE_HOME:-$HOME/.cache}/pyrunner/runtime"
  fi
}
export PYRUNNER_RUNTIME_DIR=${PYRUNNER_RUNTIME_DIR:-$(pyrunner_default_runtime_dir)}
# The interpreter the zygote is built against (pyo3 reads PYO3_PYTHON): the base of the runtime.
if [ -z "${PYO3_PYTHON:-}" ] && command -v "${PYRUNNER_BASE_PYTHON:-python3}" >/dev/null; then
  export PYO3_PYTHON=$(command -v "${PYRUNNER_BASE_PYTHON:-python3}")
fi

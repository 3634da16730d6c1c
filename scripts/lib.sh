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

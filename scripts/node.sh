# The node test's steps, shared by scripts/node-test (on this host) and scripts/compose-v2-test
# (in a virtual machine). Source it from the repository's root, after scripts/lib.sh.

# kubectl renders the kustomizations, PyYAML turns them into JSON: Debian's packages, where
# missing.
node_install_tools() {
  local missing=()
  command -v kubectl >/dev/null || missing+=(kubernetes-client)
  /usr/bin/python3 -c 'import yaml' 2>/dev/null || missing+=(python3-yaml)
  if [ ${#missing[@]} -gt 0 ]; then
    echo "[node] installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

# node_render OUT.json [COMPONENT...]: deploy/k8s/base with the components, as a JSON list of
# resources (nodecheck's --manifests).
node_render() {
  local out=$1 dir
  shift
  dir=$(mktemp -d "$PWD/target/node-render.XXXXXX")
  {
    echo "apiVersion: kustomize.config.k8s.io/v1beta1"
    echo "kind: Kustomization"
    echo "resources: [../../deploy/k8s/base]"
    [ $# -eq 0 ] || echo "components: [$(printf '../../deploy/k8s/%s,' "$@" | sed 's/,$//')]"
  } >"$dir/kustomization.yaml"
  kubectl kustomize "$dir" | /usr/bin/python3 -c 'import json, sys, yaml
json.dump([d for d in yaml.safe_load_all(sys.stdin) if d], sys.stdout)' >"$out"
  rm -rf "$dir"
}

# node_containerd_config FILE DIR: containerd with its CRI plugin, everything of its own under
# DIR (DIR as the machine that runs it sees it).
node_containerd_config() {
  cat >"$1" <<CONF
version = 2
root = "$2/root"
state = "$2/state"
[grpc]
  address = "$2/containerd.sock"
[ttrpc]
  address = "$2/containerd.sock.ttrpc"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "pyrunner-node-test/pause:latest"
  # Where root lacks CAP_SYS_RESOURCE (a container, or some build hosts), no process may lower
  # its out-of-memory score: keep the pods' at or above containerd's own.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "$2/cni/bin"
    conf_dir = "$2/cni/conf"
CONF
}

# The pod sandbox's image: a process that waits (the images here cannot be pulled, the
# registry's pause image included). Built on the worker image, whose layers it shares.
node_pause_image() {
  printf 'FROM pyrunner-worker\nENTRYPOINT ["sleep", "infinity"]\nCMD []\nHEALTHCHECK NONE\n' |
    docker build --quiet --tag pyrunner-node-test/pause - >/dev/null
}

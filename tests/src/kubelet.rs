//! A kubelet's part of starting a Deployment's pods, for the node test (`nodecheck`): turns the
//! pod template of a rendered manifest into the CRI requests a kubelet sends its runtime, with
//! the rules a kubelet applies. The container settings that bear on the sandbox come through
//! as a kubelet passes them: capabilities as written, `allowPrivilegeEscalation: false` as
//! `no_new_privs`, seccomp and AppArmor profiles (pod level, overridden by the container's; a
//! `Localhost` seccomp profile under the kubelet's `seccomp` directory; no AppArmor setting is
//! the runtime's default profile), the default masked and read-only `/proc` paths, the user,
//! a read-only root, the namespaces (a PID namespace per container), the resources as CFS
//! shares and quota and a memory limit, `runAsNonRoot` refused for uid 0. The environment is
//! built as a kubelet builds it: `envFrom`, then `env`, then the service links of the
//! namespace's Services.
//!
//! Left out, as they bear on no layer: the pod network (pods here share the node's network, so
//! that they reach the broker and the store on the node's loopback), cluster DNS, the service
//! account, `/etc/hosts`, image pulls (the images are imported beforehand).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::cri::{
    Capability, ContainerConfig, ContainerMetadata, ImageSpec, Int64Value, KeyValue,
    LinuxContainerConfig, LinuxContainerResources, LinuxContainerSecurityContext,
    LinuxPodSandboxConfig, LinuxSandboxSecurityContext, Mount, NamespaceMode, NamespaceOption,
    PodSandboxConfig, PodSandboxMetadata, ProfileType, SecurityProfile,
};

/// The `/proc` and `/sys` paths a kubelet asks the runtime to mask (`procMount: Default`).
pub const MASKED_PATHS: [&str; 11] = [
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

/// The `/proc` paths a kubelet asks the runtime to make read-only.
pub const READONLY_PATHS: [&str; 5] = [
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// The node a kubelet runs on: where it keeps its files, and what it holds.
pub struct Node {
    /// The kubelet's root directory (`--root-dir`): `Localhost` seccomp profiles are read
    /// from its `seccomp` directory.
    pub root_dir: PathBuf,
    /// Where the pods' logs and termination messages go.
    pub pods_dir: PathBuf,
    /// The node's memory, for the out-of-memory score of burstable pods.
    pub memory_bytes: i64,
    /// Whether the node's kernel enforces AppArmor.
    pub apparmor: bool,
}

/// A pod to start: its sandbox and its containers, in order.
pub struct Pod {
    pub name: String,
    pub sandbox: PodSandboxConfig,
    pub containers: Vec<Container>,
}

/// A container of a pod, and its `exec` liveness probe, if it has one.
pub struct Container {
    pub name: String,
    pub config: ContainerConfig,
    pub liveness_exec: Option<Vec<String>>,
}

/// A pod template that a kubelet would refuse to start, or that this test cannot start.
#[derive(Debug, thiserror::Error)]
pub enum PodError {
    #[error("{pod}: {problem}")]
    Refused { pod: String, problem: String },
}

/// The named objects of the rendered manifests a pod refers to.
pub struct Objects<'a> {
    resources: &'a [Value],
    /// Secrets made for the test (the base leaves them to the operator), by name.
    secrets: &'a HashMap<String, BTreeMap<String, String>>,
}

impl<'a> Objects<'a> {
    pub fn new(
        resources: &'a [Value],
        secrets: &'a HashMap<String, BTreeMap<String, String>>,
    ) -> Objects<'a> {
        Objects { resources, secrets }
    }

    /// The object of `kind` named `name`.
    pub fn find(&self, kind: &str, name: &str) -> Option<&'a Value> {
        self.resources
            .iter()
            .find(|r| r["kind"] == kind && r["metadata"]["name"] == name)
    }

    fn config_map(&self, name: &str) -> Option<BTreeMap<String, String>> {
        let data = self.find("ConfigMap", name)?["data"].as_object()?;
        Some(
            data.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                .collect(),
        )
    }

    /// The environment variables a kubelet gives for the namespace's Services (each gets a
    /// cluster address of its own here), and for the `kubernetes` Service every namespace sees.
    fn service_links(&self) -> Vec<(String, String)> {
        let mut services = vec![(
            String::from("kubernetes"),
            vec![(String::from("https"), 443)],
        )];
        for service in self.resources.iter().filter(|r| r["kind"] == "Service") {
            let ports = service["spec"]["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| {
                    let name = p["name"].as_str().unwrap_or_default().to_owned();
                    (name, p["port"].as_i64().unwrap_or_default())
                })
                .collect();
            let name = service["metadata"]["name"].as_str().unwrap_or_default();
            services.push((name.to_owned(), ports));
        }
        let mut vars = Vec::new();
        for (i, (name, ports)) in services.iter().enumerate() {
            let prefix = name.to_uppercase().replace('-', "_");
            let ip = format!("10.96.0.{}", i + 1);
            let Some((_, first)) = ports.first() else {
                continue;
            };
            vars.push((format!("{prefix}_SERVICE_HOST"), ip.clone()));
            vars.push((format!("{prefix}_SERVICE_PORT"), first.to_string()));
            vars.push((format!("{prefix}_PORT"), format!("tcp://{ip}:{first}")));
            for (port_name, port) in ports {
                if !port_name.is_empty() {
                    let key = port_name.to_uppercase().replace('-', "_");
                    vars.push((format!("{prefix}_SERVICE_PORT_{key}"), port.to_string()));
                }
                let base = format!("{prefix}_PORT_{port}_TCP");
                vars.push((base.clone(), format!("tcp://{ip}:{port}")));
                vars.push((format!("{base}_PROTO"), "tcp".into()));
                vars.push((format!("{base}_PORT"), port.to_string()));
                vars.push((format!("{base}_ADDR"), ip.clone()));
            }
        }
        vars
    }
}

/// The pods of the Deployment `name`: one per replica, named as a ReplicaSet names them.
pub fn deployment_pods(
    objects: &Objects,
    name: &str,
    node: &Node,
    env_overrides: &[(&str, &str)],
) -> Result<Vec<Pod>, PodError> {
    let refused = |problem: String| PodError::Refused {
        pod: name.to_owned(),
        problem,
    };
    let deployment = objects
        .find("Deployment", name)
        .ok_or_else(|| refused("no such Deployment".into()))?;
    let replicas = deployment["spec"]["replicas"].as_u64().unwrap_or(1);
    let namespace = deployment["metadata"]["namespace"]
        .as_str()
        .unwrap_or("default");
    let template = &deployment["spec"]["template"];
    let suffix = &uuid::Uuid::new_v4().simple().to_string()[..10];
    (0..replicas)
        .map(|i| {
            let pod_name = format!("{name}-{suffix}-{i}");
            pod(objects, template, &pod_name, namespace, node, env_overrides)
        })
        .collect()
}

fn pod(
    objects: &Objects,
    template: &Value,
    name: &str,
    namespace: &str,
    node: &Node,
    env_overrides: &[(&str, &str)],
) -> Result<Pod, PodError> {
    let refused = |problem: String| PodError::Refused {
        pod: name.to_owned(),
        problem,
    };
    let spec = &template["spec"];
    let uid = uuid::Uuid::new_v4().to_string();
    let pod_dir = node.pods_dir.join(format!("{namespace}_{name}_{uid}"));
    std::fs::create_dir_all(&pod_dir).map_err(|e| refused(format!("{pod_dir:?}: {e}")))?;
    let pod_security = &spec["securityContext"];
    let containers = spec["containers"]
        .as_array()
        .ok_or_else(|| refused("no containers".into()))?;
    let qos = qos_class(containers);
    let cgroup_parent = match qos {
        Qos::Guaranteed => format!("/kubepods/pod{uid}"),
        Qos::Burstable => format!("/kubepods/burstable/pod{uid}"),
        Qos::BestEffort => format!("/kubepods/besteffort/pod{uid}"),
    };
    let mut labels: HashMap<String, String> = template["metadata"]["labels"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
        .collect();
    labels.insert("io.kubernetes.pod.name".into(), name.into());
    labels.insert("io.kubernetes.pod.namespace".into(), namespace.into());
    labels.insert("io.kubernetes.pod.uid".into(), uid.clone());
    let sandbox = PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.into(),
            uid: uid.clone(),
            namespace: namespace.into(),
            attempt: 0,
        }),
        // The node's network: no hostname of the pod's own.
        hostname: String::new(),
        log_directory: pod_dir.display().to_string(),
        labels: labels.clone(),
        linux: Some(LinuxPodSandboxConfig {
            cgroup_parent,
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(namespaces()),
                run_as_user: int64(&pod_security["runAsUser"]),
                run_as_group: int64(&pod_security["runAsGroup"]),
                privileged: false,
                seccomp: Some(seccomp(&pod_security["seccompProfile"], node).0),
            }),
        }),
    };
    let volumes = spec["volumes"].as_array().cloned().unwrap_or_default();
    let containers = containers
        .iter()
        .map(|c| {
            container(
                objects,
                c,
                pod_security,
                &volumes,
                &pod_dir,
                node,
                qos,
                env_overrides,
            )
            .map_err(refused)
        })
        .collect::<Result<_, _>>()?;
    Ok(Pod {
        name: name.into(),
        sandbox,
        containers,
    })
}

#[allow(clippy::too_many_arguments)]
fn container(
    objects: &Objects,
    c: &Value,
    pod_security: &Value,
    volumes: &[Value],
    pod_dir: &Path,
    node: &Node,
    qos: Qos,
    env_overrides: &[(&str, &str)],
) -> Result<Container, String> {
    let name = c["name"].as_str().ok_or("a container without a name")?;
    let security = &c["securityContext"];
    // The container's setting, else the pod's.
    let setting = |key: &str| {
        if security[key].is_null() {
            &pod_security[key]
        } else {
            &security[key]
        }
    };
    let run_as_user = int64(setting("runAsUser"));
    if setting("runAsNonRoot") == true && run_as_user.as_ref().is_none_or(|u| u.value == 0) {
        return Err(format!(
            "{name}: runAsNonRoot with uid {run_as_user:?} (a kubelet checks the image's user \
             when no uid is set; give one)"
        ));
    }
    let (seccomp, seccomp_path) = seccomp(setting("seccompProfile"), node);
    let (apparmor, apparmor_profile) = apparmor(setting("appArmorProfile"), node)?;
    let capabilities = Capability {
        add_capabilities: strings(&security["capabilities"]["add"]),
        drop_capabilities: strings(&security["capabilities"]["drop"]),
    };
    let privileged = security["privileged"] == true;
    let security_context = LinuxContainerSecurityContext {
        capabilities: Some(capabilities),
        privileged,
        namespace_options: Some(namespaces()),
        run_as_user,
        run_as_group: int64(setting("runAsGroup")),
        readonly_rootfs: security["readOnlyRootFilesystem"] == true,
        no_new_privs: security["allowPrivilegeEscalation"] == false,
        masked_paths: if privileged {
            Vec::new()
        } else {
            MASKED_PATHS.map(String::from).to_vec()
        },
        readonly_paths: if privileged {
            Vec::new()
        } else {
            READONLY_PATHS.map(String::from).to_vec()
        },
        seccomp: Some(seccomp),
        apparmor,
        apparmor_profile,
        seccomp_profile_path: seccomp_path,
    };
    let mut mounts = Vec::new();
    for mount in c["volumeMounts"].as_array().into_iter().flatten() {
        let volume_name = mount["name"].as_str().unwrap_or_default();
        let volume = volumes
            .iter()
            .find(|v| v["name"] == volume_name)
            .ok_or_else(|| format!("{name}: no volume {volume_name}"))?;
        if volume["hostPath"].is_null() {
            return Err(format!("{name}: volume {volume_name} is not a hostPath"));
        }
        // The node's own directory, made where missing if the volume says so.
        let host = PathBuf::from(volume["hostPath"]["path"].as_str().unwrap_or_default());
        match volume["hostPath"]["type"].as_str() {
            Some("DirectoryOrCreate") => {
                std::fs::create_dir_all(&host).map_err(|e| format!("{host:?}: {e}"))?
            }
            Some("Directory") if !host.is_dir() => {
                return Err(format!("{name}: hostPath {host:?} is not a directory"))
            }
            _ => {}
        }
        mounts.push(Mount {
            container_path: mount["mountPath"].as_str().unwrap_or_default().into(),
            host_path: host.display().to_string(),
            readonly: mount["readOnly"] == true,
        });
    }
    // The termination message file every container gets.
    let termination = pod_dir.join(format!("{name}-termination-log"));
    std::fs::write(&termination, "").map_err(|e| format!("{termination:?}: {e}"))?;
    mounts.push(Mount {
        container_path: "/dev/termination-log".into(),
        host_path: termination.display().to_string(),
        readonly: false,
    });
    let liveness_exec = c["livenessProbe"]["exec"]["command"]
        .as_array()
        .map(|_| strings(&c["livenessProbe"]["exec"]["command"]));
    let config = ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: c["image"].as_str().ok_or("no image")?.into(),
        }),
        command: strings(&c["command"]),
        args: strings(&c["args"]),
        envs: environment(objects, c, env_overrides)?,
        mounts,
        labels: HashMap::from([("io.kubernetes.container.name".into(), name.into())]),
        log_path: format!("{name}/0.log"),
        linux: Some(LinuxContainerConfig {
            resources: Some(resources(&c["resources"], qos, node)),
            security_context: Some(security_context),
        }),
    };
    Ok(Container {
        name: name.into(),
        config,
        liveness_exec,
    })
}

/// `envFrom` (ConfigMaps and Secrets, in order), then `env`, then the service links; a later
/// source does not override an earlier `env` entry, as a kubelet builds it. `overrides` stand
/// for what this test sets apart from the manifests (the addresses on the node).
fn environment(
    objects: &Objects,
    c: &Value,
    overrides: &[(&str, &str)],
) -> Result<Vec<KeyValue>, String> {
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    for source in c["envFrom"].as_array().into_iter().flatten() {
        let (data, what) = if let Some(name) = source["configMapRef"]["name"].as_str() {
            (objects.config_map(name), format!("ConfigMap {name}"))
        } else if let Some(name) = source["secretRef"]["name"].as_str() {
            (objects.secrets.get(name).cloned(), format!("Secret {name}"))
        } else {
            return Err(format!(
                "envFrom {source}: neither a ConfigMap nor a Secret"
            ));
        };
        env.extend(data.ok_or_else(|| format!("no {what}"))?);
    }
    for var in c["env"].as_array().into_iter().flatten() {
        let name = var["name"].as_str().unwrap_or_default().to_owned();
        let value = var["value"]
            .as_str()
            .ok_or_else(|| format!("env {name}: only literal values are supported"))?;
        env.insert(name, value.to_owned());
    }
    for (name, value) in objects.service_links() {
        env.entry(name).or_insert(value);
    }
    for (name, value) in overrides {
        env.insert((*name).to_owned(), (*value).to_owned());
    }
    Ok(env
        .into_iter()
        .map(|(key, value)| KeyValue { key, value })
        .collect())
}

/// The node's network (see the module's text), a PID namespace per container, the pod's IPC.
fn namespaces() -> NamespaceOption {
    NamespaceOption {
        network: NamespaceMode::Node as i32,
        pid: NamespaceMode::Container as i32,
        ipc: NamespaceMode::Pod as i32,
    }
}

/// A seccomp setting as a kubelet passes it: the profile, and the older spelling. None is
/// `Unconfined` (a kubelet without `--seccomp-default`).
fn seccomp(profile: &Value, node: &Node) -> (SecurityProfile, String) {
    match profile["type"].as_str() {
        Some("RuntimeDefault") => (
            SecurityProfile {
                profile_type: ProfileType::RuntimeDefault as i32,
                localhost_ref: String::new(),
            },
            "runtime/default".into(),
        ),
        Some("Localhost") => {
            let path = node
                .root_dir
                .join("seccomp")
                .join(profile["localhostProfile"].as_str().unwrap_or_default());
            (
                SecurityProfile {
                    profile_type: ProfileType::Localhost as i32,
                    localhost_ref: path.display().to_string(),
                },
                format!("localhost/{}", path.display()),
            )
        }
        _ => (
            SecurityProfile {
                profile_type: ProfileType::Unconfined as i32,
                localhost_ref: String::new(),
            },
            "unconfined".into(),
        ),
    }
}

/// An AppArmor setting as a kubelet passes it. A kubelet on a node without AppArmor refuses a
/// pod that names a profile other than `Unconfined`; none is the runtime's default profile.
fn apparmor(profile: &Value, node: &Node) -> Result<(Option<SecurityProfile>, String), String> {
    let (kind, name) = (
        profile["type"].as_str(),
        profile["localhostProfile"].as_str().unwrap_or_default(),
    );
    if !node.apparmor {
        return match kind {
            None | Some("Unconfined") => Ok((None, String::new())),
            Some(other) => Err(format!(
                "AppArmor profile {other} on a node without AppArmor (a kubelet refuses the pod)"
            )),
        };
    }
    let (profile_type, localhost_ref, old) = match kind {
        Some("Unconfined") => (ProfileType::Unconfined, "", "unconfined".to_owned()),
        Some("Localhost") => (ProfileType::Localhost, name, format!("localhost/{name}")),
        _ => (
            ProfileType::RuntimeDefault,
            "",
            "runtime/default".to_owned(),
        ),
    };
    Ok((
        Some(SecurityProfile {
            profile_type: profile_type as i32,
            localhost_ref: localhost_ref.into(),
        }),
        old,
    ))
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Qos {
    Guaranteed,
    Burstable,
    BestEffort,
}

/// The pod's quality of service, from its containers' requests and limits.
fn qos_class(containers: &[Value]) -> Qos {
    let mut any = false;
    let mut guaranteed = true;
    for c in containers {
        let resources = &c["resources"];
        for resource in ["cpu", "memory"] {
            let request = &resources["requests"][resource];
            let limit = &resources["limits"][resource];
            any |= !request.is_null() || !limit.is_null();
            let request = if request.is_null() { limit } else { request };
            guaranteed &= !limit.is_null() && quantity(request) == quantity(limit);
        }
    }
    match (any, guaranteed) {
        (false, _) => Qos::BestEffort,
        (true, true) => Qos::Guaranteed,
        (true, false) => Qos::Burstable,
    }
}

/// CPU as CFS shares and quota, memory as a limit, and the out-of-memory score of the pod's
/// class, as a kubelet computes them.
fn resources(resources: &Value, qos: Qos, node: &Node) -> LinuxContainerResources {
    let cpu_request = quantity(&resources["requests"]["cpu"])
        .or(quantity(&resources["limits"]["cpu"]))
        .unwrap_or(0.0);
    let memory_request = quantity(&resources["requests"]["memory"])
        .or(quantity(&resources["limits"]["memory"]))
        .unwrap_or(0.0);
    let shares = ((cpu_request * 1024.0) as i64).max(2);
    let (cpu_period, cpu_quota) = match quantity(&resources["limits"]["cpu"]) {
        Some(cpus) => (100_000, (cpus * 100_000.0) as i64),
        None => (0, 0),
    };
    let oom_score_adj = match qos {
        Qos::Guaranteed => -997,
        Qos::BestEffort => 1000,
        Qos::Burstable => {
            let score = 1000 - (1000.0 * memory_request / node.memory_bytes as f64) as i64;
            score.clamp(3, 999)
        }
    };
    LinuxContainerResources {
        cpu_period,
        cpu_quota,
        cpu_shares: shares,
        memory_limit_in_bytes: quantity(&resources["limits"]["memory"]).unwrap_or(0.0) as i64,
        oom_score_adj,
    }
}

/// A Kubernetes quantity (`2`, `100m`, `512Mi`, `2Gi`) as a number.
pub fn quantity(value: &Value) -> Option<f64> {
    if let Some(n) = value.as_f64() {
        return Some(n);
    }
    let text = value.as_str()?;
    let units: [(&str, f64); 9] = [
        ("Ki", 1024.0),
        ("Mi", 1024.0 * 1024.0),
        ("Gi", 1024.0 * 1024.0 * 1024.0),
        ("Ti", 1024f64.powi(4)),
        ("m", 0.001),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
    ];
    for (suffix, factor) in units {
        if let Some(number) = text.strip_suffix(suffix) {
            return number.parse::<f64>().ok().map(|n| n * factor);
        }
    }
    text.parse().ok()
}

fn int64(value: &Value) -> Option<Int64Value> {
    value.as_i64().map(|value| Int64Value { value })
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn quantities_read_as_kubernetes_writes_them() {
        let cases = [
            (json!("2"), Some(2.0)),
            (json!(2), Some(2.0)),
            (json!("100m"), Some(0.1)),
            (json!("64Mi"), Some(64.0 * 1024.0 * 1024.0)),
            (json!("6Gi"), Some(6.0 * 1024.0 * 1024.0 * 1024.0)),
            (json!("1G"), Some(1e9)),
            (json!("lots"), None),
            (json!(null), None),
        ];
        for (value, expected) in cases {
            assert_eq!(quantity(&value), expected, "{value}");
        }
    }

    #[test]
    fn the_class_follows_requests_and_limits() {
        let cases = [
            (json!([{}]), Qos::BestEffort),
            (
                json!([{"resources": {"limits": {"cpu": "1", "memory": "1Gi"}}}]),
                Qos::Guaranteed,
            ),
            (
                json!([{"resources": {"requests": {"cpu": "2", "memory": "2Gi"},
                                       "limits": {"cpu": "2", "memory": "6Gi"}}}]),
                Qos::Burstable,
            ),
            (
                json!([{"resources": {"requests": {"cpu": "100m", "memory": "64Mi"},
                                       "limits": {"memory": "512Mi"}}}]),
                Qos::Burstable,
            ),
        ];
        for (containers, expected) in cases {
            let containers = containers.as_array().unwrap().clone();
            assert_eq!(qos_class(&containers), expected, "{containers:?}");
        }
    }
}

//! The Kubernetes manifests (`deploy/k8s`) against the Kubernetes schemas, offline, with
//! `kubernetes-validate --strict` (scripts/test installs it): every manifest file, and, where
//! `kubectl` is installed, what each kustomization renders. KEDA's kinds have no schema there;
//! their references are checked here instead. And the worker's AppArmor profile
//! (`deploy/apparmor`) through AppArmor's parser (scripts/test unpacks it).

use std::path::{Path, PathBuf};
use std::process::Command;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/k8s")
}

fn validator() -> String {
    std::env::var("PYRUNNER_KUBERNETES_VALIDATE").unwrap_or_else(|_| "kubernetes-validate".into())
}

/// Validates `files`; returns the validator's output, after checking that everything passed
/// and that only KEDA's kinds lacked a schema.
fn validate(files: &[PathBuf]) -> String {
    let out = Command::new(validator())
        .arg("--strict")
        .args(files)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} ({e}); scripts/test installs it, or set PYRUNNER_KUBERNETES_VALIDATE",
                validator()
            )
        });
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    for line in text.lines().filter(|l| !l.starts_with("INFO")) {
        assert!(
            line.contains("with api version keda.sh/"),
            "not a pass: {line}\n{text}"
        );
    }
    text
}

/// The path of `to` from directory `from`, both made absolute first.
fn relative(from: &Path, to: &Path) -> PathBuf {
    let (from, to) = (from.canonicalize().unwrap(), to.canonicalize().unwrap());
    let common = from
        .components()
        .zip(to.components())
        .take_while(|(a, b)| a == b)
        .count();
    let mut path: PathBuf = from.components().skip(common).map(|_| "..").collect();
    path.extend(to.components().skip(common));
    path
}

fn manifests(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            manifests(&path, found);
        } else if path.extension().is_some_and(|e| e == "yaml")
            && path.file_name().is_some_and(|n| n != "kustomization.yaml")
        {
            found.push(path);
        }
    }
}

#[test]
fn every_manifest_passes_the_kubernetes_schemas() {
    let mut files = Vec::new();
    manifests(&deploy_dir(), &mut files);
    assert!(files.len() >= 8, "{files:?}");
    let text = validate(&files);
    for kind in [
        "deployment/pyrunner-api",
        "deployment/pyrunner-worker",
        "service/pyrunner-api",
        "poddisruptionbudget/pyrunner-worker",
        "horizontalpodautoscaler/pyrunner-worker",
        "statefulset/rabbitmq",
    ] {
        assert!(
            text.contains(&format!("passed for resource {kind}")),
            "{kind}: {text}"
        );
    }
}

#[test]
fn each_kustomization_renders_valid_resources() {
    if Command::new("kubectl")
        .arg("version")
        .arg("--client")
        .output()
        .is_err()
    {
        // Without kubectl nothing renders; the files themselves are checked above.
        eprintln!("kubectl is not installed: the kustomizations are not rendered");
        return;
    }
    let rendered = tempfile::tempdir().unwrap();
    // A component is a kustomization of its own only with a base; these live under the
    // build's directory (kustomize takes relative paths only).
    let with_component = |component: &str| {
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let deploy = relative(dir.path(), &deploy_dir());
        std::fs::write(
            dir.path().join("kustomization.yaml"),
            format!(
                "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n\
                 resources: [{}]\ncomponents: [{}]\n",
                deploy.join("base").display(),
                deploy.join(component).display()
            ),
        )
        .unwrap();
        dir
    };
    let with_apparmor = with_component("apparmor");
    let with_cgroup_v1 = with_component("cgroup-v1");
    for (overlay, dir) in [
        ("base", deploy_dir().join("base")),
        ("dev", deploy_dir().join("dev")),
        ("apparmor", with_apparmor.path().to_path_buf()),
        ("cgroup-v1", with_cgroup_v1.path().to_path_buf()),
    ] {
        let out = Command::new("kubectl")
            .arg("kustomize")
            .arg(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{overlay}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let yaml = String::from_utf8(out.stdout).unwrap();
        let file = rendered.path().join(format!("{overlay}.yaml"));
        std::fs::write(&file, &yaml).unwrap();
        validate(&[file]);
        // Everything lands in the namespace, and the workers keep the sandbox's settings.
        assert!(yaml.contains("namespace: pyrunner"), "{overlay}");
        assert!(
            yaml.contains("localhostProfile: pyrunner/worker.json"),
            "{overlay}"
        );
        assert!(!yaml.contains("privileged: true"), "{overlay}");
        // The workers' AppArmor profile: their own with the component, else Unconfined.
        let own_profile = "appArmorProfile:\n            localhostProfile: pyrunner-worker\n            type: Localhost";
        assert_eq!(yaml.contains(own_profile), overlay == "apparmor", "{yaml}");
        // The v1 controllers' directories, each mounted where the worker looks for it.
        for controller in ["memory", "pids", "cpu", "cpuacct"] {
            let mounted = format!(
                "mountPath: /sys/fs/cgroup/{controller}\n          name: cgroup-{controller}"
            );
            let volume = format!(
                "path: /sys/fs/cgroup/{controller}/pyrunner-workers\n          type: DirectoryOrCreate"
            );
            assert_eq!(yaml.contains(&mounted), overlay == "cgroup-v1", "{yaml}");
            assert_eq!(yaml.contains(&volume), overlay == "cgroup-v1", "{yaml}");
        }
        if overlay == "dev" {
            // KEDA scales the workers' Deployment on the queues the service declares.
            assert!(yaml.contains("kind: ScaledObject"), "{yaml}");
            assert!(yaml.contains("name: pyrunner-worker"), "{yaml}");
            assert!(
                yaml.contains(r"queueName: ^pyrunner\.jobs(\.key\..+)?$"),
                "{yaml}"
            );
            assert!(yaml.contains("name: pyrunner-connections"), "{yaml}");
        }
    }
}

/// Compiles an AppArmor profile with AppArmor's parser, without loading it.
fn compile_apparmor_profile(profile: &Path) -> std::process::Output {
    let dir = PathBuf::from(std::env::var("PYRUNNER_APPARMOR_DIR").unwrap_or_else(|_| "/".into()));
    let parser = dir.join("sbin/apparmor_parser");
    Command::new(&parser)
        .args(["--skip-kernel-load", "--skip-cache", "--base"])
        .arg(dir.join("etc/apparmor.d"))
        .arg(profile)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} ({e}); scripts/test unpacks it, or set PYRUNNER_APPARMOR_DIR",
                parser.display()
            )
        })
}

#[test]
fn the_workers_apparmor_profile_compiles() {
    let profile = deploy_dir().join("../apparmor/pyrunner-worker");
    let out = compile_apparmor_profile(&profile);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The parser does refuse a profile it cannot read: a rule the grammar lacks.
    let broken = tempfile::tempdir().unwrap();
    let copy = broken.path().join("pyrunner-worker");
    let text = std::fs::read_to_string(&profile).unwrap();
    std::fs::write(&copy, text.replace("  file,", "  file everything,")).unwrap();
    assert!(!compile_apparmor_profile(&copy).status.success());
}

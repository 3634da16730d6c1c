//! The Kubernetes manifests (`deploy/k8s`) against the Kubernetes schemas, offline, with
//! `kubernetes-validate --strict` (scripts/test installs it): every manifest file, and, where
//! `kubectl` is installed, what each kustomization renders. KEDA's kinds have no schema there;
//! their references are checked here instead.

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
    for overlay in ["base", "dev"] {
        let out = Command::new("kubectl")
            .arg("kustomize")
            .arg(deploy_dir().join(overlay))
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

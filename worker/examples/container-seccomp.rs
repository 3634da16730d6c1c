//! Prints the seccomp profile of the worker's container, as `deploy/docker/seccomp.json` holds
//! it: `cargo run -p pyrunner-worker --example container-seccomp > deploy/docker/seccomp.json`.

fn main() {
    print!(
        "{}",
        pyrunner_worker::sandbox::container_profile::docker_seccomp_profile_text()
    );
}

//! Running the real api and worker binaries against the real RabbitMQ and Redis. Each fleet
//! uses a queue of its own, so fleets of tests running in parallel never take each other's jobs.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lapin::options::QueueDeleteOptions;

/// RabbitMQ of the test machine (override with AMQP_URL).
pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// Redis of the test machine (override with REDIS_URL).
pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// The `host:port` of a service URL, with `default_port` when it names none.
pub fn service_addr(url: &str, default_port: u16) -> String {
    let host = url
        .split("://")
        .nth(1)
        .and_then(|rest| rest.rsplit('@').next())
        .and_then(|h| h.split('/').next())
        .unwrap_or("127.0.0.1")
        .to_owned();
    if host.contains(':') {
        host
    } else {
        format!("{host}:{default_port}")
    }
}

/// Panics with a clear message when RabbitMQ or Redis cannot be reached.
pub fn require_services() {
    for (name, url, port) in [("RabbitMQ", amqp_url(), 5672), ("Redis", redis_url(), 6379)] {
        let addr = service_addr(&url, port);
        let reachable = addr
            .parse()
            .ok()
            .and_then(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_secs(2)).ok())
            .is_some();
        assert!(
            reachable,
            "{name} is not reachable at {addr} ({url}); start it, or set the URL"
        );
    }
}

/// The directory holding the workspace's binaries: the profile directory, which holds test
/// executables in `deps/` and other binaries directly.
fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("executable path");
    let dir = exe.parent().expect("executable dir");
    if dir.ends_with("deps") {
        dir.parent().expect("profile dir").to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

/// The path of a workspace binary; panics with the command that builds it when missing.
pub fn binary(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.is_file(),
        "{} is missing: build it with `cargo build --bins` (scripts/test does)",
        path.display()
    );
    path
}

/// A free loopback port.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A fleet: one api process and any number of worker processes on a queue of their own.
pub struct Fleet {
    pub queue: String,
    pub url: String,
    env: Vec<(String, String)>,
    api: Child,
    /// More api replicas, with their URLs.
    more_apis: Vec<Child>,
    workers: Vec<(Child, PathBuf)>,
    logs: tempfile::TempDir,
}

impl Fleet {
    /// Starts an api and `workers` workers, with extra environment variables for all of them,
    /// and waits until the api answers (and, with workers, until it is ready).
    pub async fn start(workers: usize, env: &[(&str, &str)]) -> Fleet {
        require_services();
        Self::launch(workers, env, true).await
    }

    /// Starts the api binary alone, in embedded mode.
    pub async fn embedded(env: &[(&str, &str)]) -> Fleet {
        Self::launch(0, env, false).await
    }

    async fn launch(workers: usize, env_in: &[(&str, &str)], fleet_mode: bool) -> Fleet {
        let queue = format!("pyrunner.test.{}", uuid::Uuid::new_v4());
        let port = free_port();
        // The machine's broker and store unless the test names others.
        let mut env: Vec<(String, String)> = if fleet_mode {
            vec![
                ("AMQP_URL".into(), amqp_url()),
                ("REDIS_URL".into(), redis_url()),
            ]
        } else {
            Vec::new()
        };
        env.extend(env_in.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        env.extend([
            ("PYRUNNER_QUEUE".into(), queue.clone()),
            (
                "PYRUNNER_RUNTIME_DIR".into(),
                crate::runtime_dir().display().to_string(),
            ),
            ("RUST_LOG".into(), "info".into()),
        ]);
        let logs = tempfile::tempdir().expect("log dir");
        let api_log = std::fs::File::create(logs.path().join("api.log")).unwrap();
        let mut api_cmd = Command::new(binary("pyrunner-api"));
        if !fleet_mode {
            api_cmd.env_remove("AMQP_URL").env_remove("REDIS_URL");
        }
        api_cmd
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("PYRUNNER_BIND", format!("127.0.0.1:{port}"))
            .stdout(api_log.try_clone().unwrap())
            .stderr(api_log);
        let api = api_cmd.spawn().expect("start the api");
        let mut fleet = Fleet {
            queue,
            url: format!("http://127.0.0.1:{port}"),
            env,
            api,
            more_apis: Vec::new(),
            workers: Vec::new(),
            logs,
        };
        fleet.wait_for("/healthz").await;
        for _ in 0..workers {
            fleet.add_worker();
        }
        if workers > 0 {
            fleet.wait_for("/readyz").await;
        }
        fleet
    }

    /// Starts one more worker; returns its index.
    pub fn add_worker(&mut self) -> usize {
        self.add_worker_with(&[])
    }

    /// Starts one more worker, with `env` on top of the fleet's environment; returns its index.
    pub fn add_worker_with(&mut self, env: &[(&str, &str)]) -> usize {
        let index = self.workers.len();
        let log = self.logs.path().join(format!("worker-{index}.log"));
        let child = Command::new(binary("pyrunner-worker"))
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .envs(env.iter().copied())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .expect("start a worker");
        self.workers.push((child, log));
        index
    }

    /// Waits until `path` answers 200 (at most 30 s).
    pub async fn wait_for(&self, path: &str) {
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = client.get(format!("{}{path}", self.url)).send().await {
                if r.status() == 200 {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "{path} not ready in 30 s:\n{}",
                self.api_log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// What worker `index` has logged so far.
    pub fn worker_log(&self, index: usize) -> String {
        std::fs::read_to_string(&self.workers[index].1).unwrap_or_default()
    }

    /// The pid of the api and of each worker still running, by name (`api`, `worker-<index>`).
    pub fn pids(&mut self) -> Vec<(String, u32)> {
        let mut pids = vec![("api".to_owned(), self.api.id())];
        for (index, (child, _)) in self.workers.iter_mut().enumerate() {
            if matches!(child.try_wait(), Ok(None)) {
                pids.push((format!("worker-{index}"), child.id()));
            }
        }
        pids
    }

    /// Starts another api replica on the same broker, store and queue; returns its URL once it
    /// answers.
    pub async fn add_api(&mut self) -> String {
        let port = free_port();
        let child = Command::new(binary("pyrunner-api"))
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("PYRUNNER_BIND", format!("127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start another api");
        self.more_apis.push(child);
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        while reqwest::get(format!("{url}/healthz")).await.is_err() {
            assert!(Instant::now() < deadline, "the second api did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        url
    }

    /// Kills worker `index` at once (SIGKILL), as a crash or an OOM kill would.
    pub fn kill_worker(&mut self, index: usize) {
        let child = &mut self.workers[index].0;
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Stops worker `index` as an orchestrator does (SIGTERM), and waits up to `within` for it
    /// to exit; panics if it does not.
    pub fn terminate_worker(&mut self, index: usize, within: Duration) {
        let child = &mut self.workers[index].0;
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + within;
        while matches!(child.try_wait(), Ok(None)) {
            assert!(
                Instant::now() < deadline,
                "worker {index} did not exit on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits (at most `within`) until a worker has started job `id` (or, with `None`, any job
    /// not yet seen in `skip`), and returns its index.
    pub async fn worker_running(
        &self,
        id: Option<&str>,
        skip: &[usize],
        within: Duration,
    ) -> usize {
        let deadline = Instant::now() + within;
        loop {
            for index in (0..self.workers.len()).filter(|i| !skip.contains(i)) {
                let log = self.worker_log(index);
                let started = log
                    .lines()
                    .any(|l| l.contains("run started") && id.is_none_or(|id| l.contains(id)));
                if started {
                    return index;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no worker started job {id:?} within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Messages waiting in the fleet's dead-letter queue.
    pub async fn dead_letters(&self) -> u32 {
        let conn = pyrunner_shared::queue::connect(&amqp_url())
            .await
            .expect("connect to RabbitMQ");
        let channel = conn.create_channel().await.expect("channel");
        let queue = channel
            .queue_declare(
                format!("{}.dead", self.queue).as_str().into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                Default::default(),
            )
            .await
            .expect("the dead-letter queue exists");
        let _ = conn.close(200, "done".into()).await;
        queue.message_count()
    }

    /// Publishes `body` as it is onto the fleet's queue, with `message_id` if given.
    pub async fn publish_raw(&self, body: &[u8], message_id: Option<&str>) {
        let conn = pyrunner_shared::queue::connect(&amqp_url())
            .await
            .expect("connect to RabbitMQ");
        let channel = conn.create_channel().await.expect("channel");
        let mut props = lapin::BasicProperties::default().with_delivery_mode(2);
        if let Some(id) = message_id {
            props = props.with_message_id(id.into());
        }
        channel
            .basic_publish(
                "".into(),
                self.queue.as_str().into(),
                Default::default(),
                body,
                props,
            )
            .await
            .expect("publish")
            .await
            .expect("published");
        let _ = conn.close(200, "done".into()).await;
    }

    /// What the api has logged so far.
    pub fn api_log(&self) -> String {
        std::fs::read_to_string(self.logs.path().join("api.log")).unwrap_or_default()
    }

    /// Stops every process and deletes the fleet's queues (the callers' too).
    pub async fn stop(mut self) {
        self.kill();
        let mut queues = vec![self.queue.clone(), format!("{}.dead", self.queue)];
        // The test's own Redis, when it names one after the machine's.
        let redis = self.env.iter().rfind(|(k, _)| k == "REDIS_URL");
        if let Some((_, url)) = redis {
            let pool = pyrunner_shared::store::redis_pool(url, 1).unwrap();
            let registry =
                pyrunner_shared::queue_registry::QueueRegistry::new(pool, url, &self.queue);
            if let Ok(callers) = registry.callers().await {
                let settings = pyrunner_shared::queue::QueueSettings::named(&self.queue);
                queues.extend(callers.iter().map(|c| settings.caller_queue(c)));
            }
        }
        if let Ok(conn) = pyrunner_shared::queue::connect(&amqp_url()).await {
            if let Ok(channel) = conn.create_channel().await {
                for queue in queues {
                    let _ = channel
                        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                        .await;
                }
            }
            let _ = conn.close(200, "done".into()).await;
        }
    }

    /// Stops every process: SIGTERM, so they shut down gracefully and clean up, then SIGKILL
    /// for any still running after a few seconds.
    fn kill(&mut self) {
        let children = std::iter::once(&mut self.api)
            .chain(self.more_apis.iter_mut())
            .chain(self.workers.iter_mut().map(|(c, _)| c));
        let children: Vec<&mut Child> = children.collect();
        for child in &children {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for child in children {
            while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.kill();
    }
}

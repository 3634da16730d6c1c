//! Output of a run read from its pipes into memory, up to caps, and input written to them.

use std::io;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::{watch, Notify};

/// Marks a capture stopped when its reading task ends, however it ends.
struct StopOnDrop(watch::Sender<bool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        let _ = self.0.send(true);
    }
}

/// How long output is still read after the run's process group was killed. Only a process that
/// left the group (a new session) can hold the pipes open past that.
const DRAIN_GRACE: Duration = Duration::from_millis(250);

/// Writes `data` to a pipe and closes it; a reader that goes away early is not an error.
pub fn feed(fd: OwnedFd, data: Vec<u8>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if let Ok(mut pipe) = pipe::Sender::from_owned_fd(fd) {
            let _ = pipe.write_all(&data).await;
        }
    })
}

/// Output read from a pipe into memory, up to a cap.
pub struct Capture {
    buffer: Arc<Mutex<(Vec<u8>, bool)>>,
    task: Option<tokio::task::JoinHandle<()>>,
    /// Becomes true when reading has stopped (end of file, error or cap).
    stopped: watch::Receiver<bool>,
}

impl Capture {
    /// Reads `fd` until end of file or `cap` bytes; past the cap it marks the capture truncated,
    /// signals `overflow` and stops reading.
    pub fn start(fd: Option<OwnedFd>, cap: usize, overflow: Option<Arc<Notify>>) -> Self {
        Self::from_receiver(
            fd.and_then(|fd| pipe::Receiver::from_owned_fd(fd).ok()),
            cap,
            overflow,
        )
    }

    /// As [`Capture::start`], for a pipe already registered with the runtime.
    pub fn from_receiver(
        pipe: Option<pipe::Receiver>,
        cap: usize,
        overflow: Option<Arc<Notify>>,
    ) -> Self {
        let buffer = Arc::new(Mutex::new((Vec::new(), false)));
        let (stop, stopped) = watch::channel(pipe.is_none());
        let task = pipe.map(|mut pipe| {
            let buffer = Arc::clone(&buffer);
            tokio::spawn(async move {
                let _stop = StopOnDrop(stop);
                // Small: it is zeroed for every pipe of every run, and most runs print little.
                let mut chunk = vec![0u8; 16 * 1024];
                loop {
                    let n = match pipe.read(&mut chunk).await {
                        Ok(0) => return,
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(_) => return,
                    };
                    let mut guard = buffer.lock().unwrap_or_else(|e| e.into_inner());
                    let room = cap - guard.0.len();
                    if n > room {
                        guard.0.extend_from_slice(&chunk[..room]);
                        guard.1 = true;
                        if let Some(overflow) = &overflow {
                            overflow.notify_one();
                        }
                        return;
                    }
                    guard.0.extend_from_slice(&chunk[..n]);
                }
            })
        });
        Self {
            buffer,
            task,
            stopped,
        }
    }

    /// Waits until reading has stopped: every writer closed the pipe, or the cap was reached.
    pub async fn stopped(&self) {
        let mut stopped = self.stopped.clone();
        let _ = stopped.wait_for(|s| *s).await;
    }

    /// A copy of what has been read so far.
    pub fn snapshot(&self) -> Vec<u8> {
        self.buffer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .clone()
    }

    /// What was read, once the writers are gone (or after a short grace), and whether it was
    /// cut at the cap.
    pub async fn finish(mut self) -> (Vec<u8>, bool) {
        if let Some(mut task) = self.task.take() {
            if tokio::time::timeout(DRAIN_GRACE, &mut task).await.is_err() {
                task.abort();
            }
        }
        let mut guard = self.buffer.lock().unwrap_or_else(|e| e.into_inner());
        (std::mem::take(&mut guard.0), guard.1)
    }
}

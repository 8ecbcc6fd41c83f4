//! An engine component (the scheduler, one worker) on its own tokio runtime whose threads
//! carry its name: like a separate pod it has its own connections and threads, and its CPU
//! time can be told apart ([`crate::cputime`]).

use crate::error::BenchError;
use std::future::Future;
use std::time::Duration;
use tokio::sync::oneshot;

pub struct Component {
    name: String,
    done: oneshot::Receiver<()>,
    thread: std::thread::JoinHandle<()>,
}

impl Component {
    /// Starts a thread running `make()` to completion on a new multi-threaded runtime of
    /// `threads` worker threads (0: one per CPU), as a service's `runtime_threads` builds it.
    /// `make` runs on that thread, so whatever it connects is driven by that runtime.
    pub fn spawn<M, F>(name: &str, threads: usize, make: M) -> Result<Self, BenchError>
    where
        M: FnOnce() -> F + Send + 'static,
        F: Future<Output = ()>,
    {
        let runtime = honua_runtime::build_runtime(name, threads)
            .map_err(BenchError::io(format!("cannot build the {name} runtime")))?;
        let (tx, done) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                runtime.block_on(make());
                drop(runtime);
                let _ = tx.send(());
            })
            .map_err(BenchError::io(format!("cannot start the {name} thread")))?;
        Ok(Self {
            name: name.to_string(),
            done,
            thread,
        })
    }

    /// Waits up to `max` for the component to return (its shutdown token must have fired).
    pub async fn join(self, max: Duration) -> Result<(), BenchError> {
        match tokio::time::timeout(max, self.done).await {
            Err(_) => Err(BenchError::Component(format!(
                "{} did not stop within {max:?} of shutdown",
                self.name
            ))),
            Ok(result) => {
                let finished = result.is_ok();
                // The thread has returned or is about to (it sent, or it panicked).
                let joined = tokio::task::spawn_blocking(move || self.thread.join()).await;
                match (finished, joined) {
                    (true, Ok(Ok(()))) => Ok(()),
                    _ => Err(BenchError::Component(format!("{} panicked", self.name))),
                }
            }
        }
    }
}

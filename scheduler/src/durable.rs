//! Durability waits shared by concurrent submissions (a group commit). `WAIT` (replicas)
//! and `WAITAOF` (the local AOF) cover every write their connection made before they were
//! sent, and every submission of this process to one partition commits on that
//! partition's one multiplexed connection. So one wait serves every submission whose
//! commit had been answered when the wait was sent: a submission that arrives while a wait
//! is out joins the next one, which goes out as soon as that wait answers.
//!
//! One `WAIT` per submission cost the server ≈ 90 µs each on a cluster primary (it asks its
//! replicas for an acknowledgement every time), a third of the Redis CPU of a 3-step
//! process; and a blocked `WAIT` holds back every later command on its connection, so
//! fewer of them also keeps the connection's other traffic moving.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::time::Instant;

/// What one wait does, given how long it may block.
pub type WaitFn<T> = Box<dyn Fn(Duration) -> Pin<Box<dyn Future<Output = T> + Send>> + Send + Sync>;

/// One durability wait shared by the submissions that queue for it ([`SharedWait::wait`]).
pub struct SharedWait<T> {
    /// How long a submission waits at most, from the moment it queues.
    timeout: Duration,
    run: WaitFn<T>,
    state: Mutex<Queue<T>>,
}

struct Queue<T> {
    /// A task is sending waits and answering the submissions queued for them.
    running: bool,
    queued: Vec<oneshot::Sender<T>>,
    /// When the oldest queued submission queued.
    since: Option<Instant>,
}

impl<T: Clone + Send + 'static> SharedWait<T> {
    pub fn new(timeout: Duration, run: WaitFn<T>) -> Arc<Self> {
        Arc::new(Self {
            timeout,
            run,
            state: Mutex::new(Queue {
                running: false,
                queued: Vec::new(),
                since: None,
            }),
        })
    }

    /// The answer of a wait sent after this call: it covers every write this connection
    /// made before the call. `None` when the wait could not be made (its task ended
    /// without answering: a panic, or the runtime shutting down).
    pub async fn wait(self: &Arc<Self>) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut q = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if q.queued.is_empty() {
                q.since = Some(Instant::now());
            }
            q.queued.push(tx);
            !std::mem::replace(&mut q.running, true)
        };
        if start {
            // Its own task: a submission that stops waiting (a client hanging up) does not
            // stop the waits of the others.
            tokio::spawn(Arc::clone(self).drain());
        }
        rx.await.ok()
    }

    /// Sends one wait per batch of queued submissions until none is queued. Each wait may
    /// block for what its batch's oldest submission has left of the timeout (at least 1 ms:
    /// `WAIT … 0` would block for ever).
    async fn drain(self: Arc<Self>) {
        let mut reset = Reset {
            queue: &self.state,
            armed: true,
        };
        loop {
            let (batch, since) = {
                let mut q = self.state.lock().unwrap_or_else(|e| e.into_inner());
                if q.queued.is_empty() {
                    q.running = false;
                    reset.armed = false;
                    return;
                }
                (std::mem::take(&mut q.queued), q.since.take())
            };
            let waited = since.map_or(Duration::ZERO, |t| t.elapsed());
            let left = self
                .timeout
                .saturating_sub(waited)
                .max(Duration::from_millis(1));
            let answer = (self.run)(left).await;
            for tx in batch {
                let _ = tx.send(answer.clone());
            }
        }
    }
}

/// Lets the next submission start a task again if the draining one ends without
/// finishing: it panicked, or its runtime shut down. The queued submissions then get `None`.
struct Reset<'a, T> {
    queue: &'a Mutex<Queue<T>>,
    /// Cleared when the task ends normally (it has handed `running` back itself).
    armed: bool,
}

impl<T> Drop for Reset<'_, T> {
    fn drop(&mut self) {
        if self.armed {
            let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            q.running = false;
            q.queued.clear();
            q.since = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A wait that counts its calls, records the timeouts it was given and answers the
    /// call's number once `gate` opens.
    fn counting(
        gate: tokio::sync::watch::Receiver<bool>,
    ) -> (WaitFn<usize>, Arc<AtomicUsize>, Arc<Mutex<Vec<Duration>>>) {
        let calls = Arc::new(AtomicUsize::new(0));
        let timeouts = Arc::new(Mutex::new(Vec::new()));
        let (c, t) = (Arc::clone(&calls), Arc::clone(&timeouts));
        let run: WaitFn<usize> = Box::new(move |timeout| {
            let n = c.fetch_add(1, Ordering::SeqCst) + 1;
            t.lock().unwrap().push(timeout);
            let mut gate = gate.clone();
            Box::pin(async move {
                let _ = gate.wait_for(|open| *open).await;
                n
            })
        });
        (run, calls, timeouts)
    }

    /// A submission waiting on `w` in a task of its own.
    fn submit(w: &Arc<SharedWait<usize>>) -> tokio::task::JoinHandle<Option<usize>> {
        let w = Arc::clone(w);
        tokio::spawn(async move { w.wait().await })
    }

    /// Until `n` submissions are queued behind the wait that is out.
    async fn queued(w: &SharedWait<usize>, n: usize) {
        while w.state.lock().unwrap().queued.len() < n {
            tokio::task::yield_now().await;
        }
    }

    /// Until the first wait has gone out.
    async fn called(calls: &AtomicUsize) {
        while calls.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
    }

    /// A shared wait whose first wait is out, held until `open` is set.
    struct Started {
        open: tokio::sync::watch::Sender<bool>,
        calls: Arc<AtomicUsize>,
        timeouts: Arc<Mutex<Vec<Duration>>>,
        w: Arc<SharedWait<usize>>,
        first: tokio::task::JoinHandle<Option<usize>>,
    }

    async fn started(timeout: Duration) -> Started {
        let (open, gate) = tokio::sync::watch::channel(false);
        let (run, calls, timeouts) = counting(gate);
        let w = SharedWait::new(timeout, run);
        let first = submit(&w);
        called(&calls).await;
        Started {
            open,
            calls,
            timeouts,
            w,
            first,
        }
    }

    #[tokio::test]
    async fn submissions_queued_behind_a_wait_share_the_next_one() {
        // The first submission's wait goes out and blocks.
        let s = started(Duration::from_secs(5)).await;
        let (open, calls, w, first) = (s.open, s.calls, s.w, s.first);
        // Ten more queue behind it: they need a wait sent after they queued.
        let rest: Vec<_> = (0..10).map(|_| submit(&w)).collect();
        queued(&w, 10).await;
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "the ten wait for the next call"
        );
        open.send(true).unwrap();
        assert_eq!(first.await.unwrap(), Some(1));
        for r in rest {
            assert_eq!(r.await.unwrap(), Some(2), "one shared wait after the first");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        // Idle again: the next submission sends a wait of its own.
        assert_eq!(w.wait().await, Some(3));
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_blocks_only_for_what_its_oldest_submission_has_left() {
        let s = started(Duration::from_millis(1000)).await;
        let (open, timeouts, w, first) = (s.open, s.timeouts, s.w, s.first);
        let second = submit(&w);
        queued(&w, 1).await;
        // The first wait takes 700 ms of the second submission's 1,000.
        tokio::time::advance(Duration::from_millis(700)).await;
        open.send(true).unwrap();
        assert_eq!(first.await.unwrap(), Some(1));
        assert_eq!(second.await.unwrap(), Some(2));
        let t = timeouts.lock().unwrap().clone();
        assert_eq!(t[0], Duration::from_millis(1000));
        assert_eq!(t[1], Duration::from_millis(300));
    }

    #[test]
    fn a_wait_whose_runtime_shuts_down_answers_none_and_the_next_starts_again() {
        let (_open, gate) = tokio::sync::watch::channel(false);
        let (run, calls, _) = counting(gate);
        let w = SharedWait::new(Duration::from_secs(5), run);
        // A wait that never answers, on a runtime that goes away under it.
        let first = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .unwrap();
        let waiting = first.spawn({
            let w = Arc::clone(&w);
            async move { w.wait().await }
        });
        while calls.load(Ordering::SeqCst) == 0 {
            std::thread::yield_now();
        }
        // Dropping a runtime waits until its tasks are dropped.
        drop(first);
        let second = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        assert!(
            second.block_on(waiting).is_err(),
            "its task went with its runtime"
        );
        // The shared wait is free again; this one answers at once (the gate's sender is
        // gone, so the wait returns).
        drop(_open);
        assert_eq!(second.block_on(w.wait()), Some(2));
    }

    #[tokio::test]
    async fn a_wait_that_panics_answers_none_and_the_next_submission_starts_again() {
        let calls = Arc::new(AtomicUsize::new(0));
        let c = Arc::clone(&calls);
        let run: WaitFn<usize> = Box::new(move |_| {
            let n = c.fetch_add(1, Ordering::SeqCst) + 1;
            Box::pin(async move {
                assert!(n > 1, "the first wait fails");
                n
            })
        });
        let w = SharedWait::new(Duration::from_secs(1), run);
        assert_eq!(w.wait().await, None);
        assert_eq!(w.wait().await, Some(2));
    }
}

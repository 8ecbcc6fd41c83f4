//! The scheduler's hold on processes ([`Processes`]) and its one decide-and-commit path:
//! read, decide, commit through `commit.lua`, and decide again from a fresh read when the
//! commit lost a revision race.

use crate::durable::SharedWait;
use honua_shared::commit::CommitCall;
use honua_shared::config::{Config, WaitAof};
use honua_shared::definition::{DefinitionSet, KindRegistry};
use honua_shared::store::{Commit, Store, StoreError};
use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument;

/// How many times in a row one change may lose the revision race before
/// [`Processes::decide_and_commit`] gives up. Every lost race means another writer (a
/// scheduler applying another event of the process, or an operator action) committed in
/// between, so the process is making progress; the bound only stops one change from
/// re-reading forever while a burst of events for the same process (a wide fan-out
/// reporting at once to several schedulers) keeps winning. 50 re-reads of a few round trips
/// each stay well under a second, and no burst seen in the load tests came near it.
pub const CONFLICT_BOUND: usize = 50;

/// What the decide step of [`Processes::decide_and_commit`] made of a fresh read.
pub enum Decision<P, T> {
    /// Commit `call` (its round trip runs in `span`); `then` goes with the answer to the
    /// caller's answer step.
    Commit {
        call: CommitCall,
        span: tracing::Span,
        then: P,
    },
    /// Nothing to commit: the change ends with `T`.
    Done(T),
}

/// What the answer step of [`Processes::decide_and_commit`] made of a commit's answer.
pub enum Answered<T> {
    /// The commit lost a revision race: decide again from a fresh read.
    Conflict,
    /// The change ends with `T`.
    Done(T),
}

/// The scheduler's hold on processes: configuration, store, definitions and kinds. With
/// it the gateway and the scheduler loops create processes ([`crate::submit`]), apply
/// operator actions ([`crate::ops`]) and events ([`crate::scheduler`]), every change through
/// [`Processes::decide_and_commit`].
#[derive(Clone)]
pub struct Processes {
    pub cfg: Arc<Config>,
    pub store: Store,
    pub defs: Arc<DefinitionSet>,
    pub kinds: Arc<KindRegistry>,
    /// Decided once at start: the server has WAITAOF and AOF is on.
    pub waitaof: bool,
    /// The durability waits submissions share, per partition ([`crate::durable`]).
    waits: Arc<Waits>,
}

/// One shared `WAIT` and one shared `WAITAOF` per partition, each on that partition's
/// submissions connection (the one its creates commit through); `None` where submissions
/// do not wait.
struct Waits {
    /// The store submissions go through: a connection of their own when they wait (a `WAIT`
    /// blocks every later call on its connection until it answers, so the scheduler's and
    /// the gateway's other calls go on the shared one), else the shared one.
    submitting: Store,
    replicas: Vec<Shared<u32>>,
    aof: Vec<Shared<bool>>,
}

/// A partition's shared wait answering `T` or why it failed; `None`: not waited for.
type Shared<T> = Option<Arc<SharedWait<Result<T, String>>>>;

/// Partition `p`'s wait in `waits`, when there is one, waited for.
async fn wait_in<T: Clone + Send + 'static>(
    waits: &[Shared<T>],
    p: u16,
) -> Option<Result<T, String>> {
    let w = waits.get(usize::from(p))?.as_ref()?;
    Some(
        w.wait()
            .await
            .unwrap_or_else(|| Err("the wait ended unanswered".into())),
    )
}

impl Waits {
    fn new(cfg: &Config, store: &Store, waitaof: bool) -> Self {
        let replicas = cfg.replicas_to_wait();
        let timeout = Duration::from_millis(cfg.wait_replicas_timeout_ms);
        let submitting = if replicas > 0 || waitaof {
            // A response may take as long as the longest wait.
            let longest = timeout.max(AOF_TIMEOUT) + Duration::from_secs(5);
            store.with_own_connection(longest).unwrap_or_else(|e| {
                tracing::warn!(error = %e, "no connection of their own for submissions: their WAITs hold up the shared one");
                store.clone()
            })
        } else {
            store.clone()
        };
        let per_partition = |p: u16| {
            let store = submitting.in_partition(p);
            let wait_replicas = (replicas > 0).then(|| {
                let store = store.clone();
                SharedWait::new(
                    timeout,
                    Box::new(move |t| {
                        let store = store.clone();
                        Box::pin(async move {
                            store
                                .wait_replicas(replicas, t)
                                .await
                                .map_err(|e| e.to_string())
                        })
                    }),
                )
            });
            let wait_aof = waitaof.then(|| {
                SharedWait::new(
                    AOF_TIMEOUT,
                    Box::new(move |t| {
                        let store = store.clone();
                        Box::pin(async move { store.wait_aof(t).await.map_err(|e| e.to_string()) })
                    }),
                )
            });
            (wait_replicas, wait_aof)
        };
        let (replicas, aof) = (0..store.partitions()).map(per_partition).unzip();
        Self {
            submitting,
            replicas,
            aof,
        }
    }
}

/// How long a submission waits for the local AOF's fsync (`WAITAOF`).
const AOF_TIMEOUT: Duration = Duration::from_secs(1);

impl Processes {
    pub async fn new(
        cfg: Arc<Config>,
        store: Store,
        defs: Arc<DefinitionSet>,
        kinds: Arc<KindRegistry>,
    ) -> Self {
        let waitaof = match cfg.wait_aof {
            WaitAof::Off => false,
            _ => store.supports_waitaof().await.unwrap_or(false),
        };
        let waits = Arc::new(Waits::new(&cfg, &store, waitaof));
        Self {
            cfg,
            store,
            defs,
            kinds,
            waitaof,
            waits,
        }
    }

    /// The same hold on the submissions' connection ([`Waits::submitting`]): what creates
    /// go through, so that their commits and the `WAIT`s after them share one connection.
    pub(crate) fn submitting(&self) -> Self {
        Self {
            store: self.waits.submitting.in_partition(self.store.partition()),
            ..self.clone()
        }
    }

    /// Waits until the replicas `replicas_to_wait` asks for have every write this
    /// partition's connection made so far (`WAIT`, shared with the submissions waiting at
    /// the same time). `None` when no replica is waited for; else how many confirmed, or
    /// why the wait failed.
    pub(crate) async fn wait_replicas(&self) -> Option<Result<u32, String>> {
        wait_in(&self.waits.replicas, self.store.partition()).await
    }

    /// Waits until the local AOF has fsynced every write this partition's connection made
    /// so far (`WAITAOF`, shared likewise). `None` when the server cannot (`waitaof`).
    pub(crate) async fn wait_aof(&self) -> Option<Result<bool, String>> {
        wait_in(&self.waits.aof, self.store.partition()).await
    }

    /// The same hold on partition `p` of the deployment (its store handle).
    pub fn in_partition(&self, p: u16) -> Self {
        Self {
            store: self.store.in_partition(p),
            ..self.clone()
        }
    }

    /// The same hold on the partition process `id` lives in.
    pub fn of(&self, id: &str) -> Self {
        self.in_partition(self.store.partition_of(id))
    }

    /// One hold per partition, in order.
    pub fn all(&self) -> Vec<Self> {
        (0..self.store.partitions())
            .map(|p| self.in_partition(p))
            .collect()
    }

    /// The one decide-and-commit path of every process change (a submission, an operator
    /// action, an event): `decide` reads what it needs and decides, the commit goes out,
    /// `answer` reads the commit's answer (or the error sending it). On
    /// [`Answered::Conflict`] it decides again from a fresh read, at most
    /// [`CONFLICT_BOUND`] times; `None` when every one of them lost the race (what that
    /// means is the caller's to say).
    pub async fn decide_and_commit<P, T, E, D>(
        &self,
        mut decide: impl FnMut() -> D,
        mut answer: impl FnMut(P, Result<Commit, StoreError>) -> Result<Answered<T>, E>,
    ) -> Result<Option<T>, E>
    where
        D: Future<Output = Result<Decision<P, T>, E>>,
    {
        for _ in 0..CONFLICT_BOUND {
            let (call, span, then) = match decide().await? {
                Decision::Done(t) => return Ok(Some(t)),
                Decision::Commit { call, span, then } => (call, span, then),
            };
            let committed = self.store.commit(&call).instrument(span).await;
            match answer(then, committed)? {
                Answered::Done(t) => return Ok(Some(t)),
                Answered::Conflict => {}
            }
        }
        Ok(None)
    }
}

//! Creating a process: shared by the HTTP gateway and the submission-stream consumer.

use crate::processes::{Answered, Decision, Processes};
use honua_shared::commit::AckSource;
use honua_shared::config::WaitAof;
use honua_shared::engine::{self, Ctx};
use honua_shared::envelope::Submission;
use honua_shared::record::ProcessRecord;
use honua_shared::store::{Commit, StoreError};
use std::sync::atomic::Ordering::Relaxed;
use tracing::Instrument;

/// Why a submission was refused.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("unknown process type {0:?}")]
    UnknownType(String),
    #[error("process type {0} has no version {1}")]
    UnknownVersion(String, u32),
    #[error("invalid input: {0}")]
    InvalidInput(String),
    #[error("a process with id {0} already exists")]
    IdTaken(String),
    /// The idempotency key names a process of another type or input: a client bug.
    #[error(
        "idempotency key {key} was used for process {id} ({process_type}) with another {differs}"
    )]
    IdempotencyKeyReused {
        key: String,
        id: String,
        process_type: String,
        differs: &'static str,
    },
    #[error("the submission could not be made durable: {0}")]
    NotDurable(String),
    /// The submitter's id and idempotency key map to different partitions.
    #[error(transparent)]
    Partition(#[from] honua_shared::partition::RouteError),
    /// A submission written to the stream of a partition it does not map to (see the
    /// README on partitions): set aside, never created in the wrong partition.
    #[error(
        "submitted to partition {found}, but its {by} maps to partition {expected}: write it to that partition's submission stream"
    )]
    WrongPartition {
        found: u16,
        expected: u16,
        by: &'static str,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What happened to a submission.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Submitted {
    Created(String),
    /// Created while the fleet's intake is drained: stored `Pending`, started when intake
    /// resumes.
    Pending(String),
    /// The idempotency key was seen before, with the same type and input: the stored
    /// process.
    Duplicate {
        id: String,
        process_type: String,
    },
}

impl Submitted {
    pub fn id(&self) -> &str {
        match self {
            Submitted::Created(id) | Submitted::Pending(id) | Submitted::Duplicate { id, .. } => id,
        }
    }
}

impl Processes {
    /// Creates the process (one commit.lua call that also enqueues its first steps and,
    /// with `ack`, acknowledges the submission entry) and waits for the AOF where possible.
    /// While the fleet's intake is drained the process is created `Pending` instead (the
    /// commit that would start steps answers `closed`, and the create is decided again).
    ///
    /// Runs in a `process.submit` span: a child of the submission's `traceparent` if it has
    /// one, else a new trace. That span's context becomes the process's stored traceparent,
    /// the parent of every transition and step span of the process (when no exporter is
    /// installed the submission's traceparent is stored as is).
    pub async fn create(
        &self,
        sub: &Submission,
        ack: Option<&str>,
    ) -> Result<Submitted, SubmitError> {
        let span = tracing::info_span!(
            parent: None,
            "process.submit",
            honua.process_id = tracing::field::Empty,
            honua.process_type = %sub.process_type,
            honua.duplicate = tracing::field::Empty,
        );
        honua_runtime::telemetry::set_parent(&span, &sub.trace);
        let r = self
            .create_in_span(sub, ack, &span)
            .instrument(span.clone())
            .await;
        if let Ok(s) = &r {
            span.record("honua.process_id", s.id());
            span.record("honua.duplicate", matches!(s, Submitted::Duplicate { .. }));
        }
        r
    }

    /// The stored process `id` the submission's idempotency key names: a duplicate when
    /// its type and input are the submission's, else [`SubmitError::IdempotencyKeyReused`].
    async fn duplicate(&self, sub: &Submission, id: String) -> Result<Submitted, SubmitError> {
        let (meta, steps) = self.store.load_process(&id).await?;
        let Ok(Some(rec)) = ProcessRecord::parse(&id, &meta, &steps) else {
            // Gone (retention) or unreadable: nothing to compare with.
            return Ok(Submitted::Duplicate {
                id,
                process_type: sub.process_type.clone(),
            });
        };
        let stored_input = self
            .store
            .load_data(&id)
            .await?
            .get(honua_shared::keys::field::INPUT)
            .and_then(|b| self.cfg.codec().decode::<serde_json::Value>(b).ok());
        let differs = if rec.process_type != sub.process_type {
            Some("processType")
        } else if stored_input.is_some_and(|i| i != sub.input) {
            Some("input")
        } else {
            None
        };
        match differs {
            None => Ok(Submitted::Duplicate {
                id,
                process_type: rec.process_type,
            }),
            Some(differs) => Err(SubmitError::IdempotencyKeyReused {
                key: sub.idempotency_key.clone().unwrap_or_default(),
                id,
                process_type: rec.process_type,
                differs,
            }),
        }
    }

    /// Picks the submission's partition ([`honua_shared::partition::route`]) and creates it
    /// there. A stream entry (`ack`) is created in the partition whose stream it came from,
    /// which must be the one it maps to.
    async fn create_in_span(
        &self,
        sub: &Submission,
        ack: Option<&str>,
        span: &tracing::Span,
    ) -> Result<Submitted, SubmitError> {
        use honua_shared::partition;
        let partitions = self.store.partitions();
        let routed = partition::route(
            sub.id.as_deref(),
            sub.idempotency_key.as_deref(),
            partitions,
        )?;
        let here = self.store.partition();
        let p = match (routed, ack) {
            (Some(expected), Some(_)) if expected != here => {
                return Err(SubmitError::WrongPartition {
                    found: here,
                    expected,
                    by: if sub.idempotency_key.is_some() {
                        "idempotency key"
                    } else {
                        "id"
                    },
                });
            }
            (Some(p), _) => p,
            (None, Some(_)) => here,
            (None, None) => partition::any_partition(partitions),
        };
        let id = sub
            .id
            .clone()
            .unwrap_or_else(|| partition::new_id_in(p, partitions));
        self.submitting()
            .in_partition(p)
            .create_here(sub, id, ack, span)
            .await
    }

    async fn create_here(
        &self,
        sub: &Submission,
        id: String,
        ack: Option<&str>,
        span: &tracing::Span,
    ) -> Result<Submitted, SubmitError> {
        let def = match sub.version {
            Some(v) => self
                .defs
                .get(&sub.process_type, v)
                .ok_or_else(|| SubmitError::UnknownVersion(sub.process_type.clone(), v))?,
            None => self
                .defs
                .latest(&sub.process_type)
                .ok_or_else(|| SubmitError::UnknownType(sub.process_type.clone()))?,
        };
        if self.cfg.wait_aof == WaitAof::Required && !self.waitaof {
            return Err(SubmitError::NotDurable(
                "the server has no WAITAOF (Redis/Valkey >= 7.2 with appendonly yes)".into(),
            ));
        }
        if !sub.input.is_object() {
            return Err(SubmitError::InvalidInput(
                "input must be a JSON object".into(),
            ));
        }
        let input = self
            .cfg
            .codec()
            .encode(&sub.input)
            .map_err(|e| SubmitError::InvalidInput(e.to_string()))?;
        // A create has no revision to lose (commit.lua answers `conflict` only to an
        // update); the answer step asks to decide again only when intake is drained, and
        // the create is then decided Pending.
        let (id, input) = (&id, &input);
        let pending = std::sync::atomic::AtomicBool::new(false);
        let pending = &pending;
        let stored = self
            .decide_and_commit(
                || async move {
                    let now = self.store.server_time_ms().await?;
                    let ctx = Ctx {
                        def,
                        kinds: &self.kinds,
                        now_ms: now,
                        jitter: rand::random(),
                    };
                    let timeout = self.cfg.process_timeout(&def.name, def.timeout);
                    let create = if pending.load(Relaxed) {
                        engine::create_pending
                    } else {
                        engine::create
                    };
                    let t = create(
                        &ctx,
                        id,
                        input.clone(),
                        sub.idempotency_key.clone(),
                        honua_runtime::telemetry::trace_context_of(span)
                            .and_then(|t| t.traceparent)
                            .or_else(|| {
                                sub.trace
                                    .traceparent
                                    .clone()
                                    .filter(|t| honua_shared::envelope::valid_traceparent(t))
                            }),
                        timeout,
                    )
                    .with_tenant(sub.tenant.clone());
                    let ack = ack.map(|entry| AckSource {
                        stream: self.store.keys().submit(),
                        id: entry,
                    });
                    let call = t.to_commit(
                        self.store.keys(),
                        id,
                        None,
                        now,
                        self.cfg.retention_secs,
                        ack,
                    );
                    Ok(Decision::Commit {
                        call,
                        span: span.clone(),
                        then: (),
                    })
                },
                |(), committed| match committed? {
                    Commit::Ok => Ok(Answered::Done(None)),
                    Commit::Closed if !pending.load(Relaxed) => {
                        pending.store(true, Relaxed);
                        Ok(Answered::Conflict)
                    }
                    Commit::Duplicate(existing) => Ok(Answered::Done(Some(existing))),
                    Commit::Exists => Err(SubmitError::IdTaken(id.clone())),
                    other => Err(SubmitError::Store(StoreError::Reply {
                        script: "commit",
                        detail: format!("{other:?} on create"),
                    })),
                },
            )
            .await?;
        let result = match stored {
            Some(None) if pending.load(Relaxed) => Submitted::Pending(id.clone()),
            Some(None) => Submitted::Created(id.clone()),
            Some(Some(existing)) => return self.duplicate(sub, existing).await,
            None => {
                return Err(SubmitError::Store(StoreError::Reply {
                    script: "commit",
                    detail: format!("{:?} on create", Commit::Conflict),
                }));
            }
        };
        match self.wait_aof().await {
            None | Some(Ok(true)) => {}
            Some(Ok(false)) if self.cfg.wait_aof == WaitAof::Required => {
                return Err(SubmitError::NotDurable("WAITAOF timed out".into()));
            }
            Some(Ok(false)) => {
                tracing::warn!(process_id = %id, "WAITAOF timed out; acknowledged anyway")
            }
            Some(Err(e)) => tracing::warn!(error = %e, "WAITAOF failed"),
        }
        match self.wait_replicas().await {
            None => {}
            Some(Ok(n)) => {
                let wanted = self.cfg.replicas_to_wait();
                if n < wanted {
                    tracing::warn!(process_id = %id, confirmed = n, wanted, "WAIT timed out; acknowledged anyway")
                }
            }
            Some(Err(e)) => tracing::warn!(error = %e, "WAIT failed"),
        }
        let status = match &result {
            Submitted::Created(_) => {
                tracing::info!(process_id = %id, process_type = %def.name, "Process {id} started ({})", def.name);
                honua_shared::status::ProcessStatus::Running
            }
            Submitted::Pending(_) => {
                tracing::info!(process_id = %id, process_type = %def.name, "Process {id} ({}) is Pending: intake is drained", def.name);
                honua_shared::status::ProcessStatus::Pending
            }
            Submitted::Duplicate { .. } => return Ok(result),
        };
        metrics::counter!(honua_shared::metrics::PROCESS_STARTED, "process_type" => def.name.clone())
            .increment(1);
        metrics::counter!(honua_shared::metrics::PROCESS_TRANSITIONS, "process_type" => def.name.clone(),
            "status" => status.as_str())
        .increment(1);
        Ok(result)
    }
}

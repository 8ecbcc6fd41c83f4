//! State tools for operators, instead of `redis-cli` hand edits: a process's state blobs
//! decoded to JSON ([`Processes::state`]), a check of every live process's record and blobs
//! ([`Processes::check_states`]), and deleting one process with every reference to it
//! ([`Processes::delete`], through `delete.lua`). Shared by the HTTP API and tests; the
//! views are what the gateway sends and the CLI decodes.
//!
//! Decoding is pure ([`decode_state`]): the data hash's fields (`input`, `out:<step>`,
//! `ck:<step>`) through the configured state codec (size cap, depth cap, LZ4), each blob that
//! does not decode reported with the codec's error code instead of failing the whole read.

use crate::ops::{OpsError, cursor_page_at, partitioned_cursor, partitioned_pages};
use crate::processes::Processes;
use honua_shared::codec::StateCodec;
use honua_shared::envelope::valid_id;
use honua_shared::keys::field;
use honua_shared::record::ProcessRecord;
use honua_shared::store::{DeleteGuard, Deleted, RawProcess, Removed};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use utoipa::ToSchema;

/// How many times [`Processes::delete`] reads, scans and tries again when the record changed
/// (or many entries arrived) between its scan and `delete.lua`.
const DELETE_ATTEMPTS: usize = 5;
/// Entries per stream `delete.lua` checks itself past the scanned range.
const DELETE_TAIL_MAX: usize = 1000;
/// Processes read per round trip while checking.
const CHECK_BATCH: usize = 100;

/// One part of a process's stored state that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StateProblem {
    pub id: String,
    /// From the record (`""` when even that is unreadable).
    pub process_type: String,
    /// `input`, `out:<step>`, `ck:<step>`, another data field's name, or `record` (the meta
    /// or steps hash).
    pub part: String,
    /// `state_corrupt`, `state_too_large`, `state_unknown_version`, `state_missing`,
    /// `unknown_field` or `record_corrupt`.
    pub code: String,
    pub reason: String,
}

/// `GET /api/processes/{id}/state`: the input, outputs and checkpoints as JSON.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StateView {
    pub id: String,
    pub process_type: String,
    pub status: String,
    /// `null` when missing or unreadable (see `problems`).
    pub input: Option<Value>,
    /// By step name.
    pub outputs: BTreeMap<String, Value>,
    /// The last checkpoint of each step that saved one, by step name.
    pub checkpoints: BTreeMap<String, Value>,
    /// Stored size of all blobs (compressed when compression is on).
    pub size_bytes: u64,
    /// Parts that could not be decoded (left out above).
    pub problems: Vec<StateProblem>,
}

/// `GET /api/state/check`: one page of the check.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CheckReport {
    /// Processes checked in this page (of the requested type).
    pub checked: u64,
    pub problems: Vec<StateProblem>,
    /// Pass as `cursor` for the next page; `null` when every process was checked.
    pub next_cursor: Option<String>,
}

/// References to a deleted process that were removed with it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RemovedView {
    /// Queued or pending step jobs (a running step's worker stops at its next heartbeat).
    pub jobs: u64,
    /// Timers, signals and timeouts not yet applied.
    pub events: u64,
    /// Step results and dead-letter notices not yet applied.
    pub results: u64,
    pub dead_letters: u64,
    /// Delayed jobs and durable timers.
    pub delayed: u64,
}

impl From<Removed> for RemovedView {
    fn from(r: Removed) -> Self {
        RemovedView {
            jobs: r.jobs,
            events: r.events,
            results: r.results,
            dead_letters: r.dead_letters,
            delayed: r.delayed,
        }
    }
}

/// `DELETE /api/processes/{id}`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeleteReply {
    pub id: String,
    pub process_type: String,
    /// The status the process had.
    pub status: String,
    pub forced: bool,
    pub removed: RemovedView,
}

/// Filters of the check.
#[derive(Debug, Clone, Default)]
pub struct CheckQuery {
    pub process_type: Option<String>,
    /// At most this many index entries are read for one page.
    pub limit: usize,
    pub cursor: Option<String>,
}

/// A process's data hash decoded: the readable blobs and the problems of the others.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DecodedState {
    pub input: Option<Value>,
    pub outputs: BTreeMap<String, Value>,
    pub checkpoints: BTreeMap<String, Value>,
    pub size_bytes: u64,
    /// `(part, code, reason)`.
    pub problems: Vec<(String, String, String)>,
}

/// Decodes every field of a data hash with `codec`; never fails.
pub fn decode_state(codec: &StateCodec, data: &HashMap<String, Vec<u8>>) -> DecodedState {
    let mut d = DecodedState::default();
    let mut fields: Vec<(&String, &Vec<u8>)> = data.iter().collect();
    fields.sort();
    for (name, blob) in fields {
        d.size_bytes += blob.len() as u64;
        let slot = if name == field::INPUT {
            None
        } else if let Some(step) = name.strip_prefix(field::OUTPUT_PREFIX) {
            Some((&mut d.outputs, step))
        } else if let Some(step) = name.strip_prefix(field::CHECKPOINT_PREFIX) {
            Some((&mut d.checkpoints, step))
        } else {
            d.problems.push((
                name.clone(),
                "unknown_field".into(),
                "not input, out:<step> or ck:<step>".into(),
            ));
            continue;
        };
        match codec.decode::<Value>(blob) {
            Ok(v) => match slot {
                None => d.input = Some(v),
                Some((map, step)) => {
                    map.insert(step.to_string(), v);
                }
            },
            Err(e) => d
                .problems
                .push((name.clone(), e.code().into(), e.to_string())),
        }
    }
    if !data.contains_key(field::INPUT) {
        d.problems.push((
            field::INPUT.into(),
            "state_missing".into(),
            "the process has no input".into(),
        ));
    }
    d
}

/// The problems of one stored process, its record's first, and its decoded state.
fn inspect(codec: &StateCodec, id: &str, raw: &RawProcess) -> (Vec<StateProblem>, DecodedState) {
    let process_type = raw.meta.get(field::TYPE).cloned().unwrap_or_default();
    let problem = |(part, code, reason): (String, String, String)| StateProblem {
        id: id.to_string(),
        process_type: process_type.clone(),
        part,
        code,
        reason,
    };
    let mut out = Vec::new();
    if let Err(e) = ProcessRecord::parse(id, &raw.meta, &raw.steps) {
        out.push(problem((
            "record".into(),
            "record_corrupt".into(),
            e.to_string(),
        )));
    }
    let mut decoded = decode_state(codec, &raw.data);
    out.extend(
        std::mem::take(&mut decoded.problems)
            .into_iter()
            .map(problem),
    );
    (out, decoded)
}

impl Processes {
    /// The state of process `id`, decoded; parts that do not decode are listed as problems.
    pub async fn state(&self, id: &str) -> Result<StateView, OpsError> {
        if !valid_id(id) {
            return Err(OpsError::NotFound(id.to_string()));
        }
        let raw = self
            .store
            .raw_processes(&[id])
            .await?
            .pop()
            .unwrap_or_default();
        if raw.meta.is_empty() {
            return Err(OpsError::NotFound(id.to_string()));
        }
        let (problems, d) = inspect(&self.cfg.codec(), id, &raw);
        let get = |f: &str| raw.meta.get(f).cloned().unwrap_or_default();
        Ok(StateView {
            id: id.to_string(),
            process_type: get(field::TYPE),
            status: get(field::STATUS),
            input: d.input,
            outputs: d.outputs,
            checkpoints: d.checkpoints,
            size_bytes: d.size_bytes,
            problems,
        })
    }

    /// One page of the check of every live process (`index:all`, newest first): each record
    /// parsed and each blob decoded. Index entries whose record has expired are skipped.
    pub async fn check_states(&self, q: &CheckQuery) -> Result<CheckReport, OpsError> {
        let codec = self.cfg.codec();
        let mut report = CheckReport::default();
        let mut budget = q.limit.clamp(1, 1000);
        // With several partitions they are checked one after the other; the cursor holds
        // each one's position.
        let mut positions = partitioned_pages(q.cursor.as_deref(), self.store.partitions())?;
        for (store, pos) in self.store.all().into_iter().zip(positions.iter_mut()) {
            let (Some(at), true) = (*pos, budget > 0) else {
                continue;
            };
            let key = store.keys().index_all();
            let mut page = cursor_page_at(at, budget);
            while let Some(batch) = page.next_batch(CHECK_BATCH) {
                let entries = store
                    .index_page(&key, 0, page.max_score(), page.offset(), batch)
                    .await?;
                let ids: Vec<&str> = entries.iter().map(|(id, _)| id.as_str()).collect();
                let raws = store.raw_processes(&ids).await?;
                for ((id, score), raw) in entries.iter().zip(&raws) {
                    page.scanned(*score);
                    if raw.meta.is_empty() {
                        continue;
                    }
                    if q.process_type
                        .as_deref()
                        .is_some_and(|t| raw.meta.get(field::TYPE).map(String::as_str) != Some(t))
                    {
                        continue;
                    }
                    report.checked += 1;
                    report.problems.extend(inspect(&codec, id, raw).0);
                }
                if entries.len() < batch {
                    page.exhausted();
                }
            }
            budget = page.remaining();
            *pos = page.position();
        }
        report.next_cursor = partitioned_cursor(&positions);
        Ok(report)
    }

    /// Deletes process `id` with its index entries, idempotency key, LLM usage and every
    /// queued, pending, delayed or dead-lettered job, event and result naming it, in one
    /// `delete.lua` call. An unfinished process is refused (409) unless `force`; a running
    /// step's worker stops at its next heartbeat (its claim is gone). `by` names the API key
    /// for the log line. The record (and its audit list) goes with the process, so the
    /// deletion is recorded in the log and `honua_processes_deleted_total`.
    pub async fn delete(
        &self,
        id: &str,
        force: bool,
        by: Option<&str>,
    ) -> Result<DeleteReply, OpsError> {
        if !valid_id(id) {
            return Err(OpsError::NotFound(id.to_string()));
        }
        let store = &self.store.of(id);
        for _ in 0..DELETE_ATTEMPTS {
            let (meta, steps) = store.load_process(id).await?;
            let status = meta.get(field::STATUS).cloned().unwrap_or_default();
            let process_type = meta.get(field::TYPE).cloned().unwrap_or_default();
            if !force {
                refuse_unfinished(id, &status, &meta, &steps)?;
            }
            let guard = DeleteGuard::of(&meta, &steps);
            let refs = store.references(id).await?;
            match store
                .delete_process(id, &guard, &refs, force, DELETE_TAIL_MAX)
                .await?
            {
                Deleted::Deleted { status, removed } => {
                    metrics::counter!(honua_shared::metrics::PROCESSES_DELETED,
                        "process_type" => process_type.clone(), "forced" => force.to_string())
                    .increment(1);
                    tracing::info!(process_id = %id, process_type = %process_type, %status, forced = force,
                        by = by.unwrap_or("-"), jobs = removed.jobs, events = removed.events,
                        results = removed.results, dead_letters = removed.dead_letters,
                        delayed = removed.delayed, "Process {id} deleted");
                    return Ok(DeleteReply {
                        id: id.to_string(),
                        process_type,
                        status,
                        forced: force,
                        removed: removed.into(),
                    });
                }
                Deleted::Missing { removed } => {
                    if removed != Removed::default() {
                        tracing::info!(process_id = %id, by = by.unwrap_or("-"), ?removed,
                            "stray references to a missing process removed");
                    }
                    return Err(OpsError::NotFound(id.to_string()));
                }
                Deleted::Running { status } => {
                    return Err(OpsError::Conflict(unfinished_message(id, &status, &[])));
                }
                Deleted::Changed => {}
            }
        }
        Err(OpsError::Conflict(
            "the process is changing too fast to delete consistently; try again".into(),
        ))
    }
}

fn unfinished_message(id: &str, status: &str, active: &[String]) -> String {
    let steps = if active.is_empty() {
        String::new()
    } else {
        format!(" with active steps {}", active.join(", "))
    };
    format!(
        "process {id} is {status}{steps}: cancel it first, or delete with force (its running steps are stopped and their jobs removed)"
    )
}

/// A conflict when the record says the process is unfinished.
fn refuse_unfinished(
    id: &str,
    status: &str,
    meta: &HashMap<String, String>,
    steps: &HashMap<String, String>,
) -> Result<(), OpsError> {
    let unfinished = status
        .parse::<honua_shared::status::ProcessStatus>()
        .is_ok_and(|s| !s.is_finished());
    if !unfinished {
        return Ok(());
    }
    let active: Vec<String> = match ProcessRecord::parse(id, meta, steps) {
        Ok(Some(r)) => r.active_steps().map(|(n, _)| n.clone()).collect(),
        _ => vec![],
    };
    Err(OpsError::Conflict(unfinished_message(id, status, &active)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn codec() -> StateCodec {
        StateCodec::new(1024, 16, true)
    }

    #[test]
    fn every_part_decodes_or_is_reported() {
        let c = codec();
        let big = StateCodec::new(1 << 20, 16, false)
            .encode(&json!({"x": "y".repeat(4000)}))
            .unwrap();
        let data: HashMap<String, Vec<u8>> = [
            ("input", c.encode(&json!({"who": "me"})).unwrap()),
            ("out:A", c.encode(&json!({"n": 1})).unwrap()),
            ("ck:B", c.encode(&json!({"page": 3})).unwrap()),
            ("out:Bad", b"\x00garbage".to_vec()),
            ("out:Big", big),
            ("stray", b"x".to_vec()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let d = decode_state(&c, &data);
        assert_eq!(d.input, Some(json!({"who": "me"})));
        assert_eq!(d.outputs, BTreeMap::from([("A".into(), json!({"n": 1}))]));
        assert_eq!(
            d.checkpoints,
            BTreeMap::from([("B".into(), json!({"page": 3}))])
        );
        let codes: Vec<(&str, &str)> = d
            .problems
            .iter()
            .map(|(p, c, _)| (p.as_str(), c.as_str()))
            .collect();
        assert_eq!(
            codes,
            [
                ("out:Bad", "state_corrupt"),
                ("out:Big", "state_too_large"),
                ("stray", "unknown_field")
            ]
        );
        assert_eq!(
            d.size_bytes,
            data.values().map(|b| b.len() as u64).sum::<u64>()
        );
    }

    #[test]
    fn a_missing_input_is_a_problem() {
        let d = decode_state(&codec(), &HashMap::new());
        assert_eq!(d.input, None);
        assert_eq!(d.problems.len(), 1);
        assert_eq!(d.problems[0].1, "state_missing");
    }

    #[test]
    fn only_unfinished_processes_are_refused() {
        let none = HashMap::new();
        assert!(refuse_unfinished("p", "Completed", &none, &none).is_ok());
        assert!(refuse_unfinished("p", "", &none, &none).is_ok());
        let Err(OpsError::Conflict(m)) = refuse_unfinished("p", "Running", &none, &none) else {
            panic!("a running process must be refused");
        };
        assert!(m.contains("force"), "{m}");
    }
}

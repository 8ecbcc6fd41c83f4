//! The process record as stored in Redis (meta hash + steps hash) and read back by the
//! scheduler, the workers and the API.

use crate::keys::field;
use crate::status::{ProcessStatus, StepStatus};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};

/// How many past attempts a step record keeps.
pub const HISTORY_CAP: usize = 10;

/// One finished attempt of a step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct AttemptRecord {
    pub attempt: u32,
    pub visit: u32,
    pub outcome: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deliveries: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_ms: Option<u64>,
}

/// One step's record (JSON in the steps hash; the worker scripts edit it with cjson, so
/// empty lists are omitted — cjson cannot tell an empty array from an empty object).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct StepRecord {
    #[serde(default)]
    pub status: StepStatus,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub token: String,
    #[serde(default)]
    pub attempt: u32,
    /// Attempts that yielded (waited for a shared resource) instead of running: they do
    /// not count against the retry policy's `max_attempts`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub yields: u32,
    #[serde(default)]
    pub visit: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deliveries: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queued_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub due_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claimed_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// W3C `traceparent` of the latest attempt's `step.execute` span (set by `begin.lua`
    /// when the worker traces), so a reclaimed or retried attempt can link to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt_trace: Option<String>,
    /// The `attempt_trace` of the attempt before the latest one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_attempt_trace: Option<String>,
    /// Inputs of a join that have arrived.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "lenient_vec"
    )]
    pub arrived: Vec<String>,
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "lenient_vec"
    )]
    pub history: Vec<AttemptRecord>,
    /// Time its timer, timeout or retry back-off had left when its process was paused (or
    /// its whole delay when it was entered while paused): re-armed with it on resume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_delay_ms: Option<u64>,
}

impl StepRecord {
    /// The current attempt, once it ended: its result is in the record's own fields, and it
    /// moves to `history` only when another attempt or visit of the step begins (so a step
    /// that ran once stores its attempt once).
    pub fn ended_attempt(&self) -> Option<AttemptRecord> {
        let outcome = self.outcome.clone()?;
        self.ended_ms?;
        Some(AttemptRecord {
            attempt: self.attempt,
            visit: self.visit,
            outcome,
            error: self.error.clone(),
            code: self.code.clone(),
            worker: self.worker.clone(),
            deliveries: self.deliveries,
            started_ms: self.claimed_ms.or(self.started_ms),
            ended_ms: self.ended_ms,
        })
    }

    /// The newest [`HISTORY_CAP`] ended attempts, oldest first: the earlier ones
    /// (`history`) and the current one.
    pub fn attempts(&self) -> Vec<AttemptRecord> {
        let mut all = self.history.clone();
        all.extend(self.ended_attempt());
        let extra = all.len().saturating_sub(HISTORY_CAP);
        all.drain(..extra);
        all
    }

    /// Before another attempt or visit begins: the ended current attempt joins `history`
    /// (which keeps the newest [`HISTORY_CAP`]), and its outcome is cleared from the record.
    pub fn archive_attempt(&mut self) {
        if let Some(a) = self.ended_attempt() {
            self.history.push(a);
            let extra = self.history.len().saturating_sub(HISTORY_CAP);
            self.history.drain(..extra);
        }
        self.outcome = None;
    }
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// Accepts `{}` (an empty Lua table re-encoded by cjson) as an empty list.
fn lenient_vec<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either<T> {
        List(Vec<T>),
        Map(BTreeMap<String, serde_json::Value>),
    }
    match Either::<T>::deserialize(d)? {
        Either::List(v) => Ok(v),
        Either::Map(m) if m.is_empty() => Ok(Vec::new()),
        Either::Map(_) => Err(serde::de::Error::custom("expected a list")),
    }
}

impl StepRecord {
    pub fn duration_ms(&self) -> Option<u64> {
        Some(self.ended_ms?.saturating_sub(self.started_ms?))
    }
}

/// How many operator actions a process record keeps.
pub const AUDIT_CAP: usize = 20;

/// An operator action on a process (cancel, retry, retry-current-step).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub at_ms: u64,
    pub action: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Who did it: the API key's name (absent when the API is open, and in older records).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
}

/// Why a stored record could not be read.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("process record field {0:?} is missing")]
    Missing(&'static str),
    #[error("process record field {field:?} is invalid: {detail}")]
    Invalid { field: String, detail: String },
}

/// One state of a process: its meta hash's `rev` (raised by every scheduler commit) and its
/// steps hash's `steps_rev` (raised by every transition a worker commits). A commit decided
/// on a revision applies only while both are unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Revision {
    pub rev: u64,
    pub steps_rev: u64,
}

impl Revision {
    /// The first token number of a transition decided on this revision: every commit raises
    /// one of the two counters, so no two transitions of a process share it.
    pub fn token_base(&self) -> u64 {
        self.rev + self.steps_rev + 1
    }
}

/// A process's metadata and step records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessRecord {
    pub id: String,
    pub process_type: String,
    pub version: u32,
    pub status: ProcessStatus,
    pub rev: u64,
    /// The steps hash's own counter ([`field::STEPS_REV`]): transitions workers committed.
    pub steps_rev: u64,
    pub created_ms: u64,
    pub started_ms: Option<u64>,
    pub ended_ms: Option<u64>,
    pub updated_ms: Option<u64>,
    pub deadline_ms: Option<u64>,
    /// When it was paused (Paused only).
    pub paused_ms: Option<u64>,
    /// What its deadline had left when it was paused (Paused only, and only when the
    /// type's timeouts stop while paused).
    pub deadline_left_ms: Option<u64>,
    pub error: Option<String>,
    pub code: Option<String>,
    pub idempotency_key: Option<String>,
    /// The submission's tenant.
    pub tenant: Option<String>,
    pub trace: Option<String>,
    pub audit: Vec<AuditEntry>,
    pub steps: BTreeMap<String, StepRecord>,
}

/// How many meta hash fields [`ProcessRecord::parse`] reads.
const META_FIELDS: usize = 17;

/// The slot of a meta hash field [`ProcessRecord::parse`] reads.
fn meta_slot(name: &str) -> Option<usize> {
    Some(match name {
        field::TYPE => 0,
        field::VERSION => 1,
        field::STATUS => 2,
        field::REV => 3,
        field::CREATED_MS => 4,
        field::STARTED_MS => 5,
        field::ENDED_MS => 6,
        field::UPDATED_MS => 7,
        field::DEADLINE_MS => 8,
        field::PAUSED_MS => 9,
        field::DEADLINE_LEFT_MS => 10,
        field::ERROR => 11,
        field::CODE => 12,
        field::IDEMPOTENCY_KEY => 13,
        field::TENANT => 14,
        field::TRACE => 15,
        field::AUDIT => 16,
        _ => return None,
    })
}

impl ProcessRecord {
    /// From the meta hash and the steps hash. `Ok(None)` when the process does not exist.
    pub fn parse(
        id: &str,
        meta: &HashMap<String, String>,
        steps: &HashMap<String, String>,
    ) -> Result<Option<Self>, RecordError> {
        if meta.is_empty() {
            return Ok(None);
        }
        // One pass over the hash instead of a hashed lookup per field (this runs for every
        // record the scheduler decides on and every snapshot a worker begins with).
        let mut slots: [Option<&str>; META_FIELDS] = [None; META_FIELDS];
        for (k, v) in meta {
            if let Some(i) = meta_slot(k)
                && !v.is_empty()
            {
                slots[i] = Some(v.as_str());
            }
        }
        let get = |f: &'static str| meta_slot(f).and_then(|i| slots[i]);
        let req = |f: &'static str| get(f).ok_or(RecordError::Missing(f));
        fn num<T: std::str::FromStr>(
            f: &'static str,
            v: Option<&str>,
        ) -> Result<Option<T>, RecordError> {
            v.map(|s| {
                s.parse().map_err(|_| RecordError::Invalid {
                    field: f.into(),
                    detail: format!("{s:?} is not a number"),
                })
            })
            .transpose()
        }
        let status = req(field::STATUS)?
            .parse()
            .map_err(|e: crate::status::UnknownStatus| RecordError::Invalid {
                field: field::STATUS.into(),
                detail: e.to_string(),
            })?;
        let mut parsed = BTreeMap::new();
        let mut steps_rev = 0;
        for (name, raw) in steps {
            if name == field::STEPS_REV {
                steps_rev = num(field::STEPS_REV, Some(raw))?.unwrap_or(0);
                continue;
            }
            let rec: StepRecord = serde_json::from_str(raw).map_err(|e| RecordError::Invalid {
                field: format!("steps.{name}"),
                detail: e.to_string(),
            })?;
            parsed.insert(name.clone(), rec);
        }
        Ok(Some(Self {
            id: id.to_string(),
            process_type: req(field::TYPE)?.to_string(),
            version: num(field::VERSION, get(field::VERSION))?
                .ok_or(RecordError::Missing(field::VERSION))?,
            status,
            rev: num(field::REV, get(field::REV))?.unwrap_or(0),
            steps_rev,
            created_ms: num(field::CREATED_MS, get(field::CREATED_MS))?.unwrap_or(0),
            started_ms: num(field::STARTED_MS, get(field::STARTED_MS))?,
            ended_ms: num(field::ENDED_MS, get(field::ENDED_MS))?,
            updated_ms: num(field::UPDATED_MS, get(field::UPDATED_MS))?,
            deadline_ms: num(field::DEADLINE_MS, get(field::DEADLINE_MS))?,
            paused_ms: num(field::PAUSED_MS, get(field::PAUSED_MS))?,
            deadline_left_ms: num(field::DEADLINE_LEFT_MS, get(field::DEADLINE_LEFT_MS))?,
            error: get(field::ERROR).map(str::to_string),
            code: get(field::CODE).map(str::to_string),
            idempotency_key: get(field::IDEMPOTENCY_KEY).map(str::to_string),
            tenant: get(field::TENANT).map(str::to_string),
            trace: get(field::TRACE).map(str::to_string),
            audit: match get(field::AUDIT) {
                Some(raw) => serde_json::from_str(raw).map_err(|e| RecordError::Invalid {
                    field: field::AUDIT.into(),
                    detail: e.to_string(),
                })?,
                None => Vec::new(),
            },
            steps: parsed,
        }))
    }

    /// The state a decision is made on: what a commit of it checks is unchanged.
    pub fn revision(&self) -> Revision {
        Revision {
            rev: self.rev,
            steps_rev: self.steps_rev,
        }
    }

    /// When the process last changed: its meta hash's `updated_ms` (every scheduler commit),
    /// or a later transition a worker committed (which writes only step records: a step's
    /// end and its successors' queue times).
    pub fn last_change_ms(&self) -> Option<u64> {
        self.steps
            .values()
            .flat_map(|s| [s.queued_ms, s.ended_ms])
            .chain([self.updated_ms])
            .flatten()
            .max()
    }

    /// Steps that still hold the process open.
    pub fn active_steps(&self) -> impl Iterator<Item = (&String, &StepRecord)> {
        self.steps.iter().filter(|(_, s)| s.status.is_active())
    }

    pub fn duration_ms(&self, now_ms: u64) -> Option<u64> {
        let start = self.started_ms?;
        Some(self.ended_ms.unwrap_or(now_ms).saturating_sub(start))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_record_survives_cjson_shapes() {
        // What cjson writes back: floats-as-integers, `{}` for an emptied list.
        let raw = r#"{"status":"running","token":"3.1","attempt":1,"visit":1,"arrived":{},"history":{},"claimed_ms":1732780000000,"worker":"w1"}"#;
        let r: StepRecord = serde_json::from_str(raw).unwrap();
        assert_eq!(r.status, StepStatus::Running);
        assert!(r.arrived.is_empty());
        assert_eq!(r.claimed_ms, Some(1_732_780_000_000));
        let back = serde_json::to_string(&r).unwrap();
        assert!(!back.contains("arrived"), "empty lists are omitted: {back}");
    }

    #[test]
    fn parse_rejects_bad_fields() {
        let meta: HashMap<String, String> =
            [("type", "Test"), ("version", "x"), ("status", "Running")]
                .into_iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect();
        assert!(ProcessRecord::parse("p", &meta, &HashMap::new()).is_err());
        assert!(
            ProcessRecord::parse("p", &HashMap::new(), &HashMap::new())
                .unwrap()
                .is_none()
        );
    }
}

//! What travels on the streams: submissions, step jobs and scheduler events.
//!
//! Every entry is a flat list of string fields so any Redis client (and the Lua scripts)
//! can read and write it. Each type has a version field `v`; new fields are optional with a
//! default, a breaking change gets a new version number that old readers reject clearly.

use std::collections::HashMap;

pub const ENVELOPE_VERSION: u32 = 1;

/// Fields of one stream entry, in order.
pub type Fields = Vec<(String, String)>;

/// Why an entry could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("missing field {0:?}")]
    Missing(&'static str),
    #[error("field {field:?} is invalid: {detail}")]
    Invalid { field: &'static str, detail: String },
    #[error("unsupported envelope version {0}")]
    Version(u32),
    #[error("unknown event type {0:?}")]
    UnknownEvent(String),
    #[error("entry has {fields} fields (at most {max} are read)")]
    Oversized { fields: usize, max: usize },
}

/// At most this many fields of one stream entry are read, by Rust readers and by the Lua
/// scripts (every envelope has fewer than 16). A larger entry is not an envelope: it is
/// quarantined with a summary of its first fields, never read or copied whole.
pub const MAX_ENTRY_FIELDS: usize = 64;

/// Quarantine and dead-letter copies of an entry keep at most this many of its fields (then
/// `fields_total`), so a copy with its own fields stays under [`MAX_ENTRY_FIELDS`].
pub const MAX_COPIED_FIELDS: usize = MAX_ENTRY_FIELDS / 2;

/// Stream entry field names that the Lua scripts also read or write (`scripts.rs` generates
/// them into the scripts' prelude as `E_<NAME>`, so the two sides have one source).
pub mod wire {
    /// The envelope version ([`super::ENVELOPE_VERSION`]).
    pub const VERSION: &str = "v";
    /// The event type tag ([`super::event_type`]).
    pub const TYPE: &str = "t";
    pub const PROCESS_ID: &str = "pid";
    pub const STEP: &str = "step";
    pub const TOKEN: &str = "token";
    /// A step result's outcome (`complete.lua` requires it in every completion event).
    pub const OUTCOME: &str = "outcome";
    pub const ERROR: &str = "error";
    pub const CODE: &str = "code";
    /// A failed step's [`super::Failure`] (`retry`, `retry_after:<ms>`, `yield:<ms>`,
    /// `permanent`, `fatal`).
    pub const FAILURE: &str = "failure";
    /// Redis's delivery count of a dead-lettered job.
    pub const DELIVERIES: &str = "deliveries";
    /// Why a job was dead-lettered or an entry quarantined.
    pub const REASON: &str = "reason";
    /// On a dead-letter copy (`reclaim.lua`): the job entry's id and when it died (ms).
    pub const JOB_ID: &str = "job_id";
    pub const DEAD_MS: &str = "dead_ms";
    /// On a quarantine copy (`drop_entry.lua`): the stream and id of the entry set aside.
    pub const SOURCE: &str = "source";
    pub const ENTRY_ID: &str = "entry_id";
    /// On a copy that kept only [`super::MAX_COPIED_FIELDS`] fields: how many there were.
    pub const FIELDS_TOTAL: &str = "fields_total";
}

/// Read access to an entry's fields.
#[derive(Debug, Default, Clone)]
pub struct FieldMap {
    /// Each field once (a repeated field keeps its last value). A list, not a hash map: an
    /// entry has a handful of fields, and every job and event is read through here.
    map: Vec<(String, String)>,
    /// How many fields the entry has (more than `map` holds when it was capped).
    total: usize,
}

impl FieldMap {
    pub fn from_pairs<I: IntoIterator<Item = (String, String)>>(pairs: I) -> Self {
        let mut f = Self::default();
        for (k, v) in pairs {
            f.total += 1;
            f.insert(k, v);
        }
        f
    }

    /// Sets `k` to `v`, replacing an earlier value of `k`.
    fn insert(&mut self, k: String, v: String) {
        match self.map.iter_mut().find(|(name, _)| *name == k) {
            Some((_, old)) => *old = v,
            None => self.map.push((k, v)),
        }
    }

    /// From the flat `[field, value, …]` list of a stream entry as Redis sends it: reads at
    /// most [`MAX_ENTRY_FIELDS`] fields and counts the rest (binary-safe: non-UTF-8 text is
    /// replaced). Every `from_fields` refuses an entry that had more.
    pub fn from_flat(values: &[redis::Value]) -> Self {
        let text = |v: &redis::Value| match v {
            redis::Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
            redis::Value::SimpleString(s) => Some(s.clone()),
            redis::Value::Int(i) => Some(i.to_string()),
            _ => None,
        };
        let mut f = Self {
            map: Vec::with_capacity((values.len() / 2).min(MAX_ENTRY_FIELDS)),
            total: values.len() / 2,
        };
        for kv in values.chunks_exact(2).take(MAX_ENTRY_FIELDS) {
            if let (Some(k), Some(v)) = (text(&kv[0]), text(&kv[1])) {
                f.insert(k, v);
            }
        }
        f
    }

    /// From an already parsed entry (binary-safe: non-UTF-8 values are replaced).
    pub fn from_redis(map: &HashMap<String, redis::Value>) -> Self {
        let flat: Vec<redis::Value> = map
            .iter()
            .flat_map(|(k, v)| [redis::Value::SimpleString(k.clone()), v.clone()])
            .collect();
        Self::from_flat(&flat)
    }

    /// The fields read, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.map.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// How many fields the entry has (read or not).
    pub fn total(&self) -> usize {
        self.total
    }

    pub fn get(&self, f: &str) -> Option<&str> {
        self.map
            .iter()
            .find(|(k, _)| k == f)
            .map(|(_, v)| v.as_str())
            .filter(|s| !s.is_empty())
    }

    pub fn req(&self, f: &'static str) -> Result<&str, EnvelopeError> {
        self.get(f).ok_or(EnvelopeError::Missing(f))
    }

    pub fn num<T: std::str::FromStr>(&self, f: &'static str) -> Result<Option<T>, EnvelopeError> {
        match self.get(f) {
            None => Ok(None),
            Some(s) => s.parse().map(Some).map_err(|_| EnvelopeError::Invalid {
                field: f,
                detail: format!("{s:?} is not a number"),
            }),
        }
    }

    /// Checked first by every `from_fields`: the size cap, then the envelope version.
    fn version(&self) -> Result<(), EnvelopeError> {
        if self.total > MAX_ENTRY_FIELDS {
            return Err(EnvelopeError::Oversized {
                fields: self.total,
                max: MAX_ENTRY_FIELDS,
            });
        }
        match self.num::<u32>(wire::VERSION)?.unwrap_or(ENVELOPE_VERSION) {
            ENVELOPE_VERSION => Ok(()),
            other => Err(EnvelopeError::Version(other)),
        }
    }
}

fn push(out: &mut Fields, k: &str, v: impl ToString) {
    out.push((k.to_string(), v.to_string()));
}

fn push_opt<T: std::fmt::Display>(out: &mut Fields, k: &str, v: &Option<T>) {
    if let Some(v) = v {
        push(out, k, v);
    }
}

/// [`push`] of a string value: a plain copy, not a `Display` round (every field of every
/// job and event goes through here).
fn push_str(out: &mut Fields, k: &str, v: &str) {
    out.push((k.to_owned(), v.to_owned()));
}

fn push_opt_str(out: &mut Fields, k: &str, v: &Option<String>) {
    if let Some(v) = v {
        push_str(out, k, v);
    }
}

/// W3C trace context carried from the submission through every job of a process.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TraceContext {
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
}

/// `true` for a W3C `traceparent` of version 00: `00-<32 hex>-<16 hex>-<2 hex>` (55
/// characters, lowercase hex, trace and parent ids not all zeros).
pub fn valid_traceparent(s: &str) -> bool {
    let hex = |p: &str, n: usize| {
        p.len() == n
            && p.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let nonzero = |p: &str| p.bytes().any(|b| b != b'0');
    let parts: Vec<&str> = s.split('-').collect();
    s.len() == 55
        && matches!(parts[..], [v, t, p, f] if v == "00" && hex(t, 32) && nonzero(t)
            && hex(p, 16) && nonzero(p) && hex(f, 2))
}

/// Longest `tracestate` kept (the W3C limit is 512 characters).
pub const MAX_TRACESTATE_LEN: usize = 512;

impl TraceContext {
    /// The context a caller sent, without what is not W3C: an invalid `traceparent` is
    /// dropped (with its `tracestate`) rather than copied into every job of the process.
    pub fn from_caller(traceparent: Option<&str>, tracestate: Option<&str>) -> Self {
        let traceparent = traceparent
            .map(str::trim)
            .filter(|t| valid_traceparent(t))
            .map(str::to_string);
        let tracestate = tracestate
            .filter(|_| traceparent.is_some())
            .filter(|t| t.len() <= MAX_TRACESTATE_LEN)
            .map(str::to_string);
        Self {
            traceparent,
            tracestate,
        }
    }
}

/// One step job on the job stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobEnvelope {
    pub process_id: String,
    pub step: String,
    /// Fences this job: the step record holds the token of the one job allowed to run it.
    pub token: String,
    /// Application-level attempt (1-based): retries after handler errors.
    pub attempt: u32,
    /// How many times the step was entered in this process (loops).
    pub visit: u32,
    /// Server time (ms) when the job was enqueued.
    pub enqueued_ms: u64,
    pub trace: TraceContext,
}

impl JobEnvelope {
    pub fn to_fields(&self) -> Fields {
        let mut f = Fields::with_capacity(9);
        push(&mut f, wire::VERSION, ENVELOPE_VERSION);
        push_str(&mut f, wire::PROCESS_ID, &self.process_id);
        push_str(&mut f, wire::STEP, &self.step);
        push_str(&mut f, wire::TOKEN, &self.token);
        push(&mut f, "attempt", self.attempt);
        push(&mut f, "visit", self.visit);
        push(&mut f, "enq_ms", self.enqueued_ms);
        push_opt_str(&mut f, "tp", &self.trace.traceparent);
        push_opt_str(&mut f, "ts", &self.trace.tracestate);
        f
    }

    pub fn from_fields(f: &FieldMap) -> Result<Self, EnvelopeError> {
        f.version()?;
        Ok(Self {
            process_id: f.req(wire::PROCESS_ID)?.to_string(),
            step: f.req(wire::STEP)?.to_string(),
            token: f.req(wire::TOKEN)?.to_string(),
            attempt: f.num("attempt")?.unwrap_or(1),
            visit: f.num("visit")?.unwrap_or(1),
            enqueued_ms: f.num("enq_ms")?.unwrap_or(0),
            trace: TraceContext {
                traceparent: f.get("tp").map(str::to_string),
                tracestate: f.get("ts").map(str::to_string),
            },
        })
    }
}

/// What a worker reports when a step ends.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StepResult {
    pub outcome: String,
    pub error: Option<String>,
    pub code: Option<String>,
    /// What the engine does about a `failed` outcome; `None` on success. A failed result
    /// without one is [`Failure::Permanent`] (what a report without any flags always meant).
    pub failure: Option<Failure>,
}

/// Why a step failed, typed by what the engine must do next. On the wire it is the one
/// event field `failure` (see [`Failure::as_wire`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// May succeed on another attempt: retried under the step's retry policy.
    Retryable,
    /// May succeed, but not before this many milliseconds (a provider's Retry-After):
    /// retried under the policy, waiting at least that long.
    RetryAfter(u64),
    /// The step did not run its work but waited for a shared resource (LLM rate-limit
    /// budget, a paused provider): re-queued after this many milliseconds without using an
    /// attempt of its retry policy (up to the engine's yield cap; past it, retried like
    /// [`Failure::RetryAfter`]).
    Yield(u64),
    /// Will never succeed: no retry; the `failed` route or a Failed process.
    Permanent,
    /// Fail the whole process whatever the routing says (corrupt state, missing handler).
    Fatal,
}

impl Failure {
    /// The `failure` field's value: `retry`, `retry_after:<ms>`, `yield:<ms>`, `permanent`
    /// or `fatal`.
    pub fn as_wire(&self) -> String {
        match self {
            Failure::Retryable => "retry".into(),
            Failure::RetryAfter(ms) => format!("retry_after:{ms}"),
            Failure::Yield(ms) => format!("yield:{ms}"),
            Failure::Permanent => "permanent".into(),
            Failure::Fatal => "fatal".into(),
        }
    }

    /// Reads a `failure` field written by [`Failure::as_wire`].
    pub fn parse(s: &str) -> Result<Self, EnvelopeError> {
        let invalid = || EnvelopeError::Invalid {
            field: wire::FAILURE,
            detail: format!("{s:?} is not retry, retry_after:<ms>, yield:<ms>, permanent or fatal"),
        };
        let ms = |v: &str| v.parse::<u64>().map_err(|_| invalid());
        match s.split_once(':') {
            None => match s {
                "retry" => Ok(Failure::Retryable),
                "permanent" => Ok(Failure::Permanent),
                "fatal" => Ok(Failure::Fatal),
                _ => Err(invalid()),
            },
            Some(("retry_after", v)) => Ok(Failure::RetryAfter(ms(v)?)),
            Some(("yield", v)) => Ok(Failure::Yield(ms(v)?)),
            Some(_) => Err(invalid()),
        }
    }

    /// The failure an older worker meant with its separate fields (`retryable`, `fatal`,
    /// `yielded` flags and `retry_after_ms`), decided as the engine decided on them: fatal
    /// first, then yield, then retry (with its delay, if any). Older workers always set
    /// `retryable` with `yielded`.
    pub fn from_legacy(
        retryable: bool,
        retry_after_ms: Option<u64>,
        fatal: bool,
        yielded: bool,
    ) -> Self {
        match (fatal, yielded, retryable, retry_after_ms) {
            (true, ..) => Failure::Fatal,
            (false, true, _, ms) => Failure::Yield(ms.unwrap_or(0)),
            (false, false, true, Some(ms)) => Failure::RetryAfter(ms),
            (false, false, true, None) => Failure::Retryable,
            (false, false, false, _) => Failure::Permanent,
        }
    }

    /// Whether the retry policy may run the step again.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Failure::Retryable | Failure::RetryAfter(_) | Failure::Yield(_)
        )
    }

    /// The least delay the step asked for before it runs again, if any.
    pub fn retry_after_ms(&self) -> Option<u64> {
        match self {
            Failure::RetryAfter(ms) | Failure::Yield(ms) => Some(*ms),
            _ => None,
        }
    }
}

/// An entry of the scheduler's event stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A worker committed a step's result.
    Step {
        process_id: String,
        step: String,
        token: String,
        result: StepResult,
    },
    /// A job exhausted its deliveries and went to the dead-letter stream.
    DeadLetter {
        process_id: String,
        step: String,
        token: String,
        deliveries: u64,
        reason: String,
    },
    /// A durable timer (the `sleep` kind) fired.
    Timer {
        process_id: String,
        step: String,
        token: String,
    },
    /// A waiting step (approval) hit its timeout.
    StepTimeout {
        process_id: String,
        step: String,
        token: String,
    },
    /// The process hit its deadline.
    ProcessTimeout { process_id: String },
    /// An external signal (approval decision) arrived.
    Signal {
        process_id: String,
        name: String,
        value: String,
        /// Who sent it: the API key's name (absent when the API is open); recorded in the
        /// process's audit trail.
        by: Option<String>,
    },
}

impl Event {
    /// What a worker reports (a step's result, a dead-lettered job): the only events taken
    /// from the workers' results stream.
    pub fn is_worker_report(&self) -> bool {
        matches!(self, Event::Step { .. } | Event::DeadLetter { .. })
    }
}

/// Event type tags (`t` field); the Lua scripts write `step` and `dead_letter`.
pub mod event_type {
    pub const STEP: &str = "step";
    pub const DEAD_LETTER: &str = "dead_letter";
    pub const TIMER: &str = "timer";
    pub const STEP_TIMEOUT: &str = "step_timeout";
    pub const PROCESS_TIMEOUT: &str = "process_timeout";
    pub const SIGNAL: &str = "signal";
}

impl Event {
    pub fn process_id(&self) -> &str {
        match self {
            Event::Step { process_id, .. }
            | Event::DeadLetter { process_id, .. }
            | Event::Timer { process_id, .. }
            | Event::StepTimeout { process_id, .. }
            | Event::ProcessTimeout { process_id }
            | Event::Signal { process_id, .. } => process_id,
        }
    }

    pub fn to_fields(&self) -> Fields {
        let mut f = Fields::new();
        push(&mut f, wire::VERSION, ENVELOPE_VERSION);
        match self {
            Event::Step {
                process_id,
                step,
                token,
                result,
            } => {
                push_str(&mut f, wire::TYPE, event_type::STEP);
                push_str(&mut f, wire::PROCESS_ID, process_id);
                push_str(&mut f, wire::STEP, step);
                push_str(&mut f, wire::TOKEN, token);
                push_str(&mut f, wire::OUTCOME, &result.outcome);
                push_opt_str(&mut f, wire::ERROR, &result.error);
                push_opt_str(&mut f, wire::CODE, &result.code);
                push_opt(&mut f, wire::FAILURE, &result.failure.map(|x| x.as_wire()));
            }
            Event::DeadLetter {
                process_id,
                step,
                token,
                deliveries,
                reason,
            } => {
                push_str(&mut f, wire::TYPE, event_type::DEAD_LETTER);
                push_str(&mut f, wire::PROCESS_ID, process_id);
                push_str(&mut f, wire::STEP, step);
                push_str(&mut f, wire::TOKEN, token);
                push(&mut f, wire::DELIVERIES, deliveries);
                push_str(&mut f, wire::REASON, reason);
            }
            Event::Timer {
                process_id,
                step,
                token,
            }
            | Event::StepTimeout {
                process_id,
                step,
                token,
            } => {
                let t = if matches!(self, Event::Timer { .. }) {
                    event_type::TIMER
                } else {
                    event_type::STEP_TIMEOUT
                };
                push_str(&mut f, wire::TYPE, t);
                push_str(&mut f, wire::PROCESS_ID, process_id);
                push_str(&mut f, wire::STEP, step);
                push_str(&mut f, wire::TOKEN, token);
            }
            Event::ProcessTimeout { process_id } => {
                push_str(&mut f, wire::TYPE, event_type::PROCESS_TIMEOUT);
                push_str(&mut f, wire::PROCESS_ID, process_id);
            }
            Event::Signal {
                process_id,
                name,
                value,
                by,
            } => {
                push_str(&mut f, wire::TYPE, event_type::SIGNAL);
                push_str(&mut f, wire::PROCESS_ID, process_id);
                push_str(&mut f, "name", name);
                push_str(&mut f, "value", value);
                if let Some(by) = by {
                    push_str(&mut f, "by", by);
                }
            }
        }
        f
    }

    pub fn from_fields(f: &FieldMap) -> Result<Self, EnvelopeError> {
        f.version()?;
        let pid = || f.req(wire::PROCESS_ID).map(str::to_string);
        let step = || f.req(wire::STEP).map(str::to_string);
        let token = || f.req(wire::TOKEN).map(str::to_string);
        Ok(match f.req(wire::TYPE)? {
            event_type::STEP => {
                let outcome = f.req(wire::OUTCOME)?;
                Event::Step {
                    process_id: pid()?,
                    step: step()?,
                    token: token()?,
                    result: StepResult {
                        outcome: outcome.to_string(),
                        error: f.get(wire::ERROR).map(str::to_string),
                        code: f.get(wire::CODE).map(str::to_string),
                        failure: step_failure(f, outcome == crate::status::outcome::FAILED)?,
                    },
                }
            }
            event_type::DEAD_LETTER => Event::DeadLetter {
                process_id: pid()?,
                step: step()?,
                token: token()?,
                deliveries: f.num(wire::DELIVERIES)?.unwrap_or(0),
                reason: f.get(wire::REASON).unwrap_or("dead-lettered").to_string(),
            },
            event_type::TIMER => Event::Timer {
                process_id: pid()?,
                step: step()?,
                token: token()?,
            },
            event_type::STEP_TIMEOUT => Event::StepTimeout {
                process_id: pid()?,
                step: step()?,
                token: token()?,
            },
            event_type::PROCESS_TIMEOUT => Event::ProcessTimeout { process_id: pid()? },
            event_type::SIGNAL => Event::Signal {
                process_id: pid()?,
                name: f.req("name")?.to_string(),
                value: f.get("value").unwrap_or("").to_string(),
                by: f.get("by").map(str::to_string),
            },
            other => return Err(EnvelopeError::UnknownEvent(other.to_string())),
        })
    }
}

/// A step event's failure: the `failure` field, or from an older worker (rolling update:
/// schedulers are updated first) its `retryable`/`retry_after_ms`/`fatal`/`yielded` fields,
/// which it wrote on every result (read only when the outcome is `failed`).
fn step_failure(f: &FieldMap, failed: bool) -> Result<Option<Failure>, EnvelopeError> {
    if let Some(s) = f.get(wire::FAILURE) {
        return Failure::parse(s).map(Some);
    }
    const LEGACY: [&str; 4] = ["retryable", "retry_after_ms", "fatal", "yielded"];
    if !failed || LEGACY.iter().all(|name| f.get(name).is_none()) {
        return Ok(None);
    }
    let flag = |name: &'static str| -> Result<bool, EnvelopeError> {
        Ok(f.num::<u8>(name)?.unwrap_or(0) != 0)
    };
    Ok(Some(Failure::from_legacy(
        flag("retryable")?,
        f.num("retry_after_ms")?,
        flag("fatal")?,
        flag("yielded")?,
    )))
}

/// A submission written to the submit stream by any Redis client:
///
/// `XADD honua:v2:{0}:submit * type Test input '{"k":1}' id <uuid> idempotency_key <key>`
///
/// Only `type` is required. `input` is a JSON object; `id` (a client-chosen process id,
/// `[A-Za-z0-9_-]{1,64}`) lets the client follow the process without a lookup;
/// `idempotency_key` makes resubmission return the same process; `tenant` (the same
/// characters) names whom the process runs for: stored on the process, it picks the
/// process's fair share of each LLM bucket with tenant shares.
#[derive(Debug, Clone, PartialEq)]
pub struct Submission {
    pub process_type: String,
    pub version: Option<u32>,
    pub input: serde_json::Value,
    pub id: Option<String>,
    pub idempotency_key: Option<String>,
    pub tenant: Option<String>,
    pub trace: TraceContext,
}

/// Process ids and idempotency keys: what a key segment may contain.
pub fn valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl Submission {
    pub fn to_fields(&self) -> Fields {
        let mut f = Fields::new();
        push(&mut f, wire::VERSION, ENVELOPE_VERSION);
        push_str(&mut f, "type", &self.process_type);
        push_opt(&mut f, "version", &self.version);
        push(&mut f, "input", &self.input);
        push_opt_str(&mut f, "id", &self.id);
        push_opt_str(&mut f, "idempotency_key", &self.idempotency_key);
        push_opt_str(&mut f, "tenant", &self.tenant);
        push_opt_str(&mut f, "tp", &self.trace.traceparent);
        push_opt_str(&mut f, "ts", &self.trace.tracestate);
        f
    }

    pub fn from_fields(f: &FieldMap) -> Result<Self, EnvelopeError> {
        f.version()?;
        let input = match f.get("input") {
            None => serde_json::Value::Object(Default::default()),
            Some(s) => serde_json::from_str(s).map_err(|e| EnvelopeError::Invalid {
                field: "input",
                detail: format!("not JSON: {e}"),
            })?,
        };
        if !input.is_object() {
            return Err(EnvelopeError::Invalid {
                field: "input",
                detail: "must be a JSON object".into(),
            });
        }
        let checked = |field: &'static str| -> Result<Option<String>, EnvelopeError> {
            match f.get(field) {
                None => Ok(None),
                Some(s) if valid_id(s) => Ok(Some(s.to_string())),
                Some(_) => Err(EnvelopeError::Invalid {
                    field,
                    detail: "must be 1-64 characters of [A-Za-z0-9_-]".into(),
                }),
            }
        };
        Ok(Self {
            process_type: f.req("type")?.to_string(),
            version: f.num("version")?,
            input,
            id: checked("id")?,
            idempotency_key: checked("idempotency_key")?,
            tenant: checked("tenant")?,
            trace: TraceContext::from_caller(f.get("tp"), f.get("ts")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(f: Fields) -> FieldMap {
        FieldMap::from_pairs(f)
    }

    #[test]
    fn entries_are_read_up_to_the_field_cap() {
        use redis::Value::BulkString as B;
        let flat = |n: usize| -> Vec<redis::Value> {
            (0..n)
                .flat_map(|i| [B(format!("f{i}").into()), B(format!("{i}").into())])
                .collect()
        };
        let small = FieldMap::from_flat(&flat(MAX_ENTRY_FIELDS));
        assert_eq!(small.total(), MAX_ENTRY_FIELDS);
        assert_eq!(small.get("f63"), Some("63"));
        let big = FieldMap::from_flat(&flat(5000));
        assert_eq!(big.total(), 5000);
        assert_eq!(big.map.len(), MAX_ENTRY_FIELDS, "the rest is not read");
        let err = JobEnvelope::from_fields(&big).unwrap_err();
        assert_eq!(
            err,
            EnvelopeError::Oversized {
                fields: 5000,
                max: MAX_ENTRY_FIELDS
            }
        );
        assert!(Submission::from_fields(&big).is_err());
        assert!(Event::from_fields(&big).is_err());
    }

    #[test]
    fn only_w3c_traceparents_are_kept() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert!(valid_traceparent(good));
        let long = format!("{good}{}", "0".repeat(60_000));
        for bad in [
            "",
            "00-abc-def-01",
            long.as_str(),
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0x",
            "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
        ] {
            assert!(!valid_traceparent(bad), "{bad:.80}");
            assert_eq!(
                TraceContext::from_caller(Some(bad), Some("a=b")),
                TraceContext::default()
            );
        }
        let t = TraceContext::from_caller(Some(good), Some("congo=t61rcWkgMzE"));
        assert_eq!(t.traceparent.as_deref(), Some(good));
        assert_eq!(t.tracestate.as_deref(), Some("congo=t61rcWkgMzE"));
        let state = "x".repeat(513);
        let t = TraceContext::from_caller(Some(good), Some(&state));
        assert_eq!(t.tracestate, None);
        // The stream intake drops what the gateway drops.
        let mut f = Submission {
            process_type: "T".into(),
            version: None,
            input: serde_json::json!({}),
            id: None,
            idempotency_key: None,
            tenant: None,
            trace: TraceContext {
                traceparent: Some(long.clone()),
                tracestate: None,
            },
        }
        .to_fields();
        assert_eq!(
            Submission::from_fields(&map(f.clone())).unwrap().trace,
            TraceContext::default()
        );
        f.retain(|(k, _)| k != "tp");
        assert_eq!(
            Submission::from_fields(&map(f)).unwrap().trace,
            TraceContext::default()
        );
    }

    #[test]
    fn job_round_trip() {
        let j = JobEnvelope {
            process_id: "p".into(),
            step: "S".into(),
            token: "7".into(),
            attempt: 2,
            visit: 1,
            enqueued_ms: 123,
            trace: TraceContext {
                traceparent: Some("00-abc-def-01".into()),
                tracestate: None,
            },
        };
        assert_eq!(JobEnvelope::from_fields(&map(j.to_fields())).unwrap(), j);
    }

    #[test]
    fn events_round_trip() {
        let events = vec![
            Event::Step {
                process_id: "p".into(),
                step: "S".into(),
                token: "1".into(),
                result: StepResult {
                    outcome: "failed".into(),
                    error: Some("boom".into()),
                    code: Some("x".into()),
                    failure: Some(Failure::Yield(50)),
                },
            },
            Event::DeadLetter {
                process_id: "p".into(),
                step: "S".into(),
                token: "1".into(),
                deliveries: 5,
                reason: "r".into(),
            },
            Event::Timer {
                process_id: "p".into(),
                step: "S".into(),
                token: "2".into(),
            },
            Event::StepTimeout {
                process_id: "p".into(),
                step: "S".into(),
                token: "2".into(),
            },
            Event::ProcessTimeout {
                process_id: "p".into(),
            },
            Event::Signal {
                process_id: "p".into(),
                name: "review".into(),
                value: "approve".into(),
                by: None,
            },
            Event::Signal {
                process_id: "p".into(),
                name: "review".into(),
                value: "reject".into(),
                by: Some("oncall".into()),
            },
        ];
        for e in events {
            assert_eq!(Event::from_fields(&map(e.to_fields())).unwrap(), e);
        }
    }

    #[test]
    fn every_failure_round_trips_through_its_one_field() {
        for failure in [
            Failure::Retryable,
            Failure::RetryAfter(1_500),
            Failure::Yield(0),
            Failure::Yield(2_000),
            Failure::Permanent,
            Failure::Fatal,
        ] {
            assert_eq!(Failure::parse(&failure.as_wire()), Ok(failure));
            let e = Event::Step {
                process_id: "p".into(),
                step: "S".into(),
                token: "1".into(),
                result: StepResult {
                    outcome: "failed".into(),
                    failure: Some(failure),
                    ..Default::default()
                },
            };
            let fields = e.to_fields();
            let names: Vec<&str> = fields.iter().map(|(k, _)| k.as_str()).collect();
            for legacy in ["retryable", "retry_after_ms", "fatal", "yielded"] {
                assert!(!names.contains(&legacy), "{legacy} is no longer written");
            }
            assert_eq!(Event::from_fields(&map(fields)).unwrap(), e);
        }
        for bad in [
            "",
            "retry:5",
            "yield",
            "yield:",
            "yield:-1",
            "retry_after:x",
            "Fatal",
        ] {
            assert!(
                matches!(
                    Failure::parse(bad),
                    Err(EnvelopeError::Invalid {
                        field: "failure",
                        ..
                    })
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_step_event_from_an_older_worker_reads_as_the_same_failure() {
        let event_with = |outcome: &str, extra: &[(&str, &str)]| {
            let mut f: Fields = [
                ("t", "step"),
                ("pid", "p"),
                ("step", "S"),
                ("token", "1"),
                ("outcome", outcome),
            ]
            .iter()
            .chain(extra)
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
            f.insert(0, ("v".into(), ENVELOPE_VERSION.to_string()));
            match Event::from_fields(&map(f)).unwrap() {
                Event::Step { result, .. } => result.failure,
                other => panic!("not a step event: {other:?}"),
            }
        };
        let event = |extra: &[(&str, &str)]| event_with("failed", extra);
        // What older workers wrote for each kind of failure.
        let cases: [(&[(&str, &str)], Failure); 6] = [
            (&[("retryable", "1"), ("fatal", "0")], Failure::Retryable),
            (
                &[
                    ("retryable", "1"),
                    ("retry_after_ms", "700"),
                    ("fatal", "0"),
                ],
                Failure::RetryAfter(700),
            ),
            (
                &[
                    ("retryable", "1"),
                    ("retry_after_ms", "2000"),
                    ("fatal", "0"),
                    ("yielded", "1"),
                ],
                Failure::Yield(2_000),
            ),
            (&[("retryable", "0"), ("fatal", "0")], Failure::Permanent),
            (&[("retryable", "0"), ("fatal", "1")], Failure::Fatal),
            // A new field wins over old ones.
            (&[("retryable", "1"), ("failure", "fatal")], Failure::Fatal),
        ];
        for (fields, want) in cases {
            assert_eq!(event(fields), Some(want), "{fields:?}");
        }
        assert_eq!(event(&[]), None);
        // An older worker's success carried the flags too: no failure.
        assert_eq!(
            event_with("ok", &[("retryable", "0"), ("fatal", "0")]),
            None
        );
        assert!(matches!(
            Failure::from_legacy(true, None, false, true),
            Failure::Yield(0)
        ));
    }

    #[test]
    fn bad_entries_are_typed_errors() {
        let f = map(vec![("t".into(), "bogus".into())]);
        assert!(matches!(
            Event::from_fields(&f),
            Err(EnvelopeError::UnknownEvent(_))
        ));
        let f = map(vec![("v".into(), "9".into()), ("t".into(), "timer".into())]);
        assert_eq!(Event::from_fields(&f), Err(EnvelopeError::Version(9)));
        let f = map(vec![
            ("type".into(), "Test".into()),
            ("input".into(), "[1]".into()),
        ]);
        assert!(matches!(
            Submission::from_fields(&f),
            Err(EnvelopeError::Invalid { field: "input", .. })
        ));
        let f = map(vec![("input".into(), "{}".into())]);
        assert_eq!(
            Submission::from_fields(&f),
            Err(EnvelopeError::Missing("type"))
        );
        let f = map(vec![
            ("type".into(), "T".into()),
            ("id".into(), "a:b".into()),
        ]);
        assert!(Submission::from_fields(&f).is_err());
    }

    #[test]
    fn minimal_submission_defaults() {
        let f = map(vec![("type".into(), "Test".into())]);
        let s = Submission::from_fields(&f).unwrap();
        assert_eq!(s.input, serde_json::json!({}));
        assert_eq!(s.id, None);
    }
}

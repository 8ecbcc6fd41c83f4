//! The Lua transitions (`shared/lua/*.lua`, one per atomic transition) as one Redis Functions
//! library, and the typed handle that calls them with `FCALL`.
//!
//! The library is generated: a prelude of constants from the Rust definitions, the shared
//! helpers of `prelude.lua`, then each script body registered as a function
//! (`redis.register_function{function_name = ..., callback = function(KEYS, ARGV) <body> end}`).
//! Library and function names carry a hash of that text (`honua_<hash8>`,
//! `honua_<hash8>_begin`), so two versions of the code coexist on one server during a rolling
//! update and a name always means the same code.
//!
//! Why Functions and not `EVAL`: a Redis user allowed `EVAL`/`EVALSHA` (or `SCRIPT LOAD`) can
//! run any Lua, e.g. a busy loop that blocks the server for everyone. With Functions, the
//! service users get `FCALL` only; loading code (`FUNCTION LOAD`) is for the scheduler and the
//! admin. Functions are also persisted (RDB/AOF) and replicated, so a restarted or failed-over
//! server still has them.
//!
//! Who loads: [`Library::ensure`] runs `FUNCTION LOAD` when `FUNCTION LIST` lacks this
//! version (the scheduler at start; any caller after an error of a missing function). A user
//! refused `FUNCTION LOAD` (the workers) gets [`StoreError::FunctionsNotLoaded`], which is
//! retryable: it waits for the scheduler.

use crate::engine::LUA_EVENT_TYPES;
use crate::envelope::{ENVELOPE_VERSION, wire};
use crate::keys::field;
use crate::status::{ProcessStatus, StepStatus, outcome};
use crate::store::StoreError;
use redis::aio::ConnectionLike;
use redis::{ErrorKind, FromRedisValue, RedisError, ServerErrorKind, ToRedisArgs, Value};
use sha2::{Digest, Sha256};
use std::sync::OnceLock;

const PRELUDE: &str = include_str!("../lua/prelude.lua");

fn constants() -> String {
    let mut s = String::new();
    let mut c = |name: &str, value: &str| {
        s.push_str(&format!("local {name} = {value:?}\n"));
    };
    c("PS_PENDING", ProcessStatus::Pending.as_str());
    c("PS_RUNNING", ProcessStatus::Running.as_str());
    c("PS_WAITING", ProcessStatus::WaitingForApproval.as_str());
    c("PS_PAUSED", ProcessStatus::Paused.as_str());
    for st in StepStatus::ALL {
        c(
            &format!("SS_{}", st.as_str().to_ascii_uppercase()),
            st.as_str(),
        );
    }
    c("F_STATUS", field::STATUS);
    c("F_TYPE", field::TYPE);
    c("F_VERSION", field::VERSION);
    c("F_REV", field::REV);
    c("F_STEPS_REV", field::STEPS_REV);
    c("F_IDEM", field::IDEMPOTENCY_KEY);
    c("F_TENANT", field::TENANT);
    c("F_TRACE", field::TRACE);
    c("F_OUTPUT_PREFIX", field::OUTPUT_PREFIX);
    c("F_CHECKPOINT_PREFIX", field::CHECKPOINT_PREFIX);
    c("OUTCOME_FAILED", outcome::FAILED);
    for (name, value) in [
        ("VERSION", wire::VERSION),
        ("TYPE", wire::TYPE),
        ("PROCESS_ID", wire::PROCESS_ID),
        ("STEP", wire::STEP),
        ("TOKEN", wire::TOKEN),
        ("OUTCOME", wire::OUTCOME),
        ("ERROR", wire::ERROR),
        ("CODE", wire::CODE),
        ("DELIVERIES", wire::DELIVERIES),
        ("REASON", wire::REASON),
        ("JOB_ID", wire::JOB_ID),
        ("DEAD_MS", wire::DEAD_MS),
        ("SOURCE", wire::SOURCE),
        ("ENTRY_ID", wire::ENTRY_ID),
        ("FIELDS_TOTAL", wire::FIELDS_TOTAL),
    ] {
        c(&format!("E_{name}"), value);
    }
    c("ENVELOPE_VERSION", &ENVELOPE_VERSION.to_string());
    // The event types a script may write: only these have `EV_` names.
    for t in LUA_EVENT_TYPES {
        c(&format!("EV_{}", t.to_ascii_uppercase()), t);
    }
    for (name, n) in [
        ("MAX_ENTRY_FIELDS", crate::envelope::MAX_ENTRY_FIELDS),
        ("MAX_COPIED_FIELDS", crate::envelope::MAX_COPIED_FIELDS),
    ] {
        s.push_str(&format!("local {name} = {n}\n"));
    }
    s
}

/// The sources, by name, for tests and tooling.
pub const SOURCES: &[(&str, &str)] = &[
    ("begin", include_str!("../lua/begin.lua")),
    ("heartbeat", include_str!("../lua/heartbeat.lua")),
    ("checkpoint", include_str!("../lua/checkpoint.lua")),
    ("complete", include_str!("../lua/complete.lua")),
    ("release", include_str!("../lua/release.lua")),
    ("reclaim", include_str!("../lua/reclaim.lua")),
    ("promote", include_str!("../lua/promote.lua")),
    ("commit", include_str!("../lua/commit.lua")),
    ("drop_entry", include_str!("../lua/drop_entry.lua")),
    (
        "retire_consumer",
        include_str!("../lua/retire_consumer.lua"),
    ),
    ("purge", include_str!("../lua/purge.lua")),
    ("delete", include_str!("../lua/delete.lua")),
    ("llm_limit", include_str!("../lua/llm_limit.lua")),
    ("llm_budget", include_str!("../lua/llm_budget.lua")),
    ("trim", include_str!("../lua/trim.lua")),
];

/// The generated library, built once per process.
pub struct Library {
    name: String,
    text: String,
}

impl Library {
    pub fn get() -> &'static Library {
        static LIBRARY: OnceLock<Library> = OnceLock::new();
        LIBRARY.get_or_init(Library::build)
    }

    fn build() -> Library {
        const NAME: &str = "@library@";
        let mut text = format!("#!lua name={NAME}\n{}{PRELUDE}\n", constants());
        for (script, body) in SOURCES {
            text.push_str(&format!(
                "redis.register_function{{function_name = '{NAME}_{script}', callback = function(KEYS, ARGV)\n{body}\nend}}\n"
            ));
        }
        let digest = Sha256::digest(text.as_bytes());
        let hash: String = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
        let name = format!("honua_{hash}");
        Library {
            text: text.replace(NAME, &name),
            name,
        }
    }

    /// `honua_<hash8>`: changes whenever any script, the prelude or a constant changes.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The text sent with `FUNCTION LOAD`.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The registered name of one script's function.
    pub fn function_name(&self, script: &str) -> String {
        format!("{}_{script}", self.name)
    }

    /// Whether this version of the library is on the server (`FUNCTION LIST`).
    pub async fn is_loaded(&self, conn: &mut impl ConnectionLike) -> Result<bool, StoreError> {
        let libs: Vec<std::collections::HashMap<String, Value>> = redis::cmd("FUNCTION")
            .arg("LIST")
            .arg("LIBRARYNAME")
            .arg(&self.name)
            .query_async(conn)
            .await?;
        Ok(libs.iter().any(|l| match l.get("library_name") {
            Some(Value::BulkString(b)) => b.as_slice() == self.name.as_bytes(),
            Some(Value::SimpleString(s)) => *s == self.name,
            _ => false,
        }))
    }

    /// Loads the library unless this version is there already. Returns true when it was
    /// missing and is now loaded; [`StoreError::FunctionsNotLoaded`] when it is missing and
    /// this user may not load it (a worker: the scheduler loads it at start).
    pub async fn ensure(&self, conn: &mut impl ConnectionLike) -> Result<bool, StoreError> {
        if self.is_loaded(conn).await? {
            return Ok(false);
        }
        let r: redis::RedisResult<String> = redis::cmd("FUNCTION")
            .arg("LOAD")
            .arg(&self.text)
            .query_async(conn)
            .await;
        match r {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoPerm) => {
                Err(StoreError::FunctionsNotLoaded {
                    library: self.name.clone(),
                })
            }
            // Another caller loaded the same library meanwhile (same name, same code).
            Err(e) => match self.is_loaded(conn).await? {
                true => Ok(true),
                false => Err(e.into()),
            },
        }
    }
}

/// One function of the library, called like a `redis::Script`:
/// `f.key(k).arg(a).invoke_async(&mut conn)` or `prepare_invoke()` to add in a loop.
pub struct Function {
    name: String,
}

impl Function {
    fn new(script: &str) -> Self {
        assert!(
            SOURCES.iter().any(|(n, _)| *n == script),
            "no script named {script}"
        );
        Function {
            name: Library::get().function_name(script),
        }
    }

    /// The registered name (`honua_<hash8>_<script>`).
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn prepare_invoke(&self) -> Invocation<'_> {
        Invocation {
            function: self,
            keys: redis::Cmd::new(),
            args: redis::Cmd::new(),
        }
    }

    pub fn key<T: ToRedisArgs>(&self, key: T) -> Invocation<'_> {
        let mut inv = self.prepare_invoke();
        inv.key(key);
        inv
    }

    pub fn arg<T: ToRedisArgs>(&self, arg: T) -> Invocation<'_> {
        let mut inv = self.prepare_invoke();
        inv.arg(arg);
        inv
    }
}

/// One call of a [`Function`] with its keys and arguments. Keys and arguments are each
/// written into one buffer (a [`redis::Cmd`] used as an argument list), not one allocation
/// per value: a batch call carries hundreds of them.
pub struct Invocation<'a> {
    function: &'a Function,
    keys: redis::Cmd,
    args: redis::Cmd,
}

impl Invocation<'_> {
    pub fn key<T: ToRedisArgs>(&mut self, key: T) -> &mut Self {
        key.write_redis_args(&mut self.keys);
        self
    }

    pub fn arg<T: ToRedisArgs>(&mut self, arg: T) -> &mut Self {
        arg.write_redis_args(&mut self.args);
        self
    }

    /// The `FCALL` command (for pipelines).
    pub fn cmd(&self) -> redis::Cmd {
        let values = || self.keys.args_iter().chain(self.args.args_iter());
        let keys = self.keys.args_iter().len();
        // Sized up front: a batch call's buffers would otherwise grow (and be copied) a
        // dozen times.
        let bytes: usize = values()
            .map(|a| match a {
                redis::Arg::Simple(v) => v.len(),
                _ => 0,
            })
            .sum();
        let mut c = redis::Cmd::with_capacity(
            3 + keys + self.args.args_iter().len(),
            "FCALL".len() + self.function.name.len() + 8 + bytes,
        );
        c.arg("FCALL").arg(&self.function.name).arg(keys);
        for a in values() {
            if let redis::Arg::Simple(v) = a {
                c.arg(v);
            }
        }
        c
    }

    /// Runs the call. Redis answers an unknown function with a plain `ERR` (no code of its
    /// own), so on `ERR` the library is checked by state: when this version is missing (a
    /// fresh server, `FUNCTION FLUSH`) it is loaded and the call retried once. When it is
    /// there, the call is retried only if the error is Redis's fixed "Function not found"
    /// reply (another process loaded the library between the call and the check); any other
    /// `ERR` is the function's own error.
    pub async fn invoke_async<T: FromRedisValue>(
        &self,
        conn: &mut impl ConnectionLike,
    ) -> Result<T, StoreError> {
        let cmd = self.cmd();
        match cmd.query_async::<T>(conn).await {
            Ok(v) => Ok(v),
            Err(e) if retry_after_load(conn, &e).await? => {
                cmd.query_async(conn).await.map_err(function_error)
            }
            Err(e) => Err(e.into()),
        }
    }
}

/// Whether a function call that failed with `e` is worth one retry: on `ERR`, when the
/// library was missing and is loaded now, or when `e` is Redis's "Function not found"
/// (another process loaded it meanwhile). See [`Invocation::invoke_async`].
async fn retry_after_load(
    conn: &mut impl ConnectionLike,
    e: &RedisError,
) -> Result<bool, StoreError> {
    Ok(
        e.kind() == ErrorKind::Server(ServerErrorKind::ResponseError)
            && (Library::get().ensure(conn).await? || e.detail() == Some(NOT_FOUND)),
    )
}

impl Invocation<'_> {
    /// Runs the call and then `after`, in one pipeline (one round trip). The commands of
    /// `after` run after the function, outside it: reads whose values would otherwise cross
    /// into Lua and back. They are not atomic with the call (other clients' commands may
    /// run in between), so only reads a caller can take from a later state belong there.
    /// A missing library is loaded and the pipeline retried once, as in
    /// [`Invocation::invoke_async`]. Returns the call's answer and one reply per command of
    /// `after` (a failed command's reply is its `Value::ServerError`).
    pub async fn invoke_with<T: FromRedisValue>(
        &self,
        conn: &mut impl ConnectionLike,
        after: Vec<redis::Cmd>,
    ) -> Result<(T, Vec<Value>), StoreError> {
        let commands = after.len() + 1;
        let mut pipe = redis::pipe();
        pipe.ignore_errors().add_command(self.cmd());
        for c in after {
            pipe.add_command(c);
        }
        let mut replies: Vec<Value> = pipe.query_async(conn).await?;
        if let Some(Value::ServerError(e)) = replies.first() {
            let e = RedisError::from(e.clone());
            if !retry_after_load(conn, &e).await? {
                return Err(e.into());
            }
            replies = pipe.query_async(conn).await?;
            if let Some(Value::ServerError(e)) = replies.first() {
                return Err(function_error(RedisError::from(e.clone())));
            }
        }
        if replies.len() != commands {
            return Err(StoreError::Reply {
                script: "pipeline",
                detail: format!("{} replies to {commands} commands", replies.len()),
            });
        }
        let rest = replies.split_off(1);
        let first = replies.pop().unwrap_or(Value::Nil);
        Ok((T::from_redis_value(first)?, rest))
    }
}

/// The detail of Redis's `ERR` reply to `FCALL` of an unknown function (Redis 7.0 to 8.x;
/// there is no error code for it). Only decides whether to retry once after the library was
/// found loaded.
pub const NOT_FOUND: &str = "Function not found";

/// `e` as a [`StoreError`]: [`StoreError::FunctionsNotLoaded`] when it is Redis's reply to
/// `FCALL` of a function that is not on the server (see [`NOT_FOUND`]).
pub(crate) fn function_error(e: RedisError) -> StoreError {
    if e.kind() == ErrorKind::Server(ServerErrorKind::ResponseError)
        && e.detail() == Some(NOT_FOUND)
    {
        StoreError::FunctionsNotLoaded {
            library: Library::get().name().to_string(),
        }
    } else {
        e.into()
    }
}

/// Every function, resolved once per process.
pub struct Scripts {
    pub begin: Function,
    pub heartbeat: Function,
    pub checkpoint: Function,
    pub complete: Function,
    pub release: Function,
    pub reclaim: Function,
    pub promote: Function,
    pub commit: Function,
    pub drop_entry: Function,
    pub retire_consumer: Function,
    pub purge: Function,
    pub delete: Function,
    pub llm_limit: Function,
    pub llm_budget: Function,
    pub trim: Function,
}

impl Scripts {
    pub fn get() -> &'static Scripts {
        static SCRIPTS: OnceLock<Scripts> = OnceLock::new();
        SCRIPTS.get_or_init(|| {
            let s = Function::new;
            Scripts {
                begin: s("begin"),
                heartbeat: s("heartbeat"),
                checkpoint: s("checkpoint"),
                complete: s("complete"),
                release: s("release"),
                reclaim: s("reclaim"),
                promote: s("promote"),
                commit: s("commit"),
                drop_entry: s("drop_entry"),
                retire_consumer: s("retire_consumer"),
                purge: s("purge"),
                delete: s("delete"),
                llm_limit: s("llm_limit"),
                llm_budget: s("llm_budget"),
                trim: s("trim"),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_script_field_has_a_source() {
        // `Scripts::get` panics when a field names a script missing from SOURCES.
        let _ = Scripts::get();
    }

    #[test]
    fn every_script_has_a_header_and_uses_only_keys_from_keys() {
        for (name, body) in SOURCES {
            let first = body.lines().next().unwrap();
            assert!(first.starts_with(&format!("-- {name}:")), "{name} header");
            assert!(body.contains("KEYS[1]"), "{name} documents KEYS");
            // No key names are built inside scripts: nothing concatenates onto a prefix.
            assert!(!body.contains("honua:"), "{name} builds a key");
            assert!(
                !body.contains("'KEYS'") && !body.contains("SCAN"),
                "{name} scans"
            );
        }
    }

    #[test]
    fn prelude_defines_every_constant_scripts_use() {
        let consts = constants();
        let all = SOURCES
            .iter()
            .map(|(_, b)| *b)
            .chain([PRELUDE])
            .collect::<Vec<_>>()
            .join("\n");
        for word in all.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            let is_const = (word.starts_with("PS_")
                || word.starts_with("SS_")
                || word.starts_with("F_")
                || word.starts_with("E_")
                || word.starts_with("EV_")
                || word.starts_with("OUTCOME_")
                || word == "ENVELOPE_VERSION")
                && word.chars().all(|c| c.is_ascii_uppercase() || c == '_');
            if is_const {
                assert!(
                    consts.contains(&format!("local {word} =")),
                    "{word} is used but not generated"
                );
            }
        }
    }
    #[test]
    fn event_types_scripts_write_are_ones_rust_reads() {
        use crate::envelope::{Event, FieldMap};
        for t in LUA_EVENT_TYPES {
            let fields = [
                (wire::VERSION, ENVELOPE_VERSION.to_string()),
                (wire::TYPE, t.to_string()),
                (wire::PROCESS_ID, "p".into()),
                (wire::STEP, "s".into()),
                (wire::TOKEN, "k".into()),
                (wire::OUTCOME, "ok".into()),
            ];
            let f = FieldMap::from_pairs(fields.map(|(k, v)| (k.to_string(), v)));
            let e = Event::from_fields(&f).unwrap_or_else(|e| panic!("{t}: {e}"));
            assert!(
                e.is_worker_report(),
                "{t} is not read from the results stream"
            );
        }
    }

    /// The step record keys the scripts read and write (`rec.<key>` through cjson, and
    /// `"<key>":` in the text fast paths of `begin.lua` and `complete.lua`) are the keys
    /// `StepRecord` serializes.
    #[test]
    fn step_record_keys_scripts_use_are_the_records_own() {
        use crate::record::{AttemptRecord, StepRecord};
        let some = || Some("x".to_string());
        let full = StepRecord {
            token: "t".into(),
            yields: 1,
            deliveries: Some(1),
            worker: some(),
            queued_ms: Some(1),
            due_ms: Some(1),
            started_ms: Some(1),
            claimed_ms: Some(1),
            ended_ms: Some(1),
            outcome: some(),
            error: some(),
            code: some(),
            attempt_trace: some(),
            previous_attempt_trace: some(),
            arrived: vec!["a".into()],
            history: vec![AttemptRecord::default()],
            ..StepRecord::default()
        };
        let serde_json::Value::Object(keys) = serde_json::to_value(&full).unwrap() else {
            panic!("a step record is a JSON object");
        };
        let is_key = |c: char| c.is_ascii_lowercase() || c == '_';
        for (name, body) in SOURCES.iter().chain(&[("prelude", PRELUDE)]) {
            let fields = body.split("rec.").skip(1).map(|r| {
                let end = r.find(|c| !is_key(c)).unwrap_or(r.len());
                &r[..end]
            });
            // `"<key>":` in a Lua string: the text before each `":` back to its `"`.
            let fast_path = ["begin", "complete"].contains(name);
            let mut pieces: Vec<&str> = body.split("\":").filter(|_| fast_path).collect();
            // The text after the last `":` ends no key.
            pieces.pop();
            let quoted = pieces.into_iter().map(|before| {
                let start = before.rfind(|c| !is_key(c)).map_or(0, |i| i + 1);
                assert!(before[..start].ends_with('"'), "{name}: {before:?}");
                &before[start..]
            });
            for key in fields.chain(quoted) {
                assert!(
                    keys.contains_key(key),
                    "{name} uses step record key {key:?}"
                );
            }
        }
    }
}

//! Every Redis structure Honua uses, in one place. No other module writes a key string.
//!
//! All keys of one partition of a deployment share one hash tag (`{shard}`, the partition's
//! number: `{0}`…`{P-1}`, see [`crate::partition`]), so every atomic script runs unchanged
//! on Redis Cluster: every key it touches is passed in `KEYS` and lives in one slot. Each
//! partition holds the whole structure below for the processes that live in it.
//! The layout carries a version segment (`v2`) so a later layout can migrate side by side
//! (v2: the steps hash holds `#v`, the transitions workers committed, which v1 code does not
//! check; see the README on moving a live v1 deployment).
//!
//! | key | type | what it holds |
//! |---|---|---|
//! | `<prefix>:v2:{<shard>}:submit` | stream, group `scheduler` | submissions written by any Redis client |
//! | `<prefix>:v2:{<shard>}:jobs` | stream, group `workers` | step jobs ([`crate::envelope::JobEnvelope`]) |
//! | `<prefix>:v2:{<shard>}:events` | stream, group `scheduler` | timers, signals, timeouts (scheduler and gateway) |
//! | `<prefix>:v2:{<shard>}:results` | stream, group `scheduler` | step results and dead letters, written by workers (the only event stream their Redis user may write) |
//! | `<prefix>:v2:{<shard>}:dlq` | stream (no group) | dead-lettered jobs with their reason |
//! | `<prefix>:v2:{<shard>}:delayed` | sorted set, score = due time (server ms) | delayed jobs and timer events |
//! | `<prefix>:v2:{<shard>}:process:<id>` | hash | process metadata: type, version, status, rev, times, error |
//! | `<prefix>:v2:{<shard>}:process:<id>:steps` | hash, field per step | step records (JSON) |
//! | `<prefix>:v2:{<shard>}:process:<id>:data` | hash | `input`, `out:<step>`, `ck:<step>` state blobs (MessagePack) |
//! | `<prefix>:v2:{<shard>}:idem:<key>` | string with TTL | idempotency key → process id |
//! | `<prefix>:v2:{<shard>}:index:all` | sorted set, score = created ms | every live process id |
//! | `<prefix>:v2:{<shard>}:index:active` | sorted set, score = created ms | processes not yet finished |
//! | `<prefix>:v2:{<shard>}:index:status:<Status>` | sorted set, score = ended ms | finished processes by status |
//! | `<prefix>:v2:{<shard>}:index:status:Pending` | sorted set, score = created ms | processes created while intake was drained, not yet started |
//! | `<prefix>:v2:{<shard>}:index:active:<type>` | sorted set, score = created (or reopened) ms | unfinished processes of one type (the console's per-type counts) |
//! | `<prefix>:v2:{<shard>}:stats:minute:<unix minute>` | hash `<Status>:<type>` → count, with TTL (25 h) | processes of each type that finished with each status in that minute |
//! | `<prefix>:v2:{<shard>}:stats:hour:<unix hour>` | hash `<Status>:<type>` → count, with TTL (49 h) | the same per hour |
//! | `<prefix>:v2:{<shard>}:intake` | string (JSON: since, by) | present while the fleet's intake is drained (`POST /api/admin/drain`) |
//! | `<prefix>:v2:{<shard>}:workers` | sorted set, score = last heartbeat (server ms) | live workers |
//! | `<prefix>:v2:{<shard>}:workers:info` | hash, field per worker (JSON: version, host, concurrency, started) | what each worker registered at start; its field goes when it retires |
//! | `<prefix>:v2:{0}:partitions` | string | the deployment's partition count, set by its first scheduler; a scheduler configured with another count refuses to start |
//! | `<prefix>:v2:{<shard>}:quarantine` | stream (no group) | corrupt entries set aside with their error |
//! | `<prefix>:v2:{<shard>}:process:<id>:llm` | hash `tokens`, `cost_micro_usd`, with TTL | LLM usage of one process (budgets) |
//! | `<prefix>:v2:{0}:llm:usage:<type>:<yyyymmdd>` | integer with TTL | LLM tokens of one process type on one UTC day (partition 0 only: one count per deployment) |
//! | `<prefix>:v2:{0}:llm:cost:<type>:<yyyymmdd>` | integer with TTL | LLM cost (micro-USD, from the price table) of one process type on one UTC day |
//! | `<prefix>:v2:{<shard>}:llm:cache:<sha256>` | string (JSON) with TTL | shared LLM response cache |
//! | `<prefix>:v2:{llm:<bucket>}:limit` | hash `req_tat`, `tok_tat` (server µs), with TTL | fleet-wide GCRA state of one LLM bucket |
//! | `<prefix>:v2:{llm:<bucket>}:paused` | string (server µs) with TTL | the bucket is paused until then (provider 429) |
//! | `<prefix>:v2:{llm:<bucket>}:breaker` | hash `fails`, `open_until`, `probe_until` (server µs), with TTL | fleet-wide circuit breaker of one LLM bucket |

use std::fmt;

/// Consumer group of the workers on the job stream.
pub const WORKERS_GROUP: &str = "workers";
/// Consumer group of the schedulers on the submission and event streams.
pub const SCHEDULER_GROUP: &str = "scheduler";
/// Layout version segment.
pub const LAYOUT_VERSION: &str = "v2";

/// A Redis key. A newtype so that a key cannot be confused with a value.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key(String);

impl Key {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl redis::ToRedisArgs for Key {
    fn write_redis_args<W: ?Sized + redis::RedisWrite>(&self, out: &mut W) {
        out.write_arg(self.0.as_bytes())
    }
}

impl redis::ToSingleRedisArg for Key {}

/// Builds every key of one deployment (prefix) and shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    base: String,
    shard: u16,
    /// The deployment prefix alone (keys with their own hash tag, e.g. LLM limiter buckets).
    prefix: String,
}

impl Keys {
    /// `prefix` separates deployments (and tests) sharing one server; `shard` is the hash tag.
    pub fn new(prefix: &str, shard: u16) -> Self {
        Self {
            base: format!("{prefix}:{LAYOUT_VERSION}:{{{shard}}}"),
            shard,
            prefix: prefix.to_string(),
        }
    }

    /// The shard (partition) these keys belong to.
    pub fn shard(&self) -> u16 {
        self.shard
    }

    /// The keys of the same deployment in another shard.
    pub fn in_shard(&self, shard: u16) -> Keys {
        Keys::new(&self.prefix, shard)
    }

    fn key(&self, suffix: &str) -> Key {
        self.key_of(&[suffix])
    }

    /// `base:` followed by `parts` run together, built in one allocation (the per-process
    /// keys are built for every call of every step).
    fn key_of(&self, parts: &[&str]) -> Key {
        let len = self.base.len() + 1 + parts.iter().map(|p| p.len()).sum::<usize>();
        let mut k = String::with_capacity(len);
        k.push_str(&self.base);
        k.push(':');
        for p in parts {
            k.push_str(p);
        }
        Key(k)
    }

    pub fn submit(&self) -> Key {
        self.key("submit")
    }
    pub fn jobs(&self) -> Key {
        self.key("jobs")
    }
    pub fn events(&self) -> Key {
        self.key("events")
    }
    /// Step results and dead-letter notices from workers (`complete.lua`, `reclaim.lua`).
    pub fn results(&self) -> Key {
        self.key("results")
    }
    pub fn dlq(&self) -> Key {
        self.key("dlq")
    }
    pub fn quarantine(&self) -> Key {
        self.key("quarantine")
    }
    pub fn delayed(&self) -> Key {
        self.key("delayed")
    }
    pub fn workers(&self) -> Key {
        self.key("workers")
    }
    /// What each worker registered at start ([`crate::store::WorkerMeta`], JSON per
    /// consumer name), removed by `retire_consumer.lua`.
    pub fn workers_info(&self) -> Key {
        self.key("workers:info")
    }
    pub fn process(&self, id: &str) -> Key {
        self.key_of(&["process:", id])
    }
    pub fn steps(&self, id: &str) -> Key {
        self.key_of(&["process:", id, ":steps"])
    }
    pub fn data(&self, id: &str) -> Key {
        self.key_of(&["process:", id, ":data"])
    }
    /// The three keys of one process, in the order scripts expect them.
    pub fn process_keys(&self, id: &str) -> [Key; 3] {
        [self.process(id), self.steps(id), self.data(id)]
    }
    pub fn idempotency(&self, idem: &str) -> Key {
        self.key(&format!("idem:{idem}"))
    }
    pub fn index_all(&self) -> Key {
        self.key("index:all")
    }
    pub fn index_active(&self) -> Key {
        self.key("index:active")
    }
    /// Unfinished processes of one type (created or reopened: added; finished or deleted:
    /// removed), for counts per type without reading every record.
    pub fn index_active_type(&self, process_type: &str) -> Key {
        self.key_of(&["index:active:", process_type])
    }
    /// Processes finished in one minute (`minute` = unix ms / 60 000), per `<Status>:<type>`
    /// field ([`stats_field`]); written by the commit that finishes them.
    pub fn stats_minute(&self, minute: u64) -> Key {
        self.key(&format!("stats:minute:{minute}"))
    }
    /// Processes finished in one hour (`hour` = unix ms / 3 600 000), as
    /// [`Keys::stats_minute`].
    pub fn stats_hour(&self, hour: u64) -> Key {
        self.key(&format!("stats:hour:{hour}"))
    }
    /// The deployment's partition count (`SET NX` by the first scheduler; meaningful in
    /// shard 0 only).
    pub fn partition_count(&self) -> Key {
        self.key("partitions")
    }
    /// Present while the fleet's intake is drained: processes are created Pending.
    pub fn intake(&self) -> Key {
        self.key("intake")
    }
    pub fn index_status(&self, status: crate::status::ProcessStatus) -> Key {
        self.key_of(&["index:status:", status.as_str()])
    }
    /// LLM token and cost usage of one process (`llm_budget.lua`).
    pub fn llm_usage(&self, id: &str) -> Key {
        self.key(&format!("process:{id}:llm"))
    }
    /// LLM tokens used by all processes of `process_type` on the UTC day `day` (yyyymmdd).
    pub fn llm_type_usage(&self, process_type: &str, day: &str) -> Key {
        self.key(&format!("llm:usage:{process_type}:{day}"))
    }
    /// LLM cost in micro-USD of all processes of `process_type` on the UTC day `day`
    /// (yyyymmdd), beside [`Keys::llm_type_usage`] in the same `llm_budget.lua` call.
    pub fn llm_type_cost(&self, process_type: &str, day: &str) -> Key {
        self.key(&format!("llm:cost:{process_type}:{day}"))
    }
    /// One entry of the shared LLM response cache (`hash`: hex SHA-256 of the request).
    pub fn llm_cache(&self, hash: &str) -> Key {
        self.key(&format!("llm:cache:{hash}"))
    }
    /// The keys of one fleet-wide LLM limiter bucket (`provider/model`), in the order
    /// `llm_limit.lua` expects them: the GCRA state hash and the pause key. Each bucket has
    /// its own hash tag (`{llm:<bucket>}`), so buckets spread over a cluster's slots; braces
    /// in a bucket name are replaced so they cannot break the tag.
    pub fn llm_limit(&self, bucket: &str) -> [Key; 2] {
        let b: String = bucket
            .chars()
            .map(|c| if c == '{' || c == '}' { '_' } else { c })
            .collect();
        let base = format!("{}:{LAYOUT_VERSION}:{{llm:{b}}}", self.prefix);
        [Key(format!("{base}:limit")), Key(format!("{base}:paused"))]
    }
    /// The fleet-wide circuit breaker of one LLM bucket (`llm_limit.lua`'s `KEYS[3]`), under
    /// the bucket's hash tag.
    pub fn llm_breaker(&self, bucket: &str) -> Key {
        let [limit, _] = self.llm_limit(bucket);
        let base = limit
            .0
            .strip_suffix(":limit")
            .unwrap_or(&limit.0)
            .to_string();
        Key(format!("{base}:breaker"))
    }
    /// The keys of this deployment and shard that belong to no one process: the streams,
    /// the delayed set, the workers registry and the indexes.
    pub fn shared(&self) -> Vec<Key> {
        let mut keys = vec![
            self.submit(),
            self.jobs(),
            self.events(),
            self.results(),
            self.dlq(),
            self.quarantine(),
            self.delayed(),
            self.workers(),
            self.index_all(),
            self.index_active(),
            self.intake(),
            self.partition_count(),
        ];
        keys.extend(
            crate::status::ProcessStatus::ALL
                .into_iter()
                .map(|s| self.index_status(s)),
        );
        keys
    }

    /// The pattern that matches every key of this deployment and shard (for `--scan`).
    pub fn pattern(&self) -> String {
        format!("{}:*", self.base)
    }
}

/// How long a [`Keys::stats_minute`] counter lives: a day's window needs the minutes of
/// the hour before its first whole hour.
pub const STATS_MINUTE_TTL_SECS: u64 = 25 * 3600;
/// How long a [`Keys::stats_hour`] counter lives (more than a day's window).
pub const STATS_HOUR_TTL_SECS: u64 = 49 * 3600;

/// The field of a finished-process counter: `<Status>:<type>`.
pub fn stats_field(status: crate::status::ProcessStatus, process_type: &str) -> String {
    format!("{}:{process_type}", status.as_str())
}

/// Field names inside the process hashes, shared by Rust and (through the script prelude) Lua.
pub mod field {
    pub const TYPE: &str = "type";
    pub const VERSION: &str = "version";
    pub const STATUS: &str = "status";
    pub const REV: &str = "rev";
    pub const CREATED_MS: &str = "created_ms";
    pub const STARTED_MS: &str = "started_ms";
    pub const ENDED_MS: &str = "ended_ms";
    pub const UPDATED_MS: &str = "updated_ms";
    pub const DEADLINE_MS: &str = "deadline_ms";
    /// When the process was paused (absent unless Paused).
    pub const PAUSED_MS: &str = "paused_ms";
    /// Time its deadline had left when it was paused (the deadline stops while paused).
    pub const DEADLINE_LEFT_MS: &str = "deadline_left_ms";
    pub const ERROR: &str = "error";
    pub const CODE: &str = "code";
    pub const IDEMPOTENCY_KEY: &str = "idem";
    /// The submission's tenant (absent: none).
    pub const TENANT: &str = "tenant";
    pub const TRACE: &str = "trace";
    pub const AUDIT: &str = "audit";
    pub const INPUT: &str = "input";
    pub const OUTPUT_PREFIX: &str = "out:";
    pub const CHECKPOINT_PREFIX: &str = "ck:";
    /// In the steps hash (never a step name: those start with a letter): how many
    /// transitions workers committed on their own (a step's result with its successors
    /// enqueued, `complete.lua`'s fast path), which cannot bump `rev` in the meta hash that
    /// their Redis user may not write. Every commit checks both counters, and every commit
    /// raises one of them, so `rev + steps_rev` names one state of a process.
    pub const STEPS_REV: &str = "#v";
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(key: &Key) -> &str {
        let s = key.as_str();
        let open = s.find('{').unwrap();
        let close = s[open..].find('}').unwrap() + open;
        &s[open + 1..close]
    }

    #[test]
    fn every_key_shares_one_hash_tag() {
        let k = Keys::new("honua", 0);
        let all = [
            k.submit(),
            k.jobs(),
            k.events(),
            k.results(),
            k.dlq(),
            k.delayed(),
            k.workers(),
            k.process("p1"),
            k.steps("p1"),
            k.data("p1"),
            k.idempotency("x"),
            k.index_all(),
            k.index_active(),
            k.index_status(crate::status::ProcessStatus::Failed),
            k.quarantine(),
            k.llm_usage("p1"),
            k.llm_type_usage("T", "20260101"),
            k.llm_type_cost("T", "20260101"),
            k.llm_cache("ab"),
            k.workers_info(),
            k.index_active_type("T"),
            k.stats_minute(1),
            k.stats_hour(1),
        ];
        for key in &all {
            assert_eq!(tag(key), "0", "{key}");
            assert!(key.as_str().starts_with("honua:v2:{0}:"), "{key}");
        }
        let mut unique: Vec<_> = all.iter().map(|k| k.as_str()).collect();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), all.len());
    }

    #[test]
    fn prefixes_and_shards_separate() {
        assert_ne!(Keys::new("a", 0).jobs(), Keys::new("b", 0).jobs());
        assert_ne!(Keys::new("a", 0).jobs(), Keys::new("a", 1).jobs());
        assert_eq!(Keys::new("a", 3).pattern(), "a:v2:{3}:*");
    }
}

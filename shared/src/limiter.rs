//! The fleet-wide LLM limiter: one bucket per `provider/model`, limiting requests and
//! tokens per minute together, shared by every worker through `llm_limit.lua` (GCRA on the
//! server's clock). The worker side (local `governor` stage, bounded wait, fallback when
//! Redis is unreachable) lives in `honua_worker::limit`.
//!
//! Semantics of a [`LimitSpec`]: a bucket holds `max(burst, 1)` units and refills at the
//! per-minute rate, so in any window of `w` seconds at most `burst + rate/60 * w` requests
//! (and tokens) are admitted. A reservation of more tokens than `burst_tokens` can never be
//! admitted ([`Admission::TooLarge`]): size `burst_tokens` for the largest call
//! (prompt + `max_tokens`).

//!
//! Fair shares ([`LimitSpec::shares`], [`LimitSpec::tenant_shares`]): a bucket's capacity is
//! split among the process types (and tenants) that asked within the share window, by
//! weight, with an optional reserved minimum and a maximum per share, in the same script
//! and round trip (see `llm_limit.lua` and the README's fleet-wide limiter section).

use crate::scripts::Scripts;
use crate::store::{Result, Store, StoreError};
use std::collections::BTreeMap;
use std::time::Duration;

/// The share that every name not listed in a bucket's shares belongs to (all together).
pub const OTHER_SHARE: &str = "*";

/// The share window when a bucket does not set `shareWindowMs`.
pub const DEFAULT_SHARE_WINDOW: Duration = Duration::from_secs(10);

/// One share of a bucket: a process type's (or a tenant's) part of its capacity.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct ShareSpec {
    /// Relative weight among the active shares (>= 1).
    pub weight: u32,
    /// Reserved requests per minute while the share asks (0: none).
    #[serde(alias = "min_rpm")]
    pub min_rpm: u32,
    /// The most requests per minute the share ever gets (0: no cap).
    #[serde(alias = "max_rpm")]
    pub max_rpm: u32,
}

impl Default for ShareSpec {
    fn default() -> Self {
        Self {
            weight: 1,
            min_rpm: 0,
            max_rpm: 0,
        }
    }
}

/// Who a call is for: the process type and tenant whose shares it is charged to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Asker {
    pub process_type: String,
    pub tenant: Option<String>,
}

impl Asker {
    pub fn new(process_type: impl Into<String>, tenant: Option<String>) -> Self {
        Self {
            process_type: process_type.into(),
            tenant,
        }
    }
}

/// Share-map prefixes in the bucket's hash: one per dimension.
const TYPE_DIM: &str = "t";
const TENANT_DIM: &str = "n";

/// One bucket's limits, e.g. provider "openai" model "gpt-4o".
/// An omitted field is 0 (unlimited, or no extra burst).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct LimitSpec {
    /// 0 = unlimited.
    pub requests_per_minute: u32,
    /// Input + output tokens; 0 = unlimited.
    pub tokens_per_minute: u64,
    /// Extra requests allowed at once above the steady rate.
    pub burst_requests: u32,
    /// Extra tokens allowed at once above the steady rate; also the largest reservation.
    pub burst_tokens: u64,
    /// Fair shares per process type; `*` stands for every type not listed (weight 1 when
    /// absent). Empty: no shares, first come first served.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub shares: BTreeMap<String, ShareSpec>,
    /// Fair shares per tenant (the submission's `tenant`); `*` stands for every other
    /// tenant and for processes without one.
    #[serde(alias = "tenant_shares", skip_serializing_if = "BTreeMap::is_empty")]
    pub tenant_shares: BTreeMap<String, ShareSpec>,
    /// A share is active (takes part in the split) this long after it last asked
    /// (0: [`DEFAULT_SHARE_WINDOW`]).
    #[serde(alias = "share_window_ms", skip_serializing_if = "is_zero")]
    pub share_window_ms: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

const MINUTE_US: f64 = 60_000_000.0;

impl LimitSpec {
    /// Neither requests nor tokens are limited: no Redis round trip at all.
    pub fn is_unlimited(&self) -> bool {
        self.requests_per_minute == 0 && self.tokens_per_minute == 0
    }

    /// A clear message naming the bad field.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.tokens_per_minute > 0 && self.burst_tokens == 0 {
            return Err(
                "burstTokens must be at least 1 when tokensPerMinute is set: it bounds \
                 the largest single reservation (prompt + max_tokens)"
                    .into(),
            );
        }
        for (field, shares) in [
            ("shares", &self.shares),
            ("tenantShares", &self.tenant_shares),
        ] {
            self.validate_shares(field, shares)?;
        }
        if self.share_window_ms > 3_600_000 {
            return Err("shareWindowMs must be at most 3600000 (one hour)".into());
        }
        Ok(())
    }

    fn validate_shares(
        &self,
        field: &str,
        shares: &BTreeMap<String, ShareSpec>,
    ) -> std::result::Result<(), String> {
        if shares.is_empty() {
            return Ok(());
        }
        if self.is_unlimited() {
            return Err(format!(
                "{field} need a limit to share: set requestsPerMinute or tokensPerMinute"
            ));
        }
        let mut reserved = 0u64;
        for (name, share) in shares {
            if name != OTHER_SHARE && !crate::envelope::valid_id(name) {
                return Err(format!(
                    "{field}: {name:?} is not a share name ([A-Za-z0-9_-]{{1,64}}, or \"*\" for all others)"
                ));
            }
            if !(1..=1_000_000).contains(&share.weight) {
                return Err(format!("{field}.{name}.weight must be 1..=1000000"));
            }
            if (share.min_rpm > 0 || share.max_rpm > 0) && self.requests_per_minute == 0 {
                return Err(format!(
                    "{field}.{name}: min_rpm and max_rpm need the bucket's requestsPerMinute"
                ));
            }
            if share.max_rpm > 0 && share.max_rpm < share.min_rpm {
                return Err(format!(
                    "{field}.{name}: max_rpm ({}) is below min_rpm ({})",
                    share.max_rpm, share.min_rpm
                ));
            }
            reserved += u64::from(share.min_rpm);
        }
        if reserved > u64::from(self.requests_per_minute) {
            return Err(format!(
                "{field}: the reserved minimums add up to {reserved} rpm, more than the \
                 bucket's requestsPerMinute ({})",
                self.requests_per_minute
            ));
        }
        Ok(())
    }

    /// Whether calls on this bucket are split into fair shares.
    pub fn has_shares(&self) -> bool {
        !self.is_unlimited() && (!self.shares.is_empty() || !self.tenant_shares.is_empty())
    }

    /// How long a share stays active after it last asked.
    pub fn share_window(&self) -> Duration {
        if self.share_window_ms == 0 {
            DEFAULT_SHARE_WINDOW
        } else {
            Duration::from_millis(self.share_window_ms)
        }
    }

    /// The dimensions with shares: (prefix, shares, the asker's name in it).
    fn dimensions<'a>(
        &'a self,
        asker: &'a Asker,
    ) -> impl Iterator<Item = (&'static str, &'a BTreeMap<String, ShareSpec>, &'a str)> {
        let own = |shares: &BTreeMap<String, ShareSpec>, name: Option<&'a str>| match name {
            Some(n) if n != OTHER_SHARE && shares.contains_key(n) => n,
            _ => OTHER_SHARE,
        };
        let types = (!self.shares.is_empty()).then(|| {
            (
                TYPE_DIM,
                &self.shares,
                own(&self.shares, Some(asker.process_type.as_str())),
            )
        });
        let tenants = (!self.tenant_shares.is_empty()).then(|| {
            (
                TENANT_DIM,
                &self.tenant_shares,
                own(&self.tenant_shares, asker.tenant.as_deref()),
            )
        });
        types
            .into_iter()
            .chain(tenants)
            .filter(|_| self.has_shares())
    }

    /// The shares a call of `asker` is charged to, as the script names them
    /// (`t:<type>`, `n:<tenant>`; `*` for names not listed).
    pub fn share_fields(&self, asker: &Asker) -> Vec<String> {
        self.dimensions(asker)
            .map(|(dim, _, own)| format!("{dim}:{own}"))
            .collect()
    }

    /// The acquire arguments of the shares (ARGV[9..]); empty without shares.
    fn share_args(&self, asker: &Asker) -> Vec<String> {
        let dims: Vec<_> = self.dimensions(asker).collect();
        if dims.is_empty() {
            return vec![];
        }
        let mut a = vec![
            (self.share_window().as_micros() as u64).to_string(),
            dims.len().to_string(),
        ];
        let other = ShareSpec::default();
        for (dim, shares, own) in dims {
            let mut list: Vec<(&str, &ShareSpec)> =
                shares.iter().map(|(n, s)| (n.as_str(), s)).collect();
            if !shares.contains_key(OTHER_SHARE) {
                list.push((OTHER_SHARE, &other));
            }
            a.extend([dim.to_string(), own.to_string(), list.len().to_string()]);
            for (name, s) in list {
                a.extend([
                    name.to_string(),
                    s.weight.max(1).to_string(),
                    s.min_rpm.to_string(),
                    s.max_rpm.to_string(),
                ]);
            }
        }
        a
    }

    /// Requests held by a full bucket.
    pub fn request_capacity(&self) -> u32 {
        self.burst_requests.max(1)
    }

    /// Tokens held by a full bucket: the largest reservation that can ever be admitted.
    pub fn token_capacity(&self) -> u64 {
        self.burst_tokens.max(1)
    }

    /// µs between two requests at the steady rate (0 = unlimited).
    pub fn request_interval_us(&self) -> f64 {
        if self.requests_per_minute == 0 {
            0.0
        } else {
            MINUTE_US / f64::from(self.requests_per_minute)
        }
    }

    /// µs per token at the steady rate (0 = unlimited).
    pub fn token_interval_us(&self) -> f64 {
        if self.tokens_per_minute == 0 {
            0.0
        } else {
            MINUTE_US / self.tokens_per_minute as f64
        }
    }

    /// The most requests any window of `window` may see: `burst + rate * window`.
    pub fn max_requests_in(&self, window: Duration) -> f64 {
        f64::from(self.request_capacity())
            + f64::from(self.requests_per_minute) * window.as_secs_f64() / 60.0
    }

    /// The most tokens any window of `window` may see.
    pub fn max_tokens_in(&self, window: Duration) -> f64 {
        self.token_capacity() as f64 + self.tokens_per_minute as f64 * window.as_secs_f64() / 60.0
    }
}

/// The answer of one `acquire` round trip.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Reserved (booked): send after `wait` (zero = now).
    Granted { wait: Duration },
    /// Not within the caller's max wait; the earliest admission is `wait` from now.
    Wait { wait: Duration, paused: bool },
    /// More tokens than the bucket holds: never admissible.
    TooLarge,
    /// The bucket's fleet-wide circuit breaker is open (or half-open with another worker's
    /// probe in flight) for `wait` more.
    BreakerOpen { wait: Duration },
}

/// What a granted `acquire` learned of the bucket's fleet-wide circuit breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerSeen {
    /// Closed, no failures counted: a success need not report.
    Closed,
    /// Closed with failures counted: a success resets them (one round trip).
    Failing,
    /// This call is the fleet's one half-open probe: report how it went.
    Probe,
}

/// How a call ended, for the fleet-wide circuit breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerOutcome {
    Success,
    /// A 5xx or a timeout.
    Failure,
    /// A probe that was never sent, or ended in an error that says nothing of the provider.
    Abandon,
}

/// The fleet-wide circuit breaker's settings (`breaker_failures`, `breaker_open_secs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerSpec {
    pub failures: u32,
    pub open: Duration,
    /// How long a half-open probe holds its claim (the call's timeout).
    pub probe_lease: Duration,
}

fn f(x: f64) -> String {
    format!("{x:.6}")
}

fn parse_reply(r: (i64, i64, String)) -> Result<Admission> {
    parse_breaker_reply(r).map(|(a, _)| a)
}

fn parse_breaker_reply(r: (i64, i64, String)) -> Result<(Admission, BreakerSeen)> {
    let (ok, wait_us, reason) = r;
    let wait = Duration::from_micros(wait_us.max(0) as u64);
    let seen = match (ok, reason.as_str()) {
        (1, "failing") => BreakerSeen::Failing,
        (1, "probe") => BreakerSeen::Probe,
        _ => BreakerSeen::Closed,
    };
    let admission = match (ok, reason.as_str()) {
        (1, "ok" | "failing" | "probe") => Ok(Admission::Granted { wait }),
        (0, "breaker_open") => Ok(Admission::BreakerOpen { wait }),
        (0, "rate") => Ok(Admission::Wait {
            wait,
            paused: false,
        }),
        // A share over its fair rate: ask again after the hint.
        (0, "share") => Ok(Admission::Wait {
            wait,
            paused: false,
        }),
        (0, "paused") => Ok(Admission::Wait { wait, paused: true }),
        (0, "too_large") => Ok(Admission::TooLarge),
        _ => Err(StoreError::Reply {
            script: "llm_limit",
            detail: format!("{ok} {wait_us} {reason:?}"),
        }),
    };
    admission.map(|a| (a, seen))
}

impl Store {
    /// One round trip: reserve 1 request + `tokens` on `bucket`, booking the earliest slot
    /// when it lies within `max_wait` (the caller must then sleep the returned wait before
    /// sending), or learn when the earliest slot is.
    pub async fn llm_acquire(
        &self,
        bucket: &str,
        spec: &LimitSpec,
        tokens: u64,
        max_wait: Duration,
    ) -> Result<Admission> {
        self.llm_acquire_gated(bucket, spec, tokens, max_wait, None)
            .await
            .map(|(a, _)| a)
    }

    /// As [`Store::llm_acquire`], in the same round trip also passing the bucket's
    /// fleet-wide circuit breaker when `probe_lease` is given (an open breaker refuses;
    /// a half-open one admits exactly one probe fleet-wide, holding the claim for
    /// `probe_lease`).
    pub async fn llm_acquire_gated(
        &self,
        bucket: &str,
        spec: &LimitSpec,
        tokens: u64,
        max_wait: Duration,
        probe_lease: Option<Duration>,
    ) -> Result<(Admission, BreakerSeen)> {
        self.llm_acquire_as(bucket, spec, None, tokens, max_wait, probe_lease)
            .await
    }

    /// As [`Store::llm_acquire_gated`], charging the call to the fair shares of `asker`
    /// when the bucket has shares (a share over its fair rate answers
    /// [`Admission::Wait`]: ask again after its wait). `None`: the shares of an asker of no
    /// listed type or tenant.
    pub async fn llm_acquire_as(
        &self,
        bucket: &str,
        spec: &LimitSpec,
        asker: Option<&Asker>,
        tokens: u64,
        max_wait: Duration,
        probe_lease: Option<Duration>,
    ) -> Result<(Admission, BreakerSeen)> {
        let keys = self.keys().llm_limit(bucket);
        let req_t = spec.request_interval_us();
        let tok_t = spec.token_interval_us();
        let mut call = Scripts::get().llm_limit.key(&keys[0]);
        call.key(&keys[1]);
        if probe_lease.is_some() {
            call.key(self.keys().llm_breaker(bucket));
        }
        call.arg("acquire")
            .arg(f(req_t))
            .arg(f(req_t * f64::from(spec.request_capacity())))
            .arg(f(tok_t))
            .arg(f(tok_t * spec.token_capacity() as f64))
            .arg(tokens)
            .arg(max_wait.as_micros() as u64)
            .arg(probe_lease.map_or(0, |l| l.as_micros() as u64));
        let nobody = Asker::default();
        call.arg(spec.share_args(asker.unwrap_or(&nobody)));
        let r: (i64, i64, String) = call.invoke_async(&mut self.conn()).await?;
        parse_breaker_reply(r)
    }

    /// One round trip: reports a call's outcome to the bucket's fleet-wide circuit breaker.
    /// Returns `Some(open for)` when the breaker is (now) open.
    pub async fn llm_breaker(
        &self,
        bucket: &str,
        spec: &BreakerSpec,
        outcome: BreakerOutcome,
        probe: bool,
    ) -> Result<Option<Duration>> {
        let keys = self.keys().llm_limit(bucket);
        let outcome = match outcome {
            BreakerOutcome::Success => "success",
            BreakerOutcome::Failure => "failure",
            BreakerOutcome::Abandon => "abandon",
        };
        let (_, open_us, reason): (i64, i64, String) = Scripts::get()
            .llm_limit
            .key(&keys[0])
            .key(&keys[1])
            .key(self.keys().llm_breaker(bucket))
            .arg("breaker")
            .arg(outcome)
            .arg(spec.failures.max(1))
            .arg((spec.open.as_millis() as u64).max(1))
            .arg(if probe { "1" } else { "0" })
            .invoke_async(&mut self.conn())
            .await?;
        Ok(matches!(reason.as_str(), "opened" | "open")
            .then(|| Duration::from_micros(open_us.max(0) as u64)))
    }

    /// One round trip: reconcile a reservation of `reserved` tokens with the `actual` usage
    /// (refund or charge the difference), and give the request back when `unused` (a
    /// booked call that was never sent), on the bucket and on the call's `shares`
    /// ([`LimitSpec::share_fields`]). Skipped (no round trip) when nothing changes;
    /// returns whether a round trip was made.
    pub async fn llm_settle(
        &self,
        bucket: &str,
        spec: &LimitSpec,
        reserved: u64,
        actual: u64,
        unused: bool,
        shares: &[String],
    ) -> Result<bool> {
        let delta = if spec.tokens_per_minute == 0 {
            0
        } else {
            actual as i128 - reserved as i128
        };
        let req_delta = if unused && spec.requests_per_minute > 0 {
            -1
        } else {
            0
        };
        if delta == 0 && req_delta == 0 {
            return Ok(false);
        }
        let keys = self.keys().llm_limit(bucket);
        let r: (i64, i64, String) = Scripts::get()
            .llm_limit
            .key(&keys[0])
            .key(&keys[1])
            .arg("settle")
            .arg(f(spec.request_interval_us()))
            .arg(req_delta)
            .arg(f(spec.token_interval_us()))
            .arg(delta.to_string())
            .arg(shares)
            .invoke_async(&mut self.conn())
            .await?;
        parse_reply(r)?;
        Ok(true)
    }

    /// One round trip after sleeping until a booked slot: `None` = send; `Some(wait)` = the
    /// bucket was paused meanwhile, the booking was given back and the pause ends in `wait`.
    pub async fn llm_confirm(
        &self,
        bucket: &str,
        spec: &LimitSpec,
        tokens: u64,
        shares: &[String],
    ) -> Result<Option<Duration>> {
        let keys = self.keys().llm_limit(bucket);
        let r: (i64, i64, String) = Scripts::get()
            .llm_limit
            .key(&keys[0])
            .key(&keys[1])
            .arg("confirm")
            .arg(f(spec.request_interval_us()))
            .arg(f(spec.token_interval_us()))
            .arg(tokens)
            .arg(shares)
            .invoke_async(&mut self.conn())
            .await?;
        match parse_reply(r)? {
            Admission::Granted { .. } => Ok(None),
            Admission::Wait { wait, .. } => Ok(Some(wait)),
            a @ (Admission::TooLarge | Admission::BreakerOpen { .. }) => Err(StoreError::Reply {
                script: "llm_limit",
                detail: format!("{a:?} on confirm"),
            }),
        }
    }

    /// Pauses `bucket` for every worker for `for_` (never shortens a longer pause). Returns
    /// how long the bucket stays paused.
    pub async fn llm_pause(&self, bucket: &str, for_: Duration) -> Result<Duration> {
        let keys = self.keys().llm_limit(bucket);
        let ms = (for_.as_millis() as u64).max(1);
        let (_, remaining_us, _): (i64, i64, String) = Scripts::get()
            .llm_limit
            .key(&keys[0])
            .key(&keys[1])
            .arg("pause")
            .arg(ms)
            .invoke_async(&mut self.conn())
            .await?;
        Ok(Duration::from_micros(remaining_us.max(0) as u64))
    }
}

/// The fleet-wide circuit breaker of one bucket as the console shows it (`llm_limit.lua`'s
/// breaker hash).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BreakerState {
    /// No failure counted.
    Closed,
    /// Closed, with `fails` consecutive 5xx/timeouts counted.
    Failing { fails: u64 },
    /// Open until the server µs `until_us`: calls fall back or wait.
    Open { until_us: f64 },
    /// Past its open spell: the next call is the fleet's one probe.
    HalfOpen,
    /// Half-open with one worker's probe in flight until `until_us`.
    Probing { until_us: f64 },
}

impl BreakerState {
    /// From the breaker hash's `open_until`, `probe_until` and `fails` at server µs `now_us`
    /// (the script's own reading of them).
    pub fn at(
        open_until: Option<f64>,
        probe_until: Option<f64>,
        fails: Option<u64>,
        now_us: f64,
    ) -> Self {
        match (open_until.unwrap_or(0.0), probe_until.unwrap_or(0.0)) {
            (o, _) if o > now_us => BreakerState::Open { until_us: o },
            (o, p) if o > 0.0 && p > now_us => BreakerState::Probing { until_us: p },
            (o, _) if o > 0.0 => BreakerState::HalfOpen,
            _ => match fails {
                Some(n) if n > 0 => BreakerState::Failing { fails: n },
                _ => BreakerState::Closed,
            },
        }
    }
}

/// What the limiter keeps of one bucket in Redis, read at server µs `now_us`.
#[derive(Debug, Clone, PartialEq)]
pub struct BucketState {
    pub bucket: String,
    pub now_us: f64,
    /// Theoretical arrival times (server µs); absent: a full bucket.
    pub req_tat_us: Option<f64>,
    pub tok_tat_us: Option<f64>,
    /// Paused (a provider's 429) until this server µs, if in the future.
    pub paused_until_us: Option<f64>,
    pub breaker: BreakerState,
}

/// The units a GCRA bucket has admitted and not yet refilled: (tat - now) / interval, 0 when
/// the tat is past or the bucket has no limit. It drains at the per-minute rate; at the
/// bucket's capacity further calls wait (bookings can take it past the capacity by what
/// the callers' max wait allows).
pub fn gcra_fill(tat_us: Option<f64>, now_us: f64, interval_us: f64) -> f64 {
    match tat_us {
        Some(t) if interval_us > 0.0 && t > now_us => (t - now_us) / interval_us,
        _ => 0.0,
    }
}

impl BucketState {
    /// Requests admitted and not yet refilled (see [`gcra_fill`]).
    pub fn request_fill(&self, spec: &LimitSpec) -> f64 {
        gcra_fill(self.req_tat_us, self.now_us, spec.request_interval_us())
    }
    /// Tokens admitted and not yet refilled (see [`gcra_fill`]).
    pub fn token_fill(&self, spec: &LimitSpec) -> f64 {
        gcra_fill(self.tok_tat_us, self.now_us, spec.token_interval_us())
    }
}

impl Store {
    /// The limiter state of each of `buckets` (`provider/model`) in one pipelined round
    /// trip of bounded reads: `TIME`, then per bucket `HMGET` of the GCRA hash's two tats,
    /// `GET` of the pause key and `HMGET` of the breaker hash. Fair-share fields are not read.
    pub async fn llm_bucket_states(&self, buckets: &[&str]) -> Result<Vec<BucketState>> {
        let mut pipe = redis::pipe();
        pipe.cmd("TIME");
        for b in buckets {
            let [limit, paused] = self.keys().llm_limit(b);
            pipe.cmd("HMGET").arg(limit).arg("req_tat").arg("tok_tat");
            pipe.cmd("GET").arg(paused);
            pipe.cmd("HMGET")
                .arg(self.keys().llm_breaker(b))
                .arg("open_until")
                .arg("probe_until")
                .arg("fails");
        }
        type Tats = (Option<f64>, Option<f64>);
        type Brk = (Option<f64>, Option<f64>, Option<u64>);
        let replies: Vec<redis::Value> = pipe.query_async(&mut self.conn()).await?;
        let mut it = replies.into_iter();
        fn next<T: redis::FromRedisValue>(
            it: &mut impl Iterator<Item = redis::Value>,
        ) -> Result<T> {
            let v = it.next().unwrap_or(redis::Value::Nil);
            Ok(redis::from_redis_value(v).map_err(redis::RedisError::from)?)
        }
        let (s, us): (u64, u64) = next(&mut it)?;
        let now_us = (s * 1_000_000 + us) as f64;
        let mut out = Vec::with_capacity(buckets.len());
        for b in buckets {
            let (req, tok): Tats = next(&mut it)?;
            let paused: Option<f64> = next(&mut it)?;
            let (open, probe, fails): Brk = next(&mut it)?;
            out.push(BucketState {
                bucket: b.to_string(),
                now_us,
                req_tat_us: req,
                tok_tat_us: tok,
                paused_until_us: paused.filter(|p| *p > now_us),
                breaker: BreakerState::at(open, probe, fails, now_us),
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(rpm: u32, tpm: u64, br: u32, bt: u64) -> LimitSpec {
        LimitSpec {
            requests_per_minute: rpm,
            tokens_per_minute: tpm,
            burst_requests: br,
            burst_tokens: bt,
            ..LimitSpec::default()
        }
    }

    fn share(weight: u32, min_rpm: u32, max_rpm: u32) -> ShareSpec {
        ShareSpec {
            weight,
            min_rpm,
            max_rpm,
        }
    }

    #[test]
    fn gcra_fill_is_the_unrefilled_units() {
        let s = spec(60, 600, 5, 1000);
        // One request per second, ten tokens per second.
        assert_eq!(gcra_fill(None, 5e6, s.request_interval_us()), 0.0);
        assert_eq!(gcra_fill(Some(4e6), 5e6, s.request_interval_us()), 0.0);
        assert!((gcra_fill(Some(7.5e6), 5e6, s.request_interval_us()) - 2.5).abs() < 1e-9);
        assert!((gcra_fill(Some(7.5e6), 5e6, s.token_interval_us()) - 25.0).abs() < 1e-9);
        // An unlimited dimension holds nothing.
        assert_eq!(
            gcra_fill(Some(9e6), 5e6, spec(0, 0, 0, 0).request_interval_us()),
            0.0
        );
    }

    #[test]
    fn breaker_states_follow_the_script() {
        let now = 1e9;
        assert_eq!(
            BreakerState::at(None, None, None, now),
            BreakerState::Closed
        );
        assert_eq!(
            BreakerState::at(None, None, Some(3), now),
            BreakerState::Failing { fails: 3 }
        );
        assert_eq!(
            BreakerState::at(Some(now + 5.0), None, None, now),
            BreakerState::Open {
                until_us: now + 5.0
            }
        );
        assert_eq!(
            BreakerState::at(Some(now - 5.0), None, None, now),
            BreakerState::HalfOpen
        );
        assert_eq!(
            BreakerState::at(Some(now - 5.0), Some(now + 7.0), None, now),
            BreakerState::Probing {
                until_us: now + 7.0
            }
        );
        assert_eq!(
            BreakerState::at(Some(now - 5.0), Some(now - 1.0), None, now),
            BreakerState::HalfOpen
        );
    }

    #[test]
    fn share_args_list_every_share_and_the_callers_own() {
        let mut s = spec(600, 0, 5, 0);
        assert!(!s.has_shares());
        assert!(s.share_args(&Asker::new("Deployment", None)).is_empty());
        s.shares.insert("Deployment".into(), share(3, 10, 0));
        s.shares.insert("Benchmark".into(), share(1, 0, 40));
        let a = s.share_args(&Asker::new("Deployment", None));
        assert_eq!(
            a,
            [
                "10000000",
                "1",
                "t",
                "Deployment",
                "3",
                "Benchmark",
                "1",
                "0",
                "40",
                "Deployment",
                "3",
                "10",
                "0",
                "*",
                "1",
                "0",
                "0"
            ]
        );
        // An unlisted type is charged to `*`; a tenant dimension joins when configured.
        s.tenant_shares.insert("acme".into(), share(2, 0, 0));
        s.tenant_shares.insert("*".into(), share(5, 0, 0));
        let who = Asker::new("Upgrade", Some("acme".into()));
        assert_eq!(s.share_fields(&who), ["t:*", "n:acme"]);
        let a = s.share_args(&who);
        assert_eq!(a[1], "2");
        let n = a.iter().position(|x| x == "n").unwrap();
        assert_eq!(&a[n..n + 3], ["n", "acme", "2"]);
        assert_eq!(s.share_fields(&Asker::new("Upgrade", None)), ["t:*", "n:*"]);
        // A bucket with no limit has nothing to share.
        let mut u = spec(0, 0, 0, 0);
        u.shares.insert("A".into(), share(1, 0, 0));
        assert!(!u.has_shares());
        assert!(u.share_fields(&who).is_empty());
    }

    #[test]
    fn shares_are_validated_with_the_field_named() {
        let mut s = spec(60, 0, 1, 0);
        s.shares.insert("A".into(), share(0, 0, 0));
        assert!(s.validate().unwrap_err().contains("shares.A.weight"));
        s.shares.insert("A".into(), share(1, 30, 20));
        assert!(s.validate().unwrap_err().contains("below min_rpm"));
        s.shares.insert("A".into(), share(1, 40, 0));
        s.shares.insert("B".into(), share(1, 30, 0));
        assert!(s.validate().unwrap_err().contains("70 rpm"));
        s.shares.clear();
        s.tenant_shares.insert("bad name".into(), share(1, 0, 0));
        assert!(s.validate().unwrap_err().contains("tenantShares"));
        s.tenant_shares.clear();
        s.tenant_shares.insert("*".into(), share(2, 0, 0));
        s.validate().unwrap();
        let mut t = spec(0, 6000, 0, 100);
        t.shares.insert("A".into(), share(1, 5, 0));
        assert!(t.validate().unwrap_err().contains("requestsPerMinute"));
        let mut u = spec(0, 0, 0, 0);
        u.shares.insert("A".into(), share(1, 0, 0));
        assert!(u.validate().unwrap_err().contains("need a limit"));
    }

    #[test]
    fn intervals_and_bounds() {
        let s = spec(600, 60_000, 10, 2_000);
        assert_eq!(s.request_interval_us(), 100_000.0);
        assert_eq!(s.token_interval_us(), 1_000.0);
        assert_eq!(s.max_requests_in(Duration::from_secs(1)), 20.0);
        assert_eq!(s.max_tokens_in(Duration::from_secs(1)), 3_000.0);
        assert!(spec(0, 0, 0, 0).is_unlimited());
        assert_eq!(spec(0, 0, 0, 0).request_interval_us(), 0.0);
    }

    #[test]
    fn validate_names_the_field() {
        assert!(
            spec(600, 60_000, 10, 0)
                .validate()
                .unwrap_err()
                .contains("burstTokens")
        );
        assert!(spec(600, 0, 0, 0).validate().is_ok());
    }

    #[test]
    fn spec_is_camel_case() {
        let v = serde_json::to_value(spec(1, 2, 3, 4)).unwrap();
        assert_eq!(v["requestsPerMinute"], 1);
        assert_eq!(v["burstTokens"], 4);
    }

    #[test]
    fn replies_parse() {
        assert_eq!(
            parse_reply((1, 250, "ok".into())).unwrap(),
            Admission::Granted {
                wait: Duration::from_micros(250)
            }
        );
        assert_eq!(
            parse_reply((0, 1500, "paused".into())).unwrap(),
            Admission::Wait {
                wait: Duration::from_micros(1500),
                paused: true
            }
        );
        assert!(parse_reply((2, 0, "x".into())).is_err());
    }
}

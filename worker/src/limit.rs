//! The worker side of the fleet-wide LLM limiter.
//!
//! Two stages per bucket (`provider/model`):
//! 1. a local [`governor`] limiter, the same spec scaled by `local_fraction`: its request
//!    stage smooths this worker's own traffic so it never hammers Redis; its token stage
//!    (reservations, no refunds) joins in only while Redis is unreachable, when the local
//!    stage is all that limits the worker (logged, counted in
//!    `honua_llm_limiter_local_fallback_total`);
//! 2. the fleet-wide bucket, one `llm_limit.lua` round trip on the server's clock that books
//!    the earliest slot within the caller's wait bound; the caller sleeps until its slot (a
//!    cancelled wait gives the slot back) and then confirms, in one more round trip, that
//!    no provider pause began meanwhile (a paused bucket takes the slot back).
//!
//! `acquire` waits at most `max_wait` in total and gives up early (returns `None`) once the
//! earliest admission lies beyond that bound, so a step never hogs its slot; the caller
//! yields (re-queued with a delay). A provider 429 pauses the bucket for the whole fleet
//! (`pause`), and each worker also remembers the pause locally. A bucket without limits
//! has only the pause: one read-only round trip checks it before each call. The same
//! acquire round trip also checks the bucket's fleet-wide circuit breaker
//! ([`LlmLimiter::with_fleet_breaker`]); [`LlmLimiter::breaker_report`] feeds it (+1 round
//! trip after a failure, a probe, or a success while failures are counted).
//!
//! A bucket with fair shares charges each call to its process type's and tenant's shares
//! ([`LlmLimiter::acquire_as`]) in the same acquire round trip; a share over its fair rate
//! is told when to ask again (one more round trip per refusal).
//!
//! Redis round trips per admitted LLM call: 1 for `acquire` when the bucket has room now;
//! 2 when the call had to wait for its slot (book + confirm); +1 after a provider pause
//! that ended within the wait bound; +1 for `settle` when the real usage differs from the
//! reservation. [`LlmLimiter::stats`] counts them.

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use honua_shared::limiter::{
    Admission, Asker, BreakerOutcome, BreakerSeen, BreakerSpec, LimitSpec,
};
use honua_shared::metrics as m;
use honua_shared::store::{Store, StoreError};
use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// What the caller must do when the limiter cannot admit.
#[derive(Debug, thiserror::Error)]
pub enum LimitError {
    /// The step was cancelled (claim stale, process cancelled, shutdown) while waiting.
    #[error("cancelled while waiting for the llm rate limiter")]
    Cancelled,
    /// The reservation exceeds what the bucket can ever hold: a permanent error.
    #[error("reservation of {tokens} tokens exceeds bucket {bucket}'s burst of {capacity} tokens")]
    TooLarge {
        bucket: String,
        tokens: u64,
        capacity: u64,
    },
    /// The bucket's fleet-wide circuit breaker is open (or another worker holds its one
    /// half-open probe) for `wait` more.
    #[error("circuit breaker for {bucket} is open")]
    BreakerOpen { bucket: String, wait: Duration },
    /// Redis could not be reached (settle only; acquire and pause fall back locally).
    #[error("llm rate limiter store unavailable: {0}")]
    Store(#[source] StoreError),
}

/// Counters of one limiter (all buckets), for reports and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LimiterStats {
    /// Calls of `acquire` on limited buckets.
    pub acquires: u64,
    /// Admissions granted.
    pub granted: u64,
    /// Admissions decided by the local stage alone (Redis unreachable).
    pub fallbacks: u64,
    /// `acquire` gave up (not within `max_wait`).
    pub timeouts: u64,
    /// Redis round trips made by `acquire` (book, confirm, re-check after a pause).
    pub acquire_round_trips: u64,
    /// Of `acquire_round_trips`, those of acquires that ended "not within max_wait".
    pub refused_round_trips: u64,
    /// Redis round trips made by `settle`.
    pub settle_round_trips: u64,
    /// Redis round trips made by `pause`.
    pub pause_round_trips: u64,
}

#[derive(Default)]
struct Counters {
    acquires: AtomicU64,
    granted: AtomicU64,
    fallbacks: AtomicU64,
    timeouts: AtomicU64,
    acquire_round_trips: AtomicU64,
    refused_round_trips: AtomicU64,
    settle_round_trips: AtomicU64,
    pause_round_trips: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// The local stage of one bucket.
struct Local {
    requests: Option<DefaultDirectRateLimiter>,
    tokens: Option<DefaultDirectRateLimiter>,
    token_capacity: u32,
}

fn governor(per_minute: f64, burst: u64) -> Option<DefaultDirectRateLimiter> {
    if per_minute <= 0.0 {
        return None;
    }
    let period = Duration::from_secs_f64(60.0 / per_minute).max(Duration::from_nanos(1));
    let burst = NonZeroU32::new(burst.clamp(1, u64::from(u32::MAX)) as u32)?;
    Quota::with_period(period).map(|q| RateLimiter::direct(q.allow_burst(burst)))
}

impl Local {
    fn new(spec: &LimitSpec, fraction: f64) -> Self {
        let req_burst = (f64::from(spec.request_capacity()) * fraction).ceil() as u64;
        let tok_burst = (spec.token_capacity() as f64 * fraction).ceil() as u64;
        Local {
            requests: governor(f64::from(spec.requests_per_minute) * fraction, req_burst),
            tokens: governor(spec.tokens_per_minute as f64 * fraction, tok_burst),
            token_capacity: tok_burst.clamp(1, u64::from(u32::MAX)) as u32,
        }
    }

    /// How long until one request passes the local stage; `ZERO` = taken now.
    fn take_request(&self) -> Duration {
        let clock = DefaultClock::default();
        match &self.requests {
            Some(r) => match r.check() {
                Ok(()) => Duration::ZERO,
                Err(not_until) => not_until
                    .wait_time_from(clock.now())
                    .max(Duration::from_millis(1)),
            },
            None => Duration::ZERO,
        }
    }

    /// How long until `tokens` pass the local stage; `ZERO` = taken now. Only used while
    /// Redis is unreachable: the local stage cannot refund, so while the fleet bucket works
    /// it would hold a worker to its reservations instead of its real usage.
    fn take_tokens(&self, tokens: u64) -> Duration {
        let clock = DefaultClock::default();
        // A reservation larger than the local share's burst takes the whole burst.
        let n = NonZeroU32::new(tokens.clamp(1, u64::from(self.token_capacity)) as u32)
            .unwrap_or(NonZeroU32::MIN);
        match &self.tokens {
            Some(t) => match t.check_n(n) {
                Ok(Ok(())) | Err(_) => Duration::ZERO,
                Ok(Err(not_until)) => not_until
                    .wait_time_from(clock.now())
                    .max(Duration::from_millis(1)),
            },
            None => Duration::ZERO,
        }
    }
}

struct Inner {
    store: Store,
    specs: BTreeMap<String, LimitSpec>,
    local: HashMap<String, Local>,
    /// Pauses this worker learned of (its own 429s), honoured even without Redis.
    paused: Mutex<HashMap<String, Instant>>,
    /// While set and in the future, Redis is not tried (it just failed).
    redis_down_until: Mutex<Option<Instant>>,
    redis_timeout: Duration,
    redis_retry_after: Duration,
    counters: Counters,
    /// The fleet-wide circuit breaker, checked in the acquire round trip.
    breaker: Option<BreakerSpec>,
}

/// The worker-side LLM limiter. Cheap to clone; one per worker process.
#[derive(Clone)]
pub struct LlmLimiter {
    inner: Arc<Inner>,
}

/// An admission: 1 request + `reserved` tokens on one bucket. Settle it with the real usage.
#[derive(Debug)]
#[must_use = "settle the permit with the provider's real usage"]
pub struct Permit {
    limiter: Option<LlmLimiter>,
    bucket: String,
    reserved: u64,
    waited: Duration,
    fleet: bool,
    breaker: Option<BreakerSeen>,
    /// The fair shares the call was charged to (settled with it).
    shares: Vec<String>,
}

impl std::fmt::Debug for LlmLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlmLimiter")
            .field("buckets", &self.inner.specs.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Permit {
    /// Time spent waiting for admission.
    pub fn waited(&self) -> Duration {
        self.waited
    }

    /// Whether Redis admitted this call (the fleet-wide bucket, or an unlimited bucket's
    /// pause check); false: the local stage alone while Redis was unreachable.
    pub fn fleet_wide(&self) -> bool {
        self.fleet
    }

    /// What Redis said of the bucket's fleet-wide circuit breaker; `None` when it was not
    /// asked (no fleet breaker configured, or Redis unreachable: the local breaker decides).
    pub fn fleet_breaker(&self) -> Option<BreakerSeen> {
        self.breaker
    }

    /// Tokens reserved.
    pub fn reserved(&self) -> u64 {
        self.reserved
    }

    /// Reconcile the reservation with the provider's real usage (refund or charge): at most
    /// one Redis round trip, none when the usage matches the reservation. On error the
    /// reservation simply stands (callers may log and go on).
    pub async fn settle(self, actual_tokens: u64) -> Result<(), LimitError> {
        self.finish(actual_tokens, false).await
    }

    /// The call was never sent: give the request and its tokens back to the bucket.
    pub async fn release(self) -> Result<(), LimitError> {
        self.finish(0, true).await
    }

    async fn finish(self, actual_tokens: u64, unused: bool) -> Result<(), LimitError> {
        let Some(limiter) = self.limiter else {
            return Ok(());
        };
        if !self.fleet || (actual_tokens == self.reserved && !unused) {
            return Ok(());
        }
        let inner = &limiter.inner;
        let Some(spec) = inner.specs.get(&self.bucket) else {
            return Ok(());
        };
        let call = inner.store.llm_settle(
            &self.bucket,
            spec,
            self.reserved,
            actual_tokens,
            unused,
            &self.shares,
        );
        match tokio::time::timeout(inner.redis_timeout, call).await {
            Ok(Ok(made)) => {
                if made {
                    bump(&inner.counters.settle_round_trips);
                }
                Ok(())
            }
            Ok(Err(e)) => {
                bump(&inner.counters.settle_round_trips);
                limiter.redis_failed(&e);
                Err(LimitError::Store(e))
            }
            Err(_) => {
                bump(&inner.counters.settle_round_trips);
                let e = timeout_error();
                limiter.redis_failed(&e);
                Err(LimitError::Store(e))
            }
        }
    }
}

fn timeout_error() -> StoreError {
    StoreError::Unavailable(redis::RedisError::from(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "llm limiter call timed out",
    )))
}

enum Wait {
    /// Not within the deadline yet: sleep, then re-check (a pause ending in time).
    Sleep(Duration),
    /// Admitted: the slot is booked `Duration` from now.
    Booked(Duration, BreakerSeen),
}

impl LlmLimiter {
    /// `specs` keyed by bucket name "provider/model" (config `llm.limits`); a bucket with no
    /// spec is unlimited (only its fleet-wide pause is checked).
    pub fn new(store: Store, specs: BTreeMap<String, LimitSpec>) -> Self {
        Self::with_options(store, specs, 1.0)
    }

    /// As [`LlmLimiter::new`], with the local stage set to `local_fraction` of each spec
    /// (e.g. 1/expected workers to spread the fleet's budget evenly; 1.0 lets one worker
    /// use the whole budget). The local stage is also the only limit while Redis is down.
    pub fn with_options(
        store: Store,
        specs: BTreeMap<String, LimitSpec>,
        local_fraction: f64,
    ) -> Self {
        let fraction = if local_fraction.is_finite() && local_fraction > 0.0 {
            local_fraction.min(1.0)
        } else {
            1.0
        };
        let specs: BTreeMap<String, LimitSpec> = specs
            .into_iter()
            .filter(|(_, s)| !s.is_unlimited())
            .collect();
        let local = specs
            .iter()
            .map(|(b, s)| (b.clone(), Local::new(s, fraction)))
            .collect();
        LlmLimiter {
            inner: Arc::new(Inner {
                store,
                specs,
                local,
                paused: Mutex::new(HashMap::new()),
                redis_down_until: Mutex::new(None),
                redis_timeout: Duration::from_secs(1),
                redis_retry_after: Duration::from_secs(1),
                counters: Counters::default(),
                breaker: None,
            }),
        }
    }

    /// Keeps a fleet-wide circuit breaker per bucket in Redis, checked in the same round
    /// trip as the admission (call before cloning the limiter).
    pub fn with_fleet_breaker(mut self, spec: BreakerSpec) -> Self {
        match Arc::get_mut(&mut self.inner) {
            Some(inner) => inner.breaker = Some(spec),
            None => tracing::error!("llm limiter: fleet breaker set after cloning; ignored"),
        }
        self
    }

    /// Reports a call's outcome to the bucket's fleet-wide breaker (only for permits that
    /// Redis gated). `Some(open for)` when the breaker is (now) open; `None` when closed or
    /// Redis could not be reached (the local breaker is the fallback).
    pub async fn breaker_report(
        &self,
        bucket: &str,
        outcome: BreakerOutcome,
        probe: bool,
    ) -> Option<Duration> {
        let spec = self.inner.breaker?;
        let call = self.inner.store.llm_breaker(bucket, &spec, outcome, probe);
        match tokio::time::timeout(self.inner.redis_timeout, call).await {
            Ok(Ok(open)) => open,
            Ok(Err(e)) => {
                self.redis_failed(&e);
                None
            }
            Err(_) => {
                self.redis_failed(&timeout_error());
                None
            }
        }
    }

    /// What a permit reports of the fleet breaker: nothing unless one is configured.
    fn gated(&self, seen: Option<BreakerSeen>) -> Option<BreakerSeen> {
        seen.filter(|_| self.inner.breaker.is_some())
    }

    /// Counters since start.
    pub fn stats(&self) -> LimiterStats {
        let c = &self.inner.counters;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        LimiterStats {
            acquires: g(&c.acquires),
            granted: g(&c.granted),
            fallbacks: g(&c.fallbacks),
            timeouts: g(&c.timeouts),
            acquire_round_trips: g(&c.acquire_round_trips),
            refused_round_trips: g(&c.refused_round_trips),
            settle_round_trips: g(&c.settle_round_trips),
            pause_round_trips: g(&c.pause_round_trips),
        }
    }

    /// The spec of `bucket`, if it is limited.
    pub fn spec(&self, bucket: &str) -> Option<&LimitSpec> {
        self.inner.specs.get(bucket)
    }

    fn redis_failed(&self, e: &StoreError) {
        let mut down = self.inner.redis_down_until.lock().unwrap();
        if down.is_none_or(|t| t <= Instant::now()) {
            tracing::warn!(error = %e, "llm limiter: redis unreachable, using the local stage only");
        }
        *down = Some(Instant::now() + self.inner.redis_retry_after);
    }

    fn redis_usable(&self) -> bool {
        self.inner
            .redis_down_until
            .lock()
            .unwrap()
            .is_none_or(|t| t <= Instant::now())
    }

    fn local_pause(&self, bucket: &str) -> Option<Instant> {
        let now = Instant::now();
        let mut p = self.inner.paused.lock().unwrap();
        match p.get(bucket) {
            Some(&t) if t > now => Some(t),
            Some(_) => {
                p.remove(bucket);
                None
            }
            None => None,
        }
    }

    /// Reserve 1 request + `tokens` (prompt estimate + max_tokens) on `bucket`, waiting at
    /// most `max_wait`. `Ok(Some(permit))` = go; `Ok(None)` = not within `max_wait` (the
    /// caller yields). Respects a fleet-wide pause set by [`LlmLimiter::pause`]. Returns
    /// `Err(Cancelled)` promptly when `cancel` fires.
    pub async fn acquire(
        &self,
        bucket: &str,
        tokens: u64,
        max_wait: Duration,
        cancel: &CancellationToken,
    ) -> Result<Option<Permit>, LimitError> {
        self.acquire_as(bucket, None, tokens, max_wait, cancel)
            .await
    }

    /// As [`LlmLimiter::acquire`], charging the call to `asker`'s fair shares of the bucket
    /// (its process type's and tenant's) when the bucket has shares. A share over its fair
    /// rate waits (within `max_wait`) until it may go again. While Redis is unreachable the
    /// local stage alone decides, without shares.
    pub async fn acquire_as(
        &self,
        bucket: &str,
        asker: Option<&Asker>,
        tokens: u64,
        max_wait: Duration,
        cancel: &CancellationToken,
    ) -> Result<Option<Permit>, LimitError> {
        let Some(spec) = self.inner.specs.get(bucket) else {
            let start = Instant::now();
            let admitted = self.unlimited(bucket, start + max_wait, cancel).await?;
            return Ok(admitted.map(|breaker| Permit {
                limiter: None,
                bucket: bucket.to_string(),
                reserved: tokens,
                waited: start.elapsed(),
                fleet: breaker.is_some(),
                breaker: self.gated(breaker),
                shares: vec![],
            }));
        };
        if spec.tokens_per_minute > 0 && tokens > spec.token_capacity() {
            return Err(LimitError::TooLarge {
                bucket: bucket.to_string(),
                tokens,
                capacity: spec.token_capacity(),
            });
        }
        let c = &self.inner.counters;
        bump(&c.acquires);
        let start = Instant::now();
        let deadline = start + max_wait;
        let mut round_trips = 0u64;
        let nobody = Asker::default();
        let asker = asker.unwrap_or(&nobody);
        let shares = spec.share_fields(asker);
        let result = self
            .acquire_inner(
                (bucket, spec, asker, &shares),
                tokens,
                deadline,
                cancel,
                &mut round_trips,
            )
            .await;
        let waited = start.elapsed();
        let outcome = match &result {
            Ok(Some(_)) => "granted",
            Ok(None) => "timeout",
            Err(LimitError::Cancelled) => "cancelled",
            Err(LimitError::BreakerOpen { .. }) => "breaker_open",
            Err(_) => "error",
        };
        metrics::histogram!(m::LLM_LIMITER_WAIT, "bucket" => bucket.to_string(), "outcome" => outcome)
            .record(waited.as_secs_f64());
        match result {
            Ok(Some(breaker)) => {
                let fleet = breaker.is_some();
                bump(&c.granted);
                if !fleet {
                    bump(&c.fallbacks);
                    metrics::counter!(m::LLM_LIMITER_FALLBACK, "bucket" => bucket.to_string())
                        .increment(1);
                }
                Ok(Some(Permit {
                    limiter: Some(self.clone()),
                    bucket: bucket.to_string(),
                    reserved: tokens,
                    waited,
                    fleet,
                    breaker: self.gated(breaker),
                    shares: if fleet { shares } else { vec![] },
                }))
            }
            Ok(None) => {
                bump(&c.timeouts);
                c.refused_round_trips
                    .fetch_add(round_trips, Ordering::Relaxed);
                metrics::counter!(m::LLM_RATE_LIMITED, "bucket" => bucket.to_string(), "source" => "limiter")
                    .increment(1);
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Sleeps `d` unless that passes `deadline` (→ false) or `cancel` fires.
    async fn sleep(
        d: Duration,
        deadline: Instant,
        cancel: &CancellationToken,
    ) -> Result<bool, LimitError> {
        let until = Instant::now() + d;
        if until > deadline {
            return Ok(false);
        }
        tokio::select! {
            _ = cancel.cancelled() => Err(LimitError::Cancelled),
            _ = tokio::time::sleep_until(until) => Ok(true),
        }
    }

    /// `Some(Some(breaker))` admitted fleet-wide, `Some(None)` admitted by the local stage
    /// alone (Redis unreachable), `None` not within the deadline.
    async fn acquire_inner(
        &self,
        (bucket, spec, asker, shares): (&str, &LimitSpec, &Asker, &[String]),
        tokens: u64,
        deadline: Instant,
        cancel: &CancellationToken,
        round_trips: &mut u64,
    ) -> Result<Option<Option<BreakerSeen>>, LimitError> {
        if cancel.is_cancelled() {
            return Err(LimitError::Cancelled);
        }
        // Stage 0: a pause this worker knows of.
        if let Some(until) = self.local_pause(bucket)
            && !Self::sleep(until - Instant::now(), deadline, cancel).await?
        {
            return Ok(None);
        }
        // Stage 1: the local share of requests.
        let local = &self.inner.local[bucket];
        loop {
            let w = local.take_request();
            if w.is_zero() {
                break;
            }
            if !Self::sleep(w, deadline, cancel).await? {
                return Ok(None);
            }
        }
        // Stage 2: the fleet-wide bucket (requests and tokens).
        loop {
            if !self.redis_usable() {
                return self.local_tokens(local, tokens, deadline, cancel).await;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            *round_trips += 1;
            match self
                .fleet_attempt(bucket, spec, Some(asker), tokens, left)
                .await
            {
                Ok(Wait::Booked(w, seen)) => {
                    if !w.is_zero() {
                        tokio::select! {
                            _ = cancel.cancelled() => {
                                self.give_back(bucket, spec, tokens, shares).await;
                                if seen == BreakerSeen::Probe {
                                    self.breaker_report(bucket, BreakerOutcome::Abandon, true).await;
                                }
                                return Err(LimitError::Cancelled);
                            }
                            _ = tokio::time::sleep(w) => {}
                        }
                        // A provider pause may have begun while this call waited for its
                        // slot: it must not go out now.
                        *round_trips += 1;
                        match self.confirm(bucket, spec, tokens, shares).await {
                            Ok(None) => {}
                            Ok(Some(pause)) => {
                                if seen == BreakerSeen::Probe {
                                    self.breaker_report(bucket, BreakerOutcome::Abandon, true)
                                        .await;
                                }
                                if !Self::sleep(pause, deadline, cancel).await? {
                                    return Ok(None);
                                }
                                continue;
                            }
                            Err(e) => {
                                self.redis_failed(&e);
                                return self.local_tokens(local, tokens, deadline, cancel).await;
                            }
                        }
                    }
                    return Ok(Some(Some(seen)));
                }
                Ok(Wait::Sleep(w)) => {
                    if !Self::sleep(w, deadline, cancel).await? {
                        return Ok(None);
                    }
                }
                Err(LimitError::Store(e)) => {
                    self.redis_failed(&e);
                    return self.local_tokens(local, tokens, deadline, cancel).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// An unlimited bucket has no GCRA state, only the fleet-wide pause key: one round trip
    /// reads it (the local pause holds while Redis is unreachable). `Some(Some(breaker))`
    /// go (checked in Redis), `Some(None)` go (local stage only), `None` the pause outlasts
    /// the deadline.
    async fn unlimited(
        &self,
        bucket: &str,
        deadline: Instant,
        cancel: &CancellationToken,
    ) -> Result<Option<Option<BreakerSeen>>, LimitError> {
        const UNLIMITED: LimitSpec = LimitSpec {
            requests_per_minute: 0,
            tokens_per_minute: 0,
            burst_requests: 0,
            burst_tokens: 0,
            shares: BTreeMap::new(),
            tenant_shares: BTreeMap::new(),
            share_window_ms: 0,
        };
        loop {
            if cancel.is_cancelled() {
                return Err(LimitError::Cancelled);
            }
            if let Some(until) = self.local_pause(bucket) {
                if !Self::sleep(until - Instant::now(), deadline, cancel).await? {
                    return Ok(None);
                }
                continue;
            }
            if !self.redis_usable() {
                return Ok(Some(None));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.fleet_attempt(bucket, &UNLIMITED, None, 0, left).await {
                Ok(Wait::Booked(_, seen)) => return Ok(Some(Some(seen))),
                // A pause: `fleet_attempt` recorded it locally; the loop sleeps it out.
                Ok(Wait::Sleep(w)) => {
                    if !Self::sleep(w, deadline, cancel).await? {
                        return Ok(None);
                    }
                }
                Err(LimitError::Store(e)) => {
                    self.redis_failed(&e);
                    return Ok(Some(None));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The fallback: the local token stage alone.
    async fn local_tokens(
        &self,
        local: &Local,
        tokens: u64,
        deadline: Instant,
        cancel: &CancellationToken,
    ) -> Result<Option<Option<BreakerSeen>>, LimitError> {
        loop {
            let w = local.take_tokens(tokens);
            if w.is_zero() {
                return Ok(Some(None));
            }
            if !Self::sleep(w, deadline, cancel).await? {
                return Ok(None);
            }
        }
    }

    /// After waiting for a booked slot: `Some(wait)` when the bucket was paused meanwhile
    /// (the slot was given back; the pause ends in `wait`).
    async fn confirm(
        &self,
        bucket: &str,
        spec: &LimitSpec,
        tokens: u64,
        shares: &[String],
    ) -> Result<Option<Duration>, StoreError> {
        bump(&self.inner.counters.acquire_round_trips);
        let call = self.inner.store.llm_confirm(bucket, spec, tokens, shares);
        let pause = match tokio::time::timeout(self.inner.redis_timeout, call).await {
            Ok(r) => r?,
            Err(_) => return Err(timeout_error()),
        };
        if let Some(wait) = pause {
            let mut p = self.inner.paused.lock().unwrap();
            let until = Instant::now() + wait;
            let e = p.entry(bucket.to_string()).or_insert(until);
            *e = (*e).max(until);
        }
        Ok(pause)
    }

    /// Returns a booked slot that will not be used (cancelled while waiting for it).
    async fn give_back(&self, bucket: &str, spec: &LimitSpec, tokens: u64, shares: &[String]) {
        bump(&self.inner.counters.settle_round_trips);
        let call = self
            .inner
            .store
            .llm_settle(bucket, spec, tokens, 0, true, shares);
        match tokio::time::timeout(self.inner.redis_timeout, call).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => self.redis_failed(&e),
            Err(_) => self.redis_failed(&timeout_error()),
        }
    }

    async fn fleet_attempt(
        &self,
        bucket: &str,
        spec: &LimitSpec,
        asker: Option<&Asker>,
        tokens: u64,
        max_wait: Duration,
    ) -> Result<Wait, LimitError> {
        let inner = &self.inner;
        bump(&inner.counters.acquire_round_trips);
        let lease = inner.breaker.map(|b| b.probe_lease);
        let call = inner
            .store
            .llm_acquire_as(bucket, spec, asker, tokens, max_wait, lease);
        let (admission, seen) = match tokio::time::timeout(inner.redis_timeout, call).await {
            Ok(Ok(a)) => a,
            Ok(Err(e)) => return Err(LimitError::Store(e)),
            Err(_) => return Err(LimitError::Store(timeout_error())),
        };
        match admission {
            Admission::Granted { wait } => Ok(Wait::Booked(wait, seen)),
            Admission::BreakerOpen { wait } => Err(LimitError::BreakerOpen {
                bucket: bucket.to_string(),
                wait,
            }),
            Admission::Wait { wait, paused } => {
                if paused {
                    let mut p = inner.paused.lock().unwrap();
                    let until = Instant::now() + wait;
                    let e = p.entry(bucket.to_string()).or_insert(until);
                    *e = (*e).max(until);
                }
                // Never spin on a zero wait; re-check soon after the bucket could admit.
                Ok(Wait::Sleep(wait.max(Duration::from_millis(1))))
            }
            Admission::TooLarge => Err(LimitError::TooLarge {
                bucket: bucket.to_string(),
                tokens,
                capacity: spec.token_capacity(),
            }),
        }
    }

    /// Provider said 429 / Retry-After: pause this bucket for every worker of the fleet
    /// (and locally, so the pause holds even while Redis is unreachable). A pause never
    /// shortens a longer one. Unlimited buckets are paused fleet-wide too (the pause key
    /// alone, no GCRA state).
    pub async fn pause(&self, bucket: &str, for_: Duration) -> Result<(), LimitError> {
        metrics::counter!(m::LLM_RATE_LIMITED, "bucket" => bucket.to_string(), "source" => "provider")
            .increment(1);
        {
            let mut p = self.inner.paused.lock().unwrap();
            let until = Instant::now() + for_;
            let e = p.entry(bucket.to_string()).or_insert(until);
            *e = (*e).max(until);
        }
        if !self.redis_usable() {
            return Ok(());
        }
        bump(&self.inner.counters.pause_round_trips);
        let call = self.inner.store.llm_pause(bucket, for_);
        let err = match tokio::time::timeout(self.inner.redis_timeout, call).await {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(e)) => e,
            Err(_) => timeout_error(),
        };
        // The local pause holds; the rest of the fleet learns from its own 429s.
        self.redis_failed(&err);
        Ok(())
    }
}

//! The console's pages and actions. Every page answers from bounded Redis reads: index
//! ranges and counts, one page of records, the newest entries of a stream.

use super::{
    UiError, Viewer, dag, error_page, html_response, layout, page, refuse_form, refuse_page,
};
use crate::gateway::fleet::{self, LIVE_WORKER_MS};
use crate::gateway::processes::{page_limit, process_view};
use crate::gateway::{ApiState, Caller, DlqParams};
use crate::ops::{ListQuery, parse_age};
use crate::view::{LlmUsageView, ProcessSummary, ProcessView, rfc3339_ms};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::{Extension, Form, Json};
use honua_shared::limiter::{BreakerState, BucketState, LimitSpec};
use honua_shared::llm_config::{LlmProviderConfig, ProviderKind};
use honua_shared::status::{ProcessStatus, StepStatus};
use honua_shared::store::{Store, TypeCounts};
use maud::{Markup, html};
use serde::Deserialize;
use serde_json::Value;

/// Decoded state shown inline up to this many bytes of JSON; the rest is in the download.
const STATE_CAP: usize = 16 * 1024;
/// Processes a bulk action touches at most (one page of the listing).
const BULK_MAX: usize = 500;
const MINUTE_MS: u64 = 60_000;
const FINISHED: [ProcessStatus; 4] = [
    ProcessStatus::Completed,
    ProcessStatus::Failed,
    ProcessStatus::Cancelled,
    ProcessStatus::TimedOut,
];

fn status_badge(s: &str) -> Markup {
    html! { span class={"badge st-" (s)} { (s) } }
}

fn age(ms: u64) -> String {
    let d = std::time::Duration::from_millis(ms - ms % 1000);
    if d.is_zero() {
        "<1s".into()
    } else {
        humantime::format_duration(d).to_string()
    }
}

fn opt(s: &Option<String>) -> &str {
    s.as_deref().unwrap_or("—")
}

/// An empty query field is no filter.
fn filled(s: &Option<String>) -> Option<&str> {
    s.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

// ---------------------------------------------------------------------------------------
// Overview

/// `ZCOUNT`s of one status index over `ranges`, summed over the partitions.
async fn index_counts(
    parts: &[Store],
    status: ProcessStatus,
    ranges: &[(u64, u64)],
) -> Result<Vec<u64>, UiError> {
    let mut out = vec![0u64; ranges.len()];
    for p in parts {
        add(
            &mut out,
            &p.index_counts(&p.keys().index_status(status), ranges)
                .await?,
        );
    }
    Ok(out)
}

fn add(into: &mut [u64], more: &[u64]) {
    for (a, b) in into.iter_mut().zip(more) {
        *a += b;
    }
}

pub(super) async fn overview(
    State(st): State<ApiState>,
    Extension(viewer): Extension<Viewer>,
    headers: HeaderMap,
) -> Result<Response, UiError> {
    let store = &st.engine.store;
    // Every figure sums the deployment's partitions (one with the default layout).
    let parts = store.all();
    let now = store.server_time_ms().await?;
    // Per minute over the last hour, from the finished indexes (scored by end time): one
    // ZCOUNT per minute and status, no write anywhere.
    let first = (now / MINUTE_MS + 1) * MINUTE_MS - 60 * MINUTE_MS;
    let minutes: Vec<(u64, u64)> = (0..60)
        .map(|i| (first + i * MINUTE_MS, first + (i + 1) * MINUTE_MS))
        .collect();
    let completed = index_counts(&parts, ProcessStatus::Completed, &minutes).await?;
    let mut failed = vec![0u64; minutes.len()];
    for s in [ProcessStatus::Failed, ProcessStatus::TimedOut] {
        add(&mut failed, &index_counts(&parts, s, &minutes).await?);
    }
    let windows = [
        (now.saturating_sub(3_600_000), now + 1),
        (now.saturating_sub(86_400_000), now + 1),
    ];
    let mut finished = Vec::new();
    for s in FINISHED {
        finished.push((s, index_counts(&parts, s, &windows).await?));
    }
    let (mut active, mut oldest, mut paused, mut pending) = (0, None::<u64>, 0, 0);
    let mut draining = false;
    for p in &parts {
        let (n, o) = p.active_summary().await?;
        active += n;
        oldest = match (oldest, o) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        paused += p.status_count(ProcessStatus::Paused).await?;
        pending += p.status_count(ProcessStatus::Pending).await?;
        draining |= p.intake().await?.is_some();
    }
    let live = store
        .live_workers(now.saturating_sub(LIVE_WORKER_MS - 1))
        .await?;
    let Json(queues) = fleet::queues(State(st.clone())).await?;
    // LLM tokens and spend today per process type: the daily counters the budget script
    // keeps (in each process's partition).
    let mut types: Vec<&str> = st.engine.defs.iter().map(|d| d.name.as_str()).collect();
    types.dedup();
    let day = honua_shared::llm_store::utc_day(now / 1000);
    let mut usage = vec![(0u64, 0u64); types.len()];
    for p in &parts {
        for (u, (n, c)) in usage.iter_mut().zip(p.llm_usage_on(&types, &day).await?) {
            u.0 += n;
            u.1 += c;
        }
    }
    let llm: Vec<(&str, (u64, u64))> = types
        .iter()
        .copied()
        .zip(usage)
        .filter(|(_, (n, c))| *n > 0 || *c > 0)
        .collect();
    let spent: u64 = llm.iter().map(|(_, (_, c))| c).sum();
    // Per process type: unfinished now, finished in the last hour and day (the counters
    // the finishing commits keep; one pipelined round trip per partition).
    let mut per_type = store.type_counts(&types, now).await?;
    for p in parts.iter().skip(1) {
        for (t, more) in per_type.iter_mut().zip(p.type_counts(&types, now).await?) {
            t.active += more.active;
            for (f, m) in t.finished.iter_mut().zip(more.finished) {
                f.1 += m.1;
                f.2 += m.2;
            }
        }
    }
    let limiter = limiter_states(&st).await?;
    let live_region = html! {
        section aria-labelledby="counts" {
            h2 #counts { "Processes" }
            div.cards {
                div.card { span.big { (active) } " active" @if let Some(o) = oldest { br; small { "oldest " (age(now.saturating_sub(o))) " old" } } }
                div.card { span.big { (paused) } " paused" }
                div.card { span.big { (pending) } " pending" @if draining { br; small { "intake drained" } } }
                div.card { span.big { (live) } " live workers" }
            }
            table {
                caption { "Finished processes" }
                thead { tr { th scope="col" { "Status" } th scope="col" { "Last hour" } th scope="col" { "Last day" } } }
                tbody {
                    @for (s, n) in &finished {
                        tr { th scope="row" { (status_badge(s.as_str())) } td { (n[0]) } td { (n[1]) } }
                    }
                }
            }
        }
        section aria-labelledby="types" {
            h2 #types { "Per process type" }
            (type_table(&per_type))
        }
        section aria-labelledby="chart" {
            h2 #chart { "Throughput, last hour" }
            (throughput_chart(&completed, &failed))
        }
        section aria-labelledby="llm" {
            h2 #llm { "LLM usage today (UTC)" }
            @if llm.is_empty() { p { "No LLM step has been charged today." } } @else {
                p.note { "Spend is estimated from the configured price table, each call rounded to a micro-dollar; models without a price count as $0." }
                table {
                    caption { "Tokens and spend per process type" }
                    thead { tr { th scope="col" { "Process type" } th scope="col" { "Tokens" } th scope="col" { "Spend (USD)" } } }
                    tbody { @for (t, (n, c)) in &llm { tr data-micro-usd=(c) { th scope="row" { (t) } td { (n) } td { (usd(*c)) } } } }
                    tfoot { tr #llm-total data-micro-usd=(spent) { th scope="row" { "Total" } td { (llm.iter().map(|(_, (n, _))| n).sum::<u64>()) } td { (usd(spent)) } } }
                }
            }
        }
        @if let Some((cfg, states)) = &limiter {
            section aria-labelledby="limiter" {
                h2 #limiter { "LLM limiter" }
                (limiter_table(cfg, states))
            }
        }
        section aria-labelledby="queues" {
            h2 #queues { "Queues" }
            table {
                thead { tr { th scope="col" { "Stream" } th scope="col" { "Length" } th scope="col" { "Lag" } th scope="col" { "Pending" } th scope="col" { "Oldest pending" } th scope="col" { "Consumers" } } }
                tbody {
                    @for q in &queues {
                        tr {
                            td { code { (q.stream) } }
                            td { (q.length) }
                            td { (q.lag.map_or("—".into(), |l| l.to_string())) }
                            td { (q.pending) }
                            td { (q.oldest_pending_age_ms.map_or("—".into(), age)) }
                            td { (q.consumers) }
                        }
                    }
                }
            }
        }
    };
    Ok(page(&viewer, &headers, "Overview", html! {}, live_region))
}

/// Active / completed / failed (and cancelled) per process type, last hour and last day.
fn type_table(rows: &[TypeCounts]) -> Markup {
    let n = |r: &TypeCounts, s: ProcessStatus| {
        r.finished
            .iter()
            .find(|(st, _, _)| *st == s)
            .map_or((0, 0), |(_, h, d)| (*h, *d))
    };
    // Failed and timed out together, as on the chart.
    let failed = |r: &TypeCounts| {
        let (a, b) = (n(r, ProcessStatus::Failed), n(r, ProcessStatus::TimedOut));
        (a.0 + b.0, a.1 + b.1)
    };
    html! {
        table #per-type {
            caption { "Unfinished now; finished in the last hour and the last 24 hours (from the counters each finish updates)" }
            thead {
                tr {
                    th scope="col" rowspan="2" { "Process type" }
                    th scope="col" rowspan="2" { "Active" }
                    th scope="colgroup" colspan="2" { "Completed" }
                    th scope="colgroup" colspan="2" { "Failed or timed out" }
                    th scope="colgroup" colspan="2" { "Cancelled" }
                }
                tr {
                    @for _ in 0..3 { th scope="col" { "Hour" } th scope="col" { "Day" } }
                }
            }
            tbody {
                @for r in rows {
                    @let c = n(r, ProcessStatus::Completed);
                    @let f = failed(r);
                    @let x = n(r, ProcessStatus::Cancelled);
                    tr data-type=(r.process_type) data-active=(r.active) data-completed-hour=(c.0) data-completed-day=(c.1)
                        data-failed-hour=(f.0) data-failed-day=(f.1) {
                        th scope="row" { (r.process_type) }
                        td { (r.active) }
                        td { (c.0) } td { (c.1) }
                        td { (f.0) } td { (f.1) }
                        td { (x.0) } td { (x.1) }
                    }
                }
            }
        }
    }
}

/// The buckets the console shows: every configured limit, and the buckets of the model
/// selection of the primary and fallback providers (unlimited ones still pause on a 429 and
/// have a breaker).
fn limiter_buckets(llm: &LlmProviderConfig) -> Vec<String> {
    let mut out: Vec<String> = llm.limits.keys().cloned().collect();
    let mut add = |kind: ProviderKind, sel: &honua_shared::llm_config::ModelSelection| {
        for m in [&sel.simple_task, &sel.complex_task, &sel.code_generation] {
            let b = format!("{kind}/{m}");
            if !m.is_empty() && !out.contains(&b) {
                out.push(b);
            }
        }
    };
    add(llm.provider, &llm.model_selection);
    if let Some(fb) = llm.fallback_provider {
        add(
            fb,
            llm.fallback_model_selection
                .as_ref()
                .unwrap_or(&llm.model_selection),
        );
    }
    out
}

/// The limiter state of every bucket, read in one round trip; `None` without an LLM provider.
async fn limiter_states(
    st: &ApiState,
) -> Result<Option<(LlmProviderConfig, Vec<BucketState>)>, UiError> {
    let Some(llm) = st.engine.cfg.llm_provider.clone() else {
        return Ok(None);
    };
    let buckets = limiter_buckets(&llm);
    let names: Vec<&str> = buckets.iter().map(String::as_str).collect();
    let states = st.engine.store.llm_bucket_states(&names).await?;
    Ok(Some((llm, states)))
}

/// Micro-USD as dollars.
fn usd(micro: u64) -> String {
    format!("${:.4}", micro as f64 / 1e6)
}

fn us_to_rfc3339(us: f64) -> String {
    rfc3339_ms((us / 1000.0) as u64).unwrap_or_default()
}

/// One dimension of a bucket: "fill of capacity · limit per minute", or "unlimited".
fn fill_cell(fill: f64, capacity: u64, per_minute: u64, unit: &str) -> Markup {
    html! {
        @if per_minute == 0 { "unlimited" } @else {
            (format!("{fill:.1}")) " of " (capacity) " · " (per_minute) " " (unit) "/min"
        }
    }
}

fn limiter_table(llm: &LlmProviderConfig, states: &[BucketState]) -> Markup {
    let unlimited = LimitSpec::default();
    html! {
        p.note {
                "Each bucket is a GCRA token bucket shared by the fleet. \u{201c}In bucket\u{201d} is "
                "(theoretical arrival time \u{2212} now) \u{00f7} emission interval: the requests "
                "(tokens) admitted recently that have not refilled yet, of the bucket's capacity "
                "(its burst). It drains at the per-minute limit, so it is not a count per minute: "
                "steady traffic below the limit keeps it near 0, and at the capacity calls wait."
        }
        table.limiter {
            caption { "Limiter state per bucket" }
            thead { tr {
                th scope="col" { "Bucket" }
                th scope="col" { abbr title="requests admitted and not yet refilled, of the bucket's capacity; then the limit per minute" { "Requests in bucket" } }
                th scope="col" { abbr title="tokens admitted and not yet refilled, of the bucket's capacity; then the limit per minute" { "Tokens in bucket" } }
                th scope="col" { "Paused until" }
                th scope="col" { "Breaker" }
            } }
            tbody {
                @for b in states {
                    @let spec = llm.limits.get(&b.bucket).unwrap_or(&unlimited);
                    @let rf = b.request_fill(spec);
                    @let tf = b.token_fill(spec);
                    tr data-bucket=(b.bucket) data-req-fill=(format!("{rf:.3}")) data-tok-fill=(format!("{tf:.3}"))
                        data-paused=(if b.paused_until_us.is_some() { "yes" } else { "no" }) {
                        th scope="row" { code { (b.bucket) } }
                        td { (fill_cell(rf, u64::from(spec.request_capacity()), u64::from(spec.requests_per_minute), "requests")) }
                        td { (fill_cell(tf, spec.token_capacity(), spec.tokens_per_minute, "tokens")) }
                        td { @match b.paused_until_us { Some(u) => (us_to_rfc3339(u)), None => "not paused" } }
                        td {
                            @match b.breaker {
                                BreakerState::Closed => "closed",
                                BreakerState::Failing { fails } => { "closed, " (fails) " failures counted" }
                                BreakerState::Open { until_us } => { "open until " (us_to_rfc3339(until_us)) }
                                BreakerState::HalfOpen => "half-open (the next call probes)",
                                BreakerState::Probing { until_us } => { "half-open, probing until " (us_to_rfc3339(until_us)) }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Completed (and failed or timed out) processes per minute as an SVG bar chart, with the
/// same numbers in a table for screen readers.
fn throughput_chart(completed: &[u64], failed: &[u64]) -> Markup {
    let (w, h, bar) = (600u64, 120u64, 10u64);
    let max = completed
        .iter()
        .zip(failed)
        .map(|(c, f)| c + f)
        .max()
        .unwrap_or(0)
        .max(1);
    let total_c: u64 = completed.iter().sum();
    let total_f: u64 = failed.iter().sum();
    let rate = if total_c + total_f == 0 {
        0.0
    } else {
        total_f as f64 * 100.0 / (total_c + total_f) as f64
    };
    html! {
        p { (total_c) " completed, " (total_f) " failed or timed out (" (format!("{rate:.1}")) "% failures); peak " (max) " per minute." }
        svg.chart viewBox={"0 0 " (w) " " (h + 16)} role="img" aria-label={"Processes finished per minute over the last hour: " (total_c) " completed, " (total_f) " failed"} {
            line.axis x1="0" y1=(h) x2=(w) y2=(h) {}
            @for (i, (c, f)) in completed.iter().zip(failed).enumerate() {
                @let x = i as u64 * bar;
                @let hc = c * h / max;
                @let hf = f * h / max;
                rect.ok x=(x) y=(h - hc) width=(bar - 2) height=(hc) {}
                rect.bad x=(x) y=(h - hc - hf) width=(bar - 2) height=(hf) {}
            }
            text x="0" y=(h + 14) { "−60 min" }
            text x=(w) y=(h + 14) text-anchor="end" { "now" }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Processes

#[derive(Debug, Default, Deserialize)]
pub(super) struct ListForm {
    status: Option<String>,
    #[serde(rename = "type")]
    process_type: Option<String>,
    since: Option<String>,
    q: Option<String>,
    cursor: Option<String>,
}

const SINCE: &[(&str, &str)] = &[
    ("", "any time"),
    ("15m", "15 minutes"),
    ("1h", "1 hour"),
    ("24h", "24 hours"),
    ("7d", "7 days"),
];

const STATUSES: &[&str] = &[
    "Pending",
    "Running",
    "WaitingForApproval",
    "Paused",
    "Completed",
    "Failed",
    "Cancelled",
    "TimedOut",
];

fn list_query(f: &ListForm, limit: usize) -> Result<ListQuery, UiError> {
    let status = filled(&f.status)
        .map(|s| {
            s.parse::<ProcessStatus>().map_err(|_| {
                UiError::from(crate::ops::OpsError::Invalid(format!(
                    "unknown status {s:?}"
                )))
            })
        })
        .transpose()?;
    Ok(ListQuery {
        status,
        since: filled(&f.since).map(parse_age).transpose()?,
        process_type: filled(&f.process_type).map(str::to_string),
        limit,
        cursor: filled(&f.cursor).map(str::to_string),
        active: false,
    })
}

fn filter_qs(f: &ListForm) -> String {
    let mut s = url_pairs(&[
        ("status", filled(&f.status)),
        ("type", filled(&f.process_type)),
        ("since", filled(&f.since)),
    ]);
    if s.is_empty() {
        s.push('?');
    }
    s
}

fn url_pairs(pairs: &[(&str, Option<&str>)]) -> String {
    let enc = |v: &str| {
        percent_encoding::utf8_percent_encode(v, percent_encoding::NON_ALPHANUMERIC).to_string()
    };
    let parts: Vec<String> = pairs
        .iter()
        .filter_map(|(k, v)| v.map(|v| format!("{k}={}", enc(v))))
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!("?{}", parts.join("&"))
    }
}

pub(super) async fn processes(
    State(st): State<ApiState>,
    Extension(viewer): Extension<Viewer>,
    headers: HeaderMap,
    Query(f): Query<ListForm>,
) -> Result<Response, UiError> {
    // Search: a process id, else an idempotency key.
    if let Some(q) = filled(&f.q) {
        if honua_shared::envelope::valid_id(q) {
            if st.engine.load(q).await.is_ok() {
                return Ok(Redirect::to(&format!("/ui/processes/{q}")).into_response());
            }
            if let Some(id) = st.engine.store.idempotent_process(q).await? {
                return Ok(Redirect::to(&format!("/ui/processes/{id}")).into_response());
            }
        }
        return Ok(error_page(
            Some(&viewer),
            StatusCode::NOT_FOUND,
            &format!("no process has the id or idempotency key {q:?}"),
        ));
    }
    let q = list_query(&f, 50)?;
    let (recs, next) = st.engine.list(&q).await?;
    let now = st.engine.store.server_time_ms().await?;
    let items: Vec<ProcessSummary> = recs.iter().map(|r| ProcessSummary::new(r, now)).collect();
    let mut types: Vec<String> = st.engine.defs.iter().map(|d| d.name.clone()).collect();
    types.dedup();
    let may_bulk = viewer.may("/api/processes/{id}/retry");
    let before = html! {
        form.filters method="get" action="/ui/processes" {
            label { "Status " select name="status" {
                option value="" { "any" }
                @for s in STATUSES { option value=(s) selected[filled(&f.status) == Some(*s)] { (s) } }
            } }
            label { "Type " select name="type" {
                option value="" { "any" }
                @for t in &types { option value=(t) selected[filled(&f.process_type) == Some(t.as_str())] { (t) } }
            } }
            label { "Within " select name="since" {
                @for (v, l) in SINCE { option value=(v) selected[filled(&f.since).unwrap_or("") == *v] { (l) } }
            } }
            button type="submit" { "Filter" }
        }
        form.filters method="get" action="/ui/processes" role="search" {
            label { "Id or idempotency key " input type="search" name="q" required; }
            button type="submit" { "Find" }
        }
        @if may_bulk {
            details.bulk {
                summary { "Bulk actions on this filter" }
                form method="get" action="/ui/bulk" {
                    input type="hidden" name="status" value=(filled(&f.status).unwrap_or(""));
                    input type="hidden" name="type" value=(filled(&f.process_type).unwrap_or(""));
                    input type="hidden" name="since" value=(filled(&f.since).unwrap_or(""));
                    button type="submit" name="action" value="retry" { "Retry all Failed…" }
                    " "
                    button type="submit" name="action" value="cancel" { "Cancel all unfinished…" }
                }
                @if viewer.may("/api/processes") {
                    form method="get" action="/ui/bulk" {
                        input type="hidden" name="action" value="purge";
                        label { "Purge " select name="status" {
                            @for s in FINISHED { option value=(s.as_str()) { (s.as_str()) } }
                        } }
                        label { " ended more than " input type="text" name="older" value="7d" size="5"; " ago" }
                        " "
                        button type="submit" { "Purge…" }
                    }
                }
            }
        }
    };
    let live = html! {
        table.list {
            thead { tr {
                th scope="col" { "Id" } th scope="col" { "Type" } th scope="col" { "Status" }
                th scope="col" { "Current steps" } th scope="col" { "Created" } th scope="col" { "Duration" } th scope="col" { "Error" }
            } }
            tbody {
                @for p in &items {
                    tr data-id=(p.id) {
                        td { a href={"/ui/processes/" (p.id)} { code { (p.id) } } }
                        td { (p.process_type) " v" (p.version) }
                        td { (status_badge(&p.status)) }
                        td { (p.current_steps.join(", ")) }
                        td { (opt(&p.created_at)) }
                        td { (p.duration.map_or("—".into(), |d| format!("{d:.1}s"))) }
                        td { (opt(&p.error_message)) }
                    }
                }
            }
        }
        @if items.is_empty() { p { "No processes match." } }
        nav.pager aria-label="Pages" {
            @if filled(&f.cursor).is_some() { a href={"/ui/processes" (filter_qs(&f))} { "First page" } " " }
            @if let Some(c) = next.filter(|_| items.len() == q.limit) {
                a href={"/ui/processes" (filter_qs(&f)) "&cursor=" (c)} { "Next page" }
            }
        }
    };
    Ok(page(&viewer, &headers, "Processes", before, live))
}

#[derive(Debug, Deserialize)]
pub(super) struct BulkForm {
    action: String,
    status: Option<String>,
    #[serde(rename = "type")]
    process_type: Option<String>,
    since: Option<String>,
    older: Option<String>,
    csrf: Option<String>,
    ids: Option<String>,
}

/// The processes a bulk retry or cancel touches: the first [`BULK_MAX`] of the filter that
/// the action applies to.
async fn bulk_targets(st: &ApiState, f: &BulkForm) -> Result<Vec<String>, UiError> {
    let lf = ListForm {
        status: match f.action.as_str() {
            "retry" => Some("Failed".into()),
            _ => f.status.clone(),
        },
        process_type: f.process_type.clone(),
        since: f.since.clone(),
        ..Default::default()
    };
    let mut q = list_query(&lf, BULK_MAX)?;
    if f.action == "cancel" && q.status.is_none() {
        q.active = true;
    }
    let (recs, _) = st.engine.list(&q).await?;
    Ok(recs
        .into_iter()
        .filter(|r| f.action != "cancel" || !r.status.is_finished())
        .map(|r| r.id)
        .collect())
}

fn bulk_api_path(action: &str) -> Option<&'static str> {
    match action {
        "retry" => Some("/api/processes/{id}/retry"),
        "cancel" => Some("/api/processes/{id}/cancel"),
        "purge" => Some("/api/processes"),
        _ => None,
    }
}

pub(super) async fn confirm_bulk(
    State(st): State<ApiState>,
    Extension(viewer): Extension<Viewer>,
    Query(f): Query<BulkForm>,
) -> Result<Response, UiError> {
    if let Some(r) = refuse_page(&viewer, bulk_api_path(&f.action)) {
        return Ok(r);
    }
    let body = if f.action == "purge" {
        let status: ProcessStatus = filled(&f.status)
            .unwrap_or("")
            .parse()
            .map_err(|_| crate::ops::OpsError::Invalid("purge needs a finished status".into()))?;
        let older = filled(&f.older).unwrap_or("7d");
        let age = parse_age(older)?;
        let store = &st.engine.store;
        let now = store.server_time_ms().await?;
        let cutoff = now.saturating_sub(age.as_millis() as u64);
        let n = index_counts(&store.all(), status, &[(0, cutoff + 1)]).await?[0];
        html! {
            p.confirm { "This deletes " strong { (n) } " " (status.as_str()) " processes that ended more than " (older) " ago, with their state. It cannot be undone." }
            form method="post" action="/ui/bulk" {
                input type="hidden" name="csrf" value=(viewer.csrf);
                input type="hidden" name="action" value="purge";
                input type="hidden" name="status" value=(status.as_str());
                input type="hidden" name="older" value=(older);
                button.danger type="submit" { "Purge " (n) " processes" }
                " " a href="/ui/processes" { "Back" }
            }
        }
    } else {
        let ids = bulk_targets(&st, &f).await?;
        let verb = if f.action == "retry" {
            "Retry"
        } else {
            "Cancel"
        };
        html! {
            p.confirm { (verb) " " strong { (ids.len()) } " processes"
                @if ids.len() == BULK_MAX { " (the first " (BULK_MAX) "; repeat for the rest)" } "?" }
            @if !ids.is_empty() {
                form method="post" action="/ui/bulk" {
                    input type="hidden" name="csrf" value=(viewer.csrf);
                    input type="hidden" name="action" value=(f.action);
                    input type="hidden" name="ids" value=(ids.join(","));
                    button.danger type="submit" { (verb) " " (ids.len()) " processes" }
                    " " a href="/ui/processes" { "Back" }
                }
            }
        }
    };
    Ok(html_response(layout(Some(&viewer), "Confirm", body)))
}

pub(super) async fn bulk(
    State(st): State<ApiState>,
    Extension(viewer): Extension<Viewer>,
    Form(f): Form<BulkForm>,
) -> Result<Response, UiError> {
    if let Some(r) = refuse_form(&viewer, f.csrf.as_deref(), bulk_api_path(&f.action)) {
        return Ok(r);
    }
    let msg = if f.action == "purge" {
        let status: ProcessStatus = filled(&f.status)
            .unwrap_or("")
            .parse()
            .map_err(|_| crate::ops::OpsError::Invalid("purge needs a finished status".into()))?;
        let age = parse_age(filled(&f.older).unwrap_or("7d"))?;
        let n = st.engine.purge(status, age).await?;
        tracing::info!(
            by = viewer.by().unwrap_or("anonymous"),
            deleted = n,
            "console purge"
        );
        format!("Purged {n} processes.")
    } else {
        let ids: Vec<&str> = f
            .ids
            .as_deref()
            .unwrap_or("")
            .split(',')
            .filter(|s| !s.is_empty())
            .take(BULK_MAX)
            .collect();
        let (mut ok, mut failed) = (0, Vec::new());
        for id in &ids {
            let r = if f.action == "retry" {
                st.engine.retry(id, None, None, viewer.by()).await
            } else {
                st.engine
                    .cancel(id, Some("bulk cancel from the console"), viewer.by())
                    .await
            };
            match r {
                Ok(()) => ok += 1,
                Err(e) => failed.push(format!("{id}: {e}")),
            }
        }
        format!(
            "{} {ok} of {} processes.{}",
            if f.action == "retry" {
                "Retried"
            } else {
                "Cancelled"
            },
            ids.len(),
            if failed.is_empty() {
                String::new()
            } else {
                format!(" Refused: {}", failed.join("; "))
            }
        )
    };
    let body = html! { p.done role="status" { (msg) } p { a href="/ui/processes" { "Back to the processes" } } };
    Ok(html_response(layout(Some(&viewer), "Done", body)))
}

// ---------------------------------------------------------------------------------------
// Process detail

/// The actions a process's state allows: (action, label, API route).
fn actions_for(v: &ProcessView) -> Vec<(&'static str, &'static str, &'static str)> {
    let mut out = Vec::new();
    let finished = matches!(
        v.status.as_str(),
        "Completed" | "Failed" | "Cancelled" | "TimedOut"
    );
    if v.status == "WaitingForApproval" {
        out.push(("approve", "Approve", "/api/processes/{id}/signal/{name}"));
        out.push(("reject", "Reject", "/api/processes/{id}/signal/{name}"));
    }
    // A process failed by a step is retried from that step (one button per failed step,
    // below); others (cancelled, timed out) from where they stopped.
    let failed_step = v
        .steps
        .iter()
        .any(|s| s.status == StepStatus::Failed.as_str());
    if matches!(v.status.as_str(), "Failed" | "Cancelled" | "TimedOut") && !failed_step {
        out.push(("retry", "Retry…", "/api/processes/{id}/retry"));
    }
    if matches!(v.status.as_str(), "Running") {
        out.push((
            "retry-current-step",
            "Retry current step",
            "/api/processes/{id}/retry-current-step",
        ));
    }
    if !finished {
        out.push(("cancel", "Cancel", "/api/processes/{id}/cancel"));
    }
    out
}

pub(super) async fn detail(
    State(st): State<ApiState>,
    Extension(viewer): Extension<Viewer>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, UiError> {
    let (v, rec) = process_view(&st, &id).await?;
    let def = st.engine.defs.get(&rec.process_type, rec.version).cloned();
    let state = st.engine.state(&id).await.ok();
    let trace = rec
        .trace
        .as_deref()
        .and_then(|tp| tp.split('-').nth(1))
        .map(str::to_string);
    let trace_url = st
        .engine
        .cfg
        .api
        .trace_url_template
        .as_ref()
        .zip(trace.as_ref())
        .map(|(t, id)| t.replace("{trace_id}", id));
    let actions: Vec<_> = actions_for(&v)
        .into_iter()
        .filter(|(_, _, api)| viewer.may(api))
        .collect();
    // A retry re-runs the failed steps: each is offered as where the retry starts.
    let retry_steps: Vec<&str> = if matches!(v.status.as_str(), "Failed" | "Cancelled" | "TimedOut")
        && viewer.may("/api/processes/{id}/retry")
    {
        v.steps
            .iter()
            .filter(|s| s.status == StepStatus::Failed.as_str())
            .map(|s| s.name.as_str())
            .collect()
    } else {
        Vec::new()
    };
    // Any step of the definition may be where a finished process runs again from.
    let from_steps: Vec<&str> = match &def {
        Some(d)
            if matches!(
                v.status.as_str(),
                "Completed" | "Failed" | "Cancelled" | "TimedOut"
            ) && viewer.may("/api/processes/{id}/retry") =>
        {
            d.steps.iter().map(|s| s.name.as_str()).collect()
        }
        _ => Vec::new(),
    };
    let live = html! {
        dl.facts {
            dt { "Status" } dd #status { (status_badge(&v.status)) }
            dt { "Type" } dd { (v.process_type) " v" (v.version) }
            dt { "Created" } dd { (opt(&v.created_at)) }
            dt { "Started" } dd { (opt(&v.started_at)) }
            dt { "Ended" } dd { (opt(&v.ended_at)) }
            dt { "Duration" } dd { (v.duration.map_or("—".into(), |d| format!("{d:.2}s"))) }
            dt { "Idempotency key" } dd { (opt(&v.idempotency_key)) }
            dt { "Tenant" } dd { (opt(&v.tenant)) }
            dt { "Trace" } dd {
                @match (&trace_url, &trace) {
                    (Some(u), _) => a href=(u) rel="noopener" { (trace.as_deref().unwrap_or("")) },
                    (None, Some(t)) => code { (t) },
                    _ => "—",
                }
            }
            dt { "LLM usage" } dd {
                @match &v.llm_usage {
                    Some(LlmUsageView { tokens, cost_usd }) => { (tokens) " tokens, $" (format!("{cost_usd:.4}")) }
                    None => "—",
                }
            }
        }
        @if let Some(e) = &v.error_message {
            p.error role="alert" { strong { "Error" } @if let Some(c) = &v.error_code { " (" code { (c) } ")" } ": " (e) }
        }
        @if !actions.is_empty() || !retry_steps.is_empty() || !from_steps.is_empty() {
            div.actions role="group" aria-label="Actions" {
                @for (a, label, _) in &actions {
                    a.button href={"/ui/processes/" (id) "/confirm?action=" (a)} data-action=(a) { (label) }
                }
                @for s in &retry_steps {
                    a.button href={"/ui/processes/" (id) "/confirm?action=retry&step=" (s)} data-action="retry-step" { "Retry from " (s) "…" }
                }
                @if !from_steps.is_empty() {
                    form.retry-from method="get" action={"/ui/processes/" (id) "/confirm"} {
                        input type="hidden" name="action" value="retry-from";
                        label for="from-step" { "Retry from step" }
                        " "
                        select #from-step name="step" {
                            @for s in &from_steps { option value=(s) { (s) } }
                        }
                        " "
                        button type="submit" data-action="retry-from" { "Retry from here…" }
                    }
                }
            }
        }
        section aria-labelledby="graph" {
            h2 #graph { "Steps" }
            @if let Some(d) = &def { (dag::render(d, Some(&rec))) } @else { p { "The definition is not loaded on this gateway." } }
        }
        section aria-labelledby="timeline" {
            h2 #timeline { "Attempts" }
            table {
                thead { tr { th scope="col" { "Step" } th scope="col" { "Attempt" } th scope="col" { "Worker" } th scope="col" { "Started" } th scope="col" { "Duration" } th scope="col" { "Outcome" } th scope="col" { "Why" } } }
                tbody {
                    @for s in &v.steps {
                        @if s.attempts.is_empty() {
                            tr { th scope="row" { (s.name) } td { "—" } td { "—" } td { (opt(&s.queued_at)) } td { "—" } td { (status_badge(&s.status)) } td {} }
                        }
                        @for a in &s.attempts {
                            tr {
                                th scope="row" { (s.name) }
                                td { (a.attempt) @if a.visit > 1 { " (visit " (a.visit) ")" } @if let Some(d) = a.deliveries.filter(|d| *d > 1) { " · " (d) " deliveries" } }
                                td { (opt(&a.worker)) }
                                td { (opt(&a.started_at)) }
                                td { (a.duration_ms.map_or("—".into(), |d| format!("{d} ms"))) }
                                td { (status_badge(&a.outcome)) }
                                td { (opt(&a.error)) @if let Some(c) = &a.error_code { " (" code { (c) } ")" } }
                            }
                        }
                        @if s.yields > 0 { tr { th scope="row" { (s.name) } td colspan="6" { (s.yields) " yields (waited for LLM budget)" } } }
                    }
                }
            }
        }
        section aria-labelledby="audit" {
            h2 #audit { "Audit" }
            @if v.audit.is_empty() { p { "No operator action yet." } } @else {
                table {
                    thead { tr { th scope="col" { "At" } th scope="col" { "Action" } th scope="col" { "By" } th scope="col" { "Detail" } } }
                    tbody { @for a in &v.audit { tr { td { (opt(&a.at)) } td { (a.action) } td { (opt(&a.by)) } td { (opt(&a.detail)) } } } }
                }
            }
        }
    };
    let before = html! {};
    let state_section = html! {
        section aria-labelledby="state" {
            h2 #state { "State" }
            @match &state {
                Some(s) => {
                    (llm_steps(def.as_deref(), &s.outputs))
                    p { (s.size_bytes) " bytes stored. " a href={"/ui/processes/" (id) "/state.json"} download { "Download all (JSON)" } }
                    (json_block("Input", s.input.as_ref().unwrap_or(&Value::Null)))
                    @for (step, out) in &s.outputs { (json_block(&format!("Output of {step}"), out)) }
                    @for (step, ck) in &s.checkpoints { (json_block(&format!("Checkpoint of {step}"), ck)) }
                    @for p in &s.problems { p.error { (p.part) ": " (p.reason) } }
                }
                None => p { "The state could not be read." },
            }
        }
    };
    if super::wants_fragment(&headers) {
        return Ok(page(&viewer, &headers, "", before, live));
    }
    let title = format!("Process {id}");
    let body = html! {
        div #live data-poll="2000" { (live) }
        (state_section)
    };
    Ok(html_response(layout(Some(&viewer), &title, body)))
}

/// LLM usage and cost per `llm` step, from the outputs the page decodes anyway (the step
/// kind records its usage and estimated cost in its output; no extra read or write).
fn llm_steps(
    def: Option<&honua_shared::definition::ProcessDefinition>,
    outputs: &std::collections::BTreeMap<String, Value>,
) -> Markup {
    let is_llm = |step: &str| {
        def.and_then(|d| d.step(step))
            .is_some_and(|s| s.kind == honua_shared::definition::LLM_KIND)
    };
    let rows: Vec<(&String, &Value)> = outputs
        .iter()
        .filter(|(step, out)| is_llm(step) && out.get("usage").is_some())
        .collect();
    let n = |v: &Value, k: &str| v["usage"][k].as_u64().unwrap_or(0);
    html! {
        @if !rows.is_empty() {
            h3 { "LLM usage per step" }
            p.note { "Cost is estimated from the price table (— when the model has no price)." }
            table #llm-steps {
                caption { "Tokens and cost of each llm step" }
                thead { tr {
                    th scope="col" { "Step" } th scope="col" { "Provider / model" } th scope="col" { "Input tokens" }
                    th scope="col" { "Output tokens" } th scope="col" { "Cost (USD)" } th scope="col" { "Served from" }
                } }
                tbody {
                    @for (step, out) in &rows {
                        tr data-step=(step) data-tokens=(n(out, "totalTokens")) {
                            th scope="row" { (step) }
                            td { (out["provider"].as_str().unwrap_or("—")) " / " (out["model"].as_str().unwrap_or("—")) }
                            td { (n(out, "inputTokens")) }
                            td { (n(out, "outputTokens")) }
                            td { (out["costUsd"].as_f64().map_or("—".into(), |c| format!("${c:.6}"))) }
                            td { @if out["cacheHit"] == Value::Bool(true) { "cache" } @else if out["fallbackUsed"] == Value::Bool(true) { "fallback" } @else { "provider" } }
                        }
                    }
                }
            }
        }
    }
}

/// A JSON value, pretty-printed and cut at [`STATE_CAP`] bytes.
fn json_block(label: &str, v: &Value) -> Markup {
    let mut s = serde_json::to_string_pretty(v).unwrap_or_default();
    let cut = s.len() > STATE_CAP;
    if cut {
        let mut end = STATE_CAP;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    html! {
        details open {
            summary { (label) @if cut { " (cut at " (STATE_CAP / 1024) " KiB: download for the rest)" } }
            pre tabindex="0" { code { (s) } }
        }
    }
}

pub(super) async fn state_json(
    State(st): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Response, UiError> {
    let s = st.engine.state(&id).await?;
    let body = serde_json::to_vec_pretty(&s).unwrap_or_default();
    Ok((
        [
            (header::CONTENT_TYPE, "application/json".to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{id}-state.json\""),
            ),
        ],
        body,
    )
        .into_response())
}

#[derive(Debug, Deserialize)]
pub(super) struct ActionQuery {
    action: String,
    step: Option<String>,
}

fn action_api(action: &str) -> Option<&'static str> {
    Some(match action {
        "approve" | "reject" => "/api/processes/{id}/signal/{name}",
        "retry" | "retry-from" => "/api/processes/{id}/retry",
        "retry-current-step" => "/api/processes/{id}/retry-current-step",
        "cancel" => "/api/processes/{id}/cancel",
        _ => return None,
    })
}

pub(super) async fn confirm_action(
    State(st): State<ApiState>,
    Extension(viewer): Extension<Viewer>,
    Path(id): Path<String>,
    Query(q): Query<ActionQuery>,
) -> Result<Response, UiError> {
    if let Some(r) = refuse_page(&viewer, action_api(&q.action)) {
        return Ok(r);
    }
    let (v, _) = process_view(&st, &id).await?;
    let what = match (q.action.as_str(), &q.step) {
        ("retry", Some(s)) => format!("Retry process {id} from step {s}?"),
        ("retry", None) => format!("Retry process {id} from its failed step?"),
        ("retry-from", Some(s)) => format!(
            "Retry process {id} ({}) from step {s}? It and every step after it run again; the steps before it keep their results.",
            v.status
        ),
        ("retry-from", None) => {
            format!("Retry process {id} from which step? Go back and choose one.")
        }
        ("approve", _) => format!("Approve process {id} at {}?", v.current_steps.join(", ")),
        ("reject", _) => format!("Reject process {id} at {}?", v.current_steps.join(", ")),
        ("cancel", _) => format!("Cancel process {id} ({})?", v.status),
        _ => format!(
            "Re-enqueue the current step(s) of process {id}: {}?",
            v.current_steps.join(", ")
        ),
    };
    let body = html! {
        form.card method="post" action={"/ui/processes/" (id) "/action"} {
            p.confirm { (what) }
            input type="hidden" name="csrf" value=(viewer.csrf);
            input type="hidden" name="action" value=(q.action);
            @if let Some(s) = &q.step { input type="hidden" name="step" value=(s); }
            @if q.action == "retry" || q.action == "retry-from" {
                label for="patch" { "State patch (JSON object merged into the input; optional)" }
                textarea #patch name="patch" rows="6" spellcheck="false" placeholder="{\"key\": \"value\"}" {}
            }
            @if q.action == "cancel" {
                label for="reason" { "Reason (recorded in the audit)" }
                input #reason type="text" name="reason";
            }
            button.danger type="submit" #confirm { "Confirm" }
            " " a href={"/ui/processes/" (id)} { "Back" }
        }
    };
    Ok(html_response(layout(Some(&viewer), "Confirm", body)))
}

#[derive(Debug, Deserialize)]
pub(super) struct ActionForm {
    action: String,
    csrf: Option<String>,
    patch: Option<String>,
    reason: Option<String>,
    step: Option<String>,
}

/// The form's state patch (JSON), if any.
fn state_patch(f: &ActionForm) -> Result<Option<Value>, UiError> {
    Ok(match filled(&f.patch) {
        None => None,
        Some(p) => Some(serde_json::from_str::<Value>(p).map_err(|e| {
            crate::ops::OpsError::Invalid(format!("the state patch is not JSON: {e}"))
        })?),
    })
}

pub(super) async fn act(
    State(st): State<ApiState>,
    Extension(viewer): Extension<Viewer>,
    Path(id): Path<String>,
    Form(f): Form<ActionForm>,
) -> Result<Response, UiError> {
    if let Some(r) = refuse_form(&viewer, f.csrf.as_deref(), action_api(&f.action)) {
        return Ok(r);
    }
    let by = viewer.by();
    match f.action.as_str() {
        "approve" | "reject" => {
            let (rec, _) = st.engine.load(&id).await?;
            let def = st.engine.defs.get(&rec.process_type, rec.version);
            let signal = rec
                .active_steps()
                .filter_map(|(n, _)| def.and_then(|d| d.step(n)))
                .find_map(|s| {
                    s.config
                        .get("signal")
                        .and_then(Value::as_str)
                        .map(str::to_string)
                });
            let Some(signal) = signal else {
                return Ok(error_page(
                    Some(&viewer),
                    StatusCode::CONFLICT,
                    "no step of this process waits for a signal",
                ));
            };
            st.engine.signal(&id, &signal, &f.action, by).await?;
            tracing::info!(process_id = %id, by = by.unwrap_or("anonymous"), signal = %signal, value = %f.action, "console signal");
        }
        "retry" => {
            let patch = state_patch(&f)?;
            if let Some(step) = filled(&f.step) {
                let (rec, _) = st.engine.load(&id).await?;
                let failed: Vec<&String> = rec
                    .steps
                    .iter()
                    .filter(|(_, r)| r.status == StepStatus::Failed)
                    .map(|(n, _)| n)
                    .collect();
                if !failed.iter().any(|n| *n == step) {
                    return Ok(error_page(
                        Some(&viewer),
                        StatusCode::CONFLICT,
                        &format!(
                            "a retry restarts from the failed step(s) ({}), not from {step}",
                            failed
                                .iter()
                                .map(|s| s.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    ));
                }
            }
            st.engine.retry(&id, None, patch.as_ref(), by).await?;
        }
        "retry-from" => {
            let Some(step) = filled(&f.step) else {
                return Ok(error_page(
                    Some(&viewer),
                    StatusCode::BAD_REQUEST,
                    "choose the step to retry from",
                ));
            };
            let patch = state_patch(&f)?;
            st.engine.retry(&id, Some(step), patch.as_ref(), by).await?;
        }
        "retry-current-step" => {
            st.engine.retry_current_step(&id, by).await?;
        }
        _ => {
            st.engine
                .cancel(
                    &id,
                    filled(&f.reason).or(Some("cancelled from the console")),
                    by,
                )
                .await?;
        }
    }
    Ok(Redirect::to(&format!("/ui/processes/{id}")).into_response())
}

// ---------------------------------------------------------------------------------------
// Dead letters, quarantine, workers, definitions

pub(super) async fn deadletters(
    State(st): State<ApiState>,
    Extension(viewer): Extension<Viewer>,
    headers: HeaderMap,
) -> Result<Response, UiError> {
    let Json(dl) = fleet::deadletters(
        State(st.clone()),
        Ok(Query(DlqParams {
            limit: Some(page_limit(Some(200))?),
        })),
    )
    .await?;
    let may = viewer.may("/api/deadletters/{id}/replay");
    let before = html! {
        @if may && !dl.is_empty() {
            p { a.button href="/ui/deadletters/confirm" { "Replay all…" } }
        }
    };
    let live = html! {
        @if dl.is_empty() { p { "No dead letters." } } @else {
            table {
                thead { tr { th scope="col" { "Dead since" } th scope="col" { "Process" } th scope="col" { "Step" } th scope="col" { "Deliveries" } th scope="col" { "Reason" } @if may { th scope="col" { span.sr { "Actions" } } } } }
                tbody {
                    @for d in &dl {
                        tr {
                            td { (d.dead_ms.and_then(rfc3339_ms).unwrap_or_default()) }
                            td { a href={"/ui/processes/" (d.process_id)} { code { (d.process_id) } } }
                            td { (d.step) }
                            td { (d.deliveries) }
                            td { (d.reason) }
                            @if may { td { a.button href={"/ui/deadletters/confirm?id=" (d.id)} { "Replay…" } } }
                        }
                    }
                }
            }
        }
    };
    Ok(page(&viewer, &headers, "Dead letters", before, live))
}

#[derive(Debug, Deserialize)]
pub(super) struct ReplayForm {
    id: Option<String>,
    csrf: Option<String>,
}

pub(super) async fn confirm_replay(
    State(st): State<ApiState>,
    Extension(viewer): Extension<Viewer>,
    Query(f): Query<ReplayForm>,
) -> Result<Response, UiError> {
    if let Some(r) = refuse_page(&viewer, Some("/api/deadletters/{id}/replay")) {
        return Ok(r);
    }
    let Json(dl) = fleet::deadletters(
        State(st.clone()),
        Ok(Query(DlqParams { limit: Some(1000) })),
    )
    .await?;
    let n = if f.id.is_some() { 1 } else { dl.len() };
    let body = html! {
        form.card method="post" action="/ui/deadletters/replay" {
            p.confirm { "Replay " strong { (n) } " dead letter(s): their processes are retried from the failed step." }
            input type="hidden" name="csrf" value=(viewer.csrf);
            @if let Some(id) = &f.id { input type="hidden" name="id" value=(id); }
            button.danger type="submit" { "Replay " (n) }
            " " a href="/ui/deadletters" { "Back" }
        }
    };
    Ok(html_response(layout(Some(&viewer), "Confirm", body)))
}

pub(super) async fn replay(
    State(st): State<ApiState>,
    Extension(viewer): Extension<Viewer>,
    Form(f): Form<ReplayForm>,
) -> Result<Response, UiError> {
    if let Some(r) = refuse_form(
        &viewer,
        f.csrf.as_deref(),
        Some("/api/deadletters/{id}/replay"),
    ) {
        return Ok(r);
    }
    let ids = match &f.id {
        Some(id) => vec![id.clone()],
        None => {
            let Json(dl) = fleet::deadletters(
                State(st.clone()),
                Ok(Query(DlqParams { limit: Some(1000) })),
            )
            .await?;
            dl.into_iter().map(|d| d.id).collect()
        }
    };
    let caller = viewer.name.clone().map(|name| {
        Extension(Caller {
            name,
            role: viewer.role,
        })
    });
    let (mut ok, mut refused) = (0, Vec::new());
    for id in &ids {
        match fleet::replay(State(st.clone()), Path(id.clone()), caller.clone()).await {
            Ok(_) => ok += 1,
            Err(e) => refused.push(format!("{id}: {}", e.detail())),
        }
    }
    let body = html! {
        p.done role="status" { "Replayed " (ok) " of " (ids.len()) " dead letter(s)." }
        @for r in &refused { p.error { (r) } }
        p { a href="/ui/deadletters" { "Back to the dead letters" } }
    };
    Ok(html_response(layout(Some(&viewer), "Done", body)))
}

/// A stream entry id as (ms, seq), for ordering entries of several streams.
fn stream_id(id: &str) -> (u64, u64) {
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    (ms.parse().unwrap_or(0), seq.parse().unwrap_or(0))
}

fn sorted_fields(f: &honua_shared::envelope::FieldMap) -> Vec<(&str, &str)> {
    let mut v: Vec<(&str, &str)> = f.iter().collect();
    v.sort();
    v
}

pub(super) async fn quarantine(
    State(st): State<ApiState>,
    Extension(viewer): Extension<Viewer>,
    headers: HeaderMap,
) -> Result<Response, UiError> {
    // The newest 200 of every partition's quarantine, newest first (entry ids are
    // times, so they sort across partitions).
    let mut entries = Vec::new();
    for p in st.engine.store.all() {
        entries.extend(p.stream_latest(&p.keys().quarantine(), 200).await?);
    }
    entries.sort_by_key(|e| std::cmp::Reverse(stream_id(&e.id)));
    entries.truncate(200);
    let live = html! {
        p { "Stream entries the scheduler could not process, set aside with the reason (newest first, at most 200)." }
        @if entries.is_empty() { p { "Nothing is quarantined." } } @else {
            table {
                thead { tr { th scope="col" { "Entry" } th scope="col" { "Reason" } th scope="col" { "Fields" } } }
                tbody {
                    @for e in &entries {
                        @let fields = sorted_fields(&e.fields);
                        tr {
                            td { code { (e.id) } }
                            td { (e.fields.get("reason").unwrap_or("—")) }
                            td { @for (k, v) in fields.iter().filter(|(k, _)| *k != "reason") { code { (k) } "=" (v.chars().take(200).collect::<String>()) br; } }
                        }
                    }
                }
            }
        }
    };
    Ok(page(&viewer, &headers, "Quarantine", html! {}, live))
}

pub(super) async fn workers(
    State(st): State<ApiState>,
    Extension(viewer): Extension<Viewer>,
    headers: HeaderMap,
) -> Result<Response, UiError> {
    let Json(ws) = fleet::workers(State(st.clone())).await?;
    let live = html! {
        @if ws.is_empty() { p { "No worker has heartbeat yet." } } @else {
            table {
                thead { tr {
                    th scope="col" { "Worker" } th scope="col" { "Heartbeat age" } th scope="col" { "Live" }
                    th scope="col" { "Version" } th scope="col" { "Host" } th scope="col" { "Concurrency" } th scope="col" { "Started" }
                    th scope="col" { "Held jobs" }
                } }
                tbody {
                    @for w in &ws {
                        tr data-worker=(w.id) {
                            td { code { (w.id) } }
                            td { (age(w.last_seen_age_ms)) }
                            td { @if w.last_seen_age_ms < LIVE_WORKER_MS { "yes" } @else { "no" } }
                            td.version { (opt(&w.version)) }
                            td { (opt(&w.host)) }
                            td { (w.concurrency.map_or("—".into(), |c| c.to_string())) }
                            td { (w.started_ms.and_then(rfc3339_ms).unwrap_or_else(|| "—".into())) }
                            td {
                                @if w.jobs.is_empty() { "—" }
                                @for j in &w.jobs {
                                    a href={"/ui/processes/" (j.process_id)} { code { (j.process_id) } } " " (j.step) " (idle " (age(j.idle_ms)) ", " (j.deliveries) " deliveries)" br;
                                }
                            }
                        }
                    }
                }
            }
        }
    };
    Ok(page(&viewer, &headers, "Workers", html! {}, live))
}

pub(super) async fn definitions(
    State(st): State<ApiState>,
    Extension(viewer): Extension<Viewer>,
) -> Result<Response, UiError> {
    let fmt = |d: std::time::Duration| humantime::format_duration(d).to_string();
    let body = html! {
        @for d in st.engine.defs.iter() {
            section.def aria-labelledby={"def-" (d.name) "-" (d.version)} {
                h2 id={"def-" (d.name) "-" (d.version)} { (d.name) " v" (d.version) }
                @if let Some(desc) = &d.description { p { (desc) } }
                p { "Process timeout: " (d.timeout.map_or("none".into(), fmt)) ". Starts at " (d.start.join(", ")) "." }
                (dag::render(d, None))
                table {
                    thead { tr { th scope="col" { "Step" } th scope="col" { "Kind" } th scope="col" { "Timeout" } th scope="col" { "Retry" } th scope="col" { "Routes" } } }
                    tbody {
                        @for s in &d.steps {
                            tr {
                                th scope="row" { (s.name) }
                                td { (s.kind) }
                                td { (fmt(s.timeout)) }
                                td { (s.retry.max_attempts) " attempts, " (fmt(s.retry.initial_backoff)) "–" (fmt(s.retry.max_backoff)) " ×" (s.retry.multiplier) }
                                td { @for (o, t) in &s.routes { (o) " → " (t.join(", ")) br; } }
                            }
                        }
                    }
                }
            }
        }
    };
    Ok(html_response(layout(Some(&viewer), "Definitions", body)))
}

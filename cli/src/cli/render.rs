//! Terminal output of the operator commands: aligned plain-text tables, cells made from
//! the gateway's typed replies (`-` for nothing, timestamps to the second, compact
//! durations), each reply's table or block, and `--json` bodies passed through as
//! received.

use super::client::{DeadLetterView, HealthReply, QueueView, WorkerView};
use honua_scheduler::state::{DeleteReply, StateProblem, StateView};
use honua_scheduler::view::{MAX_RFC3339_MS, ProcessSummary, ProcessView};
use std::io::Write;
use std::time::{Duration, UNIX_EPOCH};

/// Table cells longer than this are cut (with `…`); `get` prints messages in full.
const MAX_CELL_CHARS: usize = 80;

/// Replaces control characters (newlines, terminal escapes from a remote message) with
/// spaces, so a cell or a message stays on one line and cannot drive the terminal.
pub fn clean(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

pub(super) fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(max.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

/// A plain-text table: left-aligned columns two spaces apart, no trailing spaces.
/// Widths count `char`s (right for the ASCII the gateway sends; wide characters in
/// user-supplied text may misalign a row, never break it).
#[derive(Debug, Clone, Default)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Self {
        Table {
            header: header.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; cells are cleaned and cut to 80 characters.
    pub fn row<S: AsRef<str>>(&mut self, cells: impl IntoIterator<Item = S>) {
        self.rows.push(
            cells
                .into_iter()
                .map(|c| truncate(&clean(c.as_ref()), MAX_CELL_CHARS))
                .collect(),
        );
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn render(&self) -> String {
        let ncols = self
            .rows
            .iter()
            .map(Vec::len)
            .chain([self.header.len()])
            .max()
            .unwrap_or(0);
        let mut widths = vec![0usize; ncols];
        for r in std::iter::once(&self.header).chain(&self.rows) {
            for (i, c) in r.iter().enumerate() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
        let mut out = String::new();
        let lines = (!self.header.is_empty())
            .then_some(&self.header)
            .into_iter()
            .chain(&self.rows);
        for r in lines {
            let mut line = String::new();
            for (i, w) in widths.iter().enumerate() {
                let c = r.get(i).map(String::as_str).unwrap_or("");
                line.push_str(c);
                if i + 1 < ncols {
                    let pad = w - c.chars().count() + 2;
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// `850ms`, `12.3s`, `4m05s`, `2h10m`, `3d04h`.
pub fn fmt_duration_ms(ms: u64) -> String {
    let s = ms / 1000;
    match ms {
        0..1_000 => format!("{ms}ms"),
        1_000..60_000 => format!("{:.1}s", ms as f64 / 1000.0),
        60_000..3_600_000 => format!("{}m{:02}s", s / 60, s % 60),
        3_600_000..86_400_000 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{:02}h", s / 86_400, (s % 86_400) / 3600),
    }
}

/// A cell for a string: `-` for an empty one.
pub(super) fn text(s: &str) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s.to_string()
    }
}

/// A cell for an optional string: `-` for none or an empty one.
fn opt_text(s: Option<&str>) -> String {
    s.map_or_else(|| "-".into(), text)
}

/// A cell for a list: its items joined with `, `; `-` for an empty list.
pub(super) fn list_text(items: &[String]) -> String {
    if items.is_empty() {
        "-".into()
    } else {
        items.iter().map(|s| text(s)).collect::<Vec<_>>().join(", ")
    }
}

/// A cell for an optional number: `-` for none.
fn number(n: Option<u64>) -> String {
    n.map_or_else(|| "-".into(), |n| n.to_string())
}

/// An RFC 3339 timestamp to whole seconds (`2025-01-02T03:04:05Z`); `-` for none, and
/// anything that is not a timestamp as it is.
fn when(at: Option<&str>) -> String {
    match at {
        Some(s) => humantime::parse_rfc3339_weak(s)
            .map(|t| humantime::format_rfc3339_seconds(t).to_string())
            .unwrap_or_else(|_| s.to_string()),
        None => "-".into(),
    }
}

/// Unix milliseconds as an RFC 3339 timestamp to whole seconds; `-` for none.
fn when_ms(ms: Option<u64>) -> String {
    match ms {
        Some(ms) if ms <= MAX_RFC3339_MS => {
            humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
        }
        Some(ms) => format!("{ms} ms"),
        None => "-".into(),
    }
}

fn millis(ms: Option<u64>) -> String {
    ms.map(fmt_duration_ms).unwrap_or_else(|| "-".into())
}

/// A duration given in (fractional) seconds.
pub(super) fn seconds(s: Option<f64>) -> String {
    s.filter(|s| s.is_finite() && *s >= 0.0)
        .map(|s| fmt_duration_ms((s * 1000.0).round() as u64))
        .unwrap_or_else(|| "-".into())
}

/// `message (code)`, either part optional.
pub(super) fn error_text(message: Option<&str>, code: Option<&str>) -> String {
    match (message, code) {
        (Some(m), Some(c)) => format!("{m} ({c})"),
        (Some(m), None) => m.to_string(),
        (None, Some(c)) => c.to_string(),
        (None, None) => "-".into(),
    }
}

pub(super) fn write_raw(out: &mut dyn Write, body: &[u8]) -> std::io::Result<()> {
    out.write_all(body)?;
    if !body.ends_with(b"\n") {
        out.write_all(b"\n")?;
    }
    Ok(())
}

/// `honua ps`: one row per process.
pub(super) fn process_table(list: &[ProcessSummary]) -> Table {
    let mut t = Table::new(&[
        "ID", "TYPE", "STATUS", "CREATED", "DURATION", "CURRENT", "ERROR",
    ]);
    for p in list {
        t.row([
            text(&p.id),
            text(&p.process_type),
            text(&p.status),
            when(p.created_at.as_deref()),
            seconds(p.duration),
            list_text(&p.current_steps),
            error_text(p.error_message.as_deref(), p.error_code.as_deref()),
        ]);
    }
    t
}

/// `honua get`: a block of fields, the steps, and the operator actions.
pub(super) fn print_process(out: &mut dyn Write, p: &ProcessView) -> std::io::Result<()> {
    let ty = format!("{} v{}", text(&p.process_type), p.version);
    let mut info = Table::default();
    info.row(["ID:".to_string(), text(&p.id)]);
    info.row(["Type:".to_string(), ty]);
    info.row(["Status:".to_string(), text(&p.status)]);
    for (label, at) in [
        ("Created:", &p.created_at),
        ("Started:", &p.started_at),
        ("Ended:", &p.ended_at),
        ("Deadline:", &p.deadline_at),
    ] {
        if let Some(at) = at {
            info.row([label.to_string(), when(Some(at))]);
        }
    }
    info.row(["Duration:".to_string(), seconds(p.duration)]);
    let current = list_text(&p.current_steps);
    if current != "-" {
        info.row(["Current:".to_string(), current]);
    }
    if let Some(key) = &p.idempotency_key {
        info.row(["Idempotency key:".to_string(), text(key)]);
    }
    if let Some(t) = &p.tenant {
        info.row(["Tenant:".to_string(), text(t)]);
    }
    out.write_all(info.render().as_bytes())?;
    let error = error_text(p.error_message.as_deref(), p.error_code.as_deref());
    if error != "-" {
        // In full: the table would cut it.
        writeln!(out, "Error: {}", clean(&error))?;
    }
    let mut steps = Table::new(&[
        "STEP", "KIND", "STATUS", "ATTEMPT", "WORKER", "DURATION", "ERROR",
    ]);
    for s in &p.steps {
        steps.row([
            text(&s.name),
            text(&s.kind),
            text(&s.status),
            s.attempt.to_string(),
            opt_text(s.worker.as_deref()),
            millis(s.duration_ms),
            error_text(s.error.as_deref(), s.error_code.as_deref()),
        ]);
    }
    if !steps.is_empty() {
        writeln!(out)?;
        out.write_all(steps.render().as_bytes())?;
    }
    let mut audit = Table::new(&["AT", "ACTION", "DETAIL"]);
    for a in &p.audit {
        audit.row([
            when(a.at.as_deref()),
            text(&a.action),
            opt_text(a.detail.as_deref()),
        ]);
    }
    if !audit.is_empty() {
        writeln!(out)?;
        out.write_all(audit.render().as_bytes())?;
    }
    Ok(())
}

/// A JSON value, indented (serde_json escapes control characters in strings).
fn pretty(v: &serde_json::Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
}

/// `honua state get`: the process, then each decoded part as indented JSON, then the parts
/// that did not decode.
pub(super) fn print_state(out: &mut dyn Write, s: &StateView) -> std::io::Result<()> {
    let mut info = Table::default();
    info.row(["ID:".to_string(), text(&s.id)]);
    info.row(["Type:".to_string(), text(&s.process_type)]);
    info.row(["Status:".to_string(), text(&s.status)]);
    info.row(["Stored:".to_string(), format!("{} bytes", s.size_bytes)]);
    out.write_all(info.render().as_bytes())?;
    if let Some(input) = &s.input {
        writeln!(out, "\nInput:\n{}", pretty(input))?;
    }
    for (label, parts) in [("Output", &s.outputs), ("Checkpoint", &s.checkpoints)] {
        for (step, v) in parts {
            writeln!(out, "\n{label} of {}:\n{}", clean(step), pretty(v))?;
        }
    }
    if !s.problems.is_empty() {
        writeln!(out)?;
        out.write_all(problem_table(&s.problems).render().as_bytes())?;
    }
    Ok(())
}

/// `honua state check`: one row per unreadable part.
pub(super) fn problem_table(problems: &[StateProblem]) -> Table {
    let mut t = Table::new(&["ID", "TYPE", "PART", "CODE", "REASON"]);
    for p in problems {
        t.row([
            text(&p.id),
            text(&p.process_type),
            text(&p.part),
            text(&p.code),
            text(&p.reason),
        ]);
    }
    t
}

/// `honua state delete`: what was deleted and which references went with it.
pub(super) fn print_deleted(out: &mut dyn Write, d: &DeleteReply) -> std::io::Result<()> {
    let r = &d.removed;
    writeln!(
        out,
        "deleted {} ({} {}{}); removed jobs {}, events {}, results {}, dead letters {}, delayed {}",
        clean(&d.id),
        clean(&text(&d.process_type)),
        clean(&text(&d.status)),
        if d.forced { ", forced" } else { "" },
        r.jobs,
        r.events,
        r.results,
        r.dead_letters,
        r.delayed
    )
}

/// `honua queues`: one row per stream.
pub(super) fn queue_table(queues: &[QueueView]) -> Table {
    let mut t = Table::new(&[
        "STREAM",
        "GROUP",
        "STATE",
        "LENGTH",
        "LAG",
        "PENDING",
        "OLDEST PENDING",
        "CONSUMERS",
    ]);
    for q in queues {
        t.row([
            text(&q.stream),
            text(&q.group),
            String::from(if q.missing { "missing" } else { "ok" }),
            q.length.to_string(),
            number(q.lag),
            q.pending.to_string(),
            millis(q.oldest_pending_age_ms),
            q.consumers.to_string(),
        ]);
    }
    t
}

/// `honua workers`: the workers, then the jobs they hold (when they hold any).
pub(super) fn print_workers(out: &mut dyn Write, workers: &[WorkerView]) -> std::io::Result<()> {
    let mut t = Table::new(&["WORKER", "LAST SEEN", "JOBS"]);
    let mut jobs = Table::new(&["WORKER", "PROCESS", "STEP", "IDLE", "DELIVERIES", "ENTRY"]);
    for w in workers {
        t.row([text(&w.id), last_seen(w), w.jobs.len().to_string()]);
        for j in &w.jobs {
            jobs.row([
                text(&w.id),
                text(&j.process_id),
                text(&j.step),
                fmt_duration_ms(j.idle_ms),
                j.deliveries.to_string(),
                text(&j.entry_id),
            ]);
        }
    }
    out.write_all(t.render().as_bytes())?;
    if !jobs.is_empty() {
        writeln!(out)?;
        out.write_all(jobs.render().as_bytes())?;
    }
    Ok(())
}

/// How long ago the gateway last heard from the worker: "3.2s ago".
fn last_seen(w: &WorkerView) -> String {
    format!("{} ago", fmt_duration_ms(w.last_seen_age_ms))
}

/// `honua dlq`: one row per dead letter.
pub(super) fn dead_letter_table(letters: &[DeadLetterView]) -> Table {
    let mut t = Table::new(&["ID", "PROCESS", "STEP", "DELIVERIES", "DEAD AT", "REASON"]);
    for d in letters {
        t.row([
            text(&d.id),
            text(&d.process_id),
            text(&d.step),
            d.deliveries.to_string(),
            when_ms(d.dead_ms),
            text(&d.reason),
        ]);
    }
    t
}

/// `honua health`: the status on a line of its own, then a row per check.
pub(super) fn print_health(out: &mut dyn Write, h: &HealthReply) -> std::io::Result<()> {
    writeln!(out, "{}", clean(&text(&h.status)))?;
    let mut t = Table::new(&["CHECK", "STATUS"]);
    for (name, value) in &h.checks {
        t.row([name.clone(), text(value)]);
    }
    if !t.is_empty() {
        out.write_all(t.render().as_bytes())?;
    }
    Ok(())
}

/// `honua drain`: the intake's state and what is still in flight.
pub(super) fn print_drain(
    out: &mut dyn Write,
    d: &honua_scheduler::intake::DrainReply,
) -> std::io::Result<()> {
    if d.draining {
        let by = d.by.as_deref().map(text).unwrap_or_default();
        let since = when_ms(d.since_ms);
        writeln!(out, "intake drained since {since} by {by}")?;
    } else {
        writeln!(out, "intake open")?;
    }
    let mut t = Table::new(&["RUNNING STEPS", "QUEUED STEPS", "PENDING", "ACTIVE"]);
    t.row([
        d.running_steps.to_string(),
        d.queued_steps.to_string(),
        d.pending_processes.to_string(),
        d.active_processes.to_string(),
    ]);
    out.write_all(t.render().as_bytes())?;
    if d.draining {
        writeln!(
            out,
            "{}",
            if d.drained {
                "drained: no step is running or queued"
            } else {
                "not drained yet: steps are still running or queued"
            }
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns_without_trailing_spaces() {
        let mut t = Table::new(&["ID", "STATUS", "ERROR"]);
        t.row(["a", "Completed", ""]);
        t.row(["long-id", "Failed", "boom"]);
        assert_eq!(
            t.render(),
            "ID       STATUS     ERROR\n\
             a        Completed\n\
             long-id  Failed     boom\n"
        );
    }

    #[test]
    fn table_cells_are_cleaned_and_cut() {
        let mut t = Table::new(&["A", "B"]);
        t.row(["x\ny\u{1b}[31m", &"z".repeat(200)]);
        let out = t.render();
        assert_eq!(out.lines().count(), 2, "{out}");
        assert!(!out.contains('\u{1b}'));
        let last = out.lines().nth(1).unwrap();
        assert!(last.starts_with("x y [31m  "), "{last}");
        assert!(last.ends_with('…'));
        assert_eq!(
            last.chars().filter(|c| *c == 'z').count(),
            MAX_CELL_CHARS - 1
        );
    }

    #[test]
    fn short_rows_and_headerless_tables_render() {
        let mut t = Table::default();
        t.row(["Status:", "Running"]);
        t.row(["Idempotency key:", "k1"]);
        assert_eq!(
            t.render(),
            "Status:           Running\nIdempotency key:  k1\n"
        );
        let mut t = Table::new(&["A", "B", "C"]);
        t.row(["1"]);
        assert_eq!(t.render(), "A  B  C\n1\n");
        assert_eq!(Table::new(&["A"]).render(), "A\n");
    }

    #[test]
    fn durations_print_compactly() {
        assert_eq!(fmt_duration_ms(0), "0ms");
        assert_eq!(fmt_duration_ms(850), "850ms");
        assert_eq!(fmt_duration_ms(12_345), "12.3s");
        assert_eq!(fmt_duration_ms(245_000), "4m05s");
        assert_eq!(fmt_duration_ms(7_800_000), "2h10m");
        assert_eq!(fmt_duration_ms(273_600_000), "3d04h");
    }

    #[test]
    fn timestamps_shorten_to_seconds() {
        assert_eq!(
            when(Some("2025-01-02T03:04:05.678Z")),
            "2025-01-02T03:04:05Z"
        );
        assert_eq!(when_ms(Some(0)), "1970-01-01T00:00:00Z");
        assert_eq!(when(None), "-");
        assert_eq!(when_ms(None), "-");
        assert_eq!(when(Some("soon")), "soon");
        assert_eq!(when_ms(Some(MAX_RFC3339_MS + 1)), "253402300800000 ms");
    }
}

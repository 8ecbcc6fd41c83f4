//! The results of one run: the JSON document (`--json FILE`) and the human summary.

use crate::baseline::BaselineResult;
use crate::console::ConsoleResult;
use crate::crash::{CrashResult, Nemesis};
use crate::latency::LatencyResult;
use crate::llm::LlmResult;
use crate::server::ServerInfo;
use crate::stats::short;
use crate::throughput::{EngineResult, Shape};
use serde::Serialize;
use std::fmt::Write;

/// Other load on the host (cores) above which the summary warns.
const OTHER_LOAD_WARNING: f64 = 0.25;

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub tool: &'static str,
    pub tool_version: &'static str,
    /// "release" or "debug": a debug build measures the compiler, not the engine.
    pub build: &'static str,
    pub scenario: &'static str,
    pub quick: bool,
    pub host_cpus: usize,
    pub server: ServerInfo,
    pub baseline: Option<BaselineResult>,
    pub engine: Option<EngineResult>,
    /// Engine steps/s ÷ raw jobs/s, when both ran.
    pub ratio_engine_steps_to_raw_jobs: Option<f64>,
    /// Throughput by number of workers, each next to a raw run with as many consumers.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub scale: Vec<ScalePoint>,
    /// The fan-out/join shape (`all`), next to a raw run of its own.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dag: Option<ScalePoint>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub latency: Vec<LatencyResult>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub crash: Vec<CrashResult>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub llm: Option<LlmResult>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub console: Option<ConsoleResult>,
    /// The targets that this run measured (filled by [`Report::finish`]).
    pub targets: Vec<Target>,
}

/// One point of the scale scenario.
#[derive(Debug, Clone, Serialize)]
pub struct ScalePoint {
    pub workers: usize,
    pub raw: BaselineResult,
    pub engine: EngineResult,
    /// Engine steps/s ÷ raw jobs/s (same number of consumers).
    pub ratio_to_raw: f64,
}

/// A target of the issue next to what this run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub target: String,
    pub measured: String,
    /// The engine figure ÷ the raw Redis figure measured in the same run.
    pub ratio_to_raw: Option<f64>,
    /// `None`: undecided at the measurement's resolution.
    pub met: Option<bool>,
}

impl Report {
    pub fn new(scenario: &'static str, quick: bool, server: ServerInfo) -> Self {
        Self {
            tool: env!("CARGO_PKG_NAME"),
            tool_version: env!("CARGO_PKG_VERSION"),
            build: if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            },
            scenario,
            quick,
            host_cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            server,
            baseline: None,
            engine: None,
            ratio_engine_steps_to_raw_jobs: None,
            scale: Vec::new(),
            dag: None,
            latency: Vec::new(),
            crash: Vec::new(),
            llm: None,
            console: None,
            targets: Vec::new(),
        }
    }

    /// Computes the target table from what ran.
    pub fn finish(&mut self) {
        self.targets = targets(self);
    }

    pub fn set_results(&mut self, baseline: Option<BaselineResult>, engine: Option<EngineResult>) {
        self.ratio_engine_steps_to_raw_jobs = baseline
            .as_ref()
            .zip(engine.as_ref())
            .map(|(b, e)| e.steps_per_sec / b.jobs_per_sec);
        self.baseline = baseline;
        self.engine = engine;
    }

    /// What went wrong in the engine run (failed processes, dead letters, ...).
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(e) = &self.engine {
            out.extend(engine_problems("throughput", &e.outcome, &e.health));
        }
        for p in &self.scale {
            let what = format!("scale {} workers", p.workers);
            out.extend(engine_problems(&what, &p.engine.outcome, &p.engine.health));
        }
        if let Some(p) = &self.dag {
            out.extend(engine_problems("dag", &p.engine.outcome, &p.engine.health));
        }
        for l in &self.latency {
            let what = format!("latency {}", l.label);
            out.extend(engine_problems(&what, &l.outcome, &l.health));
        }
        for c in &self.crash {
            out.extend(c.problems());
        }
        if let Some(l) = &self.llm {
            out.extend(l.problems());
        }
        out
    }
}

fn engine_problems(
    scenario: &str,
    o: &crate::throughput::Outcome,
    health: &crate::throughput::Health,
) -> Vec<String> {
    let mut out = Vec::new();
    for (n, status) in [
        (o.failed, "failed"),
        (o.cancelled, "cancelled"),
        (o.timed_out, "timed out"),
    ] {
        if n > 0 {
            out.push(format!("{n} processes {status}"));
        }
    }
    out.extend(health.anomalies());
    out.into_iter()
        .map(|p| format!("{scenario}: {p}"))
        .collect()
}

impl Report {
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let _ = self.write_summary(&mut s);
        s
    }

    fn write_summary(&self, s: &mut String) -> std::fmt::Result {
        writeln!(
            s,
            "honua-loadtest {}{}: {}; {} CPUs on this host",
            self.scenario,
            if self.quick { " (quick)" } else { "" },
            server_line(&self.server, self.engine.as_ref().map(|e| e.waitaof)),
            self.host_cpus
        )?;
        if self.build == "debug" {
            writeln!(
                s,
                "  warning: debug build; run with --release for real numbers"
            )?;
        }
        if let Some(b) = &self.baseline {
            writeln!(
                s,
                "  raw cycle: {} jobs; {} producers pipelining XADD by {}; {} consumers doing XREADGROUP COUNT {} + one XACK; {}-byte job envelope",
                b.jobs, b.producers, b.batch, b.consumers, b.batch, b.payload_bytes
            )?;
        }
        if let Some(e) = &self.engine {
            writeln!(
                s,
                "  engine:    {} {} processes ({}{}); {} scheduler(s), {} workers ({} concurrent steps each), each on a runtime of {} thread(s); {} submitters",
                e.processes,
                e.process_type,
                match e.shape {
                    Shape::Line => "3 noop steps, A → B → C",
                    Shape::Dag => "4 noop steps, A → {B, C} → D, D joins both",
                },
                match e.output_bytes {
                    0 => String::new(),
                    n => format!("; each outputs {n} bytes"),
                },
                e.schedulers,
                e.workers,
                e.max_concurrent_steps,
                crate::throughput::ENGINE_RUNTIME_THREADS,
                e.submitters
            )?;
        }
        if self.baseline.is_some() || self.engine.is_some() {
            self.write_throughput(s)?;
        }
        self.write_dag(s)?;
        self.write_scale(s)?;
        self.write_latency(s)?;
        self.write_crash(s)?;
        self.write_llm(s)?;
        self.write_console(s)?;
        self.write_targets(s)
    }

    fn write_throughput(&self, s: &mut String) -> std::fmt::Result {
        writeln!(s)?;
        row(
            s,
            [
                "",
                "rate",
                "time",
                "Redis CPU",
                "Redis busy",
                "this process's CPU",
            ],
        )?;
        if let Some(b) = &self.baseline {
            row(
                s,
                [
                    "raw XADD/XREADGROUP/XACK",
                    &format!("{:.0} jobs/s", b.jobs_per_sec),
                    &format!("{:.3} s", b.seconds),
                    &format!("{:.2} µs/job", b.redis_cpu_us_per_job),
                    &format!("{:.0}%", b.redis_busy * 100.0),
                    &format!("{} µs/job", opt(b.client_cpu_us_per_job)),
                ],
            )?;
        }
        if let Some(e) = &self.engine {
            let split = e.cpu_us_per_step.map_or("n/a".to_string(), |c| {
                format!(
                    "scheduler {:.1} + workers {:.1} + submitters {:.1} µs/step",
                    c.scheduler, c.workers, c.submitters
                )
            });
            row(
                s,
                [
                    "engine",
                    &format!("{:.0} steps/s", e.steps_per_sec),
                    &format!("{:.3} s", e.seconds),
                    &format!("{:.2} µs/step", e.redis_cpu_us_per_step),
                    &format!("{:.0}%", e.redis_busy * 100.0),
                    &split,
                ],
            )?;
            let processes = format!("{:.0} processes/s", e.processes_per_sec);
            row(s, ["", &processes, "", "", "", ""])?;
        }
        writeln!(s)?;
        if let Some(r) = self.ratio_engine_steps_to_raw_jobs {
            writeln!(
                s,
                "  engine steps/s ÷ raw jobs/s = {r:.4} (the raw cycle is {:.1}× faster)",
                1.0 / r
            )?;
        }
        if let Some(b) = &self.baseline {
            writeln!(
                s,
                "  Redis time per raw job by command: {}",
                commands(&b.redis_commands)
            )?;
        }
        if let Some(e) = &self.engine {
            self.write_engine_details(s, e)?;
        }
        Ok(())
    }

    fn write_engine_details(&self, s: &mut String, e: &EngineResult) -> std::fmt::Result {
        writeln!(
            s,
            "  Redis time per step by command (a script's evalsha includes the commands it runs): {}",
            commands(&e.redis_commands)
        )?;
        if let Some(b) = e.busy {
            writeln!(
                s,
                "  cores busy during the engine run: Redis {:.2}, scheduler {:.2}, workers {:.2}, submitters {:.2}; rest of the host {}",
                e.redis_busy,
                b.scheduler,
                b.workers,
                b.submitters,
                opt(e.host_other_busy)
            )?;
        }
        if let Some(other) = e.host_other_busy.filter(|b| *b > OTHER_LOAD_WARNING) {
            writeln!(
                s,
                "  warning: the rest of the host kept {other:.2} cores busy during the run; the figures are low, rerun on a quiet machine"
            )?;
        }
        writeln!(
            s,
            "  outcome: {}; all submitted after {:.3} s",
            e.outcome, e.submit_seconds
        )?;
        let h = &e.health;
        let problems = self.problems();
        writeln!(
            s,
            "  engine health (warm-up included): {} steps started, {} committed of {} expected ({} with their successors, by the worker); {} revision conflicts; {}",
            h.steps_started,
            h.steps_committed,
            h.steps_expected,
            h.steps_committed_by_workers,
            h.revision_conflicts,
            if problems.is_empty() {
                "no anomalies".to_string()
            } else {
                format!("PROBLEMS: {}", problems.join("; "))
            }
        )
    }
}

impl Report {
    fn write_dag(&self, s: &mut String) -> std::fmt::Result {
        let Some(p) = &self.dag else {
            return Ok(());
        };
        let e = &p.engine;
        writeln!(
            s,
            "\ndag shape (A → {{B, C}} → D): {} processes, 1 scheduler, {} workers; raw cycle {:.0} jobs/s at {:.2} µs/job",
            e.processes, p.workers, p.raw.jobs_per_sec, p.raw.redis_cpu_us_per_job
        )?;
        writeln!(
            s,
            "  {:.0} steps/s ({:.4} of raw), Redis {:.1} µs/step ({:.1}× the raw job){}",
            e.steps_per_sec,
            p.ratio_to_raw,
            e.redis_cpu_us_per_step,
            e.redis_cpu_us_per_step / p.raw.redis_cpu_us_per_job,
            e.cpu_us_per_step.map_or(String::new(), |c| format!(
                ", scheduler {:.1} + workers {:.1} µs/step",
                c.scheduler, c.workers
            )),
        )
    }

    fn write_scale(&self, s: &mut String) -> std::fmt::Result {
        if self.scale.is_empty() {
            return Ok(());
        }
        writeln!(
            s,
            "\nscale: {} processes per point, 1 scheduler; raw cycle with as many consumers as workers",
            self.scale[0].engine.processes
        )?;
        writeln!(
            s,
            "  {:>7} {:>13} {:>15} {:>9} {:>15} {:>24}",
            "workers", "steps/s", "processes/s", "÷ raw", "Redis µs/step", "cores: sched/workers"
        )?;
        for p in &self.scale {
            let e = &p.engine;
            writeln!(
                s,
                "  {:>7} {:>13.0} {:>15.0} {:>9.4} {:>15.1} {:>24}",
                p.workers,
                e.steps_per_sec,
                e.processes_per_sec,
                p.ratio_to_raw,
                e.redis_cpu_us_per_step,
                e.busy.map_or("n/a".into(), |b| format!(
                    "{:.2}/{:.2}",
                    b.scheduler, b.workers
                )),
            )?;
        }
        Ok(())
    }

    fn write_latency(&self, s: &mut String) -> std::fmt::Result {
        for l in &self.latency {
            writeln!(
                s,
                "\nlatency at {}: {} processes (3 noop steps) submitted at {:.1}/s (achieved {:.1}/s), 1 scheduler, {} workers",
                l.label,
                l.processes,
                l.target_processes_per_sec,
                l.achieved_processes_per_sec,
                l.workers
            )?;
            writeln!(
                s,
                "  dispatch (enqueued → started):  {} (±{} ms: records hold whole ms)",
                l.dispatch.line(),
                l.resolution_ms
            )?;
            writeln!(
                s,
                "  end to end per process:        {}",
                l.end_to_end.line()
            )?;
            writeln!(s, "    of which step execution:     {}", l.execution.line())?;
            writeln!(s, "    and scheduler hand-off:      {}", l.handoff.line())?;
            if let Some(r) = &l.raw_delivery {
                writeln!(s, "  raw XADD → XREADGROUP:         {}", r.line())?;
            }
            writeln!(
                s,
                "  Redis time per step by command: {}",
                commands(&l.redis_commands)
            )?;
            writeln!(
                s,
                "  Redis {:.1} µs/step ({:.0}% busy); scheduler {} / workers {} cores; rest of the host {} cores",
                l.redis_cpu_us_per_step,
                l.redis_busy * 100.0,
                l.busy
                    .map_or("n/a".into(), |b| format!("{:.2}", b.scheduler)),
                l.busy.map_or("n/a".into(), |b| format!("{:.2}", b.workers)),
                opt(l.host_other_busy)
            )?;
        }
        Ok(())
    }

    fn write_crash(&self, s: &mut String) -> std::fmt::Result {
        for c in &self.crash {
            let faults = match c.nemesis {
                Nemesis::Kill => format!("{} killed with SIGKILL and replaced", c.kills),
                Nemesis::Stop => format!("{} paused with SIGSTOP for {} ms", c.kills, c.fault_ms),
                Nemesis::Redis => format!(
                    "redis-server killed with SIGKILL {} times, {} ms down each",
                    c.kills, c.fault_ms
                ),
            };
            writeln!(
                s,
                "\ncrash ({}, nemesis {}): lease {} ms, sweep {} ms, heartbeat {} ms; {} worker processes, {faults}; {} processes at {}/s, 3 steps of {} ms",
                c.label,
                c.nemesis.as_str(),
                c.lease_ms,
                c.sweep_ms,
                c.heartbeat_ms,
                c.workers,
                c.processes,
                c.processes_per_sec,
                c.step_ms
            )?;
            writeln!(
                s,
                "  lost processes {}; step commits {} for {} steps (duplicates {}); executions {} (duplicates caused by {}: {}, of them beyond one per claim: {}; never run {})",
                c.lost_processes,
                c.step_commits,
                c.steps,
                c.duplicate_commits,
                c.executions,
                c.nemesis.as_str(),
                c.duplicate_executions,
                c.duplicate_claim_executions,
                c.steps_never_executed
            )?;
            if c.resubmitted > 0 {
                writeln!(
                    s,
                    "  {} submissions retried after a lost answer got back the process their first attempt created (idempotency key)",
                    c.resubmitted
                )?;
            }
            if c.nemesis != Nemesis::Redis {
                writeln!(
                    s,
                    "  reclaim ({} → claimed again) of the {} jobs the faulted workers held: {}; bound lease + sweep = {} ms",
                    c.nemesis.as_str(),
                    c.jobs_held_by_killed_workers,
                    c.reclaim.line(),
                    c.reclaim_bound_ms
                )?;
            }
            writeln!(s, "  outcome: {}", c.outcome)?;
        }
        Ok(())
    }

    fn write_llm(&self, s: &mut String) -> std::fmt::Result {
        let Some(l) = &self.llm else {
            return Ok(());
        };
        writeln!(
            s,
            "\nllm: {} one-step llm processes offered at {:.0} requests/min; limit {} requests/min + burst {}, {} tokens/min + burst {}; provider latency {} ms; {} worker processes",
            l.processes,
            l.offered_requests_per_minute,
            l.requests_per_minute,
            l.burst_requests,
            l.tokens_per_minute,
            l.burst_tokens,
            l.provider_latency_ms,
            l.workers
        )?;
        writeln!(
            s,
            "  provider saw {} requests {:?} over {:.1} s: {:.0} requests/min ({:.1}% of the limit after the burst), {:.0} tokens/min",
            l.requests,
            l.statuses,
            l.span_secs,
            l.achieved_requests_per_minute,
            l.request_limit_used * 100.0,
            l.achieved_tokens_per_minute
        )?;
        for w in &l.windows {
            writeln!(
                s,
                "  any {} s window: at most {} requests (bucket allows {:.1}), {} tokens (allows {:.0}); overshoot {} requests, {} tokens",
                w.window_secs,
                w.max_requests,
                w.allowed_requests,
                w.max_tokens,
                w.allowed_tokens,
                w.request_overshoot,
                w.token_overshoot
            )?;
        }
        for w in &l.per_worker {
            writeln!(
                s,
                "  {}: in-flight steps max {} mean {:.1}; RSS idle {} MiB, peak {} MiB",
                w.worker,
                w.in_flight_max,
                w.in_flight_mean,
                opt(w.rss_idle_mb),
                opt(w.rss_peak_mb)
            )?;
        }
        if l.in_flight_target > 0 {
            writeln!(
                s,
                "  one worker with {} llm steps in flight (target {}): RSS {} MiB; {}",
                l.in_flight_reached,
                l.in_flight_target,
                opt(l.in_flight_rss_mb),
                l.in_flight_outcome
                    .map_or("not run".to_string(), |o| o.to_string())
            )?;
        }
        writeln!(s, "  outcome: {}", l.outcome)
    }

    fn write_console(&self, s: &mut String) -> std::fmt::Result {
        let Some(c) = &self.console else {
            return Ok(());
        };
        writeln!(
            s,
            "\nconsole: {} processes in Redis ({} active, {} finished; seeded in {:.1} s); {} renders of each page over loopback HTTP, request to last byte",
            c.processes, c.active, c.finished, c.seed_seconds, c.renders
        )?;
        for (page, d, bytes) in [
            ("list (/ui/processes)", &c.list, Some(c.list_bytes)),
            (
                "detail (/ui/processes/{id})",
                &c.detail,
                Some(c.detail_bytes),
            ),
            ("overview (/ui)", &c.overview, None),
        ] {
            writeln!(
                s,
                "  {:<28} {}{}",
                page,
                d.line(),
                bytes.map_or(String::new(), |b| format!("; {b} bytes"))
            )?;
        }
        Ok(())
    }

    fn write_targets(&self, s: &mut String) -> std::fmt::Result {
        if !self.targets.is_empty() {
            writeln!(s, "\ntargets:")?;
            writeln!(
                s,
                "  {:<72} {:>26} {:>9}  met",
                "target", "measured", "÷ raw"
            )?;
            for t in &self.targets {
                writeln!(
                    s,
                    "  {:<72} {:>26} {:>9}  {}",
                    t.target,
                    t.measured,
                    t.ratio_to_raw.map_or("".into(), |r| format!("{r:.3}")),
                    match t.met {
                        Some(true) => "yes",
                        Some(false) => "NO",
                        None => "undecided",
                    }
                )?;
            }
        }
        Ok(())
    }
}

/// Label of the latency run at 1,000 steps/s.
pub const AT_1000_STEPS: &str = "1000 steps/s";
/// Label of the latency run at 50 processes/s.
pub const AT_50_PROCESSES: &str = "50 processes/s";
/// Label of the crash run with the default lease and sweep.
pub const CRASH_DEFAULT: &str = "default settings";
/// Label of the crash run with a 2 s lease.
pub const CRASH_2S: &str = "2 s lease";

/// Whether the true value behind a measured `value` (within ±`res` of it, exclusive) is
/// below `limit`: `Some(true)` surely, `Some(false)` surely not, `None` undecided.
fn below(value: f64, limit: f64, res: f64) -> Option<bool> {
    if value + res <= limit {
        Some(true)
    } else if value - res >= limit {
        Some(false)
    } else {
        None
    }
}

fn targets(r: &Report) -> Vec<Target> {
    let mut out = Vec::new();
    if let Some(c) = &r.console {
        for (page, d) in [("list", &c.list), ("detail", &c.detail)] {
            out.push(Target {
                target: format!(
                    "console {page} page < 100 ms with {} processes",
                    c.processes
                ),
                measured: format!("p50 {} ms, p99 {} ms", short(d.p50_ms), short(d.p99_ms)),
                ratio_to_raw: None,
                met: Some(d.p99_ms < 100.0),
            });
        }
    }
    let raw = r.baseline.as_ref();
    // The targets are set on the line shape.
    if let Some(e) = r
        .engine
        .as_ref()
        .filter(|e| e.workers == 2 && e.schedulers == 1 && e.shape == Shape::Line)
    {
        // Issue 14's targets, set against the raw cycle of the same run (hosts differ).
        let ratio = raw.map(|b| e.steps_per_sec / b.jobs_per_sec);
        out.push(Target {
            target: "throughput ≥ 0.25 of the raw cycle's jobs/s (1 scheduler, 2 workers)".into(),
            measured: format!("{:.0} steps/s", e.steps_per_sec),
            ratio_to_raw: ratio,
            met: ratio.map(|r| r >= 0.25),
        });
        let times = raw.map(|b| e.redis_cpu_us_per_step / b.redis_cpu_us_per_job);
        out.push(Target {
            target: "Redis CPU per step ≤ 4× the raw cycle's per job".into(),
            measured: format!("{:.1} µs/step", e.redis_cpu_us_per_step),
            ratio_to_raw: times,
            met: times.map(|t| t <= 4.0),
        });
        if let Some(c) = &e.cpu_us_per_step {
            let both = c.scheduler + c.workers;
            out.push(Target {
                target: "scheduler + workers CPU ≤ 40 µs per step".into(),
                measured: format!("{both:.1} µs/step ({:.1} + {:.1})", c.scheduler, c.workers),
                ratio_to_raw: None,
                met: Some(both <= 40.0),
            });
        }
    }
    for l in &r.latency {
        let raw_p99 = l
            .raw_delivery
            .as_ref()
            .map(|d| d.p99_ms)
            .filter(|p| *p > 0.0);
        if l.label == AT_1000_STEPS {
            out.push(Target {
                target: "dispatch p99 < 2 ms at 1,000 steps/s".into(),
                measured: format!("p99 {} ms (±1)", short(l.dispatch.p99_ms)),
                ratio_to_raw: raw_p99.map(|p| l.dispatch.p99_ms / p),
                met: below(l.dispatch.p99_ms, 2.0, l.resolution_ms),
            });
        }
        if l.label == AT_50_PROCESSES {
            out.push(Target {
                target: "3-step process end to end p99 < 8 ms at 50/s".into(),
                measured: format!("p99 {} ms (±1)", short(l.end_to_end.p99_ms)),
                ratio_to_raw: raw_p99.map(|p| l.end_to_end.p99_ms / p),
                met: below(l.end_to_end.p99_ms, 8.0, l.resolution_ms),
            });
        }
    }
    for c in r.crash.iter().filter(|c| c.nemesis == Nemesis::Kill) {
        let limit_s = match c.label {
            CRASH_DEFAULT => Some(17.0),
            CRASH_2S => Some(3.0),
            _ => None,
        };
        if let Some(limit) = limit_s {
            out.push(Target {
                target: format!("reclaim p99 ≤ {limit} s after kill -9 ({})", c.label),
                measured: if c.reclaim.samples == 0 {
                    "no reclaimed steps".into()
                } else {
                    format!("p99 {:.2} s", c.reclaim.p99_ms / 1000.0)
                },
                ratio_to_raw: None,
                met: (c.reclaim.samples > 0)
                    .then(|| below(c.reclaim.p99_ms, limit * 1000.0, 1.0))
                    .flatten(),
            });
        }
        out.push(Target {
            target: format!("lost processes = 0 ({})", c.label),
            measured: c.lost_processes.to_string(),
            ratio_to_raw: None,
            met: Some(c.lost_processes == 0),
        });
        out.push(Target {
            target: format!("duplicate step commits = 0 ({})", c.label),
            measured: c.duplicate_commits.to_string(),
            ratio_to_raw: None,
            met: Some(c.duplicate_commits == 0),
        });
    }
    if let Some(l) = &r.llm {
        let over: u64 = l
            .windows
            .iter()
            .map(|w| w.request_overshoot + w.token_overshoot)
            .sum();
        out.push(Target {
            target: "limiter overshoot 0 in any sliding window".into(),
            measured: format!(
                "{over} (windows {})",
                l.windows
                    .iter()
                    .map(|w| format!("{} s", w.window_secs))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            ratio_to_raw: None,
            met: (!l.windows.is_empty()).then_some(over == 0),
        });
        out.push(Target {
            target: "≥ 95 % of the limit used under saturation".into(),
            measured: format!("{:.1} %", l.request_limit_used * 100.0),
            ratio_to_raw: None,
            met: Some(l.request_limit_used >= 0.95),
        });
        let idle = l
            .per_worker
            .iter()
            .filter_map(|w| w.rss_idle_mb)
            .reduce(f64::max);
        out.push(Target {
            target: "worker idle RSS < 30 MB".into(),
            measured: idle.map_or("n/a".into(), |m| format!("{m:.1} MiB")),
            ratio_to_raw: None,
            met: idle.map(|m| m * 1.048_576 < 30.0),
        });
        if l.in_flight_target > 0 {
            out.push(Target {
                target: format!(
                    "{} in-flight LLM steps in one worker < 150 MB",
                    l.in_flight_target
                ),
                measured: format!(
                    "{} MiB with {} in flight",
                    opt(l.in_flight_rss_mb),
                    l.in_flight_reached
                ),
                ratio_to_raw: None,
                met: l
                    .in_flight_rss_mb
                    .filter(|_| l.in_flight_reached >= l.in_flight_target as u64)
                    .map(|m| m * 1.048_576 < 150.0),
            });
        }
    }
    out
}

/// One line of the summary table.
fn row(s: &mut String, [label, rate, time, cpu, busy, client]: [&str; 6]) -> std::fmt::Result {
    let line = format!("  {label:<26} {rate:>18} {time:>9} {cpu:>15} {busy:>10}  {client}");
    writeln!(s, "{}", line.trim_end())
}

fn server_line(info: &ServerInfo, waitaof: Option<bool>) -> String {
    let origin = match info.origin {
        "private" => "private redis-server started by this run",
        _ => "external server (its CPU figures include other clients)",
    };
    let aof = match (info.aof_enabled, &info.appendfsync) {
        (false, _) => "AOF off".to_string(),
        (true, Some(fsync)) => format!("AOF on, appendfsync {fsync}"),
        (true, None) => "AOF on".to_string(),
    };
    let wait = match waitaof {
        Some(true) => "; submissions wait for WAITAOF",
        Some(false) => "; no WAITAOF (needs Redis 7.2+ with AOF on)",
        None => "",
    };
    format!("Redis {}, {origin} ({aof}{wait})", info.version)
}

fn commands(costs: &[crate::server::CommandCost]) -> String {
    costs
        .iter()
        .map(|c| {
            format!(
                "{} {:.1} µs ({:.2} calls)",
                c.command, c.usec_per_op, c.calls_per_op
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn opt(v: Option<f64>) -> String {
    v.map_or("n/a".to_string(), |v| format!("{v:.2}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn below_respects_the_resolution() {
        // Whole-ms figures are within ±1 ms of the truth.
        assert_eq!(below(1.0, 2.0, 1.0), Some(true));
        assert_eq!(below(2.0, 2.0, 1.0), None);
        assert_eq!(below(3.0, 2.0, 1.0), Some(false));
        assert_eq!(below(16_000.0, 17_000.0, 1.0), Some(true));
        assert_eq!(below(17_500.0, 17_000.0, 1.0), Some(false));
    }
}

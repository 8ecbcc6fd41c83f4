//! The results of one run: the JSON document (`--json FILE`) and the human summary.

use crate::baseline::BaselineResult;
use crate::server::ServerInfo;
use crate::throughput::EngineResult;
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
        }
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
        let Some(e) = &self.engine else {
            return Vec::new();
        };
        let o = &e.outcome;
        let mut out = Vec::new();
        for (n, what) in [
            (o.failed, "failed"),
            (o.cancelled, "cancelled"),
            (o.timed_out, "timed out"),
        ] {
            if n > 0 {
                out.push(format!("{n} processes {what}"));
            }
        }
        out.extend(e.health.anomalies());
        out
    }

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
                "  engine:    {} {} processes (3 noop steps, A → B → C); {} scheduler(s), {} workers ({} concurrent steps each); {} submitters",
                e.processes,
                e.process_type,
                e.schedulers,
                e.workers,
                e.max_concurrent_steps,
                e.submitters
            )?;
        }
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
            "  engine health (warm-up included): {} steps started, {} committed of {} expected; {} revision conflicts; {}",
            h.steps_started,
            h.steps_committed,
            h.steps_expected,
            h.revision_conflicts,
            if problems.is_empty() {
                "no anomalies".to_string()
            } else {
                format!("PROBLEMS: {}", problems.join("; "))
            }
        )
    }
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

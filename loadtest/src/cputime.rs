//! CPU time of this process's threads, attributed to the benchmark's components by thread
//! name. Every scheduler and worker runs on its own tokio runtime whose threads are
//! named after it (see [`crate::component`]), so per-thread time from
//! `/proc/self/task/<tid>/schedstat` (nanoseconds on CPU) adds up per component.
//!
//! Linux only: elsewhere [`sample`] returns `None` and the report says "n/a". A thread that
//! exits between two samples loses its time (runtimes stay up until after the last sample).

use serde::Serialize;
use std::collections::HashMap;
use std::time::Duration;

/// Thread-name prefix of the schedulers' runtimes.
pub const SCHEDULER_THREADS: &str = "lt-sched";
/// Thread-name prefix of the workers' runtimes.
pub const WORKER_THREADS: &str = "lt-worker";

/// Which component a thread belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Group {
    Scheduler,
    Workers,
    /// Everything else: submitters, the completion poller, the raw baseline's tasks.
    Client,
}

impl Group {
    fn of(thread_name: &str) -> Self {
        if thread_name.starts_with(SCHEDULER_THREADS) {
            Self::Scheduler
        } else if thread_name.starts_with(WORKER_THREADS) {
            Self::Workers
        } else {
            Self::Client
        }
    }
}

/// One sample: CPU time per live thread.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    threads: HashMap<u32, (Group, u64)>,
}

/// CPU used between two samples, per component.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct CpuUse {
    pub scheduler_secs: f64,
    pub workers_secs: f64,
    pub client_secs: f64,
}

impl CpuUse {
    pub fn total_secs(&self) -> f64 {
        self.scheduler_secs + self.workers_secs + self.client_secs
    }
}

/// Reads every thread of this process; `None` where `/proc` has no schedstat.
pub fn sample() -> Option<Sample> {
    let mut threads = HashMap::new();
    for entry in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        let Some(tid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        let path = entry.path();
        // A thread may exit between read_dir and these reads: skip it.
        let (Ok(name), Ok(stat)) = (
            std::fs::read_to_string(path.join("comm")),
            std::fs::read_to_string(path.join("schedstat")),
        ) else {
            continue;
        };
        let Some(ns) = stat.split_whitespace().next().and_then(|s| s.parse().ok()) else {
            continue;
        };
        threads.insert(tid, (Group::of(name.trim_end()), ns));
    }
    Some(Sample { threads })
}

impl Sample {
    /// CPU used since `earlier`, per component.
    pub fn since(&self, earlier: &Sample) -> CpuUse {
        let mut ns: HashMap<Group, u64> = HashMap::new();
        for (tid, (group, now)) in &self.threads {
            let before = earlier.threads.get(tid).map_or(0, |(_, t)| *t);
            *ns.entry(*group).or_default() += now.saturating_sub(before);
        }
        let secs = |g| Duration::from_nanos(ns.get(&g).copied().unwrap_or(0)).as_secs_f64();
        CpuUse {
            scheduler_secs: secs(Group::Scheduler),
            workers_secs: secs(Group::Workers),
            client_secs: secs(Group::Client),
        }
    }
}

/// Seconds of CPU the whole host has spent busy (all CPUs, every process and the kernel)
/// since boot, from the `cpu` line of `/proc/stat`; `None` where there is none.
pub fn host_busy_secs() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    parse_host_busy(&stat)
}

/// user + nice + system + irq + softirq + steal, in USER_HZ ticks (100 a second on Linux).
fn parse_host_busy(stat: &str) -> Option<f64> {
    const USER_HZ: f64 = 100.0;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().ok())
        .collect::<Option<_>>()?;
    let field = |i: usize| ticks.get(i).copied().unwrap_or(0);
    let busy = field(0) + field(1) + field(2) + field(5) + field(6) + field(7);
    Some(busy as f64 / USER_HZ)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_are_grouped_by_name_prefix() {
        assert_eq!(Group::of("lt-sched-0"), Group::Scheduler);
        assert_eq!(Group::of("lt-worker-1"), Group::Workers);
        assert_eq!(Group::of("honua-loadtest"), Group::Client);
        assert_eq!(Group::of("lt-main"), Group::Client);
    }

    #[test]
    fn since_subtracts_per_thread_and_counts_new_threads_whole() {
        let earlier = Sample {
            threads: HashMap::from([(1, (Group::Scheduler, 1_000_000_000))]),
        };
        let later = Sample {
            threads: HashMap::from([
                (1, (Group::Scheduler, 1_500_000_000)),
                (2, (Group::Workers, 250_000_000)),
            ]),
        };
        let used = later.since(&earlier);
        assert_eq!(used.scheduler_secs, 0.5);
        assert_eq!(used.workers_secs, 0.25);
        assert_eq!(used.client_secs, 0.0);
    }

    #[test]
    fn host_busy_time_leaves_out_idle_and_iowait() {
        // user nice system idle iowait irq softirq steal guest guest_nice
        let stat = "cpu  100 20 30 5000 70 1 2 3 0 0\ncpu0 50 10 15 2500 35 0 1 1 0 0\n";
        assert_eq!(parse_host_busy(stat), Some(1.56));
    }

    #[test]
    fn sampling_this_process_sees_the_current_thread() {
        if let Some(s) = sample() {
            assert!(!s.threads.is_empty());
        }
    }
}

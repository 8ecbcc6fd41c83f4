//! Measures one stretch of a run: wall time, Redis CPU and command time, this process's CPU
//! by component, and what the rest of the host was doing meanwhile.

use crate::cputime::{self, CpuUse};
use crate::error::BenchError;
use crate::server::{self, CommandCost, CommandStats};
use redis::aio::MultiplexedConnection;
use std::time::{Duration, Instant};

/// `/proc/stat` counts in 10 ms ticks per CPU: shorter stretches get no host figure.
const MIN_HOST_WINDOW: Duration = Duration::from_millis(500);

/// Readings taken when the stretch started.
pub struct Meter {
    start: Instant,
    cpu: Option<cputime::Sample>,
    host_busy: Option<f64>,
    redis_cpu: f64,
    commands: CommandStats,
}

/// What the stretch used.
pub struct Usage {
    pub seconds: f64,
    pub redis_cpu_secs: f64,
    /// This process's CPU by component; `None` without /proc.
    pub cpu: Option<CpuUse>,
    /// Cores the rest of the host kept busy (other processes, the kernel's network work);
    /// `None` without /proc or for stretches too short to tell.
    pub host_other_busy: Option<f64>,
    commands_before: CommandStats,
    commands_after: CommandStats,
}

impl Meter {
    /// Takes the starting readings; the clock starts last.
    pub async fn start(redis: &mut MultiplexedConnection) -> Result<Self, BenchError> {
        let cpu = cputime::sample();
        let host_busy = cputime::host_busy_secs();
        let redis_cpu = server::cpu_seconds(redis).await?;
        let commands = server::command_stats(redis).await?;
        Ok(Self {
            start: Instant::now(),
            cpu,
            host_busy,
            redis_cpu,
            commands,
        })
    }

    pub fn started(&self) -> Instant {
        self.start
    }

    /// Takes the closing readings for a stretch whose work ended at `end`.
    pub async fn stop(
        self,
        redis: &mut MultiplexedConnection,
        end: Instant,
    ) -> Result<Usage, BenchError> {
        let elapsed = end.duration_since(self.start);
        let seconds = elapsed.as_secs_f64();
        let redis_cpu_secs = server::cpu_seconds(redis).await? - self.redis_cpu;
        let commands_after = server::command_stats(redis).await?;
        let cpu = cputime::sample()
            .zip(self.cpu)
            .map(|(after, before)| after.since(&before));
        let host_other_busy = cputime::host_busy_secs()
            .filter(|_| elapsed >= MIN_HOST_WINDOW)
            .zip(self.host_busy)
            .zip(cpu)
            .map(|((after, before), ours)| {
                ((after - before - redis_cpu_secs - ours.total_secs()) / seconds).max(0.0)
            });
        Ok(Usage {
            seconds,
            redis_cpu_secs,
            cpu,
            host_other_busy,
            commands_before: self.commands,
            commands_after,
        })
    }
}

impl Usage {
    /// The `n` commands that took the most Redis time, per operation.
    pub fn top_commands(&self, ops: usize, n: usize) -> Vec<CommandCost> {
        self.commands_after.top_since(&self.commands_before, ops, n)
    }
}

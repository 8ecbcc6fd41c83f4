//! A lean progress line on stderr: redrawn in place (at most five times a second) when
//! stderr is a terminal, silent otherwise (CI logs stay clean).

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

const REDRAW: Duration = Duration::from_millis(200);
const WIDTH: usize = 78;

pub struct Progress {
    label: String,
    total: u64,
    unit: &'static str,
    start: Instant,
    drawn: Option<Instant>,
    tty: bool,
}

impl Progress {
    pub fn new(label: impl Into<String>, total: u64, unit: &'static str) -> Self {
        Self {
            label: label.into(),
            total,
            unit,
            start: Instant::now(),
            drawn: None,
            tty: std::io::stderr().is_terminal(),
        }
    }

    /// Shows `done` of the total, with `note` (e.g. what happened last) after it.
    pub fn update(&mut self, done: u64, note: &str) {
        if !self.tty || self.drawn.is_some_and(|t| t.elapsed() < REDRAW) {
            return;
        }
        self.drawn = Some(Instant::now());
        let pct = (done.min(self.total) * 100)
            .checked_div(self.total)
            .unwrap_or(100);
        let line = format!(
            "  {}: {done}/{} {} ({pct}%) {:.1} s {note}",
            self.label,
            self.total,
            self.unit,
            self.start.elapsed().as_secs_f64()
        );
        let line: String = line.chars().take(WIDTH).collect();
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r{line:<WIDTH$}");
        let _ = err.flush();
    }

    /// Clears the line.
    pub fn finish(&mut self) {
        if self.tty && self.drawn.is_some() {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r{:WIDTH$}\r", "");
            let _ = err.flush();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
        self.drawn = None;
    }
}

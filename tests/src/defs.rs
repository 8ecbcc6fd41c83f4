//! Process definitions shared by the whole-system tests, as `(file name, TOML)` entries
//! for [`crate::defs_dir`].

/// `Three`: three `noop` steps in sequence.
pub const THREE: (&str, &str) = (
    "three.toml",
    r#"
name = "Three"
version = 1
[[steps]]
name = "A"
kind = "noop"
next = "B"
[[steps]]
name = "B"
kind = "noop"
next = "C"
[[steps]]
name = "C"
kind = "noop"
"#,
);

/// `Fan`: `Start` fans out to `A`, `B` and `C`, which `Join` waits for.
pub const FAN: (&str, &str) = (
    "fan.toml",
    r#"
name = "Fan"
version = 1
[[steps]]
name = "Start"
kind = "noop"
next = ["A", "B", "C"]
[[steps]]
name = "A"
kind = "noop"
next = "Join"
[[steps]]
name = "B"
kind = "noop"
next = "Join"
[[steps]]
name = "C"
kind = "noop"
next = "Join"
[[steps]]
name = "Join"
kind = "noop"
join = "all"
"#,
);

/// `Count`: one `counter` step (a `honua-test-worker` kind) that ticks 40 times, checkpointing.
pub const COUNT: (&str, &str) = (
    "count.toml",
    r#"
name = "Count"
version = 1
[[steps]]
name = "Count"
kind = "counter"
timeout = "5m"
config = { total = 40, tick_ms = 50 }
"#,
);

/// `Gate`: an approval step waiting for signal `review`, then a `noop`.
pub const GATE: (&str, &str) = (
    "gate.toml",
    r#"
name = "Gate"
version = 1
[[steps]]
name = "Review"
kind = "approval"
config = { signal = "review" }
next = "Apply"
[[steps]]
name = "Apply"
kind = "noop"
"#,
);

/// A one-step process type `name` whose step `Call` is an `http` call; `step_lines` are
/// extra TOML lines of the step (`timeout = "10m"`, `retry = {…}`), `config` the inside of
/// its `config` table (`url = "…"` and more).
pub fn http_call(name: &str, step_lines: &str, config: &str) -> String {
    format!(
        r#"
name = "{name}"
version = 1
[[steps]]
name = "Call"
kind = "http"
{step_lines}
config = {{ {config} }}
"#
    )
}

//! The command line of the operator commands: clap's types for the global options and each
//! subcommand, and the parsers that check their values (URLs, durations, statuses, ids).

use clap::{Args, Parser, Subcommand};
use honua_shared::envelope::valid_id;
use honua_shared::status::ProcessStatus;
use reqwest::Url;
use std::path::PathBuf;
use std::time::Duration;

/// Where the gateway listens unless `--url` or `HONUA_URL` says otherwise.
pub const DEFAULT_URL: &str = "http://127.0.0.1:9090";

const GLOBAL: &str = "Operator options";

/// Appended to `honua --help`.
pub const AFTER_HELP: &str = "\
Environment:
  HONUA_URL    gateway base URL (as --url)
  HONUA_TOKEN  API token, sent as 'Authorization: Bearer <token>' (environment only)

Exit codes:
  0  success
  1  the request failed (other HTTP errors); submit --wait ended not Completed;
     state check found a corrupt or oversize record
  2  usage error
  3  not found (404)
  4  conflict / invalid state (409)
  5  unauthorized or forbidden (401, 403)
  6  unavailable (502, 503, 504, connection refused, timeout); health not Healthy";

/// Options every operator command takes (global flags of `honua`).
#[derive(Debug, Clone, Args)]
pub struct GlobalOpts {
    // Checked when an operator command runs (not by clap), so a stray HONUA_URL never
    // stops `honua scheduler` or `honua worker` from starting.
    /// Gateway base URL.
    #[arg(
        long,
        env = "HONUA_URL",
        default_value = DEFAULT_URL,
        global = true,
        help_heading = GLOBAL
    )]
    pub url: String,
    /// Print the response body as received (JSON), for scripts.
    #[arg(long, global = true, help_heading = GLOBAL)]
    pub json: bool,
    /// Time limit of each HTTP request, connecting included.
    #[arg(
        long,
        value_name = "DURATION",
        default_value = "10s",
        value_parser = parse_duration_arg,
        global = true,
        help_heading = GLOBAL
    )]
    pub request_timeout: Duration,
    /// The API token: from `HONUA_TOKEN` only (the binary fills it in).
    #[arg(skip)]
    pub token: Option<String>,
}

/// The operator command line on its own (`honua.rs` flattens [`GlobalOpts`] and
/// [`Command`] into its own parser; tests use [`CliArgs::try_parse_args`]).
#[derive(Debug, Clone, Parser)]
#[command(name = "honua", about = "Honua operator commands", after_help = AFTER_HELP)]
pub struct CliArgs {
    #[command(flatten)]
    pub global: GlobalOpts,
    #[command(subcommand)]
    pub command: Command,
}

impl CliArgs {
    /// Parses `args` (the first one is the program name). A usage error's
    /// `exit_code()` is 2.
    pub fn try_parse_args<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        <Self as Parser>::try_parse_from(args)
    }
}

#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// List processes, newest first (GET /api/processes).
    Ps(PsArgs),
    /// Show one process: status, timings, error and its steps.
    Get {
        #[arg(value_parser = parse_id)]
        id: String,
    },
    /// Submit a process (POST /api/processes).
    Submit(SubmitArgs),
    /// Cancel an unfinished process; its running steps stop within one heartbeat.
    Cancel {
        #[arg(value_parser = parse_id)]
        id: String,
        /// Recorded with the cancellation.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Pause a running process: it starts no new step until resumed.
    Pause {
        #[arg(value_parser = parse_id)]
        id: String,
        /// Stop its running steps now (they run again on resume) instead of letting them
        /// finish.
        #[arg(long)]
        hand_back: bool,
        /// Recorded in the audit trail.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Resume a paused process: held steps start, timers go on with what they had left.
    Resume {
        #[arg(value_parser = parse_id)]
        id: String,
    },
    /// Re-run a Failed, Cancelled or TimedOut process from its failed step.
    Retry {
        #[arg(value_parser = parse_id)]
        id: String,
        /// A JSON object (file, or - for stdin) merged into the process input first.
        #[arg(long, value_name = "FILE")]
        patch: Option<PathBuf>,
        /// Re-run a finished process (Completed too) from this step of its definition
        /// instead: it and every step downstream of it run again.
        #[arg(long, value_name = "STEP")]
        from_step: Option<String>,
    },
    /// Re-enqueue the running or queued steps of a process now.
    RetryStep {
        #[arg(value_parser = parse_id)]
        id: String,
    },
    /// Send a signal to a step waiting for it (approval gates).
    Signal {
        #[arg(value_parser = parse_id)]
        id: String,
        /// The signal name the approval step waits for.
        #[arg(value_parser = parse_segment)]
        name: String,
        /// approve (the gateway's default), reject, or an outcome name.
        #[arg(long)]
        value: Option<String>,
    },
    /// Delete finished processes that ended longer ago than --older-than.
    Purge {
        /// Completed, Failed, Cancelled or TimedOut.
        #[arg(long, value_parser = parse_finished_status)]
        status: ProcessStatus,
        /// An age such as 30d, 12h or 90m.
        #[arg(long, value_name = "AGE", value_parser = parse_duration_arg)]
        older_than: Duration,
    },
    /// Drain the fleet's intake for maintenance (admin): new processes wait Pending, running
    /// ones go on. Prints what is still in flight.
    Drain {
        /// Only show whether intake is drained and what is in flight (read role); change nothing.
        #[arg(long, conflicts_with = "wait")]
        status: bool,
        /// Wait until no step is running or queued (exit 0), or --timeout (exit 1).
        #[arg(long)]
        wait: bool,
        /// How long --wait waits: 30m, 2h.
        #[arg(long, value_name = "AGE", value_parser = parse_duration_arg, default_value = "30m")]
        timeout: Duration,
    },
    /// Open the fleet's intake again (admin): Pending processes start, oldest first.
    ResumeIntake,
    /// A process's state (input, outputs, checkpoints) decoded, the check of every live
    /// process's state, and deleting a process (admin).
    State(StateArgs),
    /// Stream length, lag and pending entries of each queue.
    Queues,
    /// Live workers and the jobs they hold.
    Workers,
    /// Dead letters, newest first; `dlq replay ID` retries one.
    Dlq(DlqArgs),
    /// Gateway health; exits 0 only when Healthy.
    Health,
    /// Print the hex SHA-256 of TOKEN (or of one line of stdin with -), for api.keys.
    HashToken { token: String },
}

#[derive(Debug, Clone, Args)]
pub struct PsArgs {
    /// Pending, Running, WaitingForApproval, Paused, Completed, Failed, Cancelled or TimedOut.
    #[arg(long, value_parser = parse_status)]
    pub status: Option<ProcessStatus>,
    /// Ended (finished statuses) or started (others) within this long: 30m, 24h, 7d.
    #[arg(long, value_name = "AGE", value_parser = parse_duration_arg)]
    pub since: Option<Duration>,
    /// Only this process type.
    #[arg(long = "type", value_name = "TYPE")]
    pub process_type: Option<String>,
    /// Page size (the gateway's default is 100).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub limit: Option<u32>,
    /// Continue a listing from the cursor printed after the previous page.
    #[arg(long)]
    pub cursor: Option<String>,
    /// Every unfinished process (GET /api/processes/active); no other filters.
    #[arg(long, conflicts_with_all = ["status", "since", "process_type", "limit", "cursor"])]
    pub active: bool,
}

#[derive(Debug, Clone, Args)]
pub struct SubmitArgs {
    /// The process type (a definition's name).
    #[arg(value_name = "TYPE")]
    pub process_type: String,
    /// The input: a JSON object in FILE, or - for stdin.
    #[arg(long, value_name = "FILE")]
    pub input: Option<PathBuf>,
    /// The same key returns the same process (sent as the Idempotency-Key header).
    #[arg(long, value_name = "KEY", value_parser = parse_id)]
    pub idempotency_key: Option<String>,
    /// Whom the process runs for (its fair share of LLM buckets with tenant shares).
    #[arg(long, value_name = "TENANT", value_parser = parse_id)]
    pub tenant: Option<String>,
    /// Wait until the process is finished; exit 0 only if it Completed.
    #[arg(long)]
    pub wait: bool,
    /// With --wait: how long to wait before giving up.
    #[arg(
        long,
        value_name = "DURATION",
        default_value = "10m",
        value_parser = parse_duration_arg,
        requires = "wait"
    )]
    pub timeout: Duration,
}

#[derive(Debug, Clone, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct DlqArgs {
    #[command(subcommand)]
    pub action: Option<DlqAction>,
    /// At most this many (the gateway's default is 100).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub limit: Option<u32>,
}

#[derive(Debug, Clone, Subcommand)]
pub enum DlqAction {
    /// Retry the process of a dead letter and remove the dead letter.
    Replay {
        #[arg(value_parser = parse_segment)]
        id: String,
    },
}

#[derive(Debug, Clone, Args)]
pub struct StateArgs {
    #[command(subcommand)]
    pub action: StateAction,
}

#[derive(Debug, Clone, Subcommand)]
pub enum StateAction {
    /// The process's input, outputs and checkpoints, decoded from MessagePack to JSON.
    Get {
        #[arg(value_parser = parse_id)]
        id: String,
    },
    /// Decode every live process's record and state; list corrupt or oversize ones and
    /// exit 1 if there are any.
    Check {
        /// Only processes of this type.
        #[arg(long = "type", value_name = "TYPE")]
        process_type: Option<String>,
        /// Processes read per request (the gateway's default is 1000).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1000))]
        page_size: Option<u32>,
    },
    /// Delete a process with its index entries, idempotency key and queued jobs (admin).
    Delete {
        #[arg(value_parser = parse_id)]
        id: String,
        /// Also an unfinished process: its running steps are stopped.
        #[arg(long)]
        force: bool,
    },
}

pub(super) fn parse_url(s: &str) -> Result<Url, String> {
    let u = Url::parse(s).map_err(|e| format!("{s:?} is not a URL: {e}"))?;
    if !matches!(u.scheme(), "http" | "https") || u.cannot_be_a_base() || u.host().is_none() {
        return Err(format!("{s:?} must be an http:// or https:// URL"));
    }
    if !u.username().is_empty() || u.password().is_some() {
        return Err("put credentials in HONUA_TOKEN, not in the URL".into());
    }
    if u.query().is_some() || u.fragment().is_some() {
        return Err(format!("{s:?} must not have a query or fragment"));
    }
    Ok(u)
}

/// A positive duration such as `500ms`, `30s`, `10m`, `24h`, `7d`, at least 1 ms.
pub fn parse_duration_arg(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s.trim())
        .map_err(|_| format!("{s:?} is not a duration like 30s, 10m, 24h or 7d"))?;
    if d < Duration::from_millis(1) {
        return Err(format!("{s:?} must be at least 1ms"));
    }
    Ok(d)
}

/// The compact form sent to the gateway: the largest whole unit (`7d`, `36h`, `90s`).
pub fn duration_param(d: Duration) -> String {
    let ms = d.as_millis();
    for (unit, size) in [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1000),
    ] {
        if ms >= size && ms.is_multiple_of(size) {
            return format!("{}{unit}", ms / size);
        }
    }
    format!("{ms}ms")
}

fn parse_status(s: &str) -> Result<ProcessStatus, String> {
    s.parse().map_err(|_| {
        let all: Vec<&str> = ProcessStatus::ALL.iter().map(|s| s.as_str()).collect();
        format!("unknown status {s:?} (one of {})", all.join(", "))
    })
}

fn parse_finished_status(s: &str) -> Result<ProcessStatus, String> {
    let st = parse_status(s)?;
    if !st.is_finished() {
        return Err(format!(
            "only finished processes (Completed, Failed, Cancelled, TimedOut) can be purged, \
             not {st}"
        ));
    }
    Ok(st)
}

fn parse_id(s: &str) -> Result<String, String> {
    if valid_id(s) {
        Ok(s.to_string())
    } else {
        Err(format!("{s:?} must be 1-64 characters of [A-Za-z0-9_-]"))
    }
}

/// A non-empty URL path segment (signal names, dead-letter ids).
fn parse_segment(s: &str) -> Result<String, String> {
    if s.is_empty() || s == "." || s == ".." {
        Err(format!("{s:?} is not a valid name"))
    } else {
        Ok(s.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<CliArgs, clap::Error> {
        CliArgs::try_parse_args(std::iter::once("honua").chain(args.iter().copied()))
    }

    #[test]
    fn the_parser_is_consistent() {
        use clap::CommandFactory;
        CliArgs::command().debug_assert();
    }

    #[test]
    fn durations_are_validated_and_sent_compactly() {
        for (arg, sent) in [
            ("24h", "1d"),
            ("7d", "7d"),
            ("30d", "30d"),
            ("36h", "36h"),
            ("90m", "90m"),
            ("90s", "90s"),
            ("1h 30m", "90m"),
            ("1500ms", "1500ms"),
            ("10m", "10m"),
        ] {
            let d = parse_duration_arg(arg).unwrap();
            assert_eq!(duration_param(d), sent, "{arg}");
            assert_eq!(humantime::parse_duration(sent).unwrap(), d, "{arg}");
        }
        for bad in ["", "banana", "24", "-1h", "0s", "1ns", "h24"] {
            assert!(parse_duration_arg(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn urls_must_be_plain_http() {
        assert!(parse_url("http://localhost:9090").is_ok());
        assert!(parse_url("https://gw.example/prefix").is_ok());
        for bad in [
            "localhost:9090",
            "ftp://x",
            "http://user:pw@x",
            "http://x/?a=1",
            "mailto:a@b",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn usage_errors_exit_2() {
        for args in [
            &["ps", "--since", "banana"][..],
            &["ps", "--status", "Sleeping"],
            &["ps", "--limit", "0"],
            &["ps", "--active", "--status", "Completed"],
            &["purge", "--status", "Running", "--older-than", "30d"],
            &["purge", "--status", "Completed"],
            &["submit", "T", "--timeout", "1m"],
            &["submit", "T", "--idempotency-key", "has space"],
            &["get", "../health"],
            &["signal", "p1", ".."],
            &["state", "get", "../x"],
            &["state", "check", "--page-size", "0"],
            &["state", "delete"],
            &["frobnicate"],
        ] {
            let e = parse(args).expect_err(&format!("{args:?} parsed"));
            assert_eq!(e.exit_code(), 2, "{args:?}");
        }
    }

    #[test]
    fn arguments_parse() {
        let a = parse(&[
            "--url",
            "http://h:1",
            "--json",
            "ps",
            "--status",
            "completed",
            "--since",
            "24h",
        ])
        .unwrap();
        assert!(a.global.json);
        assert_eq!(a.global.url, "http://h:1");
        assert_eq!(a.global.request_timeout, Duration::from_secs(10));
        let Command::Ps(ps) = a.command else { panic!() };
        assert_eq!(ps.status, Some(ProcessStatus::Completed));
        assert_eq!(ps.since, Some(Duration::from_secs(86_400)));
        // Global flags also after the subcommand.
        let a = parse(&["submit", "T", "--wait", "--json", "--request-timeout", "2s"]).unwrap();
        assert!(a.global.json);
        assert_eq!(a.global.request_timeout, Duration::from_secs(2));
        let Command::Submit(s) = a.command else {
            panic!()
        };
        assert!(s.wait);
        assert_eq!(s.timeout, Duration::from_secs(600));
        let a = parse(&["dlq", "replay", "1-0"]).unwrap();
        assert!(matches!(
            a.command,
            Command::Dlq(DlqArgs {
                action: Some(DlqAction::Replay { .. }),
                ..
            })
        ));
        let a = parse(&["state", "delete", "p1", "--force"]).unwrap();
        assert!(matches!(
            a.command,
            Command::State(StateArgs {
                action: StateAction::Delete { force: true, .. }
            })
        ));
        let a = parse(&["dlq", "--limit", "5"]).unwrap();
        assert!(matches!(
            a.command,
            Command::Dlq(DlqArgs {
                action: None,
                limit: Some(5)
            })
        ));
    }
}

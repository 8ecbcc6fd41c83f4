//! The `honua` operator commands: the gateway's HTTP API from a terminal or a script.
//!
//! Every command is one HTTP request (a few for `submit --wait`) to `--url` (env
//! `HONUA_URL`, default `http://127.0.0.1:9090`), with `Authorization: Bearer
//! $HONUA_TOKEN` when that variable is set. The token is read from the environment only,
//! never from a flag, so it stays out of shell history and `ps`. Output is an aligned
//! table, or with `--json` the response body exactly as the gateway sent it.
//!
//! [`run`] takes the parsed arguments and two writers, so tests drive it in-process and
//! read what it printed; `src/bin/honua.rs` only parses the command line and calls it.
//!
//! # Exit codes
//!
//! Scripts can rely on these (also printed by `honua --help`):
//!
//! - **0** success.
//! - **1** the request failed: any other HTTP error (400, 413, 422, 429, 500, ...), a reply
//!   that is not the expected JSON, or `submit --wait` ended other than Completed (or gave
//!   up waiting after `--timeout`).
//! - **2** usage error: clap's own (unknown flag, bad value), an unreadable or non-object
//!   `--input`/`--patch` file, a bad `--url` or `HONUA_TOKEN`.
//! - **3** not found (404).
//! - **4** conflict: not allowed in the process's current state (409).
//! - **5** unauthorized or forbidden (401, 403).
//! - **6** unavailable: 503 (and 502/504 from a proxy in front), connection refused or
//!   reset, timeout; `health` whenever the status is not Healthy (Degraded included).

use clap::{Args, Parser, Subcommand};
use honua_shared::envelope::valid_id;
use honua_shared::status::ProcessStatus;
use reqwest::{Method, Url};
use serde_json::{Map, Value, json};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Where the gateway listens unless `--url` or `HONUA_URL` says otherwise.
pub const DEFAULT_URL: &str = "http://127.0.0.1:9090";

/// How often `submit --wait` polls the process.
const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// Table cells longer than this are cut (with `…`); `get` prints messages in full.
const MAX_CELL_CHARS: usize = 80;

const GLOBAL: &str = "Operator options";

/// Appended to `honua --help`.
pub const AFTER_HELP: &str = "\
Environment:
  HONUA_URL    gateway base URL (as --url)
  HONUA_TOKEN  API token, sent as 'Authorization: Bearer <token>' (environment only)

Exit codes:
  0  success
  1  the request failed (other HTTP errors); submit --wait ended not Completed
  2  usage error
  3  not found (404)
  4  conflict / invalid state (409)
  5  unauthorized or forbidden (401, 403)
  6  unavailable (502, 503, 504, connection refused, timeout); health not Healthy";

/// What a script can tell from the exit status. See the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Success = 0,
    Failed = 1,
    Usage = 2,
    NotFound = 3,
    Conflict = 4,
    Unauthorized = 5,
    Unavailable = 6,
}

impl Exit {
    pub fn code(self) -> i32 {
        self as i32
    }

    /// The exit status for an HTTP status code.
    pub fn from_http(status: u16) -> Exit {
        match status {
            200..=299 => Exit::Success,
            401 | 403 => Exit::Unauthorized,
            404 => Exit::NotFound,
            409 => Exit::Conflict,
            502..=504 => Exit::Unavailable,
            _ => Exit::Failed,
        }
    }
}

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
    /// Re-run a Failed, Cancelled or TimedOut process from its failed step.
    Retry {
        #[arg(value_parser = parse_id)]
        id: String,
        /// A JSON object (file, or - for stdin) merged into the process input first.
        #[arg(long, value_name = "FILE")]
        patch: Option<PathBuf>,
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
    /// Pending, Running, WaitingForApproval, Completed, Failed, Cancelled or TimedOut.
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

// ---------------------------------------------------------------------------------------
// Argument parsing

fn parse_url(s: &str) -> Result<Url, String> {
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

// ---------------------------------------------------------------------------------------
// Errors

/// Why a command failed, typed by the exit status it maps to ([`CliError::exit`]).
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Usage(String),
    /// The gateway answered with an error status; `detail (code)` from its JSON body.
    #[error("{detail} ({code})")]
    Api {
        status: u16,
        code: String,
        detail: String,
    },
    #[error("cannot reach {url}: {} (unavailable)", root_cause(source))]
    Unreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("no answer from {url} within {} (timeout)", humantime::format_duration(*after))]
    Timeout { url: String, after: Duration },
    #[error("unexpected response from {url}: {detail}")]
    BadResponse { url: String, detail: String },
    /// The requests succeeded but the outcome is a failure (`submit --wait`).
    #[error("{0}")]
    Failed(String),
    #[error("writing output: {0}")]
    Output(#[from] std::io::Error),
}

impl CliError {
    pub fn exit(&self) -> Exit {
        match self {
            CliError::Usage(_) => Exit::Usage,
            CliError::Api { status, .. } => match Exit::from_http(*status) {
                Exit::Success => Exit::Failed,
                e => e,
            },
            CliError::Unreachable { .. } | CliError::Timeout { .. } => Exit::Unavailable,
            CliError::BadResponse { .. } | CliError::Failed(_) | CliError::Output(_) => {
                Exit::Failed
            }
        }
    }

    /// Worth asking again (while `submit --wait` polls).
    fn is_transient(&self) -> bool {
        self.exit() == Exit::Unavailable
    }
}

fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    clean(&cur.to_string())
}

/// The error of a non-2xx reply: the gateway's `{"error", "detail"}` when it is that,
/// else the status line and the start of the body (a proxy's page, say).
fn api_error(r: &Reply) -> CliError {
    let parsed: Option<(String, String)> =
        serde_json::from_slice::<Value>(&r.body).ok().and_then(|v| {
            let code = v.get("error")?.as_str()?.to_string();
            let detail = v
                .get("detail")
                .and_then(Value::as_str)
                .unwrap_or(&code)
                .to_string();
            Some((code, detail))
        });
    let (code, detail) = parsed.unwrap_or_else(|| {
        let reason = reqwest::StatusCode::from_u16(r.status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("error");
        let text = String::from_utf8_lossy(&r.body);
        let text = text.trim();
        let detail = if text.is_empty() {
            format!("HTTP {} {reason}", r.status)
        } else {
            format!("HTTP {} {reason}: {}", r.status, truncate(text, 200))
        };
        (format!("http_{}", r.status), detail)
    });
    CliError::Api {
        status: r.status,
        code: clean(&code),
        detail: clean(&detail),
    }
}

// ---------------------------------------------------------------------------------------
// HTTP

/// One response, whatever its status.
struct Reply {
    url: String,
    status: u16,
    next_cursor: Option<String>,
    body: Vec<u8>,
}

impl Reply {
    fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    fn json(&self) -> Result<Value, CliError> {
        serde_json::from_slice(&self.body).map_err(|e| CliError::BadResponse {
            url: self.url.clone(),
            detail: format!("not JSON: {e}"),
        })
    }

    fn json_array(&self) -> Result<Vec<Value>, CliError> {
        match self.json()? {
            Value::Array(a) => Ok(a),
            _ => Err(CliError::BadResponse {
                url: self.url.clone(),
                detail: "expected a JSON array".into(),
            }),
        }
    }
}

struct Api {
    http: reqwest::Client,
    base: Url,
    token: Option<String>,
    timeout: Duration,
}

impl Api {
    fn new(g: &GlobalOpts) -> Result<Self, CliError> {
        if let Some(t) = &g.token
            && !t.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(CliError::Usage(
                "HONUA_TOKEN must be printable ASCII without spaces".into(),
            ));
        }
        let base = parse_url(&g.url).map_err(|e| CliError::Usage(format!("--url: {e}")))?;
        honua_runtime::install_crypto_provider();
        let http = reqwest::Client::builder()
            .timeout(g.request_timeout)
            .connect_timeout(g.request_timeout)
            .user_agent(concat!("honua-cli/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| CliError::Failed(format!("cannot set up the HTTP client: {e}")))?;
        Ok(Api {
            http,
            base,
            token: g.token.clone(),
            timeout: g.request_timeout,
        })
    }

    /// The base URL plus `segments`, each percent-encoded as one path segment.
    fn url(&self, segments: &[&str], query: &[(&str, String)]) -> Url {
        endpoint(&self.base, segments, query)
    }

    /// Sends the request and reads the whole reply, whatever its status.
    async fn call(
        &self,
        method: Method,
        url: Url,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> Result<Reply, CliError> {
        let shown = url.to_string();
        let mut rb = self.http.request(method, url);
        if let Some(t) = &self.token {
            rb = rb.bearer_auth(t);
        }
        for (k, v) in headers {
            rb = rb.header(*k, *v);
        }
        if let Some(b) = body {
            rb = rb.json(b);
        }
        let transport = |e: reqwest::Error| self.transport_error(&shown, e);
        let resp = rb.send().await.map_err(transport)?;
        let status = resp.status().as_u16();
        let next_cursor = resp
            .headers()
            .get("x-next-cursor")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = resp.bytes().await.map_err(transport)?.to_vec();
        Ok(Reply {
            url: shown.clone(),
            status,
            next_cursor,
            body,
        })
    }

    /// As [`Api::call`], with a non-2xx reply turned into an error.
    async fn send(
        &self,
        method: Method,
        url: Url,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> Result<Reply, CliError> {
        let r = self.call(method, url, body, headers).await?;
        if r.is_success() {
            Ok(r)
        } else {
            Err(api_error(&r))
        }
    }

    async fn get(&self, segments: &[&str], query: &[(&str, String)]) -> Result<Reply, CliError> {
        self.send(Method::GET, self.url(segments, query), None, &[])
            .await
    }

    async fn post(&self, segments: &[&str], body: Option<&Value>) -> Result<Reply, CliError> {
        self.send(Method::POST, self.url(segments, &[]), body, &[])
            .await
    }

    fn transport_error(&self, url: &str, e: reqwest::Error) -> CliError {
        if e.is_timeout() {
            CliError::Timeout {
                url: url.to_string(),
                after: self.timeout,
            }
        } else if e.is_builder() {
            CliError::Usage(format!("cannot build the request to {url}: {e}"))
        } else if e.is_redirect() {
            CliError::Failed(format!("{url}: {}", root_cause(&e)))
        } else {
            CliError::Unreachable {
                url: url.to_string(),
                source: e,
            }
        }
    }
}

/// `base` plus `segments` (each percent-encoded as one segment) and `query`.
pub fn endpoint(base: &Url, segments: &[&str], query: &[(&str, String)]) -> Url {
    let mut u = base.clone();
    if let Ok(mut path) = u.path_segments_mut() {
        path.pop_if_empty().extend(segments);
    }
    if !query.is_empty() {
        u.query_pairs_mut()
            .extend_pairs(query.iter().map(|(k, v)| (*k, v.as_str())));
    }
    u
}

// ---------------------------------------------------------------------------------------
// Output helpers

/// Replaces control characters (newlines, terminal escapes from a remote message) with
/// spaces, so a cell or a message stays on one line and cannot drive the terminal.
pub fn clean(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

fn truncate(s: &str, max: usize) -> String {
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

/// A cell for any JSON value: `-` for null or missing.
fn text(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => "-".into(),
        Some(Value::String(s)) if s.is_empty() => "-".into(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Bool(b)) => String::from(if *b { "yes" } else { "no" }),
        Some(Value::Number(n)) => n.to_string(),
        Some(Value::Array(a)) if a.is_empty() => "-".into(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| text(Some(x)))
            .collect::<Vec<_>>()
            .join(", "),
        Some(o @ Value::Object(_)) => o.to_string(),
    }
}

fn field(v: &Value, key: &str) -> String {
    text(v.get(key))
}

/// An RFC 3339 timestamp to whole seconds (`2025-01-02T03:04:05Z`).
fn when(v: Option<&Value>) -> String {
    match v.and_then(Value::as_str) {
        Some(s) => humantime::parse_rfc3339_weak(s)
            .map(|t| humantime::format_rfc3339_seconds(t).to_string())
            .unwrap_or_else(|_| s.to_string()),
        None => match v.and_then(Value::as_u64) {
            Some(ms) if ms <= honua_scheduler::view::MAX_RFC3339_MS => {
                humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms))
                    .to_string()
            }
            Some(ms) => format!("{ms} ms"),
            None => "-".into(),
        },
    }
}

fn millis(v: Option<&Value>) -> String {
    v.and_then(Value::as_u64)
        .map(fmt_duration_ms)
        .unwrap_or_else(|| "-".into())
}

/// A duration given in (fractional) seconds.
fn seconds(v: Option<&Value>) -> String {
    v.and_then(Value::as_f64)
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(|s| fmt_duration_ms((s * 1000.0).round() as u64))
        .unwrap_or_else(|| "-".into())
}

/// `message (code)`, either part optional.
fn error_text(v: &Value, message: &str, code: &str) -> String {
    match (
        v.get(message).and_then(Value::as_str),
        v.get(code).and_then(Value::as_str),
    ) {
        (Some(m), Some(c)) => format!("{m} ({c})"),
        (Some(m), None) => m.to_string(),
        (None, Some(c)) => c.to_string(),
        (None, None) => "-".into(),
    }
}

fn write_raw(out: &mut dyn Write, body: &[u8]) -> std::io::Result<()> {
    out.write_all(body)?;
    if !body.ends_with(b"\n") {
        out.write_all(b"\n")?;
    }
    Ok(())
}

/// Reads a JSON object from `path` (`-`: stdin).
fn read_object(path: &Path, what: &str) -> Result<Map<String, Value>, CliError> {
    let text = if path == Path::new("-") {
        std::io::read_to_string(std::io::stdin())
    } else {
        std::fs::read_to_string(path)
    }
    .map_err(|e| CliError::Usage(format!("cannot read {what} {}: {e}", path.display())))?;
    match serde_json::from_str(&text) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(CliError::Usage(format!(
            "{what} {} must be a JSON object",
            path.display()
        ))),
        Err(e) => Err(CliError::Usage(format!(
            "{what} {} is not JSON: {e}",
            path.display()
        ))),
    }
}

// ---------------------------------------------------------------------------------------
// Commands

/// Runs one operator command, printing results to `out` and errors to `err`; returns the
/// exit status (see the module documentation).
pub async fn run(args: CliArgs, out: &mut (dyn Write + Send), err: &mut (dyn Write + Send)) -> i32 {
    let result = match (&args.command, Api::new(&args.global)) {
        (Command::HashToken { token }, _) => hash_token(token, out),
        (_, Ok(api)) => Box::pin(execute(&api, &args, out, err)).await,
        (_, Err(e)) => Err(e),
    };
    let code = match result {
        Ok(exit) => exit,
        Err(CliError::Output(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => Exit::Failed,
        Err(e) => {
            let _ = writeln!(err, "error: {}", clean(&e.to_string()));
            e.exit()
        }
    };
    let _ = out.flush();
    let _ = err.flush();
    code.code()
}

async fn execute(
    api: &Api,
    args: &CliArgs,
    out: &mut (dyn Write + Send),
    err: &mut (dyn Write + Send),
) -> Result<Exit, CliError> {
    let json = args.global.json;
    match &args.command {
        Command::Ps(a) => ps(api, a, json, out, err).await,
        Command::Get { id } => {
            let r = api.get(&["api", "processes", id], &[]).await?;
            if json {
                write_raw(out, &r.body)?;
            } else {
                print_process(out, &r.json()?)?;
            }
            Ok(Exit::Success)
        }
        Command::Submit(a) => submit(api, a, json, out).await,
        Command::Cancel { id, reason } => {
            let body = match reason {
                Some(r) => json!({ "reason": r }),
                None => json!({}),
            };
            let r = api
                .post(&["api", "processes", id, "cancel"], Some(&body))
                .await?;
            action_done(out, json, &r, &format!("cancelled {id}"))
        }
        Command::Retry { id, patch } => {
            let body = match patch {
                Some(p) => json!({ "statePatch": read_object(p, "patch")? }),
                None => json!({}),
            };
            let r = api
                .post(&["api", "processes", id, "retry"], Some(&body))
                .await?;
            action_done(out, json, &r, &format!("retrying {id}"))
        }
        Command::RetryStep { id } => {
            let r = api
                .post(&["api", "processes", id, "retry-current-step"], None)
                .await?;
            let steps = r.json().ok().map(|v| field(&v, "steps"));
            let what = match steps.as_deref() {
                Some(s) if s != "-" => format!("re-enqueued {s} of {id}"),
                _ => format!("re-enqueued the current step of {id}"),
            };
            action_done(out, json, &r, &what)
        }
        Command::Signal { id, name, value } => {
            let body = match value {
                Some(v) => json!({ "value": v }),
                None => json!({}),
            };
            let r = api
                .post(&["api", "processes", id, "signal", name], Some(&body))
                .await?;
            if json {
                write_raw(out, &r.body)?;
            } else {
                let v = r.json().unwrap_or(Value::Null);
                let value = v
                    .get("value")
                    .and_then(Value::as_str)
                    .or(value.as_deref())
                    .unwrap_or("approve");
                writeln!(out, "sent signal {name}={value} to {id}")?;
            }
            Ok(Exit::Success)
        }
        Command::Purge { status, older_than } => {
            let q = [
                ("status", status.as_str().to_string()),
                ("olderThan", duration_param(*older_than)),
            ];
            let url = api.url(&["api", "processes"], &q);
            let r = api.send(Method::DELETE, url, None, &[]).await?;
            if json {
                write_raw(out, &r.body)?;
            } else {
                let n = r.json()?.get("deleted").and_then(Value::as_u64);
                let n = n.ok_or_else(|| CliError::BadResponse {
                    url: r.url.clone(),
                    detail: "no deleted count".into(),
                })?;
                writeln!(
                    out,
                    "deleted {n} {status} process{}",
                    if n == 1 { "" } else { "es" }
                )?;
            }
            Ok(Exit::Success)
        }
        Command::Queues => {
            let r = api.get(&["api", "queues"], &[]).await?;
            if json {
                write_raw(out, &r.body)?;
                return Ok(Exit::Success);
            }
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
            for q in r.json_array()? {
                let missing = q.get("missing").and_then(Value::as_bool) == Some(true);
                t.row([
                    field(&q, "stream"),
                    field(&q, "group"),
                    String::from(if missing { "missing" } else { "ok" }),
                    field(&q, "length"),
                    field(&q, "lag"),
                    field(&q, "pending"),
                    millis(q.get("oldestPendingAgeMs")),
                    field(&q, "consumers"),
                ]);
            }
            out.write_all(t.render().as_bytes())?;
            Ok(Exit::Success)
        }
        Command::Workers => {
            let r = api.get(&["api", "workers"], &[]).await?;
            if json {
                write_raw(out, &r.body)?;
                return Ok(Exit::Success);
            }
            let workers = r.json_array()?;
            if workers.is_empty() {
                writeln!(err, "no workers")?;
                return Ok(Exit::Success);
            }
            let mut t = Table::new(&["WORKER", "LAST SEEN", "JOBS"]);
            let mut jobs =
                Table::new(&["WORKER", "PROCESS", "STEP", "IDLE", "DELIVERIES", "ENTRY"]);
            for w in &workers {
                let held = w.get("jobs").and_then(Value::as_array);
                t.row([
                    field(w, "id"),
                    last_seen(w),
                    held.map_or(0, Vec::len).to_string(),
                ]);
                for j in held.into_iter().flatten() {
                    jobs.row([
                        field(w, "id"),
                        field(j, "processId"),
                        field(j, "step"),
                        millis(j.get("idleMs")),
                        field(j, "deliveries"),
                        field(j, "entryId"),
                    ]);
                }
            }
            out.write_all(t.render().as_bytes())?;
            if !jobs.is_empty() {
                writeln!(out)?;
                out.write_all(jobs.render().as_bytes())?;
            }
            Ok(Exit::Success)
        }
        Command::Dlq(DlqArgs {
            action: Some(DlqAction::Replay { id }),
            ..
        }) => {
            let r = api
                .post(&["api", "deadletters", id, "replay"], None)
                .await?;
            let pid = r.json().ok().map(|v| field(&v, "id"));
            let what = match pid {
                Some(p) if p != "-" => format!("replayed dead letter {id}: retrying {p}"),
                _ => format!("replayed dead letter {id}"),
            };
            action_done(out, json, &r, &what)
        }
        Command::Dlq(DlqArgs {
            action: None,
            limit,
        }) => {
            let q: Vec<(&str, String)> = limit.iter().map(|l| ("limit", l.to_string())).collect();
            let r = api.get(&["api", "deadletters"], &q).await?;
            if json {
                write_raw(out, &r.body)?;
                return Ok(Exit::Success);
            }
            let mut t = Table::new(&["ID", "PROCESS", "STEP", "DELIVERIES", "DEAD AT", "REASON"]);
            for d in r.json_array()? {
                t.row([
                    field(&d, "id"),
                    field(&d, "processId"),
                    field(&d, "step"),
                    field(&d, "deliveries"),
                    when(d.get("deadMs")),
                    field(&d, "reason"),
                ]);
            }
            if t.is_empty() {
                writeln!(err, "no dead letters")?;
            } else {
                out.write_all(t.render().as_bytes())?;
            }
            Ok(Exit::Success)
        }
        Command::Health => health(api, json, out, err).await,
        Command::HashToken { token } => hash_token(token, out),
    }
}

/// `honua hash-token`: local only, no request.
fn hash_token(token: &str, out: &mut dyn Write) -> Result<Exit, CliError> {
    let token = if token == "-" {
        let mut line = String::new();
        std::io::stdin()
            .read_line(&mut line)
            .map_err(|e| CliError::Usage(format!("cannot read stdin: {e}")))?;
        line.trim_end_matches(['\r', '\n']).to_string()
    } else {
        token.to_string()
    };
    if token.is_empty() {
        return Err(CliError::Usage("the token is empty".into()));
    }
    writeln!(out, "{}", honua_scheduler::gateway::token_hash(&token))?;
    Ok(Exit::Success)
}

/// `now - lastSeen` as "3.2s ago".
fn last_seen(w: &Value) -> String {
    let age = w.get("lastSeenAgeMs").and_then(Value::as_u64).or_else(|| {
        let at = w.get("lastSeenMs").and_then(Value::as_u64)?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .ok()?
            .as_millis() as u64;
        Some(now.saturating_sub(at))
    });
    age.map(|ms| format!("{} ago", fmt_duration_ms(ms)))
        .unwrap_or_else(|| "-".into())
}

/// Prints `what` and the process status the gateway reports (or the raw body).
fn action_done(out: &mut dyn Write, json: bool, r: &Reply, what: &str) -> Result<Exit, CliError> {
    if json {
        write_raw(out, &r.body)?;
    } else {
        match r
            .json()
            .ok()
            .and_then(|v| v.get("status")?.as_str().map(clean))
        {
            Some(st) => writeln!(out, "{what}: status {st}")?,
            None => writeln!(out, "{what}")?,
        }
    }
    Ok(Exit::Success)
}

async fn ps(
    api: &Api,
    a: &PsArgs,
    json: bool,
    out: &mut (dyn Write + Send),
    err: &mut (dyn Write + Send),
) -> Result<Exit, CliError> {
    let r = if a.active {
        api.get(&["api", "processes", "active"], &[]).await?
    } else {
        let mut q: Vec<(&str, String)> = Vec::new();
        if let Some(s) = a.status {
            q.push(("status", s.as_str().to_string()));
        }
        if let Some(d) = a.since {
            q.push(("since", duration_param(d)));
        }
        if let Some(t) = &a.process_type {
            q.push(("processType", t.clone()));
        }
        if let Some(l) = a.limit {
            q.push(("limit", l.to_string()));
        }
        if let Some(c) = &a.cursor {
            q.push(("cursor", c.clone()));
        }
        api.get(&["api", "processes"], &q).await?
    };
    let hint = r.next_cursor.as_deref().map(clean);
    if json {
        write_raw(out, &r.body)?;
        if let Some(c) = hint {
            writeln!(err, "more: --cursor {c}")?;
        }
        return Ok(Exit::Success);
    }
    let mut t = Table::new(&[
        "ID", "TYPE", "STATUS", "CREATED", "DURATION", "CURRENT", "ERROR",
    ]);
    for p in r.json_array()? {
        t.row([
            field(&p, "id"),
            field(&p, "processType"),
            field(&p, "status"),
            when(p.get("createdAt")),
            seconds(p.get("duration")),
            field(&p, "currentSteps"),
            error_text(&p, "errorMessage", "errorCode"),
        ]);
    }
    if t.is_empty() {
        writeln!(err, "no processes")?;
    } else {
        out.write_all(t.render().as_bytes())?;
    }
    if let Some(c) = hint {
        writeln!(out, "more: --cursor {c}")?;
    }
    Ok(Exit::Success)
}

/// `honua get`: a block of fields, the steps, and the operator actions.
fn print_process(out: &mut dyn Write, p: &Value) -> std::io::Result<()> {
    let version = p.get("version").and_then(Value::as_u64);
    let ty = match version {
        Some(v) => format!("{} v{v}", field(p, "processType")),
        None => field(p, "processType"),
    };
    let mut info = Table::default();
    info.row(["ID:".to_string(), field(p, "id")]);
    info.row(["Type:".to_string(), ty]);
    info.row(["Status:".to_string(), field(p, "status")]);
    for (label, key) in [
        ("Created:", "createdAt"),
        ("Started:", "startedAt"),
        ("Ended:", "endedAt"),
        ("Deadline:", "deadlineAt"),
    ] {
        if p.get(key).is_some_and(|v| !v.is_null()) {
            info.row([label.to_string(), when(p.get(key))]);
        }
    }
    info.row(["Duration:".to_string(), seconds(p.get("duration"))]);
    let current = field(p, "currentSteps");
    if current != "-" {
        info.row(["Current:".to_string(), current]);
    }
    if p.get("idempotencyKey").is_some_and(|v| !v.is_null()) {
        info.row(["Idempotency key:".to_string(), field(p, "idempotencyKey")]);
    }
    out.write_all(info.render().as_bytes())?;
    let error = error_text(p, "errorMessage", "errorCode");
    if error != "-" {
        // In full: the table would cut it.
        writeln!(out, "Error: {}", clean(&error))?;
    }
    let mut steps = Table::new(&[
        "STEP", "KIND", "STATUS", "ATTEMPT", "WORKER", "DURATION", "ERROR",
    ]);
    for s in p
        .get("steps")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        steps.row([
            field(s, "name"),
            field(s, "kind"),
            field(s, "status"),
            field(s, "attempt"),
            field(s, "worker"),
            millis(s.get("durationMs")),
            error_text(s, "error", "errorCode"),
        ]);
    }
    if !steps.is_empty() {
        writeln!(out)?;
        out.write_all(steps.render().as_bytes())?;
    }
    let mut audit = Table::new(&["AT", "ACTION", "DETAIL"]);
    for a in p
        .get("audit")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        audit.row([when(a.get("at")), field(a, "action"), field(a, "detail")]);
    }
    if !audit.is_empty() {
        writeln!(out)?;
        out.write_all(audit.render().as_bytes())?;
    }
    Ok(())
}

async fn submit(
    api: &Api,
    a: &SubmitArgs,
    json: bool,
    out: &mut (dyn Write + Send),
) -> Result<Exit, CliError> {
    let mut body = json!({ "processType": a.process_type });
    if let Some(path) = &a.input {
        body["input"] = Value::Object(read_object(path, "input")?);
    }
    let headers: Vec<(&str, &str)> = a
        .idempotency_key
        .as_deref()
        .map(|k| ("Idempotency-Key", k))
        .into_iter()
        .collect();
    let url = api.url(&["api", "processes"], &[]);
    let r = api.send(Method::POST, url, Some(&body), &headers).await?;
    let reply = r.json()?;
    let id = reply
        .get("id")
        .and_then(Value::as_str)
        .filter(|id| valid_id(id))
        .ok_or_else(|| CliError::BadResponse {
            url: r.url.clone(),
            detail: "no process id in the reply".into(),
        })?
        .to_string();
    let duplicate = reply.get("duplicate").and_then(Value::as_bool) == Some(true);
    if !a.wait {
        if json {
            write_raw(out, &r.body)?;
        } else if duplicate {
            writeln!(out, "{id} (existing process for this idempotency key)")?;
        } else {
            writeln!(out, "{id}")?;
        }
        return Ok(Exit::Success);
    }
    if !json {
        let note = if duplicate {
            " (existing process for this idempotency key)"
        } else {
            ""
        };
        writeln!(out, "submitted {id}{note}; waiting")?;
    }
    let (view, raw) = wait_finished(api, &id, a.timeout).await?;
    let status = field(&view, "status");
    if json {
        write_raw(out, &raw)?;
    } else {
        writeln!(out, "{id} {status} in {}", seconds(view.get("duration")))?;
    }
    if status == ProcessStatus::Completed.as_str() {
        Ok(Exit::Success)
    } else {
        let why = error_text(&view, "errorMessage", "errorCode");
        let why = if why == "-" {
            String::new()
        } else {
            format!(": {why}")
        };
        Err(CliError::Failed(format!(
            "process {id} ended {status}{why}"
        )))
    }
}

/// Polls the process until its status is a finished one; returns the view and its body.
async fn wait_finished(
    api: &Api,
    id: &str,
    timeout: Duration,
) -> Result<(Value, Vec<u8>), CliError> {
    let deadline = Instant::now() + timeout;
    let mut last_status = String::from("unknown");
    loop {
        match api.get(&["api", "processes", id], &[]).await {
            Ok(r) => {
                let v = r.json()?;
                let status = v.get("status").and_then(Value::as_str).unwrap_or("");
                if status
                    .parse::<ProcessStatus>()
                    .is_ok_and(|s| s.is_finished())
                {
                    return Ok((v, r.body));
                }
                last_status = clean(status);
            }
            // A short outage (Redis failover, a gateway restart) must not end the wait.
            Err(e) if e.is_transient() && Instant::now() < deadline => {}
            Err(e) => return Err(e),
        }
        if Instant::now() >= deadline {
            return Err(CliError::Failed(format!(
                "gave up after {}: process {id} is still {last_status}",
                humantime::format_duration(timeout)
            )));
        }
        tokio::time::sleep(POLL_INTERVAL.min(deadline.saturating_duration_since(Instant::now())))
            .await;
    }
}

async fn health(
    api: &Api,
    json: bool,
    out: &mut (dyn Write + Send),
    err: &mut (dyn Write + Send),
) -> Result<Exit, CliError> {
    let r = match api
        .call(Method::GET, api.url(&["health"], &[]), None, &[])
        .await
    {
        Ok(r) => r,
        Err(e) => {
            writeln!(err, "error: {}", clean(&e.to_string()))?;
            return Ok(Exit::Unavailable);
        }
    };
    let v = r.json().ok().filter(|v| v.get("status").is_some());
    let Some(v) = v else {
        // Not a health document: a 401, a proxy's error page, another service.
        let e = if r.is_success() {
            CliError::BadResponse {
                url: r.url.clone(),
                detail: "not a health document".into(),
            }
        } else {
            api_error(&r)
        };
        writeln!(err, "error: {}", clean(&e.to_string()))?;
        return Ok(Exit::Unavailable);
    };
    let status = field(&v, "status");
    if json {
        write_raw(out, &r.body)?;
    } else {
        writeln!(out, "{}", clean(&status))?;
        let mut t = Table::new(&["CHECK", "STATUS"]);
        for (name, value) in v
            .get("checks")
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
        {
            t.row([name.clone(), text(Some(value))]);
        }
        if !t.is_empty() {
            out.write_all(t.render().as_bytes())?;
        }
    }
    Ok(if r.is_success() && status == "Healthy" {
        Exit::Success
    } else {
        Exit::Unavailable
    })
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
    fn durations_print_compactly() {
        assert_eq!(fmt_duration_ms(0), "0ms");
        assert_eq!(fmt_duration_ms(850), "850ms");
        assert_eq!(fmt_duration_ms(12_345), "12.3s");
        assert_eq!(fmt_duration_ms(245_000), "4m05s");
        assert_eq!(fmt_duration_ms(7_800_000), "2h10m");
        assert_eq!(fmt_duration_ms(273_600_000), "3d04h");
    }

    #[test]
    fn exit_codes_follow_http_status() {
        let cases = [
            (200, Exit::Success),
            (201, Exit::Success),
            (202, Exit::Success),
            (400, Exit::Failed),
            (401, Exit::Unauthorized),
            (403, Exit::Unauthorized),
            (404, Exit::NotFound),
            (409, Exit::Conflict),
            (413, Exit::Failed),
            (422, Exit::Failed),
            (429, Exit::Failed),
            (500, Exit::Failed),
            (502, Exit::Unavailable),
            (503, Exit::Unavailable),
            (504, Exit::Unavailable),
        ];
        for (status, exit) in cases {
            assert_eq!(Exit::from_http(status), exit, "{status}");
        }
        let codes: Vec<i32> = [
            Exit::Success,
            Exit::Failed,
            Exit::Usage,
            Exit::NotFound,
            Exit::Conflict,
            Exit::Unauthorized,
            Exit::Unavailable,
        ]
        .iter()
        .map(|e| e.code())
        .collect();
        assert_eq!(codes, [0, 1, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn api_errors_print_detail_and_code() {
        let reply = |status, body: &str| Reply {
            url: "http://x/".into(),
            status,
            next_cursor: None,
            body: body.as_bytes().to_vec(),
        };
        let e = api_error(&reply(
            404,
            r#"{"error":"not_found","detail":"no process p1"}"#,
        ));
        assert_eq!(e.to_string(), "no process p1 (not_found)");
        assert_eq!(e.exit(), Exit::NotFound);
        let e = api_error(&reply(409, r#"{"error":"invalid_state","detail":"a\nb"}"#));
        assert_eq!(e.to_string(), "a b (invalid_state)");
        assert_eq!(e.exit(), Exit::Conflict);
        let e = api_error(&reply(502, "<html>bad gateway</html>"));
        assert_eq!(
            e.to_string(),
            "HTTP 502 Bad Gateway: <html>bad gateway</html> (http_502)"
        );
        assert_eq!(e.exit(), Exit::Unavailable);
        let e = api_error(&reply(500, ""));
        assert_eq!(e.to_string(), "HTTP 500 Internal Server Error (http_500)");
        assert_eq!(e.exit(), Exit::Failed);
        // A 2xx that is nonetheless treated as an error never exits 0.
        assert_eq!(api_error(&reply(200, "{}")).exit(), Exit::Failed);
    }

    #[test]
    fn endpoints_encode_each_segment() {
        let base = parse_url("http://127.0.0.1:9090").unwrap();
        let u = endpoint(&base, &["api", "processes", "p-1", "signal", "a/b?c"], &[]);
        assert_eq!(
            u.as_str(),
            "http://127.0.0.1:9090/api/processes/p-1/signal/a%2Fb%3Fc"
        );
        let prefixed = parse_url("https://gw.example/honua/").unwrap();
        let u = endpoint(
            &prefixed,
            &["api", "processes"],
            &[("status", "Completed".into()), ("olderThan", "30d".into())],
        );
        assert_eq!(
            u.as_str(),
            "https://gw.example/honua/api/processes?status=Completed&olderThan=30d"
        );
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
        let a = parse(&["dlq", "--limit", "5"]).unwrap();
        assert!(matches!(
            a.command,
            Command::Dlq(DlqArgs {
                action: None,
                limit: Some(5)
            })
        ));
    }

    #[test]
    fn hash_token_matches_the_gateway() {
        // SHA-256("abc"), the FIPS 180-2 test vector.
        assert_eq!(
            honua_scheduler::gateway::token_hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn timestamps_shorten_to_seconds() {
        assert_eq!(
            when(Some(&json!("2025-01-02T03:04:05.678Z"))),
            "2025-01-02T03:04:05Z"
        );
        assert_eq!(when(Some(&json!(0))), "1970-01-01T00:00:00Z");
        assert_eq!(when(None), "-");
        assert_eq!(when(Some(&json!("soon"))), "soon");
    }
}

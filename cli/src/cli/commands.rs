//! The operator commands themselves: [`run`] takes the parsed arguments, sends each
//! command's requests through the client and prints the reply through the renderers.

use super::args::{
    CliArgs, Command, DlqAction, DlqArgs, PsArgs, StateAction, StateArgs, SubmitArgs,
    duration_param,
};
use super::client::{
    ActionReply, Api, DeadLetterView, HealthReply, PurgeReply, QueueView, Reply, SignalReply,
    SubmitReply, WorkerView, api_error,
};
use super::error::{CliError, Exit};
use super::render::{self, clean, error_text, seconds, write_raw};
use honua_scheduler::intake::DrainReply;
use honua_scheduler::state::{CheckReport, DeleteReply, StateView};
use honua_scheduler::view::{ProcessSummary, ProcessView};
use honua_shared::envelope::valid_id;
use honua_shared::status::ProcessStatus;
use reqwest::Method;
use serde_json::{Map, Value, json};
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

/// How often `submit --wait` polls the process.
const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// Runs one operator command, printing results to `out` and errors to `err`; returns the
/// exit status (see the [exit codes](super#exit-codes)).
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
                render::print_process(out, &r.decode::<ProcessView>()?)?;
            }
            Ok(Exit::Success)
        }
        Command::Submit(a) => submit(api, a, json, out, err).await,
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
        Command::Pause {
            id,
            hand_back,
            reason,
        } => {
            let mut body = json!({ "handBack": hand_back });
            if let Some(r) = reason {
                body["reason"] = json!(r);
            }
            let r = api
                .post(&["api", "processes", id, "pause"], Some(&body))
                .await?;
            action_done(out, json, &r, &format!("paused {id}"))
        }
        Command::Resume { id } => {
            let r = api
                .post(&["api", "processes", id, "resume"], Some(&json!({})))
                .await?;
            action_done(out, json, &r, &format!("resumed {id}"))
        }
        Command::Retry {
            id,
            patch,
            from_step,
        } => {
            let mut body = match patch {
                Some(p) => json!({ "statePatch": read_object(p, "patch")? }),
                None => json!({}),
            };
            if let Some(step) = from_step {
                body["fromStep"] = json!(step);
            }
            let r = api
                .post(&["api", "processes", id, "retry"], Some(&body))
                .await?;
            action_done(out, json, &r, &format!("retrying {id}"))
        }
        Command::RetryStep { id } => {
            let r = api
                .post(&["api", "processes", id, "retry-current-step"], None)
                .await?;
            let steps = r
                .decode::<ActionReply>()
                .ok()
                .map(|a| render::list_text(&a.steps));
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
                let sent = r.decode::<SignalReply>().ok().map(|s| s.value);
                let value = sent.as_deref().or(value.as_deref()).unwrap_or("approve");
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
                let n = r.decode::<PurgeReply>()?.deleted;
                writeln!(
                    out,
                    "deleted {n} {status} process{}",
                    if n == 1 { "" } else { "es" }
                )?;
            }
            Ok(Exit::Success)
        }
        Command::State(StateArgs { action }) => state(api, action, json, out).await,
        Command::Queues => {
            let r = api.get(&["api", "queues"], &[]).await?;
            if json {
                write_raw(out, &r.body)?;
                return Ok(Exit::Success);
            }
            let t = render::queue_table(&r.decode::<Vec<QueueView>>()?);
            out.write_all(t.render().as_bytes())?;
            Ok(Exit::Success)
        }
        Command::Workers => {
            let r = api.get(&["api", "workers"], &[]).await?;
            if json {
                write_raw(out, &r.body)?;
                return Ok(Exit::Success);
            }
            let workers = r.decode::<Vec<WorkerView>>()?;
            if workers.is_empty() {
                writeln!(err, "no workers")?;
                return Ok(Exit::Success);
            }
            render::print_workers(out, &workers)?;
            Ok(Exit::Success)
        }
        Command::Dlq(DlqArgs {
            action: Some(DlqAction::Replay { id }),
            ..
        }) => {
            let r = api
                .post(&["api", "deadletters", id, "replay"], None)
                .await?;
            let pid = r.decode::<ActionReply>().ok().map(|a| render::text(&a.id));
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
            let t = render::dead_letter_table(&r.decode::<Vec<DeadLetterView>>()?);
            if t.is_empty() {
                writeln!(err, "no dead letters")?;
            } else {
                out.write_all(t.render().as_bytes())?;
            }
            Ok(Exit::Success)
        }
        Command::Health => health(api, json, out, err).await,
        Command::Drain {
            status,
            wait,
            timeout,
        } => drain(api, json, out, *status, *wait, *timeout).await,
        Command::ResumeIntake => {
            let url = api.url(&["api", "admin", "resume-intake"], &[]);
            let r = api.send(Method::POST, url, None, &[]).await?;
            if json {
                write_raw(out, &r.body)?;
            } else {
                let v = r.decode::<DrainReply>()?;
                writeln!(
                    out,
                    "intake open: {} Pending process{} start, oldest first",
                    v.pending_processes,
                    if v.pending_processes == 1 { "" } else { "es" }
                )?;
            }
            Ok(Exit::Success)
        }
        Command::HashToken { token } => hash_token(token, out),
    }
}

/// How often `drain --wait` asks how much is still in flight.
const DRAIN_POLL: Duration = Duration::from_secs(1);

/// `honua drain`: drains intake (or with `status` only reads it); with `wait`, polls until
/// no step is running or queued.
async fn drain(
    api: &Api,
    json: bool,
    out: &mut (dyn Write + Send),
    status: bool,
    wait: bool,
    timeout: Duration,
) -> Result<Exit, CliError> {
    let url = api.url(&["api", "admin", "drain"], &[]);
    let method = if status { Method::GET } else { Method::POST };
    let mut r = api.send(method, url.clone(), None, &[]).await?;
    let deadline = Instant::now() + timeout;
    loop {
        let v = r.decode::<DrainReply>()?;
        if !wait || v.drained {
            if json {
                write_raw(out, &r.body)?;
            } else {
                render::print_drain(out, &v)?;
            }
            return Ok(Exit::Success);
        }
        if Instant::now() >= deadline {
            if json {
                write_raw(out, &r.body)?;
            } else {
                render::print_drain(out, &v)?;
            }
            return Err(CliError::Failed(format!(
                "still {} step(s) running and {} queued after {}",
                v.running_steps,
                v.queued_steps,
                humantime::format_duration(timeout)
            )));
        }
        tokio::time::sleep(DRAIN_POLL).await;
        r = api.send(Method::GET, url.clone(), None, &[]).await?;
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

/// Prints `what` and the process status the gateway reports (or the raw body).
fn action_done(out: &mut dyn Write, json: bool, r: &Reply, what: &str) -> Result<Exit, CliError> {
    if json {
        write_raw(out, &r.body)?;
    } else {
        match r.decode::<ActionReply>().ok().map(|a| clean(&a.status)) {
            Some(st) => writeln!(out, "{what}: status {st}")?,
            None => writeln!(out, "{what}")?,
        }
    }
    Ok(Exit::Success)
}

/// `honua state get|check|delete`.
async fn state(
    api: &Api,
    action: &StateAction,
    json: bool,
    out: &mut (dyn Write + Send),
) -> Result<Exit, CliError> {
    match action {
        StateAction::Get { id } => {
            let r = api.get(&["api", "processes", id, "state"], &[]).await?;
            if json {
                write_raw(out, &r.body)?;
            } else {
                render::print_state(out, &r.decode::<StateView>()?)?;
            }
            Ok(Exit::Success)
        }
        StateAction::Check {
            process_type,
            page_size,
        } => {
            let report = check_all(api, process_type.as_deref(), *page_size).await?;
            if json {
                let body = serde_json::to_vec(&report)
                    .map_err(|e| CliError::Failed(format!("cannot write the report: {e}")))?;
                write_raw(out, &body)?;
            } else {
                let t = render::problem_table(&report.problems);
                if !t.is_empty() {
                    out.write_all(t.render().as_bytes())?;
                }
                writeln!(
                    out,
                    "checked {} process{}: {} problem{}",
                    report.checked,
                    if report.checked == 1 { "" } else { "es" },
                    report.problems.len(),
                    if report.problems.len() == 1 { "" } else { "s" },
                )?;
            }
            if report.problems.is_empty() {
                Ok(Exit::Success)
            } else {
                let mut ids: Vec<&str> = report.problems.iter().map(|p| p.id.as_str()).collect();
                ids.sort_unstable();
                ids.dedup();
                Err(CliError::Failed(format!(
                    "{} process{} with corrupt or oversize state",
                    ids.len(),
                    if ids.len() == 1 { "" } else { "es" }
                )))
            }
        }
        StateAction::Delete { id, force } => {
            let q: Vec<(&str, String)> = if *force {
                vec![("force", "true".into())]
            } else {
                vec![]
            };
            let url = api.url(&["api", "processes", id], &q);
            let r = api.send(Method::DELETE, url, None, &[]).await?;
            if json {
                write_raw(out, &r.body)?;
            } else {
                render::print_deleted(out, &r.decode::<DeleteReply>()?)?;
            }
            Ok(Exit::Success)
        }
    }
}

/// Every page of `GET /api/state/check`, merged into one report.
async fn check_all(
    api: &Api,
    process_type: Option<&str>,
    page_size: Option<u32>,
) -> Result<CheckReport, CliError> {
    let mut report = CheckReport::default();
    let mut cursor: Option<String> = None;
    loop {
        let mut q: Vec<(&str, String)> = Vec::new();
        if let Some(t) = process_type {
            q.push(("type", t.to_string()));
        }
        if let Some(n) = page_size {
            q.push(("limit", n.to_string()));
        }
        if let Some(c) = &cursor {
            q.push(("cursor", c.clone()));
        }
        let page: CheckReport = api.get(&["api", "state", "check"], &q).await?.decode()?;
        report.checked += page.checked;
        report.problems.extend(page.problems);
        match page.next_cursor {
            // A cursor that does not move would loop forever.
            Some(c) if cursor.as_ref() != Some(&c) => cursor = Some(c),
            _ => return Ok(report),
        }
    }
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
    let t = render::process_table(&r.decode::<Vec<ProcessSummary>>()?);
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

async fn submit(
    api: &Api,
    a: &SubmitArgs,
    json: bool,
    out: &mut (dyn Write + Send),
    err: &mut (dyn Write + Send),
) -> Result<Exit, CliError> {
    let mut body = json!({ "processType": a.process_type });
    if let Some(path) = &a.input {
        body["input"] = Value::Object(read_object(path, "input")?);
    }
    if let Some(t) = &a.tenant {
        body["tenant"] = json!(t);
    }
    let headers: Vec<(&str, &str)> = a
        .idempotency_key
        .as_deref()
        .map(|k| ("Idempotency-Key", k))
        .into_iter()
        .collect();
    let url = api.url(&["api", "processes"], &[]);
    let r = api.send(Method::POST, url, Some(&body), &headers).await?;
    let SubmitReply {
        id,
        duplicate,
        pending,
    } = r.decode()?;
    if pending && !json {
        writeln!(
            err,
            "note: the fleet's intake is drained; {} waits Pending until it resumes",
            clean(&id)
        )?;
    }
    if !valid_id(&id) {
        return Err(CliError::BadResponse {
            url: r.url.clone(),
            detail: "no process id in the reply".into(),
        });
    }
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
    let status = render::text(&view.status);
    if json {
        write_raw(out, &raw)?;
    } else {
        writeln!(out, "{id} {status} in {}", seconds(view.duration))?;
    }
    if status == ProcessStatus::Completed.as_str() {
        Ok(Exit::Success)
    } else {
        let why = error_text(view.error_message.as_deref(), view.error_code.as_deref());
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
) -> Result<(ProcessView, Vec<u8>), CliError> {
    let deadline = Instant::now() + timeout;
    let mut last_status = String::from("unknown");
    loop {
        match api.get(&["api", "processes", id], &[]).await {
            Ok(r) => {
                let v: ProcessView = r.decode()?;
                if v.status
                    .parse::<ProcessStatus>()
                    .is_ok_and(|s| s.is_finished())
                {
                    return Ok((v, r.body));
                }
                last_status = clean(&v.status);
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
    let Ok(v) = r.decode::<HealthReply>() else {
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
    if json {
        write_raw(out, &r.body)?;
    } else {
        render::print_health(out, &v)?;
    }
    Ok(if r.is_success() && v.status == "Healthy" {
        Exit::Success
    } else {
        Exit::Unavailable
    })
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

#[cfg(test)]
mod tests {
    #[test]
    fn hash_token_matches_the_gateway() {
        // SHA-256("abc"), the FIPS 180-2 test vector.
        assert_eq!(
            honua_scheduler::gateway::token_hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}

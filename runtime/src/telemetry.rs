//! Logging and tracing set-up for the binaries: JSON lines by default (timestamp, level,
//! message, the span/event fields such as process_id, step, worker, and `trace_id`/`span_id`
//! inside a traced span), a human format for `honua dev`; level from `RUST_LOG` (default
//! `info`).
//!
//! Traces: when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is
//! set, spans go to that OTLP collector over gRPC or HTTP/protobuf
//! (`OTEL_EXPORTER_OTLP_PROTOCOL`: `grpc` or `http/protobuf`; unset: `grpc` for port 4317,
//! else `http/protobuf` as the OTLP spec says), with `service.name` from `OTEL_SERVICE_NAME`
//! (default `honua`). Without an endpoint no span is exported and no OpenTelemetry layer is
//! installed. The W3C trace context travels as `traceparent` strings through
//! [`trace_context_of`] and [`set_parent`] (the global `TraceContextPropagator`).
//!
//! Span names: `process.submit` (gateway/submission), `process.transition` (scheduler),
//! `step.execute` (worker); attributes `honua.*` — ids, types, step names, counters and
//! outcomes only, never inputs, outputs, prompts or secrets.

use honua_shared::envelope::TraceContext;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use std::collections::HashMap;
use std::io::IsTerminal;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Human,
}

/// The OTLP wire protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtlpProtocol {
    Grpc,
    HttpProtobuf,
}

/// Where spans are exported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtlpConfig {
    /// gRPC: the collector's URL (`http://collector:4317`). HTTP: the full traces URL
    /// (`http://collector:4318/v1/traces`).
    pub endpoint: String,
    pub protocol: OtlpProtocol,
    pub service_name: String,
}

impl OtlpConfig {
    /// From the standard OTel variables; `None` when no endpoint is set.
    pub fn from_env() -> Result<Option<Self>, String> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// From variables looked up with `get` (tests pass a map, never `env::set_var`).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Option<Self>, String> {
        let get = |k: &str| get(k).filter(|v| !v.trim().is_empty());
        let traces = get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT");
        let base = get("OTEL_EXPORTER_OTLP_ENDPOINT");
        let Some(url) = traces.clone().or_else(|| base.clone()) else {
            return Ok(None);
        };
        let protocol = match get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            .or_else(|| get("OTEL_EXPORTER_OTLP_PROTOCOL"))
            .as_deref()
        {
            Some("grpc") => OtlpProtocol::Grpc,
            Some("http/protobuf") => OtlpProtocol::HttpProtobuf,
            Some(other) => {
                return Err(format!(
                    "OTEL_EXPORTER_OTLP_PROTOCOL {other:?} is not supported (grpc, http/protobuf)"
                ));
            }
            None if url.trim_end_matches('/').ends_with(":4317") => OtlpProtocol::Grpc,
            None => OtlpProtocol::HttpProtobuf,
        };
        // The generic endpoint is a base URL: the HTTP exporter posts to <base>/v1/traces.
        let endpoint = match (protocol, traces) {
            (OtlpProtocol::HttpProtobuf, None) => {
                format!("{}/v1/traces", url.trim_end_matches('/'))
            }
            _ => url,
        };
        Ok(Some(Self {
            endpoint,
            protocol,
            service_name: get("OTEL_SERVICE_NAME").unwrap_or_else(|| "honua".into()),
        }))
    }
}

/// Keeps the span exporter alive; dropping it flushes the spans still queued and shuts the
/// exporter down. Hold it in `main` for the life of the process.
#[must_use = "dropping the guard shuts the span exporter down"]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl TelemetryGuard {
    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports every finished span now (blocks until the exporter answers or times out).
    #[expect(
        clippy::print_stderr,
        reason = "the log subscriber may already be gone at exit"
    )]
    pub fn flush(&self) {
        if let Some(p) = &self.provider {
            blocking(|| {
                if let Err(e) = p.force_flush() {
                    eprintln!("flushing spans failed: {e}");
                }
            });
        }
    }

    /// Keeps exporting without flushing at drop (what [`init`] does).
    fn detach(mut self) {
        self.provider = None;
    }
}

impl Drop for TelemetryGuard {
    #[expect(
        clippy::print_stderr,
        reason = "the log subscriber may already be gone at exit"
    )]
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            blocking(|| {
                if let Err(e) = p.shutdown() {
                    eprintln!("shutting the span exporter down failed: {e}");
                }
            });
        }
    }
}

/// Runs a blocking call without stalling the tokio worker it runs on (the gRPC exporter's
/// tasks may be queued behind it).
fn blocking(f: impl FnOnce()) {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// Logging plus OTLP export configured from the standard OTel variables. Spans already
/// exported periodically are kept; those of the last seconds before exit may be lost —
/// prefer [`init_from_env`] and hold its guard.
pub fn init(format: LogFormat) {
    init_from_env(format).detach();
}

/// [`init`] returning the guard that flushes spans on drop.
#[expect(clippy::print_stderr, reason = "logging is not set up yet")]
pub fn init_from_env(format: LogFormat) -> TelemetryGuard {
    let otlp = match OtlpConfig::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tracing export disabled: {e}");
            None
        }
    };
    init_with(format, otlp)
}

/// Logging plus, with `otlp`, span export to that collector. Installs the global subscriber
/// and propagator once per process (later calls only return an inert guard). The gRPC
/// exporter needs a tokio runtime: call it from inside one.
pub fn init_with(format: LogFormat, otlp: Option<OtlpConfig>) -> TelemetryGuard {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt: Box<dyn Layer<Registry> + Send + Sync> = match format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .event_format(WithTraceId(
                tracing_subscriber::fmt::format()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false),
            ))
            .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
            .with_filter(filter)
            .boxed(),
        LogFormat::Human => human_layer(std::io::stdout, std::io::stdout().is_terminal())
            .with_filter(filter)
            .boxed(),
    };
    let mut errors = Vec::new();
    let provider = otlp.and_then(|c| match tracer_provider(&c) {
        Ok(p) => Some(p),
        Err(e) => {
            errors.push(format!("tracing export to {} disabled: {e}", c.endpoint));
            None
        }
    });
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("honua"))
            .with_filter(tracing_subscriber::filter::LevelFilter::INFO)
    });
    let installed = tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        .try_init()
        .is_ok();
    for e in errors {
        tracing::warn!("{e}");
    }
    match provider {
        Some(p) if installed => {
            opentelemetry::global::set_tracer_provider(p.clone());
            TelemetryGuard { provider: Some(p) }
        }
        Some(p) => {
            let _ = p.shutdown();
            TelemetryGuard { provider: None }
        }
        None => TelemetryGuard { provider: None },
    }
}

/// The `honua dev` log format: time, level, span names, the message, then the fields the
/// message does not already show (`Process {id} started` is not followed by
/// `process_id={id}`). Colours only when `ansi` (stdout is a terminal).
pub fn human_layer<S, W>(writer: W, ansi: bool) -> impl Layer<S> + Send + Sync
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    tracing_subscriber::fmt::layer()
        .with_ansi(ansi)
        .with_writer(writer)
        .event_format(HumanFormat { ansi })
}

struct HumanFormat {
    ansi: bool,
}

/// An event's message and its other fields, rendered.
#[derive(Default)]
struct HumanFields {
    message: String,
    fields: Vec<(&'static str, String)>,
}

impl tracing::field::Visit for HumanFields {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "message" {
            self.message = value.to_string();
        } else {
            self.fields.push((field.name(), value.to_string()));
        }
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.message = format!("{value:?}");
        } else {
            self.fields.push((field.name(), format!("{value:?}")));
        }
    }
}

impl<S, N> FormatEvent<S, N> for HumanFormat
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        use tracing_subscriber::fmt::time::FormatTime;
        tracing_subscriber::fmt::time::SystemTime.format_time(&mut w)?;
        let level = *event.metadata().level();
        let colour = match level {
            tracing::Level::ERROR => "31",
            tracing::Level::WARN => "33",
            tracing::Level::INFO => "32",
            _ => "34",
        };
        if self.ansi {
            write!(w, " \x1b[{colour}m{level:>5}\x1b[0m ")?;
        } else {
            write!(w, " {level:>5} ")?;
        }
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                write!(w, "{}: ", span.name())?;
            }
        }
        let mut v = HumanFields::default();
        event.record(&mut v);
        write!(w, "{}", v.message)?;
        for (name, value) in &v.fields {
            if shows(&v.message, value) {
                continue;
            }
            if self.ansi {
                write!(w, " \x1b[2m{name}=\x1b[0m{value}")?;
            } else {
                write!(w, " {name}={value}")?;
            }
        }
        writeln!(w)
    }
}

/// `value` appears in `message` as a whole word (not inside a longer name or number).
fn shows(message: &str, value: &str) -> bool {
    let word = |c: char| c.is_alphanumeric() || c == '_' || c == '-';
    !value.is_empty()
        && message.match_indices(value).any(|(at, _)| {
            !message[..at].ends_with(word) && !message[at + value.len()..].starts_with(word)
        })
}

fn tracer_provider(c: &OtlpConfig) -> Result<SdkTracerProvider, String> {
    let exporter = match c.protocol {
        OtlpProtocol::Grpc => {
            if tokio::runtime::Handle::try_current().is_err() {
                return Err("the gRPC exporter needs a tokio runtime".into());
            }
            opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(c.endpoint.clone())
                .build()
        }
        OtlpProtocol::HttpProtobuf => {
            crate::install_crypto_provider();
            opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .with_endpoint(c.endpoint.clone())
                .build()
        }
    }
    .map_err(|e| e.to_string())?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(c.service_name.clone())
        .build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}

/// The JSON formatter with `trace_id` and `span_id` of the current OpenTelemetry span
/// prepended when there is one.
struct WithTraceId<F>(F);

impl<S, N, F> FormatEvent<S, N> for WithTraceId<F>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let cx = opentelemetry::Context::current();
        let span = cx.span();
        let sc = span.span_context();
        if !sc.is_valid() {
            return self.0.format_event(ctx, writer, event);
        }
        let mut line = String::new();
        self.0.format_event(ctx, Writer::new(&mut line), event)?;
        match line.strip_prefix('{') {
            Some(rest) => write!(
                writer,
                "{{\"trace_id\":\"{}\",\"span_id\":\"{}\",{rest}",
                sc.trace_id(),
                sc.span_id()
            ),
            None => writer.write_str(&line),
        }
    }
}

struct Carrier(HashMap<String, String>);

impl opentelemetry::propagation::Extractor for Carrier {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

impl opentelemetry::propagation::Injector for Carrier {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_string(), value);
    }
}

/// Makes the remote context in `trace` the parent of `span` (which must not have been
/// entered yet). Nothing happens without a valid `traceparent` or without the exporter.
pub fn set_parent(span: &tracing::Span, trace: &TraceContext) {
    // A span no subscriber records (tracing off, or filtered out) has no parent to set:
    // skip the propagator's parsing, which the hot path would pay per step.
    if span.is_disabled() {
        return;
    }
    let Some(tp) = trace.traceparent.as_deref() else {
        return;
    };
    let mut c = HashMap::from([("traceparent".to_string(), tp.to_string())]);
    if let Some(ts) = &trace.tracestate {
        c.insert("tracestate".into(), ts.clone());
    }
    let carrier = Carrier(c);
    let cx = opentelemetry::global::get_text_map_propagator(|p| p.extract(&carrier));
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

/// Links `span` to the span whose W3C `traceparent` is given (an earlier attempt of the same
/// step). Nothing happens for an invalid `traceparent` or without the exporter.
pub fn add_link(span: &tracing::Span, traceparent: &str) {
    let carrier = Carrier(HashMap::from([(
        "traceparent".to_string(),
        traceparent.to_string(),
    )]));
    let cx = opentelemetry::global::get_text_map_propagator(|p| p.extract(&carrier));
    let sc = cx.span().span_context().clone();
    if sc.is_valid() {
        span.add_link(sc);
    }
}

/// The W3C context of `span`, `None` when it is not traced (no exporter installed).
pub fn trace_context_of(span: &tracing::Span) -> Option<TraceContext> {
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut c = Carrier(HashMap::new());
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, &mut c));
    let traceparent = c.0.remove("traceparent")?;
    Some(TraceContext {
        traceparent: Some(traceparent),
        tracestate: c.0.remove("tracestate").filter(|s| !s.is_empty()),
    })
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// Cancels `shutdown` at the first SIGTERM/Ctrl-C and `hand_back` at the second (a
/// worker then hands its running steps back without waiting out the grace period).
pub async fn shutdown_signals(
    shutdown: tokio_util::sync::CancellationToken,
    hand_back: tokio_util::sync::CancellationToken,
) {
    shutdown_signal().await;
    shutdown.cancel();
    shutdown_signal().await;
    tracing::warn!("interrupted again: handing the running steps back now");
    hand_back.cancel();
}

/// The process's Prometheus recorder, installed on first use (one per process: the
/// scheduler, gateway and in-process workers of `honua dev` share it). Durations are
/// histograms with buckets from 1 ms to 1 h.
pub fn metrics_handle() -> metrics_exporter_prometheus::PrometheusHandle {
    use std::sync::OnceLock;
    static HANDLE: OnceLock<metrics_exporter_prometheus::PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = prometheus_builder().build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics may be empty");
            }
            describe_metrics();
            let upkeep = handle.clone();
            std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || {
                    loop {
                        #[expect(
                            clippy::disallowed_methods,
                            reason = "its own OS thread, not a runtime worker"
                        )]
                        std::thread::sleep(std::time::Duration::from_secs(5));
                        upkeep.run_upkeep();
                    }
                })
                .ok();
            handle
        })
        .clone()
}

/// Registers the `# HELP` text of every metric named in `honua_shared::metrics::HELP`.
fn describe_metrics() {
    use honua_shared::metrics::{HELP, Kind};
    for &(name, kind, help) in HELP {
        match kind {
            Kind::Counter => metrics::describe_counter!(name, help),
            Kind::Gauge => metrics::describe_gauge!(name, help),
            Kind::Histogram => metrics::describe_histogram!(name, help),
        }
    }
}

/// The exporter configuration: histogram buckets for every `*_seconds` metric.
pub fn prometheus_builder() -> metrics_exporter_prometheus::PrometheusBuilder {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    const BUCKETS: &[f64] = &[
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
        120.0, 300.0, 600.0, 1800.0, 3600.0,
    ];
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), BUCKETS)
        .expect("static buckets are valid")
}

/// Connections the worker's metrics listener serves at once (Prometheus scrapes one at a
/// time); the timeouts are the gateway's (`http_server`).
pub const METRICS_MAX_CONNECTIONS: usize = 64;

/// Serves this process's metrics at `GET /metrics` on `addr` (the worker's own port) with
/// the hardened server ([`crate::http_server`]) until `shutdown` fires.
pub async fn serve_worker_metrics(
    addr: std::net::SocketAddr,
    limits: crate::http_server::Limits,
    shutdown: tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tokio::spawn(serve_metrics(listener, limits, shutdown));
    Ok(())
}

/// Serves `GET /metrics` (anything else is 404) on `listener`, at most
/// [`METRICS_MAX_CONNECTIONS`] connections at once (fewer if `limits` says so).
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    mut limits: crate::http_server::Limits,
    shutdown: tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    use crate::http_server::{FullBody, TimedBody};
    limits.max_connections = limits.max_connections.min(METRICS_MAX_CONNECTIONS);
    let handle = metrics_handle();
    let service = tower::service_fn(move |req: http::Request<TimedBody>| {
        let handle = handle.clone();
        async move {
            let mut resp = http::Response::new(FullBody::default());
            if req.uri().path() == "/metrics" && req.method() == http::Method::GET {
                *resp.body_mut() = FullBody::new(handle.render());
                resp.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("text/plain; version=0.0.4"),
                );
            } else {
                *resp.status_mut() = http::StatusCode::NOT_FOUND;
            }
            Ok::<_, std::convert::Infallible>(resp)
        }
    });
    crate::http_server::serve(listener, service, limits, shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    /// Lines `human_layer` writes for `log`, with or without colours.
    fn human_lines(ansi: bool, log: impl FnOnce()) -> String {
        use std::sync::{Arc, Mutex};
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let out = Arc::new(Mutex::new(Vec::new()));
        let o = out.clone();
        let sub = tracing_subscriber::registry().with(human_layer(move || Buf(o.clone()), ansi));
        tracing::subscriber::with_default(sub, log);
        String::from_utf8(out.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn human_logs_show_each_id_once_and_colour_only_a_terminal() {
        let pid = "0193a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b";
        let log = || {
            tracing::info!(process_id = %pid, step = "A", worker = "w-1", duration_ms = 12u64,
                "Process {pid} step A completed, duration 12 ms");
            tracing::warn!(process_id = %pid, attempt = 1u32, "Process {pid} retried");
        };
        let plain = human_lines(false, log);
        assert!(!plain.contains('\x1b'), "{plain:?}");
        let lines: Vec<&str> = plain.lines().collect();
        assert_eq!(lines.len(), 2, "{plain}");
        for l in &lines {
            assert_eq!(l.matches(pid).count(), 1, "{l}");
        }
        assert!(lines[0].contains(" INFO Process "), "{}", lines[0]);
        assert!(
            lines[0].ends_with("worker=w-1"),
            "fields the message lacks stay: {}",
            lines[0]
        );
        assert!(
            !lines[0].contains("step=") && !lines[0].contains("duration_ms="),
            "{}",
            lines[0]
        );
        assert!(lines[1].ends_with("attempt=1"), "{}", lines[1]);
        let coloured = human_lines(true, log);
        assert!(coloured.contains("\x1b["), "{coloured:?}");
        assert_eq!(coloured.matches(pid).count(), 2, "{coloured}");
    }

    #[test]
    fn otlp_is_off_without_an_endpoint() {
        assert_eq!(OtlpConfig::from_vars(vars(&[])).unwrap(), None);
        let blank = vars(&[("OTEL_EXPORTER_OTLP_ENDPOINT", " ")]);
        assert_eq!(OtlpConfig::from_vars(blank).unwrap(), None);
    }

    #[test]
    fn otlp_config_follows_the_standard_variables() {
        let c = OtlpConfig::from_vars(vars(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/"),
            ("OTEL_SERVICE_NAME", "honua-worker"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(c.protocol, OtlpProtocol::HttpProtobuf);
        assert_eq!(c.endpoint, "http://collector:4318/v1/traces");
        assert_eq!(c.service_name, "honua-worker");

        let c = OtlpConfig::from_vars(vars(&[(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "http://collector:4317",
        )]))
        .unwrap()
        .unwrap();
        assert_eq!(c.protocol, OtlpProtocol::Grpc);
        assert_eq!(c.endpoint, "http://collector:4317");
        assert_eq!(c.service_name, "honua");

        let c = OtlpConfig::from_vars(vars(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:9999"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(c.protocol, OtlpProtocol::Grpc);

        // The signal-specific endpoint is used verbatim.
        let c = OtlpConfig::from_vars(vars(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://ignored:4318"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://c:4318/custom"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(c.endpoint, "http://c:4318/custom");

        let bad = vars(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
        ]);
        assert!(
            OtlpConfig::from_vars(bad)
                .unwrap_err()
                .contains("OTEL_EXPORTER_OTLP_PROTOCOL")
        );
    }

    #[test]
    fn traceparent_round_trips_through_a_span() {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        let provider = SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, || {
            let incoming = TraceContext {
                traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
                tracestate: None,
            };
            let span = tracing::info_span!(parent: None, "child");
            set_parent(&span, &incoming);
            let out = trace_context_of(&span).unwrap().traceparent.unwrap();
            let parts: Vec<&str> = out.split('-').collect();
            assert_eq!(parts[0], "00");
            assert_eq!(parts[1], "4bf92f3577b34da6a3ce929d0e0e4736");
            assert_ne!(parts[2], "00f067aa0ba902b7", "a new span id for the child");
            assert_eq!(parts[3], "01");

            // No traceparent (or a malformed one): a new root trace.
            for tp in [None, Some("garbage".to_string())] {
                let root = tracing::info_span!(parent: None, "root");
                set_parent(
                    &root,
                    &TraceContext {
                        traceparent: tp,
                        tracestate: None,
                    },
                );
                let out = trace_context_of(&root).unwrap().traceparent.unwrap();
                assert!(!out.contains("4bf92f3577b34da6a3ce929d0e0e4736"));
            }
        });
        // Without the OpenTelemetry layer nothing is traced.
        let span = tracing::info_span!("untraced");
        assert_eq!(trace_context_of(&span), None);
    }
}

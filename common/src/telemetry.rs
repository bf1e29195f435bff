//! Structured logging with `tracing`, and OpenTelemetry traces (OTLP over HTTP/protobuf).
//!
//! Traces are off unless `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`)
//! is set. When on, every `tracing` span of the ditfleet crates at INFO or above is exported,
//! whatever `DITFLEET_LOG` filters for the log output, and the trace context travels between the
//! processes in AMQP message headers (W3C `traceparent` / `tracestate`): `ditfleetctl submit` →
//! scheduler → worker, so one job is one trace.

use std::io::IsTerminal;
use std::time::SystemTime;

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{Span as _, TraceContextExt, Tracer as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry};

use crate::config::OtelConfig;

/// Instrumentation scope of the spans made directly through the OpenTelemetry API.
const SCOPE: &str = "ditfleet";

/// Keeps the trace exporter alive; [`Telemetry::shutdown`] flushes the spans not yet sent.
#[derive(Debug, Default)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn tracing_enabled(&self) -> bool {
        self.provider.is_some()
    }

    /// Flushes and stops the exporter (blocks up to the exporter's timeout). Call outside the
    /// async runtime, before the process exits.
    pub fn shutdown(mut self) {
        if let Some(Err(e)) = self.provider.take().map(|p| p.shutdown()) {
            eprintln!("trace exporter shutdown: {e}");
        }
    }
}

/// Installs the global subscriber: text or JSON lines on stderr, filtered by `filter`
/// (`DITFLEET_LOG`), plus the OTLP trace exporter when `otel` is set. Safe to call once per
/// process. `service` names the process in traces unless `OTEL_SERVICE_NAME` does.
pub fn init(filter: &str, json: bool) {
    let _ = init_with_traces(filter, json, None, "ditfleet");
}

/// [`init`] with traces; keep the returned handle and [`Telemetry::shutdown`] it before exiting.
pub fn init_with_traces(filter: &str, json: bool, otel: Option<&OtelConfig>, service: &str) -> Telemetry {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(true)
        .with_ansi(std::io::stderr().is_terminal());
    let fmt: Box<dyn Layer<Registry> + Send + Sync> = if json {
        Box::new(fmt.json().flatten_event(true).with_filter(filter))
    } else {
        Box::new(fmt.with_filter(filter))
    };
    let (otel_layer, telemetry) = match otel.map(|o| build_provider(o, service)) {
        Some(Ok(provider)) => {
            use opentelemetry::trace::TracerProvider as _;
            let tracer = provider.tracer(SCOPE);
            opentelemetry::global::set_tracer_provider(provider.clone());
            let layer = tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_filter(Targets::new().with_target("ditfleet", tracing::Level::INFO));
            (
                Some(layer),
                Telemetry {
                    provider: Some(provider),
                },
            )
        }
        Some(Err(e)) => {
            eprintln!("trace exporter not started: {e}");
            (None, Telemetry::default())
        }
        None => (None, Telemetry::default()),
    };
    if let Err(e) = tracing_subscriber::registry()
        .with(fmt)
        .with(otel_layer)
        .try_init()
    {
        eprintln!("tracing subscriber already installed: {e}");
    }
    if let Some(o) = otel.filter(|_| telemetry.tracing_enabled()) {
        tracing::info!(endpoint = %o.endpoint_for_logs(), "exporting traces over OTLP/HTTP");
    }
    telemetry
}

fn build_provider(_o: &OtelConfig, service: &str) -> Result<SdkTracerProvider, String> {
    // The exporter reads the standard OTEL_EXPORTER_OTLP_* variables (endpoint, headers, timeout,
    // compression) itself; OtelConfig has checked them.
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()
        .map_err(|e| e.to_string())?;
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").map_or(true, |v| v.is_empty()) {
        resource = resource.with_service_name(service.to_string());
    }
    resource = resource
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .with_attribute(KeyValue::new("host.name", crate::config::hostname_fallback()))
        .with_attribute(KeyValue::new("process.pid", i64::from(std::process::id())));
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build())
}

/// AMQP header table as an OpenTelemetry carrier.
struct HeaderCarrier<'a>(&'a mut FieldTable);

impl Injector for HeaderCarrier<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(
            ShortString::from(key),
            AMQPValue::LongString(value.as_str().into()),
        );
    }
}

struct HeaderReader<'a>(Option<&'a FieldTable>);

impl Extractor for HeaderReader<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match self.0?.inner().get(key)? {
            AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
            AMQPValue::ShortString(s) => Some(s.as_str()),
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .map(|t| t.inner().keys().map(|k| k.as_str()).collect())
            .unwrap_or_default()
    }
}

/// Adds the trace context of the current `tracing` span (`traceparent`, `tracestate`) to AMQP
/// headers. Adds nothing when traces are off or the span is not sampled.
pub fn inject_current(headers: &mut FieldTable) {
    let cx = tracing::Span::current().context();
    if !cx.span().span_context().is_valid() {
        return;
    }
    TraceContextPropagator::new().inject_context(&cx, &mut HeaderCarrier(headers));
}

/// The trace context a message carries in its headers (empty when it carries none).
pub fn extract(props: &BasicProperties) -> Context {
    TraceContextPropagator::new().extract(&HeaderReader(props.headers().as_ref()))
}

/// Makes `span` a child of the trace context in the message's headers (call before entering it).
pub fn set_parent_from_message(span: &tracing::Span, props: &BasicProperties) {
    let cx = extract(props);
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

/// The W3C `traceparent` of the current span, if traces are on.
pub fn current_traceparent() -> Option<String> {
    let mut t = FieldTable::default();
    inject_current(&mut t);
    HeaderReader(Some(&t)).get("traceparent").map(str::to_string)
}

/// Records a finished interval as a span, child of `parent` (a `tracing` span), with explicit
/// start and end times: for stages measured elsewhere (time spent in a queue, the engine's stages
/// on its blocking thread). Returns the new span's context, to hang further intervals under it.
/// Does nothing when traces are off.
pub fn record_interval(
    parent: &Context,
    name: &'static str,
    start: SystemTime,
    end: SystemTime,
    attributes: Vec<KeyValue>,
) -> Context {
    if !parent.span().span_context().is_valid() {
        return Context::new();
    }
    let tracer = opentelemetry::global::tracer(SCOPE);
    let mut span = tracer
        .span_builder(name)
        .with_start_time(start)
        .with_attributes(attributes)
        .start_with_context(&tracer, parent);
    let cx = parent.with_remote_span_context(span.span_context().clone());
    span.end_with_timestamp(end.max(start));
    cx
}

/// The OpenTelemetry context of a `tracing` span (for [`record_interval`]).
pub fn context_of(span: &tracing::Span) -> Context {
    span.context()
}

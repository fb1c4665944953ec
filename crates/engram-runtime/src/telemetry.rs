//! Telemetry: JSON logs through `tracing`, OpenTelemetry traces over OTLP when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set, and a Prometheus registry with a build-info metric.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use prometheus::{Encoder, IntGaugeVec, Opts, Registry, TextEncoder};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{ConfigSource, parse_http_url};

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One JSON object per line (the default: what log pipelines expect).
    Json,
    /// Human-readable lines, for a terminal.
    Text,
}

/// Keeps the trace pipeline alive; [`TelemetryGuard::shutdown`] flushes pending spans.
#[derive(Debug)]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl TelemetryGuard {
    /// Flushes and stops the OTLP exporter, if one runs.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(error) = provider.shutdown()
        {
            eprintln!("failed to flush traces: {error}");
        }
    }
}

/// Installs the global `tracing` subscriber for a binary. Reads only what logging itself
/// needs (`ENGRAM_LOG_LEVEL`, else the seed's `LOG_LEVEL`, else `info`; `ENGRAM_LOG_FORMAT`;
/// `OTEL_EXPORTER_OTLP_ENDPOINT`), so it can run before the rest of the configuration is
/// validated; a malformed value here is ignored and then reported by config validation.
///
/// # Errors
///
/// When the OTLP exporter cannot be built or a global subscriber is already installed.
pub fn init(service_name: &'static str, env: &dyn ConfigSource) -> anyhow::Result<TelemetryGuard> {
    let level = env
        .get("ENGRAM_LOG_LEVEL")
        .or_else(|| env.get("LOG_LEVEL"))
        .map(|l| l.trim().to_ascii_lowercase())
        .filter(|l| !l.is_empty())
        .unwrap_or_else(|| "info".to_owned());
    let filter = EnvFilter::try_new(&level).unwrap_or_else(|_| EnvFilter::new("info"));
    let format = match env
        .get("ENGRAM_LOG_FORMAT")
        .map(|f| f.trim().to_ascii_lowercase())
    {
        Some(f) if f == "text" => LogFormat::Text,
        _ => LogFormat::Json,
    };
    let fmt_layer = match format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(std::io::stdout)
            .boxed(),
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .boxed(),
    };

    let endpoint = env
        .get("OTEL_EXPORTER_OTLP_ENDPOINT")
        .filter(|e| !e.trim().is_empty())
        .and_then(|e| parse_http_url(e.trim()).ok());
    let provider = match endpoint {
        Some(endpoint) => Some(otlp_provider(service_name, endpoint.as_str())?),
        None => None,
    };
    let otel_layer = provider
        .as_ref()
        .map(|provider| tracing_opentelemetry::layer().with_tracer(provider.tracer(service_name)));
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt_layer)
        .with(otel_layer)
        .try_init()?;
    Ok(TelemetryGuard { provider })
}

/// A tracer provider that batches spans to an OTLP/gRPC endpoint.
///
/// # Errors
///
/// When the exporter cannot be built.
pub fn otlp_provider(
    service_name: &'static str,
    endpoint: &str,
) -> anyhow::Result<SdkTracerProvider> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()?;
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(Resource::builder().with_service_name(service_name).build())
        .build())
}

/// A service's Prometheus registry: every metric is named `engram_*`.
#[derive(Clone, Debug)]
pub struct Metrics {
    registry: Registry,
}

impl Metrics {
    /// A registry with `engram_build_info{service,version}` and the process collector
    /// (`engram_process_*`).
    ///
    /// # Errors
    ///
    /// When a collector cannot be registered.
    pub fn new(service_name: &str, version: &str) -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let build_info = IntGaugeVec::new(
            Opts::new(
                "engram_build_info",
                "Always 1; labels name the service and its version.",
            ),
            &["service", "version"],
        )?;
        build_info
            .with_label_values(&[service_name, version])
            .set(1);
        registry.register(Box::new(build_info))?;
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::new(
                std::process::id() as i32,
                "engram",
            ),
        ))?;
        Ok(Self { registry })
    }

    /// The registry, for components to register their own collectors.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        if let Err(error) = TextEncoder::new().encode(&self.registry.gather(), &mut buffer) {
            tracing::error!(error = %error, "failed to encode metrics");
        }
        String::from_utf8(buffer).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_info_and_process_metrics_are_engram_prefixed() {
        let metrics = Metrics::new("audit-sink", "0.1.0").expect("metrics");
        let text = metrics.render();
        assert!(
            text.contains("engram_build_info{service=\"audit-sink\",version=\"0.1.0\"} 1"),
            "{text}"
        );
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            assert!(line.starts_with("engram_"), "unprefixed metric: {line}");
        }
    }
}

//! W3C trace context (`traceparent`) carried in a job's attributes.
//!
//! Producers inject the current span's context when they enqueue
//! ([`current_traceparent`]); the worker runtime parses it back
//! ([`TraceParent::parse`]) and makes each job's span a child of it.
//! Only the OpenTelemetry API crate is used: with a
//! `tracing-opentelemetry` layer installed, the `tracing` span's context is
//! read and written; without one, the OpenTelemetry current context is used.

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The attribute key holding the W3C trace context.
pub const TRACEPARENT: &str = "traceparent";

/// A parsed W3C `traceparent` header value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceParent {
    /// 16-byte trace id, never all zeros.
    pub trace_id: [u8; 16],
    /// 8-byte id of the parent span, never all zeros.
    pub parent_id: [u8; 8],
    /// Trace flags (bit 0: sampled).
    pub flags: u8,
}

fn hex_decode<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.len() != N * 2 || !text.bytes().all(|byte| byte.is_ascii_digit() || (b'a'..=b'f').contains(&byte)) {
        return None;
    }
    let mut out = [0u8; N];
    for (index, slot) in out.iter_mut().enumerate() {
        *slot = u8::from_str_radix(text.get(index * 2..index * 2 + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Lowercase hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        let _ = write!(out, "{byte:02x}");
    }
    out
}

impl TraceParent {
    /// Parses a `traceparent` value (`00-<32 hex>-<16 hex>-<2 hex>`).
    ///
    /// Future versions are accepted as the spec asks (their first four fields
    /// are read); version `ff`, malformed fields and all-zero ids are refused.
    pub fn parse(value: &str) -> Option<Self> {
        let value = value.trim();
        let mut parts = value.split('-');
        let version = parts.next()?;
        let trace_id = parts.next()?;
        let parent_id = parts.next()?;
        let flags = parts.next()?;
        let [version] = hex_decode::<1>(version)?;
        if version == 0xff || (version == 0 && parts.next().is_some()) {
            return None;
        }
        let trace_id = hex_decode::<16>(trace_id)?;
        let parent_id = hex_decode::<8>(parent_id)?;
        let [flags] = hex_decode::<1>(flags)?;
        if trace_id == [0; 16] || parent_id == [0; 8] {
            return None;
        }
        Some(Self { trace_id, parent_id, flags })
    }

    /// The trace id as 32 lowercase hex digits.
    pub fn trace_id_hex(&self) -> String {
        hex(&self.trace_id)
    }

    /// True when the sampled flag is set.
    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }

    /// The OpenTelemetry span context this value describes (remote).
    pub fn span_context(&self) -> SpanContext {
        SpanContext::new(
            TraceId::from_bytes(self.trace_id),
            SpanId::from_bytes(self.parent_id),
            TraceFlags::new(self.flags),
            true,
            TraceState::NONE,
        )
    }

    /// An OpenTelemetry context whose current span is this remote parent.
    pub fn to_context(&self) -> opentelemetry::Context {
        opentelemetry::Context::new().with_remote_span_context(self.span_context())
    }

    /// The trace parent of a valid span context.
    pub fn from_span_context(context: &SpanContext) -> Option<Self> {
        if !context.is_valid() {
            return None;
        }
        Some(Self {
            trace_id: context.trace_id().to_bytes(),
            parent_id: context.span_id().to_bytes(),
            flags: if context.trace_flags().is_sampled() { 1 } else { 0 },
        })
    }
}

impl std::fmt::Display for TraceParent {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "00-{}-{}-{:02x}", hex(&self.trace_id), hex(&self.parent_id), self.flags)
    }
}

/// The trace context of the current `tracing` span (through a
/// `tracing-opentelemetry` layer), else of the current OpenTelemetry
/// context; `None` when neither is inside a valid trace.
pub fn current_traceparent() -> Option<TraceParent> {
    let from_span = tracing::Span::current().context();
    let span_context = from_span.span().span_context().clone();
    if let Some(parent) = TraceParent::from_span_context(&span_context) {
        return Some(parent);
    }
    let current = opentelemetry::Context::current();
    let span_context = current.span().span_context().clone();
    TraceParent::from_span_context(&span_context)
}

/// Makes `span` a child of `parent` (effective when a
/// `tracing-opentelemetry` layer is installed; harmless otherwise).
pub fn set_span_parent(span: &tracing::Span, parent: &TraceParent) {
    // Without the layer there is nothing to attach to; that is fine.
    let _ = span.set_parent(parent.to_context());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_formats_the_spec_example() {
        let text = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let parent = TraceParent::parse(text).expect("valid");
        assert_eq!(parent.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert!(parent.sampled());
        assert_eq!(parent.to_string(), text);
        let context = parent.span_context();
        assert!(context.is_valid());
        assert_eq!(TraceParent::from_span_context(&context), Some(parent));
    }

    #[test]
    fn refuses_malformed_values() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad}");
        }
        assert!(TraceParent::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future").is_some());
    }

    #[test]
    fn no_trace_outside_a_span() {
        assert_eq!(current_traceparent(), None);
    }
}

//! Continuing the producer's trace: W3C `traceparent`/`tracestate` message attributes first,
//! else the SQS system attribute `AWSTraceHeader` (X-Ray), else a new trace.

use std::collections::HashMap;

use aws_sdk_sqs::types::{Message, MessageSystemAttributeName};
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use opentelemetry_sdk::propagation::TraceContextPropagator;

/// Where the parent came from, for the span's attributes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ParentSource {
    TraceParent,
    AwsTraceHeader,
    None,
}

impl ParentSource {
    pub fn as_str(self) -> &'static str {
        match self {
            ParentSource::TraceParent => "traceparent",
            ParentSource::AwsTraceHeader => "AWSTraceHeader",
            ParentSource::None => "none",
        }
    }
}

struct Attributes(HashMap<String, String>);

impl Extractor for Attributes {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

/// The producer's span context carried by a message, if any.
pub(crate) fn parent_of(message: &Message) -> (opentelemetry::Context, ParentSource) {
    let attributes: HashMap<String, String> = message
        .message_attributes()
        .map(|attrs| {
            attrs
                .iter()
                .filter_map(|(k, v)| Some((k.to_ascii_lowercase(), v.string_value()?.to_owned())))
                .collect()
        })
        .unwrap_or_default();
    let cx = TraceContextPropagator::new().extract(&Attributes(attributes));
    if cx.span().span_context().is_valid() {
        return (cx, ParentSource::TraceParent);
    }
    let xray = message
        .attributes()
        .and_then(|a| a.get(&MessageSystemAttributeName::AwsTraceHeader));
    if let Some(sc) = xray.and_then(|h| from_xray(h)) {
        return (
            opentelemetry::Context::new().with_remote_span_context(sc),
            ParentSource::AwsTraceHeader,
        );
    }
    (opentelemetry::Context::new(), ParentSource::None)
}

/// `Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1` as a span
/// context: the X-Ray trace id is the W3C one with its version and dash taken out.
pub(crate) fn from_xray(header: &str) -> Option<SpanContext> {
    let mut root = None;
    let mut parent = None;
    let mut sampled = false;
    for part in header.split(';') {
        let (k, v) = part.trim().split_once('=')?;
        match k {
            "Root" => {
                let mut pieces = v.split('-');
                let (version, time, random) = (pieces.next()?, pieces.next()?, pieces.next()?);
                if version != "1" || time.len() != 8 || random.len() != 24 {
                    return None;
                }
                root = TraceId::from_hex(&format!("{time}{random}")).ok();
            }
            "Parent" => parent = SpanId::from_hex(v).ok(),
            "Sampled" => sampled = v == "1",
            _ => {}
        }
    }
    let flags = if sampled {
        TraceFlags::SAMPLED
    } else {
        TraceFlags::default()
    };
    let sc = SpanContext::new(root?, parent?, flags, true, TraceState::default());
    sc.is_valid().then_some(sc)
}

/// `00-{trace id}-{span id}-{flags}`.
pub fn traceparent(sc: &SpanContext) -> String {
    format!(
        "00-{}-{}-{:02x}",
        sc.trace_id(),
        sc.span_id(),
        sc.trace_flags().to_u8()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xray_headers_become_span_contexts() {
        let sc =
            from_xray("Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1")
                .unwrap();
        assert_eq!(
            sc.trace_id().to_string(),
            "5759e988bd862e3fe1be46a994272793"
        );
        assert_eq!(sc.span_id().to_string(), "53995c3f42cd8ad8");
        assert!(sc.is_sampled() && sc.is_remote());
        assert!(from_xray("Root=1-5759e988-bd862e3f;Parent=53995c3f42cd8ad8").is_none());
        assert!(from_xray("nonsense").is_none());
    }

    #[test]
    fn traceparent_round_trips() {
        let header = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let mut map = HashMap::new();
        map.insert("traceparent".to_owned(), header.to_owned());
        let cx = TraceContextPropagator::new().extract(&Attributes(map));
        assert_eq!(traceparent(cx.span().span_context()), header);
        let mut bad = HashMap::new();
        bad.insert(
            "traceparent".to_owned(),
            "00-zz-b7ad6b7169203331-01".to_owned(),
        );
        let cx = TraceContextPropagator::new().extract(&Attributes(bad));
        assert!(!cx.span().span_context().is_valid());
    }
}

//! The on-disk pod record `<root>/pods/<uid>/status.json` (format version 1) and its event list
//! (pure data + serde).

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Current format version of `status.json`.
pub const FORMAT_VERSION: u32 = 1;
/// Events kept per pod (oldest dropped first).
pub const MAX_EVENTS: usize = 100;

/// One pod event (like a core/v1 Event, reduced to what `describe` shows).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodEvent {
    /// `Normal` or `Warning`.
    #[serde(rename = "type")]
    pub type_: String,
    /// Pulling, Pulled, Created, Started, Killing, BackOff, Unhealthy, FailedMount, ...
    pub reason: String,
    /// Human message.
    pub message: String,
    /// First occurrence.
    pub first_timestamp: DateTime<Utc>,
    /// Last occurrence.
    pub last_timestamp: DateTime<Utc>,
    /// Occurrences folded into this entry.
    pub count: u32,
}

/// Contents of `status.json`: the whole Pod (metadata, spec, status) plus its events.
///
/// ```json
/// {"formatVersion":1,"pod":{"apiVersion":"v1","kind":"Pod","metadata":{..},"spec":{..},"status":{..}},
///  "events":[{"type":"Normal","reason":"Started","message":"..","firstTimestamp":"..","lastTimestamp":"..","count":1}]}
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodRecord {
    /// Always [`FORMAT_VERSION`] when written by this version.
    pub format_version: u32,
    /// The pod with its current status.
    pub pod: Pod,
    /// Recent events, oldest first.
    #[serde(default)]
    pub events: Vec<PodEvent>,
}

impl PodRecord {
    /// A record for `pod` with no events.
    pub fn new(pod: Pod) -> Self {
        Self {
            format_version: FORMAT_VERSION,
            pod,
            events: Vec::new(),
        }
    }

    /// Pod name.
    pub fn name(&self) -> &str {
        self.pod.metadata.name.as_deref().unwrap_or("")
    }

    /// Pod namespace.
    pub fn namespace(&self) -> &str {
        self.pod.metadata.namespace.as_deref().unwrap_or("default")
    }

    /// Records an event; a repeat of the last same-reason/message event is folded into it.
    pub fn add_event(&mut self, type_: &str, reason: &str, message: &str, now: DateTime<Utc>) {
        if let Some(e) = self
            .events
            .iter_mut()
            .rev()
            .find(|e| e.reason == reason && e.message == message)
        {
            e.count += 1;
            e.last_timestamp = now;
            return;
        }
        self.events.push(PodEvent {
            type_: type_.into(),
            reason: reason.into(),
            message: message.into(),
            first_timestamp: now,
            last_timestamp: now,
            count: 1,
        });
        if self.events.len() > MAX_EVENTS {
            self.events.remove(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::chrono::TimeZone;

    #[test]
    fn round_trip_and_fold() {
        let t = |s: i64| Utc.timestamp_opt(1_700_000_000 + s, 0).single().unwrap();
        let mut r = PodRecord::new(Pod::default());
        r.add_event("Normal", "Pulled", "pulled", t(0));
        r.add_event("Warning", "BackOff", "back-off", t(1));
        r.add_event("Warning", "BackOff", "back-off", t(5));
        assert_eq!(r.events.len(), 2);
        assert_eq!(r.events[1].count, 2);
        assert_eq!(r.events[1].last_timestamp, t(5));
        let json = serde_json::to_string(&r).unwrap();
        assert!(
            json.starts_with(
                "{\"formatVersion\":1,\"pod\":{\"apiVersion\":\"v1\",\"kind\":\"Pod\""
            ),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<PodRecord>(&json).unwrap(), r);
    }
}

//! Conversions between protobuf well-known time types and `std::time`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Why a protobuf `Duration` was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DurationError {
    /// Seconds or nanos are negative.
    Negative,
    /// Nanos are outside 0..1e9 or disagree in sign with seconds.
    Malformed,
}

impl std::fmt::Display for DurationError {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DurationError::Negative => write!(formatter, "must not be negative"),
            DurationError::Malformed => write!(formatter, "has nanos outside 0..1e9"),
        }
    }
}

impl std::error::Error for DurationError {}

/// Converts a non-negative protobuf duration to `std::time::Duration`.
pub fn duration_from_proto(duration: &prost_types::Duration) -> Result<Duration, DurationError> {
    if duration.seconds < 0 || duration.nanos < 0 {
        return Err(DurationError::Negative);
    }
    if duration.nanos >= 1_000_000_000 {
        return Err(DurationError::Malformed);
    }
    // Both parts are non-negative and in range, so the casts cannot wrap.
    Ok(Duration::new(duration.seconds as u64, duration.nanos as u32))
}

/// Converts a `std::time::Duration` to its protobuf form (saturating at i64::MAX seconds).
pub fn duration_to_proto(duration: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(duration.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(duration.subsec_nanos()).unwrap_or(0),
    }
}

/// Microseconds since the Unix epoch of a protobuf timestamp, or `None` when malformed.
pub fn timestamp_to_unix_micros(timestamp: &prost_types::Timestamp) -> Option<i64> {
    if !(0..1_000_000_000).contains(&timestamp.nanos) {
        return None;
    }
    timestamp.seconds.checked_mul(1_000_000)?.checked_add(i64::from(timestamp.nanos / 1_000))
}

/// A protobuf timestamp from microseconds since the Unix epoch.
pub fn timestamp_from_unix_micros(micros: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: micros.div_euclid(1_000_000),
        nanos: i32::try_from(micros.rem_euclid(1_000_000) * 1_000).unwrap_or(0),
    }
}

/// The current time as a protobuf timestamp.
pub fn timestamp_now() -> prost_types::Timestamp {
    let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    prost_types::Timestamp {
        seconds: i64::try_from(since_epoch.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(since_epoch.subsec_nanos()).unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_round_trip_and_refuse_negatives() {
        let proto = duration_to_proto(Duration::from_millis(1_500));
        assert_eq!(proto.seconds, 1);
        assert_eq!(proto.nanos, 500_000_000);
        assert_eq!(duration_from_proto(&proto), Ok(Duration::from_millis(1_500)));
        let negative = prost_types::Duration { seconds: -1, nanos: 0 };
        assert_eq!(duration_from_proto(&negative), Err(DurationError::Negative));
        let malformed = prost_types::Duration { seconds: 1, nanos: 1_000_000_000 };
        assert_eq!(duration_from_proto(&malformed), Err(DurationError::Malformed));
    }

    #[test]
    fn timestamps_round_trip_through_micros() {
        for micros in [0_i64, 1, 1_700_000_000_123_456, -1, -1_500_000] {
            let timestamp = timestamp_from_unix_micros(micros);
            assert_eq!(timestamp_to_unix_micros(&timestamp), Some(micros));
        }
        let malformed = prost_types::Timestamp { seconds: 1, nanos: -5 };
        assert_eq!(timestamp_to_unix_micros(&malformed), None);
    }
}

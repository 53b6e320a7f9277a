//! Event time of a stateful stage (`[transforms.event_time]`): per source
//! partition, a watermark (the largest record timestamp seen, minus the
//! allowed lateness; after `idle_timeout` without records it moves on with
//! the clock), the timers the plugin set, and what becomes of a record
//! behind the watermark.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// Bytes a timer counts for (against the stage's state limit).
pub fn timer_bytes(key: &[u8]) -> usize {
    key.len() + 40
}

/// A stage's event-time settings, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventTime {
    /// How far behind its partition's newest timestamp a record may be.
    pub allowed_lateness_ms: i64,
    /// A partition without records this long has its watermark moved on by
    /// the time that passed; `None`: never.
    pub idle_timeout: Option<Duration>,
    pub late: LatePolicy,
    /// How far ahead of the processing clock a record's timestamp may be:
    /// a record further ahead goes to `late` without moving the watermark.
    pub max_ahead_ms: i64,
}

impl EventTime {
    /// From `[transforms.event_time]`'s millisecond keys (an idle timeout
    /// of 0 is none; values past `i64::MAX` saturate).
    pub fn from_ms(allowed_lateness_ms: u64, idle_timeout_ms: u64, max_ahead_ms: u64, late: LatePolicy) -> Self {
        EventTime {
            allowed_lateness_ms: i64::try_from(allowed_lateness_ms).unwrap_or(i64::MAX),
            idle_timeout: (idle_timeout_ms > 0).then(|| Duration::from_millis(idle_timeout_ms)),
            late,
            max_ahead_ms: i64::try_from(max_ahead_ms).unwrap_or(i64::MAX),
        }
    }
}

/// What becomes of a record behind its partition's watermark.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LatePolicy {
    /// Dropped and counted (`sluice_late_records_total`).
    Drop,
    /// Sent to the dead letters, with the watermark in the reason.
    DeadLetter,
    /// Passed on as it is to the named sink.
    Route(String),
}

/// A partition's clock: its watermark, the newest timestamp seen, and its
/// timers (time, key), due in time order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Clock {
    pub watermark: Option<i64>,
    pub max_ts: Option<i64>,
    pub timers: BTreeSet<(i64, Vec<u8>)>,
}

impl Clock {
    /// The watermark after records up to `max_ts` (with `lateness`): it never goes back.
    pub fn advanced(&self, max_ts: i64, lateness: i64) -> (Option<i64>, Option<i64>) {
        let max = self.max_ts.map_or(max_ts, |m| m.max(max_ts));
        let mark = max.saturating_sub(lateness);
        (Some(self.watermark.map_or(mark, |w| w.max(mark))), Some(max))
    }

    /// Whether a record at `ts` is behind the watermark.
    pub fn is_late(&self, ts: i64) -> bool {
        self.watermark.is_some_and(|w| ts < w)
    }

    /// The timers due at `watermark`, in time order.
    pub fn due(&self, watermark: i64) -> Vec<(i64, Vec<u8>)> {
        self.timers.iter().take_while(|(at, _)| *at <= watermark).cloned().collect()
    }

    /// The bytes the timers take (for the state's limit).
    pub fn timer_bytes(&self) -> usize {
        self.timers.iter().map(|(_, key)| timer_bytes(key)).sum()
    }
}

/// When a partition last had a record (processing time), for `idle_timeout`.
#[derive(Debug, Clone, Copy)]
pub struct Seen {
    pub at: Instant,
    /// The newest timestamp then.
    pub max_ts: i64,
}

/// The watermark an idle partition moves to: its newest timestamp plus the
/// time it has been idle past `idle_timeout`, minus the lateness; `None`
/// while it is not idle. (Counting from the timeout, not from the last
/// record, keeps a record that comes right after the timeout on time.)
pub fn idle_watermark(seen: Seen, now: Instant, event: &EventTime) -> Option<i64> {
    let idle = event.idle_timeout?;
    let quiet = now.checked_duration_since(seen.at)?;
    let past = quiet.checked_sub(idle)?;
    Some(seen.max_ts.saturating_add(past.as_millis() as i64).saturating_sub(event.allowed_lateness_ms))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::stored;

    #[test]
    fn the_watermark_trails_the_newest_timestamp_and_never_goes_back() {
        let clock = Clock::default();
        assert_eq!(clock.advanced(10_000, 2_000), (Some(8_000), Some(10_000)));
        let clock = Clock { watermark: Some(8_000), max_ts: Some(10_000), ..Clock::default() };
        assert_eq!(clock.advanced(9_000, 2_000), (Some(8_000), Some(10_000)), "an older record moves nothing");
        assert!(clock.is_late(7_999) && !clock.is_late(8_000));
        assert!(!Clock::default().is_late(i64::MIN), "nothing is late before the first record");
    }

    #[test]
    fn timers_fall_due_in_time_order() {
        let clock = Clock {
            timers: [(60_000, b"b".to_vec()), (120_000, b"a".to_vec()), (60_000, b"a".to_vec())].into(),
            ..Clock::default()
        };
        assert_eq!(clock.due(60_000), vec![(60_000, b"a".to_vec()), (60_000, b"b".to_vec())]);
        assert!(clock.due(59_999).is_empty());
    }

    #[test]
    fn an_idle_partition_moves_on_with_the_clock() {
        let event = EventTime {
            max_ahead_ms: i64::MAX,
            allowed_lateness_ms: 1_000,
            idle_timeout: Some(Duration::from_secs(5)),
            late: LatePolicy::Drop,
        };
        let at = Instant::now();
        let seen = Seen { at, max_ts: 100_000 };
        assert_eq!(idle_watermark(seen, at + Duration::from_secs(4), &event), None);
        assert_eq!(idle_watermark(seen, at + Duration::from_secs(6), &event), Some(100_000));
        assert_eq!(idle_watermark(seen, at + Duration::from_secs(16), &event), Some(110_000));
        let never = EventTime { idle_timeout: None, ..event };
        assert_eq!(idle_watermark(seen, at + Duration::from_secs(600), &never), None);
    }

    #[test]
    fn stored_keys_round_trip_and_timers_sort_by_time() {
        for at in [i64::MIN + 1, -5, 0, 7, i64::MAX] {
            assert_eq!(stored::parse_timer(&stored::timer(at, b"k")), Some((at, b"k".to_vec())));
        }
        assert!(stored::timer(-5, b"z") < stored::timer(3, b"a"));
        assert_eq!(stored::parse_clock(&stored::clock(Some(-3), None)), (Some(-3), None));
        assert_eq!(stored::entry(b"k"), b"\0k");
    }
}

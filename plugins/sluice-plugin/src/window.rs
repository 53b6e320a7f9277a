//! Event-time windows over keyed state (the `state` feature), without
//! timer code: [`Tumbling::update`] folds a record into its window's
//! aggregate and sets the timer that closes it; [`Tumbling::close`], called
//! from [`crate::Transform::on_timer`], takes the closed window out of the
//! state.
//!
//! ```ignore
//! fn process(&mut self, record: Record) -> Result<Vec<Output>, String> {
//!     let t: Trade = parse(&record.value)?;
//!     self.window.update(&t.symbol, t.ts, |c: &mut Candle| c.add(t.price, t.volume, t.ts))?;
//!     Ok(vec![])
//! }
//! fn on_timer(&mut self, timer: Timer) -> Result<Vec<Output>, String> {
//!     let Some(w) = self.window.close::<Candle>(&timer)? else { return Ok(vec![]) };
//!     Ok(vec![Output::new(w.value.to_json(&w.key, w.start))])
//! }
//! ```
//!
//! A window `[start, end)` closes when its partition's watermark reaches
//! `end`: with `allowed_lateness_ms = L`, once a record at `end + L` or
//! later has been seen (or the partition has been idle for `idle_timeout`).
//!
//! Three kinds, each with `update` / `close` (JSON in state) and
//! `update_with` / `close_with` (a [`Codec`] of your own):
//! - [`Tumbling`]: fixed windows, one per record;
//! - [`Sliding`]: fixed windows every `slide`, overlapping: a record is in
//!   `size / slide` of them;
//! - [`Session`]: a key's records with gaps under `gap` make one window,
//!   which closes `gap` after its last record; a record that bridges two
//!   sessions merges them.

use crate::{state, Timer};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Fixed-size windows aligned on the Unix epoch: `[k·size, (k+1)·size)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tumbling {
    size_ms: i64,
}

/// A closed window: its key, bounds and aggregate.
#[derive(Debug, Clone, PartialEq)]
pub struct Window<A> {
    pub key: String,
    /// Milliseconds since the Unix epoch: the window is `[start, end)`.
    pub start: i64,
    pub end: i64,
    pub value: A,
}

impl Tumbling {
    /// Windows of `size_ms` (at least 1).
    pub fn new(size_ms: i64) -> Self {
        Tumbling { size_ms: size_ms.max(1) }
    }

    pub fn size_ms(&self) -> i64 {
        self.size_ms
    }

    /// The start of the window that holds `ts`.
    pub fn start(&self, ts: i64) -> i64 {
        ts - ts.rem_euclid(self.size_ms)
    }

    /// Folds a record at `ts` into `key`'s window aggregate with `fold`
    /// (the aggregate starts as `A::default()`), and sets the timer that
    /// closes the window.
    pub fn update<A>(&self, key: &str, ts: i64, fold: impl FnOnce(&mut A)) -> Result<(), String>
    where
        A: Serialize + DeserializeOwned + Default,
    {
        self.update_with(&Json, key, ts, fold)
    }

    /// [`Tumbling::update`], with the aggregate kept in state as `codec`
    /// encodes it.
    pub fn update_with<A: Default>(
        &self,
        codec: &impl Codec<A>,
        key: &str,
        ts: i64,
        fold: impl FnOnce(&mut A),
    ) -> Result<(), String> {
        let start = self.start(ts);
        fold_window(codec, key, start, start.saturating_add(self.size_ms), fold)
    }

    /// The window `timer` closes, taken out of the state; `None` if the
    /// timer is not one of this helper's or its window is gone.
    pub fn close<A: Serialize + DeserializeOwned>(&self, timer: &Timer) -> Result<Option<Window<A>>, String> {
        self.close_with(&Json, timer)
    }

    /// [`Tumbling::close`] of an aggregate kept as `codec` encodes it.
    pub fn close_with<A>(&self, codec: &impl Codec<A>, timer: &Timer) -> Result<Option<Window<A>>, String> {
        close_window(codec, timer, self.size_ms)
    }
}

/// A window's state key split into its key and start (see [`Tumbling`]);
/// `None` for a key that is not a window's.
pub fn parse_key(state_key: &[u8]) -> Option<(&str, i64)> {
    let (key, start) = std::str::from_utf8(state_key).ok()?.rsplit_once('\0')?;
    Some((key, start.parse().ok()?))
}

/// Windows of `size` starting every `slide`, aligned on the Unix epoch:
/// `[k·slide, k·slide + size)`. A record is folded into each window that
/// holds it. With `slide == size` they are [`Tumbling`] windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sliding {
    size_ms: i64,
    slide_ms: i64,
}

impl Sliding {
    /// Windows of `size_ms` every `slide_ms` (both at least 1; the slide at
    /// most the size).
    pub fn new(size_ms: i64, slide_ms: i64) -> Self {
        let size_ms = size_ms.max(1);
        Sliding { size_ms, slide_ms: slide_ms.clamp(1, size_ms) }
    }

    /// The starts of the windows that hold `ts`, earliest first.
    pub fn starts(&self, ts: i64) -> impl Iterator<Item = i64> + '_ {
        let last = ts - ts.rem_euclid(self.slide_ms);
        let mut start = last - (self.size_ms - 1) / self.slide_ms * self.slide_ms;
        while start.saturating_add(self.size_ms) <= ts {
            start += self.slide_ms;
        }
        (0..).map(move |k| start + k * self.slide_ms).take_while(move |s| *s <= last)
    }

    /// Folds a record at `ts` into `key`'s aggregate of every window that
    /// holds it, and sets the timers that close them.
    pub fn update<A>(&self, key: &str, ts: i64, fold: impl FnMut(&mut A)) -> Result<(), String>
    where
        A: Serialize + DeserializeOwned + Default,
    {
        self.update_with(&Json, key, ts, fold)
    }

    /// [`Sliding::update`] with the aggregates kept as `codec` encodes them.
    pub fn update_with<A: Default>(
        &self,
        codec: &impl Codec<A>,
        key: &str,
        ts: i64,
        mut fold: impl FnMut(&mut A),
    ) -> Result<(), String> {
        for start in self.starts(ts) {
            fold_window(codec, key, start, start.saturating_add(self.size_ms), &mut fold)?;
        }
        Ok(())
    }

    /// The window `timer` closes, taken out of the state (see [`Tumbling::close`]).
    pub fn close<A: Serialize + DeserializeOwned>(&self, timer: &Timer) -> Result<Option<Window<A>>, String> {
        self.close_with(&Json, timer)
    }

    /// [`Sliding::close`] of an aggregate kept as `codec` encodes it.
    pub fn close_with<A>(&self, codec: &impl Codec<A>, timer: &Timer) -> Result<Option<Window<A>>, String> {
        close_window(codec, timer, self.size_ms)
    }
}

/// Folds into `key`'s window `[start, end)` and sets its timer. The state
/// key of a window is the key, a NUL, the start.
fn fold_window<A: Default>(
    codec: &impl Codec<A>,
    key: &str,
    start: i64,
    end: i64,
    fold: impl FnOnce(&mut A),
) -> Result<(), String> {
    WINDOW_KEY.with(|skey| {
        // One buffer for the state key, reused record after record.
        let mut skey = skey.borrow_mut();
        skey.clear();
        write_window_key(&mut skey, key, start);
        let mut value = state::read(&skey, |stored| match stored {
            Some(bytes) => codec.decode(bytes).map_err(|e| format!("window {key:?} at {start}: {e}")),
            None => Ok(A::default()),
        })?;
        fold(&mut value);
        state::put(&skey, codec.encode(&value).map_err(|e| format!("window {key:?} at {start}: {e}"))?);
        state::set_timer(&skey, end);
        Ok(())
    })
}

thread_local! {
    static WINDOW_KEY: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `key`, a NUL, `start` in decimal: a window's state key (see [`parse_key`]).
fn write_window_key(out: &mut Vec<u8>, key: &str, start: i64) {
    use std::io::Write;
    out.extend_from_slice(key.as_bytes());
    out.push(0);
    // Writing into a Vec cannot fail.
    let _ = write!(out, "{start}");
}

/// The window of `size` that `timer` closes, taken out of the state.
fn close_window<A>(codec: &impl Codec<A>, timer: &Timer, size: i64) -> Result<Option<Window<A>>, String> {
    let Some((key, start)) = parse_key(&timer.key) else { return Ok(None) };
    let Some(bytes) = state::get(&timer.key) else { return Ok(None) };
    let value = codec.decode(&bytes).map_err(|e| format!("window {key:?} at {start}: {e}"))?;
    state::delete(&timer.key);
    Ok(Some(Window { key: key.to_string(), start, end: start.saturating_add(size), value }))
}

/// Session windows: a key's records less than `gap` apart (in event time)
/// make one session `[first, last + gap)`, which closes once the watermark
/// passes its end. A key's open sessions are kept in one state entry; a
/// record that falls within `gap` of two sessions merges them, with the
/// `merge` given to [`Session::update`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Session {
    gap_ms: i64,
}

/// A key's open sessions, as kept in state: (first, last, aggregate).
type Open<A> = Vec<(i64, i64, A)>;

impl Session {
    /// Sessions that close after `gap_ms` (at least 1) without a record.
    pub fn new(gap_ms: i64) -> Self {
        Session { gap_ms: gap_ms.max(1) }
    }

    fn state_key(key: &str) -> Vec<u8> {
        format!("{key}\0session").into_bytes()
    }

    /// Folds a record at `ts` into `key`'s session (a new one, the one it
    /// extends, or the merge of those it bridges, combined with `merge`),
    /// and sets the timer that closes it.
    pub fn update<A>(
        &self,
        key: &str,
        ts: i64,
        fold: impl FnOnce(&mut A),
        mut merge: impl FnMut(&mut A, A),
    ) -> Result<(), String>
    where
        A: Serialize + DeserializeOwned + Default,
    {
        let skey = Self::state_key(key);
        let mut open: Open<A> = state::get_json(&skey)?.unwrap_or_default();
        let (mut first, mut last, mut value) = (ts, ts, A::default());
        fold(&mut value);
        // Every session within `gap` of the record joins it.
        let (joined, kept): (Open<A>, Open<A>) = open
            .drain(..)
            .partition(|(f, l, _)| ts >= f.saturating_sub(self.gap_ms) && ts < l.saturating_add(self.gap_ms));
        for (f, l, other) in joined {
            (first, last) = (first.min(f), last.max(l));
            merge(&mut value, other);
        }
        open = kept;
        open.push((first, last, value));
        open.sort_by_key(|(f, _, _)| *f);
        state::put_json(&skey, &open)?;
        state::set_timer(&skey, last.saturating_add(self.gap_ms));
        Ok(())
    }

    /// The sessions of `timer`'s key that ended by its time, taken out of
    /// the state (a timer of a session that was extended since closes
    /// nothing); empty if the timer is not one of this helper's.
    pub fn close<A>(&self, timer: &Timer) -> Result<Vec<Window<A>>, String>
    where
        A: Serialize + DeserializeOwned,
    {
        let Some(key) = std::str::from_utf8(&timer.key).ok().and_then(|k| k.strip_suffix("\0session")) else {
            return Ok(Vec::new());
        };
        let Some(open) = state::get_json::<Open<A>>(&timer.key)? else { return Ok(Vec::new()) };
        let (ended, open): (Open<A>, Open<A>) =
            open.into_iter().partition(|(_, last, _)| last.saturating_add(self.gap_ms) <= timer.at);
        if ended.is_empty() {
            return Ok(Vec::new());
        }
        match open.is_empty() {
            true => state::delete(&timer.key),
            false => state::put_json(&timer.key, &open)?,
        }
        Ok(ended
            .into_iter()
            .map(|(first, last, value)| Window {
                key: key.to_string(),
                start: first,
                end: last.saturating_add(self.gap_ms),
                value,
            })
            .collect())
    }
}

/// How a window's aggregate is kept in state: its bytes.
pub trait Codec<A> {
    fn encode(&self, value: &A) -> Result<Vec<u8>, String>;
    fn decode(&self, bytes: &[u8]) -> Result<A, String>;
}

/// JSON, through serde: the codec of [`Tumbling::update`] and [`Tumbling::close`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Json;

impl<A: Serialize + DeserializeOwned> Codec<A> for Json {
    fn encode(&self, value: &A) -> Result<Vec<u8>, String> {
        serde_json::to_vec(value).map_err(|e| e.to_string())
    }

    fn decode(&self, bytes: &[u8]) -> Result<A, String> {
        serde_json::from_slice(bytes).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Origin;

    #[test]
    fn a_window_folds_its_records_and_closes_once() {
        let w = Tumbling::new(60_000);
        assert_eq!((w.start(119_999), w.start(120_000), w.start(-1)), (60_000, 120_000, -60_000));
        w.update("A", 61_000, |n: &mut u32| *n += 1).unwrap();
        w.update("A", 119_000, |n: &mut u32| *n += 1).unwrap();
        w.update("A", 120_000, |n: &mut u32| *n += 1).unwrap();
        let timers = state::testing::take_timers();
        assert_eq!(timers.iter().map(|t| t.1).collect::<Vec<_>>(), [120_000, 120_000, 180_000]);
        let timer = Timer { key: timers[0].0.clone(), at: 120_000, origin: Origin::default() };
        let closed = w.close::<u32>(&timer).unwrap().unwrap();
        assert_eq!((closed.key.as_str(), closed.start, closed.end, closed.value), ("A", 60_000, 120_000, 2));
        assert_eq!(w.close::<u32>(&timer).unwrap(), None, "closed once");
        let other = Timer { key: b"not a window".to_vec(), at: 0, origin: Origin::default() };
        assert_eq!(w.close::<u32>(&other).unwrap(), None);
    }

    fn timer(key: &[u8], at: i64) -> Timer {
        Timer { key: key.to_vec(), at, origin: Origin::default() }
    }

    #[test]
    fn a_record_is_in_every_sliding_window_that_holds_it() {
        let w = Sliding::new(60_000, 20_000);
        assert_eq!(w.starts(65_000).collect::<Vec<_>>(), [20_000, 40_000, 60_000]);
        assert_eq!(w.starts(60_000).collect::<Vec<_>>(), [20_000, 40_000, 60_000]);
        assert_eq!(w.starts(-1).collect::<Vec<_>>(), [-60_000, -40_000, -20_000]);
        assert_eq!(Sliding::new(10, 10).starts(15).collect::<Vec<_>>(), [10], "a tumbling window");
        assert_eq!(Sliding::new(25, 10).starts(20).collect::<Vec<_>>(), [0, 10, 20], "size not a multiple");
        assert_eq!(Sliding::new(25, 10).starts(25).collect::<Vec<_>>(), [10, 20]);
        for ts in [65_000, 75_000] {
            w.update("A", ts, |n: &mut u32| *n += 1).unwrap();
        }
        let timers = state::testing::take_timers();
        let mut ends: Vec<i64> = timers.iter().map(|t| t.1).collect();
        ends.dedup();
        assert_eq!(ends, [80_000, 100_000, 120_000, 80_000, 100_000, 120_000]);
        let closed = w.close::<u32>(&timer(&timers[0].0, 80_000)).unwrap().unwrap();
        assert_eq!((closed.start, closed.end, closed.value), (20_000, 80_000, 2));
        let closed = w.close::<u32>(&timer(&timers[2].0, 120_000)).unwrap().unwrap();
        assert_eq!((closed.start, closed.end, closed.value), (60_000, 120_000, 2));
    }

    #[test]
    fn sessions_extend_merge_and_close_after_their_gap() {
        let s = Session::new(10_000);
        let count = |n: &mut u32| *n += 1;
        let sum = |a: &mut u32, b: u32| *a += b;
        s.update("B", 0, count, sum).unwrap();
        s.update("B", 5_000, count, sum).unwrap(); // extends [0, 15 000)
        s.update("B", 40_000, count, sum).unwrap(); // a second session
        s.update("B", 22_000, count, sum).unwrap(); // within 10 s of neither: a third session
        let timers = state::testing::take_timers();
        let key = timers[0].0.clone();
        assert!(s.close::<u32>(&timer(&key, 14_999)).unwrap().is_empty(), "not ended yet");
        let closed = s.close::<u32>(&timer(&key, 15_000)).unwrap();
        assert_eq!(closed.iter().map(|w| (w.start, w.end, w.value)).collect::<Vec<_>>(), [(0, 15_000, 2)]);
        // 31 000 is within 10 s of 22 000 and of 40 000: it bridges them.
        s.update("B", 31_000, count, sum).unwrap();
        let closed = s.close::<u32>(&timer(&key, 50_000)).unwrap();
        assert_eq!(closed.iter().map(|w| (w.start, w.end, w.value)).collect::<Vec<_>>(), [(22_000, 50_000, 3)]);
        assert!(state::get(&key).is_none(), "no session left");
        assert!(s.close::<u32>(&timer(b"A\x0060000", 1 << 40)).unwrap().is_empty(), "not a session's timer");
    }
}

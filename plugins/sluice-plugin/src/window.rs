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

    /// The state key of `key`'s window starting at `start`: the key, a NUL,
    /// the start.
    fn state_key(key: &str, start: i64) -> Vec<u8> {
        format!("{key}\0{start}").into_bytes()
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
        let skey = Self::state_key(key, start);
        let mut value = match state::get(&skey) {
            Some(bytes) => codec.decode(&bytes).map_err(|e| format!("window {key:?} at {start}: {e}"))?,
            None => A::default(),
        };
        fold(&mut value);
        state::put(&skey, codec.encode(&value).map_err(|e| format!("window {key:?} at {start}: {e}"))?);
        state::set_timer(&skey, start.saturating_add(self.size_ms));
        Ok(())
    }

    /// The window `timer` closes, taken out of the state; `None` if the
    /// timer is not one of this helper's or its window is gone.
    pub fn close<A: Serialize + DeserializeOwned>(&self, timer: &Timer) -> Result<Option<Window<A>>, String> {
        self.close_with(&Json, timer)
    }

    /// [`Tumbling::close`] of an aggregate kept as `codec` encodes it.
    pub fn close_with<A>(&self, codec: &impl Codec<A>, timer: &Timer) -> Result<Option<Window<A>>, String> {
        let Some((key, start)) = parse_key(&timer.key) else { return Ok(None) };
        let Some(bytes) = state::get(&timer.key) else { return Ok(None) };
        let value = codec.decode(&bytes).map_err(|e| format!("window {key:?} at {start}: {e}"))?;
        state::delete(&timer.key);
        Ok(Some(Window { key: key.to_string(), start, end: start.saturating_add(self.size_ms), value }))
    }
}

/// A window's state key split into its key and start (see [`Tumbling`]);
/// `None` for a key that is not a window's.
pub fn parse_key(state_key: &[u8]) -> Option<(&str, i64)> {
    let (key, start) = std::str::from_utf8(state_key).ok()?.rsplit_once('\0')?;
    Some((key, start.parse().ok()?))
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
}

"""py-candles: OHLC candles per symbol over event-time windows, in Python
(the same candles as the Rust ``ohlc-candles``, to show keyed state in a
second language).

Each flattened trade (``{"symbol", "price", "volume", "ts"}``) is folded
into the candle of its symbol and window, kept in the keyed state of its
source partition; when the partition's watermark passes the window's end
the candle is emitted, with the same fields as ``ohlc-candles``
(``symbol``, ``window_start``, ``open``, ``high``, ``low``, ``close``,
``volume``, ``vwap``, ``trades``, ``first_ts``, ``last_ts``), and its state
deleted. Ties on the timestamp go to the lowest price for the open and the
highest for the close, so a candle does not depend on the order of arrival.

Config ``window_ms``: the window (default 60000). The stage needs
``[transforms.event_time]``; build against ``wit/0.3``, world
``versioned-transformer``.

State version 1 keeps an open candle as 72 bytes (``_BINARY``: open, high,
low, close, volume, turnover as doubles; trades, first and last timestamp
as integers), the shape of the Rust ``ohlc-candles``; ``migrate`` converts
the JSON objects of version 0 (``app_json_state.py``, the earlier build),
so a hot swap from it keeps the open windows.
"""

import json
import struct

import sluice_plugin
from sluice_plugin import Config, Output, Record, Timer, state


_FIELDS = ("open", "high", "low", "close", "volume", "turnover", "trades", "first_ts", "last_ts")
_BINARY = struct.Struct("<6d3q")


class Candles:
    STATE_VERSION = 1
    MIGRATES_FROM = (0,)

    def __init__(self, config: Config):
        config.reject_unknown("window_ms")
        self.window = config.parse("window_ms", int, 60_000)
        if self.window <= 0:
            raise ValueError(f"config `window_ms` = {self.window}: must be positive")

    def process(self, record: Record):
        trade = json.loads(record.value)
        symbol, price, volume, ts = trade["symbol"], float(trade["price"]), float(trade["volume"]), int(trade["ts"])
        start = ts - ts % self.window
        key = f"{symbol}\0{start}"
        c = self.load(key)
        if c is None:
            c = {"open": price, "high": price, "low": price, "close": price, "volume": 0.0, "turnover": 0.0,
                 "trades": 0, "first_ts": ts, "last_ts": ts}
        if (ts, price) < (c["first_ts"], c["open"]):
            c["first_ts"], c["open"] = ts, price
        if (ts, price) > (c["last_ts"], c["close"]):
            c["last_ts"], c["close"] = ts, price
        c["high"], c["low"] = max(c["high"], price), min(c["low"], price)
        c["volume"] += volume
        c["turnover"] += price * volume
        c["trades"] += 1
        self.store(key, c)
        state.set_timer(key, start + self.window)
        return None

    def on_timer(self, timer: Timer):
        c = self.load(timer.key)
        if c is None:
            return None
        state.delete(timer.key)
        symbol, start = timer.key.decode().rsplit("\0", 1)
        vwap = c["turnover"] / c["volume"] if c["volume"] > 0 else c["close"]
        candle = {"symbol": symbol, "window_start": int(start), "open": c["open"], "high": c["high"], "low": c["low"],
                  "close": c["close"], "volume": c["volume"], "vwap": vwap, "trades": c["trades"],
                  "first_ts": c["first_ts"], "last_ts": c["last_ts"]}
        return Output(json.dumps(candle, separators=(",", ":")), key=symbol, timestamp=int(start))

    def load(self, key):
        """The open candle under ``key``, as a dict, or ``None``."""
        raw = state.get(key)
        return None if raw is None else dict(zip(_FIELDS, _BINARY.unpack(raw)))

    def store(self, key, c) -> None:
        state.put(key, _BINARY.pack(*(c[f] for f in _FIELDS)))

    def migrate(self, from_version, key, value):
        """A version-0 candle (a JSON object) in this version's 72 bytes."""
        c = json.loads(value)
        return key, _BINARY.pack(*(c[f] for f in _FIELDS))


Transform = sluice_plugin.export(Candles)

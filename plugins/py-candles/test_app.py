"""Native unit tests of py-candles: `python3 -m unittest` (build-plugins.sh runs them)."""

import json
import unittest

import sluice_plugin
from app import Candles
from app_json_state import JsonStateCandles
from sluice_plugin import Config, Record, Timer, state


def trade(symbol, price, volume, ts):
    return Record(value=json.dumps({"symbol": symbol, "price": price, "volume": volume, "ts": ts}).encode())


class CandlesTest(unittest.TestCase):
    def setUp(self):
        state._native.clear()
        state.take_timers()

    def test_a_candle_is_emitted_once_when_its_window_closes(self):
        plugin = Candles(Config({"window_ms": "60000"}))
        for price, volume, ts in [(10.0, 1.0, 60_500), (12.0, 1.0, 61_000), (9.0, 2.0, 119_000), (11.0, 1.0, 119_000)]:
            self.assertIsNone(plugin.process(trade("A", price, volume, ts)), "nothing before the close")
        timers = state.take_timers()
        self.assertEqual({at for _, at in timers}, {120_000})
        out = plugin.on_timer(Timer(timers[0][0], 120_000))
        c = json.loads(out.value)
        self.assertEqual((c["symbol"], c["window_start"], out.timestamp), ("A", 60_000, 60_000))
        self.assertEqual((c["open"], c["close"]), (10.0, 11.0), "a tie goes to the highest close")
        self.assertEqual((c["high"], c["low"], c["trades"]), (12.0, 9.0, 4))
        self.assertAlmostEqual(c["vwap"], (10.0 + 12.0 + 18.0 + 11.0) / 5.0)
        self.assertIsNone(plugin.on_timer(Timer(timers[0][0], 120_000)), "a window closes once")

    def test_the_config_is_checked(self):
        with self.assertRaises(ValueError):
            Candles(Config({"window_ms": "0"}))
        with self.assertRaises(ValueError):
            Candles(Config({"size": "1"}))

    def test_a_json_candle_of_version_0_migrates_to_the_same_candle(self):
        old = JsonStateCandles(Config({}))
        for price, volume, ts in [(10.0, 1.0, 60_500), (12.0, 0.5, 61_000)]:
            old.process(trade("A", price, volume, ts))
        entries = list(state._native.items())
        self.assertEqual(json.loads(entries[0][1])["trades"], 2, "version 0 keeps JSON")
        new = Candles(Config({}))
        state._native.clear()
        state._native.update(sluice_plugin.migrate(Candles, new, 0, entries))
        self.assertEqual(len(state._native[entries[0][0]]), 72, "version 1 keeps 72 bytes")
        new.process(trade("A", 9.0, 1.0, 62_000))
        c = json.loads(new.on_timer(Timer(entries[0][0], 120_000)).value)
        self.assertEqual((c["open"], c["high"], c["low"], c["close"], c["trades"]), (10.0, 12.0, 9.0, 9.0, 3))
        self.assertAlmostEqual(c["volume"], 2.5)


if __name__ == "__main__":
    unittest.main()

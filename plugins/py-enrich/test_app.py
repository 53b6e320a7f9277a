"""Native unit tests of py-enrich: `python3 -m unittest` (build.sh runs them)."""

import json
import unittest

from app import Enrich
from sluice_plugin import Config, Record

TRADE = {"symbol": "BINANCE:BTCUSDT", "price": 7296.89, "volume": 0.5, "ts": 1575526691134, "conditions": ["1"]}


def run(config, value):
    out = Enrich(Config(config)).process(Record(value=json.dumps(value).encode(), key=b"BINANCE:BTCUSDT", timestamp=7))
    return out


class EnrichTest(unittest.TestCase):
    def test_adds_notional_and_keeps_key_and_timestamp(self):
        out = run({}, TRADE)
        self.assertEqual(json.loads(out.value), {**TRADE, "notional": 7296.89 * 0.5})
        self.assertEqual((out.key, out.timestamp, out.route), (b"BINANCE:BTCUSDT", 7, None))

    def test_drops_trades_below_the_threshold(self):
        self.assertIsNone(run({"min_notional": "5000"}, TRADE))
        self.assertIsNotNone(run({"min_notional": "3000"}, TRADE))

    def test_field_name_is_configurable(self):
        self.assertIn("usd", json.loads(run({"field": "usd"}, TRADE).value))

    def test_rejects_bad_config(self):
        for config, message in [
            ({"min_notional": "lots"}, "config `min_notional` = 'lots'"),
            ({"min_notional": "nan"}, "finite"),
            ({"field": ""}, "must not be empty"),
            ({"treshold": "1"}, "unknown config key(s): treshold"),
        ]:
            with self.assertRaises(ValueError) as raised:
                Enrich(Config(config))
            self.assertIn(message, str(raised.exception))

    def test_rejects_what_is_not_a_trade(self):
        enrich = Enrich(Config())
        with self.assertRaises(ValueError):
            enrich.process(Record(value=b"{not json"))
        with self.assertRaisesRegex(ValueError, "expected an object"):
            enrich.process(Record(value=b"[1, 2]"))
        with self.assertRaisesRegex(ValueError, "must be numbers"):
            enrich.process(Record(value=b'{"symbol": "X", "price": "1", "volume": 2}'))


if __name__ == "__main__":
    unittest.main()

"""py-enrich: adds the notional value (price x volume) to each flattened trade
and drops the trades below a threshold.

Input: a flattened trade, as the trade flattener writes it:
``{"symbol":"BINANCE:BTCUSDT","price":7296.89,"volume":0.011467,"ts":...}``.
Output: the same object plus ``"notional": price * volume`` (key, headers and
timestamp kept), or nothing when the notional is below ``min_notional``.

Config:
* ``min_notional`` (number, default 0): trades worth less are dropped.
* ``field`` (default ``notional``): the name of the added field.
"""

import json
import math

import sluice_plugin
from sluice_plugin import Config, Output, Record, log


class Enrich:
    def __init__(self, config: Config):
        config.reject_unknown("min_notional", "field")
        self.min_notional = config.parse("min_notional", float, 0.0)
        if not math.isfinite(self.min_notional):
            raise ValueError(f"config `min_notional` must be a finite number, got {config['min_notional']!r}")
        self.field = config.get("field", "notional")
        if not self.field:
            raise ValueError("config `field` must not be empty")
        log.info(f"adding `{self.field}`, dropping trades under {self.min_notional}")

    def process(self, record: Record):
        trade = json.loads(record.value)
        if not isinstance(trade, dict):
            raise ValueError(f"not a flattened trade: expected an object, got {type(trade).__name__}")
        price, volume = trade.get("price"), trade.get("volume")
        if not _number(price) or not _number(volume):
            raise ValueError(f"not a flattened trade: price {price!r} and volume {volume!r} must be numbers")
        notional = price * volume
        if notional < self.min_notional:
            return None
        trade[self.field] = notional
        return Output(
            json.dumps(trade, separators=(",", ":")),
            key=record.key,
            headers=record.headers,
            timestamp=record.timestamp,
        )


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


Transform = sluice_plugin.export(Enrich)

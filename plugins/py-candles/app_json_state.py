"""py-candles with its open candles as JSON objects: state version 0, the
earlier build. ``build-plugins.sh`` builds it as ``py_candles_json_state.wasm``
for the test of a hot swap that migrates the state to version 1."""

import json

import sluice_plugin
from app import Candles
from sluice_plugin import state


class JsonStateCandles(Candles):
    STATE_VERSION = 0
    MIGRATES_FROM = ()

    def load(self, key):
        return state.get_json(key)

    def store(self, key, c) -> None:
        state.put(key, json.dumps(c, separators=(",", ":")))


Transform = sluice_plugin.export(JsonStateCandles)

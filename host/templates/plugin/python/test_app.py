"""Native unit tests: `python3 -m unittest` (build.sh runs them first)."""

import json
import unittest

from app import Plugin
from sluice_plugin import Config, Record


class PluginTest(unittest.TestCase):
    def test_labels_json_objects(self):
        out = Plugin(Config(label="demo")).process(Record(value=b'{"price": 1.5}'))
        self.assertEqual(json.loads(out.value), {"price": 1.5, "label": "demo"})

    def test_rejects_what_is_not_an_object(self):
        with self.assertRaisesRegex(ValueError, "expected a JSON object"):
            Plugin(Config()).process(Record(value=b"[1]"))

    def test_rejects_unknown_config(self):
        with self.assertRaises(ValueError):
            Plugin(Config(lable="x"))


if __name__ == "__main__":
    unittest.main()

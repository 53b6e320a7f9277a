"""{{name}}: a Sluice transform plugin.

Adds ``"label": <config label>`` to every JSON object it receives; anything
that is not a JSON object goes to the pipeline's dead letters.
Config: ``label`` (default "{{name}}").
"""

import json

import sluice_plugin
from sluice_plugin import Config, Output, Record


class Plugin:
    def __init__(self, config: Config):
        config.reject_unknown("label")
        self.label = config.get("label", "{{name}}")

    def process(self, record: Record):
        try:
            value = json.loads(record.value)
        except ValueError as error:
            raise ValueError(f"expected a JSON object: {error}") from error
        if not isinstance(value, dict):
            raise ValueError(f"expected a JSON object, got {type(value).__name__}")
        value["label"] = self.label
        return Output(json.dumps(value), key=record.key, headers=record.headers, timestamp=record.timestamp)


# The component's entry point (`export` also binds it where componentize-py looks).
Transform = sluice_plugin.export(Plugin)

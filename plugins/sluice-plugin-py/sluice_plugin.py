"""sluice_plugin: write a Sluice transform in Python as one plain class.

A Sluice transform is a WebAssembly component implementing
``wit/transform.wit``. This module hides that contract, as the Rust SDK
(``plugins/sluice-plugin``) does: write a class with

* ``__init__(self, config: Config)`` -- validate the plugin's ``config``
  table from the pipeline file; raise to reject it (the pipeline, or the hot
  reload, is refused with your message);
* ``process(self, record: Record)`` -- return the outputs of one record: a
  list of :class:`Output`, one ``Output``, or ``None`` for none. Raise to send
  the record to the dead-letter destination with your message; the pipeline
  goes on.

then export it once, at the bottom of your app module::

    Transform = sluice_plugin.export(MyTransform)

Build with ``componentize-py -d wit -w transformer componentize app -o app.wasm``
(``build.sh`` does it). Because the class is plain Python, ``python3 -m
unittest`` tests it natively: this module imports nothing from the component
bindings until it runs inside the sandbox.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

__all__ = ["Config", "Header", "Output", "Record", "export", "log"]


@dataclass
class Header:
    """A record header (Kafka headers are ordered and may repeat a name)."""

    name: str
    value: bytes


@dataclass
class Record:
    """One input record."""

    value: bytes
    key: Optional[bytes] = None
    headers: list[Header] = field(default_factory=list)
    #: Milliseconds since the Unix epoch, if the source had one.
    timestamp: Optional[int] = None
    #: Where the record was read from (for ``sluice plugin test``: ``stdin``
    #: or the input file, partition 0, offset = line number).
    topic: str = ""
    partition: int = 0
    offset: int = 0


@dataclass
class Output:
    """One output record. ``value`` may be ``bytes`` or ``str`` (UTF-8)."""

    value: Union[bytes, str]
    key: Optional[Union[bytes, str]] = None
    headers: list[Header] = field(default_factory=list)
    #: Milliseconds since the Unix epoch; ``None`` lets the sink decide.
    timestamp: Optional[int] = None
    #: A named sink of the pipeline; ``None`` is the default sink.
    route: Optional[str] = None


class Config(dict):
    """The plugin's ``config`` table. Values arrive as strings (TOML numbers
    and booleans are written out; arrays and tables arrive as JSON)."""

    def parse(self, key: str, kind: Callable[[str], object], default=None):
        """``kind(self[key])`` (``int``, ``float``...), with a message naming
        the key when it does not parse; ``default`` when the key is absent."""
        if key not in self:
            return default
        raw = self[key]
        try:
            return kind(raw)
        except ValueError as error:
            raise ValueError(f"config `{key}` = {raw!r}: {error}") from None

    def reject_unknown(self, *known: str) -> None:
        """Rejects any key not in ``known``, so that a typo in the pipeline
        file is reported instead of silently ignored."""
        unknown = sorted(k for k in self if k not in known)
        if not unknown:
            return
        if known:
            raise ValueError(f"unknown config key(s): {', '.join(unknown)} (known: {', '.join(known)})")
        raise ValueError(f"unknown config key(s): {', '.join(unknown)} (this plugin takes no config)")


class log:
    """Log lines from inside the plugin. In the sandbox they go to the host's
    log, tagged with the pipeline and plugin; natively (unit tests) to stderr."""

    @staticmethod
    def _emit(level: str, message: str) -> None:
        try:
            from wit_world.imports import log as host
        except ImportError:
            print(f"[{level}] {message}", file=sys.stderr)
            return
        host.log(getattr(host.Level, level), message)

    @staticmethod
    def debug(message: str) -> None:
        log._emit("DEBUG", message)

    @staticmethod
    def info(message: str) -> None:
        log._emit("INFO", message)

    @staticmethod
    def warn(message: str) -> None:
        log._emit("WARN", message)

    @staticmethod
    def error(message: str) -> None:
        log._emit("ERROR", message)


def _describe(error: BaseException) -> str:
    """The message a rejected config or a dead letter carries: a plain
    ``ValueError``'s message as is, anything else prefixed with its type
    (``JSONDecodeError: Expecting value: ...``, ``KeyError: 'price'``)."""
    message = str(error)
    if type(error) is ValueError and message:
        return message
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def _to_wit(output_record, o: "Output"):
    if not isinstance(o, Output):
        raise TypeError(f"process() must return an Output, a list of Output or None, not {type(o).__name__}")
    value, key, headers = o.value, o.key, o.headers
    if headers:
        headers = [h if isinstance(h.value, bytes) else Header(h.name, _bytes(h.value)) for h in headers]
    return output_record(
        None if key is None else (key if isinstance(key, bytes) else _bytes(key)),
        value if isinstance(value, bytes) else _bytes(value),
        headers if headers else [],
        o.timestamp,
        o.route,
    )


def _bytes(value: Union[bytes, str]) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)


def export(plugin: type) -> type:
    """Wraps ``plugin`` (a class as described in the module docs) as the
    component's ``transform`` export. Assign the result to ``Transform`` in
    the app module: that is the name componentize-py looks for."""

    class Transform:
        instance = None

        def init(self, config):
            from componentize_py_types import Err

            try:
                Transform.instance = plugin(Config(config))
            except Exception as error:  # the plugin rejects its config
                raise Err(_describe(error))

        def process_batch(self, batch):
            from componentize_py_types import Err, Ok
            from wit_world.imports import types as wit

            instance = Transform.instance
            if instance is None:
                return [Err("plugin used before init") for _ in batch]
            # CPython is interpreted here: every construct per record shows in
            # the throughput, hence positional arguments and no copies of
            # headers (the bindings' header has the same `name` and `value`).
            output_record, process = wit.OutputRecord, instance.process
            results = []
            for r in batch:
                origin = r.origin
                record = Record(r.value, r.key, r.headers, r.timestamp, origin.topic, origin.partition, origin.offset)
                try:
                    result = process(record)
                    if result is None:
                        outputs = []
                    elif isinstance(result, Output):
                        outputs = [_to_wit(output_record, result)]
                    else:
                        outputs = [_to_wit(output_record, o) for o in result]
                    results.append(Ok(outputs))
                except Exception as error:  # this record goes to the dead letters
                    results.append(Err(_describe(error)))
            return results

    Transform.__name__ = Transform.__qualname__ = f"Transform[{plugin.__name__}]"
    return Transform

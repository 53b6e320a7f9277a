"""sluice_plugin: write a Sluice transform in Python as one plain class.

A Sluice transform is a WebAssembly component implementing
``wit/transform.wit`` (contract 0.2: a batch crosses the sandbox as one
buffer each way). This module hides that contract, as the Rust SDK
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

import struct
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


# Contract 0.2's layouts (wit/transform.wit): little-endian tables of fixed
# entries, byte ranges as (offset, length) from the start of the buffer.
_BATCH_MAGIC = int.from_bytes(b"SLB2", "little")
_RESULTS_MAGIC = int.from_bytes(b"SLO2", "little")
_HEADER = struct.Struct("<8I")
_RECORD = struct.Struct("<IIiIIIqqIIII")
_RANGE = struct.Struct("<2I")
_HEADER_ENTRY = struct.Struct("<4I")
_RESULT = struct.Struct("<3I")
_OUTPUT = struct.Struct("<4Iq6I")


def _write(o: "Output", payload: bytearray, outputs: list, headers: list) -> None:
    """Appends output ``o`` to the results being built."""
    if not isinstance(o, Output):
        raise TypeError(f"process() must return an Output, a list of Output or None, not {type(o).__name__}")
    flags = key_at = key_len = route_at = route_len = 0
    key, timestamp, route = o.key, o.timestamp, o.route
    if key is not None:
        key = key if isinstance(key, bytes) else _bytes(key)
        key_at, key_len, flags = len(payload), len(key), 1
        payload += key
    if timestamp is None:
        timestamp = 0
    else:
        flags |= 2
    if route is not None:
        route = route.encode()
        route_at, route_len = len(payload), len(route)
        flags |= 4
        payload += route
    first = len(headers)
    for h in o.headers:
        name, value = h.name.encode(), _bytes(h.value)
        headers.append((len(payload), len(name), len(payload) + len(name), len(value)))
        payload += name
        payload += value
    value = o.value if isinstance(o.value, bytes) else _bytes(o.value)
    outputs.append((flags, first, len(o.headers), 0, timestamp, key_at, key_len, len(payload), len(value), route_at, route_len))
    payload += value


def _process(process, buf: bytes) -> bytes:
    """One batch: decode the records, run ``process`` on each, encode the results."""
    magic, count, topic_count, header_count, records_at, topics_at, headers_at, _ = _HEADER.unpack_from(buf, 0)
    if magic != _BATCH_MAGIC:
        raise RuntimeError("malformed batch from the host")
    topics = [buf[o : o + n].decode() for o, n in _RANGE.iter_unpack(buf[topics_at : topics_at + 8 * topic_count])]
    in_headers = list(_HEADER_ENTRY.iter_unpack(buf[headers_at : headers_at + 16 * header_count])) if header_count else ()
    payload, results, outputs, headers = bytearray(32), [], [], []
    for flags, topic, partition, first, n, _, offset, ts, key_at, key_len, value_at, value_len in _RECORD.iter_unpack(
        buf[records_at : records_at + 56 * count]
    ):
        record = Record(
            buf[value_at : value_at + value_len],
            buf[key_at : key_at + key_len] if flags & 1 else None,
            [Header(buf[a : a + b].decode(), buf[c : c + d]) for a, b, c, d in in_headers[first : first + n]] if n else [],
            ts if flags & 2 else None,
            topics[topic],
            partition,
            offset,
        )
        mark = (len(payload), len(outputs), len(headers))
        try:
            result = process(record)
            if result is None:
                results.append((0, 0, 0))
            elif isinstance(result, Output):
                _write(result, payload, outputs, headers)
                results.append((0, 1, 0))
            else:
                for o in result:
                    _write(o, payload, outputs, headers)
                results.append((0, len(outputs) - mark[1], 0))
        except Exception as error:  # this record goes to the dead letters
            del payload[mark[0] :], outputs[mark[1] :], headers[mark[2] :]
            message = _describe(error).encode()
            results.append((1, len(payload), len(message)))
            payload += message
    results_at = len(payload)
    payload += b"".join([_RESULT.pack(*r) for r in results])
    outputs_at = len(payload)
    payload += b"".join([_OUTPUT.pack(*o) for o in outputs])
    headers_at = len(payload)
    payload += b"".join([_HEADER_ENTRY.pack(*h) for h in headers])
    _HEADER.pack_into(payload, 0, _RESULTS_MAGIC, len(results), len(outputs), len(headers), results_at, outputs_at, headers_at, 0)
    return bytes(payload)


def _bytes(value: Union[bytes, str]) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)


def export(plugin: type) -> type:
    """Wraps ``plugin`` (a class as described in the module docs) as the
    component's ``batch`` export. Assign the result to ``Transform`` in the
    app module; the export is also bound to the name componentize-py looks
    for (``Batch``, after the WIT interface) in that module."""

    class Batch:
        instance = None

        def init(self, config):
            from componentize_py_types import Err

            try:
                Batch.instance = plugin(Config(config))
            except Exception as error:  # the plugin rejects its config
                raise Err(_describe(error))

        def process(self, batch: bytes) -> bytes:
            instance = Batch.instance
            if instance is None:
                raise RuntimeError("plugin used before init")
            return _process(instance.process, batch)

    Batch.__name__ = Batch.__qualname__ = f"Batch[{plugin.__name__}]"
    module = sys.modules.get(plugin.__module__)
    if module is not None:
        module.Batch = Batch
    return Batch

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

Keyed state (contract 0.3): build against ``wit/0.3`` instead
(``componentize-py -d wit/0.3 -w transformer ...``) and use :class:`state`
in ``process``: values by key, per source partition, committed with the
pipeline's rows and offsets; ``state.set_timer(key, at)`` calls the class's
``on_timer(self, timer: Timer)`` once the partition's watermark reaches
``at``. ``plugins/py-candles`` is the 1-minute candles in Python.

State versions: a class that changes the shape of its state sets
``STATE_VERSION = N`` (default 0), ``MIGRATES_FROM = (0, ...)`` and
``migrate(self, from_version, key, value)``, which returns the entry in
the new shape (``(key, value)``), or ``None`` to drop it, and raises to
refuse it. A hot swap hands the stage's state to the new version, which
converts each partition's entries before its first batch that holds the
partition; a version that converts none of the state's versions is refused
with the reason. Build it with ``-w versioned-transformer``.
"""

from __future__ import annotations

import json
import struct
import sys
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

__all__ = ["Config", "Header", "Output", "Record", "Timer", "export", "log", "migrate", "state"]

# The host's state calls (contract 0.3), imported now: componentize-py keeps
# only the modules imported while it builds the component. Natively, and in
# a 0.2 component, there are none.
try:
    from wit_world.imports import state as _host_state
except ImportError:
    _host_state = None
try:
    from wit_world.exports.schema import Versions as _Versions
except ImportError:
    _Versions = None


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


@dataclass
class Timer:
    """A timer set with :meth:`state.set_timer` that fired: its partition's
    watermark reached ``at`` (ms since the Unix epoch)."""

    key: bytes
    at: int
    topic: str = ""
    partition: int = 0


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


class state:
    """Keyed state (contract 0.3) of the source partition of the record
    being processed. Values are bytes (``get_json``/``put_json`` for JSON);
    what a record that raises changed is undone; a batch that traps or is
    rolled back changes nothing. A batch reads each key from the host once
    and hands each changed key back once, at its end. Natively (unit tests)
    the state is a dict, and :meth:`take_timers` returns the timers set."""

    # The batch's cache: per partition, the record index the host calls
    # name, and key -> [value or None, dirty].
    _scopes: dict = {}
    _current: Optional[tuple] = None
    _timers: list = []
    _undo: list = []
    # Natively: the store and the timers set.
    _native: dict = {}
    _native_timers: list = []
    _timers_before: int = 0

    @staticmethod
    def _host():
        """The host's state calls in the sandbox; ``None`` natively."""
        if sys.platform != "wasi":
            return None
        if _host_state is None:
            raise RuntimeError("keyed state needs contract 0.3: build with componentize-py -d wit/0.3")
        return _host_state

    @staticmethod
    def _entry(key: bytes) -> list:
        scope = state._scopes.get(state._current) if state._current is not None else None
        if scope is None:  # outside a batch: straight through
            return [state._read(0, key), False]
        entries = scope["entries"]
        if key not in entries:
            entries[key] = [state._read(scope["record"], key), False]
        return entries[key]

    @staticmethod
    def _read(record: int, key: bytes) -> Optional[bytes]:
        host = state._host()
        return state._native.get(key) if host is None else host.get(record, key)

    @staticmethod
    def get(key: Union[bytes, str]) -> Optional[bytes]:
        """The value stored under ``key``, or ``None``."""
        return state._entry(_bytes(key))[0]

    @staticmethod
    def put(key: Union[bytes, str], value: Union[bytes, str]) -> None:
        """Stores ``value`` under ``key``."""
        state._set(_bytes(key), _bytes(value))

    @staticmethod
    def delete(key: Union[bytes, str]) -> None:
        """Removes ``key``."""
        state._set(_bytes(key), None)

    @staticmethod
    def _set(key: bytes, value: Optional[bytes]) -> None:
        scope = state._scopes.get(state._current) if state._current is not None else None
        if scope is None:
            return state._write(0, key, value)
        entry = state._entry(key)
        state._undo.append((scope, key, list(entry)))
        entry[0], entry[1] = value, True

    @staticmethod
    def _write(record: int, key: bytes, value: Optional[bytes]) -> None:
        host = state._host()
        if host is None:
            if value is None:
                state._native.pop(key, None)
            else:
                state._native[key] = value
        elif value is None:
            host.delete(record, key)
        else:
            host.put(record, key, value)

    @staticmethod
    def get_json(key: Union[bytes, str]):
        """:meth:`get`, decoded from JSON."""
        value = state.get(key)
        return None if value is None else json.loads(value)

    @staticmethod
    def put_json(key: Union[bytes, str], value) -> None:
        """:meth:`put`, encoded as JSON."""
        state.put(key, json.dumps(value, separators=(",", ":")))

    @staticmethod
    def set_timer(key: Union[bytes, str], at: int) -> None:
        """Asks for ``on_timer`` with ``key`` once the watermark of the
        current record's partition reaches ``at`` (ms). Needs the stage's
        ``[transforms.event_time]``."""
        key = _bytes(key)
        scope = state._scopes.get(state._current) if state._current is not None else None
        if scope is not None:
            state._timers.append((scope["record"], key, at))
        elif state._host() is None:
            state._native_timers.append((key, at))
        else:
            state._host().set_timer(0, key, at)

    @staticmethod
    def watermark() -> Optional[int]:
        """The watermark of the current record's partition (ms), or ``None``."""
        host = state._host()
        if host is None:
            return None
        scope = state._scopes.get(state._current) if state._current is not None else None
        return host.watermark(scope["record"] if scope else 0)

    @staticmethod
    def take_timers() -> list:
        """Natively: the ``(key, at)`` timers set so far, taken."""
        timers, state._native_timers = state._native_timers, []
        return timers

    @staticmethod
    def _begin(index: int, topic: str, partition: int) -> None:
        scope = (topic, partition)
        if scope not in state._scopes:
            state._scopes[scope] = {"record": index, "entries": {}}
        state._current = scope
        state._undo = []
        state._timers_before = len(state._timers)

    @staticmethod
    def _undo_record() -> None:
        del state._timers[state._timers_before :]
        for scope, key, before in reversed(state._undo):
            scope["entries"][key] = before
        state._undo = []

    @staticmethod
    def _end() -> None:
        for record, key, at in state._timers:
            if state._host() is None:
                state._native_timers.append((key, at))
            else:
                state._host().set_timer(record, key, at)
        for scope in state._scopes.values():
            for key, (value, dirty) in scope["entries"].items():
                if dirty:
                    state._write(scope["record"], key, value)
        state._scopes, state._current, state._timers, state._undo = {}, None, [], []


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


def _process(process, buf: bytes, on_timer=None, stateful: bool = False) -> bytes:
    """One batch: decode the records, run ``process`` on each (``on_timer``
    on a fired timer, with ``stateful``), encode the results."""
    magic, count, topic_count, header_count, records_at, topics_at, headers_at, _ = _HEADER.unpack_from(buf, 0)
    if magic != _BATCH_MAGIC:
        raise RuntimeError("malformed batch from the host")
    topics = [buf[o : o + n].decode() for o, n in _RANGE.iter_unpack(buf[topics_at : topics_at + 8 * topic_count])]
    in_headers = list(_HEADER_ENTRY.iter_unpack(buf[headers_at : headers_at + 16 * header_count])) if header_count else ()
    payload, results, outputs, headers = bytearray(32), [], [], []
    for index, (flags, topic, partition, first, n, _, offset, ts, key_at, key_len, value_at, value_len) in enumerate(
        _RECORD.iter_unpack(buf[records_at : records_at + 56 * count])
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
        if stateful:
            state._begin(index, record.topic, partition)
        try:
            if stateful and offset < 0:  # a fired timer (contract 0.3)
                timer = Timer(record.key or b"", record.timestamp or 0, record.topic, partition)
                result = on_timer(timer) if on_timer is not None else None
            else:
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
            if stateful:
                state._undo_record()
            del payload[mark[0] :], outputs[mark[1] :], headers[mark[2] :]
            message = _describe(error).encode()
            results.append((1, len(payload), len(message)))
            payload += message
    if stateful:
        state._end()
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


def export(plugin: type, stateful: bool = False) -> type:
    """Wraps ``plugin`` (a class as described in the module docs) as the
    component's ``batch`` export. Assign the result to ``Transform`` in the
    app module; the export is also bound to the name componentize-py looks
    for (``Batch``, after the WIT interface) in that module. A class with
    ``on_timer``, or ``stateful=True``, keeps state (build against
    ``wit/0.3``)."""

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
            on_timer = getattr(instance, "on_timer", None)
            return _process(instance.process, batch, on_timer, stateful or on_timer is not None)

    class Schema:
        """Contract 0.3's ``schema`` export (``-w versioned-transformer``)."""

        def state_version(self):
            return _Versions(current=state_version(plugin), migrates_from=list(migrates_from(plugin)))

        def migrate(self, old_version: int, entries: list) -> list:
            from componentize_py_types import Err

            try:
                return migrate(plugin, Batch.instance, old_version, entries)
            except Exception as error:  # the plugin refuses an entry
                raise Err(_describe(error))

    Batch.__name__ = Batch.__qualname__ = f"Batch[{plugin.__name__}]"
    Schema.__name__ = Schema.__qualname__ = f"Schema[{plugin.__name__}]"
    module = sys.modules.get(plugin.__module__)
    if module is not None:
        module.Batch = Batch
        module.Schema = Schema
    return Batch


def state_version(plugin: type) -> int:
    """The state version ``plugin`` keeps (``STATE_VERSION``, default 0)."""
    return int(getattr(plugin, "STATE_VERSION", 0))


def migrates_from(plugin: type) -> tuple:
    """The state versions ``plugin`` converts (``MIGRATES_FROM``)."""
    return tuple(int(v) for v in getattr(plugin, "MIGRATES_FROM", ()))


def migrate(plugin: type, instance, from_version: int, entries: list) -> list:
    """One partition's entries kept by ``from_version``, in the shape of
    ``plugin``'s state version: each through ``instance.migrate``."""
    if from_version not in migrates_from(plugin):
        raise ValueError(
            f"no migrate from state version {from_version} (this build keeps version {state_version(plugin)})"
        )
    if instance is None:
        raise RuntimeError("plugin used before init")
    out = []
    for key, value in entries:
        entry = instance.migrate(from_version, bytes(key), bytes(value))
        if entry is not None:
            new_key, new_value = entry
            out.append((_bytes(new_key), _bytes(new_value)))
    return out

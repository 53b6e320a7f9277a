"""The SDK's side of contract 0.2, natively: a batch encoded as the host
encodes it goes through ``_process`` and its results decode as the host
decodes them (``python3 -m unittest`` in this directory)."""

import pathlib
import struct
import unittest

import sluice_plugin as sdk
from sluice_plugin import Header, Output


def encode(records, offset=9):
    """A batch in the layout of wit/transform.wit: (value, key, headers, timestamp, topic)."""
    topics = sorted({r[4] for r in records})
    header_count = sum(len(r[2]) for r in records)
    records_at = 32
    topics_at = records_at + 56 * len(records)
    headers_at = topics_at + 8 * len(topics)
    payload_at = headers_at + 16 * header_count
    payload, table, header_table = bytearray(), b"", b""

    def put(data):
        payload.extend(data)
        return payload_at + len(payload) - len(data), len(data)

    first = 0
    for value, key, headers, ts, topic in records:
        v, k = put(value), put(key) if key is not None else (0, 0)
        for name, hv in headers:
            n, hvr = put(name.encode()), put(hv)
            header_table += struct.pack("<4I", *n, *hvr)
        flags = (key is not None) | (ts is not None) << 1
        table += struct.pack("<IIiIIIqqIIII", flags, topics.index(topic), 3, first, len(headers), 0, offset, ts or 0, *k, *v)
        first += len(headers)
    topic_table = b"".join(struct.pack("<2I", *put(t.encode())) for t in topics)
    head = struct.pack("<8I", sdk._BATCH_MAGIC, len(records), len(topics), header_count, records_at, topics_at, headers_at, 0)
    return head + table + topic_table + header_table + bytes(payload)


def decode(buf):
    """[(ok, outputs or message)] with outputs as (key, value, headers, timestamp, route)."""
    magic, n, m, h, results_at, outputs_at, headers_at, _ = struct.unpack_from("<8I", buf)
    assert magic == sdk._RESULTS_MAGIC
    span = lambda off, ln: bytes(buf[off : off + ln])
    outputs = []
    for flags, first, count, _, ts, ko, kl, vo, vl, ro, rl in struct.iter_unpack("<4Iq6I", buf[outputs_at : outputs_at + 48 * m]):
        hs = [struct.unpack_from("<4I", buf, headers_at + 16 * i) for i in range(first, first + count)]
        outputs.append((span(ko, kl) if flags & 1 else None, span(vo, vl), [(span(a, b).decode(), span(c, d)) for a, b, c, d in hs], ts if flags & 2 else None, span(ro, rl).decode() if flags & 4 else None))
    results, next_output = [], 0
    for status, a, b in struct.iter_unpack("<3I", buf[results_at : results_at + 12 * n]):
        if status == 0:
            results.append((True, outputs[next_output : next_output + a]))
            next_output += a
        else:
            results.append((False, span(a, b).decode()))
    return results


class Mirror:
    def process(self, record):
        if record.value == b"fail":
            raise ValueError("asked to fail")
        if record.value == b"none":
            return None
        if record.value == b"half":
            return [Output("written, then discarded"), "not an Output"]
        return [Output(record.value, record.key, record.headers, record.timestamp, record.topic), Output("second", route="r")]


class ContractTest(unittest.TestCase):
    def test_records_survive_the_round_trip(self):
        records = [
            (b"v0", b"k", [("dup", b"1"), ("dup", b"")], 5, "tópic"),
            (b"", None, [], None, "t"),
            (b"none", b"", [], -1, "t"),
            (b"fail", None, [], None, "t"),
            (b"half", None, [], None, "t"),
            (b"x" * 100_000, None, [("h", b"v")], 2**62, "t"),
        ]
        results = decode(sdk._process(Mirror().process, encode(records)))
        self.assertEqual(len(results), 6)
        self.assertEqual(results[0], (True, [(b"k", b"v0", [("dup", b"1"), ("dup", b"")], 5, "tópic"), (None, b"second", [], None, "r")]))
        self.assertEqual(results[1][1][0], (None, b"", [], None, "t"))
        self.assertEqual(results[2], (True, []))
        self.assertEqual(results[3], (False, "asked to fail"))
        self.assertEqual(results[4], (False, "TypeError: process() must return an Output, a list of Output or None, not str"))
        self.assertEqual(results[5][1][0][1], b"x" * 100_000)

    def test_an_empty_batch(self):
        self.assertEqual(decode(sdk._process(Mirror().process, encode([]))), [])


GOLDEN = pathlib.Path(__file__).resolve().parent.parent / "sluice-abi" / "golden"


def golden_mirror(record):
    """The mirror of ``plugins/sluice-abi/tests/golden.rs``."""
    if record.value == b"fail":
        raise ValueError("asked to fail")
    if record.value == b"none":
        return None
    return [Output(record.value, record.key, record.headers, record.timestamp), Output("second", route="r")]


class GoldenTest(unittest.TestCase):
    def test_the_rust_codecs_golden_buffers(self):
        """The batch the host's encoder wrote decodes here, and the mirror's
        results encode byte for byte as the Rust SDK's writer wrote them."""
        seen = []
        results = sdk._process(lambda r: seen.append(r) or golden_mirror(r), (GOLDEN / "batch.bin").read_bytes())
        self.assertEqual(
            [(r.key, r.value, [(h.name, h.value) for h in r.headers], r.timestamp, r.topic, r.partition, r.offset) for r in seen],
            [
                (b"k", b"v0", [("dup", b"1"), ("dup", b"")], 5, "tópic", 3, 9),
                (None, b"", [], None, "t", 0, 10),
                (b"", b"none", [], -1, "t", 0, 11),
                (None, b"fail", [], None, "t", 1, 12),
            ],
        )
        self.assertEqual(results, (GOLDEN / "results.bin").read_bytes())


class Counter:
    """Counts records per key in state, and emits the count when its timer fires."""

    def process(self, record):
        n = (sdk.state.get_json(record.key) or 0) + 1
        sdk.state.put_json(record.key, n)
        if record.value == b"fail":
            raise ValueError("asked to fail")
        sdk.state.set_timer(record.key, 100)
        return None

    def on_timer(self, timer):
        n = sdk.state.get_json(timer.key)
        sdk.state.delete(timer.key)
        return Output(str(n), key=timer.key, timestamp=timer.at)


class StateTest(unittest.TestCase):
    def setUp(self):
        sdk.state._native.clear()
        sdk.state.take_timers()

    def test_a_batch_keeps_its_changes_and_undoes_a_failed_records(self):
        records = [(b"", b"a", [], 1, "t"), (b"", b"a", [], 2, "t"), (b"fail", b"a", [], 3, "t"), (b"", b"b", [], 4, "t")]
        results = decode(sdk._process(Counter().process, encode(records), Counter().on_timer, True))
        self.assertEqual([ok for ok, _ in results], [True, True, False, True])
        self.assertEqual(sdk.state._native, {b"a": b"2", b"b": b"1"}, "the failed record's count is undone")
        self.assertEqual(sorted(set(sdk.state.take_timers())), [(b"a", 100), (b"b", 100)])

    def test_a_fired_timer_goes_to_on_timer(self):
        sdk.state.put_json(b"a", 7)
        results = decode(sdk._process(Counter().process, encode([(b"", b"a", [], 100, "t")], offset=-1), Counter().on_timer, True))
        self.assertEqual(results, [(True, [(b"a", b"7", [], 100, None)])])
        self.assertEqual(sdk.state._native, {}, "deleted when emitted")



class CounterV1(Counter):
    """Counter with its counts as 8-byte big-endian integers: state version 1."""

    STATE_VERSION = 1
    MIGRATES_FROM = (0,)

    def migrate(self, from_version, key, value):
        if key == b"drop":
            return None
        if not value.isdigit():
            raise ValueError(f"not a count: {value!r}")
        return key, int(value).to_bytes(8, "big")


class MigrateTest(unittest.TestCase):
    def test_each_entry_is_converted_or_dropped(self):
        entries = [(b"a", b"2"), (b"drop", b"5"), (b"b", b"10")]
        out = sdk.migrate(CounterV1, CounterV1(), 0, entries)
        self.assertEqual(out, [(b"a", (2).to_bytes(8, "big")), (b"b", (10).to_bytes(8, "big"))])
        self.assertEqual((sdk.state_version(CounterV1), sdk.migrates_from(CounterV1)), (1, (0,)))
        self.assertEqual((sdk.state_version(Counter), sdk.migrates_from(Counter)), (0, ()))

    def test_a_version_it_does_not_convert_or_a_bad_entry_is_refused(self):
        with self.assertRaisesRegex(ValueError, "no migrate from state version 3 \\(this build keeps version 1\\)"):
            sdk.migrate(CounterV1, CounterV1(), 3, [])
        with self.assertRaisesRegex(ValueError, "not a count"):
            sdk.migrate(CounterV1, CounterV1(), 0, [(b"a", b"x")])


if __name__ == "__main__":
    unittest.main()

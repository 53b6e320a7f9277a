//! Contract 0.2 (`wit/transform.wit`): a batch crosses into the plugin as
//! one buffer, encoded by [`sluice_abi::Encoder`] (kept across batches), and
//! the results come back as one buffer, checked by [`sluice_abi::Results`]
//! and decoded in one pass. A results buffer the host cannot read as a
//! whole fails the call (a contract fault: the batch is retried record by
//! record); a bad range inside one output fails only that output's record.
//! The output limits are applied here, as the outputs are taken.

use super::CallError;
use crate::record::{Bytes, Header, Outputs, RecordRef, Results};
use crate::runtime::host_state::HostState;
use crate::runtime::limits::Limits;
use sluice_abi::results::{plain_parts, plain_prefix};
use sluice_abi::{Encoder, RecordIn, Status, OUTPUT_BYTES};
use wasmtime::component::{HasSelf, Linker};
use wasmtime::Store;

mod bindings {
    wasmtime::component::bindgen!({
        world: "transformer",
        path: "../wit",
        imports: { default: async },
        exports: { default: async },
    });
}

pub(crate) type Pre = bindings::TransformerPre<HostState>;

pub(super) fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    bindings::Transformer::add_to_linker::<_, HasSelf<_>>(linker, |state| state)
}

impl bindings::sluice::transform::log::Host for HostState {
    async fn log(&mut self, level: bindings::sluice::transform::log::Level, message: String) {
        use bindings::sluice::transform::log::Level as L;
        let level = match level {
            L::Trace => tracing::Level::TRACE,
            L::Debug => tracing::Level::DEBUG,
            L::Info => tracing::Level::INFO,
            L::Warn => tracing::Level::WARN,
            L::Error => tracing::Level::ERROR,
        };
        self.log_line(level, message)
    }
}

/// A 0.2 instance's exports and its batch buffer.
pub(crate) struct Bound {
    bindings: bindings::Transformer,
    encoder: Encoder,
}

impl Bound {
    pub(super) fn new(bindings: bindings::Transformer) -> Self {
        Bound { bindings, encoder: Encoder::default() }
    }

    pub(super) async fn init(
        &self,
        store: &mut Store<HostState>,
        config: &[(String, String)],
    ) -> wasmtime::Result<Result<(), String>> {
        self.bindings.sluice_transform_batch().call_init(store, config).await
    }

    pub(super) async fn process(
        &mut self,
        store: &mut Store<HostState>,
        inputs: &[RecordRef<'_>],
        limits: &Limits,
    ) -> Result<Results<String>, CallError> {
        let batch = encode(&mut self.encoder, inputs).map_err(|e| CallError::Contract(e.to_string()))?;
        // The results buffer is lifted as one copy; every output is then
        // decoded from it in one pass.
        let results =
            self.bindings.sluice_transform_batch().call_process(store, batch).await.map_err(CallError::Call)?;
        decode(&results.into(), inputs.len(), limits).map_err(CallError::Contract)
    }
}

/// `inputs` as one batch buffer.
pub(super) fn encode<'e>(encoder: &'e mut Encoder, inputs: &[RecordRef<'_>]) -> Result<&'e [u8], sluice_abi::TooLarge> {
    encoder.encode(inputs.iter().map(|r| RecordIn {
        key: r.key,
        value: r.value,
        headers: r.headers.iter().map(|h| (h.name.as_str(), h.value.as_slice())),
        timestamp: r.timestamp,
        topic: &r.origin.topic,
        partition: r.origin.partition,
        offset: r.origin.offset,
    }))
}

/// Decodes the results of a batch of `inputs` records. `Err` is a contract
/// violation of the whole buffer; a bad output fails only its record.
///
/// Keys and values are not copied: the outputs are checked ranges of
/// `buf`, which the results keep.
pub(super) fn decode(buf: &Bytes, inputs: usize, limits: &Limits) -> Result<Results<String>, String> {
    let results = sluice_abi::Results::parse(buf, inputs).map_err(|e| e.0)?;
    let output_table = results.outputs();
    // The common batch: every record ok, every output plain, and all of them
    // together within one record's limits. Then no record needs a check of
    // its own: its outputs are written in one go, and its count kept.
    if results.all_ok() && results.most_outputs() <= limits.outputs {
        let (plain, bytes) = plain_prefix(buf.len(), output_table);
        if plain == output_table.len() && bytes <= limits.output_bytes.min(limits.batch_output_bytes) as u64 {
            let mut all = Outputs::with_capacity(output_table.len());
            let shared = all.add_buffer(buf.clone());
            all.extend_slices(shared, output_table.iter().map(plain_parts));
            let counts = (0..results.len()).map(|i| match results.status(i) {
                Status::Ok(n) => Ok(n),
                _ => Ok(0),
            });
            return Ok(Results::from_parts(all, counts.collect()));
        }
    }
    // One store for the whole batch's outputs: the table says how many.
    let mut decoded = Results::with_capacity(inputs, output_table.len());
    let shared = decoded.add_buffer(buf.clone());
    let mut next = 0usize;
    let mut batch_bytes = 0usize;
    for i in 0..results.len() {
        match results.status(i) {
            Status::Ok(count) => {
                let first = next;
                next += count;
                let mine = output_table.get(first..next).unwrap_or_default();
                // Every range is checked as it is read; the limits apply after.
                decoded.push_with(|all| {
                    // Most outputs have no headers and no route: those come
                    // first, then the general path takes the rest.
                    let (plain, bytes) = plain_prefix(buf.len(), mine);
                    all.extend_slices(shared, mine.get(..plain).unwrap_or_default().iter().map(plain_parts));
                    let mut bytes = bytes as usize;
                    for (j, entry) in mine.iter().enumerate().skip(plain) {
                        bytes += push_output(all, shared, &results, entry, first + j)
                            .map_err(|e| format!("plugin broke the contract: {e}"))?;
                    }
                    limits.check_totals(count, bytes)?;
                    limits.add_to_batch(&mut batch_bytes, bytes)
                });
            }
            Status::Error(Ok(message)) => decoded.push_err(String::from_utf8_lossy(message).into_owned()),
            Status::Error(Err(e)) => decoded.push_err(format!("plugin broke the contract: {e}")),
            Status::Unknown(other) => {
                decoded.push_err(format!("plugin broke the contract: result {i} has status {other} (0 ok, 1 error)"))
            }
        }
    }
    Ok(decoded)
}

/// One output entry, decoded in full and pushed onto `all` as ranges of the
/// results buffer (`shared` in `all`). Returns the output's bytes, for the limits.
fn push_output(
    all: &mut Outputs,
    shared: u32,
    results: &sluice_abi::Results<'_>,
    entry: &[u8; OUTPUT_BYTES],
    index: usize,
) -> Result<usize, String> {
    let parts = results.output(index, entry)?;
    let bytes = parts.bytes();
    let headers =
        parts.headers.iter().map(|(name, value)| Header { name: name.to_string(), value: value.to_vec() }).collect();
    all.push_slices(shared, parts.key, parts.value, parts.timestamp, headers, parts.route);
    Ok(bytes)
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{Origin, Record};
    use sluice_abi::testing::payload_at;

    /// A hand-built results buffer (see [`sluice_abi::testing::results`]).
    fn results(entries: &[[u32; 3]], outputs: &[[u32; 12]], tail: &[u8]) -> Bytes {
        sluice_abi::testing::results(entries, outputs, tail).into()
    }

    #[test]
    fn encodes_what_the_guest_sdk_decodes() {
        let records: Vec<Record> = (0..20)
            .map(|i| Record {
                key: (i % 2 == 0).then(|| vec![i as u8; i].into()),
                value: format!("value {i}").into(),
                headers: (0..i % 4).map(|h| Header { name: format!("h{h}"), value: vec![7; h] }).collect(),
                timestamp: (i % 3 == 0).then_some(i as i64),
                origin: Origin { topic: ["a", "b", "ü"][i % 3].into(), partition: i as i32, offset: 1 << 40 },
                rejected: None,
            })
            .collect();
        let refs: Vec<RecordRef> = records.iter().map(Record::view).collect();
        let mut encoder = Encoder::default();
        let ours = encode(&mut encoder, &refs).unwrap().to_vec();
        let batch = sluice_plugin::abi::Batch::parse(&ours).unwrap();
        for (i, r) in records.iter().enumerate() {
            let view = sluice_plugin::Record::from(batch.get(i).unwrap());
            assert_eq!(
                (view.key.as_deref(), &view.value[..], view.timestamp, &view.origin.topic, view.origin.offset),
                (r.key.as_deref(), &r.value[..], r.timestamp, &r.origin.topic.to_string(), r.origin.offset)
            );
            let headers = |hs: &[Header]| hs.iter().map(|h| (h.name.clone(), h.value.clone())).collect::<Vec<_>>();
            assert_eq!(
                view.headers.iter().map(|h| (h.name.clone(), h.value.clone())).collect::<Vec<_>>(),
                headers(&r.headers)
            );
        }
    }

    /// A record's plain outputs (no headers, no route) take the fast path
    /// until one that is not; the rest are decoded in full, and the limits
    /// count the bytes of all of them, no more and no fewer.
    #[test]
    fn plain_outputs_then_the_rest_keep_their_fields_and_byte_counts() {
        let tail = b"k1v1routev3k4v4";
        let at = payload_at(2, 4);
        let outputs = [
            // key "k1", value "v1", timestamp 7
            [3, 0, 0, 0, 7, 0, at(0), 2, at(2), 2, 0, 0],
            // value "v1" again, route "route": leaves the fast path
            [4, 0, 0, 0, 0, 0, 0, 0, at(2), 2, at(4), 5],
            // after it, plain again: decoded by the general path
            [0, 0, 0, 0, 0, 0, 99, 99, at(9), 2, 0, 0],
            // the second record's output, key "k4", value "v4"
            [1, 0, 0, 0, 0, 0, at(11), 2, at(13), 2, 0, 0],
        ];
        let buf = results(&[[0, 3, 0], [0, 1, 0]], &outputs, tail);
        // Bytes per record: 2+2 + 2 + 2 = 8 (the route is not counted), then 4.
        let exact = Limits { output_bytes: 8, ..Limits::default() };
        let decoded = decode(&buf, 2, &exact).unwrap();
        let records = decoded.clone().into_records();
        let first = records[0].as_ref().unwrap();
        assert_eq!(
            first.iter().map(|o| (o.key.as_deref(), &o.value[..], o.timestamp, o.route.as_deref())).collect::<Vec<_>>(),
            [
                (Some(&b"k1"[..]), &b"v1"[..], Some(7), None),
                (None, &b"v1"[..], None, Some("route")),
                (None, &b"v3"[..], None, None),
            ]
        );
        assert_eq!(records[1].as_ref().unwrap()[0].key.as_deref(), Some(&b"k4"[..]));
        let tight = Limits { output_bytes: 7, ..Limits::default() };
        let records = decode(&buf, 2, &tight).unwrap().into_records();
        assert!(records[0].as_ref().unwrap_err().contains("8 bytes of output"), "{records:?}");
        assert!(records[1].is_ok(), "only the record over the limit fails");
        let two = Limits { outputs: 2, ..Limits::default() };
        assert!(decode(&buf, 2, &two).unwrap().into_records()[0].as_ref().unwrap_err().contains("3 outputs"));
    }

    /// Overlapping ranges are counted each time (the host copies each one
    /// on): a batch whose outputs add up past `batch_output_bytes` fails its
    /// records from the one that crosses it, however few bytes the buffer has.
    #[test]
    fn a_batch_over_its_output_cap_fails_the_records_past_it() {
        let tail = b"vvvvvvvvvv";
        let at = payload_at(3, 3);
        // Three records, each one output: the same 10 bytes three times.
        let outputs = [[0, 0, 0, 0, 0, 0, 0, 0, at(0), 10, 0, 0]; 3];
        let buf = results(&[[0, 1, 0], [0, 1, 0], [0, 1, 0]], &outputs, tail);
        let cap = Limits { batch_output_bytes: 25, ..Limits::default() };
        let records = decode(&buf, 3, &cap).unwrap().into_records();
        assert!(records[0].is_ok() && records[1].is_ok(), "{records:?}");
        let error = records[2].as_ref().unwrap_err();
        assert!(error.contains("would reach 30 bytes") && error.contains("limit 25 per batch"), "{error}");
        assert!(decode(&buf, 3, &Limits { batch_output_bytes: 30, ..Limits::default() })
            .unwrap()
            .into_records()
            .iter()
            .all(Result::is_ok));
    }

    /// A batch of plain outputs only is written in one go when all of it fits
    /// one record's limits; past them, each record is checked on its own, so
    /// only the records over a limit fail.
    #[test]
    fn an_all_plain_batch_keeps_each_records_limits() {
        let tail = b"k0aaaabbbbccccc";
        let at = payload_at(3, 4);
        let outputs = [
            // record 0: key "k0" + value "aaaa" (6 bytes), timestamp 5
            [3, 0, 0, 0, 5, 0, at(0), 2, at(2), 4, 0, 0],
            // record 1 (no outputs), record 2: "bbbb", "ccccc" (9 bytes)
            [0, 0, 0, 0, 0, 0, 0, 0, at(6), 4, 0, 0],
            [2, 0, 0, 0, u32::MAX, u32::MAX, 0, 0, at(10), 5, 0, 0],
            // record 2's third output, empty
            [0, 0, 0, 0, 0, 0, 0, 0, at(15), 0, 0, 0],
        ];
        let buf = results(&[[0, 1, 0], [0, 0, 0], [0, 3, 0]], &outputs, tail);
        let shapes = |limits: &Limits| {
            decode(&buf, 3, limits)
                .unwrap()
                .into_records()
                .into_iter()
                .map(|r| {
                    r.map(|outs| outs.iter().map(|o| (o.key.clone(), o.value.clone(), o.timestamp)).collect::<Vec<_>>())
                })
                .collect::<Vec<_>>()
        };
        let whole = shapes(&Limits::default());
        assert_eq!(whole[0], Ok(vec![(Some(Bytes::from_static(b"k0")), Bytes::from_static(b"aaaa"), Some(5))]));
        assert_eq!(whole[1], Ok(vec![]));
        assert_eq!(
            whole[2],
            Ok(vec![
                (None, Bytes::from_static(b"bbbb"), None),
                (None, Bytes::from_static(b"ccccc"), Some(-1)),
                (None, Bytes::new(), None)
            ])
        );
        // 15 bytes in all, 9 for the biggest record: the batch is over, no record is.
        assert_eq!(shapes(&Limits { output_bytes: 9, ..Limits::default() }), whole);
        let eight = shapes(&Limits { output_bytes: 8, ..Limits::default() });
        assert_eq!(eight[..2], whole[..2]);
        assert!(eight[2].as_ref().is_err_and(|e| e.contains("9 bytes of output")), "{eight:?}");
        let two = shapes(&Limits { outputs: 2, ..Limits::default() });
        assert_eq!(two[..2], whole[..2]);
        assert!(two[2].as_ref().is_err_and(|e| e.contains("3 outputs")), "{two:?}");
    }

    /// What the shared reader refuses becomes the failure of one record, or
    /// of the whole call (see sluice-abi's tests for every case).
    #[test]
    fn a_bad_output_fails_its_record_and_a_bad_buffer_the_call() {
        let limits = Limits::default();
        let bad_value = results(&[[0, 1, 0], [1, 0, 0]], &[[0, 0, 0, 0, 0, 0, 0, 0, 1000, 5, 0, 0]], b"");
        let decoded = decode(&bad_value, 2, &limits).unwrap().into_records();
        let error = decoded[0].as_ref().unwrap_err();
        assert!(error.starts_with("plugin broke the contract: output 0's value at 1000+5 is outside"), "{error}");
        assert_eq!(decoded[1], Err(String::new()));
        let route = results(&[[0, 1, 0]], &[[4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32 + 12 + 48, 2]], &[0xff, 0xfe]);
        assert!(decode(&route, 1, &limits).unwrap().into_records()[0]
            .as_ref()
            .unwrap_err()
            .contains("route is not UTF-8"));
        let status = results(&[[7, 0, 0]], &[], b"");
        assert!(decode(&status, 1, &limits).unwrap().into_records()[0].as_ref().unwrap_err().contains("status 7"));
        let message = results(&[[1, 44, 3]], &[], b"bad");
        assert_eq!(decode(&message, 1, &limits).unwrap().into_records()[0], Err("bad".to_string()));
        let two = results(&[[0, 0, 0], [0, 0, 0]], &[], b"");
        assert_eq!(decode(&two, 3, &limits).unwrap_err(), "2 results for 3 records");
    }
}

//! The golden buffers: a batch as the host's [`Encoder`] writes it, and the
//! results a mirror transform gives for it as the Rust SDK's [`Writer`]
//! writes them, kept in `golden/`. The Python and JavaScript SDKs' tests
//! read the batch with their decoders, run the same mirror, and must write
//! these results byte for byte: the three codecs cannot drift apart.
//!
//! The files are checked, not written: after a deliberate change of the
//! layout, `SLUICE_WRITE_GOLDEN=1 cargo test -p sluice-abi --test golden`
//! writes them anew (and the SDKs must follow).

use sluice_abi::{Encoder, OutputMeta, RecordIn, Writer};
use std::path::PathBuf;

/// key, value, headers, timestamp, topic, partition, offset.
type Case = (
    Option<&'static [u8]>,
    &'static [u8],
    &'static [(&'static str, &'static [u8])],
    Option<i64>,
    &'static str,
    i32,
    i64,
);

/// The records, as `golden/README.md` lists them.
const RECORDS: &[Case] = &[
    (Some(b"k"), b"v0", &[("dup", b"1"), ("dup", b"")], Some(5), "t\u{f3}pic", 3, 9),
    (None, b"", &[], None, "t", 0, 10),
    (Some(b""), b"none", &[], Some(-1), "t", 0, 11),
    (None, b"fail", &[], None, "t", 1, 12),
];

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("golden")
}

fn batch() -> Vec<u8> {
    let mut encoder = Encoder::default();
    let records = RECORDS.iter().map(|(key, value, headers, timestamp, topic, partition, offset)| RecordIn {
        key: *key,
        value,
        headers: headers.iter().copied(),
        timestamp: *timestamp,
        topic,
        partition: *partition,
        offset: *offset,
    });
    encoder.encode(records).expect("a small batch encodes").to_vec()
}

/// The mirror: `fail` fails ("asked to fail"), `none` gives nothing, any
/// other record gives itself (key, value, headers, timestamp) and a second
/// output, `second`, routed to `r`.
fn results() -> Vec<u8> {
    let mut writer = Writer::for_batch(RECORDS.len(), 256);
    for (key, value, headers, timestamp, ..) in RECORDS {
        match *value {
            b"fail" => writer.end_record(Err("asked to fail".to_string())),
            b"none" => writer.end_record(Ok(())),
            _ => {
                writer.write(OutputMeta { key: *key, timestamp: *timestamp, route: None, headers }, value);
                writer.write(OutputMeta { route: Some("r"), ..OutputMeta::default() }, b"second");
                writer.end_record(Ok(()));
            }
        }
    }
    writer.finish()
}

#[test]
fn the_golden_buffers_are_what_the_codec_writes() {
    for (name, bytes) in [("batch.bin", batch()), ("results.bin", results())] {
        let path = dir().join(name);
        if std::env::var_os("SLUICE_WRITE_GOLDEN").is_some() {
            std::fs::write(&path, &bytes).unwrap();
        }
        let golden = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(golden == bytes, "{name}: the codec no longer writes the golden buffer (see this file's docs)");
    }
}

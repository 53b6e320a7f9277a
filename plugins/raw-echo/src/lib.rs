//! Contract 0.2 implemented from `wit/transform.wit`'s layout tables alone,
//! as a C or Go author would, without the Rust SDK: every input record comes
//! back as one output with the same key, value, headers and timestamp.
//!
//! Config `corrupt` breaks the results buffer on purpose, for the host's
//! hostile-guest tests:
//!
//! | corrupt     | what the host receives                                        |
//! |-------------|---------------------------------------------------------------|
//! | `none`      | a correct echo (the default)                                  |
//! | `offset`    | record 0's output value points past the end of the buffer     |
//! | `overflow`  | record 0's output value has offset and length near 2^32       |
//! | `count`     | one result fewer than there were records                      |
//! | `truncated` | the buffer cut in the middle of its tables                    |
//! | `magic`     | a wrong magic number                                          |
//! | `headers`   | record 0's output claims headers past the headers table       |

wit_bindgen::generate!({ world: "transformer", path: "../../wit" });

use exports::sluice::transform::batch::Guest;
use std::cell::RefCell;

thread_local! {
    static CORRUPT: RefCell<String> = const { RefCell::new(String::new()) };
}

fn u32_at(buf: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(buf[at..at + 4].try_into().expect("4 bytes"))
}

fn put(out: &mut Vec<u8>, words: &[u32]) {
    for w in words {
        out.extend_from_slice(&w.to_le_bytes());
    }
}

struct RawEcho;

impl Guest for RawEcho {
    fn init(config: Vec<(String, String)>) -> Result<(), String> {
        for (key, value) in config {
            match key.as_str() {
                "corrupt" => CORRUPT.with(|c| *c.borrow_mut() = value),
                other => return Err(format!("unknown config key {other:?} (known: corrupt)")),
            }
        }
        Ok(())
    }

    fn process(batch: Vec<u8>) -> Vec<u8> {
        let corrupt = CORRUPT.with(|c| c.borrow().clone());
        let b = &batch;
        assert_eq!(u32_at(b, 0), u32::from_le_bytes(*b"SLB2"), "not a batch");
        let (n, records, headers) = (u32_at(b, 4) as usize, u32_at(b, 16) as usize, u32_at(b, 24) as usize);
        // Payload first (copied from the batch), then the three tables.
        let mut out = vec![0u8; 32];
        let copy = |out: &mut Vec<u8>, off: u32, len: u32| {
            let at = out.len() as u32;
            out.extend_from_slice(&b[off as usize..(off + len) as usize]);
            (at, len)
        };
        let (mut outputs, mut header_entries) = (Vec::new(), Vec::new());
        for i in 0..n {
            let r = records + i * 56;
            let flags = u32_at(b, r);
            let (first, count) = (u32_at(b, r + 12), u32_at(b, r + 16));
            let key = copy(&mut out, u32_at(b, r + 40), u32_at(b, r + 44));
            let value = copy(&mut out, u32_at(b, r + 48), u32_at(b, r + 52));
            let out_first = header_entries.len() as u32 / 4;
            for h in first..first + count {
                let e = headers + h as usize * 16;
                let name = copy(&mut out, u32_at(b, e), u32_at(b, e + 4));
                let value = copy(&mut out, u32_at(b, e + 8), u32_at(b, e + 12));
                header_entries.extend([name.0, name.1, value.0, value.1]);
            }
            let timestamp = &b[r + 32..r + 40];
            let ts = [
                u32::from_le_bytes(timestamp[..4].try_into().unwrap()),
                u32::from_le_bytes(timestamp[4..].try_into().unwrap()),
            ];
            let value = match (i, corrupt.as_str()) {
                (0, "offset") => (out.len() as u32 + 1000, value.1.max(1)),
                (0, "overflow") => (u32::MAX - 1, u32::MAX),
                _ => value,
            };
            let count = if (i, corrupt.as_str()) == (0, "headers") { count + 1_000 } else { count };
            outputs.push([flags & 3, out_first, count, 0, ts[0], ts[1], key.0, key.1, value.0, value.1, 0, 0]);
        }
        let results = if corrupt == "count" { n.saturating_sub(1) } else { n };
        let results_off = out.len() as u32;
        for _ in 0..results {
            put(&mut out, &[0, 1, 0]);
        }
        let outputs_off = out.len() as u32;
        for o in &outputs {
            put(&mut out, o);
        }
        let headers_off = out.len() as u32;
        put(&mut out, &header_entries);
        let magic = if corrupt == "magic" { 0xdead_beef } else { u32::from_le_bytes(*b"SLO2") };
        let header = [
            magic,
            results as u32,
            outputs.len() as u32,
            header_entries.len() as u32 / 4,
            results_off,
            outputs_off,
            headers_off,
            0,
        ];
        for (i, w) in header.iter().enumerate() {
            out[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
        }
        if corrupt == "truncated" {
            out.truncate(results_off as usize + 6);
        }
        out
    }
}

export!(RawEcho);

//! A deliberately hostile plugin for Sluice's own tests. Config `mode` picks the
//! misbehaviour; it only misbehaves on records whose value is `trigger`
//! (default `boom`), so a test can mix good and poison records in one batch,
//! and chain several chaos stages each with its own trigger. Other records
//! are echoed.
//!
//! | mode          | on `boom`                                 |
//! |---------------|-------------------------------------------|
//! | `echo`        | echoes it like any other record           |
//! | `trap`        | panics (a WASM trap)                      |
//! | `loop`        | spins forever (stopped by the CPU limit)  |
//! | `alloc`       | allocates without bound (memory limit)    |
//! | `error`       | returns an error for the record           |
//! | `init-trap`   | (any record) panics already in `init`     |
//! | `init-reject` | (any record) rejects its config in `init` |
//! | `fs`          | tries to read `/etc/hostname`             |
//! | `net`         | tries to connect to `addr` (TCP)          |
//! | `read`        | connects to `addr` and reads until it closes |
//! | `sleep`       | sleeps `sleep_s` seconds (WASI's clocks)  |
//! | `big`         | returns one output of `big_mib` MiB       |
//! | `many`        | returns `many` empty outputs              |
//! | `log`         | logs `log_lines` lines, then echoes it    |
//! | `mirror`      | (every record) echoes it whole: key, value, headers, timestamp |
//! | `clock`       | returns `{"wall_ms": …, "random": …}`: WASI's wall clock and a random number |
//!
//! `trigger = "*"` misbehaves on every record (a broken version).
//! Config `marker` (optional) is prepended to every echoed value, so hot-reload
//! tests can tell versions apart. Echoed records keep only their value.
//!
//! Built with the SDK's `contract-0-1` feature it is also the 0.1 fixture
//! (`chaos_v01.wasm`) of the compatibility tests.

use sluice_plugin::{export_transform, Config, Output, OutputMeta, Outputs, Record, RecordView, Transform};

pub struct Chaos {
    mode: String,
    marker: String,
    addr: String,
    big_mib: usize,
    many: usize,
    log_lines: u64,
    sleep_s: u64,
    trigger: Vec<u8>,
}

impl Chaos {
    /// Whether this record is one to misbehave on.
    fn triggered(&self, value: &[u8]) -> bool {
        self.trigger == b"*" || value == self.trigger.as_slice()
    }
}

impl Transform for Chaos {
    fn init(config: &Config) -> Result<Self, String> {
        config.reject_unknown(&["mode", "marker", "addr", "big_mib", "many", "log_lines", "sleep_s", "trigger"])?;
        let mode = config.get("mode").unwrap_or("echo").to_string();
        match mode.as_str() {
            "init-trap" => panic!("chaos: trapping in init as asked"),
            "init-reject" => Err("chaos: config rejected as asked".to_string()),
            "echo" | "mirror" | "trap" | "loop" | "alloc" | "error" | "fs" | "net" | "read" | "sleep" | "big"
            | "many" | "log" | "clock" => Ok(Chaos {
                mode,
                marker: config.get("marker").unwrap_or_default().to_string(),
                addr: config.get("addr").unwrap_or("127.0.0.1:9").to_string(),
                big_mib: config.parse("big_mib")?.unwrap_or(20),
                many: config.parse("many")?.unwrap_or(200_000),
                log_lines: config.parse("log_lines")?.unwrap_or(2_000_000),
                sleep_s: config.parse("sleep_s")?.unwrap_or(60),
                trigger: config.get("trigger").unwrap_or("boom").as_bytes().to_vec(),
            }),
            other => Err(format!("unknown mode {other:?}")),
        }
    }

    fn process(&mut self, record: Record) -> Result<Vec<Output>, String> {
        if self.mode == "mirror" {
            return Ok(vec![Output {
                key: record.key,
                value: record.value,
                headers: record.headers,
                timestamp: record.timestamp,
                route: None,
            }]);
        }
        if self.triggered(&record.value) {
            match self.mode.as_str() {
                "trap" => panic!("chaos: trapping as asked"),
                "loop" => {
                    let mut n: u64 = 0;
                    loop {
                        n = std::hint::black_box(n.wrapping_add(1));
                    }
                }
                "alloc" => {
                    let mut hoard: Vec<Vec<u8>> = Vec::new();
                    loop {
                        hoard.push(vec![1u8; 1 << 20]);
                        std::hint::black_box(&hoard);
                    }
                }
                "error" => return Err("chaos: failing the record as asked".to_string()),
                "fs" => {
                    return std::fs::read_to_string("/etc/hostname")
                        .map(|s| vec![Output::new(s)])
                        .map_err(|e| format!("chaos: cannot read /etc/hostname: {e}"))
                }
                "net" => {
                    return std::net::TcpStream::connect(&self.addr)
                        .map(|_| vec![Output::new(format!("connected to {}", self.addr))])
                        .map_err(|e| format!("chaos: cannot connect to {}: {e}", self.addr))
                }
                "read" => {
                    use std::io::Read;
                    let mut stream = std::net::TcpStream::connect(&self.addr)
                        .map_err(|e| format!("chaos: cannot connect to {}: {e}", self.addr))?;
                    let mut got = Vec::new();
                    stream.read_to_end(&mut got).map_err(|e| format!("chaos: cannot read from {}: {e}", self.addr))?;
                    return Ok(vec![Output::new(got)]);
                }
                "sleep" => std::thread::sleep(std::time::Duration::from_secs(self.sleep_s)),
                "clock" => {
                    use std::hash::BuildHasher;
                    let wall_ms = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_millis() as u64);
                    // Seeded from WASI's random numbers.
                    let random = std::collections::hash_map::RandomState::new().hash_one(0u8);
                    return Ok(vec![Output::new(format!("{{\"wall_ms\":{wall_ms},\"random\":{random}}}"))]);
                }
                "big" => return Ok(vec![Output::new(vec![b'x'; self.big_mib << 20])]),
                "many" => return Ok((0..self.many).map(|_| Output::new(Vec::new())).collect()),
                "log" => {
                    for i in 0..self.log_lines {
                        sluice_plugin::log::info(&format!(
                            "chaos: log line {i} of {}, flooding as asked",
                            self.log_lines
                        ));
                    }
                }
                _ => {}
            }
        }
        let mut value = self.marker.clone().into_bytes();
        value.extend_from_slice(&record.value);
        Ok(vec![Output::new(value)])
    }

    /// The echo without a copy (the boundary benchmark's guest); the
    /// misbehaviours take the owned path above.
    fn process_view(&mut self, record: RecordView<'_>, out: &mut Outputs) -> Result<(), String> {
        if self.mode == "mirror" {
            let headers: Vec<(&str, &[u8])> = record
                .headers
                .iter()
                .map(|(name, value)| (std::str::from_utf8(name).unwrap_or("\u{fffd}"), value))
                .collect();
            out.write(
                OutputMeta { key: record.key, timestamp: record.timestamp, route: None, headers: &headers },
                record.value,
            );
            return Ok(());
        }
        if self.triggered(record.value) {
            for output in self.process(Record::from(record))? {
                out.push(output);
            }
            return Ok(());
        }
        out.write_with(OutputMeta::default(), |value| {
            if !self.marker.is_empty() {
                value.extend_from_slice(self.marker.as_bytes());
            }
            value.extend_from_slice(record.value);
        });
        Ok(())
    }
}

export_transform!(Chaos);

//! # sluice-plugin: write a Sluice transform as one plain function
//!
//! A Sluice transform is a WebAssembly component implementing
//! `wit/transform.wit`. This crate hides that contract: you implement
//! [`Transform`] (a constructor taking the plugin's [`Config`] and a `process`
//! function from one [`Record`] to zero or more [`Output`]s), then invoke
//! [`export_transform!`]. Batching, the boundary types and the instance state
//! are the SDK's job.
//!
//! ```ignore
//! use sluice_plugin::{export_transform, Config, Output, Record, Transform};
//!
//! struct Upper;
//!
//! impl Transform for Upper {
//!     fn init(config: &Config) -> Result<Self, String> {
//!         config.reject_unknown(&[])?;
//!         Ok(Upper)
//!     }
//!     fn process(&mut self, record: Record) -> Result<Vec<Output>, String> {
//!         Ok(vec![Output::new(record.value.to_ascii_uppercase())])
//!     }
//! }
//!
//! export_transform!(Upper);
//! ```
//!
//! Build with `cargo build --release --target wasm32-wasip2`. Because the
//! logic is plain Rust, `cargo test` runs it natively.
//!
//! # Contracts
//!
//! The component speaks contract 0.2 (`wit/transform.wit`): a batch crosses
//! the sandbox as one buffer each way. For a transform that should not copy
//! at all, implement [`Transform::process_view`] as well: it reads a borrowed
//! [`RecordView`] and writes its outputs straight into the results buffer
//! through [`Outputs`]. With the `contract-0-1` feature the same code builds
//! a 0.1 component (`wit/0.1/transform.wit`), for hosts that predate 0.2.
//!
//! With the `state` feature it builds a contract 0.3 component
//! (`wit/0.3/transform.wit`), and [`state`] keeps values by key across
//! batches, restarts and rebalances, per source partition, committed with
//! the pipeline's rows and offsets.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::str::FromStr;

pub mod abi;
pub use abi::{collect, Headers, OriginView, OutputMeta, Outputs, RecordView};

#[cfg(all(feature = "contract-0-1", feature = "state"))]
compile_error!("keyed state needs contract 0.3: the `state` and `contract-0-1` features exclude each other");

#[cfg(feature = "state")]
pub mod state;
#[cfg(feature = "state")]
pub mod window;

/// A fired timer (see [`state::set_timer`]): its key, its time, and the
/// partition it was set in.
#[cfg(feature = "state")]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timer {
    pub key: Vec<u8>,
    /// Milliseconds since the Unix epoch.
    pub at: i64,
    /// The partition (its offset is -1).
    pub origin: Origin,
}

/// A state entry: its key and its value (see [`Transform::migrate`]).
#[cfg(feature = "state")]
pub type StateEntry = (Vec<u8>, Vec<u8>);

/// Bindings generated from `wit/transform.wit` (contract 0.2). Plugin
/// authors do not need them; they are public for [`export_transform!`].
#[cfg(not(any(feature = "contract-0-1", feature = "state")))]
#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        world: "transformer",
        path: "../../wit",
        pub_export_macro: true,
        default_bindings_module: "sluice_plugin::bindings",
    });
}

/// Bindings generated from `wit/0.3/transform.wit` (contract 0.3: 0.2 with
/// keyed state, and the state's version).
#[cfg(all(feature = "state", not(feature = "contract-0-1")))]
#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        world: "versioned-transformer",
        path: "../../wit/0.3",
        pub_export_macro: true,
        default_bindings_module: "sluice_plugin::bindings",
    });
}

/// Bindings generated from `wit/0.1/transform.wit` (contract 0.1).
#[cfg(feature = "contract-0-1")]
#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        world: "transformer",
        path: "../../wit/0.1",
        pub_export_macro: true,
        default_bindings_module: "sluice_plugin::bindings",
    });
}

/// The plugin's allocator: Talc is much faster than the dlmalloc a WebAssembly
/// build gets by default (plugins allocate per record and per output). Off
/// with the crate's `talc` feature, for a plugin that sets its own.
#[cfg(all(feature = "talc", target_family = "wasm", not(target_feature = "atomics")))]
#[global_allocator]
static ALLOCATOR: talc::wasm::WasmDynamicTalc = talc::wasm::new_wasm_dynamic_allocator();

/// A record header (Kafka headers are ordered and may repeat a name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub name: String,
    pub value: Vec<u8>,
}

/// Where an input record came from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Origin {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// One input record.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Record {
    pub key: Option<Vec<u8>>,
    pub value: Vec<u8>,
    pub headers: Vec<Header>,
    /// Milliseconds since the Unix epoch.
    pub timestamp: Option<i64>,
    pub origin: Origin,
}

impl Record {
    /// A record with just a value, as a test fixture or from `sluice plugin test`.
    pub fn from_value(value: impl Into<Vec<u8>>) -> Self {
        Record { value: value.into(), ..Record::default() }
    }
}

/// One output record. Build it with [`Output::new`] and the `with_*` methods.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Output {
    pub key: Option<Vec<u8>>,
    pub value: Vec<u8>,
    pub headers: Vec<Header>,
    /// Milliseconds since the Unix epoch.
    pub timestamp: Option<i64>,
    /// A named sink of the pipeline; `None` is the default sink.
    pub route: Option<String>,
}

impl Output {
    pub fn new(value: impl Into<Vec<u8>>) -> Self {
        Output { value: value.into(), ..Output::default() }
    }
    pub fn with_key(mut self, key: impl Into<Vec<u8>>) -> Self {
        self.key = Some(key.into());
        self
    }
    pub fn with_timestamp(mut self, millis: i64) -> Self {
        self.timestamp = Some(millis);
        self
    }
    pub fn with_route(mut self, route: impl Into<String>) -> Self {
        self.route = Some(route.into());
        self
    }
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        self.headers.push(Header { name: name.into(), value: value.into() });
        self
    }
}

/// The plugin's configuration: the `config` table of its pipeline entry.
/// Values arrive as strings (TOML numbers and booleans are written out;
/// arrays and tables arrive as JSON).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Config(BTreeMap<String, String>);

impl Config {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    /// Parses `key` as `T`, with a message naming the key when it does not parse.
    pub fn parse<T>(&self, key: &str) -> Result<Option<T>, String>
    where
        T: FromStr,
        T::Err: Display,
    {
        self.get(key).map(|raw| raw.parse::<T>().map_err(|e| format!("config `{key}` = {raw:?}: {e}"))).transpose()
    }

    /// Rejects any key not in `known`, so that a typo in the pipeline file is
    /// reported instead of silently ignored.
    pub fn reject_unknown(&self, known: &[&str]) -> Result<(), String> {
        let unknown: Vec<&str> = self.0.keys().map(String::as_str).filter(|k| !known.contains(k)).collect();
        match (unknown.is_empty(), known.is_empty()) {
            (true, _) => Ok(()),
            (false, true) => {
                Err(format!("unknown config key(s): {} (this plugin takes no config)", unknown.join(", ")))
            }
            (false, false) => {
                Err(format!("unknown config key(s): {} (known: {})", unknown.join(", "), known.join(", ")))
            }
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for Config {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        Config(iter.into_iter().map(|(k, v)| (k.into(), v.into())).collect())
    }
}

/// A transform: built once per instance from its configuration, then called
/// for every record.
pub trait Transform: Sized + 'static {
    /// Validates the configuration. An `Err` rejects the pipeline (or the hot
    /// reload) with this message.
    fn init(config: &Config) -> Result<Self, String>;

    /// Transforms one record into zero or more outputs. An `Err` sends the
    /// input record to the pipeline's dead-letter destination with this
    /// message; it does not stop the pipeline.
    fn process(&mut self, record: Record) -> Result<Vec<Output>, String>;

    /// A timer set with [`state::set_timer`] fired: the watermark of its
    /// partition passed its time. Its outputs go on like a record's; an
    /// `Err` dead-letters the timer. The default emits nothing.
    #[cfg(feature = "state")]
    fn on_timer(&mut self, timer: Timer) -> Result<Vec<Output>, String> {
        let _ = timer;
        Ok(Vec::new())
    }

    /// The version of the state this build reads and writes. Change it when
    /// the state's keys or values change shape, and convert the state of
    /// the versions before in [`Transform::migrate`]: the host then runs a
    /// swap to this build only if it migrates from every version the
    /// pipeline's state holds, and refuses it (with the reason) otherwise.
    #[cfg(feature = "state")]
    const STATE_VERSION: u32 = 0;

    /// The state versions [`Transform::migrate`] converts from.
    #[cfg(feature = "state")]
    const MIGRATES_FROM: &'static [u32] = &[];

    /// Converts one entry kept by state version `from` (one of
    /// [`Transform::MIGRATES_FROM`]) into this version's shape: `Some((key,
    /// value))` keeps it (the key may change), `None` deletes it. Called
    /// without an instance (`init` has not run) for each entry of a
    /// partition before the first batch that holds it; an `Err` fails that
    /// batch, and the pipeline's `on_plugin_failure` applies. Timers keep
    /// their keys.
    #[cfg(feature = "state")]
    fn migrate(from: u32, key: Vec<u8>, value: Vec<u8>) -> Result<Option<StateEntry>, String> {
        let _ = (key, value);
        Err(format!("no migrate from state version {from}"))
    }

    /// Transforms one borrowed record, writing its outputs into `out`. The
    /// default copies the record, calls [`Transform::process`] and writes
    /// what it returns; override it to read and write without copying. An
    /// `Err` discards the outputs written for this record.
    fn process_view(&mut self, record: RecordView<'_>, out: &mut Outputs) -> Result<(), String> {
        for output in self.process(Record::from(record))? {
            out.push(output);
        }
        Ok(())
    }
}

/// Log lines from inside the plugin. In a WASM build they go to the host's
/// log, tagged with the pipeline and plugin; natively (unit tests) to stderr.
pub mod log {
    #[derive(Debug, Clone, Copy)]
    pub enum Level {
        Trace,
        Debug,
        Info,
        Warn,
        Error,
    }

    pub fn log(level: Level, message: &str) {
        #[cfg(target_arch = "wasm32")]
        {
            use crate::bindings::sluice::transform::log as host;
            let level = match level {
                Level::Trace => host::Level::Trace,
                Level::Debug => host::Level::Debug,
                Level::Info => host::Level::Info,
                Level::Warn => host::Level::Warn,
                Level::Error => host::Level::Error,
            };
            host::log(level, message);
        }
        #[cfg(not(target_arch = "wasm32"))]
        eprintln!("[{level:?}] {message}");
    }

    pub fn debug(message: &str) {
        log(Level::Debug, message)
    }
    pub fn info(message: &str) {
        log(Level::Info, message)
    }
    pub fn warn(message: &str) {
        log(Level::Warn, message)
    }
}

/// The glue [`export_transform!`] expands to. Not part of the public API.
#[doc(hidden)]
pub mod __rt {
    use super::*;
    use std::cell::{Cell, RefCell};

    pub fn init<T: Transform>(slot: &RefCell<Option<T>>, config: Vec<(String, String)>) -> Result<(), String> {
        let transform = T::init(&config.into_iter().collect())?;
        *slot.borrow_mut() = Some(transform);
        Ok(())
    }

    thread_local! {
        /// The last results buffer's size: the next one starts with that capacity.
        static LAST_RESULTS: Cell<usize> = const { Cell::new(0) };
    }

    /// Contract 0.2: one batch buffer in, one results buffer out.
    pub fn process<T: Transform>(slot: &RefCell<Option<T>>, batch: &[u8]) -> Vec<u8> {
        let batch = match abi::Batch::parse(batch) {
            Ok(batch) => batch,
            Err(e) => panic!("{e}"),
        };
        let mut out = Outputs::for_batch(batch.len(), LAST_RESULTS.get().max(batch.len() * 64));
        let mut slot = slot.borrow_mut();
        for i in 0..batch.len() {
            let result = match (slot.as_mut(), batch.get(i)) {
                (None, _) => Err("plugin used before init".to_string()),
                (Some(_), Err(e)) => panic!("{e}"),
                (Some(transform), Ok(record)) => {
                    #[cfg(feature = "state")]
                    {
                        crate::state::batch::begin_record(i as u32, record.origin.topic, record.origin.partition);
                        if record.origin.offset < 0 {
                            // A fired timer (contract 0.3).
                            let timer = Timer {
                                key: record.key.unwrap_or_default().to_vec(),
                                at: record.timestamp.unwrap_or_default(),
                                origin: Origin {
                                    topic: record.origin.topic.to_string(),
                                    partition: record.origin.partition,
                                    offset: record.origin.offset,
                                },
                            };
                            transform.on_timer(timer).map(|outputs| outputs.into_iter().for_each(|o| out.push(o)))
                        } else {
                            transform.process_view(record, &mut out)
                        }
                    }
                    #[cfg(not(feature = "state"))]
                    transform.process_view(record, &mut out)
                }
            };
            #[cfg(feature = "state")]
            if result.is_err() {
                crate::state::batch::undo_record();
            }
            out.end_record(result);
        }
        #[cfg(feature = "state")]
        crate::state::batch::end();
        let buf = out.finish();
        LAST_RESULTS.set(buf.len());
        buf
    }

    /// Contract 0.3's `schema`: every entry of a partition through
    /// [`Transform::migrate`]; the first error fails them all.
    #[cfg(feature = "state")]
    pub fn migrate<T: Transform>(from: u32, entries: Vec<StateEntry>) -> Result<Vec<StateEntry>, String> {
        if !T::MIGRATES_FROM.contains(&from) {
            return Err(format!(
                "no migrate from state version {from} (this build keeps version {})",
                T::STATE_VERSION
            ));
        }
        let mut out = Vec::with_capacity(entries.len());
        for (key, value) in entries {
            out.extend(T::migrate(from, key, value)?);
        }
        Ok(out)
    }

    #[cfg(feature = "contract-0-1")]
    pub use v01::*;

    #[cfg(feature = "contract-0-1")]
    mod v01 {
        use super::*;
        use crate::bindings::sluice::transform::types as wit;

        pub fn process_batch<T: Transform>(
            slot: &RefCell<Option<T>>,
            batch: Vec<wit::InputRecord>,
        ) -> Vec<Result<Vec<wit::OutputRecord>, String>> {
            let mut slot = slot.borrow_mut();
            let Some(transform) = slot.as_mut() else {
                return batch.iter().map(|_| Err("plugin used before init".to_string())).collect();
            };
            batch
                .into_iter()
                .map(|input| {
                    transform
                        .process(record_from_wit(input))
                        .map(|outputs| outputs.into_iter().map(output_to_wit).collect())
                })
                .collect()
        }

        fn record_from_wit(r: wit::InputRecord) -> Record {
            Record {
                key: r.key,
                value: r.value,
                headers: r.headers.into_iter().map(|h| Header { name: h.name, value: h.value }).collect(),
                timestamp: r.timestamp,
                origin: Origin { topic: r.origin.topic, partition: r.origin.partition, offset: r.origin.offset },
            }
        }

        fn output_to_wit(o: Output) -> wit::OutputRecord {
            wit::OutputRecord {
                key: o.key,
                value: o.value,
                headers: o.headers.into_iter().map(|h| wit::Header { name: h.name, value: h.value }).collect(),
                timestamp: o.timestamp,
                route: o.route,
            }
        }
    }
}

/// Exports a [`Transform`] implementation as the plugin's component entry
/// points. Invoke it once, at the crate root of a `cdylib` crate.
#[macro_export]
macro_rules! export_transform {
    ($transform:ty) => {
        #[allow(dead_code)]
        struct __SluiceGuest;

        ::std::thread_local! {
            static __SLUICE_STATE: ::std::cell::RefCell<::std::option::Option<$transform>> =
                const { ::std::cell::RefCell::new(::std::option::Option::None) };
        }

        $crate::__export_contract!($transform);

        #[cfg(target_arch = "wasm32")]
        $crate::bindings::export!(__SluiceGuest with_types_in $crate::bindings);
    };
}

/// Contract 0.2's (and 0.3's) entry points (see [`export_transform!`]).
#[cfg(not(feature = "contract-0-1"))]
#[doc(hidden)]
#[macro_export]
macro_rules! __export_contract {
    ($transform:ty) => {
        impl $crate::bindings::exports::sluice::transform::batch::Guest for __SluiceGuest {
            fn init(
                config: ::std::vec::Vec<(::std::string::String, ::std::string::String)>,
            ) -> ::std::result::Result<(), ::std::string::String> {
                __SLUICE_STATE.with(|state| $crate::__rt::init::<$transform>(state, config))
            }

            fn process(batch: ::std::vec::Vec<u8>) -> ::std::vec::Vec<u8> {
                __SLUICE_STATE.with(|state| $crate::__rt::process::<$transform>(state, &batch))
            }
        }

        $crate::__export_schema!($transform);
    };
}

/// Contract 0.3's `schema` export (see [`Transform::STATE_VERSION`]).
#[cfg(feature = "state")]
#[doc(hidden)]
#[macro_export]
macro_rules! __export_schema {
    ($transform:ty) => {
        impl $crate::bindings::exports::sluice::transform::schema::Guest for __SluiceGuest {
            fn state_version() -> $crate::bindings::exports::sluice::transform::schema::Versions {
                $crate::bindings::exports::sluice::transform::schema::Versions {
                    current: <$transform as $crate::Transform>::STATE_VERSION,
                    migrates_from: <$transform as $crate::Transform>::MIGRATES_FROM.to_vec(),
                }
            }

            fn migrate(
                from: u32,
                entries: ::std::vec::Vec<(::std::vec::Vec<u8>, ::std::vec::Vec<u8>)>,
            ) -> ::std::result::Result<
                ::std::vec::Vec<(::std::vec::Vec<u8>, ::std::vec::Vec<u8>)>,
                ::std::string::String,
            > {
                $crate::__rt::migrate::<$transform>(from, entries)
            }
        }
    };
}

/// Without state, no `schema` export.
#[cfg(not(feature = "state"))]
#[doc(hidden)]
#[macro_export]
macro_rules! __export_schema {
    ($transform:ty) => {};
}

/// Contract 0.1's entry points (see [`export_transform!`]).
#[cfg(feature = "contract-0-1")]
#[doc(hidden)]
#[macro_export]
macro_rules! __export_contract {
    ($transform:ty) => {
        impl $crate::bindings::exports::sluice::transform::transform::Guest for __SluiceGuest {
            fn init(
                config: ::std::vec::Vec<(::std::string::String, ::std::string::String)>,
            ) -> ::std::result::Result<(), ::std::string::String> {
                __SLUICE_STATE.with(|state| $crate::__rt::init::<$transform>(state, config))
            }

            fn process_batch(
                batch: ::std::vec::Vec<$crate::bindings::sluice::transform::types::InputRecord>,
            ) -> ::std::vec::Vec<$crate::bindings::sluice::transform::types::RecordResult> {
                __SLUICE_STATE.with(|state| $crate::__rt::process_batch::<$transform>(state, batch))
            }
        }
    };
}

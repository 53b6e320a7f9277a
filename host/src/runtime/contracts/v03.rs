//! Contract 0.3 (`wit/0.3/transform.wit`): 0.2's batch and results buffers,
//! plus the `state` import. The state calls are synchronous (a lookup in the
//! stage's [`crate::state::StageState`], no await) and reach the store's
//! [`crate::state::CallState`], which the instance sets for each call.

use super::v02::{decode, encode};
use super::CallError;
use crate::record::{RecordRef, Results};
use crate::runtime::host_state::HostState;
use crate::runtime::limits::Limits;
use sluice_abi::Encoder;
use wasmtime::component::{HasSelf, Linker};
use wasmtime::Store;

mod bindings {
    wasmtime::component::bindgen!({
        world: "transformer",
        path: "../wit/0.3",
        imports: {
            "sluice:transform/state.get": trappable,
            "sluice:transform/state.put": trappable,
            "sluice:transform/state.delete": trappable,
            "sluice:transform/state.set-timer": trappable,
            "sluice:transform/state.watermark": trappable,
            default: async,
        },
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

impl bindings::sluice::transform::state::Host for HostState {
    fn get(&mut self, record: u32, key: Vec<u8>) -> wasmtime::Result<Option<Vec<u8>>> {
        self.state_call(|state| state.get(record, &key))
    }

    fn put(&mut self, record: u32, key: Vec<u8>, value: Vec<u8>) -> wasmtime::Result<()> {
        self.state_call(|state| state.put(record, key, Some(value)))
    }

    fn delete(&mut self, record: u32, key: Vec<u8>) -> wasmtime::Result<()> {
        self.state_call(|state| state.put(record, key, None))
    }

    fn set_timer(&mut self, record: u32, key: Vec<u8>, at: i64) -> wasmtime::Result<()> {
        self.state_call(|state| state.set_timer(record, key, at))
    }

    fn watermark(&mut self, record: u32) -> wasmtime::Result<Option<i64>> {
        self.state_call(|state| state.watermark(record))
    }
}

/// A 0.3 instance's exports and its batch buffer.
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
        let results =
            self.bindings.sluice_transform_batch().call_process(store, batch).await.map_err(CallError::Call)?;
        decode(&results.into(), inputs.len(), limits).map_err(CallError::Contract)
    }
}

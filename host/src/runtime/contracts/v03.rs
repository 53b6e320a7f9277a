//! Contract 0.3 (`wit/0.3/transform.wit`): 0.2's batch and results buffers,
//! plus the `state` import. The state calls are synchronous (a lookup in the
//! stage's [`crate::state::StageState`], no await) and reach the store's
//! [`crate::state::CallState`], which the instance sets for each call.

use super::v02::{decode, encode};
use super::CallError;
use crate::record::{RecordRef, Results};
use crate::runtime::host_state::HostState;
use crate::runtime::limits::Limits;
use crate::state::StateVersion;
use sluice_abi::Encoder;
use wasmtime::component::{HasSelf, InstancePre, Linker};
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

/// The optional `schema` export (the state's version and `migrate`).
mod schema {
    wasmtime::component::bindgen!({
        world: "schema-export",
        path: "../wit/0.3",
        exports: { default: async },
    });
}

/// A linked 0.3 component: its exports' indices, found once.
pub(crate) struct Pre {
    instance_pre: InstancePre<HostState>,
    indices: bindings::TransformerIndices,
    /// `None`: the component keeps state version 0 and migrates none.
    schema: Option<schema::SchemaExportIndices>,
}

impl Pre {
    pub(super) fn new(instance_pre: InstancePre<HostState>) -> wasmtime::Result<Self> {
        let indices = bindings::TransformerIndices::new(&instance_pre)?;
        let schema = schema::SchemaExportIndices::new(&instance_pre).ok();
        Ok(Pre { instance_pre, indices, schema })
    }

    pub(super) fn engine(&self) -> &wasmtime::Engine {
        self.instance_pre.engine()
    }

    pub(super) async fn instantiate(&self, store: &mut Store<HostState>) -> wasmtime::Result<Bound> {
        let instance = self.instance_pre.instantiate_async(&mut *store).await?;
        let bindings = self.indices.load(&mut *store, &instance)?;
        let schema = self.schema.as_ref().map(|s| s.load(&mut *store, &instance)).transpose()?;
        Ok(Bound { bindings, schema, encoder: Encoder::default() })
    }
}

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
    schema: Option<schema::SchemaExport>,
    encoder: Encoder,
}

impl Bound {
    /// The state version the plugin keeps, and those it migrates from.
    pub(super) async fn state_version(&self, store: &mut Store<HostState>) -> wasmtime::Result<StateVersion> {
        let Some(schema) = &self.schema else { return Ok(StateVersion::default()) };
        let v = schema.sluice_transform_schema().call_state_version(store).await?;
        Ok(StateVersion { current: v.current, migrates_from: v.migrates_from })
    }

    /// The plugin's `migrate` of one partition's entries kept by version `from`.
    pub(super) async fn migrate(
        &self,
        store: &mut Store<HostState>,
        from: u32,
        entries: &[(Vec<u8>, Vec<u8>)],
    ) -> wasmtime::Result<Result<Vec<(Vec<u8>, Vec<u8>)>, String>> {
        match &self.schema {
            Some(schema) => schema.sluice_transform_schema().call_migrate(store, from, entries).await,
            None => Ok(Err("the plugin exports no sluice:transform/schema (no migrate)".to_string())),
        }
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

//! The plugin contracts the host serves, one module each: its bindings, the
//! imports it gives a plugin, and how a batch crosses into the plugin and
//! back. Which contract a component implements is decided once, when it is
//! linked ([`Pre::link`]); everything after goes through [`Pre`] and
//! [`Bound`], which the rest of the runtime uses without naming a contract.

mod v01;
mod v02;
mod v03;

use super::host_state::HostState;
use super::limits::Limits;
use crate::record::{RecordRef, Results};
use crate::state::StateVersion;
use wasmtime::component::{InstancePre, Linker};
use wasmtime::Store;

/// Which contract a plugin component was built against, read from its exports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Contract {
    /// `sluice:transform/transform@0.1.0`: `process-batch(list<input-record>)`.
    V01,
    /// `sluice:transform/batch@0.2.0`: `process(list<u8>) -> list<u8>`.
    V02,
    /// `sluice:transform/batch@0.3.0`: 0.2 with keyed state (`state` import).
    V03,
}

impl Contract {
    /// Whether components of this contract keep keyed state.
    pub fn has_state(self) -> bool {
        self == Contract::V03
    }
}

impl std::fmt::Display for Contract {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Contract::V01 => "0.1",
            Contract::V02 => "0.2",
            Contract::V03 => "0.3",
        })
    }
}

/// Adds every contract's host imports to `linker`.
pub(crate) fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    v01::add_to_linker(linker)?;
    v02::add_to_linker(linker)?;
    v03::add_to_linker(linker)
}

/// A linked component, ready to instantiate, of the contract it exports.
pub(crate) enum Pre {
    V01(v01::Pre),
    V02(v02::Pre),
    V03(v03::Pre),
}

impl Pre {
    /// Decides the component's contract from its exports: 0.3 first, then
    /// 0.2; a component exporting none is refused with each reason.
    pub(crate) fn link(linked: InstancePre<HostState>) -> anyhow::Result<Pre> {
        let v03_error = match v03::Pre::new(linked.clone()) {
            Ok(pre) => return Ok(Pre::V03(pre)),
            Err(error) => error,
        };
        match v02::Pre::new(linked.clone()) {
            Ok(pre) => Ok(Pre::V02(pre)),
            Err(v02_error) => match v01::Pre::new(linked) {
                Ok(pre) => Ok(Pre::V01(pre)),
                Err(v01_error) => Err(anyhow::anyhow!(
                    "it exports none of the contracts: sluice:transform/batch@0.3.0 ({v03_error:#}), sluice:transform/batch@0.2.0 ({v02_error:#}), sluice:transform/transform@0.1.0 ({v01_error:#})"
                )),
            },
        }
    }

    pub(crate) fn contract(&self) -> Contract {
        match self {
            Pre::V01(_) => Contract::V01,
            Pre::V02(_) => Contract::V02,
            Pre::V03(_) => Contract::V03,
        }
    }

    pub(crate) fn engine(&self) -> &wasmtime::Engine {
        match self {
            Pre::V01(pre) => pre.engine(),
            Pre::V02(pre) => pre.engine(),
            Pre::V03(pre) => pre.engine(),
        }
    }

    /// A new instance in `store`.
    pub(crate) async fn instantiate(&self, store: &mut Store<HostState>) -> wasmtime::Result<Bound> {
        Ok(match self {
            Pre::V01(pre) => Bound::V01(pre.instantiate_async(store).await?),
            Pre::V02(pre) => Bound::V02(v02::Bound::new(pre.instantiate_async(store).await?)),
            Pre::V03(pre) => Bound::V03(pre.instantiate(store).await?),
        })
    }
}

/// An instance's exports, of the contract its component was built against.
pub(crate) enum Bound {
    V01(v01::Bound),
    V02(v02::Bound),
    V03(v03::Bound),
}

/// Why a call did not give results.
pub(crate) enum CallError {
    /// The call itself failed: a trap, a limit (the store says which).
    Call(wasmtime::Error),
    /// The plugin's answer, or the batch, breaks the contract.
    Contract(String),
}

impl From<wasmtime::Error> for CallError {
    fn from(error: wasmtime::Error) -> Self {
        CallError::Call(error)
    }
}

impl Bound {
    /// The plugin's `init` with its configuration.
    pub(crate) async fn init(
        &self,
        store: &mut Store<HostState>,
        config: &[(String, String)],
    ) -> wasmtime::Result<Result<(), String>> {
        match self {
            Bound::V01(bindings) => bindings.sluice_transform_transform().call_init(store, config).await,
            Bound::V02(bound) => bound.init(store, config).await,
            Bound::V03(bound) => bound.init(store, config).await,
        }
    }

    /// The state version the plugin keeps (contract 0.3's optional
    /// `schema`; version 0, migrating none, without it or state).
    pub(crate) async fn state_version(&self, store: &mut Store<HostState>) -> wasmtime::Result<StateVersion> {
        match self {
            Bound::V03(bound) => bound.state_version(store).await,
            _ => Ok(StateVersion::default()),
        }
    }

    /// The plugin's `migrate` of one partition's entries kept by version `from`.
    pub(crate) async fn migrate(
        &self,
        store: &mut Store<HostState>,
        from: u32,
        entries: &[(Vec<u8>, Vec<u8>)],
    ) -> Result<Result<Vec<(Vec<u8>, Vec<u8>)>, String>, CallError> {
        match self {
            Bound::V03(bound) => bound.migrate(store, from, entries).await.map_err(CallError::Call),
            _ => Ok(Err("a contract 0.1 or 0.2 plugin keeps no state".to_string())),
        }
    }

    /// One batch through the plugin: exactly one result per input, each
    /// record's outputs checked against `limits`.
    pub(crate) async fn process(
        &mut self,
        store: &mut Store<HostState>,
        inputs: &[RecordRef<'_>],
        limits: &Limits,
    ) -> Result<Results<String>, CallError> {
        match self {
            Bound::V01(bindings) => v01::process(bindings, store, inputs, limits).await,
            Bound::V02(bound) => bound.process(store, inputs, limits).await,
            Bound::V03(bound) => bound.process(store, inputs, limits).await,
        }
    }
}

//! Contract 0.1 (`wit/0.1/transform.wit`): records lifted field by field.

use super::CallError;
use crate::record::{Bytes, Header, Output, RecordRef, Results};
use crate::runtime::host_state::HostState;
use crate::runtime::limits::Limits;
use wasmtime::component::{HasSelf, Linker};
use wasmtime::Store;

mod bindings {
    wasmtime::component::bindgen!({
        world: "transformer",
        path: "../wit/0.1",
        imports: { default: async },
        exports: { default: async },
    });
}

use bindings::sluice::transform::types as wit;

pub(crate) type Pre = bindings::TransformerPre<HostState>;
pub(crate) type Bound = bindings::Transformer;

pub(super) fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    bindings::Transformer::add_to_linker::<_, HasSelf<_>>(linker, |state| state)
}

impl wit::Host for HostState {}

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

/// Lowers `inputs` as WIT records, calls `process-batch`, and lifts and
/// checks the results.
pub(super) async fn process(
    bindings: &Bound,
    store: &mut Store<HostState>,
    inputs: &[RecordRef<'_>],
    limits: &Limits,
) -> Result<Results<String>, CallError> {
    let batch: Vec<wit::InputRecord> = inputs.iter().map(to_wit).collect();
    let results =
        bindings.sluice_transform_transform().call_process_batch(store, &batch).await.map_err(CallError::Call)?;
    if results.len() != inputs.len() {
        return Err(CallError::Contract(format!("{} results for {} records", results.len(), inputs.len())));
    }
    let outputs = results.iter().map(|r| r.as_ref().map_or(0, Vec::len)).sum();
    let mut decoded = Results::with_owned_capacity(results.len(), outputs);
    let mut batch_bytes = 0;
    for result in results {
        decoded.push_with(|all| {
            let mine = all.len();
            for out in result? {
                all.push(from_wit(out));
            }
            limits.check_outputs(all.range(mine..all.len()), &mut batch_bytes)
        });
    }
    Ok(decoded)
}

fn to_wit(r: &RecordRef<'_>) -> wit::InputRecord {
    wit::InputRecord {
        key: r.key.map(<[u8]>::to_vec),
        value: r.value.to_vec(),
        headers: r.headers.iter().map(|h| wit::Header { name: h.name.clone(), value: h.value.clone() }).collect(),
        timestamp: r.timestamp,
        origin: wit::Origin {
            topic: r.origin.topic.to_string(),
            partition: r.origin.partition,
            offset: r.origin.offset,
        },
    }
}

fn from_wit(o: wit::OutputRecord) -> Output {
    Output {
        key: o.key.map(Bytes::from),
        value: o.value.into(),
        headers: o.headers.into_iter().map(|h| Header { name: h.name, value: h.value }).collect(),
        timestamp: o.timestamp,
        route: o.route,
    }
}

//! The host's record types: what sources produce, transforms consume and sinks write.
//! They mirror `wit/transform.wit` but belong to the host, so connectors never
//! depend on a WIT version.
//!
//! Keys and values are [`Bytes`]: the outputs of a batch are slices of the
//! one results buffer the plugin returned, and a chain hands them on to the
//! next stage and to the sinks without copying.

pub use bytes::Bytes;
use std::sync::Arc;

/// A record header (ordered; a name may repeat).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub name: String,
    pub value: Vec<u8>,
}

/// Where a record was read from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Origin {
    /// Shared by the records of a batch read from one topic: no allocation
    /// per record, and the 0.2 encoder recognises it by pointer.
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
}

/// One record read from a source.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Record {
    pub key: Option<Bytes>,
    pub value: Bytes,
    pub headers: Vec<Header>,
    /// Milliseconds since the Unix epoch.
    pub timestamp: Option<i64>,
    pub origin: Origin,
    /// Set by a source that could not take the record whole (e.g. a
    /// WebSocket frame over `max_message_bytes`): the record skips the
    /// transforms and goes to the dead letters with this reason.
    pub rejected: Option<String>,
}

/// One record produced by a transform (or passed through when there is none).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Output {
    pub key: Option<Bytes>,
    pub value: Bytes,
    pub headers: Vec<Header>,
    /// Milliseconds since the Unix epoch.
    pub timestamp: Option<i64>,
    /// A named sink of the pipeline; `None` is the default sink.
    pub route: Option<String>,
}

impl From<Record> for Output {
    /// Passthrough: the record as it came, to the default sink.
    fn from(r: Record) -> Self {
        Output { key: r.key, value: r.value, headers: r.headers, timestamp: r.timestamp, route: None }
    }
}

/// What a transform made of a batch: every output in one vector, in the
/// order of their input records, and per input record how many of them are
/// its own, or why it failed (`E`).
///
/// One vector per batch, not one per record: the 0.2 decoder knows the
/// batch's output count, and the chain and the sinks take the outputs in
/// order. (A `Vec<Output>` per record cost an allocation and a free per
/// record on the boundary bench.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Results<E> {
    outputs: Vec<Output>,
    records: Vec<Result<usize, E>>,
}

impl<E> Default for Results<E> {
    fn default() -> Self {
        Results { outputs: Vec::new(), records: Vec::new() }
    }
}

impl<E> Results<E> {
    pub fn with_capacity(records: usize, outputs: usize) -> Self {
        Results { outputs: Vec::with_capacity(outputs), records: Vec::with_capacity(records) }
    }

    /// Adds the next record's outputs.
    pub fn push_ok(&mut self, outputs: impl IntoIterator<Item = Output>) {
        let before = self.outputs.len();
        self.outputs.extend(outputs);
        self.records.push(Ok(self.outputs.len() - before));
    }

    /// Adds the next record as failed.
    pub fn push_err(&mut self, error: E) {
        self.records.push(Err(error));
    }

    /// Adds the next record: `fill` appends its outputs to the batch's (those
    /// of the records before stay as they are); on `Err` they are taken back.
    pub fn push_with(&mut self, fill: impl FnOnce(&mut Vec<Output>) -> Result<(), E>) {
        let before = self.outputs.len();
        match fill(&mut self.outputs) {
            Ok(()) => self.records.push(Ok(self.outputs.len() - before)),
            Err(error) => {
                self.outputs.truncate(before);
                self.records.push(Err(error));
            }
        }
    }

    /// Appends the records of `other`.
    pub fn append(&mut self, mut other: Results<E>) {
        self.outputs.append(&mut other.outputs);
        self.records.append(&mut other.records);
    }

    /// Input records.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Outputs of all the records.
    pub fn output_count(&self) -> usize {
        self.outputs.len()
    }

    /// Each record's outputs, or its error, in order.
    pub fn iter(&self) -> impl Iterator<Item = Result<&[Output], &E>> + '_ {
        let mut next = 0;
        self.records.iter().map(move |r| match r {
            Ok(n) => {
                let outputs = &self.outputs[next..next + n];
                next += n;
                Ok(outputs)
            }
            Err(e) => Err(e),
        })
    }

    /// The failed records' errors.
    pub fn errors(&self) -> impl Iterator<Item = &E> + '_ {
        self.records.iter().filter_map(|r| r.as_ref().err())
    }

    /// The outputs, and per record how many of them are its own, or its error.
    pub fn into_parts(self) -> (Vec<Output>, Vec<Result<usize, E>>) {
        (self.outputs, self.records)
    }

    /// A vector of outputs per record (for tests and `sluice plugin test`).
    pub fn into_records(self) -> Vec<Result<Vec<Output>, E>> {
        let mut outputs = self.outputs.into_iter();
        self.records.into_iter().map(|r| r.map(|n| outputs.by_ref().take(n).collect())).collect()
    }

    pub fn map_err<F>(self, mut f: impl FnMut(E) -> F) -> Results<F> {
        Results { outputs: self.outputs, records: self.records.into_iter().map(|r| r.map_err(&mut f)).collect() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(v: &str) -> Output {
        Output { value: Bytes::copy_from_slice(v.as_bytes()), ..Output::default() }
    }

    #[test]
    fn results_keep_each_records_outputs_apart() {
        let mut results: Results<String> = Results::default();
        results.push_ok([out("a"), out("b")]);
        results.push_err("bad".to_string());
        // A record that fails half-way: its outputs are taken back, not the ones before.
        results.push_with(|all| {
            all.push(out("half"));
            Err("failed after one output".to_string())
        });
        results.push_ok([]);
        results.push_with(|all| {
            all.push(out("c"));
            Ok(())
        });
        let mut more = Results::default();
        more.push_ok([out("d")]);
        results.append(more);
        assert_eq!((results.len(), results.output_count()), (6, 4));
        assert_eq!(results.errors().collect::<Vec<_>>(), ["bad", "failed after one output"]);
        let values: Vec<Result<Vec<&[u8]>, &String>> = results.iter().map(|r| r.map(|o| o.iter().map(|o| &o.value[..]).collect())).collect();
        assert_eq!(values, [Ok(vec![&b"a"[..], b"b"]), Err(&"bad".to_string()), Err(&"failed after one output".to_string()), Ok(vec![]), Ok(vec![&b"c"[..]]), Ok(vec![&b"d"[..]])]);
        let records = results.clone().into_records();
        assert_eq!(records[0], Ok(vec![out("a"), out("b")]));
        assert_eq!(records[5], Ok(vec![out("d")]));
        let mapped = results.map_err(|e| e.len());
        assert_eq!(mapped.errors().copied().collect::<Vec<_>>(), [3, 23]);
    }
}

//! The stdout sink: one output value per line.

use super::{Connector, Rejected, Sink};
use crate::connector::{Build, Check};
use crate::record::{Origin, OutputRef};
use async_trait::async_trait;
use schemars::JsonSchema;
use serde::Deserialize;
use std::io::Write;

/// `type = "stdout"`: one output value per line on standard output.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StdoutSinkConfig {}

impl Connector for StdoutSinkConfig {
    fn check(&mut self, _cx: &mut Check<'_>) {}

    fn build(&self, _name: &str, _cx: &Build<'_>) -> anyhow::Result<Box<dyn Sink>> {
        Ok(Box::new(StdoutSink))
    }
}

pub struct StdoutSink;

#[async_trait]
impl Sink for StdoutSink {
    async fn write(&self, batch: &[OutputRef<'_>], _origins: &[&Origin]) -> anyhow::Result<Vec<Rejected>> {
        // Standard output is line-buffered: written line by line, each
        // record would be a system call. Buffered, a batch takes a few.
        let mut out = std::io::BufWriter::with_capacity(64 << 10, std::io::stdout().lock());
        for record in batch {
            out.write_all(record.value)?;
            out.write_all(b"\n")?;
        }
        out.flush()?;
        Ok(Vec::new())
    }
}

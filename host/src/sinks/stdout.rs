//! The stdout sink: one output value per line.

use super::{Rejected, Sink};
use crate::record::{Origin, OutputRef};
use async_trait::async_trait;
use std::io::Write;

pub struct StdoutSink;

#[async_trait]
impl Sink for StdoutSink {
    async fn write(&self, batch: &[OutputRef<'_>], _origins: &[&Origin]) -> anyhow::Result<Vec<Rejected>> {
        let mut out = std::io::stdout().lock();
        for record in batch {
            out.write_all(record.value)?;
            out.write_all(b"\n")?;
        }
        out.flush()?;
        Ok(Vec::new())
    }
}

//! One test's services as one value: a broker with its topics, a private
//! PostgreSQL schema, and a folder for pipeline files, with the TOML of the
//! Kafka tables most tests use and the barrier they wait on before they
//! assert ([`Fixture::committed`]).

use super::services::{wait_committed, Broker, Ends, PgSchema, SluiceProcess};
use std::path::{Path, PathBuf};

pub struct Fixture {
    pub broker: Broker,
    pub pg: PgSchema,
    /// Holds the pipeline files (and whatever else a test writes).
    pub dir: tempfile::TempDir,
}

impl Fixture {
    /// A broker with `topics` (name, partitions), and schema `schema`.
    pub async fn new(schema: &str, topics: &[(&str, i32)]) -> Fixture {
        let broker = Broker::start();
        for (topic, partitions) in topics {
            broker.create_topic(topic, *partitions).await;
        }
        let pg = PgSchema::create(schema).await;
        Fixture { broker, pg, dir: tempfile::tempdir().unwrap() }
    }

    /// `name` in the fixture's schema.
    pub fn table(&self, name: &str) -> String {
        format!("{}.{name}", self.pg.name)
    }

    /// The offsets table of the sinks writing into the schema.
    pub fn offsets_table(&self) -> String {
        self.table("sluice_offsets")
    }

    /// Writes pipeline file `name` into the fixture's folder.
    pub fn pipeline(&self, name: &str, text: &str) -> PathBuf {
        super::services::write_pipeline(self.dir.path(), name, text)
    }

    /// `sluice run` on `files`, against the fixture's broker.
    pub fn run(&self, files: &[&Path]) -> SluiceProcess {
        SluiceProcess::run(files, &self.broker.addr)
    }

    /// Waits until `pipeline`'s sink `sink` has committed `topic` up to
    /// `ends` in the schema's offsets table: every record of the input is
    /// in the sinks with what it made.
    pub async fn committed(&self, (pipeline, sink): (&str, &str), topic: &str, ends: &Ends) -> bool {
        wait_committed(&self.pg.client, &self.offsets_table(), (pipeline, sink), topic, ends).await
    }
}

/// A `[source]` reading `trades_raw` from the test's broker in group
/// `group`, with more keys (`instance_id = …`, `batch_max_records = …`).
pub fn kafka_source(group: &str, more: &str) -> String {
    format!("[source]\ntype = \"kafka\"\nbrokers = \"${{SLUICE_BROKERS}}\"\ntopics = [\"trades_raw\"]\ngroup = \"{group}\"\n{more}")
}

/// A `[dead_letter]` into topic `topic` of the test's broker.
pub fn kafka_dead_letter(topic: &str) -> String {
    format!("[dead_letter]\ntype = \"kafka\"\nbrokers = \"${{SLUICE_BROKERS}}\"\ntopic = \"{topic}\"")
}

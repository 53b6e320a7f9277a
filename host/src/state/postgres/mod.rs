//! `[state.postgres]`: a PostgreSQL database that keeps a pipeline's keyed
//! state with the source offsets it goes to, for a pipeline whose sinks
//! cannot keep it (Kafka, stdout, a postgres sink that is not exactly-once).
//!
//! Each batch's state changes and its partitions' positions commit in one
//! transaction there, once every sink has the batch (the delivery writes the
//! [`PgKeeper`] last). A restart restores each partition's state as of
//! that commit and skips the records it includes, so the state counts each
//! record once; a sink's writes between its own ack and the commit are
//! written again after a crash (at-least-once for the sinks).
//!
//! The commit is fenced: it goes through only if the store still holds
//! each of the batch's partitions at the offset the batch's state started
//! from, so an instance that lost a partition to another cannot commit
//! over the other's state.
//!
//! The tables are the exactly-once sink's: the offsets table, under the
//! sink name [`STATE_KEEPER`], and `sluice_state` beside it.

pub mod keeper;
pub mod store;

pub use keeper::PgKeeper;
pub use store::{create_state_table, state_table, PgStateStore, StateStatements};

use crate::clients::postgres::target;
use crate::connector::Check;
use crate::state::StateKeeper;
use schemars::JsonSchema;
use serde::Deserialize;

/// The offsets table's `sink` column for positions a state store of its
/// own keeps (a sink's name cannot be mistaken for it: no sink writes it).
pub const STATE_KEEPER: &str = "[state]";

crate::postgres_config! {
    /// `[state.postgres]`: a PostgreSQL database of the state's own. Each
    /// batch's state changes and source offsets commit there in one
    /// transaction, once every sink has the batch.
    #[derive(Debug, Clone, Deserialize, PartialEq, JsonSchema)]
    #[serde(deny_unknown_fields)]
    pub struct PostgresStateConfig {
        /// The table of the source offsets the state goes to (optionally
        /// `schema.table`), created if missing; the state goes in
        /// `sluice_state` beside it. Default: `sluice_offsets`.
        pub offsets_table: Option<String>,
    }
}

impl PostgresStateConfig {
    /// Checks the connection options (what `sluice check` verifies).
    pub fn check(&self, cx: &mut Check<'_>) {
        if let Err(errors) = target(self, cx.dir()) {
            for e in errors {
                cx.error_at_first(&[&[e.option], &["url"]], e.message);
            }
        }
    }

    fn offsets_table(&self) -> String {
        self.offsets_table.clone().unwrap_or_else(|| "sluice_offsets".to_string())
    }

    /// The keeper of `pipeline`'s state; `dir` anchors relative certificate paths.
    pub fn build(&self, pipeline: &str, dir: &std::path::Path) -> anyhow::Result<Box<dyn StateKeeper>> {
        let target = target(self, dir).map_err(|errors| {
            anyhow::anyhow!("{}", errors.iter().map(|e| e.message.as_str()).collect::<Vec<_>>().join("; "))
        })?;
        Ok(Box::new(PgKeeper::new(target, pipeline, &self.offsets_table())))
    }
}

//! Pipeline files: the TOML structures ([`file`]; each connector's own table
//! is its folder's, under `sources/` and `sinks/`), `${VAR}` expansion
//! ([`env`]), validation into runnable [`Pipeline`]s ([`validate`]), what
//! changes between two sets of pipelines ([`diff`]), the file watcher that
//! triggers reloads ([`watcher`]), and the file format's JSON Schema and
//! reference chapter, generated from the structures ([`schema`]).

pub mod diff;
pub mod env;
pub mod file;
pub mod schema;
pub mod validate;
pub mod watcher;

pub use file::*;
pub use validate::{
    load_dir_or_files, load_pipeline, parse_pipeline, ConfigError, Pipeline, ShadowSpec, StateSpec, TransformSpec,
};

//! Pipeline files: the TOML structures ([`file`]), `${VAR}` expansion
//! ([`env`]) and validation into runnable [`Pipeline`]s ([`validate`]).

pub mod diff;
pub mod env;
pub mod file;
pub mod validate;

pub use file::*;
pub use validate::{load_dir_or_files, load_pipeline, ConfigError, Pipeline, TransformSpec};

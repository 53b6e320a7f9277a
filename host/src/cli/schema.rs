//! `sluice schema`: the pipeline file's JSON Schema, or the book's reference
//! chapter rendered from it.

use clap::Args;
use std::process::ExitCode;

#[derive(Debug, Args)]
pub struct SchemaArgs {
    /// Print the reference chapter (Markdown) instead of the JSON Schema.
    #[arg(long)]
    pub markdown: bool,
}

pub fn schema(args: &SchemaArgs) -> anyhow::Result<ExitCode> {
    if args.markdown {
        print!("{}", crate::config::schema::markdown());
    } else {
        print!("{}", crate::config::schema::json_text());
    }
    Ok(ExitCode::SUCCESS)
}
